"""torch -> ONNX export, parity checks, reproduce scripts, the export stage, and the TensorRT guard."""

import copy
import importlib.util
import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from deploykit.errors import DeploykitError
from deploykit.export import build_engine, check_parity, export_onnx
from deploykit.pipeline.engine import run_pipeline
from deploykit.pipeline.loader import parse_pipeline
from deploykit.runtime import Session, ort_session, torch_session
from deploykit.zoo import get_model

TRT_MISSING = (
    "TensorRT is not installed: install the `gpu` extra (pip install 'deploykit[gpu]') "
    "on a machine with an NVIDIA GPU and CUDA."
)
SHAPE = (1, 16, 16)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    torch.manual_seed(0)
    model = get_model("resnet18", 10, 1, stem="cifar", width_mult=0.25).eval()
    path = export_onnx(model, SHAPE, tmp_path_factory.mktemp("export") / "model.onnx")
    return model, path


def batches(*sizes, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((n, *SHAPE)).astype(np.float32) for n in sizes]


def test_export_is_one_checked_file_with_a_dynamic_batch(exported):
    _, path = exported
    onnx.checker.check_model(str(path), full_check=True)
    graph = onnx.load(str(path)).graph
    assert [i.name for i in graph.input] == ["input"] and [o.name for o in graph.output] == ["logits"]
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param  # symbolic batch
    assert sorted(p.name for p in path.parent.iterdir()) == ["model.onnx"]  # no .data, no temp leftovers
    session = ort_session(path)
    assert [session.run(x).shape for x in batches(1, 5)] == [(1, 10), (5, 10)]


def test_parity_passes_at_1_7_32(exported):
    model, path = exported
    result = check_parity(torch_session(model), ort_session(path), batches(1, 7, 32))
    assert result["passed"] and result["kind"] == "fp32"
    assert result["batches"] == [1, 7, 32] and result["samples"] == 40
    assert all(b["max_abs_diff"] <= 1e-4 * b["scale"] for b in result["per_batch"])
    assert result["max_abs_diff"] <= result["tolerance"] == pytest.approx(1e-4 * result["scale"])
    assert result["top1_agreement"] == 1.0


def test_parity_fails_for_a_perturbed_model(exported):
    model, path = exported
    perturbed = copy.deepcopy(model)
    with torch.no_grad():
        perturbed.fc.weight.add_(0.05 * torch.randn_like(perturbed.fc.weight))
    result = check_parity(torch_session(perturbed), ort_session(path), batches(1, 7))
    assert not result["passed"] and result["max_abs_diff"] > result["tolerance"] > 0


class Table(Session):
    """Logits looked up by sample index, which the test stores in pixel [0, 0, 0]."""

    def __init__(self, logits, name):
        self.logits, self.name, self.precision, self.path = np.asarray(logits, np.float32), name, "fp32", None

    def run(self, x):
        return self.logits[x[:, 0, 0, 0].astype(int)]


def test_int8_agreement_on_hand_made_logits():
    reference = np.eye(10, 4, dtype=np.float32) * 5  # samples 0-3 -> classes 0-3, 4-9 -> class 0 (all-zero rows)
    reference[4:, 2] = 1.0  # samples 4-9 -> class 2
    candidate = reference.copy()
    candidate[[1, 6], 3] = 9.0  # samples 1 and 6 now predict class 3: 8 of 10 agree
    index = np.arange(10, dtype=np.float32).reshape(10, 1, 1, 1)
    ref, cand = Table(reference, "ref"), Table(candidate, "cand")
    result = check_parity(ref, cand, [index[:3], index[3:]], "int8", min_agreement=0.8)
    assert result["top1_agreement"] == pytest.approx(0.8) and result["passed"] and result["samples"] == 10
    assert not check_parity(ref, cand, [index], "int8", min_agreement=0.81)["passed"]
    assert check_parity(ref, cand, [index], "fp32")["max_abs_diff"] == pytest.approx(9.0)
    with pytest.raises(ValueError):
        check_parity(ref, cand, [index], "fp8")


