"""sovpack serve against hostile requests, files and clients, with the real SmolLM2 model and real processes.

- llama.cpp cannot take the server down: a worker process killed with SIGSEGV mid-stream and
  mid-request, and a grammar that makes llama.cpp itself segfault when a job carries it past
  the grammar check (a request sending it gets a 400); the request gets a 500
  `engine_failed`, the crash is audited, /health says 503 while the engine is verified again
  and restarted, then 200;
- the bytes llama.cpp maps are the bytes verified: the swap-and-restore attack on the GGUF,
  and the memory-map check on its own;
- slow clients: idle, half-head and half-body connections time out or are displaced, and
  /health and an authenticated request still answer while 200 of them are open.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx2 as httpx
import pytest
from helpers import flip_byte
from test_serve import KEYS, PROMPT, Env, Server, run

from sovpack.errors import Refused
from sovpack.store.store import Store

LEFT_RECURSIVE = 'root ::= root "a" | "a"'  # llama.cpp's grammar engine recurses on it until the stack overflows


@pytest.fixture(scope="module")
def env(tmp_path_factory, smollm_gguf) -> Env:
    return Env(tmp_path_factory.mktemp("serve-safety"), smollm_gguf)


def workers(pid: int) -> list[int]:
    """The engine's worker processes: the children of serve."""
    children = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        children += [int(c) for c in (task / "children").read_text().split()]
    return children


def wait_for(condition, timeout: float = 60, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)
    return value


def health(server: Server) -> tuple[int, str]:
    try:
        r = httpx.get(f"{server.url}/health", timeout=5)
        return r.status_code, r.json().get("status")
    except httpx.HTTPError:
        return 0, "unreachable"


def statuses_until_ready(server: Server, timeout: float = 60) -> list[str]:
    """Poll /health until it says 200; the statuses seen on the way."""
    seen = []
    deadline = time.monotonic() + timeout
    while True:
        code, status = health(server)
        seen.append(status)
        if code == 200:
            return seen
        assert time.monotonic() < deadline and server.proc.poll() is None, (seen[-5:], server.output())
        time.sleep(0.01)


# 5. llama.cpp cannot take the server down


@pytest.fixture(scope="module")
def crash_server(env):
    s = Server(env, env.bundle, "--parallel", "1", name="crash").wait_ready()
    yield s
    assert s.stop() == 0, s.output()


def long_body(stream: bool) -> dict:
    return {"prompt": PROMPT, "max_tokens": 400, "min_tokens": 400, "temperature": 0, "stream": stream}


def test_a_worker_killed_mid_stream_answers_engine_failed_and_is_restarted_after_verification(crash_server, env):
    s = crash_server
    (before,) = workers(s.proc.pid)
    with httpx.stream("POST", f"{s.url}/v1/completions", json=long_body(True), headers=s.headers(), timeout=60) as stream:
        events = (line[6:] for line in stream.iter_lines() if line.startswith("data: "))
        next(events)  # generating, token by token
        os.kill(before, signal.SIGSEGV)
        last = json.loads(list(events)[-1])
    assert last["error"]["code"] == "engine_failed" and "SIGSEGV" in last["error"]["message"], last
    seen = statuses_until_ready(s)
    assert "restarting" in seen, seen  # /health said 503 while the model was verified again and reloaded
    (after,) = workers(s.proc.pid)
    assert after != before
    reply = s.client().completions.create(model="smollm2", prompt=PROMPT, max_tokens=3, temperature=0)
    assert reply.choices[0].text
    failed = [r for r in env.audit() if r["event"] == "serve-engine-failed" and r["worker_pid"] == before]
    assert len(failed) == 1 and failed[0]["status"] == "killed by SIGSEGV" and failed[0]["during_request"], failed
    restarted = [r for r in env.audit() if r["event"] == "serve-engine-restarted" and after in r["workers"]]
    assert len(restarted) == 1 and restarted[0]["pid"] == s.proc.pid
    record = env.wait_access_record(lambda r: r.get("error") == "engine_failed" and r["stream"])
    assert record["status"] == 200 and record["outcome"] == "error"  # the stream had begun: the error came in it
    assert s.metric("sovpack_engine_failures_total") >= 1
    assert "verifying the model again" in s.output() and "ready again" in s.output()


