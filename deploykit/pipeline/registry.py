"""Stage base class and the registry that maps a pipeline file's `stage:` names to classes.

Adding a stage means writing one class with a config model and a `run()`, decorated with
`@register("name")`; the engine and the config loader never change.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel

if TYPE_CHECKING:
    from deploykit.pipeline.context import StageContext

_REGISTRY: dict[str, type[Stage]] = {}
_plugins_loaded = False


@dataclass
class StageResult:
    """What a stage produced: artifact roles mapped to file names inside its output folder, and metrics."""

    artifacts: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)


class Stage(ABC):
    """One step of a pipeline. Subclasses set `Config` and implement `run`."""

    Config: ClassVar[type[BaseModel]]
    type_name: ClassVar[str] = ""
    # True when every torchrun process must run the stage (training); otherwise rank 0 runs it alone.
    distributed: ClassVar[bool] = False

    def __init__(self, config: BaseModel) -> None:
        self.config = config

    @abstractmethod
    def run(self, ctx: StageContext) -> StageResult:
        """Do the work, writing artifacts under `ctx.out_dir`."""


def register(name: str):
    """Class decorator: make a stage available to pipeline files as `stage: name`."""

    def wrap(cls: type[Stage]) -> type[Stage]:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"stage name {name!r} is registered twice")
        cls.type_name = name
        _REGISTRY[name] = cls
        return cls

    return wrap


def stage_types() -> dict[str, type[Stage]]:
    """All registered stages: the built-in ones and those of installed plugins."""
    global _plugins_loaded
    import deploykit.stages  # noqa: F401  (registers the built-in stages)

    if not _plugins_loaded:  # a package can add stages through the `deploykit.stages` entry-point group
        _plugins_loaded = True
        for ep in entry_points(group="deploykit.stages"):
            ep.load()
    return dict(_REGISTRY)
