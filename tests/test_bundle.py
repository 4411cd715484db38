"""keygen, pack, sign, verify, inspect through the real command line, and every tamper case."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from builders import write_gguf, write_model_dir, write_safetensors

from sovpack.bundle.directory import read_metadata, read_metadata_bytes, write_metadata
from sovpack.bundle.keys import key_id, load_private_key, load_public_key
from sovpack.bundle.metadata import format_time
from sovpack.bundle.sign import statement_for
from sovpack.bundle.signature import build_statement, sign_statement
from sovpack.bundle.trust import load_trust
from sovpack.bundle.verify import verify_bundle
from sovpack.common.hashing import digest_file, sha256_bytes


def tree_snapshot(root: Path) -> dict:
    """Every path with its bytes and mtime: proves a command changed nothing."""
    return {
        str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None, p.lstat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
    }


def force_sign(bundle: Path, key_file: Path) -> None:
    """Sign whatever sovpack.json says, bypassing `sign`'s own checks: how an attacker or a buggy tool would."""
    raw = read_metadata_bytes(bundle)
    payload = statement_for(read_metadata(bundle), sha256_bytes(raw))
    (bundle / "signatures").mkdir(exist_ok=True)
    key = load_private_key(key_file)
    (bundle / "signatures" / f"{key_id(key.public_key())}.sig").write_bytes(sign_statement(key, payload))


def replace_file_in_inventory(bundle: Path, rel: str, content: bytes) -> None:
    """Swap a file's bytes and rewrite its inventory entry to match (digests and details)."""
    (bundle / rel).unlink()
    (bundle / rel).write_bytes(content)
    metadata = read_metadata(bundle)
    entry = metadata.file(rel)
    digest = digest_file(bundle / rel)
    entry.size, entry.sha256, entry.shards = digest.size, digest.sha256, digest.shards
    write_metadata(bundle, metadata)


# keygen


def test_keygen_writes_a_private_key_only_the_owner_can_read(tmp_path, cli):
    result = cli("keygen", "ops", "--dir", tmp_path)
    assert result.code == 0
    assert stat.S_IMODE((tmp_path / "ops.key").stat().st_mode) == 0o600
    assert b"BEGIN PUBLIC KEY" in (tmp_path / "ops.pub").read_bytes()
    assert "key id" in result.out


def test_keygen_refuses_to_overwrite(tmp_path, cli):
    assert cli("keygen", "ops", "--dir", tmp_path).code == 0
    before = (tmp_path / "ops.key").read_bytes()
    result = cli("keygen", "ops", "--dir", tmp_path)
    assert result.code == 2
    assert "ops.key already exists" in result.err
    assert (tmp_path / "ops.key").read_bytes() == before


def test_keygen_p256_and_unknown_curve(tmp_path, cli):
    assert cli("keygen", "small", "--dir", tmp_path, "--curve", "p256").code == 0
    result = cli("keygen", "odd", "--dir", tmp_path, "--curve", "ed25519")
    assert result.code == 2 and "unknown curve 'ed25519'" in result.err


def test_encrypted_key_signs_with_password_file(tmp_path, cli, model_dir):
    (tmp_path / "pw").write_text("correct horse\n")
    assert cli("keygen", "sealed", "--dir", tmp_path, "--password-file", tmp_path / "pw").code == 0
    assert b"ENCRYPTED" in (tmp_path / "sealed.key").read_bytes()
    assert cli("pack", model_dir, "--out", tmp_path / "b", "--name", "m").code == 0
    missing = cli("sign", tmp_path / "b", "--key", tmp_path / "sealed.key")
    assert missing.code == 2 and "is encrypted" in missing.err
    (tmp_path / "wrong").write_text("wrong")
    wrong = cli("sign", tmp_path / "b", "--key", tmp_path / "sealed.key", "--password-file", tmp_path / "wrong")
    assert wrong.code == 1 and "wrong password" in wrong.err
    assert cli("sign", tmp_path / "b", "--key", tmp_path / "sealed.key", "--password-file", tmp_path / "pw").code == 0
    assert cli("verify", tmp_path / "b", "--trust", tmp_path / "sealed.pub").code == 0


# pack


