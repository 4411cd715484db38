"""records/NAME/VERSION.json: how an installed bundle was accepted, as a typed record (docs/store.md).

The import writes it right after the bundle's commit (`ImportRecord.accepted`); serve, list,
remove and a re-run of the import read it back (`read_record`). A record that is not what
sovpack writes is refused, naming the file and the field, with the repair: the same import
again verifies the installed bundle and writes the record anew.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

from sovpack.bundle.certificates import CertifiedSigner, subject_identity
from sovpack.bundle.metadata import format_time
from sovpack.bundle.trust import TrustedKey
from sovpack.bundle.verify import VerifyReport
from sovpack.common import safe_json
from sovpack.errors import Refused

SourceKind = Literal["volumes", "stream"]  # what an import read: volumes and their index, or one stream

MAX_RECORD_BYTES = 64 << 20  # the store's records and state files are small: bounded like every JSON sovpack reads
REPAIR = "delete it and run the same import again, which verifies the bundle and writes its record anew"


@dataclass(frozen=True)
class SignerCertificate:
    """The certificate a certificate signer was accepted by: who it named, and the trusted root its chain built to."""

    subject: str  # RFC 4514
    issuer: str
    serial: str  # hex
    root: str  # the name of the store's trusted root (trust/roots/NAME.pem)

    def to_json(self) -> dict:
        return {"subject": self.subject, "issuer": self.issuer, "serial": self.serial, "root": self.root}


@dataclass(frozen=True)
class Signer:
    """A trusted signer of the bundle when it was accepted: a key, or a certificate holder (`certificate` set)."""

    name: str  # the key's name in the store, or the certificate's subject
    hint: str  # a key: SHA-256 of its PEM public key; a certificate signer: its identity, "x509:" + SHA-256 of the subject
    certificate: SignerCertificate | None = None

    @property
    def key_id(self) -> str:
        return self.hint[:16]

    @classmethod
    def of(cls, signer: TrustedKey | CertifiedSigner) -> Signer:
        if isinstance(signer, CertifiedSigner):
            certificate = SignerCertificate(signer.subject, signer.issuer, signer.serial, signer.root)
            return cls(signer.name, signer.hint, certificate)
        return cls(signer.name, signer.hint)

    def to_json(self) -> dict:
        if self.certificate is None:
            return {"name": self.name, "hint": self.hint, "key_id": self.key_id}
        return {"name": self.name, "hint": self.hint, "certificate": self.certificate.to_json()}

    @classmethod
    def from_json(cls, data: object, path: Path) -> Signer:
        why = "its 'accepted_by' is not a list of signers with a name and a hint"
        if not isinstance(data, dict) or not isinstance(data.get("name"), str) or not isinstance(data.get("hint"), str):
            raise damaged(path, why, REPAIR)
        certificate = data.get("certificate")
        if certificate is None:
            return cls(data["name"], data["hint"])
        fields = ("subject", "issuer", "serial", "root")
        if not isinstance(certificate, dict) or not all(isinstance(certificate.get(f), str) for f in fields):
            raise damaged(path, f"a certificate signer's 'certificate' in 'accepted_by' is not {{{', '.join(fields)}}}", REPAIR)
        if data["hint"] != subject_identity(certificate["subject"]):
            raise damaged(path, f"the certificate signer {certificate['subject']!r} in 'accepted_by' has another hint", REPAIR)
        return cls(data["name"], data["hint"], SignerCertificate(*(certificate[f] for f in fields)))


@dataclass(frozen=True)
class ImportRecord:
    name: str
    version: int
    accepted_by: tuple[Signer, ...]
    threshold: int = 1  # the threshold the import was held to
    metadata_sha256: str | None = None  # of the signed sovpack.json installed
    imported: str | None = None  # when (RFC 3339, UTC)
    size: int | None = None  # bytes of the bundle's files
    files: int | None = None
    created: str | None = None  # the bundle's own creation and expiry times, from its sovpack.json
    expires: str | None = None
    source: dict | None = None  # {"kind": SourceKind, ...}: the index and volumes, or a stream

    @property
    def signer_names(self) -> list[str]:
        return [s.name for s in self.accepted_by]

    @classmethod
    def accepted(cls, report: VerifyReport, threshold: int, source: dict | None) -> ImportRecord:
        """The record of a bundle this very report verified, under a policy of `threshold`."""
        m = report.metadata
        return cls(
            name=m.name,
            version=m.version,
            accepted_by=tuple(Signer.of(k) for k in report.signers),
            threshold=threshold,
            metadata_sha256=report.metadata_sha256,
            imported=format_time(datetime.now(timezone.utc)),
            size=m.size,
            files=len(m.files),
            created=format_time(m.created),
            expires=format_time(m.expires) if m.expires else None,
            source=source,
        )

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "version": self.version,
            "metadata_sha256": self.metadata_sha256,
            "imported": self.imported,
            "accepted_by": [s.to_json() for s in self.accepted_by],
            "threshold": self.threshold,
            "size": self.size,
            "files": self.files,
            "created": self.created,
            "expires": self.expires,
            "source": self.source,
        }

    def to_bytes(self) -> bytes:
        return json.dumps(self.to_json(), indent=2, sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: object, path: Path, name: str, version: int) -> ImportRecord:
        """The record found at `path`, which the store's layout says is that of NAME vVERSION; Refused naming `path`."""
        if not isinstance(data, dict):
            raise damaged(path, "it does not hold a JSON object", REPAIR)
        accepted_by = data.get("accepted_by", [])
        if not isinstance(accepted_by, list):
            raise damaged(path, "its 'accepted_by' is not a list of signers with a name and a hint", REPAIR)
        threshold = data.get("threshold", 1)
        if not is_count(threshold):
            raise damaged(path, "its 'threshold' is not a whole number of at least 1", REPAIR)
        source = data.get("source")
        if source is not None and not isinstance(source, dict):
            raise damaged(path, "its 'source' is not a JSON object", REPAIR)
        return cls(
            name=name,
            version=version,
            accepted_by=tuple(Signer.from_json(a, path) for a in accepted_by),
            threshold=threshold,
            metadata_sha256=_text(data, "metadata_sha256", path),
            imported=_text(data, "imported", path),
            size=_whole_number(data, "size", "a number of bytes", path),
            files=_whole_number(data, "files", "a number of files", path),
            created=_text(data, "created", path),
            expires=_text(data, "expires", path),
            source=source,
        )


