"""The offline runtime: built from the project's own wheels, installed with no network, upgraded and rolled back.

The runtime is built once per module (pip wheel from pip's cache and the local package registry;
llama-cpp-python comes from pip's wheel cache). The secure side runs in a network namespace with no
network (`unshare -n`, as root, as CI runs): the installer from the media makes a fresh virtual
environment, and that installation's sovpack trusts, imports, verifies and serves SmolLM2, which
answers one chat completion through the `openai` client.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ROOT, audit_records, export, flip_byte, old_gnu_sparse_member, sovpack, tar_member, tar_stream

from sovpack.bundle.keys import generate_key_pair
from sovpack.runtime import installer

PYTHON = str(Path(sys.base_prefix) / "bin" / "python3")  # the host's bare Python, as on a secure host
UNSHARE = shutil.which("unshare") or "unshare"


def offline(*cmd, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run a command in a new network namespace with no network, without the checkout on its path."""
    clean = {k: v for k, v in (env or os.environ).items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return subprocess.run([UNSHARE, "-n", *map(str, cmd)], capture_output=True, text=True, env=clean, cwd="/")


def install(source: Path, prefix: Path, *anchors, script: Path | None = None, env: dict | None = None):
    script = script or (source / installer.INSTALLER_FILE if (source / installer.INSTALLER_FILE).is_file() else None)
    return offline(PYTHON, script, source, "--prefix", prefix, *anchors, env=env)


def ok(result) -> str:
    assert result.returncode == 0, (result.stdout, result.stderr)
    return result.stdout if isinstance(result.stdout, str) else result.stdout.decode()


def prefix_snapshot(prefix: Path) -> dict:
    """The installed runtimes and where current/previous point: what a refusal must leave as it was."""
    links = {name: os.readlink(prefix / name) for name in ("current", "previous") if (prefix / name).is_symlink()}
    runtimes = sorted(p.name for p in (prefix / "runtimes").iterdir()) if (prefix / "runtimes").is_dir() else []
    return {
        "links": links,
        "runtimes": runtimes,
        "records": [(prefix / "runtimes" / v / "runtime.json").read_bytes() for v in runtimes],
    }


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("runtime")


@pytest.fixture(scope="module")
def officer(work) -> Path:
    keys = work / "keys"
    for name in ("officer", "mallory"):
        generate_key_pair(name, keys)
    return keys


@pytest.fixture(scope="module")
def runtime_v1(work, officer) -> Path:
    """sovpack-runtime v1, built from this checkout, signed by the officer."""
    bundle = work / "runtime-v1"
    ok(sovpack("runtime", "build", "--out", bundle, "--version", "1"))
    ok(sovpack("sign", bundle, "--key", officer / "officer.key"))
    return bundle


@pytest.fixture(scope="module")
def runtime_v2(work, officer) -> Path:
    bundle = work / "runtime-v2"
    ok(sovpack("runtime", "build", "--out", bundle, "--version", "2"))
    ok(sovpack("sign", bundle, "--key", officer / "officer.key"))
    return bundle


def export_with_installer(bundle: Path, media: Path) -> Path:
    """The media as the officer writes it: the volumes, their index, and the installer beside them."""
    ok(sovpack("export", bundle, "--to", media, "--volume-size", "20M"))
    shutil.copyfile(bundle / installer.INSTALLER_FILE, media / installer.INSTALLER_FILE)
    return media


@pytest.fixture(scope="module")
def secure_side(work, officer, runtime_v1, smollm_gguf) -> dict:
    """The whole secure side in a network namespace: install from the volumes, trust, import, verify, serve, ask."""
    model = work / "model-src"
    model.mkdir()
    os.symlink(smollm_gguf, model / smollm_gguf.name)
    ok(sovpack("pack", model, "--out", work / "model", "--name", "smollm2-135m-instruct", "--version", "1"))
    ok(sovpack("sign", work / "model", "--key", officer / "officer.key"))
    ok(sovpack("export", work / "model", "--to", work / "usb-model", "--volume-size", "40M"))
    runtime_media = export_with_installer(runtime_v1, work / "usb-runtime")
    prefix, store = work / "opt-sovpack", work / "secure-store"
    script = ROOT / "scripts" / "offline_secure_side.py"
    args = ["--runtime-media", runtime_media, "--model-media", work / "usb-model", "--public-key", officer / "officer.pub"]
    args += ["--prefix", prefix, "--store", store, "--work", work / "serve", "--python", PYTHON]
    result = offline(sys.executable, script, *args)
    (work / "secure-side.log").write_text(result.stdout + result.stderr)  # each step with its time, for a failure
    return {"result": result, "prefix": prefix, "store": store, "media": runtime_media}


def test_the_lock_lists_every_wheel_and_the_installer(runtime_v1, officer):
    lock = json.loads((runtime_v1 / installer.LOCK_FILE).read_bytes())
    wheels = sorted(p.name for p in (runtime_v1 / "wheels").iterdir())
    assert [w["path"] for w in lock["wheels"]] == [f"wheels/{name}" for name in wheels]
    for w in lock["wheels"]:
        assert installer.sha256_file(runtime_v1 / w["path"]) == w["sha256"]
        assert (runtime_v1 / w["path"]).stat().st_size == w["size"]
    assert any(name.startswith("llama_cpp_python-") for name in wheels)
    assert any(name.startswith("sovpack-0.1.0-") for name in wheels)
    assert lock["pip_wheel"].startswith("wheels/pip-")
    assert (runtime_v1 / installer.INSTALLER_FILE).read_bytes() == Path(installer.__file__).read_bytes()
    assert lock["installer"]["sha256"] == installer.sha256_file(runtime_v1 / installer.INSTALLER_FILE)
    assert lock["target"]["python"] == f"{sys.version_info.major}.{sys.version_info.minor}"
    verified = sovpack("verify", runtime_v1, "--trust", officer / "officer.pub", "--json")
    report = json.loads(verified.stdout)
    assert verified.returncode == 0 and report["name"] == "sovpack-runtime"
    # the wheels entered the bundle under the signed allowance, as wheels (validated by their bytes), and it shows
    assert report["allowed_files"] == [{"glob": "wheels/*.whl", "files": [f"wheels/{name}" for name in wheels]}]
    assert {f["path"]: f["format"] for f in report["files"]}["wheels/" + wheels[0]] == "wheel"
    metadata = json.loads((runtime_v1 / "sovpack.json").read_bytes())
    assert metadata["allowed_files"] == ["wheels/*.whl"]
    numpy = next(f for f in metadata["files"] if f["path"].startswith("wheels/numpy-"))
    assert numpy["format"] == "wheel" and numpy["details"]["distribution"] == "numpy"


def test_the_installer_needs_only_the_standard_library(runtime_v1):
    """-I -S: no site-packages, no PYTHONPATH; its --help still runs (it imports everything it uses first)."""
    result = subprocess.run([PYTHON, "-I", "-S", runtime_v1 / installer.INSTALLER_FILE, "--help"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "--lock-sha256" in result.stdout


def test_offline_install_trust_import_verify_serve_chat(secure_side):
    result = secure_side["result"]
    out = result.stdout
    assert result.returncode == 0, (out[-4000:], result.stderr[-4000:])
    assert "network: none (connecting to 192.0.2.1 fails: Network is unreachable)" in out
    assert "checked: signature signatures/" in out and "verified with openssl" in out
    assert "checked: wheels/llama_cpp_python-" in out
    assert "INSTALLED sovpack-runtime v1 (sovpack 0.1.0, " in out
    prefix = secure_side["prefix"]
    assert f"sovpack from {prefix}/current/lib/python" in out and f"llama.cpp from {prefix}/current/lib/python" in out
    assert "INSTALLED smollm2-135m-instruct v1" in out
    answer = next(line for line in out.splitlines() if line.startswith("A: "))
    assert len(answer) > len("A: ") + 3
    assert os.readlink(prefix / "current") == "runtimes/1"
    events = [r["event"] for r in audit_records(secure_side["store"])]
    assert events[:2] == ["trust-add", "import"] and "verify" in events and "serve-start" in events


@pytest.fixture
def installed(secure_side) -> Path:
    """The prefix holding the offline installation (v1, or v2 once the upgrade test ran)."""
    assert secure_side["result"].returncode == 0, secure_side["result"].stdout[-2000:]
    return secure_side["prefix"]


@pytest.fixture
def media_copy(runtime_v1, tmp_path) -> Path:
    """A copy of the signed runtime bundle to tamper with."""
    copy = tmp_path / "runtime"
    shutil.copytree(runtime_v1, copy)
    return copy


def _wheel(bundle: Path, prefix: str) -> Path:
    return next((bundle / "wheels").glob(f"{prefix}-*.whl"))


def _refused(result, *named: str) -> str:
    assert result.returncode == 1, (result.stdout, result.stderr)
    for name in named:
        assert name in result.stderr, result.stderr
    return result.stderr


def test_a_changed_wheel_is_refused(installed, media_copy, officer, runtime_v1):
    before = prefix_snapshot(installed)
    wheel = _wheel(media_copy, "typer")
    flip_byte(wheel, 100)
    _refused(
        install(media_copy, installed, "--public-key", officer / "officer.pub"), f"wheels/{wheel.name}", "changed after signing"
    )
    lock_sha256 = installer.sha256_file(runtime_v1 / installer.LOCK_FILE)
    _refused(install(media_copy, installed, "--lock-sha256", lock_sha256), f"wheels/{wheel.name}", "the wheel was changed")
    assert prefix_snapshot(installed) == before


def test_an_extra_wheel_is_refused(installed, media_copy, officer, runtime_v1):
    before = prefix_snapshot(installed)
    shutil.copyfile(_wheel(media_copy, "typer"), media_copy / "wheels" / "typer-99.0-py3-none-any.whl")
    _refused(install(media_copy, installed, "--public-key", officer / "officer.pub"), "wheels/typer-99.0-py3-none-any.whl")
    lock_sha256 = installer.sha256_file(runtime_v1 / installer.LOCK_FILE)
    _refused(
        install(media_copy, installed, "--lock-sha256", lock_sha256),
        "wheels/typer-99.0-py3-none-any.whl",
        "not in runtime-lock.json",
    )
    assert prefix_snapshot(installed) == before


def test_a_missing_wheel_is_refused(installed, media_copy, runtime_v1):
    before = prefix_snapshot(installed)
    wheel = _wheel(media_copy, "rich")
    wheel.unlink()
    lock_sha256 = installer.sha256_file(runtime_v1 / installer.LOCK_FILE)
    _refused(install(media_copy, installed, "--lock-sha256", lock_sha256), f"wheels/{wheel.name}", "missing")
    assert prefix_snapshot(installed) == before


def test_a_signed_wheel_missing_from_the_lock_is_refused(installed, runtime_v1, officer, tmp_path):
    """Even signed: a wheel the lock does not list is never installed (a build that went wrong, or a forged lock)."""
    before = prefix_snapshot(installed)
    source = tmp_path / "src"
    shutil.copytree(runtime_v1, source, ignore=shutil.ignore_patterns("signatures", "sovpack.json"))
    lock = json.loads((source / installer.LOCK_FILE).read_bytes())
    dropped = next(w for w in lock["wheels"] if "/rich-" in w["path"])
    lock["wheels"].remove(dropped)
    (source / installer.LOCK_FILE).write_text(json.dumps(lock))
    pack_args = ["--name", "sovpack-runtime", "--version", "1", "--allow-file", "wheels/*.whl"]
    ok(sovpack("pack", source, "--out", tmp_path / "bundle", *pack_args))
    ok(sovpack("sign", tmp_path / "bundle", "--key", officer / "officer.key"))
    shutil.copyfile(runtime_v1 / installer.INSTALLER_FILE, tmp_path / "install-runtime.py")
    result = install(
        tmp_path / "bundle", installed, "--public-key", officer / "officer.pub", script=tmp_path / "install-runtime.py"
    )
    _refused(result, dropped["path"], "is not in runtime-lock.json")
    assert prefix_snapshot(installed) == before


def test_a_runtime_not_signed_by_the_officer_is_refused(installed, media_copy, officer):
    before = prefix_snapshot(installed)
    shutil.rmtree(media_copy / "signatures")
    ok(sovpack("sign", media_copy, "--key", officer / "mallory.key"))
    _refused(
        install(media_copy, installed, "--public-key", officer / "officer.pub"), "officer.pub", "runtime-lock.json was not signed"
    )
    assert prefix_snapshot(installed) == before


def test_a_forged_signature_is_refused(installed, media_copy, officer):
    before = prefix_snapshot(installed)
    sig = next((media_copy / "signatures").glob("*.sig"))
    doc = json.loads(sig.read_bytes())
    doc["dsseEnvelope"]["signatures"][0]["sig"] = doc["dsseEnvelope"]["signatures"][0]["sig"][:-8] + "AAAAAAA="
    sig.write_text(json.dumps(doc))
    _refused(install(media_copy, installed, "--public-key", officer / "officer.pub"), f"signatures/{sig.name}", "does not verify")
    assert prefix_snapshot(installed) == before


def test_a_lock_not_matching_the_paper_value_is_refused(installed, media_copy):
    before = prefix_snapshot(installed)
    _refused(install(media_copy, installed, "--lock-sha256", "0" * 64), "runtime-lock.json has SHA-256")
    assert prefix_snapshot(installed) == before


def test_a_damaged_volume_is_refused_by_name(installed, secure_side, tmp_path, officer):
    before = prefix_snapshot(installed)
    media = tmp_path / "usb"
    shutil.copytree(secure_side["media"], media)
    flip_byte(media / "sovpack-runtime-v1.002", 5000)
    _refused(install(media, installed, "--public-key", officer / "officer.pub"), "volume sovpack-runtime-v1.002 is damaged")
    assert prefix_snapshot(installed) == before
    assert not (installed / "tmp").exists()


def test_a_changed_installer_is_refused(installed, media_copy, officer, tmp_path):
    before = prefix_snapshot(installed)
    changed = tmp_path / "install-runtime.py"
    changed.write_bytes((media_copy / installer.INSTALLER_FILE).read_bytes() + b"\n# changed on the media\n")
    result = install(media_copy, installed, "--public-key", officer / "officer.pub", script=changed)
    _refused(result, str(changed), "is not the one runtime-lock.json records")
    assert prefix_snapshot(installed) == before


def test_without_an_anchor_or_openssl_nothing_is_installed(installed, media_copy, officer, tmp_path):
    before = prefix_snapshot(installed)
    result = install(media_copy, installed)
    assert result.returncode == 2 and "--public-key OFFICER.pub and/or --lock-sha256" in result.stderr
    no_openssl = tmp_path / "bin"
    no_openssl.mkdir()
    result = install(media_copy, installed, "--public-key", officer / "officer.pub", env=os.environ | {"PATH": str(no_openssl)})
    assert result.returncode == 3 and "openssl is not installed" in result.stderr and "--lock-sha256" in result.stderr
    assert prefix_snapshot(installed) == before


def test_upgrade_from_the_store_refuse_older_and_roll_back(secure_side, installed, runtime_v1, runtime_v2, officer, tmp_path):
    """From the offline installation: import v2, `runtime install` it, refuse v1, roll back; all audited."""
    prefix, store = installed, secure_side["store"]
    sovpack_offline = prefix / "current" / "bin" / "sovpack"
    media = export_with_installer(runtime_v2, tmp_path / "usb-v2")
    ok(offline(sovpack_offline, "import", media, "--store", store))
    out = ok(offline(sovpack_offline, "runtime", "install", "sovpack-runtime@2", "--store", store))
    assert "INSTALLED sovpack-runtime v2" in out and "previous: v1" in out
    assert os.readlink(prefix / "current") == "runtimes/2" and os.readlink(prefix / "previous") == "runtimes/1"
    assert "v2 (current)" in ok(offline(prefix / "current" / "bin" / "sovpack", "runtime", "list"))

    before = prefix_snapshot(prefix)
    _refused(
        install(secure_side["media"], prefix, "--public-key", officer / "officer.pub"), "sovpack-runtime v1 is older than v2"
    )
    ok(offline(prefix / "current" / "bin" / "sovpack", "import", secure_side["media"], "--store", store, "--allow-downgrade"))
    refused = offline(prefix / "current" / "bin" / "sovpack", "runtime", "install", "sovpack-runtime@1", "--store", store)
    _refused(refused, "sovpack-runtime v1 is older than v2")
    assert prefix_snapshot(prefix) == before

    out = ok(offline(prefix / "current" / "bin" / "sovpack", "runtime", "rollback", "--store", store))
    assert "rolled back from sovpack-runtime v2 to v1" in out
    assert os.readlink(prefix / "current") == "runtimes/1" and os.readlink(prefix / "previous") == "runtimes/2"
    records = [r for r in audit_records(store) if r["event"].startswith("runtime-") or r.get("name") == "sovpack-runtime"]
    assert [(r["event"], r.get("version"), r.get("outcome")) for r in records] == [
        ("import", 2, "accepted"),
        ("verify", 2, None),  # verify_target: the verification of an installed bundle
        ("runtime-install", 2, "installed"),  # written before the install and the switch
        ("import", 1, "accepted"),
        ("verify", 1, None),
        ("runtime-install", 1, "refused"),
        ("runtime-rollback", 2, None),  # written before the switch
    ]
    assert records[1]["ok"] is True and records[1]["signers"] == ["officer"]
    assert records[2]["signers"] == ["officer"] and records[2]["previous"] == 1 and len(records[2]["lock_sha256"]) == 64
    assert "older than v2" in records[5]["reason"] and records[6]["to"] == 1


def test_a_runtime_the_store_does_not_trust_is_not_installed(secure_side, installed, runtime_v2, officer, tmp_path):
    """Signed only by mallory, imported with --trust mallory.pub: `runtime install` holds it to the store's trust."""
    before = prefix_snapshot(installed)
    forged = tmp_path / "runtime"
    shutil.copytree(runtime_v2, forged, ignore=shutil.ignore_patterns("signatures"))
    ok(sovpack("sign", forged, "--key", officer / "mallory.key"))
    media = export_with_installer(forged, tmp_path / "usb")
    store = tmp_path / "store"
    sovpack_offline = installed / "current" / "bin" / "sovpack"
    ok(offline(sovpack_offline, "trust", "add", officer / "officer.pub", "--store", store))
    ok(offline(sovpack_offline, "import", media, "--store", store, "--trust", officer / "mallory.pub"))
    result = offline(sovpack_offline, "runtime", "install", "sovpack-runtime@2", "--store", store, "--prefix", installed)
    _refused(result, "sovpack-runtime v2 was accepted by mallory", "still trusted")
    assert prefix_snapshot(installed) == before
    assert audit_records(store)[-1]["event"] == "runtime-install" and audit_records(store)[-1]["outcome"] == "refused"


def test_a_gpu_build_needs_its_compiler(tmp_path):
    result = sovpack("runtime", "build", "--out", tmp_path / "rt", "--gpu", "cuda", env=os.environ | {"PATH": "/usr/bin:/bin"})
    assert result.returncode == 3, result.stderr
    assert b"nvcc is not on PATH" in result.stderr
    assert not (tmp_path / "rt").exists()


def test_runtime_install_outside_a_runtime_needs_a_prefix(cli, monkeypatch, store):
    monkeypatch.delenv("SOVPACK_RUNTIME_PREFIX", raising=False)
    for args in (["install", "sovpack-runtime@1"], ["rollback"], ["list"]):
        result = cli("runtime", *args, "--store", store) if args[0] != "list" else cli("runtime", *args)
        assert result.code == 2 and "give --prefix" in result.err, (args, result.err)


@pytest.mark.parametrize("args", [["install", "sovpack-runtime@1"], ["rollback"]], ids=" ".join)
def test_runtime_install_and_rollback_need_an_existing_store(cli, tmp_path, args):
    missing = tmp_path / "no" / "store"
    result = cli("runtime", *args, "--store", missing, "--prefix", tmp_path / "prefix")
    assert result.code == 2 and f"no store exists at {missing} (--store)" in result.err
    assert not (tmp_path / "no").exists() and not (tmp_path / "prefix").exists()


def test_runtime_install_of_another_bundle_is_a_usage_error(cli, signed_bundle, keys, store, tmp_path):
    ok_import = cli("import", export(cli, signed_bundle, tmp_path / "media"), "--store", store)
    assert ok_import.code == 0, ok_import.err
    result = cli("runtime", "install", "tiny", "--store", store, "--prefix", tmp_path / "prefix")
    assert result.code == 2 and "tiny v3 is not a sovpack runtime (those are named sovpack-runtime)" in result.err
    assert not (tmp_path / "prefix").exists()


# ---- the installer's reading of the media, as main's import reads it: bounded, no links, no sparse members


def write_media(directory: Path, stream: bytes, *, index: bytes | None = None) -> Path:
    """One volume holding `stream` and the index the installer reads (name, version, volumes)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "sovpack-runtime-v1.001").write_bytes(stream)
    doc = {
        "bundle": {"name": "sovpack-runtime", "version": 1},
        "volumes": [
            {
                "file": "sovpack-runtime-v1.001",
                "size": len(stream),
                "sha256": installer.sha256_file(directory / "sovpack-runtime-v1.001"),
            }
        ],
    }
    index_path = directory / "sovpack-runtime-v1.index.json"
    index_path.write_bytes(index if index is not None else json.dumps(doc).encode())
    return index_path


@pytest.mark.parametrize(
    "sparse",
    [
        old_gnu_sparse_member("sovpack-runtime-v1/runtime-lock.json"),
        tar_member("sovpack-runtime-v1/runtime-lock.json", b"", pax={"GNU.sparse.map": "1,x,3", "GNU.sparse.size": "10"}),
    ],
    ids=["old GNU", "pax 0.1"],
)
def test_the_installer_refuses_a_sparse_member(tmp_path, sparse):
    index = write_media(tmp_path / "usb", tar_stream([("sovpack-runtime-v1/sovpack.json", b"{}")], sparse))
    with pytest.raises(
        installer.Refused, match="sovpack-runtime-v1/runtime-lock.json in the volumes of .* is a GNU sparse member"
    ):
        installer.unpack_volumes(index, tmp_path / "unpacked")


def test_the_installer_refuses_a_damaged_tar_stream(tmp_path):
    header = tar_member("sovpack-runtime-v1/sovpack.json", b"{}")
    index = write_media(tmp_path / "usb", header[:100] + b"x" * 48 + header[148:] + bytes(1024))  # mode, owner and size garbled
    with pytest.raises(installer.Refused, match="do not hold a whole tar stream"):
        installer.unpack_volumes(index, tmp_path / "unpacked")


@pytest.mark.parametrize("which", ["volume", "index"])
def test_the_installer_refuses_a_link_on_the_media(tmp_path, which):
    index = write_media(tmp_path / "elsewhere", tar_stream([("sovpack-runtime-v1/sovpack.json", b"{}")]))
    media = tmp_path / "usb"
    media.mkdir()
    for path in index.parent.iterdir():
        if (which == "volume") == path.name.endswith(".001"):
            (media / path.name).symlink_to(path)
        else:
            shutil.copyfile(path, media / path.name)
    with pytest.raises(installer.Refused, match="is a symbolic link; the media must hold the files themselves"):
        installer.unpack_volumes(media / index.name, tmp_path / "unpacked")


def test_the_installer_reads_json_from_the_media_within_bounds(tmp_path):
    index = write_media(tmp_path / "usb", b"", index=b"[" * 100_000)
    with pytest.raises(installer.Refused, match="is not a sovpack export index .*nests deeper than 64 levels"):
        installer.unpack_volumes(index, tmp_path / "unpacked")
    twice = b'{"format": "sovpack-runtime-lock", "format": "sovpack-runtime-lock"}'
    with pytest.raises(installer.Refused, match="runtime-lock.json is not a runtime lock .*a key appears twice"):
        installer.parse_lock(twice)
    with pytest.raises(installer.Refused, match="over the 16777216 byte limit"):
        installer.parse_lock(b" " * (16 << 20) + b"{}")
    prefix = installer.Prefix(tmp_path / "prefix")
    (prefix.path(1)).mkdir(parents=True)
    (prefix.path(1) / installer.RECORD_FILE).write_bytes(b"{" * 1000)
    with pytest.raises(installer.Refused, match="runtime.json is damaged .*reinstall that runtime"):
        prefix.record(1)
