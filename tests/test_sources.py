"""Model sources (zoo, factory, ONNX), the task (metric and loss) and their cache keys: existing pipelines keep their
stage keys, a user's file enters by its hash, and every bad input is one sentence before any work."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import REPO

from deploykit.errors import DeploykitError
from deploykit.pipeline.engine import _stage_key, run_pipeline
from deploykit.pipeline.loader import json_schema, load_pipeline

MODEL = """\
import torch
from torch import nn


class Tiny(nn.Module):
    def __init__(self, classes: int = 3, width: int = 4):
        super().__init__()
        self.conv = nn.Conv2d(1, width, 3, padding=1, groups=1)
        self.norm = nn.GroupNorm(1, width)
        self.head = nn.Linear(width, classes)

    def forward(self, x):
        return self.head(torch.nn.functional.gelu(self.norm(self.conv(x))).mean(dim=(2, 3)))


def build(classes: int = 3, width: int = 4):
    return Tiny(classes, width)


def broken(**kwargs):
    raise ValueError("no such width")


def not_a_module(**kwargs):
    return 42


def wrong_input(**kwargs):
    return nn.Linear(7, 3)
"""

METRICS = """\
import torch


def top1(outputs, targets):
    return float((outputs.argmax(1) == targets).float().mean())


def nan(outputs, targets):
    return float("nan")


def words(outputs, targets):
    return "good"
