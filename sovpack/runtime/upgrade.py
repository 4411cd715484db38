"""`sovpack runtime install` and `rollback`: a runtime imported into the store becomes the one in use, audited.

The runtime bundle is verified again as `serve` verifies a model: under the policy it was
accepted under (store/target.py `choose_policy`: the keys that accepted it, still trusted, and
the threshold), every digest, the file-kind gate with its signed wheel allowance; the lock's
SHA-256 signed in its sovpack.json then anchors the installer's own checks (installer.py),
which install it beside the current runtime and switch PREFIX/current by one rename. Every
change is recorded in the store's audit log before it is made (`AuditLog.ahead_of`).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sovpack.common import safe_json
from sovpack.errors import Failure, Refused, SovpackError, UsageError
from sovpack.runtime import installer
from sovpack.runtime.installer import LOCK_FILE, RECORD_FILE, RUNTIME_NAME, Installed, Prefix
from sovpack.store.store import Store
from sovpack.store.target import Target, choose_policy, verify_target

PREFIX_ENV = "SOVPACK_RUNTIME_PREFIX"
EVENT_INSTALL = "runtime-install"
EVENT_ROLLBACK = "runtime-rollback"


def bounded_json(raw: bytes, max_bytes: int) -> object:
    """What the installer parses (the lock, runtime.json), read by sovpack's one bounded loader (common/safe_json.py)."""
    return safe_json.loads(raw, max_bytes=max_bytes)


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
    return Prefix(chosen, loads=bounded_json)


@contextmanager
def sovpack_errors() -> Iterator[None]:
    """The installer's errors as sovpack's, with the same exit codes."""
    try:
        yield
    except installer.InstallError as e:
        raise {1: Refused, 2: UsageError}.get(e.exit_code, Failure)(str(e)) from None


def install_from_store(store: Store, spec: str, prefix: Prefix) -> Installed:
    """Verify NAME@V under the store's rules, install it beside the current runtime and switch to it; audited.

    A refusal before anything changes is recorded as `runtime-install` refused (or failed); the
    install and switch are recorded before they happen, and a second record says if they failed.
    """
    bundle = store.find(spec)
    if bundle.name != RUNTIME_NAME:
        raise UsageError(f"{bundle.name} v{bundle.version} is not a sovpack runtime (those are named {RUNTIME_NAME})")
    audit = {"name": bundle.name, "version": bundle.version, "prefix": str(prefix.root)}
    try:
        policy = choose_policy(store, (), None, imported_under=bundle, alternative=None)
        report = verify_target(Target(bundle.path, bundle), store, policy)
        if not report.ok:
            raise Refused(f"{bundle.name} v{bundle.version} failed verification ({report.failure.step}): {report.failure}")
        locked = report.metadata.file(LOCK_FILE)
        if locked is None:
            raise Refused(f"{bundle.name} v{bundle.version} has no {LOCK_FILE}: it is not a sovpack runtime")
        with sovpack_errors():
            verified = installer.verify_runtime(bundle.path, [], locked.sha256, loads=bounded_json)
            if verified.lock.version != bundle.version:
                raise Refused(f"{LOCK_FILE} of {bundle.name} v{bundle.version} locks version {verified.lock.version}")
            outcome = installer.check_installable(verified, prefix)
    except SovpackError as e:
        _record_refusal(store, e, audit)
        raise
    audit |= {
        "outcome": outcome,
        "previous": prefix.current,
        "signers": [k.name for k in report.signers],
        "lock_sha256": verified.lock_sha256,
        "metadata_sha256": report.metadata_sha256,
    }
    with store.audit.ahead_of(EVENT_INSTALL, **audit), sovpack_errors():
        prefix.sweep_incomplete()
        return installer.install(verified, prefix, f"{store.root}: {bundle.name}@{bundle.version}")


def _record_refusal(store: Store, error: SovpackError, fields: dict) -> None:
    try:
        outcome = "refused" if error.exit_code == 1 else "failed"
        store.audit.append(EVENT_INSTALL, outcome=outcome, reason=str(error), exit_code=error.exit_code, **fields)
    except OSError:
        pass  # a full disk must not hide the refusal itself


def rollback(store: Store, prefix: Prefix) -> tuple[int, int]:
    """Switch back to the previous runtime; recorded before the switch."""
    with sovpack_errors():
        current, previous = installer.rollback_target(prefix)
    with store.audit.ahead_of(EVENT_ROLLBACK, name=RUNTIME_NAME, prefix=str(prefix.root), version=current, to=previous):
        prefix.switch_to(previous)
    return current, previous
