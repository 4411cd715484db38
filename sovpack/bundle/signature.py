"""Signature files in the OpenSSF model-signing v1.0 format.

A signature file is a Sigstore bundle (media type v0.3) holding a DSSE envelope whose
payload is an in-toto Statement with predicate type https://model_signing/signature/v1.0,
serialization method "files": one whole-file SHA-256 per file. The key is identified by
the SHA-256 of its PEM public key (`verificationMaterial.publicKey.hint`), exactly as
model-signing's own key signer does, so `model_signing verify key` accepts these files.
A certificate signature carries instead the signer's certificate chain, leaf first, DER
(`verificationMaterial.x509CertificateChain`), as model-signing's certificate signer does, so
`model_signing verify certificate` accepts it too. sovpack records when it signed in the
signed predicate (`signed_at`, RFC 3339 UTC): verification checks certificates at that time;
model-signing ignores the field.

model-signing builds this statement by hashing the directory again and offers no public
API to sign digests already computed, so the few lines of encoding live here, and the
test suite checks them with the real model-signing verifier.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from sovpack.bundle.certificates import MAX_CHAIN, parse_certificate
from sovpack.bundle.keys import key_hint
from sovpack.bundle.metadata import METADATA_FILE, SIGNATURES_DIR, format_time, parse_time
from sovpack.common import safe_json
from sovpack.errors import Refused

BUNDLE_MEDIA_TYPE = "application/vnd.dev.sigstore.bundle.v0.3+json"
PAYLOAD_TYPE = "application/vnd.in-toto+json"
STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
PREDICATE_TYPE = "https://model_signing/signature/v1.0"
SERIALIZATION = {"method": "files", "hash_type": "sha256", "allow_symlinks": False, "ignore_paths": [SIGNATURES_DIR]}
MAX_SIGNATURE_BYTES = 64 * 1024 * 1024
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")  # lower case only, as model-signing writes it: one spelling per digest


def _pae(payload: bytes) -> bytes:
    """DSSE pre-authentication encoding: what the key actually signs."""
    return b"DSSEv1 %d %s %d %s" % (len(PAYLOAD_TYPE), PAYLOAD_TYPE.encode(), len(payload), payload)


def _hash_for(key) -> hashes.HashAlgorithm:
    return hashes.SHA384() if key.curve.key_size == 384 else hashes.SHA256()


def _root_digest(resources: dict[str, str]) -> str:
    h = hashlib.sha256()
    for name in sorted(resources):
        h.update(bytes.fromhex(resources[name]))
    return h.hexdigest()


def build_statement(subject_name: str, resources: dict[str, str], signed_at: datetime | None = None) -> bytes:
    """The in-toto statement over `resources` (bundle path -> SHA-256 hex), with the signing time if given."""
    statement = {
        "_type": STATEMENT_TYPE,
        "subject": [{"name": subject_name, "digest": {"sha256": _root_digest(resources)}}],
        "predicateType": PREDICATE_TYPE,
        "predicate": {
            "serialization": SERIALIZATION,
            "resources": [{"name": n, "algorithm": "sha256", "digest": resources[n]} for n in sorted(resources)],
        },
    }
    if signed_at is not None:
        statement["predicate"]["signed_at"] = format_time(signed_at)
    return json.dumps(statement, indent=2).encode("utf-8")


def sign_statement(private_key: ec.EllipticCurvePrivateKey, payload: bytes, chain: list[x509.Certificate] | None = None) -> bytes:
    """A complete signature file (Sigstore bundle JSON) over `payload`; with `chain` (leaf first), a certificate signature.

    `private_key` is anything with `public_key()` and `sign(data, ec.ECDSA(...))`: a PEM key or a `pkcs11.TokenKey`.
    """
    public_key = private_key.public_key()
    signature = private_key.sign(_pae(payload), ec.ECDSA(_hash_for(public_key)))
    if chain:
        der = [base64.b64encode(c.public_bytes(serialization.Encoding.DER)).decode() for c in chain]
        material = {"x509CertificateChain": {"certificates": [{"rawBytes": d} for d in der]}}
    else:
        material = {"publicKey": {"hint": key_hint(public_key)}}
    bundle = {
        "mediaType": BUNDLE_MEDIA_TYPE,
        "verificationMaterial": material | {"tlogEntries": []},
        "dsseEnvelope": {
            "payload": base64.b64encode(payload).decode(),
            "payloadType": PAYLOAD_TYPE,
            "signatures": [{"sig": base64.b64encode(signature).decode(), "keyid": ""}],
        },
    }
    return json.dumps(bundle).encode("utf-8")


@dataclass(frozen=True)
class SignatureFile:
    """A parsed signature file; `verify` checks it against a public key."""

    name: str  # the file's path inside the bundle, for messages
    key_hint: str  # of the signing key (for a certificate signature, the leaf certificate's key)
    payload: bytes
    signature: bytes
    certificates: tuple[x509.Certificate, ...] = ()  # the chain a certificate signature carries, leaf first

    @property
    def key_id(self) -> str:
        return self.key_hint[:16]

    def verify(self, public_key: ec.EllipticCurvePublicKey) -> bool:
        try:
            public_key.verify(self.signature, _pae(self.payload), ec.ECDSA(_hash_for(public_key)))
            return True
        except InvalidSignature:
            return False


def parse_signature(raw: bytes, name: str) -> SignatureFile:
    """Parse a signature file's structure (no cryptography yet); errors name the file."""

    def bad(why: str) -> Refused:
        return Refused(f"{name} is not a valid model-signing signature file: {why}")

    try:
        doc = safe_json.loads(raw, max_bytes=MAX_SIGNATURE_BYTES)
        if doc["mediaType"] != BUNDLE_MEDIA_TYPE:
            raise bad(f"media type {doc['mediaType']!r}, expected {BUNDLE_MEDIA_TYPE}")
        material = doc["verificationMaterial"]
        certificates = _certificates(material["x509CertificateChain"]) if "x509CertificateChain" in material else ()
        hint = key_hint(certificates[0].public_key()) if certificates else material["publicKey"]["hint"]
        envelope = doc["dsseEnvelope"]
        if envelope["payloadType"] != PAYLOAD_TYPE:
            raise bad(f"payload type {envelope['payloadType']!r}, expected {PAYLOAD_TYPE}")
        if len(envelope["signatures"]) != 1:
            raise bad(f"{len(envelope['signatures'])} signatures in the envelope, expected exactly 1")
        payload = base64.b64decode(envelope["payload"], validate=True)
        signature = base64.b64decode(envelope["signatures"][0]["sig"], validate=True)
    except (UnicodeDecodeError, ValueError, KeyError, TypeError, IndexError, binascii.Error) as e:
        raise bad(f"{type(e).__name__}: {e}") from None
    if not isinstance(hint, str) or not _SHA256_HEX.fullmatch(hint):
        raise bad("the public key hint is not a SHA-256 hex digest (64 lower-case hex digits)")
    return SignatureFile(name, hint, payload, signature, certificates)


