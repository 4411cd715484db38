"""export, check-volumes and import through the real command line, and every bad input of issue 5."""

from __future__ import annotations

import ctypes
import fcntl
import hashlib
import io
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tarfile
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from builders import write_gguf
from transfer_helpers import audit_records, flip_byte, sovpack, staged_bundles, store_snapshot, write_big_safetensors

from sovpack.bundle.directory import read_metadata
from sovpack.bundle.signature import MAX_SIGNATURE_BYTES
from sovpack.bundle.trust import load_trust
from sovpack.bundle.verify import verify_bundle
from sovpack.common.hashing import ShardDigests, digest_file
from sovpack.common.progress import Progress
from sovpack.errors import Refused, UsageError
from sovpack.store.store import Store
from sovpack.transfer.archive import MAX_HEADER_BYTES
from sovpack.transfer.export import export_volumes
from sovpack.transfer.import_ import import_bundle
from sovpack.transfer.index import parse_volume_size


@pytest.fixture
def store(tmp_path, cli, keys):
    """A store that trusts alice."""
    root = tmp_path / "store"
    assert cli("trust", "add", keys / "alice.pub", "--store", root).code == 0
    return root


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


# export


def test_export_writes_fat32_sized_volumes_and_an_index(cli, signed_bundle, tmp_path):
    out = export(cli, signed_bundle, tmp_path / "out")
    names = [p.name for p in volumes(out)]
    assert names[:2] == ["tiny-v3.001", "tiny-v3.002"] and len(names) >= 3
    index = json.loads((out / "tiny-v3.index.json").read_text())
    assert index["bundle"]["name"] == "tiny" and index["bundle"]["version"] == 3
    assert index["bundle"]["metadata_sha256"] == hashlib.sha256((signed_bundle / "sovpack.json").read_bytes()).hexdigest()
    for entry, path in zip(index["volumes"], volumes(out), strict=True):
        assert entry["file"] == path.name and entry["size"] == path.stat().st_size <= 8000
        assert entry["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert index["archive"]["size"] == sum(p.stat().st_size for p in volumes(out))
    assert {f["path"] for f in index["files"]} >= {"model.safetensors", "gguf/tiny-F32.gguf"}
    assert index["left_out"] == []


def test_volumes_are_one_tar_stream_an_operator_can_unpack_by_hand(cli, signed_bundle, tmp_path):
    out = export(cli, signed_bundle, tmp_path / "out")
    stream = b"".join(p.read_bytes() for p in volumes(out))  # cat tiny-v3.* | tar x
    with tarfile.open(fileobj=io.BytesIO(stream)) as tar:
        tar.extractall(tmp_path / "by-hand", filter="data")
        assert tar.getnames()[0] == "tiny-v3/sovpack.json"
    for p in signed_bundle.rglob("*"):
        if p.is_file():
            assert (tmp_path / "by-hand" / "tiny-v3" / p.relative_to(signed_bundle)).read_bytes() == p.read_bytes()


def test_the_same_bundle_always_exports_the_same_volumes(cli, signed_bundle, tmp_path):
    a, b = export(cli, signed_bundle, tmp_path / "a"), export(cli, signed_bundle, tmp_path / "b")
    assert [p.read_bytes() for p in volumes(a)] == [p.read_bytes() for p in volumes(b)]


@pytest.mark.parametrize(
    "text,size",
    [("4G", 4_000_000_000), ("700M", 700_000_000), ("4.7G", 4_700_000_000), ("4095MiB", 4095 * 2**20), ("8192", 8192)],
)
def test_volume_sizes(text, size):
    assert parse_volume_size(text) == size


@pytest.mark.parametrize("text", ["4X", "1k", "", "1.5"])
def test_bad_volume_sizes(text):
    with pytest.raises(UsageError):
        parse_volume_size(text)


def test_export_refuses_an_unsigned_bundle(cli, model_dir, tmp_path):
    assert cli("pack", model_dir, "--out", tmp_path / "b", "--name", "tiny").code == 0
    result = cli("export", tmp_path / "b", "--to", tmp_path / "out")
    assert result.code == 1 and "no signature" in result.err
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_export_refuses_a_bundle_that_does_not_match_its_inventory(cli, signed_bundle, tmp_path):
    flip_byte(signed_bundle / "model.safetensors", 100)
    result = cli("export", signed_bundle, "--to", tmp_path / "out")
    assert result.code == 1 and "model.safetensors" in result.err and "refusing to export" in result.err
    assert not list((tmp_path / "out").glob("*")) if (tmp_path / "out").exists() else True


def test_a_stream_export_stops_at_a_file_that_does_not_match_and_the_receiver_refuses(signed_bundle, store, tmp_path):
    flip_byte(signed_bundle / "model.safetensors", 100)
    sender = sovpack("export", signed_bundle, "--to", "-")
    assert sender.returncode == 1 and b"refusing to export" in sender.stderr
    assert b"model.safetensors does not match its digest in sovpack.json (shard 0, bytes from 0)" in sender.stderr
    receiver = sovpack("import", "-", "--store", store, input=sender.stdout)  # whatever got through
    assert receiver.returncode == 1 and not (store / "bundles").exists()


def test_export_refuses_a_signature_file_import_would_refuse_for_its_size(cli, signed_bundle, tmp_path, keys):
    (sig,) = (signed_bundle / "signatures").glob("*.sig")
    with open(sig, "ab") as f:  # still a valid signature (JSON allows trailing blanks), but over the 64 MiB cap
        f.write(b" " * (MAX_SIGNATURE_BYTES + 1))
    name = f"signatures/{sig.name}"
    result = cli("export", signed_bundle, "--to", tmp_path / "out")
    assert result.code == 1 and f"{name} is larger than {MAX_SIGNATURE_BYTES} bytes" in result.err
    assert not list((tmp_path / "out").glob("*")) if (tmp_path / "out").exists() else True
    verified = cli("verify", signed_bundle, "--trust", keys / "alice.pub", "--json")
    assert verified.code == 1 and json.loads(verified.out)["error"]["subject"] == name


def test_export_refuses_to_mix_with_an_existing_export(cli, signed_bundle, tmp_path):
    out = export(cli, signed_bundle, tmp_path / "out")
    result = cli("export", signed_bundle, "--to", out)
    assert result.code == 2 and "already holds an export of tiny-v3" in result.err


def test_export_replaces_the_volumes_of_an_interrupted_export_and_nothing_else(cli, signed_bundle, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    for name in ("tiny-v3.001", "tiny-v3.999", "tiny-v30.001", "tiny-v3.01", "notes.txt"):  # no index: an unfinished export
        (out / name).write_bytes(b"left over")
    export(cli, signed_bundle, out)
    assert not (out / "tiny-v3.999").exists() and (out / "tiny-v3.001").read_bytes() != b"left over"
    assert all((out / name).read_bytes() == b"left over" for name in ("tiny-v30.001", "tiny-v3.01", "notes.txt"))


def test_export_to_a_destination_that_fills_up_leaves_nothing(signed_bundle, tmp_path):
    limit = 6000  # RLIMIT_FSIZE: writing past it fails with EFBIG, as a full medium fails with ENOSPC
    result = sovpack(
        "export",
        signed_bundle,
        "--to",
        tmp_path / "out",
        "--volume-size",
        "8K",
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)),
    )
    assert result.returncode == 3, result.stderr
    assert b"tiny-v3.001" in result.stderr and b"full" in result.stderr
    assert list((tmp_path / "out").iterdir()) == []


