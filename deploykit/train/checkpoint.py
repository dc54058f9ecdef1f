"""Model files: a tensors-only state_dict plus a JSON description that rebuilds the architecture.

Everything is written atomically and read with `weights_only=True`, so a checkpoint can never run code. A
model whose layers were reshaped after it was built (channel pruning) records, under "layers" in model.json,
the constructor arguments of every standard layer (convolutions, Linear, the norms, PReLU, Embedding) that
differs from the freshly built architecture, and under "tensors" the shape of any other parameter or buffer
that still differs (a custom module's own nn.Parameter, a layer-scale gamma); loading rebuilds the model (zoo
or factory), swaps in layers of those shapes and resizes those tensors before loading the weights.
"""

from __future__ import annotations

import json
import pickle
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from deploykit.errors import DeploykitError
from deploykit.files import atomic_path, atomic_write_json

CHECKPOINT_FILE = "model.pt"
ARCH_FILE = "model.json"
_ARCH_KEYS = ("name", "num_classes", "in_channels")

def _conv_args(m: nn.modules.conv._ConvNd) -> dict[str, Any]:
    return {
        "in_channels": m.in_channels,
        "out_channels": m.out_channels,
        "kernel_size": list(m.kernel_size),
        "stride": list(m.stride),
        "padding": m.padding if isinstance(m.padding, str) else list(m.padding),
        "dilation": list(m.dilation),
        "groups": m.groups,
        "bias": m.bias is not None,
        "padding_mode": m.padding_mode,
    }


def _conv_transpose_args(m: nn.modules.conv._ConvTransposeNd) -> dict[str, Any]:
    return {**_conv_args(m), "output_padding": list(m.output_padding)}


def _norm_args(m: nn.modules.batchnorm._NormBase) -> dict[str, Any]:
    """BatchNorm and InstanceNorm take the same arguments."""
    return {
        "num_features": m.num_features,
        "eps": m.eps,
        "momentum": m.momentum,
        "affine": m.affine,
        "track_running_stats": m.track_running_stats,
    }


# The constructor arguments that fix a layer's parameter shapes and behaviour, per layer type (exact types:
# a subclass may take other arguments, so its reshaped tensors go under "tensors" instead).
_LAYER_ARGS: dict[type[nn.Module], Callable[[Any], dict[str, Any]]] = {
    nn.Conv1d: _conv_args,
    nn.Conv2d: _conv_args,
    nn.Conv3d: _conv_args,
    nn.ConvTranspose1d: _conv_transpose_args,
    nn.ConvTranspose2d: _conv_transpose_args,
    nn.ConvTranspose3d: _conv_transpose_args,
    nn.Linear: lambda m: {"in_features": m.in_features, "out_features": m.out_features, "bias": m.bias is not None},
    nn.BatchNorm1d: _norm_args,
    nn.BatchNorm2d: _norm_args,
    nn.BatchNorm3d: _norm_args,
    nn.InstanceNorm1d: _norm_args,
    nn.InstanceNorm2d: _norm_args,
    nn.InstanceNorm3d: _norm_args,
    nn.LayerNorm: lambda m: {
        "normalized_shape": list(m.normalized_shape),
        "eps": m.eps,
        "elementwise_affine": m.elementwise_affine,
        "bias": m.bias is not None,
    },
    nn.GroupNorm: lambda m: {
        "num_groups": m.num_groups,
        "num_channels": m.num_channels,
        "eps": m.eps,
        "affine": m.affine,
    },
    nn.PReLU: lambda m: {"num_parameters": m.num_parameters},
    nn.Embedding: lambda m: {
        "num_embeddings": m.num_embeddings,
        "embedding_dim": m.embedding_dim,
        "padding_idx": m.padding_idx,
        "max_norm": m.max_norm,
        "norm_type": m.norm_type,
        "scale_grad_by_freq": m.scale_grad_by_freq,
        "sparse": m.sparse,
    },
}
_LAYER_TYPES = {cls.__name__: cls for cls in _LAYER_ARGS}

# What torch.load raises for a truncated, foreign or code-carrying file.
_LOAD_ERRORS = (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError)


