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
from deploykit.pipeline.registry import METHOD, Stage, by_method, method_variants, stage_types
from deploykit.sources.model import SOURCE_TAGS, FactorySource, OnnxSource, ZooSource

_SOURCES = {"zoo": ZooSource, "factory": FactorySource, "onnx": OnnxSource}


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
        """This entry's settings as the stage's own settings model (the one of its method, for a stage with methods),
        with the same fields set as the file set (a recipe fills only the others)."""
        model = type(self).__bases__[1]  # entry models derive from (StageEntry, the settings model)
        return model.model_validate(self.model_dump(exclude={"stage", "name"}, exclude_unset=True))


def stage_entries() -> dict[str, Any]:
    """Per registered stage, the model of its entries: its settings plus `stage:` (the tag) and `name:`; for a stage
    with methods, one such model per method, in a union discriminated on `method:` (see `by_method`)."""
    return _stage_entries(tuple(sorted(stage_types().items())))


@functools.cache
def _stage_entries(registered: tuple) -> dict[str, Any]:
    entries: dict[str, Any] = {}
    for type_name, cls in registered:
        variants = method_variants(cls.Config)
        if variants:
            models = (_entry(type_name, cls, settings, method) for method, settings in variants.items())
            entries[type_name] = by_method(*models)
        else:
            entries[type_name] = _entry(type_name, cls, cls.Config)
    return entries


def _entry(type_name: str, cls: type[Stage], settings: type[BaseModel], method: str = "") -> type[StageEntry]:
    tag = (Literal[type_name], Field(..., description=(cls.__doc__ or type_name).strip().splitlines()[0]))
    name = f"{type_name.title()}{method.capitalize()}Entry"
    return create_model(name, __base__=(StageEntry, settings), stage=tag)  # type: ignore[call-overload]


def pipeline_model() -> type[PipelineBase]:
    """The pipeline model; `stages` is a list discriminated on the `stage:` key (then on `method:`, for a stage
    with methods)."""
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


_MAX_INT = 2**31 - 1  # no count, size or seed in a pipeline needs more; larger ones are typos that run for days


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
        line = lines[path] = node.start_mark.line + 1
        if isinstance(node, yaml.MappingNode):
            seen: dict[str, int] = {}
            for key_node, value_node in node.value:
                key, key_line = key_node.value, key_node.start_mark.line + 1
                if key in seen:  # YAML allows it and keeps the last value: a silent change of meaning
                    raise DeploykitError(
                        f"{source}:{key_line}: {_format_loc(path + (key,))} is given twice (first at line "
                        f"{seen[key]}); keep one of them."
                    )
                seen[key] = key_line
                child = path + (key,)
                walk(value_node, child)
                lines[child] = key_line
        elif isinstance(node, yaml.ScalarNode) and node.tag == "tag:yaml.org,2002:int":
            if abs(int(yaml.safe_load(node.value))) > _MAX_INT:
                raise DeploykitError(
                    f"{source}:{line}: {_format_loc(path)} is {node.value}, beyond any sensible setting; "
                    "use a number below 2**31."
                )
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


def _split(loc: tuple) -> tuple[tuple[str, ...], tuple]:
    """The tags in a pydantic error location, and the location in the file.

    pydantic puts the stage type, and for a stage with methods the method, right after the list index
    (stages, 4, quantize, dynamic, percentile), and the model source's kind after `model` (model, factory,
    kwargs); the file has no such levels.
    """
    if len(loc) >= 2 and loc[0] == "model" and loc[1] in SOURCE_TAGS:
        return (), loc[:1] + loc[2:]
    if len(loc) < 3 or loc[0] != "stages" or loc[2] not in stage_entries():
        return (), loc
    n = 2 if len(loc) > 3 and method_variants(stage_entries()[loc[2]]) else 1
    return loc[2 : 2 + n], loc[:2] + loc[2 + n :]


def _line_for(path: tuple, lines: dict[tuple, int]) -> int | None:
    """The line of the deepest part of `path` that exists in the file."""
    while path and path not in lines:
        path = path[:-1]
    return lines.get(path)


def _allowed_keys(loc: tuple) -> list[str]:
    """Known keys at the place of an unknown-key error, for a 'did you mean' hint."""
    tags, path = _split(loc)
    model: Any = pipeline_model()
    parts = path[:-1]
    if tags:
        entry = stage_entries()[tags[0]]
        model, parts = (method_variants(entry)[tags[1]] if len(tags) > 1 else entry), parts[2:]
    if loc[:1] == ("model",) and len(loc) > 2 and loc[1] in SOURCE_TAGS:  # the source the file chose
        model, parts = _SOURCES[loc[1]], loc[2:-1]
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


