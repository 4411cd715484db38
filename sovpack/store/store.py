"""The local store on the secure side: installed bundles, trusted keys, rollback state, audit log.

Layout (documented in docs/store.md):

    STORE/
      trust/keys/NAME.pub          keys the organisation trusts
      trust/policy.json            {"threshold": K}
      bundles/NAME/VERSION/        installed bundles exactly as signed; files read-only (0444)
      records/NAME/VERSION.json    how each bundle was accepted (keys, threshold, when, from where)
      state/versions.json          highest version ever installed per name (rollback protection)
      state/audit-head.json        records in audit.log and the digest of its last line (audit.py)
      objects/sha256/AB/DIGEST     one inode per distinct content, hard-linked into bundles/ (dedup)
      tmp/                         imports being staged and removals, on the same file system
      audit.log                    hash-chained JSON lines
      .lock                        held while bundles are installed or removed

A bundle directory is installed by one rename from tmp/ (the commit point); the record and
the high-water mark are written right after, and a re-run of the same import completes
them if the process was killed in between.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import stat
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from sovpack.bundle.directory import fsync_dir, require_bundle_dir, write_atomically
from sovpack.bundle.keys import public_pem
from sovpack.bundle.metadata import METADATA_FILE, NAME_PATTERN, BundleMetadata, check_name, format_time, parse_metadata
from sovpack.bundle.trust import TrustedKey, TrustPolicy, trusted_key_from_file
from sovpack.bundle.verify import VerifyReport, verify_bundle
from sovpack.common import safe_json
from sovpack.errors import Refused, UsageError
from sovpack.store.audit import AuditLog
from sovpack.transfer.reassembly import files_under

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
        self.audit = AuditLog(self.root / "audit.log", self.root / "state" / "audit-head.json")

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
        repair = "set it again with `sovpack trust threshold K`"
        policy = self._read_json(self.policy_path, repair)
        if policy is None:
            return 1
        threshold = policy.get("threshold")
        if not _is_count(threshold):
            raise _damaged(self.policy_path, "its 'threshold' is not a whole number of at least 1", repair)
        return threshold

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
        if threshold is None and self.threshold > len(keys):
            raise UsageError(
                f"the store's threshold ({self.policy_path}) is {self.threshold} but it trusts only {len(keys)} "
                "key(s): add keys with `sovpack trust add` or lower it with `sovpack trust threshold K`"
            )
        return TrustPolicy(tuple(keys), threshold or self.threshold)

    def policy_for(self, installed: InstalledBundle, threshold: int | None = None) -> TrustPolicy:
        """The keys and threshold a bundle was accepted under, minus keys no longer trusted (revocation).

        `threshold` can raise the threshold (the larger of the import's and the store's applies); a lower one is refused.
        """
        still_trusted = {k.hint: k for k in self.trusted_keys()}
        keys = tuple(still_trusted[a["hint"]] for a in installed.record.get("accepted_by", []) if a["hint"] in still_trusted)
        required = max(installed.record.get("threshold", 1), self.threshold)
        if threshold is not None and threshold < required:
            raise UsageError(
                f"--threshold {threshold} is below the {required} trusted signatures {installed.name} v{installed.version} is "
                f"held to (the larger of the threshold it was imported under and the store's): --threshold can only raise "
                f"it; to serve under other keys, pass them with --trust"
            )
        threshold = max(required, threshold or 0)
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
        """Installed bundles (of `name`, or all), each name's highest version first, with their records."""
        return [InstalledBundle(n, v, self.bundle_path(n, v), self._read_record(n, v)) for n, v in self._installed_versions(name)]

    def _installed_versions(self, name: str | None = None) -> list[tuple[str, int]]:
        if name:
            names = [check_name(name)]
        else:
            names = sorted(p.name for p in self.bundles_dir.iterdir()) if self.bundles_dir.is_dir() else []
            stray = [n for n in names if not NAME_PATTERN.match(n)]
            if stray:
                raise _damaged(self.bundles_dir / stray[0], "it is not named as a bundle is", "move it out of bundles/")
        found = []
        for n in names:
            directory = self.bundles_dir / n
            if directory.is_dir():
                found += [
                    (n, v) for v in sorted((int(p.name) for p in directory.iterdir() if _VERSION_DIR.match(p.name)), reverse=True)
                ]
        return found

    def _read_record(self, name: str, version: int) -> dict:
        path = self.record_path(name, version)
        repair = "delete it and run the same import again, which verifies the bundle and writes its record anew"
        record = self._read_json(path, repair)
        if record is None:
            return {}
        accepted_by = record.get("accepted_by", [])
        if not isinstance(accepted_by, list) or not all(
            isinstance(a, dict) and isinstance(a.get("name"), str) and isinstance(a.get("hint"), str) for a in accepted_by
        ):
            raise _damaged(path, "its 'accepted_by' is not a list of signers with a name and a hint", repair)
        if not _is_count(record.get("threshold", 1)):
            raise _damaged(path, "its 'threshold' is not a whole number of at least 1", repair)
        if "size" in record and (not isinstance(record["size"], int) or isinstance(record["size"], bool) or record["size"] < 0):
            raise _damaged(path, "its 'size' is not a number of bytes", repair)
        return record

    @staticmethod
    def _read_json(path: Path, repair: str) -> dict | None:
        """A JSON object the store wrote; None when the file does not exist. A damaged one is refused, naming it."""
        try:
            data = safe_json.loads(path.read_bytes(), max_bytes=64 << 20)  # the store's records are small
        except FileNotFoundError:
            return None
        except ValueError as e:  # UnicodeDecodeError included
            raise _damaged(path, f"it is not valid JSON ({e})", repair) from None
        if not isinstance(data, dict):
            raise _damaged(path, "it does not hold a JSON object", repair)
        return data

    def find(self, spec: str) -> InstalledBundle:
        """NAME (the highest installed version) or NAME@VERSION."""
        return self._matching(spec)[0]

    def _matching(self, spec: str) -> list[InstalledBundle]:
        """The installed bundles NAME@VERSION or NAME (every version, highest first) names; a usage error if none."""
        name, _, version = spec.partition("@")
        found = [b for b in self.installed(_name_from_command_line(name, spec)) if not version or str(b.version) == version]
        if not found:
            raise UsageError(f"{spec} is not installed in the store at {self.root} (see `sovpack list`)")
        return found

    def highest_versions(self) -> dict[str, int]:
        """Highest version ever installed per name, including bundles installed right before a crash."""
        versions = self._recorded_versions()
        for name, version in self._installed_versions():
            versions[name] = max(versions.get(name, 0), version)
        return versions

    def _recorded_versions(self) -> dict[str, int]:
        """state/versions.json: the high-water marks, which nothing else can restore."""
        repair = "restore it from a backup: it holds the highest version ever installed of each bundle (rollback protection)"
        versions = self._read_json(self.versions_path, repair)
        if versions is None:
            return {}
        if not all(_is_count(v) for v in versions.values()):
            raise _damaged(self.versions_path, "a version in it is not a whole number of at least 1", repair)
        return versions

    def highest_version(self, name: str) -> int:
        return self.highest_versions().get(name, 0)

    def record_version(self, name: str, version: int) -> None:
        versions = self._recorded_versions()
        if version > versions.get(name, 0):
            versions[name] = version
            self.versions_path.parent.mkdir(parents=True, exist_ok=True)
            write_atomically(self.versions_path, json.dumps(versions, indent=2, sort_keys=True).encode())

    # installing and removing

    @contextmanager
    def lock(self) -> Iterator[None]:
        """Exclusive among sovpack processes while bundles, records and objects change."""
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def object_path(self, sha256: str) -> Path:
        return self.objects_dir / sha256[:2] / sha256

    def find_object(self, sha256: str, size: int) -> Path | None:
        """The store's file with this content, if it holds one."""
        path = self.object_path(sha256)
        try:
            st = path.lstat()
        except FileNotFoundError:
            return None
        return path if stat.S_ISREG(st.st_mode) and st.st_size == size else None

    def commit(self, staging: Path, name: str, version: int) -> Path:
        """Make a verified staging directory the installed bundle NAME vVERSION: one rename."""
        for path in files_under(staging):
            os.chmod(path, 0o444)
        target = self.bundle_path(name, version)
        with self.lock():
            if target.exists():
                raise Refused(
                    f"{name} v{version} is already installed in {self.root}; remove it first (`sovpack remove {name}@{version}`)"
                )
            target.parent.mkdir(parents=True, exist_ok=True)
            os.rename(staging, target)
            fsync_dir(target.parent)
        return target

    def complete_install(self, installed: InstalledBundle, record: dict | None = None) -> InstalledBundle:
        """The steps after the commit, each idempotent: record, shared objects, high-water mark."""
        if record is not None:
            path = self.record_path(installed.name, installed.version)
            path.parent.mkdir(parents=True, exist_ok=True)
            write_atomically(path, json.dumps(record, indent=2, sort_keys=True).encode())
            installed = InstalledBundle(installed.name, installed.version, installed.path, record)
        metadata = self.read_installed_metadata(installed)
        with self.lock():
            for f in metadata.files:
                self._share(installed.path / f.path, f.sha256)
            self.record_version(installed.name, installed.version)
        return installed

    def _share(self, path: Path, sha256: str) -> None:
        obj = self.object_path(sha256)
        obj.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(path, obj)
        except FileExistsError:
            pass  # already shared (this very inode, or an identical file of another bundle)

    def read_installed_metadata(self, installed: InstalledBundle) -> BundleMetadata:
        return parse_metadata((installed.path / METADATA_FILE).read_bytes())

    def remove(self, spec: str) -> InstalledBundle:
        """Remove NAME@VERSION (or NAME when one version is installed); the rollback mark stays."""
        candidates = self._matching(spec)
        if len(candidates) > 1:
            versions = ", ".join(str(b.version) for b in candidates)
            raise UsageError(f"{candidates[0].name} has {len(candidates)} versions installed ({versions}): give NAME@VERSION")
        bundle = candidates[0]
        with self.lock():
            self.record_version(bundle.name, bundle.version)  # removing never lowers the high-water mark
            self.tmp_dir.mkdir(parents=True, exist_ok=True)
            trash = self.tmp_dir / f"remove-{bundle.name}-{bundle.version}-{uuid.uuid4().hex[:8]}"
            os.rename(bundle.path, trash)
            self.record_path(bundle.name, bundle.version).unlink(missing_ok=True)
            _remove_empty(bundle.path.parent)
            self.sweep_removals()
        self.audit.append(
            "remove", name=bundle.name, version=bundle.version, metadata_sha256=bundle.record.get("metadata_sha256")
        )
        return bundle

    def sweep_removals(self) -> int:
        """Delete removed bundles (also those of a removal that was killed) and objects no bundle uses.

        An object is in use while another hard link to it exists: in bundles/ or in an import
        being staged in tmp/. Call with the lock held.
        """
        if self.tmp_dir.is_dir():
            for trash in self.tmp_dir.glob("remove-*"):
                remove_tree(trash)
        deleted = 0
        if self.objects_dir.is_dir():
            for obj in self.objects_dir.glob("*/*"):
                if obj.lstat().st_nlink == 1:
                    obj.unlink()
                    deleted += 1
                    _remove_empty(obj.parent)
        return deleted


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _damaged(path: Path, what: str, repair: str) -> Refused:
    return Refused(f"the store's {path} is damaged: {what}; {repair}")