def save_torch(obj: Any, path: Path) -> None:
    """torch.save to a temporary file beside `path`, renamed into place only when complete.

    Saved through a file object: given a path, torch names the archive's records after the (random) temporary
    file, so the same weights would give different bytes, and hashes, in every run.
    """
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(obj, f)


def load_torch(path: Path, what: str) -> Any:
    """torch.load(weights_only=True) on CPU; a missing or unreadable file becomes a DeploykitError naming `what`."""
    path = Path(path)
    if not path.is_file():
        raise DeploykitError(f"The {what} {path} does not exist: check the path or re-run the step that writes it.")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except _LOAD_ERRORS as exc:
        raise DeploykitError(
            f"The {what} {path} could not be read as a tensors-only torch file ({exc.__class__.__name__}): "
            "re-create it with torch.save(model.state_dict(), path)."
        ) from exc


def state_dict_from(obj: Any, path: Path, what: str) -> dict[str, torch.Tensor]:
    """The state_dict inside a loaded file: either the file's whole content or its "state_dict" entry."""
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not (isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values())):
        raise DeploykitError(
            f"The {what} {path} does not hold a state_dict: save one with torch.save(model.state_dict(), path)."
        )
    return obj


def save_model(model: nn.Module, arch: dict, directory: Path) -> dict[str, Path]:
    """Write directory/model.pt (the state_dict, CPU tensors) and directory/model.json (`arch`, plus what pruning
    reshaped: "layers" and "tensors", each only when not empty)."""
    directory = Path(directory)
    checkpoint, arch_path = directory / CHECKPOINT_FILE, directory / ARCH_FILE
    description = _description(arch)
    layers, tensors = _reshaped(model, description, arch_path)
    if layers:
        description["layers"] = layers
    if tensors:
        description["tensors"] = tensors
    save_torch({k: v.detach().cpu() for k, v in model.state_dict().items()}, checkpoint)
    atomic_write_json(arch_path, description)
    return {"checkpoint": checkpoint, "arch": arch_path}


def _description(arch: dict) -> dict[str, Any]:
    """What model.json records: a zoo model's name, classes, channels and options, or a factory and its kwargs."""
    if "factory" in arch:
        return {"factory": arch["factory"], "kwargs": dict(arch.get("kwargs", {})), "sha256": arch.get("sha256", "")}
    missing = [k for k in _ARCH_KEYS if k not in arch]
    if missing:
        raise DeploykitError(
            f"The model description lacks {', '.join(missing)}: pass name, num_classes and in_channels."
        )
    return {**{k: arch[k] for k in _ARCH_KEYS}, "options": dict(arch.get("options", {}))}


def _layer_spec(module: nn.Module) -> dict[str, Any] | None:
    describe = _LAYER_ARGS.get(type(module))
    return {"type": type(module).__name__, **describe(module)} if describe else None


def _reference(arch: dict) -> tuple[nn.Module, torch.device]:
    """A fresh build of `arch` for comparing shapes, and the device it is on: meta where the model builds there
    (no memory, no init cost), else the CPU."""
    from deploykit.sources.model import build_model
    from deploykit.usercode import load_ref

    if "factory" in arch:  # import the user's file outside the meta context: tensors made on import stay real
        load_ref(arch["factory"], "model.factory")
    try:
        with torch.device("meta"):
            return build_model(arch), torch.device("meta")
    except DeploykitError:  # a factory that needs real tensors (reads values, loads weights) while building
        return build_model(arch), torch.device("cpu")


def _reshaped(model: nn.Module, arch: dict, arch_path: Path) -> tuple[dict[str, dict[str, Any]], dict[str, list]]:
    """What of `model` differs from a fresh build of `arch`: the layers (constructor arguments, by module name),
    then the parameters and buffers that still differ once those layers are swapped in (shapes, by state_dict key).

    Modules and tensors the architecture does not have are left out: no rebuild could create them, and loading
    the state_dict then names the mismatch.
    """
    with torch.random.fork_rng(devices=[]):  # a build on the CPU must not move the RNG of the run that saves
        reference, device = _reference(arch)
        fresh = dict(reference.named_modules())
        layers = {}
        for name, module in model.named_modules():
            spec = _layer_spec(module)
            if spec is not None and name in fresh and spec != _layer_spec(fresh[name]):
                layers[name] = spec
        with torch.device(device):
            where = f"of the model saved to {arch_path}"
            _rebuild_layers(reference, layers, where, "keep it unpruned (ignored_layers in the prune stage).")
    rebuilt = reference.state_dict()
    tensors = {
        name: list(tensor.shape)
        for name, tensor in model.state_dict().items()
        if name in rebuilt and tensor.shape != rebuilt[name].shape
    }
    return layers, tensors


