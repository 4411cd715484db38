"""Import: a bundle from volumes (or a stream) into the store, installed only once fully verified.

Phases, each leaving the installed store untouched until the last one:

1. read the index; stop if this very bundle is installed (nothing more is read), refuse early a
   version not newer than the store's high-water mark;
2. check the index signature, if any; read the volumes once, in order, as one stream
   (stream_check.py): each volume(
       's SHA-256 on one thread, and the bundle reassembled '
       'into tmp/import-<index digest>/bundle on the store'
   )s
   file system, each file's shard digests computed on another thread from the bytes written
   (reassembly.py); files the store already holds (same SHA-256, or left out of a delta export)
   are hard-linked from objects/ instead. Missing or cut volumes are known before reading. The
   verdict of every volume (OK / damaged / missing) is reported before anything is used: a bad
   volume refuses the import, naming every bad one. A journal of intact volumes spares a re-run
   hashing them again;
3. run the full verification (signatures, threshold, inventory, digests, formats, expiry),
   the digests of written files from what was computed as they were written;
4. install: one rename into bundles/NAME/VERSION (the commit point), then the record, the
   shared objects and the high-water mark, which a re-run completes if it was interrupted.

Every outcome, accepted or refused, is appended to the audit log.
"""

from __future__ import annotations

import shutil
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import BinaryIO

from sovpack.bundle.metadata import METADATA_FILE, BundleMetadata, FileEntry, format_time
from sovpack.bundle.trust import TrustPolicy
from sovpack.bundle.verify import VerifyReport, verify_bundle
from sovpack.common.hashing import ShardDigests, sha256_bytes
from sovpack.common.pipeline import Lane
from sovpack.common.progress import Progress
from sovpack.errors import Failure, Refused, SovpackError
from sovpack.store.store import InstalledBundle, Store
from sovpack.transfer.archive import extract_archive
from sovpack.transfer.import_workdir import ImportJob, sweep_staging
from sovpack.transfer.index import (
    BundleIdentity,
    ExportIndex,
    check_index_signature,
    find_index,
    read_index,
)
from sovpack.transfer.media import ConcatenatedReader
from sovpack.transfer.reassembly import StagedFiles, flush_tree
from sovpack.transfer.stream_check import StreamedVolumeCheck
from sovpack.transfer.volume_check import VolumeReport, check_index_volumes, foreign_files


@dataclass
class ImportResult:
    outcome: str  # "installed", or "already-installed" (the same bundle was installed before: nothing to do)
    installed: InstalledBundle
    report: VerifyReport | None = None
    volumes: VolumeReport | None = None
    written: int = 0  # files whose bytes came from the media
    linked: int = 0  # files the store already held (dedup, or left out of a delta export)
    reassembled_before: bool = False  # a killed run had reassembled the bundle; only verification was redone
    warnings: list[str] = field(default_factory=list)


class _AlreadyInstalled(Exception):
    def __init__(self, installed: InstalledBundle):
        self.installed = installed


def import_bundle(
    source: str,
    store: Store,
    policy: TrustPolicy,
    *,
    allow_downgrade: bool = False,
    stdin: BinaryIO | None = None,
    progress: Progress | None = None,
    now: datetime | None = None,
) -> ImportResult:
    """Import from a directory of volumes, an index file, or "-" (a stream on `stdin`)."""
    importer = _Importer(store, policy, allow_downgrade, progress or Progress(), now)
    try:
        sweep_staging(store)
        if source == "-":
            return importer.from_stream(stdin)
        return importer.from_volumes(Path(source))
    except SovpackError as e:
        importer.audit_failure(e)
        raise


