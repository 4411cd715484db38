"""One blob downloaded into a partial file, hashed as it streams, continued where an earlier attempt stopped.

The whole-file SHA-256 (the blob's digest, which is the file's signed SHA-256) and the shard digests
are computed on a thread beside the network reads, from the very bytes written. Bytes an earlier
attempt left are hashed again from disk before the download continues after them with `Range`.
A blob whose bytes do not hash to its digest is deleted and refused; a network failure keeps the
partial file for the next attempt (in this run, or the next `pull`).
"""

from __future__ import annotations

import os
import time
from collections import deque
from concurrent.futures import Future
from pathlib import Path

import httpx2

from sovpack.common.hashing import READ_SIZE, Digester, ShardDigests
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
    client: RegistryClient, layer: Layer, partial: Path, shard_size: int, progress: Progress, where: str
) -> tuple[ShardDigests, bool]:
    """Download `layer` into `partial` (continuing what is there); its shard digests, and whether earlier bytes were kept."""
    failures = 0
    with _HashedFile(partial, layer, shard_size, progress) as target:
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
        for chunk in response.iter_raw():
            target.write(chunk)
    if target.offset < layer.size:
        raise _ShortBody(f"the answer ended after {target.offset} of {layer.size} bytes")


class _HashedFile:
    MAX_QUEUED = 4  # blocks waiting for the hashing thread: a network faster than hashing waits, memory stays bounded

    def __init__(self, path: Path, layer: Layer, shard_size: int, progress: Progress):
        self.path, self.layer, self.shard_size, self.progress = path, layer, shard_size, progress
        self.offset = 0
        self.file = None
        self.lane: Lane | None = None
        self.queued: deque[Future] = deque()
        self.pending: list[bytes] = []
        self.pending_size = 0

    def __enter__(self) -> _HashedFile:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(self.path, "ab")
        self._start_hashing()
        kept = self.file.tell()
        if kept > self.layer.size:
            self.restart()
        elif kept:
            self._rehash_prefix(kept)
        return self

    def _start_hashing(self) -> None:
        self.digester = Digester(self.shard_size)
        self.lane = Lane("pull-sha256")
        self.queued.clear()

    def _rehash_prefix(self, length: int) -> None:
        with open(self.path, "rb") as prefix:
            while self.offset < length and (block := prefix.read(min(READ_SIZE, length - self.offset))):
                self._hash(block)
                self.offset += len(block)
        self.progress.advance(self.offset)

    def _hash(self, block: bytes) -> None:
        if len(self.queued) >= self.MAX_QUEUED:
            self.queued.popleft().result()
        self.queued.append(self.lane.submit(self.digester.update, block))

    def write(self, chunk: bytes) -> None:
        if self.offset + len(chunk) > self.layer.size:
            raise Refused(
                f"{self.layer.path}: the registry sent more than the {self.layer.size} bytes of blob {self.layer.digest}"
            )
        self.file.write(chunk)
        self.offset += len(chunk)
        self.pending.append(chunk)
        self.pending_size += len(chunk)
        if self.pending_size >= READ_SIZE:
            self._hand_over()
        self.progress.advance(len(chunk))

    def _hand_over(self) -> None:
        if self.pending:
            self._hash(b"".join(self.pending))
            self.pending, self.pending_size = [], 0

    def restart(self) -> None:
        self.pending, self.pending_size = [], 0
        self.lane.close(cancel=True)
        self.file.seek(0)
        self.file.truncate()
        self.progress.advance(-self.offset)
        self.offset = 0
        self._start_hashing()

    def finish(self, where: str) -> ShardDigests:
        self._hand_over()
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        self.lane.close()
        wait_all(list(self.queued))
        digest = self.digester.finish()
        if (digest.size, "sha256:" + digest.sha256) != (self.layer.size, self.layer.digest):
            self.path.unlink(missing_ok=True)
            raise Refused(
                f"{self.layer.path}: the registry served blob {self.layer.digest} of {where} with bytes whose SHA-256 is "
                f"{digest.sha256} ({digest.size} bytes), not the signed digest; the blob is damaged or was altered in the "
                "registry, and nothing of it was kept"
            )
        return ShardDigests(digest.size, digest.shards)

    def __exit__(self, *exc) -> None:
        if self.lane is not None:
            self.lane.close(cancel=True)
        if self.file is not None and not self.file.closed:
            self.file.close()
