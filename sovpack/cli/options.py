"""What several commands share: the help texts of their common options, one wording everywhere, and the store --store names."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

STORE_HELP = "Store directory (default $SOVPACK_HOME or the platform data directory); it must exist."
NEW_STORE_HELP = "Store directory (default $SOVPACK_HOME or the platform data directory); created if there is none."
THRESHOLD_HELP = (
    "How many distinct trusted signers (keys, certificate subjects) must have signed (default 1 with --trust, else the "
    "store's threshold)."
)
TRUST_HELP = "Trusted public key (.pub) or a directory of them; repeat for several. Default: the store's trusted keys and roots."


def existing_store(root: Path | None):
    """The store a command reads or changes; a usage error when it does not exist (a mistyped path is not an empty store)."""
    from sovpack.store.store import Store

    return Store.existing(root)


def trust_store(trust, root: Path | None):
    """The store whose trust `choose_policy` reads: it must exist unless keys were given with --trust."""
    from sovpack.store.store import Store

    return Store(root) if trust else Store.existing(root)


@contextmanager
def new_or_existing_store(root: Path | None) -> Iterator:
    """The store `trust add`, `trust add-root`, `import` and `pull` write to, which they create when there is none.

    Says so on stderr once it exists, so a mistyped --store does not pass unseen, while a command refused
    before writing anything (a bad key file, no index) neither creates a store nor says it did.
    """
    from sovpack.cli.render import err_console
    from sovpack.store.store import Store

    store = Store(root)
    if store.root.exists():
        yield Store.existing(root)  # refuses a path that is not a directory
        return
    try:
        yield store
    finally:
        if store.root.is_dir():
            err_console.print(f"created a new store at {store.root}", soft_wrap=True, markup=False)