def test_a_worker_killed_before_answering_gives_500_engine_failed(crash_server, env):
    s = crash_server
    (worker,) = workers(s.proc.pid)
    result = {}

    def ask():
        result["response"] = s.post("/v1/completions", json=long_body(False))

    import threading

    asking = threading.Thread(target=ask)
    asking.start()
    s.wait_metric("sovpack_slots_busy", 1)
    time.sleep(0.3)  # well inside the 400 tokens
    os.kill(worker, signal.SIGKILL)  # as the kernel's out-of-memory killer does
    asking.join(60)
    r = result["response"]
    assert r.status_code == 500, r.text
    error = r.json()["error"]
    assert error["code"] == "engine_failed" and error["type"] == "server_error" and "SIGKILL" in error["message"]
    statuses_until_ready(s)
    reply = s.client().chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": "Hi"}], max_tokens=3, temperature=0
    )
    assert reply.choices[0].message.content is not None
    assert any(r["event"] == "serve-engine-failed" and r["status"] == "killed by SIGKILL" for r in env.audit())


def test_a_request_waiting_for_the_slot_is_served_by_the_new_worker(crash_server):
    import threading

    s = crash_server
    (worker,) = workers(s.proc.pid)
    answers = {}

    def ask(name: str, body: dict):
        answers[name] = s.post("/v1/completions", json=body)

    running = threading.Thread(target=ask, args=("running", long_body(False)))
    running.start()
    s.wait_metric("sovpack_slots_busy", 1)
    waiting = threading.Thread(target=ask, args=("waiting", {"prompt": PROMPT, "max_tokens": 3, "temperature": 0}))
    waiting.start()
    s.wait_metric("sovpack_queue_depth", 1)
    os.kill(worker, signal.SIGSEGV)
    running.join(60)
    waiting.join(120)
    assert answers["running"].status_code == 500 and answers["running"].json()["error"]["code"] == "engine_failed"
    assert answers["waiting"].status_code == 200, answers["waiting"].text  # it waited for the restart, then ran
    assert answers["waiting"].json()["choices"][0]["text"]
    assert workers(s.proc.pid) != [worker]


def test_a_grammar_llama_cpp_would_crash_on_is_refused_with_400_before_it_reaches_llama_cpp(crash_server, env):
    """generation.run has llama.cpp's parser check the grammar (in the worker) before any sampler is built from it."""
    s = crash_server
    (worker,) = workers(s.proc.pid)
    crashes = len([r for r in env.audit() if r["event"] == "serve-engine-failed"])
    r = s.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 4, "grammar": LEFT_RECURSIVE})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["code"] == "invalid_grammar" and error["param"] == "grammar", error
    assert "left recursion" in error["message"], error
    assert workers(s.proc.pid) == [worker]  # the same worker: nothing crashed, nothing restarted
    assert len([r for r in env.audit() if r["event"] == "serve-engine-failed"]) == crashes
    assert health(s) == (200, "ready")
    reply = s.client().completions.create(model="smollm2", prompt=PROMPT, max_tokens=3, temperature=0)
    assert reply.choices[0].text


