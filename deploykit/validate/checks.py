"""The production checklist as checks on a running server: health, correctness, bad input, metrics.

Each check is pass, warn or fail with one line of detail; only a fail fails validation. A warning marks a
server behaviour that is safe but not what the protocol asks for (Triton 2.51 answers 500, not 400, to a body
it cannot parse). Every answer to a good request the checks send is held to the model's config: each declared
output present, of its datatype and shape, and finite.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any, NamedTuple

import numpy as np

from deploykit.errors import DeploykitError
from deploykit.export.parity import check_parity
from deploykit.runtime import Session
from deploykit.serve.access import client_access
from deploykit.serve.engines import engine_traits
from deploykit.serve.oip import TORCHSERVE_INPUT_NAME, OipClient, infer_body

PASS, WARN, FAIL = "pass", "warn", "fail"


@dataclass
class Check:
    group: str  # health | correctness | bad input | metrics | load
    name: str
    status: str  # pass | warn | fail
    detail: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _status_check(group: str, name: str, status: int, text: str, want: int = 200) -> Check:
    ok = status == want
    return Check(group, name, PASS if ok else FAIL, f"HTTP {status}" + ("" if ok else f": {text[:200]}"))


def health_checks(client: OipClient) -> list[Check]:
    """The engine's health routes (Triton: live, ready, model ready; TorchServe: ping), then the metadata."""
    checks = [
        _status_check("health", name, *client.request(route.format(model=client.model)))
        for name, route in client.traits.health
    ]
    if not client.traits.has_metadata:
        return checks
    status, text = client.request(f"/v2/models/{client.model}")
    if status == 200:
        meta = json.loads(text)
        ins = ", ".join(f"{t['name']} {t['datatype']} {t['shape']}" for t in meta.get("inputs", []))
        outs = ", ".join(f"{t['name']} {t['datatype']} {t['shape']}" for t in meta.get("outputs", []))
        checks.append(Check("health", "model metadata", PASS, f"versions {meta.get('versions')}: {ins} -> {outs}"))
    else:
        checks.append(_status_check("health", "model metadata", status, text))
    return checks


# ---- what the served model must answer ------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorSpec:
    """A model input or output as Triton's model metadata (from its config) declares it."""

    name: str
    datatype: str
    shape: tuple[int, ...]  # -1: any size; deploykit's models batch, so the first is the batch


@dataclass(frozen=True)
class ServedIO:
    """What a served model takes, and the outputs it must give (None: the engine declares none, as TorchServe)."""

    input: TensorSpec
    outputs: tuple[TensorSpec, ...] | None


class ServedTensor(NamedTuple):
    name: str
    datatype: str
    array: np.ndarray


def _spec(meta: dict[str, Any]) -> TensorSpec:
    return TensorSpec(meta["name"], meta["datatype"], tuple(int(d) for d in meta["shape"]))


def served_io(client: OipClient) -> ServedIO:
    """The model's input and declared outputs from Triton's metadata; TorchServe's fixed input and no declaration."""
    if not client.traits.has_metadata:
        return ServedIO(TensorSpec(TORCHSERVE_INPUT_NAME, "FP32", ()), None)
    meta = client.metadata()
    return ServedIO(_spec(meta["inputs"][0]), tuple(_spec(o) for o in meta["outputs"]))


def _fits(shape: tuple[int, ...], declared: tuple[int, ...] | None, batch: int) -> bool:
    """A batch of `batch` answered with `shape`: the batch first, and every declared size but -1 as declared."""
    if not shape or shape[0] != batch:
        return False
    return declared is None or (
        len(shape) == len(declared) and all(d in (-1, s) for s, d in zip(shape[1:], declared[1:]))
    )


def _nonfinite(array: np.ndarray) -> tuple[str, list[int]]:
    """What is not finite in a batch's output ('NaN', 'infinite values' or both) and in which of its rows."""
    if array.dtype.kind not in "fc" or array.ndim == 0 or np.isfinite(array).all():
        return "", []
    rows = np.flatnonzero(~np.isfinite(array.reshape(len(array), -1)).all(axis=1)).tolist()
    kinds = [k for k, found in (("NaN", np.isnan(array).any()), ("infinite values", np.isinf(array).any())) if found]
    return " and ".join(kinds), rows


def output_problems(
    outputs: list[ServedTensor], declared: tuple[TensorSpec, ...] | None, batch: int, first: int = 0
) -> dict[str, list[int]]:
    """What is wrong with one answer to a batch of `batch` samples, numbered from `first`: sentence -> samples.

    Each declared output must be there with its datatype and shape (a batch of `batch` first); every floating
    output must be finite.
    """
    samples = list(range(first, first + batch))
    problems: dict[str, list[int]] = {}
    specs = {s.name: s for s in declared} if declared is not None else {}
    for name in specs.keys() - {t.name for t in outputs}:
        problems[f"output '{name}' of the model's config is missing from the answer"] = samples
    for t in outputs:
        spec = specs.get(t.name)
        if declared is not None and spec is None:
            problems[f"output '{t.name}' is not in the model's config"] = samples
        if spec is not None and t.datatype != spec.datatype:
            problems[f"output '{t.name}' is {t.datatype} where the config says {spec.datatype}"] = samples
        if not _fits(t.array.shape, spec.shape if spec else None, batch):
            want = f"the config says {list(spec.shape)}" if spec else f"a batch of {batch} comes first"
            problems[f"output '{t.name}' has shape {list(t.array.shape)} where {want}"] = samples
        what, rows = _nonfinite(t.array)
        if rows:
            problems[f"output '{t.name}' holds {what}"] = [first + r for r in rows]
    return problems