def _explain(err: dict) -> tuple[tuple, str]:
    """The place in the file an error is about, and the sentence that explains it."""
    loc, kind = tuple(err["loc"]), err["type"]
    tags, path = _split(loc)
    if kind == "extra_forbidden":
        return path, _unknown_key(loc)
    if kind in ("union_tag_invalid", "union_tag_not_found") and tags:  # `method:` of a stage with methods
        return path + (METHOD,), _unknown_method(path, tags[0], err.get("ctx", {}).get("tag"))
    if kind == "union_tag_invalid":
        given = err.get("ctx", {}).get("tag", "?")
        return path, f"{_format_loc(path)}: unknown stage {given!r}; {_hint(given, sorted(stage_types()))}"
    if kind == "union_tag_not_found":
        known = ", ".join(sorted(stage_types()))
        return path, f"{_format_loc(path)}: each stage needs a `stage:` key naming its type ({known})."
    if kind == "missing":
        return path, f"{_format_loc(path)}: required key is missing."
    got = err.get("input")
    shown = "" if isinstance(got, (dict, list)) else f" (got {json.dumps(got, default=str)})"
    msg = err["msg"].removeprefix("Value error, ")
    return path, f"{_format_loc(path)}: {msg[0].lower() + msg[1:]}{shown}."


def _hint(given: Any, known: list[str]) -> str:
    close = difflib.get_close_matches(str(given), known, n=1)
    return f"did you mean {close[0]!r}?" if close else f"choose one of {', '.join(known)}."


def _unknown_key(loc: tuple) -> str:
    """An unknown key, with the method it is unknown for when it is one of a stage's own keys."""
    tags, path = _split(loc)
    key = loc[-1]
    method = tags[1] if len(tags) == 2 and len(path) == 3 else None  # a key of the stage entry itself
    variants = method_variants(stage_entries()[tags[0]]) if method else {}
    owners = [name for name, model in variants.items() if key in model.model_fields]
    close = difflib.get_close_matches(str(key), _allowed_keys(loc), n=1)
    if owners:
        hint = f"it is a setting of {' and '.join(owners)}: remove it or change the method."
    elif close:
        hint = f"did you mean {close[0]!r}?"
    else:
        hint = "remove it or check the spelling (`deploykit schema` lists every key)."
    of = f" for method {method!r}" if method else ""
    return f"{_format_loc(path[:-1])}: unknown key {key!r}{of}; {hint}"


def _unknown_method(path: tuple, stage: str, given: Any) -> str:
    known = list(method_variants(stage_entries()[stage]))
    shown = "null" if given is None else repr(given)
    return f"{_format_loc(path + (METHOD,))}: unknown method {shown} for stage {stage}; {_hint(given, known)}"


def _check_stages_fit_source(cfg: PipelineBase, source: str, lines: dict[tuple, int]) -> None:
    """A stage that needs a PyTorch model cannot follow an ONNX source: refused before any work."""
    if cfg.model.torch:
        return
    for i, entry in enumerate(cfg.stages):  # type: ignore[attr-defined]
        if stage_types()[entry.stage](entry.settings()).needs_torch_model():
            line = lines.get(("stages", i))
            raise DeploykitError(
                f"{source}:{line}: stages[{i}]: stage {entry.stage_name!r} needs a PyTorch model, but the model is "
                f"the ONNX file {cfg.model.onnx.name}: remove the stage, or give model: factory (your PyTorch code) "
                "instead."
            )


def parse_pipeline(
    raw: Any, source: str = "<pipeline>", lines: dict[tuple, int] | None = None, base_dir: Path | None = None
) -> PipelineBase:
    """Validate a parsed pipeline; raise DeploykitError with the first problem as one sentence. Relative paths to
    the user's files (model factory, ONNX file, data, metric, loss) start at `base_dir` (default: the cwd)."""
    if not isinstance(raw, dict):
        raise DeploykitError(f"{source}: a pipeline file must be a mapping with name, data, model and stages.")
    try:
        cfg = pipeline_model().model_validate(raw, context={"base_dir": base_dir or Path.cwd()})
    except ValidationError as e:
        # A misspelt key also makes the right one "missing": report the misspelling, it explains both.
        err = sorted(e.errors(), key=lambda x: x["type"] not in ("extra_forbidden", "union_tag_invalid"))[0]
        path, sentence = _explain(err)
        line = _line_for(path, lines or {})
        where = f"{source}:{line}" if line else source
        more = f" (and {e.error_count() - 1} more problem(s))" if e.error_count() > 1 else ""
        raise DeploykitError(f"{where}: {sentence}{more}") from None
    except DeploykitError as e:  # a bad model name or option, found while checking the model
        lines = lines or {}
        named = [k for k in lines if len(k) == 3 and k[:2] == ("model", "options") and f"'{k[2]}'" in str(e)]
        key = next((("model", k) for k in ("factory", "onnx") if ("model", k) in lines), ("model", "name"))
        line = lines.get(named[0] if named else key)
        raise DeploykitError(f"{source}:{line}: {e}" if line else f"{source}: {e}") from None
    _check_stages_fit_source(cfg, source, lines or {})
    return cfg


def load_pipeline(path: str | Path) -> PipelineBase:
    """Read and validate a pipeline file."""
    path = Path(path)
    if not path.is_file():
        raise DeploykitError(f"Pipeline file '{path}' does not exist: pass the path of a YAML file, e.g. pipelines/quickstart.yaml.")
    raw, lines = _load_yaml_with_lines(path.read_text(encoding="utf-8"), str(path))
    return parse_pipeline(raw, str(path), lines, base_dir=path.resolve().parent)
