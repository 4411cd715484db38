"""keygen, pack, sign, verify, inspect."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from sovpack.cli import app
from sovpack.cli.options import STORE_HELP, THRESHOLD_HELP, TRUST_HELP, trust_store
from sovpack.cli.passwords import read_password
from sovpack.cli.render import console, err_console, human_size, print_json, warn_if_expired
from sovpack.cli.signing_keys import PIN_FILE_HELP, PKCS11_HELP, read_pin, signing_key
from sovpack.errors import UsageError


@app.command()
def keygen(
    name: str = typer.Argument(..., metavar="NAME", help="Key name: writes NAME.key (private, mode 0600) and NAME.pub."),
    dir: Path = typer.Option(Path("."), "--dir", metavar="DIR", help="Directory to write the key files into."),
    curve: str = typer.Option("p384", "--curve", metavar="p384|p256", help="p384 (default) or p256."),
    password_file: Optional[Path] = typer.Option(
        None, "--password-file", metavar="FILE", help="Encrypt the private key with the password in this file."
    ),
    pkcs11: Optional[str] = typer.Option(
        None, "--pkcs11", metavar="URI", help="Create the key on this PKCS#11 token instead (RFC 7512 URI); writes only NAME.pub."
    ),
    pin_file: Optional[Path] = typer.Option(None, "--pin-file", metavar="FILE", help=PIN_FILE_HELP),
) -> None:
    """Create an ECDSA signing key pair as PEM files, or on a token with --pkcs11. Never overwrites an existing key."""
    if pkcs11 is not None:
        from sovpack.bundle.pkcs11 import generate_token_key, parse_uri

        if password_file is not None:
            raise UsageError("--password-file encrypts a key file; a key made with --pkcs11 stays on the token")
        uri = parse_uri(pkcs11)
        key = generate_token_key(name, dir, uri, read_pin(pin_file, uri.token_name), curve.lower())
        console.print(
            f"key id {key.key_id}\nprivate key on {uri.token_name} ({uri.object_name}; it cannot be exported)"
            f"\npublic key  {key.public_path} (give it to verifiers)",
            markup=False,
        )
        return
    from sovpack.bundle.keys import generate_key_pair

    if pin_file is not None:
        raise UsageError("--pin-file goes with --pkcs11")
    key = generate_key_pair(name, dir, curve.lower(), read_password(password_file))
    console.print(
        f"key id {key.key_id}\nprivate key {key.private_path} (keep it "
        f"secret)\npublic key  {key.public_path} (give it to verifiers)"
    )


@app.command()
def pack(
    src: Path = typer.Argument(
        ..., metavar="SRC_DIR", help="Local model directory (safetensors or GGUF, config, tokenizer, ...)."
    ),
    out: Path = typer.Option(..., "--out", metavar="BUNDLE", help="New bundle directory to create."),
    name: str = typer.Option(..., "--name", metavar="NAME", help="Bundle name (letters, digits, '.', '_', '-')."),
    version: int = typer.Option(1, "--version", metavar="N", help="Bundle version; the store refuses to go back to a lower one."),
    expires: Optional[str] = typer.Option(
        None, "--expires", metavar="90d|DATE", help="Expiry: 90d, 2027-01-01 or 2027-01-01T00:00:00Z."
    ),
    allow_file: Optional[list[str]] = typer.Option(
        None,
        "--allow-file",
        metavar="GLOB",
        help="Carry files matching GLOB (whole bundle path, e.g. 'onnx/*.onnx') even though sovpack cannot check "
        "their kind, or Python wheels (e.g. 'wheels/*.whl'); recorded in the signed metadata and shown by inspect and "
        "verify. Pickles are refused regardless, except inside an allowed wheel (which installs code anyway). "
        "Repeatable.",
    ),
) -> None:
    """Turn a local model directory into an unsigned bundle (files copied or hard-linked).

    Every file must be of a kind sovpack checks by its bytes: safetensors, GGUF, SentencePiece, PNG/JPEG/GIF/WebP,
    JSON, Jinja or plain text; --allow-file carries other kinds and Python wheels. Pickles are always refused,
    except inside an allowed wheel.
    """
    from datetime import datetime, timezone

    from sovpack.bundle.describe import allowances
    from sovpack.bundle.metadata import parse_expiry
    from sovpack.bundle.pack import pack as pack_bundle

    now = datetime.now(timezone.utc)
    metadata, skipped = pack_bundle(
        src, out, name, version=version, expires=parse_expiry(expires, now), now=now, allowances=allow_file or []
    )
    for s in skipped:
        console.print(f"skipped {s} (git metadata)")
    warn_if_expired(metadata)
    _print_allowances(allowances(metadata), _wheels(metadata.to_json()["files"]))  # the allowances just recorded
    total = sum(f.size for f in metadata.files)
    console.print(f"packed {metadata.name} v{metadata.version}: {len(metadata.files)} files, {human_size(total)} -> {out}")
    console.print(f"next: sovpack sign {out} --key KEYFILE")


@app.command()
def sign(
    bundle: Path = typer.Argument(..., metavar="BUNDLE", help="Bundle directory."),
    key: Optional[Path] = typer.Option(None, "--key", metavar="KEYFILE", help="Private key (PEM) from `sovpack keygen`."),
    password_file: Optional[Path] = typer.Option(
        None, "--password-file", metavar="FILE", help="File holding the private key's password."
    ),
    pkcs11: Optional[str] = typer.Option(None, "--pkcs11", metavar="URI", help=PKCS11_HELP),
    pin_file: Optional[Path] = typer.Option(None, "--pin-file", metavar="FILE", help=PIN_FILE_HELP),
    cert: Optional[Path] = typer.Option(
        None,
        "--cert",
        metavar="CHAIN.pem",
        help="Sign as a certificate holder: the signer's certificate (for this key) first, then its intermediates.",
    ),
) -> None:
    """Check the bundle's files against its inventory, then add this key's signature (--key file or --pkcs11 token)."""
    from sovpack.bundle.sign import sign_bundle

    chain = None
    if cert is not None:
        from sovpack.bundle.certificates import load_certificates

        chain = load_certificates(cert, "--cert")
    with signing_key(key, password_file, pkcs11, pin_file) as private_key:
        result = sign_bundle(bundle, private_key, chain)
    action = "replaced the signature of" if result.replaced else "signed"
    who = f"as '{chain[0].subject.rfc4514_string()}' " if chain else ""
    console.print(
        f"{action} {result.metadata.name} v{result.metadata.version} {who}with key {result.key_id}: {result.path}", markup=False
    )
    for stale in result.stale:
        console.print(f"[yellow]warning:[/] {stale} no longer matches this bundle; its signer must sign again")


@app.command()
def verify(
    bundle: str = typer.Argument(
        ..., metavar="BUNDLE_OR_NAME[@V]", help="Bundle directory, or NAME[@VERSION] of a bundle installed in the store."
    ),
    trust: Optional[list[Path]] = typer.Option(None, "--trust", metavar="DIR_OR_PUBFILE", help=TRUST_HELP),
    threshold: Optional[int] = typer.Option(None, "--threshold", metavar="K", help=THRESHOLD_HELP),
    store: Optional[Path] = typer.Option(None, "--store", metavar="DIR", help=STORE_HELP),
    json_output: bool = typer.Option(False, "--json", help="Print the documented JSON report instead of a table."),
) -> None:
    """Check signatures, threshold, metadata, inventory, digests, formats and expiry, in that order."""
    from sovpack.store.target import choose_policy, find_target, is_bundle_path, verify_target

    # the store is read for an installed NAME, and for its trust when --trust is not given
    target_store = trust_store(trust if is_bundle_path(bundle) else None, store)
    target = find_target(bundle, target_store)
    report = verify_target(target, target_store, choose_policy(target_store, trust or (), threshold))
    if json_output:
        print_json(report.to_json())
    else:
        render_verify_report(report)
    if not report.ok:
        raise typer.Exit(1)


def render_verify_report(report) -> None:
    from rich.markup import escape
    from rich.table import Table

    m = report.metadata
    title = f"{m.name} v{m.version}" if m else report.bundle
    table = Table(title=f"verify {escape(title)}", title_justify="left")
    table.add_column("check")
    table.add_column("result")
    table.add_column("detail", overflow="fold")
    for step, detail in report.checks:
        table.add_row(step, "[green]ok[/]", escape(detail))
    if report.failure:
        table.add_row(report.failure.step, "[bold red]FAILED[/]", escape(str(report.failure)))
    console.print(table)
    _print_allowances(report.to_json()["allowed_files"], _wheels(report.to_json()["files"]))
    for s in report.signatures:
        who = f"{s.signer.name} ({s.key_id})" if s.signer else f"key {s.key_id}"
        if s.certificate:
            who = f"{_certificate_text(s.certificate)}, key {s.key_id}"
        verdict = {
            "valid": "[green]valid, trusted[/]",
            "stale": "[yellow]trusted, but signs another version of sovpack.json[/]",
            "rejected": f"[red]not counted: {escape(s.problem or '')}[/]",
        }.get(s.status, "[yellow]not in the trust set[/]")
        console.print(f"  {escape(s.file)}: {escape(who)} {verdict}", soft_wrap=True)
    # the verdict: one line however wide the terminal; a refusal on stderr, as every other refusal
    if report.ok:
        console.print(f"[bold green]VERIFIED[/] {escape(title)}", soft_wrap=True)
    else:
        err_console.print(f"[bold red]REFUSED[/] {escape(title)}: {escape(str(report.failure))}", soft_wrap=True)


@app.command()
def inspect(
    bundle: Path = typer.Argument(..., metavar="BUNDLE", help="Bundle directory."),
    json_output: bool = typer.Option(False, "--json", help="Print the documented JSON document."),
) -> None:
    """Show what a bundle holds (files, formats, sources, signatures) without keys or hashing."""
    from sovpack.bundle.describe import describe_bundle

    doc = describe_bundle(bundle)
    if json_output:
        print_json(doc)
        return
    render_description(doc)


def render_description(doc: dict) -> None:
    from rich.markup import escape
    from rich.table import Table

    expiry = doc["expires"] or "never"
    console.print(
        f"[bold]{escape(doc['name'])}[/] v{doc['version']}  created "
        f"{doc['created']}  expires {expiry}  ({human_size(doc['total_size'])})"
    )
    table = Table(show_header=True)
    for column in ("file", "size", "role", "format", "details", "source"):
        table.add_column(column, overflow="fold")
    for f in doc["files"]:
        table.add_row(
            escape(f["path"]),
            human_size(f["size"]),
            f["role"],
            f["format"],
            escape(_details(f.get("details"))),
            escape(_source(f.get("source"))),
        )
    console.print(table)
    _print_allowances(doc["allowed_files"], _wheels(doc["files"]))
    if not doc["signatures"]:
        console.print("signatures: none (unsigned)")
    for s in doc["signatures"]:
        state = (
            "covers this metadata"
            if s["covers_metadata"]
            else f"[yellow]does not cover this metadata[/] {escape(s['problem'] or '')}"
        )
        certificate = s.get("certificate")
        who = escape(_certificate_text(certificate)) + " " if certificate else ""
        console.print(f"signature {escape(s['file'])}: {who}key {s['key_id']} {state}", soft_wrap=True)


def _certificate_text(certificate: dict) -> str:
    return f"certificate {certificate['subject']} (issuer {certificate['issuer']}, serial {certificate['serial']})"


def _wheels(files: list[dict]) -> set[str]:
    return {f["path"] for f in files if f.get("format") == "wheel"}


def _print_allowances(allowances: list[dict], wheels: set[str]) -> None:
    """Each allowance and what it carries: Python wheels (validated as wheels), files of no kind sovpack checks."""
    from rich.markup import escape

    for a in allowances:
        carried = []
        if wheel_count := sum(1 for f in a["files"] if f in wheels):
            carried.append(
                f"{wheel_count} Python wheel(s) (validated as wheels; they install code, "
                "their members are not searched for pickles)"
            )
        if others := [f for f in a["files"] if f not in wheels]:
            carried.append(f"{', '.join(others)}, of no kind sovpack checks (pickle-checked only)")
        what = "; ".join(carried) or "no file"
        console.print(f"[yellow]allowance[/] --allow-file {escape(repr(a['glob']))} (signed): carries {escape(what)}")


def _details(details: dict | None) -> str:
    """One line for the inspector's details (read from an unsigned sovpack.json: any value may be of any type)."""
    if not isinstance(details, dict) or not details:
        return ""
    if "file_type" in details:
        types = details.get("tensor_types")
        counts = sorted(types.items(), key=lambda kv: -kv[1] if isinstance(kv[1], int) else 0) if isinstance(types, dict) else []
        mix = ", ".join(f"{count} {name}" for name, count in counts)
        parts = [
            details.get("architecture") or "?",
            details.get("file_type") or "type unknown",
            f"({mix})" if mix else "",
            f"ctx {details.get('context_length')}",
        ]
        if isinstance(details.get("chat_template_sha256"), str):
            parts.append(f"template {details['chat_template_sha256'][:12]}")
        return " ".join(str(p) for p in parts if p)
    if "image" in details:
        size = f" {details.get('width')}x{details.get('height')}" if "width" in details else ""
        return f"{details['image']} image{size}"
    if "pieces" in details:
        return f"{details['pieces']} pieces"
    if "wheel_version" in details:
        tags = details.get("tags")
        tags = ", ".join(map(str, tags)) if isinstance(tags, list) else tags
        return f"wheel {details.get('distribution')} {details.get('version')} ({tags}), {details.get('members')} members"
    dtypes = ",".join(map(str, details.get("dtypes", {}))) if isinstance(details.get("dtypes"), dict) else ""
    count = details.get("parameter_count")
    return f"{details.get('tensor_count')} tensors {dtypes} {f'{count:,}' if isinstance(count, int) else count} params"


def _source(source: dict | None) -> str:
    if not source:
        return ""
    if source.get("type") == "hub":
        return f"{source.get('repo')}@{str(source.get('commit'))[:12]}"
    if source.get("type") == "quantized":
        built_with = " ".join(str(v) for v in (source.get("llama_cpp_version"), source.get("llama_cpp_commit")) if v)
        return (
            f"quantized to {source.get('quantization')} from {source.get('input')} "
            f"(sha256 {str(source.get('input_sha256'))[:12]}) by llama.cpp {built_with or 'of unknown version'}"
        )
    return source.get("type", "")
