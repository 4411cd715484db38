"""Bytes read once and handed to threads: buffers reused only when their readers are done; shard digests of a stream."""

from __future__ import annotations

import errno
import fcntl
import io
import os
import threading

import pytest

from sovpack.common import pipeline
from sovpack.common.hashing import MIB, Digester, ShardDigests, ShardHasher, compare_shards
from sovpack.common.pipeline import ALIGN, BufferRing, DirectFile, Lane
from sovpack.errors import Failure
from sovpack.transfer.media import ConcatenatedReader
from sovpack.transfer.reassembly import StagedFiles

SHARD = MIB


def test_a_buffer_is_reused_only_after_every_task_reading_it_has_finished():
    ring, lane, release = BufferRing(count=2, size=16), Lane("test"), threading.Event()
    first = ring.take()
    first[:4] = b"keep"
    seen = []
    ring.hold(lane.submit(lambda view: (release.wait(5), seen.append(bytes(view[:4]))), first))
    ring.take()  # the other buffer: free
    threading.Timer(0.05, release.set).start()
    again = ring.take()  # the first buffer again: waits for the task
    assert seen == [b"keep"] and again.obj is first.obj
    lane.close()


def test_the_error_of_a_task_comes_back_when_the_ring_comes_round_to_its_buffer():
    ring, lane = BufferRing(count=2, size=16), Lane("test")
    ring.take()
    ring.hold(lane.submit(lambda: 1 / 0))
    ring.take()
    with pytest.raises(ZeroDivisionError):
        ring.take()
    lane.close()


@pytest.mark.parametrize("size", [0, 1, SHARD, 3 * SHARD + 12345])
def test_shard_digests_of_a_stream_are_those_of_the_file(size):
    data = os.urandom(size)
    whole = Digester(SHARD)
    whole.update(data)
    streamed = ShardHasher(SHARD)
    for i in range(0, len(data), 4099):
        streamed.update(data[i : i + 4099])
    assert streamed.finish() == ShardDigests(size, whole.finish().shards)


def test_compare_shards_names_the_first_shard_that_differs():
    data = bytearray(os.urandom(3 * SHARD))
    expected = Digester(SHARD)
    expected.update(data)
    expected = expected.finish()
    data[2 * SHARD + 7] ^= 1
    found = ShardHasher(SHARD)
    found.update(data)
    found = found.finish()
    mismatch = compare_shards("f", expected, found, SHARD)
    assert (mismatch.path, mismatch.index, mismatch.offset) == ("f", 2, 2 * SHARD)
    short = ShardHasher(SHARD)
    short.update(data[:SHARD])
    assert compare_shards("f", expected, short.finish(), SHARD).index == 1
    assert compare_shards("f", expected, ShardDigests(expected.size, expected.shards), SHARD) is None


def _direct_file(path, ring, lane):
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    return DirectFile(path, fd, ring, lane, threading.Event())


@pytest.mark.parametrize("direct_io", [True, False], ids=["O_DIRECT", "no O_DIRECT on this platform"])
@pytest.mark.parametrize("size", [0, 1, ALIGN - 1, ALIGN, 4 * MIB, 4 * MIB + 1, 9 * MIB + 4097])
def test_a_direct_file_holds_exactly_the_bytes_given_whatever_their_alignment(tmp_path, monkeypatch, size, direct_io):
    if not direct_io:
        monkeypatch.setattr(pipeline, "O_DIRECT", 0)
    real_pwrite, ends = os.pwrite, [0]

    def pwrite(fd, data, offset):  # a medium may not take a byte past the end (FAT32 at 4 GiB - 1): no padding
        ends.append(offset + len(data))
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", pwrite)
    data = os.urandom(size)
    ring, lane = BufferRing(count=2, size=4 * MIB), Lane("write")
    f = _direct_file(tmp_path / "f", ring, lane)
    for i in range(0, size, 999_983):  # pieces that leave every block boundary unaligned
        f.write(data[i : i + 999_983])
    f.close().result()
    ring.wait()
    lane.close()
    assert (tmp_path / "f").read_bytes() == data and max(ends) == size


