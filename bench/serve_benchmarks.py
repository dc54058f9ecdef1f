"""Serving benchmarks on real servers, written into BENCHMARKS.md (its "Serving" section).

    python bench/serve_benchmarks.py [--duration 10] [--repeats 3]

What it measures, each a median over `repeats` rounds with the servers' runs interleaved inside a round
(these machines are shared: a neighbour's burst then hits every variant alike):
  1. the quickstart INT8 model at one user: served P50 (HTTP) against in-process ONNX Runtime P50, batch 1;
  2. the same model at 8 users, Triton with dynamic batching against Triton without it (throughput ratio);
  3. the same model and load, Triton (through deploykit) against TorchServe: throughput and P99;
  4. ResNet-18 INT8 at 224x224 served at 1 and 2 users against the image-classification SLO;
  5. the quickstart model at one client with perf_analyzer beside locust (the P50 overhead over in-process, and
     the CPU each client burns: on 2 cores the load generator competes with the server); beside it the floor no
     model can go under here: a null model (the same input and output, next to no compute) served the same way;
     and at 8 clients, the CPU each request costs Triton, its python backend stubs and perf_analyzer;
  6. `deploykit tune` at 8 clients: the tuned config's throughput against the default config's, at its P95;
     beside it the ceiling no setting can pass here: the null model served and loaded the same way, whose
     throughput over the default config's bounds any tuned ratio.
The models come from the quickstart and resnet18-latency pipelines (run up to `quantize`, cached).
Load generator and servers share this machine's cores, as they would on a one-box deployment.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import statistics
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import psutil
from sections import write_section

from deploykit.bench.measure import measure
from deploykit.export.parity import real_batches
from deploykit.files import atomic_write_json
from deploykit.loadtest.metrics import scrape, total
from deploykit.loadtest.perf_analyzer import run_settled, write_input_data
from deploykit.loadtest.runner import run_locust
from deploykit.loadtest.slo import get_slo, verdict
from deploykit.loadtest.soak import server_pid
from deploykit.machine import machine_info
from deploykit.package.torchserve_archive import write_torchserve_archive
from deploykit.package.triton_repo import TritonModelOptions, write_triton_model
from deploykit.pipeline.engine import run_pipeline
from deploykit.pipeline.loader import load_pipeline
from deploykit.progress import Reporter
from deploykit.runtime import ort_session
from deploykit.serve.server import free_ports, make_server
from deploykit.serve.triton import find_triton
from deploykit.serve.tune import tune_triton

REPO = Path(__file__).resolve().parents[1]
SECTION = "serving"  # the part of BENCHMARKS.md this script owns


def int8_model(pipeline: str, runs_dir: Path) -> tuple[Path, np.ndarray]:
    """The pipeline's INT8 ONNX (running it up to quantize, cached) and 32 real validation samples."""
    cfg = load_pipeline(REPO / pipeline).model_copy(update={"runs_dir": runs_dir})
    with Reporter() as reporter:
        run_pipeline(cfg, until="quantize", reporter=reporter)
    from deploykit.data import build_datasets

    samples = real_batches(build_datasets(cfg.data), [32])[0]
    return runs_dir / cfg.name / "quantize" / "model.int8.onnx", samples


