"""quantize: build quantized GGUF files inside a bundle with llama.cpp, recording how."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from sovpack.cli import app
from sovpack.cli.render import console, human_size

# Kept here so `sovpack --help` does not import the quantize module; a test checks they agree.
TYPES_HELP = "Q8_0, Q6_K, Q5_K_M, Q5_K_S, Q5_1, Q5_0, Q4_K_M, Q4_K_S, Q4_1, Q4_0, Q3_K_L, Q3_K_M, Q3_K_S, Q2_K"


@app.command()
def quantize(
    bundle: Path = typer.Argument(..., metavar="BUNDLE", help="Bundle directory holding the F32/F16/BF16 GGUF to quantize."),
    types: list[str] = typer.Option(
        ...,
        "--type",
        metavar="TYPE",
        help=f"Quantization type, as llama.cpp names it (case-insensitive); repeat for several: {TYPES_HELP}.",
    ),
    source: Optional[str] = typer.Option(
        None,
        "--source",
        metavar="FILE_IN_BUNDLE",
        help="GGUF to quantize, as a path inside the bundle (default: "
        "the bundle's only F32/F16/BF16 GGUF; for a split GGUF, its first part).",
    ),
    threads: Optional[int] = typer.Option(
        None, "--threads", metavar="N", help="CPU threads for llama.cpp (default: all cores available)."
    ),
    allow_requantize: bool = typer.Option(False, "--allow-requantize", help="Allow an already quantized source (loses quality)."),
    version: Optional[int] = typer.Option(
        None,
        "--version",
        metavar="N",
        help="Set the bundle version to N (not lower than the current one). "
        "Default: unchanged for an unsigned bundle, one up for a signed one.",
    ),
) -> None:
    """Quantize a GGUF of the bundle with llama.cpp and add the result to the bundle's inventory.

    Each output lands next to its source as MODEL-TYPE.gguf. sovpack checks the source's
    bytes against the inventory first, records the input digest, type, llama.cpp version and
    options for every output, and adds all outputs or none. The bundle must be signed again.
    """
    from sovpack.cli.progress_view import ProgressView
    from sovpack.quantize.build import quantize_bundle

    with ProgressView(console) as progress:
        result = quantize_bundle(
            bundle,
            types,
            source=source,
            threads=threads,
            allow_requantize=allow_requantize,
            version=version,
            progress=progress,
        )
    _report(bundle, result)


def _report(bundle: Path, result) -> None:
    from rich.markup import escape

    def say(text: str) -> None:
        console.print(text, soft_wrap=True)  # one line per fact, whatever the width: logs and scripts read these

    src = result.source
    say(f"source {escape(src.entry.path)} ({src.file_type or 'unknown type'}, {human_size(src.size)}) matches the inventory")
    for entry in result.outputs:
        qtype = entry.source["quantization"]
        say(
            f"quantized to {qtype}: {escape(entry.path)} ({human_size(entry.size)}, "
            f"sha256 {entry.sha256}) in {result.seconds[qtype]:.1f} s"
        )
    built_with = result.outputs[0].source
    say(
        f"llama.cpp {built_with.get('llama_cpp_version')} (commit {built_with.get('llama_cpp_commit')}), "
        f"llama-cpp-python {built_with.get('llama_cpp_python_version')}"
    )
    m = result.metadata
    version = f"v{result.previous_version} -> v{m.version}" if m.version != result.previous_version else f"v{m.version}"
    say(f"{escape(m.name)} {version}: sovpack.json rewritten with {len(result.outputs)} new file(s)")
    for sig in result.stale_signatures:
        say(f"[yellow]warning:[/] {escape(sig)} no longer covers this bundle (sovpack.json changed); its signer must sign again")
    if result.stale_signatures and m.version > result.previous_version:
        say(
            f"version raised because signed v{result.previous_version} may already have been exported "
            f"(pass --version {result.previous_version} to keep it)"
        )
    say(f"next: sovpack sign {escape(str(bundle))} --key KEYFILE")
