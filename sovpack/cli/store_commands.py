"""list, remove, trust, audit: the store on the secure side (docs/store.md)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from sovpack.cli import app
from sovpack.cli.command import Typer
from sovpack.cli.options import NEW_STORE_HELP, STORE_HELP, existing_store, new_or_existing_store
from sovpack.cli.render import console, human_size, print_json

trust_app = Typer(
    help="The keys and certificate roots the store trusts, and how many distinct signers must have signed.", no_args_is_help=True
)
crl_app = Typer(help="Certificate revocation lists carried across the gap, checked against a trusted root.", no_args_is_help=True)
audit_app = Typer(help="The store's hash-chained audit log.", no_args_is_help=True)
app.add_typer(trust_app, name="trust")
trust_app.add_typer(crl_app, name="crl")
app.add_typer(audit_app, name="audit")


@app.command("list")
def list_command(
    store: Optional[Path] = typer.Option(None, "--store", metavar="DIR", help=STORE_HELP),
    json_output: bool = typer.Option(False, "--json", help="Print the documented JSON document."),
) -> None:
    """Installed bundles: name, version, size, signers, expiry, GGUF variants."""
    from rich.markup import escape

    from sovpack.store.listing import summarize

    target = existing_store(store)
    rows = [summarize(target, b).to_json() for b in target.installed()]
    if json_output:
        print_json({"store": str(target.root), "bundles": rows})
        return
    if not rows:
        console.print(f"no bundles installed in {escape(str(target.root))}")
        return
    console.print(f"store {escape(str(target.root))}", soft_wrap=True)
    console.print(_bundle_table(rows, console.width))


LIST_COLUMNS = ("name", "version", "size", "signers", "expires", "GGUF variants", "imported")
FOLDING = {"signers": 7, "GGUF variants": 8}  # lists of short words fold, down to these widths; the other columns never wrap


def _bundle_table(rows: list[dict], width: int):
    """One bundle per line, except where signers or GGUF variants fold; a name too long for the terminal ends in '…'."""
    from rich.table import Table

    cells = [_list_cells(r) for r in rows]
    natural = {c: max(len(c), *(row[i].cell_len for row in cells)) for i, c in enumerate(LIST_COLUMNS)}
    widths = _fit(natural, width - (len(LIST_COLUMNS) - 1))  # one space between columns
    table = Table(box=None, padding=(0, 0, 0, 1), pad_edge=False, header_style="bold")
    for column in LIST_COLUMNS:
        table.add_column(
            column,
            width=widths[column],
            no_wrap=column not in FOLDING,
            overflow="fold" if column in FOLDING else "ellipsis",
            justify="right" if column in ("version", "size") else "left",
        )
    for row in cells:
        table.add_row(*row)
    return table


def _fit(natural: dict[str, int], width: int) -> dict[str, int]:
    """Fixed columns at their natural width; then the name; the folding columns share what is left."""
    widths = dict(natural)
    smallest = {c: min(natural[c], least) for c, least in FOLDING.items()}
    spare = width - sum(w for c, w in natural.items() if c != "name" and c not in FOLDING)
    widths["name"] = max(4, min(natural["name"], spare - sum(smallest.values())))
    left = spare - widths["name"]
    if sum(natural[c] for c in FOLDING) > left:
        extra = max(0, left - sum(smallest.values()))
        wanted = sum(natural[c] - smallest[c] for c in FOLDING) or 1
        for c in FOLDING:
            widths[c] = smallest[c] + extra * (natural[c] - smallest[c]) // wanted
    return widths


def _list_cells(r: dict) -> list:
    from rich.text import Text

    signers = Text(", ".join(r["signers"]) or "?")
    if r["problem"]:
        signers.append(f" {r['problem']}", style="red")
    return [
        Text(r["name"]),
        Text(str(r["version"])),
        Text(human_size(r["size"] or 0)),
        signers,
        Text(_day(r["expires"]) if r["expires"] else "never"),
        Text(", ".join(r["gguf_variants"]) or "-"),
        Text(r["imported"][:10] if r["imported"] else "?"),
    ]


def _day(timestamp: str) -> str:
    """2027-01-01T00:00:00Z as 2027-01-01; another time of day as 2027-01-01 12:30 (UTC)."""
    day, _, time = timestamp.partition("T")
    return day if time in ("", "00:00:00Z") else f"{day} {time[:5]}"


@app.command()
def remove(
    spec: str = typer.Argument(..., metavar="NAME[@VERSION]", help="NAME@VERSION, or NAME when a single version is installed."),
    store: Optional[Path] = typer.Option(None, "--store", metavar="DIR", help=STORE_HELP),
) -> None:
    """Remove an installed bundle. The rollback high-water mark stays; unshared files are deleted."""
    target = existing_store(store)
    removed = target.remove(spec)
    console.print(
        f"removed {removed.name} v{removed.version}; the store still refuses "
        f"versions up to v{target.highest_version(removed.name)} of {removed.name}"
    )


@trust_app.command("add")
def trust_add(
    pub_file: Path = typer.Argument(..., metavar="PUBFILE", help="Public key (PEM) of a signer to trust."),
    name: Optional[str] = typer.Option(
        None, "--name", metavar="NAME", help="How to call this signer (default: the file name without .pub)."
    ),
    store: Optional[Path] = typer.Option(None, "--store", metavar="DIR", help=NEW_STORE_HELP),
) -> None:
    """Trust a signer's public key for import, verify and serve."""
    with new_or_existing_store(store) as target:
        key = target.add_trusted_key(pub_file, name)
    console.print(f"trusted {key.name} (key id {key.key_id})")


