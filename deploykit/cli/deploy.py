"""The deployment commands: package, serve, control, loadtest, validate (registered on the main `deploykit` app)."""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from deploykit.cli.app import app, console, err_console, user_errors
from deploykit.errors import DeploykitError
from deploykit.package.names import validate_model_name

Engine = Annotated[str, typer.Option("--engine", help="triton or torchserve.")]
Url = Annotated[str, typer.Option("--url", help="The server's HTTP endpoint.")]
Model = Annotated[str, typer.Option("--model", "-m", help="Model name on the server.")]
Host = Annotated[str, typer.Option("--host", help="Address to bind; 0.0.0.0 exposes the server to the network.")]

control = typer.Typer(help="Explicit model control on a running Triton: status, load, unload, roll back.")
app.add_typer(control, name="control")


@app.command()
@user_errors
def package(
    model_file: Annotated[Path, typer.Argument(help="The model to package: .onnx (or .plan for native Triton).")],
    name: Annotated[str, typer.Option("--name", "-n", help="Model name (a folder name and URL segment).")] = "model",
    repo: Annotated[Path, typer.Option("--repo", help="Triton model repository to add a version to.")] = Path(
        "model_repo"
    ),
    flavour: Annotated[
        str, typer.Option(help="portable (python backend + ONNX Runtime) or native (official image).")
    ] = "portable",
    max_batch_size: Annotated[int, typer.Option(help="Largest batch Triton forms (0: no batching).")] = 8,
    dynamic_batching: Annotated[bool, typer.Option(help="Let Triton group concurrent requests into batches.")] = True,
    max_queue_delay_us: Annotated[int, typer.Option(help="How long a request may wait for a batch to fill.")] = 0,
    instances: Annotated[int, typer.Option(help="Model instances (parallel executions).")] = 1,
    runtime: Annotated[str, typer.Option(help="What runs an ONNX model: onnxruntime or openvino.")] = "onnxruntime",
    precision: Annotated[
        str, typer.Option(help="OpenVINO's float precision: fp32, or bf16 on CPUs with AVX-512 BF16/AMX.")
    ] = "fp32",
    gpu: Annotated[bool, typer.Option(help="Run instances on the GPU (KIND_GPU).")] = False,
    version: Annotated[int | None, typer.Option(help="Version number (default: the next free one).")] = None,
    torchserve: Annotated[bool, typer.Option(help="Also write a TorchServe archive (legacy target).")] = False,
    model_store: Annotated[Path, typer.Option(help="Where the TorchServe .mar goes.")] = Path("model_store"),
    k8s: Annotated[
        bool, typer.Option("--k8s", help="Also write Kubernetes manifests (k8s.yaml) into the repo's parent.")
    ] = False,
    image: Annotated[
        str, typer.Option(help="Container image the Kubernetes Deployment runs (pin a tag).")
    ] = "deploykit-triton:0.1.0",
    kserve: Annotated[
        bool,
        typer.Option("--kserve", help="Also write a KServe InferenceService (kserve.yaml) into the repo's parent."),
    ] = False,
    storage_uri: Annotated[
        str | None,
        typer.Option(help="Where KServe fetches the model repository (gs://, s3://, pvc://, ...); for --kserve."),
    ] = None,
    monitoring: Annotated[
        bool,
        typer.Option(help="Also write a Grafana dashboard, a Prometheus scrape config and alert rules from --slo "
                          "into <repo's parent>/monitoring."),
    ] = False,
    admin_secret: Annotated[str, typer.Option(
        help="--k8s/--kserve: the Kubernetes Secret holding Triton's admin key (referenced, never written).")
    ] = "deploykit-admin-key",
    restrict_inference: Annotated[bool, typer.Option(
        help="--k8s/--kserve: inference and metadata need the admin key too.")] = False,
    monitoring_namespace: Annotated[str, typer.Option(
        help="--k8s/--kserve: the namespace whose pods may scrape Triton's metrics port.")] = "monitoring",
    slo: SloOpt = "image_classification",
    max_latency_ms: MaxLatency = None,
) -> None:
    """Add a model version to a Triton model repository (and optionally a TorchServe archive, k8s manifests, a KServe
    InferenceService, and monitoring files)."""
    from deploykit.package.triton_repo import TritonModelOptions, write_triton_model
    from deploykit.serve.triton import find_triton

    service = policy = None
    if kserve:  # every KServe and k8s check before the repository is touched
        from deploykit.package.kserve import kserve_inference_service, kserve_network_policy

        if not storage_uri:
            raise DeploykitError(
                "--kserve needs --storage-uri: the gs://, s3://, pvc:// (or other) address the repository is "
                "uploaded to."
            )
        service = kserve_inference_service(name, storage_uri, gpus=1 if gpu else 0, secret_name=admin_secret,
                                           restrict_inference=restrict_inference)  # fmt: skip
        policy = kserve_network_policy(service, monitoring_namespace)
    manifests = None
    if k8s:
        from deploykit.package.k8s import k8s_manifests

        manifests = k8s_manifests(name, image, secret_name=admin_secret, restrict_inference=restrict_inference,
                                  monitoring_namespace=monitoring_namespace)  # fmt: skip
    if kserve or k8s:
        from deploykit.package.k8s import require_native

        require_native(repo, name, flavour, "--kserve" if kserve else "--k8s")

    if not model_file.is_file():
        raise DeploykitError(f"Model file {model_file} does not exist: export one with `deploykit optimize` first.")
    env = None
    if flavour == "portable":  # the python backend needs the environment holding numpy and onnxruntime
        try:
            env = find_triton().python_env
        except DeploykitError as e:
            err_console.print(f"[yellow]warning:[/yellow] EXECUTION_ENV_PATH left unset: {e}")
    options = TritonModelOptions(
        flavour=flavour,
        max_batch_size=max_batch_size,
        dynamic_batching=dynamic_batching,
        max_queue_delay_us=max_queue_delay_us,
        instances=instances,
        kind="gpu" if gpu else "cpu",
        runtime=runtime,
        precision=precision,
        execution_env=str(env) if env else None,
    )
    written = write_triton_model(repo, name, model_file, options, version=version)
    console.print(f"triton: {written}")
    if torchserve:
        from deploykit.package.torchserve_archive import write_torchserve_archive

        console.print(
            f"torchserve: {write_torchserve_archive(model_file, model_store, name, batch_size=max(1, max_batch_size))}"
        )
    if monitoring:
        from deploykit.package.monitoring import write_monitoring

        target = _slo(slo, max_latency_ms, None)  # what the alert rules hold production to
        folder = repo.resolve().parent / "monitoring"
        for path in write_monitoring(folder, ["127.0.0.1:8002"], slo=target, models=[name]):  # Triton's default port
            console.print(f"monitoring: {path}")
    if k8s:
        from deploykit.package.k8s import write_k8s

        console.print(f"kubernetes: {write_k8s(repo.resolve().parent, manifests)}")
    if service:
        from deploykit.package.kserve import write_kserve

        console.print(f"kserve: {write_kserve(repo.resolve().parent, service, policy)}")


