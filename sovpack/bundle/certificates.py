"""Signers known by X.509 certificate chains, checked offline against the roots an organisation trusts.

A certificate signature counts when, at the signing time recorded in its statement:
the chain it carries builds, certificate by certificate (each signature checked), to a trusted
root; every certificate in the path was within its validity period; each CA in the path is a CA
(basic constraints, key usage, path length); the signer's certificate may sign (key usage
digitalSignature, extended key usage codeSigning or what the root requires); no certificate in
the path is revoked by a CRL the store holds (a CRL applies when its issuer's key in the path
signed it); and the signer's subject matches the root's subject pattern, if it has one.
Every refusal names the certificate at fault by subject and serial.

Certificates and CRLs come from outside (signature files, files carried across the gap), so each
is parsed whole as soon as it is loaded (`parse_certificate`, `parse_crl`): names, validity, serial,
extensions, key and signature algorithm, every revoked entry. `cryptography` parses those lazily
and raises, besides ValueError, its own exceptions (InvalidVersion, UnsupportedAlgorithm,
DuplicateExtension, ...) and warnings (a serial that is not positive); all of them make the
certificate or CRL unreadable here, a refusal, instead of surfacing later as a traceback.
"""

from __future__ import annotations

import fnmatch
import hashlib
import warnings
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from sovpack.bundle.keys import key_hint
from sovpack.bundle.metadata import format_time
from sovpack.errors import Failure, Refused, UsageError

MAX_PATH = 8  # certificates between a signer and its root; deeper chains are refused
MAX_CHAIN = 16  # certificates a signature or a --cert file may carry
MAX_CERTIFICATE_FILE_BYTES = 1 << 20  # a PEM chain of MAX_CHAIN certificates is a few dozen KiB
MAX_CRL_BYTES = 64 << 20  # the CRLs of large CAs run to tens of MiB
UNREADABLE = (
    ValueError,
    TypeError,
    UnsupportedAlgorithm,
    x509.InvalidVersion,
    x509.DuplicateExtension,
    x509.UnsupportedGeneralNameType,
    Warning,
)
EKU_NAMES = {
    "codeSigning": ExtendedKeyUsageOID.CODE_SIGNING,
    "serverAuth": ExtendedKeyUsageOID.SERVER_AUTH,
    "clientAuth": ExtendedKeyUsageOID.CLIENT_AUTH,
    "emailProtection": ExtendedKeyUsageOID.EMAIL_PROTECTION,
    "timeStamping": ExtendedKeyUsageOID.TIME_STAMPING,
}


def certificate_label(cert: x509.Certificate) -> str:
    """How messages name a certificate: its subject and serial."""
    return f"'{cert.subject.rfc4514_string()}' (serial {cert.serial_number:x})"


def identity_of(cert: x509.Certificate) -> dict:
    return {"subject": cert.subject.rfc4514_string(), "issuer": cert.issuer.rfc4514_string(), "serial": f"{cert.serial_number:x}"}


def eku_oid(name: str) -> x509.ObjectIdentifier:
    """An extended key usage by name (codeSigning, ...) or dotted OID; UsageError otherwise."""
    if name in EKU_NAMES:
        return EKU_NAMES[name]
    try:
        return x509.ObjectIdentifier(name)
    except ValueError:
        raise UsageError(f"unknown extended key usage {name!r}: use {', '.join(EKU_NAMES)} or a dotted OID") from None


def parse_certificate(der: bytes) -> x509.Certificate:
    """A DER certificate parsed whole (see the module docstring); ValueError saying why it is unreadable."""
    return _parsed(lambda: _touch_certificate(x509.load_der_x509_certificate(der)), "certificate")


def parse_pem_certificates(data: bytes) -> list[x509.Certificate]:
    """Every certificate of a PEM file, each parsed whole; ValueError saying why one is unreadable."""
    return _parsed(lambda: [_touch_certificate(c) for c in x509.load_pem_x509_certificates(data)], "PEM certificate")


