"""The `deploy` stage: package the deployable model, serve it on a real server, validate it, stop the server.

The served numbers (P50/P95/P99 per concurrency, throughput, server-side queue vs compute) land in the stage's
metrics, where the report puts them beside the offline benchmark.
"""

from __future__ import annotations

import secrets
from typing import Any, Literal

import numpy as np
from pydantic import Field, field_validator, model_validator

from deploykit.artifacts import ArtifactRef, StageResult, deployable
from deploykit.errors import DeploykitError
from deploykit.files import atomic_path
from deploykit.loadtest.slo import SLOSettings
from deploykit.package.names import validate_model_name
from deploykit.package.triton_repo import TritonModelOptions
from deploykit.pipeline.context import StageContext
from deploykit.pipeline.registry import Stage, register
from deploykit.serve.access import ServerAccess, client_environment
from deploykit.serve.engines import engine_traits
from deploykit.serve.server import Server, free_ports, make_server

SAMPLES = 64  # real validation samples sent by the checks and the load test


class DeployConfig(SLOSettings):
    """Where and how to serve, and what the served model must prove (against `slo_task` and `slo`)."""

    engine: Literal["triton", "torchserve"] = Field("triton", description="Server to deploy on (TorchServe is legacy).")
    model_name: str | None = Field(None, description="Name on the server (default: the pipeline's name).")
    source: Literal["auto", "onnx", "onnx_int8"] = Field(
        "auto", description="ONNX artifact to serve; auto takes the quantize stage's deployable pick."
    )
    triton: TritonModelOptions = Field(default_factory=TritonModelOptions, description="Triton model settings.")
    torchserve_batch_size: int = Field(8, ge=1, description="TorchServe batch size.")
    torchserve_max_batch_delay_ms: int = Field(5, ge=0, description="How long TorchServe waits to fill a batch.")
    host: str = Field("127.0.0.1", description="Address the server binds while it is validated.")
    users: list[int] = Field([1, 4], min_length=1, description="Concurrency levels of the load test.")
    duration_s: float = Field(10.0, ge=0.0, description="Seconds of load per level (0: skip the load test).")
    spawn_rate: float = Field(10.0, gt=0.0, description="Locust users started per second.")
    protocol: Literal["http", "grpc"] = Field("http", description="Transport of the load test's users (Triton).")
    client: Literal["locust", "perf_analyzer"] = Field(
        "locust", description="Load generator: locust, or Triton's perf_analyzer (Triton only)."
    )
    tune: bool = Field(
        False,
        description="Triton: first search instances, threads and batching (short perf_analyzer runs at the "
        "highest users level) and serve the config with the most throughput whose P95 meets the SLO.",
    )
    tune_budget_s: float = Field(
        120.0, gt=0.0, description="Seconds the tuning search may take; base and pick are then measured again."
    )
    tune_window_ms: int = Field(
        1000, ge=100, description="Tuning: perf_analyzer's measurement window; each candidate takes three or more."
    )
    fuzz: bool = Field(
        False,
        description="Triton: also send the bad-input corpus (30+ malformed requests per protocol); a crash fails a "
        "check, and the stage restarts the server to send the rest.",
    )
    restrict: bool = Field(
        False,
        description="Triton: serve with the control APIs and inference behind a fresh key, as an exposed server "
        "would be; every check and load test sends it.",
    )
    fail_on_breach: bool = Field(False, description="Fail the run when a check or the SLO fails.")
    start_timeout_s: float = Field(120.0, gt=0.0, description="Seconds to wait for the server to become ready.")

    @model_validator(mode="after")
    def _client_speaks_the_engine(self) -> DeployConfig:
        if (self.client == "perf_analyzer" or self.tune or self.fuzz or self.restrict) and self.engine != "triton":
            raise ValueError(
                "perf_analyzer, tune, fuzz and restrict work with Triton only (TorchServe's own token authorization "
                "is always on): use client: locust, tune: false, fuzz: false, restrict: false"
            )
        if self.protocol not in engine_traits(self.engine).protocols:
            raise ValueError(f"{self.engine} speaks http only here: set protocol: http")
        return self

    @field_validator("model_name")
    @classmethod
    def _safe_name(cls, v: str | None) -> str | None:
        return None if v is None else validate_model_name(v)

    @field_validator("duration_s")
    @classmethod
    def _room_after_warmup(cls, v: float) -> float:
        # the load test leaves its first second out (connections opening) and needs a second of measurement after
        if 0 < v < 2:
            raise ValueError("the load test needs 2 s or more (its first second is warm-up); use 0 to skip it")
        return v


