"""Install a sovpack runtime into a fresh virtual environment, offline, after checking every wheel.

This one file is the installer that travels on the media: standard library only, Python 3.11
or later, no sovpack needed. `sovpack runtime build` copies it into the runtime bundle as
install-runtime.py, and an installed sovpack imports it for `sovpack runtime install` and
`rollback`, so that the first install and every upgrade take the same steps:

1. unpack: the export's volumes, each checked against the index's SHA-256, read as one tar
   stream into PREFIX/tmp/ (only regular files at safe paths under the bundle's top directory;
   no links on the media, no GNU sparse members); a bundle directory is used as it is;
2. anchor: the signed statement in signatures/ is checked with `openssl` against the officer's
   public key (ECDSA cannot be verified with the standard library alone), and every file of the
   bundle against it; without openssl, the lock's SHA-256 is compared with a value carried on
   paper or on a separate medium (--lock-sha256). One of the two is required;
3. check every wheel in wheels/ against the lock (runtime-lock.json): none changed, none
   missing, none extra; and the lock's Python version and machine against this host;
4. install: a fresh virtual environment in PREFIX/runtimes/VERSION (pip, itself one of the
   checked wheels, installs with --no-index from wheels/ only), its runtime.json written last;
   a failed install is deleted; then PREFIX/current is switched to it by one rename, and
   PREFIX/previous keeps the runtime it replaced, for `sovpack runtime rollback`.

Every JSON document it reads (the index, signature files, the signed statement, the lock,
runtime.json) is measured before it is parsed (`bounded_loads`: size, nesting, duplicate keys,
NaN), as sovpack's common/safe_json.py does, which sovpack passes in (`loads=`) when it runs
this module itself.

Exit codes: 0 installed; 1 refused (a check failed, named in the message); 2 usage error;
3 any other failure; 130 interrupted.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath

RUNTIME_NAME = "sovpack-runtime"
LOCK_FILE = "runtime-lock.json"
LOCK_FORMAT = "sovpack-runtime-lock"
LOCK_FORMAT_VERSION = 1
INSTALLER_FILE = "install-runtime.py"
WHEELS_DIR = "wheels"
METADATA_FILE = "sovpack.json"
SIGNATURES_DIR = "signatures"
RECORD_FILE = "runtime.json"  # in PREFIX/runtimes/VERSION/, written last: the runtime is complete
PAYLOAD_TYPE = "application/vnd.in-toto+json"
HEX64 = re.compile(r"^[0-9a-f]{64}$")
_WHEEL_NAME = re.compile(r"^[A-Za-z0-9_.+!-]+\.whl$")
_CURVES = {"secp384r1": "-sha384", "prime256v1": "-sha256", "secp256r1": "-sha256"}
MAX_JSON_DEPTH = 64
MAX_LOCK_BYTES = 16 << 20
MAX_INDEX_BYTES = 64 << 20  # as sovpack's transfer/index.py
MAX_SIGNATURE_BYTES = 64 << 20  # as sovpack's bundle/signature.py
MAX_RECORD_BYTES = 16 << 20


class InstallError(Exception):
    exit_code = 3


class Refused(InstallError):
    exit_code = 1


class UsageError(InstallError):
    exit_code = 2


def sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


# ---- bounded JSON: the standard-library installer's own small version of sovpack's common/safe_json.py

Loads = Callable[[bytes, int], object]  # (raw, max_bytes) -> document; ValueError when refused
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")


def bounded_loads(raw: bytes, max_bytes: int) -> object:
    """JSON from untrusted bytes, measured first: at most `max_bytes`, MAX_JSON_DEPTH levels, no key twice, no NaN."""
    if len(raw) > max_bytes:
        raise ValueError(f"{len(raw)} bytes, over the {max_bytes} byte limit")
    if raw.count(b"[") + raw.count(b"{") > MAX_JSON_DEPTH and _nesting(raw) > MAX_JSON_DEPTH:
        raise ValueError(f"it nests deeper than {MAX_JSON_DEPTH} levels")
    return json.loads(raw.decode("utf-8"), object_pairs_hook=_unique_keys, parse_constant=_no_constant)


def _nesting(raw: bytes) -> int:
    """The deepest bracket nesting outside strings (escapes removed first, so every quote left opens or closes one)."""
    unescaped = raw.replace(b"\\\\", b"").replace(b'\\"', b"")
    brackets = b"".join(unescaped.split(b'"')[0::2]).translate(None, _NOT_BRACKETS)
    deepest = level = 0
    for byte in brackets:
        level += 1 if byte in b"[{" else -1
        deepest = max(deepest, level)
    return deepest


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    if len({key for key, _ in pairs}) != len(pairs):
        raise ValueError("a key appears twice in one object")
    return dict(pairs)


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON value")


def read_small(path: Path, limit: int, what: str) -> bytes:
    """The bytes of a file no larger than `limit`, refused naming it otherwise (and when it is a link on the media)."""
    if path.is_symlink():
        raise Refused(f"{path.name} in {path.parent} is a symbolic link; the media must hold the files themselves")
    if path.stat().st_size > limit:
        raise Refused(f"{path.name} is larger than {limit} bytes; not {what}")
    return path.read_bytes()


# ---- the lock


@dataclass(frozen=True)
class LockedWheel:
    path: str  # wheels/NAME.whl
    size: int
    sha256: str


@dataclass(frozen=True)
class Lock:
    version: int  # the runtime bundle's version
    sovpack_version: str
    python: str  # "3.11": the minor version the wheels were built for
    machine: str  # platform.machine() of the build host
    gpu: str | None
    requirement: str  # what pip installs, e.g. sovpack[serve]==0.1.0
    pip_wheel: str  # wheels/pip-*.whl: the pip that installs the others
    installer_sha256: str
    wheels: tuple[LockedWheel, ...]

    def wheel(self, path: str) -> LockedWheel | None:
        return next((w for w in self.wheels if w.path == path), None)


def parse_lock(raw: bytes, source: str = LOCK_FILE, loads: Loads = bounded_loads) -> Lock:
    """Validate every field of a lock file; problems name the file and the field."""
    try:
        doc = loads(raw, MAX_LOCK_BYTES)
    except ValueError as e:  # UnicodeDecodeError included
        raise Refused(f"{source} is not a runtime lock (invalid JSON: {e})") from None

    def field(data, key, kind, where=""):
        value = data.get(key) if isinstance(data, dict) else None
        if not isinstance(value, kind) or isinstance(value, bool):
            raise Refused(f"{source}: field {where}{key!r} is missing or not a {kind.__name__}")
        return value

    if field(doc, "format", str) != LOCK_FORMAT or field(doc, "format_version", int) != LOCK_FORMAT_VERSION:
        raise Refused(f"{source}: not a {LOCK_FORMAT} version {LOCK_FORMAT_VERSION} file")
    wheels = []
    for i, w in enumerate(field(doc, "wheels", list)):
        where = f"wheels[{i}]."
        path, size, sha256 = field(w, "path", str, where), field(w, "size", int, where), field(w, "sha256", str, where)
        name = PurePosixPath(path).name
        if path != f"{WHEELS_DIR}/{name}" or not _WHEEL_NAME.match(name) or not HEX64.match(sha256) or size < 0:
            raise Refused(f"{source}: {where[:-1]} ({path!r}) is not a wheel under {WHEELS_DIR}/ with a size and a SHA-256")
        wheels.append(LockedWheel(path, size, sha256))
    if len({w.path for w in wheels}) != len(wheels):
        raise Refused(f"{source}: a wheel is listed twice")
    target, installer = field(doc, "target", dict), field(doc, "installer", dict)
    lock = Lock(
        version=field(doc, "version", int),
        sovpack_version=field(doc, "sovpack_version", str),
        python=field(target, "python", str, "target."),
        machine=field(target, "machine", str, "target."),
        gpu=doc.get("gpu") if isinstance(doc.get("gpu"), str) else None,
        requirement=field(doc, "requirement", str),
        pip_wheel=field(doc, "pip_wheel", str),
        installer_sha256=field(installer, "sha256", str, "installer."),
        wheels=tuple(wheels),
    )
    if lock.version < 1 or lock.wheel(lock.pip_wheel) is None:
        raise Refused(f"{source}: its version is below 1 or its pip_wheel {lock.pip_wheel!r} is not one of its wheels")
    return lock


def check_wheels(root: Path, lock: Lock) -> list[LockedWheel]:
    """Every wheel in ROOT/wheels/ is in the lock with its size and SHA-256, and every locked wheel is there."""
    directory = root / WHEELS_DIR
    present = sorted(p.name for p in directory.iterdir()) if directory.is_dir() else []
    for name in present:
        rel = f"{WHEELS_DIR}/{name}"
        if lock.wheel(rel) is None:
            raise Refused(f"{rel} is not in {LOCK_FILE}: a wheel that was not locked (an extra wheel) is never installed")
    for w in lock.wheels:
        path = root / w.path
        if not path.is_file() or path.is_symlink():
            raise Refused(f"{w.path} is listed in {LOCK_FILE} but missing from {root / WHEELS_DIR}")
        size = path.stat().st_size
        if size != w.size:
            raise Refused(f"{w.path} has {size} bytes, {LOCK_FILE} says {w.size}: the wheel was changed")
        found = sha256_file(path)
        if found != w.sha256:
            raise Refused(f"{w.path} has SHA-256 {found}, {LOCK_FILE} says {w.sha256}: the wheel was changed")
    return list(lock.wheels)


def host_python() -> str:
    return f"{sys.version_info.major}.{sys.version_info.minor}"


def check_target(lock: Lock) -> None:
    """The wheels hold compiled code for one Python minor version and one machine."""
    if (lock.python, lock.machine) != (host_python(), platform.machine()):
        raise Refused(
            f"{LOCK_FILE}: this runtime was built for Python {lock.python} on {lock.machine}, but this host runs Python "
            f"{host_python()} on {platform.machine()}: build the runtime on a host like this one"
        )


# ---- unpacking volumes from the media


@contextmanager
def opened_source(source: Path, tmp_root: Path) -> Iterator[Path]:
    """The bundle directory SOURCE is, or the one its volumes unpack to in TMP_ROOT (deleted afterwards)."""
    if (source / METADATA_FILE).is_file():
        yield source
        return
    index = _find_index(source)
    tmp_root.mkdir(parents=True, exist_ok=True)
    unpacked = Path(tempfile.mkdtemp(prefix="unpack-", dir=tmp_root))
    try:
        yield unpack_volumes(index, unpacked)
    finally:
        shutil.rmtree(unpacked, ignore_errors=True)
        try:
            tmp_root.rmdir()
        except OSError:
            pass  # another install is unpacking there


def _find_index(source: Path) -> Path:
    if source.is_file() and source.name.endswith(".index.json"):
        return source
    indexes = sorted(source.glob("*.index.json")) if source.is_dir() else []
    if len(indexes) != 1:
        raise UsageError(
            f"{source} is neither a runtime bundle directory nor a directory holding one export's volumes and "
            f"its *.index.json (found {len(indexes)} index files)"
        )
    return indexes[0]


def unpack_volumes(index_path: Path, into: Path) -> Path:
    """Check every volume against the index, then unpack the tar stream they make; returns the bundle directory."""
    try:
        index = bounded_loads(read_small(index_path, MAX_INDEX_BYTES, "an export index"), MAX_INDEX_BYTES)
        bundle, volumes = index["bundle"], index["volumes"]
        stem = f"{bundle['name']}-v{int(bundle['version'])}"
        volumes = [(str(v["file"]), int(v["size"]), str(v["sha256"])) for v in volumes]
        left_out = index.get("left_out") or []
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise Refused(f"{index_path.name} is not a sovpack export index ({type(e).__name__}: {e})") from None
    if left_out:
        raise Refused(
            f"{index_path.name} is a delta export (made with --since: {len(left_out)} file(s) left out); a bare host "
            "holds none of them: install from a full export, or upgrade with `sovpack runtime install`"
        )
    directory = index_path.parent
    for file, size, digest in volumes:
        path = directory / file
        if PurePosixPath(file).name != file or not path.is_file():
            raise Refused(f"volume {file} listed in {index_path.name} is missing from {directory}")
        if path.is_symlink():
            raise Refused(f"volume {file} in {directory} is a symbolic link; the media must hold the files themselves")
        if path.stat().st_size != size or sha256_file(path) != digest:
            raise Refused(f"volume {file} is damaged: its size or SHA-256 differs from {index_path.name}")
    try:
        with _Concatenated([directory / f for f, _, _ in volumes]) as stream:
            _extract(tarfile.open(fileobj=stream, mode="r|", tarinfo=_NoSparseTarInfo), stem, into)
    except _SparseMember as e:
        raise Refused(
            f"{e.args[0]} in the volumes of {index_path.name} is a GNU sparse member; bundles hold only regular files"
        ) from None
    except (tarfile.TarError, EOFError, ValueError, OverflowError) as e:  # ValueError: malformed numbers in headers
        raise Refused(f"the volumes of {index_path.name} do not hold a whole tar stream ({e})") from None
    if not (into / stem / METADATA_FILE).is_file():
        raise Refused(f"the volumes of {index_path.name} hold no {stem}/{METADATA_FILE}")
    return into / stem


def _extract(tar: tarfile.TarFile, stem: str, into: Path) -> None:
    with tar:
        for member in tar:
            rel = _member_path(member, stem)
            if member.isdir():
                continue
            target = into / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            with tar.extractfile(member) as src, open(target, "xb") as out:
                shutil.copyfileobj(src, out, 1 << 20)


class _SparseMember(Exception):
    """A GNU sparse member (raised from inside tarfile, as sovpack's transfer/archive.py does)."""


class _NoSparseTarInfo(tarfile.TarInfo):
    """tarfile's header reader, minus GNU sparse members: refused before their (unbounded) maps are read."""

    def _proc_sparse(self, tarfile):
        raise _SparseMember(self.name)

    def _proc_gnusparse_00(self, next, pax_headers, buf):
        raise _SparseMember(next.name)

    def _proc_gnusparse_01(self, next, pax_headers):
        raise _SparseMember(next.name)

    def _proc_gnusparse_10(self, next, pax_headers, tarfile):
        raise _SparseMember(next.name)


def _member_path(member: tarfile.TarInfo, stem: str) -> str:
    name = member.name.rstrip("/") if member.isdir() else member.name
    parts = PurePosixPath(name).parts
    unsafe = not parts or parts[0] != stem or any(p in ("", ".", "..") or "\\" in p for p in parts) or name.startswith("/")
    if unsafe or not (member.isreg() or member.isdir()):
        raise Refused(f"the volumes hold {member.name!r}, which is not a regular file at a safe path under {stem}/")
    return name


class _Concatenated:
    """Several volume files read as one stream, in order."""

    def __init__(self, paths: list[Path]):
        self.paths, self.current = list(paths), None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.current:
            self.current.close()

    def read(self, n: int = -1) -> bytes:
        while True:
            if self.current is None:
                if not self.paths:
                    return b""
                self.current = open(self.paths.pop(0), "rb")
            data = self.current.read(n)
            if data or n == 0:
                return data
            self.current.close()
            self.current = None


# ---- anchoring: the signature (openssl) or the lock's SHA-256 carried separately


def check_signature(root: Path, public_key: Path) -> str:
    """Verify the officer's signature with openssl, then every file of the bundle against the signed statement."""
    openssl = shutil.which("openssl")
    if openssl is None:
        raise InstallError(
            "openssl is not installed, and ECDSA signatures cannot be checked with Python's standard library alone: "
            "give --lock-sha256 with the lock's SHA-256 carried on paper (or install openssl)"
        )
    pem = public_key.read_bytes()
    hint = hashlib.sha256(pem).hexdigest()
    envelope, name = _signature_by(root, hint, public_key)
    curve = subprocess.run([openssl, "pkey", "-pubin", "-in", str(public_key), "-noout", "-text"], capture_output=True, text=True)
    digest = next((flag for c, flag in _CURVES.items() if c in curve.stdout), None)
    if curve.returncode != 0 or digest is None:
        raise UsageError(f"{public_key} is not an ECDSA P-384 or P-256 public key in PEM form")
    try:
        payload = base64.b64decode(envelope["payload"], validate=True)
        signature = base64.b64decode(envelope["signatures"][0]["sig"], validate=True)
    except (KeyError, IndexError, TypeError, ValueError) as e:
        raise Refused(f"{name} is not a valid signature file ({type(e).__name__}: {e})") from None
    pae = b"DSSEv1 %d %s %d %s" % (len(PAYLOAD_TYPE), PAYLOAD_TYPE.encode(), len(payload), payload)
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "pae").write_bytes(pae)
        Path(tmp, "sig").write_bytes(signature)
        checked = subprocess.run(
            [openssl, "dgst", digest, "-verify", str(public_key), "-signature", f"{tmp}/sig", f"{tmp}/pae"], capture_output=True
        )
    if checked.returncode != 0:
        raise Refused(f"{name} does not verify under {public_key}: the signed statement was altered or forged")
    _check_statement(root, payload, name)
    return f"signature {name} by {public_key.name} (sha256 of the key {hint}) verified with openssl"


