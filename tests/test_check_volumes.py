"""check-volumes and the volume checks of import: damaged, missing, mixed and forged volumes and indexes."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from helpers import audit_records, export, flip_byte, new_version, staged_bundles, store_snapshot, volumes


def test_check_volumes_names_damaged_and_missing_volumes(cli, signed_bundle, tmp_path):
    out = export(cli, signed_bundle, tmp_path / "out")
    flip_byte(out / "tiny-v3.002", 300)
    (out / "tiny-v3.003").unlink()
    result = cli("check-volumes", out)
    assert result.code == 1
    assert "tiny-v3.001  OK" in result.out
    assert "tiny-v3.002  DAMAGED" in result.out and "tiny-v3.003  MISSING" in result.out
    as_json = cli("check-volumes", out, "--json")
    report = json.loads(as_json.out)
    assert [v["state"] for v in report["volumes"]][:3] == ["ok", "damaged", "missing"]
    assert as_json.code == 1 and "tiny-v3.001" not in as_json.err  # no volume lines beside the JSON
    assert report["ok"] is False and report["bundle"]["name"] == "tiny"


def test_check_volumes_reports_a_truncated_volume(cli, signed_bundle, tmp_path):
    out = export(cli, signed_bundle, tmp_path / "out")
    with open(out / "tiny-v3.001", "r+b") as f:
        f.truncate(100)
    result = cli("check-volumes", out)
    assert result.code == 1 and "tiny-v3.001  DAMAGED  100 bytes, the index says 8000" in result.out


def test_damaged_volume_refused_store_unchanged_and_rerun_reuses_checked_volumes(cli, signed_bundle, store, tmp_path):
    out = export(cli, signed_bundle, tmp_path / "out")
    good = (out / "tiny-v3.002").read_bytes()
    flip_byte(out / "tiny-v3.002", 10)
    before = store_snapshot(store)
    result = cli("import", out, "--store", store)
    assert result.code == 1
    assert "tiny-v3.002 damaged" in result.err and "burn them again" in result.err
    assert store_snapshot(store) == before and staged_bundles(store) == []
    refused = audit_records(store)[-1]
    assert refused["event"] == "import" and refused["outcome"] == "refused" and "tiny-v3.002" in refused["reason"]
    (out / "tiny-v3.002").write_bytes(good)  # the disc burnt again
    again = cli("import", out, "--store", store)
    assert again.code == 0, again.err
    assert "tiny-v3.001  OK  intact in an earlier run and unchanged since: not read again" in again.out
    assert "tiny-v3.002  OK\n" in again.out


def test_a_damaged_tar_header_does_not_hide_a_later_damaged_volume(cli, signed_bundle, store, tmp_path):
    """Reassembly fails at the first byte, but every volume is still read and judged before the refusal."""
    out = export(cli, signed_bundle, tmp_path / "out")
    last = volumes(out)[-1]
    flip_byte(out / "tiny-v3.001", 0)
    flip_byte(last, 0)
    before = store_snapshot(store)
    result = cli("import", out, "--store", store)
    assert result.code == 1
    assert "tiny-v3.001 damaged" in result.err and f"{last.name} damaged" in result.err and "2 of" in result.err
    assert "tiny-v3.002  OK" in result.out
    assert store_snapshot(store) == before and staged_bundles(store) == []


def test_a_volume_changed_after_it_was_checked_is_read_again(cli, signed_bundle, store, tmp_path):
    out = export(cli, signed_bundle, tmp_path / "out")
    (out / "tiny-v3.003").rename(tmp_path / "kept")
    assert cli("import", out, "--store", store).code == 1  # .001 and .002 are now in the journal
    (tmp_path / "kept").rename(out / "tiny-v3.003")
    flip_byte(out / "tiny-v3.001", 5)
    result = cli("import", out, "--store", store)
    assert result.code == 1 and "tiny-v3.001 damaged" in result.err


def test_missing_volume(cli, signed_bundle, store, tmp_path):
    out = export(cli, signed_bundle, tmp_path / "out")
    (out / "tiny-v3.002").unlink()
    before = store_snapshot(store)
    result = cli("import", out, "--store", store)
    assert result.code == 1 and "tiny-v3.002 missing" in result.err
    assert store_snapshot(store) == before


def test_volumes_of_two_bundles_mixed_in_one_directory(cli, signed_bundle, store, tmp_path, model_dir, keys):
    v3 = export(cli, signed_bundle, tmp_path / "v3")
    v4 = export(cli, new_version(cli, tmp_path, model_dir, keys, 4), tmp_path / "v4")
    (v3 / "tiny-v3.002").unlink()
    shutil.copy(v4 / "tiny-v4.002", v3)  # the wrong disc copied in
    before = store_snapshot(store)
    result = cli("import", v3, "--store", store)
    assert result.code == 1
    assert "tiny-v3.002 missing" in result.err and "tiny-v4.002 (of tiny-v4)" in result.err
    assert store_snapshot(store) == before
    shutil.copy(v4 / "tiny-v4.index.json", v3)  # and its index too: which one is meant?
    result = cli("import", v3, "--store", store)
    assert result.code == 2 and "tiny-v3.index.json" in result.err and "tiny-v4.index.json" in result.err


def test_an_index_pointing_at_another_bundles_volumes_is_refused(cli, signed_bundle, store, tmp_path, model_dir, keys):
    """Volumes renamed to match an index they do not belong to: caught by content, not names."""
    v3 = export(cli, signed_bundle, tmp_path / "v3")
    other = new_version(cli, tmp_path, model_dir, keys, 3, name="tiny")  # same name and version, other content
    v3b = export(cli, other, tmp_path / "v3b")
    index = json.loads((v3 / "tiny-v3.index.json").read_text())
    theirs = json.loads((v3b / "tiny-v3.index.json").read_text())
    index["volumes"], index["archive"] = theirs["volumes"], theirs["archive"]
    (v3b / "tiny-v3.index.json").unlink()
    (v3b / "tiny-v3.index.json").write_text(json.dumps(index))  # identity of one bundle, volumes of the other
    result = cli("import", v3b, "--store", store)
    assert result.code == 1 and "volumes of two exports are mixed" in result.err
    assert not (store / "bundles").exists() and staged_bundles(store) == []


def test_index_edited_after_signing(cli, signed_bundle, store, tmp_path, keys):
    out = export(cli, signed_bundle, tmp_path / "out", "--key", keys / "alice.key")
    index = json.loads((out / "tiny-v3.index.json").read_text())
    index["created"] = "2020-01-01T00:00:00Z"
    (out / "tiny-v3.index.json").write_text(json.dumps(index, indent=2))
    result = cli("import", out, "--store", store)
    assert result.code == 1 and "tiny-v3.index.sig does not cover this tiny-v3.index.json" in result.err
    assert "edited after it was signed" in result.err
    assert not (store / "bundles").exists()


def test_forged_index_signature(cli, signed_bundle, store, tmp_path, keys):
    out = export(cli, signed_bundle, tmp_path / "out", "--key", keys / "alice.key")
    sig = json.loads((out / "tiny-v3.index.sig").read_text())
    forged = bytearray(__import__("base64").b64decode(sig["dsseEnvelope"]["signatures"][0]["sig"]))
    forged[-1] ^= 1
    sig["dsseEnvelope"]["signatures"][0]["sig"] = __import__("base64").b64encode(bytes(forged)).decode()
    (out / "tiny-v3.index.sig").write_text(json.dumps(sig))
    result = cli("check-volumes", out, "--trust", keys / "alice.pub")
    assert result.code == 1 and "tiny-v3.index.sig names trusted signer alice" in result.err


def test_model_signing_verifies_a_signed_export(cli, signed_bundle, tmp_path, keys):
    out = export(cli, signed_bundle, tmp_path / "out", "--key", keys / "alice.key")
    tool = Path(sys.executable).parent / "model_signing"
    result = subprocess.run(
        [tool, "verify", "key", out, "--signature", out / "tiny-v3.index.sig", "--public_key", keys / "alice.pub"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
