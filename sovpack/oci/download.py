"""One blob downloaded into a partial file, checked as it streams, continued where an earlier attempt stopped.

The network reads stay on the calling thread; the bytes go, in blocks of a few MiB, to one thread
beside it that writes them to the partial file and computes their shard digests (one SHA-256 per
`shard_size` piece), from the very bytes written. Those are the digests the signed sovpack.json
lists for the file, and the ones import's verification takes for a file hashed as it was written
(`known_digests`): no byte is hashed twice. They cover every byte, so they check the blob as its
whole SHA-256 (the blob's digest, which the manifest must list as the signed one) would.
Bytes an earlier attempt left are hashed again from disk before the download continues after them
with `Range`. A blob whose bytes do not match the signed shard digests is deleted and refused,
naming the first shard that differs; a network failure keeps the partial file for the next attempt
(in this run, or the next `pull`).
"""

from __future__ import annotations

import os
import time
from collections import deque
from concurrent.futures import Future
from pathlib import Path

import httpx2

from sovpack.common.hashing import READ_SIZE, FileDigest, ShardDigests, ShardHasher, compare_shards
from sovpack.common.pipeline import Lane, wait_all
from sovpack.common.progress import Progress
from sovpack.errors import Failure, Refused
from sovpack.oci.client import RegistryClient
from sovpack.oci.layout import Layer

MAX_ATTEMPTS = 3  # in a row without progress
RETRY_WAIT = 0.5


class _ShortBody(Exception):
    pass


def download_blob(
    client: RegistryClient, layer: Layer, signed: FileDigest, partial: Path, shard_size: int, progress: Progress, where: str
) -> tuple[ShardDigests, bool]:
    """Download `layer` into `partial` (continuing what is there), checked against the `signed` digests of its file;
    its shard digests, and whether earlier bytes were kept."""
    failures = 0
    with _HashedFile(partial, layer, signed, shard_size, progress) as target:
        resumed = target.offset > 0
        while target.offset < layer.size:
            before = target.offset
            try:
                _transfer(client, layer, target, where)
            except (httpx2.TransportError, _ShortBody) as e:
                if isinstance(e, httpx2.ConnectError) and "CERTIFICATE_VERIFY_FAILED" in str(e):
                    raise
                resumed = resumed or target.offset > 0
                failures = 1 if target.offset > before else failures + 1
                if failures >= MAX_ATTEMPTS:
                    raise Failure(
                        f"downloading {layer.path} ({layer.digest}) from {client.ref.registry} failed {failures} times in a row "
                        f"({e or type(e).__name__}); {target.offset} of {layer.size} bytes are kept: run the same pull again "
                        "to continue from there"
                    ) from None
                time.sleep(RETRY_WAIT * 2 ** (failures - 1))
        return target.finish(where), resumed


def _transfer(client: RegistryClient, layer: Layer, target: _HashedFile, where: str) -> None:
    """One GET from `target.offset` to the end of the blob, streamed into `target`."""
    with client.open_blob(layer.digest, target.offset) as response:
        if response.status_code == 404:
            raise Refused(
                f"{where} lists {layer.path} as blob {layer.digest}, but the registry {client.ref.registry} does not hold "
                f"that blob: the artifact is incomplete; push it again"
            )
        client.check(response, f"the download of {layer.path} ({layer.digest})", 200, 206)
        if target.offset and response.status_code == 200:
            target.restart()  # the registry ignored the range: take the whole blob again
        try:
            for chunk in response.iter_raw():
                target.write(chunk)
        finally:
            target.settle()  # every byte received is on disk before a retry asks for what follows
    if target.offset < layer.size:
        raise _ShortBody(f"the answer ended after {target.offset} of {layer.size} bytes")


class _HashedFile:
    MAX_QUEUED = 4  # blocks waiting for the writing thread: a network faster than the disk waits, memory stays bounded

    def __init__(self, path: Path, layer: Layer, signed: FileDigest, shard_size: int, progress: Progress):
        self.path, self.layer, self.signed, self.shard_size, self.progress = path, layer, signed, shard_size, progress
        self.offset = 0  # bytes received (written, or queued for writing)
        self.file = None
        self.lane: Lane | None = None
        self.queued: deque[Future] = deque()
        self.pending: list[bytes] = []
        self.pending_size = 0

    def __enter__(self) -> _HashedFile:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(self.path, "ab", buffering=0)
        self._start()
        kept = self.file.seek(0, os.SEEK_END)
        if kept > self.layer.size:
            self.restart()
        elif kept:
            self._rehash_prefix(kept)
        return self

    def _start(self) -> None:
        self.hasher = ShardHasher(self.shard_size)
        self.lane = Lane("pull-write-sha256")
        self.queued.clear()

    def _rehash_prefix(self, length: int) -> None:
        with open(self.path, "rb") as prefix:
            while self.offset < length and (block := prefix.read(min(READ_SIZE, length - self.offset))):
                self._queue(self.hasher.update, block)
                self.offset += len(block)
        self.progress.advance(self.offset)

    def _queue(self, fn, block: bytes) -> None:
        if len(self.queued) >= self.MAX_QUEUED:
            self.queued.popleft().result()
        self.queued.append(self.lane.submit(fn, block))

    def _write_and_hash(self, block: bytes) -> None:
        view = memoryview(block)
        while view:
            view = view[self.file.write(view) :]
        self.hasher.update(block)

    def write(self, chunk: bytes) -> None:
        if self.offset + len(chunk) > self.layer.size:
            raise Refused(
                f"{self.layer.path}: the registry sent more than the {self.layer.size} bytes of blob {self.layer.digest}"
            )
        self.offset += len(chunk)
        self.pending.append(chunk)
        self.pending_size += len(chunk)
        if self.pending_size >= READ_SIZE:
            self._hand_over()
        self.progress.advance(len(chunk))

    def _hand_over(self) -> None:
        if self.pending:
            self._queue(self._write_and_hash, b"".join(self.pending))
            self.pending, self.pending_size = [], 0

    def settle(self) -> None:
        """Write what is received and wait until the thread has written and hashed it."""
        self._hand_over()
        wait_all(list(self.queued))
        self.queued.clear()

    def restart(self) -> None:
        self.pending, self.pending_size = [], 0
        self.lane.close(cancel=True)
        self.file.seek(0)
        self.file.truncate()
        self.progress.advance(-self.offset)
        self.offset = 0
        self._start()

    def finish(self, where: str) -> ShardDigests:
        self.settle()
        self.lane.close()
        os.fsync(self.file.fileno())
        self.file.close()
        found = self.hasher.finish()
        mismatch = compare_shards(self.layer.path, self.signed, found, self.shard_size)
        if mismatch is not None:
            self.path.unlink(missing_ok=True)
            raise Refused(
                f"{self.layer.path}: the registry served blob {self.layer.digest} of {where} with other bytes than those "
                f"signed: shard {mismatch.index + 1} of {len(self.signed.shards)} (from byte {mismatch.offset}) does not hash "
                f"to its signed digest ({found.size} of {self.signed.size} bytes received); the blob is damaged or was "
                "altered in the registry, and nothing of it was kept"
            )
        return found

    def __exit__(self, *exc) -> None:
        if self.lane is not None:
            self.lane.close(cancel=True)
        if self.file is not None and not self.file.closed:
            self.file.close()
