"""What to fetch: from the command line (`REPO[@REV]`, `--include`, `--gguf REPO[@REV]:GLOB`) or a TOML spec.

Both produce the same `FetchRequest`. The spec format is documented in docs/fetch.md:

    spec_version = 1

    [bundle]
    name = "mistral-7b-instruct-v0.3"
    version = 1
    expires = "365d"                  # optional: 90d, 2027-01-01 or 2027-01-01T00:00:00Z

    [model]
    repo = "mistralai/Mistral-7B-Instruct-v0.3"
    revision = "<40-hex commit>"      # specs pin commits
    include = []                      # optional; empty = the default selection
    exclude = []                      # optional

    [[gguf]]                          # optional, repeatable
    repo = "bartowski/Mistral-7B-Instruct-v0.3-GGUF"
    revision = "<40-hex commit>"
    files = ["*Q4_K_M.gguf"]
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

from sovpack.bundle.metadata import check_name, parse_expiry
from sovpack.errors import UsageError
from sovpack.fetch.hub import COMMIT_RE, check_repo_id

SPEC_VERSION = 1
DEFAULT_REVISION = "main"
_REVISION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,254}$")
_BAD_GLOB_CHARS = re.compile(r"[\x00-\x1f\x7f\\]")


@dataclass(frozen=True)
class RepoSelection:
    """One repository at one revision, and which of its files to take."""

    repo: str
    revision: str  # as asked: branch, tag or commit
    role: str  # "model" (the original weights and their files) or "gguf" (GGUF builds)
    include: tuple[str, ...] = ()  # globs; for the model, empty means the default selection
    exclude: tuple[str, ...] = ()


@dataclass(frozen=True)
class FetchRequest:
    model: RepoSelection
    ggufs: tuple[RepoSelection, ...] = ()
    name: str | None = None  # default: the model repository's name
    version: int = 1
    expires: str | None = None
    spec: Path | None = None  # the spec file it was read from, if any

    @property
    def selections(self) -> tuple[RepoSelection, ...]:
        return (self.model, *self.ggufs)


def check_revision(revision: str, what: str) -> str:
    if not _REVISION_RE.match(revision) or ".." in revision or revision.endswith(("/", ".lock")):
        raise UsageError(f"{what}: {revision!r} is not a valid branch, tag or commit name")
    return revision


def check_glob(pattern: str, what: str) -> str:
    """A glob as fnmatch reads it; refuse what would silently match something other than intended."""
    if not isinstance(pattern, str) or not pattern.strip():
        raise UsageError(f"{what}: empty pattern")
    if pattern.startswith("/") or _BAD_GLOB_CHARS.search(pattern):
        raise UsageError(f"{what} {pattern!r}: patterns are relative paths inside the repository, with '/' as separator")
    depth = 0
    for ch in pattern:
        if ch == "[":
            depth += 1
        elif ch == "]" and depth:
            depth -= 1
    if depth:
        raise UsageError(f"{what} {pattern!r}: unbalanced '[' (write [[] for a literal bracket)")
    return pattern


def parse_repo_ref(text: str, what: str) -> tuple[str, str]:
    """`org/name` or `org/name@revision`."""
    repo, sep, revision = text.partition("@")
    if sep and not revision:
        raise UsageError(f"{what} {text!r}: nothing after '@' (give a branch, tag or commit)")
    check_repo_id(repo, what)
    return repo, check_revision(revision or DEFAULT_REVISION, what)


def parse_gguf_option(text: str) -> RepoSelection:
    """`--gguf REPO[@REV]:GLOB`."""
    ref, sep, glob = text.partition(":")
    if not sep or not glob:
        raise UsageError(f"--gguf {text!r}: write REPO[@REV]:GLOB, for example bartowski/X-GGUF:*Q4_K_M*.gguf")
    repo, revision = parse_repo_ref(ref, "--gguf")
    return RepoSelection(repo, revision, "gguf", (check_glob(glob, "--gguf"),))


def request_from_args(
    repo: str,
    include: list[str] | None = None,
    exclude: list[str] | None = None,
    gguf: list[str] | None = None,
    *,
    name: str | None = None,
    version: int | None = None,
    expires: str | None = None,
) -> FetchRequest:
    model_repo, revision = parse_repo_ref(repo, "REPO")
    model = RepoSelection(
        model_repo,
        revision,
        "model",
        tuple(check_glob(p, "--include") for p in include or ()),
        tuple(check_glob(p, "--exclude") for p in exclude or ()),
    )
    request = FetchRequest(model, tuple(parse_gguf_option(g) for g in gguf or ()))
    return with_overrides(request, name=name, version=version, expires=expires)


def with_overrides(request: FetchRequest, *, name: str | None, version: int | None, expires: str | None) -> FetchRequest:
    """Command-line --name/--version/--expires win over the spec's values."""
    if version is not None and version < 1:
        raise UsageError(f"--version must be 1 or more, got {version}")
    return replace(
        request,
        name=name if name is not None else request.name,
        version=version if version is not None else request.version,
        expires=expires if expires is not None else request.expires,
    )


