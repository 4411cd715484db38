"""The Kubernetes manifests of a plan, as data: verify-first pods behind a Service.

Each pod pulls the bundle itself: its init container runs `sovpack pull` from the registry into the
pod's own store volume, which verifies the bundle exactly as `import` does (the trusted keys come
from a ConfigMap) and installs it, or fails and the pod never starts serving. The main container
then serves that store: `sovpack serve` (which verifies the bundle once more before loading a
byte) on the GGUF, or vLLM on the safetensors originals, read-only. API keys come from a Secret
the operator creates; nothing secret is written in these manifests.

Every container runs under the restricted Pod Security Standard: non-root, read-only root file
system, no privilege escalation, every capability dropped, the runtime's default seccomp profile;
no service account token is mounted.
"""

from __future__ import annotations

from sovpack import __version__
from sovpack.deploy.plan import Plan

STORE = "/var/lib/sovpack"  # the pod's store (SOVPACK_HOME), an emptyDir the init container fills
TRUST_DIR = "/etc/sovpack/trust"
API_KEYS_DIR = "/etc/sovpack/api-keys"
API_KEYS_FILE = "api-keys"  # the Secret's key for sovpack serve: one API key per line
VLLM_API_KEY = "api-key"  # the Secret's key for vLLM: one API key
REGISTRY_PASSWORD_DIR = "/etc/sovpack/registry"
REGISTRY_PASSWORD_FILE = "password"
REGISTRY_CA_DIR = "/etc/sovpack/registry-ca"
REGISTRY_CA_FILE = "ca.pem"
RUN_AS = 10001  # the image's user (containers/Containerfile)
SHUTDOWN_TIMEOUT = 30  # seconds in-flight requests get on SIGTERM (serve --shutdown-timeout)


def manifests(plan: Plan) -> dict[str, dict]:
    """File name -> manifest, in the order they are best applied."""
    files = {"trust-configmap.yaml": _config_map(plan, f"{plan.app}-trust", plan.trust, "trusted keys")}
    if plan.registry.ca_pem:
        files["registry-ca-configmap.yaml"] = _config_map(
            plan, f"{plan.app}-registry-ca", {REGISTRY_CA_FILE: plan.registry.ca_pem}, "registry CA"
        )
    files |= {
        "deployment.yaml": deployment(plan),
        "service.yaml": _service(plan),
        "poddisruptionbudget.yaml": _disruption_budget(plan),
        "networkpolicy.yaml": _network_policy(plan),
    }
    return files


def secrets(plan: Plan) -> dict[str, tuple[str, str]]:
    """The Secrets the operator creates: name -> (the key the pods read, what it holds)."""
    if plan.engine.kind == "vllm":
        needed = {f"{plan.app}-api-keys": (VLLM_API_KEY, "one API key for vLLM")}
    else:
        needed = {f"{plan.app}-api-keys": (API_KEYS_FILE, "API keys, one per line, at least 16 characters each")}
    if plan.registry.username:
        needed[f"{plan.app}-registry"] = (REGISTRY_PASSWORD_FILE, f"the registry password of {plan.registry.username}")
    return needed


def init_command(plan: Plan) -> list[str]:
    """The init container's command line: pull, verify and install the bundle into the pod's store."""
    command = ["sovpack", "pull", str(plan.registry.ref), "--store", STORE, "--trust", TRUST_DIR]
    command += ["--threshold", str(plan.threshold)]
    if plan.registry.username:
        password = f"{REGISTRY_PASSWORD_DIR}/{REGISTRY_PASSWORD_FILE}"
        command += ["--username", plan.registry.username, "--password-file", password]
    if plan.registry.ca_pem:
        command += ["--ca-file", f"{REGISTRY_CA_DIR}/{REGISTRY_CA_FILE}"]
    if plan.registry.plain_http:
        command.append("--plain-http")
    return command


def serve_command(plan: Plan) -> list[str]:
    """The main container's command line."""
    if plan.engine.kind == "vllm":
        return [
            "vllm",
            "serve",
            f"{STORE}/bundles/{plan.bundle}/{plan.version}",
            "--served-model-name",
            plan.bundle,
            "--tensor-parallel-size",
            str(plan.engine.tensor_parallel_size),
            "--load-format",
            "safetensors",
            "--host",
            "0.0.0.0",
            "--port",
            str(plan.port),
        ]
    return [
        "sovpack",
        "serve",
        f"{plan.bundle}@{plan.version}",
        "--store",
        STORE,
        "--trust",
        TRUST_DIR,
        "--threshold",
        str(plan.threshold),
        "--host",
        "0.0.0.0",
        "--port",
        str(plan.port),
        "--api-key-file",
        f"{API_KEYS_DIR}/{API_KEYS_FILE}",
        "--parallel",
        str(plan.engine.parallel),
        *_threads(plan),
        "--shutdown-timeout",
        str(SHUTDOWN_TIMEOUT),
    ]


