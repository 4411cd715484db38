"""push, pull: verified bundles through an in-network OCI registry (docs/oci.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from sovpack.cli import app
from sovpack.cli.options import (
    NEW_STORE_HELP,
    STORE_HELP,
    THRESHOLD_HELP,
    TRUST_HELP,
    existing_store,
    new_or_existing_store,
    trust_store,
)
from sovpack.cli.render import console, err_console, human_size

USERNAME_HELP = "Registry user name (with --password-file). Default: the container auth file's entry for the registry."
PASSWORD_FILE_HELP = "File whose first line is the registry password or token (with --username)."
CA_FILE_HELP = "PEM file of the CA(s) that issued the registry's TLS certificate (default: the system's CAs)."
PLAIN_HTTP_HELP = "Talk plain HTTP to a registry that is not on loopback (a loopback registry without TLS is detected)."


def _client(ref, username, password_file, ca_file, plain_http, *, push: bool):
    from sovpack.oci.client import RegistryClient
    from sovpack.oci.credentials import resolve_credentials

    credentials = resolve_credentials(ref.registry, username, password_file)
    return RegistryClient(ref, credentials, ca_file=ca_file, plain_http=plain_http, push=push)


@app.command()
def push(
    bundle: str = typer.Argument(
        ..., metavar="NAME_OR_BUNDLE", help="NAME or NAME@VERSION installed in the store, or a signed bundle directory."
    ),
    ref: str = typer.Argument(
        ..., metavar="REGISTRY/REPO[:TAG]", help="REGISTRY/REPOSITORY[:TAG]; the tag defaults to the bundle's version."
    ),
    store: Optional[Path] = typer.Option(
        None, "--store", metavar="DIR", help=STORE_HELP + " The push is recorded in its audit log, also for a directory."
    ),
    username: Optional[str] = typer.Option(None, "--username", metavar="USER", help=USERNAME_HELP),
    password_file: Optional[Path] = typer.Option(None, "--password-file", metavar="FILE", help=PASSWORD_FILE_HELP),
    ca_file: Optional[Path] = typer.Option(None, "--ca-file", metavar="FILE", help=CA_FILE_HELP),
    plain_http: bool = typer.Option(False, "--plain-http", help=PLAIN_HTTP_HELP),
    chunk_size: str = typer.Option(
        "64MiB", "--chunk-size", metavar="SIZE", help="Bytes per upload request of a large file (chunked upload)."
    ),
) -> None:
    """Upload a signed bundle to an OCI registry as a CNCF ModelPack artifact; only blobs the registry lacks are sent."""
    from rich.markup import escape

    from sovpack.cli.progress_view import ProgressView
    from sovpack.common.sizes import parse_size
    from sovpack.oci.push import bundle_root, push_bundle
    from sovpack.oci.reference import parse_reference

    target = existing_store(store)  # push audits in it and keeps its upload state there, as serve does
    size = parse_size(chunk_size, "--chunk-size")
    root = bundle_root(bundle, target)
    with _client(
        parse_reference(ref, need_tag_or_digest=False), username, password_file, ca_file, plain_http, push=True
    ) as client:
        with ProgressView(console, bars=err_console) as progress:
            result = push_bundle(root, client, target, chunk_size=size, progress=progress)
    for warning in result.warnings:
        console.print(f"[yellow]warning:[/] {escape(warning)}")
    resumed = f", {result.resumed} continued from an earlier attempt" if result.resumed else ""
    console.print(
        f"[bold green]PUSHED[/] {escape(result.name)} v{result.version} -> {escape(result.ref)} "
        f"({len(result.sent)} file(s), {human_size(result.sent_bytes)} sent{resumed}; {len(result.present)} already there)",
        soft_wrap=True,
    )


@app.command()
def pull(
    ref: str = typer.Argument(
        ...,
        metavar="REGISTRY/REPO:TAG|REGISTRY/REPO@sha256:D",
        help="REGISTRY/REPOSITORY:TAG or REGISTRY/REPOSITORY@sha256:DIGEST (pins the manifest).",
    ),
    store: Optional[Path] = typer.Option(None, "--store", metavar="DIR", help=NEW_STORE_HELP),
    trust: Optional[list[Path]] = typer.Option(None, "--trust", metavar="DIR_OR_PUBFILE", help=TRUST_HELP),
    threshold: Optional[int] = typer.Option(None, "--threshold", metavar="K", help=THRESHOLD_HELP),
    allow_downgrade: bool = typer.Option(
        False, "--allow-downgrade", help="Install a version not newer than the highest ever installed."
    ),
    username: Optional[str] = typer.Option(None, "--username", metavar="USER", help=USERNAME_HELP),
    password_file: Optional[Path] = typer.Option(None, "--password-file", metavar="FILE", help=PASSWORD_FILE_HELP),
    ca_file: Optional[Path] = typer.Option(None, "--ca-file", metavar="FILE", help=CA_FILE_HELP),
    plain_http: bool = typer.Option(False, "--plain-http", help=PLAIN_HTTP_HELP),
) -> None:
    """Download a bundle from an OCI registry, verify it fully as import does, and install it atomically (or change nothing)."""
    from rich.markup import escape

    from sovpack.cli.progress_view import ProgressView
    from sovpack.oci.pull import pull_bundle
    from sovpack.oci.reference import parse_reference
    from sovpack.store.target import choose_policy

    policy = choose_policy(trust_store(trust, store), trust or (), threshold)
    with _client(
        parse_reference(ref, need_tag_or_digest=True), username, password_file, ca_file, plain_http, push=False
    ) as client:
        with new_or_existing_store(store) as target, ProgressView(console, bars=err_console) as progress:
            result = pull_bundle(client, target, policy, allow_downgrade=allow_downgrade, progress=progress)
    imported = result.imported
    for warning in imported.warnings:
        console.print(f"[yellow]warning:[/] {escape(warning)}")
    b = imported.installed
    if imported.outcome == "already-installed":
        console.print(f"{escape(b.name)} v{b.version} is already installed (same signed sovpack.json) at {escape(str(b.path))}")
        return
    signers = ", ".join(b.record.signer_names) or "?"
    resumed = f", {result.resumed} continued from an earlier attempt" if result.resumed else ""
    console.print(
        f"[bold green]INSTALLED[/] {escape(b.name)} v{b.version} ({human_size(b.record.size or 0)}; "
        f"{result.fetched} file(s), "
        f"{human_size(result.fetched_bytes)} from the registry{resumed}, {result.linked} already held by the store), "
        f"accepted by {escape(signers)} -> {escape(str(b.path))}",
        soft_wrap=True,
    )
