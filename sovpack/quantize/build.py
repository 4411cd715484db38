"""Build quantized GGUF files inside a bundle with llama.cpp's own quantizer, recording how.

`quantize_bundle` checks the bundle's inventory and the source GGUF's bytes, runs
`llama_model_quantize` (llama-cpp-python) once per requested type, and adds every output
to sovpack.json with its digests and provenance, or adds nothing at all.

Three decisions shape this module (docs/quantize.md explains them for users):

- llama.cpp runs in a child Python process. A ctypes call cannot be interrupted, so Ctrl-C
  would otherwise wait for the whole model; an abort inside llama.cpp would take sovpack
  down with it. The child costs about 0.2 s of start-up against minutes of quantizing.
- Outputs are written into a hidden sibling of the bundle directory (same filesystem, so a
  rename publishes them) and moved in only when every type succeeded. A killed run leaves
  at most a stale work directory, removed by the next run; the bundle is untouched.
- The commit (move outputs in, rewrite sovpack.json) is journalled: if the process dies in
  those few milliseconds, the next `quantize` on the bundle rolls the moved files back.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib.util import find_spec
from pathlib import Path, PurePosixPath

from sovpack import __version__
from sovpack.bundle.directory import read_metadata, require_bundle_dir, scan_tree, write_metadata
from sovpack.bundle.gguf_parts import listed_parts, split_of
from sovpack.bundle.metadata import BundleMetadata, FileEntry, check_inventory_paths
from sovpack.bundle.pack import file_entry
from sovpack.bundle.verify import check_digests, check_inventory
from sovpack.common.files import fsync_dir, fsync_path, require_free_space, try_lock, write_atomically
from sovpack.common.hashing import cpu_count, digest_file, sha256_file
from sovpack.common.progress import Progress
from sovpack.common.sizes import human_size
from sovpack.errors import Failure, Refused, UsageError
from sovpack.formats import inspect_file
from sovpack.formats.gguf import FILE_TYPES, UNQUANTIZED_FILE_TYPES
from sovpack.quantize.llama import QuantizerRun, run_llama_quantize

# The types offered: llama.cpp's quantize-tool names for types that need no importance
# matrix (an imatrix is a further input whose provenance would also need recording).
QUANT_TYPES = (
    "Q8_0",
    "Q6_K",
    "Q5_K_M",
    "Q5_K_S",
    "Q5_1",
    "Q5_0",
    "Q4_K_M",
    "Q4_K_S",
    "Q4_1",
    "Q4_0",
    "Q3_K_L",
    "Q3_K_M",
    "Q3_K_S",
    "Q2_K",
)
LLAMA_FTYPES = {name: ftype for ftype, name in FILE_TYPES.items() if name in QUANT_TYPES}  # llama_ftype enum values

# Disk-space estimate: no type above uses more than Q8_0's 8.5 bits per weight for any
# tensor (fallbacks included); tensors llama.cpp leaves unquantized (norms) and the
# metadata are covered by the margin.
_MAX_BITS_PER_WEIGHT = 8.5
_SOURCE_BITS = {"F32": 32, "F16": 16, "BF16": 16}
_SPACE_MARGIN = 64 << 20

_TYPE_SUFFIX = re.compile(r"[-._](?:FP32|FP16|" + "|".join(FILE_TYPES.values()) + r")$", re.IGNORECASE)


@dataclass(frozen=True)
class SourceModel:
    entry: FileEntry  # the file llama.cpp is given (the first part of a split GGUF)
    parts: tuple[FileEntry, ...]  # every file llama.cpp reads
    file_type: str | None  # F32, F16, BF16, a quantized type, or None when unknown

    @property
    def size(self) -> int:
        return sum(p.size for p in self.parts)


@dataclass(frozen=True)
class QuantizeResult:
    source: SourceModel
    outputs: list[FileEntry]
    metadata: BundleMetadata  # as written
    previous_version: int
    stale_signatures: list[str]  # signature files that covered the old sovpack.json
    seconds: dict[str, float]  # time llama.cpp took, per type


def parse_types(names: list[str]) -> list[str]:
    """Canonical type names in the order given, duplicates dropped; UsageError names a bad one."""
    if not names:
        raise UsageError(f"give at least one --type; valid types: {', '.join(QUANT_TYPES)}")
    chosen: list[str] = []
    for name in names:
        canonical = name.strip().upper()
        if canonical not in QUANT_TYPES:
            hint = " (IQ types need an importance matrix, which sovpack does not take)" if canonical.startswith("IQ") else ""
            raise UsageError(
                f"--type {name!r} is not a quantization type sovpack offers{hint}; "
                f"valid types (case-insensitive): {', '.join(QUANT_TYPES)}"
            )
        if canonical not in chosen:
            chosen.append(canonical)
    return chosen


def output_path_for(source_path: str, qtype: str) -> str:
    """`gguf/Model-F16.gguf` -> `gguf/Model-Q4_K_M.gguf`; a split's `-00001-of-00003` goes too."""
    path = PurePosixPath(source_path)
    split = split_of(path.name)
    if split:
        stem = split.stem
    else:
        stem = path.name[:-5] if path.name.lower().endswith(".gguf") else path.stem
    stem = _TYPE_SUFFIX.sub("", stem) or "model"
    return str(path.with_name(f"{stem}-{qtype}.gguf"))


