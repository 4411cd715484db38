"""The whole trip on the embedded default model, SmolLM2-135M-Instruct, step by step.

Run by `make demo`. Everything happens under demo-output/ (recreated on each run).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "demo-output"
SOVPACK = [sys.executable, "-m", "sovpack"]

sys.path.insert(0, str(ROOT / "scripts"))
from get_model import ensure_model  # noqa: E402


def step(title: str, *args: str | Path) -> None:
    print(f"\n== {title}\n$ sovpack {' '.join(str(a).replace(str(ROOT) + '/', '') for a in args)}", flush=True)
    start = time.perf_counter()
    result = subprocess.run([*SOVPACK, *map(str, args)], cwd=ROOT)
    print(f"   ({time.perf_counter() - start:.1f} s)", flush=True)
    if result.returncode != 0:
        sys.exit(f"demo stopped: `sovpack {args[0]}` exited with {result.returncode}")


def main() -> None:
    shutil.rmtree(OUT, ignore_errors=True)
    model_dir = OUT / "model"
    model_dir.mkdir(parents=True)
    shutil.copy(ensure_model(), model_dir / "SmolLM2-135M-Instruct-Q4_1.gguf")
    step("a signing key for the approving officer", "keygen", "officer", "--dir", OUT / "keys")
    step("pack the model into a bundle", "pack", model_dir, "--out", OUT / "bundle", "--name", "smollm2-135m-instruct", "--version", "1", "--expires", "365d")
    step("sign it", "sign", OUT / "bundle", "--key", OUT / "keys" / "officer.key")
    step("verify it against the trusted key", "verify", OUT / "bundle", "--trust", OUT / "keys" / "officer.pub")
    print("\nThe bundle is signed and verified: demo-output/bundle")


if __name__ == "__main__":
    main()
