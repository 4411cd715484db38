"""An import killed (SIGKILL) at every phase leaves the store as it was, and a re-run completes.

The importing process is real (`python -m sovpack import`); the test watches the store's
file system for the phase it is in (the journal of checked volumes, the staging directory,
the installed directory) and kills it there. No hooks in sovpack.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from builders import write_model_dir
from helpers import MiB, sovpack, store_snapshot, write_big_safetensors

from sovpack.bundle.keys import generate_key_pair, load_private_key
from sovpack.bundle.pack import pack
from sovpack.bundle.sign import sign_bundle
from sovpack.store.store import Store
from sovpack.transfer.export import export_volumes

SIZE = 128 * MiB
VOLUME = 16 * MiB


@pytest.fixture(scope="module")
def big_export(tmp_path_factory) -> tuple[Path, Path]:
    work = tmp_path_factory.mktemp("big")
    generate_key_pair("alice", work / "keys")
    model = write_model_dir(work / "model")
    write_big_safetensors(model / "model-00002.safetensors", SIZE)
    pack(model, work / "bundle", "big", version=1)
    sign_bundle(work / "bundle", load_private_key(work / "keys" / "alice.key"))
    export_volumes(work / "bundle", work / "out", volume_size=VOLUME)
    return work / "out", work / "keys" / "alice.pub"


@pytest.fixture
def store(tmp_path, big_export) -> Path:
    root = tmp_path / "store"
    Store(root).add_trusted_key(big_export[1])
    return root


def journal(store: Path) -> dict | None:
    for path in store.glob("tmp/import-*/journal.json"):
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            return None
    return None


def checking(store: Path, out: Path) -> bool:
    j = journal(store)
    return bool(j) and "reassembled" not in j


def reassembling(store: Path, out: Path) -> bool:
    """Every volume read and found intact (all in the journal), the staged files not yet all on disk."""
    j = journal(store) or {}
    volumes = {v["file"] for v in json.loads((out / "big-v1.index.json").read_text())["volumes"]}
    return "reassembled" not in j and set(j) == volumes and any(store.glob("tmp/import-*/bundle/model-00002.safetensors"))


def verifying(store: Path, out: Path) -> bool:
    return (journal(store) or {}).get("reassembled") is True


def kill_when(condition, out: Path, store: Path) -> None:
    process = subprocess.Popen(
        [sys.executable, "-m", "sovpack", "import", out, "--store", store], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 60
    try:
        while not condition(store, out):
            assert process.poll() is None, "the import ended before the phase to interrupt was reached"
            assert time.monotonic() < deadline
            time.sleep(0.0005)
    finally:
        process.kill()
        process.wait()


@pytest.mark.parametrize("phase", [checking, reassembling, verifying], ids=["volume-check", "reassembly", "verify"])
def test_kill_before_install_leaves_the_store_unchanged_and_a_rerun_completes(big_export, store, phase):
    out, _ = big_export
    before = store_snapshot(store)
    kill_when(phase, out, store)
    assert store_snapshot(store) == before
    assert not (store / "bundles").exists()
    again = sovpack("import", out, "--store", store)
    assert again.returncode == 0, again.stderr
    assert b"INSTALLED big v1" in again.stdout
    reused = again.stdout.count(b"OK  intact in an earlier run and unchanged since: not read again")
    volumes = -(-SIZE // VOLUME)
    assert reused >= 1 if phase is checking else reused >= volumes  # killed mid-check: those checked so far
    if phase is verifying:
        assert b"reassembled in an earlier run" in again.stdout
    assert list((store / "tmp").iterdir()) == []
    assert sovpack("verify", "big", "--store", store).returncode == 0


def test_kill_at_the_commit_and_a_rerun_completes_the_install(big_export, store):
    out, _ = big_export
    kill_when(lambda s, _: (s / "bundles" / "big" / "1").exists(), out, store)
    again = sovpack("import", out, "--store", store)
    assert again.returncode == 0, again.stderr
    assert json.loads((store / "records" / "big" / "1.json").read_text())["accepted_by"][0]["name"] == "alice"
    assert json.loads((store / "state" / "versions.json").read_text()) == {"big": 1}
    installed = store / "bundles" / "big" / "1" / "model-00002.safetensors"
    assert installed.stat().st_nlink == 2  # shared with objects/
    assert sovpack("audit", "verify", "--store", store).returncode == 0
    assert sovpack("verify", "big", "--store", store).returncode == 0
    assert [p.name for p in (store / "tmp").iterdir()] == []
