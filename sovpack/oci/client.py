"""The OCI distribution API, as far as push and pull need it: blobs, chunked uploads, manifests, auth.

Authentication follows the registry's challenge: on a 401 the `WWW-Authenticate` header says
Basic (the credentials go in every later request) or Bearer (a token for this repository's scope
is fetched from the realm it names, with the credentials if any, and sent instead). Credentials
never travel in clear: a realm on plain HTTP is refused unless it is on loopback or --plain-http.

HTTPS is the default, verified against the system's CAs or --ca-file. Plain HTTP is used with
--plain-http, or for a registry on loopback that answers a TLS handshake in plain HTTP (as the
CNCF registry does when it runs without TLS); a certificate that does not verify is never a
reason to fall back.

Transport errors of blob transfers are left to the caller, which resumes; everything else becomes
one of sovpack's failures, naming the registry and what was being done (`errors`).
"""

from __future__ import annotations

import base64
import re
import ssl
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlencode, urljoin, urlsplit

import httpx2

from sovpack import __version__
from sovpack.common import safe_json
from sovpack.errors import Failure, Refused, SovpackError, UsageError
from sovpack.oci.credentials import Credentials
from sovpack.oci.layout import MAX_MANIFEST_BYTES, OCI_MANIFEST
from sovpack.oci.reference import Reference

TIMEOUT = httpx2.Timeout(120.0, connect=15.0)
MAX_RESPONSE_JSON_BYTES = 1 << 20  # a token or an error list
_CHALLENGE_PARAM = re.compile(r'([A-Za-z]+)="([^"]*)"')