def _wait_for_signal(is_running: Any) -> str:
    """Block until Ctrl-C or SIGTERM (returns which) or until the server dies (returns 'exited')."""
    stop = threading.Event()
    caught: list[str] = []

    def handler(signum: int, _frame: Any) -> None:
        caught.append(signal.Signals(signum).name)
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, handler)
    while not stop.wait(0.5):
        if not is_running():
            return "exited"
    return caught[0]


@app.command()
@user_errors
def serve(
    model_repo: Annotated[Path, typer.Argument(help="Triton model repository, or TorchServe model store.")] = Path(
        "model_repo"
    ),
    engine: Engine = "triton",
    host: Host = "127.0.0.1",
    http_port: Annotated[int | None, typer.Option(help="HTTP (inference) port [triton 8000, torchserve 8080].")] = None,
    grpc_port: Annotated[
        int | None, typer.Option(help="gRPC port [8001]; TorchServe: its management port [8081].")
    ] = None,
    metrics_port: Annotated[
        int | None, typer.Option(help="Prometheus metrics port [triton 8002, torchserve 8082].")
    ] = None,
    model: Annotated[list[str], typer.Option("--model", "-m", help="Load only these models (repeatable).")] = [],  # noqa: B006
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the server to become ready.")] = 120.0,
    admin_key_file: Annotated[Path | None, typer.Option(
        help="Triton: the key guarding the control APIs (model load/unload, repository, config, statistics, trace, "
             "logging); written (mode 0600) when the file does not exist. Default: $DEPLOYKIT_KEY, else "
             "./deploykit-admin.key.")] = None,
    restrict: Annotated[bool, typer.Option(
        help="Triton: restrict the control APIs on loopback too (always on for any other address).")] = False,
    restrict_inference: Annotated[bool, typer.Option(help="Triton: inference and metadata need the key too.")] = False,
    insecure: Annotated[bool, typer.Option(
        help="Triton: bind a non-loopback address with the control APIs open to anyone who reaches the port.")] = False,
    grpc_tls_cert: Annotated[Path | None, typer.Option(help="Triton: PEM certificate for gRPC over TLS.")] = None,
    grpc_tls_key: Annotated[Path | None, typer.Option(help="Triton: the PEM private key of --grpc-tls-cert.")] = None,
    grpc_tls_ca: Annotated[Path | None, typer.Option(
        help="Triton: mutual TLS, clients' certificates must be signed by this PEM CA.")] = None,
) -> None:
    """Start a real Triton (or TorchServe) server on a model repository and keep it up until Ctrl-C or SIGTERM.

    On any address but loopback, Triton's control APIs need the admin key (header 'deploykit-key'); TorchServe keeps
    its own token authorization on, and its key file is printed. HTTP TLS belongs to a proxy or ingress in front.
    """
    from deploykit.serve.engines import engine_traits
    from deploykit.serve.server import make_server

    given = (http_port, grpc_port, metrics_port)  # per engine: its first, second and metrics endpoints
    ports = {kind: p for kind, p in zip(engine_traits(engine).ports, given) if p is not None}
    tls = _grpc_tls(grpc_tls_cert, grpc_tls_key, grpc_tls_ca)
    access, note = None, None
    if engine == "triton":
        from deploykit.serve.access import server_access

        access, note = server_access(host, key_file=admin_key_file, restrict=restrict,
                                     restrict_inference=restrict_inference, insecure=insecure, tls=tls)  # fmt: skip
    elif any((admin_key_file, restrict, restrict_inference, insecure, tls)):
        raise DeploykitError(
            "The key, restrict, insecure and TLS options are Triton's: TorchServe's token authorization is always on "
            "and its key file is printed at start."
        )
    server = make_server(engine, model_repo, host=host, ports=ports, models=model or None, access=access)
    server.start(timeout=timeout)
    try:
        table = Table(title=f"{engine} serving {Path(model_repo).resolve()}")
        table.add_column("endpoint")
        table.add_column("address")
        for key, value in server.endpoints.items():
            table.add_row(key, value)
        for key, value in server.client_env().items():
            table.add_row(key, value if key.endswith("_FILE") else "(set in this shell's environment)")
        console.print(table)
        if note:
            console.print(note, soft_wrap=True)  # one line: a path split over two lines cannot be copied
        if engine == "triton":
            _print_model_states(server.control.model_states())
        console.print("Ctrl-C or SIGTERM stops the server.")
        how = _wait_for_signal(lambda: server.running)
        if how == "exited":
            raise DeploykitError(f"The {engine} server exited on its own; see {server.log_path}.")
        err_console.print(f"{how}: stopping the {engine} server")
    finally:
        server.stop()