def test_the_engine_survives_llama_cpp_segfaulting_on_a_grammar(env):
    """The worker is the second line of defence: a job that reaches llama.cpp with a grammar it crashes on.

    Requests cannot send one any more (the check above); this job carries the grammar past
    generation.run's check, straight into llama-cpp-python's create_completion, as a bug in
    that check would.
    """
    from llama_cpp import LlamaGrammar

    from sovpack.server.engine import Engine, EngineSettings
    from sovpack.server.generation import Job
    from sovpack.server.requests import CompletionRequest, Limits, completion_job
    from sovpack.server.target import resolve_target
    from sovpack.server.verification import verify_for_serving

    target = resolve_target(str(env.bundle), Store(env.store), (env.keys / "alice.pub",), None)
    model = verify_for_serving(target, None, records=None, full_verify=True)
    engine = Engine(model, EngineSettings(ctx_size=256, parallel=1, threads=1, n_gpu_layers=0, max_queue=0))
    limits = Limits("smollm2", frozenset(), 256)
    job = completion_job(CompletionRequest(prompt=PROMPT, max_tokens=4, temperature=0), limits)
    unchecked = Job(job.kind, job.body, job.kwargs | {"grammar": LlamaGrammar.from_string(LEFT_RECURSIVE, verbose=False)})

    async def scenario():
        await asyncio.to_thread(engine.load, asyncio.get_running_loop())
        failures = asyncio.Queue()
        engine.on_failure = lambda worker, status, during: failures.put_nowait((worker, status, during))
        generation = await engine.submit(unchecked)
        kind, error = await asyncio.wait_for(generation.next(), 60)
        assert kind == "error" and error.status == 500 and error.code == "engine_failed", (kind, error)
        assert "killed by SIGSEGV" in error.message
        worker, status, during = await asyncio.wait_for(failures.get(), 30)
        assert status == "killed by SIGSEGV" and during and not worker.alive
        await asyncio.to_thread(model.reverify)
        await asyncio.to_thread(engine.respawn, worker)
        generation = await engine.submit(job)
        kind, result = await asyncio.wait_for(generation.next(), 60)
        assert kind == "result" and result["choices"][0]["text"], (kind, result)

    try:
        asyncio.run(scenario())
    finally:
        engine.close()
        model.close()


# 6. the bytes llama.cpp maps are the bytes verified


def _evil_copy(genuine: Path, evil: Path) -> None:
    """A GGUF that loads like the genuine one but is not it: one weight byte changed."""
    shutil.copyfile(genuine, evil)
    flip_byte(evil, evil.stat().st_size // 2)


def _maps_of(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return ""


def _maps_inode(pid: int, inode: int) -> bool:
    return any(line.split()[4] == str(inode) for line in _maps_of(pid).splitlines() if len(line.split()) >= 6)


def _installed(env, name: str) -> tuple[Path, Path]:
    """The bundle imported into a store of its own: (the store, the installed bundle's directory)."""
    store, volumes = env.root / f"{name}-store", env.root / f"{name}-volumes"
    assert run("export", env.bundle, "--to", volumes) == 0
    assert run("trust", "add", env.keys / "alice.pub", "--store", store) == 0
    assert run("import", volumes, "--store", store) == 0
    return store, store / "bundles" / "smollm2" / "1"


def test_swap_and_restore_of_the_gguf_never_serves_the_swapped_in_bytes(env):
    store, bundle = _installed(env, "swap")
    served = bundle / env.gguf_name
    kept = env.root / "swap-genuine-link.gguf"
    evil = env.root / "swap-evil.gguf"
    # The store made the bundle's directory read-only, so nothing is renamed over its files without a
    # mode change (tests/test_store.py); the attacker here has the owner's rights (or is root) and makes it.
    assert bundle.stat().st_mode & 0o777 == 0o555
    bundle.chmod(0o755)
    os.link(served, kept)  # the attacker keeps the genuine file to put it back
    _evil_copy(served, evil)
    genuine_ino, evil_ino = served.stat().st_ino, evil.stat().st_ino
    log = env.root / "swap.log"
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    args = [sys.executable, "-m", "sovpack", "serve", "smollm2", "--store", str(store), "--port", str(port)]
    args += ["--ctx-size", "256"]
    with open(log, "wb") as out:  # its own process group: stopped and continued as a whole, workers included
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

    def ready() -> bool:
        try:
            return httpx.get(f"{url}/health", timeout=5).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_for(lambda: "verified smollm2" in log.read_text() or proc.poll() is not None, what="verification")
        os.killpg(proc.pid, signal.SIGSTOP)  # verified, not yet loaded
        os.rename(evil, served)  # another file renamed over the verified GGUF
        os.killpg(proc.pid, signal.SIGCONT)
        mapped = wait_for(
            lambda: [w for w in workers(proc.pid) if env.gguf_name in _maps_of(w)] or proc.poll() is not None,
            what="a worker mapping the GGUF",
        )
        os.killpg(proc.pid, signal.SIGSTOP)  # the moment the weights are mapped: what is mapped is decided
        if mapped is not True:
            (worker,) = mapped
            assert _maps_inode(worker, genuine_ino) and not _maps_inode(worker, evil_ino), _maps_of(worker)
        os.rename(kept, served)  # restored, once llama.cpp has mapped a file
        bundle.chmod(0o555)  # and the directory's mode with it
        os.killpg(proc.pid, signal.SIGCONT)
        wait_for(lambda: proc.poll() is not None or ready(), what="ready or refused")
        output = log.read_text()
        if proc.poll() is not None:  # the check after loading saw the swapped file at the path: refused
            assert proc.returncode == 1 and f"{env.gguf_name} changed after it was verified" in output, output
        else:  # restored before that check: what is served is the verified inode, never the swapped-in one
            (worker,) = workers(proc.pid)
            assert _maps_inode(worker, genuine_ino) and not _maps_inode(worker, evil_ino)
            r = httpx.post(f"{url}/v1/completions", json={"prompt": PROMPT, "max_tokens": 2}, timeout=60)
            assert r.status_code == 200, r.text
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGCONT)
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)