class RegistryClient:
    def __init__(
        self,
        ref: Reference,
        credentials: Credentials | None,
        *,
        ca_file: Path | None = None,
        plain_http: bool = False,
        push: bool = False,
    ):
        self.ref, self.credentials, self.plain_http = ref, credentials, plain_http
        self.scope = f"repository:{ref.repository}:{'pull,push' if push else 'pull'}"
        self.scheme = "http" if plain_http else "https"
        self._may_fall_back = ref.is_loopback and not plain_http
        self._authorization: str | None = None
        self._auth_scheme: str | None = None
        verify: ssl.SSLContext | bool = True
        if ca_file is not None:
            try:
                verify = ssl.create_default_context(cafile=str(ca_file))
            except (OSError, ssl.SSLError) as e:
                raise UsageError(f"cannot use --ca-file {ca_file}: {getattr(e, 'strerror', None) or e}") from None
        self.http = httpx2.Client(
            verify=verify, timeout=TIMEOUT, follow_redirects=False, headers={"User-Agent": f"sovpack/{__version__}"}
        )

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> RegistryClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def origin(self) -> str:
        return f"{self.scheme}://{self.ref.registry}"

    def url(self, tail: str) -> str:
        return f"{self.origin}/v2/{self.ref.repository}/{tail}"

    # -- requests

    def send(
        self,
        method: str,
        url: str,
        *,
        headers: dict | None = None,
        content: Iterable[bytes] | bytes | None = None,
        stream: bool = False,
        follow_redirects: bool = False,
    ) -> httpx2.Response:
        """One request, authenticated as the registry asks; `content` may be a callable giving the body anew."""
        renewed = False
        while True:
            request_headers = dict(headers or {})
            sent_authorization = self._authorization is not None
            if sent_authorization:
                request_headers["Authorization"] = self._authorization
            body = content() if callable(content) else content
            request = self.http.build_request(method, url, headers=request_headers, content=body)
            try:
                response = self.http.send(request, stream=stream, follow_redirects=follow_redirects)
            except httpx2.ConnectError as e:
                if self._may_fall_back and _speaks_plain_http(e):
                    self._may_fall_back = False
                    self.scheme = "http"
                    url = "http://" + url.split("://", 1)[1]
                    continue
                raise
            self._may_fall_back = False
            if response.status_code != 401:
                return response
            response.read()
            response.close()
            if sent_authorization and (self._auth_scheme == "basic" or renewed):
                raise self._credentials_refused(response)
            renewed = sent_authorization  # a bearer token may have expired: one new token
            self._authenticate(response)

    def _authenticate(self, response: httpx2.Response) -> None:
        challenge = response.headers.get("WWW-Authenticate", "")
        scheme = challenge.split(" ", 1)[0].lower()
        params = dict(_CHALLENGE_PARAM.findall(challenge))
        if scheme == "basic":
            if self.credentials is None:
                raise self._needs_credentials()
            user_pass = f"{self.credentials.username}:{self.credentials.password}".encode()
            self._authorization, self._auth_scheme = "Basic " + base64.b64encode(user_pass).decode(), "basic"
        elif scheme == "bearer" and params.get("realm"):
            self._authorization, self._auth_scheme = "Bearer " + self._token(params), "bearer"
        else:
            raise Failure(f"the registry {self.ref.registry} asks for an authentication sovpack does not speak: {challenge!r}")

    def _token(self, challenge: dict[str, str]) -> str:
        realm = challenge["realm"]
        parts = urlsplit(realm)
        realm_ref = Reference(parts.netloc or "?", "x")
        if parts.scheme != "https" and not (parts.scheme == "http" and (realm_ref.is_loopback or self.plain_http)):
            raise Failure(
                f"the registry {self.ref.registry} sends clients to the token realm {realm}, which is not HTTPS: refusing to "
                "send credentials there (only a loopback realm or --plain-http allow it)"
            )
        query = {"service": challenge.get("service", "")}
        scopes = [self.scope] + ([challenge["scope"]] if challenge.get("scope") and challenge["scope"] != self.scope else [])
        url = realm + ("&" if "?" in realm else "?") + urlencode([*query.items(), *(("scope", s) for s in scopes)])
        auth = (self.credentials.username, self.credentials.password) if self.credentials else None
        response = self.http.get(url, auth=auth)
        if response.status_code in (401, 403):
            if self.credentials is None:
                raise self._needs_credentials()
            raise self._credentials_refused(response, where=f"the token service {realm}")
        if response.status_code != 200:
            raise Failure(
                f"the token service {realm} of {self.ref.registry} answered HTTP {response.status_code}: {_errors(response)}"
            )
        try:
            doc = _json_body(response)
            token = doc.get("token") or doc.get("access_token")
        except (ValueError, AttributeError):
            token = None
        if not isinstance(token, str) or not token:
            raise Failure(f"the token service {realm} of {self.ref.registry} answered without a token")
        return token

    def _needs_credentials(self) -> Failure:
        return Failure(
            f"the registry {self.ref.registry} requires credentials and none were found: give --username and --password-file, "
            "or log in (`skopeo login`, `podman login`) so that a container auth file holds them"
        )

    def _credentials_refused(self, response: httpx2.Response, where: str | None = None) -> Failure:
        who = self.credentials.username if self.credentials else "anonymous"
        origin = f" (from {self.credentials.origin})" if self.credentials and self.credentials.origin else ""
        return Failure(
            f"{where or 'the registry ' + self.ref.registry} refused the credentials of {who}{origin} for "
            f"{self.ref.repository} (HTTP {response.status_code}): check the user name and password, and that the user may "
            f"{'push to' if 'push' in self.scope else 'pull from'} it"
        )

    def check(self, response: httpx2.Response, doing: str, *ok: int) -> httpx2.Response:
        if response.status_code in ok:
            return response
        response.read()
        if response.status_code == 403:
            raise Failure(f"the registry {self.ref.registry} denied {doing} (HTTP 403): {_errors(response)}")
        raise Failure(f"the registry {self.ref.registry} answered HTTP {response.status_code} to {doing}: {_errors(response)}")

    # -- blobs

    def blob_size(self, digest: str) -> int | None:
        """The size of a blob the repository holds, or None."""
        response = self.send("HEAD", self.url(f"blobs/{digest}"), follow_redirects=True)
        if response.status_code == 404:
            return None
        self.check(response, f"a check for blob {digest}", 200)
        return int(response.headers.get("Content-Length", -1))

    @contextmanager
    def open_blob(self, digest: str, offset: int = 0) -> Iterator[httpx2.Response]:
        """A streamed GET of a blob from `offset` (206, or 200 when the registry sends it all)."""
        headers = {"Accept-Encoding": "identity"} | ({"Range": f"bytes={offset}-"} if offset else {})
        response = self.send("GET", self.url(f"blobs/{digest}"), headers=headers, stream=True, follow_redirects=True)
        try:
            yield response
        finally:
            response.close()

    def start_upload(self) -> str:
        response = self.check(self.send("POST", self.url("blobs/uploads/")), "starting an upload", 202)
        return self._location(response)

    def upload_offset(self, location: str) -> tuple[str, int] | None:
        """Where an upload stands: its location and the next byte it expects; None when the registry forgot it."""
        response = self.send("GET", location)
        if response.status_code in (404, 400):
            return None
        self.check(response, "a check of an upload", 204)
        return self._location(response), _next_offset(response.headers.get("Range"))

    def upload_chunk(self, location: str, offset: int, length: int, body) -> str:
        """PATCH `length` bytes at `offset`; `body` is a callable giving them anew (sent twice to authenticate)."""
        headers = {
            "Content-Type": "application/octet-stream",
            "Content-Length": str(length),
            "Content-Range": f"{offset}-{offset + length - 1}",
        }
        response = self.send("PATCH", location, headers=headers, content=body)
        if response.status_code in (404, 416):  # the upload is unknown, cancelled, or at another offset
            response.read()
            raise UploadOutOfStep(f"HTTP {response.status_code} to a chunk: {_errors(response)}")
        return self._location(self.check(response, "a chunk of an upload", 202, 204))

    def finish_upload(self, location: str, digest: str) -> httpx2.Response:
        url = location + ("&" if "?" in location else "?") + urlencode({"digest": digest})
        return self.send("PUT", url, headers={"Content-Length": "0"})

    def cancel_upload(self, location: str) -> None:
        try:
            self.send("DELETE", location).close()
        except httpx2.HTTPError:
            pass  # the registry purges abandoned uploads itself

    def _location(self, response: httpx2.Response) -> str:
        location = response.headers.get("Location")
        if not location:
            raise Failure(f"the registry {self.ref.registry} answered an upload without a Location")
        return urljoin(self.origin + "/", location)

    # -- manifests

    def get_manifest(self) -> tuple[bytes, str | None]:
        """The raw manifest the reference names, and the digest the registry gave it."""
        response = self.send(
            "GET", self.url(f"manifests/{self.ref.manifest_reference}"), headers={"Accept": OCI_MANIFEST}, stream=True
        )
        try:
            if response.status_code == 404:
                response.read()
                raise UsageError(f"{self.ref} is not in the registry ({_errors(response)})")
            self.check(response, f"a request for the manifest of {self.ref}", 200)
            raw = b""
            for chunk in response.iter_bytes():
                raw += chunk
                if len(raw) > MAX_MANIFEST_BYTES:
                    raise Refused(f"the manifest of {self.ref} is larger than {MAX_MANIFEST_BYTES} bytes")
            return raw, response.headers.get("Docker-Content-Digest")
        finally:
            response.close()

    def put_manifest(self, tag: str, raw: bytes) -> str | None:
        response = self.send("PUT", self.url(f"manifests/{tag}"), headers={"Content-Type": OCI_MANIFEST}, content=raw)
        self.check(response, f"the manifest of {self.ref.registry}/{self.ref.repository}:{tag}", 201)
        return response.headers.get("Docker-Content-Digest")

    # -- errors

    @contextmanager
    def errors(self) -> Iterator[None]:
        """Network and TLS errors as Failure, naming the registry."""
        try:
            yield
        except SovpackError:
            raise
        except httpx2.HTTPError as e:
            raise self.failure(e) from None

    def failure(self, e: Exception) -> Failure:
        if is_certificate_error(e):
            return Failure(
                f"the TLS certificate of the registry {self.ref.registry} is not trusted ({_reason(e)}): give the CA that "
                "issued it with --ca-file"
            )
        if isinstance(e, httpx2.ConnectError) and _speaks_plain_http(e):
            return Failure(
                f"the registry {self.ref.registry} does not speak TLS ({_reason(e)}): if it really serves plain HTTP, "
                "pass --plain-http"
            )
        return Failure(f"cannot talk to the registry {self.origin}: {_reason(e)}")


