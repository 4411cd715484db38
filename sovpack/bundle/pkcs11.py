"""Signing keys held on a PKCS#11 token (smartcard, HSM, SoftHSM), named by an RFC 7512 URI.

The private key never leaves the token: sovpack hashes the message itself and asks the token
for a raw ECDSA signature (CKM_ECDSA) over the digest, then encodes it as DER, so a token key
signs exactly like a PEM key (`signature.sign_statement` cannot tell them apart).

The URI names the token (`token=` label or `serial=`) and the key (`object=` label and/or
`id=`); the module (the vendor's PKCS#11 library) comes from the URI's `module-path` query
attribute or $SOVPACK_PKCS11_MODULE. A PIN never travels in the URI (`pin-value` is refused):
it is read from a file or typed at a terminal by the command line.

Exit codes: a token, key or module that is not there, or a URI sovpack cannot read, is a usage
error (2); a wrong or locked PIN is a refusal (1); anything the token fails at otherwise is a
failure (3). Every message names the token and the object.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote_to_bytes

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from sovpack.bundle.keys import CURVE_NAMES, GeneratedKey, key_id, public_pem
from sovpack.errors import Failure, Refused, UsageError

MODULE_ENV = "SOVPACK_PKCS11_MODULE"
PATH_ATTRIBUTES = {"token", "serial", "object", "id", "type", "manufacturer", "model", "library-description"}
QUERY_ATTRIBUTES = {"module-path", "module-name", "pin-source"}
CURVE_OIDS = {"p384": "secp384r1", "p256": "secp256r1"}


@dataclass(frozen=True)
class TokenUri:
    """What an RFC 7512 `pkcs11:` URI selects: one token, one key on it, and the module to load."""

    uri: str
    token: str | None
    serial: str | None
    object: str | None
    id: bytes | None
    module: Path

    @property
    def token_name(self) -> str:
        return f"token {self.token!r}" if self.token else f"token with serial {self.serial!r}" if self.serial else "the token"

    @property
    def object_name(self) -> str:
        parts = ([f"label {self.object!r}"] if self.object else []) + ([f"id {self.id.hex()}"] if self.id else [])
        return "key with " + " and ".join(parts)


def parse_uri(uri: str) -> TokenUri:
    """Parse a `pkcs11:` URI. Raises UsageError naming what is wrong (never echoing a PIN)."""
    if not uri.startswith("pkcs11:"):
        raise UsageError(f"--pkcs11 {uri!r} is not a PKCS#11 URI: it must start with 'pkcs11:' (RFC 7512)")
    path, _, query = uri[len("pkcs11:") :].partition("?")
    attributes = _attributes(path, ";", PATH_ATTRIBUTES, uri) | _attributes(query, "&", QUERY_ATTRIBUTES, uri)
    if "pin-source" in attributes:
        raise UsageError(f"--pkcs11 {uri}: give the PIN with --pin-file or at the prompt, not with pin-source in the URI")
    if attributes.get("type", b"private") not in (b"private", b"public"):
        raise UsageError(f"--pkcs11 {uri}: type={attributes['type'].decode(errors='replace')} does not name a key")
    text = {k: v.decode("utf-8", errors="replace") for k, v in attributes.items() if k != "id"}
    if not (text.get("token") or text.get("serial")):
        raise UsageError(f"--pkcs11 {uri} names no token: add token=LABEL (or serial=...)")
    if not (text.get("object") or attributes.get("id")):
        raise UsageError(f"--pkcs11 {uri} names no key: add object=LABEL and/or id=%01")
    return TokenUri(uri, text.get("token"), text.get("serial"), text.get("object"), attributes.get("id"), _module(text, uri))


def _attributes(part: str, separator: str, known: set[str], uri: str) -> dict[str, bytes]:
    found: dict[str, bytes] = {}
    for item in filter(None, part.split(separator)):
        name, equals, value = item.partition("=")
        if name == "pin-value":
            raise UsageError("a PKCS#11 URI must not carry the PIN (pin-value): give it with --pin-file or at the prompt")
        if not equals or name not in known:
            raise UsageError(
                f"--pkcs11 {uri}: unknown or malformed attribute {name!r} (sovpack reads {', '.join(sorted(known))})"
            )
        if name in found:
            raise UsageError(f"--pkcs11 {uri}: attribute {name!r} appears twice")
        found[name] = unquote_to_bytes(value)
    return found


def _module(text: dict[str, str], uri: str) -> Path:
    module = text.get("module-path") or os.environ.get(MODULE_ENV)
    if not module:
        raise UsageError(
            f"--pkcs11 {uri}: which PKCS#11 module? add ?module-path=/path/to/vendor-pkcs11.so to the URI or set ${MODULE_ENV}"
        )
    if not Path(module).is_file():
        raise UsageError(f"PKCS#11 module {module} (for --pkcs11 {uri}) does not exist")
    return Path(module)


class TokenKey:
    """A private key on a token, usable where sovpack signs with an `ec.EllipticCurvePrivateKey`."""

    def __init__(self, uri: TokenUri, private_key, public_key: ec.EllipticCurvePublicKey):
        self.uri, self._private_key, self._public_key = uri, private_key, public_key

    @property
    def curve(self) -> ec.EllipticCurve:
        return self._public_key.curve

    def public_key(self) -> ec.EllipticCurvePublicKey:
        return self._public_key

    def sign(self, data: bytes, signature_algorithm: ec.ECDSA) -> bytes:
        """DER ECDSA signature over `data`: hashed here, signed on the token (CKM_ECDSA over the digest)."""
        from pkcs11 import Mechanism
        from pkcs11.exceptions import PKCS11Error

        digest = hashes.Hash(signature_algorithm.algorithm)
        digest.update(data)
        try:
            raw = self._private_key.sign(digest.finalize(), mechanism=Mechanism.ECDSA)
        except PKCS11Error as e:
            raise Failure(f"{self.uri.token_name} could not sign with its {self.uri.object_name}: {_why(e)}") from None
        half = len(raw) // 2
        return encode_dss_signature(int.from_bytes(raw[:half], "big"), int.from_bytes(raw[half:], "big"))


@contextmanager
def token_session(uri: TokenUri, pin: bytes, *, read_write: bool = False) -> Iterator:
    """A logged-in session on the token the URI names; closed (and logged out) on exit."""
    pkcs11 = _library()
    from pkcs11 import exceptions as p11

    try:
        lib = pkcs11.lib(str(uri.module))
    except (RuntimeError, OSError) as e:
        raise Failure(f"cannot load the PKCS#11 module {uri.module}: {e}") from None
    try:
        token = lib.get_token(**{k: v for k, v in (("token_label", uri.token), ("token_serial", uri.serial)) if v})
    except p11.NoSuchToken:
        raise UsageError(f"no {uri.token_name} in the PKCS#11 module {uri.module} (is the card inserted?)") from None
    except p11.MultipleTokensReturned:
        raise UsageError(f"more than one {uri.token_name} in {uri.module}: add serial=... to the URI") from None
    try:
        session = token.open(user_pin=pin.decode("utf-8"), rw=read_write)
    except (p11.PinIncorrect, p11.PinLenRange, p11.PinInvalid):
        raise Refused(f"{uri.token_name} refused the PIN (wrong PIN); the key was not used") from None
    except p11.PinLocked:
        raise Refused(f"{uri.token_name} is locked after too many wrong PINs; its security officer must unlock it") from None
    except UnicodeDecodeError:
        raise UsageError(f"the PIN for {uri.token_name} is not UTF-8 text") from None
    except p11.PKCS11Error as e:
        raise Failure(f"cannot open a session on {uri.token_name}: {_why(e)}") from None
    try:
        yield session
    finally:
        session.close()


@contextmanager
def open_token_key(uri: TokenUri, pin: bytes) -> Iterator[TokenKey]:
    """The ECDSA key the URI names, ready to sign while the context lasts.

    Raises: UsageError (no such token or key, several keys match), Refused (wrong or locked PIN,
    a key that is not ECDSA P-256/P-384), Failure (the module or token fails).
    """
    from pkcs11 import KeyType, ObjectClass
    from pkcs11 import exceptions as p11

    with token_session(uri, pin) as session:
        try:
            private_key = session.get_key(ObjectClass.PRIVATE_KEY, None, uri.object, uri.id)
            public = session.get_key(ObjectClass.PUBLIC_KEY, None, uri.object, uri.id)
        except p11.NoSuchKey:
            raise UsageError(
                f"{uri.token_name} holds no {uri.object_name} (both its private and public key objects are needed)"
            ) from None
        except p11.MultipleObjectsReturned:
            raise UsageError(f"{uri.token_name} holds several keys with {uri.object_name[9:]}: add id=... to the URI") from None
        if private_key.key_type != KeyType.EC:
            raise Refused(f"the {uri.object_name} on {uri.token_name} is not an ECDSA key; sovpack signs with P-384 or P-256")
        yield TokenKey(uri, private_key, _public_key(public, uri))


def generate_token_key(name: str, directory: Path, uri: TokenUri, pin: bytes, curve: str = "p384") -> GeneratedKey:
    """Create a non-extractable ECDSA key pair on the token and write its public key to DIR/NAME.pub.

    Raises: UsageError (a curve or name sovpack does not know, NAME.pub or the key already there), the errors of
    `token_session`.
    """
    from pkcs11 import Attribute, KeyType, ObjectClass
    from pkcs11 import exceptions as p11
    from pkcs11.util.ec import encode_named_curve_parameters

    if curve not in CURVE_OIDS:
        raise UsageError(f"unknown curve {curve!r}: choose p384 or p256")
    if not name or "/" in name or name.startswith("."):
        raise UsageError(f"key name {name!r} must be a plain file name")
    public_path = directory / f"{name}.pub"
    if public_path.exists():
        raise UsageError(f"{public_path} already exists; refusing to overwrite a key (choose another name or move it away)")
    with token_session(uri, pin, read_write=True) as session:
        if any(session.get_objects(_search(uri, ObjectClass.PRIVATE_KEY))):
            raise UsageError(f"{uri.token_name} already holds a {uri.object_name}; refusing to create a second one")
        try:
            parameters = session.create_domain_parameters(
                KeyType.EC, {Attribute.EC_PARAMS: encode_named_curve_parameters(CURVE_OIDS[curve])}, local=True
            )
            public, _ = parameters.generate_keypair(
                store=True,
                label=uri.object,
                id=uri.id,
                private_template={Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False, Attribute.SIGN: True},
            )
        except p11.PKCS11Error as e:
            raise Failure(f"{uri.token_name} could not create an ECDSA {curve} key: {_why(e)}") from None
        public_key = _public_key(public, uri)
    directory.mkdir(parents=True, exist_ok=True)
    public_path.write_bytes(public_pem(public_key))
    return GeneratedKey(None, public_path, key_id(public_key))


def _search(uri: TokenUri, object_class) -> dict:
    from pkcs11 import Attribute

    found = {Attribute.CLASS: object_class}
    if uri.object:
        found[Attribute.LABEL] = uri.object
    if uri.id:
        found[Attribute.ID] = uri.id
    return found


def _public_key(public, uri: TokenUri) -> ec.EllipticCurvePublicKey:
    from pkcs11.util.ec import encode_ec_public_key

    try:
        key = serialization.load_der_public_key(encode_ec_public_key(public))
    except (ValueError, KeyError, TypeError):
        raise Refused(f"the {uri.object_name} on {uri.token_name} is not an ECDSA public key sovpack can read") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name not in CURVE_NAMES:
        raise Refused(f"the {uri.object_name} on {uri.token_name} is not on P-384 or P-256")
    return key


def _library():
    try:
        import pkcs11
    except ImportError:
        raise Failure("PKCS#11 signing needs python-pkcs11: pip install 'sovpack[pkcs11]'") from None
    return pkcs11


def _why(error: Exception) -> str:
    return str(error) or type(error).__name__
