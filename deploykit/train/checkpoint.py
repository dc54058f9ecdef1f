"""Model files: a tensors-only state_dict plus a JSON description that rebuilds the architecture.

Everything is written atomically and read with `weights_only=True`, so a checkpoint can never run code. A
model whose layers were reshaped after it was built (channel pruning) records, under "layers" in model.json,
the constructor arguments of every Conv2d, Linear and BatchNorm2d that differs from the freshly built
architecture; loading rebuilds the zoo model and swaps in layers of those shapes before loading the weights.
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

# The constructor arguments that fix a layer's parameter shapes and behaviour, per layer type.
_LAYER_ARGS: dict[type[nn.Module], Callable[[Any], dict[str, Any]]] = {
    nn.Conv2d: lambda m: {
        "in_channels": m.in_channels,
        "out_channels": m.out_channels,
        "kernel_size": list(m.kernel_size),
        "stride": list(m.stride),
        "padding": m.padding if isinstance(m.padding, str) else list(m.padding),
        "dilation": list(m.dilation),
        "groups": m.groups,
        "bias": m.bias is not None,
        "padding_mode": m.padding_mode,
    },
    nn.Linear: lambda m: {"in_features": m.in_features, "out_features": m.out_features, "bias": m.bias is not None},
    nn.BatchNorm2d: lambda m: {
        "num_features": m.num_features,
        "eps": m.eps,
        "momentum": m.momentum,
        "affine": m.affine,
        "track_running_stats": m.track_running_stats,
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
    """Write directory/model.pt (the state_dict, CPU tensors) and directory/model.json (`arch`)."""
    missing = [k for k in _ARCH_KEYS if k not in arch]
    if missing:
        raise DeploykitError(
            f"The model description lacks {', '.join(missing)}: pass name, num_classes and in_channels."
        )
    directory = Path(directory)
    checkpoint, arch_path = directory / CHECKPOINT_FILE, directory / ARCH_FILE
    description = {**{k: arch[k] for k in _ARCH_KEYS}, "options": dict(arch.get("options", {}))}
    layers = _reshaped_layers(model, description)
    if layers:
        description["layers"] = layers
    save_torch({k: v.detach().cpu() for k, v in model.state_dict().items()}, checkpoint)
    atomic_write_json(arch_path, description)
    return {"checkpoint": checkpoint, "arch": arch_path}


def _layer_spec(module: nn.Module) -> dict[str, Any] | None:
    describe = _LAYER_ARGS.get(type(module))
    return {"type": type(module).__name__, **describe(module)} if describe else None


def _reshaped_layers(model: nn.Module, arch: dict) -> dict[str, dict[str, Any]]:
    """Layers of `model` whose constructor arguments differ from a fresh build of `arch`, by module name.

    Modules the architecture does not have are left out: no rebuild could create them, and loading the
    state_dict then names the mismatch.
    """
    from deploykit.zoo import build_model

    with torch.device("meta"):  # shapes only: no memory, no init cost
        reference = build_model(arch)
    fresh = dict(reference.named_modules())
    layers = {}
    for name, module in model.named_modules():
        spec = _layer_spec(module)
        if spec is not None and name in fresh and spec != _layer_spec(fresh[name]):
            layers[name] = spec
    return layers


def _rebuild_layers(model: nn.Module, layers: dict[str, dict[str, Any]], arch_path: Path) -> None:
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
                f"The layer '{name}' recorded in {arch_path} cannot be rebuilt ({exc.__class__.__name__}: {exc}): "
                "re-run the stage that wrote it."
            ) from exc
        setattr(parent, child, layer)


def load_model(directory: Path) -> tuple[nn.Module, dict]:
    """Rebuild the zoo model described by directory/model.json and load directory/model.pt into it (eval mode)."""
    from deploykit.zoo import build_model  # the zoo imports every family; only loading needs it

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
    _rebuild_layers(model, arch.get("layers", {}), arch_path)
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