def _signature_by(root: Path, hint: str, public_key: Path) -> tuple[dict, str]:
    for path in sorted((root / SIGNATURES_DIR).glob("*.sig")):
        try:
            doc = bounded_loads(read_small(path, MAX_SIGNATURE_BYTES, "a signature file"), MAX_SIGNATURE_BYTES)
            if doc["verificationMaterial"]["publicKey"]["hint"] == hint and doc["dsseEnvelope"]["payloadType"] == PAYLOAD_TYPE:
                return doc["dsseEnvelope"], f"{SIGNATURES_DIR}/{path.name}"
        except (ValueError, KeyError, TypeError, Refused):
            continue
    raise Refused(
        f"{root / SIGNATURES_DIR} holds no signature by {public_key} (key sha256 {hint}): {LOCK_FILE} was not signed "
        "by this officer's key (a signature made with a certificate, `sovpack sign --cert`, names no key: the installer "
        "checks key signatures only; sign the runtime with the officer's key too, or give --lock-sha256)"
    )


def _check_statement(root: Path, payload: bytes, name: str) -> None:
    """Every file of the bundle (outside signatures/) is listed in the signed statement with its SHA-256, and no more."""
    try:
        resources = {r["name"]: r["digest"] for r in bounded_loads(payload, MAX_SIGNATURE_BYTES)["predicate"]["resources"]}
    except (ValueError, KeyError, TypeError) as e:
        raise Refused(f"{name}: the signed statement is malformed ({type(e).__name__}: {e})") from None
    present = {
        p.relative_to(root).as_posix()
        for p in root.rglob("*")
        if not p.is_dir() and p.relative_to(root).parts[0] != SIGNATURES_DIR
    }
    extra, missing = sorted(present - resources.keys()), sorted(resources.keys() - present)
    if extra:
        raise Refused(f"{extra[0]} is not covered by the signature {name}: a file was added after signing")
    if missing:
        raise Refused(f"{missing[0]} is signed in {name} but missing from {root}")
    for rel in sorted(present):
        path = root / rel
        if path.is_symlink() or not path.is_file():
            raise Refused(f"{rel} is not a regular file")
        if sha256_file(path) != resources[rel]:
            raise Refused(f"{rel} does not match its SHA-256 in the signature {name}: the file was changed after signing")


