"""Runs a pipeline's stages in order, with a content-hash cache, resume and atomic stage folders.

A stage's key is the hash of its settings, the dataset and model sections, and the output hashes of
every earlier stage. A stage whose folder holds a meta.json with that key, and artifacts with the
recorded hashes, is skipped. A stage writes into a hidden temporary folder that is renamed into
place only after its meta.json is written, so a crash at any moment leaves either the previous
complete folder or none; in-stage checkpoints live in `.work/` and let the next run resume.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from deploykit.artifacts import StageRecord, StageResult
from deploykit.errors import DeploykitError
from deploykit.files import atomic_write_json, sha256_file, sha256_json
from deploykit.machine import machine_info, versions
from deploykit.pipeline.config import PipelineBase
from deploykit.pipeline.context import StageContext
from deploykit.pipeline.registry import stage_types
from deploykit.progress import Reporter, silent

META_FORMAT = 2  # bump when meta.json or key contents change meaning, to invalidate old caches


@dataclass
class StageOutcome:
    name: str
    type: str
    status: str  # "ran" or "cached"
    wall_time_s: float
    directory: Path
    metrics: dict[str, Any] = field(default_factory=dict)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def read_meta(directory: Path) -> dict[str, Any] | None:
    import json

    try:
        return json.loads((directory / "meta.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _is_cached(directory: Path, key: str) -> dict[str, Any] | None:
    """The stage's meta if its folder is complete for this key and no artifact was altered."""
    meta = read_meta(directory)
    if not meta or meta.get("key") != key:
        return None
    for entry in meta.get("artifacts", {}).values():
        path = directory / entry["path"]
        if not path.is_file() or sha256_file(path) != entry["sha256"]:
            return None
    return meta


def _describe_artifacts(out_dir: Path, result: StageResult, stage: str) -> dict[str, dict[str, Any]]:
    described = {}
    for role, rel in result.artifacts.items():
        path = out_dir / rel
        if not path.is_file():
            raise DeploykitError(f"Stage '{stage}' reported artifact '{rel}' ({role}) but did not write it; this is a bug in the stage.")
        described[str(role)] = {"path": rel, "sha256": sha256_file(path), "bytes": path.stat().st_size}
    return described


def _output_hash(artifacts: dict[str, dict[str, Any]], result: StageResult) -> str:
    """What later stages' cache keys depend on: the files, and the pick (a new pick with the same files must
    re-deploy); the metrics of a stage that wrote no file."""
    if not artifacts:
        return sha256_json(result.metrics)
    return sha256_json({"files": {r: a["sha256"] for r, a in artifacts.items()}, **result.meta_fields()})


def _swap_into_place(tmp: Path, final: Path) -> None:
    """Replace `final` by `tmp` with renames only; at worst a crash leaves no folder (the stage re-runs)."""
    trash = final.with_name(f".trash-{final.name}-{os.getpid()}")
    if final.exists():
        os.rename(final, trash)
    os.rename(tmp, final)
    shutil.rmtree(trash, ignore_errors=True)


