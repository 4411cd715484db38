"""Verify before load: the bundle, its trust, and the exact bytes and chat template served.

Order:
1. choose the GGUF from sovpack.json as found (not yet trusted; only to know which files
   to hash), and fingerprint those files; if it names none that can be served, verify
   first, so that an altered sovpack.json is refused rather than taken at its word;
2. `verify_bundle` with `paths=` those files: signatures, threshold, metadata, inventory,
   their shard digests, formats, expiry. Files that the fast-path record vouches for
   (unchanged and read-only since a full verification) skip the digest step;
3. choose the GGUF again from the verified metadata; it must be the same file;
4. read the chat template from the GGUF and check its SHA-256 against the signed one;
5. the files' fingerprints must not have moved since step 1.

The engine checks the fingerprints again after llama.cpp has loaded the files, and the
server before every generation request (see docs/serve.md, "time of check and time of use").
"""

from __future__ import annotations

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

        Returns the files whose ctime alone moved: a hard link was added or removed (the
        store deduplicates by hard-linking), the mode changed, or the file was written
        and its mtime set back. Those must be re-hashed (`recheck`) to tell which.
        """
        moved = []
        for path, before in self.fingerprints.items():
            after = self._fingerprint(path)
            if not before.same_contents_identity(after):
                raise Refused(f"{self._rel(path)} changed after it was verified: {describe_change(before, after)}")
            if after.ctime_ns != before.ctime_ns:
                moved.append(path)
        return moved

    def recheck(self, paths: list[Path]) -> None:
        """Hash `paths` against their signed shard digests again, then adopt their new fingerprints."""
        for path in paths:
            before = self._fingerprint(path)
            check_digests(self.target.bundle, self.metadata, [self._rel(path)])
            after = self._fingerprint(path)
            if not before.same_file(after):
                raise Refused(f"{self._rel(path)} kept changing while it was being re-checked")
            self.fingerprints[path] = after

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
    paths = {root / part.path: part for part in unverified.parts}
    before = {path: Fingerprint.of(path) for path in paths if path.is_file()}
    found = {path: (before[path], part.sha256) for path, part in paths.items() if path in before}
    skip = set() if full_verify or records is None else records.vouched(found)
    report = verify_bundle(root, target.policy, now=now, paths=[p.path for path, p in paths.items() if path not in skip])
    report.raise_for_failure()
    choice = choose_gguf(report.metadata, variant)
    if choice.parts != unverified.parts or set(before) != set(paths):
        raise Refused(f"{root}: sovpack.json or the GGUF files changed while they were being verified; start again")
    model = VerifiedModel(target, report, choice, before, _checked_template(root, choice), "recorded" if skip else "full")
    model.ensure_unchanged()
    if records is not None:
        _remember(records, model, skip, say)
    return model


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


def _checked_template(root: Path, choice: GgufChoice) -> str | None:
    signed = (choice.entry.details or {}).get("chat_template_sha256")
    try:
        template = read_chat_template(root / choice.entry.path)
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