def estimate_output_size(source: SourceModel) -> int:
    """An upper bound on one output's size, for the free-space check."""
    bits = _SOURCE_BITS.get(source.file_type or "")
    if bits is None:
        return source.size
    return min(source.size, int(source.size * (_MAX_BITS_PER_WEIGHT / bits + 0.02)) + _SPACE_MARGIN)


# --- choosing and checking the source --------------------------------------------------


def gguf_file_type(entry: FileEntry) -> str | None:
    """The recorded `general.file_type`, or F32/F16/BF16 read off the tensor types when it is absent."""
    details = entry.details or {}
    if details.get("file_type") in FILE_TYPES.values():
        return details["file_type"]
    types = set(details.get("tensor_types") or {})
    if types and types <= UNQUANTIZED_FILE_TYPES:
        return "F16" if "F16" in types else "BF16" if "BF16" in types else "F32"
    return None


def _split(entry: FileEntry) -> tuple[int, int]:
    split = (entry.details or {}).get("split") or {}
    return split.get("index") or 0, split.get("count") or 1


def choose_source(metadata: BundleMetadata, source: str | None) -> SourceModel:
    if source is not None:
        return _named_source(metadata, source)
    ggufs = [f for f in metadata.files if f.format == "gguf" and _split(f)[0] == 0]
    candidates = [f for f in ggufs if gguf_file_type(f) in UNQUANTIZED_FILE_TYPES]
    if len(candidates) == 1:
        return _source_model(metadata, candidates[0])
    if candidates:
        raise UsageError(
            f"the bundle holds {len(candidates)} F32/F16/BF16 GGUF files ({_describe(candidates)}); choose one with --source"
        )
    if not ggufs:
        raise UsageError(
            "the bundle holds no GGUF file to quantize; add the publisher's F16, BF16 or F32 GGUF to it first "
            "(sovpack fetch --gguf, or pack a directory that holds it)"
        )
    raise UsageError(
        f"the bundle holds no F32, F16 or BF16 GGUF to quantize from (it has {_describe(ggufs)}); "
        "to quantize an already quantized file anyway, pass --source FILE --allow-requantize"
    )


def _named_source(metadata: BundleMetadata, source: str) -> SourceModel:
    entry = metadata.file(source.removeprefix("./"))
    if entry is None:
        listed = [f for f in metadata.files if f.format == "gguf"]
        have = f"its GGUF files are {_describe(listed)}" if listed else "it holds no GGUF file"
        raise UsageError(f"--source {source}: no such file in the bundle's inventory ({have}); give the path inside the bundle")
    if entry.format != "gguf":
        raise UsageError(
            f"--source {source} is not a GGUF file (the inventory records its format as {entry.format}); "
            "quantize reads GGUF files"
        )
    number, count = _split(entry)
    if number != 0:
        raise UsageError(f"--source {source} is part {number + 1} of a GGUF split into {count} files; give its first part")
    return _source_model(metadata, entry)


def _source_model(metadata: BundleMetadata, entry: FileEntry) -> SourceModel:
    _, count = _split(entry)
    if count == 1:
        return SourceModel(entry, (entry,), gguf_file_type(entry))
    split = split_of(entry.path)
    if not split or not split.is_first or split.count != count:
        raise Refused(
            f"{entry.path} is the first of {count} split GGUF parts, but its name does not end in -00001-of-{count:05d}.gguf, "
            "so llama.cpp cannot find the other parts"
        )
    parts, missing = listed_parts(metadata, split)
    if missing:
        raise Refused(f"{entry.path} is split into {count} parts, but the bundle's inventory lacks {', '.join(missing)}")
    return SourceModel(entry, parts, gguf_file_type(entry))


