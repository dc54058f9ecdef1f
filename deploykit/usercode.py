"""User code a pipeline names: `file.py:attr` (a path, relative to the pipeline file) or `package.module:attr`.

Importing user code runs it. Only the references a pipeline file (or a Python API call) names are ever imported,
and a reference is resolved to an absolute file path when the pipeline is loaded, so every later process (the
benchmark workers, a resumed run) imports the same file. The file's sha256 goes into the cache keys: editing
the user's model, data or metric re-runs what depends on it.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from deploykit.errors import DeploykitError
from deploykit.files import sha256_file

OBJECT_PREFIX = "python-object:"  # a Python object handed to deploykit.optimize, alive in this process only
_OBJECTS: dict[str, Any] = {}
_MODULE_PATH = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
_ATTR_PATH = _MODULE_PATH  # `build` or `Models.build`


def register_object(obj: Any, digest: str, name: str | None = None) -> str:
    """A reference to an in-process object (a model, datasets, a metric defined in a notebook) that works wherever
    a file reference does, in this process: `python-object:<name>:<digest>`, the digest standing in for a file hash
    in cache keys. The same object handed over again (in a new process too) gets the same reference."""
    name = (name or getattr(obj, "__qualname__", type(obj).__qualname__)).replace(":", "_")
    token = f"{OBJECT_PREFIX}{name}:{digest[:16]}"
    _OBJECTS[token] = obj
    return token


def _lookup_object(ref: str, what: str) -> Any:
    if ref not in _OBJECTS:
        kind = ref.removeprefix(OBJECT_PREFIX).split(":")[0]
        raise DeploykitError(
            f"The {what} was handed to deploykit.optimize as a Python object ({kind}) in another process, so this "
            "process cannot rebuild it: define it in a .py file and pass its reference ('my_file.py:name') to resume."
        )
    return _OBJECTS[ref]


def base_dir(info: Any) -> Path:
    """Where relative paths in a pipeline start (pydantic's ValidationInfo carries it in its context): the pipeline
    file's folder, else the working directory."""
    context = getattr(info, "context", None) or {}
    return Path(context.get("base_dir") or Path.cwd())


def split_ref(ref: str, what: str) -> tuple[str, str]:
    """(file-or-module, attribute) of `ref`; a malformed reference is one sentence naming `what`."""
    where, sep, attr = ref.rpartition(":")
    if not sep or not where or not _ATTR_PATH.match(attr):
        raise ValueError(
            f"{what} {ref!r} must be 'file.py:function' or 'package.module:function' (a colon before the name)"
        )
    if not where.endswith(".py") and not _MODULE_PATH.match(where):
        raise ValueError(f"{what} {ref!r}: {where!r} is neither a .py file nor a dotted module name")
    return where, attr


def resolve_ref(ref: str, base_dir: Path, what: str) -> str:
    """`ref` with a .py path made absolute (relative paths start at `base_dir`); the file must exist."""
    if ref.startswith(OBJECT_PREFIX):
        return ref
    where, attr = split_ref(ref, what)
    if not where.endswith(".py"):
        if importlib.util.find_spec(where.split(".")[0]) is None:
            raise ValueError(
                f"{what} {ref!r}: no module {where.split('.')[0]!r} is importable; install it or name a .py file"
            )
        return ref
    path = Path(where).expanduser()
    path = (base_dir / path if not path.is_absolute() else path).resolve()
    if not path.is_file():
        raise ValueError(f"{what} {ref!r}: the file {path} does not exist (relative paths start at {base_dir})")
    return f"{path}:{attr}"


def source_file(ref: str) -> Path | None:
    """The file that defines a resolved reference (a module's own file), without importing it."""
    where, _ = split_ref(ref, "reference")
    if where.endswith(".py"):
        return Path(where)
    try:
        spec = importlib.util.find_spec(where)
    except (ImportError, ValueError):
        return None
    return Path(spec.origin) if spec and spec.origin and spec.origin.endswith(".py") else None


def source_sha256(ref: str) -> str:
    """The sha256 of the file behind `ref` ('' where none can be read), for cache keys; an in-process object's
    digest."""
    if ref.startswith(OBJECT_PREFIX):
        return ref.split(":")[2]
    path = source_file(ref)
    return sha256_file(path) if path and path.is_file() else ""


def _import_file(path: Path) -> Any:
    """Import a .py file once per process under a name derived from its path (so two `models.py` never clash)."""
    name = f"deploykit_user.{path.stem}_{hashlib.sha256(str(path).encode()).hexdigest()[:10]}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    # The file's folder is importable, as it is for `python file.py`: helpers beside it resolve.
    if str(path.parent) not in sys.path:
        sys.path.insert(0, str(path.parent))
    sys.modules[name] = module  # before exec: dataclasses and pickling look the module up by name
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def load_ref(ref: str, what: str) -> Any:
    """The object `ref` names (imported now); any failure is one sentence naming `what` and the reference."""
    if ref.startswith(OBJECT_PREFIX):
        return _lookup_object(ref, what)
    where, attr = split_ref(ref, what)
    try:
        module = _import_file(Path(where)) if where.endswith(".py") else importlib.import_module(where)
    except Exception as exc:  # the user's module raised while importing: say where, not a traceback into deploykit
        raise DeploykitError(
            f"Importing {where} for {what} {ref!r} failed ({type(exc).__name__}: {exc}): fix that file, then run again."
        ) from exc
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            names = sorted(n for n in dir(module) if not n.startswith("_"))
            raise DeploykitError(
                f"{where} has no attribute {attr!r} for {what} {ref!r}: it defines "
                f"{', '.join(names) or 'nothing public'}."
            )
        obj = getattr(obj, part)
    return obj


def load_callable(ref: str, what: str) -> Callable[..., Any]:
    """`load_ref`, checked to be callable."""
    obj = load_ref(ref, what)
    if not callable(obj):
        raise DeploykitError(f"{what} {ref!r} is a {type(obj).__name__}, not a function: name a function or class.")
    return obj


def describe_ref(ref: str) -> str:
    """A reference as users wrote it, for messages: the file's name rather than its absolute path."""
    if ref.startswith(OBJECT_PREFIX):
        return f"<{ref.split(':')[1]} object>"
    where, attr = split_ref(ref, "reference")
    return f"{Path(where).name}:{attr}" if where.endswith(".py") else ref
