"""The file-kind gate: every file in a bundle is of a kind sovpack can check, decided by its bytes.

Allowed kinds, and how each is recognised (docs/bundle-format.md, "Allowed file kinds"):

    safetensors    8-byte header length, then a JSON header: validated in full (formats/safetensors.py)
    gguf           magic GGUF: header, metadata and tensor table validated (formats/gguf.py)
    sentencepiece  a protobuf ModelProto, walked field by field (formats/sentencepiece.py)
    image          PNG, JPEG, GIF or WebP by magic, walked to its end marker (formats/images.py)
    json, jinja, text
                   UTF-8 text without control characters (formats/text.py); JSON when the bounded
                   loader reads it as an object or array, Jinja when the (text) file is a chat template
    wheel          a Python wheel: a zip with one *.dist-info/ holding a valid WHEEL and RECORD
                   (formats/wheel.py); only under an allowance

Before any of these, the bytes are searched for a pickle (formats/pickle.py): a pickle is
refused whatever the file's name, kind or allowance (the one exception below). A file of no
allowed kind is refused, naming what it looks like, unless an operator allowance (`pack
--allow-file GLOB`, recorded in the signed sovpack.json) matches its path: then it is carried
as `other`, still pickle-checked. The name never lets a file through: it only chooses between
json/jinja/text labels for text, and refuses more (a pickle extension such as .bin needs an
allowance, and its bytes are checked; a name an allowance gives as *.whl must be a valid wheel).

Wheels are the one exception to the pickle search, in one place (`_wheel`): a wheel installs
code, strictly more than a pickle can do, so the members of a valid wheel that an allowance
names are not searched (numpy ships a test .pkl). A wheel outside an allowance is refused like
any zip, pickles first; a zip that only looks like a wheel gets no exemption.
"""

from __future__ import annotations

import fnmatch
import mmap
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from sovpack.errors import FormatError
from sovpack.formats.gguf import MAGIC as GGUF_MAGIC
from sovpack.formats.gguf import inspect_gguf
from sovpack.formats.images import image_type, inspect_image
from sovpack.formats.pickle import NPY_MAGIC, hidden_pickle, pickle_stream, pickle_suffix
from sovpack.formats.safetensors import inspect_safetensors
from sovpack.formats.sentencepiece import inspect_sentencepiece, looks_like_sentencepiece
from sovpack.formats.text import is_json_document, text_problem
from sovpack.formats.wheel import inspect_wheel, looks_like_wheel

CHECKED_KINDS = ("safetensors", "gguf", "sentencepiece", "image", "json", "jinja", "text")
OTHER = "other"
WHEEL = "wheel"
CARRIED_KINDS = (WHEEL, OTHER)  # the kinds only an allowance lets into a bundle
ALLOWED_KINDS_TEXT = "safetensors, GGUF, SentencePiece models, PNG/JPEG/GIF/WebP images, JSON, Jinja templates and plain text"


@dataclass(frozen=True)
class Examined:
    format: str  # one of CHECKED_KINDS, or one of CARRIED_KINDS for a file an allowance lets through
    details: dict | None  # what the kind's inspector found
    allowed_by: str | None = None  # the allowance glob, for CARRIED_KINDS


def allowance_for(path: str, allowances: tuple[str, ...] | list[str]) -> str | None:
    """The first allowance glob matching the whole bundle path (fnmatch, case-sensitive, `*` also matches '/')."""
    return next((glob for glob in allowances if fnmatch.fnmatchcase(path, glob)), None)


def examine(path: Path, name: str, allowances: tuple[str, ...] | list[str] = ()) -> Examined:
    """Decide what the file at `path` (bundle path `name`) is, by its bytes; FormatError naming `name` when refused."""
    allowed_by = allowance_for(name, allowances)
    suffix = pickle_suffix(name)
    if suffix and not allowed_by:
        raise _pickle_refusal(name, f"its extension {suffix} is used for pickle-based weights")
    with _mapped(path) as data:
        if looks_like_wheel(data) or (allowed_by and name.lower().endswith(".whl")):
            return _wheel(data, path, name, allowed_by)
        kind = _structured_kind(data) or _claimed_weights(name)
        pickle = _pickle_in(data, kind, path, name)
        if pickle:
            raise _pickle_refusal(name, f"it is {pickle}")
        problem = text_problem(data)
        if kind is not None and not (problem is None and _fails(kind, path, data, name)):
            return Examined(kind, _inspect(kind, path, data, name))
        if problem is None:  # text, whatever its first bytes announced (a README may begin with 'GIF89a')
            return Examined(_text_label(name, data), None)
        if allowed_by:
            return Examined(OTHER, None, allowed_by)
        raise FormatError(
            name,
            f"refused: it is not a kind of file sovpack can check (it looks like {_looks_like(data, problem)}). "
            f"Bundles carry {ALLOWED_KINDS_TEXT}, recognised by their bytes; to carry this file anyway, "
            "pack with --allow-file GLOB naming it (recorded in the signed metadata)",
        )


