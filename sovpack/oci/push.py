"""Push: a signed bundle (installed in the store, or a directory) to an OCI registry as a ModelPack artifact.

1. check the bundle as `export` does: signed, unexpired, its files exactly those listed, at their sizes;
2. build the manifest and the ModelPack config (layout.py): one layer per file, digest = signed SHA-256;
3. for each blob the repository does not already hold (HEAD), a chunked upload (POST, PATCH per
   chunk, PUT with the digest); the registry refuses a blob whose bytes do not hash to the digest
   given, so a file that changed since it was signed never lands under its signed digest. An upload
   cut off mid-way continues from the byte the registry says it holds, in this run or the next (the
   upload locations are kept in STORE/tmp/push-<first 16 hex of SHA-256 of REGISTRY/REPO>/uploads.json);
4. the manifest last, under the tag (default: the bundle's version): nothing names the artifact
   until every blob it lists is in place.

Every push, done or not, is appended to the audit log as a `push` event.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx2

from sovpack.bundle.directory import read_metadata_bytes
from sovpack.bundle.metadata import BundleMetadata, parse_metadata
from sovpack.common.files import write_atomically
from sovpack.common.hashing import MIB, READ_SIZE, sha256_bytes
from sovpack.common.progress import Progress
from sovpack.errors import Failure, Refused, SovpackError, UsageError
from sovpack.oci.client import RegistryClient, UploadOutOfStep
from sovpack.oci.layout import Artifact, Layer, build_artifact, read_signatures
from sovpack.store.store import Store
from sovpack.store.target import find_target
from sovpack.transfer.export import check_exportable

DEFAULT_CHUNK_SIZE = 64 * MIB
MAX_ATTEMPTS = 3


@dataclass
class PushResult:
    ref: str  # REGISTRY/REPO:TAG@DIGEST
    manifest_digest: str
    name: str
    version: int
    sent: list[str] = field(default_factory=list)  # paths whose blobs were uploaded
    present: list[str] = field(default_factory=list)  # already in the repository
    sent_bytes: int = 0
    resumed: int = 0  # uploads that continued one an earlier attempt left
    warnings: tuple[str, ...] = ()


def bundle_root(source: str, store: Store) -> Path:
    """NAME[@VERSION] installed in the store, or a bundle directory."""
    return find_target(source, store).path


def push_bundle(
    root: Path, client: RegistryClient, store: Store, *, chunk_size: int = DEFAULT_CHUNK_SIZE, progress: Progress | None = None
) -> PushResult:
    if client.ref.digest:
        raise UsageError(f"{client.ref}: push to a tag, not a digest (the digest is the manifest's, known once it is written)")
    audit: dict = {"ref": str(client.ref), "source": str(root)}
    try:
        checked = check_exportable(root)
        raw = read_metadata_bytes(root)
        audit |= {"name": checked.metadata.name, "version": checked.metadata.version, "metadata_sha256": sha256_bytes(raw)}
        with client.errors():
            result = _Pusher(client, store, chunk_size, progress or Progress()).run(
                checked.metadata, raw, root, checked.signatures
            )
        result.warnings = checked.warnings
    except SovpackError as e:
        if e.exit_code != 2 or "name" in audit:
            _audit(
                store,
                audit | {"outcome": "refused" if e.exit_code == 1 else "failed", "reason": str(e), "exit_code": e.exit_code},
            )
        raise
    _audit(
        store,
        audit
        | {
            "outcome": "pushed",
            "ref": result.ref,
            "manifest_digest": result.manifest_digest,
            "sent": len(result.sent),
            "present": len(result.present),
            "sent_bytes": result.sent_bytes,
        },
    )
    return result


def _audit(store: Store, fields: dict) -> None:
    try:
        store.audit.append("push", **fields)
    except OSError:
        pass  # a full disk must not hide the original outcome


class _Pusher:
    def __init__(self, client: RegistryClient, store: Store, chunk_size: int, progress: Progress):
        self.client, self.chunk_size, self.progress = client, chunk_size, progress
        key = sha256_bytes(f"{client.ref.registry}/{client.ref.repository}".encode())[:16]
        self.journal_path = store.tmp_dir / f"push-{key}" / "uploads.json"

    def run(self, metadata: BundleMetadata, raw: bytes, root: Path, signatures: list[str]) -> PushResult:
        artifact = build_artifact(parse_metadata(raw), raw, read_signatures(root, signatures))
        tag = self.client.ref.tag or str(metadata.version)
        result = PushResult("", artifact.manifest_digest, metadata.name, metadata.version)
        small = {artifact.config_digest: artifact.config} | {
            layer.digest: (root / layer.path).read_bytes() for layer in artifact.layers if layer.path not in _files(metadata)
        }
        self.progress.phase("checking what the registry holds")
        missing = [layer for layer in _blobs(artifact) if self.client.blob_size(layer.digest) != layer.size]
        result.present = [layer.path for layer in _blobs(artifact) if layer not in missing and layer.path]
        self.progress.phase(f"pushing to {self.client.ref.registry}", sum(layer.size for layer in missing))
        for layer in missing:
            data = small.get(layer.digest)
            result.resumed += self._upload(layer, root / layer.path if data is None else None, data)
            if layer.path:
                result.sent.append(layer.path)
            result.sent_bytes += layer.size
        said = self.client.put_manifest(tag, artifact.manifest)
        if said and said != artifact.manifest_digest:
            raise Failure(f"the registry stored the manifest under {said}, not {artifact.manifest_digest}, its SHA-256")
        ref = self.client.ref.with_tag(tag)
        result.ref = f"{ref}@{artifact.manifest_digest}"
        return result

    def _upload(self, layer: Layer, path: Path | None, data: bytes | None) -> bool:
        """One blob, chunk by chunk; whether it continued an upload an earlier attempt left."""
        journal = self._journal()
        start = self.client.upload_offset(journal[layer.digest]) if layer.digest in journal else None
        location, offset = start or (self.client.start_upload(), 0)
        resumed = offset > 0
        self.progress.advance(offset)
        failures = 0
        while offset < layer.size:
            length = min(self.chunk_size, layer.size - offset)
            try:
                location = self.client.upload_chunk(location, offset, length, _body(path, data, offset, length))
                offset += length
                failures = 0
                self.progress.advance(length)
                self._remember(layer.digest, location)
            except (httpx2.TransportError, UploadOutOfStep) as e:
                if isinstance(e, httpx2.ConnectError) and "CERTIFICATE_VERIFY_FAILED" in str(e):
                    raise
                failures += 1
                if failures >= MAX_ATTEMPTS:
                    raise Failure(
                        f"uploading {layer.path or 'the ModelPack config'} ({layer.digest}) to {self.client.ref.registry} failed "
                        f"{failures} times in a row ({e or type(e).__name__}) after {offset} of {layer.size} bytes: run the same "
                        "push again to continue from there"
                    ) from None
                where = self.client.upload_offset(location)
                before = offset
                location, offset = where or (self.client.start_upload(), 0)
                resumed = resumed or offset > 0
                self.progress.advance(offset - before)
        response = self.client.finish_upload(location, layer.digest)
        if response.status_code == 400 and b"DIGEST_INVALID" in response.read():
            self._forget(layer.digest)
            raise Refused(
                f"{path}: the registry {self.client.ref.registry} found that its bytes do not hash to {layer.digest}, "
                "the SHA-256 the bundle's signed sovpack.json lists: the file changed after it was signed; nothing was pushed "
                "under that digest"
            )
        self.client.check(response, f"the end of the upload of {layer.path or 'the ModelPack config'}", 201)
        self._forget(layer.digest)
        return resumed

    def _journal(self) -> dict:
        try:
            return json.loads(self.journal_path.read_bytes())
        except (OSError, ValueError):
            return {}

    def _remember(self, digest: str, location: str) -> None:
        journal = self._journal()
        journal[digest] = location
        self.journal_path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(self.journal_path, json.dumps(journal).encode())

    def _forget(self, digest: str) -> None:
        journal = self._journal()
        if journal.pop(digest, None) is not None:
            write_atomically(self.journal_path, json.dumps(journal).encode())


def _files(metadata: BundleMetadata) -> set[str]:
    return {f.path for f in metadata.files}


def _blobs(artifact: Artifact) -> list[Layer]:
    """Every blob the manifest names: the layers, and the config (path "")."""
    return [*artifact.layers, Layer("", artifact.config_digest, len(artifact.config), "")]


def _body(path: Path | None, data: bytes | None, offset: int, length: int):
    def blocks() -> Iterator[bytes]:
        if data is not None:
            yield data[offset : offset + length]
            return
        with open(path, "rb") as f:
            f.seek(offset)
            left = length
            while left:
                block = f.read(min(READ_SIZE, left))
                if not block:
                    raise Failure(f"{path} became shorter while it was being pushed")
                left -= len(block)
                yield block

    return blocks