def _describe(entries: list[FileEntry]) -> str:
    return ", ".join(f"{f.path} ({gguf_file_type(f) or 'unknown type'})" for f in entries)


def check_precision(source: SourceModel, allow_requantize: bool) -> None:
    if source.file_type in UNQUANTIZED_FILE_TYPES or allow_requantize:
        return
    if source.file_type:
        what = f"already quantized ({source.file_type})"
    else:
        what = "of unknown precision (no general.file_type, and not all tensors F32/F16/BF16)"
    raise Refused(
        f"{source.entry.path} is {what}: quantizing it again rounds weights that were already rounded, so the errors of "
        "both steps add up and the result is worse than the same type made from the F16/BF16/F32 original; quantize "
        "from the original, or pass --allow-requantize to accept the loss"
    )


def _check_source_bytes(root: Path, metadata: BundleMetadata, source: SourceModel, progress: Progress) -> None:
    """Every byte llama.cpp will read must match the inventory; the headers must still parse."""
    progress.phase(f"checking {source.entry.path} against the inventory", source.size)
    try:
        check_digests(root, metadata, [p.path for p in source.parts], on_progress=progress.advance)
    except Refused as e:
        raise Refused(f"refusing to quantize: {e}; sovpack quantizes only bytes that match the bundle's inventory") from None
    for part in source.parts:
        inspect_file(root / part.path, part.path, "gguf")


def _file_identity(root: Path, source: SourceModel) -> list[tuple[int, int, int]]:
    identities = []
    for part in source.parts:
        st = (root / part.path).stat()
        identities.append((st.st_ino, st.st_size, st.st_mtime_ns))
    return identities


# --- the bundle-level operation ---------------------------------------------------------


def quantize_bundle(
    root: Path,
    types: list[str],
    *,
    source: str | None = None,
    threads: int | None = None,
    allow_requantize: bool = False,
    version: int | None = None,
    progress: Progress | None = None,
) -> QuantizeResult:
    """Quantize one GGUF of the bundle at `root` to every type in `types`, all or nothing.

    `version`: the bundle's new version (default: unchanged, or one up if it was signed).
    `progress` gets a phase per step: checking the source (bytes), quantizing (tensors), hashing.
    Raises: UsageError (a type, the source, the version), Refused (the source does not match the
    inventory, is already quantized, changed meanwhile; llama.cpp refused), Failure (llama.cpp
    missing, disk full, another quantize running).
    """
    progress = progress or Progress()
    types = parse_types(types)
    if threads is not None and threads < 1:
        raise UsageError(f"--threads must be 1 or more, got {threads}")
    require_bundle_dir(root)
    require_llama_cpp()
    root = root.resolve()
    with WorkDir(root) as work:
        metadata = read_metadata(root)
        tree = scan_tree(root)
        new_version = choose_version(metadata.version, version, signed=bool(tree.signatures))
        try:
            check_inventory(metadata, tree, root)
        except Refused as e:
            raise Refused(f"refusing to quantize: {e}") from None
        model = choose_source(metadata, source)
        check_precision(model, allow_requantize)
        targets = _plan_outputs(root, metadata, model, types)
        work.check_free_space(estimate_output_size(model) * len(types), model.entry.path)
        identity = _file_identity(root, model)  # before its bytes are checked: a file swapped after the check is caught
        _check_source_bytes(root, metadata, model, progress)
        builder = _Builder(root, work, metadata, model, threads or cpu_count(), allow_requantize, progress)
        built = builder.build_all(targets, identity)
        updated = _updated_metadata(metadata, [b.entry for b in built], new_version)
        work.commit(built, updated)
    return QuantizeResult(model, [b.entry for b in built], updated, metadata.version, tree.signatures, builder.seconds)


def _plan_outputs(root: Path, metadata: BundleMetadata, source: SourceModel, types: list[str]) -> list[tuple[str, str]]:
    targets = [(qtype, output_path_for(source.entry.path, qtype)) for qtype in types]
    for qtype, rel in targets:
        if metadata.file(rel) is not None or (root / rel).exists():  # an unlisted directory passes check_inventory
            raise UsageError(
                f"{rel} is already in the bundle; sovpack will not replace a file of the inventory "
                f"(to rebuild {qtype}, start from a bundle without it)"
            )
    check_inventory_paths([f.path for f in metadata.files] + [rel for _, rel in targets])
    return targets