def test_pack_records_inventory_roles_formats_and_inspection(tmp_path, cli, model_dir):
    (model_dir / ".gitattributes").write_text("*.safetensors filter=lfs\n")
    result = cli("pack", model_dir, "--out", tmp_path / "b", "--name", "tiny", "--version", "7", "--expires", "2031-05-01")
    assert result.code == 0, result.err
    assert "skipped .gitattributes" in result.out
    meta = json.loads((tmp_path / "b" / "sovpack.json").read_text())
    assert meta["format"] == "sovpack-bundle" and meta["format_version"] == 1
    assert (meta["name"], meta["version"], meta["expires"]) == ("tiny", 7, "2031-05-01T00:00:00Z")
    files = {f["path"]: f for f in meta["files"]}
    assert set(files) == {
        "model.safetensors",
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "README.md",
        "LICENSE",
        "gguf/tiny-F32.gguf",
    }
    st = files["model.safetensors"]
    assert (st["role"], st["format"]) == ("weights", "safetensors")
    assert st["details"] == {"tensor_count": 2, "dtypes": {"F16": 1, "F32": 1}, "parameter_count": 528}
    assert st["sha256"] == digest_file(model_dir / "model.safetensors").sha256
    assert st["shards"] == list(digest_file(model_dir / "model.safetensors").shards)
    g = files["gguf/tiny-F32.gguf"]
    assert g["details"]["architecture"] == "llama" and g["details"]["file_type"] == "F32"
    assert g["details"]["chat_template_sha256"] == sha256_bytes(b"{{ messages }}")
    assert files["tokenizer.json"]["role"] == "tokenizer" and files["LICENSE"]["role"] == "license"
    assert all(f["source"] == {"type": "local"} for f in files.values())


def test_pack_hard_links_when_possible(tmp_path, cli, model_dir):
    assert cli("pack", model_dir, "--out", tmp_path / "b", "--name", "tiny").code == 0
    assert (tmp_path / "b" / "model.safetensors").stat().st_ino == (model_dir / "model.safetensors").stat().st_ino


def test_pack_expiry_in_days(tmp_path, cli, model_dir):
    assert cli("pack", model_dir, "--out", tmp_path / "b", "--name", "tiny", "--expires", "30d").code == 0
    meta = json.loads((tmp_path / "b" / "sovpack.json").read_text())
    from datetime import datetime, timedelta, timezone

    expires = datetime.strptime(meta["expires"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc)
    assert abs(expires - datetime.now(timezone.utc) - timedelta(days=30)) < timedelta(minutes=5)


@pytest.mark.parametrize("name, content", [("pytorch_model.bin", b"weights"), ("weights.dat", b"\x80\x04\x95" + b"x" * 20)])
def test_pack_refuses_pickles_and_writes_nothing(tmp_path, cli, model_dir, name, content):
    (model_dir / name).write_bytes(content)
    result = cli("pack", model_dir, "--out", tmp_path / "b", "--name", "tiny")
    assert result.code == 1
    assert f"{name}: refused as pickle-based weights" in result.err and "safetensors" in result.err
    assert not (tmp_path / "b").exists() and not list(tmp_path.glob(".b.partial*"))


def test_pack_refuses_malformed_safetensors(tmp_path, cli, model_dir):
    (model_dir / "model.safetensors").write_bytes(b"\x10\0\0\0\0\0\0\0[1,2,3]         ")
    result = cli("pack", model_dir, "--out", tmp_path / "b", "--name", "tiny")
    assert result.code == 1 and "model.safetensors: safetensors header must be a JSON object" in result.err
    assert not (tmp_path / "b").exists() and not (tmp_path / ".b.partial").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--name", "bad name"], "bundle name 'bad name' is not allowed"),
        (["--name", "ok", "--version", "0"], "--version must be 1 or more"),
        (["--name", "ok", "--expires", "soon"], "--expires 'soon'"),
    ],
)
def test_pack_usage_errors(tmp_path, cli, model_dir, args, message):
    result = cli("pack", model_dir, "--out", tmp_path / "b", *args)
    assert result.code == 2 and message in result.err
    assert not (tmp_path / "b").exists()


