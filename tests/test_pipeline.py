"""Bytes read once and handed to threads: buffers reused only when their readers are done; shard digests of a stream."""

from __future__ import annotations

import errno
import io
import os
import threading

import pytest

from sovpack import pipeline
from sovpack.errors import Failure
from sovpack.hashing import MIB, Digester, ShardDigests, ShardHasher, compare_shards
from sovpack.pipeline import BufferRing, Lane
from sovpack.staging import StagedFiles
from sovpack.volume_io import ConcatenatedReader

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


def test_a_staged_file_is_hashed_from_the_bytes_written_and_a_failed_flush_is_not_lost(tmp_path, monkeypatch):
    data = os.urandom(5 * MIB)  # two chunks: the first one is flushed while the second is written
    monkeypatch.setattr(pipeline, "FLUSH_STEP", 1)
    flushed = []
    monkeypatch.setattr(os, "fdatasync", lambda fd: flushed.append(fd))
    files = StagedFiles(tmp_path / "ok")
    files.copy("w", len(data), ConcatenatedReader(stream=io.BytesIO(data)), SHARD)
    expected = Digester(SHARD)
    expected.update(data)
    assert files.finish() == {"w": ShardDigests(len(data), expected.finish().shards)}
    assert (tmp_path / "ok" / "w").read_bytes() == data and flushed

    def failing(fd):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fdatasync", failing)  # Linux reports a writeback error once: the final fsync may not see it
    files = StagedFiles(tmp_path / "bad")
    files.copy("w", len(data), ConcatenatedReader(stream=io.BytesIO(data)), SHARD)
    with pytest.raises(Failure, match="cannot flush the staged bundle to the store's disk: Input/output error"):
        files.finish()
