"""`deploykit validate` holds every served answer to the model's config: outputs present, of their datatype and
shape, and finite. A real Triton serving a model that emits NaN on some inputs must fail it, naming the samples."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from servers import CLASSES, NAME, SAMPLE, portable_options, serving

from deploykit.package.triton_repo import write_triton_model
from deploykit.serve.server import free_ports, make_server
from deploykit.validate import checked_batches, validate_server
from deploykit.validate.checks import ServedTensor, TensorSpec, describe_problems, output_problems

LOGITS = (TensorSpec("logits", "FP32", (-1, CLASSES)),)


class NanOnNegativeMean(torch.nn.Module):
    """The tiny model's contract ([batch, 3, 8, 8] -> logits [batch, 5]), but NaN for a sample whose mean is < 0."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(SAMPLE[0], CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.mean(dim=(2, 3))) + x.mean(dim=(1, 2, 3)).sqrt().unsqueeze(1)


def export_nan_model(path: Path) -> Path:
    with warnings.catch_warnings():  # the TorchScript exporter is deprecated, and the fastest for a tiny net
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            NanOnNegativeMean().eval(), (torch.randn(1, *SAMPLE),), path, input_names=["input"],
            output_names=["logits"], dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, dynamo=False,
            external_data=False,
        )  # fmt: skip
    return path


@pytest.fixture(scope="module")
def nan_triton(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("nan")
    onnx = export_nan_model(tmp / "nan.onnx")
    write_triton_model(tmp / "repo", NAME, onnx, portable_options())
    with serving(make_server("triton", tmp / "repo", ports=free_ports("triton"), log_dir=tmp), onnx) as served:
        yield served


def batch(*rows: list[float], dtype=np.float32) -> np.ndarray:
    return np.array(rows, dtype=dtype)


def test_a_good_answer_has_no_problem():
    assert output_problems([ServedTensor("logits", "FP32", batch([0.0] * 5, [1.0] * 5))], LOGITS, 2) == {}


def test_nan_and_inf_are_named_with_the_output_and_the_samples():
    logits = batch([0.0] * 5, [np.nan] + [0.0] * 4, [0.0] * 5, [np.inf] * 5)
    problems = output_problems([ServedTensor("logits", "FP32", logits)], LOGITS, 4, first=10)
    assert problems == {"output 'logits' holds NaN and infinite values": [11, 13]}
    assert describe_problems(problems) == "output 'logits' holds NaN and infinite values for samples 11, 13"


def test_datatype_shape_and_missing_outputs_break_the_config():
    declared = (*LOGITS, TensorSpec("probs", "FP32", (-1, CLASSES)))
    wrong = [ServedTensor("logits", "FP16", np.zeros((1, CLASSES + 1), np.float16))]
    problems = output_problems(wrong, declared, 1)
    assert problems == {
        "output 'probs' of the model's config is missing from the answer": [0],
        "output 'logits' is FP16 where the config says FP32": [0],
        "output 'logits' has shape [1, 6] where the config says [-1, 5]": [0],
    }
    # the batch must come first, declared or not (TorchServe declares no outputs)
    assert output_problems([ServedTensor("logits", "FP32", np.zeros((3, 5), np.float32))], None, 2) == {
        "output 'logits' has shape [3, 5] where a batch of 2 comes first": [0, 1]
    }


def test_checked_batches_send_each_sample_once_in_order_one_alone_then_fours():
    samples = np.arange(10)[:, None]
    assert [b[:, 0].tolist() for b in checked_batches(samples)] == [[0], [1, 2, 3, 4], [5, 6, 7, 8], [9]]
    assert [len(b) for b in checked_batches(samples[:2])] == [1, 4]  # repeated up to both sizes
    assert sum(len(b) for b in checked_batches(np.zeros((100, 1)))) == 64


def test_a_served_model_that_emits_nan_fails_validation_naming_the_output_and_samples(nan_triton, tmp_path):
    samples = np.random.default_rng(0).standard_normal((16, *SAMPLE)).astype(np.float32)
    nan_rows = np.flatnonzero(samples.mean(axis=(1, 2, 3)) < 0).tolist()
    assert 0 < len(nan_rows) < 16  # some answers good, some NaN: the check must say which
    result = validate_server(
        nan_triton.http_url, nan_triton.model, out_dir=tmp_path, samples=samples, model_path=nan_triton.onnx,
        grpc_url=nan_triton.grpc_url, duration_s=0,
    )  # fmt: skip
    checks = {c["name"]: c for c in result["checks"]}
    said = f"16 samples in 5 requests: output 'logits' holds NaN for samples {', '.join(map(str, nan_rows[:8]))}"
    for protocol in ("http", "grpc"):
        check = checks[f"outputs valid ({protocol})"]
        assert check["status"] == "fail" and check["detail"].startswith(said), check
        # offline ONNX Runtime emits the same NaN: parity alone would not say what is wrong; this check does
        parity = checks[f"outputs equal offline ({protocol})"]
        assert parity["status"] == "fail" and "output 'logits' holds NaN for sample" in parity["detail"], parity
    assert checks["still serving afterwards"]["status"] == "pass"  # zeros: mean 0, finite
    assert not result["passed"]