def test_pack_refuses_existing_output_and_missing_source(tmp_path, cli, model_dir):
    (tmp_path / "b").mkdir()
    assert cli("pack", model_dir, "--out", tmp_path / "b", "--name", "x").code == 2
    result = cli("pack", tmp_path / "nope", "--out", tmp_path / "c", "--name", "x")
    assert result.code == 2 and "is not a directory" in result.err
    assert cli("pack", model_dir, "--name", "x").code == 2  # --out missing


def test_pack_refuses_reserved_names(tmp_path, cli, model_dir):
    (model_dir / "sovpack.json").write_text("{}")
    result = cli("pack", model_dir, "--out", tmp_path / "b", "--name", "x")
    assert result.code == 1 and "sovpack.json" in result.err and "reserved" in result.err


# sign and verify


def test_sign_and_verify_with_two_signers(tmp_path, cli, signed_bundle, keys):
    result = cli("sign", signed_bundle, "--key", keys / "bob.key")
    assert result.code == 0, result.err
    assert len(list((signed_bundle / "signatures").glob("*.sig"))) == 2
    ok = cli("verify", signed_bundle, "--trust", keys / "alice.pub", "--trust", keys / "bob.pub", "--threshold", "2")
    assert ok.code == 0, ok.out + ok.err
    assert "VERIFIED tiny v3" in ok.out and "alice" in ok.out and "bob" in ok.out


def test_resigning_with_the_same_key_replaces_its_signature(cli, signed_bundle, keys):
    result = cli("sign", signed_bundle, "--key", keys / "alice.key")
    assert result.code == 0 and "replaced" in result.out
    assert len(list((signed_bundle / "signatures").glob("*.sig"))) == 1


def test_signature_file_is_named_after_the_key_id(cli, signed_bundle, keys):
    assert (signed_bundle / "signatures" / f"{key_id(load_public_key(keys / 'alice.pub'))}.sig").is_file()


def test_verify_json_report(cli, signed_bundle, keys):
    result = cli("verify", signed_bundle, "--trust", keys, "--json")
    assert result.code == 0, result.err
    report = json.loads(result.out)
    assert report["ok"] is True and report["error"] is None
    assert (report["name"], report["version"], report["threshold"]) == ("tiny", 3, 1)
    assert [c["step"] for c in report["checks"]] == [
        "signatures",
        "threshold",
        "metadata",
        "inventory",
        "digests",
        "formats",
        "expiry",
    ]
    assert report["signatures"] == [
        {
            "file": report["signatures"][0]["file"],
            "key_id": report["signatures"][0]["key_id"],
            "signer": "alice",
            "status": "valid",
        }
    ]
    assert {f["path"] for f in report["files"]} >= {"model.safetensors", "gguf/tiny-F32.gguf"}


def test_verify_and_inspect_modify_nothing(cli, signed_bundle, keys):
    before = tree_snapshot(signed_bundle)
    assert cli("verify", signed_bundle, "--trust", keys / "alice.pub").code == 0
    assert cli("inspect", signed_bundle).code == 0
    assert cli("inspect", signed_bundle, "--json").code == 0
    (signed_bundle / "model.safetensors").chmod(0o644)
    assert tree_snapshot(signed_bundle) == before


def test_inspect_shows_files_sources_and_signatures(cli, signed_bundle):
    result = cli("inspect", signed_bundle, "--json")
    doc = json.loads(result.out)
    assert doc["name"] == "tiny" and doc["version"] == 3
    assert doc["signatures"][0]["covers_metadata"] is True
    gguf_entry = next(f for f in doc["files"] if f["path"] == "gguf/tiny-F32.gguf")
    assert gguf_entry["details"]["file_type"] == "F32"
    text = cli("inspect", signed_bundle)
    assert "gguf/tiny-F32.gguf" in text.out and "llama F32" in text.out


# every tamper case: exit 1, one message naming the file or signer


def refused(cli, bundle, *trust, extra=()):
    result = cli("verify", bundle, *[a for t in trust for a in ("--trust", t)], *extra)
    assert result.code == 1, result.out + result.err
    return result.out + result.err