def test_a_file_system_that_refuses_an_aligned_write_gets_it_through_the_page_cache(tmp_path, monkeypatch):
    real_pwrite, refused = os.pwrite, []

    def pwrite(fd, data, offset):
        if fcntl.fcntl(fd, fcntl.F_GETFL) & pipeline.O_DIRECT:
            refused.append(offset)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", pwrite)
    data = os.urandom(5 * MIB + 7)
    ring, lane = BufferRing(count=2, size=4 * MIB), Lane("write")
    f = _direct_file(tmp_path / "f", ring, lane)
    if not f.direct:
        pytest.skip(f"the file system of {tmp_path} has no O_DIRECT: nothing to fall back from")
    f.write(data)
    f.close().result()
    lane.close()
    assert (tmp_path / "f").read_bytes() == data
    assert refused == [0] and not f.direct  # refused once, then through the page cache


def test_a_staged_file_is_hashed_from_the_bytes_written_into_it(tmp_path):
    data = os.urandom(9 * MIB + 5)  # three blocks, the last one padded and cut back
    files = StagedFiles(tmp_path / "ok")
    files.copy("w", len(data), ConcatenatedReader(stream=io.BytesIO(data)), SHARD)
    expected = Digester(SHARD)
    expected.update(data)
    assert files.finish() == {"w": ShardDigests(len(data), expected.finish().shards)}
    assert (tmp_path / "ok" / "w").read_bytes() == data


def test_the_future_close_returns_reports_a_failed_write(tmp_path, monkeypatch):
    def fail(*args):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "pwrite", fail)
    ring, lane = BufferRing(count=2, size=4 * MIB), Lane("write")
    f = _direct_file(tmp_path / "f", ring, lane)
    f.write(os.urandom(5 * MIB))
    with pytest.raises(OSError, match="Input/output error") as failed:
        f.close().result()
    assert failed.value.filename == str(tmp_path / "f")
    lane.close()


def test_a_write_the_file_system_takes_nothing_of_fails_instead_of_spinning(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "pwrite", lambda fd, data, offset: 0)
    ring, lane = BufferRing(count=2, size=4 * MIB), Lane("write")
    f = _direct_file(tmp_path / "f", ring, lane)
    f.write(b"x" * 10)
    with pytest.raises(OSError, match="accepted no byte"):
        f.close().result()
    lane.close()


@pytest.mark.parametrize("failing", ["pwrite", "fsync"])
def test_a_staged_file_whose_write_or_flush_fails_is_reported_with_the_disk_error(tmp_path, monkeypatch, failing):
    def fail(*args):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, failing, fail)
    data = os.urandom(5 * MIB)
    files = StagedFiles(tmp_path / "bad")
    files.copy("w", len(data), ConcatenatedReader(stream=io.BytesIO(data)), SHARD)
    with pytest.raises(Failure, match=r"cannot write w into the store's staging directory .*/bad: Input/output error$"):
        files.finish()


def test_a_write_that_fails_while_the_stream_is_still_read_names_the_file_it_was_for(tmp_path, monkeypatch):
    def fail(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "pwrite", fail)
    files = StagedFiles(tmp_path / "full")
    data = os.urandom(1000)
    files.copy("first", 1000, ConcatenatedReader(stream=io.BytesIO(data)), SHARD)
    big = os.urandom(40 * MIB)  # more blocks than the ring has: it comes round to the failed ones
    with pytest.raises(
        Failure,
        match=r"cannot write first into the store's staging directory .*: No space left on device \(the store's disk is full",
    ):
        files.copy("second", len(big), ConcatenatedReader(stream=io.BytesIO(big)), SHARD)
    files.abort()
