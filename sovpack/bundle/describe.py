"""What a bundle holds, read from its metadata and signature files, without keys or hashing."""

from __future__ import annotations

from pathlib import Path

from sovpack.bundle.certificates import identity_of
from sovpack.bundle.directory import read_metadata_bytes, require_bundle_dir, scan_tree
from sovpack.bundle.metadata import BundleMetadata, format_time, parse_metadata
from sovpack.bundle.signature import parse_statement, read_signature_file
from sovpack.common.hashing import sha256_bytes
from sovpack.errors import Refused
from sovpack.formats import CARRIED_KINDS, allowance_for


def describe_bundle(root: Path) -> dict:
    """The documented `inspect --json` document (docs/bundle-format.md); nothing is hashed, no key is needed.

    Raises: UsageError (not a bundle directory), Refused (a sovpack.json or signature file that cannot be read).
    """
    require_bundle_dir(root)
    raw = read_metadata_bytes(root)
    metadata = parse_metadata(raw)
    metadata_sha256 = sha256_bytes(raw)
    return {
        "bundle": str(root),
        "name": metadata.name,
        "version": metadata.version,
        "created": format_time(metadata.created),
        "expires": format_time(metadata.expires) if metadata.expires else None,
        "created_by": metadata.created_by,
        "metadata_sha256": metadata_sha256,
        "total_size": metadata.size,
        "sources": metadata.sources,
        "allowed_files": allowances(metadata),
        "files": [f.to_json() | {"shards": len(f.shards)} for f in sorted(metadata.files, key=lambda f: f.path)],
        "signatures": _signatures(root, metadata_sha256),
    }


def allowances(metadata: BundleMetadata) -> list[dict]:
    """Each signed allowance (--allow-file GLOB) with the files it lets through (wheels, files of no checked kind)."""
    carried = [f.path for f in metadata.files if f.format in CARRIED_KINDS]
    return [
        {"glob": glob, "files": [p for p in carried if allowance_for(p, metadata.allowed_files) == glob]}
        for glob in metadata.allowed_files
    ]


def _signatures(root: Path, metadata_sha256: str) -> list[dict]:
    found = []
    for name in scan_tree(root).signatures:
        try:
            sig = read_signature_file(root / name, name)
            statement = parse_statement(sig.payload, name)
        except Refused as e:
            found.append({"file": name, "key_id": None, "covers_metadata": False, "problem": str(e)})
            continue
        entry = {"file": name, "key_id": sig.key_id, "covers_metadata": statement.covers(metadata_sha256), "problem": None}
        if sig.certificates:  # a certificate signature: who it claims to be (not checked here: `verify` checks the chain)
            signed_at = format_time(statement.signed_at) if statement.signed_at else None
            entry |= {"certificate": identity_of(sig.certificates[0]), "signed_at": signed_at}
        found.append(entry)
    return found