def _numbered(samples: list[int], shown: int = 8) -> str:
    head = ", ".join(str(i) for i in samples[:shown])
    more = f", ... ({len(samples)} in all)" if len(samples) > shown else ""
    return f"sample{'s' if len(samples) > 1 else ''} {head}{more}"


def describe_problems(problems: dict[str, list[int]]) -> str:
    """'output 'logits' holds NaN for samples 0, 3; ...': each problem and the samples it was seen on."""
    return "; ".join(f"{what} for {_numbered(samples)}" for what, samples in problems.items())


def _merge(into: dict[str, list[int]], problems: dict[str, list[int]]) -> None:
    for what, samples in problems.items():
        into.setdefault(what, []).extend(samples)


def _from_json(output: dict[str, Any]) -> ServedTensor:
    from tritonclient.utils import triton_to_np_dtype

    data = np.asarray(output["data"], dtype=triton_to_np_dtype(output["datatype"]))
    return ServedTensor(output["name"], output["datatype"], data.reshape(output["shape"]))


class ServedSession(Session):
    """A served model as a Session, so offline parity checks compare it with the ONNX Runtime reference; every
    answer it gets is held to the model's config (`run` raises on the first wrong one)."""

    precision = "served"
    path = None

    def __init__(self, client: OipClient, protocol: str = "http", grpc_url: str | None = None) -> None:
        self.client, self.protocol, self.name = client, protocol, f"{client.engine}-{protocol}"
        self.io = served_io(client)
        self.access = client_access(client.engine)
        self._grpc = self.access.grpc_client(grpc_url) if protocol == "grpc" else None

    def _input(self, x: np.ndarray) -> np.ndarray:
        from tritonclient.utils import triton_to_np_dtype

        return np.ascontiguousarray(x, dtype=triton_to_np_dtype(self.io.input.datatype))

    def answer(self, x: np.ndarray) -> list[ServedTensor]:
        """Every output the server gives for batch `x`, with the datatype it names."""
        if self._grpc is None:
            return self._answer_http(x)
        import tritonclient.grpc as grpcclient

        inp = grpcclient.InferInput(self.io.input.name, list(x.shape), self.io.input.datatype)
        inp.set_data_from_numpy(self._input(x))
        result = self._grpc.infer(self.client.model, [inp], headers=self.access.grpc_headers)
        return [ServedTensor(o.name, o.datatype, result.as_numpy(o.name)) for o in result.get_response().outputs]

    def _answer_http(self, x: np.ndarray) -> list[ServedTensor]:
        body = infer_body(self._input(x), self.io.input.name, self.io.input.datatype)
        status, text = self.client.post_infer(json.dumps(body).encode())
        if status != 200:
            raise DeploykitError(
                f"Inference on '{self.client.model}' at {self.client.infer_url} failed with {status}: {text[:300]}"
            )
        return [_from_json(o) for o in json.loads(text)["outputs"]]  # Python's json reads Triton's NaN and Infinity

    def run(self, x: np.ndarray) -> np.ndarray:
        outputs = self.answer(x)
        problems = output_problems(outputs, self.io.outputs, len(x))
        if problems:
            raise DeploykitError(f"The answer to a batch of {len(x)} is wrong: {describe_problems(problems)}.")
        return outputs[0].array

    def close(self) -> None:
        if self._grpc is not None:
            self._grpc.close()


def _protocols(client: OipClient, grpc_url: str | None) -> list[str]:
    return ["http"] + (["grpc"] if grpc_url and "grpc" in client.traits.protocols else [])


def _described(declared: tuple[TensorSpec, ...] | None) -> str:
    if declared is None:
        return "every output finite, a batch's rows first (the engine declares no outputs)"
    outputs = ", ".join(f"{s.name} {s.datatype} {list(s.shape)}" for s in declared)
    return f"every output finite, as the config declares ({outputs})"


