"""Load tests with Triton's own perf_analyzer, a second load generator beside locust.

perf_analyzer measures as deploykit's benchmarks do (windows until three in a row agree, here on P95) and
splits the average latency into client, network and server parts. The binary that runs on these machines
is the one inside the tritonclient 2.51.0 wheel; it pins numpy<2, so it lives in its own environment
(`.venv-perf`, made by `make setup` from perf-env.txt). Its rows carry the same users / throughput_rps /
p50_ms / p95_ms / p99_ms keys as the locust runner's LoadResult, so one SLO verdict judges either.
"""

from __future__ import annotations

import base64
import csv
import io
import os
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from deploykit.errors import DeploykitError
from deploykit.files import atomic_write_json, atomic_write_text
from deploykit.loadtest import inputs_note
from deploykit.loadtest.slo import PERCENTILES, SLO, verdict
from deploykit.serve.access import ClientAccess, client_access
from deploykit.serve.engines import ENGINES
from deploykit.serve.oip import OipClient, check_samples, sample_shape

PERF_ANALYZER_VAR = "DEPLOYKIT_PERF_ANALYZER"
PERF_ENV = ".venv-perf"
LIB_DIR = "deploykit-libs"  # inside the env: libb64.so.0d, under the name the binary asks for
CSV_NAME, JSON_NAME, LOG_NAME = "perf_analyzer.csv", "perf_analyzer.json", "perf_analyzer.log"
_LOOPBACK = ("127.0.0.1", "localhost")
_SETUP_HINT = "run `make setup` (it builds .venv-perf from perf-env.txt)"
_MASK = "***"

# perf_analyzer's CSV column -> key (values in microseconds, except throughput).
_LATENCY_COLUMNS = {"p50 latency": "p50_ms", "p90 latency": "p90_ms", "p95 latency": "p95_ms", "p99 latency": "p99_ms"}
_CLIENT_COLUMNS = {"Client Send": "send_ms", "Network+Server Send/Recv": "network_ms", "Client Recv": "recv_ms"}
_SERVER_COLUMNS = {
    "Server Queue": "queue_ms",
    "Server Compute Input": "compute_input_ms",
    "Server Compute Infer": "compute_infer_ms",
    "Server Compute Output": "compute_output_ms",
}


class UnstableMeasurement(DeploykitError):
    """perf_analyzer found no three windows in a row that agreed within the stability bound."""


def _candidate_binaries() -> list[Path]:
    project = Path(__file__).resolve().parents[2]  # a source checkout keeps .venv-perf beside deploykit/
    return [Path.cwd() / PERF_ENV / "bin" / "perf_analyzer", project / PERF_ENV / "bin" / "perf_analyzer"]


def perf_analyzer_env(binary: Path) -> dict[str, str]:
    """The environment `binary` runs in: LD_LIBRARY_PATH gains its env's libb64 and the CUDA runtime wheel's
    libcudart (it links both even on a CPU-only machine); for a binary outside such an env, only the caller's."""
    env_root = binary.resolve().parent.parent
    libs = [env_root / LIB_DIR, *sorted(env_root.glob("lib/python3*/site-packages/nvidia/cuda_runtime/lib"))]
    paths = [str(p) for p in libs if p.is_dir()]
    if os.environ.get("LD_LIBRARY_PATH"):
        paths.append(os.environ["LD_LIBRARY_PATH"])
    return {**os.environ, "LD_LIBRARY_PATH": os.pathsep.join(paths)}


