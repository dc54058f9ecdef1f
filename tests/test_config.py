"""Pipeline files: every mistake is one sentence naming the key and the file's line."""

import json
import textwrap

import pytest
from conftest import REPO

from deploykit.errors import DeploykitError
from deploykit.pipeline.loader import json_schema, load_pipeline

GOOD = """\
name: t
data:
  dataset: digits
  image_size: 16
model:
  name: resnet18
  options: {stem: cifar, width_mult: 0.25}
stages:
  - stage: train
    epochs: 2
    optimizer:
      name: sgd
      lr: 0.05
"""


def write(tmp_path, text):
    path = tmp_path / "p.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def error_of(tmp_path, text) -> str:
    with pytest.raises(DeploykitError) as e:
        load_pipeline(write(tmp_path, text))
    return str(e.value)


def test_example_pipelines_load():
    for path in sorted((REPO / "pipelines").glob("*.yaml")):
        cfg = load_pipeline(path)
        assert cfg.stages, path


def test_good_pipeline_values(tmp_path):
    cfg = load_pipeline(write(tmp_path, GOOD))
    entry = cfg.stages[0]
    settings = entry.settings()
    assert (entry.stage_name, settings.epochs, settings.optimizer.lr) == ("train", 2, 0.05)
    assert settings.schedule.name == "cosine"  # default filled in


def test_unknown_stage_key_names_line_and_suggestion(tmp_path):
    msg = error_of(tmp_path, GOOD.replace("    epochs: 2", "    epoch: 2"))
    assert "p.yaml:10:" in msg and "unknown key 'epoch'" in msg and "did you mean 'epochs'" in msg


def test_unknown_nested_key(tmp_path):
    msg = error_of(tmp_path, GOOD.replace("      name: sgd", "      nmae: sgd"))
    assert "p.yaml:12:" in msg and "stages[0].optimizer" in msg and "did you mean 'name'" in msg


def test_unknown_top_level_key(tmp_path):
    msg = error_of(tmp_path, GOOD.replace("stages:", "stage:"))
    assert "unknown key 'stage'" in msg and "did you mean 'stages'" in msg


def test_wrong_type_names_key_line_and_value(tmp_path):
    msg = error_of(tmp_path, GOOD.replace("epochs: 2", "epochs: ten"))
    assert "p.yaml:10:" in msg and "stages[0].epochs" in msg and '"ten"' in msg


def test_out_of_range_value(tmp_path):
    msg = error_of(tmp_path, GOOD.replace("lr: 0.05", "lr: -1"))
    assert "p.yaml:13:" in msg and "stages[0].optimizer.lr" in msg and "greater than 0" in msg


def test_unknown_stage_type(tmp_path):
    msg = error_of(tmp_path, GOOD.replace("stage: train", "stage: trian"))
    assert "p.yaml:9:" in msg and "unknown stage 'trian'" in msg and "did you mean 'train'" in msg


def test_missing_dataset_folder(tmp_path):
    text = GOOD.replace("dataset: digits", f"dataset: imagefolder\n  root: {tmp_path / 'nope'}")
    msg = error_of(tmp_path, text)
    assert "data.root" in msg and "nope" in msg and "p.yaml:" in msg


def test_bad_model_name_and_option(tmp_path):
    msg = error_of(tmp_path, GOOD.replace("name: resnet18", "name: resnet19"))
    assert "p.yaml:" in msg and "resnet19" in msg and "resnet18" in msg
    msg = error_of(tmp_path, GOOD.replace("width_mult: 0.25", "widht_mult: 0.25"))
    assert "widht_mult" in msg


def test_bad_yaml_names_line(tmp_path):
    msg = error_of(tmp_path, GOOD.replace("  image_size: 16", "  image_size: [16"))
    assert "not valid YAML" in msg and "p.yaml:" in msg


def test_duplicate_stage_names_and_unsafe_names(tmp_path):
    msg = error_of(tmp_path, GOOD + "  - stage: train\n")
    assert "used twice" in msg
    msg = error_of(tmp_path, GOOD.replace("name: t", "name: ../escape"))
    assert "run name" in msg and "folder" in msg


def test_missing_file(tmp_path):
    with pytest.raises(DeploykitError, match="does not exist"):
        load_pipeline(tmp_path / "absent.yaml")


def test_one_sentence(tmp_path):
    msg = error_of(tmp_path, GOOD.replace("epochs: 2", "epochs: ten"))
    assert "\n" not in msg and "Traceback" not in msg


def test_schema_lists_stages_and_knobs():
    schema = json_schema()
    text = json.dumps(schema)
    assert "TrainEntry" in text and "label_smoothing" in text and "warmup_cosine" in text
    assert schema["required"] == ["name", "stages"]