def parse_crl(data: bytes) -> x509.CertificateRevocationList:
    """A CRL (PEM or DER) parsed whole, every revoked entry included; ValueError saying why it is unreadable."""
    load = x509.load_pem_x509_crl if data.lstrip().startswith(b"-----BEGIN") else x509.load_der_x509_crl
    return _parsed(lambda: _touch_crl(load(data)), "CRL")


def _parsed(parse, what: str):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # what cryptography only warns about today (a serial not positive) it will refuse
        try:
            return parse()
        except UNREADABLE as e:
            raise ValueError(f"not a {what} sovpack can read ({type(e).__name__}: {e})") from None


def _touch_certificate(cert: x509.Certificate) -> x509.Certificate:
    _ = cert.serial_number, cert.not_valid_before_utc, cert.not_valid_after_utc, cert.signature_hash_algorithm
    _ = cert.subject.rfc4514_string(), cert.issuer.rfc4514_string(), list(cert.extensions), cert.public_key()
    return cert


def _touch_crl(crl: x509.CertificateRevocationList) -> x509.CertificateRevocationList:
    _ = crl.issuer.rfc4514_string(), crl.last_update_utc, crl.next_update_utc, list(crl.extensions), crl.signature_hash_algorithm
    for revoked in crl:
        _ = revoked.serial_number, revoked.revocation_date_utc, list(revoked.extensions)
    return crl


def load_certificates(path: Path, what: str) -> list[x509.Certificate]:
    """Every certificate in a PEM file (DER: one), each parsed whole; errors name the file."""
    data = _read(path, what, MAX_CERTIFICATE_FILE_BYTES)
    try:
        if b"-----BEGIN" in data:
            certificates = parse_pem_certificates(data)
        else:
            certificates = [parse_certificate(data)]
    except ValueError as e:
        raise UsageError(f"{what} {path} holds no X.509 certificate sovpack can read (PEM or DER): {e}") from None
    if len(certificates) > MAX_CHAIN:
        raise UsageError(f"{what} {path} holds {len(certificates)} certificates, more than the {MAX_CHAIN} sovpack reads")
    return certificates


def _read(path: Path, what: str, limit: int) -> bytes:
    try:
        size = path.stat().st_size
        if size > limit:
            raise UsageError(f"{what} {path} is {size} bytes, larger than the {limit} bytes sovpack reads")
        return path.read_bytes()
    except FileNotFoundError:
        raise UsageError(f"{what} {path} does not exist") from None
    except OSError as e:
        raise Failure(f"cannot read {what} {path}: {e.strerror}") from None


def check_signing_chain(chain: list[x509.Certificate], public_key: ec.EllipticCurvePublicKey, now: datetime) -> None:
    """Before signing: the first certificate is for this key, valid now, and each one is issued by the next."""
    leaf = chain[0]
    if key_hint(leaf.public_key()) != key_hint(public_key):
        raise UsageError(f"--cert: the first certificate {certificate_label(leaf)} is for another key than the signing key")
    if not leaf.not_valid_before_utc <= now <= leaf.not_valid_after_utc:
        raise UsageError(
            f"--cert: certificate {certificate_label(leaf)} is not valid now (valid from "
            f"{format_time(leaf.not_valid_before_utc)} to {format_time(leaf.not_valid_after_utc)})"
        )
    for cert, issuer in zip(chain, chain[1:], strict=False):
        if not issued_by(cert, issuer):
            raise UsageError(
                f"--cert: certificate {certificate_label(cert)} is not issued by the next one in the file, "
                f"{certificate_label(issuer)}: give the signer's certificate first, then its issuers in order"
            )


def issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    """Whether `issuer`'s key signed `cert` (names matching)."""
    try:
        cert.verify_directly_issued_by(issuer)
        return True
    except (ValueError, TypeError, UnsupportedAlgorithm, InvalidSignature):
        return False


