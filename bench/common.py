"""Shared pieces of the benchmarks: timing, machine description, result files.

Every benchmark compares sovpack with a reference measured side by side in the same run
and reports the ratio; absolute times on shared machines are noise and only shown second.
Each bench_<topic>.py writes bench/out/<topic>.json; bench/run.py renders docs/benchmarks.md.
"""

from __future__ import annotations

import compileall
import json
import os
import platform
import statistics
import struct
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "out"
PYTHON = sys.executable
SOVPACK = [PYTHON, "-m", "sovpack"]

# sovpack runs as installed: pip compiles a package's modules to bytecode when it installs it
# (as it did for model-signing, huggingface_hub and every other reference), but the editable
# install here does not, and with PYTHONDONTWRITEBYTECODE set every command would compile
# sovpack's sources again (about 30 ms per start-up).
compileall.compile_dir(ROOT / "sovpack", quiet=1)


@dataclass
class Result:
    metric: str  # what is compared, e.g. "verify 2 GiB bundle vs model_signing verify key"
    ratio: float  # sovpack relative to the reference, in the direction `target` states
    target: str  # e.g. ">= 1.5x faster"
    meets: bool | None
    reference: str  # what the reference run was
    absolute: dict = field(default_factory=dict)  # seconds, bytes/s, ... (secondary)


def machine() -> dict:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    return {
        "cpu": cpu,
        "cores": len(os.sched_getaffinity(0)),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "python": platform.python_version(),
        "os": platform.platform(),
    }


def timed(fn, *args, **kwargs) -> float:
    start = time.perf_counter()
    fn(*args, **kwargs)
    return time.perf_counter() - start


def run_timed(cmd: list[str], **kwargs) -> float:
    """Wall time of a command that must succeed."""
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, **kwargs)
    return time.perf_counter() - start


def interleaved_samples(n: int, **measures) -> dict[str, list[float]]:
    """Run each measure n times, alternating, so that the machine's drift hits all alike."""
    samples: dict[str, list[float]] = {k: [] for k in measures}
    for _ in range(n):
        for name, measure in measures.items():
            samples[name].append(measure())
    return samples


def interleaved(n: int, **measures) -> dict[str, float]:
    """The medians of `interleaved_samples`."""
    return {k: statistics.median(v) for k, v in interleaved_samples(n, **measures).items()}


def write_random_safetensors(path: Path, size: int) -> None:
    """A valid safetensors file: one U8 tensor of `size` random bytes."""
    header = json.dumps({"w": {"dtype": "U8", "shape": [size], "data_offsets": [0, size]}}).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header)
        for offset in range(0, size, 16 << 20):
            f.write(os.urandom(min(16 << 20, size - offset)))


def write_results(topic: str, title: str, results: list[Result], notes: list[str] | None = None) -> Path:
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / f"{topic}.json"
    doc = {"topic": topic, "title": title, "machine": machine(), "results": [asdict(r) for r in results], "notes": notes or []}
    path.write_text(json.dumps(doc, indent=2) + "\n")
    for r in results:
        verdict = {True: "meets", False: "MISSES", None: "reported"}[r.meets]
        print(f"{r.metric}: {r.ratio:.2f} (target {r.target}; {verdict}) vs {r.reference}")
    return path
