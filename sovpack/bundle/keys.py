"""ECDSA signing keys as PEM files, and the key ids that name signers."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from sovpack.errors import Failure, Refused, UsageError

CURVES = {"p384": ec.SECP384R1, "p256": ec.SECP256R1}
CURVE_NAMES = {"secp384r1": "p384", "secp256r1": "p256"}
KEY_ID_LENGTH = 16


def public_pem(public_key: ec.EllipticCurvePublicKey) -> bytes:
    return public_key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def key_hint(public_key: ec.EllipticCurvePublicKey) -> str:
    """SHA-256 of the public key's PEM: the identifier model-signing puts in its signatures."""
    return hashlib.sha256(public_pem(public_key)).hexdigest()


def key_id(public_key: ec.EllipticCurvePublicKey) -> str:
    """The short id that names a signer and its signature file."""
    return key_hint(public_key)[:KEY_ID_LENGTH]


def _check_curve(key, path: Path) -> None:
    if not isinstance(key, (ec.EllipticCurvePrivateKey, ec.EllipticCurvePublicKey)) or key.curve.name not in CURVE_NAMES:
        raise Refused(f"{path}: only ECDSA keys on P-384 or P-256 are accepted")


@dataclass(frozen=True)
class GeneratedKey:
    private_path: Path | None  # None: the private key stays on a PKCS#11 token
    public_path: Path
    key_id: str


def generate_key_pair(name: str, directory: Path, curve: str = "p384", password: bytes | None = None) -> GeneratedKey:
    """Write NAME.key (mode 0600, never overwritten) and NAME.pub into `directory`.

    Raises: UsageError (an unknown curve, a name that is not a plain file name, a key file that exists).
    """
    if curve not in CURVES:
        raise UsageError(f"unknown curve {curve!r}: choose p384 or p256")
    if not name or "/" in name or name.startswith("."):
        raise UsageError(f"key name {name!r} must be a plain file name")
    directory.mkdir(parents=True, exist_ok=True)
    private_path, public_path = directory / f"{name}.key", directory / f"{name}.pub"
    for p in (private_path, public_path):
        if p.exists():
            raise UsageError(f"{p} already exists; refusing to overwrite a key (choose another name or move it away)")
    key = ec.generate_private_key(CURVES[curve]())
    encryption = serialization.BestAvailableEncryption(password) if password else serialization.NoEncryption()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)
    try:
        fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise UsageError(f"{private_path} already exists; refusing to overwrite a key") from None
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    public_path.write_bytes(public_pem(key.public_key()))
    return GeneratedKey(private_path, public_path, key_id(key.public_key()))


def private_key_is_encrypted(path: Path) -> bool:
    return b"ENCRYPTED" in _read(path)


def load_private_key(path: Path, password: bytes | None = None) -> ec.EllipticCurvePrivateKey:
    """An ECDSA P-384 or P-256 private key from a PEM file (encrypted ones need `password`).

    Raises: UsageError (encrypted without a password, or a password for a clear key), Refused (a wrong
    password, not a PEM private key, another curve), Failure (the file cannot be read).
    """
    data = _read(path)
    try:
        key = serialization.load_pem_private_key(data, password)
    except TypeError:
        if password is None:
            raise UsageError(f"{path} is encrypted: give --password-file or run in a terminal to be asked") from None
        raise UsageError(f"{path} is not encrypted, but a password was given") from None
    except ValueError:
        if password is not None:
            raise Refused(f"{path}: wrong password, or not a PEM private key") from None
        raise Refused(f"{path} is not a PEM private key") from None
    _check_curve(key, path)
    return key


def load_public_key(path: Path) -> ec.EllipticCurvePublicKey:
    data = _read(path)
    try:
        key = serialization.load_pem_public_key(data)
    except ValueError:
        raise Refused(f"{path} is not a PEM public key") from None
    _check_curve(key, path)
    return key


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise UsageError(f"{path} does not exist") from None
    except OSError as e:
        raise Failure(f"cannot read {path}: {e.strerror}") from None
