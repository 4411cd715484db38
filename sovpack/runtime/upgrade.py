"""`sovpack runtime install` and `rollback`: a runtime imported into the store becomes the one in use, audited.

The runtime bundle is verified again as `serve` verifies a model (the keys that accepted it, still
trusted, and the threshold; every digest); the lock's SHA-256 signed in its sovpack.json then
anchors the installer's own checks (installer.py), which install it beside the current runtime
and switch PREFIX/current by one rename.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sovpack.bundle.verify import verify_bundle
from sovpack.errors import Failure, Refused, SovpackError, UsageError
from sovpack.runtime import installer
from sovpack.runtime.installer import LOCK_FILE, RECORD_FILE, RUNTIME_NAME, Installed, Prefix
from sovpack.store.store import Store

PREFIX_ENV = "SOVPACK_RUNTIME_PREFIX"


def default_prefix() -> Path | None:
    """$SOVPACK_RUNTIME_PREFIX, else the prefix of the runtime this sovpack runs from (PREFIX/runtimes/V)."""
    if os.environ.get(PREFIX_ENV):
        return Path(os.environ[PREFIX_ENV])
    environment = Path(sys.prefix)
    if environment.parent.name == "runtimes" and (environment / RECORD_FILE).is_file():
        return environment.parent.parent
    return None


def runtime_prefix(prefix: Path | None) -> Prefix:
    chosen = prefix or default_prefix()
    if chosen is None:
        raise UsageError(f"give --prefix (or set ${PREFIX_ENV}): this sovpack does not run from an installed runtime")
    return Prefix(chosen)


@contextmanager
def sovpack_errors() -> Iterator[None]:
    """The installer's errors as sovpack's, with the same exit codes."""
    try:
        yield
    except installer.InstallError as e:
        raise {1: Refused, 2: UsageError}.get(e.exit_code, Failure)(str(e)) from None


def install_from_store(store: Store, spec: str, prefix: Prefix) -> Installed:
    """Verify NAME@V under the store's rules, install it beside the current runtime and switch to it; audited."""
    bundle = store.find(spec)
    if bundle.name != RUNTIME_NAME:
        raise UsageError(f"{bundle.name} v{bundle.version} is not a sovpack runtime (those are named {RUNTIME_NAME})")
    audit = {"name": bundle.name, "version": bundle.version, "prefix": str(prefix.root)}
    try:
        report = verify_bundle(bundle.path, store.policy_for(bundle))
        if not report.ok:
            raise Refused(f"{bundle.name} v{bundle.version} failed verification ({report.failure.step}): {report.failure}")
        locked = report.metadata.file(LOCK_FILE)
        if locked is None:
            raise Refused(f"{bundle.name} v{bundle.version} has no {LOCK_FILE}: it is not a sovpack runtime")
        with sovpack_errors():
            verified = installer.verify_runtime(bundle.path, [], locked.sha256)
            if verified.lock.version != bundle.version:
                raise Refused(f"{LOCK_FILE} of {bundle.name} v{bundle.version} locks version {verified.lock.version}")
            installer.check_not_older(prefix, bundle.version)
            audit |= {"lock_sha256": verified.lock_sha256, "metadata_sha256": report.metadata_sha256}
            store.audit.append("runtime-verify", ok=True, signers=[k.name for k in report.signers], **audit)
            prefix.sweep_incomplete()
            result = installer.install(verified, prefix, f"{store.root}: {bundle.name}@{bundle.version}")
    except SovpackError as e:
        store.audit.append("runtime-install", outcome="refused" if e.exit_code == 1 else "failed", reason=str(e), **audit)
        raise
    store.audit.append("runtime-install", outcome=result.outcome, previous=result.previous, **audit)
    return result


def rollback(store: Store, prefix: Prefix) -> tuple[int, int]:
    """Switch back to the previous runtime; audited before the switch."""
    with sovpack_errors():
        current, previous = installer.rollback_target(prefix)
    store.audit.append("runtime-rollback", name=RUNTIME_NAME, prefix=str(prefix.root), version=current, to=previous)
    prefix.switch_to(previous)
    return current, previous