class _Importer:
    def __init__(self, store: Store, policy: TrustPolicy, allow_downgrade: bool, progress: Progress, now: datetime | None):
        self.store, self.policy, self.allow_downgrade, self.progress, self.now = store, policy, allow_downgrade, progress, now
        self.identity: BundleIdentity | None = None
        self.source: dict | None = None
        self.event = "import"  # the audit event: "pull" for a bundle staged from a registry (StagedImport)
        self.result = ImportResult("installed", None)  # type: ignore[arg-type]

    # -- the two kinds of source

    def from_volumes(self, path: Path) -> ImportResult:
        index_path = find_index(
            path, "give the directory holding the volumes, their index file, or - for a stream on standard input"
        )
        self.source = {"kind": "volumes", "index": str(index_path.resolve())}
        index, raw_index = read_index(index_path)
        self.identity = index.bundle
        self.source |= {
            "index_sha256": sha256_bytes(raw_index),
            "volumes": len(index.volumes),
            "left_out": [f.path for f in index.left_out],
        }
        job_dir = self.store.tmp_dir / f"import-{self.source['index_sha256'][:16]}"
        try:
            self._check_version(index.bundle.name, index.bundle.version, index.bundle.metadata_sha256, claimed=True)
        except _AlreadyInstalled as done:
            if job_dir.exists():  # left by a run killed right after its commit
                with ImportJob(job_dir) as job:
                    job.remove()
            return self._already_installed(done.installed)
        with ImportJob(job_dir) as job:
            signature = check_index_signature(index_path.parent, index, raw_index, self.policy)
            reuse = job.reassembled
            if reuse:  # a killed run left the whole bundle staged; a bad volume refuses, keeping it for the next run
                self._check_volumes(index_path, index, signature, job)
                self.result.reassembled_before = True
            try:
                known = None if reuse else self._reassemble(job, index_path, index, signature)
                result = self._verify_and_install(job.staging, index.bundle, known)
            except BaseException:
                job.discard_staging()
                raise
            job.remove()
            return result

    def from_stream(self, stream: BinaryIO) -> ImportResult:
        self.source = {"kind": "stream"}
        with ImportJob(self.store.tmp_dir / f"stream-{uuid.uuid4().hex[:16]}") as job:
            try:
                reader = ConcatenatedReader(stream=stream, progress=self.progress)
                self.progress.phase("receiving the stream")
                job.start_staging()
                files = StagedFiles(job.staging)
                try:
                    extracted = extract_archive(
                        reader, files, find_object=self.store.find_object, on_metadata=self._on_stream_metadata
                    )
                    known = files.finish()
                except _AlreadyInstalled as done:
                    files.abort()
                    return self._already_installed(done.installed)
                except BaseException:
                    files.abort()
                    raise
                self.result.written, self.result.linked = extracted.written, extracted.linked
                return self._verify_and_install(job.staging, None, known)
            finally:
                job.remove()

    # -- phases

    def _note_volume_warnings(self, report: VolumeReport) -> None:
        if report.foreign:
            self.result.warnings.append(f"ignored files of another export in the same directory: {', '.join(report.foreign)}")
        if "not in the trust set" in report.signature:
            self.result.warnings.append(report.signature)

    def _check_volumes(self, index_path: Path, index: ExportIndex, signature: str, job: ImportJob) -> None:
        """Every volume on its own, several at once (those the journal holds are not read): refused unless all are intact."""
        report = check_index_volumes(index_path, index, signature, journal=job.journal, progress=self.progress)
        self.result.volumes = report
        if not report.ok:
            raise Refused(report.failure_message())
        self._note_volume_warnings(report)

    def _reassemble(self, job: ImportJob, index_path: Path, index: ExportIndex, signature: str) -> dict[str, ShardDigests]:
        """Read the volumes once, as one stream: every volume's verdict, and the staged bundle with its files' shard digests."""
        directory = index_path.parent
        checker = StreamedVolumeCheck(directory, index, job.journal, self.progress)
        if not checker.readable:  # a volume missing or cut: nothing to reassemble; every volume is still checked for the report
            self._check_volumes(index_path, index, signature, job)  # refuses, unless the volume came back meanwhile
            checker = StreamedVolumeCheck(directory, index, job.journal, self.progress)
        self._start_staging(job, index)
        self.progress.phase("reading the volumes", index.archive_size)
        reader = ConcatenatedReader.of_volumes(directory, index, self.progress, checker)
        files = StagedFiles(job.staging)
        try:
            refusal = self._extract_volumes(reader, files, index)
            reader.drain()  # whatever the extraction found, every volume is read to its end and judged
            report = VolumeReport(index_path, index, signature, checker.finish(), foreign_files(directory, index))
            self.result.volumes = report
            if not report.ok:
                raise Refused(report.failure_message())  # a bad volume also explains a failed extraction
            if refusal is not None:
                raise refusal
            self._note_volume_warnings(report)
            known = files.finish()
        except BaseException:
            files.abort()
            checker.settle()
            raise
        finally:
            reader.close()
        job.mark_reassembled()
        return known

    def _start_staging(self, job: ImportJob, index: ExportIndex) -> None:
        job.start_staging()
        left_out = {f.path for f in index.left_out}
        needed = sum(f.size for f in index.files if f.path not in left_out and not self.store.find_object(f.sha256, f.size))
        self._check_free_space(job.directory, needed, index.bundle.label)

    def _extract_volumes(self, reader: ConcatenatedReader, files: StagedFiles, index: ExportIndex) -> Refused | None:
        """Extract the stream into staging; a refusal is returned, to be raised once every volume has been judged."""
        try:
            extracted = extract_archive(
                reader,
                files,
                find_object=self.store.find_object,
                top=index.bundle.stem,
                on_metadata=lambda metadata, raw: self._expect_identity(metadata, raw, index.bundle),
                missing_hint=lambda entry: _left_out_hint(entry, index),
            )
        except Refused as refusal:
            return refusal
        self.result.written, self.result.linked = extracted.written, extracted.linked
        return None

    def _on_stream_metadata(self, metadata: BundleMetadata, raw: bytes) -> None:
        self.identity = BundleIdentity.of(metadata, raw)
        self._check_version(metadata.name, metadata.version, self.identity.metadata_sha256, claimed=True)
        needed = sum(f.size for f in metadata.files if not self.store.find_object(f.sha256, f.size))
        self._check_free_space(self.store.tmp_dir, needed, self.identity.label)

    def _expect_identity(self, metadata: BundleMetadata, raw: bytes, expected: BundleIdentity) -> None:
        found = sha256_bytes(raw)
        if (metadata.name, metadata.version, found) != (expected.name, expected.version, expected.metadata_sha256):
            raise Refused(
                f"the volumes hold {metadata.name} v{metadata.version} (sovpack.json sha256 {found}) but the index "
                f"describes {expected.label} (sha256 {expected.metadata_sha256}): volumes of two exports are mixed"
            )

    def _check_free_space(self, directory: Path, needed: int, label: str) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(directory).free
        if needed > free:
            raise Failure(
                f"the store at {self.store.root} has {free} bytes free but importing {label} needs {needed} more; "
                "free some space (`sovpack remove`) or import into a larger --store"
            )

    def _check_version(self, name: str, version: int, metadata_sha256: str, *, claimed: bool) -> None:
        """Rollback protection; raises _AlreadyInstalled when this very bundle is installed."""
        same = [b for b in self.store.installed(name) if b.version == version]
        if same and _installed_metadata_sha256(same[0]) == metadata_sha256:
            raise _AlreadyInstalled(same[0])
        highest = self.store.highest_version(name)
        if version <= highest and not self.allow_downgrade:
            said = " (as its index says)" if claimed and self.source and self.source["kind"] == "volumes" else ""
            raise Refused(
                f"{name} v{version}{said} is not newer than v{highest}, the highest version of {name} ever installed in "
                f"the store at {self.store.root}: refusing a rollback (pass --allow-downgrade to install it anyway)"
            )
        if same:
            raise Refused(
                f"{name} v{version} is already installed with different contents; remove it first "
                f"(`sovpack remove {name}@{version}`) to replace it"
            )

    def _verify_and_install(
        self, staging: Path, expected: BundleIdentity | None, known: dict[str, ShardDigests] | None
    ) -> ImportResult:
        label = expected.label if expected else self.identity.label
        self.result.report = report = self._verify(staging, expected.size if expected else self.identity.size, known)
        if not report.ok:
            raise Refused(f"{label} failed verification ({report.failure.step}): {report.failure}")
        metadata, metadata_sha256 = report.metadata, report.metadata_sha256
        if expected and (metadata.name, metadata.version, metadata_sha256) != (
            expected.name,
            expected.version,
            expected.metadata_sha256,
        ):
            raise Refused(
                f"the reassembled bundle is {metadata.name} v{metadata.version} (sha256 {metadata_sha256}), "
                f"not {expected.label} as the index says: volumes of two exports are mixed"
            )
        try:
            self._check_version(metadata.name, metadata.version, metadata_sha256, claimed=False)
        except _AlreadyInstalled as done:
            return self._already_installed(done.installed)
        self.progress.phase("installing")
        path = self.store.commit(staging, metadata.name, metadata.version)
        installed = InstalledBundle(metadata.name, metadata.version, path, {})
        return self._complete(installed, self._record(report), "installed")

    def _verify(self, staging: Path, size: int, known: dict[str, ShardDigests] | None) -> VerifyReport:
        """verify_bundle; files written by this run are not read again (their digests were computed as they were written)."""
        if known is not None:  # and already flushed
            self.progress.phase("verifying", size - sum(d.size for d in known.values()))
            return verify_bundle(staging, self.policy, now=self.now, on_progress=self.progress.advance, known_digests=known)
        self.progress.phase("verifying", size)
        # staged by a killed run: the bytes must be on disk before the commit renames them into
        # place; flushing them while verification reads them overlaps disk and SHA-256
        flusher = Lane("flush")
        try:
            flushed = flusher.submit(flush_tree, staging)
            report = verify_bundle(staging, self.policy, now=self.now, on_progress=self.progress.advance)
            flushed.result()
        finally:
            flusher.close()
        return report

    def _record(self, report: VerifyReport) -> dict:
        """records/NAME/VERSION.json of a bundle this very report verified."""
        m = report.metadata
        return {
            "name": m.name,
            "version": m.version,
            "metadata_sha256": report.metadata_sha256,
            "imported": format_time(datetime.now(timezone.utc)),
            "accepted_by": [{"name": k.name, "hint": k.hint, "key_id": k.key_id} for k in report.signers],
            "threshold": self.policy.threshold,
            "size": m.size,
            "files": len(m.files),
            "created": format_time(m.created),
            "expires": format_time(m.expires) if m.expires else None,
            "source": self.source,
        }

    def _complete(self, installed: InstalledBundle, record: dict | None, outcome: str) -> ImportResult:
        installed = self.store.complete_install(installed, record)
        self.result.outcome, self.result.installed = outcome, installed
        self._warn_untrusted_signers(installed)
        self.store.audit.append(
            self.event,
            outcome="accepted" if outcome == "installed" else outcome,
            name=installed.name,
            version=installed.version,
            metadata_sha256=installed.record.get("metadata_sha256"),
            accepted_by=[a["name"] for a in installed.record.get("accepted_by", [])],
            threshold=installed.record.get("threshold"),
            source=self.source,
        )
        return self.result

    def _already_installed(self, installed: InstalledBundle) -> ImportResult:
        """The same bundle is installed: finish what an interrupted import may have left undone."""
        record = None
        if not installed.record:
            report = verify_bundle(installed.path, self.policy, now=self.now)
            if not report.ok:
                raise Refused(
                    f"{installed.name} v{installed.version} is installed but has no import record, and verifying it "
                    f"failed ({report.failure.step}): {report.failure}"
                )
            self.result.report = report
            record = self._record(report)
        return self._complete(installed, record, "already-installed")

    def _warn_untrusted_signers(self, installed: InstalledBundle) -> None:
        store_keys = {k.hint for k in self.store.trusted_keys()}
        outside = [a["name"] for a in installed.record.get("accepted_by", []) if a["hint"] not in store_keys]
        if outside:
            self.result.warnings.append(
                f"accepted with --trust key(s) the store does not trust ({', '.join(outside)}): `sovpack serve "
                f"{installed.name}` will refuse it until they are added with `sovpack trust add`"
            )

    def audit_failure(self, error: SovpackError) -> None:
        if self.source is None and error.exit_code == 2:
            return  # the command was called wrongly before any media was read: not an import attempt
        identity = (
            {"name": self.identity.name, "version": self.identity.version, "metadata_sha256": self.identity.metadata_sha256}
            if self.identity
            else {}
        )
        try:
            self.store.audit.append(
                self.event,
                outcome="refused" if error.exit_code == 1 else "failed",
                reason=str(error),
                exit_code=error.exit_code,
                source=self.source,
                **identity,
            )
        except OSError:
            pass  # a full disk must not hide the original error


