"""sovpack deploy kubernetes: the manifests against the official Kubernetes schemas (kubernetes-validate, offline), and
their command lines run for real — the init container's `sovpack pull` against the loopback registry (tests/registry.py),
the main container's `sovpack serve` on what it pulled, answering the openai client with the SmolLM2 model.

A pod's volumes are made here as Kubernetes would: each ConfigMap and Secret the manifests mount becomes files in a
directory, and the command line is run with each mount path replaced by that directory.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx2
import kubernetes_validate
import openai
import pytest
import yaml
from registry import Registry, TestCA, free_port

from sovpack.deploy.kubernetes import RUN_AS, STORE

ROOT = Path(__file__).resolve().parent.parent
USERS = {"puller": "pull-Pa55-word"}
KUBERNETES_VERSIONS = ("1.29", "1.33", kubernetes_validate.latest_version())
API_KEY = "analyst-key-0123456789abcdef"


@pytest.fixture
def registry(tmp_path):
    with Registry(tmp_path / "registry", users=USERS) as r:
        yield r


@pytest.fixture
def registry_password(tmp_path):
    path = tmp_path / "registry-password"
    path.write_text(USERS["puller"] + "\n")
    return path


def _deploy(cli, tmp_path, bundle, *extra, out="k8s") -> dict[str, dict]:
    result = cli("deploy", "kubernetes", bundle, "--out", tmp_path / out, *extra)
    assert result.code == 0, result.err
    return {p.name: yaml.safe_load(p.read_text()) for p in sorted((tmp_path / out).iterdir())}


def _pod(files: dict[str, dict]) -> dict:
    return files["deployment.yaml"]["spec"]["template"]["spec"]


def _validate(manifest: dict) -> None:
    for version in KUBERNETES_VERSIONS:
        kubernetes_validate.validate(manifest, version, strict=True)


# -- the manifests


def test_the_manifests_are_valid_kubernetes_and_verify_first(cli, signed_bundle, store, tmp_path, keys):
    ca = TestCA(tmp_path / "ca")
    files = _deploy(
        cli,
        tmp_path,
        signed_bundle,
        "--ref",
        "registry.example.mil:5000/models/tiny:3",
        "--image",
        "registry.example.mil:5000/sovpack:0.1.0",
        "--replicas",
        "3",
        "--store",
        store,
        "--namespace",
        "models",
        "--registry-username",
        "puller",
        "--registry-ca-file",
        ca.cert_file,
        "--registry-cidr",
        "10.20.30.40",
        "--allow-namespace",
        "analysts",
        "--cpu",
        "4",
        "--memory",
        "6Gi",
    )
    assert set(files) == {
        "trust-configmap.yaml",
        "registry-ca-configmap.yaml",
        "deployment.yaml",
        "service.yaml",
        "poddisruptionbudget.yaml",
        "networkpolicy.yaml",
    }
    for manifest in files.values():
        _validate(manifest)
        assert manifest["metadata"]["namespace"] == "models"

    deployment = files["deployment.yaml"]
    assert deployment["spec"]["replicas"] == 3
    pod = _pod(files)
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == RUN_AS
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False
    for container in pod["initContainers"] + pod["containers"]:
        context = container["securityContext"]
        assert context["readOnlyRootFilesystem"] is True and context["allowPrivilegeEscalation"] is False
        assert context["capabilities"] == {"drop": ["ALL"]} and context["runAsNonRoot"] is True
        assert container["resources"]["requests"]["cpu"] == "4"
    (init,) = pod["initContainers"]
    assert init["command"][:3] == ["sovpack", "pull", "registry.example.mil:5000/models/tiny:3"]
    (serve,) = pod["containers"]
    assert serve["command"][:3] == ["sovpack", "serve", "tiny@3"] and "--api-key-file" in serve["command"]
    assert serve["resources"]["requests"]["memory"] == "6Gi" and serve["resources"]["limits"]["memory"] == "6Gi"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert serve[probe]["httpGet"] == {"path": "/health", "port": "http"}

    trust = files["trust-configmap.yaml"]["data"]
    assert list(trust) == ["alice.pub"] and trust["alice.pub"] == (keys / "alice.pub").read_text()
    assert files["registry-ca-configmap.yaml"]["data"]["ca.pem"] == ca.cert_file.read_text()
    secrets = {v["secret"]["secretName"] for v in pod["volumes"] if "secret" in v}
    assert secrets == {"tiny-api-keys", "tiny-registry"}  # created by the operator: no secret value in the manifests
    assert not any(m["kind"] == "Secret" for m in files.values())

    service = files["service.yaml"]["spec"]
    assert service["selector"].items() <= labels.items() and service["ports"][0]["targetPort"] == "http"
    assert files["poddisruptionbudget.yaml"]["spec"] == {"maxUnavailable": 1, "selector": {"matchLabels": service["selector"]}}
    policy = files["networkpolicy.yaml"]["spec"]
    assert policy["policyTypes"] == ["Ingress", "Egress"] and policy["podSelector"]["matchLabels"] == service["selector"]
    assert {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "analysts"}}} in policy["ingress"][0]["from"]
    assert policy["egress"][0] == {"ports": [{"protocol": "TCP", "port": 5000}], "to": [{"ipBlock": {"cidr": "10.20.30.40/32"}}]}


def test_the_schema_check_does_fail_on_a_wrong_manifest(cli, signed_bundle, store, tmp_path):
    """The validator is not a no-op: a wrong type and an unknown field (strict) are refused."""
    files = _deploy(
        cli, tmp_path, signed_bundle, "--ref", "r.example/m/tiny:3", "--image", "r.example/sovpack:1", "--store", store
    )
    wrong = files["deployment.yaml"]
    wrong["spec"]["replicas"] = "three"
    with pytest.raises(kubernetes_validate.ValidationError):
        _validate(wrong)
    unknown = files["service.yaml"]
    unknown["spec"]["replica"] = 2
    with pytest.raises(kubernetes_validate.ValidationError):
        _validate(unknown)


def test_the_vllm_variant_serves_the_safetensors_originals_on_gpus(cli, signed_bundle, store, tmp_path):
    files = _deploy(
        cli,
        tmp_path,
        signed_bundle,
        "--ref",
        "r.example/m/tiny:3",
        "--image",
        "r.example/sovpack:1",
        "--store",
        store,
        "--engine",
        "vllm",
        "--vllm-image",
        "r.example/vllm/vllm-openai:v0.11.0",
        "--tensor-parallel-size",
        "2",
    )
    for manifest in files.values():
        _validate(manifest)
    pod = _pod(files)
    (vllm,) = pod["containers"]
    command = vllm["command"]
    assert command[:3] == ["vllm", "serve", f"{STORE}/bundles/tiny/3"]
    assert (
        command[command.index("--tensor-parallel-size") + 1] == "2"
        and command[command.index("--served-model-name") + 1] == "tiny"
    )
    assert vllm["resources"]["limits"]["nvidia.com/gpu"] == "2"
    assert {"name": "store", "mountPath": STORE, "readOnly": True} in vllm["volumeMounts"]
    key = next(e for e in vllm["env"] if e["name"] == "VLLM_API_KEY")
    assert key["valueFrom"]["secretKeyRef"] == {"name": "tiny-api-keys", "key": "api-key"}
    assert vllm["securityContext"]["readOnlyRootFilesystem"] is True and pod["initContainers"][0]["command"][1] == "pull"


def test_one_yaml_stream_on_stdout(cli, signed_bundle, store, tmp_path):
    result = cli(
        "deploy",
        "kubernetes",
        signed_bundle,
        "--ref",
        "r.example/m/tiny:3",
        "--image",
        "r.example/s:1",
        "--store",
        store,
        "--out",
        "-",
    )
    assert result.code == 0, result.err
    documents = list(yaml.safe_load_all(result.out))
    kinds = [d["kind"] for d in documents]
    assert kinds == ["ConfigMap", "Deployment", "Service", "PodDisruptionBudget", "NetworkPolicy"]
    assert not (tmp_path / "tiny-kubernetes").exists()


def test_usage_errors_name_the_option(cli, signed_bundle, store, tmp_path, model_dir, keys):
    base = ("--ref", "r.example/m/tiny:3", "--image", "r.example/s:1", "--store", store)
    cases = [
        (("--engine", "tgi"), "--engine 'tgi'"),
        (("--engine", "vllm"), "--engine vllm needs --vllm-image"),
        (("--cpu", "two"), "--cpu 'two' is not a Kubernetes quantity"),
        (("--replicas", "0"), "--replicas must be 1 or more"),
        (("--registry-cidr", "registry.example.mil"), "--registry-cidr 'registry.example.mil'"),
        (("--namespace", "Models"), "--namespace 'Models' is not a namespace name"),
        (("--gpus", "1"), "--gpus is for --engine vllm"),
    ]
    for extra, message in cases:
        result = cli("deploy", "kubernetes", signed_bundle, *base, *extra, "--out", tmp_path / "never")
        assert result.code == 2 and message in result.err, (extra, result.err)
    result = cli("deploy", "kubernetes", signed_bundle, "--ref", "r.example/m/tiny", "--image", "r.example/s:1", "--store", store)
    assert result.code == 2 and "names no tag or digest" in result.err
    result = cli("deploy", "kubernetes", "nothing-installed", *base)
    assert result.code == 2 and "nothing-installed" in result.err
    assert not (tmp_path / "never").exists()

    gguf_only = tmp_path / "gguf-only"
    (gguf_only / "model").mkdir(parents=True)
    shutil.copy(next((model_dir / "gguf").iterdir()), gguf_only / "model" / "tiny.gguf")
    assert cli("pack", gguf_only / "model", "--out", gguf_only / "bundle", "--name", "tiny", "--version", "3").code == 0
    result = cli("deploy", "kubernetes", gguf_only / "bundle", *base, "--engine", "vllm", "--vllm-image", "r.example/vllm:1")
    assert result.code == 2 and "tiny v3 has no safetensors weights for vLLM" in result.err

    no_gguf = tmp_path / "no-gguf"
    shutil.rmtree(model_dir / "gguf")
    assert cli("pack", model_dir, "--out", no_gguf, "--name", "tiny", "--version", "3").code == 0
    result = cli("deploy", "kubernetes", no_gguf, *base)
    assert result.code == 2 and "tiny v3 has no GGUF for sovpack serve" in result.err and "--engine vllm" in result.err


def test_a_store_trusting_certificate_roots_needs_trust_keys_for_the_pods(cli, signed_bundle, store, tmp_path, keys):
    from test_certificates import CA

    assert cli("trust", "add-root", CA(tmp_path / "ca").root_pem, "--name", "mod-root", "--store", store).code == 0
    base = ("--ref", "r.example/m/tiny:3", "--image", "r.example/s:1", "--store", store)
    result = cli("deploy", "kubernetes", signed_bundle, *base, "--out", tmp_path / "never")
    assert result.code == 2 and "the store trusts certificate roots" in result.err and "--trust KEY.pub" in result.err
    assert not (tmp_path / "never").exists()
    files = _deploy(cli, tmp_path, signed_bundle, *base, "--trust", keys / "alice.pub")
    assert list(files["trust-configmap.yaml"]["data"]) == ["alice.pub"]


def test_an_existing_directory_is_replaced_only_with_force(cli, signed_bundle, store, tmp_path):
    base = ("--ref", "r.example/m/tiny:3", "--image", "r.example/s:1", "--store", store)
    out = tmp_path / "k8s"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    result = cli("deploy", "kubernetes", signed_bundle, *base, "--out", out)
    assert result.code == 2 and "already exists" in result.err and "--force" in result.err
    assert [p.name for p in out.iterdir()] == ["mine.txt"]
    assert cli("deploy", "kubernetes", signed_bundle, *base, "--out", out, "--force").code == 0
    assert "mine.txt" not in {p.name for p in out.iterdir()} and (out / "deployment.yaml").is_file()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".k8s")] == []  # no staging left


def test_the_containerfile_runs_the_user_and_store_the_manifests_expect():
    containerfile = (ROOT / "containers" / "Containerfile").read_text()
    assert f"USER {RUN_AS}:{RUN_AS}" in containerfile
    assert f"SOVPACK_HOME={STORE}" in containerfile
    assert 'ENTRYPOINT ["sovpack"]' in containerfile


# -- the command lines, run


def _volumes(pod: dict, root: Path, secrets: dict[str, dict[str, str]], configmaps: dict[str, dict]) -> dict[str, Path]:
    """Each volume of the pod as a directory: emptyDirs empty, ConfigMaps and Secrets as their files (with their mode)."""
    directories = {}
    for volume in pod["volumes"]:
        directory = root / volume["name"]
        directory.mkdir(parents=True)
        if "configMap" in volume:
            data, mode = configmaps[volume["configMap"]["name"]]["data"], volume["configMap"]["defaultMode"]
        elif "secret" in volume:
            data, mode = secrets[volume["secret"]["secretName"]], volume["secret"]["defaultMode"]
        else:
            data, mode = {}, None
        for name, text in data.items():
            (directory / name).write_text(text)
            (directory / name).chmod(mode)
        directories[volume["name"]] = directory
    return directories


def _local(command: list[str], container: dict, volumes: dict[str, Path]) -> list[str]:
    """The container's command line with each mount path replaced by the directory that stands for its volume."""
    mounts = sorted(container["volumeMounts"], key=lambda m: -len(m["mountPath"]))

    def local(arg: str) -> str:
        for mount in mounts:
            if arg == mount["mountPath"] or arg.startswith(mount["mountPath"] + "/"):
                return str(volumes[mount["name"]]) + arg[len(mount["mountPath"]) :]
        return arg

    return [local(a) for a in command]


