"""Whole-file and shard digests agree with hashlib, and shard checks find every damaged piece."""

from __future__ import annotations

import hashlib
import os

import pytest

from sovpack.common.hashing import MIB, Digester, FileDigest, check_shards, digest_file, shard_jobs

SHARD = MIB


@pytest.mark.parametrize("size", [0, 1, SHARD - 1, SHARD, SHARD + 1, 3 * SHARD + 12345])
def test_digests_match_hashlib(tmp_path, size):
    data = os.urandom(size)
    path = tmp_path / "f"
    path.write_bytes(data)
    digest = digest_file(path, SHARD)
    assert digest.size == size
    assert digest.sha256 == hashlib.sha256(data).hexdigest()
    expected_shards = [hashlib.sha256(data[i : i + SHARD]).hexdigest() for i in range(0, max(size, 1), SHARD)]
    assert list(digest.shards) == expected_shards


def test_digester_is_independent_of_chunking():
    data = os.urandom(2 * SHARD + 777)
    whole = Digester(SHARD)
    whole.update(data)
    pieces = Digester(SHARD)
    for i in range(0, len(data), 4099):
        pieces.update(data[i : i + 4099])
    assert whole.finish() == pieces.finish()


def test_check_shards_reports_each_damaged_shard(tmp_path):
    path = tmp_path / "f"
    data = bytearray(os.urandom(4 * SHARD))
    path.write_bytes(data)
    digest = digest_file(path, SHARD)
    assert check_shards(shard_jobs("f", path, digest, SHARD)) == []
    data[SHARD + 5] ^= 1
    data[3 * SHARD] ^= 1
    path.write_bytes(data)
    damaged = check_shards(shard_jobs("f", path, digest, SHARD))
    assert [(m.path, m.index, m.offset) for m in damaged] == [("f", 1, SHARD), ("f", 3, 3 * SHARD)]


def test_check_shards_catches_a_short_file(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(os.urandom(2 * SHARD))
    digest = digest_file(path, SHARD)
    path.write_bytes(path.read_bytes()[: SHARD + 10])
    damaged = check_shards(shard_jobs("f", path, FileDigest(digest.size, digest.sha256, digest.shards), SHARD))
    assert [m.index for m in damaged] == [1]
