"""Verify a 2 GiB bundle (warm cache): sovpack vs `model_signing verify key` vs the hashlib ceiling.

Also: one file larger than a shard must use all cores, and `sovpack --help` must start in < 0.5 s.
Usage: python bench/bench_verify.py [--quick]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common import PYTHON, SOVPACK, Result, interleaved, run_timed, timed, write_random_safetensors, write_results  # noqa: E402

MODEL_SIGNING = [str(Path(PYTHON).parent / "model_signing")]


def write_gguf(path: Path, size: int) -> None:
    """A valid GGUF file: F32 tensors of random bytes, 256 MiB each."""
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    piece = 256 << 20
    for i, offset in enumerate(range(0, size, piece)):
        n = min(piece, size - offset) // 4
        writer.add_tensor(f"blk.{i}.weight", np.frombuffer(os.urandom(n * 4), dtype=np.float32).reshape(-1, 256))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


CEILING = r"""
import hashlib, os, sys
from concurrent.futures import ThreadPoolExecutor
CHUNK = 64 << 20
def piece(job):
    path, offset = job
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        f.seek(offset)
        left = CHUNK
        buf = bytearray(4 << 20)
        while left and (n := f.readinto(memoryview(buf)[: min(len(buf), left)])):
            h.update(memoryview(buf)[:n]); left -= n
    return h.hexdigest()
jobs = [(p, o) for p in sys.argv[1:] for o in range(0, max(os.path.getsize(p), 1), CHUNK)]
with ThreadPoolExecutor(len(os.sched_getaffinity(0))) as pool:
    list(pool.map(piece, jobs))
"""


def ceiling(files: list[Path]) -> None:
    """The same ceiling, in this process: what sovpack's verification core is compared with."""
    exec(CEILING.replace("sys.argv[1:]", "FILES"), {"FILES": [str(f) for f in files]})


def core_verify(bundle: Path, pub: Path) -> None:
    from sovpack.bundle.trust import load_trust
    from sovpack.bundle.verify import verify_bundle

    verify_bundle(bundle, load_trust([pub])).raise_for_failure()


def ceiling_command(files: list[Path]) -> list[str]:
    """The machine's ceiling as a command: hashlib SHA-256 on all cores, same bytes, same piece size."""
    return [PYTHON, "-c", CEILING, *map(str, files)]


def one_core(files: list[Path]) -> None:
    for f in files:
        with open(f, "rb") as fh:
            hashlib.file_digest(fh, "sha256")


def make_bundle(work: Path, layout: dict[str, int]) -> tuple[Path, Path, Path, list[Path]]:
    src = work / "src"
    src.mkdir()
    for name, size in layout.items():
        (write_gguf if name.endswith(".gguf") else write_random_safetensors)(src / name, size)
    (src / "config.json").write_text('{"model_type": "llama"}')
    keys = work / "keys"
    subprocess.run([*SOVPACK, "keygen", "bench", "--dir", keys], check=True, stdout=subprocess.DEVNULL)
    bundle = work / "bundle"
    subprocess.run([*SOVPACK, "pack", src, "--out", bundle, "--name", "bench"], check=True, stdout=subprocess.DEVNULL)
    subprocess.run([*SOVPACK, "sign", bundle, "--key", keys / "bench.key"], check=True, stdout=subprocess.DEVNULL)
    sig = next((bundle / "signatures").glob("*.sig"))
    return bundle, keys / "bench.pub", sig, [bundle / name for name in layout]


def bench_layout(label: str, layout: dict[str, int], repeats: int) -> list[Result]:
    with tempfile.TemporaryDirectory(dir=Path(__file__).resolve().parent.parent / ".cache") as tmp:
        bundle, pub, sig, files = make_bundle(Path(tmp), layout)
        total = sum(layout.values())
        sovpack = [*SOVPACK, "verify", str(bundle), "--trust", str(pub)]
        model_signing = [*MODEL_SIGNING, "verify", "key", str(bundle), "--signature", str(sig), "--public_key", str(pub)]
        for cmd in (sovpack, model_signing, ceiling_command(files)):  # warm the page cache and check each works
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        t = interleaved(
            repeats,
            sovpack=lambda: run_timed(sovpack),
            model_signing=lambda: run_timed(model_signing),
            ceiling=lambda: run_timed(ceiling_command(files)),
            one_core=lambda: timed(one_core, files),
            core=lambda: timed(core_verify, bundle, pub),
            core_ceiling=lambda: timed(ceiling, files),
        )
    gib = total / 2**30
    absolute = {k + "_s": round(v, 3) for k, v in t.items()} | {
        "bytes": total,
        "sovpack_GBps": round(total / t["sovpack"] / 1e9, 2),
    }
    return [
        Result(
            f"verify {label}: speed-up over model_signing verify key",
            t["model_signing"] / t["sovpack"],
            ">= 1.5x faster",
            t["model_signing"] / t["sovpack"] >= 1.5,
            f"model_signing verify key, {gib:.1f} GiB",
            absolute,
        ),
        Result(
            f"verify {label}: the ceiling's own speed-up over model_signing verify key (the best any verifier could do)",
            t["model_signing"] / t["ceiling"],
            "reported",
            None,
            "model_signing verify key vs the `python -c` hashlib ceiling",
            absolute,
        ),
        Result(
            f"verify {label}: share of the hashlib all-core ceiling (in process)",
            t["core_ceiling"] / t["core"],
            ">= 0.90",
            t["core_ceiling"] / t["core"] >= 0.9,
            "hashlib SHA-256 on all cores over the same bytes, same process",
            absolute,
        ),
        Result(
            f"verify {label}: share of the ceiling, whole command incl. start-up",
            t["ceiling"] / t["sovpack"],
            "reported",
            None,
            "`python -c` running the same hashlib ceiling",
            absolute,
        ),
        Result(
            f"verify {label}: speed-up over one core (in process)",
            t["one_core"] / t["core"],
            f"uses all {len(os.sched_getaffinity(0))} cores (> 1.5x)",
            t["one_core"] / t["core"] > 1.5,
            "hashlib.file_digest on one core over the same bytes, same process",
            absolute,
        ),
    ]


def bench_help(repeats: int) -> Result:
    t = interleaved(
        repeats, help=lambda: run_timed([*SOVPACK, "--help"]), verify_help=lambda: run_timed([*SOVPACK, "verify", "--help"])
    )
    worst = max(t.values())
    return Result(
        "`sovpack --help` / `sovpack verify --help` start-up (seconds, worst of the two)",
        worst,
        "< 0.5 s",
        worst < 0.5,
        "absolute time (no peer)",
        {k + "_s": round(v, 3) for k, v in t.items()},
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="256 MiB instead of 2 GiB")
    args = parser.parse_args()
    size = (256 << 20) if args.quick else (2 << 30)
    repeats = 3 if args.quick else 5
    results = bench_layout(f"{size >> 20} MiB in one GGUF", {"model-F32.gguf": size}, repeats)
    results += bench_layout(
        f"{size >> 20} MiB in 4 safetensors shards",
        {f"model-0000{i}-of-00004.safetensors": size // 4 for i in range(1, 5)},
        repeats,
    )
    results.append(bench_help(repeats))
    write_results(
        "verify",
        "Verification and start-up",
        results,
        notes=[
            "Warm page cache: every command runs once before timing; runs are interleaved and the median is taken.",
            "The files are valid GGUF and safetensors files filled with "
            "random bytes, so the format inspectors run as on a real model.",
        ],
    )


if __name__ == "__main__":
    main()