def test_flipped_byte(cli, signed_bundle, keys):
    path = signed_bundle / "gguf/tiny-F32.gguf"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.unlink()
    path.write_bytes(data)
    assert "gguf/tiny-F32.gguf does not match its digest in sovpack.json (shard 0" in refused(
        cli, signed_bundle, keys / "alice.pub"
    )


def test_truncated_file(cli, signed_bundle, keys):
    path = signed_bundle / "model.safetensors"
    data = path.read_bytes()
    path.unlink()
    path.write_bytes(data[:-10])
    assert "model.safetensors has" in refused(cli, signed_bundle, keys / "alice.pub")
    assert "(truncated)" in refused(cli, signed_bundle, keys / "alice.pub")


def _sign_payload(bundle: Path, key_file: Path, payload: bytes) -> str:
    """A signature by a trusted key over any statement at all, replacing the bundle's own; its file name."""
    key = load_private_key(key_file)
    for old in (bundle / "signatures").iterdir():
        old.unlink()
    name = f"signatures/{key_id(key.public_key())}.sig"
    (bundle / name).write_bytes(sign_statement(key, payload))
    return name


def test_a_trusted_signature_over_a_malformed_statement_is_named(signed_bundle, keys):
    name = _sign_payload(signed_bundle, keys / "alice.key", b"{}")
    report = verify_bundle(signed_bundle, load_trust([keys / "alice.pub"]))
    assert not report.ok and report.failure.step == "signatures" and report.failure.subject == name
    assert "the signed statement" in str(report.failure)


def test_a_trusted_statement_that_leaves_a_file_out_is_refused_naming_it(signed_bundle, keys):
    raw = read_metadata_bytes(signed_bundle)
    metadata = read_metadata(signed_bundle)
    resources = {f.path: f.sha256 for f in metadata.files if f.path != "config.json"} | {"sovpack.json": sha256_bytes(raw)}
    _sign_payload(signed_bundle, keys / "alice.key", build_statement(metadata.name, resources))
    report = verify_bundle(signed_bundle, load_trust([keys / "alice.pub"]))
    assert not report.ok and report.failure.step == "metadata" and report.failure.subject == "config.json"
    assert "and sovpack.json disagree about config.json" in str(report.failure)


def test_added_file(cli, signed_bundle, keys):
    (signed_bundle / "extra.safetensors").write_bytes(b"x")
    assert "extra.safetensors not listed in the inventory (sovpack.json)" in refused(cli, signed_bundle, keys / "alice.pub")


def test_removed_file(cli, signed_bundle, keys):
    (signed_bundle / "tokenizer.json").unlink()
    assert "tokenizer.json listed in the inventory (sovpack.json) but missing" in refused(cli, signed_bundle, keys / "alice.pub")


def test_renamed_file(cli, signed_bundle, keys):
    (signed_bundle / "config.json").rename(signed_bundle / "config2.json")
    assert "config.json was renamed to config2.json" in refused(cli, signed_bundle, keys / "alice.pub")


def test_symlink_in_bundle(cli, signed_bundle, keys):
    (signed_bundle / "link.json").symlink_to("config.json")
    assert "link.json is a symbolic link" in refused(cli, signed_bundle, keys / "alice.pub")


def test_symlink_replacing_a_listed_file(cli, signed_bundle, keys, tmp_path):
    shutil.copy(signed_bundle / "config.json", tmp_path / "outside.json")
    (signed_bundle / "config.json").unlink()
    (signed_bundle / "config.json").symlink_to(tmp_path / "outside.json")
    assert "config.json is a symbolic link" in refused(cli, signed_bundle, keys / "alice.pub")


def test_metadata_edited_after_signing(cli, signed_bundle, keys):
    meta = json.loads((signed_bundle / "sovpack.json").read_text())
    meta["expires"] = None
    meta["version"] = 99
    (signed_bundle / "sovpack.json").write_text(json.dumps(meta))
    message = refused(cli, signed_bundle, keys / "alice.pub")
    assert "threshold not met: 0 of 1" in message
    assert "(alice (" in message and "does not cover this bundle: sovpack.json has SHA-256" in message
    assert "changed after signing" in message