def _rebuild_layers(model: nn.Module, layers: dict[str, dict[str, Any]], where: str, fix: str) -> None:
    """Replace the named submodules of `model` by fresh layers with the recorded constructor arguments."""
    for name, spec in layers.items():
        args = dict(spec)
        cls = _LAYER_TYPES.get(args.pop("type", None))
        parent_name, _, child = name.rpartition(".")
        try:
            parent = model.get_submodule(parent_name)
            if cls is None or not hasattr(parent, child):
                raise AttributeError(name)
            # JSON turned the tuples into lists; torch layers keep tuples.
            layer = cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in args.items()})
        except (AttributeError, TypeError, ValueError) as exc:
            raise DeploykitError(
                f"The layer '{name}' {where} cannot be rebuilt ({exc.__class__.__name__}: {exc}): {fix}"
            ) from exc
        setattr(parent, child, layer)


def _resize_tensors(model: nn.Module, tensors: dict[str, list[int]], arch_path: Path) -> None:
    """Give each recorded parameter or buffer of `model` an empty tensor of its saved shape (same dtype, device
    and requires_grad), for load_state_dict to fill: the reshaped tensors no standard layer owns."""
    for name, shape in tensors.items():
        owner_name, _, attr = name.rpartition(".")
        try:
            owner = model.get_submodule(owner_name)
        except AttributeError:
            owner = None
        if owner is not None and owner._parameters.get(attr) is not None:
            old = owner._parameters[attr]
            empty = torch.empty(shape, dtype=old.dtype, device=old.device)
            owner._parameters[attr] = nn.Parameter(empty, requires_grad=old.requires_grad)
        elif owner is not None and owner._buffers.get(attr) is not None:
            old = owner._buffers[attr]
            owner._buffers[attr] = torch.empty(shape, dtype=old.dtype, device=old.device)  # keeps its persistence
        else:
            raise DeploykitError(
                f"The tensor '{name}' recorded in {arch_path} is not a parameter or buffer of the rebuilt model: "
                "re-run the stage that wrote it."
            )


def load_model(directory: Path) -> tuple[nn.Module, dict]:
    """Rebuild the model described by directory/model.json (a zoo model or the user's factory), reshape what
    pruning recorded, and load directory/model.pt into it (eval mode)."""
    from deploykit.sources.model import build_model  # the zoo imports every family; only loading needs it

    directory = Path(directory)
    arch_path = directory / ARCH_FILE
    try:
        arch = json.loads(arch_path.read_text())
    except FileNotFoundError:
        raise DeploykitError(
            f"The model description {arch_path} does not exist: point to a directory written by the train stage."
        ) from None
    except (OSError, ValueError) as exc:
        raise DeploykitError(
            f"The model description {arch_path} is not valid JSON ({exc}): re-run the stage that wrote it."
        ) from exc
    checkpoint = directory / CHECKPOINT_FILE
    state = state_dict_from(load_torch(checkpoint, "model checkpoint"), checkpoint, "model checkpoint")
    model = build_model(arch)
    _rebuild_layers(model, arch.get("layers", {}), f"recorded in {arch_path}", "re-run the stage that wrote it.")
    _resize_tensors(model, arch.get("tensors", {}), arch_path)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise DeploykitError(
            f"The model checkpoint {checkpoint} does not match the architecture in {arch_path}: "
            "re-run the stage that wrote them."
        ) from exc
    return model.eval(), arch


def rng_state() -> dict[str, Any]:
    """Every global RNG (torch, CUDA, numpy, python) as tensors and numbers, so it saves with weights_only."""
    _, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    version, py_state, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "python": {"version": version, "state": torch.tensor(py_state, dtype=torch.int64), "gauss_next": gauss_next},
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` captured."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    keys = n["keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, n["pos"], n["has_gauss"], n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"].tolist()), p["gauss_next"]))
