"""Verification of a bundle against trusted keys, step by step, stopping at the first failure.

Order: signatures, threshold, metadata file, inventory, sizes and digests, formats, expiry.
Every failure names the file or signer at fault. The JSON form of the report is documented
in docs/bundle-format.md ("sovpack verify --json") and kept stable.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Literal

from cryptography.hazmat.primitives.asymmetric import ec

from sovpack.bundle.certificates import CertifiedSigner, identity_of, validate_chain
from sovpack.bundle.describe import allowances
from sovpack.bundle.directory import Tree, read_metadata_bytes, scan_tree
from sovpack.bundle.metadata import METADATA_FILE, BundleMetadata, FileEntry, format_time, parse_metadata
from sovpack.bundle.signature import SignatureFile, Statement, parse_statement, read_signature_file
from sovpack.bundle.trust import TrustedKey, TrustPolicy
from sovpack.common.hashing import (
    ShardDigests,
    ShardMismatch,
    check_shards,
    compare_shards,
    digest_file,
    sha256_bytes,
    shard_jobs,
)
from sovpack.errors import Refused, SovpackError
from sovpack.formats import WHEEL, Examined, examine, legacy_format

LEGACY_LABELS = ("json", "jinja", "text", "sentencepiece", "other")  # labels once given by name, never checked against bytes
STEPS = ("signatures", "threshold", "metadata", "inventory", "digests", "formats", "expiry")
# valid: trusted, covers this sovpack.json; stale: trusted, covers another one; untrusted: not in the trust policy;
# rejected: a certificate signature whose chain reaches no trusted root or fails a check (`problem` says which certificate)
SignatureStatus = Literal["valid", "stale", "untrusted", "rejected"]
CLOCK_SKEW = timedelta(minutes=5)  # a recorded signing time this far ahead of the verifier's clock is still believed


class StepFailed(Refused):
    def __init__(self, step: str, message: str, subject: str | None = None):
        super().__init__(message)
        self.step, self.subject = step, subject


@dataclass
class SignatureResult:
    file: str
    key_id: str
    status: SignatureStatus
    signer: TrustedKey | CertifiedSigner | None = None
    statement: Statement | None = None
    certificate: dict | None = None  # a certificate signature's signer: subject, issuer, serial
    problem: str | None = None  # why a certificate signature was rejected

    def to_json(self) -> dict:
        found = {
            "file": self.file,
            "key_id": self.key_id,
            "signer": self.signer.name if self.signer else None,
            "status": self.status,
        }
        if self.certificate is None:
            return found
        signed_at = self.statement.signed_at if self.statement else None
        return found | {
            "certificate": self.certificate,
            "signed_at": format_time(signed_at) if signed_at else None,
            "problem": self.problem,
        }


@dataclass
class VerifyReport:
    bundle: str
    threshold: int
    signatures: list[SignatureResult] = field(default_factory=list)
    checks: list[tuple[str, str]] = field(default_factory=list)  # (step, what was checked), in order
    metadata: BundleMetadata | None = None
    metadata_sha256: str | None = None  # of the very sovpack.json bytes verified (None if it could not be read)
    failure: StepFailed | None = None

    @property
    def ok(self) -> bool:
        return self.failure is None

    @property
    def signers(self) -> list[TrustedKey | CertifiedSigner]:
        """Distinct trusted signers (keys, or certificate subjects) whose signature covers this bundle."""
        return list({s.signer.identity: s.signer for s in self.signatures if s.status == "valid"}.values())

    def raise_for_failure(self) -> None:
        if self.failure:
            raise self.failure

    def to_json(self) -> dict:
        m = self.metadata
        return {
            "ok": self.ok,
            "bundle": self.bundle,
            "name": m.name if m else None,
            "version": m.version if m else None,
            "created": format_time(m.created) if m else None,
            "expires": format_time(m.expires) if m and m.expires else None,
            "threshold": self.threshold,
            "allowed_files": allowances(m) if m else [],
            "signatures": [s.to_json() for s in self.signatures],
            "checks": [{"step": step, "ok": True, "detail": detail} for step, detail in self.checks],
            "files": [
                {"path": f.path, "size": f.size, "sha256": f.sha256, "role": f.role, "format": f.format}
                for f in (m.files if m else [])
            ],
            "error": None
            if self.ok
            else {"step": self.failure.step, "message": str(self.failure), "subject": self.failure.subject},
        }


def check_signatures(
    root: Path, tree: Tree, policy: TrustPolicy, metadata_sha256: str, now: datetime | None = None
) -> list[SignatureResult]:
    """Read every signature; a trusted signer's signature must verify cryptographically.

    A signature by a trusted key counts as that key. Otherwise, a certificate signature counts as
    its subject when its chain passes `certificates.validate_chain` at the signing time its
    statement records (else now); one that does not is "rejected", with the reason.
    """
    now = now or datetime.now(timezone.utc)
    results = []
    for name in tree.signatures:
        try:
            sig = read_signature_file(root / name, name)
        except Refused as e:
            raise StepFailed("signatures", str(e), name) from None
        signer = policy.key_for(sig.key_hint)
        certificate = identity_of(sig.certificates[0]) if sig.certificates else None
        if signer is None and not (certificate and policy.roots):
            results.append(SignatureResult(name, sig.key_id, "untrusted", certificate=certificate))
            continue
        statement = _statement(sig)
        if signer is None:
            try:
                signer = _certified_signer(sig, statement, policy, now)
            except Refused as e:
                results.append(SignatureResult(name, sig.key_id, "rejected", None, statement, certificate, str(e)))
                continue
        _check_cryptographic_signature(sig, signer, signer.public_key if isinstance(signer, TrustedKey) else None)
        status = "valid" if statement.covers(metadata_sha256) else "stale"
        results.append(SignatureResult(name, sig.key_id, status, signer, statement, certificate))
    return results


def _statement(sig: SignatureFile) -> Statement:
    try:
        return parse_statement(sig.payload, sig.name)
    except Refused as e:
        raise StepFailed("signatures", str(e), sig.name) from None


def _certified_signer(sig: SignatureFile, statement: Statement, policy: TrustPolicy, now: datetime) -> CertifiedSigner:
    """The signer `sig`'s certificate chain proves at its recorded signing time (Refused naming the certificate at fault)."""
    at, at_what = statement.signed_at, "the signing time"
    if at is None:
        at, at_what = now, "verification time (the signature records no signing time)"
    elif at > now + CLOCK_SKEW:
        raise Refused(f"{sig.name} records a signing time {format_time(at)} later than now ({format_time(now)})")
    return validate_chain(sig.certificates, policy.roots, policy.crls, at, at_what)


