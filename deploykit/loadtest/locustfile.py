"""Locust users that speak the Open Inference Protocol to Triton (HTTP or gRPC) and to TorchServe.

Configured by environment variables, so the same file serves `deploykit loadtest` and a plain `locust -f`:

    DEPLOYKIT_ENGINE       triton (default) | torchserve: which server the users talk to
    DEPLOYKIT_PROTOCOL     http (default) | grpc (Triton only): the transport
    DEPLOYKIT_MODEL        the model's name on the server (required)
    DEPLOYKIT_GRPC_URL     gRPC target for `grpc` (default: the --host's hostname, port 8001)
    DEPLOYKIT_INPUT_SHAPE  per-sample input shape for `torchserve`, e.g. "3,16,16" (Triton's come from its metadata)
    DEPLOYKIT_SAMPLES_IN   a .npy of real inputs (N, C, H, W) float32 to cycle through (default: zeros)
    DEPLOYKIT_KEY          the key a restricted Triton wants (or DEPLOYKIT_KEY_FILE, a file holding it; TorchServe's
                           key_file.json goes in DEPLOYKIT_TORCHSERVE_KEY_FILE): sent with every request and metadata
    DEPLOYKIT_GRPC_TLS_CA  gRPC over TLS: the CA that signed the server's certificate (DEPLOYKIT_GRPC_TLS_CERT and
                           DEPLOYKIT_GRPC_TLS_KEY: the client's own, for mutual TLS)
    DEPLOYKIT_SAMPLES_OUT  where to write every request's raw timing at exit (.npy: rows of
                           [start time s since epoch, response time ms, success 0/1]; any other suffix: JSON)
    DEPLOYKIT_RUN_S        stop this many seconds after the first request (unset: locust's own --run-time only)

Locust's own percentiles are rounded to whole milliseconds; the raw timings written here are not.
"""

from __future__ import annotations

import os
import time
from itertools import cycle
from typing import Any
from urllib.parse import urlsplit

import gevent
import grpc.experimental.gevent
import numpy as np
from locust import FastHttpUser, User, constant, constant_throughput, events, task

from deploykit.errors import DeploykitError
from deploykit.files import atomic_path, atomic_write_json
from deploykit.serve.access import client_access
from deploykit.serve.engines import engine_traits
from deploykit.serve.oip import (
    TORCHSERVE_INPUT_NAME,
    OipClient,
    binary_infer_body,
    check_samples,
    oip_body,
    sample_shape,
)

grpc.experimental.gevent.init_gevent()  # before any channel exists, or gRPC calls block the gevent loop

__all__ = ["TorchServeUser", "TritonGrpcUser", "TritonHttpUser"]

ENGINE = os.environ.get("DEPLOYKIT_ENGINE", "triton")
PROTOCOL = os.environ.get("DEPLOYKIT_PROTOCOL", "http")
MODEL = os.environ.get("DEPLOYKIT_MODEL", "")
# Requests per second per user for an open-rate load (the soak); unset: back to back, a closed loop.
RATE_PER_USER = float(os.environ.get("DEPLOYKIT_RATE_PER_USER") or 0)
# The run's clock starts at the first request, so a slow start (imports, metadata, encoding the inputs on a busy
# machine) never eats the measured window; locust's --run-time stays as the backstop.
RUN_S = float(os.environ.get("DEPLOYKIT_RUN_S") or 0)
_MAX_BODIES = 32  # requests cycle through at most this many pre-encoded inputs: JSON of a 224x224 image is ~1.5 MB

# Settings are checked at import, so a bad one stops locust with this sentence before any user starts.
try:
    engine_traits(ENGINE).check_protocol(PROTOCOL)
except DeploykitError as e:
    raise SystemExit(f"DEPLOYKIT_ENGINE={ENGINE!r}, DEPLOYKIT_PROTOCOL={PROTOCOL!r}: {e}") from None
if not MODEL:
    raise SystemExit("DEPLOYKIT_MODEL is not set: export it as the model's name on the server.")
try:
    ACCESS = client_access(ENGINE)  # the key and TLS files the environment names; nothing when it names none
except DeploykitError as e:
    raise SystemExit(str(e)) from None


def parse_shape(text: str) -> tuple[int, ...]:
    """'3,224,224' -> (3, 224, 224)."""
    try:
        shape = tuple(int(d) for d in text.split(","))
    except ValueError:
        shape = ()
    if not shape or min(shape) < 1:
        raise SystemExit(f"DEPLOYKIT_INPUT_SHAPE={text!r} is not a shape: set it like '3,224,224'.")
    return shape


TORCHSERVE_SHAPE = parse_shape(os.environ.get("DEPLOYKIT_INPUT_SHAPE", "")) if ENGINE == "torchserve" else ()


def load_samples(shape: tuple[int, ...]) -> np.ndarray:
    """Inputs of per-sample `shape`: the first samples of DEPLOYKIT_SAMPLES_IN, or one of zeros (valid for any
    model, where made-up data may not be)."""
    path = os.environ.get("DEPLOYKIT_SAMPLES_IN")
    if not path:
        return np.zeros((1, *shape), np.float32)
    check_samples(path, shape, MODEL)
    return np.ascontiguousarray(np.load(path, mmap_mode="r")[:_MAX_BODIES], dtype=np.float32)


