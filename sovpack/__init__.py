"""sovpack: carry open-weight language models across an air gap, with proof.

The library API: the entry points a script calls, and their result types. Each is imported on
first use, so `import sovpack` stays as light as `sovpack --help` (docs/library.md).

Connected side: `generate_key_pair`, `pack`, `fetch_bundle` (with `FetchRequest`), `quantize_bundle`,
`sign_bundle`, `export_volumes`. Secure side: `Store`, `load_trust`, `verify_bundle`,
`check_volumes`, `import_bundle`. Anywhere: `describe_bundle` (what `inspect` shows).
Failures raise the subclasses of `SovpackError`: `Refused` (a check failed: exit code 1),
`UsageError` (2), `Failure` (3), `Interrupted` (130).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

_EXPORTS = {
    # connected side
    "generate_key_pair": "sovpack.bundle.keys",
    "GeneratedKey": "sovpack.bundle.keys",
    "load_private_key": "sovpack.bundle.keys",
    "pack": "sovpack.bundle.pack",
    "FetchRequest": "sovpack.fetch.spec",
    "load_spec": "sovpack.fetch.spec",
    "fetch_bundle": "sovpack.fetch.download:fetch",  # not `fetch`: that name is the sovpack.fetch package
    "FetchResult": "sovpack.fetch.download",
    "quantize_bundle": "sovpack.quantize.build",
    "QuantizeResult": "sovpack.quantize.build",
    "sign_bundle": "sovpack.bundle.sign",
    "SignResult": "sovpack.bundle.sign",
    "export_volumes": "sovpack.transfer.export",
    "ExportResult": "sovpack.transfer.export",
    # secure side
    "Store": "sovpack.store.store",
    "InstalledBundle": "sovpack.store.store",
    "load_trust": "sovpack.bundle.trust",
    "TrustPolicy": "sovpack.bundle.trust",
    "verify_bundle": "sovpack.bundle.verify",
    "VerifyReport": "sovpack.bundle.verify",
    "check_volumes": "sovpack.transfer.volume_check",
    "VolumeReport": "sovpack.transfer.volume_check",
    "import_bundle": "sovpack.transfer.import_",
    "ImportResult": "sovpack.transfer.import_",
    # anywhere
    "BundleMetadata": "sovpack.bundle.metadata",
    "describe_bundle": "sovpack.bundle.describe",
    "Progress": "sovpack.common.progress",
    "SovpackError": "sovpack.errors",
    "Refused": "sovpack.errors",
    "UsageError": "sovpack.errors",
    "Failure": "sovpack.errors",
    "Interrupted": "sovpack.errors",
}

__all__ = [  # the same names as _EXPORTS (a test keeps them together), spelled out for linters and type checkers
    "__version__",
    "generate_key_pair",
    "GeneratedKey",
    "load_private_key",
    "pack",
    "FetchRequest",
    "load_spec",
    "fetch_bundle",
    "FetchResult",
    "quantize_bundle",
    "QuantizeResult",
    "sign_bundle",
    "SignResult",
    "export_volumes",
    "ExportResult",
    "Store",
    "InstalledBundle",
    "load_trust",
    "TrustPolicy",
    "verify_bundle",
    "VerifyReport",
    "check_volumes",
    "VolumeReport",
    "import_bundle",
    "ImportResult",
    "BundleMetadata",
    "describe_bundle",
    "Progress",
    "SovpackError",
    "Refused",
    "UsageError",
    "Failure",
    "Interrupted",
]


def __getattr__(name: str):
    where = _EXPORTS.get(name)
    if where is None:
        raise AttributeError(f"module 'sovpack' has no attribute {name!r}")
    module, _, attr = where.partition(":")
    value = getattr(importlib.import_module(module), attr or name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


if TYPE_CHECKING:  # what type checkers and IDEs see; at run time each name is imported on first use
    from sovpack.bundle.describe import describe_bundle
    from sovpack.bundle.keys import GeneratedKey, generate_key_pair, load_private_key
    from sovpack.bundle.metadata import BundleMetadata
    from sovpack.bundle.pack import pack
    from sovpack.bundle.sign import SignResult, sign_bundle
    from sovpack.bundle.trust import TrustPolicy, load_trust
    from sovpack.bundle.verify import VerifyReport, verify_bundle
    from sovpack.common.progress import Progress
    from sovpack.errors import Failure, Interrupted, Refused, SovpackError, UsageError
    from sovpack.fetch.download import FetchResult
    from sovpack.fetch.download import fetch as fetch_bundle
    from sovpack.fetch.spec import FetchRequest, load_spec
    from sovpack.quantize.build import QuantizeResult, quantize_bundle
    from sovpack.store.store import InstalledBundle, Store
    from sovpack.transfer.export import ExportResult, export_volumes
    from sovpack.transfer.import_ import ImportResult, import_bundle
    from sovpack.transfer.volume_check import VolumeReport, check_volumes
