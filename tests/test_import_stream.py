"""import from one stream (a data diode): untrusted tar members, cut streams, caps."""

from __future__ import annotations

import io
import re
import subprocess
import tarfile
from pathlib import Path

import pytest
from helpers import sovpack, staged_bundles

from sovpack.bundle.signature import MAX_SIGNATURE_BYTES
from sovpack.bundle.trust import load_trust
from sovpack.errors import Refused
from sovpack.store.store import Store
from sovpack.transfer.archive import MAX_HEADER_BYTES
from sovpack.transfer.import_ import import_bundle


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
