"""export (volumes, streams, delta exports) through the real command line, and its bad inputs."""

from __future__ import annotations

import hashlib
import io
import json
import resource
import tarfile
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from helpers import bundle_with_big_file, export, flip_byte, new_version, sovpack, staged_bundles, store_snapshot, volumes

from sovpack.bundle.signature import MAX_SIGNATURE_BYTES
from sovpack.common.progress import Progress
from sovpack.errors import Refused, UsageError
from sovpack.transfer.export import export_volumes
from sovpack.transfer.index import parse_volume_size


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


def test_export_refuses_an_expired_bundle(model_dir, tmp_path, keys, cli):
    bundle = tmp_path / "expiring"
    assert cli("pack", model_dir, "--out", bundle, "--name", "tiny", "--expires", "1d").code == 0
    assert cli("sign", bundle, "--key", keys / "alice.key").code == 0
    with pytest.raises(Refused, match="expired on"):
        export_volumes(bundle, tmp_path / "out", volume_size=8192, now=datetime.now(timezone.utc) + timedelta(days=2))


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


def test_export_checks_free_space_before_writing(cli, model_dir, tmp_path, keys, small_disk):
    bundle = bundle_with_big_file(cli, model_dir, tmp_path, keys, 1024 * 1024)
    result = cli("export", bundle, "--to", small_disk)
    assert result.code == 3 and "bytes free but the export of tiny-v5 needs" in result.err
    assert list(small_disk.iterdir()) == []


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