class DataDependent(nn.Module):
    """Python control flow on a tensor's value: torch.export cannot trace it."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)

    def forward(self, x):
        y = self.conv(x).mean(dim=(2, 3))
        return y if y.sum() > 0 else -y


def test_unexportable_model_is_a_clear_error(tmp_path):
    with pytest.raises(DeploykitError, match=r"Exporting DataDependent to ONNX failed \(.*data-dependent.*\): replace"):
        export_onnx(DataDependent().eval(), (1, 8, 8), tmp_path / "bad.onnx")
    assert list(tmp_path.iterdir()) == []  # nothing half-written
    with pytest.raises(DeploykitError, match="opset 17 is too old"):
        export_onnx(DataDependent().eval(), (1, 8, 8), tmp_path / "bad.onnx", opset=17)


def test_huge_model_weights_go_to_a_data_file(tmp_path, monkeypatch):
    import deploykit.export.torch2onnx as torch2onnx

    monkeypatch.setattr(torch2onnx, "_SINGLE_FILE_MAX_BYTES", 0)  # as if the model were over 2 GB
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)).eval()
    path = export_onnx(model, (1, 8, 8), tmp_path / "big.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.onnx", "big.onnx.data"]
    x = np.random.default_rng(0).standard_normal((3, 1, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(ort_session(path).run(x), torch_session(model).run(x), atol=1e-5)


def pipeline(stages, name="exp", **data):
    return parse_pipeline(
        {
            "name": name,
            "data": {"dataset": "digits", "image_size": 16, "channels": 1, **data},
            "model": {"name": "resnet18", "options": {"stem": "cifar", "width_mult": 0.25}},
            "stages": stages,
        }
    )


@pytest.mark.side  # ~20 s: `make test` runs it in the second process
def test_export_stage_in_a_pipeline_and_its_reproduce_script(in_tmp):
    stages = [
        {"stage": "train", "epochs": 1, "batch_size": 128, "threads": 1},
        {"stage": "export", "max_batch": 16, "parity_batch_sizes": [1, 7]},
    ]
    outcomes = run_pipeline(pipeline(stages))
    assert [o.status for o in outcomes] == ["ran", "ran"]
    out = in_tmp / "runs/exp/export"
    parity = json.loads((out / "parity.json").read_text())
    assert parity["passed"] and parity["batches"] == [1, 7, 16]
    meta = json.loads((out / "meta.json").read_text())
    assert set(meta["artifacts"]) == {"onnx", "reproduce", "parity"}
    assert meta["metrics"]["opset"] >= 18 and meta["metrics"]["onnx_bytes"] == (out / "model.onnx").stat().st_size
    assert (out / "source/model.pt").is_file() and (out / "source/model.json").is_file()

    # The script rebuilds the model from source/ alone and exports an equivalent file.
    again = in_tmp / "again.onnx"
    script = out / "reproduce_export.py"
    subprocess.run([sys.executable, str(script), str(again)], check=True, capture_output=True, timeout=300)
    x = batches(3)[0]
    np.testing.assert_allclose(ort_session(again).run(x), ort_session(out / "model.onnx").run(x), atol=1e-5, rtol=0)

    # An impossible tolerance makes parity fail: a clear error with the numbers, and the last good folder stays.
    before = (out / "meta.json").read_text()
    stages[1]["rtol_scale"] = 1e-12
    with pytest.raises(DeploykitError, match=r"does not match PyTorch: max \|logit difference\| .* exceeds"):
        run_pipeline(pipeline(stages))
    assert (out / "meta.json").read_text() == before


def test_tensorrt_stage_fails_first_and_leaves_no_folder(in_tmp, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # as on a machine without TensorRT
    stages = [{"stage": "tensorrt", "precisions": ["fp16", "int8"]}]
    cfg = pipeline(stages, name="trt", dataset="synthetic", num_samples=20)
    with pytest.raises(DeploykitError) as err:  # TensorRT is reported before the missing 'onnx' artifact
        run_pipeline(cfg)
    assert str(err.value) == TRT_MISSING
    run_dir = in_tmp / "runs/trt"
    assert not (run_dir / "tensorrt").exists() and not list(run_dir.glob(".tmp-*"))


def test_build_engine_without_tensorrt(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(DeploykitError) as err:  # checked before the (missing) ONNX file is even looked at
        build_engine(
            tmp_path / "none.onnx", tmp_path / "m.plan", precision="fp16",
            min_batch=1, opt_batch=4, max_batch=8, input_shape=SHAPE,
        )
    assert str(err.value) == TRT_MISSING
    assert list(tmp_path.iterdir()) == []


def test_tensorrt_config_is_validated():
    with pytest.raises(DeploykitError, match="min_batch <= opt_batch <= max_batch"):
        pipeline([{"stage": "tensorrt", "min_batch": 8, "opt_batch": 4}])
    with pytest.raises(DeploykitError, match="precisions"):
        pipeline([{"stage": "tensorrt", "precisions": ["fp8"]}])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="TensorRT needs an NVIDIA GPU and none is visible")
@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is None, reason="TensorRT is not installed on this machine")
def test_build_and_run_fp16_engine(exported, tmp_path):
    from deploykit.runtime import trt_session

    model, path = exported
    plan = tmp_path / "model.fp16.plan"
    meta = build_engine(
        path, plan, precision="fp16", min_batch=1, opt_batch=4, max_batch=8, input_shape=SHAPE, workspace_mb=256
    )
    assert meta["precision"] == "fp16" and meta["profile"]["max"] == [8, *SHAPE]
    assert (tmp_path / "model.fp16.json").is_file() and (tmp_path / "timing.cache").is_file()
    session = trt_session(plan)
    result = check_parity(ort_session(path), session, batches(1, 8), rtol_scale=1e-2)
    assert session.name == "trt-fp16" and result["passed"], result


def test_tensorrt_takes_only_symmetric_signed_qdq(tmp_path):
    """ORT's default u8 activations are asymmetric; TensorRT's explicit quantization needs s8 with zero point 0."""
    import numpy as np
    import torch

    from deploykit.compress.quantize import quantize_static_qdq
    from deploykit.export.torch2onnx import export_onnx
    from deploykit.stages.tensorrt import _symmetric_int8
    from deploykit.zoo import get_model

    torch.manual_seed(0)
    fp32 = export_onnx(get_model("resnet18", 10, 1, stem="cifar", width_mult=0.25).eval(), (1, 16, 16), tmp_path / "m.onnx")
    batches = [np.random.default_rng(0).standard_normal((4, 1, 16, 16)).astype(np.float32)]
    u8 = quantize_static_qdq(fp32, tmp_path / "u8.onnx", batches, activation_type="uint8")
    s8 = quantize_static_qdq(fp32, tmp_path / "s8.onnx", batches, activation_type="int8")
    assert not _symmetric_int8(u8)
    assert _symmetric_int8(s8)
