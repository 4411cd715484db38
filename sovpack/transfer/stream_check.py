"""Volumes checked while import reads them once, in order, as one stream.

What the file system alone tells — a volume missing, of another size than the index says, or
intact in an earlier run (the journal) — is known before a byte is read. The other volumes
are hashed as the stream passes through them: each chunk goes to the SHA-256 of its volume on
a thread of its own, beside the extraction of the same bytes; when the stream leaves a volume,
its verdict is known, reported in volume order and, if intact, recorded in the journal so that
a re-run does not hash it again.
"""

from __future__ import annotations

import hashlib
from concurrent.futures import Future
from pathlib import Path

from sovpack.common.pipeline import Lane
from sovpack.common.progress import Progress
from sovpack.transfer.index import ExportIndex
from sovpack.transfer.volume_check import CheckJournal, VolumeStatus, status_without_reading, unreadable, verdict


class StreamedVolumeCheck:
    """Per volume: a status known before reading, a verdict being computed (Future), or nothing yet (None)."""

    def __init__(self, directory: Path, index: ExportIndex, journal: CheckJournal | None, progress: Progress | None = None):
        self.directory, self.index, self.journal = directory, index, journal
        self.progress = progress or Progress()
        self.verdicts: list[VolumeStatus | Future | None] = [
            status_without_reading(directory / v.file, v, journal) for v in index.volumes
        ]
        self._lane = Lane("volume-sha256")
        self._part = -1
        self._sha256 = hashlib.sha256()
        self._seen = 0
        self._reported = 0

    @property
    def readable(self) -> bool:
        """Every volume is there at its listed size: the stream can be read."""
        return all(v is None or v.ok for v in self.verdicts)

    def feed(self, part: int, data: bytes | memoryview) -> Future | None:
        """Bytes of volume `part`, in stream order; the returned task reads `data` until it finishes."""
        if part != self._part:
            self._part, self._sha256, self._seen = part, hashlib.sha256(), 0
        self._seen += len(data)
        if self.verdicts[part] is not None:
            return None  # intact in an earlier run: not hashed again
        return self._lane.submit(self._sha256.update, data)

    def end(self, part: int) -> None:
        """The stream has left volume `part`."""
        if part != self._part:  # an empty volume
            self._part, self._sha256, self._seen = part, hashlib.sha256(), 0
        if self.verdicts[part] is None:
            entry, sha256, seen = self.index.volumes[part], self._sha256, self._seen
            self.verdicts[part] = self._lane.submit(lambda: verdict(entry, seen, sha256.hexdigest()))
        self.report()

    def unreadable(self, part: int, error: OSError) -> None:
        self.verdicts[part] = unreadable(self.index.volumes[part], error)
        self.report()

    def report(self, *, wait: bool = False) -> None:
        """Report, in volume order, every verdict known so far (with `wait`, also those being computed).

        Intact volumes are recorded in the journal here, on the reading thread.
        """
        while self._reported < len(self.verdicts):
            status = self.verdicts[self._reported]
            if status is None or (isinstance(status, Future) and not (wait or status.done())):
                return
            if isinstance(status, Future):
                status = self.verdicts[self._reported] = status.result()
            if self.journal and status.state == "ok":
                entry = self.index.volumes[self._reported]
                self.journal.record(self.directory / entry.file, entry.sha256)
            self.progress.volume(status)
            self._reported += 1

    def finish(self) -> list[VolumeStatus]:
        """After the whole stream was read: the verdict of every volume."""
        self.report(wait=True)
        self._lane.close()
        return list(self.verdicts)  # type: ignore[arg-type] - all VolumeStatus once the stream was read

    def settle(self) -> None:
        """After a failure that stops the reading: report (and journal) the volumes read in full; the rest stay unchecked."""
        try:
            self.report(wait=True)
        except Exception:  # noqa: BLE001 - the failure being raised matters, not this
            pass
        self._lane.close()
