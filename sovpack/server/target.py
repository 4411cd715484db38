"""What `sovpack serve NAME_OR_BUNDLE` points at, and the trust it must be verified under.

The argument is read as `sovpack verify` reads it (store.verify_target): a bundle directory
when it is an existing directory, contains "/" or starts with "."; otherwise NAME or
NAME@VERSION of a bundle installed in the store.

- a bundle directory: verified under `--trust` and `--threshold` (default 1), or, without
  `--trust`, under the store's trusted keys and the store's threshold, which `--threshold`
  replaces.
- an installed bundle: verified under the keys and threshold it was imported with, minus
  keys revoked since (Store.policy_for); `--threshold` can raise that threshold; a lower
  one is refused. `--trust` replaces that policy, as for a directory.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sovpack.bundle.directory import require_bundle_dir
from sovpack.bundle.trust import TrustPolicy, load_trust
from sovpack.errors import Refused
from sovpack.store.store import InstalledBundle, Store, is_bundle_path


@dataclass(frozen=True)
class ServeTarget:
    bundle: Path
    policy: TrustPolicy
    installed: InstalledBundle | None  # None when a bundle directory was given

    @property
    def trust_source(self) -> str:
        return "store record" if self.installed else "explicit"


def resolve_target(spec: str, store: Store, trust: tuple[Path, ...], threshold: int | None) -> ServeTarget:
    """Raises UsageError (not a bundle, not installed, no trust) or Refused (trust revoked below the threshold)."""
    if is_bundle_path(spec):
        bundle, installed = Path(spec), None
        require_bundle_dir(bundle)
    else:
        installed = store.find(spec)
        bundle = installed.path
    if trust:
        policy = load_trust(list(trust), threshold or 1)
    elif installed is None:
        policy = store.trust_policy(threshold)
    else:
        policy = _policy_it_was_accepted_under(store, installed, threshold)
    return ServeTarget(bundle, policy, installed)


def _policy_it_was_accepted_under(store: Store, installed: InstalledBundle, threshold: int | None) -> TrustPolicy:
    """Store.policy_for, whose refusal (too few of the accepting keys trusted now) says how to serve it after all."""
    _ = store.trusted_keys(), store.threshold  # a damaged key or policy file is refused here, with its own repair
    try:
        return store.policy_for(installed, threshold)
    except Refused as e:
        raise Refused(
            f"{e}: trust its signers in this store with `sovpack trust add FILE` (an import with --trust FILE "
            "trusts FILE for that import only), or serve it with --trust FILE"
        ) from None
