"""What each file in a bundle is (role, format) and what its format inspector finds."""

from __future__ import annotations

from pathlib import Path, PurePosixPath

from sovpack.errors import FormatError
from sovpack.formats.gguf import inspect_gguf
from sovpack.formats.pickle import pickle_reason
from sovpack.formats.safetensors import inspect_safetensors

ROLES = ("weights", "weights-index", "config", "tokenizer", "chat-template", "license", "documentation", "other")

_TOKENIZER_FILES = {
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
    "tekken.json",
}
_CONFIG_FILES = {"config.json", "generation_config.json", "params.json", "preprocessor_config.json"}


def classify(path: str) -> tuple[str, str]:
    """(role, format) of a bundle file, from its name."""
    name = PurePosixPath(path).name
    lower = name.lower()
    suffix = PurePosixPath(lower).suffix
    fmt = {
        ".safetensors": "safetensors",
        ".gguf": "gguf",
        ".json": "json",
        ".jinja": "jinja",
        ".md": "text",
        ".txt": "text",
        ".model": "sentencepiece",
    }.get(suffix, "other")
    if fmt in ("safetensors", "gguf"):
        role = "weights"
    elif lower.endswith(".safetensors.index.json"):
        role = "weights-index"
    elif lower in _TOKENIZER_FILES or lower.endswith(".tiktoken"):
        role = "tokenizer"
    elif lower.startswith("chat_template"):
        role = "chat-template"
    elif lower in _CONFIG_FILES or lower.endswith("config.json"):
        role = "config"
    elif lower.split(".")[0] in ("license", "licence", "notice", "copying", "use_policy"):
        role = "license"
    elif fmt == "text":
        role = "documentation"
    else:
        role = "other"
    return role, fmt


def refuse_pickle(path: Path, name: str) -> None:
    reason = pickle_reason(path)
    if reason:
        raise FormatError(
            name,
            f"refused as pickle-based weights: {reason}. Pickles can run arbitrary code when "
            "loaded; convert the model to safetensors (or GGUF) first",
        )


def inspect_file(path: Path, name: str, fmt: str) -> dict | None:
    """Refuse pickles; validate safetensors and GGUF headers. Errors name the file as `name`."""
    refuse_pickle(path, name)
    try:
        if fmt == "safetensors":
            return inspect_safetensors(path)
        if fmt == "gguf":
            return inspect_gguf(path)
        return None
    except FormatError as e:
        raise FormatError(name, e.detail) from None
