"""Kubernetes manifests for a Triton image: a Deployment, its Service, a CPU-based HorizontalPodAutoscaler and a
NetworkPolicy.

The image (see the Dockerfile) carries the model repository at /models, so the pod needs no volume for
models. All four objects share one name, `triton-<model>`, made DNS-1123 safe. Triton's control APIs demand the
admin key (deploykit.serve.access), which the pod reads from a Secret the user creates: no manifest holds it.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from deploykit.errors import DeploykitError
from deploykit.files import atomic_write_text
from deploykit.package.names import validate_model_name
from deploykit.serve.access import KEY_ENV, ServerAccess

_QUANTITY = re.compile(r"[0-9]+(\.[0-9]+)?(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?")
_MAX_NAME = 63  # a Service name is a DNS-1035 label: at most 63 characters, starting with a letter
SECRET_NAME = "deploykit-admin-key"  # the Secret holding the admin key, created by the user (see secret_note)
SECRET_KEY = "key"
MONITORING_NAMESPACE = "monitoring"  # where Prometheus runs: the only namespace that may read Triton's metrics
_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")  # a namespace name
_DNS_SUBDOMAIN = re.compile(r"(?=.{1,253}$)[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_SECRET_DATA_KEY = re.compile(r"[-._a-zA-Z0-9]{1,253}")


_PORTABLE = re.compile(r'^backend: "python"$', re.M)  # how triton_repo's config.pbtxt marks the portable flavour


def require_native(repo: Path, name: str, flavour: str, option: str) -> None:
    """Refuse, before anything is written, a repository the official Triton image cannot load (the Dockerfile's
    base, which the Deployment runs, and KServe's runtime): the portable flavour's python backend runs in an
    environment on this machine (EXECUTION_ENV_PATH), which the image lacks. `option` names what asked for it."""
    if flavour != "native":
        raise DeploykitError(
            f"{option} serves the repository on the official Triton image, which cannot run the portable "
            "flavour: add --flavour native."
        )
    portable = [
        config.parent.name
        for config in sorted(Path(repo).glob("*/config.pbtxt"))
        if config.parent.name != name and _PORTABLE.search(config.read_text(encoding="utf-8"))
    ]
    if portable:  # Triton stops when any model in the repository fails to load
        raise DeploykitError(
            f"Model {portable[0]!r} in {repo} is the portable flavour, which the official Triton image cannot load: "
            "package it again with --flavour native, or use another --repo."
        )


def k8s_name(name: str, max_length: int = _MAX_NAME) -> str:
    """The Kubernetes object name for model `name`: 'triton-' + lowercase, '-' for '_' and '.'."""
    validate_model_name(name)
    label = "triton-" + re.sub(r"[_.]", "-", name.lower()).strip("-")
    label = re.sub(r"-{2,}", "-", label)
    if len(label) > max_length:
        raise DeploykitError(
            f"Model name {name!r} makes the Kubernetes name {label!r}, longer than {max_length} characters: "
            "use a shorter model name."
        )
    return label


def check_resources(cpu: str, memory: str) -> None:
    """Raise one clear sentence unless `cpu` and `memory` are Kubernetes quantities."""
    for what, value in (("cpu", cpu), ("memory", memory)):
        if not _QUANTITY.fullmatch(value):
            raise DeploykitError(f"{what} {value!r} is not a Kubernetes quantity: write e.g. '2', '500m' or '4Gi'.")


def _check_name(what: str, value: str, pattern: re.Pattern[str]) -> None:
    if not pattern.fullmatch(value):
        raise DeploykitError(f"{what} {value!r} is not a valid Kubernetes name: use lowercase letters, digits and '-'.")


def check_secret(secret_name: str, secret_key: str) -> None:
    """Raise one clear sentence unless the Secret's name and data key are names Kubernetes accepts."""
    _check_name("Secret name", secret_name, _DNS_SUBDOMAIN)
    _check_name("Secret key", secret_key, _SECRET_DATA_KEY)


def check_namespace(namespace: str) -> None:
    _check_name("Namespace", namespace, _DNS_LABEL)


def restricted_api_args(restrict_inference: bool) -> list[str]:
    """Triton's flags that demand the admin key on its control APIs (and inference), naming the key `$(DEPLOYKIT_KEY)`:
    kubelet expands that from the container's env when it starts the container, so the key stays in the Secret."""
    return ServerAccess(key=f"$({KEY_ENV})", restrict_inference=restrict_inference).triton_args()


def key_env(secret_name: str, secret_key: str) -> list[dict[str, Any]]:
    """The container env that carries the admin key from the Secret (the pod does not start while it is missing)."""
    return [{"name": KEY_ENV, "valueFrom": {"secretKeyRef": {"name": secret_name, "key": secret_key}}}]


def ingress_rule(ports: list[int], namespace: str | None = None) -> dict[str, Any]:
    """A NetworkPolicy rule admitting TCP `ports` from pods in `namespace`, or from anywhere when None."""
    rule: dict[str, Any] = {"ports": [{"protocol": "TCP", "port": port} for port in ports]}
    if namespace is not None:  # every namespace carries this label (Kubernetes >= 1.21)
        rule["from"] = [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": namespace}}}]
    return rule


def network_policy(
    metadata: dict[str, Any], pod_selector: dict[str, str], rules: list[dict[str, Any]]
) -> dict[str, Any]:
    """A NetworkPolicy admitting only `rules`' traffic into the selected pods. Kubelet's probes come from the node,
    which network plugins always admit, so the health endpoints need no rule."""
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": metadata,
        "spec": {"podSelector": {"matchLabels": pod_selector}, "policyTypes": ["Ingress"], "ingress": rules},
    }


def _check(cpu: str, memory: str, ports: list[int], replicas: int, min_replicas: int, max_replicas: int) -> None:
    check_resources(cpu, memory)
    if len(set(ports)) != len(ports) or not all(0 < p < 65536 for p in ports):
        raise DeploykitError(f"Ports {ports} must be three different numbers from 1 to 65535: fix the port options.")
    if not 1 <= min_replicas <= replicas <= max_replicas:
        raise DeploykitError(
            f"Replicas must satisfy 1 <= min_replicas ({min_replicas}) <= replicas ({replicas}) "
            f"<= max_replicas ({max_replicas}): adjust them."
        )


def _probe(path: str, port: int, period: int, failures: int) -> dict[str, Any]:
    return {"httpGet": {"path": path, "port": port}, "periodSeconds": period, "failureThreshold": failures}


def k8s_manifests(
    name: str,
    image: str,
    *,
    replicas: int = 1,
    min_replicas: int = 1,
    max_replicas: int = 4,
    cpu: str = "2",
    memory: str = "4Gi",
    gpus: int = 0,
    target_cpu_utilization: int = 70,
    http_port: int = 8000,
    grpc_port: int = 8001,
    metrics_port: int = 8002,
    secret_name: str = SECRET_NAME,
    secret_key: str = SECRET_KEY,
    restrict_inference: bool = False,
    monitoring_namespace: str = MONITORING_NAMESPACE,
) -> list[dict[str, Any]]:
    """Deployment, Service, HorizontalPodAutoscaler and NetworkPolicy (as plain dicts) serving `image` for model
    `name`, with the admin key from `secret_key` of Secret `secret_name` guarding Triton's control APIs (and
    inference and metadata too when `restrict_inference`) and metrics open only to `monitoring_namespace`."""
    _check(cpu, memory, [http_port, grpc_port, metrics_port], replicas, min_replicas, max_replicas)
    check_secret(secret_name, secret_key)
    check_namespace(monitoring_namespace)
    if gpus < 0 or not 1 <= target_cpu_utilization <= 100:
        raise DeploykitError(
            f"gpus ({gpus}) must be >= 0 and target_cpu_utilization ({target_cpu_utilization}) a percentage "
            "from 1 to 100: fix those options."
        )
    object_name = k8s_name(name)
    selector = {"app.kubernetes.io/name": "triton", "app.kubernetes.io/instance": object_name}
    labels = {**selector, "app.kubernetes.io/managed-by": "deploykit"}
    metadata = {"name": object_name, "labels": labels}
    resources: dict[str, dict[str, Any]] = {
        "requests": {"cpu": cpu, "memory": memory},
        "limits": {"cpu": cpu, "memory": memory},
    }
    if gpus:
        resources["limits"]["nvidia.com/gpu"] = gpus  # extended resources are set as limits only
    container = {
        "name": "triton",
        "image": image,
        "args": [
            "tritonserver",
            "--model-repository=/models",
            f"--http-port={http_port}",
            f"--grpc-port={grpc_port}",
            f"--metrics-port={metrics_port}",
            "--exit-on-error=false",
            *restricted_api_args(restrict_inference),
        ],
        "env": key_env(secret_name, secret_key),
        "ports": [
            {"name": "http", "containerPort": http_port},
            {"name": "grpc", "containerPort": grpc_port},
            {"name": "metrics", "containerPort": metrics_port},
        ],
        "resources": resources,
        # large models load for minutes before the server answers: the startup probe holds liveness off until then
        "startupProbe": _probe("/v2/health/live", http_port, period=10, failures=30),
        "livenessProbe": _probe("/v2/health/live", http_port, period=10, failures=3),
        "readinessProbe": _probe("/v2/health/ready", http_port, period=5, failures=3),
        "volumeMounts": [{"name": "dshm", "mountPath": "/dev/shm"}],
    }
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": metadata,
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": selector},
            "template": {
                "metadata": {
                    "labels": labels,
                    "annotations": {
                        "prometheus.io/scrape": "true",
                        "prometheus.io/port": str(metrics_port),
                        "prometheus.io/path": "/metrics",
                    },
                },
                "spec": {
                    # the Triton images' unprivileged triton-server user is uid/gid 1000; numeric so kubelet checks it
                    "securityContext": {"runAsNonRoot": True, "runAsUser": 1000, "runAsGroup": 1000},
                    "containers": [container],
                    # Triton's python backend exchanges tensors through /dev/shm, which is 64 MiB by default
                    "volumes": [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "1Gi"}}],
                },
            },
        },
    }
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata,
        "spec": {
            "selector": selector,
            "ports": [
                {"name": port, "port": number, "targetPort": port}
                for port, number in (("http", http_port), ("grpc", grpc_port), ("metrics", metrics_port))
            ],
        },
    }
    autoscaler = {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": metadata,
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": object_name},
            "minReplicas": min_replicas,
            "maxReplicas": max_replicas,
            "metrics": [
                {
                    "type": "Resource",
                    "resource": {
                        "name": "cpu",
                        "target": {"type": "Utilization", "averageUtilization": target_cpu_utilization},
                    },
                }
            ],
        },
    }
    # inference from anywhere: clients reach the Service through ingress controllers and load balancers that live
    # in other namespaces or outside the cluster; the key, not the network, guards the control APIs on these ports
    policy = network_policy(
        metadata,
        selector,
        [ingress_rule([http_port, grpc_port]), ingress_rule([metrics_port], monitoring_namespace)],
    )
    return [deployment, service, autoscaler, policy]