def test_a_swap_while_serving_is_refused(env):
    bundle = env.copy_bundle("swap-serving")
    served = bundle / env.gguf_name
    evil = env.root / "swap-serving-evil.gguf"
    _evil_copy(served, evil)
    s = Server(env, bundle, key=False, name="swap-serving").wait_ready()
    try:
        os.rename(evil, served)
        r = httpx.post(f"{s.url}/v1/completions", json={"prompt": PROMPT, "max_tokens": 2}, timeout=30)
        assert r.status_code == 503 and r.json()["error"]["code"] == "integrity_check_failed"
        assert f"{env.gguf_name} changed after it was verified: it was replaced by another file" in r.json()["error"]["message"]
        assert s.proc.wait(60) == 1
    finally:
        s.stop()


def test_the_memory_map_check_refuses_a_process_that_mapped_another_file(env, tmp_path):
    from sovpack.server.opened import OpenedFile, check_mapped

    genuine = tmp_path / "model.gguf"
    shutil.copyfile(env.bundle / env.gguf_name, genuine)
    other = tmp_path / "other.gguf"
    _evil_copy(genuine, other)
    opened = OpenedFile.open(genuine, "model.gguf")
    mapper = "import mmap, sys, time; f = open(sys.argv[1], 'rb'); m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ); "
    mapper += "print('mapped', flush=True); time.sleep(60)"

    def mapping(path: Path) -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, "-c", mapper, str(path)], stdout=subprocess.PIPE)
        assert proc.stdout.readline() == b"mapped\n"
        return proc

    procs = []
    try:
        procs.append(p := mapping(genuine))
        check_mapped(p.pid, [opened], required=True)  # the verified inode: accepted
        procs.append(p := mapping(other))
        with pytest.raises(Refused, match=f"model.gguf: the engine's worker process {p.pid} has not mapped the verified file"):
            check_mapped(p.pid, [opened], required=True)
        os.rename(other, genuine)  # now another inode is mapped under the verified file's name
        with pytest.raises(Refused, match="maps another file than the verified one"):
            check_mapped(p.pid, [opened], required=False)
    finally:
        for p in procs:
            p.kill()
            p.wait()
        opened.close()


def test_verification_hashes_the_descriptor_it_hands_to_the_engine(env):
    from sovpack.server.target import resolve_target
    from sovpack.server.verification import verify_for_serving

    bundle = env.copy_bundle("descriptor")
    target = resolve_target(str(bundle), Store(env.store), (env.keys / "alice.pub",), None)
    model = verify_for_serving(target, None, records=None, full_verify=True)
    try:
        (opened,) = model.opened
        assert os.fstat(opened.fd).st_ino == (bundle / env.gguf_name).stat().st_ino
        flip_byte(bundle / env.gguf_name, (bundle / env.gguf_name).stat().st_size // 3)  # written in place
        with pytest.raises(Refused, match=f"{env.gguf_name} does not match its digest"):
            model.reverify()  # what a restart after a crash does: every byte of the open file again
    finally:
        model.close()


# 7. slow clients


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _connect(port: int, data: bytes = b"") -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=20)
    if data:
        sock.sendall(data)
    return sock


