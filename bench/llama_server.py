"""llama.cpp's own `llama-server`, built from the very llama.cpp that the installed llama-cpp-python vendors.

The reference for serve's concurrency benchmark. pip downloads llama-cpp-python's sdist at the installed
version (the same llama.cpp commit as the library serve loads), cmake builds only the `llama-server`
target for the CPU with the same defaults the wheel was built with, and the binary is cached under
.cache/llama-server/<version>/, so the compile (several minutes on 2 cores) happens once.

Usage: python bench/llama_server.py   (prints the binary's path, building it first if needed)
"""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / ".cache" / "llama-server"
CMAKE_OPTIONS = [
    "-DCMAKE_BUILD_TYPE=Release",
    "-DBUILD_SHARED_LIBS=OFF",
    "-DLLAMA_BUILD_SERVER=ON",
    "-DLLAMA_BUILD_TOOLS=ON",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_UI=OFF",
    "-DLLAMA_USE_PREBUILT_UI=OFF",  # no internet on the build machines
    "-DLLAMA_CURL=OFF",  # as llama-cpp-python builds it
    "-DLLAMA_OPENSSL=OFF",
    "-DGGML_CUDA=OFF",
    "-DGGML_VULKAN=OFF",
    "-DGGML_METAL=OFF",
]


def installed_version() -> str:
    return importlib.metadata.version("llama-cpp-python")


def ensure_llama_server(version: str | None = None) -> Path:
    version = version or installed_version()
    binary = CACHE / version / "llama-server"
    if binary.exists():
        return binary
    binary.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="llama-server-build-") as tmp:
        source = vendored_llama_cpp(version, Path(tmp))
        build = Path(tmp) / "build"
        jobs = str(len(os.sched_getaffinity(0)))
        subprocess.run(["cmake", "-S", source, "-B", build, *CMAKE_OPTIONS], check=True)
        subprocess.run(["cmake", "--build", build, "--target", "llama-server", "-j", jobs], check=True)
        built = build / "bin" / "llama-server"
        partial = binary.with_suffix(".partial")
        partial.write_bytes(built.read_bytes())
        partial.chmod(0o755)
        partial.rename(binary)  # nothing half-written under the name that is looked for
    return binary


def vendored_llama_cpp(version: str, into: Path) -> Path:
    """Download llama-cpp-python's sdist at `version` and extract its vendor/llama.cpp."""
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps", "--quiet"]
        + [f"llama-cpp-python=={version}", "-d", str(into)],
        check=True,
    )
    (sdist,) = into.glob("llama_cpp_python-*.tar.gz")
    prefix = f"{sdist.name.removesuffix('.tar.gz')}/vendor/llama.cpp/"
    with tarfile.open(sdist) as tar:
        members = [m for m in tar.getmembers() if m.name.startswith(prefix)]
        tar.extractall(into, members=members, filter="data")
    return into / prefix


if __name__ == "__main__":
    print(ensure_llama_server())
