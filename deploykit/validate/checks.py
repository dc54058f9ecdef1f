"""The production checklist as checks on a running server: health, correctness, bad input, metrics.

Each check is pass, warn or fail with one line of detail; only a fail fails validation. A warning marks a
server behaviour that is safe but not what the protocol asks for (Triton 2.51 answers 500, not 400, to a body
it cannot parse).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from deploykit.export.parity import check_parity
from deploykit.runtime import Session
from deploykit.serve.engines import engine_traits
from deploykit.serve.oip import OipClient, infer_body

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


class ServedSession(Session):
    """A served model as a Session, so offline parity checks compare it with the ONNX Runtime reference."""

    precision = "served"
    path = None

    def __init__(self, client: OipClient, protocol: str = "http", grpc_url: str | None = None) -> None:
        self.client, self.protocol, self.name = client, protocol, f"{client.engine}-{protocol}"
        self._grpc = None
        if protocol == "grpc":
            import tritonclient.grpc as grpcclient

            self._grpc = grpcclient.InferenceServerClient(grpc_url)

    def run(self, x: np.ndarray) -> np.ndarray:
        if self._grpc is None:
            return self.client.infer(x)
        import tritonclient.grpc as grpcclient

        inp = grpcclient.InferInput("input", list(x.shape), "FP32")
        inp.set_data_from_numpy(np.ascontiguousarray(x, dtype=np.float32))
        return self._grpc.infer(self.client.model, [inp]).as_numpy("logits")

    def close(self) -> None:
        if self._grpc is not None:
            self._grpc.close()


def correctness_checks(
    client: OipClient, reference: Session, batches: list[np.ndarray], grpc_url: str | None = None
) -> list[Check]:
    """Served logits equal the offline logits of the same runtime and precision on real samples, over HTTP (and gRPC
    for Triton): within 1e-4 of the logits' scale in FP32, 1e-2 where the runtime computes in BF16 (8 mantissa bits:
    the served model may split the work across other threads, which sums in another order)."""
    protocols = ["http"] + (["grpc"] if grpc_url and "grpc" in client.traits.protocols else [])
    rtol_scale = 1e-2 if "bf16" in reference.execution_precision else 1e-4
    checks = []
    for protocol in protocols:
        served = ServedSession(client, protocol, grpc_url)
        try:
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
    """Each bad request is refused with a message, and the server still serves a good request afterwards."""
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
        client.infer(np.zeros([1, *input_shape], dtype=np.float32))
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
