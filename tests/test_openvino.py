"""OpenVINO: the session against ONNX Runtime, the onnx2openvino stage (FP32 IR + NNCF INT8) and its benchmark rows."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("openvino", reason="OpenVINO is not installed (the openvino extra)")

from servers import export_tiny  # noqa: E402

from deploykit.errors import DeploykitError  # noqa: E402
from deploykit.pipeline.engine import run_pipeline  # noqa: E402
from deploykit.runtime import open_artifact, ort_session, ov_session  # noqa: E402

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.openvino]


def test_openvino_session_matches_onnxruntime_on_the_same_file(tmp_path):
    path = export_tiny(tmp_path / "tiny.onnx")
    x = np.random.default_rng(0).standard_normal((7, 3, 8, 8)).astype(np.float32)
    ov, ort = ov_session(path, threads=1), ort_session(path, threads=1)
    assert (ov.name, ov.precision) == ("ov-fp32", "fp32")
    assert ov.run(x[:1]).shape == (1, 5) and ov.run(x).shape == (7, 5)  # the dynamic batch survives
    assert np.abs(ov.run(x) - ort.run(x)).max() <= 1e-4 * np.abs(ort.run(x)).max()
    assert open_artifact(path, threads=1, runtime="openvino").name == "ov-fp32"


def test_openvino_refuses_a_broken_file_in_one_sentence(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    with pytest.raises(DeploykitError, match="OpenVINO could not read .*bad.onnx"):
        ov_session(bad)
    with pytest.raises(DeploykitError, match="does not exist"):
        ov_session(tmp_path / "missing.xml")


@pytest.fixture(scope="module")
def ov_run(tmp_path_factory):
    """train -> export -> openvino -> benchmark, run as a user runs it: `deploykit optimize` in its own process.

    Its own process also keeps OpenVINO's and NNCF's native state out of the test process: with it inside, a
    later test's Triton start-up crashed the interpreter (only after the whole suite before it, never alone).
    """
    runs = tmp_path_factory.mktemp("runs")
    pipeline = {
        "name": "ov",
        "runs_dir": str(runs),
        "data": {"dataset": "digits", "image_size": 8},
        "model": {"name": "resnet18", "options": {"stem": "cifar", "width_mult": 0.25}},
        "stages": [
            {"stage": "train", "epochs": 2, "batch_size": 32, "threads": 1},
            {"stage": "export", "parity_batch_sizes": [1], "max_batch": 4},
            {"stage": "openvino", "calibration_samples": 64, "threads": 1},
            {"stage": "benchmark", "batch_sizes": [1], "warmup": 2, "window_s": 0.02, "max_windows": 4,
             "isolate": False, "threads": 1},
        ],
    }  # fmt: skip
    config = runs / "ov.yaml"
    config.write_text(json.dumps(pipeline))  # JSON is YAML
    argv = [sys.executable, "-m", "deploykit", "optimize", "-c", str(config), "--quiet"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    run = runs / "ov"
    metas = [json.loads(p.read_text()) for p in sorted(run.glob("*/meta.json"))]
    return run, {m["stage"]: m["metrics"] for m in metas}


def test_openvino_stage_writes_checked_fp32_and_int8_ir(ov_run):
    run, metrics = ov_run
    meta = json.loads((run / "openvino/meta.json").read_text())
    assert set(meta["artifacts"]) == {"openvino", "openvino_weights", "openvino_int8", "openvino_int8_weights", "reproduce"}
    m = metrics["openvino"]
    assert m["fp32_parity"]["passed"] and m["fp32_accuracy"] == pytest.approx(m["reference_accuracy"], abs=0.002)
    assert m["reference_accuracy"] > 0.5  # trained: the accuracy bound below means something
    assert m["int8_method"] == "accuracy_control" and m["int8_accuracy_drop"] <= 1.0
    models = meta["models"]
    assert models["openvino_int8"]["bytes"] < 0.5 * models["openvino"]["bytes"]  # INT8 weights
    assert models["openvino"]["params"] == json.loads((run / "export/meta.json").read_text())["models"]["onnx"]["params"]
    assert open_artifact(run / "openvino/model.int8.xml", threads=1).precision == "int8"


def test_openvino_reproduce_script_rebuilds_the_fp32_ir(ov_run, tmp_path):
    run, _ = ov_run
    out = tmp_path / "again.xml"
    subprocess.run([sys.executable, str(run / "openvino/reproduce_openvino.py"), str(out)], check=True, timeout=120)
    x = np.random.default_rng(1).standard_normal((3, 1, 8, 8)).astype(np.float32)
    assert np.array_equal(ov_session(out, 1).run(x), ov_session(run / "openvino/model.xml", 1).run(x))


def test_benchmark_measures_the_ir_files_beside_onnx(ov_run):
    run, _ = ov_run
    rows = json.loads((run / "benchmark/benchmark.json").read_text())["results"]
    by_artifact = {r["artifact"]: r for r in rows}
    assert {"openvino (openvino fp32)", "openvino (openvino int8)", "export (onnx fp32)"} <= set(by_artifact)
    assert by_artifact["openvino (openvino int8)"]["runtime"] == "ov-int8" and by_artifact["openvino (openvino int8)"]["p50_ms"] > 0


def test_openvino_stage_needs_an_onnx_model(tmp_path):
    from test_bench import tiny_pipeline

    with pytest.raises(DeploykitError, match="needs a 'onnx' artifact"):
        run_pipeline(tiny_pipeline(tmp_path, [{"stage": "openvino"}]))
