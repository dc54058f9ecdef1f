"""The KServe InferenceService, checked against the vendored schema generated from the KServe SDK's API types."""

import copy
import json
from importlib.resources import files

import kubernetes_validate
import pytest
import yaml
from jsonschema import Draft202012Validator
from test_k8s import CREATE_SECRET, FAKE_KEY, K8S_VERSION, dockerfile_instructions, restriction_flags, rule_sources
from test_triton_repo import tiny_onnx
from typer.testing import CliRunner

from deploykit.cli import app
from deploykit.errors import DeploykitError
from deploykit.package.kserve import TRITON_IMAGE, kserve_inference_service, kserve_network_policy, write_kserve
from deploykit.package.triton_repo import TritonModelOptions, write_triton_model
from deploykit.serve.access import CONTROL_APIS, INFERENCE_APIS

SCHEMA = json.loads(
    files("deploykit.package").joinpath("schemas/kserve-v1beta1-inferenceservice.schema.json").read_text()
)
VALIDATOR = Draft202012Validator(SCHEMA, format_checker=Draft202012Validator.FORMAT_CHECKER)
URI = "s3://models/deploykit/model_repo"
runner = CliRunner()

# KServe's documented Triton example (TorchScript CIFAR-10 on the kserve-tritonserver runtime)
DOCS_TRITON = """
apiVersion: serving.kserve.io/v1beta1
kind: InferenceService
metadata:
  name: torchscript-cifar10
spec:
  predictor:
    model:
      modelFormat:
        name: triton
      protocolVersion: v2
      runtimeVersion: 23.05-py3
      storageUri: gs://kfserving-examples/models/torchscript
      ports:
        - name: h2c
          protocol: TCP
          containerPort: 9000
      env:
        - name: OMP_NUM_THREADS
          value: "1"
      resources:
        limits:
          cpu: "1"
          memory: 8Gi
          nvidia.com/gpu: 1
"""


def errors(manifest):
    return list(VALIDATOR.iter_errors(manifest))


def test_vendored_schema_is_a_small_closed_schema_that_names_its_source():
    Draft202012Validator.check_schema(SCHEMA)
    assert "kserve 0.21.0" in SCHEMA["description"] and "kubernetes 36.0.0" in SCHEMA["description"]
    assert len(SCHEMA["$defs"]) > 100
    assert all(d["additionalProperties"] is False for d in SCHEMA["$defs"].values() if "properties" in d)
    # required fields come from the generated setters that refuse None
    assert SCHEMA["$defs"]["V1Container"]["required"] == ["name"]
    assert SCHEMA["$defs"]["V1EnvVar"]["required"] == ["name"]
    assert SCHEMA["$defs"]["V1beta1ModelSpec"]["required"] == ["modelFormat"]
    assert "required" not in SCHEMA["$defs"]["V1ResourceRequirements"]


def test_schema_accepts_kserves_documented_triton_service():
    assert errors(yaml.safe_load(DOCS_TRITON)) == []


@pytest.mark.parametrize(
    "options",
    [{}, {"gpus": 1, "min_replicas": 0, "cpu": "500m", "memory": "1Gi", "restrict_inference": True}],
)
def test_manifest_passes_the_kserve_schema(options):
    assert errors(kserve_inference_service("digits", URI, **options)) == []


def _model(manifest):
    return manifest["spec"]["predictor"]["model"]


def _misspell(manifest):
    _model(manifest)["storageURI"] = _model(manifest).pop("storageUri")


def _wrong_type(manifest):
    manifest["spec"]["predictor"]["minReplicas"] = "two"


def _missing_required(manifest):
    del _model(manifest)["modelFormat"]


def _bad_quantity(manifest):
    _model(manifest)["resources"]["limits"]["memory"] = "4 GB"


@pytest.mark.parametrize(
    ("breakage", "validator", "where"),
    [
        (_misspell, "additionalProperties", ["spec", "predictor", "model"]),
        (_wrong_type, "type", ["spec", "predictor", "minReplicas"]),
        (_missing_required, "required", ["spec", "predictor", "model"]),
        (_bad_quantity, "anyOf", ["spec", "predictor", "model", "resources", "limits", "memory"]),
    ],
)
def test_schema_rejects_a_broken_manifest(breakage, validator, where):
    manifest = kserve_inference_service("digits", URI)
    broken = copy.deepcopy(manifest)
    breakage(broken)
    found = errors(broken)
    assert [(e.validator, list(e.absolute_path)) for e in found] == [(validator, where)], found