def read_record(path: Path, name: str, version: int) -> ImportRecord | None:
    """The record of NAME vVERSION; None when there is none (an import killed right after its commit)."""
    data = read_store_json(path, REPAIR)
    return None if data is None else ImportRecord.from_json(data, path, name, version)


def read_store_json(path: Path, repair: str) -> dict | None:
    """A JSON object the store wrote, read with the bounded loader; None when the file does not exist.

    A damaged one (not JSON, too large or deep, a key twice, not an object) is refused, naming it.
    """
    try:
        data = safe_json.loads(path.read_bytes(), max_bytes=MAX_RECORD_BYTES)
    except FileNotFoundError:
        return None
    except ValueError as e:  # UnicodeDecodeError included
        raise damaged(path, f"it is not valid JSON ({e})", repair) from None
    if not isinstance(data, dict):
        raise damaged(path, "it does not hold a JSON object", repair)
    return data


def _text(data: dict, key: str, path: Path) -> str | None:
    value = data.get(key)
    if value is not None and not isinstance(value, str):
        raise damaged(path, f"its '{key}' is not a string", REPAIR)
    return value


def _whole_number(data: dict, key: str, what: str, path: Path) -> int | None:
    value = data.get(key)
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
        raise damaged(path, f"its '{key}' is not {what}", REPAIR)
    return value


def is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def damaged(path: Path, what: str, repair: str) -> Refused:
    return Refused(f"the store's {path} is damaged: {what}; {repair}")
