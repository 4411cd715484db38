"""import from volumes: round trips, what verification refuses, rollback, full disks, locks, failure paths."""

from __future__ import annotations

import fcntl
import hashlib
import json
import resource
import shutil
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from helpers import (
    audit_records,
    bundle_with_big_file,
    export,
    flip_byte,
    new_version,
    sovpack,
    staged_bundles,
    store_snapshot,
    unprivileged,
    write_big_safetensors,
)

from sovpack.bundle.directory import read_metadata
from sovpack.bundle.trust import load_trust
from sovpack.bundle.verify import verify_bundle
from sovpack.common.hashing import ShardDigests, digest_file
from sovpack.common.progress import Progress
from sovpack.errors import Refused
from sovpack.store.store import Store
from sovpack.transfer.export import export_volumes
from sovpack.transfer.import_ import import_bundle


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
    (tmp_path / "empty").mkdir()
    result = cli("import", out, "--store", tmp_path / "empty")
    assert result.code == 2 and "trusts no keys" in result.err


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
