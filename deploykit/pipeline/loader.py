"""The pipeline file: pydantic models built from the stage registry, YAML loading with line numbers.

A pipeline file names a run, its dataset and model, and lists stages:

    name: quickstart
    data: {dataset: digits, image_size: 32}
    model: {name: resnet18, options: {stem: cifar, width_mult: 0.25}}
    stages:
      - stage: train
        epochs: 8

Every mistake is reported before any work starts, as one sentence with the file and line.
"""

from __future__ import annotations

import difflib
import functools
import json
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator

from deploykit.errors import DeploykitError
from deploykit.pipeline.config import PipelineBase, check_safe_name
from deploykit.pipeline.registry import stage_types


class StageEntry(BaseModel):
    """Fields every stage entry has besides its own settings."""

    model_config = ConfigDict(extra="forbid")
    name: str | None = Field(None, description="Folder name of this stage's output; defaults to the stage type.")

    @field_validator("name")
    @classmethod
    def _safe(cls, v: str | None) -> str | None:
        return None if v is None else check_safe_name(v, "stage name")

    @property
    def stage_name(self) -> str:
        return self.name or self.stage  # type: ignore[attr-defined]

    def settings(self) -> BaseModel:
        """This entry's settings as the stage's own config model."""
        cls = stage_types()[self.stage].Config  # type: ignore[attr-defined]
        return cls.model_validate(self.model_dump(exclude={"stage", "name"}))


def stage_entries() -> dict[str, type[StageEntry]]:
    """One entry model per registered stage: its settings plus `stage:` (the tag) and `name:`."""
    return _stage_entries(tuple(sorted(stage_types().items())))


@functools.cache
def _stage_entries(registered: tuple) -> dict[str, type[StageEntry]]:
    entries = {}
    for type_name, cls in registered:
        tag = (Literal[type_name], Field(..., description=(cls.__doc__ or type_name).strip().splitlines()[0]))
        entries[type_name] = create_model(f"{type_name.title()}Entry", __base__=(StageEntry, cls.Config), stage=tag)  # type: ignore[call-overload]
    return entries


def pipeline_model() -> type[PipelineBase]:
    """The pipeline model; `stages` is a list discriminated on the `stage:` key."""
    return _pipeline_model(tuple(stage_entries().values()))


@functools.cache
def _pipeline_model(entries: tuple) -> type[PipelineBase]:
    entry = Annotated[Union[entries], Field(discriminator="stage")]  # noqa: UP007
    return create_model(
        "Pipeline",
        __base__=PipelineBase,
        stages=(list[entry], Field(..., min_length=1, description="Stages, run in order.")),  # type: ignore[valid-type]
    )


def json_schema() -> dict[str, Any]:
    return pipeline_model().model_json_schema()


# ---- loading ------------------------------------------------------------------------------------


def _load_yaml_with_lines(text: str, source: str) -> tuple[Any, dict[tuple, int]]:
    """Parse YAML and remember the line of every key and list item, keyed by its path."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark else source
        problem = getattr(e, "problem", None) or str(e)
        raise DeploykitError(f"{where}: the file is not valid YAML ({problem}); fix the syntax at that line.") from None
    lines: dict[tuple, int] = {}

    def walk(node: yaml.Node, path: tuple) -> None:
        lines[path] = node.start_mark.line + 1
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                child = path + (key_node.value,)
                walk(value_node, child)
                lines[child] = key_node.start_mark.line + 1
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                walk(item, path + (i,))

    if root is not None:
        walk(root, ())
    return yaml.safe_load(text), lines


def _format_loc(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def _strip_tag(loc: tuple) -> tuple:
    """pydantic puts the stage type right after the list index (stages, 0, train, ...); the file has no such level."""
    if len(loc) >= 3 and loc[0] == "stages" and loc[2] in stage_entries():
        return loc[:2] + loc[3:]
    return loc


def _line_for(loc: tuple, lines: dict[tuple, int]) -> int | None:
    """The line of the deepest part of `loc` that exists in the file."""
    path = _strip_tag(loc)
    while path and path not in lines:
        path = path[:-1]
    return lines.get(path)


def _allowed_keys(loc: tuple) -> list[str]:
    """Known keys at the place of an unknown-key error, for a 'did you mean' hint."""
    model: Any = pipeline_model()
    parts = loc[:-1]
    if len(parts) >= 3 and parts[0] == "stages" and parts[2] in stage_entries():
        model, parts = stage_entries()[parts[2]], parts[3:]
    for part in parts:
        if isinstance(part, int):
            continue
        field = getattr(model, "model_fields", {}).get(part)
        model = _inner_model(field.annotation) if field else None
    return sorted(getattr(model, "model_fields", {}))


def _inner_model(annotation: Any) -> Any:
    """The BaseModel inside Optional[...] / list[...] annotations, if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = _inner_model(arg)
        if found is not None:
            return found
    return None


