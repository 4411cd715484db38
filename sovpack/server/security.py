"""Who may talk to the server: bind policy, API keys, TLS files, CORS origins.

API keys are compared in constant time: the presented key and every configured key are
hashed to SHA-256 and all digests are compared with hmac.compare_digest, without an
early exit, so neither the key's length nor which key matched shows in the timing.
A request is identified in logs by a key id, the first 12 hex digits of the key's
SHA-256: enough to tell keys apart, useless for recovering one.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import ssl
import stat
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from sovpack.errors import UsageError

MIN_KEY_LENGTH = 16
LOOPBACK_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost"}


KEY_ID_DIGITS = 12  # a key is named in logs by this many hex digits of its SHA-256


@dataclass(frozen=True)
class ApiKeys:
    digests: tuple[bytes, ...]
    ids: tuple[str, ...]
    source: Path

    @classmethod
    def load(cls, path: Path) -> ApiKeys:
        """One key per line; blank lines and lines starting with # are ignored."""
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise UsageError(f"--api-key-file {path} does not exist") from None
        except (OSError, UnicodeDecodeError) as e:
            raise UsageError(f"cannot read --api-key-file {path}: {getattr(e, 'strerror', None) or e}") from None
        keys = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
        if not keys:
            raise UsageError(f"--api-key-file {path} holds no keys (one per line; # starts a comment)")
        for number, key in enumerate(keys, start=1):
            if len(key) < MIN_KEY_LENGTH or any(c.isspace() for c in key):
                raise UsageError(
                    f"--api-key-file {path}: key {number} is shorter than {MIN_KEY_LENGTH} characters or holds spaces; "
                    "use long random keys, e.g. `python -c 'import secrets; print(secrets.token_urlsafe(32))'`"
                )
        digests = tuple(hashlib.sha256(k.encode()).digest() for k in keys)
        return cls(digests, tuple(d.hex()[:KEY_ID_DIGITS] for d in digests), path)

    def identify(self, presented: str | None) -> str | None:
        """The key id of a valid key, or None. Takes the same time whichever key matches."""
        candidate = hashlib.sha256((presented or "").encode()).digest()
        found = None
        for digest, ident in zip(self.digests, self.ids, strict=True):
            if hmac.compare_digest(candidate, digest) and presented:
                found = ident
        return found

    def permission_warning(self) -> str | None:
        mode = self.source.stat().st_mode
        if stat.S_IMODE(mode) & 0o066:
            return f"--api-key-file {self.source} is readable by other users (mode {stat.S_IMODE(mode):o}); chmod 600 it"
        return None


def is_loopback(host: str) -> bool:
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_bind(host: str, has_keys: bool) -> None:
    if not is_loopback(host) and not has_keys:
        raise UsageError(
            f"refusing to listen on {host}, which other machines can reach, without API keys: "
            "give --api-key-file (and --tls-cert/--tls-key), or keep the default --host 127.0.0.1"
        )


def check_tls(cert: Path | None, key: Path | None) -> None:
    """Both files or neither; they must exist and hold a matching certificate and key."""
    if (cert is None) != (key is None):
        raise UsageError("give --tls-cert and --tls-key together")
    if cert is None:
        return
    for flag, path in (("--tls-cert", cert), ("--tls-key", key)):
        if not path.is_file():
            raise UsageError(f"{flag} {path} does not exist or is not a file")
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(str(cert), str(key))
    except ssl.SSLError as e:
        raise UsageError(f"--tls-cert {cert} / --tls-key {key}: not a usable certificate and key ({e.reason or e})") from None
    except OSError as e:
        raise UsageError(f"cannot read the TLS files {cert}, {key}: {e.strerror or e}") from None


def check_cors_origins(origins: tuple[str, ...]) -> None:
    for origin in origins:
        if "*" in origin:
            raise UsageError(
                f"--cors-origin {origin!r}: wildcards are not allowed; list each origin, like https://chat.example.mil"
            )
        parts = urlsplit(origin)
        if parts.scheme not in ("http", "https") or not parts.netloc or parts.path not in ("", "/") or parts.query:
            raise UsageError(f"--cors-origin {origin!r}: give a scheme and host, like https://chat.example.mil:8443")


SDK_HEADER_PREFIX = "x-stainless-"  # the openai SDKs' telemetry headers (x-stainless-os, -lang, -retry-count...)
CORS_HEADERS = ("Authorization", "Content-Type")


def browser_sdk_cors(app, origins: tuple[str, ...]):
    """CORS for the listed origins only: GET and POST, no credentials, the headers Authorization and
    Content-Type plus the `x-stainless-*` headers that the openai SDKs send from a browser."""
    from starlette.middleware.cors import CORSMiddleware

    class _Cors(CORSMiddleware):
        def preflight_response(self, request_headers):
            requested = [h.strip().lower() for h in (request_headers.get("access-control-request-headers") or "").split(",")]
            sdk = [h for h in requested if h.startswith(SDK_HEADER_PREFIX)]
            if not sdk:
                return super().preflight_response(request_headers)
            others = [h for h in requested if h and not h.startswith(SDK_HEADER_PREFIX)]
            headers = request_headers.mutablecopy()
            del headers["access-control-request-headers"]
            if others:
                headers["access-control-request-headers"] = ", ".join(others)
            response = super().preflight_response(headers)
            if response.status_code == 200:
                response.headers["Access-Control-Allow-Headers"] = ", ".join([*CORS_HEADERS, *sdk])
            return response

    return _Cors(
        app,
        allow_origins=list(origins),
        allow_methods=["GET", "POST"],
        allow_headers=list(CORS_HEADERS),
        expose_headers=["x-request-id", "retry-after"],
        allow_credentials=False,
    )