# ---------------------------------------------------------------------- TOML specs


class _Table:
    """One TOML table of a spec, with errors that name the file and the key."""

    def __init__(self, data: object, where: str, spec: Path, allowed: set[str]):
        self.spec, self.where = spec, where
        if not isinstance(data, dict):
            raise self.error(f"{where} must be a table")
        unknown = sorted(set(data) - allowed)
        if unknown:
            raise self.error(f"{where} has unknown key(s) {', '.join(unknown)} (allowed: {', '.join(sorted(allowed))})")
        self.data = data

    def error(self, message: str) -> UsageError:
        return UsageError(f"spec {self.spec}: {message}")

    def get(self, key: str, kind: type, default=None, *, required: bool = False):
        if key not in self.data:
            if required:
                raise self.error(f"{self.where} needs {key!r}")
            return default
        value = self.data[key]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise self.error(f"{self.where}.{key} must be a {kind.__name__}, found {value!r}")
        return value

    def globs(self, key: str) -> tuple[str, ...]:
        values = self.get(key, list, [])
        if not all(isinstance(v, str) for v in values):
            raise self.error(f"{self.where}.{key} must be a list of strings")
        return tuple(check_glob(v, f"spec {self.spec}: {self.where}.{key}") for v in values)

    def pinned(self) -> tuple[str, str]:
        repo = check_repo_id(self.get("repo", str, required=True), f"spec {self.spec}: {self.where}.repo")
        revision = self.get("revision", str, required=True)
        if not COMMIT_RE.match(revision):
            raise self.error(
                f"{self.where}.revision {revision!r} is not a full 40-hex commit: specs pin commits so that the same "
                f"spec always fetches the same bytes (`sovpack fetch {repo}@{revision} --dry-run` shows the commit it "
                "resolves to today)"
            )
        return repo, revision


def load_spec(path: Path) -> FetchRequest:
    """Read and validate a spec.

    Raises: UsageError for every problem, naming the file and key.
    """
    import tomllib

    try:
        raw = path.read_bytes()
    except OSError as e:
        raise UsageError(f"cannot read spec {path}: {e.strerror}") from None
    try:
        document = tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise UsageError(f"spec {path} is not valid TOML: {e}") from None
    return parse_spec(document, path)


def parse_spec(document: dict, path: Path) -> FetchRequest:
    top = _Table(document, "the top level", path, {"spec_version", "bundle", "model", "gguf"})
    if top.get("spec_version", int, required=True) != SPEC_VERSION:
        raise top.error(f"spec_version {document['spec_version']} is not supported (this sovpack reads version {SPEC_VERSION})")
    bundle = _Table(top.get("bundle", dict, required=True), "[bundle]", path, {"name", "version", "expires"})
    model_table = _Table(top.get("model", dict, required=True), "[model]", path, {"repo", "revision", "include", "exclude"})
    repo, revision = model_table.pinned()
    model = RepoSelection(repo, revision, "model", model_table.globs("include"), model_table.globs("exclude"))
    ggufs = []
    for i, item in enumerate(top.get("gguf", list, [])):
        table = _Table(item, f"[[gguf]] #{i + 1}", path, {"repo", "revision", "files"})
        gguf_repo, gguf_revision = table.pinned()
        files = table.globs("files")
        if not files:
            raise table.error(f'[[gguf]] #{i + 1} needs files = ["GLOB", ...]')
        ggufs.append(RepoSelection(gguf_repo, gguf_revision, "gguf", files))
    version = bundle.get("version", int, 1)
    if version < 1:
        raise bundle.error("[bundle].version must be 1 or more")
    name = bundle.get("name", str, required=True)
    expires = bundle.get("expires", str)
    try:
        check_name(name, UsageError)
    except UsageError as e:
        raise bundle.error(f"[bundle].name: {e}") from None
    try:
        parse_expiry(expires, datetime.now(timezone.utc))
    except UsageError as e:
        raise bundle.error(f"[bundle].expires {expires!r}: {str(e).split(': ', 1)[1]}") from None  # the advice, without --expires
    return FetchRequest(model=model, ggufs=tuple(ggufs), name=name, version=version, expires=expires, spec=path)