class UploadOutOfStep(Exception):
    """The registry holds another amount of the upload than the chunk assumed, or no longer has it: ask it where it stands."""


def _next_offset(range_header: str | None) -> int:
    """The Range header of an upload is `0-LAST` (inclusive); `0-0` before any byte (a registry quirk)."""
    if not range_header or "-" not in range_header:
        return 0
    last = int(range_header.rsplit("-", 1)[1])
    return last + 1 if last > 0 else 0


def _json_body(response: httpx2.Response) -> object:
    """A token or error document from the registry: untrusted, so read with the bounded loader (a ValueError if not JSON)."""
    return safe_json.loads(response.content, max_bytes=MAX_RESPONSE_JSON_BYTES)


def _errors(response: httpx2.Response) -> str:
    try:
        errors = _json_body(response).get("errors") or []
        return "; ".join(
            f"{e.get('code')}: {e.get('message')}" + (f" ({e['detail']})" if e.get("detail") else "") for e in errors
        )
    except (ValueError, AttributeError, TypeError):
        return response.text[:300] or response.reason_phrase


def _chain(e: BaseException) -> Iterator[BaseException]:
    while e is not None:
        yield e
        e = e.__cause__ or e.__context__


def is_certificate_error(e: Exception) -> bool:
    return any(isinstance(x, ssl.SSLCertVerificationError) for x in _chain(e)) or "CERTIFICATE_VERIFY_FAILED" in str(e)


def _speaks_plain_http(e: Exception) -> bool:
    text = str(e)
    return not is_certificate_error(e) and ("WRONG_VERSION_NUMBER" in text or "record layer failure" in text)


def _reason(e: Exception) -> str:
    return str(e) or type(e).__name__
