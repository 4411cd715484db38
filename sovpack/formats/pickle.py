"""Recognise pickle-based weights, which can run arbitrary code when loaded."""

from __future__ import annotations

import zipfile
from pathlib import Path

PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle", ".joblib"}


def pickle_reason(path: Path) -> str | None:
    """Why this file must be treated as a pickle, or None when it does not look like one."""
    if path.suffix.lower() in PICKLE_SUFFIXES:
        return f"its extension {path.suffix} is used for pickle-based weights"
    with open(path, "rb") as f:
        head = f.read(4)
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return f"it starts with the pickle protocol {head[1]} opcode"
    if head == b"PK\x03\x04" and _zip_holds_pickle(path):
        return "it is a PyTorch zip archive holding a pickle (data.pkl)"
    return None


def _zip_holds_pickle(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError):
        return False
    if _is_wheel(names):  # a Python package (the sovpack runtime): its own data files, not loadable as weights
        return any(_torch_loads(name) for name in names)
    return any(name.endswith(".pkl") for name in names)


def _is_wheel(names: list[str]) -> bool:
    return any(name.count("/") == 1 and name.endswith(".dist-info/WHEEL") for name in names)


def _torch_loads(name: str) -> bool:
    """Where torch.load looks for the pickle of a zip archive: data.pkl at the top or in the one top directory."""
    return name == "data.pkl" or (name.count("/") == 1 and name.endswith("/data.pkl"))
