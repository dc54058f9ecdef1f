"""Model zoo: torchvision-exact sizes and names, options, MACs, and the hooks the training stage relies on."""

from __future__ import annotations

import copy
import math
from collections import Counter

import pytest
import torch
import torch.fx
from torch import nn

from deploykit.errors import DeploykitError
from deploykit.zoo import (
    compound_scaling,
    count_macs,
    count_params,
    default_resolution,
    get_model,
    list_models,
    model_table,
)

# torchvision's published parameter counts at 1000 classes; matching them is what lets its state_dicts load.
PARAMS = {
    "resnet18": 11_689_512,
    "resnet34": 21_797_672,
    "resnet50": 25_557_032,
    "resnet101": 44_549_160,
    "resnet152": 60_192_808,
    "googlenet": 6_624_904,
    "efficientnet_b0": 5_288_548,
    "efficientnet_b1": 7_794_184,
    "efficientnet_b2": 9_109_994,
    "efficientnet_b3": 12_233_232,
    "efficientnet_b4": 19_341_616,
    "efficientnet_b5": 30_389_784,
    "efficientnet_b6": 43_040_704,
    "efficientnet_b7": 66_347_960,
    "mobilenet_v2": 3_504_872,
}
ONE_PER_FAMILY = ["resnet18", "resnet50", "googlenet", "efficientnet_b0", "mobilenet_v2"]
# Cheap settings every family accepts: the training-path tests need real compute, not real size.
SMALL = {"num_classes": 10, "width_mult": 0.25, "stem": "cifar"}


pytestmark = pytest.mark.usefixtures("one_thread")


def meta_model(name: str, **kwargs) -> nn.Module:
    """Structure-only tests build on the meta device: full-size models without memory or compute."""
    with torch.device("meta"):
        return get_model(name, **kwargs)


def test_list_models_names_every_model():
    assert list_models() == list(PARAMS)


@pytest.mark.parametrize("name", list(PARAMS))
def test_parameter_count_matches_torchvision(name):
    assert count_params(meta_model(name)) == PARAMS[name]


@pytest.mark.parametrize("name", list(PARAMS))
def test_output_shape(name):
    model = meta_model(name, num_classes=10).eval()
    assert model(torch.empty(2, 3, 64, 64, device="meta")).shape == (2, 10)


STATE_DICT_SAMPLES = {
    "resnet18": {
        "conv1.weight": (64, 3, 7, 7),
        "bn1.running_var": (64,),
        "layer1.0.conv1.weight": (64, 64, 3, 3),
        "layer1.1.bn2.bias": (64,),
        "layer2.0.downsample.0.weight": (128, 64, 1, 1),
        "layer2.0.downsample.1.weight": (128,),
        "layer4.1.conv2.weight": (512, 512, 3, 3),
        "fc.weight": (1000, 512),
    },
    "resnet50": {
        "layer1.0.conv3.weight": (256, 64, 1, 1),
        "layer1.0.downsample.0.weight": (256, 64, 1, 1),
        "layer2.0.conv2.weight": (128, 128, 3, 3),
        "layer3.5.bn3.weight": (1024,),
        "layer4.2.conv1.weight": (512, 2048, 1, 1),
        "fc.weight": (1000, 2048),
    },
    "googlenet": {
        "conv1.conv.weight": (64, 3, 7, 7),
        "conv1.bn.weight": (64,),
        "conv3.conv.weight": (192, 64, 3, 3),
        "inception3a.branch1.conv.weight": (64, 192, 1, 1),
        "inception3a.branch2.1.conv.weight": (128, 96, 3, 3),
        "inception3a.branch3.1.conv.weight": (32, 16, 3, 3),
        "inception3a.branch4.1.conv.weight": (32, 192, 1, 1),
        "inception5b.branch1.bn.running_mean": (384,),
        "fc.weight": (1000, 1024),
    },
    "efficientnet_b0": {
        "features.0.0.weight": (32, 3, 3, 3),
        "features.1.0.block.0.0.weight": (32, 1, 3, 3),
        "features.1.0.block.1.fc1.weight": (8, 32, 1, 1),
        "features.1.0.block.1.fc2.bias": (32,),
        "features.1.0.block.2.0.weight": (16, 32, 1, 1),
        "features.2.0.block.0.0.weight": (96, 16, 1, 1),
        "features.6.3.block.1.1.weight": (1152,),
        "features.8.0.weight": (1280, 320, 1, 1),
        "classifier.1.weight": (1000, 1280),
    },
    "efficientnet_b7": {
        "features.0.0.weight": (64, 3, 3, 3),
        "features.7.3.block.3.0.weight": (640, 3840, 1, 1),
        "features.8.0.weight": (2560, 640, 1, 1),
        "classifier.1.weight": (1000, 2560),
    },
    "mobilenet_v2": {
        "features.0.0.weight": (32, 3, 3, 3),
        "features.0.1.weight": (32,),
        "features.1.conv.0.0.weight": (32, 1, 3, 3),
        "features.1.conv.1.weight": (16, 32, 1, 1),
        "features.2.conv.0.0.weight": (96, 16, 1, 1),
        "features.2.conv.2.weight": (24, 96, 1, 1),
        "features.17.conv.3.running_var": (320,),
        "features.18.0.weight": (1280, 320, 1, 1),
        "classifier.1.weight": (1000, 1280),
    },
}