_bodies: dict[str, list[tuple[bytes, dict[str, str]]]] = {}  # encoded once per process (per host)


def http_bodies(host: str) -> list[tuple[bytes, dict[str, str]]]:
    """(body, headers) per sample: Triton's binary tensor extension (input from GET /v2/models/<m>), or
    JSON for TorchServe (input from env), whose handler reads the JSON form only; the headers carry the key."""
    if host not in _bodies:
        if ENGINE == "torchserve":
            json_headers = {**ACCESS.inference_headers, "Content-Type": "application/json"}
            samples = load_samples(TORCHSERVE_SHAPE)
            _bodies[host] = [(oip_body(TORCHSERVE_INPUT_NAME, "FP32", s), json_headers) for s in samples]
        else:
            first = OipClient(host, MODEL).metadata()["inputs"][0]
            _bodies[host] = []
            for s in load_samples(sample_shape(first["shape"])):
                body, header_len = binary_infer_body(s[None], first["name"], first["datatype"])
                headers = {
                    **ACCESS.inference_headers,
                    "Content-Type": "application/octet-stream",
                    "Inference-Header-Content-Length": str(header_len),
                }
                _bodies[host].append((body, headers))
    return _bodies[host]


# ---- raw timings --------------------------------------------------------------------------------------

_timings: list[tuple[float, float, float]] = []  # (start s since epoch, response time ms, success)
_environment: list[Any] = []  # locust's Environment, kept at init for the run clock


@events.init.add_listener
def _keep_environment(environment: Any, **_: Any) -> None:
    _environment.append(environment)


@events.request.add_listener
def _record(
    response_time: float, exception: BaseException | None = None, start_time: float | None = None, **_: Any
) -> None:
    started = start_time if start_time is not None else time.time() - response_time / 1000
    if RUN_S and not _timings and _environment and _environment[0].runner is not None:
        gevent.spawn_later(RUN_S, _environment[0].runner.quit)
    _timings.append((started, float(response_time), 0.0 if exception else 1.0))


@events.quitting.add_listener
def _write_timings(**_: Any) -> None:
    out = os.environ.get("DEPLOYKIT_SAMPLES_OUT")
    if not out:
        return
    if out.endswith(".npy"):
        with atomic_path(out) as tmp, open(tmp, "wb") as f:
            np.save(f, np.array(_timings, dtype=np.float64).reshape(-1, 3))
    else:
        keys = ("start_time", "response_time_ms", "success")
        atomic_write_json(out, [dict(zip(keys, t)) for t in _timings])


# ---- users --------------------------------------------------------------------------------------------


class TritonHttpUser(FastHttpUser):
    """POST /v2/models/<m>/infer with binary tensor data, back to back (no think time: a closed-loop load), or at
    RATE_PER_USER requests per second."""

    abstract = (ENGINE, PROTOCOL) != ("triton", "http")
    path = f"/v2/models/{MODEL}/infer"
    wait_time = constant_throughput(RATE_PER_USER) if RATE_PER_USER else constant(0)

    def on_start(self) -> None:
        self.bodies = cycle(http_bodies(self.host))

    @task
    def infer(self) -> None:
        body, headers = next(self.bodies)
        self.client.post(self.path, data=body, headers=headers)


class TorchServeUser(TritonHttpUser):
    """POST /predictions/<m> with the same OIP JSON body; TorchServe has no metadata, so the shape comes from env."""

    abstract = ENGINE != "torchserve"
    path = f"/predictions/{MODEL}"


class TritonGrpcUser(User):
    """tritonclient's gRPC `infer`; locust sees it through request events fired here."""

    abstract = (ENGINE, PROTOCOL) != ("triton", "grpc")

    def on_start(self) -> None:
        import tritonclient.grpc as grpcclient
        from tritonclient.utils import triton_to_np_dtype

        default = f"{urlsplit(self.host or 'http://127.0.0.1').hostname}:8001"
        self.client = ACCESS.grpc_client(os.environ.get("DEPLOYKIT_GRPC_URL", default))
        first = self.client.get_model_metadata(MODEL, headers=ACCESS.grpc_headers, as_json=True)["inputs"][0]
        inputs = []
        for sample in load_samples(sample_shape(first["shape"])):
            tensor = grpcclient.InferInput(first["name"], [1, *sample.shape], first["datatype"])
            tensor.set_data_from_numpy(sample[None].astype(triton_to_np_dtype(first["datatype"])))
            inputs.append([tensor])
        self.inputs = cycle(inputs)

    def on_stop(self) -> None:
        self.client.close()  # an open channel keeps locust from exiting

    @task
    def infer(self) -> None:
        start, t0, exception, length = time.time(), time.perf_counter(), None, 0
        try:
            length = self.client.infer(MODEL, next(self.inputs), headers=ACCESS.grpc_headers).get_response().ByteSize()
        except Exception as e:  # noqa: BLE001 (any failure is a failed request, as locust counts HTTP errors)
            exception = e
        self.environment.events.request.fire(
            request_type="grpc",
            name=f"/{MODEL}/infer",
            response_time=(time.perf_counter() - t0) * 1000,
            response_length=length,
            exception=exception,
            context={},
            start_time=start,
        )
