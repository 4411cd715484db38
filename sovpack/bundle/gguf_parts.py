"""The parts of a split GGUF model, named as llama.cpp's gguf-split names them: MODEL-00001-of-00003.gguf.

llama.cpp is given the first part and opens the others by name beside it, so a split model is
whole only when every part so named is there: fetch completes a selection with all of them,
quantize checks every part of its source, serve verifies every part it loads.
"""

from __future__ import annotations

from dataclasses import dataclass

from sovpack.bundle.metadata import BundleMetadata, FileEntry
from sovpack.formats.gguf import SPLIT_NAME


@dataclass(frozen=True)
class GgufSplit:
    """Where a file stands in a split model, read from its path."""

    stem: str  # the path without -NNNNN-of-NNNNN.gguf
    part: int  # from 1
    count: int

    @property
    def is_first(self) -> bool:
        return self.part == 1

    def part_paths(self) -> list[str]:
        """The path of every part, the first first."""
        return [f"{self.stem}-{i:05d}-of-{self.count:05d}.gguf" for i in range(1, self.count + 1)]


def split_of(path: str) -> GgufSplit | None:
    """The split `path` is a part of; None for a file not named as a part."""
    match = SPLIT_NAME.match(path)
    return GgufSplit(match["stem"], int(match["part"]), int(match["count"])) if match else None


def listed_parts(metadata: BundleMetadata, split: GgufSplit) -> tuple[tuple[FileEntry, ...], list[str]]:
    """The parts of `split` the bundle's inventory lists, and the paths of those it lacks."""
    entries = [(path, metadata.file(path)) for path in split.part_paths()]
    return tuple(e for _, e in entries if e is not None), [path for path, e in entries if e is None]