def _check_cryptographic_signature(
    sig: SignatureFile, signer: TrustedKey | CertifiedSigner, public_key: ec.EllipticCurvePublicKey | None
) -> None:
    if not sig.verify(public_key or sig.certificates[0].public_key()):
        raise StepFailed(
            "signatures",
            f"{sig.name} names trusted signer {signer.label} but its signature does not verify: the file was altered or forged",
            sig.name,
        )


def check_threshold(results: list[SignatureResult], policy: TrustPolicy, metadata_sha256: str) -> str:
    """Count distinct trusted signers (keys, certificate subjects) whose signature covers this very sovpack.json."""
    signers = {r.signer.identity: r.signer for r in results if r.status == "valid"}
    if len(signers) >= policy.threshold:
        return f"{len(signers)} of {policy.threshold} required trusted signer(s): " + ", ".join(k.label for k in signers.values())
    reasons = [f"threshold not met: {len(signers)} of {policy.threshold} required trusted signature(s)"]
    if signers:
        reasons[0] += " (signed by " + ", ".join(k.label for k in signers.values()) + ")"
    for r in results:
        if r.status == "stale":
            reasons.append(
                f"{r.file} ({r.signer.label}) does not cover this bundle: {METADATA_FILE} has SHA-256 {metadata_sha256} but the "
                f"signature covers {r.statement.resources.get(METADATA_FILE) or 'no ' + METADATA_FILE} (statement for bundle "
                f"'{r.statement.subject_name}'); the metadata was changed "
                "after signing or the signature belongs to another bundle"
            )
    reasons += [f"{r.file} is not counted: {r.problem}" for r in results if r.status == "rejected"]
    untrusted = [f"{r.file} (key {r.key_id})" for r in results if r.status == "untrusted"]
    if untrusted:
        reasons.append("signed by key(s) not in the trust set: " + ", ".join(untrusted))
    if not results:
        reasons.append("the bundle has no signatures (run `sovpack sign`)")
    culprit = next((r.file for r in results if r.status != "valid"), None)
    raise StepFailed("threshold", "; ".join(reasons), culprit)


