"""The three examples users copy (examples/*/pipeline.yaml), run small: a user CNN on user arrays, a user U-Net judged
by mIoU, and an ONNX file made elsewhere. Each goes all the way to a real Triton and the report."""

from __future__ import annotations

import json
import runpy
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from conftest import REPO

from deploykit.pipeline.engine import run_pipeline
from deploykit.pipeline.loader import parse_pipeline

EXAMPLES = REPO / "examples"
# The examples' own settings measure carefully; a test needs the chain to run, not stable numbers.
QUICK_BENCH = {"batch_sizes": [1], "window_s": 0.1, "repeats": 1, "max_windows": 5, "isolate": False}
QUICK_QUANTIZE = {"calibrate_method": "minmax", "latency_rounds": 1, "latency_window_s": 0.1}
QUICK_DEPLOY = {"users": [1], "duration_s": 2}


def run_example(name: str, tmp_path: Path, change: dict[str, Any]) -> dict[str, Any]:
    """The example's pipeline with `change` applied (per top-level key, or per stage under 'stages'), run into
    tmp_path; its relative paths still start at the example's folder."""
    folder = EXAMPLES / name
    raw = yaml.safe_load((folder / "pipeline.yaml").read_text())
    for stage in raw["stages"]:
        stage.update(change.get("stages", {}).get(stage["stage"], {}))
    raw.update({k: v for k, v in change.items() if k != "stages"}, runs_dir=str(tmp_path / "runs"))
    cfg = parse_pipeline(raw, str(folder / "pipeline.yaml"), base_dir=folder)
    outcomes = run_pipeline(cfg)
    return {o.name: o for o in outcomes}


def served_well(deploy: Any) -> None:
    """The deploy stage served the model on Triton and every check passed (warnings are Triton's 500s)."""
    assert deploy.metrics["passed"] is True, deploy.metrics.get("checks_failed")
    validation = json.loads((deploy.directory / "validation" / "validation.json").read_text())
    names = {c["name"]: c["status"] for c in validation["checks"]}
    assert names["outputs equal offline (http)"] == names["outputs equal offline (grpc)"] == "pass"


@pytest.mark.side
@pytest.mark.slow
def test_custom_cnn_on_user_arrays(tmp_path):
    data = runpy.run_path(str(EXAMPLES / "custom-cnn" / "make_data.py"))["make"](tmp_path / "data.npz")
    stages = {
        "train": {"epochs": 4},
        "prune": {"finetune": {"epochs": 1, "optimizer": {"name": "adamw", "lr": 0.001}}, "latency_runs": 5},
        "quantize": QUICK_QUANTIZE,
        "benchmark": QUICK_BENCH,
        "deploy": QUICK_DEPLOY,
    }
    raw_data = yaml.safe_load((EXAMPLES / "custom-cnn" / "pipeline.yaml").read_text())["data"]
    runs = run_example("custom-cnn", tmp_path, {"stages": stages, "data": {**raw_data, "root": str(data)}})
    assert runs["train"].metrics["val_acc"] > 0.4  # 10 classes: chance is 0.1
    prune = runs["prune"].metrics
    assert prune["macs_after"] <= 0.65 * prune["macs_before"]
    arch = json.loads((runs["prune"].directory / "model.json").read_text())
    assert arch["factory"].endswith("custom-cnn/model.py:build") and arch["layers"]  # rebuilt, never unpickled
    assert runs["quantize"].metrics["int8_accuracy"] > 0.3
    served_well(runs["deploy"])
    readme = next((runs["deploy"].directory / "model_repo").glob("*/README.md")).read_text()
    assert "train-split mean/std" in readme and "float32 [N, 3, 16, 16]" in readme
    report = (runs["report"].directory / "report.md").read_text()
    assert "Model: model.py:build." in report and "Preprocessing, normalization: train-split mean/std." in report


@pytest.mark.side
@pytest.mark.slow
def test_segmentation_unet_judged_by_miou(tmp_path):
    stages = {
        "train": {"epochs": 4},
        "quantize": QUICK_QUANTIZE,
        "benchmark": QUICK_BENCH,
        "deploy": QUICK_DEPLOY,
    }
    raw_data = yaml.safe_load((EXAMPLES / "segmentation" / "pipeline.yaml").read_text())["data"]
    data = {**raw_data, "kwargs": {"samples": 300, "size": 32}}
    runs = run_example("segmentation", tmp_path, {"stages": stages, "data": data})
    miou = runs["train"].metrics["val_acc"]
    assert miou > 0.5, miou  # all background scores about 0.3
    quantize = runs["quantize"].metrics
    within = quantize["accuracy_drop"] <= 2.0
    assert within or quantize["deployable"] == "export/onnx"  # INT8 is served only within the mIoU budget
    served_well(runs["deploy"])
    validation = json.loads((runs["deploy"].directory / "validation" / "validation.json").read_text())
    assert {c["name"]: c["status"] for c in validation["checks"]}["SLO semantic_segmentation"] in ("pass", "fail")
    report = (runs["report"].directory / "report.md").read_text()
    assert "mIoU (%)" in report and "Metric: mIoU (higher is better)." in report
    config = next((runs["deploy"].directory / "model_repo").glob("*/config.pbtxt")).read_text()
    assert 'name: "logits", data_type: TYPE_FP32, dims: [ 3, 32, 32 ]' in config  # per-pixel class scores


@pytest.mark.openvino
@pytest.mark.slow
def test_an_onnx_file_made_elsewhere_is_quantized_converted_and_served(tmp_path):
    onnx_file, data = runpy.run_path(str(EXAMPLES / "onnx-in" / "make_model.py"))["make"](tmp_path, epochs=6)
    raw = yaml.safe_load((EXAMPLES / "onnx-in" / "pipeline.yaml").read_text())
    change = {
        "model": {**raw["model"], "onnx": str(onnx_file)},
        "data": {**raw["data"], "root": str(data)},
        "stages": {"quantize": QUICK_QUANTIZE, "benchmark": QUICK_BENCH, "deploy": QUICK_DEPLOY},
    }
    runs = run_example("onnx-in", tmp_path, change)
    source = runs["source"].metrics
    assert source["import"]["layout"] == "NHWC" and source["import"]["original_input"] == "images"
    assert source["import"]["batch"] == "dynamic" and source["import"]["opset_before"] == 13
    assert source["val_acc"] > 0.8
    assert abs(runs["quantize"].metrics["accuracy_drop"]) <= 1.0
    assert runs["openvino"].metrics["int8_accuracy"] > 0.8
    bench = json.loads((runs["benchmark"].directory / "benchmark.json").read_text())
    assert {r["role"] for r in bench["results"]} >= {"onnx", "onnx_int8", "openvino", "openvino_int8"}
    served_well(runs["deploy"])
    samples = np.load(data)["x_val"][:2]
    assert samples.shape == (2, 16, 16, 1)  # the file's own layout; the served model takes NCHW "input"