def _name_from_command_line(name: str, spec: str) -> str:
    try:
        return check_name(name)
    except Refused:
        raise UsageError(f"{spec!r} is not NAME or NAME@VERSION of an installed bundle (see `sovpack list`)") from None


def installed_summary(store: Store, bundle: InstalledBundle) -> dict:
    """One row of `sovpack list --json` (docs/store.md)."""
    try:
        metadata = store.read_installed_metadata(bundle)
    except (OSError, Refused) as e:
        metadata, problem = None, str(e)
    else:
        problem = None
    record = bundle.record
    return {
        "name": bundle.name,
        "version": bundle.version,
        "path": str(bundle.path),
        "size": record.get("size", metadata.size if metadata else None),
        "signers": [a.get("name") for a in record.get("accepted_by", [])],
        "threshold": record.get("threshold"),
        "imported": record.get("imported"),
        "created": metadata and format_time(metadata.created),
        "expires": metadata and metadata.expires and format_time(metadata.expires),
        "gguf_variants": sorted({(f.details or {}).get("file_type") or "unknown" for f in metadata.files if f.format == "gguf"})
        if metadata
        else [],
        "metadata_sha256": record.get("metadata_sha256"),
        "problem": problem if problem else (None if record else "no import record: run the import again to complete it"),
    }


