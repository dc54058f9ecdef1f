"""Server-side latency split from Prometheus counters scraped before and after a load run.

The client sees one number per request; the server's counters say where that time went (queueing,
compute) and how well dynamic batching grouped requests. Both Triton's and TorchServe's counters are
cumulative, so the difference of two scrapes covers exactly the requests in between.
"""

from __future__ import annotations

import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from deploykit.errors import DeploykitError

TRITON_COUNTERS = {
    "requests": "nv_inference_request_success",
    "inferences": "nv_inference_count",
    "executions": "nv_inference_exec_count",
    "request_us": "nv_inference_request_duration_us",
    "queue_us": "nv_inference_queue_duration_us",
    "input_us": "nv_inference_compute_input_duration_us",
    "infer_us": "nv_inference_compute_infer_duration_us",
    "output_us": "nv_inference_compute_output_duration_us",
}


def metric_key(name: str, labels: dict[str, str]) -> str:
    """`name{a="1",b="2"}` with labels sorted, so the same series has the same key in every scrape."""
    if not labels:
        return name
    return name + "{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}"


def parse(text: str) -> dict[str, float]:
    """Every sample in Prometheus text format, keyed by `metric_key`.

    The parser names a counter's sample `<name>_total` whether or not the text has the suffix (Triton's
    counters have none, TorchServe's some), so counters are keyed by their name without `_total`.
    """
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            name = family.name if family.type == "counter" and s.name == f"{family.name}_total" else s.name
            values[metric_key(name, s.labels)] = float(s.value)
    return values


def scrape(metrics_url: str, timeout: float = 5.0) -> dict[str, float]:
    """Parse what `metrics_url` serves (a Prometheus /metrics endpoint)."""
    try:
        with urllib.request.urlopen(metrics_url, timeout=timeout) as r:
            text = r.read().decode("utf-8")
    except OSError as e:
        raise DeploykitError(
            f"Metrics endpoint {metrics_url} did not answer ({e}): check the server's metrics port."
        ) from None
    return parse(text)


def total(values: dict[str, float], name: str, match: dict[str, str]) -> float:
    """Sum of `name` over all series whose labels include `match` (e.g. every version of one model)."""
    found = 0.0
    for key, value in values.items():
        base, _, labels = key.partition("{")
        bounded = "," + labels.removesuffix("}") + ","  # commas around every label, so model="a" never matches "ab"
        if base == name and all(f',{k}="{v}",' in bounded for k, v in match.items()):
            found += value
    return found


def _delta(before: dict[str, float], after: dict[str, float], name: str, match: dict[str, str]) -> float:
    return total(after, name, match) - total(before, name, match)


def triton_split(before: dict[str, float], after: dict[str, float], model: str) -> dict[str, float]:
    """Per-request averages in ms (queue, compute = input + infer + output, total) and the average batch size.

    Summed over all of the model's versions. Raises when Triton counted no request for `model` in between.
    """
    d = {k: _delta(before, after, name, {"model": model}) for k, name in TRITON_COUNTERS.items()}
    if d["requests"] <= 0:
        raise DeploykitError(
            f"Triton's metrics show no successful request for model '{model}' between the two scrapes: "
            "check that the metrics URL belongs to the server under load."
        )
    per_request_ms = 1e-3 / d["requests"]
    return {
        "requests": d["requests"],
        "queue_ms": d["queue_us"] * per_request_ms,
        "compute_ms": (d["input_us"] + d["infer_us"] + d["output_us"]) * per_request_ms,
        "total_ms": d["request_us"] * per_request_ms,
        "avg_batch_size": d["inferences"] / d["executions"] if d["executions"] else 0.0,
    }


def torchserve_split(before: dict[str, float], after: dict[str, float], model: str) -> dict[str, float]:
    """Per-request averages in ms of queueing and of the whole inference, from TorchServe's counters."""
    match = {"model_name": model}
    requests = _delta(before, after, "ts_inference_requests", match)
    if requests <= 0:
        raise DeploykitError(
            f"TorchServe's metrics show no request for model '{model}' between the two scrapes: "
            "start TorchServe with metrics_mode=prometheus and check the metrics URL."
        )
    per_request_ms = 1e-3 / requests
    return {
        "requests": requests,
        "queue_ms": _delta(before, after, "ts_queue_latency_microseconds", match) * per_request_ms,
        "total_ms": _delta(before, after, "ts_inference_latency_microseconds", match) * per_request_ms,
    }


SPLITS = {"triton": triton_split, "torchserve": torchserve_split}  # each engine's own metric names