"""


def pipeline(tmp_path: Path, model: str, extra: str = "", stages: str = "  - stage: load\n") -> Path:
    (tmp_path / "my_models.py").write_text(MODEL)
    (tmp_path / "my_metrics.py").write_text(METRICS)
    path = tmp_path / "p.yaml"
    path.write_text(
        textwrap.dedent(
            f"""\
            name: t
            runs_dir: {tmp_path / 'runs'}
            data: {{dataset: shapes, image_size: 8, channels: 1, num_classes: 3, num_samples: 60}}
            model: {model}
            """
        )
        + extra
        + "stages:\n"
        + stages
    )
    return path


def error(path: Path) -> str:
    with pytest.raises(DeploykitError) as e:
        run_pipeline(load_pipeline(path))
    return str(e.value)


def test_existing_pipelines_keep_their_stage_keys():
    cfg = load_pipeline(REPO / "pipelines" / "quickstart.yaml")
    entry = cfg.stages[0]
    # the same dict as before model sources: zoo model dump, data dump, no task entry
    assert cfg.key() == {"data": cfg.data.model_dump(mode="json"), "model": cfg.model.model_dump(mode="json")}
    assert set(cfg.model.model_dump(mode="json")) == {"name", "num_classes", "in_channels", "options"}
    assert _stage_key(cfg, entry, entry.settings(), []) == QUICKSTART_TRAIN_KEY


# The quickstart's train-stage key. Model sources left it as it was before them (7527cd8e..., main at dd2c713);
# issue 20's training defaults (precision auto, memory_format auto: new settings that train differently) changed
# every train key once, to this one. A change of it means every user's cached training runs again: say so.
QUICKSTART_TRAIN_KEY = "3ea214a416c6900c00912ae67da701cb02870fe1b24f6d529ff5c8adcb7e973d"


def test_a_factory_model_trains_saves_and_reloads_without_pickle(tmp_path):
    path = pipeline(tmp_path, "{factory: my_models.py:build, kwargs: {classes: 3, width: 6}}", stages=textwrap.dedent(
        """\
          - stage: train
            epochs: 1
            batch_size: 16
          - stage: export
        """))
    cfg = load_pipeline(path)
    assert cfg.model.factory == f"{tmp_path / 'my_models.py'}:build"  # resolved beside the pipeline file
    outcomes = run_pipeline(cfg)
    arch = json.loads((outcomes[0].directory / "model.json").read_text())
    assert arch["factory"].endswith("my_models.py:build") and arch["kwargs"] == {"classes": 3, "width": 6}
    assert arch["sha256"] == __import__("hashlib").sha256((tmp_path / "my_models.py").read_bytes()).hexdigest()
    from deploykit.train import load_model

    model, _ = load_model(outcomes[0].directory)
    assert type(model).__name__ == "Tiny" and model.head.out_features == 3
    assert 0.0 <= outcomes[0].metrics["val_acc"] <= 1.0
    assert "build(classes=3, width=6)" in (outcomes[1].directory / "reproduce_export.py").read_text()


def test_recipe_auto_gives_a_user_model_the_generic_recipe(tmp_path):
    path = pipeline(tmp_path, "{factory: my_models.py:build}", stages="  - {stage: train, recipe: auto, epochs: 1}\n")
    taken = run_pipeline(load_pipeline(path))[0].metrics["recipe"]
    assert taken["optimizer"]["name"] == "adamw" and taken["schedule"]["name"] == "onecycle"  # not a zoo family's
    assert taken["optimizer"]["lr"] == 5e-4 and taken["loss"]["label_smoothing"] == 0.1 and "epochs" not in taken


def test_editing_the_factory_file_changes_the_key(tmp_path):
    path = pipeline(tmp_path, "{factory: my_models.py:build}")
    cfg = load_pipeline(path)
    before = _stage_key(cfg, cfg.stages[0], cfg.stages[0].settings(), [])
    (tmp_path / "my_models.py").write_text(MODEL + "\n# a comment is an edit too\n")
    cfg = load_pipeline(path)
    assert _stage_key(cfg, cfg.stages[0], cfg.stages[0].settings(), []) != before
    key = cfg.key()["model"]
    assert key["factory"] == "my_models.py:build" and len(key["sha256"]) == 64  # a file name, not an absolute path


@pytest.mark.parametrize(
    ("model", "words"),
    [
        ("{factory: missing.py:build}", ["missing.py", "does not exist"]),
        ("{factory: my_models.py:biuld}", ["no attribute 'biuld'", "build"]),
        ("{factory: 'my_models.py'}", ["must be 'file.py:function'"]),
    ],
)
def test_a_bad_factory_reference_is_one_sentence_with_the_line(tmp_path, model, words):
    with pytest.raises(DeploykitError) as e:
        load_pipeline(pipeline(tmp_path, model))
    message = str(e.value)
    assert message.startswith(f"{tmp_path / 'p.yaml'}:4: ") and "\n" not in message
    assert all(w in message for w in words), message


@pytest.mark.parametrize(
    ("factory", "words"),
    [
        ("broken", ["raised ValueError", "no such width"]),
        ("not_a_module", ["returned a int", "not a torch.nn.Module"]),
        ("wrong_input", ["fails on a batch of the dataset's inputs of shape [2, 1, 8, 8]"]),
    ],
)
def test_a_factory_that_fails_is_refused_before_training(tmp_path, factory, words):
    message = error(pipeline(tmp_path, f"{{factory: my_models.py:{factory}}}"))
    assert all(w in message for w in words), message
    assert not (tmp_path / "runs" / "t" / "load").exists()  # nothing written


def test_pytorch_stages_are_refused_after_an_onnx_source(tmp_path):
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.Flatten(), torch.nn.Linear(72, 3))
    torch.onnx.export(model, torch.zeros(1, 1, 8, 8), str(tmp_path / "m.onnx"), dynamo=False, opset_version=13)
    path = pipeline(tmp_path, "{onnx: m.onnx}", stages="  - stage: quantize\n  - stage: prune\n")
    with pytest.raises(DeploykitError) as e:
        load_pipeline(path)
    assert str(e.value).startswith(f"{path}:7: stages[1]: stage 'prune' needs a PyTorch model")
    with pytest.raises(DeploykitError, match="needs a PyTorch model"):
        load_pipeline(pipeline(tmp_path, "{onnx: m.onnx}", stages="  - stage: quantize\n    method: qat\n"))


def test_an_onnx_source_is_imported_and_quantized(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(144, 3))
    torch.onnx.export(model, torch.zeros(1, 1, 8, 8), str(tmp_path / "m.onnx"), dynamo=False, opset_version=13,
                      input_names=["pixels"], output_names=["out"])
    quick = "  - stage: quantize\n    calibrate_method: minmax\n    latency_rounds: 1\n    latency_window_s: 0.1\n"
    outcomes = run_pipeline(load_pipeline(pipeline(tmp_path, "{onnx: m.onnx}", stages=quick)))
    assert [o.name for o in outcomes] == ["source", "quantize"]
    info = outcomes[0].metrics["import"]
    assert (info["original_input"], info["opset_before"], info["batch"]) == ("pixels", 13, "dynamic")
    meta = json.loads((outcomes[1].directory / "meta.json").read_text())
    assert meta["inputs"] == {"source": json.loads((outcomes[0].directory / "meta.json").read_text())["output_hash"]}
    assert outcomes[1].metrics["fp32_accuracy"] == outcomes[0].metrics["val_acc"]
    assert meta["preprocessing"]["normalization"] == "train-split mean/std"


def test_a_user_metric_judges_every_model_and_a_bad_one_is_one_sentence(tmp_path):
    stages = "  - stage: train\n    epochs: 1\n    batch_size: 16\n"
    path = pipeline(tmp_path, "{factory: my_models.py:build}", "metric: {function: my_metrics.py:top1, name: mine}\n",
                    stages)
    outcomes = run_pipeline(load_pipeline(path))
    history = outcomes[0].metrics["history"]
    assert 0.0 <= history[-1]["val_acc"] <= 1.0
    for name, words in (("nan", "returned nan"), ("words", "returned str 'good', not a number")):
        path = pipeline(tmp_path, "{factory: my_models.py:build}", f"metric: my_metrics.py:{name}\n", stages)
        assert words in error(path)


def test_a_custom_task_needs_a_metric(tmp_path):
    with pytest.raises(DeploykitError, match="task custom needs a metric"):
        load_pipeline(pipeline(tmp_path, "{factory: my_models.py:build}", "task: custom\n"))


def test_the_schema_describes_each_source():
    schema = json.dumps(json_schema())
    for words in ("a zoo architecture", "your own function", "exported by another tool", "Your metric",
                  "Your training loss", "python only", ".npz file"):
        assert words in schema, words


def test_a_file_that_is_not_onnx_is_refused_when_the_pipeline_loads(tmp_path):
    (tmp_path / "bad.onnx").write_bytes(b"this is not a model")
    path = pipeline(tmp_path, "{onnx: bad.onnx}", stages="  - stage: quantize\n")
    with pytest.raises(DeploykitError) as e:
        load_pipeline(path)
    assert str(e.value).startswith(f"{path}:4: ") and "not an ONNX file" in str(e.value)