@dataclass(frozen=True)
class Verified:
    root: Path
    lock: Lock
    lock_sha256: str
    anchors: tuple[str, ...]
    wheels: tuple[LockedWheel, ...]


def verify_runtime(root: Path, public_keys: list[Path], lock_sha256: str | None, loads: Loads = bounded_loads) -> Verified:
    """Anchor the lock (signature and/or SHA-256 carried separately), then check the wheels and the target."""
    if not public_keys and not lock_sha256:
        raise UsageError("nothing to anchor the check to: give --public-key OFFICER.pub and/or --lock-sha256 HEX (from paper)")
    lock_path = root / LOCK_FILE
    if not lock_path.is_file():
        raise Refused(f"{root} holds no {LOCK_FILE}: it is not a sovpack runtime")
    raw = read_small(lock_path, MAX_LOCK_BYTES, "a runtime lock")
    digest = hashlib.sha256(raw).hexdigest()
    anchors = []
    if lock_sha256:
        if lock_sha256.strip().lower() != digest:
            raise Refused(f"{LOCK_FILE} has SHA-256 {digest}, not {lock_sha256} as carried separately: the lock was changed")
        anchors.append(f"{LOCK_FILE} sha256 {digest} matches the value carried separately")
    for key in public_keys:
        anchors.append(check_signature(root, key))
    lock = parse_lock(raw, loads=loads)
    installer = root / INSTALLER_FILE
    if not installer.is_file() or sha256_file(installer) != lock.installer_sha256:
        raise Refused(f"{INSTALLER_FILE} in {root} is missing or differs from the SHA-256 {LOCK_FILE} records")
    wheels = check_wheels(root, lock)
    check_target(lock)
    return Verified(root, lock, digest, tuple(anchors), tuple(wheels))


