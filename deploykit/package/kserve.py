"""A KServe InferenceService (serving.kserve.io/v1beta1) serving a native Triton model repository.

KServe's storage initializer downloads the repository from `storageUri` to /mnt/models, and its
`kserve-tritonserver` ClusterServingRuntime starts Triton on it over the v2 (Open Inference) protocol; the
runtime's image tag is pinned to the Dockerfile's, so the cluster runs the Triton version deploykit tests against.
The InferenceService is named like the k8s.py objects (`triton-<model>`).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from deploykit.errors import DeploykitError
from deploykit.files import atomic_write_text
from deploykit.package.k8s import check_resources, k8s_name

TRITON_IMAGE = "nvcr.io/nvidia/tritonserver:24.10-py3"  # the Dockerfile's FROM (a test keeps them equal)
RUNTIME = "kserve-tritonserver"  # KServe's ClusterServingRuntime for Triton
# Schemes KServe's storage initializer fetches from (pvc:// is mounted by the controller instead)
STORAGE_SCHEMES = ("gs", "s3", "pvc", "https", "http", "hdfs", "webhdfs", "oci", "hf")
# KServe names the predictor's objects `<name>-predictor`, and Knative its first revision `<name>-predictor-00001`:
# each must fit a 63-character label
_MAX_NAME = 63 - len("-predictor-00001")


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
) -> dict[str, Any]:
    """The InferenceService (a plain dict) serving the Triton model repository at `storage_uri` for model `name`."""
    object_name = k8s_name(name, max_length=_MAX_NAME)
    check_resources(cpu, memory)
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
                    "resources": {"requests": {"cpu": cpu, "memory": memory}, "limits": limits},
                },
            }
        },
    }


def write_kserve(directory: Path, manifest: dict[str, Any]) -> Path:
    """Write `manifest` as `<directory>/kserve.yaml` (for `kubectl apply -f`)."""
    path = Path(directory) / "kserve.yaml"
    atomic_write_text(path, yaml.safe_dump(manifest, sort_keys=False))
    return path
