"""sovpack serve with real parts: the SmolLM2 GGUF packed and signed, `python -m sovpack serve`
as a real process on a loopback port, and the `openai` package as the client.

One server process is shared by the tests that do not need their own (module fixture);
the full queue, SIGTERM, TLS and file-changed-while-serving tests start their own.
Generations are short (temperature 0, a few tokens) except where a test needs a request
to stay busy; those force their length with min_tokens.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import httpx2 as httpx
import openai
import pytest
from builders import write_sparse_gguf
from helpers import flip_byte

from sovpack.bundle.keys import generate_key_pair
from sovpack.cli import main
from sovpack.errors import Refused
from sovpack.store.store import Store

SOVPACK = [sys.executable, "-m", "sovpack"]
CHAT = [{"role": "user", "content": "What is the capital of France?"}]
PROMPT = "The capital of France is"
KEYS = ("analyst-key-0123456789abcdef", "backup-key-fedcba9876543210")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(*args) -> int:
    return main([str(a) for a in args])


class Server:
    """`sovpack serve` as a subprocess."""

    def __init__(self, env, target, *extra, key=True, tls=None, name="server", store=None):
        self.env, self.port = env, free_port()
        self.scheme = "https" if tls else "http"
        self.verify = ssl.create_default_context(cafile=str(tls)) if tls else True
        self.key = KEYS[0] if key else None
        self.log = env.root / f"{name}-{self.port}.log"
        args = [*SOVPACK, "serve", target, "--store", store or env.store, "--port", self.port, "--ctx-size", "512", *extra]
        if key:
            args += ["--api-key-file", env.keys_file]
        if not any(str(a) == "--trust" for a in extra) and Path(str(target)).is_dir():
            args += ["--trust", env.keys / "alice.pub"]
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen([str(a) for a in args], stdout=out, stderr=subprocess.STDOUT)

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"

    def output(self) -> str:
        return self.log.read_text()

    def wait_ready(self, timeout: float = 90) -> Server:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"serve exited with {self.proc.returncode}:\n{self.output()}")
            try:
                if httpx.get(f"{self.url}/health", verify=self.verify, timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"serve did not become ready:\n{self.output()}")

    def stop(self, sig=signal.SIGTERM, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout)

    def client(self, key: str | None = "default", **kwargs) -> openai.OpenAI:
        key = self.key if key == "default" else key
        http_client = httpx.Client(verify=self.verify) if self.scheme == "https" else None
        return openai.OpenAI(
            base_url=f"{self.url}/v1", api_key=key or "none", max_retries=0, timeout=120, http_client=http_client, **kwargs
        )

    def headers(self) -> dict:
        return {"Authorization": f"Bearer {self.key}"} if self.key else {}

    def post(self, path: str, **kwargs) -> httpx.Response:
        headers = {**self.headers(), **kwargs.pop("headers", {})}
        return httpx.post(f"{self.url}{path}", headers=headers, verify=self.verify, timeout=120, **kwargs)

    def metric(self, name: str) -> float:
        text = httpx.get(f"{self.url}/metrics", headers=self.headers(), verify=self.verify, timeout=10).text
        return sum(float(line.split()[-1]) for line in text.splitlines() if line.split(" ")[0].split("{")[0] == name)

    def wait_metric(self, name: str, value: float, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while self.metric(name) != value:
            assert time.monotonic() < deadline, f"{name} never became {value} (is {self.metric(name)})"
            time.sleep(0.02)


class Env:
    def __init__(self, root: Path, gguf: Path):
        self.root = root
        self.keys = root / "keys"
        for name in ("alice", "mallory"):
            generate_key_pair(name, self.keys, "p384")
        self.model = root / "model"
        self.model.mkdir()
        _link_or_copy(gguf, self.model / gguf.name)
        self.gguf_name = gguf.name
        self.bundle = self.pack("bundle")
        self.store = root / "store"
        self.store.mkdir()  # serve audits in a store, which it does not create
        self.keys_file = root / "api-keys.txt"
        self.keys_file.write_text("# analysts\n" + KEYS[0] + "\n\n# backup\n" + KEYS[1] + "\n")
        self.keys_file.chmod(0o600)

    def pack(self, name: str, *extra, sign: bool = True) -> Path:
        bundle = self.root / name
        assert run("pack", self.model, "--out", bundle, "--name", "smollm2", *extra) == 0
        if sign:
            assert run("sign", bundle, "--key", self.keys / "alice.key") == 0
        return bundle

    def copy_bundle(self, name: str) -> Path:
        """A copy with its own inodes (the packed bundle hard-links the cached model)."""
        target = self.root / name
        shutil.copytree(self.bundle, target)
        return target

    def audit(self) -> list[dict]:
        return Store(self.store).audit.records()

    def access_log(self) -> list[dict]:
        path = self.store / "logs" / "access.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    def wait_access_record(self, match, timeout: float = 10) -> dict:
        """The last access record `match` accepts; a record is written just after its response's last byte."""
        deadline = time.monotonic() + timeout
        while not (found := [r for r in self.access_log() if match(r)]):
            assert time.monotonic() < deadline, "no such access log record"
            time.sleep(0.02)
        return found[-1]


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