# ---- the installed runtimes under a prefix


class Prefix:
    """PREFIX/runtimes/VERSION (one virtual environment each), PREFIX/current and PREFIX/previous (symlinks)."""

    def __init__(self, root: Path, loads: Loads = bounded_loads):
        self.root = Path(root).absolute()
        self.loads = loads
        self.runtimes = self.root / "runtimes"
        self.current_link = self.root / "current"
        self.previous_link = self.root / "previous"
        self.tmp = self.root / "tmp"

    def path(self, version: int) -> Path:
        return self.runtimes / str(version)

    def installed(self) -> list[int]:
        """Complete runtimes (runtime.json written), highest first."""
        if not self.runtimes.is_dir():
            return []
        found = [int(p.name) for p in self.runtimes.iterdir() if p.name.isdigit() and (p / RECORD_FILE).is_file()]
        return sorted(found, reverse=True)

    def _target(self, link: Path) -> int | None:
        try:
            target = os.readlink(link)
        except OSError:
            return None
        name = PurePosixPath(target).name
        return int(name) if name.isdigit() and (self.path(int(name)) / RECORD_FILE).is_file() else None

    @property
    def current(self) -> int | None:
        return self._target(self.current_link)

    @property
    def previous(self) -> int | None:
        return self._target(self.previous_link)

    def record(self, version: int) -> dict:
        """What the install of VERSION wrote last (runtime.json); a damaged one is refused, naming it."""
        path = self.path(version) / RECORD_FILE
        try:
            record = self.loads(read_small(path, MAX_RECORD_BYTES, "a runtime record"), MAX_RECORD_BYTES)
        except ValueError as e:
            raise Refused(f"{path} is damaged ({e}): reinstall that runtime") from None
        if not isinstance(record, dict):
            raise Refused(f"{path} is damaged (not a JSON object): reinstall that runtime")
        return record

    def sweep_incomplete(self) -> list[str]:
        """Remove what a killed install left: runtimes without runtime.json, unpacked media."""
        removed = []
        if self.runtimes.is_dir():
            for p in self.runtimes.iterdir():
                if p.is_dir() and not (p / RECORD_FILE).is_file():
                    shutil.rmtree(p)
                    removed.append(str(p))
        shutil.rmtree(self.tmp, ignore_errors=True)
        return removed

    def point(self, link: Path, version: int) -> None:
        """Make `link` point to runtimes/VERSION by one rename (readers see the old or the new target, never none)."""
        tmp = link.with_name(f".{link.name}.{uuid.uuid4().hex[:8]}")
        os.symlink(f"runtimes/{version}", tmp)
        os.replace(tmp, link)
        _fsync_dir(self.root)

    def switch_to(self, version: int) -> int | None:
        """Make VERSION current; the one it replaces becomes previous. Returns that one."""
        old = self.current
        if old is not None and old != version:
            self.point(self.previous_link, old)
        self.point(self.current_link, version)
        return old


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass(frozen=True)
class Installed:
    version: int
    path: Path
    previous: int | None
    sovpack_version: str  # what the new environment's `sovpack --version` printed
    outcome: str  # "installed", or "switched" (this version was installed already)


