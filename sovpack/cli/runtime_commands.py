"""runtime build, install, rollback, list: sovpack itself across the gap (docs/runtime.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from sovpack.cli import app
from sovpack.cli.command import Typer
from sovpack.cli.options import STORE_HELP, existing_store
from sovpack.cli.render import console, human_size

runtime_app = Typer(
    help="sovpack itself across the gap: build the offline runtime, install it from the store, roll it back.",
    no_args_is_help=True,
)
app.add_typer(runtime_app, name="runtime")

PREFIX_HELP = (
    "Where runtimes are installed (PREFIX/runtimes/V, PREFIX/current). "
    "Default $SOVPACK_RUNTIME_PREFIX, else the prefix this sovpack runs from."
)


@runtime_app.command("build")
def build(
    out: Path = typer.Option(
        ..., "--out", metavar="BUNDLE", help="New bundle directory for the runtime (the bundle sovpack-runtime)."
    ),
    version: int = typer.Option(
        1, "--version", metavar="N", help="Bundle version; each new runtime needs a higher one (rollback rule)."
    ),
    gpu: Optional[str] = typer.Option(None, "--gpu", metavar="cuda", help="Also compile llama.cpp for a GPU: cuda (needs nvcc)."),
    source: Optional[Path] = typer.Option(
        None, "--source", metavar="DIR", help="sovpack source checkout (default: the running one)."
    ),
) -> None:
    """Collect sovpack and every dependency as wheels for this host, lock their SHA-256, pack them with the installer.

    The wheels are packed under the signed allowance --allow-file 'wheels/*.whl' (shown by inspect and verify).
    """
    from rich.markup import escape

    from sovpack.cli.progress_view import ProgressView
    from sovpack.errors import UsageError
    from sovpack.runtime.build import build_runtime

    if version < 1:
        raise UsageError(f"--version must be 1 or more, got {version}")
    with ProgressView(console) as progress:
        built = build_runtime(out, version=version, source=source, gpu=gpu, progress=progress)
    console.print(
        f"built {built.metadata.name} v{built.metadata.version}: {built.wheels} wheels, "
        f"{human_size(built.metadata.size)} -> {escape(str(out))}"
    )
    console.print("for the paper that travels separately from the media:")
    console.print(f"  runtime-lock.json   sha256 {built.lock_sha256}", soft_wrap=True)
    console.print(f"  install-runtime.py  sha256 {built.installer_sha256}", soft_wrap=True)
    console.print(
        f"next: sovpack sign {escape(str(out))} --key OFFICER.key; sovpack export {escape(str(out))} --to MEDIA; "
        f"cp {escape(str(out))}/install-runtime.py MEDIA/",
        soft_wrap=True,
    )


@runtime_app.command("install")
def install(
    spec: str = typer.Argument(
        ...,
        metavar="sovpack-runtime[@V]",
        help="The runtime imported into the store: sovpack-runtime@VERSION, or sovpack-runtime for the highest version.",
    ),
    prefix: Optional[Path] = typer.Option(None, "--prefix", metavar="DIR", help=PREFIX_HELP),
    store: Optional[Path] = typer.Option(None, "--store", metavar="DIR", help=STORE_HELP),
) -> None:
    """Verify an imported runtime under the store's trust and rules, install it beside the current one, switch to it."""
    from rich.markup import escape

    from sovpack.runtime.upgrade import install_from_store, runtime_prefix

    target = existing_store(store)
    where = runtime_prefix(prefix)
    result = install_from_store(target, spec, where)
    if result.outcome == "switched":
        console.print(f"v{result.version} was installed already ({escape(str(result.path))}); it is current again")
    else:
        console.print(
            f"[bold green]INSTALLED[/] sovpack-runtime v{result.version} ({result.sovpack_version}) at {escape(str(result.path))}"
        )
    console.print(
        f"current: {escape(str(where.current_link))} -> runtimes/{result.version}"
        + (f"; previous: v{result.previous} (`sovpack runtime rollback`)" if result.previous else "")
    )


@runtime_app.command("rollback")
def rollback(
    prefix: Optional[Path] = typer.Option(None, "--prefix", metavar="DIR", help=PREFIX_HELP),
    store: Optional[Path] = typer.Option(
        None, "--store", metavar="DIR", help=STORE_HELP + " Its audit log records the rollback."
    ),
) -> None:
    """Switch back to the previous runtime; the current one becomes the previous."""
    from sovpack.runtime.upgrade import rollback as roll_back
    from sovpack.runtime.upgrade import runtime_prefix

    target = existing_store(store)
    current, previous = roll_back(target, runtime_prefix(prefix))
    console.print(f"rolled back from sovpack-runtime v{current} to v{previous}")


@runtime_app.command("list")
def list_runtimes(prefix: Optional[Path] = typer.Option(None, "--prefix", metavar="DIR", help=PREFIX_HELP)) -> None:
    """The installed runtimes, which one is current and which previous."""
    from rich.markup import escape

    from sovpack.runtime.upgrade import runtime_prefix, sovpack_errors

    where = runtime_prefix(prefix)
    with sovpack_errors():
        current, previous, installed = where.current, where.previous, where.installed()
        for version in installed:
            record = where.record(version)
            mark = " (current)" if version == current else " (previous)" if version == previous else ""
            console.print(
                f"v{version}{mark}  sovpack {escape(str(record.get('sovpack_version')))}  "
                f"installed {escape(str(record.get('installed')))}"
            )
    if not installed:
        console.print(f"no runtime installed under {escape(str(where.root))}")