def _grpc_tls(cert: Path | None, key: Path | None, ca: Path | None) -> Any:
    """The gRPC TLS settings, or None; a certificate needs its key and the reverse, and a CA needs both."""
    if cert is None and key is None and ca is None:
        return None
    if cert is None or key is None:
        raise DeploykitError("gRPC TLS needs both --grpc-tls-cert and --grpc-tls-key (a CA alone secures nothing).")
    from deploykit.serve.access import GrpcTls

    return GrpcTls(cert, key, ca)


def _print_model_states(states: list[dict[str, Any]]) -> None:
    table = Table(title="models")
    for col in ("model", "version", "state", "reason"):
        table.add_column(col)
    for s in states:
        colour = "green" if s.get("state") == "READY" else "red"
        table.add_row(
            s.get("name", ""), s.get("version", ""), f"[{colour}]{s.get('state', '')}[/{colour}]", s.get("reason", "")
        )
    console.print(table)


@control.command("status")
@user_errors
def control_status(url: Url = "http://127.0.0.1:8000") -> None:
    """Every model version in the server's repository, its state, and why it failed if it did."""
    from deploykit.serve.triton import ModelControl

    _print_model_states(ModelControl(url).model_states())


@control.command("load")
@user_errors
def control_load(
    name: Annotated[str, typer.Argument(help="Model name.")],
    version: Annotated[int | None, typer.Option(help="Serve exactly this version (a roll back or forward).")] = None,
    url: Url = "http://127.0.0.1:8000",
) -> None:
    """Load or reload a model; `--version N` serves only version N."""
    from deploykit.serve.triton import ModelControl

    ModelControl(url).load(name, version)
    console.print(f"loaded {name}" + (f" version {version}" if version else ""))