def crl_signed_by(crl: x509.CertificateRevocationList, issuer: x509.Certificate) -> bool:
    """Whether `issuer` (named as the CRL's issuer) signed `crl`."""
    try:
        return crl.issuer == issuer.subject and crl.is_signature_valid(issuer.public_key())
    except (ValueError, TypeError, UnsupportedAlgorithm):
        return False


@dataclass(frozen=True)
class TrustedRoot:
    """A CA certificate the organisation trusts, and the rule its signers must meet."""

    name: str
    certificate: x509.Certificate
    require_eku: str | None = None  # an extended key usage the signer's certificate must have
    subject: str | None = None  # a shell-style pattern the signer's subject (RFC 4514) must match

    @property
    def fingerprint(self) -> str:
        return self.certificate.fingerprint(hashes.SHA256()).hex()

    @property
    def label(self) -> str:
        return f"root {self.name} {certificate_label(self.certificate)}"

    def pem(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.PEM)


def subject_identity(subject: str) -> str:
    """A certificate signer's identity, as the threshold counts it and store records hold it: "x509:" + SHA-256 of the subject."""
    return "x509:" + hashlib.sha256(subject.encode("utf-8", "surrogatepass")).hexdigest()


@dataclass(frozen=True)
class CertifiedSigner:
    """A signer known by its certificate: counted once per subject, whatever key it used."""

    subject: str
    issuer: str
    serial: str
    root: str  # the trusted root's name
    key_hint: str

    @property
    def name(self) -> str:
        return self.subject

    @property
    def hint(self) -> str:
        """What identifies the signer in records and in the threshold: its subject, not its key."""
        return subject_identity(self.subject)

    @property
    def identity(self) -> str:
        return self.hint

    @property
    def key_id(self) -> str:
        return self.key_hint[:16]

    @property
    def label(self) -> str:
        return f"'{self.subject}' (certificate serial {self.serial}, root {self.root})"


def validate_chain(
    chain: tuple[x509.Certificate, ...],
    roots: tuple[TrustedRoot, ...],
    crls: tuple[x509.CertificateRevocationList, ...],
    at: datetime,
    at_what: str,
) -> CertifiedSigner:
    """The signer a certificate chain (leaf first) proves at time `at`; Refused naming the certificate at fault."""
    path, root = _build_path(chain, roots)
    for cert in (*path, root.certificate):
        _check_validity(cert, at, at_what)
    _check_cas((*path[1:], root.certificate))
    _check_signer_usage(path[0], root)
    _check_revocation((*path, root.certificate), crls)
    subject = path[0].subject.rfc4514_string()
    if root.subject and not fnmatch.fnmatchcase(subject, root.subject):
        raise Refused(
            f"certificate {certificate_label(path[0])} does not match the subject rule {root.subject!r} of {root.label}"
        )
    leaf = identity_of(path[0])
    return CertifiedSigner(leaf["subject"], leaf["issuer"], leaf["serial"], root.name, key_hint(path[0].public_key()))


def _build_path(
    chain: tuple[x509.Certificate, ...], roots: tuple[TrustedRoot, ...]
) -> tuple[list[x509.Certificate], TrustedRoot]:
    path, pool = [chain[0]], list(chain[1:])
    for _ in range(MAX_PATH):
        cert = path[-1]
        root = next((r for r in roots if issued_by(cert, r.certificate)), None)
        if root is not None:
            return path, root
        named = next((r for r in roots if r.certificate.subject == cert.issuer), None)
        if named is not None:
            raise Refused(
                f"certificate {certificate_label(cert)} names {named.label} as its issuer, but that root did not sign it"
            )
        if cert.issuer == cert.subject:
            raise Refused(f"certificate {certificate_label(cert)} is a root the store does not trust (unknown root)")
        issuer = next((c for c in pool if issued_by(cert, c)), None)
        if issuer is None:
            raise Refused(
                f"certificate {certificate_label(cert)} was issued by '{cert.issuer.rfc4514_string()}', which is neither a "
                "trusted root nor in the signature's chain (an intermediate certificate is missing, or the root is unknown)"
            )
        path.append(issuer)
        pool.remove(issuer)
    raise Refused(f"certificate {certificate_label(chain[0])} has a chain longer than {MAX_PATH} certificates")


