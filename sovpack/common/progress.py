"""Progress reporting from core code: the command line draws it, tests ignore it."""

from __future__ import annotations

from typing import Any


class Progress:
    """What core code reports while it works; the command line draws it. Every method is optional."""

    def phase(self, name: str, total: int | None = None) -> None:
        """A new phase starts; `total` bytes will be reported through `advance`."""

    def advance(self, n: int) -> None:
        """`n` more bytes of the current phase are done."""

    def volume(self, status: Any) -> None:
        """One volume has been checked."""
