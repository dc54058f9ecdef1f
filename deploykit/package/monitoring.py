"""A Grafana dashboard on Triton's own metric names and the Prometheus scrape config that feeds it.

Triton exports counters (requests, successes, failures, inferences, executions) and cumulative durations in
microseconds, so every latency panel divides a duration's rate by a count's rate: the mean per request over the
window. The metric names are Triton 2.51's (checked against a real server's /metrics in the tests).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml

from deploykit.files import atomic_write_text

DATASOURCE = "${datasource}"  # a dashboard variable: the user picks their Prometheus on import


def _rate(metric: str) -> str:
    return f"sum by (model) (rate({metric}[$__rate_interval]))"


def _per_request_ms(duration: str, count: str = "nv_inference_request_success") -> str:
    return f"{_rate(duration)} / 1000 / {_rate(count)}"


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
    ("Mean batch size (inferences per execution)", "short", [f"{_rate('nv_inference_count')} / {_rate('nv_inference_exec_count')}"]),
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


def prometheus_config(targets: list[str], interval_s: int = 5) -> dict[str, Any]:
    """A prometheus.yml scraping Triton's metrics endpoint(s) ("host:8002")."""
    return {
        "global": {"scrape_interval": f"{interval_s}s", "evaluation_interval": f"{interval_s}s"},
        "scrape_configs": [
            {"job_name": "triton", "metrics_path": "/metrics", "static_configs": [{"targets": targets}]}
        ],
    }


def write_monitoring(out_dir: Path, targets: list[str]) -> list[Path]:
    """`<out_dir>/grafana-dashboard.json` and `<out_dir>/prometheus.yml`, each written atomically."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dashboard, scrape = out_dir / "grafana-dashboard.json", out_dir / "prometheus.yml"
    atomic_write_text(dashboard, json.dumps(grafana_dashboard(), indent=2) + "\n")
    atomic_write_text(scrape, yaml.safe_dump(prometheus_config(targets), sort_keys=False))
    return [dashboard, scrape]
