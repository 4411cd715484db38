"""fetch: a pinned, checked download from the Hugging Face Hub into a bundle."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Optional

import typer

from sovpack.cli import app
from sovpack.cli.render import console, human_size, warn_if_expired
from sovpack.errors import UsageError


@app.command()
def fetch(
    repo: Optional[str] = typer.Argument(
        None, metavar="REPO[@REV]", help="Model repository, e.g. org/name or org/name@v1.0 (branch, tag or commit; default main)."
    ),
    out: Optional[Path] = typer.Option(None, "--out", metavar="BUNDLE", help="New bundle directory to create."),
    include: Optional[list[str]] = typer.Option(
        None,
        "--include",
        metavar="GLOB",
        help="Take the model repository files matching GLOB instead of the default selection; repeatable.",
    ),
    exclude: Optional[list[str]] = typer.Option(
        None, "--exclude", metavar="GLOB", help="Leave out model-repository files matching GLOB; repeatable."
    ),
    gguf: Optional[list[str]] = typer.Option(
        None,
        "--gguf",
        metavar="REPO[@REV]:GLOB",
        help="Add the GGUF files matching GLOB from another repository (split GGUFs are kept whole); repeatable.",
    ),
    spec: Optional[Path] = typer.Option(
        None,
        "--spec",
        metavar="FILE",
        help="Fetch what a TOML spec (manifests/*.toml) names, instead of REPO and selection options.",
    ),
    endpoint: Optional[str] = typer.Option(
        None, "--endpoint", metavar="URL", help="Hub or mirror URL (default: HF_ENDPOINT, else https://huggingface.co)."
    ),
    name: Optional[str] = typer.Option(
        None, "--name", metavar="NAME", help="Bundle name (default: the spec's, else the repository name)."
    ),
    version: Optional[int] = typer.Option(None, "--version", metavar="N", help="Bundle version (default: the spec's, else 1)."),
    expires: Optional[str] = typer.Option(
        None, "--expires", metavar="90d|DATE", help="Expiry: 90d, 2027-01-01 or 2027-01-01T00:00:00Z."
    ),
    dry_run: bool = typer.Option(
        False, "--dry-run", help="Resolve and list what would be downloaded (files, sizes, commits); download nothing."
    ),
    quiet: bool = typer.Option(
        False, "--quiet", "-q", help="No progress and no listing; errors only (with --dry-run, only the totals line)."
    ),
) -> None:
    """Download a model from the Hugging Face Hub at a pinned commit, check every byte, and write an unsigned bundle.

    Tokens for gated or private repositories come from HF_TOKEN. Re-running an interrupted fetch continues
    where it stopped. Details: docs/fetch.md.
    """
    from sovpack.fetch.download import fetch as run_fetch
    from sovpack.fetch.spec import load_spec, request_from_args, with_overrides

    if spec is not None:
        if repo or include or exclude or gguf:
            raise UsageError("give either --spec or REPO with --include/--exclude/--gguf, not both")
        request = with_overrides(load_spec(spec), name=name, version=version, expires=expires)
    elif repo:
        request = request_from_args(repo, include, exclude, gguf, name=name, version=version, expires=expires)
    else:
        raise UsageError("give a repository (REPO[@REV]) or --spec FILE")

    view = FetchView(quiet=quiet, dry_run=dry_run)
    try:
        result = run_fetch(request, out, endpoint=endpoint, dry_run=dry_run, events=view)
    finally:
        view.stop()
    if dry_run:
        view.dry_run_summary(result)
    else:
        view.summary(result)
        warn_if_expired(result.metadata)


class FetchView:  # implements sovpack.fetch.download.FetchEvents
    """Renders fetch events: rich progress bars on a terminal, plain lines in pipes, nothing with --quiet."""

    def __init__(self, *, quiet: bool, dry_run: bool):
        self.quiet, self.dry_run = quiet, dry_run
        self.bars = console.is_terminal and not quiet and not dry_run
        self.lock = threading.Lock()
        self.progress = None
        self.overall = None
        self.tasks: dict[str, int] = {}

    # -- events (called from worker threads)

    def planned(self, plan, status) -> None:
        if self.quiet:
            return
        for sel, snap in plan.snapshots:
            console.print(f"{sel.repo}@{sel.revision} -> commit {snap.commit}", highlight=False)
        for s in plan.skipped:
            console.print(f"  skipped {s.repo}:{s.path} ({s.reason})", highlight=False)
        if self.bars:
            self._start_bars(plan, status)

    def _start_bars(self, plan, status) -> None:
        from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

        self.progress = Progress(
            TextColumn("{task.description}", markup=False),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=console,
            transient=False,
        )
        self.overall = self.progress.add_task(f"total ({len(plan.files)} files)", total=plan.total_size)
        self.progress.start()

    def started(self, f, kept: int) -> None:
        if self.progress is None:
            return
        with self.lock:
            self.progress.advance(self.overall, kept)
            if kept < f.size:
                self.tasks[f.path] = self.progress.add_task(f.path, total=f.size, completed=kept)

    def advanced(self, f, n: int) -> None:
        if self.progress is None:
            return
        task = self.tasks.get(f.path)
        if task is not None:
            self.progress.advance(task, n)
        self.progress.advance(self.overall, n)

    def finished(self, f, reused: bool = False) -> None:
        if self.progress is not None:
            with self.lock:
                task = self.tasks.pop(f.path, None)
                if task is not None:
                    self.progress.remove_task(task)
        elif not self.quiet and not self.dry_run:
            verb = "kept" if reused else "ok"
            console.print(f"  {verb} {f.path} ({human_size(f.size)}, {f.expected[0]} {f.expected[1][:16]}...)", highlight=False)

    def stop(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None

    # -- final reports

    def summary(self, result) -> None:
        if self.quiet:
            return
        m = result.metadata
        total = sum(f.size for f in m.files)
        reused = sum(1 for s in result.status.values() if s.state == "staged")
        note = f" ({reused} already checked in an earlier run)" if reused else ""
        console.print(
            f"fetched {m.name} v{m.version}: {len(m.files)} files, {human_size(total)}{note} -> {result.out}", highlight=False
        )
        console.print(f"next: sovpack sign {result.out} --key KEYFILE", highlight=False)

    def dry_run_summary(self, result) -> None:
        from rich.markup import escape
        from rich.table import Table

        plan = result.plan
        if not self.quiet:
            table = Table(show_header=True, title="dry run: nothing was downloaded", title_justify="left")
            for column in ("file", "size", "from", "check", "status"):
                table.add_column(column, overflow="fold")
            for f in plan.files:
                s = result.status[f.path]
                state = {"download": "to download", "staged": "already checked", "partial": f"{human_size(s.kept)} kept"}[s.state]
                table.add_row(
                    escape(f.path),
                    human_size(f.size),
                    escape(f"{f.repo}@{f.commit[:12]}"),
                    f"{f.expected[0]} {f.expected[1][:12]}",
                    state,
                )
            console.print(table)
        console.print(
            f"total: {len(plan.files)} files, {human_size(plan.total_size)}; to download: {human_size(result.to_download)}",
            highlight=False,
        )
