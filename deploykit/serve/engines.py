"""What each serving engine is, in one table: ports, the model formats it is packaged with, its transports, where
it takes inference requests and which Prometheus counter counts them.

Light on purpose (standard library only): the locust process reads it, and every consumer asks it instead of
branching on the engine's name.
"""

from __future__ import annotations

from dataclasses import dataclass

from deploykit.errors import DeploykitError


@dataclass(frozen=True)
class EngineTraits:
    name: str
    ports: dict[str, int]  # default port per endpoint, as `deploykit serve` binds them
    formats: tuple[str, ...]  # model formats the deploy stage packages for it
    protocols: tuple[str, ...]  # transports its load-test users speak
    infer_path: str  # HTTP inference route, {model} filled in
    health: tuple[tuple[str, str], ...]  # (check name, route) that must answer 200, {model} filled in
    has_metadata: bool  # answers GET /v2/models/<m> (the input name and shape); else the caller gives the shape
    success_counter: tuple[str, str]  # Prometheus counter of successful requests, and its model label

    def infer_route(self, model: str) -> str:
        return self.infer_path.format(model=model)

    def check_protocol(self, protocol: str) -> str:
        if protocol not in self.protocols:
            raise DeploykitError(
                f"Protocol '{protocol}' is not one {self.name} speaks here: use {' or '.join(self.protocols)}."
            )
        return protocol


ENGINES = {
    "triton": EngineTraits(
        name="triton",
        ports={"http": 8000, "grpc": 8001, "metrics": 8002},
        formats=("onnx", "openvino"),
        protocols=("http", "grpc"),
        infer_path="/v2/models/{model}/infer",
        health=(
            ("server live", "/v2/health/live"),
            ("server ready", "/v2/health/ready"),
            ("model ready", "/v2/models/{model}/ready"),
        ),
        has_metadata=True,
        success_counter=("nv_inference_request_success", "model"),
    ),
    "torchserve": EngineTraits(
        name="torchserve",
        ports={"inference": 8080, "management": 8081, "metrics": 8082},
        formats=("onnx",),
        protocols=("http",),
        infer_path="/predictions/{model}",
        health=(("ping", "/ping"),),
        has_metadata=False,
        success_counter=("ts_inference_requests", "model_name"),
    ),
}
PROTOCOLS = ("http", "grpc")  # transports, whatever the engine


def engine_traits(name: str) -> EngineTraits:
    """The traits of engine `name`, or one sentence naming the engines there are."""
    if name not in ENGINES:
        raise DeploykitError(f"Engine '{name}' is unknown: use one of {', '.join(ENGINES)}.")
    return ENGINES[name]
