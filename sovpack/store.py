"""The local store on the secure side: installed bundles, trusted keys, rollback state, audit log.

Layout (documented in docs/store.md):

    STORE/
      trust/keys/NAME.pub      keys the organisation trusts
      trust/policy.json        {"threshold": K}
      bundles/NAME/VERSION/    installed bundles, read-only, exactly as signed
      records/NAME/VERSION.json  how each bundle was accepted (keys, threshold, when)
      state/versions.json      highest version ever installed per name (rollback protection)
      objects/sha256/AB/DIGEST content-addressed files, hard-linked into bundles/ (dedup)
      tmp/                     staging for imports, on the same filesystem
      audit.log                hash-chained JSON lines
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from sovpack.audit import AuditLog
from sovpack.bundle import write_atomically
from sovpack.errors import Refused, UsageError
from sovpack.keys import public_pem
from sovpack.metadata import check_name
from sovpack.trust import TrustedKey, TrustPolicy, trusted_key_from_file

STORE_ENV = "SOVPACK_HOME"
_VERSION_DIR = re.compile(r"^[1-9][0-9]{0,17}$")


def default_store_root() -> Path:
    if os.environ.get(STORE_ENV):
        return Path(os.environ[STORE_ENV])
    from platformdirs import user_data_path

    return user_data_path("sovpack", appauthor=False)


@dataclass(frozen=True)
class InstalledBundle:
    name: str
    version: int
    path: Path
    record: dict  # records/NAME/VERSION.json: accepted_by, threshold, imported, metadata_sha256, size


class Store:
    def __init__(self, root: Path | None = None):
        self.root = Path(root) if root else default_store_root()
        self.trust_keys_dir = self.root / "trust" / "keys"
        self.policy_path = self.root / "trust" / "policy.json"
        self.bundles_dir = self.root / "bundles"
        self.records_dir = self.root / "records"
        self.versions_path = self.root / "state" / "versions.json"
        self.objects_dir = self.root / "objects" / "sha256"
        self.tmp_dir = self.root / "tmp"
        self.audit = AuditLog(self.root / "audit.log")

    # trust

    def trusted_keys(self) -> list[TrustedKey]:
        if not self.trust_keys_dir.is_dir():
            return []
        return [trusted_key_from_file(p) for p in sorted(self.trust_keys_dir.glob("*.pub"))]

    def add_trusted_key(self, pub_file: Path, name: str | None = None) -> TrustedKey:
        key = trusted_key_from_file(pub_file, name)
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", key.name):
            raise UsageError(f"trust name {key.name!r}: use letters, digits, '.', '_' or '-' (give --name)")
        for existing in self.trusted_keys():
            if existing.hint == key.hint:
                raise UsageError(f"key {key.key_id} is already trusted as {existing.name!r}")
            if existing.name == key.name:
                raise UsageError(f"a different key is already trusted as {key.name!r}; choose another --name")
        self.trust_keys_dir.mkdir(parents=True, exist_ok=True)
        write_atomically(self.trust_keys_dir / f"{key.name}.pub", public_pem(key.public_key))
        self.audit.append("trust-add", signer=key.name, key_id=key.key_id)
        return key

    def remove_trusted_key(self, name_or_id: str) -> TrustedKey:
        for key in self.trusted_keys():
            if name_or_id in (key.name, key.key_id, key.hint):
                (self.trust_keys_dir / f"{key.name}.pub").unlink()
                self.audit.append("trust-remove", signer=key.name, key_id=key.key_id)
                return key
        raise UsageError(f"no trusted key named or with id {name_or_id!r} in {self.trust_keys_dir}")

    @property
    def threshold(self) -> int:
        if not self.policy_path.exists():
            return 1
        return int(json.loads(self.policy_path.read_text())["threshold"])

    def set_threshold(self, threshold: int) -> None:
        if threshold < 1:
            raise UsageError("the threshold must be 1 or more")
        self.policy_path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(self.policy_path, json.dumps({"threshold": threshold}).encode())
        self.audit.append("trust-threshold", threshold=threshold)

    def trust_policy(self, threshold: int | None = None) -> TrustPolicy:
        keys = self.trusted_keys()
        if not keys:
            raise UsageError(f"the store at {self.root} trusts no keys yet: run `sovpack trust add KEY.pub` or pass --trust")
        return TrustPolicy(tuple(keys), threshold or self.threshold)

    def policy_for(self, installed: InstalledBundle) -> TrustPolicy:
        """The keys and threshold a bundle was accepted under, minus keys no longer trusted (revocation)."""
        still_trusted = {k.hint: k for k in self.trusted_keys()}
        keys = tuple(still_trusted[a["hint"]] for a in installed.record.get("accepted_by", []) if a["hint"] in still_trusted)
        threshold = max(int(installed.record.get("threshold", 1)), self.threshold)
        if len(keys) < threshold:
            raise Refused(
                f"{installed.name} v{installed.version} was accepted by "
                f"{', '.join(a['name'] for a in installed.record.get('accepted_by', [])) or 'no key'}, but only "
                f"{len(keys)} of those keys are still trusted and {threshold} are required"
            )
        return TrustPolicy(keys, threshold)

    # installed bundles

    def bundle_path(self, name: str, version: int) -> Path:
        return self.bundles_dir / check_name(name) / str(version)

    def record_path(self, name: str, version: int) -> Path:
        return self.records_dir / check_name(name) / f"{version}.json"

    def installed(self, name: str | None = None) -> list[InstalledBundle]:
        names = [name] if name else sorted(p.name for p in self.bundles_dir.iterdir()) if self.bundles_dir.is_dir() else []
        found = []
        for n in names:
            directory = self.bundles_dir / check_name(n)
            if not directory.is_dir():
                continue
            for v in sorted((int(p.name) for p in directory.iterdir() if _VERSION_DIR.match(p.name)), reverse=True):
                record = self.record_path(n, v)
                found.append(InstalledBundle(n, v, directory / str(v), json.loads(record.read_text()) if record.exists() else {}))
        return found

    def find(self, spec: str) -> InstalledBundle:
        """NAME (the highest installed version) or NAME@VERSION."""
        name, _, version = spec.partition("@")
        candidates = self.installed(check_name(name))
        if version:
            candidates = [b for b in candidates if str(b.version) == version]
        if not candidates:
            raise UsageError(f"{spec} is not installed in the store at {self.root} (see `sovpack list`)")
        return candidates[0]

    def highest_versions(self) -> dict[str, int]:
        if not self.versions_path.exists():
            return {}
        return json.loads(self.versions_path.read_text())

    def record_version(self, name: str, version: int) -> None:
        versions = self.highest_versions()
        if version > versions.get(name, 0):
            versions[name] = version
            self.versions_path.parent.mkdir(parents=True, exist_ok=True)
            write_atomically(self.versions_path, json.dumps(versions, indent=2, sort_keys=True).encode())

