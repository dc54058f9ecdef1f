"""A corpus of malformed requests per protocol (HTTP JSON, HTTP binary tensors, gRPC), sent to a live Triton.

Every request must be refused (HTTP 4xx, or a gRPC status that names the caller's mistake), or at worst answered
with the server's own error and its message; the server must stay live after each one, and a good request right
after the corpus must return the model's correct outputs. "Crashed" counts requests after which the server no
longer answered: it must be 0.
"""

from __future__ import annotations

import http.client
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from deploykit.serve.access import ClientAccess, client_access
from deploykit.serve.oip import infer_body
from deploykit.serve.process import http_status

REFUSED, SERVER_ERROR, ACCEPTED, CRASHED = "refused", "server error", "accepted", "crashed"
# UNAVAILABLE is not among them: it is what a dead server answers. RESOURCE_EXHAUSTED: gRPC refused the message size.
_GRPC_REFUSALS = {"INVALID_ARGUMENT", "NOT_FOUND", "OUT_OF_RANGE", "FAILED_PRECONDITION", "RESOURCE_EXHAUSTED"}


@dataclass
class Outcome:
    protocol: str
    case: str
    result: str  # refused | server error | accepted | crashed
    detail: str


# ---- HTTP ---------------------------------------------------------------------------------------------------


class _Http:
    """Raw HTTP/1.1 requests, so that bodies, headers and paths can be as wrong as a client can make them; each
    carries the key (when the environment names one), so the model's input handling is what gets tried."""

    def __init__(self, url: str, timeout: float) -> None:
        parts = urlsplit(url)
        self.host, self.port, self.timeout = parts.hostname or "127.0.0.1", parts.port or 80, timeout
        self.headers = {**client_access().inference_headers, "Content-Type": "application/json"}

    def send(self, path: str, body: bytes, headers: dict[str, str] | None = None) -> tuple[int, str]:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        try:
            conn.request("POST", path, body=body, headers={**self.headers, **(headers or {})})
            reply = conn.getresponse()
            return reply.status, reply.read().decode(errors="replace")
        except (OSError, http.client.HTTPException) as e:
            return 0, f"{type(e).__name__}: {e}"
        finally:
            conn.close()


def _http_result(status: int, text: str) -> tuple[str, str]:
    if 400 <= status < 500:
        return REFUSED, f"HTTP {status}: {text[:160]}"
    if status >= 500 and text.strip():
        return SERVER_ERROR, f"HTTP {status}: {text[:160]}"
    if status == 200:
        return ACCEPTED, "HTTP 200"
    return CRASHED, f"HTTP {status}: {text[:160]}"


def _json(body: Any) -> bytes:
    return json.dumps(body).encode()


def json_cases(model: str, shape: list[int]) -> dict[str, tuple[str, bytes]]:
    """name -> (path, body) for HTTP JSON; `shape` is one request's full input shape, batch first."""
    infer = f"/v2/models/{model}/infer"
    good = np.zeros(shape, np.float32)
    body = infer_body(good)
    tensor = body["inputs"][0]

    def with_tensor(**changes: Any) -> bytes:
        return _json({"inputs": [{**tensor, **changes}]})

    wrong_last = [*shape[:-1], shape[-1] + 1]
    deep = (
        b'{"inputs": [{"name": "input", "shape": [1], "datatype": "FP32", "data": '
        + b"[" * 100_000
        + b"0"
        + b"]" * 100_000
    )
    return {
        "wrong shape": (infer, with_tensor(shape=wrong_last, data=[0.0] * int(np.prod(wrong_last)))),
        "wrong rank": (infer, with_tensor(shape=[int(np.prod(shape))])),
        "negative dim": (infer, with_tensor(shape=[-1, *shape[1:]])),
        "zero batch": (infer, with_tensor(shape=[0, *shape[1:]], data=[])),
        "huge dim": (infer, with_tensor(shape=[10**12, *shape[1:]])),
        "dims overflow int64": (infer, with_tensor(shape=[2**70, *shape[1:]])),
        "too few values": (infer, with_tensor(data=tensor["data"][:-1])),
        "too many values": (infer, with_tensor(data=tensor["data"] + [0.0])),
        "wrong dtype INT32": (infer, with_tensor(datatype="INT32", data=[0] * len(tensor["data"]))),
        "wrong dtype FP64": (infer, with_tensor(datatype="FP64")),
        "unknown dtype": (infer, with_tensor(datatype="FP17")),
        "strings as data": (infer, with_tensor(data=["x"] * len(tensor["data"]))),
        "NaN data": (infer, with_tensor(data=[float("nan")] * len(tensor["data"]))),  # json writes NaN
        "Infinity data": (infer, with_tensor(data=[float("inf")] * len(tensor["data"]))),
        "missing input": (infer, _json({"inputs": []})),
        "no inputs key": (infer, _json({})),
        "wrong input name": (infer, with_tensor(name="not_the_input")),
        "extra input": (infer, _json({"inputs": [tensor, {**tensor, "name": "extra"}]})),
        "missing datatype": (infer, _json({"inputs": [{k: v for k, v in tensor.items() if k != "datatype"}]})),
        "missing shape": (infer, _json({"inputs": [{k: v for k, v in tensor.items() if k != "shape"}]})),
        "missing data": (infer, _json({"inputs": [{k: v for k, v in tensor.items() if k != "data"}]})),
        "unknown output requested": (infer, _json({**body, "outputs": [{"name": "no_such_output"}]})),
        "inputs not a list": (infer, _json({"inputs": tensor})),
        "JSON array at top": (infer, _json([body])),
        "empty body": (infer, b""),
        "not JSON": (infer, b"hello"),
        "truncated JSON": (infer, _json(body)[:40]),
        "invalid UTF-8": (infer, b'{"inputs": [{"name": "\xff\xfe", "shape": [1], "datatype": "FP32", "data": [0]}]}'),
        "deeply nested JSON": (infer, deep + b"}]}"),  # written by hand: json.dumps would recurse as deep
        "oversized body": (infer, with_tensor(data=tensor["data"] * 64)),
        "unknown model": ("/v2/models/no_such_model/infer", _json(body)),
        "unknown version": (f"/v2/models/{model}/versions/999/infer", _json(body)),
        "path-like model name": ("/v2/models/..%2F..%2Fetc%2Fpasswd/infer", _json(body)),
        "path traversal in URL": (f"/v2/models/../../{model}/infer", _json(body)),
    }