def _to_serve(ctx: StageContext, source: str, engine: str) -> ArtifactRef:
    """The model to serve: the role asked for, else the run's one deployable model (ONNX, or an OpenVINO IR)."""
    if source != "auto":
        return ctx.find(source, " (deploy source)")
    ref = deployable(ctx.upstream)
    if ref is None or ref.format not in engine_traits(engine).formats:
        what = f"the deployable model is {ref.label}, " if ref else ""
        raise DeploykitError(
            f"Stage '{ctx.name}' needs an ONNX model upstream ({what}which {engine} here cannot serve): "
            "add an export stage before it."
        )
    return ref


def client_notes(name: str, label: str, preprocessing: dict[str, Any]) -> str:
    """The served model's README: what its input must look like, since the preprocessing is the pipeline's own."""
    rows = "\n".join(f"- {k}: {v}" for k, v in preprocessing.items())
    return (
        f"# {name}\n\nServed by deploykit from {label}. Input tensor `input`, output `logits` (the model's first "
        f"output).\n\n## Preprocessing a client must apply\n\n{rows}\n"
    )


def _summary(result: dict[str, Any]) -> dict[str, Any]:
    """The stage's metrics: checks counted, and the served numbers per concurrency level."""
    checks = result["checks"]
    metrics: dict[str, Any] = {
        "passed": result["passed"],
        "checks_passed": sum(c["status"] == "pass" for c in checks),
        "checks_warned": sum(c["status"] == "warn" for c in checks),
        "checks_failed": [f"{c['group']}: {c['name']}" for c in checks if c["status"] == "fail"],
    }
    loadtest = result.get("loadtest")
    if loadtest:
        levels = loadtest["levels"]
        keys = ("users", "p50_ms", "p95_ms", "p99_ms", "throughput_rps", "error_rate", "server")
        metrics["served"] = [{k: level.get(k) for k in keys} for level in levels]
        metrics["served_p50_ms"] = levels[0]["p50_ms"]
        metrics["served_throughput"] = max(level["throughput_rps"] for level in levels)
        metrics["slo_passed"] = (loadtest.get("verdict") or {}).get("passed")
    corpus = result.get("fuzz")
    if corpus:
        metrics["fuzz"] = {k: corpus[k] for k in ("counts", "crashed", "good_request_after")}
    return metrics


