"""`sovpack serve` against in-process llama-cpp-python, on the real SmolLM2-135M Q4_1 GGUF.

- one stream: tokens/s over HTTP (SSE, read with a plain HTTP client) vs `llama_cpp.Llama`
  streaming in this process with the same model, prompt, context, threads and sampling;
  time to first token overhead. Both generate exactly N tokens (min_tokens = max_tokens).
- 4 concurrent streams with --parallel 1 and --parallel 2: all complete, aggregate tokens/s,
  p50/p95 request latency.
- 4 and 8 concurrent streams against llama.cpp's own `llama-server` (built by
  bench/llama_server.py from the llama.cpp that llama-cpp-python vendors): same model, same
  slot count (--parallel / -np), same prompt and length (exactly N tokens each: min_tokens
  for serve, ignore_eos for llama-server), greedy; aggregate tokens/s and p95 request latency.
- start-up, command to /health 200: a store-installed bundle with the recorded-check fast
  path vs --full-verify.

Writes bench/out/serve.json. Usage: python bench/bench_serve.py [--quick]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
from common import SOVPACK, Result, write_results  # noqa: E402

from sovpack.common.hashing import cpu_count  # noqa: E402
from sovpack.server.options import default_threads  # noqa: E402

PROMPT = "Once upon a time, in a lighthouse by the sea, there lived"
# the same sampling on both sides (the API's defaults for the llama.cpp-specific ones), greedy
SAMPLING = {"temperature": 0.0, "top_k": 40, "top_p": 0.95, "min_p": 0.05, "repeat_penalty": 1.1}
CTX = 2048
RECORDED_LINE = "unchanged since a recorded full check"  # serve's start-up line for each path
FULL_LINE = "every byte hashed"


@dataclass
class Run:
    ttft: float  # seconds to the first token
    total: float  # seconds to the last token
    tokens: int

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.total


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prepare(root: Path) -> tuple[Path, Path, Path]:
    """(gguf, signed bundle, store with that bundle installed)."""
    from get_model import ensure_model

    from sovpack.cli import main

    gguf = ensure_model()
    model = root / "model"
    model.mkdir()
    shutil.copyfile(gguf, model / gguf.name)
    bundle, store = root / "bundle", root / "store"
    for args in (
        ["keygen", "bench", "--dir", root / "keys"],
        ["pack", model, "--out", bundle, "--name", "smollm2"],
        ["sign", bundle, "--key", root / "keys" / "bench.key"],
        ["export", bundle, "--to", root / "volumes"],
        ["trust", "add", root / "keys" / "bench.pub", "--store", store],
        ["import", root / "volumes", "--store", store],
    ):
        if main([str(a) for a in args]) != 0:
            raise SystemExit(f"setup step failed: sovpack {' '.join(map(str, args))}")
    return gguf, bundle, store


class Server:
    def __init__(self, store: Path, *extra: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [*SOVPACK, "serve", "smollm2", "--store", str(store), "--port", str(self.port), "--ctx-size", str(CTX), *extra]
        self.started = time.perf_counter()
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.startup = self._wait_ready()

    def _wait_ready(self) -> float:
        import httpx2

        while True:
            if self.proc.poll() is not None:
                raise SystemExit(f"serve exited: {self.proc.stderr.read().decode()}")
            try:
                if httpx2.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return time.perf_counter() - self.started
            except httpx2.HTTPError:
                pass
            time.sleep(0.01)

    def stop(self) -> str:
        """Stop it; returns what it wrote to stderr (its start-up lines)."""
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(60)
        return self.proc.stderr.read().decode()


def http_stream(url: str, n: int, client=None, exact: dict | None = None) -> Run:
    """One streamed completion over HTTP, counting tokens from the final usage chunk.

    `exact`: how the server is told to generate exactly n tokens (serve: min_tokens).
    """
    import httpx2

    body = {
        "prompt": PROMPT,
        "max_tokens": n,
        **(exact if exact is not None else {"min_tokens": n}),
        **SAMPLING,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start = time.perf_counter()
    first = last = None
    tokens = 0
    with (client or httpx2).stream("POST", f"{url}/v1/completions", json=body, timeout=300) as r:
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if chunk.get("choices") and chunk["choices"][0].get("text"):
                last = time.perf_counter()
                first = first or last
    return Run(first - start, last - start, tokens)


def local_stream(llama, n: int) -> Run:
    """The same generation in this process, with llama-cpp-python's streaming API."""
    import llama_cpp

    processors = llama_cpp.LogitsProcessorList([llama_cpp.MinTokensLogitsProcessor(n, llama.token_eos())])
    start = time.perf_counter()
    first = last = None
    for chunk in llama.create_completion(PROMPT, max_tokens=n, **SAMPLING, stream=True, logits_processor=processors):
        if chunk["choices"][0]["text"]:
            last = time.perf_counter()
            first = first or last
    return Run(first - start, last - start, n)