def binary_cases(model: str, shape: list[int]) -> dict[str, tuple[bytes, dict[str, str]]]:
    """name -> (body, headers) for Triton's binary tensor extension (a JSON header, then raw tensor bytes)."""
    raw = np.zeros(shape, np.float32).tobytes()

    def request(size: int, payload: bytes, header_length: str | None = None, **tensor: Any) -> tuple[bytes, dict]:
        spec = {"name": "input", "shape": shape, "datatype": "FP32", "parameters": {"binary_data_size": size}}
        header = _json({"inputs": [{**spec, **tensor}]})
        length = str(len(header)) if header_length is None else header_length
        return header + payload, {"Inference-Header-Content-Length": length}

    nan, inf = np.full(shape, np.nan, np.float32).tobytes(), np.full(shape, np.inf, np.float32).tobytes()
    spec = {"name": "input", "shape": shape, "datatype": "FP32", "parameters": {"binary_data_size": len(raw)}}

    def raw_header(header: bytes, payload: bytes = raw) -> tuple[bytes, dict]:
        return header + payload, {"Inference-Header-Content-Length": str(len(header))}

    return {
        "binary: size larger than the body": request(len(raw) * 2, raw),
        "binary: size smaller than the tensor": request(len(raw) // 2, raw[: len(raw) // 2]),
        "binary: bytes missing": request(len(raw), b""),
        "binary: bytes truncated": request(len(raw), raw[:-3]),
        "binary: trailing bytes": request(len(raw), raw + b"\x00" * 16),
        "binary: negative size": request(-1, raw),
        "binary: size not a number": request("many", raw),  # type: ignore[arg-type]
        "binary: header length beyond body": request(len(raw), raw, header_length=str(10**9)),
        "binary: header length negative": request(len(raw), raw, header_length="-5"),
        "binary: header length not a number": request(len(raw), raw, header_length="abc"),
        "binary: header length zero": request(len(raw), raw, header_length="0"),
        "binary: header cut mid-JSON": request(len(raw), raw, header_length="10"),
        "binary: wrong dtype for the bytes": request(len(raw), raw, datatype="INT8"),
        "binary: shape disagrees with the bytes": request(len(raw), raw, shape=[*shape[:-1], shape[-1] * 2]),
        "binary: NaN tensor": request(len(nan), nan),
        "binary: odd byte count for FP32": request(len(raw) - 1, raw[:-1]),
        "binary: data and binary both given": request(len(raw), raw, data=[0.0] * int(np.prod(shape))),
        "binary: Inf tensor": request(len(inf), inf),
        "binary: wrong input name": request(len(raw), raw, name="not_the_input"),
        "binary: unknown dtype": request(len(raw), raw, datatype="FP17"),
        "binary: negative dim": request(len(raw), raw, shape=[-1, *shape[1:]]),
        "binary: zero batch with bytes": request(len(raw), raw, shape=[0, *shape[1:]]),
        "binary: size zero with bytes": request(0, raw),
        "binary: header length with spaces": request(len(raw), raw, header_length=" 1 0 "),
        "binary: header length overflows": request(len(raw), raw, header_length="9" * 30),
        "binary: header length fractional": request(len(raw), raw, header_length="12.5"),
        "binary: two inputs of the same name": raw_header(_json({"inputs": [spec, spec]}), raw + raw),
        "binary: extra input": raw_header(_json({"inputs": [spec, {**spec, "name": "extra"}]}), raw + raw),
        "binary: no inputs, bytes anyway": raw_header(_json({"inputs": []})),
        "binary: header not JSON": raw_header(b"not json at all"),
        "binary: header invalid UTF-8": raw_header(b'{"inputs": [{"name": "\xff"}]}'),
        "binary: unknown output requested": raw_header(_json({"inputs": [spec], "outputs": [{"name": "nope"}]})),
    }


def _http_sends(url: str, model: str, shape: list[int], timeout: float) -> dict[str, Callable[[], tuple[str, str]]]:
    """Each HTTP case (JSON, then binary) as a call that sends it and classifies the answer."""
    client = _Http(url, timeout)
    sends: dict[str, Callable[[], tuple[str, str]]] = {}
    for name, (path, body) in json_cases(model, shape).items():
        sends[f"http json: {name}"] = lambda path=path, body=body: _http_result(*client.send(path, body))
    infer = f"/v2/models/{model}/infer"
    for name, (body, headers) in binary_cases(model, shape).items():
        sends[f"http binary: {name}"] = lambda body=body, headers=headers: _http_result(
            *client.send(infer, body, headers)
        )
    return sends


# ---- gRPC ---------------------------------------------------------------------------------------------------


def _channel(grpc_url: str, access: ClientAccess) -> Any:
    """A raw gRPC channel (the corpus sends what tritonclient would refuse to build), over TLS when a CA is given."""
    import grpc

    options = [("grpc.max_send_message_length", 64 * 2**20)]
    if access.tls_ca is None:
        return grpc.insecure_channel(grpc_url, options=options)
    credentials = grpc.ssl_channel_credentials(
        access.tls_ca.read_bytes(),
        access.tls_key.read_bytes() if access.tls_key else None,
        access.tls_cert.read_bytes() if access.tls_cert else None,
    )
    return grpc.secure_channel(grpc_url, credentials, options=options)


def _grpc_sends(
    grpc_url: str, model: str, shape: list[int], timeout: float
) -> dict[str, Callable[[], tuple[str, str]]]:
    """Each gRPC case as a call that sends it on a fresh channel, with the key, and classifies the status."""
    import grpc
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    access = client_access()
    metadata = tuple(access.grpc_headers.items())
    raw = np.zeros(shape, np.float32).tobytes()

    def request(name: str = model, version: str = "", inputs: list | None = None, contents: list | None = None,
                outputs: list | None = None) -> Any:  # fmt: skip
        tensor = service_pb2.ModelInferRequest().InferInputTensor(name="input", datatype="FP32", shape=shape)
        return service_pb2.ModelInferRequest(
            model_name=name, model_version=version, inputs=[tensor] if inputs is None else inputs,
            raw_input_contents=[raw] if contents is None else contents, outputs=outputs or [],
        )  # fmt: skip

    def tensor(**fields: Any) -> Any:
        spec = {"name": "input", "datatype": "FP32", "shape": shape, **fields}
        return service_pb2.ModelInferRequest().InferInputTensor(**spec)

    output = service_pb2.ModelInferRequest().InferRequestedOutputTensor
    wrong_last = [*shape[:-1], shape[-1] + 1]
    cases = {
        "missing input": request(inputs=[], contents=[]),
        "wrong input name": request(inputs=[tensor(name="not_the_input")]),
        "extra input": request(inputs=[tensor(), tensor(name="extra")], contents=[raw, raw]),
        "wrong shape": request(inputs=[tensor(shape=wrong_last)]),
        "wrong rank": request(inputs=[tensor(shape=[int(np.prod(shape))])]),
        "negative dim": request(inputs=[tensor(shape=[-1, *shape[1:]])]),
        "zero batch": request(inputs=[tensor(shape=[0, *shape[1:]])], contents=[b""]),
        "huge dim": request(inputs=[tensor(shape=[10**12, *shape[1:]])]),
        "wrong dtype": request(inputs=[tensor(datatype="INT32")]),
        "unknown dtype": request(inputs=[tensor(datatype="FP17")]),
        "raw bytes too short": request(contents=[raw[:-4]]),
        "raw bytes too long": request(contents=[raw + raw]),
        "raw bytes missing": request(contents=[]),
        "more raw buffers than inputs": request(contents=[raw, raw]),
        "NaN tensor": request(contents=[np.full(shape, np.nan, np.float32).tobytes()]),
        "Inf tensor": request(contents=[np.full(shape, np.inf, np.float32).tobytes()]),
        "unknown output requested": request(outputs=[output(name="no_such_output")]),
        "unknown model": request(name="no_such_model"),
        "unknown version": request(version="999"),
        "version not a number": request(version="latest"),
        "path-like model name": request(name="../../etc/passwd"),
        "empty model name": request(name=""),
        "contents and raw both given": request(
            inputs=[tensor(contents=service_pb2.InferTensorContents(fp32_contents=[0.0]))]
        ),
        "typed contents of the wrong count": request(
            inputs=[tensor(contents=service_pb2.InferTensorContents(fp32_contents=[0.0, 1.0]))], contents=[]
        ),
        "typed contents of the wrong type": request(
            inputs=[tensor(contents=service_pb2.InferTensorContents(int_contents=[0] * int(np.prod(shape))))],
            contents=[],
        ),
        "shape with many dims": request(inputs=[tensor(shape=[1] * 64)]),
        "huge model name": request(name="m" * 100_000),
        "binary-looking model name": request(name="\x00\x01"),
        "batch of a million": request(inputs=[tensor(shape=[10**6, *shape[1:]])]),
        "float32 bytes as FP16": request(inputs=[tensor(datatype="FP16")]),
    }  # fmt: skip

    def send(message: Any) -> tuple[str, str]:
        with _channel(grpc_url, access) as channel:
            try:
                stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
                stub.ModelInfer(message, timeout=timeout, metadata=metadata)
                return ACCEPTED, "OK"
            except grpc.RpcError as e:
                code, details = (e.code().name if e.code() else "UNKNOWN"), (e.details() or "")[:160]
        if code in _GRPC_REFUSALS:
            return REFUSED, f"{code}: {details}"
        return (SERVER_ERROR if code in ("INTERNAL", "UNKNOWN") and details else CRASHED), f"{code}: {details}"

    return {f"grpc: {name}": lambda message=message: send(message) for name, message in cases.items()}


# ---- the run ------------------------------------------------------------------------------------------------


def fuzz_server(
    url: str,
    model: str,
    input_shape: list[int],
    grpc_url: str | None = None,
    good: Callable[[], bool] | None = None,
    restart: Callable[[], None] | None = None,
    timeout: float = 30.0,
) -> dict[str, Any]:
    """Send the whole corpus; `input_shape` is one sample's (no batch). After each request the server must still be
    live; when it is not, `restart()` (if given: the caller owns the server) brings it back and the corpus goes on,
    else the rest is not sent. `good()` then sends a good request and says whether its outputs were right.
    Returns counts per protocol, every outcome, and whether the server came through (no crash, good answer)."""
    shape = [1, *input_shape]
    sends = _http_sends(url, model, shape, timeout)
    if grpc_url:
        sends |= _grpc_sends(grpc_url, model, shape, timeout)
    outcomes: list[Outcome] = []
    for key, send in sends.items():
        protocol, case = key.split(": ", 1)
        result, detail = send()
        if http_status(f"{url.rstrip('/')}/v2/health/live", timeout) != 200:
            result, detail = CRASHED, f"the server stopped answering after it ({detail})"
        outcomes.append(Outcome(protocol, case, result, detail))
        if result == CRASHED:
            if restart is None:
                break
            restart()
    counts: dict[str, dict[str, int]] = {}
    for o in outcomes:
        per = counts.setdefault(o.protocol, {"sent": 0, REFUSED: 0, SERVER_ERROR: 0, ACCEPTED: 0, CRASHED: 0})
        per["sent"] += 1
        per[o.result] += 1
    try:
        good_after = good() if good else None
    except Exception:  # noqa: BLE001 - a server that cannot answer a good request has failed, however it shows
        good_after = False
    crashed = [f"{o.protocol}: {o.case}" for o in outcomes if o.result == CRASHED]
    return {
        "counts": counts,
        "crashed": crashed,
        "not_sent": len(sends) - len(outcomes),
        "good_request_after": good_after,
        "passed": not crashed and good_after is not False,
        "outcomes": [asdict(o) for o in outcomes],
    }