def _remove_empty(directory: Path) -> None:
    try:
        directory.rmdir()
    except OSError:
        pass


def remove_tree(path: Path) -> None:
    """Delete a tree whose files are read-only (its directories are not)."""
    shutil.rmtree(path, ignore_errors=not path.exists())


def is_bundle_path(spec: str) -> bool:
    """Whether a NAME_OR_BUNDLE argument names a directory (else a bundle installed in the store)."""
    return Path(spec).is_dir() or "/" in spec or spec.startswith(".")


def verify_target(spec: str, store: Store, policy: TrustPolicy | None, threshold: int | None) -> VerifyReport:
    """`sovpack verify`: a bundle directory, or NAME[@VERSION] installed in the store (audited).

    Without explicit trust (policy None) the store's trusted keys and threshold apply.
    """
    path = Path(spec)
    if is_bundle_path(spec):
        require_bundle_dir(path)
        return verify_bundle(path, policy or store.trust_policy(threshold))
    installed = store.find(spec)
    report = verify_bundle(installed.path, policy or store.trust_policy(threshold))
    failure = {"step": report.failure.step, "reason": str(report.failure)} if report.failure else {}
    store.audit.append(
        "verify",
        name=installed.name,
        version=installed.version,
        ok=report.ok,
        signers=[k.name for k in report.signers],
        **failure,
    )
    return report