def null_model(like: Path, out: Path) -> Path:
    """An ONNX model with `like`'s input and output (name, shape) that computes next to nothing: Flatten, then a
    zero Gemm. Served like the real one, it measures what serving alone costs on this machine."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    graph = onnx.load(str(like), load_external_data=False).graph
    x, y = graph.input[0], graph.output[0]
    features = int(np.prod([d.dim_value for d in x.type.tensor_type.shape.dim[1:]]))
    classes = y.type.tensor_type.shape.dim[1].dim_value
    nodes = [
        helper.make_node("Flatten", [x.name], ["flat"]),
        helper.make_node("Gemm", ["flat", "w"], [y.name], transB=1),
    ]
    weights = numpy_helper.from_array(np.zeros((classes, features), np.float32), "w")
    output = helper.make_tensor_value_info(y.name, TensorProto.FLOAT, ["n", classes])
    model = helper.make_model(
        helper.make_graph(nodes, "null", [x], [output], [weights]),
        opset_imports=[helper.make_opsetid("", 17)],
        ir_version=8,  # what the ONNX Runtime serving it (in .venv-triton) reads; this onnx would write a newer one
    )
    onnx.save(model, str(out))
    return out


def build_repo(root: Path, qs: Path, r18: Path, null: Path) -> Path:
    env = str(find_triton().python_env)
    repo = root / "model_repo"
    variants = {
        "qs_batched": (qs, TritonModelOptions(execution_env=env, threads=1)),
        "null_batched": (null, TritonModelOptions(execution_env=env, threads=1)),
        "qs_unbatched": (qs, TritonModelOptions(execution_env=env, threads=1, dynamic_batching=False)),
        "r18": (r18, TritonModelOptions(execution_env=env, threads=2, max_batch_size=4)),
    }
    for name, (model, options) in variants.items():
        write_triton_model(repo, name, model, options, version=1)
    return repo


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)  # locust and perf_analyzer are waited-for children
    return usage.ru_utime + usage.ru_stime


def load(url: str, model: str, users: int, duration: float, samples: Path, work: Path, **kw: Any) -> dict[str, Any]:
    cpu, start = _children_cpu_s(), time.monotonic()
    result = run_locust(url, model, users=users, spawn_rate=users, duration_s=duration, samples=samples,
                        workdir=work / f"{model}-{kw.get('engine', 'triton')}-{users}", **kw)  # fmt: skip
    return {**result.__dict__, "client_cores": (_children_cpu_s() - cpu) / (time.monotonic() - start)}


def pa_load(url: str, model: str, users: int, duration: float, inputs: Path, work: Path) -> dict[str, Any]:
    cpu, start = _children_cpu_s(), time.monotonic()
    window_ms = int(duration * 1000 / 3)
    level = run_settled(url, model, 25.0, concurrency=[users], out_dir=work / f"pa-{model}-{users}", input_data=inputs,
                        measurement_interval_ms=window_ms)[0][0]  # twice the bound if 25% never settles  # fmt: skip
    return {**level, "client_cores": (_children_cpu_s() - cpu) / (time.monotonic() - start)}


def cpu_split(pid: int, metrics_url: str, model: str, run: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """`run()`'s result with the CPU milliseconds each request cost the Triton process (`pid`), its python backend
    stubs (its child processes) and the load generator, from CPU times and Triton's own count of requests served."""

    def spent() -> dict[str, float]:
        root = psutil.Process(pid)
        seconds = [sum(p.cpu_times()[:2]) for p in (root, *root.children(recursive=True))]
        return {"triton": seconds[0], "stubs": sum(seconds[1:]), "client": _children_cpu_s()}

    def served() -> float:
        return total(scrape(metrics_url), "nv_inference_request_success", {"model": model})

    cpu, count = spent(), served()
    result = run()
    after, requests = spent(), served() - count
    return {**result, "cpu_ms_per_request": {k: (after[k] - cpu[k]) * 1000 / requests for k in cpu}}