def test_signature_by_untrusted_key(cli, tmp_path, model_dir, keys):
    bundle = tmp_path / "b"
    assert cli("pack", model_dir, "--out", bundle, "--name", "tiny").code == 0
    assert cli("sign", bundle, "--key", keys / "mallory.key").code == 0
    message = refused(cli, bundle, keys / "alice.pub")
    assert "threshold not met: 0 of 1" in message and "not in the trust set" in message
    assert key_id(load_public_key(keys / "mallory.pub")) in message


def test_untrusted_extra_signature_is_named_but_does_not_block(cli, signed_bundle, keys):
    assert cli("sign", signed_bundle, "--key", keys / "mallory.key").code == 0
    result = cli("verify", signed_bundle, "--trust", keys / "alice.pub")
    assert result.code == 0 and "not in the trust set" in result.out


def test_signature_copied_from_another_bundle(cli, tmp_path, signed_bundle, keys):
    other_src = write_model_dir(tmp_path / "other-model")
    (other_src / "config.json").write_text('{"different": true}')
    other = tmp_path / "other"
    assert cli("pack", other_src, "--out", other, "--name", "other", "--version", "3").code == 0
    assert cli("sign", other, "--key", keys / "alice.key").code == 0
    shutil.rmtree(signed_bundle / "signatures")
    shutil.copytree(other / "signatures", signed_bundle / "signatures")
    message = refused(cli, signed_bundle, keys / "alice.pub")
    assert "does not cover this bundle" in message and "statement for bundle 'other'" in message


def test_copying_one_signature_twice_does_not_count_twice(cli, signed_bundle, keys):
    sig = next((signed_bundle / "signatures").glob("*.sig"))
    shutil.copy(sig, signed_bundle / "signatures" / "copy.sig")
    message = refused(cli, signed_bundle, keys / "alice.pub", keys / "bob.pub", extra=("--threshold", "2"))
    assert "threshold not met: 1 of 2" in message


def test_stale_signature_is_reported_but_a_current_one_suffices(cli, signed_bundle, keys):
    meta = json.loads((signed_bundle / "sovpack.json").read_text())
    meta["version"] = 4
    (signed_bundle / "sovpack.json").write_text(json.dumps(meta))
    result = cli("sign", signed_bundle, "--key", keys / "bob.key")
    assert result.code == 0 and "no longer matches this bundle" in result.out
    ok = cli("verify", signed_bundle, "--trust", keys / "alice.pub", "--trust", keys / "bob.pub", "--json")
    report = json.loads(ok.out)
    assert ok.code == 0 and report["version"] == 4
    assert sorted(s["status"] for s in report["signatures"]) == ["stale", "valid"]
    two = refused(cli, signed_bundle, keys / "alice.pub", keys / "bob.pub", extra=("--threshold", "2"))
    assert "threshold not met: 1 of 2" in two and "alice" in two and "does not cover this bundle" in two


def test_forged_signature_bytes(cli, signed_bundle, keys):
    sig_file = next((signed_bundle / "signatures").glob("*.sig"))
    doc = json.loads(sig_file.read_text())
    import base64

    payload = json.loads(base64.b64decode(doc["dsseEnvelope"]["payload"]))
    payload["subject"][0]["name"] = "renamed"
    doc["dsseEnvelope"]["payload"] = base64.b64encode(json.dumps(payload).encode()).decode()
    sig_file.write_text(json.dumps(doc))
    message = refused(cli, signed_bundle, keys / "alice.pub")
    assert f"{sig_file.relative_to(signed_bundle)} names trusted signer alice" in message and "does not verify" in message


def test_garbage_signature_file(cli, signed_bundle, keys):
    (signed_bundle / "signatures" / "junk.sig").write_text("not json")
    assert "signatures/junk.sig is not a valid model-signing signature file" in refused(cli, signed_bundle, keys / "alice.pub")


def test_threshold_not_met(cli, signed_bundle, keys):
    message = refused(cli, signed_bundle, keys / "alice.pub", keys / "bob.pub", extra=("--threshold", "2"))
    assert "threshold not met: 1 of 2 required" in message and "alice" in message


def test_unsigned_bundle(cli, tmp_path, model_dir, keys):
    assert cli("pack", model_dir, "--out", tmp_path / "b", "--name", "tiny").code == 0
    assert "the bundle has no signatures" in refused(cli, tmp_path / "b", keys / "alice.pub")


