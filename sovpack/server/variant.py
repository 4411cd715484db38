"""Which GGUF build of a bundle `sovpack serve` loads (`--variant`).

`--variant` is a quantization type as llama.cpp names it (Q4_K_M, Q8_0, F16, ...), the
path of a GGUF in the bundle, or its file name. Without it the bundle must hold exactly
one GGUF model. A split GGUF (name-00001-of-00003.gguf ...) is served from its first
part and all parts are verified, since llama.cpp loads them all.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import PurePosixPath

from sovpack.errors import UsageError
from sovpack.metadata import BundleMetadata, FileEntry

_SPLIT = re.compile(r"^(?P<stem>.+)-(?P<index>\d{5})-of-(?P<count>\d{5})\.gguf$", re.IGNORECASE)


@dataclass(frozen=True)
class GgufChoice:
    entry: FileEntry  # the file llama.cpp opens (the first part of a split model)
    parts: tuple[FileEntry, ...]  # every file llama.cpp reads

    @property
    def quantization(self) -> str:
        return str((self.entry.details or {}).get("file_type") or "unknown")


def choose_gguf(metadata: BundleMetadata, variant: str | None) -> GgufChoice:
    models = [f for f in metadata.files if f.format == "gguf" and _split_index(f) in (None, 1)]
    if not models:
        raise UsageError(
            f"bundle {metadata.name} v{metadata.version} holds no GGUF model; serve needs one "
            "(add it with `sovpack quantize BUNDLE --type Q4_K_M` on the connected side)"
        )
    chosen = [f for f in models if variant is None or _matches(f, variant)]
    available = ", ".join(f"{_file_type(f)} ({f.path})" for f in models)
    if not chosen:
        raise UsageError(f"--variant {variant}: bundle {metadata.name} has no such GGUF; it has {available}")
    if len(chosen) > 1:
        hint = "choose one with --variant" if variant is None else "give the file path as --variant"
        raise UsageError(f"bundle {metadata.name} holds several GGUF models: {available}; {hint}")
    return GgufChoice(chosen[0], _parts(metadata, chosen[0]))


def _matches(entry: FileEntry, variant: str) -> bool:
    wanted = variant.strip()
    return wanted.upper() == _file_type(entry).upper() or wanted in (entry.path, PurePosixPath(entry.path).name)


def _file_type(entry: FileEntry) -> str:
    return str((entry.details or {}).get("file_type") or "unknown")


def _split_index(entry: FileEntry) -> int | None:
    match = _SPLIT.match(PurePosixPath(entry.path).name)
    return int(match["index"]) if match else None


def _parts(metadata: BundleMetadata, first: FileEntry) -> tuple[FileEntry, ...]:
    match = _SPLIT.match(PurePosixPath(first.path).name)
    if not match:
        return (first,)
    parent = PurePosixPath(first.path).parent
    count = int(match["count"])
    names = [f"{match['stem']}-{i:05d}-of-{match['count']}.gguf" for i in range(1, count + 1)]
    parts = [metadata.file(str(parent / n) if str(parent) != "." else n) for n in names]
    missing = [n for n, p in zip(names, parts) if p is None]
    if missing:
        raise UsageError(f"{first.path} is part 1 of {count} but the bundle lacks {', '.join(missing)}")
    return tuple(parts)
