"""Console output: rich on a terminal, plain text in pipes, errors on stderr."""

from __future__ import annotations

import json
import sys

from rich.console import Console
from rich.markup import escape

from sovpack.common.sizes import human_size  # noqa: F401  (re-exported for the commands)

console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)


def print_error(message: str) -> None:
    err_console.print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True, emoji=False)


def print_usage_error(message: str, ctx) -> None:
    """A usage error Typer found: one `error:` line, as sovpack's own, then the usage line."""
    print_error(message)
    if ctx is not None:
        hint = f" (`{ctx.command_path} {ctx.help_option_names[0]}` for help)" if ctx.help_option_names else ""
        err_console.print(escape(ctx.get_usage() + hint), soft_wrap=True, emoji=False)


def print_json(document: object) -> None:
    sys.stdout.write(json.dumps(document, indent=2, ensure_ascii=False) + "\n")


def warn_if_expired(metadata) -> None:
    """A bundle written already expired is almost always a typo in --expires."""
    from datetime import datetime, timezone

    from sovpack.bundle.metadata import format_time

    if metadata.is_expired(datetime.now(timezone.utc)):
        console.print(
            f"[yellow]warning:[/] this bundle expired on {format_time(metadata.expires)}: verify and import will refuse it"
        )