@trust_app.command("add-root")
def trust_add_root(
    root_file: Path = typer.Argument(..., metavar="ROOT.pem", help="CA certificate (PEM) whose certified signers to trust."),
    name: Optional[str] = typer.Option(None, "--name", metavar="NAME", help="How to call this root (default: the file name)."),
    require_eku: Optional[str] = typer.Option(
        None,
        "--require-eku",
        metavar="USAGE",
        help="Extended key usage the signer's certificate must have: codeSigning (the default rule when it has any), "
        "clientAuth, ... or a dotted OID.",
    ),
    subject: Optional[str] = typer.Option(
        None,
        "--subject",
        metavar="PATTERN",
        help="Shell-style pattern the signer's subject (RFC 4514, e.g. 'CN=*,OU=Model Approval,O=MoD') must match.",
    ),
    store: Optional[Path] = typer.Option(None, "--store", metavar="DIR", help=NEW_STORE_HELP),
) -> None:
    """Trust signers whose certificate chain builds to this root, checked offline at the signing time."""
    with new_or_existing_store(store) as target:
        root = target.add_trusted_root(root_file, name, require_eku, subject)
    rule = ", ".join(f"{k} {v}" for k, v in (("extended key usage", require_eku), ("subject", subject)) if v)
    console.print(
        f"trusted root {root.name}: {root.certificate.subject.rfc4514_string()} (sha256 {root.fingerprint})"
        + (f"; signers must have {rule}" if rule else ""),
        markup=False,
        soft_wrap=True,
    )


@crl_app.command("add")
def trust_crl_add(
    crl_file: Path = typer.Argument(..., metavar="FILE", help="Certificate revocation list (PEM or DER)."),
    issuer: Optional[Path] = typer.Option(
        None, "--issuer", metavar="CA.pem", help="The intermediate CA that signed the CRL, when a trusted root did not."
    ),
    store: Optional[Path] = typer.Option(None, "--store", metavar="DIR", help=STORE_HELP),
) -> None:
    """Hold a CRL: certificate signatures by a certificate it revokes no longer count. A newer CRL replaces an older one."""
    crl = existing_store(store).add_crl(crl_file, issuer)
    console.print(
        f"holding the CRL of {crl.issuer.rfc4514_string()} ({len(crl)} revoked certificate(s), "
        f"issued {crl.last_update_utc:%Y-%m-%dT%H:%M:%SZ})",
        markup=False,
        soft_wrap=True,
    )