def test_triton_runtime_pinned_to_the_dockerfiles_image():
    froms = [args for op, args in dockerfile_instructions() if op == "FROM"]
    assert froms == [TRITON_IMAGE]
    model = _model(kserve_inference_service("digits", URI))
    assert model["runtimeVersion"] == froms[0].rsplit(":", 1)[1] == "24.10-py3"


def test_manifest_serves_the_repository_with_triton_over_v2():
    manifest = kserve_inference_service("My_Model.v2", "gs://bucket/repo", min_replicas=0, max_replicas=3, gpus=1)
    assert (manifest["apiVersion"], manifest["kind"]) == ("serving.kserve.io/v1beta1", "InferenceService")
    assert manifest["metadata"]["name"] == "triton-my-model-v2"
    predictor = manifest["spec"]["predictor"]
    assert (predictor["minReplicas"], predictor["maxReplicas"]) == (0, 3)
    assert predictor["model"] | {"resources": None, "args": None, "env": None} == {
        "modelFormat": {"name": "triton"},
        "protocolVersion": "v2",
        "runtime": "kserve-tritonserver",
        "runtimeVersion": "24.10-py3",
        "storageUri": "gs://bucket/repo",
        "resources": None,
        "args": None,
        "env": None,
    }
    assert predictor["model"]["resources"] == {
        "requests": {"cpu": "2", "memory": "4Gi"},
        "limits": {"cpu": "2", "memory": "4Gi", "nvidia.com/gpu": 1},
    }


def test_triton_reads_the_admin_key_from_the_secret():
    model = _model(kserve_inference_service("digits", URI, secret_name="prod-triton-key", secret_key="admin"))
    # KServe appends the model's args to the runtime's `tritonserver --model-store=/mnt/models ...`
    assert model["args"] == restriction_flags(CONTROL_APIS)
    assert model["env"] == [
        {"name": "DEPLOYKIT_KEY", "valueFrom": {"secretKeyRef": {"name": "prod-triton-key", "key": "admin"}}}
    ]
    assert "command" not in model  # the runtime's command stays; kubelet expands $(DEPLOYKIT_KEY) in args


def test_restrict_inference_adds_inference_and_metadata():
    model = _model(kserve_inference_service("digits", URI, restrict_inference=True))
    assert model["args"] == restriction_flags(CONTROL_APIS + INFERENCE_APIS)


def test_network_policy_selects_the_predictor_and_admits_metrics_only_from_monitoring():
    service = kserve_inference_service("My_Model.v2", URI)
    policy = kserve_network_policy(service, monitoring_namespace="observability")
    kubernetes_validate.validate(policy, K8S_VERSION, strict=True)
    assert policy["metadata"]["name"] == "triton-my-model-v2"
    selector = {"serving.kserve.io/inferenceservice": "triton-my-model-v2"}  # the label KServe puts on its pods
    assert policy["spec"]["podSelector"] == {"matchLabels": selector}
    assert rule_sources(policy) == {
        8080: None,  # the runtime's HTTP and gRPC ports, and Knative queue-proxy's, which fronts them
        9000: None,
        8012: None,
        8013: None,
        8002: [{"kubernetes.io/metadata.name": "observability"}],
        9090: [{"kubernetes.io/metadata.name": "knative-serving"}],
    }
    assert rule_sources(kserve_network_policy(service))[8002] == [{"kubernetes.io/metadata.name": "monitoring"}]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"storage_uri": "file:///tmp/model_repo"}, "is not one KServe can fetch"),
        ({"storage_uri": "s3:/bucket/repo"}, "is not one KServe can fetch"),
        ({"storage_uri": "gs://"}, "is not one KServe can fetch"),
        ({"min_replicas": 3, "max_replicas": 2}, "0 <= min_replicas"),
        ({"min_replicas": 0, "max_replicas": 0}, "max_replicas >= 1"),
        ({"min_replicas": -1}, "0 <= min_replicas"),
        ({"name": "../etc"}, "is not allowed"),
        ({"name": "x" * 41}, "longer than 47 characters"),  # leaves room for '-predictor-00001'
        ({"cpu": "2 cores"}, "not a Kubernetes quantity"),
        ({"gpus": -1}, "gpus"),
        ({"secret_name": "Admin_Key"}, "Secret name 'Admin_Key' is not a valid Kubernetes name"),
    ],
)
def test_bad_options_raise_one_clear_error(kwargs, message):
    args = {"name": "digits", "storage_uri": URI, **kwargs}
    with pytest.raises(DeploykitError, match=message) as caught:
        kserve_inference_service(**args)
    assert str(caught.value).endswith(".") and "\n" not in str(caught.value)