def check_metadata(raw: bytes, metadata_sha256: str, results: list[SignatureResult]) -> BundleMetadata:
    """Parse sovpack.json (`raw`, whose SHA-256 is given) and check that each counted statement lists exactly its inventory."""
    try:
        metadata = parse_metadata(raw)
    except Refused as e:
        raise StepFailed("metadata", str(e), METADATA_FILE) from None
    expected = {f.path: f.sha256 for f in metadata.files} | {METADATA_FILE: metadata_sha256}
    for r in results:
        if r.status == "valid" and r.statement.subject_name != metadata.name:
            raise StepFailed(
                "metadata",
                f"{r.file} signs a statement whose subject is bundle {r.statement.subject_name!r}, but this bundle is "
                f"{metadata.name!r}: the statement was made for another bundle",
                r.file,
            )
        if r.status == "valid" and r.statement.resources != expected:
            odd = sorted(set(r.statement.resources.items()) ^ set(expected.items()))[0][0]
            raise StepFailed("metadata", f"{r.file} and {METADATA_FILE} disagree about {odd}", odd)
    return metadata


def check_inventory(metadata: BundleMetadata, tree: Tree, root: Path) -> None:
    listed = {f.path for f in metadata.files} | {METADATA_FILE}
    present = set(tree.files)
    extra, missing = sorted(present - listed), sorted(listed - present)
    if extra and missing:
        raise StepFailed("inventory", _renamed_message(root, metadata, extra, missing), extra[0])
    if extra:
        raise StepFailed(
            "inventory", f"{_list(extra)} not listed in the inventory (sovpack.json) ({len(extra)} extra file(s))", extra[0]
        )
    if missing:
        raise StepFailed(
            "inventory", f"{_list(missing)} listed in the inventory (sovpack.json) but missing from the bundle", missing[0]
        )


def _renamed_message(root: Path, metadata: BundleMetadata, extra: list[str], missing: list[str]) -> str:
    by_size = {metadata.file(m).size: m for m in missing if metadata.file(m)}
    for e in extra:
        original = by_size.get((root / e).stat().st_size)
        if original and digest_file(root / e, metadata.shard_size).sha256 == metadata.file(original).sha256:
            return f"{original} was renamed to {e}; the inventory (sovpack.json) lists it as {original}"
    return f"{_list(extra)} not listed in the inventory (sovpack.json), and {_list(missing)} missing"


def _list(paths: list[str]) -> str:
    shown = ", ".join(paths[:5])
    return shown + (f" and {len(paths) - 5} more" if len(paths) > 5 else "")


def check_sizes(root: Path, entries: Iterable[FileEntry]) -> None:
    for f in entries:
        size = (root / f.path).stat().st_size
        if size != f.size:
            change = "truncated" if size < f.size else "grown"
            message = f"{f.path} has {size} bytes, the inventory in {METADATA_FILE} says {f.size} ({change})"
            raise StepFailed("digests", message, f.path)


def check_digests(
    root: Path,
    metadata: BundleMetadata,
    paths: Iterable[str] | None = None,
    on_progress: Callable[[int], None] | None = None,
    known_digests: Mapping[str, ShardDigests] | None = None,
) -> int:
    """Sizes first (cheap), then every shard on all cores. Returns the bytes checked.

    Files in `known_digests` are not read: the shard digests given are compared instead (see verify_bundle).
    """
    wanted = None if paths is None else set(paths)
    unlisted = sorted((wanted or set()) - {f.path for f in metadata.files})
    if unlisted:
        raise StepFailed("digests", f"{_list(unlisted)} not listed in the inventory ({METADATA_FILE})", unlisted[0])
    entries = [f for f in metadata.files if wanted is None or f.path in wanted]
    check_sizes(root, entries)
    known = known_digests or {}
    jobs = [
        job for f in entries if f.path not in known for job in shard_jobs(f.path, root / f.path, f.digest, metadata.shard_size)
    ]
    mismatches = check_shards(jobs, on_progress=on_progress)
    for f in entries:
        if f.path in known:
            mismatch = compare_shards(f.path, f.digest, known[f.path], metadata.shard_size)
            mismatches += [mismatch] if mismatch else []
    if mismatches:
        raise digest_failure(sorted(mismatches, key=lambda m: (m.path, m.index)))
    return sum(f.size for f in entries)


def digest_failure(mismatches: list[ShardMismatch]) -> StepFailed:
    """The message for files whose bytes do not match their signed shard digests (the first one named in full)."""
    first = mismatches[0]
    damaged = sorted({m.path for m in mismatches})
    return StepFailed(
        "digests",
        f"{first.path} does not match its digest in {METADATA_FILE} (shard {first.index}, bytes from {first.offset})"
        + (f"; also damaged: {_list(damaged[1:])}" if len(damaged) > 1 else ""),
        first.path,
    )