def median_of(rounds: list[dict[str, Any]], key: str) -> float:
    return float(statistics.median(r[key] for r in rounds))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=10.0, help="Seconds of load per measurement.")
    parser.add_argument("--repeats", type=int, default=3, help="Rounds; results are medians over them.")
    parser.add_argument("--runs-dir", default=str(REPO / "bench" / "runs"), help="Where runs and repos go.")
    parser.add_argument("--out", default=str(REPO / "BENCHMARKS.md"), help="Markdown file to update.")
    parser.add_argument("--render", action="store_true", help="Only re-render the section from the last serving.json.")
    args = parser.parse_args()
    if args.render:
        saved = json.loads((Path(args.runs_dir) / "serving" / "serving.json").read_text())
        saved.update(summarize(saved["rounds"], saved["resnet18"]["size_mb"]))
        write_section(Path(args.out), SECTION, markdown(saved))
        return

    runs_dir = Path(args.runs_dir)
    work = runs_dir / "serving"
    work.mkdir(parents=True, exist_ok=True)
    qs, qs_samples = int8_model("pipelines/quickstart.yaml", runs_dir)
    r18, r18_samples = int8_model("pipelines/resnet18-latency.yaml", runs_dir)
    np.save(work / "qs_samples.npy", qs_samples)
    np.save(work / "r18_samples.npy", r18_samples)
    for old in ("repo", "store"):  # fresh repositories: each run benchmarks exactly these settings
        shutil.rmtree(work / old, ignore_errors=True)
    null = null_model(qs, work / "null.onnx")
    repo = build_repo(work / "repo", qs, r18, null)
    store = work / "store"
    write_torchserve_archive(qs, store, "qs", batch_size=8, max_batch_delay_ms=5, threads=1)
    machine_before = machine_info()

    offline, null_offline = ort_session(qs, threads=1), ort_session(null, threads=1)
    d, qs_npy, r18_npy = args.duration, work / "qs_samples.npy", work / "r18_samples.npy"
    rounds: list[dict[str, Any]] = [{} for _ in range(args.repeats)]
    triton = make_server("triton", repo, ports=free_ports("triton"), log_dir=work)
    with triton:
        t_url, t_metrics = triton.infer_url, triton.metrics_url
        qs_inputs = write_input_data(t_url, "qs_batched", qs_npy, work / "qs_input_data.json")
        for i, row in enumerate(rounds):  # Triton alone: an idle JVM beside it would only add noise
            print(f"triton round {i + 1}/{args.repeats}")
            row.update(
                offline_p50_ms=measure(offline, qs_samples[:1], window_s=1.0).p50_ms,
                one_user=load(t_url, "qs_batched", 1, d, qs_npy, work, metrics_url=t_metrics),
                pa_one_user=pa_load(t_url, "qs_batched", 1, d, qs_inputs, work),
                null_offline_p50_ms=measure(null_offline, qs_samples[:1], window_s=1.0).p50_ms,
                pa_null_one_user=pa_load(t_url, "null_batched", 1, d, qs_inputs, work),
                pa_8=cpu_split(server_pid(t_url), t_metrics, "qs_batched",
                               lambda: pa_load(t_url, "qs_batched", 8, d, qs_inputs, work)),  # fmt: skip
                batched_8=load(t_url, "qs_batched", 8, d, qs_npy, work, metrics_url=t_metrics),
                unbatched_8=load(t_url, "qs_unbatched", 8, d, qs_npy, work, metrics_url=t_metrics),
                r18_1=load(t_url, "r18", 1, d, r18_npy, work, metrics_url=t_metrics),
                r18_2=load(t_url, "r18", 2, d, r18_npy, work, metrics_url=t_metrics),
            )
        ts_logs = work / "torchserve-logs"
        torchserve = make_server("torchserve", store, ports=free_ports("torchserve"), log_dir=ts_logs)
        with torchserve:  # both servers up, runs interleaved: the same machine state for each
            ts_url, ts_metrics = torchserve.infer_url, torchserve.metrics_url
            for i, row in enumerate(rounds):
                print(f"triton vs torchserve round {i + 1}/{args.repeats}")
                row.update(
                    triton_8=load(t_url, "qs_batched", 8, d, qs_npy, work, metrics_url=t_metrics),
                    torchserve_8=load(ts_url, "qs", 8, d, qs_npy, work, engine="torchserve",
                                      input_shape=qs_samples.shape[1:], metrics_url=ts_metrics),
                )  # fmt: skip
    print("tune: quickstart INT8 at 8 clients")
    default = TritonModelOptions(execution_env=str(find_triton().python_env))
    target_ms = get_slo("image_classification").max_latency_ms
    tuned = tune_triton(qs, "qs", work / "tune", base=default, max_p95_ms=target_ms, concurrency=8, samples=qs_npy,
                        budget_s=120.0)  # fmt: skip
    print("ceiling: the null model, default config, 8 clients")
    ceiling = tune_triton(null, "null", work / "ceiling", base=default, max_p95_ms=target_ms, concurrency=8,
                          samples=qs_npy, budget_s=0.0)["tried"][0]  # only the base config is measured  # fmt: skip
    report = summarize(rounds, r18.stat().st_size / 1e6)
    kept = ("tried", "best", "meets_slo", "throughput_vs_base", "max_p95_ms", "confirmed")
    report["tune"] = {k: tuned[k] for k in kept}
    report["tune"]["ceiling"] = ceiling
    report.update(machine_before=machine_before, machine_after=machine_info(), settings=vars(args), rounds=rounds,
                  finished_utc=f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M}")  # fmt: skip
    atomic_write_json(work / "serving.json", report)
    write_section(Path(args.out), SECTION, markdown(report))
    print(f"wrote {args.out} and {work / 'serving.json'}")