def one_stream(gguf: Path, store: Path, n: int, repeats: int, threads: int, primary: bool) -> list[Result]:
    import httpx2
    import llama_cpp

    client = httpx2.Client(timeout=300)  # keep-alive, as the openai package does
    server = Server(store, "--parallel", "1", "--threads", str(threads))
    llama = llama_cpp.Llama(str(gguf), n_ctx=CTX, n_threads=threads, n_threads_batch=threads, verbose=False)
    try:
        http_stream(server.url, 8, client), local_stream(llama, 8)  # warm both
        served, local = [], []
        for _ in range(repeats):  # interleaved: machine noise hits both alike
            served.append(http_stream(server.url, n, client))
            local.append(local_stream(llama, n))
    finally:
        client.close()
        server.stop()
        llama.close()
    assert all(r.tokens == n for r in served), [r.tokens for r in served]
    tps_served = statistics.median(r.tokens_per_second for r in served)
    tps_local = statistics.median(r.tokens_per_second for r in local)
    # each served run is paired with the in-process run right after it: the median of the pair
    # ratios cancels the slow drifts of a shared machine better than a ratio of medians
    ratio = statistics.median(a.tokens_per_second / b.tokens_per_second for a, b in zip(served, local, strict=True))
    best = max(r.tokens_per_second for r in served) / max(r.tokens_per_second for r in local)
    setting = f"{threads} thread(s)" + (" (serve's default here)" if primary else " (all cores)")
    results = [
        Result(
            metric=f"one stream, {n} tokens, {setting}: tokens/s through sovpack serve (HTTP, SSE)",
            ratio=round(ratio, 3),
            target=">= 0.95 of in-process" if primary else "reported",
            meets=(ratio >= 0.95) if primary else None,
            reference=f"in-process llama_cpp.Llama streaming, same model, prompt, ctx {CTX}, {threads} thread(s), temperature 0",
            absolute={
                "serve_tokens_per_s": round(tps_served, 1),
                "in_process_tokens_per_s": round(tps_local, 1),
                "best_of_ratio": round(best, 3),
                "repeats": repeats,
            },
        )
    ]
    if primary:
        ttft_served = statistics.median(r.ttft for r in served)
        ttft_local = statistics.median(r.ttft for r in local)
        results.append(
            Result(
                metric="time to first token through sovpack serve",
                ratio=round(ttft_served / ttft_local, 2),
                target="reported (overhead in ms)",
                meets=None,
                reference="in-process time to first token",
                absolute={
                    "serve_ms": round(ttft_served * 1000, 1),
                    "in_process_ms": round(ttft_local * 1000, 1),
                    "overhead_ms": round((ttft_served - ttft_local) * 1000, 1),
                },
            )
        )
    return results


def concurrent(store: Path, parallel: int, n: int, rounds: int) -> dict:
    return streams_against(functools.partial(Server, store, "--parallel", str(parallel)), 4, n, rounds, None)


