"""What a deployment deploys: the bundle, its trust, its registry reference and how the pods run it, checked up front.

The bundle is read from the local store (or a bundle directory): its name and version tell where
`sovpack pull` installs it in the pod's store, its size sizes the pod's volume, and its files say
which engine can serve it (sovpack serve needs a GGUF, vLLM the safetensors originals and their
config.json). The trusted keys are the ones given with --trust, else the store's own, so that
the pods accept exactly what this host accepts.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

from sovpack.bundle.directory import read_metadata
from sovpack.bundle.keys import public_pem
from sovpack.bundle.metadata import BundleMetadata
from sovpack.bundle.trust import TrustPolicy
from sovpack.errors import UsageError
from sovpack.oci.reference import Reference

ENGINES = ("llama", "vllm")
MIB = 1024 * 1024
_QUANTITY = re.compile(r"^[0-9]+(?:\.[0-9]+)?(?:m|k|Ki|M|Mi|G|Gi|T|Ti)?$")
_LABEL_VALUE = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9._-]{0,61}[A-Za-z0-9])?$")


@dataclass(frozen=True)
class Engine:
    kind: str = "llama"  # "llama": sovpack serve on the bundle's GGUF; "vllm": vLLM on its safetensors
    vllm_image: str | None = None
    tensor_parallel_size: int = 1
    parallel: int = 1  # sovpack serve's generation slots


@dataclass(frozen=True)
class Registry:
    ref: Reference
    username: str | None = None  # the password comes from a Secret, never from these manifests
    ca_pem: str | None = None  # the in-network CA, from --registry-ca-file
    plain_http: bool = False
    cidr: str | None = None  # where the registry is, for the NetworkPolicy's egress rule

    @property
    def port(self) -> int:
        host, _, port = self.ref.registry.rpartition(":")
        if host and port.isdigit() and not self.ref.registry.endswith("]"):
            return int(port)
        return 80 if self.plain_http else 443


@dataclass(frozen=True)
class Plan:
    app: str  # the resources' name
    bundle: str
    version: int
    bundle_bytes: int
    registry: Registry
    image: str
    replicas: int
    trust: dict[str, str]  # file name -> PEM public key
    threshold: int
    engine: Engine
    namespace: str | None = None
    cpu: str = "2"
    memory: str = "4Gi"
    gpus: int = 0
    port: int = 8080
    allow_namespaces: tuple[str, ...] = ()  # namespaces whose pods may call the Service (besides the deployment's own)
    image_pull_secret: str | None = None

    @property
    def volume_size(self) -> str:
        """The pod's store volume: the bundle plus 10% and 256 MiB for the store's own files (records, logs, audit)."""
        return f"{math.ceil(self.bundle_bytes * 1.1 / MIB) + 256}Mi"


def bundle_files(root: Path) -> tuple[BundleMetadata, int]:
    """The bundle's signed metadata and its size on disk (the files it lists, sovpack.json and the signatures)."""
    metadata = read_metadata(root)
    extra = sum(p.stat().st_size for p in [root / "sovpack.json", *(root / "signatures").glob("*.sig")] if p.is_file())
    return metadata, sum(f.size for f in metadata.files) + extra


def check_engine(metadata: BundleMetadata, engine: Engine) -> None:
    """The bundle holds what the engine serves; a usage error names the bundle and the way out otherwise."""
    weights = {f.format for f in metadata.files if f.role == "weights"}
    who = f"{metadata.name} v{metadata.version}"
    if engine.kind == "llama" and "gguf" not in weights:
        raise UsageError(
            f"{who} has no GGUF for sovpack serve (llama.cpp) to serve; quantize it first (`sovpack quantize`), "
            "or deploy its safetensors with --engine vllm"
        )
    if engine.kind == "vllm":
        if "safetensors" not in weights:
            raise UsageError(f"{who} has no safetensors weights for vLLM to serve; deploy its GGUF without --engine vllm")
        if not any(f.path == "config.json" for f in metadata.files):
            raise UsageError(f"{who} has no config.json beside its safetensors: vLLM cannot load it")
        if not engine.vllm_image:
            raise UsageError("--engine vllm needs --vllm-image, the vLLM OpenAI server image in your registry")
    if engine.tensor_parallel_size < 1 or engine.parallel < 1:
        raise UsageError("--tensor-parallel-size and --parallel must be 1 or more")


def app_name(bundle: str, given: str | None) -> str:
    """A DNS-1123 name for the resources: --app-name, else the bundle's name in lowercase with '-' for anything else."""
    name = given if given is not None else re.sub(r"[^a-z0-9-]+", "-", bundle.lower()).strip("-")[:40].strip("-")
    if not re.fullmatch(r"[a-z0-9](?:[a-z0-9-]{0,38}[a-z0-9])?", name):
        raise UsageError(
            f"--app-name {name!r}: use 1 to 40 lowercase letters, digits or '-', starting and ending with a letter or digit"
        )
    return name


