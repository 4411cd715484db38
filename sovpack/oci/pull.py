"""Pull: a bundle from an OCI registry into the store, installed only once fully verified, as `import` does.

1. read the manifest (pinned when the reference has a digest) and check its shape (layout.py);
2. fetch sovpack.json and check its digest; stop if this very bundle is installed, refuse a version
   not newer than the store's high-water mark, before any file moves;
3. the manifest must list exactly the files the signed sovpack.json lists, with the same digests;
4. fetch the signatures, then every file the store does not already hold (those it holds are
   hard-linked), each blob hashed as it streams (download.py), into
   STORE/tmp/pull-<first 16 hex of the manifest digest>/bundle; a failed download keeps its bytes
   there, and the next pull of the same manifest continues from them;
5. the full verification (signatures, threshold, inventory, digests, formats, expiry) and the atomic
   install are import's own (transfer.import_.StagedImport); a refusal discards the staging.

Every outcome is appended to the audit log as a `pull` event.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from sovpack.bundle.metadata import MAX_METADATA_BYTES, METADATA_FILE, BundleMetadata, parse_metadata
from sovpack.bundle.trust import TrustPolicy
from sovpack.common.files import require_free_space
from sovpack.common.hashing import ShardDigests, sha256_bytes
from sovpack.common.progress import Progress
from sovpack.errors import Refused, SovpackError
from sovpack.oci.client import RegistryClient
from sovpack.oci.download import download_blob
from sovpack.oci.layout import Layer, PulledManifest, parse_manifest
from sovpack.store.store import Store
from sovpack.transfer.import_ import ImportResult, StagedImport
from sovpack.transfer.import_workdir import ImportJob

MAX_SIGNATURE_BYTES = 1024 * 1024


@dataclass
class PullResult:
    imported: ImportResult
    manifest_digest: str
    fetched: int = 0  # files whose bytes came from the registry
    fetched_bytes: int = 0
    linked: int = 0  # files the store already held
    resumed: int = 0  # downloads that continued from bytes an earlier attempt kept


def pull_bundle(
    client: RegistryClient,
    store: Store,
    policy: TrustPolicy,
    *,
    allow_downgrade: bool = False,
    progress: Progress | None = None,
) -> PullResult:
    source = {"kind": "registry", "ref": str(client.ref)}
    staged = StagedImport(store, policy, source, event="pull", allow_downgrade=allow_downgrade, progress=progress)
    try:
        with client.errors():
            return _Puller(client, store, staged, source, progress or Progress()).run()
    except SovpackError as e:
        staged.audit_failure(e)
        raise


class _Puller:
    def __init__(self, client: RegistryClient, store: Store, staged: StagedImport, source: dict, progress: Progress):
        self.client, self.store, self.staged, self.source, self.progress = client, store, staged, source, progress
        self.where = f"the manifest of {client.ref}"

    def run(self) -> PullResult:
        self.progress.phase("reading the manifest")
        raw, _ = self.client.get_manifest()
        digest = "sha256:" + sha256_bytes(raw)
        if self.client.ref.digest and digest != self.client.ref.digest:
            raise Refused(
                f"the registry answered {self.client.ref} with a manifest whose digest is {digest}, not the one asked for"
            )
        self.source["manifest_digest"] = digest
        manifest = parse_manifest(raw, str(self.client.ref))
        raw_metadata = self._fetch_small(manifest.metadata, MAX_METADATA_BYTES)
        metadata = parse_metadata(raw_metadata)
        done = self.staged.check_version(metadata, raw_metadata)
        if done is not None:
            return PullResult(done, digest)
        manifest.check_against(metadata, self.where)
        signatures = {layer.path: self._fetch_small(layer, MAX_SIGNATURE_BYTES) for layer in manifest.signatures}
        result = PullResult(None, digest)  # type: ignore[arg-type]
        with ImportJob(self.store.tmp_dir / f"pull-{digest[7:23]}") as job:
            try:
                known = self._stage(job, manifest, metadata, {METADATA_FILE: raw_metadata, **signatures}, result)
                result.imported = self.staged.install(job.staging, known, result.fetched, result.linked)
            except Refused:
                job.remove()  # nothing of a refused artifact is kept
                raise
            job.remove()
        return result

    def _fetch_small(self, layer: Layer, limit: int) -> bytes:
        """sovpack.json or a signature, read whole and checked against its digest."""
        if layer.size > limit:
            raise Refused(f"{self.where} lists {layer.path} as {layer.size} bytes, more than the {limit} allowed")
        with self.client.open_blob(layer.digest) as response:
            if response.status_code == 404:
                raise Refused(
                    f"{self.where} lists {layer.path} as blob {layer.digest}, but the registry {self.client.ref.registry} does "
                    "not hold that blob: the artifact is incomplete; push it again"
                )
            self.client.check(response, f"the download of {layer.path} ({layer.digest})", 200)
            data = b""
            for chunk in response.iter_raw():
                data += chunk
                if len(data) > layer.size:
                    break
        if len(data) != layer.size or "sha256:" + sha256_bytes(data) != layer.digest:
            raise Refused(
                f"{layer.path}: the registry served blob {layer.digest} of {self.where} with other bytes (SHA-256 "
                f"{sha256_bytes(data)}, {len(data)} bytes); the blob is damaged or was altered in the registry"
            )
        return data

    def _stage(
        self, job: ImportJob, manifest: PulledManifest, metadata: BundleMetadata, small: dict[str, bytes], result: PullResult
    ) -> dict[str, ShardDigests]:
        staging = job.staging
        staging.mkdir(parents=True, exist_ok=True)
        for path, data in small.items():
            target = _target(staging, path)
            target.unlink(missing_ok=True)
            target.write_bytes(data)
        layers = {layer.path: layer for layer in manifest.files}
        signed = {entry.path: entry.digest for entry in metadata.files}
        to_fetch = []
        for entry in metadata.files:
            target = _target(staging, entry.path)
            if target.is_file() and target.stat().st_size == entry.size:
                continue  # fetched and checked by an earlier pull of this manifest; verification hashes it again
            held = self.store.find_object(entry.sha256, entry.size)
            if held is not None:
                target.unlink(missing_ok=True)
                os.link(held, target)
                result.linked += 1
            else:
                to_fetch.append(layers[entry.path])
        self._check_free_space(job.directory, sum(layer.size for layer in to_fetch), metadata)
        self.progress.phase(f"fetching from {self.client.ref.registry}", sum(layer.size for layer in to_fetch))
        known = {}
        for layer in to_fetch:
            partial = job.directory / "partial" / layer.sha256
            known[layer.path], resumed = download_blob(
                self.client, layer, signed[layer.path], partial, metadata.shard_size, self.progress, self.where
            )
            os.rename(partial, _target(staging, layer.path))
            result.fetched += 1
            result.fetched_bytes += layer.size
            result.resumed += resumed
        return known

    def _check_free_space(self, directory: Path, needed: int, metadata: BundleMetadata) -> None:
        require_free_space(
            directory,
            needed,
            lambda free: (
                f"the store at {self.store.root} has {free} bytes free but pulling {metadata.name} v{metadata.version} "
                f"needs {needed} more; free some space (`sovpack remove`) or pull into a larger --store"
            ),
        )


def _target(staging: Path, rel: str) -> Path:
    target = staging / rel
    target.parent.mkdir(parents=True, exist_ok=True)
    return target