@register("deploy")
class DeployStage(Stage):
    """Package the deployable ONNX model, start a real server, run `validate` against it, and stop it."""

    Config = DeployConfig

    def run(self, ctx: StageContext) -> StageResult:
        from deploykit.export.parity import real_batches
        from deploykit.validate import validate_server

        cfg = self.config
        name = cfg.model_name or validate_model_name(ctx.pipeline.name)
        ref = _to_serve(ctx, cfg.source, cfg.engine)
        model_path = ref.path
        ctx.reporter.log(f"deploy: serving {ref.label}, {model_path.name} ({ref.why}) as '{name}' on {cfg.engine}")
        samples = real_batches(ctx.data(), [SAMPLES])[0]
        server, artifacts, tuned = self._package_and_server(ctx, name, ref, samples)
        slo = cfg.target()

        def restart() -> None:  # the stage owns the server: a crash is recorded and the corpus goes on
            server.stop()
            server.start(timeout=cfg.start_timeout_s)

        server.start(timeout=cfg.start_timeout_s)
        try:
            if name in (failed := server.failed_models()):
                raise DeploykitError(f"{cfg.engine} could not load '{name}' ({failed[name]}); see {server.log_path}.")
            with client_environment(server.client_env()):  # a restricted server's key, for every client
                result = validate_server(
                    server.infer_url,
                    name,
                    out_dir=ctx.out_dir / "validation",
                    engine=cfg.engine,
                    model_path=model_path,
                    runtime=ref.runs_on,
                    precision=ref.exec_precision,
                    samples=samples,
                    grpc_url=server.grpc_url,
                    metrics_url=server.metrics_url,
                    users=cfg.users,
                    duration_s=cfg.duration_s,
                    spawn_rate=cfg.spawn_rate,
                    protocol=cfg.protocol,
                    load_client=cfg.client,
                    slo=slo,
                    size_mb=(ctx.stats(ref).bytes or model_path.stat().st_size) / 1e6,
                    reporter=ctx.reporter,
                    fuzz=cfg.fuzz,
                    restart=restart,
                )
        finally:
            server.stop()
        served = {"key": ref.key, "label": ref.label, "sha256": ref.sha256, "file": model_path.name, "why": ref.why}
        metrics = {"engine": cfg.engine, "model": name, "served_model": served, **_summary(result)}
        if tuned:
            best = tuned["tried"][tuned["best"]]
            metrics["tuned"] = {
                "best": best, "base": tuned["tried"][0], "meets_slo": tuned["meets_slo"],
                "throughput_vs_base": tuned["throughput_vs_base"], "candidates": len(tuned["tried"]),
            }  # fmt: skip
        if cfg.fail_on_breach and not result["passed"]:
            raise DeploykitError(
                f"Deployment validation of '{name}' failed ({'; '.join(metrics['checks_failed'])}): "
                "fix the model or the targets, or set fail_on_breach: false to record the breach and go on."
            )
        artifacts["validation"] = "validation/validation.json"
        if (ctx.out_dir / "validation" / "latency_vs_concurrency.png").is_file():
            artifacts["served_latency_plot"] = "validation/latency_vs_concurrency.png"
        return StageResult(artifacts=artifacts, metrics=metrics)

    def _package_and_server(
        self, ctx: StageContext, name: str, ref: ArtifactRef, samples: np.ndarray
    ) -> tuple[Server, dict[str, str], dict[str, Any] | None]:
        """Write the model repository (or archive) into the stage folder and a server for it on free ports, not
        started; with `tune`, the repository holds the tuned config and the search's result comes back too."""
        cfg = self.config
        tuned = None
        if cfg.engine == "torchserve":
            from deploykit.package.torchserve_archive import write_torchserve_archive

            repo = ctx.out_dir / "model_store"
            mar = write_torchserve_archive(
                ref.path, repo, name, batch_size=cfg.torchserve_batch_size,
                max_batch_delay_ms=cfg.torchserve_max_batch_delay_ms,
            )  # fmt: skip
            artifacts = {"torchserve_mar": str(mar.relative_to(ctx.out_dir))}
        else:
            from deploykit.package.triton_repo import write_triton_model
            from deploykit.serve.triton import find_triton

            install = find_triton()
            # the runtime and precision the benchmark chose it on
            options = cfg.triton.model_copy(update={"runtime": ref.runs_on, "precision": ref.exec_precision or "fp32"})
            if options.flavour == "portable" and options.execution_env is None and install.python_env:
                options = options.model_copy(update={"execution_env": str(install.python_env)})
            artifacts = {
                "triton_config": f"model_repo/{name}/config.pbtxt",
                "client_notes": f"model_repo/{name}/README.md",
            }
            if cfg.tune:
                options, tuned = self._tune(ctx, name, ref, options, samples)
                artifacts["tune"] = "tune/tune.json"
            repo = ctx.out_dir / "model_repo"
            notes = client_notes(name, ref.label, ctx.data().preprocessing())
            write_triton_model(repo, name, ref.path, options, version=1, notes=notes)
        logs = ctx.out_dir / "server-logs"
        access = ServerAccess(secrets.token_urlsafe(32), restrict_inference=True) if cfg.restrict else None
        server = make_server(cfg.engine, repo, host=cfg.host, ports=free_ports(cfg.engine), log_dir=logs, access=access)
        return server, artifacts, tuned

    def _tune(
        self, ctx: StageContext, name: str, ref: ArtifactRef, base: TritonModelOptions, samples: np.ndarray
    ) -> tuple[TritonModelOptions, dict[str, Any]]:
        from deploykit.serve.tune import tune_triton

        cfg = self.config
        out = ctx.out_dir / "tune"
        out.mkdir(parents=True, exist_ok=True)
        samples_file = out / "samples.npy"
        with atomic_path(samples_file) as tmp, open(tmp, "wb") as f:
            np.save(f, samples)
        result = tune_triton(
            ref.path, name, out, base=base, max_p95_ms=cfg.target().max_latency_ms, concurrency=max(cfg.users),
            samples=samples_file, budget_s=cfg.tune_budget_s, window_ms=cfg.tune_window_ms, reporter=ctx.reporter,
        )  # fmt: skip
        best = result["tried"][result["best"]]
        ctx.reporter.log(
            f"deploy: tuned config: {best['instances']} instance(s), max batch {best['max_batch_size']}, "
            f"queue delay {best['max_queue_delay_us']} us "
            f"({result['throughput_vs_base'] or 0:.2f}x the base config's throughput)"
        )
        return TritonModelOptions.model_validate(result["best_options"]), result
