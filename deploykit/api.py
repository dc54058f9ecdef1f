"""The Python face of deploykit: `deploykit.optimize(...)` runs a pipeline on your own model, data and metric.

    import deploykit
    result = deploykit.optimize("pipeline.yaml", model=build, data=(train_ds, val_ds), metric=miou)
    result.deployable.path, result.deployable.runtime, result.report_path, result.metrics("benchmark")

It is the engine `deploykit optimize` runs, with the same cache: an object given here replaces the pipeline
file's `model:` factory, its data (as `dataset: python`), or its metric/loss. A function or class importable from
a module (not `__main__`) is recorded by its import path, so the run resumes in a new process; anything else (a
module instance, datasets, a function defined in a notebook) lives in this process only and enters the cache
keys by a digest of its code or content.
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from deploykit.artifacts import StageRecord, deployable
from deploykit.errors import DeploykitError
from deploykit.usercode import register_object

__all__ = ["Deployable", "Result", "optimize"]


@dataclass(frozen=True)
class Deployable:
    """The model the run picked to serve: its file, the runtime it runs on, and why."""

    path: Path
    runtime: str
    stage: str
    role: str
    reason: str


@dataclass
class Result:
    """What `optimize` returns: the run folder, each stage's outcome, and the picked model."""

    run_dir: Path
    stages: list[Any] = field(default_factory=list)  # engine StageOutcome rows, in order
    deployable: Deployable | None = None

    @property
    def report_path(self) -> Path | None:
        """The report's markdown file, when the pipeline has a report stage."""
        found = next((o.directory / "report.md" for o in self.stages if o.type == "report"), None)
        return found if found is not None and found.is_file() else None

    def metrics(self, stage: str) -> dict[str, Any]:
        """The metrics a stage (by its name in the pipeline) recorded in its meta.json."""
        for outcome in self.stages:
            if outcome.name == stage:
                return dict(outcome.metrics)
        names = ", ".join(o.name for o in self.stages)
        raise DeploykitError(f"The run has no stage named {stage!r}: choose one of {names}.")


def optimize(
    pipeline: str | Path | dict[str, Any],
    *,
    model: nn.Module | Callable[..., nn.Module] | str | None = None,
    model_kwargs: dict[str, Any] | None = None,
    data: tuple[Any, Any] | Callable[..., tuple[Any, Any]] | str | None = None,
    metric: Callable[[torch.Tensor, torch.Tensor], float] | str | None = None,
    metric_name: str | None = None,
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | str | None = None,
    runs_dir: str | Path | None = None,
    force: Iterable[str] = (),
    until: str | None = None,
    progress: bool = False,
) -> Result:
    """Run a pipeline (a YAML file, or the same content as a dict) with your model, data and metric.

    model: an nn.Module, a function or class returning one (called with `model_kwargs`), or 'file.py:build'.
    data: (train, val) datasets of (input, target) pairs, a function returning them, or 'file.py:build'.
    metric: f(outputs, targets) -> float over the whole validation split, higher is better (read as a fraction:
        budgets are in points, 100 x its difference); named `metric_name` or the function's name. Giving a metric
        makes the task `custom` unless the pipeline says classification.
    loss: f(outputs, targets) -> scalar tensor, used by every stage that trains.
    Relative paths in a pipeline file start at its folder; in a dict, at the working directory.
    """
    from deploykit.pipeline.engine import read_meta, run_pipeline
    from deploykit.pipeline.loader import _load_yaml_with_lines, parse_pipeline
    from deploykit.progress import Reporter

    raw, source, lines, base = _read(pipeline, _load_yaml_with_lines)
    if model is not None:
        raw["model"] = {"factory": _ref(model, "model"), "kwargs": dict(model_kwargs or {})}
    elif model_kwargs:
        raise DeploykitError("model_kwargs was given without model: pass the factory they are for.")
    if data is not None:
        raw["data"] = {**_kept_data_keys(raw.get("data") or {}), "dataset": "python", "factory": _data_ref(data)}
    if metric is not None:
        raw["metric"] = {"function": _ref(metric, "metric"), "name": metric_name or _name(metric)}
        raw.setdefault("task", "custom")
    if loss is not None:
        raw["loss"] = _ref(loss, "loss")
    if runs_dir is not None:
        raw["runs_dir"] = str(runs_dir)
    cfg = parse_pipeline(raw, source, lines, base_dir=base)
    with Reporter(enabled=progress) as reporter:
        outcomes = run_pipeline(cfg, force=force, until=until, reporter=reporter)
    records = [StageRecord(o.name, o.type, o.directory, read_meta(o.directory) or {}) for o in outcomes]
    picked = deployable(records)
    chosen = (
        Deployable(picked.path, picked.runs_on, picked.stage, picked.role, picked.why) if picked is not None else None
    )
    return Result(run_dir=Path(cfg.runs_dir) / cfg.name, stages=outcomes, deployable=chosen)