def run_four(url: str, n: int, failures: list[str], streams: int = 4, exact: dict | None = None) -> list:
    """`streams` streams at once; returns their runs and, last, the wall time of the round."""
    results: list = []

    def one():
        try:
            results.append(http_stream(url, n, exact=exact))
        except Exception as e:  # recorded: the target is that none fails
            failures.append(repr(e))

    threads = [threading.Thread(target=one) for _ in range(streams)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return [*results, time.perf_counter() - start]


class LlamaServer:
    """llama.cpp's own server on the same GGUF: `streams` slots of CTX tokens each (its --ctx-size is shared)."""

    def __init__(self, binary: Path, gguf: Path, slots: int, threads: int):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [str(binary), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(self.port)]
        cmd += ["-np", str(slots), "-c", str(CTX * slots), "-t", str(threads), "-tb", str(threads), "--no-webui"]
        self.started = time.perf_counter()
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        Server._wait_ready(self)  # the same /health polling as for serve

    def stop(self) -> str:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(60)
        return ""


def streams_against(run_server, streams: int, n: int, rounds: int, exact: dict | None) -> dict:
    """`rounds` rounds of `streams` simultaneous streams of n tokens against the server `run_server()` starts."""
    server = run_server()
    runs: list[Run] = []
    walls, failures = [], []
    try:
        http_stream(server.url, 4, exact=exact)  # warm
        for _ in range(rounds):
            round_runs = run_four(server.url, n, failures, streams=streams, exact=exact)
            walls.append(round_runs.pop())
            runs += round_runs
    finally:
        server.stop()
    latencies = sorted(r.total for r in runs)
    return {
        "complete": not failures and len(runs) == streams * rounds and all(r.tokens == n for r in runs),
        "aggregate_tokens_per_s": round(sum(r.tokens for r in runs) / sum(walls), 1),
        "p50_latency_s": round(statistics.median(latencies), 2),
        "p95_latency_s": round(latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))], 2),
        "p50_ttft_s": round(statistics.median(r.ttft for r in runs), 2),
        "requests": len(runs),
        "failures": failures[:3],
    }


def versus_llama_server(gguf: Path, store: Path, n: int, rounds: int) -> list[Result]:
    """4 and 8 streams: serve with as many slots, against llama-server with as many (-np), same threads budget."""
    from llama_server import ensure_llama_server

    binary = ensure_llama_server()
    cores = cpu_count()
    results = []
    for streams in (4, 8):
        per_slot = default_threads(streams, cores)  # serve's default: (cores - 1) / slots, at least 1
        budget = default_threads(1, cores)  # the same compute threads for llama-server's batched decoding
        ours, theirs = [], []
        for _ in range(rounds):  # alternated, so that the machine's drift hits both alike
            serve = functools.partial(Server, store, "--parallel", str(streams), "--threads", str(per_slot))
            ours.append(streams_against(serve, streams, n, 1, None))
            peer = functools.partial(LlamaServer, binary, gguf, streams, budget)
            theirs.append(streams_against(peer, streams, n, 1, {"ignore_eos": True}))
        o, t = _merge(ours), _merge(theirs)
        setting = (
            f"{streams} slots; serve {per_slot} thread(s) per slot ({per_slot * streams} in all), "
            f"llama-server -t {budget} for its batched decoding"
        )
        reference = f"llama.cpp llama-server {binary.parent.name} (llama-cpp-python's vendored llama.cpp), {setting}"
        absolute = {"serve": o, "llama_server": t}
        tps = o["aggregate_tokens_per_s"] / t["aggregate_tokens_per_s"]
        p95 = o["p95_latency_s"] / t["p95_latency_s"]
        results += [
            Result(
                metric=f"{streams} concurrent streams of {n} tokens: aggregate tokens/s",
                ratio=round(tps, 2),
                target=">= 0.9 of llama-server",
                meets=tps >= 0.9 and o["complete"],
                reference=reference,
                absolute=absolute,
            ),
            Result(
                metric=f"{streams} concurrent streams of {n} tokens: p95 request latency",
                ratio=round(p95, 2),
                target="<= 1.2 of llama-server",
                meets=p95 <= 1.2 and o["complete"],
                reference=reference,
                absolute=absolute,
            ),
        ]
    return results


