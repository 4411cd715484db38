"""A bundle as an OCI artifact in the CNCF ModelPack layout (docs/oci.md), and the checks on one read back.

One OCI image manifest (artifactType `application/vnd.cncf.model.manifest.v1+json`) whose config is
a ModelPack model config and whose layers are the bundle's files, one raw layer per file, named by
the ModelPack `org.cncf.model.filepath` annotation. A raw layer's digest is the file's SHA-256, the
very digest sovpack.json lists and the signatures cover: the registry stores each file once, under
its signed digest, and content addressing does the rest (only missing blobs move). sovpack.json and
the signature files travel as two more layers of sovpack's and Sigstore's own media types, so that
a pull gets everything it verifies from one manifest, and any OCI tool copies all of it.

A manifest read from a registry is untrusted input: its size, shape, digests and paths are checked
here before anything is fetched, and what it lists must be exactly what the signed sovpack.json lists.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from sovpack.bundle.directory import is_signature_path
from sovpack.bundle.metadata import METADATA_FILE, BundleMetadata, FileEntry, format_time
from sovpack.bundle.signature import BUNDLE_MEDIA_TYPE as SIGSTORE_BUNDLE
from sovpack.common import safe_json
from sovpack.common.hashing import sha256_bytes
from sovpack.common.jsonfields import HEX64
from sovpack.common.safepath import check_safe_path
from sovpack.errors import Refused

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MODEL_ARTIFACT = "application/vnd.cncf.model.manifest.v1+json"
MODEL_CONFIG = "application/vnd.cncf.model.config.v1+json"
WEIGHT = "application/vnd.cncf.model.weight.v1.raw"
WEIGHT_CONFIG = "application/vnd.cncf.model.weight.config.v1.raw"
DOC = "application/vnd.cncf.model.doc.v1.raw"
SOVPACK_METADATA = "application/vnd.sovpack.bundle.metadata.v1+json"
FILEPATH = "org.cncf.model.filepath"

MAX_MANIFEST_BYTES = 4 * 1024 * 1024  # what the distribution registry itself accepts
_MEDIA_TYPE_OF_ROLE = {
    "weights": WEIGHT,
    "license": DOC,
    "documentation": DOC,
}


@dataclass(frozen=True)
class Layer:
    path: str  # inside the bundle
    digest: str  # sha256:HEX
    size: int
    media_type: str

    @property
    def sha256(self) -> str:
        return self.digest.removeprefix("sha256:")

    def descriptor(self) -> dict:
        return {"mediaType": self.media_type, "digest": self.digest, "size": self.size, "annotations": {FILEPATH: self.path}}


@dataclass(frozen=True)
class Artifact:
    """What a push uploads: the config blob, the layers (files of the bundle) and the manifest naming them."""

    config: bytes
    layers: list[Layer]
    manifest: bytes

    @property
    def config_digest(self) -> str:
        return "sha256:" + sha256_bytes(self.config)

    @property
    def manifest_digest(self) -> str:
        return "sha256:" + sha256_bytes(self.manifest)


def media_type_of(entry: FileEntry) -> str:
    return _MEDIA_TYPE_OF_ROLE.get(entry.role, WEIGHT_CONFIG)


def build_artifact(metadata: BundleMetadata, raw_metadata: bytes, signatures: dict[str, bytes]) -> Artifact:
    """The manifest and ModelPack config of a bundle whose sovpack.json is `raw_metadata`, with its signature files."""
    layers = [Layer(f.path, "sha256:" + f.sha256, f.size, media_type_of(f)) for f in metadata.files]
    layers.append(Layer(METADATA_FILE, "sha256:" + sha256_bytes(raw_metadata), len(raw_metadata), SOVPACK_METADATA))
    layers += [Layer(p, "sha256:" + sha256_bytes(b), len(b), SIGSTORE_BUNDLE) for p, b in sorted(signatures.items())]
    config = _model_config(metadata, layers)
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": MODEL_ARTIFACT,
        "config": {"mediaType": MODEL_CONFIG, "digest": "sha256:" + sha256_bytes(config), "size": len(config)},
        "layers": [layer.descriptor() for layer in layers],
        "annotations": {
            "org.opencontainers.image.title": metadata.name,
            "org.opencontainers.image.version": str(metadata.version),
            "org.opencontainers.image.created": format_time(metadata.created),
        },
    }
    return Artifact(config, layers, json.dumps(manifest, indent=2).encode())


def _model_config(metadata: BundleMetadata, layers: list[Layer]) -> bytes:
    formats = sorted({f.format for f in metadata.files if f.role == "weights"})
    descriptor = {"name": metadata.name, "version": str(metadata.version), "createdAt": format_time(metadata.created)}
    revisions = [s.get("commit") for s in metadata.sources if isinstance(s, dict) and s.get("commit")]
    if len(revisions) == 1:
        descriptor["revision"] = revisions[0]
    config = {
        "descriptor": descriptor,
        "config": {"format": ",".join(formats)} if formats else {},
        "modelfs": {"type": "layers", "diffIds": [layer.digest for layer in layers]},
    }
    return json.dumps(config, indent=2).encode()


@dataclass(frozen=True)
class PulledManifest:
    """A manifest read back from a registry, checked for shape: the bundle's files, its sovpack.json and its signatures."""

    files: list[Layer]
    metadata: Layer
    signatures: list[Layer]

    def check_against(self, metadata: BundleMetadata, where: str) -> None:
        """Every file the signed sovpack.json lists has its layer (same digest and size); nothing else is listed."""
        listed = {layer.path: layer for layer in self.files}
        for entry in metadata.files:
            layer = listed.pop(entry.path, None)
            if layer is None:
                raise Refused(f"{where} has no layer for {entry.path}, which the signed {METADATA_FILE} lists")
            if (layer.sha256, layer.size) != (entry.sha256, entry.size):
                raise Refused(
                    f"{where} lists {entry.path} as {layer.digest} ({layer.size} bytes) but the signed {METADATA_FILE} "
                    f"says sha256:{entry.sha256} ({entry.size} bytes)"
                )
        if listed:
            raise Refused(f"{where} has layers the signed {METADATA_FILE} does not list: {', '.join(sorted(listed))}")


