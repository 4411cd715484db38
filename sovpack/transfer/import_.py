"""Import: a bundle from volumes (or a stream) into the store, installed only once fully verified.

Phases, each leaving the installed store untouched until the last one:

1. read the index; stop if this very bundle is installed (nothing more is read), refuse early a
   version not newer than the store's high-water mark;
2. check the index signature, if any; read the volumes once, in order, as one stream
   (stream_check.py): each volume's SHA-256 on one thread, and the bundle reassembled into
   tmp/import-<index digest>/bundle on the store's file system, each file's shard digests
   computed on another thread from the bytes written (reassembly.py); files the store already
   holds (same SHA-256, or left out of a delta export) are hard-linked from objects/ instead.
   Missing or cut volumes are known before reading. The verdict of every volume (OK / damaged /
   missing) is reported before anything is used: a bad volume refuses the import, naming every
   bad one. A journal of intact volumes spares a re-run hashing them again;
3. run the full verification (signatures, threshold, inventory, digests, formats, expiry),
   the digests of written files from what was computed as they were written;
4. install: one rename into bundles/NAME/VERSION (the commit point), then the record, the
   shared objects and the high-water mark, which a re-run completes if it was interrupted.

A stream has no index: its sovpack.json, the first file in it, plays the index's part in 1.
"Already installed" (the same signed sovpack.json) is an outcome, not an error: the import
completes what an interrupted run may have left undone and reads nothing more.
Every outcome, accepted or refused, is appended to the audit log.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import BinaryIO, Literal

from sovpack.bundle.metadata import METADATA_FILE, BundleMetadata, FileEntry
from sovpack.bundle.trust import TrustPolicy
from sovpack.bundle.verify import VerifyReport, verify_bundle
from sovpack.common.files import require_free_space
from sovpack.common.hashing import ShardDigests, sha256_bytes
from sovpack.common.pipeline import Lane
from sovpack.common.progress import Progress
from sovpack.errors import Refused, SovpackError
from sovpack.store.record import ImportRecord
from sovpack.store.store import InstalledBundle, Store
from sovpack.transfer.archive import ArchiveExtraction, Extracted
from sovpack.transfer.import_workdir import ImportJob, sweep_staging
from sovpack.transfer.index import BundleIdentity, ExportIndex, check_index_signature, find_index, read_index
from sovpack.transfer.media import ConcatenatedReader
from sovpack.transfer.reassembly import StagedFiles, flush_tree
from sovpack.transfer.stream_check import StreamedVolumeCheck
from sovpack.transfer.volume_check import VolumeReport, check_index_volumes, foreign_files

ImportOutcome = Literal["installed", "already-installed"]  # already: the same bundle was installed before, nothing to do
AuditOutcome = Literal["accepted", "already-installed", "refused", "failed"]  # the `outcome` of an "import" audit record


@dataclass(frozen=True)
class ImportResult:
    outcome: ImportOutcome
    installed: InstalledBundle
    report: VerifyReport | None = None  # None when an installed bundle with its record was found: nothing verified
    volumes: VolumeReport | None = None
    written: int = 0  # files whose bytes came from the media
    linked: int = 0  # files the store already held (dedup, or left out of a delta export)
    reassembled_before: bool = False  # a killed run had reassembled the bundle; only verification was redone
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True)
class _Staged:
    """A bundle reassembled in the staging directory, and what reading the media told."""

    known: dict[str, ShardDigests] | None  # shard digests of the files this run wrote; None: staged by a killed run
    volumes: VolumeReport | None = None
    written: int = 0
    linked: int = 0
    reassembled_before: bool = False  # staged by a killed run, whose volumes were checked again

    @classmethod
    def of(cls, known: dict[str, ShardDigests], extracted: Extracted, volumes: VolumeReport | None = None) -> _Staged:
        return cls(known, volumes, extracted.written, extracted.linked)


_NOTHING_STAGED = _Staged(None)


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
    """Import from a directory of volumes, an index file, or "-" (a stream on `stdin`).

    Raises: Refused (a volume, the index or the bundle failed a check; a rollback), UsageError
    (no index where `source` points), Failure (I/O, a full store, another import of the same export).
    """
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
        self.identity: BundleIdentity | None = None  # the bundle being imported, once known (for the audit log)
        self.source: dict | None = None  # what was read, for the record and the audit log
        self.event = "import"  # the audit event: "pull" for a bundle staged from a registry (StagedImport)

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
        same = self._installed_already(index.bundle.name, index.bundle.version, index.bundle.metadata_sha256, claimed=True)
        if same is not None:
            if job_dir.exists():  # left by a run killed right after its commit
                with ImportJob(job_dir) as job:
                    job.remove()
            return self._already_installed(same)
        with ImportJob(job_dir) as job:
            signature = check_index_signature(index_path.parent, index, raw_index, self.policy)
            reuse = job.reassembled  # a killed run left the whole bundle staged
            if reuse:  # a bad volume refuses, keeping the staged bundle for the next run
                staged = _Staged(None, self._check_volumes(index_path, index, signature, job), reassembled_before=True)
            try:
                if not reuse:
                    staged = self._reassemble(job, index_path, index, signature)
                result = self._verify_and_install(job.staging, index.bundle, staged)
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
                    extraction = ArchiveExtraction(reader, files, find_object=self.store.find_object)
                    same = self._admit_stream(*extraction.read_metadata())
                    if same is not None:
                        files.abort()
                        return self._already_installed(same)
                    extracted = extraction.extract_files()
                    known = files.finish()
                except BaseException:
                    files.abort()
                    raise
                return self._verify_and_install(job.staging, None, _Staged.of(known, extracted))
            finally:
                job.remove()

    # -- phases

    def _admit_stream(self, metadata: BundleMetadata, raw: bytes) -> InstalledBundle | None:
        """The stream's sovpack.json, read first: the same bundle installed already, or None once there is room for it."""
        self.identity = BundleIdentity.of(metadata, raw)
        same = self._installed_already(metadata.name, metadata.version, self.identity.metadata_sha256, claimed=True)
        if same is None:
            needed = sum(f.size for f in metadata.files if not self.store.find_object(f.sha256, f.size))
            self._check_free_space(self.store.tmp_dir, needed, self.identity.label)
        return same

    def _check_volumes(self, index_path: Path, index: ExportIndex, signature: str, job: ImportJob) -> VolumeReport:
        """Every volume on its own, several at once (those the journal holds are not read): refused unless all are intact."""
        report = check_index_volumes(index_path, index, signature, journal=job.journal, progress=self.progress)
        if not report.ok:
            raise Refused(report.failure_message())
        return report

    def _reassemble(self, job: ImportJob, index_path: Path, index: ExportIndex, signature: str) -> _Staged:
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
            extracted = self._extract_volumes(reader, files, index)
            reader.drain()  # whatever the extraction found, every volume is read to its end and judged
            report = VolumeReport(index_path, index, signature, checker.finish(), foreign_files(directory, index))
            if not report.ok:
                raise Refused(report.failure_message())  # a bad volume also explains a failed extraction
            if isinstance(extracted, Refused):
                raise extracted
            known = files.finish()
        except BaseException:
            files.abort()
            checker.settle()
            raise
        finally:
            reader.close()
        job.mark_reassembled()
        return _Staged.of(known, extracted, report)

    def _start_staging(self, job: ImportJob, index: ExportIndex) -> None:
        job.start_staging()
        left_out = {f.path for f in index.left_out}
        needed = sum(f.size for f in index.files if f.path not in left_out and not self.store.find_object(f.sha256, f.size))
        self._check_free_space(job.directory, needed, index.bundle.label)

    def _extract_volumes(self, reader: ConcatenatedReader, files: StagedFiles, index: ExportIndex) -> Extracted | Refused:
        """Extract the stream into staging; a refusal is returned, to be raised once every volume has been judged."""
        try:
            extraction = ArchiveExtraction(reader, files, find_object=self.store.find_object, top=index.bundle.stem)
            self._expect_identity(*extraction.read_metadata(), index.bundle)
            return extraction.extract_files(missing_hint=lambda entry: _left_out_hint(entry, index))
        except Refused as refusal:
            return refusal

    def _expect_identity(self, metadata: BundleMetadata, raw: bytes, expected: BundleIdentity) -> None:
        found = sha256_bytes(raw)
        if (metadata.name, metadata.version, found) != (expected.name, expected.version, expected.metadata_sha256):
            raise Refused(
                f"the volumes hold {metadata.name} v{metadata.version} (sovpack.json sha256 {found}) but the index "
                f"describes {expected.label} (sha256 {expected.metadata_sha256}): volumes of two exports are mixed"
            )

    def _check_free_space(self, directory: Path, needed: int, label: str) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        require_free_space(
            directory,
            needed,
            lambda free: (
                f"the store at {self.store.root} has {free} bytes free but importing {label} needs {needed} more; "
                "free some space (`sovpack remove`) or import into a larger --store"
            ),
        )

    def _installed_already(self, name: str, version: int, metadata_sha256: str, *, claimed: bool) -> InstalledBundle | None:
        """This very bundle when it is installed; None when it may be installed. Refuses a rollback and a replacement."""
        same = [b for b in self.store.installed(name) if b.version == version]
        if same and _installed_metadata_sha256(same[0]) == metadata_sha256:
            return same[0]
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
        return None

    def _verify_and_install(self, staging: Path, expected: BundleIdentity | None, staged: _Staged) -> ImportResult:
        label = expected.label if expected else self.identity.label
        report = self._verify(staging, expected.size if expected else self.identity.size, staged.known)
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
        same = self._installed_already(metadata.name, metadata.version, metadata_sha256, claimed=False)
        if same is not None:  # another import installed it meanwhile
            return self._already_installed(same, staged, report)
        self.progress.phase("installing")
        record = ImportRecord.accepted(report, self.policy.threshold, self.source)
        with self.store.audit.ahead_of(self.event, **self._audit_fields("installed", metadata.name, metadata.version, record)):
            path = self.store.commit(staging, metadata.name, metadata.version)
        return self._complete(InstalledBundle(metadata.name, metadata.version, path, None), record, "installed", staged, report)

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

    def _already_installed(
        self, installed: InstalledBundle, staged: _Staged = _NOTHING_STAGED, report: VerifyReport | None = None
    ) -> ImportResult:
        """The same bundle is installed: finish what an interrupted import may have left undone."""
        record = None
        if installed.record is None:
            report = verify_bundle(installed.path, self.policy, now=self.now)
            if not report.ok:
                raise Refused(
                    f"{installed.name} v{installed.version} is installed but has no import record, and verifying it "
                    f"failed ({report.failure.step}): {report.failure}"
                )
            record = ImportRecord.accepted(report, self.policy.threshold, self.source)
        fields = self._audit_fields("already-installed", installed.name, installed.version, record or installed.record)
        self.store.audit.append(self.event, **fields)  # ahead of what completes the earlier install
        return self._complete(installed, record, "already-installed", staged, report)

    def _complete(
        self,
        installed: InstalledBundle,
        record: ImportRecord | None,
        outcome: ImportOutcome,
        staged: _Staged,
        report: VerifyReport | None,
    ) -> ImportResult:
        """The steps after the commit (record, shared objects, high-water mark), and the result."""
        installed = self.store.complete_install(installed, record)
        warnings = _volume_warnings(staged.volumes) + self._untrusted_signer_warnings(installed)
        return ImportResult(
            outcome, installed, report, staged.volumes, staged.written, staged.linked, staged.reassembled_before, tuple(warnings)
        )

    def _audit_fields(self, outcome: ImportOutcome, name: str, version: int, record: ImportRecord) -> dict:
        return {
            "outcome": _audit_outcome(outcome),
            "name": name,
            "version": version,
            "metadata_sha256": record.metadata_sha256,
            "accepted_by": record.signer_names,
            "threshold": record.threshold,
            "source": self.source,
        }

    def _untrusted_signer_warnings(self, installed: InstalledBundle) -> list[str]:
        store_keys = {k.hint for k in self.store.trusted_keys()}  # certificate signers count only under the store's roots
        outside = [s.name for s in installed.record.accepted_by if s.certificate is None and s.hint not in store_keys]
        if not outside:
            return []
        return [
            f"accepted with --trust key(s) the store does not trust ({', '.join(outside)}): `sovpack serve "
            f"{installed.name}` will refuse it until they are added with `sovpack trust add`"
        ]

    def audit_failure(self, error: SovpackError) -> None:
        if self.source is None and error.exit_code == 2:
            return  # the command was called wrongly before any media was read: not an import attempt
        identity = (
            {"name": self.identity.name, "version": self.identity.version, "metadata_sha256": self.identity.metadata_sha256}
            if self.identity
            else {}
        )
        outcome: AuditOutcome = "refused" if error.exit_code == 1 else "failed"
        try:
            self.store.audit.append(
                self.event, outcome=outcome, reason=str(error), exit_code=error.exit_code, source=self.source, **identity
            )
        except OSError:
            pass  # a full disk must not hide the original error