def check_not_older(prefix: Prefix, version: int) -> None:
    highest = max(prefix.installed(), default=0)
    if version < highest:
        raise Refused(
            f"{RUNTIME_NAME} v{version} is older than v{highest}, installed in {prefix.runtimes}: refusing to go back "
            f"by an install (`sovpack runtime rollback` returns to the previous runtime)"
        )


def check_installable(verified: Verified, prefix: Prefix) -> str:
    """What installing would do: "installed" (a new runtime) or "switched" (this very runtime is installed); refused
    when it is older than the highest installed, or when its version is installed from another lock."""
    lock = verified.lock
    check_not_older(prefix, lock.version)
    if lock.version not in prefix.installed():
        return "installed"
    if prefix.record(lock.version).get("lock_sha256") != verified.lock_sha256:
        raise Refused(
            f"{RUNTIME_NAME} v{lock.version} is already installed in {prefix.path(lock.version)} from another lock: "
            "two different runtimes carry the same version"
        )
    return "switched"


def install(verified: Verified, prefix: Prefix, source: str, python: str | None = None) -> Installed:
    """A fresh virtual environment from the checked wheels, then the switch; nothing half-installed is left."""
    lock = verified.lock
    outcome = check_installable(verified, prefix)
    prefix.root.mkdir(parents=True, exist_ok=True)
    target = prefix.path(lock.version)
    if outcome == "switched":
        sovpack_version = str(prefix.record(lock.version).get("sovpack_version", ""))
        return Installed(lock.version, target, prefix.switch_to(lock.version), sovpack_version, "switched")
    try:
        _create_environment(verified, target, python or sys.executable)
        sovpack_version = _installed_version(target)
        if sovpack_version != f"sovpack {lock.sovpack_version}":
            raise InstallError(f"{target}/bin/sovpack --version printed {sovpack_version!r}, not sovpack {lock.sovpack_version}")
        record = {
            "name": RUNTIME_NAME,
            "version": lock.version,
            "sovpack_version": lock.sovpack_version,
            "lock_sha256": verified.lock_sha256,
            "anchors": list(verified.anchors),
            "wheels": {w.path: w.sha256 for w in verified.wheels},
            "installed": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "source": source,
        }
        _write_atomically(target / RECORD_FILE, json.dumps(record, indent=2).encode())
    except BaseException:
        shutil.rmtree(target, ignore_errors=True)
        raise
    return Installed(lock.version, target, prefix.switch_to(lock.version), sovpack_version, "installed")


