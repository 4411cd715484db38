"""What a NAME_OR_BUNDLE argument names, and the trust policy it is checked under: one rule for every command.

The argument is a bundle directory when it is an existing directory, contains "/" or starts
with "."; otherwise NAME or NAME@VERSION of a bundle installed in the store (`find_target`).

The policy (`choose_policy`), for verify, check-volumes, import, serve and runtime install alike:

- keys given with `--trust`: those keys, and `--threshold` (default 1);
- an installed bundle being served (or installed as the runtime): the keys and threshold it was
  imported under, minus keys revoked since, and its certificate signers while the root they were
  accepted under is still trusted, with the store's CRLs (`Store.policy_for`); `--threshold` can
  only raise that threshold; a refusal says how to use it after all (the keys of an import under
  `--trust FILE` are trusted for that import only);
- otherwise the store's trusted keys and roots (with its CRLs) and the store's threshold, which
  `--threshold` replaces; where trust is optional (check-volumes), none when the store trusts
  no key and no root.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from sovpack.bundle.directory import require_bundle_dir
from sovpack.bundle.trust import TrustPolicy, load_trust
from sovpack.bundle.verify import VerifyReport, verify_bundle
from sovpack.errors import Refused
from sovpack.store.store import InstalledBundle, Store


@dataclass(frozen=True)
class Target:
    path: Path  # the bundle directory
    installed: InstalledBundle | None  # None when a bundle directory was named


def is_bundle_path(spec: str) -> bool:
    """Whether a NAME_OR_BUNDLE argument names a directory (else a bundle installed in the store)."""
    return Path(spec).is_dir() or "/" in spec or spec.startswith(".")


def find_target(spec: str, store: Store) -> Target:
    """Raises UsageError when `spec` is neither a bundle directory nor installed in the store.

    A path into the store's own bundles/NAME/VERSION is that installed bundle, held to the policy it
    was imported under exactly as by its name: a path is no way around its threshold.
    """
    if is_bundle_path(spec):
        require_bundle_dir(Path(spec))
        installed = _installed_at(Path(spec), store)
        return Target(Path(spec), None) if installed is None else Target(installed.path, installed)
    installed = store.find(spec)
    return Target(installed.path, installed)


def _installed_at(path: Path, store: Store) -> InstalledBundle | None:
    try:
        rel = path.resolve().relative_to(store.bundles_dir.resolve())
    except ValueError:
        return None
    if len(rel.parts) != 2 or not rel.parts[1].isdigit():
        return None
    return store.find(f"{rel.parts[0]}@{rel.parts[1]}")


def choose_policy(
    store: Store,
    trust: Sequence[Path],
    threshold: int | None,
    *,
    imported_under: InstalledBundle | None = None,
    required: bool = True,
    alternative: str | None = "serve it with --trust FILE",
) -> TrustPolicy | None:
    """The trust policy of the module docstring; None only when not `required` and there is no trust at all.

    `imported_under`: an installed bundle held to the policy it was accepted under (serve, runtime
    install); `alternative`: the other way out a refusal then names, if the command has one.
    Raises UsageError (no keys, a threshold they cannot meet) or Refused (too many of the
    bundle's signers revoked).
    """
    if trust:
        return load_trust(list(trust), threshold or 1)
    if imported_under is not None:
        return _policy_it_was_accepted_under(store, imported_under, threshold, alternative)
    if not required and not store.trusted_keys() and not store.trusted_roots():
        return None
    return store.trust_policy(threshold)


def _policy_it_was_accepted_under(
    store: Store, installed: InstalledBundle, threshold: int | None, alternative: str | None
) -> TrustPolicy:
    """Store.policy_for, whose refusal (too few of the accepting keys trusted now) says how to use it after all."""
    _ = store.trusted_keys(), store.threshold  # a damaged key or policy file is refused here, with its own repair
    try:
        return store.policy_for(installed, threshold)
    except Refused as e:
        raise Refused(
            f"{e}: trust its signers in this store with `sovpack trust add FILE` (an import with --trust FILE "
            "trusts FILE for that import only; certificate signers: `sovpack trust add-root ROOT.pem`)"
            + (f", or {alternative}" if alternative else "")
        ) from None


def verify_target(target: Target, store: Store, policy: TrustPolicy) -> VerifyReport:
    """verify_bundle; the verification of an installed bundle is appended to the store's audit log."""
    report = verify_bundle(target.path, policy)
    if target.installed is not None:
        failure = {"step": report.failure.step, "reason": str(report.failure)} if report.failure else {}
        store.audit.append(
            "verify",
            name=target.installed.name,
            version=target.installed.version,
            ok=report.ok,
            signers=[k.name for k in report.signers],
            **failure,
        )
    return report