class _PlainDumper(yaml.SafeDumper):
    """SafeDumper without &anchors: the objects share label dicts, and readers expect each spelled out."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _secret_refs(node: Any) -> Iterator[tuple[str, str]]:
    """(Secret name, key) of every secretKeyRef in `node`, in document order."""
    if isinstance(node, dict):
        if "secretKeyRef" in node:
            yield node["secretKeyRef"]["name"], node["secretKeyRef"]["key"]
        for value in node.values():
            yield from _secret_refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from _secret_refs(value)


def secret_note(manifests: list[dict[str, Any]]) -> str:
    """YAML comment lines saying how to create each Secret `manifests` read: the files hold no key, only its name.
    `tr` drops the newline that ends the key file, which kubectl would otherwise keep as part of the key."""
    lines = []
    for name, key in dict.fromkeys(_secret_refs(manifests)):
        lines += [
            f"# Triton's admin key comes from the Secret {name!r} (key {key!r}); create it once, in the namespace",
            "# these objects go to, from the key file `deploykit serve --admin-key-file` writes:",
            f"#  tr -d '\\n' < deploykit-admin.key | kubectl create secret generic {name} --from-file={key}=/dev/stdin",
        ]
    return "".join(line + "\n" for line in lines)


def dump_manifests(manifests: list[dict[str, Any]]) -> str:
    """`manifests` as one multi-document YAML text, headed by the note on the Secrets they read."""
    return secret_note(manifests) + yaml.dump_all(manifests, Dumper=_PlainDumper, sort_keys=False)


def write_k8s(out_dir: Path, manifests: list[dict[str, Any]]) -> Path:
    """Write `manifests` as one multi-document `<out_dir>/k8s.yaml` (for `kubectl apply -f`)."""
    path = Path(out_dir) / "k8s.yaml"
    atomic_write_text(path, dump_manifests(manifests))
    return path