def _configmaps(files: dict[str, dict]) -> dict[str, dict]:
    return {m["metadata"]["name"]: m for m in files.values() if m["kind"] == "ConfigMap"}


def test_the_init_container_command_pulls_and_verifies_from_the_registry(
    cli, signed_bundle, registry, registry_password, store, tmp_path, keys
):
    ref = f"{registry.host}/models/tiny:3"
    login = ("--username", "puller", "--password-file", registry_password)
    assert cli("push", signed_bundle, ref, *login).code == 0
    base = ("--ref", ref, "--image", "r.example/s:1", "--store", store, "--registry-username", "puller")
    files = _deploy(cli, tmp_path, signed_bundle, *base)
    pod = _pod(files)
    (init,) = pod["initContainers"]
    secrets = {"tiny-api-keys": {"api-keys": API_KEY + "\n"}, "tiny-registry": {"password": USERS["puller"]}}
    volumes = _volumes(pod, tmp_path / "pod", secrets, _configmaps(files))
    command = _local(init["command"], init, volumes)
    assert command[0] == "sovpack"
    result = cli(*command[1:])
    assert result.code == 0, result.err
    assert "INSTALLED tiny v3" in result.out and "accepted by alice" in result.out
    installed = volumes["store"] / "bundles" / "tiny" / "3"
    assert (installed / "sovpack.json").read_bytes() == (signed_bundle / "sovpack.json").read_bytes()
    assert cli("verify", "tiny@3", "--store", volumes["store"], "--trust", volumes["trust"]).code == 0

    # the same command in a pod whose trust ConfigMap holds another key: refused, nothing installed
    other = _configmaps(files)
    other["tiny-trust"] = {"data": {"mallory.pub": (keys / "mallory.pub").read_text()}}
    volumes = _volumes(pod, tmp_path / "other-pod", secrets, other)
    result = cli(*_local(init["command"], init, volumes)[1:])
    assert result.code == 1 and "tiny v3 failed verification" in result.err
    assert not (volumes["store"] / "bundles").exists()


