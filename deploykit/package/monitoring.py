"""A Grafana dashboard on Triton's own metric names, Prometheus alert rules from the SLO targets, and the Prometheus
config that scrapes Triton and loads those rules.

Triton exports counters (requests, successes, failures, inferences, executions) and cumulative durations in
microseconds, so every latency panel divides a duration's rate by a count's rate: the mean per request over the
window. Started with `--metrics-config=summary_latencies=true` (as deploykit starts it) it also exports P50..P99.9
request latencies over a sliding window (`nv_inference_request_summary_us{quantile="0.95"}`): the P95 alert reads
those. The metric names are Triton 2.51's (checked against a real server's /metrics, and the rules against a real
Prometheus, in the tests).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from deploykit.files import atomic_write_text
from deploykit.loadtest.slo import SLO, get_slo
from deploykit.package.names import validate_model_name

DATASOURCE = "${datasource}"  # a dashboard variable: the user picks their Prometheus on import
JOB = "triton"  # the scrape job's name, which the "Triton down" rule selects on
RULES_FILE = "alert-rules.yml"
GRAFANA_WINDOW = "$__rate_interval"
# Alert templates (Go text/template, filled in by Prometheus when an alert fires).
MODEL = "{{ $labels.model }}"
VALUE = '{{ $value | printf "%.3g" }}'
PERCENT = "{{ $value | humanizePercentage }}"


def _rate(metric: str, window: str = GRAFANA_WINDOW) -> str:
    return f"sum by (model) (rate({metric}[{window}]))"


def _per_request_ms(duration: str, count: str = "nv_inference_request_success", window: str = GRAFANA_WINDOW) -> str:
    return f"{_rate(duration, window)} / 1000 / {_rate(count, window)}"


# (title, unit, PromQL expressions): what a serving team watches, in the order they read it.
PANELS: list[tuple[str, str, list[str]]] = [
    ("Successful requests per second", "reqps", [_rate("nv_inference_request_success")]),
    ("Failed requests per second", "reqps", [_rate("nv_inference_request_failure")]),
    ("Mean request latency (end to end in Triton)", "ms", [_per_request_ms("nv_inference_request_duration_us")]),
    ("Mean queue time per request", "ms", [_per_request_ms("nv_inference_queue_duration_us")]),
    (
        "Mean compute time per request (input, infer, output)",
        "ms",
        [
            _per_request_ms("nv_inference_compute_input_duration_us"),
            _per_request_ms("nv_inference_compute_infer_duration_us"),
            _per_request_ms("nv_inference_compute_output_duration_us"),
        ],
    ),
    (
        "Mean batch size (inferences per execution)",
        "short",
        [f"{_rate('nv_inference_count')} / {_rate('nv_inference_exec_count')}"],
    ),
    ("Pending requests", "short", ["sum by (model) (nv_inference_pending_request_count)"]),
    ("CPU utilization", "percentunit", ["avg(nv_cpu_utilization)"]),
    ("CPU memory used", "bytes", ["sum(nv_cpu_memory_used_bytes)"]),
]  # fmt: skip


def metric_names(dashboard: dict[str, Any]) -> set[str]:
    """Every Triton metric (nv_*) the dashboard's queries read."""
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    return {name for expr in exprs for name in re.findall(r"\bnv_[a-z_]+\b", expr)}


