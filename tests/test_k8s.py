"""Kubernetes manifests checked against the Kubernetes API schemas, and the production Dockerfile's text."""

import copy
import json
import re
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from deploykit.errors import DeploykitError
from deploykit.package.k8s import k8s_manifests, k8s_name, write_k8s
from deploykit.serve.access import CONTROL_APIS, HEADER, INFERENCE_APIS

K8S_VERSION = "1.30.0"  # a release still widely run; the schemas ship inside kubernetes-validate
DNS_1123 = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
DOCKERFILE = Path(__file__).resolve().parents[1] / "Dockerfile"
FAKE_KEY = "fake-admin-key-0123456789abcdef"
CREATE_SECRET = "kubectl create secret generic deploykit-admin-key --from-file=key=/dev/stdin"


def by_kind(manifests):
    return {m["kind"]: m for m in manifests}


def container_of(manifests):
    return by_kind(manifests)["Deployment"]["spec"]["template"]["spec"]["containers"][0]


def restriction_flags(apis):
    value = f"{','.join(apis)}:{HEADER}=$(DEPLOYKIT_KEY)"
    return [f"--http-restricted-api={value}", f"--grpc-restricted-protocol={value}"]


def rule_sources(policy):
    """{port: the namespaces admitted to it, or None for anywhere}."""
    return {
        port["port"]: [peer["namespaceSelector"]["matchLabels"] for peer in rule["from"]] if "from" in rule else None
        for rule in policy["spec"]["ingress"]
        for port in rule["ports"]
    }


@pytest.mark.parametrize("options", [{"gpus": 0}, {"gpus": 1, "restrict_inference": True}])
def test_manifests_pass_strict_schema_validation(options):
    manifests = k8s_manifests("digits", "registry.example/deploykit:1.0", **options)
    assert [m["kind"] for m in manifests] == ["Deployment", "Service", "HorizontalPodAutoscaler", "NetworkPolicy"]
    for manifest in manifests:
        kubernetes_validate.validate(manifest, K8S_VERSION, strict=True)


def test_broken_manifest_fails_validation():
    deployment = by_kind(k8s_manifests("digits", "img:1"))["Deployment"]
    broken = copy.deepcopy(deployment)
    broken["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["port"] = [8000]
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)
    unknown = copy.deepcopy(deployment)
    unknown["spec"]["replica"] = 2  # misspelt: only strict validation catches it
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(unknown, K8S_VERSION, strict=True)


def test_deployment_runs_triton_with_probes_resources_and_metrics():
    objects = by_kind(
        k8s_manifests(
            "My_Model.v2", "img:1", replicas=2, cpu="500m", memory="1Gi", gpus=1, http_port=9000, metrics_port=9002
        )
    )
    assert {o["metadata"]["name"] for o in objects.values()} == {"triton-my-model-v2"}
    pod = objects["Deployment"]["spec"]["template"]
    container = pod["spec"]["containers"][0]
    assert container["args"][:2] == ["tritonserver", "--model-repository=/models"]
    assert "--http-port=9000" in container["args"] and "--metrics-port=9002" in container["args"]
    assert container["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": 9000}
    assert container["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": 9000}
    assert container["resources"] == {
        "requests": {"cpu": "500m", "memory": "1Gi"},
        "limits": {"cpu": "500m", "memory": "1Gi", "nvidia.com/gpu": 1},
    }
    assert pod["metadata"]["annotations"] == {
        "prometheus.io/scrape": "true",
        "prometheus.io/port": "9002",
        "prometheus.io/path": "/metrics",
    }
    assert objects["Deployment"]["spec"]["replicas"] == 2
    assert objects["Deployment"]["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    assert objects["Service"]["spec"]["selector"] == objects["Deployment"]["spec"]["selector"]["matchLabels"]
    assert {p["name"]: p["port"] for p in objects["Service"]["spec"]["ports"]} == {
        "http": 9000,
        "grpc": 8001,
        "metrics": 9002,
    }


def test_triton_reads_the_admin_key_from_the_secret():
    container = container_of(k8s_manifests("digits", "img:1", secret_name="prod-triton-key", secret_key="admin"))
    assert container["args"][-2:] == restriction_flags(CONTROL_APIS)  # kubelet expands $(DEPLOYKIT_KEY) in args
    assert container["env"] == [
        {"name": "DEPLOYKIT_KEY", "valueFrom": {"secretKeyRef": {"name": "prod-triton-key", "key": "admin"}}}
    ]
    assert "command" not in container  # args run through the image's entrypoint, no shell needed for the expansion


def test_restrict_inference_adds_inference_and_metadata():
    container = container_of(k8s_manifests("digits", "img:1", restrict_inference=True))
    assert container["args"][-2:] == restriction_flags(CONTROL_APIS + INFERENCE_APIS)
    assert INFERENCE_APIS == ("inference", "metadata")


@pytest.mark.parametrize("restrict_inference", [False, True])
def test_health_probes_stay_on_open_endpoints(restrict_inference):
    container = container_of(k8s_manifests("digits", "img:1", restrict_inference=restrict_inference))
    probes = [container[probe]["httpGet"]["path"] for probe in ("startupProbe", "livenessProbe", "readinessProbe")]
    assert probes == ["/v2/health/live", "/v2/health/live", "/v2/health/ready"]
    restricted = container["args"][-1].split("=", 1)[1].split(":")[0].split(",")
    assert "health" not in restricted


def test_network_policy_admits_metrics_only_from_the_monitoring_namespace():
    objects = by_kind(k8s_manifests("digits", "img:1", metrics_port=9102, monitoring_namespace="observability"))
    policy = objects["NetworkPolicy"]
    assert policy["metadata"]["name"] == "triton-digits"
    assert policy["spec"]["podSelector"]["matchLabels"] == objects["Deployment"]["spec"]["selector"]["matchLabels"]
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    assert rule_sources(policy) == {
        8000: None,
        8001: None,
        9102: [{"kubernetes.io/metadata.name": "observability"}],
    }
    assert rule_sources(by_kind(k8s_manifests("digits", "img:1"))["NetworkPolicy"])[8002] == [
        {"kubernetes.io/metadata.name": "monitoring"}
    ]


def test_no_manifest_holds_the_key(tmp_path, monkeypatch):
    key_file = tmp_path / "deploykit-admin.key"
    key_file.write_text(FAKE_KEY + "\n")
    key_file.chmod(0o600)
    monkeypatch.setenv("DEPLOYKIT_KEY", FAKE_KEY)
    monkeypatch.setenv("DEPLOYKIT_KEY_FILE", str(key_file))
    text = write_k8s(tmp_path / "deploy", k8s_manifests("digits", "img:1", restrict_inference=True)).read_text()
    assert FAKE_KEY not in text and "$(DEPLOYKIT_KEY)" in text
    assert "kind: Secret" not in text


def test_autoscaler_targets_the_deployment_on_cpu():
    hpa = by_kind(
        k8s_manifests("digits", "img:1", min_replicas=2, replicas=2, max_replicas=6, target_cpu_utilization=60)
    )["HorizontalPodAutoscaler"]
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "triton-digits"}
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 6)
    assert hpa["spec"]["metrics"][0]["resource"] == {
        "name": "cpu",
        "target": {"type": "Utilization", "averageUtilization": 60},
    }