def _create_environment(verified: Verified, target: Path, python: str) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():
        shutil.rmtree(target)  # left by a killed install: it has no runtime.json
    _run([python, "-m", "venv", "--without-pip", str(target)], "creating the virtual environment", target.parent)
    wheels_dir = verified.root / WHEELS_DIR
    pip = verified.root / verified.lock.pip_wheel / "pip"  # pip runs from its own (checked) wheel
    wheels = [str(verified.root / w.path) for w in verified.wheels if w.path != verified.lock.pip_wheel]
    install_args = ["install", "--no-index", "--no-cache-dir", "--disable-pip-version-check", "--quiet"]
    _run(
        [str(target / "bin" / "python"), str(pip), *install_args, "--find-links", str(wheels_dir), *wheels], "pip install", target
    )


def _run(cmd: list[str], what: str, cwd: Path) -> str:
    # the host's pip configuration (indexes, constraints, find-links) must not reach this install
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_") and k != "PYTHONPATH"}
    env |= {"PIP_CONFIG_FILE": os.devnull, "PYTHONNOUSERSITE": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd)  # `-m` would import from any cwd
    if result.returncode != 0:
        tail = "\n".join((result.stderr or result.stdout).strip().splitlines()[-5:])
        raise InstallError(f"{what} failed (exit {result.returncode}): {tail}")
    return result.stdout


