"""Export and import of a 2 GiB bundle vs a plain `cp` of the same bytes on the same disk; peak memory.

Targets (issue 5): export and import each within 1.5x the time of `cp`, and memory
flat in the model's size (peak RSS of the export and import processes for a small and a large
bundle). Warm page cache for every run, as for the reference.

Also reported: the floor any export or import meets on this machine. Each side must compute
two SHA-256 of every byte (export: the volume's and the file's shards; import: the volume's and
the staged file's shards) and copy the bytes, which costs at least what cp spends; on N cores
that takes at least (2 x CPU time of one SHA-256 pass + cp's CPU time) / N, all measured in
the same run. sovpack against that floor is its own overhead; the floor against cp says how
far below 1.5x any implementation could get here.
Usage: python bench/bench_transfer.py [--quick]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import SOVPACK, Result, interleaved_samples, write_random_safetensors, write_results  # noqa: E402

MiB = 1 << 20


def write_model(directory: Path, size: int) -> Path:
    """A model directory whose weights are one safetensors file of `size` random bytes."""
    directory.mkdir(parents=True)
    write_random_safetensors(directory / "model.safetensors", size)
    (directory / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
    return directory


def signed_bundle(work: Path, size: int, keys: Path) -> Path:
    model = write_model(work / f"model-{size}", size)
    bundle = work / f"bundle-{size}"
    run([*SOVPACK, "pack", model, "--out", bundle, "--name", f"bench{size // MiB}", "--version", "1"])
    run([*SOVPACK, "sign", bundle, "--key", keys / "alice.key"])
    shutil.rmtree(model)
    return bundle


def run(cmd: list) -> None:
    subprocess.run([str(c) for c in cmd], check=True, stdout=subprocess.DEVNULL)


CPU: dict[str, list[tuple[float, float]]] = {}  # (user, system) CPU seconds of every timed run, by measure


def run_measured(cmd: list, cpu_of: str | None = None) -> tuple[float, int]:
    """Wall time and peak RSS (bytes) of one command, from the kernel's accounting of that very child (and its children)."""
    start = time.perf_counter()
    process = subprocess.Popen([str(c) for c in cmd], stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(process.pid, 0)
    elapsed = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{cmd} failed with {status}")
    if cpu_of:
        CPU.setdefault(cpu_of, []).append((round(usage.ru_utime, 2), round(usage.ru_stime, 2)))
    return elapsed, usage.ru_maxrss * 1024


class Scenario:
    """One bundle: fresh export directory, store and copy destination for every repetition."""

    def __init__(self, work: Path, bundle: Path, keys: Path):
        self.work, self.bundle, self.keys = work, bundle, keys
        self.out, self.store, self.copy = work / "out", work / "store", work / "copy"
        self.rss: dict[str, int] = {}
        self.export()  # volumes for the import runs, and a warm page cache for everyone

    def _clear(self, *paths: Path, source: Path) -> None:
        """Read the input into the page cache, delete the previous run's output and let the disk settle, outside the
        timed part, for every contender alike (sovpack writes around the page cache: its volumes are not cached).

        In that order: memory just freed is the cheapest this VM gives to the next writer to the page cache (cp).
        """
        subprocess.run(["sh", "-c", 'find "$1" -type f -exec cat {} + >/dev/null', "warm", str(source)], check=True)
        for p in paths:
            if p.exists():
                subprocess.run(["rm", "-rf", str(p)], check=True)
        subprocess.run(["sync"], check=True)

    def export(self) -> float:
        self._clear(self.out, source=self.bundle)
        elapsed, rss = run_measured([*SOVPACK, "export", self.bundle, "--to", self.out], "export")
        self.rss["export"] = max(self.rss.get("export", 0), rss)
        return elapsed

    def import_(self) -> float:
        self._clear(self.store, source=self.out)
        command = [*SOVPACK, "import", self.out, "--trust", self.keys / "alice.pub", "--store", self.store]
        elapsed, rss = run_measured(command, "import_")
        self.rss["import"] = max(self.rss.get("import", 0), rss)
        return elapsed

    def cp_bundle(self) -> float:
        return self._copy(self.bundle, "cp_bundle")

    def cp_volumes(self) -> float:
        return self._copy(self.out, "cp_volumes")

    def _copy(self, source: Path, name: str) -> float:
        """cp, then fsync of every copied file: sovpack flushes what it writes too (media get unplugged)."""
        self._clear(self.copy, source=source)
        command = ["sh", "-c", 'cp -r "$1" "$2" && find "$2" -type f -exec sync {} +', "cp", source, self.copy]
        return run_measured(command, name)[0]


SHA256_PASS = r"""
import hashlib, sys
buf = bytearray(4 << 20)
view = memoryview(buf)
for path in sys.argv[1:]:
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
"""


def sha256_pass(paths: list[Path]) -> float:
    """The SHA-256 of each file, one after the other on one core: its CPU time is one hashing pass over those bytes."""
    return run_measured([sys.executable, "-c", SHA256_PASS, *paths], "sha256")[0]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="small bundles (64 MiB and 256 MiB), one repetition")
    args = parser.parse_args()
    small, large = (64 * MiB, 256 * MiB) if args.quick else (256 * MiB, 2048 * MiB)
    repetitions = 1 if args.quick else 5
    with tempfile.TemporaryDirectory(dir=Path(__file__).resolve().parent.parent) as tmp:  # the disk the project is on
        work = Path(tmp)
        keys = work / "keys"
        run([*SOVPACK, "keygen", "alice", "--dir", keys])
        scenarios = {}
        for size in (small, large):
            (work / str(size)).mkdir()
            scenarios[size] = Scenario(work / str(size), signed_bundle(work / str(size), size, keys), keys)
        big = scenarios[large]
        samples = interleaved_samples(
            repetitions,
            cp_bundle=big.cp_bundle,
            export=big.export,
            cp_volumes=big.cp_volumes,
            import_=big.import_,
            sha256=lambda: sha256_pass(sorted(big.out.glob("*.[0-9][0-9][0-9]"))),
        )
        times = {k: statistics.median(v) for k, v in samples.items()}
        cpu = {k: CPU[k][-repetitions:] for k in samples}  # the timed runs only
        for s in scenarios.values():
            s.import_()
        results = _ratios(f"{large // MiB} MiB bundle", times, samples, cpu)
        floor = results[0].absolute  # export's: the bundle's bytes
        for step in ("export", "import"):
            low, high = scenarios[small].rss[step], scenarios[large].rss[step]
            results.append(
                Result(
                    f"{step} peak RSS, {large // MiB} MiB vs {small // MiB} MiB bundle",
                    high / low,
                    "<= 1.25x (flat in model size)",
                    high <= 1.25 * low,
                    f"peak RSS of the same command on the {small // MiB} MiB bundle",
                    {f"rss_{small // MiB}MiB_bytes": low, f"rss_{large // MiB}MiB_bytes": high},
                )
            )
    notes = [
        (
            "The input is read into the page cache before every run, for sovpack and cp alike. export reads each file of "
            "the bundle once, straight into the blocks the volumes are written from: each volume's SHA-256 on one thread, "
            "the shard hasher that checks each file against its signed digests on a second, and the blocks written to disk "
            "around the page cache (O_DIRECT) on a third. import reads the volumes once, straight into the blocks the staged "
            "files are written from, the same way: each volume's SHA-256 on one thread, the files' shard digests on another; "
            "verification does not read those files again; install by rename. cp checks nothing; it copies inside the "
            "kernel (copy_file_range) into the page cache, and its copies are then flushed with sync, as sovpack fsyncs "
            "every volume and file."
        ),
        (
            f"The floor: each side must hash every byte twice and copy it. In this run one SHA-256 pass over the "
            f"{large // MiB} MiB cost {floor['cpu_s']['sha256']} s of CPU, its read included, and cp's copy "
            f"{floor['cpu_s']['cp_bundle']} s, so on {floor['cores']} cores nothing doing this work ends in less than "
            f"{floor['floor_s']} s, against {floor['cp_s']} s for cp, before Python's start-up. More cores lower the floor "
            "(hashing is the bottleneck); slower media raise cp."
        ),
        (
            f"{repetitions} interleaved repetition(s), median; every sample and its user and system CPU time are in the "
            "result. On a virtual machine whose hypervisor takes back freed memory, writing fresh page cache costs a system "
            "time that varies widely from one run to the next (see the samples): cp pays it, sovpack, writing around the "
            "page cache, does not. Compare medians of one run only."
        ),
    ]
    write_results("transfer", "Export and import vs cp", results, notes)