def test_gpu_limit_only_when_asked():
    container = by_kind(k8s_manifests("digits", "img:1"))["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in container["resources"]["limits"]


@pytest.mark.parametrize("name", ["ResNet_50.int8", "9lives", "a", "x" * 56])
def test_object_names_are_dns_labels(name):
    assert DNS_1123.fullmatch(k8s_name(name)) and len(k8s_name(name)) <= 63


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"name": "../etc"}, "is not allowed"),
        ({"name": "x" * 57}, "longer than 63 characters"),
        ({"cpu": "2 cores"}, "not a Kubernetes quantity"),
        ({"memory": "4GB"}, "not a Kubernetes quantity"),
        ({"grpc_port": 8000}, "three different numbers"),
        ({"replicas": 5}, "max_replicas"),
        ({"target_cpu_utilization": 0}, "percentage"),
        ({"secret_name": "Admin_Key"}, "Secret name 'Admin_Key' is not a valid Kubernetes name"),
        ({"secret_key": "a key"}, "Secret key 'a key' is not a valid Kubernetes name"),
        ({"monitoring_namespace": "Monitoring"}, "Namespace 'Monitoring' is not a valid Kubernetes name"),
    ],
)
def test_bad_options_raise_one_clear_error(kwargs, message):
    args = {"name": "digits", "image": "img:1", **kwargs}
    with pytest.raises(DeploykitError, match=message):
        k8s_manifests(**args)


def test_write_k8s_is_one_multi_document_file(tmp_path):
    manifests = k8s_manifests("digits", "img:1")
    path = write_k8s(tmp_path / "deploy", manifests)
    assert path == tmp_path / "deploy" / "k8s.yaml"
    text = path.read_text()
    assert list(yaml.safe_load_all(text)) == manifests
    assert "&id" not in text and "*id" not in text  # every object spelled out, no YAML aliases
    assert [p.name for p in path.parent.iterdir()] == ["k8s.yaml"]
    header = text.split("apiVersion:", 1)[0]
    assert header.startswith("# ") and f"tr -d '\\n' < deploykit-admin.key | {CREATE_SECRET}" in header


def test_write_k8s_names_the_secret_it_reads(tmp_path):
    text = write_k8s(tmp_path, k8s_manifests("digits", "img:1", secret_name="prod-key", secret_key="k")).read_text()
    assert "kubectl create secret generic prod-key --from-file=k=/dev/stdin" in text
    assert text.count("kubectl create secret") == 1


# ---- Dockerfile -----------------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE.read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def test_dockerfile_pins_triton_and_serves_models():
    steps = dockerfile_instructions()
    froms = [args for op, args in steps if op == "FROM"]
    assert len(froms) == 1
    image, tag = froms[0].rsplit(":", 1)
    assert image == "nvcr.io/nvidia/tritonserver"
    assert re.fullmatch(r"\d{2}\.\d{2}-py3", tag)  # a release tag, never latest: 24.10 is Triton 2.51

    cmd = json.loads(next(args for op, args in steps if op == "CMD"))
    assert cmd[0] == "tritonserver" and "--model-repository=/models" in cmd
    copies = [args for op, args in steps if op == "COPY"]
    assert any(args.endswith("model_repo/ /models/") for args in copies)
    runs = [args for op, args in steps if op == "RUN"]
    torch_first = next(i for i, r in enumerate(runs) if "torch==2.13.0" in r)
    assert torch_first < next(i for i, r in enumerate(runs) if ".[gpu]" in r)
    assert dict(steps)["USER"] == "triton-server"
    assert dict(steps)["EXPOSE"].split() == ["8000", "8001", "8002"]
    assert "/v2/health/ready" in dict(steps)["HEALTHCHECK"]