def output_checks(client: OipClient, batches: Iterable[np.ndarray], grpc_url: str | None = None) -> list[Check]:
    """Every sample sent, in `batches` (numbered in order), over HTTP (and gRPC for Triton): each answer has the
    config's outputs, datatypes and shapes, and is finite. A model that emits NaN fails here even with no
    offline reference to compare with; the detail names the output and the samples."""
    batches = list(batches)
    checks = []
    for protocol in _protocols(client, grpc_url):
        served, first = None, 0
        problems: dict[str, list[int]] = {}
        try:
            served = ServedSession(client, protocol, grpc_url)
            for x in batches:
                _merge(problems, output_problems(served.answer(x), served.io.outputs, len(x), first))
                first += len(x)
            status, detail = (FAIL, describe_problems(problems)) if problems else (PASS, _described(served.io.outputs))
            detail = f"{first} samples in {len(batches)} requests: {detail}"
        except Exception as e:  # a server error is this check's failure, not the end of validation
            status, detail = FAIL, f"at sample {first}: {str(e)[:300]}"
        finally:
            if served is not None:
                served.close()
        checks.append(Check("correctness", f"outputs valid ({protocol})", status, detail[:600]))
    return checks


def correctness_checks(
    client: OipClient, reference: Session, batches: list[np.ndarray], grpc_url: str | None = None
) -> list[Check]:
    """Served logits equal the offline logits of the same runtime and precision on real samples, over HTTP (and gRPC
    for Triton): within 1e-4 of the logits' scale in FP32, 1e-2 where the runtime computes in BF16 (8 mantissa bits:
    the served model may split the work across other threads, which sums in another order). An answer that breaks
    the model's config (see `output_checks`) fails the check with what was wrong."""
    rtol_scale = 1e-2 if "bf16" in reference.execution_precision else 1e-4
    checks = []
    for protocol in _protocols(client, grpc_url):
        served = None
        try:
            served = ServedSession(client, protocol, grpc_url)
            parity = check_parity(reference, served, batches, "fp32", rtol_scale=rtol_scale)
            detail = (
                f"batches {[len(b) for b in batches]}: max |served - offline| {parity['max_abs_diff']:.2e} "
                f"(tolerance {parity['tolerance']:.2e})"
            )
            checks.append(
                Check("correctness", f"outputs equal offline ({protocol})", PASS if parity["passed"] else FAIL, detail)
            )
        except Exception as e:  # a server error is this check's failure, not the end of validation
            checks.append(Check("correctness", f"outputs equal offline ({protocol})", FAIL, str(e)[:300]))
        finally:
            if served is not None:
                served.close()
    return checks


def _bad_requests(shape: list[int]) -> dict[str, tuple[bytes, bool]]:
    """name -> (body, whether the protocol calls it a body the server cannot parse at all)."""
    good = np.zeros(shape, dtype=np.float32)
    wrong_shape = np.zeros([*shape[:-1], shape[-1] + 1], dtype=np.float32)
    wrong_dtype = infer_body(good.astype(np.int32), datatype="INT32")
    oversized = infer_body(good)
    oversized["inputs"][0]["data"] = oversized["inputs"][0]["data"] * 4
    return {
        "wrong shape": (json.dumps(infer_body(wrong_shape)).encode(), False),
        "wrong dtype": (json.dumps(wrong_dtype).encode(), False),
        "missing input": (json.dumps({"inputs": []}).encode(), False),
        "oversized body": (json.dumps(oversized).encode(), True),
        "malformed JSON": (b'{"inputs": [{"name": "input", "shape": [1', True),
    }


def bad_input_checks(client: OipClient, input_shape: list[int]) -> list[Check]:
    """Each bad request is refused with a message, and the server still serves a good request afterwards (whose
    answer must fit the model's config, as every good request's)."""
    checks = []
    for name, (body, unparseable) in _bad_requests([1, *input_shape]).items():
        status, text = client.post_infer(body)
        if 400 <= status < 500 and text.strip():
            checks.append(Check("bad input", name, PASS, f"HTTP {status}: {text[:160]}"))
        elif status >= 500 and unparseable and text.strip():
            checks.append(
                Check(
                    "bad input", name, WARN, f"refused with HTTP {status}, not 4xx (the server's parser): {text[:120]}"
                )
            )
        else:
            checks.append(Check("bad input", name, FAIL, f"HTTP {status}, expected 4xx with a message: {text[:160]}"))
    try:
        ServedSession(client).run(np.zeros([1, *input_shape], dtype=np.float32))
        checks.append(Check("bad input", "still serving afterwards", PASS, "a good request succeeded"))
    except Exception as e:
        checks.append(Check("bad input", "still serving afterwards", FAIL, str(e)[:300]))
    return checks


def metrics_check(metrics_url: str, model: str, engine: str) -> Check:
    """The Prometheus endpoint answers and counts this model's successful requests."""
    from deploykit.loadtest.metrics import scrape, total

    try:
        values = scrape(metrics_url)
    except Exception as e:
        return Check("metrics", "prometheus metrics", FAIL, f"{metrics_url}: {str(e)[:200]}")
    # counters are keyed without `_total` (deploykit.loadtest.metrics.parse)
    name, label = engine_traits(engine).success_counter
    match = {label: model}
    count = total(values, name, match)
    status = PASS if count > 0 else FAIL
    label = ",".join(f'{k}="{v}"' for k, v in match.items())
    return Check("metrics", "prometheus metrics", status, f"{name}{{{label}}} = {count:g} at {metrics_url}")