def summarize(rounds: list[dict[str, Any]], r18_mb: float) -> dict[str, Any]:
    def med(key: str, field: str) -> float:
        return median_of([r[key] for r in rounds], field)

    def med_server(key: str, field: str) -> float:
        return median_of([r[key]["server"] for r in rounds], field)

    offline = float(statistics.median(r["offline_p50_ms"] for r in rounds))
    # the overhead of serving a model that computes next to nothing, round by round: what no model can go under
    floors = [r["pa_null_one_user"]["p50_ms"] - r["null_offline_p50_ms"] for r in rounds if "pa_null_one_user" in r]
    slo = get_slo("image_classification")
    r18 = {n: {f: med(f"r18_{n}", f) for f in ("p50_ms", "p95_ms", "p99_ms", "throughput_rps")} for n in (1, 2)}
    return {
        "one_user": {"offline_p50_ms": offline, "served_p50_ms": med("one_user", "p50_ms"),
                     "gap_ms": med("one_user", "p50_ms") - offline,
                     "pa_p50_ms": med("pa_one_user", "p50_ms"), "pa_gap_ms": med("pa_one_user", "p50_ms") - offline,
                     "locust_cores": med("one_user", "client_cores"), "pa_cores": med("pa_one_user", "client_cores"),
                     "locust_rps": med("one_user", "throughput_rps"), "pa_rps": med("pa_one_user", "throughput_rps"),
                     "pa_gap_rounds": [r["pa_one_user"]["p50_ms"] - r["offline_p50_ms"] for r in rounds],
                     "floor_ms": statistics.median(floors) if floors else None, "floor_rounds": floors},
        "cpu_8": {"rps": med("pa_8", "throughput_rps"), "model_ms": offline,
                  **{k: median_of([r["pa_8"]["cpu_ms_per_request"] for r in rounds], k)
                     for k in ("triton", "stubs", "client")}} if all("pa_8" in r for r in rounds) else None,
        "batching": {"with_rps": med("batched_8", "throughput_rps"), "without_rps": med("unbatched_8", "throughput_rps"),
                     "ratio": med("batched_8", "throughput_rps") / med("unbatched_8", "throughput_rps"),
                     "round_ratios": [r["batched_8"]["throughput_rps"] / r["unbatched_8"]["throughput_rps"] for r in rounds],
                     # Triton charges each request its whole batch's compute: per-request cost = compute / batch
                     "server_ms_per_request": {k: statistics.median(r[k]["server"]["compute_ms"] / r[k]["server"]["avg_batch_size"]
                                                                    for r in rounds) for k in ("batched_8", "unbatched_8")},
                     "avg_batch": med_server("batched_8", "avg_batch_size")},
        "triton_vs_torchserve": {
            "triton": {"rps": med("triton_8", "throughput_rps"), "p99_ms": med("triton_8", "p99_ms")},
            "torchserve": {"rps": med("torchserve_8", "throughput_rps"), "p99_ms": med("torchserve_8", "p99_ms")},
        },
        "resnet18": {**{str(n): v for n, v in r18.items()}, "size_mb": r18_mb,
                     "verdict": {str(n): verdict(slo, v["p95_ms"], v["throughput_rps"], r18_mb) for n, v in r18.items()}},
    }  # fmt: skip


def pooled(row: dict[str, Any], again: dict[str, Any] | None) -> dict[str, float]:
    """A tune row's throughput and P95 averaged with its second measurement, when it has one that ran."""
    runs = [x for x in (row, again) if x and x["throughput_rps"] is not None]
    return {k: statistics.mean(x[k] for x in runs) for k in ("throughput_rps", "p95_ms")}


def _listed(values: list[float]) -> str:
    return ", ".join(f"{v:.3f}" for v in values)


def met(ok: bool) -> str:
    return "met" if ok else "NOT met"


