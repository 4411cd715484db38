"""Manifests as YAML files in a new directory, all or none (or as one multi-document stream, for `kubectl apply -f -`)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import yaml

from sovpack.common.files import fsync_dir, remove_tree
from sovpack.errors import UsageError


class _Dumper(yaml.SafeDumper):
    def ignore_aliases(self, data) -> bool:
        return True  # every value written out in full: no &anchors and *aliases for a reviewer to follow


def to_yaml(manifest: dict, header: str) -> str:
    body = yaml.dump(manifest, Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=130)
    return "".join(f"# {line}\n" for line in header.splitlines()) + body


def write_directory(out: Path, files: dict[str, dict], header: str, *, replace: bool = False) -> None:
    """Write every manifest into a fresh directory, then rename it to `out`; an existing `out` is replaced only with `replace`."""
    if out.exists() and not replace:
        raise UsageError(f"{out} already exists: choose another --out, or give --force to replace it")
    if out.exists() and not out.is_dir():
        raise UsageError(f"{out} exists and is not a directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        for name, manifest in files.items():
            with open(staging / name, "w") as f:
                f.write(to_yaml(manifest, header))
                f.flush()
                os.fsync(f.fileno())
        os.chmod(staging, 0o755)
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
            os.rename(out, old / out.name)
            os.rename(staging, out)
            remove_tree(old)
        else:
            os.rename(staging, out)
        fsync_dir(out.parent)
    except BaseException:
        if staging.exists():
            remove_tree(staging)
        raise


def to_stream(files: dict[str, dict], header: str) -> str:
    """One multi-document YAML stream, each document headed by the file name it would have."""
    return "---\n".join(to_yaml(m, f"{header}\n{name}" if i == 0 else name) for i, (name, m) in enumerate(files.items()))
