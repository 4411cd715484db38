"""A real OCI registry for the tests: Debian's `docker-registry` (the CNCF distribution registry) on loopback.

    with Registry(tmp_path / "registry", users={"alice": "s3cret"}) as registry:   # htpasswd basic auth
        sovpack push tiny {registry.host}/models/tiny:3 --username alice --password-file ...

Options: `users` turns on htpasswd basic auth (bcrypt, written by `htpasswd` from apache2-utils);
`tls=TestCA(...)` serves HTTPS with a certificate the test CA issued; `token=True` puts the
registry behind a bearer-token service (`TokenService`, in this process) that checks the same
users and signs ES256 JWTs the registry verifies against the service's certificate.
`CuttingProxy` sits between a client and the registry and drops a connection part-way through
a blob, for the resume tests. `skopeo(...)` runs the independent client.

The binaries are Debian packages (`apt-get install docker-registry skopeo apache2-utils`, as
.ci/run does): without them the tests skip, except in CI (CI=true), where they fail.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import socket
import subprocess
import threading
import time
import uuid
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

REGISTRY_BIN = "/usr/bin/docker-registry"
NEEDED = {"docker-registry": REGISTRY_BIN, "skopeo": "skopeo", "htpasswd": "htpasswd"}


def require_binaries() -> None:
    """Skip without the Debian packages; in CI (CI=true) their absence is a failure."""
    missing = [name for name, binary in NEEDED.items() if not shutil.which(binary)]
    if missing:
        message = f"missing {', '.join(missing)}: apt-get install docker-registry skopeo apache2-utils"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- a test CA


class TestCA:
    """A CA made with `cryptography`; `issue` writes a server certificate for 127.0.0.1 and localhost."""

    __test__ = False  # not a test class

    def __init__(self, directory: Path, name: str = "sovpack test CA"):
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self.key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = datetime.now(timezone.utc)
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=5))
            .not_valid_after(now + timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True)
            .sign(self.key, hashes.SHA256())
        )
        self.cert_file = directory / "ca.pem"
        self.cert_file.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))

    def issue(self, name: str = "server") -> tuple[Path, Path]:
        import ipaddress

        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.now(timezone.utc)
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=5))
            .not_valid_after(now + timedelta(days=1))
            .add_extension(
                x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False,
            )
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(self.key, hashes.SHA256())
        )
        cert_file, key_file = self.directory / f"{name}.pem", self.directory / f"{name}.key"
        cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_file.write_bytes(
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        )
        return cert_file, key_file


# -- the bearer-token service


class TokenService:
    """The registry token flow's other half: GET /token?service=&scope= with basic auth -> {"token": JWT}."""

    SERVICE = "sovpack-test-registry"
    ISSUER = "sovpack-test-token-service"

    def __init__(self, directory: Path, users: dict[str, str]):
        self.users = users
        self.requests: list[dict] = []
        self.key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, self.ISSUER)])
        now = datetime.now(timezone.utc)
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=5))
            .not_valid_after(now + timedelta(days=1))
            .sign(self.key, hashes.SHA256())
        )
        self.cert_file = directory / "token-signer.pem"
        self.cert_file.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))
        service = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                query = parse_qs(urlsplit(self.path).query)
                user = service.check_basic(self.headers.get("Authorization"))
                service.requests.append({"user": user, "scope": query.get("scope", []), "service": query.get("service")})
                if user is None:
                    self.send_response(401)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                body = json.dumps({"token": service.token(user, query.get("scope", []))}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.realm = f"http://127.0.0.1:{self.server.server_address[1]}/token"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def check_basic(self, header: str | None) -> str | None:
        if not header or not header.startswith("Basic "):
            return None
        user, _, password = base64.b64decode(header[6:]).decode().partition(":")
        return user if self.users.get(user) == password else None

    def token(self, user: str, scopes: list[str]) -> str:
        access = []
        for scope in scopes:
            kind, _, rest = scope.partition(":")
            name, _, actions = rest.rpartition(":")
            access.append({"type": kind, "name": name, "actions": actions.split(",")})
        now = int(time.time())
        header = {
            "typ": "JWT",
            "alg": "ES256",
            "x5c": [base64.b64encode(self.cert.public_bytes(serialization.Encoding.DER)).decode()],
        }
        claims = {
            "iss": self.ISSUER,
            "sub": user,
            "aud": self.SERVICE,
            "exp": now + 300,
            "nbf": now - 10,
            "iat": now,
            "jti": uuid.uuid4().hex,
            "access": access,
        }
        signing_input = f"{_b64url(json.dumps(header).encode())}.{_b64url(json.dumps(claims).encode())}"
        r, s = decode_dss_signature(self.key.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256())))
        return f"{signing_input}.{_b64url(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


# -- the registry


