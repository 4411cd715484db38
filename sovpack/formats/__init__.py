"""Inspectors of untrusted files, and the gate every bundle file passes (gate.py).

What a file *is* (its format) is decided by its bytes: safetensors, GGUF, SentencePiece,
card images, JSON, Jinja, text, or a Python wheel or `other` under an operator allowance;
pickles never pass (except as members of an allowed wheel, which installs code anyway).
What a file is *for* (its role) is read from its name, for people and for serve's choices.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath

from sovpack.errors import FormatError
from sovpack.formats.gate import CARRIED_KINDS, CHECKED_KINDS, OTHER, WHEEL, Examined, allowance_for, examine

__all__ = [
    "CARRIED_KINDS",
    "CHECKED_KINDS",
    "OTHER",
    "ROLES",
    "WHEEL",
    "Examined",
    "allowance_for",
    "examine",
    "inspect_file",
    "legacy_format",
    "role_of",
]

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
_LEGACY_FORMATS = {
    ".safetensors": "safetensors",
    ".gguf": "gguf",
    ".json": "json",
    ".jinja": "jinja",
    ".md": "text",
    ".txt": "text",
    ".model": "sentencepiece",
}


def legacy_format(path: str) -> str:
    """The format sovpack before the content gate recorded for a path, from its extension alone.

    verify accepts it for the labels that were never checked against the bytes (json, jinja,
    text, sentencepiece, other), so that bundles signed then still verify; the bytes must pass
    the gate all the same.
    """
    return _LEGACY_FORMATS.get(PurePosixPath(path.lower()).suffix, OTHER)


def role_of(path: str, fmt: str) -> str:
    """What a bundle file is for, from its name and its (content-decided) format."""
    lower = PurePosixPath(path).name.lower()
    if fmt in ("safetensors", "gguf"):
        return "weights"
    if lower.endswith(".safetensors.index.json"):
        return "weights-index"
    if lower in _TOKENIZER_FILES or lower.endswith(".tiktoken"):
        return "tokenizer"
    if lower.startswith("chat_template"):
        return "chat-template"
    if lower in _CONFIG_FILES or lower.endswith("config.json"):
        return "config"
    if lower.split(".")[0] in ("license", "licence", "notice", "copying", "use_policy"):
        return "license"
    if fmt in ("text", "jinja") or lower.endswith((".md", ".txt")):
        return "documentation"
    return "other"


def inspect_file(path: Path, name: str, fmt: str) -> dict | None:
    """The gate, without allowances, for a caller that knows the kind: the bytes must be `fmt`; the inspector's details."""
    examined = examine(path, name)
    if fmt in ("safetensors", "gguf") and examined.format != fmt:
        raise FormatError(name, f"expected a {fmt} file, but its bytes are {examined.format}")
    return examined.details
