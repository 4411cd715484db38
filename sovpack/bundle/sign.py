"""Add a signature to a bundle, after checking that its files still match its inventory."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from sovpack.bundle.certificates import check_signing_chain
from sovpack.bundle.directory import read_metadata_bytes, require_bundle_dir, scan_tree, signature_path
from sovpack.bundle.keys import key_id
from sovpack.bundle.metadata import METADATA_FILE, BundleMetadata, parse_metadata
from sovpack.bundle.signature import build_statement, read_statement, sign_statement
from sovpack.bundle.verify import check_digests, check_formats, check_inventory
from sovpack.common.files import write_atomically
from sovpack.common.hashing import sha256_bytes
from sovpack.errors import Refused


@dataclass(frozen=True)
class SignResult:
    path: Path
    key_id: str
    metadata: BundleMetadata
    replaced: bool  # this key had signed before; its old signature was replaced
    stale: list[str]  # other signature files that no longer cover this bundle


def statement_for(metadata: BundleMetadata, metadata_sha256: str, signed_at: datetime | None = None) -> bytes:
    resources = {f.path: f.sha256 for f in metadata.files} | {METADATA_FILE: metadata_sha256}
    return build_statement(metadata.name, resources, signed_at)


def sign_bundle(
    root: Path,
    private_key: ec.EllipticCurvePrivateKey,
    chain: list[x509.Certificate] | None = None,
    now: datetime | None = None,
) -> SignResult:
    """Write signatures/KEY_ID.sig (OpenSSF model-signing v1.0) after checking the files against the inventory.

    `private_key` may be a PEM key or a key on a token (`pkcs11.TokenKey`). With `chain` (the signer's
    certificate first, then its intermediates), the signature carries the chain instead of a key hint;
    the signing time is recorded in the statement either way.

    Raises: UsageError (not a bundle directory, a certificate not for this key or not valid now), Refused
    (a file that does not match sovpack.json, or that sovpack cannot check), Failure (I/O).
    """
    now = now or datetime.now(timezone.utc)
    if chain:
        check_signing_chain(chain, private_key.public_key(), now)
    require_bundle_dir(root)
    raw = read_metadata_bytes(root)
    metadata = parse_metadata(raw)
    tree = scan_tree(root)
    try:
        check_inventory(metadata, tree, root)
        check_digests(root, metadata)
        check_formats(root, metadata)
    except Refused as e:
        raise Refused(f"refusing to sign {root}: {e}") from None
    metadata_sha256 = sha256_bytes(raw)
    signer = key_id(private_key.public_key())
    target = signature_path(root, signer)
    target.parent.mkdir(exist_ok=True)
    replaced = target.exists()
    write_atomically(
        target, sign_statement(private_key, statement_for(metadata, metadata_sha256, now), chain), tmp_dir=root.resolve().parent
    )
    stale = [name for name in tree.signatures if root / name != target and not _covers(root / name, name, metadata_sha256)]
    return SignResult(target, signer, metadata, replaced, stale)


def _covers(path: Path, name: str, metadata_sha256: str) -> bool:
    """Whether a signature's statement names this very sovpack.json (the rule verify applies)."""
    try:
        return read_statement(path, name).covers(metadata_sha256)
    except Refused:
        return False