def _threads(plan: Plan) -> list[str]:
    """Threads per slot from the CPU request: a container sees every core of its node, not its share."""
    if not plan.cpu.isdigit():
        return []  # a fraction of a core (500m): serve's default
    return ["--threads", str(max(1, int(plan.cpu) // plan.engine.parallel))]


def deployment(plan: Plan) -> dict:
    pod = {
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": SHUTDOWN_TIMEOUT + 15,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": RUN_AS,
            "runAsGroup": RUN_AS,
            "fsGroup": RUN_AS,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "initContainers": [_pull_container(plan)],
        "containers": [_vllm_container(plan) if plan.engine.kind == "vllm" else _serve_container(plan)],
        "volumes": _volumes(plan),
        "topologySpreadConstraints": [
            {
                "maxSkew": 1,
                "topologyKey": "kubernetes.io/hostname",
                "whenUnsatisfiable": "ScheduleAnyway",
                "labelSelector": {"matchLabels": _selector(plan)},
            }
        ],
    }
    if plan.image_pull_secret:
        pod["imagePullSecrets"] = [{"name": plan.image_pull_secret}]
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _metadata(plan, plan.app),
        "spec": {
            "replicas": plan.replicas,
            "revisionHistoryLimit": 3,
            "selector": {"matchLabels": _selector(plan)},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
            "template": {
                "metadata": {
                    "labels": _labels(plan),
                    "annotations": {
                        "sovpack.dev/bundle": plan.bundle,
                        "sovpack.dev/version": str(plan.version),
                        "sovpack.dev/ref": str(plan.registry.ref),
                    },
                },
                "spec": pod,
            },
        },
    }


def _pull_container(plan: Plan) -> dict:
    mounts = [_mount("store", STORE), _mount("tmp", "/tmp"), _mount("trust", TRUST_DIR, read_only=True)]
    if plan.registry.username:
        mounts.append(_mount("registry-password", REGISTRY_PASSWORD_DIR, read_only=True))
    if plan.registry.ca_pem:
        mounts.append(_mount("registry-ca", REGISTRY_CA_DIR, read_only=True))
    return {
        "name": "pull-and-verify",
        "image": plan.image,
        "imagePullPolicy": "IfNotPresent",
        "command": init_command(plan),
        "env": _sovpack_env(),
        "resources": {"requests": {"cpu": plan.cpu, "memory": "512Mi"}, "limits": {"memory": "1Gi"}},
        "securityContext": _restricted(),
        "volumeMounts": mounts,
    }


def _serve_container(plan: Plan) -> dict:
    return {
        "name": "serve",
        "image": plan.image,
        "imagePullPolicy": "IfNotPresent",
        "command": serve_command(plan),
        "env": _sovpack_env(),
        "ports": [{"name": "http", "containerPort": plan.port, "protocol": "TCP"}],
        **_probes(),
        "resources": {
            "requests": {"cpu": plan.cpu, "memory": plan.memory, "ephemeral-storage": plan.volume_size},
            "limits": {"memory": plan.memory},
        },
        "securityContext": _restricted(),
        "volumeMounts": [
            _mount("store", STORE),  # serve writes its audit records and access log in the store
            _mount("tmp", "/tmp"),
            _mount("trust", TRUST_DIR, read_only=True),
            _mount("api-keys", API_KEYS_DIR, read_only=True),
        ],
    }


def _vllm_container(plan: Plan) -> dict:
    gpus = plan.gpus or plan.engine.tensor_parallel_size
    offline = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}
    env = [{"name": k, "value": v} for k, v in ({"HOME": "/tmp", "XDG_CACHE_HOME": "/tmp/cache"} | offline).items()]
    env.append({"name": "VLLM_API_KEY", "valueFrom": {"secretKeyRef": {"name": f"{plan.app}-api-keys", "key": VLLM_API_KEY}}})
    return {
        "name": "vllm",
        "image": plan.engine.vllm_image,
        "imagePullPolicy": "IfNotPresent",
        "command": serve_command(plan),
        "env": env,
        "ports": [{"name": "http", "containerPort": plan.port, "protocol": "TCP"}],
        **_probes(),
        "resources": {
            "requests": {"cpu": plan.cpu, "memory": plan.memory, "nvidia.com/gpu": str(gpus)},
            "limits": {"memory": plan.memory, "nvidia.com/gpu": str(gpus)},
        },
        "securityContext": _restricted(),
        "volumeMounts": [
            _mount("store", STORE, read_only=True),  # vLLM reads the verified bundle and writes nothing there
            _mount("tmp", "/tmp"),
            _mount("shm", "/dev/shm"),  # tensor-parallel workers talk through shared memory
        ],
    }


def _probes() -> dict:
    """/health is 503 while the model loads (startup may take long for a large model), 200 once it answers."""
    probe = {"httpGet": {"path": "/health", "port": "http"}, "timeoutSeconds": 5}
    return {
        "startupProbe": probe | {"periodSeconds": 10, "failureThreshold": 360},
        "readinessProbe": probe | {"periodSeconds": 5, "failureThreshold": 2},
        "livenessProbe": probe | {"periodSeconds": 20, "failureThreshold": 3},
    }


def _restricted() -> dict:
    return {
        "allowPrivilegeEscalation": False,
        "privileged": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def _sovpack_env() -> list[dict]:
    values = {"SOVPACK_HOME": STORE, "HOME": "/tmp", "PYTHONDONTWRITEBYTECODE": "1"}
    return [{"name": k, "value": v} for k, v in values.items()]


def _volumes(plan: Plan) -> list[dict]:
    volumes = [
        {"name": "store", "emptyDir": {"sizeLimit": plan.volume_size}},
        {"name": "tmp", "emptyDir": {"sizeLimit": "4Gi" if plan.engine.kind == "vllm" else "256Mi"}},
        {"name": "trust", "configMap": {"name": f"{plan.app}-trust", "defaultMode": 0o444}},
    ]
    if plan.engine.kind == "vllm":
        volumes.append({"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": "8Gi"}})
    else:
        secret = {
            "secretName": f"{plan.app}-api-keys",
            "defaultMode": 0o440,
            "items": [{"key": API_KEYS_FILE, "path": API_KEYS_FILE}],
        }
        volumes.append({"name": "api-keys", "secret": secret})
    if plan.registry.username:
        items = [{"key": REGISTRY_PASSWORD_FILE, "path": REGISTRY_PASSWORD_FILE}]
        volumes.append(
            {"name": "registry-password", "secret": {"secretName": f"{plan.app}-registry", "defaultMode": 0o440, "items": items}}
        )
    if plan.registry.ca_pem:
        volumes.append({"name": "registry-ca", "configMap": {"name": f"{plan.app}-registry-ca", "defaultMode": 0o444}})
    return volumes


def _mount(name: str, path: str, *, read_only: bool = False) -> dict:
    return {"name": name, "mountPath": path} | ({"readOnly": True} if read_only else {})


def _service(plan: Plan) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(plan, plan.app),
        "spec": {
            "type": "ClusterIP",
            "selector": _selector(plan),
            "ports": [{"name": "http", "port": plan.port, "targetPort": "http", "protocol": "TCP"}],
        },
    }