class StagedImport:
    """Another way in (`sovpack pull`): the caller stages the bundle's files in the store's tmp/, and this
    refuses a rollback before they are fetched, then verifies, installs and audits them exactly as import does."""

    def __init__(
        self, store: Store, policy: TrustPolicy, source: dict, *, event: str, allow_downgrade: bool = False, progress=None
    ):
        self._importer = _Importer(store, policy, allow_downgrade, progress or Progress(), None)
        self._importer.source, self._importer.event = source, event

    def check_version(self, metadata: BundleMetadata, raw: bytes) -> ImportResult | None:
        """Before the files are fetched: refuses a rollback; the result when this very bundle is installed already."""
        self._importer.identity = identity = BundleIdentity.of(metadata, raw)
        try:
            self._importer._check_version(metadata.name, metadata.version, identity.metadata_sha256, claimed=True)
        except _AlreadyInstalled as done:
            return self._importer._already_installed(done.installed)
        return None

    def install(self, staging: Path, known: dict[str, ShardDigests] | None) -> ImportResult:
        """Verify the staged bundle (files in `known` by the digests computed as they were written) and install it."""
        return self._importer._verify_and_install(staging, None, known)

    def audit_failure(self, error: SovpackError) -> None:
        self._importer.audit_failure(error)


def _installed_metadata_sha256(installed: InstalledBundle) -> str | None:
    recorded = installed.record.get("metadata_sha256")
    if recorded:
        return recorded
    try:
        return sha256_bytes((installed.path / METADATA_FILE).read_bytes())
    except OSError:
        return None


def _left_out_hint(entry: FileEntry, index: ExportIndex) -> str:
    if any(f.path == entry.path for f in index.left_out):
        since = index.since or {}
        return (
            f": it was left out of this delta export (made --since {since.get('name')} v{since.get('version')}); "
            f"import that export first, or export again without --since"
        )
    return ""