@control.command("rollback")
@user_errors
def control_rollback(
    name: Annotated[str, typer.Argument(help="Model name.")],
    version: Annotated[int, typer.Option(help="The earlier version to serve.")],
    url: Url = "http://127.0.0.1:8000",
) -> None:
    """Serve an earlier version of a model instead of the current one."""
    control_load(name, version, url)


@control.command("unload")
@user_errors
def control_unload(
    name: Annotated[str, typer.Argument(help="Model name.")], url: Url = "http://127.0.0.1:8000"
) -> None:
    """Stop serving a model (its files stay in the repository)."""
    from deploykit.serve.triton import ModelControl

    ModelControl(url).unload(name)
    console.print(f"unloaded {name}")


def _slo(task: str | None, max_latency_ms: float | None, min_throughput: float | None) -> Any:
    from deploykit.loadtest.slo import custom_slo

    return custom_slo(task, max_latency_ms=max_latency_ms, min_throughput=min_throughput) if task else None


SloOpt = Annotated[
    str | None, typer.Option("--slo", help="SLO task from the targets table, e.g. image_classification.")
]
MaxLatency = Annotated[float | None, typer.Option(help="Override the SLO's P95 latency target (ms).")]
MinThroughput = Annotated[float | None, typer.Option(help="Override the SLO's throughput target (per second).")]
Users = Annotated[
    list[int], typer.Option("--users", "-u", help="Concurrent users; repeat for a sweep (-u 1 -u 4 -u 8).")
]
Duration = Annotated[float, typer.Option(help="Seconds of load per concurrency level.")]
Out = Annotated[Path, typer.Option("--out", help="Folder for the JSON results and the plot.")]


@app.command()
@user_errors
def loadtest(
    url: Url = "http://127.0.0.1:8000",
    model: Model = "model",
    users: Users = [1],  # noqa: B006
    spawn_rate: Annotated[float, typer.Option(help="Users started per second.")] = 10.0,
    duration: Duration = 15.0,
    engine: Engine = "triton",
    client: Annotated[str, typer.Option(help="Load generator: locust, or perf_analyzer (Triton only).")] = "locust",
    stability: Annotated[
        float, typer.Option(help="perf_analyzer: % within which three windows in a row must agree.")
    ] = 25.0,
    protocol: Annotated[str, typer.Option(help="Transport: http, or grpc (Triton).")] = "http",
    grpc_url: Annotated[str | None, typer.Option(help="gRPC endpoint [host:8001].")] = None,
    metrics_url: Annotated[str | None, typer.Option(help="Prometheus endpoint to scrape before and after.")] = None,
    samples: Annotated[Path | None, typer.Option(help=".npy of real inputs [N, C, H, W] to send.")] = None,
    slo: SloOpt = None,
    size_mb: Annotated[float | None, typer.Option(help="Model size for the SLO's size criterion.")] = None,
    max_latency_ms: MaxLatency = None,
    min_throughput: MinThroughput = None,
    out: Out = Path("loadtest"),
    soak: Annotated[
        str | None,
        typer.Option(help="Soak for this long (60s, 10m, 1h) at 80% of the capacity measured at the largest -u."),
    ] = None,
) -> None:
    """Load a served model (locust, or Triton's perf_analyzer); print P50/P95/P99, throughput and the SLO verdict
    (exit 1 on a breach)."""
    from deploykit.loadtest.runner import levels_table, run_loadtest, verdict_table
    from deploykit.progress import Reporter

    validate_model_name(model)  # it becomes a URL path segment: refused before any request
    if soak is not None:
        _soak(url, model, soak, max(users), engine, protocol, samples, out)
        return
    target = _slo(slo, max_latency_ms, min_throughput)
    if client == "perf_analyzer":
        from deploykit.loadtest.perf_analyzer import perf_loadtest

        if engine != "triton":
            raise DeploykitError("perf_analyzer speaks Triton's protocols only: use --client locust for TorchServe.")
        result = perf_loadtest(
            url, model, users=users, out_dir=out, duration_s=duration, protocol=protocol, grpc_url=grpc_url,
            samples=samples, slo=target, size_mb=size_mb, stability_percentage=stability,
        )  # fmt: skip
    elif client == "locust":
        with Reporter() as reporter:
            result = run_loadtest(
                url, model, users=users, spawn_rate=spawn_rate, duration_s=duration, engine=engine, protocol=protocol,
                grpc_url=grpc_url, samples=samples, metrics_url=metrics_url, out_dir=out, slo=target,
                size_mb=size_mb, reporter=reporter,
            )  # fmt: skip
    else:
        raise DeploykitError(f"Client '{client}' is unknown: use locust or perf_analyzer.")
    console.print(levels_table(result))
    verdict = result.get("verdict")
    if verdict:
        console.print(verdict_table(result))
    console.print(f"results: {out}")
    if verdict and not verdict["passed"]:
        raise typer.Exit(1)


