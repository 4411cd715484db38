"""export, check-volumes, import: crossing the gap (docs/transfer.md)."""

from __future__ import annotations

import sys
from contextlib import nullcontext
from pathlib import Path
from typing import Optional

import typer

from sovpack.cli import app
from sovpack.cli.options import NEW_STORE_HELP, STORE_HELP, THRESHOLD_HELP, TRUST_HELP, new_or_existing_store, trust_store
from sovpack.cli.render import console, err_console, human_size, print_json
from sovpack.cli.signing_keys import PIN_FILE_HELP, signing_key
from sovpack.errors import UsageError


@app.command()
def export(
    bundle: Path = typer.Argument(..., metavar="BUNDLE", help="Signed bundle directory."),
    to: str = typer.Option(
        ...,
        "--to",
        metavar="DIR|-",
        help="Directory for the volumes and their index, or - for one stream on standard output (data diode).",
    ),
    volume_size: Optional[str] = typer.Option(
        None,
        "--volume-size",
        metavar="SIZE",
        help=(
            "Largest volume: 700M, 4G, 4.7G (decimal, as media are labelled) "
            "or 4095MiB (binary). Default 4095MiB, which fits FAT32."
        ),
    ),
    key: Optional[Path] = typer.Option(
        None, "--key", metavar="KEYFILE", help="Also sign the index (and so every volume) with this private key."
    ),
    password_file: Optional[Path] = typer.Option(
        None, "--password-file", metavar="FILE", help="File holding the --key password."
    ),
    pkcs11: Optional[str] = typer.Option(
        None, "--pkcs11", metavar="URI", help="Sign the index with a key on a PKCS#11 token instead of --key (RFC 7512 URI)."
    ),
    pin_file: Optional[Path] = typer.Option(None, "--pin-file", metavar="FILE", help=PIN_FILE_HELP),
    since: Optional[Path] = typer.Option(
        None,
        "--since",
        metavar="OLD_INDEX_OR_BUNDLE",
        help=(
            "Leave out files the secure side already holds: the index of an "
            "earlier export (or the directory holding it), or the earlier bundle."
        ),
    ),
) -> None:
    """Write a signed bundle as volumes for media (FAT32-sized by default), with an index; or as one stream."""
    from sovpack.cli.progress_view import ProgressView
    from sovpack.transfer.export import export_stream, export_volumes
    from sovpack.transfer.index import DEFAULT_VOLUME_SIZE, parse_volume_size

    if to == "-":
        if key or pkcs11 or volume_size:
            raise UsageError(
                "--key, --pkcs11 and --volume-size apply to volumes; a stream (--to -) has neither index nor volumes"
            )
        if sys.stdout.isatty():
            raise UsageError(
                "--to - writes the bundle to standard output, which is a terminal: redirect it to a file, pipe or diode"
            )
        with ProgressView(err_console) as progress:
            result = export_stream(bundle, sys.stdout.buffer, since=since, progress=progress)
        _render_export(result, err_console)
        return
    size = parse_volume_size(volume_size) if volume_size else DEFAULT_VOLUME_SIZE
    with (
        signing_key(key, password_file, pkcs11, pin_file) if key or pkcs11 else nullcontext() as private_key,
        ProgressView(console, bars=err_console) as progress,
    ):
        result = export_volumes(bundle, Path(to), volume_size=size, private_key=private_key, since=since, progress=progress)
    _render_export(result, console)


def _render_export(result, out) -> None:
    from rich.markup import escape

    for warning in result.warnings:
        out.print(f"[yellow]warning:[/] {escape(warning)}")
    for v in result.volumes:
        out.print(f"  {escape(v.file)}  {human_size(v.size):>10}  sha256 {v.sha256}", soft_wrap=True)
    for f in result.left_out:
        out.print(f"  left out (the secure side holds it): {escape(f.path)} ({human_size(f.size)})")
    where = f"{len(result.volumes)} volume(s) + {escape(result.index_path.name)}" if result.index_path else "one stream"
    signed = f", index signed ({escape(result.signature_path.name)})" if result.signature_path else ""
    out.print(f"exported {escape(result.identity.label)}: {human_size(result.archive_size)} as {where}{signed}")
    if result.index_path:
        out.print(f"next: carry {escape(str(result.index_path.parent))} across; on the secure side: sovpack import DIR")