@pytest.fixture(scope="module")
def env(tmp_path_factory, smollm_gguf) -> Env:
    return Env(tmp_path_factory.mktemp("serve"), smollm_gguf)


@pytest.fixture(scope="module")
def server(env):
    s = Server(env, env.bundle, "--parallel", "2", "--max-queue", "8", "--cors-origin", "https://chat.example.mil", name="main")
    s.wait_ready()
    yield s
    assert s.stop() == 0, s.output()


# the API, through the openai package


def test_chat_completion(server, env):
    reply = server.client().chat.completions.create(model="smollm2", messages=CHAT, max_tokens=12, temperature=0)
    assert reply.model == "smollm2"
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content.strip()
    assert reply.usage.completion_tokens <= 12 and reply.usage.prompt_tokens > 5
    record = env.wait_access_record(lambda r: r["path"] == "/v1/chat/completions" and r["status"] == 200)
    assert record["key_id"] == hashlib.sha256(KEYS[0].encode()).hexdigest()[:12]
    assert record["prompt_tokens"] == reply.usage.prompt_tokens and record["completion_tokens"] == reply.usage.completion_tokens
    assert "prompt" not in record
    log_text = (env.store / "logs" / "access.jsonl").read_text()
    assert KEYS[0] not in log_text and "capital of France" not in log_text