def markdown(r: dict[str, Any]) -> str:
    m, s = r["machine_before"], r["settings"]
    one, b, tv, r18 = r["one_user"], r["batching"], r["triton_vs_torchserve"], r["resnet18"]
    lines = [
        "## Serving (real Triton 2.51 and TorchServe 0.12; locust and perf_analyzer on the same machine)",
        "",
        f"Latest `python bench/serve_benchmarks.py`, {r['finished_utc']} UTC. {m['cpu']}, "
        f"{m['cores']} cores shared by servers and load generator; load average {m.get('load_avg')} before, "
        f"{r['machine_after'].get('load_avg')} after. Medians of {s['repeats']} interleaved rounds of "
        f"{s['duration']:g} s per measurement; percentiles from every request's raw time (sub-ms), HTTP unless said.",
        "",
        "| target | measured | result |",
        "|---|---|---|",
        f"| quickstart INT8, 1 user: served P50 within 1 ms of in-process ORT | served {one['served_p50_ms']:.3f} ms, "
        f"offline {one['offline_p50_ms']:.3f} ms, gap {one['gap_ms']:.3f} ms | {met(one['gap_ms'] <= 1.0)} |",
        f"| 8 users: dynamic batching throughput >= 1.5x without | {b['with_rps']:.0f} vs {b['without_rps']:.0f} req/s "
        f"= {b['ratio']:.2f}x (rounds {', '.join(f'{x:.2f}' for x in b['round_ratios'])}); average batch "
        f"{b['avg_batch']:.2f}, server compute per request {b['server_ms_per_request']['batched_8']:.3f} vs "
        f"{b['server_ms_per_request']['unbatched_8']:.3f} ms | {met(b['ratio'] >= 1.5)} |",
        f"| Triton vs TorchServe, same model, 8 users | Triton {tv['triton']['rps']:.0f} req/s, P99 "
        f"{tv['triton']['p99_ms']:.2f} ms; TorchServe {tv['torchserve']['rps']:.0f} req/s, P99 "
        f"{tv['torchserve']['p99_ms']:.2f} ms | {tv['triton']['rps'] / tv['torchserve']['rps']:.2f}x throughput |",
    ]
    lines += [
        f"| quickstart INT8, 1 client, perf_analyzer: P50 overhead over in-process <= 0.5 ms | perf_analyzer P50 "
        f"{one['pa_p50_ms']:.3f} ms ({one['pa_rps']:.0f} req/s, client {one['pa_cores']:.2f} cores), locust "
        f"{one['served_p50_ms']:.3f} ms ({one['locust_rps']:.0f} req/s, client {one['locust_cores']:.2f} cores); "
        f"overhead {one['pa_gap_ms']:.3f} ms (rounds {_listed(one.get('pa_gap_rounds', []))}) | "
        f"{met(one['pa_gap_ms'] <= 0.5)} |",
    ]
    if one.get("floor_ms") is not None:
        lines.append(
            f"| floor for any served P50 overhead: the null model served the same way, 1 client, perf_analyzer | "
            f"overhead {one['floor_ms']:.3f} ms (rounds {_listed(one['floor_rounds'])}; its served P50 less its "
            f"in-process P50) | "
            f"{'0.5 ms reachable' if one['floor_ms'] <= 0.5 else 'the median floor is over 0.5 ms here'} |"
        )
    if r.get("cpu_8"):
        c = r["cpu_8"]
        lines.append(
            f"| where the CPU goes: quickstart INT8, 8 clients, perf_analyzer ({c['rps']:.0f} req/s) | per request: "
            f"Triton {c['triton']:.3f} ms, its python backend stubs {c['stubs']:.3f} ms (the model alone runs in "
            f"{c['model_ms']:.3f} ms in-process), perf_analyzer {c['client']:.3f} ms | serving costs "
            f"{(c['triton'] + c['stubs'] - c['model_ms']) / c['model_ms']:.1f}x the model's own run |"
        )
    if "tune" in r:
        t = r["tune"]
        again = t.get("confirmed") or {}
        base = pooled(t["tried"][0], again.get("base"))
        settings = t["tried"][t["best"]]
        best = pooled(settings, again.get("best")) if t["best"] else base
        ok = t["meets_slo"] and t["throughput_vs_base"] >= 1.5 and best["p95_ms"] <= base["p95_ms"]
        lines.append(
            f"| `deploykit tune`, quickstart INT8, 8 clients: >= 1.5x the default config's throughput at equal or "
            f"lower P95 | default {base['throughput_rps']:.0f} req/s P95 {base['p95_ms']:.2f} ms; tuned "
            f"({settings['instances']} instance(s) x {settings['threads']} thread(s), max batch "
            f"{settings['max_batch_size']}, dynamic batching {'on' if settings['dynamic_batching'] else 'off'}, delay "
            f"{settings['max_queue_delay_us']} us, preferred batch {settings.get('preferred_batch_sizes') or '-'}) "
            f"{best['throughput_rps']:.0f} req/s P95 {best['p95_ms']:.2f} ms = "
            f"{t['throughput_vs_base']:.2f}x, of {len(t['tried'])} configs tried (both measured twice, in the search "
            f"and back to back after it; means) | {met(ok)} |"
        )
        if "ceiling" in t:
            top = t["ceiling"]["throughput_rps"] / base["throughput_rps"]
            lines.append(
                f"| ceiling for any tuned config: the null model served and loaded like the default config | "
                f"{t['ceiling']['throughput_rps']:.0f} req/s P95 {t['ceiling']['p95_ms']:.2f} ms = "
                f"{top:.2f}x the default config's throughput | "
                f"{'1.5x reachable' if top >= 1.5 else '1.5x out of reach here'} |"
            )
    for n in ("1", "2"):
        v = r18[n]
        ok = (
            r18["verdict"][n]["criteria"]["latency"]["passed"] and r18["verdict"][n]["criteria"]["throughput"]["passed"]
        )
        lines.append(
            f"| ResNet-18 INT8 224x224, {n} user(s): P95 < 10 ms and > 100 inf/s | P50 {v['p50_ms']:.2f} ms, "
            f"P95 {v['p95_ms']:.2f} ms, P99 {v['p99_ms']:.2f} ms, {v['throughput_rps']:.0f} inf/s | {met(ok)} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