def test_expired_bundle(cli, tmp_path, model_dir, keys):
    bundle = tmp_path / "b"
    packed = cli("pack", model_dir, "--out", bundle, "--name", "old", "--expires", "2020-01-01")
    assert packed.code == 0 and "warning: this bundle expired on 2020-01-01T00:00:00Z" in packed.out
    assert cli("sign", bundle, "--key", keys / "alice.key").code == 0
    assert "bundle old v1 expired on 2020-01-01T00:00:00Z" in refused(cli, bundle, keys / "alice.pub")


def test_malformed_safetensors_header_in_a_signed_bundle(cli, signed_bundle, keys):
    replace_file_in_inventory(signed_bundle, "model.safetensors", b'\x07\0\0\0\0\0\0\0{"a":1}')
    force_sign(signed_bundle, keys / "alice.key")
    message = refused(cli, signed_bundle, keys / "alice.pub")
    assert "model.safetensors: tensor 'a' must have exactly the fields" in message


def test_malformed_gguf_in_a_signed_bundle(cli, signed_bundle, keys):
    data = (signed_bundle / "gguf/tiny-F32.gguf").read_bytes()
    replace_file_in_inventory(signed_bundle, "gguf/tiny-F32.gguf", data[:4] + b"\x63\0\0\0" + data[8:])
    force_sign(signed_bundle, keys / "alice.key")
    message = refused(cli, signed_bundle, keys / "alice.pub")
    assert "gguf/tiny-F32.gguf: malformed GGUF: GGUF version 99" in message


def test_pickle_in_a_signed_bundle(cli, signed_bundle, keys):
    import pickle

    replace_file_in_inventory(signed_bundle, "config.json", pickle.dumps({"a": 1}, protocol=4))
    force_sign(signed_bundle, keys / "alice.key")
    message = refused(cli, signed_bundle, keys / "alice.pub")
    assert "config.json: refused as pickle-based weights" in message


def test_signing_refuses_a_damaged_bundle(cli, signed_bundle, keys):
    (signed_bundle / "README.md").write_text("changed")
    result = cli("sign", signed_bundle, "--key", keys / "bob.key")
    assert result.code == 1 and "refusing to sign" in result.err and "README.md" in result.err


# usage errors


@pytest.mark.parametrize(
    "args, message",
    [
        (["verify", "{bundle}"], "trusts no keys yet: run `sovpack trust add KEY.pub` or pass --trust"),
        (["verify", "{bundle}", "--trust", "{keys}/nope.pub"], "does not exist"),
        (["verify", "{bundle}", "--trust", "{keys}/alice.pub", "--threshold", "2"], "threshold 2 cannot be met"),
        (["verify", "{tmp}/not-a-bundle", "--trust", "{keys}"], "not a bundle directory"),
        (["sign", "{bundle}", "--key", "{keys}/missing.key"], "does not exist"),
        (["inspect", "{tmp}"], "is not a sovpack bundle"),
        (["verify", "{bundle}", "--trust", "{keys}", "--bogus"], "No such option"),
    ],
)
def test_usage_errors_exit_2(cli, signed_bundle, keys, tmp_path, args, message):
    fill = {"bundle": signed_bundle, "keys": keys, "tmp": tmp_path}
    result = cli(*[a.format(**fill) for a in args])
    assert result.code == 2, result.out + result.err
    assert message in result.err


# interoperability with the independent verifier from PyPI model-signing


def model_signing_verify(bundle: Path, signature: Path, public_key: Path) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).parent / "model_signing"
    return subprocess.run(
        [exe, "verify", "key", bundle, "--signature", signature, "--public_key", public_key],
        capture_output=True,
        text=True,
    )


def test_model_signing_accepts_every_signature(cli, signed_bundle, keys):
    assert cli("sign", signed_bundle, "--key", keys / "bob.key").code == 0
    for name in ("alice", "bob"):
        sig = signed_bundle / "signatures" / f"{key_id(load_public_key(keys / f'{name}.pub'))}.sig"
        result = model_signing_verify(signed_bundle, sig, keys / f"{name}.pub")
        assert result.returncode == 0, result.stdout + result.stderr
        assert "Verification succeeded" in result.stdout


