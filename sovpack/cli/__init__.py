"""The command line: Typer commands that parse, call one core function, and render with rich.

Command modules register themselves on `app`; heavy libraries are imported inside the
commands that need them so that `sovpack --help` and `sovpack verify` start fast.

- commands, one module per stage: `bundle_commands` (keygen, pack, sign, verify, inspect),
  `fetch_commands`, `quantize_commands`, `transfer_commands` (export, check-volumes, import),
  `oci_commands` (push, pull), `deploy_commands` (deploy kubernetes), `store_commands` (list, remove,
  trust, audit), `serve_commands`, `runtime_commands` (runtime build, install, rollback, list)
- shared: `command` (usage lines and one-line usage errors), `options` (help texts, which
  commands need an existing store), `passwords` (the one password prompt), `render` (consoles,
  JSON), `progress_view` (the one renderer of the progress protocol, common/progress.py)
"""

from __future__ import annotations

import importlib
import signal

import typer

from sovpack import __version__
from sovpack.cli.command import Typer
from sovpack.errors import Interrupted, SovpackError

app = Typer(
    name="sovpack",
    help="Carry open-weight models across an air gap, with proof that every byte is the one approved.\n\n"
    "Exit codes: 0 success; 1 refused (integrity, signature, trust, policy or format check failed); "
    "2 usage error; 3 any other failure (I/O, network, missing dependency); 130 interrupted.",
    no_args_is_help=True,
    context_settings={"help_option_names": ["-h", "--help"]},
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"sovpack {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
) -> None:
    pass


# Each module registers its commands on `app`; this order is the order of `sovpack --help`:
# the trip from the Hub to the server.
COMMAND_MODULES = (
    "bundle_commands",
    "fetch_commands",
    "quantize_commands",
    "transfer_commands",
    "oci_commands",
    "deploy_commands",
    "store_commands",
    "serve_commands",
    "runtime_commands",
)
for _module in COMMAND_MODULES:
    importlib.import_module(f"sovpack.cli.{_module}")


def _interrupt(signum, frame):
    raise Interrupted("interrupted; nothing half-written was left in place")


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the documented exit code."""
    from typer._click import exceptions as click_errors

    from sovpack.cli.render import print_error, print_usage_error

    previous = signal.signal(signal.SIGINT, _interrupt)
    try:
        code = app(args=argv, prog_name="sovpack", standalone_mode=False)  # Typer returns the code of typer.Exit
    except click_errors.NoArgsIsHelpError as e:  # `sovpack`, `sovpack trust`: the help, as a usage error
        typer.echo(e.ctx.get_help())
        return 2
    except click_errors.UsageError as e:  # bad option, missing argument, unknown command: one line, as ours
        print_usage_error(e.format_message(), e.ctx)
        return 2
    except click_errors.ClickException as e:
        print_error(e.format_message())
        return 3
    except typer.Abort:  # end of input at a prompt
        print_error("aborted: no input")
        return 130
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    except SovpackError as e:
        print_error(str(e))
        return e.exit_code
    except OSError as e:
        where = f" ({e.filename})" if e.filename else ""
        print_error(f"I/O error{where}: {e.strerror or e}")
        return 3
    finally:
        signal.signal(signal.SIGINT, previous)
    return code if isinstance(code, int) else 0
