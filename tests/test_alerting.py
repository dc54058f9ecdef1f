"""The SLO alert rules `--monitoring` writes: valid for promtool, right on synthetic series, and firing on a real
Prometheus scraping a real Triton."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import yaml
from servers import NAME, SAMPLE, triton_with_tiny

from deploykit.loadtest.slo import custom_slo
from deploykit.package.monitoring import AlertSettings, error_ratio, grafana_dashboard, write_monitoring
from deploykit.serve.oip import OipClient
from deploykit.serve.process import ServerProcess, free_ports_on

P95 = "TritonP95LatencyAboveSLO"
ERRORS = "TritonErrorRatioAboveSLO"
QUEUE = "TritonQueueTimeGrowing"
NOT_LOADED = "TritonModelNotLoaded"


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not on PATH: `make setup` installs Debian's prometheus package when run as root")
    return path


def promtool(*args: str | Path) -> str:
    done = subprocess.run([tool("promtool"), *map(str, args)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout + done.stderr


def test_written_rules_and_config_pass_promtool(tmp_path):
    dashboard, rules, config = write_monitoring(tmp_path, ["127.0.0.1:8002"], models=[NAME])
    assert "SUCCESS: 5 rules found" in promtool("check", "rules", rules)
    assert "SUCCESS: 1 rule files found" in promtool("check", "config", config)  # it loads the rules file too
    written = yaml.safe_load(rules.read_text())["groups"][0]["rules"]
    assert {r["alert"] for r in written} == {P95, ERRORS, QUEUE, NOT_LOADED, "TritonDown"}
    assert all(r["for"] == "5m" and r["labels"]["severity"] in ("warning", "critical") for r in written)
    assert "10 ms target of the image_classification SLO" in written[0]["annotations"]["summary"]
    assert json.loads(dashboard.read_text())["panels"]


def test_production_rules_fire_only_on_a_lasting_breach(tmp_path):
    """promtool's rule unit tests on synthetic series, one sample a minute, production settings (5m window and for)."""
    write_monitoring(tmp_path, ["127.0.0.1:8002"], models=["slow", "gone"])
    series = {  # "slow": P95 20 ms and 5% failures; "ok": P95 2 ms and 0.5% failures; "gone" never loaded
        'nv_inference_request_summary_us{model="slow",version="1",quantile="0.95"}': "20000x15",
        'nv_inference_request_summary_us{model="ok",version="1",quantile="0.95"}': "2000x15",
        'nv_inference_request_success{model="slow",version="1"}': "0+950x15",
        'nv_inference_request_failure{model="slow",version="1",reason="BACKEND"}': "0+50x15",
        'nv_inference_request_success{model="ok",version="1"}': "0+995x15",
        'nv_inference_request_failure{model="ok",version="1",reason="BACKEND"}': "0+5x15",
    }

    def fired(name: str, minutes: int, models: list[str]) -> dict:
        alerts = [{"exp_labels": {"severity": "warning" if name == P95 else "critical", "model": m}} for m in models]
        return {"eval_time": f"{minutes}m", "alertname": name, "exp_alerts": alerts}

    spec = {
        "rule_files": ["alert-rules.yml"],
        "evaluation_interval": "1m",
        "tests": [{
            "interval": "1m",
            "input_series": [{"series": s, "values": v} for s, v in series.items()],
            "alert_rule_test": [
                fired(P95, 3, []),  # breached, but for less than the 5m `for:`
                fired(P95, 10, ["slow"]),
                fired(ERRORS, 10, ["slow"]),  # 5% > 1%; "ok"'s 0.5% stays quiet
                fired(NOT_LOADED, 10, ["gone"]),
            ],
        }],
    }  # fmt: skip
    # promtool compares annotations too: the labels are what this test is about, so they are left out of the rules.
    rules = yaml.safe_load((tmp_path / "alert-rules.yml").read_text())
    for rule in rules["groups"][0]["rules"]:
        rule.pop("annotations")
    (tmp_path / "alert-rules.yml").write_text(yaml.safe_dump(rules))
    (tmp_path / "rules-test.yml").write_text(yaml.safe_dump(spec, sort_keys=False))
    assert "SUCCESS" in promtool("test", "rules", tmp_path / "rules-test.yml")


