"""Structured pruning of the user's own models (model: factory): layers the zoo never uses, a custom parameter,
outputs that are not class scores, ignored_layers, and the save/load round trip through the factory."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from deploykit.compress.prune import Budget, prune_structured
from deploykit.errors import DeploykitError
from deploykit.sources.model import build_model
from deploykit.train import load_model, save_model
from deploykit.zoo import count_macs

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore:Unwrapped parameters")]

SHAPE = (1, 1, 16, 16)

# The user's file: nothing here is a zoo layer pattern deploykit knows about.
MY_MODELS = '''
import torch
import torch.nn.functional as F
from torch import nn


class ChannelNorm(nn.Module):
    """LayerNorm over the channels of an NCHW map."""

    def __init__(self, channels):
        super().__init__()
        self.norm = nn.LayerNorm(channels)

    def forward(self, x):
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class SqueezeExcite(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.reduce = nn.Conv2d(channels, channels // 4, 1)
        self.expand = nn.Conv2d(channels // 4, channels, 1)

    def forward(self, x):
        s = self.expand(F.gelu(self.reduce(x.mean((2, 3), keepdim=True))))
        return x * torch.sigmoid(s)


class Block(nn.Module):
    """Depthwise 3x3, channel norm, GELU, pointwise 1x1, squeeze-excite, layer scale."""

    def __init__(self, cin, cout, stride, norm):
        super().__init__()
        self.dw = nn.Conv2d(cin, cin, 3, stride, 1, groups=cin, bias=False)
        self.norm = ChannelNorm(cin) if norm == "layer" else nn.GroupNorm(4, cin)
        self.pw = nn.Conv2d(cin, cout, 1)
        self.se = SqueezeExcite(cout)
        self.gamma = nn.Parameter(torch.full((cout, 1, 1), 0.5))

    def forward(self, x):
        return self.se(self.pw(F.gelu(self.norm(self.dw(x))))) * self.gamma


class Net(nn.Module):
    def __init__(self, in_channels=1, num_classes=10, width=16, norm="layer"):
        super().__init__()
        self.stem = nn.Conv2d(in_channels, width, 3, 1, 1)
        self.blocks = nn.Sequential(
            Block(width, 2 * width, 2, norm), Block(2 * width, 2 * width, 1, norm), Block(2 * width, 4 * width, 2, norm)
        )
        self.head = nn.Linear(4 * width, num_classes)

    def forward(self, x):
        return self.head(self.blocks(F.gelu(self.stem(x))).mean((2, 3)))


def conv_bn(cin, cout, stride=1):
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1), nn.BatchNorm2d(cout), nn.ReLU())


class UNet(nn.Module):
    """Encoder, upsample, concatenated skip, a 1x1 conv to one map per class."""

    def __init__(self, in_channels=1, classes=5, width=16):
        super().__init__()
        self.enc1, self.enc2 = conv_bn(in_channels, width), conv_bn(width, 2 * width, 2)
        self.up = nn.Upsample(scale_factor=2)
        self.dec = conv_bn(3 * width, width)
        self.out = nn.Conv2d(width, classes, 1)

    def forward(self, x):
        skip = self.enc1(x)
        return self.out(self.dec(torch.cat([skip, self.up(self.enc2(skip))], 1)))


class ConvPool(nn.Module):
    """No Linear: the last conv makes one channel per class, global pooling makes the scores."""

    def __init__(self, in_channels=1, classes=5, width=16):
        super().__init__()
        self.features = nn.Sequential(conv_bn(in_channels, width), conv_bn(width, 2 * width, 2))
        self.classify = nn.Conv2d(2 * width, classes, 1)

    def forward(self, x):
        return self.classify(self.features(x)).mean((2, 3))


class Shuffle(nn.Module):
    """Channels folded into space (pixel shuffle): torch-pruning cannot prune what feeds it."""

    def __init__(self, in_channels=1, classes=10):
        super().__init__()
        self.stem, self.mix = nn.Conv2d(in_channels, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1)
        self.post = nn.Conv2d(4, 16, 3, padding=1)
        self.head = nn.Linear(16, classes)

    def forward(self, x):
        x = F.avg_pool2d(F.pixel_shuffle(self.mix(F.relu(self.stem(x))), 2), 2)
        return self.head(self.post(x).mean((2, 3)))


class Scaled(nn.Module):
    """A conv with its own parameters and buffer per channel, outside any standard layer."""

    def __init__(self, channels=8):
        super().__init__()
        self.conv = nn.Conv2d(1, channels, 3)
        self.gamma = nn.Parameter(torch.linspace(0.5, 1.5, channels).view(-1, 1, 1))
        self.offset = nn.Parameter(torch.linspace(-1, 1, channels).view(-1, 1, 1), requires_grad=False)
        self.register_buffer("shift", torch.arange(channels, dtype=torch.float32).view(-1, 1, 1))

    def forward(self, x):
        return (self.conv(x) * self.gamma + self.offset + self.shift).mean((2, 3))


def build(kind="net", **kwargs):
    return {"net": Net, "unet": UNet, "conv_pool": ConvPool, "shuffle": Shuffle, "scaled": Scaled}[kind](**kwargs)
'''


def factory_arch(tmp_path: Path, **kwargs) -> dict:
    """A factory arch for the user's file, as a pipeline's model: {factory: my_models.py:build} resolves to."""
    path = tmp_path / "my_models.py"
    if not path.exists():
        path.write_text(MY_MODELS)
    return {"factory": f"{path}:build", "kwargs": kwargs, "sha256": ""}


def build(arch: dict) -> nn.Module:
    return build_model(arch, seed=0).eval()


def macs(model: nn.Module) -> int:
    return count_macs(model, SHAPE)


def prune(model: nn.Module, round_to: int = 8, **goal) -> nn.Module:
    pruned, _ = prune_structured(model, torch.zeros(SHAPE), importance="l2", round_to=round_to, **goal)
    return pruned


def widths(model: nn.Module) -> dict[str, int]:
    return {name: m.out_channels for name, m in model.named_modules() if isinstance(m, nn.Conv2d)}


@pytest.mark.parametrize("norm", ["layer", "group"])
def test_a_user_cnn_prunes_to_half_the_macs_and_rebuilds_from_its_factory(tmp_path: Path, norm: str) -> None:
    arch = factory_arch(tmp_path, norm=norm)
    model = build(arch)
    before = macs(model)
    pruned = prune(model, round_to=4, budget=Budget(macs, 0.5 * before))
    assert macs(pruned) <= 0.5 * before
    assert pruned.head.out_features == 10 and pruned.stem.in_channels == 1
    assert all(b.dw.groups == b.dw.in_channels == b.dw.out_channels for b in pruned.blocks)  # still depthwise
    fresh = build(arch)
    assert any(b.gamma.shape != f.gamma.shape for b, f in zip(pruned.blocks, fresh.blocks))  # the custom parameter

    save_model(pruned, arch, tmp_path / "out")
    description = json.loads((tmp_path / "out/model.json").read_text())
    assert {k: description[k] for k in ("factory", "kwargs", "sha256")} == arch
    layers, tensors = description["layers"], description["tensors"]
    norm_layer, norm_type = ("norm.norm", "LayerNorm") if norm == "layer" else ("norm", "GroupNorm")
    reshaped = [name for name, spec in layers.items() if spec["type"] == norm_type]
    assert reshaped and all(name.endswith(norm_layer) for name in reshaped)
    assert layers["head"]["in_features"] == pruned.head.in_features
    assert any(name.endswith(".dw") for name in layers) and any(name.endswith(".se.reduce") for name in layers)
    assert tensors and set(tensors) <= {f"blocks.{i}.gamma" for i in range(3)}  # the only non-layer tensors

    loaded, loaded_arch = load_model(tmp_path / "out")
    assert widths(loaded) == widths(pruned) and loaded_arch == description
    x = torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(pruned.eval()(x), loaded(x))


@pytest.mark.parametrize(("kind", "output"), [("unet", (2, 5, 16, 16)), ("conv_pool", (2, 5))])
def test_a_model_without_a_linear_head_keeps_its_output_shape(tmp_path: Path, kind: str, output: tuple) -> None:
    arch = factory_arch(tmp_path, kind=kind, classes=5)
    model = build(arch)
    before = widths(model)
    pruned = prune(model, round_to=4, ratio=0.5)
    assert pruned(torch.zeros(2, 1, 16, 16)).shape == output
    after = widths(pruned)
    last = list(after)[-1]  # the 1x1 conv to the 5 classes
    assert after[last] == before[last] == 5 and sum(after.values()) < sum(before.values())
    save_model(pruned, arch, tmp_path / "out")
    loaded, _ = load_model(tmp_path / "out")
    assert widths(loaded) == after


def test_ignored_layers_keep_their_channels_and_a_misspelt_one_is_named(tmp_path: Path) -> None:
    arch = factory_arch(tmp_path)
    with pytest.raises(DeploykitError, match=r"ignored_layers names 'blocks\.1\.sf'.*did you mean 'blocks\.1\.se'"):
        prune(build(arch), ratio=0.5, ignored_layers=["blocks.1.sf"])
    fresh = build(arch)
    pruned = prune(build(arch), ratio=0.5, ignored_layers=["blocks.1.se"])
    assert widths(pruned)["blocks.1.se.expand"] == widths(fresh)["blocks.1.se.expand"]
    assert widths(pruned)["blocks.1.se.reduce"] == widths(fresh)["blocks.1.se.reduce"]
    assert widths(pruned)["stem"] < widths(fresh)["stem"]  # the rest is pruned as usual


def test_a_layer_torch_pruning_cannot_follow_is_named_with_the_fix(tmp_path: Path) -> None:
    arch = factory_arch(tmp_path, kind="shuffle")
    with pytest.raises(DeploykitError, match=r"at layer 'mix' \(IndexError.*add 'mix' to ignored_layers"):
        prune(build(arch), round_to=4, ratio=0.5)
    with pytest.raises(DeploykitError, match=r"at layer 'mix'"):  # the budget search fails the same way
        prune(build(arch), round_to=4, budget=Budget(macs, 0.5 * macs(build(arch))))
    pruned = prune(build(arch), round_to=4, ratio=0.5, ignored_layers=["mix"])
    assert widths(pruned)["mix"] == 16 and widths(pruned)["stem"] < 16
    assert pruned(torch.zeros(SHAPE)).shape == (1, 10)


def test_reshaped_custom_parameters_and_buffers_round_trip(tmp_path: Path) -> None:
    """What the generic fallback records: tensors of the user's own module, whatever reshaped them."""
    arch = factory_arch(tmp_path, kind="scaled")
    model, keep = build(arch), [0, 2, 5, 7]
    small = copy.deepcopy(model)
    small.conv = nn.Conv2d(1, 4, 3)
    with torch.no_grad():
        small.conv.weight.copy_(model.conv.weight[keep])
        small.conv.bias.copy_(model.conv.bias[keep])
    small.gamma = nn.Parameter(model.gamma[keep].detach().clone())
    small.offset = nn.Parameter(model.offset[keep].detach().clone(), requires_grad=False)
    small.shift = model.shift[keep].clone()
    save_model(small, arch, tmp_path / "out")
    description = json.loads((tmp_path / "out/model.json").read_text())
    assert list(description["layers"]) == ["conv"] and description["layers"]["conv"]["out_channels"] == 4
    assert description["tensors"] == {"gamma": [4, 1, 1], "offset": [4, 1, 1], "shift": [4, 1, 1]}

    loaded, _ = load_model(tmp_path / "out")
    assert loaded.gamma.requires_grad and not loaded.offset.requires_grad and "shift" in loaded.state_dict()
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(small.eval()(x), loaded(x))
        assert torch.equal(loaded(x), model(x)[:, keep])  # the kept channels compute what they did

    for key, bad, message in [
        ("tensors", {"gamma": [4, 1, 1], "scale": [4]}, "tensor 'scale' recorded in"),
        ("layers", {"conv": {"type": "Conv2d", "in_channels": 1}}, "layer 'conv' recorded in .* cannot be rebuilt"),
    ]:
        (tmp_path / "out/model.json").write_text(json.dumps({**description, key: bad}))
        with pytest.raises(DeploykitError, match=message):
            load_model(tmp_path / "out")