def test_streamed_completion(server):
    stream = server.client().completions.create(
        model="smollm2", prompt=PROMPT, max_tokens=8, temperature=0, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert "Paris" in text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("length", "stop")
    assert chunks[-1].usage.completion_tokens == 8 and chunks[-1].usage.prompt_tokens > 0


def test_streamed_chat(server):
    chunks = list(
        server.client().chat.completions.create(model="smollm2", messages=CHAT, max_tokens=10, temperature=0, stream=True)
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks).strip()
    assert chunks[-1].choices[0].finish_reason in ("length", "stop")


def test_model_list(server, env):
    models = server.client().models.list().data
    assert [m.id for m in models] == ["smollm2"]
    card = models[0].model_dump()["sovpack"]
    signed = json.loads((env.bundle / "sovpack.json").read_text())["files"][0]
    assert card["sha256"] == signed["sha256"] and card["file"] == env.gguf_name
    assert card["chat_template_sha256"] == signed["details"]["chat_template_sha256"]
    assert card["signers"][0].startswith("alice")
    assert server.client().models.retrieve("smollm2").id == "smollm2"
    assert server.client().models.retrieve("smollm2@1").id == "smollm2"
    with pytest.raises(openai.NotFoundError) as e:
        server.client().models.retrieve("gpt-4o")
    assert e.value.body["code"] == "model_not_found" and "smollm2" in e.value.body["message"]


def test_four_concurrent_streams_all_complete(server):
    client = server.client()
    results: dict[int, tuple[str, str | None]] = {}

    def one(i: int) -> None:
        stream = client.chat.completions.create(model="smollm2", messages=CHAT, max_tokens=16, temperature=0, stream=True)
        text, finish = "", None
        for chunk in stream:
            text += chunk.choices[0].delta.content or ""
            finish = chunk.choices[0].finish_reason or finish
        results[i] = (text, finish)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert len(results) == 4
    # every answer is complete: text, and a finish reason (greedy decoding may still differ by a
    # token between slots whose KV caches hold different prefixes, so the texts are not compared)
    assert all(text.strip() and finish in ("length", "stop") for text, finish in results.values()), results


def test_embeddings_not_supported_by_a_generative_model(server):
    with pytest.raises(openai.BadRequestError) as e:
        server.client().embeddings.create(model="smollm2", input="hello")
    assert e.value.body["code"] == "embeddings_not_supported"


def test_metrics(server):
    server.client().completions.create(model="smollm2", prompt=PROMPT, max_tokens=4, temperature=0)
    text = httpx.get(f"{server.url}/metrics", headers=server.headers()).text
    assert 'sovpack_requests_total{path="/v1/completions",status="200"}' in text
    for name in (
        "sovpack_prompt_tokens_total",
        "sovpack_completion_tokens_total",
        "sovpack_queue_depth",
        "sovpack_request_duration_seconds_bucket",
        "sovpack_slots_total 2",
    ):
        assert name in text
    assert server.metric("sovpack_completion_tokens_total") >= 4


# security


def test_missing_and_wrong_api_keys_get_401(server):
    with pytest.raises(openai.AuthenticationError) as e:
        server.client(key=None).models.list()
    assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        server.client(key="analyst-key-0123456789abcdeX").chat.completions.create(model="smollm2", messages=CHAT, max_tokens=2)
    assert server.client(key=KEYS[1]).models.list().data[0].id == "smollm2"  # the second key in the file
    assert httpx.get(f"{server.url}/metrics").status_code == 401
    assert httpx.get(f"{server.url}/health").status_code == 200  # no key needed


def test_unauthenticated_garbage_gets_401_not_400(server):
    r = httpx.post(f"{server.url}/v1/chat/completions", content=b"{not json")
    assert r.status_code == 401


def test_cors_only_for_listed_origins(server):
    preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization,content-type"}
    allowed = httpx.options(f"{server.url}/v1/chat/completions", headers={"Origin": "https://chat.example.mil", **preflight})
    assert allowed.headers.get("access-control-allow-origin") == "https://chat.example.mil"
    other = httpx.options(f"{server.url}/v1/chat/completions", headers={"Origin": "https://evil.example", **preflight})
    assert "access-control-allow-origin" not in other.headers


def test_oversized_body_gets_413(server):
    with pytest.raises(openai.APIStatusError) as e:
        server.client().chat.completions.create(
            model="smollm2", messages=[{"role": "user", "content": "x" * 1_200_000}], max_tokens=2
        )
    assert e.value.status_code == 413 and e.value.body["code"] == "request_too_large"


# bad requests: OpenAI-style errors, and the server keeps serving


def test_malformed_json(server):
    r = server.post("/v1/chat/completions", content=b'{"messages": [', headers={"Content-Type": "application/json"})
    assert r.status_code == 400
    assert set(r.json()["error"]) == {"message", "type", "param", "code"} and r.json()["error"]["code"] == "invalid_json"


@pytest.mark.parametrize("max_tokens", [-1, 0, 10**9])
def test_max_tokens_out_of_range(server, max_tokens):
    with pytest.raises(openai.BadRequestError) as e:
        server.client().chat.completions.create(model="smollm2", messages=CHAT, max_tokens=max_tokens)
    assert e.value.body["param"] == "max_tokens" and "1 to 512" in e.value.body["message"]


def test_prompt_larger_than_the_context(server):
    with pytest.raises(openai.BadRequestError) as e:
        server.client().completions.create(model="smollm2", prompt="hello " * 1000, max_tokens=4)
    assert e.value.body["code"] == "context_length_exceeded" and "512" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        server.client().chat.completions.create(
            model="smollm2", messages=[{"role": "user", "content": "hello " * 1000}], max_tokens=4
        )
    assert e.value.body["param"] == "messages"


def test_unknown_model_missing_messages_and_n(server):
    client = server.client()
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4o", messages=CHAT, max_tokens=2)
    assert e.value.body["code"] == "model_not_found" and "smollm2" in e.value.body["message"]
    r = server.post("/v1/chat/completions", json={"model": "smollm2", "max_tokens": 2})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="smollm2", messages=CHAT, max_tokens=2, n=5)  # beyond the default --max-n 4
    assert e.value.body["param"] == "n"
    r = server.post("/v1/chat/completions", json={"messages": [{"role": "wizard", "content": "hi"}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages.0.role"
    assert client.chat.completions.create(model="smollm2", messages=CHAT, max_tokens=2).choices[0].message.content is not None


def test_client_disconnecting_mid_stream_frees_its_slot(server, env):
    body = {"prompt": PROMPT, "max_tokens": 400, "min_tokens": 400, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, headers=server.headers(), timeout=60) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        assert next(line for line in lines if line.startswith("data:"))
    left = time.monotonic()
    server.wait_metric("sovpack_slots_busy", 0, timeout=10)
    assert time.monotonic() - left < 2.0  # 400 tokens take several seconds: the generation was stopped, not finished
    reply = server.client().completions.create(model="smollm2", prompt=PROMPT, max_tokens=4, temperature=0)
    assert reply.choices[0].text
    assert server.metric("sovpack_client_disconnects_total") >= 1
    assert env.wait_access_record(lambda r: r["outcome"] == "client_disconnected" and r["path"] == "/v1/completions")


# the queue, shutdown, TLS: servers of their own


def test_full_queue_answers_503_with_retry_after(env):
    s = Server(env, env.bundle, "--parallel", "1", "--max-queue", "1", name="queue").wait_ready()
    try:
        client = s.client()
        long = {"prompt": PROMPT, "max_tokens": 200, "temperature": 0, "extra_body": {"min_tokens": 200}}
        busy = threading.Thread(target=lambda: client.completions.create(model="smollm2", **long))
        busy.start()
        s.wait_metric("sovpack_slots_busy", 1)
        queued_result = {}
        queued = threading.Thread(
            target=lambda: queued_result.update(r=client.completions.create(model="smollm2", prompt=PROMPT, max_tokens=4))
        )
        queued.start()
        s.wait_metric("sovpack_queue_depth", 1)
        with pytest.raises(openai.APIStatusError) as e:
            client.completions.create(model="smollm2", prompt=PROMPT, max_tokens=4)
        assert e.value.status_code == 503 and e.value.body["code"] == "queue_full"
        assert int(e.value.response.headers["retry-after"]) >= 1
        busy.join(120)
        queued.join(120)
        assert queued_result["r"].choices[0].text  # the queued request was served, not dropped
        assert s.metric("sovpack_queue_rejections_total") == 1
    finally:
        assert s.stop() == 0, s.output()


def test_sigterm_lets_the_stream_in_flight_finish(env):
    s = Server(env, env.bundle, name="sigterm").wait_ready()
    body = {
        "prompt": PROMPT,
        "max_tokens": 200,
        "min_tokens": 200,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    chunks = []
    with httpx.stream("POST", f"{s.url}/v1/completions", json=body, headers=s.headers(), timeout=60) as r:
        for line in r.iter_lines():
            if not line.startswith("data:"):
                continue
            chunks.append(line[5:].strip())
            if len(chunks) == 1:
                s.proc.send_signal(signal.SIGTERM)
    assert chunks[-1] == "[DONE]"
    assert json.loads(chunks[-2])["usage"]["completion_tokens"] == 200
    assert json.loads(chunks[-3])["choices"][0]["finish_reason"] == "length"
    assert s.proc.wait(60) == 0, s.output()
    stop = [r for r in env.audit() if r["event"] == "serve-stop"][-1]
    assert stop["reason"] == "signal SIGTERM" and stop["pid"] == s.proc.pid
    start = [r for r in env.audit() if r["event"] == "serve-start" and r["pid"] == s.proc.pid][-1]
    assert start["url"] == s.url and start["loopback_only"] is True  # judged on the address bound
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{s.url}/health")


@pytest.fixture(scope="module")
def big_bundle(env) -> Path:
    """A signed bundle whose GGUF takes most of a second to verify (2 GiB, a hole on disk)."""
    write_sparse_gguf(env.root / "big-model" / "big.gguf", 2 << 30)
    bundle = env.root / "big-bundle"
    assert run("pack", env.root / "big-model", "--out", bundle, "--name", "big") == 0
    assert run("sign", bundle, "--key", env.keys / "alice.key") == 0
    return bundle


@pytest.mark.parametrize(
    ("sig", "message"),
    [(signal.SIGTERM, "stopped by SIGTERM while verifying, before serving anything"), (signal.SIGINT, "interrupted")],
)
def test_a_signal_during_verification_stops_serve_with_an_audit_record(env, big_bundle, sig, message):
    s = Server(env, big_bundle, name=f"verify-{sig.name}")
    deadline = time.monotonic() + 30
    while "verifying" not in s.output():
        assert time.monotonic() < deadline and s.proc.poll() is None, s.output()
        time.sleep(0.01)
    s.proc.send_signal(sig)
    assert s.proc.wait(30) == 130, s.output()
    assert f"error: {message}" in s.output()
    records = [r for r in env.audit() if r["pid"] == s.proc.pid]
    assert [r["event"] for r in records] == ["serve-refused"], records  # never started
    assert records[0]["exit_code"] == 130 and records[0]["reason"].startswith(message)
    assert records[0]["bundle"] == str(big_bundle.resolve())


def test_shutdown_timeout_zero_cancels_the_stream_at_once(env):
    s = Server(env, env.bundle, "--shutdown-timeout", "0", name="timeout0").wait_ready()
    body = {"prompt": PROMPT, "max_tokens": 400, "min_tokens": 400, "temperature": 0, "stream": True}
    chunks = []
    # cut short: the connection closes before [DONE]
    with (
        pytest.raises(httpx.HTTPError),
        httpx.stream("POST", f"{s.url}/v1/completions", json=body, headers=s.headers(), timeout=60) as r,
    ):
        for line in r.iter_lines():
            chunks.append(line)
            if len(chunks) == 1:
                s.proc.send_signal(signal.SIGTERM)
    assert "data: [DONE]" not in chunks
    assert s.proc.wait(15) == 0, s.output()  # 0 means no grace period, not "wait forever"


def test_tls(env):
    cert, key = _self_signed(env.root / "tls")
    s = Server(env, env.bundle, "--tls-cert", cert, "--tls-key", key, tls=cert, name="tls").wait_ready()
    try:
        reply = s.client().chat.completions.create(model="smollm2", messages=CHAT, max_tokens=4, temperature=0)
        assert reply.choices[0].message.content is not None
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"http://127.0.0.1:{s.port}/health", timeout=5)  # plain HTTP is not spoken
    finally:
        assert s.stop() == 0, s.output()


def test_a_served_file_changing_stops_the_server(env):
    bundle = env.copy_bundle("changing")
    s = Server(env, bundle, key=False, name="changing").wait_ready()
    body = {"prompt": PROMPT, "max_tokens": 300, "min_tokens": 300, "temperature": 0, "stream": True}
    try:
        with httpx.stream("POST", f"{s.url}/v1/completions", json=body, timeout=60) as stream:
            events = (line[6:] for line in stream.iter_lines() if line.startswith("data: "))
            next(events)  # the stream is running
            flip_byte(bundle / env.gguf_name, (bundle / env.gguf_name).stat().st_size // 2)
            r = httpx.post(f"{s.url}/v1/completions", json={"prompt": PROMPT, "max_tokens": 2}, timeout=30)
            assert r.status_code == 503 and r.json()["error"]["code"] == "integrity_check_failed"
            assert env.gguf_name in r.json()["error"]["message"]
            last = json.loads(list(events)[-1])
        assert last["error"]["code"] == "generation_interrupted"  # cut short, and told so: not a silent "stop"
        assert s.proc.wait(60) == 1
    finally:
        s.stop()
    assert any(r["event"] == "serve-refused" and "changed after it was verified" in r["reason"] for r in env.audit())


def test_a_hard_link_to_a_served_file_is_rechecked_not_fatal(server, env):
    link = env.root / "another-name.gguf"
    os.link(env.bundle / env.gguf_name, link)  # what the store's dedup does; it moves the inode's ctime
    try:
        reply = server.client().completions.create(model="smollm2", prompt=PROMPT, max_tokens=2, temperature=0)
        assert reply.choices[0].text is not None
        deadline = time.monotonic() + 30
        while "still matches the signed digests" not in server.output():
            assert time.monotonic() < deadline, server.output()
            time.sleep(0.05)
        assert httpx.get(f"{server.url}/health").status_code == 200
    finally:
        link.unlink()


def _self_signed(directory: Path) -> tuple[Path, Path]:
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    directory.mkdir(exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.now(timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    (directory / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (directory / "key.pem").write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    (directory / "key.pem").chmod(0o600)
    return directory / "cert.pem", directory / "key.pem"


def test_serve_by_name_from_the_store(env, cli):
    store, volumes = env.root / "imported", env.root / "volumes"
    assert run("export", env.bundle, "--to", volumes) == 0
    assert run("trust", "add", env.keys / "alice.pub", "--store", store) == 0
    assert run("import", volumes, "--store", store) == 0
    for attempt, digests in enumerate(("every byte hashed", "unchanged since a recorded full check")):
        s = Server(env, "smollm2", "--log-prompts", key=False, store=store, name=f"by-name-{attempt}").wait_ready()
        try:
            assert digests in s.output()
            reply = s.client().chat.completions.create(model="smollm2@1", messages=CHAT, max_tokens=4, temperature=0)
            assert reply.model == "smollm2"
        finally:
            assert s.stop() == 0, s.output()
    logged = [json.loads(line) for line in (store / "logs" / "access.jsonl").read_text().splitlines()]
    assert logged[-1]["prompt"] == CHAT and logged[-1]["key_id"] is None  # --log-prompts; no keys on loopback
    assert [r["event"] for r in Store(store).audit.records() if r["event"].startswith("serve")] == [
        "serve-start",
        "serve-stop",
    ] * 2
    assert run("trust", "remove", "alice", "--store", store) == 0
    result = cli("serve", "smollm2", "--store", store, "--port", free_port())
    assert result.code == 1 and "still trusted" in result.err  # revoked: the record alone is not enough


# refusals: the command exits before serving anything


def _serve(cli, env, target, *extra):
    return cli("serve", target, "--store", env.store, "--port", free_port(), *extra)


def test_tampered_gguf_is_refused(cli, env):
    bundle = env.copy_bundle("tampered")
    flip_byte(bundle / env.gguf_name, (bundle / env.gguf_name).stat().st_size // 2)
    result = _serve(cli, env, bundle, "--trust", env.keys / "alice.pub")
    assert result.code == 1, result.err
    assert env.gguf_name in result.err and "does not match" in result.err
    refused = [r for r in env.audit() if r["event"] == "serve-refused"][-1]
    assert refused["step"] == "digests" and env.gguf_name in refused["reason"]


def test_expired_bundle_is_refused(cli, env):
    bundle = env.pack("expired", "--expires", "2020-01-01")
    result = _serve(cli, env, bundle, "--trust", env.keys / "alice.pub")
    assert result.code == 1 and "expired on 2020-01-01" in result.err


def test_unsigned_bundle_is_refused(cli, env):
    bundle = env.pack("unsigned", sign=False)
    result = _serve(cli, env, bundle, "--trust", env.keys / "alice.pub")
    assert result.code == 1 and "no signatures" in result.err


def test_untrusted_signer_is_refused(cli, env):
    result = _serve(cli, env, env.bundle, "--trust", env.keys / "mallory.pub")
    assert result.code == 1 and "threshold not met" in result.err


def test_non_loopback_bind_without_keys_is_refused(cli, env):
    result = _serve(cli, env, env.bundle, "--trust", env.keys / "alice.pub", "--host", "0.0.0.0")
    assert result.code == 2 and "--api-key-file" in result.err


def test_port_in_use(cli, env):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = cli("serve", env.bundle, "--trust", env.keys / "alice.pub", "--store", env.store, "--port", port)
    assert result.code == 3 and f"port {port}" in result.err and "another process" in result.err


def test_missing_tls_file_and_wildcard_cors(cli, env, tmp_path):
    result = _serve(
        cli,
        env,
        env.bundle,
        "--trust",
        env.keys / "alice.pub",
        "--tls-cert",
        tmp_path / "no.pem",
        "--tls-key",
        tmp_path / "no.key",
    )
    assert result.code == 2 and "no.pem" in result.err
    result = _serve(cli, env, env.bundle, "--trust", env.keys / "alice.pub", "--cors-origin", "*")
    assert result.code == 2 and "wildcard" in result.err


def test_api_key_file_errors_name_the_file(cli, env, tmp_path):
    trust = ("--trust", env.keys / "alice.pub")
    missing = tmp_path / "no-keys.txt"
    result = _serve(cli, env, env.bundle, *trust, "--api-key-file", missing)
    assert result.code == 2 and f"--api-key-file {missing} does not exist" in result.err
    for name, content, problem in (
        ("binary.txt", b"\xff\xfe not text\n", "cannot read --api-key-file"),
        ("comments.txt", b"# only a comment\n\n", "holds no keys"),
        ("short.txt", b"short-key\n", "key 1 is shorter than 16 characters"),
    ):
        path = tmp_path / name
        path.write_bytes(content)
        path.chmod(0o600)
        result = _serve(cli, env, env.bundle, *trust, "--api-key-file", path)
        assert result.code == 2 and problem in result.err and str(path) in result.err, result.err


def test_a_key_file_others_can_read_gets_a_warning(cli, env, tmp_path):
    keys = tmp_path / "shared-keys.txt"
    keys.write_text(KEYS[0] + "\n")
    keys.chmod(0o644)
    result = _serve(cli, env, env.bundle, "--trust", env.keys / "alice.pub", "--api-key-file", keys, "--variant", "Q8_0")
    assert result.code == 2  # stopped by the unknown variant, after the warning
    assert f"warning: --api-key-file {keys} is readable by other users (mode 644); chmod 600 it" in result.err


def test_an_audit_log_that_cannot_be_written_means_no_serving(cli, env, tmp_path):
    store = tmp_path / "store"
    (store / "audit.log").mkdir(parents=True)  # serve-start cannot be appended
    result = cli("serve", env.bundle, "--trust", env.keys / "alice.pub", "--store", store, "--port", free_port())
    assert result.code == 3, result.err
    assert f"cannot write the audit log {store / 'audit.log'}" in result.err and "refusing to serve unaudited" in result.err


def test_unknown_variant(cli, env):
    result = _serve(cli, env, env.bundle, "--trust", env.keys / "alice.pub", "--variant", "Q8_0")
    assert result.code == 2 and "Q4_1 (SmolLM2-135M-Instruct.Q4_1.gguf)" in result.err


def _tiny_bundle(env, name: str, *gguf_names: str) -> Path:
    """A signed bundle of small GGUF files (valid, but not models llama.cpp can run)."""
    from builders import write_gguf

    model = env.root / f"{name}-model"
    for gguf_name in gguf_names:
        write_gguf(model / gguf_name)
    bundle = env.root / name
    assert run("pack", model, "--out", bundle, "--name", "tiny") == 0
    assert run("sign", bundle, "--key", env.keys / "alice.key") == 0
    return bundle


def test_several_ggufs_need_a_variant_that_names_one(cli, env):
    bundle = _tiny_bundle(env, "two-ggufs", "tiny-a.gguf", "tiny-b.gguf")
    result = _serve(cli, env, bundle, "--trust", env.keys / "alice.pub")
    assert result.code == 2 and "F32 (tiny-a.gguf), F32 (tiny-b.gguf); choose one with --variant" in result.err
    result = _serve(cli, env, bundle, "--trust", env.keys / "alice.pub", "--variant", "f32")
    assert result.code == 2 and "several GGUF models" in result.err and "give the file path as --variant" in result.err


def test_a_split_gguf_missing_a_part_is_a_usage_error(cli, env):
    bundle = _tiny_bundle(env, "split-missing", "tiny-00001-of-00002.gguf")
    result = _serve(cli, env, bundle, "--trust", env.keys / "alice.pub")
    assert result.code == 2, result.err
    assert "tiny-00001-of-00002.gguf is part 1 of 2 but the bundle lacks tiny-00002-of-00002.gguf" in result.err


def test_missing_serve_extra(cli, env, monkeypatch):
    monkeypatch.setitem(sys.modules, "fastapi", None)  # what an install without the extra looks like
    result = _serve(cli, env, env.bundle, "--trust", env.keys / "alice.pub")
    assert result.code == 3 and "sovpack[serve]" in result.err


def test_a_uvicorn_without_the_internals_serve_overrides(cli, env, monkeypatch):
    import uvicorn

    monkeypatch.delattr(uvicorn.Server, "capture_signals")  # what uvicorn before 0.29 looks like
    result = _serve(cli, env, env.bundle, "--trust", env.keys / "alice.pub")
    assert result.code == 3 and f"uvicorn {uvicorn.__version__} lacks uvicorn.Server.capture_signals" in result.err


@pytest.mark.parametrize(
    ("option", "message"),
    [
        (("--parallel", "0"), "--parallel 0: must be 1 or more"),
        (("--ctx-size", "1"), "--ctx-size 1: must be 64 or more"),
        (("--shutdown-timeout", "-1"), "--shutdown-timeout -1.0: give a number of seconds, 0 or more"),
        (("--n-gpu-layers", "lots"), "--n-gpu-layers 'lots': give auto, a number of layers, or -1 for all"),
        (("--max-request-size", "12Q"), "--max-request-size '12Q': give bytes or a size like"),
        (("--cors-origin", "chat.example.mil"), "--cors-origin 'chat.example.mil': give a scheme and host"),
        (("--host", "no-such-host.invalid"), "--host no-such-host.invalid: cannot resolve it"),
    ],
)
def test_a_bad_option_is_a_usage_error_naming_it(cli, env, option, message):
    result = _serve(cli, env, env.bundle, "--trust", env.keys / "alice.pub", *option)
    assert result.code == 2 and message in result.err, result.err


def test_an_access_log_that_cannot_be_opened_fails_before_verification(cli, env):
    result = _serve(cli, env, env.bundle, "--trust", env.keys / "alice.pub", "--access-log", env.root)  # a directory
    assert result.code == 3 and f"cannot open the access log {env.root}" in result.err, result.err
    assert "verifying" not in result.err


def test_not_installed_name(cli, env):
    result = _serve(cli, env, "no-such-model")
    assert result.code == 2 and "not installed" in result.err


def test_a_directory_argument_is_a_bundle_as_for_verify(cli, env, monkeypatch):
    monkeypatch.chdir(env.root)  # holds model/, a directory that is not a bundle
    result = _serve(cli, env, "model")
    assert result.code == 2 and "model is not a sovpack bundle" in result.err


def test_a_verified_gguf_llama_cpp_cannot_load_exits_3(env):
    bundle = _tiny_bundle(env, "unloadable", "tiny-F32.gguf")  # valid GGUF, but no llama model in it
    s = Server(env, bundle, key=False, name="unloadable")
    assert s.proc.wait(60) == 3, s.output()
    assert "llama.cpp could not load tiny-F32.gguf" in s.output()
    records = [r for r in env.audit() if r["pid"] == s.proc.pid]
    assert [r["event"] for r in records] == ["serve-start", "serve-stop"]  # a failure, not a refusal
    assert records[-1]["reason"] == "failure" and "tiny-F32.gguf" in records[-1]["error"]


# verification internals, on the real files


def test_fast_path_skips_rehash_only_for_unchanged_read_only_files(env):
    from sovpack.server.fingerprint import VerificationRecords
    from sovpack.server.target import resolve_target
    from sovpack.server.verification import verify_for_serving

    bundle = env.copy_bundle("readonly")
    gguf = bundle / env.gguf_name
    records = VerificationRecords(env.root / "records-store")
    target = resolve_target(str(bundle), Store(env.store), (env.keys / "alice.pub",), None)
    assert verify_for_serving(target, None, records=records, full_verify=False).digests == "full"
    assert verify_for_serving(target, None, records=records, full_verify=False).digests == "full"  # writable: never recorded
    gguf.chmod(0o444)
    assert verify_for_serving(target, None, records=records, full_verify=False).digests == "full"
    assert verify_for_serving(target, None, records=records, full_verify=False).digests == "recorded"
    assert verify_for_serving(target, None, records=records, full_verify=True).digests == "full"
    gguf.chmod(0o644)
    flip_byte(gguf, gguf.stat().st_size // 2)
    gguf.chmod(0o444)  # mode restored, but the ctime moved: the record no longer vouches for it
    with pytest.raises(Refused, match="does not match"):
        verify_for_serving(target, None, records=records, full_verify=False)


def _force_sign(bundle: Path, key_file: Path) -> None:
    """Sign whatever sovpack.json says, bypassing `sign`'s own checks (as a buggy or hostile tool would)."""
    from sovpack.bundle.directory import read_metadata, read_metadata_bytes
    from sovpack.bundle.keys import key_id, load_private_key
    from sovpack.bundle.sign import statement_for
    from sovpack.bundle.signature import sign_statement
    from sovpack.common.hashing import sha256_bytes

    key = load_private_key(key_file)
    payload = statement_for(read_metadata(bundle), sha256_bytes(read_metadata_bytes(bundle)))
    (bundle / "signatures" / f"{key_id(key.public_key())}.sig").write_bytes(sign_statement(key, payload))


def test_a_record_that_cannot_be_saved_is_said_not_silent(env):
    from sovpack.server.fingerprint import RECORD_FILE, VerificationRecords
    from sovpack.server.target import resolve_target
    from sovpack.server.verification import verify_for_serving

    bundle = env.copy_bundle("record-unsaved")
    (bundle / env.gguf_name).chmod(0o444)  # read-only: worth recording
    store_root = env.root / "record-unsaved-store"
    (store_root / RECORD_FILE).mkdir(parents=True)  # verified.json cannot be written
    target = resolve_target(str(bundle), Store(env.store), (env.keys / "alice.pub",), None)
    said = []
    model = verify_for_serving(target, None, records=VerificationRecords(store_root), full_verify=False, say=said.append)
    assert model.digests == "full"
    assert len(said) == 1 and said[0].startswith(f"warning: cannot record this full check in {store_root / RECORD_FILE}"), said


def test_a_signed_chat_template_digest_that_is_not_the_files_is_refused(cli, env):
    bundle = env.copy_bundle("template-digest")
    metadata = json.loads((bundle / "sovpack.json").read_text())
    metadata["files"][0]["details"]["chat_template_sha256"] = "0" * 64
    (bundle / "sovpack.json").write_text(json.dumps(metadata, indent=2))
    _force_sign(bundle, env.keys / "alice.key")  # the signature covers the false digest
    result = _serve(cli, env, bundle, "--trust", env.keys / "alice.pub")
    assert result.code == 1, result.err
    assert f"{env.gguf_name}: chat template SHA-256" in result.err and "0" * 64 in result.err
    refused = [r for r in env.audit() if r["event"] == "serve-refused"][-1]
    assert refused["step"] == "formats"


def test_llama_cpp_must_load_the_verified_chat_template(env):
    import dataclasses

    from sovpack.server.engine import Engine, EngineSettings
    from sovpack.server.target import resolve_target
    from sovpack.server.verification import verify_for_serving

    target = resolve_target(str(env.bundle), Store(env.store), (env.keys / "alice.pub",), None)
    model = verify_for_serving(target, None, records=None, full_verify=True)
    assert model.chat_template  # the verified text; llama.cpp reads its own copy when loading
    other = dataclasses.replace(model, chat_template=model.chat_template + " ")
    engine = Engine(other, EngineSettings(ctx_size=64, parallel=1, threads=1, n_gpu_layers=0, max_queue=0))
    try:
        with pytest.raises(Refused, match=f"{env.gguf_name}: llama.cpp loaded a chat template that is not the verified one"):
            engine.load()
    finally:
        engine.close()


def test_altered_metadata_naming_no_gguf_is_refused_not_a_usage_error(cli, env):
    bundle = env.copy_bundle("no-gguf-claimed")
    metadata = bundle / "sovpack.json"
    text = metadata.read_text()
    assert text.count('"format": "gguf"') == 1
    metadata.write_text(text.replace('"format": "gguf"', '"format": "data"'))  # after signing
    result = _serve(cli, env, bundle, "--trust", env.keys / "alice.pub")
    assert result.code == 1, result.err
    assert "sovpack.json" in result.err and "quantize" not in result.err, result.err
    refused = [r for r in env.audit() if r["event"] == "serve-refused"][-1]
    assert refused["bundle"] == str(bundle.resolve()) and refused["exit_code"] == 1
