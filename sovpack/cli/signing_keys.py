"""Where sign and export get their signing key: a PEM file (--key) or a key on a PKCS#11 token (--pkcs11)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import typer

from sovpack.errors import UsageError

PKCS11_HELP = "Sign with a key on a PKCS#11 token (smartcard, HSM): an RFC 7512 URI such as 'pkcs11:token=T;object=K'."
PIN_FILE_HELP = "File holding the token's user PIN (else it is asked for on a terminal; never on the command line)."


def read_pin(pin_file: Path | None, token_name: str) -> bytes:
    """The token PIN from --pin-file (trailing newline dropped), else typed at a terminal."""
    from sovpack.cli.passwords import read_secret_file

    if pin_file is not None:
        return read_secret_file(pin_file, "--pin-file")
    if not sys.stdin.isatty():
        raise UsageError(f"{token_name} needs its PIN: give --pin-file FILE (no terminal to ask on)")
    return typer.prompt(f"PIN for {token_name}", hide_input=True).encode()


@contextmanager
def signing_key(key: Path | None, password_file: Path | None, pkcs11: str | None, pin_file: Path | None) -> Iterator:
    """The private key to sign with, open while the context lasts (a token session is closed at the end)."""
    if (key is None) == (pkcs11 is None):
        raise UsageError("give either --key KEYFILE or --pkcs11 URI")
    if key is not None:
        from sovpack.cli.passwords import load_signing_key

        if pin_file is not None:
            raise UsageError("--pin-file goes with --pkcs11; a --key file's password comes from --password-file")
        yield load_signing_key(key, password_file)
        return
    from sovpack.bundle.pkcs11 import open_token_key, parse_uri

    if password_file is not None:
        raise UsageError("--password-file goes with --key; a token's PIN comes from --pin-file")
    uri = parse_uri(pkcs11)
    with open_token_key(uri, read_pin(pin_file, uri.token_name)) as token_key:
        yield token_key
