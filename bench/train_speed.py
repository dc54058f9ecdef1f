"""Training throughput before and after issue 20's defaults, measured in one run on this machine.

    python bench/train_speed.py              # quickstart and photo-patches (written to data/ if missing)

"Before" is how the train stage ran until then: fp32, image files decoded on every access. "After" is the default
now: `precision: auto` (bf16 autocast on CPUs with AVX-512 BF16 or AMX-BF16, fp32 elsewhere) and class-folder
images decoded once. Each pipeline's own train stage runs for `--epochs` epochs in each setting, the settings
alternated over `--repeats` rounds; the median samples/s of each goes in BENCHMARKS.md with the accuracy each
reached, the time split of the new default and the machine's load.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from datetime import datetime, timezone
from pathlib import Path

from photo_patches import write
from sections import write_section

from deploykit.data import imagefolder
from deploykit.machine import cpu_isa, cpu_model
from deploykit.pipeline.engine import run_pipeline
from deploykit.pipeline.loader import load_pipeline
from deploykit.progress import silent
from deploykit.report.formatting import isa

REPO = Path(__file__).resolve().parents[1]
PIPELINES = {name: REPO / "pipelines" / f"{name}.yaml" for name in ("quickstart", "photo-patches")}


def train_once(path: Path, data_root: Path, epochs: int, before: bool) -> dict:
    """The pipeline's train stage alone, in a fresh run folder: samples/s, val accuracy, precision, time split."""
    cfg = load_pipeline(path)
    train = cfg.stages[0]
    old = {"precision": "fp32", "memory_format": "contiguous"}
    new = {"precision": "auto", "memory_format": "auto"}
    settings = {**train.model_dump(exclude_unset=True), "epochs": epochs, **(old if before else new)}
    data = cfg.data.model_copy(update={"root": data_root}) if cfg.data.dataset == "imagefolder" else cfg.data
    cache = imagefolder.CACHE_BYTES
    imagefolder.CACHE_BYTES = 0 if before else cache  # before: every access decodes its file again
    try:
        with tempfile.TemporaryDirectory() as runs:
            stage = type(train).model_validate(settings)
            staged = cfg.model_copy(update={"runs_dir": Path(runs), "data": data, "stages": [stage]})
            metrics = run_pipeline(staged, reporter=silent())[0].metrics
    finally:
        imagefolder.CACHE_BYTES = cache
    return {**metrics, "samples_per_s": metrics["train_samples_per_s"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=REPO / "data" / "photo-patches")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=REPO / "BENCHMARKS.md")
    args = parser.parse_args()
    if not args.data.is_dir():
        print(f"{write(args.data, per_class=840, size=28)} images written to {args.data}")
    load_before = os.getloadavg()
    rows = []
    for name, path in PIPELINES.items():
        runs: dict[bool, list[dict]] = {True: [], False: []}
        for _ in range(args.repeats):
            for before in (True, False):
                runs[before].append(train_once(path, args.data, args.epochs, before))
        rows.append((name, runs))
        print(name, {k: [round(r["samples_per_s"]) for r in v] for k, v in runs.items()})
    write_section(args.out, "train-speed", markdown(rows, args, load_before, os.getloadavg()))
    print(f"wrote {args.out}")


def markdown(rows: list, args: argparse.Namespace, load_before: tuple, load_after: tuple) -> str:
    lines = [
        "## Training throughput: before and after `precision: auto`, channels_last and decoded-once images",
        "",
        f"Latest `python bench/train_speed.py`, {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, on {cpu_model()} "
        f"with {isa({'isa': cpu_isa()})}; load average {[round(v, 2) for v in load_before]} before, "
        f"{[round(v, 2) for v in load_after]} after. Each pipeline's own train stage, {args.epochs} epochs, the two "
        f"settings alternated over {args.repeats} rounds; medians. Before: fp32, NCHW, images decoded on every "
        "access. After: the defaults now (precision auto, memory_format auto, images decoded once).",
        "",
        "| pipeline | before: samples/s | after: samples/s | speedup | precision after | val top-1 before / after "
        "| after: time split (data, compute, optimizer, eval) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, runs in rows:
        old, new = (statistics.median(r["samples_per_s"] for r in runs[k]) for k in (True, False))
        accs = " / ".join(f"{statistics.median(r['val_acc'] for r in runs[k]):.2%}" for k in (True, False))
        split = runs[False][-1]["time_split"]
        lines.append(
            f"| {name} | {old:.0f} | {new:.0f} | {new / old:.2f}x | {runs[False][-1]['precision']} | {accs} | "
            f"{split['data']:.0%}, {split['compute']:.0%}, {split['optimizer']:.0%}, {split['eval']:.0%} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
