"""Verify before load: the bundle, its trust, and the exact bytes and chat template served.

Order:
1. choose the GGUF from sovpack.json as found (not yet trusted; only to know which files
   to open), and open each of its parts: the descriptors are what gets hashed and what the
   engine loads (opened.py), so the bytes llama.cpp maps are the bytes checked; if
   sovpack.json names no GGUF that can be served, verify first, so that an altered
   sovpack.json is refused rather than taken at its word;
2. `verify_bundle`: signatures, threshold, metadata, inventory, formats, expiry;
3. choose the GGUF again from the verified metadata; it must be the same file;
4. hash the open descriptors against the signed shard digests, unless the fast-path record
   vouches for the very inode held open (unchanged and read-only since a full verification);
5. read the chat template through the descriptor and check its SHA-256 against the signed one;
6. the path must still name the inode held open, and that inode must not have been written.

The engine checks what its worker processes mapped after loading and before every request,
and the server checks the fingerprints before every request (see docs/serve.md, "time of
check and time of use"). After an engine crash, `reverify` repeats steps 2 to 6 on the same
descriptors, hashing every byte, before a worker loads them again.
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from sovpack.bundle.directory import read_metadata
from sovpack.bundle.metadata import BundleMetadata
from sovpack.bundle.verify import StepFailed, VerifyReport, check_digests, verify_bundle
from sovpack.common.hashing import sha256_bytes
from sovpack.errors import FormatError, Refused, UsageError
from sovpack.formats.gguf import read_chat_template
from sovpack.server.fingerprint import Fingerprint, VerificationRecords, describe_change
from sovpack.server.opened import OpenedFile, check_opened_digests
from sovpack.server.target import ServeTarget
from sovpack.server.variant import GgufChoice, choose_gguf


@dataclass(frozen=True)
class VerifiedModel:
    target: ServeTarget
    report: VerifyReport
    choice: GgufChoice
    fingerprints: dict[Path, Fingerprint]  # every file llama.cpp reads
    chat_template: str | None
    digests: str  # "full": every byte hashed now; "recorded": unchanged since a recorded full check
    opened: tuple[OpenedFile, ...] = ()  # the GGUF parts, held open: what was hashed is what the engine loads

    @property
    def metadata(self) -> BundleMetadata:
        return self.report.metadata

    @property
    def gguf_path(self) -> Path:
        return self.target.bundle / self.choice.entry.path

    @property
    def model_id(self) -> str:
        return self.metadata.name

    @property
    def chat_template_sha256(self) -> str | None:
        return (self.choice.entry.details or {}).get("chat_template_sha256")

    @property
    def signers(self) -> list[str]:
        return [s.label for s in self.report.signers]

    def check_unchanged(self) -> list[Path]:
        """Refused if a served file was replaced or written (inode, size or mtime moved).

        Both the path and the inode held open are looked at: the path must still name that
        inode, and the inode must not have been written. Returns the files whose ctime alone
        moved: a hard link was added or removed (the store deduplicates by hard-linking),
        the mode changed, or the file was written and its mtime set back. Those must be
        re-hashed (`recheck`) to tell which.
        """
        moved = []
        held = {f.path: f for f in self.opened}
        for path, before in self.fingerprints.items():
            for after in (self._fingerprint(path), *([held[path].current_fingerprint()] if path in held else [])):
                if not before.same_contents_identity(after):
                    raise Refused(f"{self._rel(path)} changed after it was verified: {describe_change(before, after)}")
                if after.ctime_ns != before.ctime_ns and path not in moved:
                    moved.append(path)
        return moved

    def recheck(self, paths: list[Path]) -> None:
        """Hash `paths` against their signed shard digests again, then adopt the fingerprints they had before.

        A ctime that moves again while hashing (another hard link made meanwhile) is not an
        error: the fingerprint adopted is the one from before the hash, so the next check
        sees the move and hashes again. Contents that move (inode, size, mtime) are refused.
        """
        held = {f.path: f for f in self.opened}
        entries = {f.path: f for f in self.metadata.files}
        for path in paths:
            before = self._fingerprint(path)
            if path in held:
                check_opened_digests([held[path]], entries, self.metadata.shard_size)
            else:
                check_digests(self.target.bundle, self.metadata, [self._rel(path)])
            after = self._fingerprint(path)
            now_held = held[path].current_fingerprint() if path in held else after
            if not (before.same_contents_identity(after) and before.same_contents_identity(now_held)):
                raise Refused(f"{self._rel(path)} kept changing while it was being re-checked")
            self.fingerprints[path] = before

    def reverify(self, now: datetime | None = None) -> None:
        """Verify again, every byte of the descriptors held open included (blocking): before the engine loads them again."""
        report = verify_bundle(self.target.bundle, self.target.policy, now=now, paths=[])
        report.raise_for_failure()
        if report.metadata_sha256 != self.report.metadata_sha256:
            raise Refused(f"{self.target.bundle}: sovpack.json changed since serving began")
        check_opened_digests(list(self.opened), {f.path: f for f in self.metadata.files}, self.metadata.shard_size)
        if _checked_template(self.choice, self.opened) != self.chat_template:
            raise Refused(f"{self.choice.entry.path}: the chat template changed since serving began")
        self.ensure_unchanged()

    def close(self) -> None:
        for f in self.opened:
            f.close()

    def ensure_unchanged(self) -> None:
        """check_unchanged, then recheck whatever it could not clear: blocking."""
        self.recheck(self.check_unchanged())

    def _fingerprint(self, path: Path) -> Fingerprint:
        try:
            return Fingerprint.of(path)
        except OSError as e:
            raise Refused(f"{self._rel(path)} can no longer be read ({e.strerror}); it was verified at start-up") from None

    def _rel(self, path: Path) -> str:
        return path.relative_to(self.target.bundle).as_posix()


def verify_for_serving(
    target: ServeTarget,
    variant: str | None,
    *,
    records: VerificationRecords | None,
    full_verify: bool,
    now: datetime | None = None,
    say: Callable[[str], None] = lambda line: None,
) -> VerifiedModel:
    root = target.bundle
    unverified = _unverified_choice(target, variant, now)
    opened = _open_parts(root, unverified)
    try:
        before = {f.path: f.fingerprint for f in opened}
        signed = {root / part.path: part.sha256 for part in unverified.parts}
        found = {path: (fingerprint, signed[path]) for path, fingerprint in before.items()}
        skip = set() if full_verify or records is None else records.vouched(found)
        report = verify_bundle(root, target.policy, now=now, paths=[])
        report.raise_for_failure()
        choice = choose_gguf(report.metadata, variant)
        if choice.parts != unverified.parts or len(opened) != len(choice.parts):
            raise Refused(f"{root}: sovpack.json or the GGUF files changed while they were being verified; start again")
        entries = {f.path: f for f in report.metadata.files}
        check_opened_digests([f for f in opened if f.path not in skip], entries, report.metadata.shard_size)
        template = _checked_template(choice, opened)
        model = VerifiedModel(target, report, choice, before, template, "recorded" if skip else "full", tuple(opened))
        model.ensure_unchanged()
    except BaseException:
        for f in opened:
            f.close()
        raise
    if records is not None:
        _remember(records, model, skip, say)
    return model


def _open_parts(root: Path, choice: GgufChoice) -> list[OpenedFile]:
    """Open the GGUF parts that exist (a missing one is named by the inventory check)."""
    opened = []
    try:
        for part in choice.parts:
            try:
                opened.append(OpenedFile.open(root / part.path, part.path))
            except FileNotFoundError:
                continue
            except OSError as e:  # a symlink (O_NOFOLLOW), unreadable...: the inventory check names it
                if e.errno not in (errno.ELOOP, errno.EACCES, errno.EISDIR):
                    raise
    except BaseException:
        for f in opened:
            f.close()
        raise
    return opened


def _unverified_choice(target: ServeTarget, variant: str | None, now: datetime | None) -> GgufChoice:
    """The GGUF named by sovpack.json before it is trusted.

    When sovpack.json cannot be read, or names no GGUF that can be served (none, several,
    no such --variant, a split part missing), the bundle is verified first (every step but
    the digests): an altered sovpack.json is refused for what it is (exit 1), and only a
    signed one earns the usage error about what it says.
    """
    try:
        return choose_gguf(read_metadata(target.bundle), variant)
    except (Refused, UsageError):
        verify_bundle(target.bundle, target.policy, now=now, paths=[]).raise_for_failure()
        raise


def _checked_template(choice: GgufChoice, opened) -> str | None:
    """The chat template read through the open descriptor of the file llama.cpp opens, checked against the signed digest."""
    signed = (choice.entry.details or {}).get("chat_template_sha256")
    first = next(f for f in opened if f.name == choice.entry.path)
    try:
        template = read_chat_template(Path(first.proc_path))
    except FormatError as e:  # the header was valid moments ago: the file changed under us
        raise StepFailed(
            "formats", f"{choice.entry.path}: cannot read its chat template: {e.detail}", choice.entry.path
        ) from None
    except OSError as e:
        raise StepFailed(
            "formats", f"{choice.entry.path}: cannot read its chat template: {e.strerror}", choice.entry.path
        ) from None
    actual = sha256_bytes(template.encode()) if template is not None else None
    if actual != signed:
        raise StepFailed(
            "formats",
            f"{choice.entry.path}: the chat template has SHA-256 {actual}, the signed metadata records {signed}",
            choice.entry.path,
        )
    return template


def _remember(records: VerificationRecords, model: VerifiedModel, skipped: set[Path], say: Callable[[str], None]) -> None:
    signed = {model.target.bundle / part.path: part.sha256 for part in model.choice.parts}
    hashed = {path: (fp, signed[path]) for path, fp in model.fingerprints.items() if path not in skipped}
    if hashed:
        try:
            records.remember(hashed)
        except OSError as e:  # the fast path is an optimisation: serve anyway, and say it is off
            say(
                f"warning: cannot record this full check in {records.path} ({e.strerror}); the next start hashes every byte again"
            )