class _RunLock:
    """One writer per run folder: a second concurrent run on it would interleave stage folders."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / ".lock"
        self._fd: int | None = None

    def __enter__(self) -> _RunLock:
        self._fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._fd)
            raise DeploykitError(
                f"Another deploykit process is running on '{self.path.parent}': wait for it or use another run name."
            ) from None
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            os.close(self._fd)


SOURCE_STAGE = "source"


def stage_list(cfg: PipelineBase) -> list[Any]:
    """The stages a run goes through: the file's, after an `import_onnx` stage named 'source' when the model is an
    ONNX file the file does not import itself (it writes the canonical ONNX every later stage reads)."""
    from deploykit.pipeline.loader import stage_entries

    entries = list(cfg.stages)  # type: ignore[attr-defined]
    if not cfg.model.torch and not any(e.stage == "import_onnx" for e in entries):
        entries.insert(0, stage_entries()["import_onnx"].model_validate({"stage": "import_onnx", "name": SOURCE_STAGE}))
    return entries


def _check_names(cfg: PipelineBase, names: Iterable[str], flag: str) -> None:
    known = [s.stage_name for s in stage_list(cfg)]
    for name in names:
        if name not in known:
            raise DeploykitError(f"{flag} {name!r} is not a stage of pipeline '{cfg.name}': choose one of {', '.join(known)}.")


class _Dist:
    """torchrun's view (RANK/WORLD_SIZE); with one process every method is a no-op."""

    def __init__(self) -> None:
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        if self.world_size > 1:
            import torch

            from deploykit.train.distributed import init_from_env

            init_from_env("cuda" if torch.cuda.is_available() else "cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            import torch.distributed as dist

            dist.barrier()


def run_pipeline(
    cfg: PipelineBase,
    *,
    force: Iterable[str] = (),
    until: str | None = None,
    reporter: Reporter | None = None,
) -> list[StageOutcome]:
    """Run the stages of `cfg` (up to `until`), re-running `force`d stages and all after them."""
    force = set(force)
    _check_names(cfg, force, "--force")
    _check_names(cfg, [until] if until else [], "--until")
    dist = _Dist()
    reporter = reporter if (reporter is not None and dist.is_main) else silent()
    run_dir = Path(cfg.runs_dir) / cfg.name
    run_dir.mkdir(parents=True, exist_ok=True)

    if not dist.is_main:
        return _run_stages(cfg, run_dir, force, until, reporter, dist)
    with _RunLock(run_dir):
        for stale in run_dir.glob(".tmp-*"):  # left by a killed run; the lock says no one else is writing
            shutil.rmtree(stale, ignore_errors=True)
        for stale in run_dir.glob(".trash-*"):
            shutil.rmtree(stale, ignore_errors=True)
        outcomes = _run_stages(cfg, run_dir, force, until, reporter, dist)
        atomic_write_json(
            run_dir / "run.json",
            {
                "pipeline": cfg.model_dump(mode="json"),
                "finished_at": _now(),
                "stages": [{"name": o.name, "type": o.type, "status": o.status, "wall_time_s": o.wall_time_s} for o in outcomes],
            },
        )
        return outcomes


def _stage_key(cfg: PipelineBase, entry: Any, settings: Any, upstream: list[StageRecord]) -> str:
    return sha256_json(
        {
            "format": META_FORMAT,
            "stage": entry.stage,
            "settings": settings.model_dump(mode="json"),
            **cfg.key(),  # data, model and (when not the default) task; the user's files enter by their hashes
            "inputs": {r.name: r.meta["output_hash"] for r in upstream},
        }
    )


def _run_stages(
    cfg: PipelineBase, run_dir: Path, force: set[str], until: str | None, reporter: Reporter, dist: _Dist
) -> list[StageOutcome]:
    upstream: list[StageRecord] = []
    outcomes: list[StageOutcome] = []
    shared: dict[str, Any] = {}
    forcing = False
    entries = stage_list(cfg)
    if until:
        entries = entries[: [e.stage_name for e in entries].index(until) + 1]
    with reporter.task("pipeline", total=len(entries)) as bar:
        for entry in entries:
            name, settings = entry.stage_name, entry.settings()
            stage = stage_types()[entry.stage](settings)
            final = run_dir / name
            key = _stage_key(cfg, entry, settings, upstream)
            forcing = forcing or name in force
            meta = None if forcing else _is_cached(final, key)
            dist.barrier()  # every rank has decided before rank 0 touches the folder
            start = time.perf_counter()
            if meta is None and (dist.is_main or stage.distributed):
                reporter.log(f"[bold]stage {name}[/bold] ({entry.stage}) running")
                meta = _run_one(cfg, stage, entry, name, key, run_dir, upstream, reporter, shared, dist)
                status = "ran"
            else:
                status = "cached" if meta is not None else "ran"
                if meta is not None:
                    reporter.log(f"[dim]stage {name} ({entry.stage}) cached[/dim]")
            dist.barrier()
            if meta is None or not dist.is_main:  # other ranks read what rank 0 wrote
                meta = read_meta(final) or {}
            upstream.append(StageRecord(name=name, type=entry.stage, directory=final, meta=meta))
            wall = meta.get("wall_time_s", 0.0) if status == "ran" else time.perf_counter() - start
            outcomes.append(StageOutcome(name, entry.stage, status, wall, final, meta.get("metrics", {})))
            bar.advance()
    return outcomes


def _run_one(
    cfg: PipelineBase,
    stage: Any,
    entry: Any,
    name: str,
    key: str,
    run_dir: Path,
    upstream: list[StageRecord],
    reporter: Reporter,
    shared: dict[str, Any],
    dist: _Dist,
) -> dict[str, Any]:
    tmp = run_dir / f".tmp-{name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    work = run_dir / ".work" / f"{name}-{key[:16]}"
    if dist.is_main:
        for old in (run_dir / ".work").glob(f"{name}-*"):  # checkpoints of an older config are useless now
            if old != work:
                shutil.rmtree(old, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    ctx = StageContext(cfg, name, tmp, work, list(upstream), reporter, shared)
    started, t0 = _now(), time.perf_counter()
    try:
        result = stage.run(ctx)
        if not dist.is_main:
            return {}
        artifacts = _describe_artifacts(tmp, result, name)
        meta = {
            "format": META_FORMAT,
            "stage": name,
            "type": entry.stage,
            "key": key,
            "config": stage.config.model_dump(mode="json"),
            "inputs": {r.name: r.meta["output_hash"] for r in upstream},
            "artifacts": artifacts,
            "output_hash": _output_hash(artifacts, result),
            "metrics": result.metrics,
            **result.meta_fields(),
            "wall_time_s": round(time.perf_counter() - t0, 3),
            "started_at": started,
            "finished_at": _now(),
            "versions": versions(),
            "machine": machine_info(),
        }
        if result.models and "bundle" in shared:  # what a client must do to inputs, beside every model
            meta["preprocessing"] = shared["bundle"].preprocessing()
        atomic_write_json(tmp / "meta.json", meta)
        _swap_into_place(tmp, run_dir / name)
        shutil.rmtree(work, ignore_errors=True)
        return meta
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
