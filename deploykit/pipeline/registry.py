"""Stage base class and the registry that maps a pipeline file's `stage:` names to classes.

Adding a stage means writing one class with a config model and a `run()`, decorated with
`@register("name")`; the engine and the config loader never change. Built-in stages are found the way
plugins are, through the `deploykit.stages` entry-point group (pyproject.toml), so this module imports
no stage and no stage module imports the engine's side.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Union, get_args, get_origin

from pydantic import BaseModel, Discriminator, Tag

from deploykit.artifacts import StageResult
from deploykit.errors import DeploykitError

if TYPE_CHECKING:
    from deploykit.pipeline.context import StageContext

_REGISTRY: dict[str, type[Stage]] = {}
_plugins_loaded = False
_BUILT_IN = "train"  # one built-in stage: its absence means the package's entry points were never installed
METHOD = "method"  # the key that picks a stage's settings model when it has one per method


class Stage(ABC):
    """One step of a pipeline. Subclasses set `Config` and implement `run`."""

    Config: ClassVar[Any]  # a settings model, or one per method joined by `by_method`
    type_name: ClassVar[str] = ""
    # True when every torchrun process must run the stage (training); otherwise rank 0 runs it alone.
    distributed: ClassVar[bool] = False

    def __init__(self, config: BaseModel) -> None:
        self.config = config

    def needs_torch_model(self) -> bool:
        """True when the stage cannot run without a PyTorch model (so not after `model: {onnx: ...}`)."""
        return False

    @abstractmethod
    def run(self, ctx: StageContext) -> StageResult:
        """Do the work, writing artifacts under `ctx.out_dir`."""


def by_method(*variants: type[BaseModel]) -> Any:
    """A stage `Config` with one settings model per method: a union discriminated on the `method` key.

    Each variant declares `method: Literal["<name>"] = "<name>"`; an entry without `method` gets the first.
    """
    default = _method_name(variants[0])

    def method_of(value: Any) -> Any:
        return value.get(METHOD, default) if isinstance(value, dict) else getattr(value, METHOD, default)

    tagged = tuple(Annotated[v, Tag(_method_name(v))] for v in variants)
    return Annotated[Union[tagged], Discriminator(method_of)]  # noqa: UP007


def method_variants(config: Any) -> dict[str, type[BaseModel]]:
    """The settings model of each method of a `by_method` Config, the default first; {} for a single model."""
    if get_origin(config) is not Annotated:
        return {}
    return {tag.tag: model for model, tag in map(get_args, get_args(get_args(config)[0]))}


def _method_name(variant: type[BaseModel]) -> str:
    return variant.model_fields[METHOD].default


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
    """All registered stages: the built-in ones and those of installed plugins (entry-point group `deploykit.stages`)."""
    global _plugins_loaded
    if not _plugins_loaded:
        _plugins_loaded = True
        for ep in entry_points(group="deploykit.stages"):
            ep.load()
    if _BUILT_IN not in _REGISTRY:
        raise DeploykitError(
            "deploykit's built-in stages are not registered: install the package (pip install -e .) so that its "
            "entry points exist."
        )
    return dict(_REGISTRY)
