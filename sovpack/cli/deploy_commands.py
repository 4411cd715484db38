"""deploy kubernetes: manifests for verify-first pods that pull a bundle from the registry and serve it (docs/kubernetes.md)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from sovpack.cli import app
from sovpack.cli.command import Typer
from sovpack.cli.options import STORE_HELP, THRESHOLD_HELP, TRUST_HELP, existing_store, trust_store
from sovpack.cli.render import console

deploy = Typer(help="Deployments of a verified bundle on many hosts.", no_args_is_help=True)
app.add_typer(deploy, name="deploy")


@deploy.command()
def kubernetes(
    bundle: str = typer.Argument(
        ..., metavar="NAME_OR_BUNDLE", help="NAME or NAME@VERSION installed in the store, or a signed bundle directory."
    ),
    ref: str = typer.Option(
        ...,
        "--ref",
        metavar="REGISTRY/REPO:TAG|@sha256:D",
        help="Where the pods pull it: REGISTRY/REPO:TAG or REGISTRY/REPO@sha256:DIGEST.",
    ),
    image: str = typer.Option(
        ..., "--image", metavar="IMAGE", help="The sovpack image (containers/Containerfile) in your registry."
    ),
    replicas: int = typer.Option(
        2, "--replicas", metavar="N", help="Pods behind the Service; each pulls and verifies the bundle itself."
    ),
    out: Optional[str] = typer.Option(
        None, "--out", metavar="DIR|-", help="Directory to write (default ./APP-kubernetes); '-' prints one YAML stream."
    ),
    force: bool = typer.Option(False, "--force", help="Replace an existing --out directory."),
    namespace: Optional[str] = typer.Option(
        None, "--namespace", metavar="NS", help="Namespace of every resource (default: kubectl's)."
    ),
    app_name: Optional[str] = typer.Option(
        None, "--app-name", metavar="NAME", help="Name of the resources (default: the bundle's name)."
    ),
    store: Optional[Path] = typer.Option(None, "--store", metavar="DIR", help=STORE_HELP),
    trust: Optional[List[Path]] = typer.Option(
        None, "--trust", metavar="DIR_OR_PUBFILE", help=TRUST_HELP + " They go in the trust ConfigMap."
    ),
    threshold: Optional[int] = typer.Option(None, "--threshold", metavar="K", help=THRESHOLD_HELP),
    engine: str = typer.Option(
        "llama",
        "--engine",
        metavar="llama|vllm",
        help="llama: sovpack serve on the bundle's GGUF (CPU or GPU); vllm: vLLM on its safetensors (GPU).",
    ),
    vllm_image: Optional[str] = typer.Option(
        None, "--vllm-image", metavar="IMAGE", help="The vLLM OpenAI server image (with --engine vllm)."
    ),
    tensor_parallel_size: int = typer.Option(1, "--tensor-parallel-size", metavar="N", help="GPUs one vLLM model is split over."),
    gpus: int = typer.Option(
        0, "--gpus", metavar="N", help="GPUs per pod with --engine vllm (default: the tensor-parallel size)."
    ),
    parallel: int = typer.Option(1, "--parallel", metavar="N", help="sovpack serve's generation slots per pod."),
    cpu: str = typer.Option("2", "--cpu", metavar="CPU", help="CPU request per pod (Kubernetes quantity: 2, 500m)."),
    memory: str = typer.Option("4Gi", "--memory", metavar="SIZE", help="Memory request and limit per pod (Kubernetes quantity)."),
    port: int = typer.Option(8080, "--port", metavar="N", help="Port of the server and of the Service."),
    registry_username: Optional[str] = typer.Option(
        None,
        "--registry-username",
        metavar="USER",
        help="Registry user; the password goes in the Secret APP-registry (key 'password').",
    ),
    registry_ca_file: Optional[Path] = typer.Option(
        None,
        "--registry-ca-file",
        metavar="FILE",
        help="PEM of the CA that issued the registry's certificate (goes in a ConfigMap).",
    ),
    plain_http: bool = typer.Option(False, "--plain-http", help="The registry serves plain HTTP (pull --plain-http)."),
    registry_cidr: Optional[str] = typer.Option(
        None,
        "--registry-cidr",
        metavar="CIDR",
        help="The registry's address or network: the only egress allowed (default: its port, anywhere).",
    ),
    allow_namespace: Optional[List[str]] = typer.Option(
        None, "--allow-namespace", metavar="NS", help="Another namespace whose pods may call the Service; repeat."
    ),
    image_pull_secret: Optional[str] = typer.Option(
        None, "--image-pull-secret", metavar="NAME", help="Secret for pulling the images."
    ),
) -> None:
    """Write Kubernetes manifests: pods that pull and verify the bundle, then serve it behind a Service.

    The init container runs `sovpack pull` (full verification under the trusted keys of a ConfigMap)
    into the pod's own volume; the main container serves it (`sovpack serve`, or vLLM). Also a Service,
    a PodDisruptionBudget and a NetworkPolicy; restricted security context throughout. Nothing secret
    is written: the API keys (and registry password) go in Secrets you create. Exit 2 for a choice that
    does not fit the bundle (e.g. vLLM without safetensors).
    """
    from rich.markup import escape

    from sovpack.deploy.kubernetes import manifests, secrets
    from sovpack.deploy.plan import ENGINES, Engine, make_plan
    from sovpack.deploy.write import to_stream, write_directory
    from sovpack.errors import UsageError
    from sovpack.oci.reference import parse_reference
    from sovpack.store.target import choose_policy, find_target, is_bundle_path

    if engine not in ENGINES:
        raise UsageError(f"--engine {engine!r}: choose one of {', '.join(ENGINES)}")
    target_store = trust_store(trust, store) if is_bundle_path(bundle) else existing_store(store)
    plan = make_plan(
        find_target(bundle, target_store).path,
        choose_policy(target_store, trust or [], threshold),
        parse_reference(ref, need_tag_or_digest=True),
        image=image,
        replicas=replicas,
        engine=Engine(engine, vllm_image, tensor_parallel_size, parallel),
        app=app_name,
        namespace=namespace,
        cpu=cpu,
        memory=memory,
        gpus=gpus,
        port=port,
        registry_username=registry_username,
        registry_ca_file=registry_ca_file,
        plain_http=plain_http,
        registry_cidr=registry_cidr,
        allow_namespaces=tuple(allow_namespace or ()),
        image_pull_secret=image_pull_secret,
    )
    files = manifests(plan)
    header = (
        f"sovpack deploy kubernetes: {plan.bundle} v{plan.version} from {plan.registry.ref}, {plan.replicas} replica(s).\n"
        "Review, create the Secrets (docs/kubernetes.md), then: kubectl apply -f DIR"
    )
    if out == "-":
        typer.echo(to_stream(files, header), nl=False)
        return
    directory = Path(out or f"{plan.app}-kubernetes")
    write_directory(directory, files, header, replace=force)
    console.print(
        f"[bold green]WROTE[/] {len(files)} manifests for {escape(plan.bundle)} v{plan.version} "
        f"({plan.replicas} replica(s), {escape(plan.engine.kind)}) -> {escape(str(directory))}",
        soft_wrap=True,
    )
    ns = f" --namespace {plan.namespace}" if plan.namespace else ""
    for name, (key, holds) in secrets(plan).items():
        console.print(
            f"  first the Secret of {escape(holds)}: kubectl create secret generic {escape(name)}{ns} --from-file={key}=FILE",
            soft_wrap=True,
        )
    console.print(f"  then: kubectl apply -f {escape(str(directory))}", soft_wrap=True)