def _check_validity(cert: x509.Certificate, at: datetime, at_what: str) -> None:
    start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
    if at < start:
        raise Refused(
            f"certificate {certificate_label(cert)} was not yet valid at {at_what} {format_time(at)} "
            f"(valid from {format_time(start)})"
        )
    if at > end:
        raise Refused(
            f"certificate {certificate_label(cert)} had expired at {at_what} {format_time(at)} (valid until {format_time(end)})"
        )


def _extension(cert: x509.Certificate, kind):
    try:
        return cert.extensions.get_extension_for_class(kind).value
    except x509.ExtensionNotFound:
        return None


def _check_cas(cas: tuple[x509.Certificate, ...]) -> None:
    """Each issuer is a CA allowed to sign certificates, within its path length (cas: the issuers, nearest first)."""
    for below, ca in enumerate(cas):
        constraints = _extension(ca, x509.BasicConstraints)
        usage = _extension(ca, x509.KeyUsage)
        if constraints is None or not constraints.ca:
            raise Refused(f"certificate {certificate_label(ca)} issued a certificate but is not a CA (basic constraints)")
        if usage is not None and not usage.key_cert_sign:
            raise Refused(
                f"certificate {certificate_label(ca)} issued a certificate but its key usage does not allow keyCertSign"
            )
        if constraints.path_length is not None and below > constraints.path_length:
            raise Refused(
                f"certificate {certificate_label(ca)} allows {constraints.path_length} CA(s) below it, the chain has {below}"
            )


def _check_signer_usage(leaf: x509.Certificate, root: TrustedRoot) -> None:
    usage, extended = _extension(leaf, x509.KeyUsage), _extension(leaf, x509.ExtendedKeyUsage)
    constraints = _extension(leaf, x509.BasicConstraints)
    if constraints is not None and constraints.ca:
        raise Refused(f"certificate {certificate_label(leaf)} is a CA certificate, not a signer's (wrong usage)")
    if usage is None and extended is None:
        raise Refused(f"certificate {certificate_label(leaf)} states no key usage: it must allow digitalSignature (wrong usage)")
    if usage is not None and not usage.digital_signature:
        raise Refused(f"certificate {certificate_label(leaf)} has a key usage without digitalSignature (wrong usage)")
    wanted = root.require_eku or "codeSigning"
    if extended is not None and eku_oid(wanted) not in extended:
        raise Refused(f"certificate {certificate_label(leaf)} lacks the extended key usage {wanted} (wrong usage)")
    if extended is None and root.require_eku:
        raise Refused(
            f"certificate {certificate_label(leaf)} lacks the extended key usage {root.require_eku} that {root.label} requires"
        )


def _check_revocation(path: tuple[x509.Certificate, ...], crls: tuple[x509.CertificateRevocationList, ...]) -> None:
    for cert, issuer in zip(path, path[1:], strict=False):
        for crl in crls:
            if not crl_signed_by(crl, issuer):
                continue
            revoked = crl.get_revoked_certificate_by_serial_number(cert.serial_number)
            if revoked is not None:
                raise Refused(
                    f"certificate {certificate_label(cert)} is revoked (since {format_time(revoked.revocation_date_utc)}, "
                    f"CRL of '{issuer.subject.rfc4514_string()}')"
                )


def load_crl(path: Path) -> x509.CertificateRevocationList:
    """A CRL from a PEM or DER file, parsed whole; errors name the file."""
    data = _read(path, "CRL file", MAX_CRL_BYTES)
    try:
        return parse_crl(data)
    except ValueError as e:
        raise Refused(f"{path} is not a certificate revocation list sovpack can read (PEM or DER): {e}") from None