def _disruption_budget(plan: Plan) -> dict:
    """At most one pod down for a voluntary disruption (a node drain): N-1 keep answering, and a drain never blocks."""
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": _metadata(plan, plan.app),
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": _selector(plan)}},
    }


def _network_policy(plan: Plan) -> dict:
    """In: the Service's port, from this namespace (and --allow-namespace). Out: DNS and the registry's port only."""
    sources = [{"podSelector": {}}] + [
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": ns}}} for ns in plan.allow_namespaces
    ]
    registry = {"ports": [{"protocol": "TCP", "port": plan.registry.port}]}
    if plan.registry.cidr:
        registry["to"] = [{"ipBlock": {"cidr": plan.registry.cidr}}]
    dns = {"ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}]}
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": _metadata(plan, plan.app),
        "spec": {
            "podSelector": {"matchLabels": _selector(plan)},
            "policyTypes": ["Ingress", "Egress"],
            "ingress": [{"from": sources, "ports": [{"protocol": "TCP", "port": plan.port}]}],
            "egress": [registry, dns],
        },
    }


def _config_map(plan: Plan, name: str, data: dict[str, str], what: str) -> dict:
    manifest = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": _metadata(plan, name), "data": dict(sorted(data.items()))}
    manifest["metadata"]["annotations"]["sovpack.dev/content"] = what
    return manifest


def _selector(plan: Plan) -> dict[str, str]:
    return {"app.kubernetes.io/name": "sovpack", "app.kubernetes.io/instance": plan.app}


def _labels(plan: Plan) -> dict[str, str]:
    component = "vllm" if plan.engine.kind == "vllm" else "sovpack-serve"
    return _selector(plan) | {
        "app.kubernetes.io/component": component,
        "app.kubernetes.io/version": str(plan.version),
        "app.kubernetes.io/managed-by": "sovpack",
    }


def _metadata(plan: Plan, name: str) -> dict:
    metadata = {"name": name, "labels": _labels(plan), "annotations": {"sovpack.dev/generated-by": f"sovpack {__version__}"}}
    if plan.namespace:
        metadata["namespace"] = plan.namespace
    return metadata
