"""What `sovpack serve NAME_OR_BUNDLE` points at, and the trust it must be verified under.

The argument and the policy are read by the rules every command shares (store/target.py):
a bundle directory is verified under `--trust` and `--threshold`, or the store's keys and
threshold; an installed bundle under the keys and threshold it was imported with, minus keys
revoked since (Store.policy_for), which `--threshold` can only raise; `--trust` replaces that
policy, as for a directory.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sovpack.bundle.trust import TrustPolicy
from sovpack.store.store import InstalledBundle, Store
from sovpack.store.target import choose_policy, find_target


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
    target = find_target(spec, store)
    policy = choose_policy(store, trust, threshold, imported_under=target.installed)
    return ServeTarget(target.path, policy, target.installed)
