"""Sessions over torch and ONNX Runtime, artifact dispatch, accuracy, and the TensorRT guard."""

import sys
import types

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from deploykit.data import build_datasets
from deploykit.data.config import DataConfig
from deploykit.errors import DeploykitError
from deploykit.export import export_onnx
from deploykit.runtime import (
    evaluate_accuracy,
    open_artifact,
    ort_session,
    require_tensorrt,
    torch_session,
    trt_session,
)
from deploykit.train import save_model
from deploykit.zoo import get_model

TRT_MISSING = (
    "TensorRT is not installed: install the `gpu` extra (pip install 'deploykit[gpu]') "
    "on a machine with an NVIDIA GPU and CUDA."
)
NO_GPU = (
    "TensorRT needs an NVIDIA GPU and none is visible (torch.cuda.is_available() is False): "
    "run this stage on a GPU machine."
)


pytestmark = pytest.mark.usefixtures("one_thread")


class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.head = nn.Linear(4, 3)
        self.threads_seen: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.threads_seen.append(torch.get_num_threads())
        return self.head(torch.relu(self.conv(x)).mean(dim=(2, 3)))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    torch.manual_seed(0)
    model = TinyNet().eval()
    path = export_onnx(model, (1, 8, 8), tmp_path_factory.mktemp("tiny") / "tiny.onnx")
    return model, path


def test_torch_and_ort_agree(tiny):
    model, path = tiny
    x = np.random.default_rng(0).standard_normal((5, 1, 8, 8)).astype(np.float32)
    t, o = torch_session(model), ort_session(path)
    assert (t.name, t.precision, o.name, o.precision) == ("torch-fp32", "fp32", "ort-fp32", "fp32")
    assert o.path == path
    a, b = t.run(x), o.run(x)
    assert a.shape == b.shape == (5, 3) and a.dtype == b.dtype == np.float32
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)


def test_threads_are_honoured(tiny):
    model, path = tiny
    options = ort_session(path, threads=1).session.get_session_options()
    assert options.intra_op_num_threads == 1 and options.inter_op_num_threads == 1
    assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    assert options.execution_mode == ort.ExecutionMode.ORT_SEQUENTIAL
    model.threads_seen.clear()
    torch_session(model, threads=2).run(np.zeros((1, 1, 8, 8), np.float32))
    assert model.threads_seen == [2] and torch.get_num_threads() == 1  # set for the call, then restored


def test_open_artifact_dispatch(tiny, tmp_path):
    _, path = tiny
    assert open_artifact(path).name == "ort-fp32"
    zoo = get_model("resnet18", 10, 1, stem="cifar", width_mult=0.25)
    arch = {"name": "resnet18", "num_classes": 10, "in_channels": 1, "options": {"stem": "cifar", "width_mult": 0.25}}
    save_model(zoo, arch, tmp_path)
    session = open_artifact(tmp_path, threads=1)
    assert session.name == "torch-fp32" and session.path == tmp_path
    x = np.random.default_rng(1).standard_normal((2, 1, 16, 16)).astype(np.float32)
    np.testing.assert_allclose(session.run(x), torch_session(zoo.eval()).run(x), atol=1e-6)
    with pytest.raises(DeploykitError, match=r"Cannot open .*weights\.bin as a model"):
        open_artifact(tmp_path / "weights.bin")


def test_open_artifact_engine_needs_tensorrt(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # as on a machine without TensorRT
    (tmp_path / "model.fp16.plan").write_bytes(b"not an engine")
    with pytest.raises(DeploykitError) as err:
        open_artifact(tmp_path / "model.fp16.plan")
    assert str(err.value) == TRT_MISSING


def test_evaluate_accuracy_matches_a_hand_count():
    bundle = build_datasets(DataConfig(dataset="synthetic", image_size=8, num_samples=40, num_classes=3, channels=1))
    torch.manual_seed(1)
    model = TinyNet().eval()
    samples = [bundle.val.item(k, augment=False) for k in range(len(bundle.val))]
    with torch.no_grad():
        hand = [int(model(x[None]).argmax()) == y for x, y in samples]
    session = torch_session(model)
    assert evaluate_accuracy(session, bundle.val, batch_size=3) == pytest.approx(sum(hand) / len(hand))
    assert evaluate_accuracy(session, bundle.val, batch_size=2, limit=4) == pytest.approx(sum(hand[:4]) / 4)
    # Any (x, y) dataset works; labels chosen so that exactly 2 of 4 are right.
    x = torch.randn(4, 1, 8, 8)
    predicted = model(x).argmax(1)
    labels = torch.stack([predicted[0], predicted[1], (predicted[2] + 1) % 3, (predicted[3] + 1) % 3])
    assert evaluate_accuracy(session, TensorDataset(x, labels)) == 0.5


def test_ort_session_on_missing_or_corrupt_file(tmp_path):
    with pytest.raises(DeploykitError, match=r"The ONNX model .*nope\.onnx does not exist"):
        ort_session(tmp_path / "nope.onnx")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x00garbage, not a protobuf")
    with pytest.raises(DeploykitError, match=r"ONNX Runtime could not load .*bad\.onnx"):
        ort_session(bad)
    with pytest.raises(DeploykitError, match="use 'cpu' or 'cuda'"):
        ort_session(bad, device="tpu")


@pytest.mark.skipif("CUDAExecutionProvider" in ort.get_available_providers(), reason="ONNX Runtime has CUDA here")
def test_ort_cuda_without_cuda_is_a_clear_error(tiny):
    with pytest.raises(DeploykitError, match="no CUDA execution provider"):
        ort_session(tiny[1], device="cuda")


def test_require_tensorrt_messages(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    for call in (require_tensorrt, lambda: trt_session(tmp_path / "missing.plan")):
        with pytest.raises(DeploykitError) as err:
            call()
        assert str(err.value) == TRT_MISSING
    # TensorRT importable but no GPU visible.
    monkeypatch.setitem(sys.modules, "tensorrt", types.ModuleType("tensorrt"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(DeploykitError) as err:
        trt_session(tmp_path / "missing.plan")
    assert str(err.value) == NO_GPU