def _audit_outcome(outcome: ImportOutcome) -> AuditOutcome:
    return "accepted" if outcome == "installed" else outcome


def _volume_warnings(report: VolumeReport | None) -> list[str]:
    if report is None:
        return []
    warnings = []
    if report.foreign:
        warnings.append(f"ignored files of another export in the same directory: {', '.join(report.foreign)}")
    if "not in the trust set" in report.signature:
        warnings.append(report.signature)
    return warnings


class StagedImport:
    """Another way in (`sovpack pull`): the caller stages the bundle's files in the store's tmp/; this refuses a
    rollback before they are fetched, then verifies, installs and audits them exactly as import does."""

    def __init__(
        self, store: Store, policy: TrustPolicy, source: dict, *, event: str, allow_downgrade: bool = False, progress=None
    ):
        self._importer = _Importer(store, policy, allow_downgrade, progress or Progress(), None)
        self._importer.source, self._importer.event = source, event

    def check_version(self, metadata: BundleMetadata, raw: bytes) -> ImportResult | None:
        """Before the files are fetched: refuses a rollback; the result when this very bundle is installed already."""
        importer = self._importer
        importer.identity = BundleIdentity.of(metadata, raw)
        same = importer._installed_already(metadata.name, metadata.version, importer.identity.metadata_sha256, claimed=True)
        return importer._already_installed(same) if same is not None else None

    def install(self, staging: Path, known: dict[str, ShardDigests], written: int, linked: int) -> ImportResult:
        """Verify the staged bundle (the files in `known` by the digests computed as they were written) and install it."""
        return self._importer._verify_and_install(staging, None, _Staged(known, None, written, linked))

    def audit_failure(self, error: SovpackError) -> None:
        self._importer.audit_failure(error)


def _installed_metadata_sha256(installed: InstalledBundle) -> str | None:
    if installed.record and installed.record.metadata_sha256:
        return installed.record.metadata_sha256
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