@trust_app.command("list")
def trust_list(
    store: Optional[Path] = typer.Option(None, "--store", metavar="DIR", help=STORE_HELP),
    json_output: bool = typer.Option(False, "--json", help="Print the documented JSON document."),
) -> None:
    """The trusted keys, roots and CRLs, and the threshold."""
    target = existing_store(store)
    keys, roots, crls = target.trusted_keys(), target.trusted_roots(), target.crls()
    if json_output:
        print_json(
            {
                "threshold": target.threshold,
                "keys": [{"name": k.name, "key_id": k.key_id, "hint": k.hint, "curve": k.public_key.curve.name} for k in keys],
                "roots": [
                    {
                        "name": r.name,
                        "subject": r.certificate.subject.rfc4514_string(),
                        "sha256": r.fingerprint,
                        "require_eku": r.require_eku,
                        "subject_pattern": r.subject,
                    }
                    for r in roots
                ],
                "crls": [
                    {"issuer": c.issuer.rfc4514_string(), "revoked": len(c), "issued": f"{c.last_update_utc:%Y-%m-%dT%H:%M:%SZ}"}
                    for c in crls
                ],
            }
        )
        return
    for k in keys:
        console.print(f"{k.name}  key id {k.key_id}  {k.public_key.curve.name}")
    for r in roots:
        rule = " ".join(f"{k}={v}" for k, v in (("eku", r.require_eku), ("subject", r.subject)) if v)
        console.print(f"root {r.name}  {r.certificate.subject.rfc4514_string()}  {rule}", markup=False, soft_wrap=True)
    for c in crls:
        console.print(f"crl  {c.issuer.rfc4514_string()}  {len(c)} revoked", markup=False, soft_wrap=True)
    console.print(f"threshold: {target.threshold} of {len(keys)} trusted key(s) must have signed")


@trust_app.command("remove")
def trust_remove(
    name_or_id: str = typer.Argument(..., metavar="NAME_OR_ID", help="The signer's name or key id."),
    store: Optional[Path] = typer.Option(None, "--store", metavar="DIR", help=STORE_HELP),
) -> None:
    """Stop trusting a key. Bundles it accepted are refused by serve unless enough other trusted keys signed."""
    key = existing_store(store).remove_trusted_key(name_or_id)
    console.print(f"no longer trusted: {key.name} (key id {key.key_id})")


@trust_app.command("threshold")
def trust_threshold(
    threshold: int = typer.Argument(..., metavar="K", help="How many distinct trusted keys must have signed a bundle."),
    store: Optional[Path] = typer.Option(None, "--store", metavar="DIR", help=STORE_HELP),
) -> None:
    """Set the store's threshold (k of n)."""
    target = existing_store(store)
    target.set_threshold(threshold)
    count = len(target.trusted_keys())
    console.print(f"threshold set to {threshold} ({count} key(s) trusted)")
    if threshold > count and not target.trusted_roots():  # with a root, any number of certified signers may count
        console.print(
            f"[yellow]warning:[/] {threshold} signatures are required but only "
            f"{count} key(s) are trusted: add keys with `sovpack trust add`"
        )


@audit_app.command("verify")
def audit_verify(store: Optional[Path] = typer.Option(None, "--store", metavar="DIR", help=STORE_HELP)) -> None:
    """Check the hash chain of the audit log and its head witness; print the head digest to note down elsewhere."""
    target = existing_store(store)
    status = target.audit.verify_chain()
    console.print(f"audit log {target.audit.path}: {status.records} record(s), chain intact")
    console.print(f"head sha256 {status.head}")
    if syslog_target := target.syslog_target():
        console.print(f"copied to syslog {syslog_target}")


@audit_app.command("show")
def audit_show(
    store: Optional[Path] = typer.Option(None, "--store", metavar="DIR", help=STORE_HELP),
    json_output: bool = typer.Option(False, "--json", help="Print the records as a JSON array."),
) -> None:
    """Print the audit log."""
    from rich.markup import escape

    records = existing_store(store).audit.records()
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
    store: Optional[Path] = typer.Option(None, "--store", metavar="DIR", help=STORE_HELP),
) -> None:
    """Copy every audit record to the system log (RFC 5424) from now on, so that a copy exists outside the store."""
    chosen = None if target == "off" else target
    existing_store(store).set_syslog(chosen)
    console.print(f"audit records are copied to {chosen}" if chosen else "audit records are no longer copied to syslog")
