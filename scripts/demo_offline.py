"""`make demo-offline`: sovpack itself crosses the gap, then the secure side runs with no network at all.

Connected side (this checkout): build the runtime (sovpack and every dependency as wheels, the
lock, the installer), sign it as the approving officer, export it to 40 MB volumes with the
installer beside them; pack, sign and export the default model the same way. Secure side, in a
network namespace with no network (`unshare -n`, as root): scripts/offline_secure_side.py installs
the runtime from the volumes into a fresh virtual environment and runs trust, check-volumes,
import, verify, serve and one question through the `openai` package, all with that installation.
Everything lives under demo-output/offline/ (recreated on each run).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "demo-output" / "offline"  # ignored by git and ruff, like the demo's
SOVPACK = [sys.executable, "-m", "sovpack"]

sys.path.insert(0, str(ROOT / "scripts"))
from get_model import ensure_model  # noqa: E402


def step(title: str, *args: str | Path) -> None:
    print(f"\n-- {title}\n$ sovpack {' '.join(str(a).replace(str(ROOT) + '/', '') for a in args)}", flush=True)
    start = time.perf_counter()
    if subprocess.run([*SOVPACK, *map(str, args)], cwd=ROOT).returncode != 0:
        sys.exit(f"demo stopped: `sovpack {args[0]}` failed")
    print(f"   ({time.perf_counter() - start:.1f} s)", flush=True)


def main() -> None:
    if shutil.which("unshare") is None or os.geteuid() != 0:
        sys.exit("demo-offline needs `unshare -n` as root (a network namespace with no network)")
    os.environ.setdefault("COLUMNS", "120")
    shutil.rmtree(OUT, ignore_errors=True)
    (OUT / "model-src").mkdir(parents=True)
    print("=" * 78 + "\nCONNECTED SIDE: build, sign and export the runtime; pack, sign and export the model\n" + "=" * 78)
    step("a signing key for the approving officer", "keygen", "officer", "--dir", OUT / "keys")
    step("build the runtime: every wheel for this host, locked by SHA-256", "runtime", "build", "--out", OUT / "runtime")
    step("the officer signs it", "sign", OUT / "runtime", "--key", OUT / "keys" / "officer.key")
    step("export it to 40 MB volumes", "export", OUT / "runtime", "--to", OUT / "usb-runtime", "--volume-size", "40M")
    shutil.copyfile(OUT / "runtime" / "install-runtime.py", OUT / "usb-runtime" / "install-runtime.py")
    print("   + install-runtime.py copied beside the volumes (check its SHA-256 against the paper on the other side)")
    model = ensure_model()
    os.symlink(model, OUT / "model-src" / model.name)
    step("pack the default model", "pack", OUT / "model-src", "--out", OUT / "model", "--name", "smollm2-135m-instruct")
    step("the officer signs it", "sign", OUT / "model", "--key", OUT / "keys" / "officer.key")
    step("export it", "export", OUT / "model", "--to", OUT / "usb-model", "--volume-size", "40M")

    print("\n" + "=" * 78 + "\nSECURE SIDE, NO NETWORK (unshare -n): install sovpack, trust, import, verify, serve\n" + "=" * 78)
    args = ["--runtime-media", OUT / "usb-runtime", "--model-media", OUT / "usb-model"]
    args += ["--public-key", OUT / "keys" / "officer.pub", "--prefix", OUT / "secure-host" / "opt-sovpack"]
    args += ["--store", OUT / "secure-host" / "store", "--work", OUT / "secure-host"]
    result = subprocess.run(["unshare", "-n", sys.executable, ROOT / "scripts" / "offline_secure_side.py", *map(str, args)])
    if result.returncode != 0:
        sys.exit("demo stopped on the secure side")
    print("\nDone: sovpack and the model crossed the gap; the secure host never had a network. See demo-output/offline/.")


if __name__ == "__main__":
    main()