def _read(pipeline: str | Path | dict[str, Any], load_yaml: Callable) -> tuple[dict, str, dict, Path]:
    if isinstance(pipeline, dict):
        return dict(pipeline), "<pipeline dict>", {}, Path.cwd()
    path = Path(pipeline)
    if not path.is_file():
        raise DeploykitError(f"Pipeline file '{path}' does not exist: pass the path of a YAML file or a dict.")
    raw, lines = load_yaml(path.read_text(encoding="utf-8"), str(path))
    if not isinstance(raw, dict):
        raise DeploykitError(f"{path}: a pipeline file must be a mapping with name, data, model and stages.")
    return raw, str(path), lines, path.resolve().parent


def _kept_data_keys(data: dict[str, Any]) -> dict[str, Any]:
    """The data settings that still apply when the datasets come from Python (the rest describe other sources)."""
    return {k: v for k, v in data.items() if k in ("normalize", "val_fraction", "seed")}


def _name(obj: Any) -> str:
    return getattr(obj, "__name__", type(obj).__name__)


def _importable(obj: Any) -> str | None:
    """'module:qualname' when another process can import `obj` by that name (not __main__, not a local)."""
    module, qualname = getattr(obj, "__module__", None), getattr(obj, "__qualname__", None)
    if not module or not qualname or module == "__main__" or "<" in qualname or module.startswith("deploykit_user."):
        return None
    try:
        found = importlib.util.find_spec(module) is not None  # by the import system, not just this process's dict
    except (ImportError, ValueError):  # a name runpy or exec made up, a module without a spec
        found = False
    return f"{module}:{qualname}" if found else None


def _ref(obj: Any, what: str) -> str:
    """A reference for a pipeline key: a string as given, an importable function by name, else an in-process
    object with a digest of its code (a module instance: its class's code and its weights)."""
    if isinstance(obj, str):
        return obj
    if isinstance(obj, nn.Module):
        digest = hashlib.sha256(_code_of(type(obj)).encode())
        for name, tensor in sorted(obj.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        return register_object(obj, digest.hexdigest())
    if not callable(obj):
        raise DeploykitError(f"{what} must be a callable or a 'file.py:name' reference, not a {type(obj).__name__}.")
    return _importable(obj) or register_object(obj, hashlib.sha256(_code_of(obj).encode()).hexdigest())


def _code_of(obj: Any) -> str:
    """The source of a function or class where Python can find it, else its qualified name (a digest of last
    resort: editing such an object in place is not seen by the cache)."""
    try:
        return inspect.getsource(obj)
    except (OSError, TypeError):
        return f"{getattr(obj, '__module__', '')}.{getattr(obj, '__qualname__', repr(obj))}"


def _data_ref(data: Any) -> str:
    """Datasets as a data factory reference; a (train, val) pair is hashed by its content."""
    if isinstance(data, str) or (callable(data) and not isinstance(data, tuple)):
        return _ref(data, "data")
    if not (isinstance(data, Sequence) and len(data) == 2):
        raise DeploykitError(
            "data must be (train, val) datasets, a function returning them, or 'file.py:build', not a "
            f"{type(data).__name__}."
        )
    train, val = data
    digest = hashlib.sha256()
    for split in (train, val):
        digest.update(_dataset_digest(split).encode())
    pair = (train, val)
    return register_object(lambda: pair, digest.hexdigest(), name="datasets")


_MAX_HASHED_ITEMS = 512  # beyond this many samples per split, the length and an even spread of samples


def _dataset_digest(dataset: Any) -> str:
    """A digest of a dataset's length and samples (an evenly spaced subset of big ones)."""
    digest = hashlib.sha256(str(len(dataset)).encode())
    n = len(dataset)
    step = max(1, n // _MAX_HASHED_ITEMS)
    for index in range(0, n, step):
        for part in dataset[index]:
            digest.update(torch.as_tensor(part).detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()