def _soak(url: str, model: str, duration: str, users: int, engine: str, protocol: str, samples: Path | None,
          out: Path) -> None:  # fmt: skip
    from deploykit.loadtest.soak import parse_duration
    from deploykit.loadtest.soak import soak as run_soak
    from deploykit.progress import Reporter

    if (engine, protocol) != ("triton", "http"):
        raise DeploykitError("The soak sends Triton HTTP requests: drop --engine/--protocol for --soak.")
    seconds = parse_duration(duration)
    with Reporter() as reporter:
        r = run_soak(url, model, duration_s=seconds, out_dir=out, users=users, samples=samples, reporter=reporter)
    table = Table(title=f"soak: {seconds:g} s at {r['target_rps']:.0f} req/s (80% of {r['capacity_rps']:.0f})")
    for column in ("span", "requests", "failures", "P50 ms", "P95 ms"):
        table.add_column(column, justify="right")
    for i, w in enumerate(r["windows"]):
        table.add_row(str(i + 1), str(w["requests"]), str(w["failures"]), f"{w['p50_ms']:.2f}", f"{w['p95_ms']:.2f}")
    console.print(table)
    console.print(
        f"{r['throughput_rps']:.0f} req/s held, {r['failures']} failed, server RSS {r['rss_growth']:+.1%}, "
        f"P95 drift {r['p95_drift']:+.1%}: {'PASS' if r['passed'] else 'FAIL'}; results: {out / 'soak.json'}"
    )
    if not r["passed"]:
        raise typer.Exit(1)


_TUNE_COLUMNS = (
    "", "instances", "threads", "max batch", "batching", "delay us", "preferred", "P50 ms", "P95 ms", "req/s"
)