# round trips


def test_import_installs_a_verified_read_only_bundle(cli, signed_bundle, store, tmp_path, keys):
    out = export(cli, signed_bundle, tmp_path / "out", "--key", keys / "alice.key")
    result = cli("import", out, "--store", store)
    assert result.code == 0, result.err
    assert "INSTALLED tiny v3" in result.out and "tiny-v3.002  OK" in result.out
    installed = store / "bundles" / "tiny" / "3"
    for p in signed_bundle.rglob("*"):
        if p.is_file():
            target = installed / p.relative_to(signed_bundle)
            assert target.read_bytes() == p.read_bytes() and (target.stat().st_mode & 0o222) == 0
    record = json.loads((store / "records" / "tiny" / "3.json").read_text())
    assert [a["name"] for a in record["accepted_by"]] == ["alice"] and record["threshold"] == 1
    assert record["metadata_sha256"] == hashlib.sha256((signed_bundle / "sovpack.json").read_bytes()).hexdigest()
    assert record["size"] > 0 and record["imported"] and record["source"]["kind"] == "volumes"
    assert json.loads((store / "state" / "versions.json").read_text()) == {"tiny": 3}
    assert list((store / "tmp").iterdir()) == []
    assert cli("verify", "tiny", "--store", store).code == 0


class PhaseRecorder(Progress):
    """Bytes reported per phase: what import reads, and when."""

    def __init__(self):
        self.phases: list[list] = []

    def phase(self, name, total=None):
        self.phases.append([name, total, 0])

    def advance(self, n):
        self.phases[-1][2] += n


def test_import_reads_the_volumes_once_and_verification_reads_no_file_written(signed_bundle, keys, tmp_path):
    """Each volume's SHA-256 and each file's shard digests come from one read of the stream."""
    out = tmp_path / "out"
    export_volumes(signed_bundle, out, volume_size=8192)
    archive_size = json.loads((out / "tiny-v3.index.json").read_text())["archive"]["size"]
    progress = PhaseRecorder()
    import_bundle(str(out), Store(tmp_path / "store"), load_trust([keys / "alice.pub"]), progress=progress)
    assert progress.phases == [["reading the volumes", archive_size, archive_size], ["verifying", 0, 0], ["installing", None, 0]]