class Registry:
    def __init__(self, directory: Path, *, users: dict[str, str] | None = None, tls: TestCA | None = None, token: bool = False):
        require_binaries()
        self.directory, self.users, self.tls = directory, users or {}, tls
        directory.mkdir(parents=True, exist_ok=True)
        self.storage = directory / "storage"
        self.port = free_port()
        self.token_service = TokenService(directory, self.users) if token else None
        self.process: subprocess.Popen | None = None
        self.log = directory / "registry.log"

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _config(self) -> str:
        lines = [
            "version: 0.1",
            "log: {level: info, accesslog: {disabled: true}}",
            f"storage: {{filesystem: {{rootdirectory: {self.storage}}}, delete: {{enabled: true}}}}",
            "http:",
            f"  addr: {self.host}",
            "  secret: sovpack-tests-fixed-secret",  # upload locations stay valid across a restart
        ]
        if self.tls:
            cert, key = self.tls.issue("registry")
            lines += ["  tls:", f"    certificate: {cert}", f"    key: {key}"]
        if self.token_service:
            ts = self.token_service
            lines += [
                "auth:",
                "  token:",
                f"    realm: {ts.realm}",
                f"    service: {ts.SERVICE}",
                f"    issuer: {ts.ISSUER}",
                f"    rootcertbundle: {ts.cert_file}",
            ]
        elif self.users:
            htpasswd = self.directory / "htpasswd"
            htpasswd.write_text(
                "".join(
                    subprocess.run(["htpasswd", "-Bbn", u, p], check=True, capture_output=True, text=True).stdout.strip() + "\n"
                    for u, p in self.users.items()
                )
            )
            lines += ["auth:", f"  htpasswd: {{realm: sovpack-tests, path: {htpasswd}}}"]
        return "\n".join(lines) + "\n"

    def start(self) -> Registry:
        config = self.directory / "config.yml"
        config.write_text(self._config())
        self.process = subprocess.Popen(
            [REGISTRY_BIN, "serve", str(config)], stdout=open(self.log, "ab"), stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"docker-registry exited: {self.log.read_text()[-2000:]}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"docker-registry did not start: {self.log.read_text()[-2000:]}")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.token_service:
            self.token_service.close()

    def __enter__(self) -> Registry:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def blob_path(self, digest: str) -> Path:
        """Where the registry keeps a blob's bytes (the filesystem driver's layout)."""
        hex_ = digest.removeprefix("sha256:")
        return self.storage / "docker/registry/v2/blobs/sha256" / hex_[:2] / hex_ / "data"


def sha256_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return "sha256:" + h.hexdigest()


def skopeo(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """The independent OCI client, with its own empty auth file and policy (accept anything: we check digests)."""
    env = dict(os.environ)
    return subprocess.run(["skopeo", *map(str, args)], capture_output=True, text=True, check=check, env=env, timeout=300)


# -- faults


class CuttingProxy:
    """A loopback TCP proxy to `port` that drops connections part-way through chosen requests.

    `arm(b"GET /v2/...", [N, 0, None])`: the next requests whose bytes contain the pattern are cut,
    in turn, once N bytes of the answer have passed, at once (0), or not at all (None); later ones
    pass. With `downstream=False` the request's own bytes (a PATCH body) are counted instead.
    With `late=True` (requests only) the cut request reaches the registry late, as one still in
    flight in a busy registry or a buffering proxy does: the client sees its connection dropped at
    once, but the registry gets the request's first N bytes and its end only when the next request
    with the same pattern comes, which is forwarded once the registry is done with the late one.
    With `flip=True` nothing is cut: byte N is inverted on its way (a network element that damages data).
    Everything clients send is kept in `sent` (plain HTTP only), for asserting Range requests.
    """

    def __init__(self, port: int):
        self.target = port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.sent = bytearray()
        self.lock = threading.Lock()
        self.pattern: bytes | None = None
        self.plan: list[int | None] = []
        self.downstream = True
        self.late = False
        self.flip = False  # instead of cutting at byte N, invert it and let the rest pass
        self.flips = 0
        self.held: tuple[socket.socket, bytes, threading.Event] | None = None  # a late request, not yet delivered
        self.cuts = 0
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def arm(
        self, pattern: bytes, plan: list[int | None], *, downstream: bool = True, late: bool = False, flip: bool = False
    ) -> None:
        assert not (late and downstream), "only a request can arrive late"
        with self.lock:
            self.pattern, self.plan, self.downstream, self.late, self.flip = pattern, list(plan), downstream, late, flip

    def _accept(self) -> None:
        while not self.closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.target))
            state = {"limit": None, "counted": 0, "hold": None, "answered": threading.Event()}
            threading.Thread(target=self._pump, args=(client, server, state, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, state, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, state: dict, upstream: bool) -> None:
        keep_open = None  # the registry's end of a late request, closed once it is delivered
        try:
            while data := src.recv(65536):
                cut, released = False, None
                with self.lock:
                    if upstream:
                        self.sent += data
                        released = self._release_late(data)
                        if self.plan and self.pattern and self.pattern in data:
                            state["limit"], state["counted"] = self.plan.pop(0), 0
                            state["hold"] = bytearray() if self.late and state["limit"] is not None else None
                    if state["limit"] is not None and upstream != self.downstream:
                        state["counted"] += len(data)
                        if state["counted"] > state["limit"]:
                            at = len(data) - (state["counted"] - state["limit"])
                            if self.flip:
                                data = data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1 :]
                                self.flips += 1
                            else:
                                data = data[:at]
                                cut = True
                                self.cuts += 1
                            state["limit"] = None
                    if upstream and state["hold"] is not None:
                        state["hold"] += data
                        if cut:
                            self.held, keep_open = (dst, bytes(state["hold"]), state["answered"]), dst
                        data = b""
                if upstream and released is not None:
                    self._deliver(*released)
                dst.sendall(data)
                if cut:
                    break
        except OSError:
            pass
        for s in (src, dst):
            if s is keep_open:
                continue
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()
        if not upstream:
            state["answered"].set()

    def _release_late(self, data: bytes):
        """The late request, when `data` is the next request with the same pattern (called under the lock)."""
        if self.held is None or not self.pattern or self.pattern not in data:
            return None
        held, self.held = self.held, None
        return held

    @staticmethod
    def _deliver(server: socket.socket, request: bytes, answered: threading.Event) -> None:
        """Send the late request's bytes, end it, and wait until the registry has answered it."""
        try:
            server.sendall(request)
            server.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        answered.wait(30)

    def close(self) -> None:
        self.closed = True
        self.listener.close()
