"""Which GGUF build of a bundle `sovpack serve` loads (`--variant`).

`--variant` is a quantization type as llama.cpp names it (Q4_K_M, Q8_0, F16, ...), the
path of a GGUF in the bundle, or its file name. Without it the bundle must hold exactly
one GGUF model. A split GGUF (name-00001-of-00003.gguf ...) is served from its first
part and all parts are verified, since llama.cpp loads them all.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import PurePosixPath

from sovpack.bundle.gguf_parts import GgufSplit, listed_parts, split_of
from sovpack.bundle.metadata import BundleMetadata, FileEntry
from sovpack.errors import UsageError


@dataclass(frozen=True)
class GgufChoice:
    entry: FileEntry  # the file llama.cpp opens (the first part of a split model)
    parts: tuple[FileEntry, ...]  # every file llama.cpp reads

    @property
    def quantization(self) -> str:
        return quantization(self.entry)


def quantization(entry: FileEntry) -> str:
    return str((entry.details or {}).get("file_type") or "unknown")


def choose_gguf(metadata: BundleMetadata, variant: str | None) -> GgufChoice:
    models = []  # (entry, its split-name match or None): whole files and first parts
    for f in metadata.files:
        if f.format != "gguf":
            continue
        split = split_of(f.path)
        if split is None or split.is_first:
            models.append((f, split))
    if not models:
        raise UsageError(
            f"bundle {metadata.name} v{metadata.version} holds no GGUF model; serve needs one "
            "(add it with `sovpack quantize BUNDLE --type Q4_K_M` on the connected side)"
        )
    chosen = [(f, split) for f, split in models if variant is None or _matches(f, variant)]
    available = ", ".join(f"{quantization(f)} ({f.path})" for f, _ in models)
    if not chosen:
        raise UsageError(f"--variant {variant}: bundle {metadata.name} has no such GGUF; it has {available}")
    if len(chosen) > 1:
        hint = "choose one with --variant" if variant is None else "give the file path as --variant"
        raise UsageError(f"bundle {metadata.name} holds several GGUF models: {available}; {hint}")
    entry, split = chosen[0]
    return GgufChoice(entry, _parts(metadata, entry, split))


def _matches(entry: FileEntry, variant: str) -> bool:
    wanted = variant.strip()
    return wanted.upper() == quantization(entry).upper() or wanted in (entry.path, PurePosixPath(entry.path).name)


def _parts(metadata: BundleMetadata, first: FileEntry, split: GgufSplit | None) -> tuple[FileEntry, ...]:
    if split is None:
        return (first,)
    parts, missing = listed_parts(metadata, split)
    if missing:
        raise UsageError(f"{first.path} is part 1 of {split.count} but the bundle lacks {', '.join(missing)}")
    return parts