def _installed_version(target: Path) -> str:
    return _run([str(target / "bin" / "sovpack"), "--version"], "running the new sovpack", target).strip()


def _write_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def rollback_target(prefix: Prefix) -> tuple[int, int]:
    """(current, previous): what `rollback` switches from and to."""
    current, previous = prefix.current, prefix.previous
    if current is None or previous is None:
        raise UsageError(f"{prefix.root} has no previous runtime to return to (current: {current}, previous: {previous})")
    return current, previous


# ---- the command line of the installer on the media


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=INSTALLER_FILE,
        description="Check a sovpack runtime (every wheel against the lock, the lock against the officer's signature "
        "or a SHA-256 carried on paper) and install it into a fresh virtual environment with no network.",
        epilog="Exit codes: 0 installed; 1 refused; 2 usage error; 3 other failure; 130 interrupted.",
    )
    parser.add_argument("source", type=Path, help="The export's volumes (directory or index file), or the bundle directory.")
    parser.add_argument("--prefix", type=Path, required=True, help="Where runtimes live: PREFIX/current/bin/sovpack.")
    parser.add_argument("--public-key", type=Path, action="append", default=[], help="The officer's public key (needs openssl).")
    parser.add_argument("--lock-sha256", help=f"SHA-256 of {LOCK_FILE}, carried on paper or on a separate medium.")
    args = parser.parse_args(argv)
    prefix = Prefix(args.prefix)
    try:
        for key in args.public_key:
            if not key.is_file():
                raise UsageError(f"public key {key} does not exist")
        for leftover in prefix.sweep_incomplete():
            print(f"removed {leftover}, left by an install that did not finish")
        with opened_source(args.source, prefix.tmp) as root:
            verified = verify_runtime(root, args.public_key, args.lock_sha256)
            check_self(verified.lock)
            for anchor in verified.anchors:
                print(f"checked: {anchor}")
            for w in verified.wheels:
                print(f"checked: {w.path} sha256 {w.sha256}")
            print(f"installing {RUNTIME_NAME} v{verified.lock.version} into {prefix.path(verified.lock.version)} ...", flush=True)
            result = install(verified, prefix, str(args.source.absolute()))
    except InstallError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("error: interrupted; nothing half-installed was left in place", file=sys.stderr)
        return 130
    except OSError as e:
        print(f"error: I/O error ({e.filename or ''}): {e.strerror or e}", file=sys.stderr)
        return 3
    print(
        f"INSTALLED {RUNTIME_NAME} v{result.version} ({result.sovpack_version}, {len(verified.wheels)} wheels checked, "
        f"{LOCK_FILE} sha256 {verified.lock_sha256}) at {result.path}"
    )
    print(
        f"current: {prefix.current_link} -> runtimes/{result.version}"
        + (f" (previous: v{result.previous})" if result.previous else "")
    )
    print(f"run it as {prefix.current_link}/bin/sovpack")
    return 0


def check_self(lock: Lock) -> None:
    """The installer running is the one the lock (now anchored) records; a copy changed on the media is refused."""
    running = sha256_file(Path(__file__))
    if running != lock.installer_sha256:
        raise Refused(
            f"this installer ({Path(__file__)}, sha256 {running}) is not the one {LOCK_FILE} records "
            f"({lock.installer_sha256}): compare its SHA-256 with the value on paper; run the copy in the bundle"
        )


if __name__ == "__main__":
    sys.exit(main())
