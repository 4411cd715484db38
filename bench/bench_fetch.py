"""fetch from a loopback hub vs huggingface_hub.snapshot_download of the same files.

A 1 GiB repository (two safetensors files of random tensor data, 512 MiB each, plus small config,
tokenizer, README and licence files) is served from disk by tests/hubserver.py in a separate
process. Each repetition runs, as separate processes and in alternation:

- `sovpack fetch org/bench --endpoint URL --out DIR --quiet` (download, SHA-256 and shard digests
  overlapping the transfer, check against the published digests, inspect headers, write the bundle);
- `python -c "snapshot_download('org/bench', endpoint=URL, local_dir=DIR)"` (download only).

Target: sovpack's median time <= 1.3x snapshot_download's. `--quick` uses 2 x 128 MiB and 3 repetitions.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import PYTHON, ROOT, SOVPACK, Result, interleaved, run_timed, write_results  # noqa: E402

REPO = "org/bench"
MIB = 1 << 20


def write_safetensors_like(path: Path, size: int) -> None:
    """A valid safetensors file of `size` bytes: one U8 tensor of random bytes."""
    header_len = 128
    n = size - 8 - header_len
    header = json.dumps({"weight": {"dtype": "U8", "shape": [n], "data_offsets": [0, n]}}).encode()
    header = header.ljust(header_len, b" ")
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", header_len) + header)
        left = n
        while left:
            block = os.urandom(min(16 * MIB, left))
            f.write(block)
            left -= len(block)


def make_repo(data: Path, part_size: int) -> dict[str, Path]:
    data.mkdir(parents=True, exist_ok=True)
    files = {}
    for i in (1, 2):
        path = data / f"model-0000{i}-of-00002.safetensors"
        if not path.exists() or path.stat().st_size != part_size:
            write_safetensors_like(path, part_size)
        files[path.name] = path
    small = {
        "config.json": json.dumps({"architectures": ["LlamaForCausalLM"], "hidden_size": 4096}),
        "tokenizer.json": json.dumps({"version": "1.0", "model": {"type": "BPE", "vocab": {str(i): i for i in range(2000)}}}),
        "tokenizer_config.json": json.dumps({"chat_template": "{{ messages }}"}),
        "README.md": "# bench model\n",
        "LICENSE": "Apache-2.0\n",
    }
    for name, text in small.items():
        (data / name).write_text(text)
        files[name] = data / name
    return files


def serve(data: Path) -> None:
    """Child process: serve the repository until stdin closes."""
    sys.path.insert(0, str(ROOT / "tests"))
    from hubserver import HubServer

    files = {p.name: p for p in sorted(data.iterdir()) if p.is_file()}
    with HubServer() as hub:
        commit = hub.add_repo(REPO, files)
        print(json.dumps({"url": hub.url, "commit": commit}), flush=True)
        sys.stdin.read()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2 x 128 MiB, 3 repetitions")
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--serve", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve)
        return
    part = (128 if args.quick else 512) * MIB
    reps = args.reps or (3 if args.quick else 5)

    work = Path(tempfile.mkdtemp(prefix="sovpack-bench-fetch-"))
    env = {
        **os.environ,
        "HF_HUB_DISABLE_XET": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "HF_HOME": str(work / "hf_home"),
        "HF_HUB_DISABLE_TELEMETRY": "1",
    }
    env.pop("HF_TOKEN", None)
    server = None
    try:
        files = make_repo(work / "data", part)
        total = sum(p.stat().st_size for p in files.values())
        server = subprocess.Popen(
            [PYTHON, __file__, "--serve", str(work / "data")], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
        )
        url = json.loads(server.stdout.readline())["url"]
        counter = iter(range(10**6))

        def run(cmd_for, label):
            def measure() -> float:
                target = work / f"{label}-{next(counter)}"
                seconds = run_timed(cmd_for(target), env=env)
                shutil.rmtree(target, ignore_errors=True)
                return seconds

            return measure

        fetch_cmd = lambda out: [*SOVPACK, "fetch", REPO, "--endpoint", url, "--out", str(out), "--quiet"]  # noqa: E731
        snapshot_code = (
            "import sys; from huggingface_hub import snapshot_download; "
            "snapshot_download(sys.argv[1], endpoint=sys.argv[2], local_dir=sys.argv[3], token=False)"
        )
        snapshot_cmd = lambda out: [PYTHON, "-c", snapshot_code, REPO, url, str(out)]  # noqa: E731

        # one checked run first: the bundle holds the same bytes
        check = work / "check"
        subprocess.run(fetch_cmd(check), check=True, env=env)
        for name, path in files.items():
            assert (check / name).stat().st_size == path.stat().st_size, name
        shutil.rmtree(check)

        started = time.perf_counter()
        medians = interleaved(reps, snapshot_download=run(snapshot_cmd, "snap"), sovpack_fetch=run(fetch_cmd, "fetch"))
        ratio = medians["sovpack_fetch"] / medians["snapshot_download"]
        result = Result(
            metric=f"fetch of a {total / 2**30:.2f} GiB repo from a loopback hub vs snapshot_download",
            ratio=ratio,
            target="<= 1.3x its time",
            meets=ratio <= 1.3,
            reference="huggingface_hub.snapshot_download(local_dir=...) of the same files, separate process, same server",
            absolute={
                "bytes": total,
                "repetitions": reps,
                "sovpack_fetch_s": round(medians["sovpack_fetch"], 3),
                "snapshot_download_s": round(medians["snapshot_download"], 3),
                "sovpack_fetch_MBps": round(total / medians["sovpack_fetch"] / 1e6, 1),
                "snapshot_download_MBps": round(total / medians["snapshot_download"] / 1e6, 1),
                "wall_s": round(time.perf_counter() - started, 1),
            },
        )
        notes = [
            "Both commands run as separate processes (interpreter start "
            "included) against one hubserver process serving from the page cache.",
            (
                "sovpack fetch also computes the whole-file SHA-256 and 64 MiB shard digests of every byte, compares them with "
                "the published digests, parses the safetensors headers, fsyncs "
                "every file and writes sovpack.json; snapshot_download "
                "checks sizes only and leaves its files to the page cache."
            ),
        ]
        write_results("fetch", "fetch vs snapshot_download (loopback hub)", [result], notes)
    finally:
        if server is not None:
            server.stdin.close()
            server.wait(timeout=30)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