def _certificates(chain: dict) -> tuple[x509.Certificate, ...]:
    """The DER certificates of a verification material's chain, each parsed whole; ValueError when it is empty, too
    long, or holds a certificate sovpack cannot read."""
    listed = chain["certificates"]
    if not isinstance(listed, list) or not 1 <= len(listed) <= MAX_CHAIN:
        raise ValueError(f"the certificate chain is not a list of 1 to {MAX_CHAIN} certificates")
    certificates = tuple(parse_certificate(base64.b64decode(c["rawBytes"], validate=True)) for c in listed)
    if not isinstance(certificates[0].public_key(), ec.EllipticCurvePublicKey):
        raise ValueError("the signing certificate's key is not an ECDSA key")
    return certificates


def read_signature_file(path: Path, name: str) -> SignatureFile:
    """Read and parse a signature file no larger than MAX_SIGNATURE_BYTES (what import accepts); errors name it."""
    if path.stat().st_size > MAX_SIGNATURE_BYTES:
        raise Refused(f"{name} is larger than {MAX_SIGNATURE_BYTES} bytes; not a signature file")
    return parse_signature(path.read_bytes(), name)


@dataclass(frozen=True)
class Statement:
    subject_name: str
    resources: dict[str, str]  # path -> sha256 hex
    signed_at: datetime | None = None  # when sovpack signed (recorded in the predicate); None in other signers' files

    def covers(self, metadata_sha256: str) -> bool:
        """Whether it signs this very sovpack.json: what makes a signature count for a bundle (else it is stale)."""
        return self.resources.get(METADATA_FILE) == metadata_sha256


