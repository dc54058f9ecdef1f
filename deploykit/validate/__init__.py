"""`deploykit validate`: the production checklist run against a live server, then a load test and the SLO verdict."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from deploykit.errors import DeploykitError
from deploykit.files import atomic_path, atomic_write_json
from deploykit.loadtest.slo import SLO
from deploykit.progress import Reporter, silent
from deploykit.serve.oip import OipClient, sample_shape
from deploykit.validate.checks import (
    FAIL,
    PASS,
    Check,
    bad_input_checks,
    correctness_checks,
    health_checks,
    metrics_check,
    output_checks,
)

PARITY_BATCHES = (1, 4)
CHECKED_SAMPLES = 64  # the output checks send at most this many samples per protocol


def checked_batches(samples: np.ndarray) -> list[np.ndarray]:
    """The samples the output checks send, in order (so the k-th sent is samples[k]): one alone, then batches of
    4; samples are repeated up to 5, so both sizes are always sent, and at most CHECKED_SAMPLES go."""
    step = max(PARITY_BATCHES)
    n = min(max(len(samples), 1 + step), CHECKED_SAMPLES)
    sent = samples[np.arange(n) % len(samples)]
    return [sent[:1], *(sent[i : i + step] for i in range(1, n, step))]


def _input_shape(client: OipClient, samples: np.ndarray | None, model_path: Path | None) -> list[int]:
    """One sample's shape: from real samples, else the server's metadata, else the ONNX graph."""
    if samples is not None:
        return list(samples.shape[1:])
    if client.traits.has_metadata:
        return list(sample_shape(client.metadata()["inputs"][0]["shape"]))
    from deploykit.package.triton_repo import model_io

    return model_io(Path(model_path)).inputs[0].dims


def _load_checks(result: dict[str, Any]) -> list[Check]:
    top = result["levels"][-1]
    if result.get("client") == "perf_analyzer":  # it exits nonzero (raising) on the first failed request
        checks = [Check("load", "error rate", PASS, f"perf_analyzer had no failed request up to {top['users']} users")]
    else:
        checks = [
            Check(
                "load",
                "error rate",
                PASS if top["failures"] == 0 else FAIL,
                f"{top['failures']} of {top['requests']} requests failed at {top['users']} users",
            )
        ]
    verdict = result.get("verdict")
    if verdict:
        parts = [
            f"{name} {c['measured']:.4g} {c['unit']} {c['comparison']} {c['target']:g}"
            for name, c in verdict["criteria"].items()
        ]
        checks.append(Check("load", f"SLO {verdict['task']}", PASS if verdict["passed"] else FAIL, "; ".join(parts)))
    return checks


def _fuzz(
    client: OipClient,
    shape: list[int],
    grpc_url: str | None,
    x: np.ndarray,
    reporter: Reporter,
    restart: Callable[[], None] | None,
) -> dict[str, Any]:
    from deploykit.validate.fuzz import fuzz_server

    before = client.infer(x)
    with reporter.task("bad-input corpus", total=None):
        return fuzz_server(
            client.url, client.model, shape, grpc_url=grpc_url, restart=restart,
            good=lambda: bool(np.allclose(client.infer(x), before, rtol=1e-5, atol=1e-6)),
        )  # fmt: skip


def _fuzz_checks(corpus: dict[str, Any]) -> list[Check]:
    checks = []
    for protocol, n in corpus["counts"].items():
        detail = (
            f"{n['sent']} sent: {n['refused']} refused, {n['server error']} answered by the server's own error with "
            f"its message, {n['accepted']} accepted, {n['crashed']} crashed"
        )
        checks.append(Check("bad input", f"corpus ({protocol})", FAIL if n["crashed"] else PASS, detail))
    if corpus["crashed"]:
        lost = f"; {corpus['not_sent']} request(s) not sent" if corpus["not_sent"] else ""
        died = f"it died on {corpus['crashed'][0]}{lost}"
        checks.append(Check("bad input", "server survives the corpus", FAIL, died))
    good = corpus["good_request_after"]
    checks.append(
        Check("bad input", "correct right after the corpus", PASS if good else FAIL, "a good request " + (
            "answered exactly as before" if good else "failed or answered differently"))
    )  # fmt: skip
    return checks


def _log(reporter: Reporter, checks: list[Check]) -> None:
    for c in checks:
        reporter.log(f"{c.status:>4}  {c.group}: {c.name} — {c.detail}")


def validate_server(
    url: str,
    model: str,
    *,
    out_dir: Path,
    engine: str = "triton",
    model_path: Path | None = None,
    runtime: str | None = None,
    precision: str | None = None,
    samples: np.ndarray | None = None,
    grpc_url: str | None = None,
    metrics_url: str | None = None,
    users: list[int] | int = 1,
    duration_s: float = 10.0,
    spawn_rate: float = 10.0,
    protocol: str = "http",
    load_client: str = "locust",
    slo: SLO | None = None,
    size_mb: float | None = None,
    reporter: Reporter | None = None,
    fuzz: bool = False,
    restart: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Run every check, then (when `duration_s` > 0) the load test; writes out_dir/validation.json and returns it.

    `fuzz` (Triton only) adds the bad-input corpus of deploykit.validate.fuzz: every protocol's malformed requests,
    none of which may take the server down, and a good request after them that must answer as before. A caller
    that owns the server passes `restart`, and a crash is recorded and the corpus goes on; else the rest is not sent.

    Every answer to the samples (the first 64, see `checked_batches`) must hold the outputs, datatypes and shapes
    of the model's config, all finite; and the server's outputs must match `model_path` (.onnx or OpenVINO .xml) run
    in-process on `runtime` in `precision` (bf16 on OpenVINO: the served model's own, with a tolerance that fits it).
    The load test runs on `load_client` (locust, or perf_analyzer for Triton), sending the samples.
    """
    if fuzz and engine != "triton":  # refused before any request is sent
        raise DeploykitError("The bad-input corpus speaks Triton's protocols: drop --fuzz for TorchServe.")
    reporter = reporter or silent()
    out_dir = Path(out_dir)
    client = OipClient(url, model, engine)
    checks = health_checks(client)
    shape = _input_shape(client, samples, model_path)
    if samples is None:
        samples = np.random.default_rng(0).standard_normal([max(PARITY_BATCHES), *shape]).astype(np.float32)
    if model_path is not None:
        from deploykit.runtime import open_artifact

        batches = [samples[np.arange(n) % len(samples)] for n in PARITY_BATCHES]
        reference = open_artifact(Path(model_path), threads=1, runtime=runtime, precision=precision)
        checks += correctness_checks(client, reference, batches, grpc_url)
    checks += output_checks(client, checked_batches(samples), grpc_url)
    checks += bad_input_checks(client, shape)
    corpus = None
    if fuzz:
        corpus = _fuzz(client, shape, grpc_url, samples[:1], reporter, restart)
        checks += _fuzz_checks(corpus)
    if metrics_url:
        checks.append(metrics_check(metrics_url, model, engine))
    _log(reporter, checks)

    loadtest = None
    if duration_s > 0:
        from deploykit.loadtest.runner import run_loadtest

        out_dir.mkdir(parents=True, exist_ok=True)  # only once the server has answered: no empty folder otherwise
        samples_file = out_dir / "samples.npy"
        with atomic_path(samples_file) as tmp, open(tmp, "wb") as f:
            np.save(f, samples)
        if load_client == "perf_analyzer":
            from deploykit.loadtest.perf_analyzer import perf_loadtest

            loadtest = perf_loadtest(
                url, model, users=users, out_dir=out_dir, duration_s=duration_s, protocol=protocol,
                grpc_url=grpc_url, samples=samples_file, slo=slo, size_mb=size_mb,
            )  # fmt: skip
        else:
            loadtest = run_loadtest(
                url, model, users=users, spawn_rate=spawn_rate, duration_s=duration_s, engine=engine,
                protocol=protocol, grpc_url=grpc_url, samples=samples_file, input_shape=tuple(shape),
                metrics_url=metrics_url, out_dir=out_dir, slo=slo, size_mb=size_mb, reporter=reporter,
            )  # fmt: skip
        load_checks = _load_checks(loadtest)
        _log(reporter, load_checks)
        checks += load_checks
    result = {
        "url": url,
        "model": model,
        "engine": engine,
        "checks": [c.as_dict() for c in checks],
        "passed": all(c.status != FAIL for c in checks),
        "loadtest": loadtest,
        "fuzz": corpus,
    }
    atomic_write_json(out_dir / "validation.json", result)
    return result
