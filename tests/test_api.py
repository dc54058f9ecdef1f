"""deploykit.optimize: the Python face of the engine, with a model, data and metric defined in the caller's process."""

from __future__ import annotations

import json
import runpy
import subprocess
import sys
import textwrap

import pytest
from conftest import REPO

import deploykit
from deploykit.errors import DeploykitError

pytestmark = [pytest.mark.slow, pytest.mark.side]


def test_the_readme_example_runs_caches_and_names_its_metric(in_tmp):
    example = runpy.run_path(str(REPO / "examples" / "python-api" / "optimize.py"))
    result = example["main"](epochs=1)
    assert [o.status for o in result.stages] == ["ran"] * 4
    assert result.deployable.path.is_file() and result.deployable.runtime == "onnxruntime"
    assert result.deployable.path.suffix == ".onnx" and result.deployable.stage in ("export", "quantize")
    assert 0.3 < result.metrics("train")["val_acc"] <= 1.0  # balanced accuracy after one epoch; chance is 0.1
    assert "balanced accuracy" in result.report_path.read_text()
    again = example["main"](epochs=1)  # the same objects, by digest: every stage from the cache
    assert [o.status for o in again.stages] == ["cached"] * 4
    with pytest.raises(DeploykitError, match="no stage named 'nope'"):
        again.metrics("nope")
    # A new process cannot rebuild a model that lived in this one: one sentence saying how to make it resumable.
    code = "from deploykit.train import load_model; load_model('runs/python-api/train')"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=in_tmp, check=False)
    assert proc.returncode != 0
    assert "handed to deploykit.optimize as a Python object (SmallNet)" in proc.stderr
    assert "define it in a .py file" in proc.stderr


MODELS = """\
from torch import nn


def build(width: int = 8):
    return nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(width, 10))
"""

RUN = """\
import json, sys
sys.path.insert(0, {folder!r})
import deploykit, resumable_models
pipeline = json.loads({pipeline!r})
result = deploykit.optimize(pipeline, model=resumable_models.build, model_kwargs={{"width": 8}})
print(json.dumps([o.status for o in result.stages]))
"""


def test_an_importable_factory_resumes_in_a_new_process(in_tmp):
    (in_tmp / "resumable_models.py").write_text(MODELS)
    pipeline = {
        "name": "resume",
        "data": {"dataset": "digits", "image_size": 8, "channels": 1},
        "stages": [{"stage": "train", "epochs": 1, "batch_size": 64}, {"stage": "export"}],
    }
    sys.path.insert(0, str(in_tmp))
    try:
        import resumable_models

        first = deploykit.optimize(pipeline, model=resumable_models.build, model_kwargs={"width": 8}, until="train")
    finally:
        sys.path.remove(str(in_tmp))
        sys.modules.pop("resumable_models", None)
    assert [o.status for o in first.stages] == ["ran"]
    model_json = json.loads((in_tmp / "runs" / "resume" / "train" / "model.json").read_text())
    assert model_json["factory"] == "resumable_models:build"  # by its import path: any process can rebuild it
    code = RUN.format(folder=str(in_tmp), pipeline=json.dumps(pipeline))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=in_tmp, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == ["cached", "ran"]


def test_bad_arguments_are_one_sentence(in_tmp):
    with pytest.raises(DeploykitError, match="does not exist: pass the path of a YAML file or a dict"):
        deploykit.optimize(in_tmp / "missing.yaml")
    with pytest.raises(DeploykitError, match=r"data must be \(train, val\) datasets"):
        deploykit.optimize({"name": "x", "stages": [{"stage": "load"}]}, data=[1, 2, 3])
    with pytest.raises(DeploykitError, match="model_kwargs was given without model"):
        deploykit.optimize({"name": "x", "stages": [{"stage": "load"}]}, model_kwargs={"width": 3})
    bad = in_tmp / "p.yaml"
    bad.write_text(textwrap.dedent("""\
        name: x
        model: {factory: nowhere.py:build}
        stages: [{stage: load}]
        """))
    with pytest.raises(DeploykitError, match=r"p.yaml:2: .*nowhere.py.*does not exist"):
        deploykit.optimize(bad)