@pytest.mark.parametrize("name", list(STATE_DICT_SAMPLES))
def test_state_dict_names_match_torchvision(name):
    state = meta_model(name).state_dict()
    assert {key: tuple(state[key].shape) for key in STATE_DICT_SAMPLES[name]} == STATE_DICT_SAMPLES[name]
    # Only torchvision's parameterised modules: the per-use ReLUs, flatten and pools add no keys.
    assert not any(part.startswith(("relu", "flatten", "avgpool")) for key in state for part in key.split("."))


def test_efficientnet_b5_to_b7_use_tensorflow_batchnorm_settings():
    b0, b5 = meta_model("efficientnet_b0"), meta_model("efficientnet_b5")
    assert (b0.features[0][1].eps, b0.features[0][1].momentum) == (1e-5, 0.1)
    assert (b5.features[0][1].eps, b5.features[0][1].momentum) == (1e-3, 0.01)


@pytest.mark.parametrize("name", list(PARAMS))
def test_no_module_runs_twice_per_forward(name):
    # Graph quantizers give each module one observer; a module reused in forward would share it across sites.
    model = meta_model(name, num_classes=10).train()
    calls: Counter[str] = Counter()
    for module_name, module in model.named_modules():
        module.register_forward_hook(lambda *_, module_name=module_name: calls.update([module_name]))
    model(torch.empty(2, 3, 64, 64, device="meta"))
    assert calls and max(calls.values()) == 1, [n for n, c in calls.items() if c > 1]


@pytest.mark.parametrize("name", ONE_PER_FAMILY)
def test_fx_traces_with_each_module_called_once(name):
    graph = torch.fx.symbolic_trace(meta_model(name)).graph
    targets = Counter(node.target for node in graph.nodes if node.op == "call_module")
    assert targets and max(targets.values()) == 1


@pytest.mark.parametrize("name", list(PARAMS))
def test_stage_groups_cover_every_parameter_once(name):
    model = meta_model(name)
    groups = model.stage_groups()
    assert len(groups) >= 3  # stem, body stages, head
    owners: Counter[int] = Counter()
    for group in groups:
        for module_name in group:
            owners.update(id(p) for p in model.get_submodule(module_name).parameters())
    assert set(owners) == {id(p) for p in model.parameters()}
    assert set(owners.values()) == {1}
    head = groups[-1]
    assert head[-1] in ("fc", "classifier")


@pytest.mark.parametrize("name", list(PARAMS))
def test_training_step_updates_parameters(name):
    torch.manual_seed(0)
    model = get_model(name, **SMALL).train()
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    loss = nn.functional.cross_entropy(model(torch.randn(4, 3, 32, 32)), torch.randint(0, 10, (4,)))
    loss.backward()
    assert math.isfinite(loss.item())
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    optimizer.step()
    after = list(model.parameters())
    # The first conv and the classifier moved: gradients flowed end to end.
    assert not torch.equal(before[0], after[0]) and not torch.equal(before[-2], after[-2])


@pytest.mark.parametrize("name", ONE_PER_FAMILY)
def test_activation_checkpointing_keeps_outputs_and_gradients(name):
    torch.manual_seed(0)
    plain = get_model(name, **SMALL).train()
    checkpointed = copy.deepcopy(plain)
    checkpointed.activation_checkpointing = True
    x = torch.randn(4, 3, 32, 32)
    outputs, stage_calls = [], []
    for model in (plain, checkpointed):
        calls = Counter()
        model.get_submodule(model.stage_groups()[1][0]).register_forward_pre_hook(lambda *_: calls.update(["run"]))
        torch.manual_seed(1)  # same dropout / stochastic-depth draws in both runs
        out = model(x)
        out.square().mean().backward()
        outputs.append(out)
        stage_calls.append(calls["run"])
    assert stage_calls == [1, 2]  # the checkpointed stage really was recomputed in backward
    torch.testing.assert_close(outputs[1], outputs[0], rtol=0, atol=1e-5)
    for (param_name, a), b in zip(plain.named_parameters(), checkpointed.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=0, atol=1e-5, msg=param_name)


@pytest.mark.parametrize(
    ("name", "expected"),
    [("resnet18", 1.814e9), ("resnet50", 4.09e9), ("mobilenet_v2", 0.30e9), ("efficientnet_b0", 0.39e9)],
)
def test_macs_match_published_figures(name, expected):
    assert count_macs(meta_model(name), (1, 3, 224, 224)) == pytest.approx(expected, rel=0.02)


def test_count_macs_runs_real_models_in_eval_and_restores_training_mode():
    model = get_model("resnet18", **SMALL).train()
    model.fc.eval()  # a mixed-mode model must come back exactly as it was
    macs = count_macs(model, (2, 3, 32, 32))
    assert macs == count_macs(meta_model("resnet18", **SMALL), (2, 3, 32, 32)) > 0
    assert model.training and not model.fc.training and model.layer1.training