def _ratios(label: str, times: dict[str, float], samples: dict[str, list[float]], cpu: dict[str, list]) -> list[Result]:
    cores = len(os.sched_getaffinity(0))
    cpu_s = {k: statistics.median(user + system for user, system in v) for k, v in cpu.items()}
    results = []
    for step, source in (("export", "bundle"), ("import_", "volumes")):
        name, cp = step.rstrip("_"), f"cp_{source}"
        floor = max(times[cp], (2 * cpu_s["sha256"] + cpu_s[cp]) / cores)
        runs = (step, cp, "sha256")
        absolute = {
            f"{name}_s": round(times[step], 3),
            "cp_s": round(times[cp], 3),
            "floor_s": round(floor, 3),
            "cores": cores,
            "cpu_s": {k: round(cpu_s[k], 2) for k in runs},
            "samples_s": {k: [round(x, 3) for x in samples[k]] for k in runs},
            "samples_cpu_user_system_s": {k: cpu[k] for k in runs},
        }
        results += [
            Result(
                f"{name} {label} vs cp",
                times[step] / times[cp],
                "<= 1.5x cp",
                times[step] <= 1.5 * times[cp],
                f"cp -r of the {source} on the same disk, then sync of the copies",
                absolute,
            ),
            Result(
                f"{name} {label} vs the floor",
                times[step] / floor,
                "reported",
                None,
                f"(2 SHA-256 passes + cp of the {source}) in CPU time, over {cores} cores, measured in this run",
                absolute,
            ),
            Result(
                f"the floor vs cp, {name}",
                floor / times[cp],
                "reported",
                None,
                "how close to cp any export or import doing that hashing could get on this machine",
                absolute,
            ),
        ]
    return results


if __name__ == "__main__":
    main()
