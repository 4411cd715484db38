"""Push: a signed bundle (installed in the store, or a directory) to an OCI registry as a ModelPack artifact.

1. check the bundle as `export` does: signed, unexpired, its files exactly those listed, at their sizes;
2. build the manifest and the ModelPack config (layout.py): one layer per file, digest = signed SHA-256;
3. for each blob the repository does not already hold (HEAD), a chunked upload (POST, PATCH per
   chunk, PUT with the digest); the registry refuses a blob whose bytes do not hash to the digest
   given, so a file that changed since it was signed never lands under its signed digest. An upload
   cut off mid-way continues from the byte the registry says it holds, or afresh when the registry
   cancelled it (upload.py), in this run or the next (the upload locations are kept in
   STORE/tmp/push-<first 16 hex of SHA-256 of REGISTRY/REPO>/uploads.json);
4. the manifest last, under the tag (default: the bundle's version): nothing names the artifact
   until every blob it lists is in place.

Every push, done or not, is appended to the audit log as a `push` event.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from sovpack.bundle.directory import read_metadata_bytes
from sovpack.bundle.metadata import BundleMetadata, parse_metadata
from sovpack.common.hashing import MIB, sha256_bytes
from sovpack.common.progress import Progress
from sovpack.errors import Failure, SovpackError, UsageError
from sovpack.oci.client import RegistryClient
from sovpack.oci.layout import Artifact, Layer, build_artifact, read_signatures
from sovpack.oci.upload import BlobSource, BlobUpload, UploadJournal
from sovpack.store.store import Store
from sovpack.store.target import find_target
from sovpack.transfer.export import check_exportable

DEFAULT_CHUNK_SIZE = 64 * MIB


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
        self.journal = UploadJournal(store.tmp_dir / f"push-{key}" / "uploads.json")

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
        """One blob, chunk by chunk (upload.py); whether it continued an upload an earlier push left."""
        source = BlobSource(layer, path, data)
        return BlobUpload(self.client, source, self.chunk_size, self.progress, self.journal).run()


def _files(metadata: BundleMetadata) -> set[str]:
    return {f.path for f in metadata.files}


def _blobs(artifact: Artifact) -> list[Layer]:
    """Every blob the manifest names: the layers, and the config (path "")."""
    return [*artifact.layers, Layer("", artifact.config_digest, len(artifact.config), "")]