def test_model_signing_refuses_what_sovpack_refuses(cli, signed_bundle, keys):
    sig = next((signed_bundle / "signatures").glob("*.sig"))
    (signed_bundle / "README.md").write_text("tampered")
    result = model_signing_verify(signed_bundle, sig, keys / "alice.pub")
    assert result.returncode != 0 and "README.md" in result.stdout + result.stderr
    wrong_key = model_signing_verify(signed_bundle, sig, keys / "bob.pub")
    assert wrong_key.returncode != 0


def test_cli_entry_point_runs_as_a_process(tmp_path, signed_bundle, keys):
    result = subprocess.run(
        [sys.executable, "-m", "sovpack", "verify", signed_bundle, "--trust", keys / "alice.pub"], capture_output=True, text=True
    )
    assert result.returncode == 0 and "VERIFIED" in result.stdout
    os.utime(signed_bundle / "README.md")
    (signed_bundle / "README.md").write_text("x")
    result = subprocess.run(
        [sys.executable, "-m", "sovpack", "verify", signed_bundle, "--trust", keys / "alice.pub"], capture_output=True, text=True
    )
    assert result.returncode == 1 and "README.md" in result.stdout


def test_format_time_is_utc():
    from datetime import datetime, timedelta, timezone

    assert format_time(datetime(2027, 1, 1, 1, tzinfo=timezone(timedelta(hours=1)))) == "2027-01-01T00:00:00Z"


def test_case_only_collisions_are_refused(tmp_path, cli):
    src = tmp_path / "src"
    write_safetensors(src / "Model.safetensors")
    write_gguf(src / "x.gguf")
    (src / "README.md").write_text("a")
    (src / "readme.md").write_text("b")
    result = cli("pack", src, "--out", tmp_path / "b", "--name", "x")
    assert result.code == 1 and "README.md and readme.md" in result.err and "FAT32" in result.err


def test_checking_an_unlisted_path_is_refused(signed_bundle, keys):
    from sovpack.bundle.trust import load_trust
    from sovpack.bundle.verify import verify_bundle

    report = verify_bundle(signed_bundle, load_trust([keys / "alice.pub"]), paths=["not-there.gguf"])
    assert not report.ok and "not-there.gguf not listed in the inventory" in str(report.failure)
    assert verify_bundle(signed_bundle, load_trust([keys / "alice.pub"]), paths=["gguf/tiny-F32.gguf"]).ok


def test_verify_json_report_on_failure(cli, signed_bundle, keys):
    (signed_bundle / "README.md").write_text("changed")
    result = cli("verify", signed_bundle, "--trust", keys / "alice.pub", "--json")
    report = json.loads(result.out)
    assert result.code == 1 and report["ok"] is False
    assert report["error"]["step"] == "digests" and report["error"]["subject"] == "README.md"
    assert "README.md" in report["error"]["message"]
    assert [c["step"] for c in report["checks"]] == ["signatures", "threshold", "metadata", "inventory"]


def test_inspect_names_a_broken_signature_without_failing(cli, signed_bundle):
    (signed_bundle / "signatures" / "junk.sig").write_text("{}")
    result = cli("inspect", signed_bundle, "--json")
    assert result.code == 0
    junk = next(s for s in json.loads(result.out)["signatures"] if s["file"] == "signatures/junk.sig")
    assert junk["covers_metadata"] is False and "not a valid model-signing signature file" in junk["problem"]


def test_a_bundle_at_a_mount_point_can_be_signed(cli, model_dir, tmp_path, keys):
    """sovpack.json and signatures are staged beside the bundle, unless that is another file system."""
    packed = tmp_path / "packed"
    assert cli("pack", model_dir, "--out", packed, "--name", "tiny").code == 0
    bundle = tmp_path / "mounted"
    bundle.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(bundle)], capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        shutil.copytree(packed, bundle, dirs_exist_ok=True)  # the bundle directory is the mount point itself
        result = cli("sign", bundle, "--key", keys / "alice.key")
        assert result.code == 0, result.err
        assert cli("verify", bundle, "--trust", keys / "alice.pub").code == 0
    finally:
        subprocess.run(["umount", "-l", str(bundle)], check=False)