def trust_files(policy: TrustPolicy) -> dict[str, str]:
    """The trusted keys as ConfigMap entries: NAME.pub -> PEM.

    Certificate roots cannot go there: the pods' `sovpack pull --trust DIR` reads public keys only,
    so under a policy with roots the pods would not accept what this host accepts; a usage error.
    """
    if policy.roots:
        raise UsageError(
            "the store trusts certificate roots (`sovpack trust add-root`), which the pods cannot: their "
            "`sovpack pull --trust DIR` reads public keys only, so certificate signers would not count there; "
            "give the keys the pods should trust with --trust KEY.pub (and --threshold K)"
        )
    files = {}
    for key in policy.keys:
        name = re.sub(r"[^A-Za-z0-9._-]", "-", key.name) or key.key_id
        files[f"{name}.pub" if f"{name}.pub" not in files else f"{name}-{key.key_id}.pub"] = public_pem(key.public_key).decode()
    return files


def check_quantity(value: str, option: str) -> str:
    if not _QUANTITY.match(value):
        raise UsageError(f"{option} {value!r} is not a Kubernetes quantity (e.g. 2, 500m, 4Gi)")
    return value


def check_namespace(value: str, option: str) -> str:
    if not re.fullmatch(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?", value):
        raise UsageError(f"{option} {value!r} is not a namespace name (lowercase letters, digits and '-', up to 63)")
    return value


def check_label_value(value: str, what: str) -> str:
    if not _LABEL_VALUE.match(value):
        raise UsageError(f"{what} {value!r} is not a Kubernetes label value")
    return value


def make_plan(
    target: Path,
    policy: TrustPolicy,
    ref: Reference,
    *,
    image: str,
    replicas: int,
    engine: Engine,
    app: str | None = None,
    namespace: str | None = None,
    cpu: str = "2",
    memory: str = "4Gi",
    gpus: int = 0,
    port: int = 8080,
    registry_username: str | None = None,
    registry_ca_file: Path | None = None,
    plain_http: bool = False,
    registry_cidr: str | None = None,
    allow_namespaces: tuple[str, ...] = (),
    image_pull_secret: str | None = None,
) -> Plan:
    """Check every choice against the bundle at `target` and each other; UsageError names the option at fault."""
    metadata, size = bundle_files(target)
    check_engine(metadata, engine)
    if replicas < 1:
        raise UsageError("--replicas must be 1 or more")
    if not 1 <= port <= 65535:
        raise UsageError(f"--port {port} is not a TCP port")
    if gpus < 0 or (engine.kind == "llama" and gpus):
        raise UsageError("--gpus is for --engine vllm (sovpack serve offloads to the GPU llama.cpp was built for)")
    if engine.kind == "vllm" and gpus and gpus < engine.tensor_parallel_size:
        raise UsageError(f"--gpus {gpus} is fewer than --tensor-parallel-size {engine.tensor_parallel_size}")
    if not image.strip() or any(c.isspace() for c in image):
        raise UsageError(f"--image {image!r} is not an image reference")
    registry = Registry(
        ref,
        check_label_value(registry_username, "--registry-username") if registry_username else None,
        _read_ca(registry_ca_file) if registry_ca_file else None,
        plain_http,
        _check_cidr(registry_cidr) if registry_cidr else None,
    )
    return Plan(
        app=app_name(metadata.name, app),
        bundle=metadata.name,
        version=metadata.version,
        bundle_bytes=size,
        registry=registry,
        image=image,
        replicas=replicas,
        trust=trust_files(policy),
        threshold=policy.threshold,
        engine=engine,
        namespace=check_namespace(namespace, "--namespace") if namespace else None,
        cpu=check_quantity(cpu, "--cpu"),
        memory=check_quantity(memory, "--memory"),
        gpus=gpus,
        port=port,
        allow_namespaces=tuple(check_namespace(ns, "--allow-namespace") for ns in allow_namespaces),
        image_pull_secret=image_pull_secret,
    )


def _read_ca(path: Path) -> str:
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"cannot read --registry-ca-file {path}: {getattr(e, 'strerror', None) or e}") from None
    if "-----BEGIN CERTIFICATE-----" not in text:
        raise UsageError(f"--registry-ca-file {path} holds no PEM certificate (-----BEGIN CERTIFICATE-----)")
    return text


def _check_cidr(cidr: str) -> str:
    import ipaddress

    try:
        return str(ipaddress.ip_network(cidr, strict=False))
    except ValueError:
        raise UsageError(f"--registry-cidr {cidr!r} is not an address or network (10.1.2.3/32, 10.1.0.0/16)") from None
