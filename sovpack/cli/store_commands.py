"""list, remove, trust, audit: the store on the secure side (docs/store.md)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from sovpack.cli import app
from sovpack.cli.options import STORE_HELP
from sovpack.cli.render import console, human_size, print_json

trust_app = typer.Typer(help="The keys the store trusts, and how many of them must have signed.", no_args_is_help=True)
audit_app = typer.Typer(help="The store's hash-chained audit log.", no_args_is_help=True)
app.add_typer(trust_app, name="trust")
app.add_typer(audit_app, name="audit")


def _store(store: Optional[Path]):
    from sovpack.store.store import Store

    return Store(store)


@app.command("list")
def list_command(
    store: Optional[Path] = typer.Option(None, "--store", help=STORE_HELP),
    json_output: bool = typer.Option(False, "--json", help="Print the documented JSON document."),
) -> None:
    """Installed bundles: name, version, size, signers, expiry, GGUF variants."""
    from rich.markup import escape
    from rich.table import Table

    from sovpack.store.listing import summarize

    target = _store(store)
    rows = [summarize(target, b).to_json() for b in target.installed()]
    if json_output:
        print_json({"store": str(target.root), "bundles": rows})
        return
    if not rows:
        console.print(f"no bundles installed in {escape(str(target.root))}")
        return
    table = Table(title=f"store {escape(str(target.root))}", title_justify="left")
    for column in ("name", "version", "size", "signers", "expires", "GGUF variants", "imported"):
        table.add_column(column, overflow="fold")
    for r in rows:
        signers = escape(", ".join(r["signers"])) or "?"
        if r["problem"]:
            signers += f" [red]{escape(r['problem'])}[/]"
        table.add_row(
            escape(r["name"]),
            str(r["version"]),
            human_size(r["size"] or 0),
            signers,
            r["expires"] or "never",
            ", ".join(r["gguf_variants"]) or "-",
            r["imported"] or "?",
        )
    console.print(table)


@app.command()
def remove(
    spec: str = typer.Argument(..., help="NAME@VERSION, or NAME when a single version is installed."),
    store: Optional[Path] = typer.Option(None, "--store", help=STORE_HELP),
) -> None:
    """Remove an installed bundle. The rollback high-water mark stays; unshared files are deleted."""
    target = _store(store)
    removed = target.remove(spec)
    console.print(
        f"removed {removed.name} v{removed.version}; the store still refuses "
        f"versions up to v{target.highest_version(removed.name)} of {removed.name}"
    )


@trust_app.command("add")
def trust_add(
    pub_file: Path = typer.Argument(..., help="Public key (PEM) of a signer to trust."),
    name: Optional[str] = typer.Option(None, "--name", help="How to call this signer (default: the file name without .pub)."),
    store: Optional[Path] = typer.Option(None, "--store", help=STORE_HELP),
) -> None:
    """Trust a signer's public key for import, verify and serve."""
    key = _store(store).add_trusted_key(pub_file, name)
    console.print(f"trusted {key.name} (key id {key.key_id})")


@trust_app.command("list")
def trust_list(
    store: Optional[Path] = typer.Option(None, "--store", help=STORE_HELP),
    json_output: bool = typer.Option(False, "--json", help="Print the documented JSON document."),
) -> None:
    """The trusted keys and the threshold."""
    target = _store(store)
    keys = target.trusted_keys()
    if json_output:
        print_json(
            {
                "threshold": target.threshold,
                "keys": [{"name": k.name, "key_id": k.key_id, "hint": k.hint, "curve": k.public_key.curve.name} for k in keys],
            }
        )
        return
    for k in keys:
        console.print(f"{k.name}  key id {k.key_id}  {k.public_key.curve.name}")
    console.print(f"threshold: {target.threshold} of {len(keys)} trusted key(s) must have signed")


@trust_app.command("remove")
def trust_remove(
    name_or_id: str = typer.Argument(..., help="The signer's name or key id."),
    store: Optional[Path] = typer.Option(None, "--store", help=STORE_HELP),
) -> None:
    """Stop trusting a key. Bundles it accepted are refused by serve unless enough other trusted keys signed."""
    key = _store(store).remove_trusted_key(name_or_id)
    console.print(f"no longer trusted: {key.name} (key id {key.key_id})")


@trust_app.command("threshold")
def trust_threshold(
    threshold: int = typer.Argument(..., help="How many distinct trusted keys must have signed a bundle."),
    store: Optional[Path] = typer.Option(None, "--store", help=STORE_HELP),
) -> None:
    """Set the store's threshold (k of n)."""
    target = _store(store)
    target.set_threshold(threshold)
    count = len(target.trusted_keys())
    console.print(f"threshold set to {threshold} ({count} key(s) trusted)")
    if threshold > count:
        console.print(
            f"[yellow]warning:[/] {threshold} signatures are required but only "
            f"{count} key(s) are trusted: add keys with `sovpack trust add`"
        )


@audit_app.command("verify")
def audit_verify(store: Optional[Path] = typer.Option(None, "--store", help=STORE_HELP)) -> None:
    """Check the hash chain of the audit log and its head witness; print the head digest to note down elsewhere."""
    target = _store(store)
    status = target.audit.verify_chain()
    console.print(f"audit log {target.audit.path}: {status.records} record(s), chain intact")
    console.print(f"head sha256 {status.head}")
    if syslog_target := target.syslog_target():
        console.print(f"copied to syslog {syslog_target}")


@audit_app.command("show")
def audit_show(
    store: Optional[Path] = typer.Option(None, "--store", help=STORE_HELP),
    json_output: bool = typer.Option(False, "--json", help="Print the records as a JSON array."),
) -> None:
    """Print the audit log."""
    from rich.markup import escape

    records = _store(store).audit.records()
    if json_output:
        print_json(records)
        return
    for r in records:
        rest = {k: v for k, v in r.items() if k not in ("seq", "time", "event", "prev")}
        details = " ".join(f"{k}={v if isinstance(v, str) else json.dumps(v, ensure_ascii=False)}" for k, v in rest.items())
        console.print(f"{r.get('seq')}  {r.get('time')}  {escape(str(r.get('event')))}  {escape(details)}", soft_wrap=True)


@audit_app.command("syslog")
def audit_syslog(
    target: str = typer.Argument(..., metavar="TARGET|off", help="/dev/log (a Unix datagram socket), udp://HOST:PORT, or off."),
    store: Optional[Path] = typer.Option(None, "--store", help=STORE_HELP),
) -> None:
    """Copy every audit record to the system log (RFC 5424) from now on, so that a copy exists outside the store."""
    chosen = None if target == "off" else target
    _store(store).set_syslog(chosen)
    console.print(f"audit records are copied to {chosen}" if chosen else "audit records are no longer copied to syslog")
