"""One blob's chunked upload (POST, PATCH per chunk, PUT with the digest), continued after a cut, in this run or the next.

What a real registry does with a cut chunk decides how to continue. The CNCF distribution registry
(2.x, also inside Harbor) keeps the part of a PATCH it read before the connection dropped, and
every upload location it hands out records the offset the upload had then: a request whose
location's offset differs from the upload's size makes it cancel the upload (BLOB_UPLOAD_INVALID,
HTTP 404). A cut request can also reach the registry late, after the client already asked where
the upload stands: the offset it was told is then stale, and its next chunk is refused that way.

So after a failed request (transport error, 404 or 416 on a chunk): wait a little, so that the
registry is done with the cut request; ask where the upload stands (GET on its location) and
continue from the offset the registry confirms; if the registry forgot or cancelled the upload,
start a new one from byte 0 (a new upload, so two writers never share one). Only failures in a row
that get no further than the furthest byte the registry ever confirmed count towards giving up.
The registry checks the digest at the end; if it finds other bytes, the file is hashed here: a
file that does not hash to its signed digest is refused by name, one that does (the registry
mixed up a cut request's bytes) is sent once more in a new upload.

The location after each confirmed chunk is kept in a journal (`UploadJournal`), so that the next
push of the same blob continues the same upload if the registry still has it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx2

from sovpack.common.files import write_atomically
from sovpack.common.hashing import READ_SIZE, sha256_bytes, sha256_file
from sovpack.common.progress import Progress
from sovpack.errors import Failure, Refused
from sovpack.oci.client import RegistryClient, UploadOutOfStep, is_certificate_error
from sovpack.oci.layout import Layer

MAX_ATTEMPTS = 3  # failed requests in a row that get no further than the furthest byte confirmed
RETRY_WAIT = 0.5  # seconds before asking where an upload stands, doubled at each failure in a row


@dataclass(frozen=True)
class BlobSource:
    """The bytes of one blob: a file of the bundle, or bytes held in memory (the config, sovpack.json, signatures)."""

    layer: Layer
    path: Path | None = None
    data: bytes | None = None

    @property
    def name(self) -> str:
        return str(self.path) if self.path else self.layer.path or "the ModelPack config"

    def body(self, offset: int, length: int) -> Callable[[], Iterator[bytes]]:
        """`length` bytes from `offset`, as a callable that gives them anew (a request is sent again to authenticate)."""

        def blocks() -> Iterator[bytes]:
            if self.data is not None:
                yield self.data[offset : offset + length]
                return
            with open(self.path, "rb") as f:
                f.seek(offset)
                left = length
                while left:
                    block = f.read(min(READ_SIZE, left))
                    if not block:
                        raise Failure(f"{self.path} became shorter while it was being pushed")
                    left -= len(block)
                    yield block

        return blocks

    def sha256(self) -> str:
        return "sha256:" + (sha256_bytes(self.data) if self.data is not None else sha256_file(self.path))


class UploadJournal:
    """Blob digest -> the location of its unfinished upload, as the registry last confirmed it."""

    def __init__(self, path: Path):
        self.path = path

    def get(self, digest: str) -> str | None:
        return self._read().get(digest)

    def remember(self, digest: str, location: str) -> None:
        journal = self._read()
        journal[digest] = location
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(self.path, json.dumps(journal).encode())

    def forget(self, digest: str) -> None:
        journal = self._read()
        if journal.pop(digest, None) is not None:
            write_atomically(self.path, json.dumps(journal).encode())

    def _read(self) -> dict:
        try:
            return json.loads(self.path.read_bytes())
        except (OSError, ValueError):
            return {}


class BlobUpload:
    def __init__(self, client: RegistryClient, source: BlobSource, chunk_size: int, progress: Progress, journal: UploadJournal):
        self.client, self.source, self.chunk_size, self.progress, self.journal = client, source, chunk_size, progress, journal
        self.layer = source.layer
        self.location, self.offset = "", 0
        self.furthest, self.failures = 0, 0

    def run(self) -> bool:
        """Upload the blob; whether it continued an upload an earlier push left."""
        earlier = self.journal.get(self.layer.digest)
        where = self.client.upload_offset(earlier) if earlier else None
        self._move_to(*(where or (self.client.start_upload(), 0)))
        resumed = self.offset > 0
        resent = False
        while True:
            self._send_chunks()
            outcome = self._finish()
            if outcome == "done":
                self.journal.forget(self.layer.digest)
                return resumed
            if outcome == "digest-invalid":
                self.journal.forget(self.layer.digest)
                if self.source.sha256() != self.layer.digest:
                    raise self._changed_after_signing()
                if resent:
                    raise Failure(
                        f"the registry {self.client.ref.registry} twice found that the bytes sent of {self.source.name} do "
                        f"not hash to {self.layer.digest}, although the file does: the registry, or something between it and "
                        "this host, alters what is sent"
                    )
                resent = True  # the file is right: the registry mixed up a cut request's bytes; once more, afresh
                self._move_to(self.client.start_upload(), 0)

    def _send_chunks(self) -> None:
        while self.offset < self.layer.size:
            length = min(self.chunk_size, self.layer.size - self.offset)
            try:
                location = self.client.upload_chunk(self.location, self.offset, length, self.source.body(self.offset, length))
            except (httpx2.TransportError, UploadOutOfStep) as e:
                self._recover(e)
                continue
            self._move_to(location, self.offset + length)
            self.journal.remember(self.layer.digest, self.location)

    def _finish(self) -> str:
        """PUT with the digest: "done", "digest-invalid", or "again" after a failure this recovered from."""
        try:
            response = self.client.finish_upload(self.location, self.layer.digest)
        except httpx2.TransportError as e:
            if self.client.blob_size(self.layer.digest) == self.layer.size:
                return "done"  # the registry completed the upload before the answer was lost
            self._recover(e)
            return "again"
        if response.status_code == 201:
            return "done"
        if response.status_code == 400 and b"DIGEST_INVALID" in response.read():
            return "digest-invalid"
        if response.status_code in (404, 416):
            self._recover(UploadOutOfStep(f"HTTP {response.status_code}"))
            return "again"
        self.client.check(response, f"the end of the upload of {self.source.name}", 201)
        return "done"

    def _recover(self, error: Exception) -> None:
        """After a failed request: continue where the registry says the upload stands, or from byte 0 in a new upload."""
        if is_certificate_error(error):
            raise error
        self.failures += 1
        if self.failures >= MAX_ATTEMPTS:
            raise Failure(
                f"uploading {self.source.name} ({self.layer.digest}) to {self.client.ref.registry} failed {self.failures} times "
                f"in a row ({error or type(error).__name__}) after {self.furthest} of {self.layer.size} bytes: run the same "
                "push again to continue from there"
            ) from None
        time.sleep(RETRY_WAIT * 2 ** (self.failures - 1))
        where = self.client.upload_offset(self.location)
        self._move_to(*(where or (self.client.start_upload(), 0)))

    def _move_to(self, location: str, offset: int) -> None:
        self.progress.advance(offset - self.offset)
        self.location, self.offset = location, offset
        if offset > self.furthest:
            self.furthest, self.failures = offset, 0

    def _changed_after_signing(self) -> Refused:
        return Refused(
            f"{self.source.name}: its bytes do not hash to {self.layer.digest}, the SHA-256 the bundle's signed sovpack.json "
            f"lists (the registry {self.client.ref.registry} found so, and so does this host): the file changed after it was "
            "signed; nothing was pushed under that digest"
        )
