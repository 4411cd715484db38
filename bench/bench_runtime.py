"""Offline runtime install vs a plain `pip install --no-index` of the same wheels; and the runtime bundle's size.

The runtime is built once (`sovpack runtime build`, signed, exported to volumes). Each repetition
then runs, as separate processes and in alternation, into a new directory each time:

- the installer from the media: check every volume, unpack them, verify the officer's signature
  with openssl and every file against it, every wheel against the lock, make a fresh virtual
  environment and `pip install --no-index` from the checked wheels, switch PREFIX/current;
- the reference: `python -m venv DIR && DIR/bin/pip install --no-index --find-links WHEELS WHEELS/*.whl`
  from the bundle's wheels directory (no checks, no unpacking).

Target: the installer's median time <= 1.3x the reference's. `--quick` runs 2 repetitions, else 3.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import SOVPACK, Result, interleaved, run_timed, write_results  # noqa: E402

BASE_PYTHON = str(Path(sys.base_prefix) / "bin" / "python3")
# neither the host's pip configuration nor this checkout may reach either install
CLEAN_ENV = {k: v for k, v in os.environ.items() if not k.startswith("PIP_") and k not in ("PYTHONPATH", "VIRTUAL_ENV")}
CLEAN_ENV["PIP_CONFIG_FILE"] = os.devnull


def build(work: Path) -> tuple[Path, Path, Path]:
    """The signed runtime bundle, its export with the installer beside it, and the officer's public key."""
    subprocess.run([*SOVPACK, "keygen", "officer", "--dir", work / "keys"], check=True, stdout=subprocess.DEVNULL)
    bundle, media = work / "runtime", work / "usb"
    subprocess.run([*SOVPACK, "runtime", "build", "--out", bundle], check=True, stdout=subprocess.DEVNULL)
    subprocess.run([*SOVPACK, "sign", bundle, "--key", work / "keys" / "officer.key"], check=True, stdout=subprocess.DEVNULL)
    subprocess.run([*SOVPACK, "export", bundle, "--to", media], check=True, stdout=subprocess.DEVNULL)
    shutil.copyfile(bundle / "install-runtime.py", media / "install-runtime.py")
    return bundle, media, work / "keys" / "officer.pub"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    reps = 2 if args.quick else 3
    with tempfile.TemporaryDirectory(prefix="bench-runtime-") as tmp:
        work = Path(tmp)
        bundle, media, public_key = build(work)
        wheels = sorted(str(p) for p in (bundle / "wheels").iterdir() if not p.name.startswith("pip-"))
        size = sum(p.stat().st_size for p in media.iterdir())
        counter = iter(range(10_000))

        def installer() -> float:
            prefix = work / f"prefix-{next(counter)}"
            cmd = [BASE_PYTHON, media / "install-runtime.py", media, "--prefix", prefix, "--public-key", public_key]
            return run_timed(list(map(str, cmd)), env=CLEAN_ENV, cwd=work)

        def plain_pip() -> float:
            venv = work / f"venv-{next(counter)}"
            cmd = f"{BASE_PYTHON} -m venv {venv} && {venv}/bin/pip install --quiet --no-index --find-links {bundle}/wheels "
            return run_timed(["sh", "-c", cmd + " ".join(wheels)], env=CLEAN_ENV, cwd=work)

        medians = interleaved(reps, plain_pip_install=plain_pip, sovpack_installer=installer)
    ratio = medians["sovpack_installer"] / medians["plain_pip_install"]
    result = Result(
        metric="offline runtime install (checks + fresh venv + pip --no-index) vs plain pip install of the same wheels",
        ratio=ratio,
        target="<= 1.3x its time",
        meets=ratio <= 1.3,
        reference="python -m venv && pip install --no-index --find-links WHEELS WHEELS/*.whl",
        absolute={
            "installer_s": round(medians["sovpack_installer"], 1),
            "plain_pip_s": round(medians["plain_pip_install"], 1),
            "runtime_export_bytes": size,
            "wheels": len(wheels) + 1,
        },
    )
    notes = [
        f"the runtime as exported (volumes, index, installer): {size / 2**20:.1f} MiB for {len(wheels) + 1} wheels "
        "(sovpack[serve] with llama-cpp-python built for this CPU, and pip); CPU build only, no GPU build was measured",
        f"{reps} interleaved repetitions, medians; both sides compile bytecode as pip does by default",
    ]
    write_results("runtime", "offline runtime install vs pip install --no-index", [result], notes)


if __name__ == "__main__":
    main()