def read_statement(path: Path, name: str) -> Statement:
    """The statement a signature file signs (not checked against any key); errors name the file."""
    return parse_statement(read_signature_file(path, name).payload, name)


def parse_statement(payload: bytes, name: str) -> Statement:
    """Read the signed statement; refuse anything but model-signing v1.0 'files' over SHA-256, digests in lower-case hex."""

    def bad(why: str) -> Refused:
        return Refused(f"{name}: the signed statement {why}")

    try:
        doc = safe_json.loads(payload, max_bytes=MAX_SIGNATURE_BYTES)
        if doc["_type"] != STATEMENT_TYPE or doc["predicateType"] != PREDICATE_TYPE:
            raise bad(f"has type {doc['_type']!r} / predicate {doc['predicateType']!r}, expected model-signing v1.0")
        serialization = doc["predicate"]["serialization"]
        if serialization.get("method") != "files" or serialization.get("hash_type") != "sha256":
            raise bad(f"uses serialization {serialization!r}; sovpack signs whole files with SHA-256")
        resources = _resources(doc["predicate"]["resources"], bad)
        (subject,) = doc["subject"]
        subject_name, subject_digest = subject["name"], subject["digest"]["sha256"]
        signed_at = doc["predicate"].get("signed_at")
    except (ValueError, KeyError, TypeError, AttributeError) as e:  # UnicodeDecodeError and UnsafeJson are ValueErrors
        raise bad(f"is malformed ({type(e).__name__}: {e})") from None
    if not isinstance(subject_name, str) or not _is_sha256_hex(subject_digest):
        raise bad("has a subject without a name or a lower-case SHA-256 hex digest")
    if subject_digest != _root_digest(resources):
        raise bad("is inconsistent: its subject digest does not match its resources")
    if signed_at is not None and not isinstance(signed_at, str):
        raise bad(f"has a signed_at that is not a time: {signed_at!r}")
    return Statement(subject_name, resources, _signing_time(signed_at, name))


def _signing_time(value: str | None, name: str) -> datetime | None:
    if value is None:
        return None
    try:
        return parse_time(value, "signed_at")
    except Refused:
        raise Refused(f"{name}: the signed statement's signed_at {value!r} is not a UTC time like 2027-01-31T00:00:00Z") from None


def _resources(listed: list, bad) -> dict[str, str]:
    resources: dict[str, str] = {}
    for r in listed:
        resource, algorithm, digest = r["name"], r["algorithm"], r["digest"]
        if not isinstance(resource, str) or algorithm != "sha256" or resource in resources:
            raise bad(f"lists {resource!r} twice or with algorithm {algorithm!r}")
        if not _is_sha256_hex(digest):
            raise bad(f"lists {resource} with digest {digest!r}, not a lower-case SHA-256 hex digest")
        resources[resource] = digest
    return resources


def _is_sha256_hex(value: object) -> bool:
    return isinstance(value, str) and _SHA256_HEX.fullmatch(value) is not None
