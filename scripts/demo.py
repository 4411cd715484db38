"""The whole trip across the air gap on the embedded default model, step by step.

Connected side: fetch from a Hub (the project's own loopback hub by default, since this
machine has no internet), sign, export to size-limited volumes. Secure side: trust the
officer's key, import into a fresh store, verify, serve, and ask the model a question
through the OpenAI API. Run by `make demo`; everything lives under demo-output/ (recreated
on each run). To fetch from the real Hugging Face Hub instead:

    make demo HUB=https://huggingface.co      # fetches manifests/qwen2.5-0.5b-instruct.toml
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "demo-output"
SOVPACK = [sys.executable, "-m", "sovpack"]
DEMO_REPO = "sovpack-demo/SmolLM2-135M-Instruct-GGUF"
REAL_HUB_SPEC = ROOT / "manifests" / "qwen2.5-0.5b-instruct.toml"
QUESTION = "In one sentence: why should a government run AI models on its own servers?"

sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT / "tests"))
from get_model import ensure_model  # noqa: E402

timings: list[tuple[str, float]] = []


def show(path: Path) -> str:
    return str(path).replace(str(ROOT) + "/", "")


def banner(text: str) -> None:
    print(f"\n{'=' * 78}\n{text}\n{'=' * 78}", flush=True)


def command_line(args) -> str:
    return "sovpack " + shlex.join(show(a) if isinstance(a, Path) else str(a) for a in args)


def step(title: str, *args: str | Path) -> None:
    print(f"\n-- {title}\n$ {command_line(args)}", flush=True)
    start = time.perf_counter()
    result = subprocess.run([*SOVPACK, *map(str, args)], cwd=ROOT)
    elapsed = time.perf_counter() - start
    timings.append((title, elapsed))
    print(f"   ({elapsed:.1f} s)", flush=True)
    if result.returncode != 0:
        sys.exit(f"demo stopped: `sovpack {args[0]}` exited with {result.returncode}")


def loopback_hub():
    """Serve the default model as a Hub repository on 127.0.0.1, as huggingface.co would."""
    from hubserver import HubServer

    server = HubServer()
    server.add_repo(
        DEMO_REPO,
        {
            "SmolLM2-135M-Instruct.Q4_1.gguf": ensure_model(),
            "README.md": b"# SmolLM2-135M-Instruct (GGUF, Q4_1)\n\n"
            b"A 135M-parameter instruct model by Hugging Face, Apache-2.0.\n",
            "LICENSE": b"Apache License, Version 2.0\n",
        },
    )
    return server


def fetch_args(endpoint: str | None) -> list[str | Path]:
    if os.environ.get("HUB"):
        return ["fetch", "--spec", REAL_HUB_SPEC, "--endpoint", os.environ["HUB"], "--out", OUT / "bundle"]
    return [
        "fetch",
        DEMO_REPO,
        "--include",
        "*.gguf",
        "--include",
        "README.md",
        "--include",
        "LICENSE",
        "--endpoint",
        endpoint,
        "--name",
        "smollm2-135m-instruct",
        "--version",
        "1",
        "--expires",
        "365d",
        "--out",
        OUT / "bundle",
    ]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(name: str, store: Path, port: int, key_file: Path) -> subprocess.Popen:
    args = ["serve", name, "--store", store, "--port", str(port), "--api-key-file", key_file]
    print(f"\n-- serve it (OpenAI-compatible, llama.cpp)\n$ {command_line(args)} &", flush=True)
    log = open(OUT / "serve.log", "w")
    process = subprocess.Popen([*SOVPACK, *map(str, args)], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    start = time.perf_counter()
    while time.perf_counter() - start < 180:
        if process.poll() is not None:
            sys.exit(f"demo stopped: serve exited with {process.returncode}:\n{(OUT / 'serve.log').read_text()}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
                if response.status == 200:
                    break
        except OSError:
            time.sleep(0.3)
    else:
        process.kill()
        sys.exit("demo stopped: serve did not become healthy within 180 s")
    timings.append(("serve: verify, load, ready", time.perf_counter() - start))
    print((OUT / "serve.log").read_text().rstrip())
    print(f"   ready at http://127.0.0.1:{port}/v1 ({timings[-1][1]:.1f} s)", flush=True)
    return process


def ask(port: int, api_key: str, model: str) -> None:
    from openai import OpenAI

    client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=api_key)
    print(f"\n-- ask through the OpenAI API (python package `openai`)\nQ: {QUESTION}", flush=True)
    start = time.perf_counter()
    reply = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": QUESTION}], max_tokens=64, temperature=0
    )
    timings.append(("one chat completion", time.perf_counter() - start))
    print(f"A: {reply.choices[0].message.content.strip()}")
    print(
        f"   ({reply.usage.prompt_tokens} prompt tokens, {reply.usage.completion_tokens} answer tokens, {timings[-1][1]:.1f} s)"
    )


def main() -> None:
    os.environ.setdefault("COLUMNS", "120")  # rich tables in a pipe: wider than the default 80
    shutil.rmtree(OUT, ignore_errors=True)
    OUT.mkdir()
    hub = None if os.environ.get("HUB") else loopback_hub()
    try:
        banner("CONNECTED SIDE: fetch, sign, export")
        if hub:
            print(
                "(no internet here: the Hub is sovpack's loopback test hub at "
                f"{hub.url}; `make demo HUB=https://huggingface.co` uses the real one)"
            )
        step("fetch a pinned, checked copy of the model from the Hub", *fetch_args(hub.url if hub else None))
    finally:
        if hub:
            hub.close()
    step("what the bundle holds", "inspect", OUT / "bundle")
    step("a signing key for the approving officer", "keygen", "officer", "--dir", OUT / "keys")
    step("the officer signs the bundle", "sign", OUT / "bundle", "--key", OUT / "keys" / "officer.key")
    step(
        "export to a USB disk in volumes of at most 40 MB", "export", OUT / "bundle", "--to", OUT / "usb", "--volume-size", "40M"
    )
    print("   on the disk: " + ", ".join(f"{p.name} ({p.stat().st_size:,} B)" for p in sorted((OUT / "usb").iterdir())))

    banner("SECURE SIDE: trust, import, verify, serve")
    store = OUT / "secure-store"
    step("the secure side trusts the officer's public key", "trust", "add", OUT / "keys" / "officer.pub", "--store", store)
    step("check every volume on its own", "check-volumes", OUT / "usb", "--store", store)
    step("import: check volumes, reassemble, verify, install atomically", "import", OUT / "usb", "--store", store)
    name = next(p.name for p in (store / "bundles").iterdir())
    step("re-verify the installed bundle by name", "verify", name, "--store", store)
    step("what the store holds", "list", "--store", store)
    api_key = "demo-" + os.urandom(12).hex()
    key_file = OUT / "api-keys.txt"
    key_file.write_text(f"# analysts' API keys, one per line\n{api_key}\n")
    key_file.chmod(0o600)
    port = free_port()
    server = start_server(name, store, port, key_file)
    try:
        ask(port, api_key, name)
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)
    step("the audit log records every import, verification and serve start/stop", "audit", "verify", "--store", store)

    banner("TIME PER STEP")
    for title, seconds in timings:
        print(f"{seconds:7.1f} s  {title}")
    print(f"\nDone: the model crossed the gap verified at every step. Everything is under {show(OUT)}/.")


if __name__ == "__main__":
    main()
