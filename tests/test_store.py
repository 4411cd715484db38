"""The store: trust, list, remove, dedup, read-only files, rollback mark, verify NAME, the API serve uses."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from builders import write_gguf
from helpers import audit_records, flip_byte, sovpack, store_snapshot, unprivileged

from sovpack.errors import Refused, UsageError
from sovpack.store.store import Store


def install(cli, bundle: Path, store: Path, tmp_path: Path, *extra) -> None:
    out = tmp_path / f"out-{bundle.name}"
    assert cli("export", bundle, "--to", out).code == 0
    result = cli("import", out, "--store", store, *extra)
    assert result.code == 0, result.err


def version_4(cli, tmp_path, model_dir, keys) -> Path:
    write_gguf(model_dir / "gguf" / "tiny-Q8.gguf", n_tensors=5)
    bundle = tmp_path / "bundle-v4"
    assert cli("pack", model_dir, "--out", bundle, "--name", "tiny", "--version", "4").code == 0
    assert cli("sign", bundle, "--key", keys / "alice.key").code == 0
    return bundle


# trust


def test_trust_add_list_remove_and_threshold(cli, tmp_path, keys):
    store = tmp_path / "store"
    assert cli("trust", "add", keys / "alice.pub", "--store", store).code == 0
    added = cli("trust", "add", keys / "bob.pub", "--name", "bob-ops", "--store", store)
    assert added.code == 0 and "trusted bob-ops" in added.out
    listing = json.loads(cli("trust", "list", "--store", store, "--json").out)
    assert [k["name"] for k in listing["keys"]] == ["alice", "bob-ops"] and listing["threshold"] == 1
    assert cli("trust", "threshold", "2", "--store", store).code == 0
    assert "threshold: 2 of 2" in cli("trust", "list", "--store", store).out
    warned = cli("trust", "threshold", "3", "--store", store)
    assert warned.code == 0 and "only 2 key(s) are trusted" in warned.out
    assert cli("trust", "remove", "bob-ops", "--store", store).code == 0
    assert [k["name"] for k in json.loads(cli("trust", "list", "--store", store, "--json").out)["keys"]] == ["alice"]
    events = [r["event"] for r in audit_records(store)]
    assert events == ["trust-add", "trust-add", "trust-threshold", "trust-threshold", "trust-remove"]


@pytest.mark.parametrize(
    "args,message",
    [
        (["trust", "add", "KEYS/alice.pub"], "already trusted"),
        (["trust", "remove", "nobody"], "no trusted key"),
        (["trust", "threshold", "0"], "1 or more"),
        (["trust", "add", "KEYS/nothing.pub"], "does not exist"),
        (
            ["trust", "add", "KEYS/bob.pub", "--name", "alice"],
            "a different key is already trusted as 'alice'; choose another --name",
        ),
        (["trust", "add", "KEYS/bob.pub", "--name", "bob smith"], "trust name 'bob smith': use letters, digits"),
    ],
)
def test_trust_usage_errors(cli, store, keys, args, message):
    result = cli(*[a.replace("KEYS", str(keys)) for a in args], "--store", store)
    assert result.code == 2 and message in result.err, result.err


def test_a_store_threshold_its_keys_cannot_meet_is_named(cli, store, signed_bundle):
    assert cli("trust", "threshold", "2", "--store", store).code == 0
    result = cli("verify", signed_bundle, "--store", store)
    policy = store / "trust" / "policy.json"
    assert result.code == 2 and f"the store's threshold ({policy}) is 2 but it trusts only 1 key(s)" in result.err, result.err


# list


def test_list_shows_name_version_size_signers_expiry_and_gguf_variants(cli, signed_bundle, store, tmp_path):
    install(cli, signed_bundle, store, tmp_path)
    doc = json.loads(cli("list", "--store", store, "--json").out)
    (row,) = doc["bundles"]
    size = sum(json.loads((signed_bundle / "sovpack.json").read_text())["files"][i]["size"] for i in range(7))
    assert row["name"] == "tiny" and row["version"] == 3 and row["size"] == size
    assert row["signers"] == ["alice"] and row["expires"] is None and row["gguf_variants"] == ["F32"]
    assert row["problem"] is None and row["imported"]
    text = cli("list", "--store", store).out
    assert "tiny" in text and "alice" in text and "F32" in text


def test_list_of_an_empty_store(cli, tmp_path):
    (tmp_path / "empty").mkdir()
    result = cli("list", "--store", tmp_path / "empty")
    assert result.code == 0 and "no bundles installed" in result.out
    assert json.loads(cli("list", "--store", tmp_path / "empty", "--json").out)["bundles"] == []


def test_store_root_from_sovpack_home(signed_bundle, tmp_path, keys):
    env = os.environ | {"SOVPACK_HOME": str(tmp_path / "home-store")}
    assert sovpack("trust", "add", keys / "alice.pub", env=env).returncode == 0
    assert sovpack("export", signed_bundle, "--to", tmp_path / "out", env=env).returncode == 0
    assert sovpack("import", tmp_path / "out", env=env).returncode == 0
    assert (tmp_path / "home-store" / "bundles" / "tiny" / "3" / "sovpack.json").is_file()


# dedup, read-only, remove


def test_identical_files_are_stored_once_and_read_only(cli, signed_bundle, store, tmp_path, model_dir, keys):
    install(cli, signed_bundle, store, tmp_path)
    install(cli, version_4(cli, tmp_path, model_dir, keys), store, tmp_path)
    v3, v4 = store / "bundles/tiny/3", store / "bundles/tiny/4"
    assert (v3 / "model.safetensors").stat().st_ino == (v4 / "model.safetensors").stat().st_ino
    assert (v4 / "model.safetensors").stat().st_nlink == 3  # v3, v4 and objects/
    distinct = {json.dumps(f["sha256"]) for b in (v3, v4) for f in json.loads((b / "sovpack.json").read_text())["files"]}
    assert len(list((store / "objects" / "sha256").glob("*/*"))) == len(distinct)
    for p in [store / "bundles" / "tiny" / "3", *(store / "bundles").rglob("*")]:
        if p.is_file():
            assert p.stat().st_mode & 0o777 == 0o444, p
        elif p.parent.parent == store / "bundles" / "tiny" or p.parent.parent.parent == store / "bundles":
            assert p.stat().st_mode & 0o777 == 0o555, p  # the bundle directory and every directory inside it


def test_no_file_of_an_installed_bundle_can_be_renamed_over_without_changing_a_mode(cli, signed_bundle, store, tmp_path):
    install(cli, signed_bundle, store, tmp_path)
    bundle = store / "bundles" / "tiny" / "3"
    (tmp_path / "other").write_bytes(b"other bytes")
    code = "import os, sys; os.rename(sys.argv[1], sys.argv[2])"
    swap = subprocess.run(
        [sys.executable, "-c", code, tmp_path / "other", bundle / "config.json"], capture_output=True, text=True, **unprivileged()
    )
    assert swap.returncode != 0 and "Permission denied" in swap.stderr
    assert cli("verify", "tiny", "--store", store).code == 0
    assert cli("remove", "tiny@3", "--store", store).code == 0 and not bundle.exists()


def test_remove_keeps_the_rollback_mark_and_deletes_unshared_files(cli, signed_bundle, store, tmp_path, model_dir, keys):
    install(cli, signed_bundle, store, tmp_path)
    install(cli, version_4(cli, tmp_path, model_dir, keys), store, tmp_path)
    ambiguous = cli("remove", "tiny", "--store", store)
    assert ambiguous.code == 2 and "2 versions installed (4, 3)" in ambiguous.err
    only_in_v4 = json.loads((store / "bundles/tiny/4/sovpack.json").read_text())
    q8 = next(f["sha256"] for f in only_in_v4["files"] if f["path"] == "gguf/tiny-Q8.gguf")
    removed = cli("remove", "tiny@4", "--store", store)
    assert removed.code == 0 and "refuses versions up to v4" in removed.out
    assert not (store / "bundles/tiny/4").exists() and not (store / "records/tiny/4.json").exists()
    assert not (store / "objects/sha256" / q8[:2] / q8).exists()
    assert (store / "bundles/tiny/3/model.safetensors").stat().st_nlink == 2
    assert cli("verify", "tiny", "--store", store).code == 0
    again = cli("import", tmp_path / "out-bundle-v4", "--store", store)
    assert again.code == 1 and "not newer than v4" in again.err
    assert cli("remove", "tiny", "--store", store).code == 0
    assert list((store / "objects/sha256").glob("*/*")) == [] and list((store / "tmp").iterdir()) == []
    assert json.loads((store / "state/versions.json").read_text()) == {"tiny": 4}
    assert [r["event"] for r in audit_records(store)].count("remove") == 2


def test_remove_what_is_not_installed(cli, store):
    result = cli("remove", "ghost@1", "--store", store)
    assert result.code == 2 and "not installed" in result.err
    assert cli("remove", "no such name", "--store", store).code == 2
    assert cli("verify", "no such name", "--store", store).code == 2


# verify NAME


def test_verify_an_installed_bundle_by_name(cli, signed_bundle, store, tmp_path, keys):
    install(cli, signed_bundle, store, tmp_path)
    by_name = cli("verify", "tiny@3", "--store", store, "--json")
    by_path = cli("verify", signed_bundle, "--trust", keys / "alice.pub", "--json")
    assert by_name.code == 0 and json.loads(by_name.out).keys() == json.loads(by_path.out).keys()
    assert json.loads(by_name.out)["ok"] is True
    assert cli("verify", "tiny", "--store", store, "--trust", keys / "bob.pub").code == 1
    flip_byte(store / "bundles/tiny/3/config.json", 3)
    tampered = cli("verify", "tiny", "--store", store)
    assert tampered.code == 1 and "config.json" in tampered.out
    records = [r for r in audit_records(store) if r["event"] == "verify"]
    assert [r["ok"] for r in records] == [True, False, False] and records[-1]["step"] == "digests"


def test_verify_a_directory_with_the_stores_trust(cli, signed_bundle, store):
    assert cli("verify", signed_bundle, "--store", store).code == 0
    assert cli("verify", "./nowhere", "--store", store).code == 2
    assert cli("verify", "ghost", "--store", store).code == 2


# the API serve relies on


def test_store_api_for_serve(cli, signed_bundle, store, tmp_path, keys):
    install(cli, signed_bundle, store, tmp_path)
    s = Store(store)
    installed = s.find("tiny")
    assert (installed.name, installed.version, installed.path) == ("tiny", 3, store / "bundles/tiny/3")
    assert installed.record.accepted_by[0].name == "alice"
    assert s.installed()[0] == installed and s.find("tiny@3") == installed
    assert [k.name for k in s.policy_for(installed).keys] == ["alice"]
    assert s.trust_policy().threshold == 1
    s.audit.append("serve-start", target="tiny")
    assert s.audit.verify_chain().records == len(audit_records(store))
    s.remove_trusted_key("alice")
    with pytest.raises(Refused, match="still trusted"):
        s.policy_for(installed)
    with pytest.raises(UsageError):
        s.find("tiny@9")


def test_serve_threshold_can_raise_the_one_an_installed_bundle_is_held_to_but_a_lower_one_is_refused(
    cli, signed_bundle, store, tmp_path
):
    install(cli, signed_bundle, store, tmp_path)
    s = Store(store)
    installed = s.find("tiny")
    with pytest.raises(Refused, match="only 1 of those keys are still trusted and 2 are required"):
        s.policy_for(installed, 2)
    s.set_threshold(2)  # now the store asks for two signatures: serving under one is not the operator's to choose here
    with pytest.raises(UsageError, match=r"--threshold 1 is below the 2 trusted signatures tiny v3 is held to"):
        s.policy_for(installed, 1)
    result = cli("serve", "tiny", "--threshold", "1", "--store", store)
    assert result.code == 2 and "--threshold 1 is below the 2 trusted signatures tiny v3" in result.err, result.err
    by_path = cli("serve", store / "bundles" / "tiny" / "3", "--threshold", "1", "--store", store)  # no way around it
    assert by_path.code == 2 and "--threshold 1 is below the 2 trusted signatures tiny v3" in by_path.err, by_path.err


def test_a_failed_import_changes_nothing_but_the_audit_log(cli, signed_bundle, store, tmp_path):
    install(cli, signed_bundle, store, tmp_path)
    before = store_snapshot(store)
    flip_byte(tmp_path / "out-bundle" / "tiny-v3.001", 0)
    assert cli("import", tmp_path / "out-bundle", "--store", store).code == 0  # already installed: not even read
    assert store_snapshot(store) == before


# damaged store files: refused (exit 1), naming the file, never a traceback


def test_a_damaged_trust_policy_is_named(signed_bundle, store, tmp_path):
    policy = store / "trust" / "policy.json"
    policy.parent.mkdir(parents=True, exist_ok=True)
    policy.write_text('{"threshold": 2')
    listed = sovpack("trust", "list", "--store", store)
    assert listed.returncode == 1 and b"Traceback" not in listed.stderr
    assert str(policy).encode() in listed.stderr and b"not valid JSON" in listed.stderr
    assert b"sovpack trust threshold K" in listed.stderr
    policy.write_text('{"threshold": "two"}')
    result = sovpack("import", tmp_path / "nowhere", "--store", store)
    assert result.returncode == 1 and str(policy).encode() in result.stderr and b"'threshold'" in result.stderr


def test_a_damaged_import_record_is_named_and_can_be_rewritten(cli, signed_bundle, store, tmp_path):
    install(cli, signed_bundle, store, tmp_path)
    record = store / "records" / "tiny" / "3.json"
    record.write_text("[")
    for args in (["list"], ["verify", "tiny"], ["import", tmp_path / "out-bundle"]):
        result = cli(*args, "--store", store)
        assert result.code == 1 and str(record) in result.err and "not valid JSON" in result.err, args
    record.write_text('{"accepted_by": [{"name": "alice"}]}')
    damaged = cli("list", "--store", store)
    assert damaged.code == 1 and str(record) in damaged.err and "'accepted_by'" in damaged.err
    for field, value in (("threshold", '"x"'), ("size", '"big"')):
        record.write_text(f'{{"accepted_by": [], "{field}": {value}}}')
        for args in (["list"], ["serve", "tiny"]):
            damaged = cli(*args, "--store", store)
            assert damaged.code == 1 and str(record) in damaged.err and f"its '{field}'" in damaged.err, (args, damaged.err)
    record.unlink()  # the repair the message gives: the same import again verifies the bundle and writes the record
    assert cli("import", tmp_path / "out-bundle", "--store", store).code == 0
    assert json.loads(cli("list", "--store", store, "--json").out)["bundles"][0]["signers"] == ["alice"]
    signed = hashlib.sha256((signed_bundle / "sovpack.json").read_bytes()).hexdigest()
    assert json.loads(record.read_text())["metadata_sha256"] == signed


def test_every_field_of_an_import_record_is_checked(cli, signed_bundle, store, tmp_path):
    install(cli, signed_bundle, store, tmp_path)
    record = store / "records" / "tiny" / "3.json"
    good = json.loads(record.read_text())
    for field, value in (("imported", 12), ("metadata_sha256", ["x"]), ("files", -1), ("source", "volumes")):
        record.write_text(json.dumps(good | {field: value}))
        damaged = cli("list", "--store", store)
        assert damaged.code == 1 and str(record) in damaged.err and f"its '{field}'" in damaged.err, (field, damaged.err)
    record.write_text(json.dumps(good))
    assert cli("list", "--store", store).code == 0


def test_a_damaged_rollback_state_is_named(cli, signed_bundle, store, tmp_path, model_dir, keys):
    install(cli, signed_bundle, store, tmp_path)
    versions = store / "state" / "versions.json"
    versions.write_bytes(b"\xff\xfe")
    out = tmp_path / "out-v4"
    assert cli("export", version_4(cli, tmp_path, model_dir, keys), "--to", out).code == 0
    result = cli("import", out, "--store", store)  # the rollback check reads it
    assert result.code == 1 and str(versions) in result.err and "restore it from a backup" in result.err
    versions.write_text('{"tiny": "3"}')
    result = cli("remove", "tiny", "--store", store)
    assert result.code == 1 and str(versions) in result.err and "not a whole number" in result.err
    assert (store / "bundles" / "tiny" / "3").is_dir()


def test_an_installed_bundle_without_record_that_fails_verification_is_refused(cli, signed_bundle, store, tmp_path):
    install(cli, signed_bundle, store, tmp_path)
    (store / "records" / "tiny" / "3.json").unlink()  # as an import killed right after its commit leaves it
    flip_byte(store / "bundles" / "tiny" / "3" / "config.json", 3)
    result = cli("import", tmp_path / "out-bundle", "--store", store)
    assert result.code == 1 and "tiny v3 is installed but has no import record, and verifying it failed (digests)" in result.err
    assert "config.json does not match its digest" in result.err
    assert not (store / "records" / "tiny" / "3.json").exists()
    assert audit_records(store)[-1]["outcome"] == "refused"


def test_a_stray_folder_in_bundles_is_named(cli, signed_bundle, store, tmp_path):
    install(cli, signed_bundle, store, tmp_path)
    stray = store / "bundles" / "lost+found"
    stray.mkdir()
    result = cli("list", "--store", store)
    assert result.code == 1 and str(stray) in result.err and "move it out of bundles/" in result.err