def check_formats(root: Path, metadata: BundleMetadata) -> str:
    """Every file passes the file-kind gate again (by its bytes, under the signed allowances) and is what sovpack.json says."""
    kinds: dict[str, int] = {}
    carried = []
    for f in metadata.files:
        try:
            examined = examine(root / f.path, f.path, metadata.allowed_files)
        except Refused as e:
            raise StepFailed("formats", str(e), f.path) from None
        _check_recorded_format(f, examined)
        kinds[examined.format] = kinds.get(examined.format, 0) + 1
        if examined.allowed_by:
            carried.append(f"{f.path} (--allow-file {examined.allowed_by!r})")
    pickles = "no pickles outside the allowed wheels" if WHEEL in kinds else "no pickles"
    detail = f"{pickles}; every file of a checked kind (" + ", ".join(f"{n} {k}" for k, n in sorted(kinds.items())) + ")"
    if carried:
        detail += f"; carried under the signed allowance: {_list(carried)}"
    return detail


def _check_recorded_format(f: FileEntry, examined: Examined) -> None:
    """The format recorded must be the one the bytes show (bundles signed before the gate: their name-based label)."""
    legacy = f.format in LEGACY_LABELS and f.format == legacy_format(f.path)
    if f.format != examined.format and not legacy:
        raise StepFailed(
            "formats", f"{f.path}: {METADATA_FILE} records it as {f.format}, but its bytes are {examined.format}", f.path
        )
    recorded = (f.details or {}).get("chat_template_sha256")
    found = (examined.details or {}).get("chat_template_sha256")
    if examined.format == "gguf" and recorded != found:
        raise StepFailed("formats", f"{f.path}: chat template SHA-256 is {found}, {METADATA_FILE} records {recorded}", f.path)


def check_expiry(metadata: BundleMetadata, now: datetime) -> str:
    if metadata.is_expired(now):
        raise StepFailed(
            "expiry",
            f"bundle {metadata.name} v{metadata.version} expired on {format_time(metadata.expires)} (now {format_time(now)})",
        )
    return f"expires {format_time(metadata.expires)}" if metadata.expires else "no expiry set"


def verify_bundle(
    root: Path,
    policy: TrustPolicy,
    *,
    now: datetime | None = None,
    paths: Iterable[str] | None = None,
    on_progress: Callable[[int], None] | None = None,
    known_digests: Mapping[str, ShardDigests] | None = None,
) -> VerifyReport:
    """Run every check in order; the report says what passed and, if any, the first failure.

    `paths` limits the digest step to the files about to be used (serve); the inventory
    is always checked in full.

    `known_digests` (import) gives, for files that were just written into `root`, the shard
    digests of the very bytes written, computed while they were written: the digest step
    compares those with the signed ones instead of reading the files again (their sizes are
    still checked on disk; every other step is unchanged, and files not given are hashed from
    disk as always). This is sound because nothing else writes `root` (a staging directory in
    the store, created empty by the import, its files created with O_EXCL) between the write
    and the install, which renames this very directory, inodes and all, into place; what the
    digests describe is what gets installed. It does not re-check the disk itself: `sovpack
    verify NAME` and `serve` hash the installed files from disk.

    Raises nothing for a bundle that fails a check (`report.raise_for_failure()` raises that
    refusal); Failure when `root` cannot be read.
    """
    report = VerifyReport(str(root), policy.threshold)
    now = now or datetime.now(timezone.utc)
    step = "inventory"
    try:
        tree = scan_tree(root)
        step = "metadata"
        raw = read_metadata_bytes(root)  # read once: every later step uses these very bytes
        report.metadata_sha256 = metadata_sha256 = sha256_bytes(raw)
        step = "signatures"
        report.signatures = check_signatures(root, tree, policy, metadata_sha256, now)
        report.checks.append(("signatures", f"{len(report.signatures)} signature file(s) read"))
        step = "threshold"
        report.checks.append(("threshold", check_threshold(report.signatures, policy, metadata_sha256)))
        step = "metadata"
        report.metadata = check_metadata(raw, metadata_sha256, report.signatures)
        report.checks.append(("metadata", f"{METADATA_FILE} sha256 {metadata_sha256} is what the signers signed"))
        step = "inventory"
        check_inventory(report.metadata, tree, root)
        report.checks.append(("inventory", f"{len(report.metadata.files)} files, nothing extra or missing"))
        step = "digests"
        checked = check_digests(root, report.metadata, paths, on_progress, known_digests)
        report.checks.append(("digests", f"{checked} bytes match their signed SHA-256 shard digests"))
        step = "formats"
        report.checks.append(("formats", check_formats(root, report.metadata)))
        step = "expiry"
        report.checks.append(("expiry", check_expiry(report.metadata, now)))
    except StepFailed as e:
        report.failure = e
    except SovpackError as e:
        if e.exit_code != 1:
            raise
        report.failure = StepFailed(step, str(e))
    return report
