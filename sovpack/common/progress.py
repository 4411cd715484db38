"""The progress protocol: what core code reports while it works; the command line draws it, tests record it.

One protocol for every stage (fetch, quantize, export, check-volumes, import); every hook is
optional — a stage calls those that fit what it does, and a receiver overrides those it shows
(sovpack/cli/progress_view.py draws them all).

- `phase(name, total, unit)`, then `advance(n)`: a step of known or unknown size, counted in
  bytes (or in tensors, for quantize); `set_total` gives a total learnt once the phase started
- `item_started`, `item_advanced`, `item_finished`: several items worked on side by side within
  the phase (fetch's downloads), each with its own count of bytes; they count in the phase too
- `volume(status)`: one volume judged (a transfer.volume_check.VolumeStatus)
- `note(text)`: a fact worth a line of its own in a log (a resolved commit, a file left out)

Hooks may be called from worker threads.
"""

from __future__ import annotations

from typing import Any, Literal

ProgressUnit = Literal["bytes", "tensors"]


class Progress:
    """Every method is optional: this base class ignores them all."""

    def phase(self, name: str, total: int | None = None, unit: ProgressUnit = "bytes") -> None:
        """A new phase starts; `total` units of it will be reported through `advance`."""

    def set_total(self, total: int) -> None:
        """The current phase's total, learnt after it started."""

    def advance(self, n: int) -> None:
        """`n` more units of the current phase are done."""

    def item_started(self, name: str, size: int, done: int = 0) -> None:
        """Work on item `name` of `size` bytes starts, `done` of them already there (kept from an earlier run)."""

    def item_advanced(self, name: str, n: int) -> None:
        """`n` more bytes of item `name` are done."""

    def item_finished(self, name: str, detail: str = "", *, reused: bool = False) -> None:
        """Item `name` is done (`reused`: an earlier run had done it); `detail` says how it was checked."""

    def volume(self, status: Any) -> None:
        """One volume has been checked."""

    def note(self, text: str) -> None:
        """A fact the operator may want in a log."""
