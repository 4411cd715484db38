"""Helpers shared by the tests: real processes, real files, and the export/import steps several tests take."""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import stat
import struct
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from builders import write_gguf

ROOT = Path(__file__).resolve().parent.parent
MiB = 1 << 20


def sovpack(*args, stdin=None, input: bytes | None = None, env: dict | None = None, **kwargs) -> subprocess.CompletedProcess:
    """`python -m sovpack ARGS` as a separate process."""
    return subprocess.run(
        [sys.executable, "-m", "sovpack", *map(str, args)],
        stdin=stdin,
        input=input,
        capture_output=True,
        env=env,
        cwd=ROOT,
        **kwargs,
    )


def store_snapshot(store: Path) -> dict:
    """Every installed thing in the store with its bytes' digest, mode and link count.

    Leaves out what changes by design on a refusal or a kill: tmp/ (staging and the journal of
    checked volumes), audit.log and its head witness (they gain the refusal) and the lock file.
    """
    snapshot = {}
    if not store.exists():
        return snapshot
    for p in sorted(store.rglob("*")):
        rel = p.relative_to(store).as_posix()
        if rel.split("/")[0] in ("tmp", "audit.log", ".lock") or rel == "state/audit-head.json":
            continue
        st = p.lstat()
        digest = hashlib.sha256(p.read_bytes()).hexdigest() if stat.S_ISREG(st.st_mode) else None
        snapshot[rel] = (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), digest, st.st_nlink if digest else None)
    return snapshot


def staged_bundles(store: Path) -> list[Path]:
    return sorted(store.glob("tmp/*/bundle"))


def flip_byte(path: Path, offset: int) -> None:
    os.chmod(path, 0o644)  # installed files are read-only; root writes them anyway, others could not
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))


def write_big_safetensors(path: Path, size: int) -> Path:
    """A valid safetensors file of `size` data bytes, written sparse (fast to make, read as zeros)."""
    header = json.dumps({"w": {"dtype": "U8", "shape": [size], "data_offsets": [0, size]}}).encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header)
        f.truncate(8 + len(header) + size)
    return path


def audit_records(store: Path) -> list[dict]:
    log = store / "audit.log"
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def export(cli, bundle: Path, to: Path, *extra) -> Path:
    result = cli("export", bundle, "--to", to, "--volume-size", "8K", *extra)
    assert result.code == 0, result.err
    return to


def volumes(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.suffix[1:].isdigit())


def new_version(cli, tmp_path, model_dir, keys, version: int, *, extra_gguf: bool = True, name: str = "tiny") -> Path:
    """The same model plus (by default) one more GGUF build, packed as VERSION and signed by alice."""
    if extra_gguf:
        write_gguf(model_dir / "gguf" / f"tiny-v{version}.gguf", n_tensors=3 + version)
    bundle = tmp_path / f"bundle-v{version}"
    assert cli("pack", model_dir, "--out", bundle, "--name", name, "--version", version).code == 0
    assert cli("sign", bundle, "--key", keys / "alice.key").code == 0
    return bundle


def bundle_with_big_file(cli, model_dir, tmp_path, keys, size: int) -> Path:
    write_big_safetensors(model_dir / "weights-2.safetensors", size)
    bundle = tmp_path / "bigbundle"
    assert cli("pack", model_dir, "--out", bundle, "--name", "tiny", "--version", "5").code == 0
    assert cli("sign", bundle, "--key", keys / "alice.key").code == 0
    return bundle


def drop_file_mode_override() -> None:
    """preexec_fn: a root process loses the capabilities that let it read any file (file modes apply to it again)."""
    libc = ctypes.CDLL(None, use_errno=True)
    for capability in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
        if libc.prctl(24, capability, 0, 0, 0) != 0:  # PR_CAPBSET_DROP: gone from the bounding set, so from what exec grants
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def unprivileged() -> dict:
    """Arguments for `sovpack` so that a file with mode 000 is unreadable to it, as it is to any operator but root."""
    if os.geteuid() != 0:
        return {}
    probe = subprocess.run(
        [sys.executable, "-c", "open('/proc/self/status')"], preexec_fn=drop_file_mode_override, capture_output=True
    )
    if probe.returncode != 0:
        pytest.skip("cannot drop CAP_DAC_OVERRIDE here, and root reads a file whatever its mode")
    return {"preexec_fn": drop_file_mode_override}


def tar_member(name: str, data: bytes, *, pax: dict | None = None, kind: bytes = tarfile.REGTYPE) -> bytes:
    """One member of a tar stream: header(s) and data, padded to whole blocks."""
    info = tarfile.TarInfo(name)
    info.type, info.size, info.pax_headers = kind, len(data), pax or {}
    return info.tobuf(tarfile.PAX_FORMAT) + data + bytes(-len(data) % tarfile.BLOCKSIZE)


def tar_stream(members: list[tuple[str, bytes]], *extra: bytes) -> bytes:
    return b"".join(tar_member(name, data) for name, data in members) + b"".join(extra) + bytes(2 * tarfile.BLOCKSIZE)


def old_gnu_sparse_member(name: str) -> bytes:
    info = tarfile.TarInfo(name)
    info.type = tarfile.GNUTYPE_SPARSE
    return info.tobuf(tarfile.GNU_FORMAT)  # an empty sparse map