def parse_manifest(raw: bytes, where: str) -> PulledManifest:
    """Check a manifest read from a registry (untrusted) and sort its layers; Refused names what is wrong."""
    if len(raw) > MAX_MANIFEST_BYTES:
        raise Refused(f"the manifest of {where} is larger than {MAX_MANIFEST_BYTES} bytes")
    try:
        doc = safe_json.loads(raw, max_bytes=MAX_MANIFEST_BYTES)
    except ValueError as e:  # UnsafeJson and UnicodeDecodeError included
        raise Refused(f"the manifest of {where} is not valid JSON ({e})") from None
    if not isinstance(doc, dict) or doc.get("mediaType", OCI_MANIFEST) != OCI_MANIFEST or doc.get("schemaVersion") != 2:
        raise Refused(f"the manifest of {where} is not an OCI image manifest ({OCI_MANIFEST}, schemaVersion 2)")
    config = doc.get("config")
    config_type = config.get("mediaType") if isinstance(config, dict) else None
    if doc.get("artifactType") != MODEL_ARTIFACT and config_type != MODEL_CONFIG:
        raise Refused(
            f"{where} is not a ModelPack model artifact (artifactType {doc.get('artifactType')!r}); "
            "was it pushed by `sovpack push`?"
        )
    layers = doc.get("layers")
    if not isinstance(layers, list) or not layers:
        raise Refused(f"the manifest of {where} lists no layers")
    files, metadata, signatures, seen = [], [], [], set()
    for i, descriptor in enumerate(layers):
        layer = _layer(descriptor, f"layers[{i}] of the manifest of {where}")
        if layer.path in seen:
            raise Refused(f"the manifest of {where} lists {layer.path} twice")
        seen.add(layer.path)
        if layer.path == METADATA_FILE:
            metadata.append(layer)
        elif is_signature_path(layer.path):
            signatures.append(layer)
        else:
            files.append(layer)
    if not metadata:
        raise Refused(f"the manifest of {where} has no {METADATA_FILE} layer: it is not a sovpack bundle")
    if not signatures:
        raise Refused(f"the manifest of {where} has no signature layer (signatures/*.sig): the bundle is unsigned")
    return PulledManifest(files, metadata[0], signatures)


def _layer(descriptor: object, where: str) -> Layer:
    if not isinstance(descriptor, dict):
        raise Refused(f"{where} is not a JSON object")
    digest, size, media_type = descriptor.get("digest"), descriptor.get("size"), descriptor.get("mediaType")
    annotations = descriptor.get("annotations") or {}
    path = annotations.get(FILEPATH) if isinstance(annotations, dict) else None
    if not isinstance(digest, str) or not digest.startswith("sha256:") or not HEX64.match(digest[7:]):
        raise Refused(f"{where}: digest {digest!r} is not sha256: and 64 lowercase hex digits")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise Refused(f"{where}: size {size!r} is not a number of bytes")
    if not isinstance(media_type, str):
        raise Refused(f"{where}: mediaType is missing")
    if not isinstance(path, str):
        raise Refused(f"{where} has no {FILEPATH} annotation naming its file")
    return Layer(check_safe_path(path, f"file path in {where}"), digest, size, media_type)


def read_signatures(root: Path, names: list[str]) -> dict[str, bytes]:
    return {name: (root / name).read_bytes() for name in names}
