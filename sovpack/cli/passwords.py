"""Private-key passwords: from --password-file, else asked for on a terminal (keygen, sign, export --key)."""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from sovpack.errors import UsageError


def read_secret_file(path: Path | None, option: str = "--password-file") -> bytes | None:
    """The password or PIN in `path` (its trailing newline dropped); None without a file."""
    if path is None:
        return None
    try:
        secret = path.read_bytes().rstrip(b"\r\n")
    except OSError as e:
        raise UsageError(f"cannot read {option} {path}: {e.strerror}") from None
    if not secret:
        raise UsageError(f"{option} {path} is empty")
    return secret


def read_password(password_file: Path | None) -> bytes | None:
    return read_secret_file(password_file)


def load_signing_key(key: Path, password_file: Path | None):
    """The private key in `key`; an encrypted one is opened with --password-file, or a password typed at the terminal."""
    from sovpack.bundle.keys import load_private_key, private_key_is_encrypted

    password = read_password(password_file)
    if password is None and private_key_is_encrypted(key) and sys.stdin.isatty():
        password = typer.prompt(f"password for {key}", hide_input=True).encode()
    return load_private_key(key, password)