def find_perf_analyzer() -> Path:
    """The perf_analyzer binary: $DEPLOYKIT_PERF_ANALYZER, else the project's .venv-perf; checked to start."""
    named = os.environ.get(PERF_ANALYZER_VAR)
    candidates = [Path(named)] if named else _candidate_binaries()
    binary = next((p for p in candidates if p.is_file()), None)
    if binary is None:
        where = f"{PERF_ANALYZER_VAR}={named} is not a file" if named else f"no {PERF_ENV}/bin/perf_analyzer exists"
        raise DeploykitError(f"perf_analyzer not found ({where}): {_SETUP_HINT}, or set {PERF_ANALYZER_VAR}.")
    with open(binary, "rb") as f:  # pip's entry-point wrapper exits 0 whatever happens: only the binary is trusted
        if f.read(4) != b"\x7fELF":
            raise DeploykitError(
                f"{binary} is not the perf_analyzer binary (a wrapper script's exit code hides failures): "
                f"{_SETUP_HINT}, or point {PERF_ANALYZER_VAR} at the binary itself."
            )
    try:
        out = subprocess.run(
            [str(binary), "--version"], env=perf_analyzer_env(binary), capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        raise DeploykitError(f"perf_analyzer at {binary} does not start ({e}): {_SETUP_HINT}.") from None
    if out.returncode != 0:  # a missing library: the loader exits 127 naming it
        said = (out.stderr or out.stdout).strip().splitlines()[-1:] or [f"exit code {out.returncode}"]
        raise DeploykitError(
            f"perf_analyzer at {binary} does not start ({said[0]}): {_SETUP_HINT}; it needs libb64.so.0d in "
            f"{binary.resolve().parent.parent / LIB_DIR} and libcudart.so.12 on LD_LIBRARY_PATH."
        )
    return binary


def _loopback_target(url: str) -> str:
    """'host:port' for perf_analyzer's -u; load goes only to this machine (the shared machines' rule)."""
    parts = urlsplit(url if "://" in url else f"//{url}")
    if parts.hostname not in _LOOPBACK or parts.port is None:
        raise DeploykitError(
            f"perf_analyzer target {url!r} is not a port on 127.0.0.1: load tests send load only to this machine."
        )
    return f"127.0.0.1:{parts.port}"


def access_args(access: ClientAccess, protocol: str) -> list[str]:
    """perf_analyzer's options for the key and gRPC TLS. Its -H reaches gRPC metadata too (2.51's --help says
    "ignored for GRPC", but its gRPC calls carry the headers): there Triton wants the key's prefixed name."""
    headers = access.grpc_headers if protocol == "grpc" else access.inference_headers
    args = [arg for name, value in headers.items() for arg in ("-H", f"{name}:{value}")]
    if protocol == "grpc" and access.tls_ca is not None:
        # a bare flag: 2.51's --help shows "<bool>", but its parser refuses any argument
        args += ["--ssl-grpc-use-ssl", f"--ssl-grpc-root-certifications-file={access.tls_ca}"]
        if access.tls_cert is not None and access.tls_key is not None:  # mutual TLS
            args += [f"--ssl-grpc-certificate-chain-file={access.tls_cert}",
                     f"--ssl-grpc-private-key-file={access.tls_key}"]  # fmt: skip
    return args


def masked(text: str, access: ClientAccess) -> str:
    """`text` with every header value (the key) replaced: logs and echoed command lines never show it."""
    for value in {*access.inference_headers.values(), *access.grpc_headers.values()}:
        text = text.replace(value, _MASK)
    return text


def _sweeps(levels: list[int]) -> list[str]:
    """--concurrency-range values: one sweep when the levels are evenly spaced, else one run per level."""
    steps = {b - a for a, b in zip(levels, levels[1:])}
    if len(steps) <= 1:
        return [f"{levels[0]}:{levels[-1]}:{steps.pop() if steps else 1}"]
    return [f"{n}:{n}" for n in levels]


def _ms(row: dict[str, str], column: str) -> float:
    return float(row[column]) / 1000.0


def parse_csv(text: str) -> list[dict[str, Any]]:
    """perf_analyzer's `-f` CSV as one dict per concurrency level, in ms, sorted by users.

    The CSV has no average column when a percentile is chosen: perf_analyzer splits the average latency into
    the client, network and server columns, so `avg_ms` is their sum.
    """
    reader = csv.DictReader(io.StringIO(text))
    needed = ["Concurrency", "Inferences/Second", *_LATENCY_COLUMNS, *_CLIENT_COLUMNS, *_SERVER_COLUMNS]
    missing = [c for c in needed if c not in (reader.fieldnames or [])]
    if missing:
        raise DeploykitError(
            f"perf_analyzer's CSV lacks the columns {missing}: use perf_analyzer 2.51 in concurrency mode."
        )
    rows = []
    for raw in reader:
        client = {key: _ms(raw, column) for column, key in _CLIENT_COLUMNS.items()}
        server = {key: _ms(raw, column) for column, key in _SERVER_COLUMNS.items()}
        server["compute_ms"] = server["compute_input_ms"] + server["compute_infer_ms"] + server["compute_output_ms"]
        rows.append(
            {
                "users": int(raw["Concurrency"]),
                "throughput_rps": float(raw["Inferences/Second"]),  # batch 1: one inference per request
                **{key: _ms(raw, column) for column, key in _LATENCY_COLUMNS.items()},
                "avg_ms": sum(client.values()) + server["queue_ms"] + server["compute_ms"],
                "client": client,
                "server": server,
            }
        )
    return sorted(rows, key=lambda r: r["users"])


def _tail(output: str, lines: int = 3) -> str:
    return " | ".join(line.strip() for line in output.strip().splitlines()[-lines:])


def run_perf_analyzer(
    url: str,
    model: str,
    *,
    concurrency: list[int],
    out_dir: Path,
    protocol: str = "http",
    grpc_url: str | None = None,
    measurement_interval_ms: int = 5000,
    stability_percentage: float = 10.0,
    max_trials: int = 10,
    input_data: Path | None = None,
    timeout_s: float = 600.0,
) -> list[dict[str, Any]]:
    """One concurrency sweep of perf_analyzer against `model`; rows as `parse_csv` gives them.

    `url` is Triton's HTTP base URL, as for the locust runner; gRPC goes to `grpc_url` (default 127.0.0.1:8001).
    Each level is measured in windows of `measurement_interval_ms` until three in a row agree within
    `stability_percentage` on P95 latency and throughput, for at most `max_trials` windows. `input_data` is a
    perf_analyzer JSON of real samples (see `write_input_data`); None sends zeros, never perf_analyzer's default
    random bytes (NaN/Inf as FP32, which a server may refuse). The key and gRPC TLS come from the environment
    (`client_access`). Writes perf_analyzer.csv, perf_analyzer.json (settings and rows) and perf_analyzer.log (its
    output, the key masked) into `out_dir`.
    """
    ENGINES["triton"].check_protocol(protocol)  # perf_analyzer speaks Triton's protocols only
    levels = sorted(set(concurrency))
    if not levels or levels[0] < 1:
        raise DeploykitError(f"Concurrency levels {levels} are invalid: pass positive counts, e.g. [1, 2, 4, 8].")
    if input_data is not None and not Path(input_data).is_file():
        raise DeploykitError(f"Input data {input_data} does not exist: write it with write_input_data first.")
    target = _loopback_target(url)
    if protocol == "grpc":
        target = _loopback_target(grpc_url or "127.0.0.1:8001")
    binary = find_perf_analyzer()
    env = perf_analyzer_env(binary)
    access = client_access()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in (CSV_NAME, JSON_NAME):  # a failed run must not leave an earlier run's results looking like its own
        (out_dir / old).unlink(missing_ok=True)

    base = [str(binary), "-m", model, "-u", target, "-i", protocol, "--percentile=95"]
    base += ["-p", str(measurement_interval_ms), "-s", f"{stability_percentage:g}", "-r", str(max_trials)]
    base += ["--input-data", str(Path(input_data).resolve()) if input_data is not None else "zero"]
    base += access_args(access, protocol)
    deadline = time.monotonic() + timeout_s
    log, header, lines = "", "", []
    with tempfile.TemporaryDirectory(prefix="deploykit-perf-") as scratch:  # partial CSVs never reach out_dir
        for i, sweep in enumerate(_sweeps(levels)):
            csv_path = Path(scratch) / f"{i}.csv"
            argv = [*base, "--concurrency-range", sweep, "-f", str(csv_path)]
            log += masked(f"$ {' '.join(argv)}\n", access)
            try:
                done = subprocess.run(
                    argv,
                    env=env,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    text=True,
                    timeout=max(deadline - time.monotonic(), 1.0),
                )
            except subprocess.TimeoutExpired as e:
                partial = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else e.stdout or ""
                atomic_write_text(out_dir / LOG_NAME, log + masked(partial, access))
                raise DeploykitError(
                    f"perf_analyzer on '{model}' was still running after timeout_s={timeout_s:g} s and was stopped: "
                    f"raise timeout_s or lower max_trials / measurement_interval_ms (see {out_dir / LOG_NAME})."
                ) from None
            log += masked(done.stdout, access)
            atomic_write_text(out_dir / LOG_NAME, log)
            if done.returncode != 0:
                unstable = done.returncode == 2  # perf_analyzer's code for "no stable measurement"
                hint = (
                    "raise measurement_interval_ms, stability_percentage or max_trials"
                    if unstable
                    else "check the model name, the URL and the protocol"
                )
                raise (UnstableMeasurement if unstable else DeploykitError)(
                    f"perf_analyzer exited with code {done.returncode} on model '{model}' at {target} "
                    f"({_tail(masked(done.stdout, access))}): {hint} (full output: {out_dir / LOG_NAME})."
                )
            header, *body = csv_path.read_text().strip().splitlines()
            lines += body
    text = "\n".join([header, *lines]) + "\n"
    rows = parse_csv(text)
    missing = sorted(set(levels) - {r["users"] for r in rows})
    if missing:  # perf_analyzer can end a sweep early, exit code 0, when a level never settles
        raise UnstableMeasurement(
            f"perf_analyzer measured '{model}' at {target} but returned no stable row for concurrency {missing}: raise "
            f"measurement_interval_ms, stability_percentage or max_trials (full output: {out_dir / LOG_NAME})."
        )
    atomic_write_text(out_dir / CSV_NAME, text)
    settings = {
        "concurrency": levels,
        "measurement_interval_ms": measurement_interval_ms,
        "stability_percentage": stability_percentage,
        "max_trials": max_trials,
        "stability_percentile": "p95",
        "input_data": str(input_data) if input_data else "zero",
    }
    summary = {"tool": "perf_analyzer", "model": model, "target": target, "protocol": protocol, "settings": settings}
    atomic_write_json(out_dir / JSON_NAME, {**summary, "levels": rows})
    return rows


def _b64_tensor(sample: np.ndarray, dtype: np.dtype) -> dict[str, Any]:
    raw = np.ascontiguousarray(sample, dtype=dtype).tobytes()
    return {"b64": base64.b64encode(raw).decode(), "shape": list(sample.shape)}


def write_input_data(url: str, model: str, samples: Path, path: Path, *, limit: int = 32) -> Path:
    """The first `limit` samples of an (N, *shape) .npy as perf_analyzer's --input-data JSON, sent round-robin.

    The input's name, datatype and per-sample shape come from Triton's metadata for `model`, as the locust users
    take them, so a samples file of the wrong shape fails here. Tensors are base64 raw bytes: exact values, and
    several times smaller than JSON number text. A batch-1 request's tensor leaves out the batch dimension.
    """
    from tritonclient.utils import triton_to_np_dtype  # only here: the rest of the module needs no tritonclient

    first = OipClient(url, model).metadata()["inputs"][0]
    check_samples(samples, sample_shape(first["shape"]), model)
    dtype = triton_to_np_dtype(first["datatype"])
    chosen = np.load(samples, mmap_mode="r")[:limit]
    atomic_write_json(path, {"data": [{first["name"]: _b64_tensor(s, dtype)} for s in chosen]})
    return Path(path)


def judge(
    rows: list[dict[str, Any]], slo: SLO, *, size_mb: float | None = None, latency_percentile: str = "p95"
) -> dict[str, Any]:
    """The SLO verdict at the highest concurrency level, exactly as the locust runner judges its levels."""
    if latency_percentile not in PERCENTILES:  # checked before the row lookup, which would fail less clearly
        raise DeploykitError(
            f"Latency percentile '{latency_percentile}' is unknown: use one of {', '.join(PERCENTILES)}."
        )
    top = max(rows, key=lambda r: r["users"])
    return verdict(slo, top[f"{latency_percentile}_ms"], top["throughput_rps"], size_mb, latency_percentile)


def run_settled(url: str, model: str, stability_percentage: float, **settings: Any) -> tuple[list[dict], float]:
    """`run_perf_analyzer`, and on an unstable measurement again with twice the bound, up to 100% (a neighbour's
    bursts on shared cores): the levels and the bound they were measured with, which the results record."""
    while True:
        try:
            levels = run_perf_analyzer(url, model, stability_percentage=stability_percentage, **settings)
            return levels, stability_percentage
        except UnstableMeasurement:
            if stability_percentage >= 100.0:
                raise
            stability_percentage = min(100.0, 2 * stability_percentage)


def perf_loadtest(
    url: str,
    model: str,
    *,
    users: list[int] | int,
    out_dir: Path,
    duration_s: float = 15.0,
    protocol: str = "http",
    grpc_url: str | None = None,
    samples: Path | None = None,
    slo: SLO | None = None,
    size_mb: float | None = None,
    stability_percentage: float = 25.0,
) -> dict[str, Any]:
    """A load test with perf_analyzer shaped as the locust runner's result (levels, verdict at the top level):
    windows of `duration_s` / 3, since perf_analyzer needs three stable windows per level. Stability is 25%, not
    perf_analyzer's 10%: sub-millisecond P95s on shared cores rarely settle within 10% in ten windows. It sends the
    first samples of `samples` (.npy), or zeros without them; the result's `inputs` says which."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    input_data = write_input_data(url, model, samples, out_dir / "input_data.json") if samples else None
    settings = {
        "concurrency": [users] if isinstance(users, int) else users, "out_dir": out_dir, "protocol": protocol,
        "grpc_url": grpc_url, "measurement_interval_ms": max(500, int(duration_s * 1000 / 3)), "input_data": input_data,
    }  # fmt: skip
    levels, stability_percentage = run_settled(url, model, stability_percentage, **settings)
    return {
        "client": "perf_analyzer",
        "model": model,
        "url": url,
        "engine": "triton",
        "protocol": protocol,
        "inputs": inputs_note(samples),
        "stability_percentage": stability_percentage,
        "levels": levels,
        "verdict": judge(levels, slo, size_mb=size_mb) if slo else None,
    }
