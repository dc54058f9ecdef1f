"""Pipeline files: every mistake is one sentence naming the key and the file's line."""

import json
import sys
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


def test_example_pipelines_load(tmp_path, monkeypatch):
    sys.path.insert(0, str(REPO / "bench"))
    from photo_patches import write  # photo-patches.yaml reads class folders this script makes

    monkeypatch.chdir(tmp_path)
    with pytest.raises(DeploykitError, match="data.root 'data/photo-patches' is not a directory"):
        load_pipeline(REPO / "pipelines/photo-patches.yaml")
    assert write(tmp_path / "data/photo-patches", per_class=2, size=28) == 24  # 12 classes
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


# ---- stages with one settings model per method (quantize, prune) ---------------------------------------------

METHODS = GOOD + """\
  - stage: prune
  - stage: export
  - stage: quantize
"""  # the prune stage is on line 14, quantize on line 16


def test_an_omitted_method_is_ptq_and_structured(tmp_path):
    from deploykit.stages.prune import StructuredSettings
    from deploykit.stages.quantize import PtqSettings

    stages = load_pipeline(write(tmp_path, METHODS)).stages
    prune, quantize = stages[1].settings(), stages[3].settings()
    assert type(prune) is StructuredSettings and prune.method == "structured" and prune.target_macs_ratio == 0.5
    assert type(quantize) is PtqSettings and quantize.method == "ptq" and quantize.calibrate_method == "auto"


def test_a_chosen_method_gets_its_own_settings(tmp_path):
    from deploykit.stages.quantize import DynamicSettings

    text = METHODS.replace("  - stage: quantize\n", "  - stage: quantize\n    method: dynamic\n    per_channel: false\n")
    settings = load_pipeline(write(tmp_path, text)).stages[3].settings()
    assert type(settings) is DynamicSettings and settings.per_channel is False
    assert "percentile" not in settings.model_dump()


def test_a_key_of_another_method_names_the_method_and_line(tmp_path):
    text = METHODS.replace("  - stage: quantize\n", "  - stage: quantize\n    method: dynamic\n    percentile: 99.9\n")
    msg = error_of(tmp_path, text)
    assert msg.startswith(f"{tmp_path / 'p.yaml'}:18: stages[3]: unknown key 'percentile' for method 'dynamic'; ")
    assert "setting of ptq" in msg and "\n" not in msg and "Traceback" not in msg
    msg = error_of(tmp_path, METHODS.replace("  - stage: prune\n", "  - stage: prune\n    sparsity: 0.7\n"))
    assert "p.yaml:15: stages[1]: unknown key 'sparsity' for method 'structured'" in msg and "unstructured" in msg


def test_a_misspelt_key_or_method_of_a_stage_with_methods(tmp_path):
    msg = error_of(tmp_path, METHODS.replace("  - stage: quantize\n", "  - stage: quantize\n    percentil: 99.9\n"))
    assert "p.yaml:17: stages[3]: unknown key 'percentil' for method 'ptq'; did you mean 'percentile'?" in msg
    msg = error_of(tmp_path, METHODS.replace("  - stage: quantize\n", "  - stage: quantize\n    method: dynamc\n"))
    assert "p.yaml:17: stages[3].method: unknown method 'dynamc' for stage quantize; did you mean 'dynamic'?" in msg


def test_errors_inside_a_method_drop_both_tags(tmp_path):
    msg = error_of(tmp_path, METHODS.replace("  - stage: quantize\n", "  - stage: quantize\n    percentile: 200\n"))
    assert "p.yaml:17: stages[3].percentile: input should be less than or equal to 100 (got 200)." in msg
    text = METHODS.replace("  - stage: prune\n", "  - stage: prune\n    pruning_ratio: 0.3\n    target_macs_ratio: 0.4\n")
    msg = error_of(tmp_path, text)
    assert "p.yaml:14: stages[1]: set only one of" in msg and "not pruning_ratio and target_macs_ratio" in msg


def test_schema_has_each_methods_own_keys():
    defs = json_schema()["$defs"]
    keys = {name: set(model["properties"]) for name, model in defs.items() if name.endswith("Entry")}
    assert "calibrate_method" in keys["QuantizePtqEntry"] and "calibrate_method" not in keys["QuantizeDynamicEntry"]
    assert "qat" in keys["QuantizeQatEntry"] and "qat" not in keys["QuantizePt2eEntry"]
    assert "max_accuracy_drop" in keys["QuantizeDynamicEntry"] and "stage" in keys["QuantizeDynamicEntry"]
    assert "sparsity" in keys["PruneUnstructuredEntry"] and "sparsity" not in keys["PruneStructuredEntry"]
    assert "importance" in keys["PruneStructuredEntry"] and "importance" not in keys["PruneUnstructuredEntry"]


def test_recipe_auto_fills_only_what_the_file_leaves_unset(tmp_path):
    from deploykit.train.recipes import apply_recipe

    text = GOOD.replace("    epochs: 2", "    epochs: 2\n    recipe: auto")
    cfg = load_pipeline(write(tmp_path, text)).stages[0].settings()
    assert cfg.recipe == "auto"
    filled, taken = apply_recipe(cfg, "mobilenet")
    assert filled.epochs == 2 and filled.optimizer.lr == 0.05  # both set in the file: kept
    assert "optimizer" not in taken and "epochs" not in taken
    assert filled.grad_clip_norm == 2.0 and filled.schedule.warmup_epochs == 0.5 and filled.loss.label_smoothing == 0.0
    unset, taken = apply_recipe(type(cfg).model_validate({"recipe": "auto", "batch_size": 128}), "resnet")
    assert unset.optimizer.lr == pytest.approx(0.2) and unset.optimizer.nesterov and unset.epochs == 15  # 0.1 x 128/64
    assert unset.batch_size == 128 and set(taken) >= {"optimizer", "schedule", "loss", "epochs"}