def grafana_dashboard(title: str = "Triton Inference Server (deploykit)") -> dict[str, Any]:
    """A Grafana dashboard (schema 39), two panels per row, on a Prometheus data source chosen at import."""
    panels = []
    for i, (name, unit, exprs) in enumerate(PANELS):
        panels.append({
            "id": i + 1,
            "type": "timeseries",
            "title": name,
            "datasource": {"type": "prometheus", "uid": DATASOURCE},
            "gridPos": {"h": 8, "w": 12, "x": 12 * (i % 2), "y": 8 * (i // 2)},
            "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
            "targets": [
                {"refId": chr(ord("A") + k), "expr": expr, "legendFormat": "{{model}}"} for k, expr in enumerate(exprs)
            ],
        })  # fmt: skip
    return {
        "title": title,
        "uid": "deploykit-triton",
        "schemaVersion": 39,
        "time": {"from": "now-1h", "to": "now"},
        "refresh": "10s",
        "templating": {"list": [{"name": "datasource", "type": "datasource", "query": "prometheus"}]},
        "panels": panels,
    }


@dataclass(frozen=True)
class AlertSettings:
    """How the alert rules judge; the defaults suit production, tests pass seconds to see alerts fire quickly."""

    window: str = "5m"  # rate() window of the error-ratio and queue-time rules (keep >= 4 scrape intervals)
    pending_for: str = "5m"  # every rule's `for:`: a breach must last this long before it fires (no flapping)
    # The SLO table has no error-rate column (`deploykit validate` wants zero failures in its bounded load test);
    # in production a few failures happen, so above 1% over the window is the breach.
    max_error_ratio: float = 0.01
    # Mean queue time above this share of the latency target: instances are saturated, the P95 follows soon.
    queue_fraction: float = 0.5


DEFAULT_SLO = get_slo("image_classification")  # the pipeline's default slo_task
PRODUCTION = AlertSettings()


def p95_latency_ms() -> str:
    """Triton's own P95 of request latency (its sliding-window summary), per model, in ms."""
    return 'max by (model) (nv_inference_request_summary_us{quantile="0.95"}) / 1000'


def error_ratio(window: str) -> str:
    """failures / (successes + failures) per model over `window` (NaN, so no alert, when there is no traffic)."""
    failures = _rate("nv_inference_request_failure", window)
    return f"{failures} / ({_rate('nv_inference_request_success', window)} + {failures})"


def _rule(name: str, expr: str, severity: str, summary: str, description: str, s: AlertSettings) -> dict[str, Any]:
    return {
        "alert": name,
        "expr": expr,
        "for": s.pending_for,
        "labels": {"severity": severity},
        "annotations": {"summary": summary, "description": description},
    }


def _not_loaded_rules(models: list[str] | None, s: AlertSettings) -> list[dict[str, Any]]:
    """Triton drops a model's series when it is unloaded (seen on a real server): their absence is "not ready"."""
    selectors = [f'{{model="{validate_model_name(m)}"}}' for m in models] if models else [""]
    return [
        _rule(
            "TritonModelNotLoaded",
            f"absent(nv_inference_request_success{sel})",
            "critical",
            f"Model {MODEL} is not loaded on any scraped Triton" if models else "No model is loaded on Triton",
            f"Triton exports no nv_inference_request_success{sel} series: the model is unloaded, failed to load, "
            "or Triton is down; no request to it can succeed.",
            s,
        )
        for sel in selectors
    ]


def alert_rules(
    slo: SLO = DEFAULT_SLO, models: list[str] | None = None, s: AlertSettings = PRODUCTION
) -> dict[str, Any]:
    """Prometheus alert rules (one group) for `slo`'s latency target and the error, queue and readiness signals.

    `models` names the models that must stay loaded; without it one rule fires when no model at all is loaded.
    """
    target, queue_ms = slo.max_latency_ms, s.queue_fraction * slo.max_latency_ms
    task = f"the {slo.task} SLO"
    rules = [
        _rule(
            "TritonP95LatencyAboveSLO",
            f"{p95_latency_ms()} > {target:g}",
            "warning",
            f"P95 latency of {MODEL} is above the {target:g} ms target of {task}",
            f"Triton's P95 request latency (server side, sliding window) is {VALUE} ms, "
            f"above the {target:g} ms P95 target of {task}; clients see this plus the network.",
            s,
        ),
        _rule(
            "TritonErrorRatioAboveSLO",
            f"{error_ratio(s.window)} > {s.max_error_ratio:g}",
            "critical",
            f"More than {100 * s.max_error_ratio:g}% of requests to {MODEL} fail",
            f"{PERCENT} of requests failed over {s.window} (failures / (successes + "
            f"failures)), above the {100 * s.max_error_ratio:g}% error-ratio target.",
            s,
        ),
        _rule(
            "TritonQueueTimeGrowing",
            f"{_per_request_ms('nv_inference_queue_duration_us', window=s.window)} > {queue_ms:g}",
            "warning",
            f"Requests to {MODEL} wait in Triton's queue",
            f"Mean queue time per request is {VALUE} ms over {s.window}, above "
            f"{100 * s.queue_fraction:g}% of the {target:g} ms latency target of {task} ({queue_ms:g} ms): the "
            "instances are saturated; add instances or replicas before the P95 target is missed.",
            s,
        ),
        *_not_loaded_rules(models, s),
        _rule(
            "TritonDown",
            f'up{{job="{JOB}"}} == 0',
            "critical",
            "Triton's metrics endpoint {{ $labels.instance }} does not answer",
            "Prometheus cannot scrape Triton: the server is down or unreachable, and no other alert can see it.",
            s,
        ),
    ]
    return {"groups": [{"name": f"deploykit-triton-{slo.task}", "rules": rules}]}


def prometheus_config(targets: list[str], interval_s: int = 5, rule_files: list[str] | None = None) -> dict[str, Any]:
    """A prometheus.yml scraping Triton's metrics endpoint(s) ("host:8002") and loading `rule_files`."""
    config: dict[str, Any] = {
        "global": {"scrape_interval": f"{interval_s}s", "evaluation_interval": f"{interval_s}s"}
    }
    if rule_files:
        config["rule_files"] = rule_files  # relative paths resolve against the config file's folder
    config["scrape_configs"] = [
        {"job_name": JOB, "metrics_path": "/metrics", "static_configs": [{"targets": targets}]}
    ]
    return config


def write_monitoring(
    out_dir: Path,
    targets: list[str],
    slo: SLO = DEFAULT_SLO,
    models: list[str] | None = None,
    alerts: AlertSettings = PRODUCTION,
    interval_s: int = 5,
) -> list[Path]:
    """`grafana-dashboard.json`, `alert-rules.yml` (from `slo`) and `prometheus.yml` (loading the rules) in
    `<out_dir>`, each written atomically."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dashboard, rules, scrape = out_dir / "grafana-dashboard.json", out_dir / RULES_FILE, out_dir / "prometheus.yml"
    atomic_write_text(dashboard, json.dumps(grafana_dashboard(), indent=2) + "\n")
    atomic_write_text(rules, yaml.safe_dump(alert_rules(slo, models, alerts), sort_keys=False, width=1000))
    config = prometheus_config(targets, interval_s, rule_files=[RULES_FILE])
    atomic_write_text(scrape, yaml.safe_dump(config, sort_keys=False))
    return [dashboard, rules, scrape]
