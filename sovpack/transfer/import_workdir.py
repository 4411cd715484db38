"""What an import keeps in STORE/tmp/ while it runs, and what a killed import leaves there.

tmp/import-<first 16 hex of the index's SHA-256>/ (tmp/stream-<random>/ for a stream) holds:

    lock           held while the import runs: one import of an export at a time
    journal.json   the volumes found intact (a re-run does not hash them again), and REASSEMBLED
    bundle/        the staging directory, renamed into bundles/NAME/VERSION by the install

Nothing here is part of the installed store: a process killed at any moment leaves the store
as it was, and the next import clears or reuses what it finds (`sweep_staging`).
"""

from __future__ import annotations

import os
from pathlib import Path

from sovpack.common.files import HeldLock, remove_tree, try_lock
from sovpack.store.store import Store
from sovpack.transfer.volume_check import CheckJournal

# Journal key: true once the whole bundle is staged on disk (a re-run verifies and installs it);
# absent otherwise (a re-run discards the staging directory and reads the volumes again).
REASSEMBLED = "reassembled"


class ImportJob:
    """tmp/<id>/: a lock (one import of an export at a time), the journal, the staging directory."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.staging = directory / "bundle"
        self.journal: CheckJournal  # read in __enter__, once the lock is held
        lock = directory / "lock"
        self._lock = HeldLock(lock, f"another sovpack import of this export is running (it holds {lock}); wait for it to finish")

    def __enter__(self) -> "ImportJob":
        self.directory.mkdir(parents=True, exist_ok=True)
        self._lock.__enter__()
        self.journal = CheckJournal(self.directory / "journal.json")
        return self

    def __exit__(self, *exc) -> None:
        self._lock.__exit__()

    @property
    def reassembled(self) -> bool:
        return self.journal[REASSEMBLED] is True and self.staging.is_dir()

    def start_staging(self) -> None:
        self.journal.discard(REASSEMBLED)
        remove_tree(self.staging)

    def mark_reassembled(self) -> None:
        self.journal[REASSEMBLED] = True

    def discard_staging(self) -> None:
        """After a refusal or failure: keep only the journal of intact volumes."""
        remove_tree(self.staging)  # first: on a full disk, this is what frees the space
        self.journal.discard(REASSEMBLED)  # the journal only saves work: a failure to write it is ignored

    def remove(self) -> None:
        remove_tree(self.directory)


def sweep_staging(store: Store) -> None:
    """Clear what killed imports left in tmp/: partial stagings (a re-run redoes them) and streams."""
    if not store.tmp_dir.is_dir():
        return
    for directory in store.tmp_dir.iterdir():
        if not directory.name.startswith(("import-", "stream-")):
            continue
        fd = try_lock(directory / "lock") if directory.is_dir() else None
        if fd is None:
            continue  # running
        try:
            if directory.name.startswith("stream-"):
                remove_tree(directory)
            elif CheckJournal(directory / "journal.json")[REASSEMBLED] is not True:
                remove_tree(directory / "bundle")
        finally:
            os.close(fd)
