"""The local store on the secure side: installed bundles, trusted keys, rollback state, audit log.

Layout (documented in docs/store.md):

    STORE/
      trust/keys/NAME.pub          keys the organisation trusts
      trust/roots/NAME.pem         CA certificates whose certified signers it trusts, with NAME.json: their rule
                                   {"require_eku": "codeSigning" | null, "subject": PATTERN | null}
      trust/crls/SHA256.crl        revocation lists (DER), each checked against a trusted root when added
      trust/policy.json            {"threshold": K}
      bundles/NAME/VERSION/        installed bundles exactly as signed; files 0444, directories 0555
      records/NAME/VERSION.json    how each bundle was accepted (keys, threshold, when, from where)
      state/versions.json          highest version ever installed per name (rollback protection)
      state/audit-head.json        records in audit.log and the digest of its last line (audit.py)
      state/syslog.json            {"target": "/dev/log" | "udp://HOST:PORT"}: a copy of each record (syslog.py)
      objects/sha256/AB/DIGEST     one inode per distinct content, hard-linked into bundles/ (dedup)
      tmp/                         imports being staged and removals, on the same file system
      audit.log                    hash-chained JSON lines
      .lock                        held while bundles are installed or removed

A bundle directory is installed by one rename from tmp/ (the commit point); the record and
the high-water mark are written right after, and a re-run of the same import completes
them if the process was killed in between.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from sovpack.bundle.certificates import (
    TrustedRoot,
    certificate_label,
    crl_signed_by,
    eku_oid,
    issued_by,
    load_certificates,
    load_crl,
    parse_crl,
    parse_pem_certificates,
)
from sovpack.bundle.keys import public_pem
from sovpack.bundle.metadata import METADATA_FILE, NAME_PATTERN, BundleMetadata, check_name, parse_metadata
from sovpack.bundle.trust import TrustedKey, TrustPolicy, trusted_key_from_file
from sovpack.common.files import files_under, fsync_dir, locked, make_read_only, remove_tree, write_atomically
from sovpack.errors import Failure, Refused, UsageError
from sovpack.store import syslog
from sovpack.store.audit import AuditLog
from sovpack.store.record import ImportRecord, damaged, is_count, read_record, read_store_json

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
    record: ImportRecord | None  # records/NAME/VERSION.json; None until a killed import is run again


class Store:
    def __init__(self, root: Path | None = None):
        self.root = Path(root) if root else default_store_root()
        self.trust_keys_dir = self.root / "trust" / "keys"
        self.policy_path = self.root / "trust" / "policy.json"
        self.trust_roots_dir = self.root / "trust" / "roots"
        self.trust_crls_dir = self.root / "trust" / "crls"
        self.bundles_dir = self.root / "bundles"
        self.records_dir = self.root / "records"
        self.versions_path = self.root / "state" / "versions.json"
        self.objects_dir = self.root / "objects" / "sha256"
        self.tmp_dir = self.root / "tmp"
        self.syslog_setting = self.root / "state" / "syslog.json"
        self.audit = AuditLog(self.root / "audit.log", self.root / "state" / "audit-head.json", self.syslog_setting)

    @classmethod
    def existing(cls, root: Path | None = None) -> "Store":
        """The store at `root` (else $SOVPACK_HOME, else the platform data directory), which must exist.

        A mistyped path must not read as an empty store: only `trust add`, `import` and `pull` create one.
        """
        store = cls(root)
        if store.root.is_dir():
            return store
        named_by = "--store" if root else f"${STORE_ENV}" if os.environ.get(STORE_ENV) else "the default store"
        if store.root.exists():
            raise UsageError(f"{store.root} ({named_by}) is not a directory, so it cannot be a store")
        creating = "`sovpack trust add KEY.pub` or `sovpack import DIR --trust KEY.pub` creates one"
        if named_by == "the default store":
            raise UsageError(
                f"no store exists yet at {store.root} (the default store): {creating}; "
                f"to use another store, give --store DIR or set ${STORE_ENV}"
            )
        raise UsageError(f"no store exists at {store.root} ({named_by}): check the path; {creating}")

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
        with self.audit.ahead_of("trust-add", signer=key.name, key_id=key.key_id):
            self.trust_keys_dir.mkdir(parents=True, exist_ok=True)
            write_atomically(self.trust_keys_dir / f"{key.name}.pub", public_pem(key.public_key))
        return key

    def remove_trusted_key(self, name_or_id: str) -> TrustedKey:
        for key in self.trusted_keys():
            if name_or_id in (key.name, key.key_id, key.hint):
                with self.audit.ahead_of("trust-remove", signer=key.name, key_id=key.key_id):
                    (self.trust_keys_dir / f"{key.name}.pub").unlink()
                return key
        raise UsageError(f"no trusted key named or with id {name_or_id!r} in {self.trust_keys_dir}")

    def trusted_roots(self) -> list[TrustedRoot]:
        if not self.trust_roots_dir.is_dir():
            return []
        return [self._read_root(p) for p in sorted(self.trust_roots_dir.glob("*.pem"))]

    def _read_root(self, path: Path) -> TrustedRoot:
        repair = f"add the root again with `sovpack trust add-root` after removing {path}"
        try:
            certificates = parse_pem_certificates(path.read_bytes())
        except ValueError as e:
            raise damaged(path, f"it is not a PEM certificate sovpack can read ({e})", repair) from None
        if len(certificates) != 1:
            raise damaged(path, f"it holds {len(certificates)} certificates, not one", repair)
        certificate = certificates[0]
        rule = read_store_json(path.with_suffix(".json"), repair) or {}
        require_eku, subject = rule.get("require_eku"), rule.get("subject")
        if not all(v is None or isinstance(v, str) for v in (require_eku, subject)):
            raise damaged(path.with_suffix(".json"), "its 'require_eku' and 'subject' must be text or null", repair)
        try:
            if require_eku is not None:
                eku_oid(require_eku)
        except UsageError as e:
            raise damaged(path.with_suffix(".json"), str(e), repair) from None
        return TrustedRoot(path.stem, certificate, require_eku, subject)

    def add_trusted_root(
        self, pem_file: Path, name: str | None = None, require_eku: str | None = None, subject: str | None = None
    ) -> TrustedRoot:
        """Trust the CA certificate in `pem_file` (one certificate, a CA) for certificate signatures, with its rule."""
        certificates = load_certificates(pem_file, "root certificate")
        if len(certificates) != 1:
            raise UsageError(f"{pem_file} holds {len(certificates)} certificates; give the one root to trust")
        certificate = certificates[0]
        if require_eku is not None:
            eku_oid(require_eku)
        try:
            constraints = certificate.extensions.get_extension_for_class(x509.BasicConstraints).value
        except x509.ExtensionNotFound:
            constraints = None
        if constraints is None or not constraints.ca:
            raise Refused(f"{pem_file}: certificate {certificate_label(certificate)} is not a CA certificate (basic constraints)")
        root = TrustedRoot(name or pem_file.stem.removesuffix(".cert"), certificate, require_eku, subject)
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", root.name):
            raise UsageError(f"root name {root.name!r}: use letters, digits, '.', '_' or '-' (give --name)")
        for existing in self.trusted_roots():
            if existing.fingerprint == root.fingerprint:
                raise UsageError(f"{certificate_label(certificate)} is already trusted as root {existing.name!r}")
            if existing.name == root.name:
                raise UsageError(f"a different root is already trusted as {root.name!r}; choose another --name")
        rule = {"require_eku": require_eku, "subject": subject}
        with self.audit.ahead_of(
            "trust-add-root",
            root=root.name,
            certificate=certificate.subject.rfc4514_string(),
            sha256=root.fingerprint,
            require_eku=require_eku,
            subject_pattern=subject,
        ):
            self.trust_roots_dir.mkdir(parents=True, exist_ok=True)
            write_atomically(self.trust_roots_dir / f"{root.name}.json", json.dumps(rule).encode())
            write_atomically(self.trust_roots_dir / f"{root.name}.pem", root.pem())
        return root

    def crls(self) -> list[x509.CertificateRevocationList]:
        return [crl for _, crl in self._held_crls()]

    def _held_crls(self) -> list[tuple[Path, x509.CertificateRevocationList]]:
        if not self.trust_crls_dir.is_dir():
            return []
        found = []
        for path in sorted(self.trust_crls_dir.glob("*.crl")):
            try:
                found.append((path, parse_crl(path.read_bytes())))
            except ValueError as e:
                raise damaged(
                    path,
                    f"it is not a CRL sovpack can read ({e})",
                    "remove it and add the CRL again with `sovpack trust crl add`",
                ) from None
        return found

    def add_crl(self, crl_file: Path, issuer_file: Path | None = None) -> x509.CertificateRevocationList:
        """Hold a CRL signed by a trusted root, or by `issuer_file`, a CA certificate a trusted root issued.

        A newer CRL from the same issuer replaces the one held; an older one is refused (no going back).
        """
        crl = load_crl(crl_file)
        issuer = self._crl_issuer(crl, crl_file, issuer_file)
        same_issuer = [(p, c) for p, c in self._held_crls() if c.issuer == crl.issuer]
        for _, c in same_issuer:
            if c.last_update_utc > crl.last_update_utc:
                raise Refused(
                    f"{crl_file} is older ({crl.last_update_utc:%Y-%m-%dT%H:%M:%SZ}) than the CRL of "
                    f"'{crl.issuer.rfc4514_string()}' the store holds ({c.last_update_utc:%Y-%m-%dT%H:%M:%SZ})"
                )
        der = crl.public_bytes(serialization.Encoding.DER)
        digest = hashlib.sha256(der).hexdigest()
        with self.audit.ahead_of(
            "trust-crl-add", issuer=crl.issuer.rfc4514_string(), revoked=len(crl), sha256=digest, checked_with=issuer
        ):
            self.trust_crls_dir.mkdir(parents=True, exist_ok=True)
            write_atomically(self.trust_crls_dir / f"{digest}.crl", der)
            for path, _ in same_issuer:
                if path.name != f"{digest}.crl":
                    path.unlink()
        return crl

    def _crl_issuer(self, crl: x509.CertificateRevocationList, crl_file: Path, issuer_file: Path | None) -> str:
        """The certificate that signed `crl`, which must be a trusted root or a CA one issued; returns how it was checked."""
        roots = self.trusted_roots()
        if not roots:
            raise UsageError(f"the store at {self.root} trusts no root yet: add one with `sovpack trust add-root ROOT.pem` first")
        for root in roots:
            if crl_signed_by(crl, root.certificate):
                return root.label
        if issuer_file is None:
            raise Refused(
                f"{crl_file}: the CRL of '{crl.issuer.rfc4514_string()}' is not signed by a trusted root; if an intermediate CA "
                "issued it, give that CA's certificate with --issuer"
            )
        (issuer, *_) = load_certificates(issuer_file, "--issuer")
        root = next((r for r in roots if issued_by(issuer, r.certificate)), None)
        if root is None:
            raise Refused(f"--issuer {issuer_file}: certificate {certificate_label(issuer)} was not issued by a trusted root")
        if not crl_signed_by(crl, issuer):
            raise Refused(f"{crl_file}: the CRL is not signed by {certificate_label(issuer)}")
        return f"{certificate_label(issuer)}, issued by {root.label}"

    @property
    def threshold(self) -> int:
        repair = "set it again with `sovpack trust threshold K`"
        policy = read_store_json(self.policy_path, repair)
        if policy is None:
            return 1
        threshold = policy.get("threshold")
        if not is_count(threshold):
            raise damaged(self.policy_path, "its 'threshold' is not a whole number of at least 1", repair)
        return threshold

    def set_syslog(self, target: str | None) -> None:
        """Copy every audit record to `target` from now on (None: stop); the target must answer a probe first."""
        if target is not None:
            syslog.check_target(target)
            probe = json.dumps({"event": "audit-syslog", "probe": True, "store": str(self.root)}).encode()
            try:
                syslog.send(target, syslog.message("audit-syslog", probe, None))
            except OSError as e:
                raise Failure(
                    f"cannot send to the syslog target {target}: {e.strerror or e}; the setting was not changed"
                ) from None
        with self.audit.ahead_of("audit-syslog", target=target):
            if target is None:
                self.syslog_setting.unlink(missing_ok=True)
            else:
                self.syslog_setting.parent.mkdir(parents=True, exist_ok=True)
                write_atomically(self.syslog_setting, json.dumps({"target": target}).encode())

    def syslog_target(self) -> str | None:
        """The syslog target; Refused naming the setting when it exists but cannot be read (copies have stopped)."""
        target = syslog.read_target(self.syslog_setting)
        if target is None and self.syslog_setting.exists():
            raise Refused(
                f"{self.syslog_setting} is damaged: audit records are not being copied to syslog; "
                "set it again with `sovpack audit syslog TARGET` (or `off`)"
            )
        return target

    def set_threshold(self, threshold: int) -> None:
        if threshold < 1:
            raise UsageError("the threshold must be 1 or more")
        with self.audit.ahead_of("trust-threshold", threshold=threshold):
            self.policy_path.parent.mkdir(parents=True, exist_ok=True)
            write_atomically(self.policy_path, json.dumps({"threshold": threshold}).encode())

    def trust_policy(self, threshold: int | None = None) -> TrustPolicy:
        keys, roots = self.trusted_keys(), self.trusted_roots()
        if not keys and not roots:
            raise UsageError(f"the store at {self.root} trusts no keys yet: run `sovpack trust add KEY.pub` or pass --trust")
        if roots:
            return TrustPolicy(tuple(keys), threshold or self.threshold, tuple(roots), tuple(self.crls()))
        if threshold is None and self.threshold > len(keys):
            raise UsageError(
                f"the store's threshold ({self.policy_path}) is {self.threshold} but it trusts only {len(keys)} "
                "key(s): add keys with `sovpack trust add` or lower it with `sovpack trust threshold K`"
            )
        return TrustPolicy(tuple(keys), threshold or self.threshold)

    def policy_for(self, installed: InstalledBundle, threshold: int | None = None) -> TrustPolicy:
        """The signers and threshold a bundle was accepted under, minus those no longer trusted (revocation).

        Key signers count while their key is trusted; certificate signers while the root their chain built to is,
        and their chains are checked again (at their signing time, against the CRLs held today) by the verification.
        `threshold` can raise the threshold (the larger of the import's and the store's applies); a lower one is refused.
        """
        accepted_by = installed.record.accepted_by if installed.record else ()
        still_trusted = {k.hint: k for k in self.trusted_keys()}
        keys = tuple(still_trusted[s.hint] for s in accepted_by if s.certificate is None and s.hint in still_trusted)
        roots_now = {r.name: r for r in self.trusted_roots()} if any(s.certificate for s in accepted_by) else {}
        certified = [s for s in accepted_by if s.certificate is not None and s.certificate.root in roots_now]
        roots = tuple(roots_now[name] for name in dict.fromkeys(s.certificate.root for s in certified))
        required = max(installed.record.threshold if installed.record else 1, self.threshold)
        if threshold is not None and threshold < required:
            raise UsageError(
                f"--threshold {threshold} is below the {required} trusted signatures {installed.name} v{installed.version} is "
                f"held to (the larger of the threshold it was imported under and the store's): --threshold can only raise "
                f"it; to serve under other keys, pass them with --trust"
            )
        threshold = max(required, threshold or 0)
        if len(keys) + len(certified) < threshold:
            what = "signers" if any(s.certificate for s in accepted_by) else "keys"
            raise Refused(
                f"{installed.name} v{installed.version} was accepted by "
                f"{', '.join(s.name for s in accepted_by) or 'no key'}, but only "
                f"{len(keys) + len(certified)} of those {what} are still trusted and {threshold} are required"
            )
        if roots:
            return TrustPolicy(keys, threshold, roots, tuple(self.crls()))
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
                raise damaged(self.bundles_dir / stray[0], "it is not named as a bundle is", "move it out of bundles/")
        found = []
        for n in names:
            directory = self.bundles_dir / n
            if directory.is_dir():
                found += [
                    (n, v) for v in sorted((int(p.name) for p in directory.iterdir() if _VERSION_DIR.match(p.name)), reverse=True)
                ]
        return found

    def _read_record(self, name: str, version: int) -> ImportRecord | None:
        return read_record(self.record_path(name, version), name, version)

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
        versions = read_store_json(self.versions_path, repair)
        if versions is None:
            return {}
        if not all(is_count(v) for v in versions.values()):
            raise damaged(self.versions_path, "a version in it is not a whole number of at least 1", repair)
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
        with locked(self.root / ".lock"):
            yield

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

    def complete_install(self, installed: InstalledBundle, record: ImportRecord | None = None) -> InstalledBundle:
        """The steps after the commit, each idempotent: record, shared objects, high-water mark."""
        if record is not None:
            path = self.record_path(installed.name, installed.version)
            path.parent.mkdir(parents=True, exist_ok=True)
            write_atomically(path, record.to_bytes())
            installed = InstalledBundle(installed.name, installed.version, installed.path, record)
        metadata = self.read_installed_metadata(installed)
        with self.lock():
            make_read_only(installed.path)
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
        recorded = bundle.record.metadata_sha256 if bundle.record else None
        with self.lock(), self.audit.ahead_of("remove", name=bundle.name, version=bundle.version, metadata_sha256=recorded):
            self.record_version(bundle.name, bundle.version)  # removing never lowers the high-water mark
            self.tmp_dir.mkdir(parents=True, exist_ok=True)
            trash = self.tmp_dir / f"remove-{bundle.name}-{bundle.version}-{uuid.uuid4().hex[:8]}"
            os.chmod(bundle.path, 0o755)  # moving a directory to another parent rewrites its '..'
            os.rename(bundle.path, trash)
            self.record_path(bundle.name, bundle.version).unlink(missing_ok=True)
            _remove_empty(bundle.path.parent)
        with self.lock():
            self.sweep_removals()
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


def _name_from_command_line(name: str, spec: str) -> str:
    try:
        return check_name(name)
    except Refused:
        raise UsageError(f"{spec!r} is not NAME or NAME@VERSION of an installed bundle (see `sovpack list`)") from None


def _remove_empty(directory: Path) -> None:
    try:
        directory.rmdir()
    except OSError:
        pass