def test_bad_monitoring_namespace_raises_one_clear_error():
    with pytest.raises(DeploykitError, match="Namespace 'Monitoring' is not a valid Kubernetes name"):
        kserve_network_policy(kserve_inference_service("digits", URI), monitoring_namespace="Monitoring")


def test_write_kserve_writes_the_service_and_its_network_policy(tmp_path):
    manifest = kserve_inference_service("digits", URI)
    path = write_kserve(tmp_path / "deploy", manifest)
    assert path == tmp_path / "deploy" / "kserve.yaml"
    text = path.read_text()
    assert list(yaml.safe_load_all(text)) == [manifest, kserve_network_policy(manifest)]
    assert f"tr -d '\\n' < deploykit-admin.key | {CREATE_SECRET}" in text.split("apiVersion:", 1)[0]
    assert [p.name for p in path.parent.iterdir()] == ["kserve.yaml"]
    policy = kserve_network_policy(manifest, monitoring_namespace="observability")
    assert list(yaml.safe_load_all(write_kserve(tmp_path, manifest, policy).read_text()))[1] == policy


def test_no_manifest_holds_the_key(tmp_path, monkeypatch):
    monkeypatch.setenv("DEPLOYKIT_KEY", FAKE_KEY)
    text = write_kserve(tmp_path, kserve_inference_service("digits", URI, restrict_inference=True)).read_text()
    assert FAKE_KEY not in text and "$(DEPLOYKIT_KEY)" in text
    assert "kind: Secret" not in text


# ---- CLI ------------------------------------------------------------------------------------------


def _package(tmp_path, *extra):
    model = tiny_onnx(tmp_path / "model.onnx")
    return runner.invoke(app, ["package", str(model), "--name", "digits", "--repo", str(tmp_path / "repo"), *extra])


def test_cli_writes_kserve_yaml_beside_the_repository(tmp_path):
    result = _package(tmp_path, "--flavour", "native", "--kserve", "--storage-uri", URI)
    assert result.exit_code == 0, result.output
    manifest, policy = yaml.safe_load_all((tmp_path / "kserve.yaml").read_text())
    assert errors(manifest) == [] and policy["kind"] == "NetworkPolicy"
    assert _model(manifest)["storageUri"] == URI and manifest["metadata"]["name"] == "triton-digits"
    assert f"kserve: {tmp_path / 'kserve.yaml'}" in " ".join(result.stdout.split())
    assert (tmp_path / "repo" / "digits" / "1" / "model.onnx").is_file()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--flavour", "native", "--kserve"], "--kserve needs --storage-uri"),
        (["--kserve", "--storage-uri", URI], "cannot run the portable flavour: add --flavour native"),
        (["--flavour", "native", "--kserve", "--storage-uri", "/data/repo"], "is not one KServe can fetch"),
    ],
)
def test_cli_refuses_before_writing_anything(tmp_path, extra, message):
    result = _package(tmp_path, *extra)
    text = " ".join(result.stderr.split())  # rich wraps long lines
    assert result.exit_code == 2 and text.startswith("error: ") and message in text, result.output
    assert "Traceback" not in result.output and text.count(". ") == 0  # one sentence
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


def test_cli_refuses_a_repository_holding_a_portable_model(tmp_path):
    (tmp_path / "src").mkdir()
    write_triton_model(tmp_path / "repo", "old", tiny_onnx(tmp_path / "src" / "old.onnx"), TritonModelOptions())
    result = _package(tmp_path, "--flavour", "native", "--kserve", "--storage-uri", URI)
    text = " ".join(result.stderr.split())
    assert result.exit_code == 2 and "Model 'old' in" in text and "portable flavour" in text, result.output
    assert not (tmp_path / "repo" / "digits").exists() and not (tmp_path / "kserve.yaml").exists()