def test_files_a_delta_export_left_out_are_verified_from_the_store(cli, signed_bundle, store, tmp_path, model_dir, keys):
    assert cli("import", export(cli, signed_bundle, tmp_path / "v3"), "--store", store).code == 0
    delta = export(cli, new_version(cli, tmp_path, model_dir, keys, 4), tmp_path / "delta", "--since", signed_bundle)
    left_out = sum(f["size"] for f in json.loads((delta / "tiny-v4.index.json").read_text())["left_out"])
    progress = PhaseRecorder()
    import_bundle(str(delta), Store(store), load_trust([keys / "alice.pub"]), progress=progress)
    assert progress.phases[1] == ["verifying", left_out, left_out]  # hashed from disk: they were not in the stream


def test_stream_through_a_pipe_as_for_a_data_diode(signed_bundle, store, tmp_path):
    sender = subprocess.Popen(
        [sys.executable, "-m", "sovpack", "export", signed_bundle, "--to", "-"], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    receiver = sovpack("import", "-", "--store", store, stdin=sender.stdout)
    sender.stdout.close()
    assert sender.wait() == 0 and receiver.returncode == 0, receiver.stderr
    assert b"INSTALLED tiny v3" in receiver.stdout
    assert b"exported tiny v3" in sender.stderr.read()
    assert (store / "bundles" / "tiny" / "3" / "model.safetensors").read_bytes() == (
        signed_bundle / "model.safetensors"
    ).read_bytes()
    assert list((store / "tmp").iterdir()) == []


def test_a_receiver_that_closes_the_stream_early_is_named(cli, model_dir, tmp_path, keys):
    bundle = bundle_with_big_file(cli, model_dir, tmp_path, keys, 4 * 1024 * 1024)  # more than a pipe holds
    sender = subprocess.Popen(
        [sys.executable, "-m", "sovpack", "export", bundle, "--to", "-"], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    sender.stdout.read(1000)
    sender.stdout.close()
    assert sender.wait() == 3
    assert b"the receiving end closed the stream before the export finished" in sender.stderr.read()


def test_importing_the_same_export_twice_is_harmless(cli, signed_bundle, store, tmp_path):
    out = export(cli, signed_bundle, tmp_path / "out")
    assert cli("import", out, "--store", store).code == 0
    before = store_snapshot(store)
    again = cli("import", out, "--store", store)
    assert again.code == 0 and "already installed" in again.out
    assert store_snapshot(store) == before


def test_import_with_explicit_trust_warns_that_serve_needs_store_trust(cli, signed_bundle, tmp_path, keys):
    out = export(cli, signed_bundle, tmp_path / "out")
    result = cli("import", out, "--trust", keys / "alice.pub", "--store", tmp_path / "other")
    assert result.code == 0 and "trust add" in result.out


def test_import_requires_some_trust(cli, signed_bundle, tmp_path):
    out = export(cli, signed_bundle, tmp_path / "out")
    result = cli("import", out, "--store", tmp_path / "empty")
    assert result.code == 2 and "trusts no keys" in result.err


# checking volumes


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


# what verification refuses


def test_import_of_a_bundle_that_fails_verification(cli, tmp_path, model_dir, store, keys):
    bundle = tmp_path / "by-mallory"
    assert cli("pack", model_dir, "--out", bundle, "--name", "tiny").code == 0
    assert cli("sign", bundle, "--key", keys / "mallory.key").code == 0
    out = export(cli, bundle, tmp_path / "out")
    before = store_snapshot(store)
    result = cli("import", out, "--store", store)
    assert result.code == 1 and "failed verification (threshold)" in result.err
    assert store_snapshot(store) == before and staged_bundles(store) == []
    record = audit_records(store)[-1]
    assert record["outcome"] == "refused" and record["name"] == "tiny" and "threshold" in record["reason"]


def test_verify_with_digests_computed_while_writing(signed_bundle, keys):
    """known_digests replace reading a file for its shard digests; its size is still checked on disk."""
    policy = load_trust([keys / "alice.pub"])
    digest = digest_file(signed_bundle / "model.safetensors", read_metadata(signed_bundle).shard_size)
    written = {"model.safetensors": ShardDigests(digest.size, digest.shards)}
    flip_byte(signed_bundle / "model.safetensors", digest.size - 1)  # weights, after the digests were computed
    assert not verify_bundle(signed_bundle, policy).ok
    assert verify_bundle(signed_bundle, policy, known_digests=written).ok
    other = {"model.safetensors": ShardDigests(digest.size, ("0" * 64,) * len(digest.shards))}
    report = verify_bundle(signed_bundle, policy, known_digests=other)
    assert report.failure.step == "digests" and report.failure.subject == "model.safetensors"
    assert "model.safetensors does not match its digest in sovpack.json (shard 0, bytes from 0)" in str(report.failure)
    with open(signed_bundle / "model.safetensors", "r+b") as f:
        f.truncate(digest.size - 1)
    report = verify_bundle(signed_bundle, policy, known_digests=written)
    assert report.failure.step == "digests" and "(truncated)" in str(report.failure)


def test_threshold_from_the_command_line(cli, signed_bundle, store, tmp_path, keys):
    assert cli("trust", "add", keys / "bob.pub", "--store", store).code == 0
    out = export(cli, signed_bundle, tmp_path / "out")
    result = cli("import", out, "--store", store, "--threshold", "2")
    assert result.code == 1 and "threshold not met: 1 of 2" in result.err


def test_expired_bundle(model_dir, tmp_path, keys, cli):
    bundle = tmp_path / "expiring"
    assert cli("pack", model_dir, "--out", bundle, "--name", "tiny", "--expires", "1d").code == 0
    assert cli("sign", bundle, "--key", keys / "alice.key").code == 0
    export_volumes(bundle, tmp_path / "out", volume_size=8192)
    store = Store(tmp_path / "store")
    with pytest.raises(Refused, match="expired on"):
        import_bundle(
            str(tmp_path / "out"), store, load_trust([keys / "alice.pub"]), now=datetime.now(timezone.utc) + timedelta(days=2)
        )
    assert not store.bundles_dir.exists() and store.installed() == []
    assert audit_records(store.root)[-1]["outcome"] == "refused"


def test_export_refuses_an_expired_bundle(model_dir, tmp_path, keys, cli):
    bundle = tmp_path / "expiring"
    assert cli("pack", model_dir, "--out", bundle, "--name", "tiny", "--expires", "1d").code == 0
    assert cli("sign", bundle, "--key", keys / "alice.key").code == 0
    with pytest.raises(Refused, match="expired on"):
        export_volumes(bundle, tmp_path / "out", volume_size=8192, now=datetime.now(timezone.utc) + timedelta(days=2))


def test_downgrade_is_refused_with_both_versions(cli, signed_bundle, store, tmp_path, model_dir, keys):
    assert cli("import", export(cli, signed_bundle, tmp_path / "v3"), "--store", store).code == 0
    v2 = export(cli, new_version(cli, tmp_path, model_dir, keys, 2, extra_gguf=False), tmp_path / "v2")
    before = store_snapshot(store)
    result = cli("import", v2, "--store", store)
    assert (
        result.code == 1 and "tiny v2" in result.err and "not newer than v3" in result.err and "--allow-downgrade" in result.err
    )
    assert store_snapshot(store) == before
    allowed = cli("import", v2, "--store", store, "--allow-downgrade")
    assert allowed.code == 0 and (store / "bundles" / "tiny" / "2").is_dir()
    assert json.loads((store / "state" / "versions.json").read_text()) == {"tiny": 3}


def test_same_version_with_other_contents_is_refused(cli, signed_bundle, store, tmp_path, model_dir, keys):
    assert cli("import", export(cli, signed_bundle, tmp_path / "a"), "--store", store).code == 0
    other = export(cli, new_version(cli, tmp_path, model_dir, keys, 3), tmp_path / "b")
    result = cli("import", other, "--store", store, "--allow-downgrade")
    assert result.code == 1 and "already installed with different contents" in result.err


def test_store_on_a_full_disk(cli, model_dir, store, tmp_path, keys):
    big = tmp_path / "bigmodel"
    shutil.copytree(model_dir, big)
    write_big_safetensors(big / "weights-2.safetensors", 256 * 1024)
    assert cli("pack", big, "--out", tmp_path / "bigbundle", "--name", "tiny", "--version", "5").code == 0
    assert cli("sign", tmp_path / "bigbundle", "--key", keys / "alice.key").code == 0
    out = export(cli, tmp_path / "bigbundle", tmp_path / "out", "--volume-size", "100K")
    before = store_snapshot(store)
    limit = 128 * 1024  # RLIMIT_FSIZE in the importing process: its writes beyond fail (EFBIG) as on a full disk
    result = sovpack(
        "import", out, "--store", store, preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    )
    assert result.returncode == 3, result.stderr
    assert b"weights-2.safetensors" in result.stderr and b"full" in result.stderr
    assert store_snapshot(store) == before and staged_bundles(store) == []
    again = sovpack("import", out, "--store", store)
    assert again.returncode == 0, again.stderr
    assert b"not read again" in again.stdout


# delta export


def test_delta_export_leaves_out_what_the_store_holds(cli, signed_bundle, store, tmp_path, model_dir, keys):
    v3_out = export(cli, signed_bundle, tmp_path / "v3")
    assert cli("import", v3_out, "--store", store).code == 0
    v4 = new_version(cli, tmp_path, model_dir, keys, 4)
    full = export(cli, v4, tmp_path / "v4-full")
    delta = export(cli, v4, tmp_path / "v4-delta", "--since", v3_out / "tiny-v3.index.json")
    index = json.loads((delta / "tiny-v4.index.json").read_text())
    left_out = {f["path"] for f in index["left_out"]}
    assert left_out == {
        "model.safetensors",
        "gguf/tiny-F32.gguf",
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "README.md",
        "LICENSE",
    }
    assert index["since"]["version"] == 3
    assert index["archive"]["size"] < json.loads((full / "tiny-v4.index.json").read_text())["archive"]["size"]
    result = cli("import", delta, "--store", store)
    assert result.code == 0, result.err
    assert "1 file(s) from the media, 7 already held by the store" in result.out
    for rel in left_out:
        assert (store / "bundles/tiny/4" / rel).stat().st_ino == (store / "bundles/tiny/3" / rel).stat().st_ino
    assert cli("verify", "tiny@4", "--store", store).code == 0


def test_delta_export_against_a_bundle_directory(cli, signed_bundle, tmp_path, model_dir, keys):
    v4 = new_version(cli, tmp_path, model_dir, keys, 4)
    delta = export(cli, v4, tmp_path / "delta", "--since", signed_bundle)
    assert {f["path"] for f in json.loads((delta / "tiny-v4.index.json").read_text())["left_out"]} >= {"model.safetensors"}
    v3_index = json.loads((export(cli, signed_bundle, tmp_path / "v3") / "tiny-v3.index.json").read_text())
    from_index = export(cli, v4, tmp_path / "delta-from-index", "--since", tmp_path / "v3" / "tiny-v3.index.json")
    since_bundle = json.loads((delta / "tiny-v4.index.json").read_text())["since"]
    since_index = json.loads((from_index / "tiny-v4.index.json").read_text())["since"]
    assert since_bundle == v3_index["bundle"] | {"from": "bundle"}  # the same identity, whichever --since was given
    assert since_index == v3_index["bundle"] | {"from": "index"}
    from_directory = export(cli, v4, tmp_path / "delta-from-directory", "--since", tmp_path / "v3")  # the export's directory
    assert json.loads((from_directory / "tiny-v4.index.json").read_text())["since"] == since_index


def test_delta_import_into_a_store_that_lacks_a_file(cli, signed_bundle, store, tmp_path, model_dir, keys):
    v4 = new_version(cli, tmp_path, model_dir, keys, 4)
    delta = export(cli, v4, tmp_path / "delta", "--since", signed_bundle)
    before = store_snapshot(store)
    result = cli("import", delta, "--store", store)
    assert result.code == 1
    assert "LICENSE" in result.err and "neither in" in result.err and "left out of this delta export" in result.err
    assert store_snapshot(store) == before and staged_bundles(store) == []


def test_delta_stream(cli, signed_bundle, store, tmp_path, model_dir, keys):
    assert cli("import", export(cli, signed_bundle, tmp_path / "v3"), "--store", store).code == 0
    v4 = new_version(cli, tmp_path, model_dir, keys, 4)
    stream = sovpack("export", v4, "--to", "-", "--since", signed_bundle)
    assert stream.returncode == 0 and b"left out" in stream.stderr
    result = sovpack("import", "-", "--store", store, input=stream.stdout)
    assert result.returncode == 0, result.stderr


# untrusted streams


def tar_stream(members: list[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buffer.getvalue()


def member(name: str, data: bytes = b"", kind: bytes = tarfile.REGTYPE, link: str = "") -> tuple[tarfile.TarInfo, bytes | None]:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, link
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    return info, data if kind == tarfile.REGTYPE else None


@pytest.mark.parametrize(
    "evil,message",
    [
        (member("tiny-v3/gguf", kind=tarfile.SYMTYPE, link="/etc"), "is a symbolic link"),
        (member("tiny-v3/x", kind=tarfile.LNKTYPE, link="tiny-v3/sovpack.json"), "is a hard link"),
        (member("tiny-v3/dev", kind=tarfile.CHRTYPE), "is a device"),
        (member("tiny-v3/../escape", b"x"), "unsafe path"),
        (member("elsewhere/file", b"x"), "outside the bundle directory"),
        (member("tiny-v3/unlisted.txt", b"x"), "not listed in the bundle's sovpack.json"),
        (member("tiny-v3/config.json", b"x" * 5), "lists"),
    ],
)
def test_untrusted_stream_members_are_refused_before_anything_is_written(signed_bundle, tmp_path, keys, evil, message):
    metadata = (signed_bundle / "sovpack.json").read_bytes()
    stream = tar_stream([member("tiny-v3/sovpack.json", metadata), evil])
    store = Store(tmp_path / "store")
    with pytest.raises(Refused, match=message):
        import_bundle("-", store, load_trust([keys / "alice.pub"]), stdin=io.BytesIO(stream))
    assert store.installed() == [] and list(store.tmp_dir.iterdir()) == []
    assert not (tmp_path / "escape").exists()


def test_a_stream_cut_short(signed_bundle, tmp_path, keys):
    stream = sovpack("export", signed_bundle, "--to", "-").stdout
    store = Store(tmp_path / "store")
    with pytest.raises(Refused, match="cut short|missing|neither"):
        import_bundle("-", store, load_trust([keys / "alice.pub"]), stdin=io.BytesIO(stream[: len(stream) // 2]))
    assert store.installed() == []


@pytest.mark.parametrize("member_path", ["sovpack.json", "model.safetensors"])
def test_a_stream_cut_inside_a_member_is_named_as_a_stream(signed_bundle, store, member_path):
    stream = sovpack("export", signed_bundle, "--to", "-").stdout
    with tarfile.open(fileobj=io.BytesIO(stream)) as tar:
        cut = tar.getmember(f"tiny-v3/{member_path}").offset_data + 10
    result = sovpack("import", "-", "--store", store, input=stream[:cut])
    assert result.returncode == 1 and not (store / "bundles").exists()
    assert re.search(rf"the stream ends inside (tiny-v3/)?{member_path} \(10 of \d+ bytes\)".encode(), result.stderr)
    assert b"the stream was cut short" in result.stderr and b"volume" not in result.stderr


def test_a_stream_that_is_not_a_bundle(tmp_path, keys):
    with pytest.raises(Refused, match="does not hold a tar stream|not a sovpack export"):
        import_bundle("-", Store(tmp_path / "s"), load_trust([keys / "alice.pub"]), stdin=io.BytesIO(b"hello" * 1000))


def test_import_of_a_directory_without_index(cli, store, tmp_path):
    (tmp_path / "empty").mkdir()
    result = cli("import", tmp_path / "empty", "--store", store)
    assert result.code == 2 and "holds no export index" in result.err


def test_a_path_that_is_not_there_gets_the_advice_of_its_command(cli, signed_bundle, store, tmp_path):
    missing = tmp_path / "missing.index.json"
    imported = cli("import", missing, "--store", store)
    assert imported.code == 2 and f"{missing} does not exist" in imported.err
    assert "- for a stream on standard input" in imported.err
    checked = cli("check-volumes", missing)
    assert checked.code == 2 and f"{missing} does not exist" in checked.err and "standard input" not in checked.err
    assert "give the directory holding the volumes, or their index file" in checked.err
    for since in (tmp_path / "missing.json", tmp_path / "missing"):
        exported = cli("export", signed_bundle, "--to", tmp_path / "out", "--since", since)
        assert exported.code == 2 and str(since) in exported.err and "standard input" not in exported.err
        assert "give --since the index file (*.index.json) of an earlier export, or the earlier bundle directory" in exported.err


def test_index_signed_with_a_key_from_the_command_line(cli, signed_bundle, tmp_path, keys):
    out = export(cli, signed_bundle, tmp_path / "out", "--key", keys / "alice.key")
    result = cli("check-volumes", out, "--trust", keys / "alice.pub")
    assert result.code == 0 and "index signed by alice" in result.out


def test_an_index_signed_by_an_untrusted_key_is_imported_with_a_warning(cli, signed_bundle, store, tmp_path, keys):
    out = export(cli, signed_bundle, tmp_path / "out", "--key", keys / "mallory.key")
    result = cli("import", out, "--store", store, "--trust", keys / "alice.pub")
    assert result.code == 0, result.err
    assert (
        "warning: index signed by key" in result.out and "not in the trust set (signature not checked)" in result.out
    )  # the bundle's own signers still decide


# a real small disk (tmpfs), where this machine allows mounting one


@pytest.fixture
def small_disk(tmp_path):
    mount = tmp_path / "disk"
    mount.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(mount)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root); RLIMIT_FSIZE tests cover the write failures")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def bundle_with_big_file(cli, model_dir, tmp_path, keys, size: int) -> Path:
    write_big_safetensors(model_dir / "weights-2.safetensors", size)
    bundle = tmp_path / "bigbundle"
    assert cli("pack", model_dir, "--out", bundle, "--name", "tiny", "--version", "5").code == 0
    assert cli("sign", bundle, "--key", keys / "alice.key").code == 0
    return bundle


def test_export_checks_free_space_before_writing(cli, model_dir, tmp_path, keys, small_disk):
    bundle = bundle_with_big_file(cli, model_dir, tmp_path, keys, 1024 * 1024)
    result = cli("export", bundle, "--to", small_disk)
    assert result.code == 3 and "bytes free but the export of tiny-v5 needs" in result.err
    assert list(small_disk.iterdir()) == []


def test_import_checks_free_space_before_reassembling(cli, model_dir, tmp_path, keys, small_disk):
    out = export(cli, bundle_with_big_file(cli, model_dir, tmp_path, keys, 1024 * 1024), tmp_path / "out", "--volume-size", "4M")
    store = small_disk / "store"
    assert cli("trust", "add", keys / "alice.pub", "--store", store).code == 0
    before = store_snapshot(store)
    result = cli("import", out, "--store", store)
    assert result.code == 3 and "bytes free but importing tiny v5 needs" in result.err
    assert store_snapshot(store) == before and staged_bundles(store) == []


def test_disk_filling_up_during_reassembly(cli, model_dir, tmp_path, keys, small_disk):
    out = export(cli, bundle_with_big_file(cli, model_dir, tmp_path, keys, 300 * 1024), tmp_path / "out", "--volume-size", "4M")
    store = small_disk / "store"
    assert cli("trust", "add", keys / "alice.pub", "--store", store).code == 0
    (store / "tmp").mkdir()
    needed = json.loads((out / "tiny-v5.index.json").read_text())["bundle"]["size"]
    filler = small_disk / "filler"
    room = needed + 8192  # passes the free-space check, but the many small files each take a whole page
    filler.write_bytes(b"\0" * ((shutil.disk_usage(small_disk).free - room) // 4096 * 4096))
    before = store_snapshot(store)
    result = cli("import", out, "--store", store)
    assert result.code == 3 and "No space left on device (the store's disk is full" in result.err, result.err
    assert "cannot write" in result.err and "into the store's staging directory" in result.err
    assert store_snapshot(store) == before and staged_bundles(store) == []
    filler.unlink()
    again = cli("import", out, "--store", store)
    assert again.code == 0, again.err


# failure paths: each names the file or volume at fault, with the documented exit code


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


def test_an_unreadable_volume_is_named_as_damaged(cli, signed_bundle, store, tmp_path):
    out = export(cli, signed_bundle, tmp_path / "out")
    (out / "tiny-v3.002").chmod(0)
    checked = sovpack("check-volumes", out, **unprivileged())
    assert checked.returncode == 1 and b"tiny-v3.002  DAMAGED  unreadable: Permission denied" in checked.stdout
    before = store_snapshot(store)
    imported = sovpack("import", out, "--store", store, **unprivileged())  # read as one stream: the reader meets it
    assert imported.returncode == 1, imported.stderr
    assert b"tiny-v3.002  DAMAGED  unreadable: Permission denied" in imported.stdout
    assert b"tiny-v3.002 damaged (unreadable: Permission denied)" in imported.stderr
    assert store_snapshot(store) == before and staged_bundles(store) == []
    (out / "tiny-v3.002").chmod(0o644)
    again = sovpack("import", out, "--store", store, **unprivileged())
    assert again.returncode == 0 and b"tiny-v3.002  OK\n" in again.stdout  # the other volumes: from the journal


def test_a_second_import_of_the_same_export_is_refused_while_the_first_holds_the_lock(cli, signed_bundle, store, tmp_path):
    out = export(cli, signed_bundle, tmp_path / "out")
    job = store / "tmp" / f"import-{hashlib.sha256((out / 'tiny-v3.index.json').read_bytes()).hexdigest()[:16]}"
    job.mkdir(parents=True)
    with open(job / "lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # what a running import holds
        result = sovpack("import", out, "--store", store)
    assert result.returncode == 3 and f"it holds {job / 'lock'}".encode() in result.stderr.replace(b"\n", b"")
    assert b"another sovpack import of this export is running" in result.stderr
    assert not (store / "bundles").exists()
    assert sovpack("import", out, "--store", store).returncode == 0  # once it is released


def edit_index(index: Path, change) -> None:
    doc = json.loads(index.read_text())
    change(doc)
    index.write_text(json.dumps(doc))


@pytest.mark.parametrize(
    "damage,message",
    [
        (
            lambda i: i.write_text('{"format": "sovpack-export", '),
            "tiny-v3.index.json is not a sovpack export index (invalid JSON",
        ),
        (
            lambda i: edit_index(i, lambda d: d.update(format_version=2)),
            "tiny-v3.index.json: format 'sovpack-export' version 2 is not",
        ),
        (
            lambda i: edit_index(i, lambda d: d["volumes"][1].update(file="tiny-v3.007")),
            "tiny-v3.index.json: volume 2 is named 'tiny-v3.007', expected 'tiny-v3.002'",
        ),
        (
            lambda i: edit_index(i, lambda d: d["archive"].update(size=d["archive"]["size"] + 1)),
            "tiny-v3.index.json: the archive size",
        ),
        (
            lambda i: edit_index(i, lambda d: d["volumes"][0].update(sha256="0" * 63)),
            "tiny-v3.index.json: field 'volumes[0].sha256' is not a SHA-256 hex digest",
        ),
        (
            lambda i: i.rename(i.with_name("tiny-v4.index.json")),
            "tiny-v4.index.json describes tiny v3, whose index is named tiny-v3.index.json",
        ),
    ],
    ids=["invalid-json", "format-version", "volume-name", "archive-size", "digest", "renamed"],
)
def test_a_malformed_index_is_refused_naming_it(cli, signed_bundle, store, tmp_path, damage, message):
    out = export(cli, signed_bundle, tmp_path / "out")
    damage(out / "tiny-v3.index.json")
    for command in (["check-volumes", out], ["import", out, "--store", store]):
        result = cli(*command)
        assert result.code == 1 and message in result.err, (command, result.err)
    assert not (store / "bundles").exists()


class ShrinkWhenWriting(Progress):
    """Truncates a file of the bundle once export has checked it and starts writing the volumes."""

    def __init__(self, path: Path):
        self.path = path

    def phase(self, name: str, total: int | None = None) -> None:
        if name == "writing volumes":
            with open(self.path, "r+b") as f:
                f.truncate(10)


def test_a_file_that_shrinks_while_it_is_exported_stops_the_export(signed_bundle, tmp_path):
    with pytest.raises(Refused, match=r"^model.safetensors shrank while it was being exported \(10 of \d+ bytes\)") as refused:
        export_volumes(
            signed_bundle, tmp_path / "out", volume_size=8192, progress=ShrinkWhenWriting(signed_bundle / "model.safetensors")
        )
    assert refused.value.exit_code == 1 and list((tmp_path / "out").iterdir()) == []


def stream_import(store: Path, stream: bytes) -> subprocess.CompletedProcess:
    result = sovpack("import", "-", "--store", store, input=stream)
    assert not (store / "bundles").exists() and staged_bundles(store) == []
    return result


def test_a_member_that_appears_twice_is_refused(signed_bundle, store):
    metadata, config = (signed_bundle / "sovpack.json").read_bytes(), (signed_bundle / "config.json").read_bytes()
    stream = tar_stream(
        [member("tiny-v3/sovpack.json", metadata), member("tiny-v3/config.json", config), member("tiny-v3/config.json", config)]
    )
    result = stream_import(store, stream)
    assert result.returncode == 1 and b"tiny-v3/config.json appears twice in the stream" in result.stderr


@pytest.mark.parametrize(
    "name,size,message",
    [
        ("tiny-v3/signatures/notes.txt", 5, "tiny-v3/signatures/notes.txt in the stream does not belong in signatures/"),
        ("tiny-v3/signatures/deep/a.sig", 5, "tiny-v3/signatures/deep/a.sig in the stream does not belong in signatures/"),
        (
            "tiny-v3/signatures/big.sig",
            MAX_SIGNATURE_BYTES + 1,
            f"tiny-v3/signatures/big.sig in the stream is larger than {MAX_SIGNATURE_BYTES} bytes; not a signature",
        ),
    ],
)
def test_what_does_not_belong_in_signatures_is_refused_before_it_is_read(signed_bundle, store, name, size, message):
    info = tarfile.TarInfo(name)
    info.size = size
    header = info.tobuf(tarfile.PAX_FORMAT)  # the header alone: refused before a byte of its data is read
    metadata = tar_stream([member("tiny-v3/sovpack.json", (signed_bundle / "sovpack.json").read_bytes())])
    stream = metadata[: -2 * tarfile.BLOCKSIZE].rstrip(b"\0")
    stream += bytes(-len(stream) % tarfile.BLOCKSIZE) + header
    result = stream_import(store, stream)
    assert result.returncode == 1 and message.encode() in result.stderr.replace(b"\n", b"")


def test_a_tar_header_larger_than_the_cap_is_refused(store):
    info = tarfile.TarInfo("././@PaxHeader")
    info.type, info.size = tarfile.XHDTYPE, 2 * MAX_HEADER_BYTES  # tarfile would read it whole into memory
    result = stream_import(store, info.tobuf(tarfile.USTAR_FORMAT) + bytes(4 * tarfile.BLOCKSIZE))
    assert result.returncode == 1
    assert f"a tar header in the stream claims {2 * MAX_HEADER_BYTES} bytes; refused as malformed".encode() in result.stderr