def _explain(err: dict) -> str:
    loc, kind = tuple(err["loc"]), err["type"]
    if kind == "extra_forbidden":
        key = loc[-1]
        close = difflib.get_close_matches(str(key), _allowed_keys(loc), n=1)
        hint = f"did you mean {close[0]!r}?" if close else "remove it or check the spelling (`deploykit schema` lists every key)."
        return f"{_format_loc(_strip_tag(loc)[:-1])}: unknown key {key!r}; {hint}"
    if kind == "union_tag_invalid":
        given = err.get("ctx", {}).get("tag", "?")
        known = sorted(stage_types())
        close = difflib.get_close_matches(str(given), known, n=1)
        hint = f"did you mean {close[0]!r}?" if close else f"choose one of {', '.join(known)}."
        return f"{_format_loc(loc)}: unknown stage {given!r}; {hint}"
    if kind == "union_tag_not_found":
        return f"{_format_loc(loc)}: each stage needs a `stage:` key naming its type ({', '.join(sorted(stage_types()))})."
    if kind == "missing":
        return f"{_format_loc(_strip_tag(loc))}: required key is missing."
    got = err.get("input")
    shown = "" if isinstance(got, (dict, list)) else f" (got {json.dumps(got, default=str)})"
    msg = err["msg"].removeprefix("Value error, ")
    return f"{_format_loc(_strip_tag(loc))}: {msg[0].lower() + msg[1:]}{shown}."


def parse_pipeline(raw: Any, source: str = "<pipeline>", lines: dict[tuple, int] | None = None) -> PipelineBase:
    """Validate a parsed pipeline; raise DeploykitError with the first problem as one sentence."""
    if not isinstance(raw, dict):
        raise DeploykitError(f"{source}: a pipeline file must be a mapping with name, data, model and stages.")
    try:
        return pipeline_model().model_validate(raw)
    except ValidationError as e:
        # A misspelt key also makes the right one "missing": report the misspelling, it explains both.
        err = sorted(e.errors(), key=lambda x: x["type"] not in ("extra_forbidden", "union_tag_invalid"))[0]
        line = _line_for(tuple(err["loc"]), lines or {})
        where = f"{source}:{line}" if line else source
        more = f" (and {e.error_count() - 1} more problem(s))" if e.error_count() > 1 else ""
        raise DeploykitError(f"{where}: {_explain(err)}{more}") from None
    except DeploykitError as e:  # a bad model name or option, found while checking the model
        lines = lines or {}
        named = [k for k in lines if len(k) == 3 and k[:2] == ("model", "options") and f"'{k[2]}'" in str(e)]
        line = lines.get(named[0] if named else ("model", "name"))
        raise DeploykitError(f"{source}:{line}: {e}" if line else f"{source}: {e}") from None


def load_pipeline(path: str | Path) -> PipelineBase:
    """Read and validate a pipeline file."""
    path = Path(path)
    if not path.is_file():
        raise DeploykitError(f"Pipeline file '{path}' does not exist: pass the path of a YAML file, e.g. pipelines/quickstart.yaml.")
    raw, lines = _load_yaml_with_lines(path.read_text(encoding="utf-8"), str(path))
    return parse_pipeline(raw, str(path), lines)
