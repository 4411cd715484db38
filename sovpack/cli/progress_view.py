"""Draws the progress protocol (common/progress.py) for every command: fetch, quantize, export, check-volumes, import.

On a terminal: a bar for the current phase (bytes with rate and time left, or tensors) and one
per item being worked on. In a pipe, or a log: a line per note, per finished item and per
volume checked, and no bars. With `quiet`: nothing.
"""

from __future__ import annotations

import threading

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    DownloadColumn,
    ProgressColumn,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.progress import Progress as Bars
from rich.text import Text

from sovpack.common.progress import Progress, ProgressUnit

_VOLUME_COLOURS = {"ok": "green", "reused": "green", "damaged": "bold red", "missing": "bold red"}


class _Amount(ProgressColumn):
    """Bytes done and the rate, or "tensor i/n" for a phase counted in tensors."""

    def __init__(self):
        super().__init__()
        self._bytes, self._rate = DownloadColumn(), TransferSpeedColumn()

    def render(self, task) -> Text:
        if task.fields.get("unit") == "tensors":
            return Text(f"tensor {int(task.completed)}/{int(task.total)}" if task.total else "")
        return Text.assemble(self._bytes.render(task), " ", self._rate.render(task))


class ProgressView(Progress):
    """`lines` receives the lines; the bars are drawn on `bars` (default: `lines`) when it is a terminal.

    `volume_lines=False` leaves out the line per volume (a report printed afterwards says it all);
    `keep_bars` leaves the finished bars on the screen.
    """

    def __init__(
        self,
        lines: Console,
        *,
        bars: Console | None = None,
        quiet: bool = False,
        volume_lines: bool = True,
        keep_bars: bool = False,
    ):
        self.lines, self.quiet, self.volume_lines = lines, quiet, volume_lines and not quiet
        self._lock = threading.Lock()
        self._phase: TaskID | None = None
        self._items: dict[str, TaskID] = {}
        self._bars: Bars | None = None
        screen = bars or lines
        if screen.is_terminal and not quiet:
            columns = (TextColumn("{task.description}", markup=False), BarColumn(), _Amount(), TimeRemainingColumn())
            self._bars = Bars(*columns, console=screen, transient=not keep_bars)

    def __enter__(self) -> ProgressView:
        if self._bars:
            self._bars.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._bars:
            self._bars.stop()

    # -- phases

    def phase(self, name: str, total: int | None = None, unit: ProgressUnit = "bytes") -> None:
        if self._bars:
            if self._phase is not None:
                self._bars.remove_task(self._phase)
            self._phase = self._bars.add_task(name, total=total, unit=unit)

    def set_total(self, total: int) -> None:
        if self._bars and self._phase is not None:
            self._bars.update(self._phase, total=total)

    def advance(self, n: int) -> None:
        if self._bars and self._phase is not None:
            self._bars.advance(self._phase, n)

    # -- items side by side

    def item_started(self, name: str, size: int, done: int = 0) -> None:
        if self._bars is None:
            return
        with self._lock:
            self.advance(done)
            if done < size:
                self._items[name] = self._bars.add_task(name, total=size, completed=done, unit="bytes")

    def item_advanced(self, name: str, n: int) -> None:
        if self._bars is None:
            return
        task = self._items.get(name)
        if task is not None:
            self._bars.advance(task, n)
        self.advance(n)

    def item_finished(self, name: str, detail: str = "", *, reused: bool = False) -> None:
        if self._bars is not None:
            with self._lock:
                task = self._items.pop(name, None)
                if task is not None:
                    self._bars.remove_task(task)
        elif not self.quiet:
            verb = "kept" if reused else "ok"
            self.lines.print(f"  {verb} {name}" + (f" ({detail})" if detail else ""), markup=False, highlight=False)

    # -- lines

    def volume(self, status) -> None:
        if not self.volume_lines:
            return
        label = "OK" if status.state == "reused" else status.state.upper()
        detail = f"  {escape(status.detail)}" if status.detail else ""
        self.lines.print(f"  {escape(status.file)}  [{_VOLUME_COLOURS[status.state]}]{label}[/]{detail}", soft_wrap=True)

    def note(self, text: str) -> None:
        if not self.quiet:
            self.lines.print(text, markup=False, highlight=False)