def choose_version(current: int, requested: int | None, *, signed: bool) -> int:
    """The version the changed bundle gets: as requested (not lower), else one up if it was signed.

    A signed bundle may already have been exported, and the store on the secure side refuses a
    bundle whose version is not higher than the installed one; nothing else can raise the
    version of an existing bundle later.
    """
    if requested is None:
        return current + 1 if signed else current
    if requested < current:
        raise UsageError(f"--version {requested} is lower than the bundle's current version {current}; versions only go up")
    return requested


def _updated_metadata(metadata: BundleMetadata, entries: list[FileEntry], version: int) -> BundleMetadata:
    if version == metadata.version:
        return dataclasses.replace(metadata, files=metadata.files + entries)
    # a new version is a new release of the bundle, created now
    return dataclasses.replace(metadata, files=metadata.files + entries, version=version, created=datetime.now(timezone.utc))


@dataclass(frozen=True)
class BuiltFile:
    entry: FileEntry
    partial: Path  # where it waits, outside the bundle, until the commit


@dataclass
class _Builder:
    """Builds every requested output from one source into the work directory."""

    root: Path
    work: WorkDir
    metadata: BundleMetadata
    source: SourceModel
    threads: int
    allow_requantize: bool
    progress: Progress
    seconds: dict[str, float] = dataclasses.field(default_factory=dict)

    def build_all(self, targets: list[tuple[str, str]], identity: list[tuple[int, int, int]]) -> list[BuiltFile]:
        """Every output, from a source whose file identity must still be `identity` (as its bytes were checked) at the end."""
        built = [self.build(qtype, rel) for qtype, rel in targets]
        if _file_identity(self.root, self.source) != identity:
            raise Refused(
                f"{self.source.entry.path} changed on disk while it was being quantized; nothing was added to the bundle"
            )
        return built

    def build(self, qtype: str, rel: str) -> BuiltFile:
        started = time.monotonic()
        partial = self.work.partial_path(rel)
        self.progress.phase(f"quantizing {rel}", unit="tensors")
        tensors = _TensorCount(self.progress)
        run = run_llama_quantize(
            self.root / self.source.entry.path,
            partial,
            qtype,
            ftype=LLAMA_FTYPES[qtype],
            threads=self.threads,
            allow_requantize=self.allow_requantize,
            name=self.source.entry.path,
            on_tensor=tensors.update,
        )
        fsync_path(partial)
        self.progress.phase(f"hashing {rel}")
        digest = digest_file(partial, self.metadata.shard_size)
        entry = file_entry(partial, rel, digest, _provenance(self.source, qtype, run))
        written = (entry.details or {}).get("file_type")
        if written != qtype:
            raise Failure(
                f"llama.cpp wrote {rel} with file type {written}, not the {qtype} asked for; nothing was added to the bundle"
            )
        self.seconds[qtype] = time.monotonic() - started
        return BuiltFile(entry, partial)


class _TensorCount:
    """llama.cpp's "tensor i of n" lines, as progress in the current phase."""

    def __init__(self, progress: Progress):
        self.progress, self.done, self.total = progress, 0, 0

    def update(self, done: int, total: int) -> None:
        if total != self.total:
            self.total = total
            self.progress.set_total(total)
        if done > self.done:
            self.progress.advance(done - self.done)
            self.done = done


def _provenance(source: SourceModel, qtype: str, run: QuantizerRun) -> dict:
    provenance = {
        "type": "quantized",
        "input": source.entry.path,
        "input_sha256": source.entry.sha256,
        "input_file_type": source.file_type,
        "input_source": source.entry.source,  # the input's own provenance, kept if the input is later left out
        "quantization": qtype,
        **run.versions,
        "options": run.options,
        "quantized_by": f"sovpack {__version__}",
    }
    if len(source.parts) > 1:
        provenance["input_parts"] = [{"path": p.path, "sha256": p.sha256, "size": p.size} for p in source.parts]
    return provenance


def require_llama_cpp() -> None:
    if find_spec("llama_cpp") is None:
        raise Failure(
            "quantize needs llama-cpp-python, which is not installed here: install sovpack's llama extra "
            "(pip install 'sovpack[llama]'; it compiles llama.cpp, about 5 minutes)"
        )


# --- the work directory beside the bundle -------------------------------------------------


