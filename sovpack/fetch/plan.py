"""Which files a fetch takes: the default selection, globs, GGUF builds, and the checks made before any download.

The selection functions are pure (paths in, paths out); `make_plan` asks the Hub for the resolved
commits and file lists, applies them, and refuses what must be refused before a byte is downloaded.
Rules (docs/fetch.md):

- Globs are matched with fnmatch against the whole path inside the repository, case-insensitively;
  `*` also matches '/', and a pattern ending in '/' matches everything under that folder.
- The default selection of the model repository takes top-level files only: safetensors weights and
  their index, config and generation config, tokenizer files, chat templates, licence and notice
  files, the README (model card). `consolidated*.safetensors` (Mistral's native-format copy of the
  same weights) is left out when transformers-format weights are there. `--include` replaces the
  default selection; `--exclude` removes from whichever selection applies.
- Files named as pickle-based weights (.bin, .pt, .pth, .ckpt, .pkl, .pickle, .joblib) are never
  selected, and a repository whose weights are only such files is refused before any download:
  a courtesy, so as not to download what the gate would refuse. What decides is the file-kind
  gate (formats/gate.py), which every downloaded file passes by its bytes: a pickle under any
  other name, or a file of a kind sovpack cannot check, is refused after its download.
- `--gguf REPO:GLOB` takes the `.gguf` files matching GLOB; a split GGUF (`X-00001-of-00003.gguf`)
  is always taken whole.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field

from sovpack.bundle.gguf_parts import split_of
from sovpack.bundle.metadata import RESERVED_NAMES
from sovpack.common.safepath import case_collisions, unsafe_reason
from sovpack.errors import Refused, UsageError
from sovpack.fetch.hub import Hub, RemoteFile, Snapshot
from sovpack.fetch.spec import FetchRequest, RepoSelection
from sovpack.formats.pickle import pickle_suffix

WEIGHT_SUFFIXES = (".safetensors", ".gguf")
WORK_DIR = ".sovpack-fetch"  # fetch's own bookkeeping inside the staging directory

DEFAULT_SELECTION = (
    "*.safetensors",
    "*.safetensors.index.json",
    "config.json",
    "generation_config.json",
    "params.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "tokenizer.model",
    "tokenizer.model.v*",
    "spiece.model",
    "tekken.json",
    "*.tiktoken",
    "chat_template.json",
    "chat_template*.jinja",
    "license*",
    "licence*",
    "notice*",
    "use_policy*",
    "copying*",
    "readme.md",
)

_CONSOLIDATED = re.compile(r"^consolidated(\.\d+)?\.safetensors$", re.IGNORECASE)


def matches(path: str, pattern: str) -> bool:
    path, pattern = path.lower(), pattern.lower()
    if pattern.endswith("/"):
        return path.startswith(pattern) or fnmatch.fnmatchcase(path, pattern + "*")
    return fnmatch.fnmatchcase(path, pattern)


def is_pickle_name(path: str) -> bool:
    """Named as pickle-based weights: left out before downloading (the gate checks the bytes of everything else)."""
    return pickle_suffix(path) is not None


def is_weights(path: str) -> bool:
    return path.lower().endswith(WEIGHT_SUFFIXES)


@dataclass(frozen=True)
class Skipped:
    repo: str
    path: str
    reason: str


@dataclass
class Selection:
    paths: list[str]
    skipped: list[Skipped] = field(default_factory=list)
    unmatched: list[str] = field(default_factory=list)  # include globs that matched nothing


def select_model_files(repo: str, paths: list[str], include: tuple[str, ...], exclude: tuple[str, ...]) -> Selection:
    """The files of the model repository to fetch (pure: no network)."""
    skipped: list[Skipped] = []
    if include:
        chosen = {p for p in paths if any(matches(p, g) for g in include)}
        unmatched = [g for g in include if not any(matches(p, g) for p in paths)]
    else:
        chosen = {p for p in paths if "/" not in p and any(matches(p, g) for g in DEFAULT_SELECTION)}
        unmatched = []
        hf_weights = [p for p in chosen if p.endswith(".safetensors") and not _CONSOLIDATED.match(p)]
        if hf_weights:
            for p in sorted(p for p in chosen if _CONSOLIDATED.match(p)):
                chosen.discard(p)
                skipped.append(Skipped(repo, p, "Mistral native-format copy of the safetensors weights (take it with --include)"))
    for p in sorted(p for p in chosen if any(matches(p, g) for g in exclude)):
        chosen.discard(p)
        skipped.append(Skipped(repo, p, "excluded"))
    for p in sorted(p for p in chosen if is_pickle_name(p)):
        chosen.discard(p)
        skipped.append(Skipped(repo, p, "pickle-based file, never fetched"))
    return Selection(sorted(chosen), skipped, unmatched)


def select_gguf_files(repo: str, paths: list[str], globs: tuple[str, ...]) -> Selection:
    """The .gguf files matching `globs`, each split GGUF completed with all its parts (pure)."""
    ggufs = [p for p in paths if p.lower().endswith(".gguf")]
    chosen = {p for p in ggufs if any(matches(p, g) for g in globs)}
    unmatched = [g for g in globs if not any(matches(p, g) for p in ggufs)]
    present = {p.lower(): p for p in ggufs}
    for p in sorted(chosen):
        split = split_of(p)
        if not split:
            continue
        parts = split.part_paths()
        missing = [q for q in parts if q.lower() not in present]
        if missing:
            raise Refused(f"split GGUF {split.stem} in {repo} is incomplete: {', '.join(missing)} missing")
        chosen.update(present[q.lower()] for q in parts)
    return Selection(sorted(chosen), [], unmatched)


@dataclass
class Plan:
    """What a fetch will take: resolved repositories, the files, what was left out."""

    snapshots: list[tuple[RepoSelection, Snapshot]]
    files: list[RemoteFile]  # each lands in the bundle at its path in the repository
    skipped: list[Skipped]
    endpoint: str

    @property
    def total_size(self) -> int:
        return sum(f.size for f in self.files)

    def sources(self) -> list[dict]:
        """The top-level `sources` of sovpack.json (docs/fetch.md)."""
        return [
            {
                "type": "hub",
                "endpoint": self.endpoint,
                "repo": sel.repo,
                "revision": sel.revision,
                "commit": snap.commit,
                "role": sel.role,
                "include": list(sel.include),
                "exclude": list(sel.exclude),
            }
            for sel, snap in self.snapshots
        ]


def make_plan(request: FetchRequest, hub: Hub) -> Plan:
    """Resolve every repository, select the files, and refuse bad selections before downloading."""
    resolved: dict[tuple[str, str], Snapshot] = {}
    snapshots = []
    for sel in request.selections:
        key = (sel.repo, sel.revision)
        if key not in resolved:
            resolved[key] = hub.snapshot(sel.repo, sel.revision)
        snapshots.append((sel, resolved[key]))

    chosen: list[RemoteFile] = []
    skipped: list[Skipped] = []
    model_sel, model_snap = snapshots[0]
    model = select_model_files(model_sel.repo, sorted(model_snap.files), model_sel.include, model_sel.exclude)
    _refuse_unmatched(request, model_sel, model_snap, model.unmatched)
    chosen += [model_snap.files[p] for p in model.paths]
    skipped += model.skipped
    for sel, snap in snapshots[1:]:
        gguf = select_gguf_files(sel.repo, sorted(snap.files), sel.include)
        _refuse_unmatched(request, sel, snap, gguf.unmatched)
        chosen += [snap.files[p] for p in gguf.paths]

    files = _merge(chosen)
    _check_weights(request, model_snap, files)
    _check_paths(files)
    for snap in resolved.values():
        first = next((f for f in files if f.repo == snap.repo and f.commit == snap.commit), None)
        if first is not None:
            hub.check_access(first)
    return Plan(snapshots, files, skipped, hub.endpoint)


def _refuse_unmatched(request: FetchRequest, sel: RepoSelection, snap: Snapshot, unmatched: list[str]) -> None:
    if not unmatched:
        return
    if request.spec is not None:
        what = f"spec {request.spec}: {'[model].include' if sel.role == 'model' else '[[gguf]] files'}"
    else:
        what = "--include" if sel.role == "model" else f"--gguf {sel.repo}:"
    kind = "GGUF file" if sel.role == "gguf" else "file"
    patterns = ", ".join(repr(g) for g in unmatched)
    raise UsageError(f"{what} {patterns} matches no {kind} in {sel.repo}@{sel.revision} (commit {snap.commit})")


def _merge(chosen: list[RemoteFile]) -> list[RemoteFile]:
    """One file per bundle path: the same file asked twice is taken once; two different ones collide."""
    by_path: dict[str, RemoteFile] = {}
    for f in chosen:
        other = by_path.get(f.path)
        if other is None or (other.repo, other.commit) == (f.repo, f.commit):
            by_path[f.path] = f
            continue
        raise UsageError(
            f"{f.path} is selected from both {other.repo}@{other.commit[:12]} and {f.repo}@{f.commit[:12]}; "
            "a bundle holds one file per path: narrow one of the selections"
        )
    return [by_path[p] for p in sorted(by_path)]


def _check_weights(request: FetchRequest, model: Snapshot, files: list[RemoteFile]) -> None:
    if any(is_weights(f.path) for f in files):
        return
    pickles = sorted(p for p in model.files if is_pickle_name(p))
    if pickles and not any(is_weights(p) for p in model.files):
        shown = ", ".join(pickles[:3]) + (f" and {len(pickles) - 3} more" if len(pickles) > 3 else "")
        raise Refused(
            f"{model.repo}@{model.commit[:12]} publishes its weights only as pickle-based files ({shown}); sovpack "
            "refuses pickles, which can run arbitrary code when loaded. Nothing was downloaded. Fetch a safetensors "
            "or GGUF build instead (a converted repository, or --gguf REPO:GLOB)"
        )
    if request.model.include:
        return  # the operator chose the files explicitly: a bundle without weights is what was asked
    if not files:
        raise UsageError(
            f"the default selection takes no file from {model.repo}@{model.commit[:12]}: choose files with --include"
        )
    ggufs = sorted(p for p in model.files if p.lower().endswith(".gguf"))
    hint = (
        f" It holds GGUF files ({', '.join(ggufs[:3])}{', ...' if len(ggufs) > 3 else ''}): choose them with --include GLOB."
        if ggufs
        else ""
    )
    raise UsageError(f"the default selection finds no safetensors weights at the top of {model.repo}@{model.commit[:12]}.{hint}")


def _check_paths(files: list[RemoteFile]) -> None:
    for f in files:
        reason = unsafe_reason(f.path)
        if reason:
            raise Refused(f"{f.where} cannot go into a bundle: unsafe path ({reason})")
        if f.path.split("/")[0] in (*RESERVED_NAMES, WORK_DIR):
            raise Refused(f"{f.where} cannot go into a bundle: {f.path.split('/')[0]} is a name reserved for sovpack's own files")
    by_path = {f.path: f for f in files}
    for a, b in case_collisions(list(by_path)):
        raise Refused(
            f"{by_path[a].where} and {by_path[b].where} differ only by case and cannot both go into a bundle: they would "
            "collide on FAT32/NTFS media. Nothing was downloaded; leave one out with --exclude, or narrow the --gguf GLOB"
        )