@app.command("check-volumes")
def check_volumes_command(
    directory: Path = typer.Argument(
        ..., metavar="DIR_OR_INDEX", help="Directory holding the volumes and their index (or the index file)."
    ),
    trust: Optional[list[Path]] = typer.Option(
        None, "--trust", metavar="DIR_OR_PUBFILE", help=TRUST_HELP + " Used to check the index signature."
    ),
    store: Optional[Path] = typer.Option(None, "--store", metavar="DIR", help=STORE_HELP),
    json_output: bool = typer.Option(False, "--json", help="Print the documented JSON report."),
) -> None:
    """Check every volume on its own against the index: OK, damaged or missing. Nothing is written."""
    from sovpack.cli.progress_view import ProgressView
    from sovpack.store.target import choose_policy
    from sovpack.transfer.index import find_index
    from sovpack.transfer.volume_check import check_volumes

    policy = choose_policy(trust_store(trust, store), trust or (), None, required=False)
    with ProgressView(err_console if json_output else console, bars=err_console, volume_lines=not json_output) as progress:
        report = check_volumes(find_index(directory), policy, progress=progress)
    if json_output:
        print_json(_volume_report_json(report))
    else:
        _render_volume_summary(report)
    if not report.ok:
        raise typer.Exit(1)


def _volume_report_json(report) -> dict:
    return {
        "ok": report.ok,
        "index": str(report.index_path),
        "bundle": report.index.bundle.to_json(),
        "signature": report.signature,
        "volumes": [{"file": v.file, "state": v.state, "detail": v.detail} for v in report.volumes],
        "foreign": report.foreign,
        "left_out": [f.to_json() for f in report.index.left_out],
    }


def _render_volume_summary(report) -> None:
    from rich.markup import escape

    console.print(escape(report.signature))
    for name in report.foreign:
        console.print(f"[yellow]not part of this export:[/] {escape(name)}")
    if report.ok:
        console.print(f"[bold green]OK[/] all {len(report.volumes)} volume(s) of {escape(report.index.bundle.label)} are intact")
    else:
        console.print(f"[bold red]DAMAGED[/] {escape(report.failure_message())}", soft_wrap=True)


@app.command("import")
def import_command(
    source: str = typer.Argument(
        ...,
        metavar="DIR_OR_INDEX_OR_-",
        help="Directory holding the volumes and their index, the index file, or - for a stream on standard input.",
    ),
    trust: Optional[list[Path]] = typer.Option(None, "--trust", metavar="DIR_OR_PUBFILE", help=TRUST_HELP),
    threshold: Optional[int] = typer.Option(None, "--threshold", metavar="K", help=THRESHOLD_HELP),
    store: Optional[Path] = typer.Option(None, "--store", metavar="DIR", help=NEW_STORE_HELP),
    allow_downgrade: bool = typer.Option(
        False, "--allow-downgrade", help="Install a version not newer than the highest ever installed."
    ),
) -> None:
    """Check the volumes, reassemble and fully verify the bundle, then install it into the store atomically."""
    from rich.markup import escape

    from sovpack.cli.progress_view import ProgressView
    from sovpack.store.target import choose_policy
    from sovpack.transfer.import_ import import_bundle

    policy = choose_policy(trust_store(trust, store), trust or (), threshold)
    with new_or_existing_store(store) as target, ProgressView(console, bars=err_console) as progress:
        result = import_bundle(source, target, policy, allow_downgrade=allow_downgrade, stdin=sys.stdin.buffer, progress=progress)
    for warning in result.warnings:
        console.print(f"[yellow]warning:[/] {escape(warning)}")
    b = result.installed
    signers = ", ".join(b.record.signer_names) or "?"
    if result.outcome == "already-installed":
        console.print(f"{escape(b.name)} v{b.version} is already installed (same signed sovpack.json) at {escape(str(b.path))}")
        return
    if result.reassembled_before:
        origin = "reassembled in an earlier run, verified again"
    else:
        origin = f"{result.written} file(s) from the media" + (
            f", {result.linked} already held by the store" if result.linked else ""
        )
    console.print(
        f"[bold green]INSTALLED[/] {escape(b.name)} v{b.version} ({human_size(b.record.size or 0)}, {origin}), "
        f"accepted by {escape(signers)} -> {escape(str(b.path))}",
        soft_wrap=True,
    )
