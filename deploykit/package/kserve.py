"""A KServe InferenceService (serving.kserve.io/v1beta1) serving a native Triton model repository.

KServe's storage initializer downloads the repository from `storageUri` to /mnt/models, and its
`kserve-tritonserver` ClusterServingRuntime starts Triton on it over the v2 (Open Inference) protocol; the
runtime's image tag is pinned to the Dockerfile's, so the cluster runs the Triton version deploykit tests against.
The InferenceService is named like the k8s.py objects (`triton-<model>`); like them, it guards Triton's control APIs
with the admin key from a Secret, and kserve.yaml also holds a NetworkPolicy for the predictor's pods.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from deploykit.errors import DeploykitError
from deploykit.files import atomic_write_text
from deploykit.package.k8s import (
    MONITORING_NAMESPACE,
    SECRET_KEY,
    SECRET_NAME,
    check_namespace,
    check_resources,
    check_secret,
    dump_manifests,
    ingress_rule,
    k8s_name,
    key_env,
    network_policy,
    restricted_api_args,
)

TRITON_IMAGE = "nvcr.io/nvidia/tritonserver:24.10-py3"  # the Dockerfile's FROM (a test keeps them equal)
RUNTIME = "kserve-tritonserver"  # KServe's ClusterServingRuntime for Triton
# Schemes KServe's storage initializer fetches from (pvc:// is mounted by the controller instead)
STORAGE_SCHEMES = ("gs", "s3", "pvc", "https", "http", "hdfs", "webhdfs", "oci", "hf")
# KServe names the predictor's objects `<name>-predictor`, and Knative its first revision `<name>-predictor-00001`:
# each must fit a 63-character label
_MAX_NAME = 63 - len("-predictor-00001")
# The runtime's Triton ports (its container args), and Knative's queue-proxy, which fronts them in serverless mode
TRITON_PORTS = {"http": 8080, "grpc": 9000, "metrics": 8002}
QUEUE_PROXY_PORTS = {"http": 8012, "h2c": 8013, "autoscaler-metrics": 9090}
KNATIVE_NAMESPACE = "knative-serving"  # Knative's autoscaler scrapes queue-proxy from here


def _check(storage_uri: str, min_replicas: int, max_replicas: int, gpus: int) -> None:
    if not re.fullmatch(rf"({'|'.join(STORAGE_SCHEMES)})://\S+", storage_uri):
        raise DeploykitError(
            f"Storage URI {storage_uri!r} is not one KServe can fetch the model repository from: use "
            f"{', '.join(s + '://' for s in STORAGE_SCHEMES)} followed by the repository's location."
        )
    if not 0 <= min_replicas <= max_replicas or max_replicas < 1:
        raise DeploykitError(
            f"Replicas must satisfy 0 <= min_replicas ({min_replicas}) <= max_replicas ({max_replicas}) "
            "and max_replicas >= 1: adjust them."
        )
    if gpus < 0:
        raise DeploykitError(f"gpus ({gpus}) must be >= 0: fix that option.")


def kserve_inference_service(
    name: str,
    storage_uri: str,
    *,
    min_replicas: int = 1,
    max_replicas: int = 4,
    cpu: str = "2",
    memory: str = "4Gi",
    gpus: int = 0,
    secret_name: str = SECRET_NAME,
    secret_key: str = SECRET_KEY,
    restrict_inference: bool = False,
) -> dict[str, Any]:
    """The InferenceService (a plain dict) serving the Triton model repository at `storage_uri` for model `name`,
    with the admin key from `secret_key` of Secret `secret_name` guarding Triton's control APIs (and inference and
    metadata too when `restrict_inference`)."""
    object_name = k8s_name(name, max_length=_MAX_NAME)
    check_resources(cpu, memory)
    check_secret(secret_name, secret_key)
    _check(storage_uri, min_replicas, max_replicas, gpus)
    limits: dict[str, Any] = {"cpu": cpu, "memory": memory}
    if gpus:
        limits["nvidia.com/gpu"] = gpus  # extended resources are set as limits only
    return {
        "apiVersion": "serving.kserve.io/v1beta1",
        "kind": "InferenceService",
        "metadata": {"name": object_name, "labels": {"app.kubernetes.io/managed-by": "deploykit"}},
        "spec": {
            "predictor": {
                "minReplicas": min_replicas,
                "maxReplicas": max_replicas,
                "model": {
                    "modelFormat": {"name": "triton"},
                    "protocolVersion": "v2",
                    "runtime": RUNTIME,
                    "runtimeVersion": TRITON_IMAGE.rsplit(":", 1)[1],  # the runtime's image tag
                    "storageUri": storage_uri,
                    # KServe appends these to the runtime's `tritonserver ...` args and merges env by name
                    "args": restricted_api_args(restrict_inference),
                    "env": key_env(secret_name, secret_key),
                    "resources": {"requests": {"cpu": cpu, "memory": memory}, "limits": limits},
                },
            }
        },
    }


def kserve_network_policy(service: dict[str, Any], monitoring_namespace: str = MONITORING_NAMESPACE) -> dict[str, Any]:
    """A NetworkPolicy for the pods of InferenceService `service`: inference from anywhere (the ingress gateway and
    Knative's activator live in other namespaces; the key, not the network, guards the control APIs), Triton's
    metrics only from `monitoring_namespace`, and queue-proxy's autoscaler metrics only from Knative."""
    check_namespace(monitoring_namespace)
    name = service["metadata"]["name"]
    rules = [
        ingress_rule([TRITON_PORTS["http"], TRITON_PORTS["grpc"], QUEUE_PROXY_PORTS["http"], QUEUE_PROXY_PORTS["h2c"]]),
        ingress_rule([TRITON_PORTS["metrics"]], monitoring_namespace),
        ingress_rule([QUEUE_PROXY_PORTS["autoscaler-metrics"]], KNATIVE_NAMESPACE),
    ]
    metadata = {"name": name, "labels": dict(service["metadata"]["labels"])}
    return network_policy(metadata, {"serving.kserve.io/inferenceservice": name}, rules)


def write_kserve(directory: Path, manifest: dict[str, Any], policy: dict[str, Any] | None = None) -> Path:
    """Write `manifest` and its NetworkPolicy (by default kserve_network_policy's) as `<directory>/kserve.yaml`
    (for `kubectl apply -f`), headed by the note on creating the admin key's Secret."""
    path = Path(directory) / "kserve.yaml"
    policy = kserve_network_policy(manifest) if policy is None else policy
    atomic_write_text(path, dump_manifests([manifest, policy]))
    return path
