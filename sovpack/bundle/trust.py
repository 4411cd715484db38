"""The keys and certificate roots an organisation trusts, and how many distinct signers must have signed."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from sovpack.bundle.certificates import TrustedRoot
from sovpack.bundle.keys import key_hint, load_public_key
from sovpack.errors import UsageError


@dataclass(frozen=True)
class TrustedKey:
    name: str  # how operators call this signer (the .pub file's stem, or the name given to `trust add`)
    hint: str  # SHA-256 of the PEM public key
    public_key: ec.EllipticCurvePublicKey

    @property
    def key_id(self) -> str:
        return self.hint[:16]

    @property
    def label(self) -> str:
        return f"{self.name} ({self.key_id})"

    @property
    def identity(self) -> str:
        """What the threshold counts once: a key signer is its key."""
        return self.hint


@dataclass(frozen=True)
class TrustPolicy:
    keys: tuple[TrustedKey, ...]
    threshold: int = 1
    roots: tuple[TrustedRoot, ...] = ()  # certificate signers count when their chain builds to one of these
    crls: tuple[x509.CertificateRevocationList, ...] = ()

    def __post_init__(self):
        if not self.keys and not self.roots:
            raise UsageError("no trusted keys: give --trust with a .pub file or a directory of them")
        if self.threshold < 1 or (not self.roots and self.threshold > len(self.keys)):
            raise UsageError(f"threshold {self.threshold} cannot be met by {len(self.keys)} trusted key(s)")

    def key_for(self, hint: str) -> TrustedKey | None:
        return next((k for k in self.keys if k.hint == hint), None)


def trusted_key_from_file(path: Path, name: str | None = None) -> TrustedKey:
    public_key = load_public_key(path)
    return TrustedKey(name or path.stem, key_hint(public_key), public_key)


def load_trust(paths: list[Path], threshold: int = 1) -> TrustPolicy:
    """Trusted keys from .pub files and directories of them (duplicates count once).

    Raises: UsageError (a path that does not exist, a directory without .pub files), Refused (not a
    PEM public key, or one on another curve).
    """
    keys: dict[str, TrustedKey] = {}
    for path in paths:
        if path.is_dir():
            files = sorted(path.glob("*.pub"))
            if not files:
                raise UsageError(f"trust directory {path} holds no .pub files")
        elif path.exists():
            files = [path]
        else:
            raise UsageError(f"trust path {path} does not exist")
        for f in files:
            key = trusted_key_from_file(f)
            keys.setdefault(key.hint, key)
    return TrustPolicy(tuple(keys.values()), threshold)