class WorkDir:
    """`.<bundle>.sovpack-quantize/` next to the bundle: a lock, partial outputs and the commit journal.

    Holding the lock (flock, released by the kernel when the process dies) means any other
    file found here is left over from a run that was killed, and can go.
    """

    LOCK, JOURNAL = "lock", "commit.json"

    def __init__(self, root: Path):
        self.root = root
        self.path = root.parent / f".{root.name}.sovpack-quantize"
        self._lock_fd: int | None = None

    def __enter__(self) -> WorkDir:
        try:
            self.path.mkdir(mode=0o700, exist_ok=True)
        except OSError as e:
            raise Failure(f"cannot create the work directory {self.path} beside the bundle: {e.strerror}") from None
        if os.stat(self.path).st_dev != os.stat(self.root).st_dev:
            raise Failure(
                f"{self.path} is on another filesystem than the bundle {self.root} (is the bundle a mount point?); "
                "quantize needs to rename its outputs into the bundle, so move the bundle into a plain directory"
            )
        self._lock()
        try:
            self._recover()
        except BaseException:
            os.close(self._lock_fd)
            raise
        return self

    def __exit__(self, *exc) -> None:
        for name in os.listdir(self.path):
            if name not in (self.LOCK, self.JOURNAL):  # a journal left here means a roll-back still to do
                (self.path / name).unlink(missing_ok=True)
        if not (self.path / self.JOURNAL).exists():
            (self.path / self.LOCK).unlink(missing_ok=True)
        os.close(self._lock_fd)
        try:
            self.path.rmdir()
        except OSError:
            pass  # not empty, or another run has just created its lock here

    def _lock(self) -> None:
        lock_path = self.path / self.LOCK
        while True:
            fd = try_lock(lock_path, 0o600)
            if fd is None:
                raise Failure(f"another sovpack quantize is running on {self.root} (it holds {lock_path}); wait for it to finish")
            try:
                same = os.fstat(fd).st_ino == os.stat(lock_path).st_ino
            except FileNotFoundError:
                same = False
            if same:  # not a lock file the previous holder unlinked while we waited
                self._lock_fd = fd
                return
            os.close(fd)

    def _recover(self) -> None:
        """Roll back a commit that a killed run left half-done, then drop its leftovers."""
        self._roll_back(self.path / self.JOURNAL)
        for name in os.listdir(self.path):
            if name != self.LOCK:
                (self.path / name).unlink(missing_ok=True)

    def _roll_back(self, journal: Path) -> None:
        """Remove outputs the journal names that reached the bundle while sovpack.json does not list them."""
        if not journal.exists():
            return
        listed = {f.path for f in read_metadata(self.root).files}
        try:
            outputs = json.loads(journal.read_text())["outputs"]
        except (ValueError, KeyError, TypeError):
            raise Failure(
                f"cannot read {journal}, left by an interrupted quantize of {self.root}: check that every file "
                f"of the bundle is listed in its sovpack.json, then delete {self.path}"
            ) from None
        for item in outputs:
            target = self.root / item["path"]
            if item["path"] in listed or not target.is_file() or target.stat().st_size != item["size"]:
                continue
            if sha256_file(target) == item["sha256"]:
                target.unlink()
        journal.unlink()

    def partial_path(self, rel: str) -> Path:
        return self.path / (rel.replace("/", "%") + ".partial")

    def check_free_space(self, needed: int, source: str) -> None:
        require_free_space(
            self.path,
            needed + (1 << 20),  # and room for the new sovpack.json
            lambda free: (
                f"not enough free disk space to quantize {source}: the output(s) may need up to {human_size(needed)} "
                f"on the filesystem holding {self.root}, which has {human_size(free)} free; nothing was changed"
            ),
        )

    def commit(self, built: list[BuiltFile], metadata: BundleMetadata) -> None:
        """Move the outputs in and rewrite sovpack.json; the journal lets the next run undo a half-done commit."""
        journal = {"outputs": [{"path": b.entry.path, "size": b.entry.size, "sha256": b.entry.sha256} for b in built]}
        journal_path = self.path / self.JOURNAL
        write_atomically(journal_path, json.dumps(journal).encode())  # the file and the directory naming it
        try:
            with _interrupts_deferred():
                for b in built:
                    target = self.root / b.entry.path
                    if target.exists():
                        raise Refused(f"{b.entry.path} appeared in the bundle while quantizing; nothing was added")
                    os.replace(b.partial, target)
                write_metadata(self.root, metadata)
                for directory in {(self.root / b.entry.path).parent for b in built} | {self.root}:
                    fsync_dir(directory)
        except BaseException:
            self._roll_back(journal_path)
            raise
        journal_path.unlink()


@contextmanager
def _interrupts_deferred() -> Iterator[None]:
    """Hold Ctrl-C and SIGTERM for the few milliseconds of the commit; the run then completes normally."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