@app.command()
@user_errors
def tune(
    model_file: Annotated[Path, typer.Argument(help="The model to serve: .onnx or an OpenVINO .xml.")],
    name: Annotated[str, typer.Option("--name", "-n", help="Model name on the server.")] = "model",
    concurrency: Annotated[int, typer.Option(help="Concurrent clients the config must carry.")] = 8,
    slo: SloOpt = "image_classification",
    max_latency_ms: MaxLatency = None,
    samples: Annotated[Path | None, typer.Option(help=".npy of real inputs [N, C, H, W] to send.")] = None,
    budget: Annotated[
        float,
        typer.Option(help="Seconds of search (the base is always measured; base and pick are then measured again)."),
    ] = 120.0,
    runtime: Annotated[str, typer.Option(help="What runs an ONNX model: onnxruntime or openvino.")] = "onnxruntime",
    out: Out = Path("tune"),
) -> None:
    """Search Triton's instances, max batch and queue delay with short perf_analyzer runs; write the config with
    the most throughput whose P95 meets the SLO, and the table of everything tried."""
    from deploykit.package.triton_repo import TritonModelOptions
    from deploykit.progress import Reporter
    from deploykit.serve.triton import find_triton
    from deploykit.serve.tune import tune_triton

    if not model_file.is_file():
        raise DeploykitError(f"Model file {model_file} does not exist: export one with `deploykit optimize` first.")
    target = _slo(slo, max_latency_ms, None)
    if target is None:
        raise DeploykitError("tune needs a latency target: pass --slo TASK (and --max-latency-ms to override it).")
    env = find_triton().python_env
    base = TritonModelOptions(runtime=runtime, execution_env=str(env) if env else None)
    with Reporter() as reporter:
        result = tune_triton(
            model_file, name, out, base=base, max_p95_ms=target.max_latency_ms, concurrency=concurrency,
            samples=samples, budget_s=budget, reporter=reporter,
        )  # fmt: skip
    table = Table(title=f"deploykit tune: '{name}' at {concurrency} clients, P95 <= {target.max_latency_ms:g} ms")
    for col in _TUNE_COLUMNS:
        table.add_column(col, justify="right")
    for i, row in enumerate(result["tried"]):
        mark = "best" if i == result["best"] else ("base" if i == 0 else "")
        numbers = [f"{row[k]:.2f}" if row[k] is not None else "failed" for k in ("p50_ms", "p95_ms", "throughput_rps")]
        batching = ["on" if row["dynamic_batching"] else "off", row["max_queue_delay_us"]]
        preferred = ",".join(str(b) for b in row["preferred_batch_sizes"]) or "-"
        settings = [row["instances"], row["threads"] or "auto", row["max_batch_size"], *batching, preferred]
        table.add_row(mark, *(str(v) for v in settings), *numbers)
    console.print(table)
    ratio = result["throughput_vs_base"]
    verdict = "meets the SLO" if result["meets_slo"] else "[red]no config met the SLO[/red]: the lowest P95 is kept"
    console.print(f"{verdict}; {ratio:.2f}x the base config's throughput" if ratio else verdict)
    console.print(f"config: {result['config']}  (model repository: {out / 'model_repo'}; table: {out / 'tune.json'})")


@app.command()
@user_errors
def validate(
    url: Url = "http://127.0.0.1:8000",
    model: Model = "model",
    engine: Engine = "triton",
    onnx: Annotated[
        Path | None, typer.Option(help="The offline model (.onnx, or an OpenVINO .xml) the served outputs must equal.")
    ] = None,
    samples: Annotated[Path | None, typer.Option(help=".npy of real inputs [N, C, H, W].")] = None,
    grpc_url: Annotated[str | None, typer.Option(help="Triton's gRPC endpoint, to check gRPC too.")] = None,
    metrics_url: Annotated[str | None, typer.Option(help="Prometheus endpoint.")] = None,
    users: Users = [1, 4],  # noqa: B006
    duration: Duration = 10.0,
    slo: SloOpt = "image_classification",
    max_latency_ms: MaxLatency = None,
    min_throughput: MinThroughput = None,
    out: Out = Path("validation"),
    fuzz: Annotated[
        bool, typer.Option(help="Also send the bad-input corpus (30+ malformed requests per protocol; Triton).")
    ] = False,
) -> None:
    """Health, correctness against offline ONNX Runtime, bad inputs, metrics, then a load test against the SLO."""
    import numpy as np

    from deploykit.progress import Reporter
    from deploykit.validate import validate_server

    validate_model_name(model)

    size_mb = onnx.stat().st_size / 1e6 if onnx and onnx.is_file() else None
    with Reporter() as reporter:
        result = validate_server(
            url, model, out_dir=out, engine=engine, model_path=onnx,
            samples=np.load(samples) if samples else None, grpc_url=grpc_url, metrics_url=metrics_url,
            users=users, duration_s=duration, slo=_slo(slo, max_latency_ms, min_throughput), size_mb=size_mb,
            reporter=reporter, fuzz=fuzz,
        )  # fmt: skip
    console.print(checks_table(result["checks"]))
    console.print(f"results: {out / 'validation.json'}")
    if not result["passed"]:
        raise typer.Exit(1)


def checks_table(checks: list[dict[str, Any]]) -> Table:
    table = Table(title="deploykit validate")
    for col in ("group", "check", "result", "detail"):
        table.add_column(col)
    colours = {"pass": "green", "warn": "yellow", "fail": "red"}
    for c in checks:
        colour = colours[c["status"]]
        table.add_row(c["group"], c["name"], f"[{colour}]{c['status']}[/{colour}]", c["detail"])
    return table
