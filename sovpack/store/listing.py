"""What `sovpack list` says of an installed bundle: its record and its metadata, and what is wrong with either."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sovpack.bundle.metadata import format_time
from sovpack.errors import Refused
from sovpack.store.store import InstalledBundle, Store

NO_RECORD = "no import record: run the import again to complete it"


@dataclass(frozen=True)
class InstalledSummary:
    """One installed bundle; the fields are those of `sovpack list --json` (docs/store.md)."""

    name: str
    version: int
    path: Path
    size: int | None
    signers: list[str]
    threshold: int | None
    imported: str | None
    created: str | None
    expires: str | None
    gguf_variants: list[str]
    metadata_sha256: str | None
    problem: str | None  # why the bundle cannot be described in full (no record, unreadable metadata)

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "version": self.version,
            "path": str(self.path),
            "size": self.size,
            "signers": self.signers,
            "threshold": self.threshold,
            "imported": self.imported,
            "created": self.created,
            "expires": self.expires,
            "gguf_variants": self.gguf_variants,
            "metadata_sha256": self.metadata_sha256,
            "problem": self.problem,
        }


def summarize(store: Store, bundle: InstalledBundle) -> InstalledSummary:
    try:
        metadata = store.read_installed_metadata(bundle)
    except (OSError, Refused) as e:
        metadata, problem = None, str(e)
    else:
        problem = None if bundle.record else NO_RECORD
    record = bundle.record
    size = record.size if record and record.size is not None else (metadata.size if metadata else None)
    variants = {(f.details or {}).get("file_type") or "unknown" for f in metadata.files if f.format == "gguf"} if metadata else ()
    return InstalledSummary(
        name=bundle.name,
        version=bundle.version,
        path=bundle.path,
        size=size,
        signers=record.signer_names if record else [],
        threshold=record.threshold if record else None,
        imported=record.imported if record else None,
        created=format_time(metadata.created) if metadata else None,
        expires=format_time(metadata.expires) if metadata and metadata.expires else None,
        gguf_variants=sorted(variants),
        metadata_sha256=record.metadata_sha256 if record else None,
        problem=problem,
    )