def test_model_table_rows():
    rows = model_table(image_size=32, num_classes=10)
    assert [row["name"] for row in rows] == list(PARAMS)
    assert set(rows[0]) == {"name", "family", "params", "macs", "default_resolution"}
    b3 = next(row for row in rows if row["name"] == "efficientnet_b3")
    assert (b3["family"], b3["default_resolution"], b3["params"]) == (
        "efficientnet",
        300,
        count_params(meta_model("efficientnet_b3", num_classes=10)),
    )
    assert all(row["macs"] > 0 for row in rows)


def test_default_resolution():
    resolutions = [default_resolution(f"efficientnet_b{i}") for i in range(8)]
    assert resolutions == [224, 240, 260, 300, 380, 456, 528, 600]
    assert default_resolution("resnet50") == default_resolution("inception_v1") == 224


def test_compound_scaling_formula():
    assert compound_scaling(0) == (1.0, 1.0, 224)
    depth, width, resolution = compound_scaling(2)
    assert (depth, width, resolution) == (pytest.approx(1.44), pytest.approx(1.21), round(224 * 1.15**2))


def test_phi_builds_the_formula_scaled_model():
    base, scaled = meta_model("efficientnet_b0"), meta_model("efficientnet_b0", phi=2)
    depth, width, _ = compound_scaling(2)
    assert len(scaled.features[6]) == math.ceil(4 * depth)  # the 4-block stage
    assert scaled.features[0][0].out_channels == 40  # 32 * 1.21, rounded to a multiple of 8
    assert count_params(scaled) > count_params(base)


def test_cifar_stem_keeps_32x32_resolution_through_the_stem():
    for name in ONE_PER_FAMILY:
        model = get_model(name, **SMALL).eval()
        stem = nn.Sequential(*(model.get_submodule(n) for n in model.stage_groups()[0]))
        x = torch.randn(2, 3, 32, 32)
        assert stem(x).shape[-2:] == (32, 32), name
        assert model(x).shape == (2, 10), name
    assert meta_model("resnet18", stem="cifar").conv1.weight.shape == (64, 3, 3, 3)


def test_width_and_depth_multipliers():
    for name in ONE_PER_FAMILY:
        assert count_params(meta_model(name, width_mult=0.5)) < count_params(meta_model(name)), name
    assert [len(meta_model("resnet18", depth_mult=1.5).get_submodule(f"layer{i}")) for i in range(1, 5)] == [3] * 4
    assert meta_model("resnet18", width_mult=0.01).conv1.out_channels == 8  # channel floor


def test_in_channels_changes_only_the_first_conv():
    model = get_model("resnet18", in_channels=1, num_classes=10, stem="cifar", width_mult=0.25).eval()
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 10)
    for name in ONE_PER_FAMILY:
        rgb, gray = meta_model(name).state_dict(), meta_model(name, in_channels=1).state_dict()
        changed = [key for key in rgb if rgb[key].shape != gray[key].shape]
        assert len(changed) == 1 and changed[0].startswith(("conv1.", "features.0.0.")), (name, changed)


def test_dropout_and_zero_init_residual_options():
    assert not hasattr(meta_model("resnet18"), "dropout")
    assert meta_model("resnet18", dropout=0.3).dropout.p == 0.3
    assert meta_model("efficientnet_b7").classifier[0].p == 0.5
    assert get_model("resnet50", zero_init_residual=True).layer1[0].bn3.weight.abs().sum() == 0
    mobilenet = get_model("mobilenet_v2", zero_init_residual=True)
    assert mobilenet.features[3].conv[-1].weight.abs().sum() == 0  # residual block
    assert mobilenet.features[2].conv[-1].weight.abs().sum() > 0  # stride 2: no identity path to protect


def test_alias_builds_googlenet():
    assert count_params(meta_model("inception_v1")) == PARAMS["googlenet"]


def test_unknown_model_suggests_the_closest_name():
    with pytest.raises(DeploykitError, match=r"Unknown model 'resnt18'.*did you mean 'resnet18'.*deploykit models"):
        get_model("resnt18")


@pytest.mark.parametrize(
    ("name", "options", "word"),
    [
        ("resnet18", {"widht_mult": 0.5}, "widht_mult"),
        ("googlenet", {"depth_mult": 2.0}, "depth_mult"),
        ("mobilenet_v2", {"phi": 1.0}, "phi"),
        ("resnet18", {"width_mult": 0}, "width_mult"),
        ("resnet18", {"stem": "cifr"}, "stem"),
        ("efficientnet_b0", {"dropout": 1.0}, "dropout"),
        ("efficientnet_b0", {"stochastic_depth": -0.1}, "stochastic_depth"),
        ("resnet18", {"depth_mult": True}, "depth_mult"),
        ("resnet18", {"zero_init_residual": "yes"}, "zero_init_residual"),
        ("resnet18", {"num_classes": 0}, "num_classes"),
    ],
)
def test_bad_options_name_the_offending_word(name, options, word):
    with pytest.raises(DeploykitError, match=word):
        get_model(name, **options)