def _merge(samples: list[dict]) -> dict:
    """Medians over alternated samples of streams_against."""
    keys = ("aggregate_tokens_per_s", "p50_latency_s", "p95_latency_s", "p50_ttft_s")
    merged = {k: round(statistics.median(s[k] for s in samples), 2) for k in keys}
    merged["complete"] = all(s["complete"] for s in samples)
    merged["requests"] = sum(s["requests"] for s in samples)
    merged["failures"] = [f for s in samples for f in s["failures"]][:3]
    return merged


def startup(bundle_store: Path, repeats: int) -> Result:
    recorded, full = [], []
    for _ in range(repeats):
        for extra, samples, said in (((), recorded, RECORDED_LINE), (("--full-verify",), full, FULL_LINE)):
            server = Server(bundle_store, *extra)
            samples.append(server.startup)
            output = server.stop()
            if said not in output:  # else the timing is of another path than the one named
                raise SystemExit(f"serve {' '.join(extra)} did not say {said!r}:\n{output}")
    r, f = statistics.median(recorded), statistics.median(full)
    return Result(
        metric="start-up, command to /health 200: recorded check (default for store bundles)",
        ratio=round(r / f, 2),
        target="reported (lower is faster)",
        meets=None,
        reference="the same start with --full-verify (every GGUF byte re-hashed)",
        absolute={"recorded_s": round(r, 2), "full_verify_s": round(f, 2), "repeats": repeats},
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="fewer and shorter generations")
    args = parser.parse_args()
    n, repeats, rounds = (64, 3, 1) if args.quick else (256, 7, 3)
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="sovpack-bench-serve-") as tmp:
        os.environ["SOVPACK_HOME"] = str(Path(tmp) / "home")
        gguf, _, store = prepare(Path(tmp))
        cores = cpu_count()
        results = one_stream(gguf, store, n, repeats, default_threads(1, cores), primary=True)
        if default_threads(1, cores) != cores:
            results += one_stream(gguf, store, n, repeats, cores, primary=False)
        by_slots = {p: concurrent(store, p, n // 2, rounds) for p in (1, 2)}
        peer = versus_llama_server(gguf, store, n // 2, rounds)
        results.append(startup(store, repeats))
    for p, r in by_slots.items():
        results.append(
            Result(
                metric=f"4 concurrent streams of {n // 2} tokens, --parallel {p}: all complete, none cancelled",
                ratio=1.0 if r["complete"] else 0.0,
                target="all complete",
                meets=r["complete"],
                reference="4 requests at once from 4 client threads",
                absolute=r,
            )
        )
    gain = by_slots[2]["aggregate_tokens_per_s"] / by_slots[1]["aggregate_tokens_per_s"]
    results.append(
        Result(
            metric="aggregate tokens/s of 4 streams, --parallel 2 vs --parallel 1",
            ratio=round(gain, 2),
            target="reported (what slots buy on this machine)",
            meets=None,
            reference="--parallel 1 (requests queue and run one after another)",
            absolute={
                "parallel_1_tokens_per_s": by_slots[1]["aggregate_tokens_per_s"],
                "parallel_2_tokens_per_s": by_slots[2]["aggregate_tokens_per_s"],
                "parallel_1_p50_ttft_s": by_slots[1]["p50_ttft_s"],
                "parallel_2_p50_ttft_s": by_slots[2]["p50_ttft_s"],
            },
        )
    )
    results += peer
    notes = [
        "Threads: serve's default is (cores - 1) / --parallel per slot, "
        "at least 1; the in-process reference uses the same count.",
        "With every core given to llama.cpp, the server's own work (event loop, SSE, the client here) preempts one of the "
        "llama.cpp threads, which wait for each other at every step: see the all-cores line.",
        "The HTTP client reads SSE lines with httpx2 in the benchmark process, which shares the machine's cores with the server.",
        "Against llama-server: serve runs one llama.cpp context per slot, each in its own worker process decoding its own "
        "sequence; llama-server decodes all its slots in one batch per step (see docs/serve.md, Performance).",
        f"Load average (1 min) at the start {load_before:.1f}, at the end {os.getloadavg()[0]:.1f}, on {cpu_count()} cores.",
    ]
    write_results("serve", "sovpack serve vs in-process llama-cpp-python", results, notes)


if __name__ == "__main__":
    main()
