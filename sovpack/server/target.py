"""What `sovpack serve NAME_OR_BUNDLE` points at, and the trust it must be verified under.

- NAME or NAME@VERSION: a bundle installed in the store, verified under the keys and
  threshold it was imported with, minus keys revoked since (Store.policy_for), or under
  `--trust` when given.
- a directory holding sovpack.json: that bundle, verified under `--trust`, or under the
  store's trusted keys and threshold when `--trust` is not given.

A directory wins over a store name only when it really is a bundle (has sovpack.json).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sovpack.bundle import require_bundle_dir
from sovpack.errors import Refused, UsageError
from sovpack.metadata import METADATA_FILE, check_name
from sovpack.store import InstalledBundle, Store
from sovpack.trust import TrustPolicy, load_trust


@dataclass(frozen=True)
class ServeTarget:
    spec: str
    bundle: Path
    policy: TrustPolicy
    installed: InstalledBundle | None  # None when a bundle directory was given

    @property
    def trust_source(self) -> str:
        return "store record" if self.installed else "explicit"


def looks_like_bundle_dir(spec: str) -> bool:
    path = Path(spec)
    return (path / METADATA_FILE).is_file() or "/" in spec or spec.startswith(".")


def resolve_target(spec: str, store: Store, trust: tuple[Path, ...], threshold: int | None) -> ServeTarget:
    """Raises UsageError (not installed, no trust) or Refused (trust revoked below the threshold)."""
    if looks_like_bundle_dir(spec):
        bundle = Path(spec)
        require_bundle_dir(bundle)
        policy = load_trust(list(trust), threshold or 1) if trust else store.trust_policy(threshold)
        return ServeTarget(spec, bundle, policy, None)
    try:
        check_name(spec.partition("@")[0])
    except Refused:
        raise UsageError(f"{spec!r} is neither a bundle directory nor the name of an installed bundle") from None
    installed = store.find(spec)
    if trust:
        policy = load_trust(list(trust), threshold or 1)
    else:
        policy = store.policy_for(installed)
        if threshold and threshold > policy.threshold:
            policy = TrustPolicy(policy.keys, threshold)
    return ServeTarget(spec, installed.path, policy, installed)
