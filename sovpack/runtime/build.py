"""`sovpack runtime build`: sovpack and every dependency as wheels, a lock of their digests, the installer, one bundle.

On the connected build host, pip collects the wheels (`pip wheel`; llama-cpp-python is compiled
once for this host's CPU and pip's wheel cache keeps it; `--gpu cuda` compiles it again with
CUDA), then the lock (runtime-lock.json) records every wheel's size and SHA-256, the target
(Python minor version, machine) and the installer's SHA-256, and everything is packed as the
ordinary bundle `sovpack-runtime`: signed, exported and imported like a model. The wheels enter
it under the signed allowance `wheels/*.whl` (WHEEL_ALLOWANCE): the file-kind gate takes a wheel
only under an allowance, and `inspect` and `verify` show it.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
import tomllib
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from sovpack import __version__
from sovpack.bundle.metadata import BundleMetadata
from sovpack.bundle.pack import pack
from sovpack.common.files import remove_tree
from sovpack.common.hashing import sha256_file
from sovpack.common.progress import Progress
from sovpack.errors import Failure, UsageError
from sovpack.runtime import installer
from sovpack.runtime.installer import INSTALLER_FILE, LOCK_FILE, LOCK_FORMAT, LOCK_FORMAT_VERSION, RUNTIME_NAME, WHEELS_DIR
from sovpack.runtime.upgrade import bounded_json

EXTRAS = "serve"  # what the secure side runs: verify, import, serve (llama-cpp-python[server]), quantize
GPU_BUILDS = {"cuda": ("nvcc", "-DGGML_CUDA=on")}  # --gpu: the compiler that must be there, llama.cpp's CMake flag
WHEEL_ALLOWANCE = f"{WHEELS_DIR}/*.whl"  # the signed allowance the gate needs to carry wheels


@dataclass(frozen=True)
class BuiltRuntime:
    out: Path
    metadata: BundleMetadata
    lock_sha256: str
    installer_sha256: str
    wheels: int


def project_root() -> Path | None:
    """The source checkout the running sovpack comes from, if it runs from one."""
    root = Path(__file__).resolve().parents[2]
    return root if (root / "pyproject.toml").is_file() else None


def build_runtime(
    out: Path,
    *,
    version: int = 1,
    source: Path | None = None,
    gpu: str | None = None,
    progress: Progress | None = None,
) -> BuiltRuntime:
    """Collect the wheels into a staging directory, lock them, and pack the bundle at `out` (wheels under WHEEL_ALLOWANCE).

    Raises: UsageError (no source checkout, an unknown --gpu, `out` exists), Failure (pip failed,
    no GPU compiler), Refused (a file the file-kind gate refuses).
    """
    progress = progress or Progress()
    source = source or project_root()
    if source is None or not (source / "pyproject.toml").is_file():
        raise UsageError("give --source: a sovpack source checkout (the running sovpack was not installed from one)")
    if gpu is not None and gpu not in GPU_BUILDS:
        raise UsageError(f"--gpu {gpu!r}: the builds known are {', '.join(GPU_BUILDS)}")
    if out.exists():
        raise UsageError(f"{out} already exists; choose a new --out directory")
    staging = out.with_name(f".{out.name}.wheels")
    remove_tree(staging)
    try:
        wheels = staging / WHEELS_DIR
        collect_wheels(source.resolve(), wheels, gpu, progress)
        shutil.copyfile(Path(installer.__file__), staging / INSTALLER_FILE)
        installer_sha256 = sha256_file(staging / INSTALLER_FILE)
        lock = write_lock(staging, version, gpu, installer_sha256)
        progress.phase(f"packing {len(lock['wheels'])} wheels as {RUNTIME_NAME} v{version}")
        progress.note(
            f"packing {len(lock['wheels'])} wheels as {RUNTIME_NAME} v{version} (allowance --allow-file {WHEEL_ALLOWANCE!r})"
        )
        metadata, _ = pack(staging, out, RUNTIME_NAME, version=version, allowances=[WHEEL_ALLOWANCE])
    finally:
        remove_tree(staging)
    return BuiltRuntime(out, metadata, sha256_file(out / LOCK_FILE), installer_sha256, len(lock["wheels"]))


def collect_wheels(source: Path, wheels: Path, gpu: str | None, progress: Progress) -> None:
    """pip wheel sovpack[serve] and pip itself (the installer runs pip from its wheel) into `wheels`."""
    wheels.mkdir(parents=True)
    if gpu:
        compiler, cmake_flag = GPU_BUILDS[gpu]
        if shutil.which(compiler) is None:
            raise Failure(f"--gpu {gpu} needs the {gpu.upper()} toolkit on this build host, but {compiler} is not on PATH")
        # pip's wheel cache would hand back the CPU build: compile llama-cpp-python again, uncached, first
        progress.phase(f"compiling llama-cpp-python with {cmake_flag}")
        progress.note(f"compiling llama-cpp-python with {cmake_flag} (several minutes)")
        env = os.environ | {"CMAKE_ARGS": f"{os.environ.get('CMAKE_ARGS', '')} {cmake_flag}".strip()}
        _pip(["wheel", "--no-cache-dir", "--no-deps", "--wheel-dir", str(wheels), _llama_requirement(source)], env)
    progress.phase(f"collecting sovpack[{EXTRAS}] as wheels")
    progress.note(f"collecting sovpack[{EXTRAS}] and its dependencies as wheels (pip wheel; llama-cpp-python from pip's cache)")
    _pip(["wheel", "--wheel-dir", str(wheels), "--find-links", str(wheels), f"{source}[{EXTRAS}]", "pip"], os.environ)
    odd = sorted(p.name for p in wheels.iterdir() if not p.name.endswith(".whl"))
    if odd:
        raise Failure(f"pip left files that are not wheels in {wheels}: {', '.join(odd)}")


def _llama_requirement(source: Path) -> str:
    """llama-cpp-python at the versions the `serve` extra of pyproject.toml allows."""
    serve = tomllib.loads((source / "pyproject.toml").read_text())["project"]["optional-dependencies"][EXTRAS]
    return next(r for r in serve if r.startswith("llama-cpp-python")).replace("[server]", "")


def _pip(args: list[str], env) -> None:
    result = subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True, env=env)
    if result.returncode != 0:
        tail = "\n".join((result.stderr or result.stdout).strip().splitlines()[-8:])
        raise Failure(f"pip {args[0]} failed (exit {result.returncode}): {tail}")


def write_lock(staging: Path, version: int, gpu: str | None, installer_sha256: str) -> dict:
    """runtime-lock.json: every wheel's size and SHA-256, the target, the installer's SHA-256."""
    wheels = sorted((staging / WHEELS_DIR).iterdir())
    pip_wheel = next((w for w in wheels if w.name.startswith("pip-")), None)
    if pip_wheel is None or not any(w.name.startswith(f"sovpack-{__version__}-") for w in wheels):
        raise Failure(f"pip did not collect both pip and sovpack {__version__} into {staging / WHEELS_DIR}")
    lock = {
        "format": LOCK_FORMAT,
        "format_version": LOCK_FORMAT_VERSION,
        "name": RUNTIME_NAME,
        "version": version,
        "sovpack_version": __version__,
        "requirement": f"sovpack[{EXTRAS}]=={__version__}",
        "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "target": {
            "python": installer.host_python(),
            "machine": platform.machine(),
            "platform": sysconfig.get_platform(),
            "libc": "-".join(platform.libc_ver()),
        },
        "gpu": gpu,
        "installer": {"path": INSTALLER_FILE, "sha256": installer_sha256},
        "pip_wheel": f"{WHEELS_DIR}/{pip_wheel.name}",
        "wheels": [{"path": f"{WHEELS_DIR}/{w.name}", "size": w.stat().st_size, "sha256": sha256_file(w)} for w in wheels],
    }
    raw = (json.dumps(lock, indent=2) + "\n").encode()
    installer.parse_lock(raw, loads=bounded_json)  # what the installer will read back
    (staging / LOCK_FILE).write_bytes(raw)
    return lock
