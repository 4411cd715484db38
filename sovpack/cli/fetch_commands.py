"""fetch: a pinned, checked download from the Hugging Face Hub into a bundle."""

from __future__ import annotations

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

    from sovpack.cli.progress_view import ProgressView

    with ProgressView(console, quiet=quiet, keep_bars=True) as progress:
        result = run_fetch(request, out, endpoint=endpoint, dry_run=dry_run, progress=progress)
    if dry_run:
        _dry_run_summary(result, quiet)
    elif not quiet:
        _summary(result)
    if not dry_run:
        warn_if_expired(result.metadata)


def _summary(result) -> None:
    m = result.metadata
    total = sum(f.size for f in m.files)
    reused = sum(1 for s in result.status.values() if s.state == "staged")
    note = f" ({reused} already checked in an earlier run)" if reused else ""
    console.print(
        f"fetched {m.name} v{m.version}: {len(m.files)} files, {human_size(total)}{note} -> {result.out}", highlight=False
    )
    console.print(f"next: sovpack sign {result.out} --key KEYFILE", highlight=False)


def _dry_run_summary(result, quiet: bool) -> None:
    from rich.markup import escape
    from rich.table import Table

    plan = result.plan
    if not quiet:
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
