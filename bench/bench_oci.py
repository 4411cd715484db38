"""Push and pull of a 2 GiB bundle through a loopback registry vs `skopeo copy` of the same artifact.

Targets (issue 15): `sovpack push` and `sovpack pull` each within 1.3x the time of `skopeo copy`
moving the very same artifact (same manifest, same blobs) between the same registry and disk;
and a pull of a new version that shares all but one file with the installed one moves only that
file's bytes (plus its sovpack.json and signature).

The registry is Debian's docker-registry (tests/registry.py), plain HTTP on loopback, started
with empty storage before every push (outside the timing), so that every blob is really sent.
sovpack pull also verifies the bundle fully before installing it (signatures, digests, formats);
skopeo checks the blobs' digests only.
Usage: python bench/bench_oci.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(BENCH.parent / "tests"))
from common import SOVPACK, Result, interleaved_samples, run_timed, write_random_safetensors, write_results  # noqa: E402
from registry import Registry  # noqa: E402

MiB = 1 << 20


def run(cmd: list) -> str:
    return subprocess.run([str(c) for c in cmd], check=True, capture_output=True, text=True).stdout


def signed_bundle(work: Path, name: str, version: int, files: dict[str, int], keys: Path) -> Path:
    model = work / f"model-{name}-{version}"
    model.mkdir(parents=True)
    for filename, size in files.items():
        target = model / filename
        if (work / filename).exists():  # the same bytes as the previous version
            shutil.copy(work / filename, target)
        else:
            write_random_safetensors(target, size)
            shutil.copy(target, work / filename)
    (model / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
    bundle = work / f"bundle-{name}-{version}"
    run([*SOVPACK, "pack", model, "--out", bundle, "--name", name, "--version", str(version)])
    run([*SOVPACK, "sign", bundle, "--key", keys / "alice.key"])
    shutil.rmtree(model)
    return bundle


class Scenario:
    def __init__(self, work: Path, bundle: Path, keys: Path):
        self.work, self.bundle, self.keys = work, bundle, keys
        self.registry: Registry | None = None
        self.artifact = work / "artifact"  # the pushed artifact as skopeo's dir: layout, skopeo's push source
        self.restart_registry()
        (work / "push-store").mkdir(exist_ok=True)  # push records itself in a store, which must exist
        run([*SOVPACK, "push", bundle, f"{self.registry.host}/bench/model:1", "--store", work / "push-store"])
        run(["skopeo", "copy", "--src-tls-verify=false", f"docker://{self.registry.host}/bench/model:1", f"dir:{self.artifact}"])

    def restart_registry(self) -> None:
        if self.registry:
            self.registry.stop()
            shutil.rmtree(self.registry.directory)
        self.registry = Registry(self.work / "registry").start()

    def _fresh(self, *paths: Path) -> None:
        for p in paths:
            if p.exists():
                subprocess.run(["rm", "-rf", str(p)], check=True)
        subprocess.run(["sync"], check=True)

    def push(self) -> float:
        self.restart_registry()
        self._fresh()
        return run_timed(
            [*SOVPACK, "push", self.bundle, f"{self.registry.host}/bench/model:1", "--store", self.work / "push-store"]
        )

    def skopeo_push(self) -> float:
        self.restart_registry()
        self._fresh()
        return run_timed(
            ["skopeo", "copy", "--dest-tls-verify=false", f"dir:{self.artifact}", f"docker://{self.registry.host}/bench/model:1"]
        )

    def pull(self) -> float:
        store = self.work / "pull-store"
        self._fresh(store)
        ref = f"{self.registry.host}/bench/model:1"
        return run_timed([*SOVPACK, "pull", ref, "--store", store, "--trust", self.keys / "alice.pub"])

    def skopeo_pull(self) -> float:
        out = self.work / "skopeo-pull"
        self._fresh(out)
        return run_timed(
            ["skopeo", "copy", "--src-tls-verify=false", f"docker://{self.registry.host}/bench/model:1", f"dir:{out}"]
        )


def delta_pull(work: Path, keys: Path, size: int, new_file: int) -> Result:
    """v2 shares all but one file with v1, which the store holds: the bytes the pull of v2 fetches."""
    from sovpack.bundle.trust import load_trust
    from sovpack.oci.client import RegistryClient
    from sovpack.oci.pull import pull_bundle
    from sovpack.oci.reference import parse_reference
    from sovpack.store.store import Store

    v1 = signed_bundle(work, "delta", 1, {"model-00001.safetensors": size}, keys)
    v2 = signed_bundle(work, "delta", 2, {"model-00001.safetensors": size, "model-00002.safetensors": new_file}, keys)
    (work / "push-store").mkdir(exist_ok=True)  # push records itself in a store, which must exist
    with Registry(work / "delta-registry") as registry:
        store = Store(work / "delta-store")
        results = []
        for bundle, version in ((v1, 1), (v2, 2)):
            ref = parse_reference(f"{registry.host}/bench/delta:{version}", need_tag_or_digest=True)
            run([*SOVPACK, "push", bundle, str(ref), "--store", work / "push-store"])
            with RegistryClient(ref, None) as client:
                results.append(pull_bundle(client, store, load_trust([keys / "alice.pub"], 1)))
    second = results[1]
    signed = (v2 / "sovpack.json").stat().st_size + sum(p.stat().st_size for p in (v2 / "signatures").iterdir())
    expected = new_file + 64 + signed  # the new file (its safetensors header is a few dozen bytes), sovpack.json, signatures
    return Result(
        f"pull of v2 sharing all but one file with the installed v1 ({size // MiB} MiB + {new_file // MiB} MiB)",
        second.fetched_bytes / new_file,
        "only the new file moves (1.0x its size)",
        second.fetched == 1 and second.linked >= 2 and second.fetched_bytes <= expected,
        "the new file's size",
        {
            "fetched_files": second.fetched,
            "fetched_bytes": second.fetched_bytes,
            "linked_files": second.linked,
            "new_file_bytes": new_file,
        },
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="a 256 MiB bundle, one repetition")
    args = parser.parse_args()
    size = 256 * MiB if args.quick else 2048 * MiB
    repetitions = 1 if args.quick else 3
    with tempfile.TemporaryDirectory(dir=BENCH.parent) as tmp:
        work = Path(tmp)
        keys = work / "keys"
        run([*SOVPACK, "keygen", "alice", "--dir", keys])
        scenario = Scenario(work, signed_bundle(work, "bench", 1, {"model.safetensors": size}, keys), keys)
        try:
            samples = interleaved_samples(
                repetitions,
                skopeo_push=scenario.skopeo_push,
                push=scenario.push,
                skopeo_pull=scenario.skopeo_pull,
                pull=scenario.pull,
            )
        finally:
            scenario.registry.stop()
        times = {k: statistics.median(v) for k, v in samples.items()}
        results = [
            Result(
                f"push {size // MiB} MiB bundle to a loopback registry",
                times["push"] / times["skopeo_push"],
                "<= 1.3x skopeo's time",
                times["push"] <= 1.3 * times["skopeo_push"],
                "skopeo copy dir:ARTIFACT docker://REGISTRY/... of the same artifact",
                {"sovpack_s": round(times["push"], 2), "skopeo_s": round(times["skopeo_push"], 2), "samples": samples},
            ),
            Result(
                f"pull {size // MiB} MiB bundle (verified, installed) from a loopback registry",
                times["pull"] / times["skopeo_pull"],
                "<= 1.3x skopeo's time",
                times["pull"] <= 1.3 * times["skopeo_pull"],
                "skopeo copy docker://REGISTRY/... dir:OUT of the same artifact",
                {"sovpack_s": round(times["pull"], 2), "skopeo_s": round(times["skopeo_pull"], 2), "samples": samples},
            ),
            delta_pull(work, keys, 64 * MiB if args.quick else 512 * MiB, 16 * MiB),
        ]
    notes = [
        "The registry restarts with empty storage before every push (sovpack's and skopeo's), outside the timing, so every "
        "blob is sent. sovpack pull verifies the whole bundle (signatures, every digest, formats) and installs it atomically; "
        "skopeo checks each blob's digest as it writes it.",
        f"{repetitions} interleaved repetition(s), median. Details: "
        + json.dumps({k: [round(x, 2) for x in v] for k, v in samples.items()}),
    ]
    write_results("oci", "OCI push and pull (docs/oci.md)", results, notes)


if __name__ == "__main__":
    main()