def _wheel(data, path: Path, name: str, allowed_by: str | None) -> Examined:
    """A Python wheel (or a file an allowance names *.whl): accepted only valid and allowed; its members' pickles are its own.

    Outside an allowance, or when it is not a valid wheel, it is searched for pickles as any file
    is and refused; an allowed, valid wheel only may not itself be a pickle from its first byte.
    """
    try:
        details = inspect_wheel(data, name)
    except FormatError as e:
        problem = e
    else:
        problem = None if allowed_by else _wheel_refusal(name)
    if problem is not None:
        pickle = _pickle_in(data, None, path, name)
        raise _pickle_refusal(name, f"it is {pickle}") if pickle else problem
    stream = pickle_stream(data)
    if stream is not None:
        raise _pickle_refusal(name, f"it is {stream.describe()}")
    return Examined(WHEEL, details, allowed_by)


def _wheel_refusal(name: str) -> FormatError:
    return FormatError(
        name,
        "refused: it is a Python wheel, which installs code. Bundles carry "
        f"{ALLOWED_KINDS_TEXT}, recognised by their bytes; a wheel is carried only under an explicit allowance: "
        "pack with --allow-file GLOB naming it (recorded in the signed metadata), as `sovpack runtime build` does",
    )


def _structured_kind(data) -> str | None:
    """The binary kind the first bytes announce (its inspector then decides whether it really is one)."""
    if data[:4] == GGUF_MAGIC and data[5:8] == b"\0\0\0":  # and a version number
        return "gguf"
    if len(data) > 9 and data[8:9] == b"{" and int.from_bytes(data[:8], "little") <= len(data) - 8:
        return "safetensors"
    if image_type(data):
        return "image"
    if looks_like_sentencepiece(data):
        return "sentencepiece"
    return None


def _claimed_weights(name: str) -> str | None:
    """safetensors or GGUF, when the name says so: not to let the file through, but to say precisely what is wrong with it."""
    suffix = PurePosixPath(name.lower()).suffix
    return {".safetensors": "safetensors", ".gguf": "gguf"}.get(suffix)


def _pickle_in(data, kind: str | None, path: Path, name: str) -> str | None:
    """The pickle the bytes are or hold, in words.

    A weights file (safetensors, GGUF) is not searched for zip members at every offset: its
    tensor data may hold any bytes, and no loader reads a zip from inside it; its first bytes
    and a zip found from its end (as zipfile and torch look) are checked like any file's. The
    first bytes of a safetensors header can also read as a pickle's (a header length of 0x0280
    starts 0x80 0x02), or, rarely, as a whole pickle that only pushes constants: such harmless
    coincidences in a valid weights file are not refused; a complete stream that imports or calls is.
    """
    weights = kind in ("safetensors", "gguf")
    stream = pickle_stream(data)
    harmless = stream is not None and weights and not (stream.calls and stream.complete) and not _fails(kind, path, data, name)
    if stream is not None and not harmless:
        return stream.describe()
    return hidden_pickle(data, scan_local_headers=not weights)


def _inspect(kind: str, path: Path, data, name: str) -> dict | None:
    try:
        if kind == "safetensors":
            return inspect_safetensors(path)
        if kind == "gguf":
            return inspect_gguf(path)
        if kind == "image":
            return inspect_image(data, name)
        return inspect_sentencepiece(data, name)
    except FormatError as e:
        raise FormatError(name, e.detail) from None


def _fails(kind: str, path: Path, data, name: str) -> bool:
    try:
        _inspect(kind, path, data, name)
    except FormatError:
        return True
    return False


def _text_label(name: str, data) -> str:
    if is_json_document(data):
        return "json"
    lower = PurePosixPath(name).name.lower()
    return "jinja" if lower.endswith(".jinja") or lower.startswith("chat_template") else "text"


def _looks_like(data, text_problem: str) -> str:
    head = bytes(data[:8])
    if head.startswith(NPY_MAGIC):
        return "a numpy array"
    if head.startswith(b"PK"):
        return "a zip archive"
    if head.startswith(b"\x7fELF"):
        return "an ELF executable"
    if head.startswith(b"MZ"):
        return "a Windows executable"
    if head[:2] in (b"\x1f\x8b", b"BZ") or head.startswith((b"\xfd7zXZ", b"(\xb5/\xfd")):
        return "a compressed file"
    return f"unknown binary: not text ({text_problem})"


def _pickle_refusal(name: str, reason: str) -> FormatError:
    return FormatError(
        name,
        f"refused as pickle-based weights: {reason}. Pickles can run arbitrary code when loaded, and no "
        "--allow-file lets one through; convert the model to safetensors (or GGUF) first",
    )


@contextmanager
def _mapped(path: Path):
    """The file's bytes as a read-only memory map (b'' for an empty file)."""
    with open(path, "rb") as f:
        if f.seek(0, 2) == 0:
            yield b""
            return
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            yield data
