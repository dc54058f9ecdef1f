"""Generate kserve-v1beta1-inferenceservice.schema.json: the schema tests check `deploykit package --kserve` against.

KServe's real CRD (config/crd/full/serving.kserve.io_inferenceservices.yaml in kserve/kserve) is 1 MB of YAML
that no package registry carries. The KServe Python SDK on PyPI carries the same API: its model classes
(kserve/models/*.py) are generated from the same Go types, and refer to the Kubernetes client's model classes for
the pod and container types. This script walks those classes from V1beta1InferenceService through
`openapi_types` and writes one `$defs` entry per class: JSON property names from `attribute_map`,
`additionalProperties: false` everywhere (as kubectl's strict field validation rejects unknown fields), and
`required` wherever the generated setter refuses None. It runs outside the project's environment (neither package
is a deploykit dependency), from the repository root:

    python3 -m venv /tmp/kserve-schema
    /tmp/kserve-schema/bin/pip install --no-deps kserve==0.21.0 kubernetes==36.0.0 six urllib3
    /tmp/kserve-schema/bin/python deploykit/package/schemas/make_kserve_schema.py

kubernetes 36.0.0 is the client whose V1PodSpec has exactly the pod fields kserve 0.21.0's PredictorSpec inlines.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import inspect
import json
import re
import sys
import types
from pathlib import Path
from typing import Any

OUTPUT = Path(__file__).with_name("kserve-v1beta1-inferenceservice.schema.json")
ROOT = "V1beta1InferenceService"
MODEL_PACKAGES = ("kserve.models", "kubernetes.client.models")  # searched in this order for a class name

_PRIMITIVES = {
    "str": {"type": "string"},
    "int": {"type": "integer"},
    "float": {"type": "number"},
    "bool": {"type": "boolean"},
    "object": {},  # free-form JSON (e.g. a managed-fields entry's fieldsV1)
    "datetime": {"type": "string", "format": "date-time"},
    "date": {"type": "string", "format": "date"},
}
# resource.Quantity as controller-gen writes it into every CRD: a number, or a string of this form
QUANTITY = {
    "anyOf": [
        {"type": "integer"},
        {
            "type": "string",
            "pattern": r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))"
            r"(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$",
        },
    ],
    "x-kubernetes-int-or-string": True,
}
INT_OR_STRING = {"type": ["integer", "string"], "x-kubernetes-int-or-string": True}
# Go types with their own JSON form, which the SDK models as plain objects or strings
TYPE_OVERRIDES = {
    "ResourceQuantity": QUANTITY,
    "V1beta1MetricQuantity": QUANTITY,  # autoscaling targets: kserve's wrapper of resource.Quantity
    "V1Time": _PRIMITIVES["datetime"],
    "KnativeVolatileTime": _PRIMITIVES["datetime"],
    "KnativeURL": {"type": "string"},  # knative's apis.URL marshals as its string form
    # status only (the API server ignores status on create): a Knative type neither SDK carries
    "KnativeDevServingPkgApisServingV1TrafficTarget": {"type": "object"},
}
# The Kubernetes client flattens resource.Quantity to 'str' and IntOrString to 'object': (class, JSON name) -> schema
FIELD_OVERRIDES = {
    ("V1ResourceRequirements", "limits"): {"type": "object", "additionalProperties": QUANTITY},
    ("V1ResourceRequirements", "requests"): {"type": "object", "additionalProperties": QUANTITY},
    ("V1VolumeResourceRequirements", "limits"): {"type": "object", "additionalProperties": QUANTITY},
    ("V1VolumeResourceRequirements", "requests"): {"type": "object", "additionalProperties": QUANTITY},
    ("V1EmptyDirVolumeSource", "sizeLimit"): QUANTITY,
    ("V1ResourceFieldSelector", "divisor"): QUANTITY,
    ("V1HTTPGetAction", "port"): INT_OR_STRING,
    ("V1TCPSocketAction", "port"): INT_OR_STRING,
    ("V1RollingUpdateDeployment", "maxSurge"): INT_OR_STRING,
    ("V1RollingUpdateDeployment", "maxUnavailable"): INT_OR_STRING,
}
_REQUIRED_MARK = "must not be `None`"  # what the generated setter raises when a required field is set to None


def _bare_package(name: str) -> None:
    """Register package `name` without running its __init__.py (kserve's imports the whole model server)."""
    top, *rest = name.split(".")
    spec = importlib.util.find_spec(top)  # a top-level spec only locates the package, it runs nothing
    if spec is None or not spec.submodule_search_locations:
        sys.exit(f"{top} is not installed here: see this script's docstring for the environment it needs.")
    for depth in range(len(rest) + 1):
        module_name = ".".join([top, *rest[:depth]])
        if module_name not in sys.modules:
            module = types.ModuleType(module_name)
            module.__path__ = [str(Path(spec.submodule_search_locations[0], *rest[:depth]))]
            sys.modules[module_name] = module


def _class_modules() -> dict[str, str]:
    """Class name -> module, from the `class X(object)` lines of the model files (the first package wins; kserve's
    __init__.py does not list all of its models)."""
    found: dict[str, str] = {}
    for package in MODEL_PACKAGES:
        _bare_package(package)
        for path in sorted(Path(sys.modules[package].__path__[0]).glob("*.py")):
            for name in re.findall(r"^class (\w+)\(object\):", path.read_text(), re.M):
                found.setdefault(name, f"{package}.{path.stem}")
    return found


class Walker:
    """Collects one $defs entry per class reachable from the root, and which FIELD_OVERRIDES it applied."""

    def __init__(self) -> None:
        self.modules = _class_modules()
        self.defs: dict[str, dict[str, Any]] = {}
        self.overridden: set[tuple[str, str]] = set()

    def schema(self, type_name: str) -> dict[str, Any]:
        # kserve names some Kubernetes types by Go package: K8sIoApiAppsV1DeploymentStrategy is V1DeploymentStrategy
        type_name = re.sub(r"^K8sIoApi[A-Z][a-z]+(?=V[0-9])", "", type_name)
        if type_name in TYPE_OVERRIDES:
            return TYPE_OVERRIDES[type_name]
        if type_name in _PRIMITIVES:
            return _PRIMITIVES[type_name]
        if m := re.fullmatch(r"list\[(.+)\]", type_name):
            return {"type": "array", "items": self.schema(m.group(1))}
        if m := re.fullmatch(r"dict[\[(]str, (.+)[\])]", type_name):  # kserve: dict(str, X); kubernetes: dict[str, X]
            return {"type": "object", "additionalProperties": self.schema(m.group(1))}
        if type_name not in self.modules:
            sys.exit(f"Type {type_name!r} is neither a known primitive nor a class in {', '.join(MODEL_PACKAGES)}.")
        if type_name not in self.defs:
            self.defs[type_name] = {}  # placed first: a class may refer to itself
            self.defs[type_name] = self._class_schema(type_name)
        return {"$ref": f"#/$defs/{type_name}"}

    def _class_schema(self, name: str) -> dict[str, Any]:
        cls = getattr(importlib.import_module(self.modules[name]), name)
        properties, required = {}, []
        for attr, type_name in sorted(cls.openapi_types.items(), key=lambda item: cls.attribute_map[item[0]]):
            key = cls.attribute_map[attr]
            if (name, key) in FIELD_OVERRIDES:
                properties[key] = FIELD_OVERRIDES[name, key]
                self.overridden.add((name, key))
            else:
                properties[key] = self.schema(type_name)
            if _REQUIRED_MARK in inspect.getsource(getattr(cls, attr).fset):
                required.append(key)
        schema: dict[str, Any] = {"type": "object", "properties": properties, "additionalProperties": False}
        if required:
            schema["required"] = required
        return schema


def generate() -> dict[str, Any]:
    walker = Walker()
    root = walker.schema(ROOT)
    unused = set(FIELD_OVERRIDES) - walker.overridden
    if unused:  # the client renamed a class or field, or the walk no longer reaches it: fix the table
        sys.exit(f"FIELD_OVERRIDES names fields the walk never met: {sorted(unused)}.")
    versions = {p: importlib.metadata.version(p) for p in ("kserve", "kubernetes")}
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "KServe InferenceService (serving.kserve.io/v1beta1)",
        "description": (
            f"Generated by deploykit/package/schemas/make_kserve_schema.py from the model classes of the kserve "
            f"{versions['kserve']} Python SDK and the kubernetes {versions['kubernetes']} client (openapi_types, "
            "attribute_map; required where the generated setter refuses None), since the CRD itself is not "
            "published to a package registry. Every object is closed (additionalProperties: false, like "
            "kubectl's strict field validation); resource quantities and int-or-string ports follow the CRD's "
            "forms. Added at the root, as the API server checks them: apiVersion, kind and metadata.name."
        ),
        "allOf": [root],
        "properties": {
            "apiVersion": {"const": "serving.kserve.io/v1beta1"},
            "kind": {"const": "InferenceService"},
            "metadata": {"required": ["name"]},
        },
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "$defs": dict(sorted(walker.defs.items())),
    }


def dump(schema: dict[str, Any]) -> str:
    """JSON with one line per $defs entry: diffs show which class changed, and the file stays small."""
    head = {k: v for k, v in schema.items() if k != "$defs"}
    lines = [json.dumps(head, indent=1)[:-2] + ",", ' "$defs": {']
    entries = [
        f"  {json.dumps(name)}: {json.dumps(body, separators=(',', ':'))}"
        for name, body in schema["$defs"].items()
    ]
    return "\n".join(lines + [",\n".join(entries), " }", "}"]) + "\n"


if __name__ == "__main__":
    schema = generate()
    OUTPUT.write_text(dump(schema))
    print(f"{OUTPUT}: {OUTPUT.stat().st_size:,} bytes, {len(schema['$defs'])} classes")