def api_data(api: str, path: str, **params: str) -> dict:
    """The `data` of a Prometheus HTTP API answer (alerts, rules, query)."""
    url = f"{api}/{path}" + (f"?{urllib.parse.urlencode(params)}" if params else "")
    with urllib.request.urlopen(url, timeout=10) as r:
        body = json.load(r)
    assert body["status"] == "success", body
    return body["data"]


def query(api: str, expr: str) -> list:
    return api_data(api, "query", query=expr)["result"]


def alert_states(api: str) -> dict[tuple[str, str | None], str]:
    """(alert name, model) -> "pending" or "firing" for every active alert."""
    return {(a["labels"]["alertname"], a["labels"].get("model")): a["state"] for a in api_data(api, "alerts")["alerts"]}


def wait_firing(api: str, wanted: set[str], timeout: float, between=lambda: time.sleep(0.5)) -> dict[str, float]:
    """Seconds until each alert in `wanted` (for the tiny model) fired, calling `between` while waiting."""
    start, seen = time.monotonic(), {}
    while set(seen) != wanted:
        states = alert_states(api)
        seen |= {n: time.monotonic() - start for n in wanted - set(seen) if states.get((n, NAME)) == "firing"}
        assert time.monotonic() - start < timeout, f"not firing after {timeout:g} s: {wanted - set(seen)}; {states}"
        between()
    return seen


def send_load(client: OipClient, seconds: float) -> None:
    x, end = np.zeros((1, *SAMPLE), np.float32), time.monotonic() + seconds
    while time.monotonic() < end:
        client.infer(x)


def start_prometheus(config: Path, storage: Path, port: int) -> ServerProcess:
    argv = [
        tool("prometheus"),
        f"--config.file={config}",
        f"--storage.tsdb.path={storage}",
        "--storage.tsdb.retention.time=1h",
        f"--web.listen-address=127.0.0.1:{port}",
    ]
    return ServerProcess(argv, storage.parent / "prometheus.log")


@pytest.mark.slow
@pytest.mark.side
def test_real_prometheus_fires_the_slo_alerts_on_a_real_triton(tmp_path):
    tool("prometheus")
    with triton_with_tiny(tmp_path) as served:
        target = urllib.parse.urlsplit(served.metrics_url).netloc
        short = AlertSettings(window="10s", pending_for="2s")
        tight = custom_slo("image_classification", max_latency_ms=0.001)  # any real request breaches it
        _, _, config = write_monitoring(tmp_path / "mon", [target], tight, [NAME], short, interval_s=1)
        port = free_ports_on(1)[0]
        api = f"http://127.0.0.1:{port}/api/v1"
        prometheus = start_prometheus(config, tmp_path / "tsdb", port)
        try:
            prometheus.wait_http(f"http://127.0.0.1:{port}/-/ready", timeout=30, what="Prometheus")
            client = OipClient(served.http_url, NAME)
            took = wait_firing(api, {P95, QUEUE}, timeout=60, between=lambda: send_load(client, 0.5))
            print(f"\nfired after (s, from the first request): {took}; {prometheus_version()}")
            [p95] = [a for a in api_data(api, "alerts")["alerts"] if a["labels"]["alertname"] == P95]
            assert "above the 0.001 ms P95 target of the image_classification SLO" in p95["annotations"]["description"]

            for panel in grafana_dashboard()["panels"]:  # every panel shows data on a real scrape
                for t in panel["targets"]:
                    expr = t["expr"].replace("$__rate_interval", "30s")
                    assert query(api, expr), f"{panel['title']}: no series for {expr}"
            [ratio] = query(api, error_ratio(short.window))
            assert float(ratio["value"][1]) == 0.0  # a healthy server: the error rule has data, and stays quiet
            assert not {k for k in alert_states(api) if k[0] in (ERRORS, NOT_LOADED, "TritonDown")}
            groups = api_data(api, "rules")["groups"]
            assert all(rule["health"] == "ok" for group in groups for rule in group["rules"]), groups

            served.server.control.unload(NAME)  # Triton drops the model's series: "not loaded" must fire
            gone = wait_firing(api, {NOT_LOADED}, timeout=30)
            print(f"not-loaded alert fired {gone[NOT_LOADED]:.1f} s after the unload")
        finally:
            prometheus.stop()


def prometheus_version() -> str:
    return subprocess.run([tool("prometheus"), "--version"], capture_output=True, text=True).stdout.splitlines()[0]