def _closed_by_server(sock: socket.socket, timeout: float) -> bool:
    """Whether the server closes the connection within `timeout` seconds (what it still sends is read and dropped)."""
    deadline = time.monotonic() + timeout
    try:
        while (left := deadline - time.monotonic()) > 0:
            sock.settimeout(left)
            if sock.recv(4096) == b"":
                return True
    except ConnectionResetError:
        return True
    except TimeoutError:
        pass
    return False


HALF_HEAD = b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Le"


def test_idle_and_half_sent_connections_cannot_starve_anyone(env):
    s = Server(env, env.bundle, "--header-timeout", "30", "--max-pending-connections", "64", name="slow").wait_ready()
    held: list[socket.socket] = []
    try:
        held += [_connect(s.port) for _ in range(100)]  # connect and say nothing
        held += [_connect(s.port, HALF_HEAD) for _ in range(100)]  # half a request head
        started = time.monotonic()
        assert httpx.get(f"{s.url}/health", timeout=20).status_code == 200
        reply = s.client().completions.create(model="smollm2", prompt=PROMPT, max_tokens=2, temperature=0, timeout=20)
        assert reply.choices[0].text is not None
        assert time.monotonic() - started < 20
        assert _closed_by_server(held[0], 5)  # the oldest pending connections were displaced
        assert not _closed_by_server(held[-1], 0.2)  # the newest are still open (their head timeout is 30 s)
    finally:
        for sock in held:
            sock.close()
        assert s.stop() == 0, s.output()


def test_head_body_and_idle_timeouts_close_the_connection(env):
    s = Server(
        env, env.bundle, "--header-timeout", "1", "--body-timeout", "1", "--idle-timeout", "1", name="timeouts"
    ).wait_ready()
    try:
        silent = _connect(s.port)
        half_head = _connect(s.port, HALF_HEAD)
        head = f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEYS[0]}\r\n"
        head += "Content-Type: application/json\r\nContent-Length: 100\r\n\r\n"
        half_body = _connect(s.port, head.encode() + b'{"prompt": ')
        assert _closed_by_server(silent, 10)
        assert _closed_by_server(half_head, 10)
        assert _closed_by_server(half_body, 10)
        keep_alive = _connect(s.port, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert keep_alive.recv(1024).startswith(b"HTTP/1.1 200")
        assert _closed_by_server(keep_alive, 10)  # idle after its response (the rest of it is read first)
        assert httpx.get(f"{s.url}/health", timeout=10).status_code == 200
    finally:
        assert s.stop() == 0, s.output()


def test_an_authenticated_connection_is_not_displaced_by_a_flood(env):
    s = Server(env, env.bundle, "--max-pending-connections", "8", "--idle-timeout", "60", name="flood").wait_ready()
    held: list[socket.socket] = []
    try:
        trusted = _connect(s.port)
        request = f"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEYS[1]}\r\n\r\n".encode()
        trusted.sendall(request)
        assert trusted.recv(4096).startswith(b"HTTP/1.1 200")
        held += [_connect(s.port) for _ in range(50)]
        assert not _closed_by_server(trusted, 0.5)  # it proved itself: not pending, not displaced
        trusted.sendall(request)
        assert trusted.recv(4096).startswith(b"HTTP/1.1 200")
    finally:
        for sock in held:
            sock.close()
        assert s.stop() == 0, s.output()


@pytest.mark.parametrize("option", ["--header-timeout", "--body-timeout", "--idle-timeout", "--max-pending-connections"])
def test_slow_client_options_must_be_positive(cli, env, option):
    result = cli("serve", env.bundle, "--store", env.store, "--trust", env.keys / "alice.pub", option, "0")
    assert result.code == 2 and option in result.err
