"""How sovpack's commands show their usage: `sovpack verify [OPTIONS] BUNDLE_OR_NAME[@V]`, as the README writes it.

Typer 0.27 writes a required argument as `{bundle}` in usage lines and the type of an option
without a metavar as `<str>`. Every argument and option of sovpack names its metavar (BUNDLE,
DIR, FILE, N, ...); these classes make the usage line use them as they are.
"""

from __future__ import annotations

import typer
from typer.core import TyperArgument, TyperCommand


class Command(TyperCommand):
    def collect_usage_pieces(self, ctx) -> list[str]:
        pieces = [self.options_metavar] if self.options_metavar else []
        return pieces + [_usage_piece(p) for p in self.get_params(ctx) if isinstance(p, TyperArgument) and not p.hidden]


def _usage_piece(argument: TyperArgument) -> str:
    piece = argument.metavar or (argument.name or "").upper()
    if argument.nargs != 1:
        piece += "..."
    return piece if argument.required else f"[{piece}]"


class Typer(typer.Typer):
    """A Typer whose commands are `Command`s, and whose help is plain text (no type column, no boxes)."""

    def __init__(self, **kwargs):
        super().__init__(rich_markup_mode=None, **kwargs)

    def command(self, *args, cls=None, **kwargs):
        return super().command(*args, cls=cls or Command, **kwargs)
