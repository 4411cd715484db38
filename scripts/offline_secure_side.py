"""The secure side with no network: install sovpack from the media, then trust, import, verify, serve, ask.

Run inside a network namespace with no network (as root): `unshare -n python scripts/offline_secure_side.py ...`.
Only the loopback interface is brought up, for the server and its client. Every sovpack command
runs from the runtime just installed by the installer on the media (PREFIX/current/bin/sovpack);
the client is the `openai` package of the Python running this script. Used by
`make demo-offline` (scripts/demo_offline.py) and tests/test_runtime.py.
"""

from __future__ import annotations

import argparse
import errno
import fcntl
import os
import shlex
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

QUESTION = "In one sentence: why should a government run AI models on its own servers?"
# nothing of the connected side's checkout may reach the offline installation
OFFLINE_ENV = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}


def bring_up_loopback() -> None:
    """`ip link set lo up`, without needing iproute2: a new network namespace starts with lo down."""
    siocgifflags, siocsifflags, iff_up = 0x8913, 0x8914, 0x1
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        request = struct.pack("16sH", b"lo", 0)
        flags = struct.unpack("16sH", fcntl.ioctl(s, siocgifflags, request)[:18])[1]
        fcntl.ioctl(s, siocsifflags, struct.pack("16sH", b"lo", flags | iff_up))


def show_no_network() -> None:
    """Fail unless the outside world is unreachable (192.0.2.1 is TEST-NET-1: never a real host)."""
    with socket.socket() as s:
        s.settimeout(3)
        try:
            s.connect(("192.0.2.1", 443))
        except OSError as e:
            if e.errno != errno.ENETUNREACH:
                sys.exit(f"expected no route to any network, got: {e}")
            print(f"network: none (connecting to 192.0.2.1 fails: {os.strerror(e.errno)})", flush=True)
            return
    sys.exit("this host can reach a network: run inside `unshare -n`")


def run(title: str, *cmd: str | Path) -> None:
    print(f"\n-- {title}\n$ {shlex.join(map(str, cmd))}", flush=True)
    start = time.perf_counter()
    result = subprocess.run([str(c) for c in cmd], env=OFFLINE_ENV)
    print(f"   ({time.perf_counter() - start:.1f} s)", flush=True)
    if result.returncode != 0:
        sys.exit(f"stopped: {Path(str(cmd[0])).name} {cmd[1] if len(cmd) > 1 else ''} exited with {result.returncode}")


def serve_and_ask(sovpack: Path, name: str, store: Path, work: Path, port: int) -> None:
    from openai import OpenAI

    api_key = "offline-" + os.urandom(12).hex()
    key_file = work / "api-keys.txt"
    key_file.write_text(api_key + "\n")
    key_file.chmod(0o600)
    cmd = [str(sovpack), "serve", name, "--store", str(store), "--port", str(port), "--api-key-file", str(key_file)]
    print(f"\n-- serve it from the offline installation\n$ {shlex.join(cmd)} &", flush=True)
    log_path = work / "serve.log"
    with open(log_path, "w") as log:
        server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=OFFLINE_ENV)
    try:
        wait_healthy(server, port, log_path)
        print(log_path.read_text().rstrip(), flush=True)
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=api_key, max_retries=0)
        print(f"\n-- ask through the OpenAI API\nQ: {QUESTION}", flush=True)
        reply = client.chat.completions.create(
            model=name, messages=[{"role": "user", "content": QUESTION}], max_tokens=32, temperature=0
        )
        print(f"A: {reply.choices[0].message.content.strip()}")
        print(f"   ({reply.usage.completion_tokens} answer tokens)", flush=True)
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)


def wait_healthy(server: subprocess.Popen, port: int, log_path: Path) -> None:
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if server.poll() is not None:
            sys.exit(f"serve exited with {server.returncode}:\n{log_path.read_text()}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    sys.exit("serve did not become healthy within 180 s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runtime-media", type=Path, required=True, help="The runtime's volumes, with install-runtime.py.")
    parser.add_argument("--model-media", type=Path, required=True, help="The model's volumes.")
    parser.add_argument("--public-key", type=Path, required=True, help="The officer's public key (carried separately).")
    parser.add_argument("--prefix", type=Path, required=True, help="Where the runtime is installed.")
    parser.add_argument("--store", type=Path, required=True)
    parser.add_argument("--work", type=Path, required=True, help="For the API key file and the server's log.")
    parser.add_argument("--python", default=str(Path(sys.base_prefix) / "bin" / "python3"), help="The host's bare Python.")
    parser.add_argument("--port", type=int, default=8080)
    args = parser.parse_args()
    bring_up_loopback()
    show_no_network()
    for name in ("runtime_media", "model_media", "public_key", "prefix", "store", "work"):
        setattr(args, name, getattr(args, name).absolute())
    args.work.mkdir(parents=True, exist_ok=True)
    os.chdir(args.work)  # away from the checkout: `python -c` imports from the current directory first
    run(
        "install sovpack from the media: every wheel against the lock, the lock against the officer's signature",
        args.python,
        args.runtime_media / "install-runtime.py",
        args.runtime_media,
        "--prefix",
        args.prefix,
        "--public-key",
        args.public_key,
    )
    sovpack = args.prefix / "current" / "bin" / "sovpack"
    store = ["--store", args.store]
    run("the installed sovpack", sovpack, "--version")
    code = "import llama_cpp, sovpack; print('sovpack from', sovpack.__file__); print('llama.cpp from', llama_cpp.__file__)"
    run("where its code comes from", args.prefix / "current" / "bin" / "python", "-c", code)
    run("trust the officer's public key", sovpack, "trust", "add", args.public_key, *store)
    run("check every volume of the model on its own", sovpack, "check-volumes", args.model_media, *store)
    run("import the model: verify fully, install atomically", sovpack, "import", args.model_media, *store)
    name = next(p.name for p in (args.store / "bundles").iterdir())
    run("verify it again by name", sovpack, "verify", name, *store)
    serve_and_ask(sovpack, name, args.store, args.work, args.port)
    run("the audit log's chain", sovpack, "audit", "verify", *store)


if __name__ == "__main__":
    main()