@pytest.fixture
def smollm_bundle(cli, tmp_path, smollm_gguf, keys):
    model = tmp_path / "smollm-model"
    model.mkdir()
    shutil.copy(smollm_gguf, model / smollm_gguf.name)
    bundle = tmp_path / "smollm-bundle"
    assert cli("pack", model, "--out", bundle, "--name", "smollm2", "--version", "1").code == 0
    assert cli("sign", bundle, "--key", keys / "alice.key").code == 0
    return bundle


def test_the_pod_commands_pull_then_serve_behind_the_health_probe(
    cli, smollm_bundle, registry, registry_password, store, tmp_path
):
    ref = f"{registry.host}/models/smollm2:1"
    assert cli("push", smollm_bundle, ref, "--username", "puller", "--password-file", registry_password).code == 0
    port = free_port()
    base = ("--ref", ref, "--image", "r.example/s:1", "--store", store, "--registry-username", "puller", "--port", port)
    files = _deploy(cli, tmp_path, smollm_bundle, *base, "--cpu", "1")
    pod = _pod(files)
    (init,), (serve,) = pod["initContainers"], pod["containers"]
    secrets = {"smollm2-api-keys": {"api-keys": API_KEY + "\n"}, "smollm2-registry": {"password": USERS["puller"]}}
    volumes = _volumes(pod, tmp_path / "pod", secrets, _configmaps(files))
    assert cli(*_local(init["command"], init, volumes)[1:]).code == 0

    command = _local(serve["command"], serve, volumes)
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        process = subprocess.Popen([sys.executable, "-m", "sovpack", *command[1:]], stdout=out, stderr=subprocess.STDOUT)
    try:
        probe = serve["readinessProbe"]["httpGet"]
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            try:
                if httpx2.get(f"{url}{probe['path']}", timeout=2).status_code == 200:
                    break
            except httpx2.HTTPError:
                pass
            time.sleep(0.2)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=API_KEY, max_retries=0, timeout=120)
        answer = client.chat.completions.create(
            model="smollm2", messages=[{"role": "user", "content": "Say hello."}], max_tokens=4, temperature=0
        )
        assert answer.choices[0].message.content
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{url}/v1", api_key="not-a-key-0123456789", max_retries=0).models.list()
    finally:
        process.send_signal(signal.SIGTERM)
        code = process.wait(60)
    assert code == 0, log.read_text()
