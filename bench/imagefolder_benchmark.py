"""deploykit's default pipeline on real class-folder images against a plain CNN, and what INT8 costs it.

    python bench/imagefolder_benchmark.py            # writes data/photo-patches if missing, then both runs

The data are 12 classes of 28x28 crops of real photographs (bench/photo_patches.py). The baseline is the CNN a
user writes in 30 lines: three conv-BN-ReLU-maxpool blocks (32, 64, 128 channels), global pooling, a linear
layer; Adam at 1e-3, batch 64, no augmentation, its own plain loop, on exactly deploykit's split and
normalisation. deploykit runs pipelines/photo-patches.yaml (train, export, INT8 within 1 point, benchmark,
report). Both train on the same 2 threads, one after the other; the section in BENCHMARKS.md gives both
accuracies and wall times, the INT8 accuracy and the machine's load.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F
from photo_patches import write
from sections import write_section
from torch import nn

from deploykit.data import DataBundle, build_datasets, make_loader
from deploykit.machine import cpu_isa, cpu_model
from deploykit.pipeline.engine import run_pipeline
from deploykit.pipeline.loader import load_pipeline
from deploykit.progress import Reporter
from deploykit.report.formatting import isa

REPO = Path(__file__).resolve().parents[1]
PIPELINE = REPO / "pipelines" / "photo-patches.yaml"


def simple_cnn(num_classes: int) -> nn.Module:
    def block(cin: int, cout: int) -> nn.Module:
        return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(), nn.MaxPool2d(2))

    return nn.Sequential(
        block(3, 32), block(32, 64), block(64, 128), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, num_classes)
    )


def baseline(bundle: DataBundle, epochs: int, reporter: Reporter) -> dict[str, float]:
    """The plain loop a user writes: final val accuracy and training wall time."""
    torch.manual_seed(0)
    model = simple_cnn(bundle.num_classes)
    optimizer = torch.optim.Adam(model.parameters(), 1e-3)
    start = time.perf_counter()
    with reporter.task("baseline CNN", total=epochs) as bar:
        for epoch in range(epochs):
            model.train()
            for x, y, *_ in make_loader(bundle.train, 64, shuffle=True, seed=epoch):
                optimizer.zero_grad()
                F.cross_entropy(model(x), y).backward()
                optimizer.step()
            bar.advance()
    train_s = time.perf_counter() - start
    model.eval()
    correct = 0
    with torch.no_grad():
        for x, y in make_loader(bundle.val, 256, shuffle=False):
            correct += int((model(x).argmax(1) == y).sum())
    return {"val_acc": correct / len(bundle.val), "train_s": train_s, "epochs": epochs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=REPO / "data" / "photo-patches")
    parser.add_argument("--runs-dir", type=Path, default=REPO / "bench" / "runs")
    parser.add_argument("--baseline-epochs", type=int, default=8)
    parser.add_argument("--out", type=Path, default=REPO / "BENCHMARKS.md")
    args = parser.parse_args()
    if not args.data.is_dir():
        print(f"{write(args.data, per_class=840, size=28)} images written to {args.data}")
    torch.set_num_threads(2)
    load_before = os.getloadavg()
    cfg = load_pipeline(PIPELINE)
    cfg = cfg.model_copy(update={"runs_dir": args.runs_dir, "data": cfg.data.model_copy(update={"root": args.data})})
    with Reporter() as reporter:
        base = baseline(build_datasets(cfg.data), args.baseline_epochs, reporter)
        run_pipeline(cfg, reporter=reporter)
    run = args.runs_dir / cfg.name
    train = json.loads((run / "train" / "meta.json").read_text())["metrics"]
    quant = json.loads((run / "quantize" / "meta.json").read_text())["metrics"]
    result = {
        "baseline": base,
        "deploykit": {"val_acc": train["val_acc"], "train_s": train["train_time_s"], "epochs": train["epochs_run"]},
        "int8_acc": quant["int8_accuracy"],
        "fp32_layers": len(quant["excluded_nodes"]),
        "load_before": load_before,
        "load_after": os.getloadavg(),
    }
    (run / "imagefolder.json").write_text(json.dumps(result, indent=2))
    write_section(args.out, "imagefolder", markdown(result, len(build_datasets(cfg.data).val)))
    print(f"wrote {args.out}")


def markdown(r: dict, val_samples: int) -> str:
    b, d = r["baseline"], r["deploykit"]
    gap, drop = 100 * (d["val_acc"] - b["val_acc"]), 100 * (d["val_acc"] - r["int8_acc"])
    load = ", ".join(f"{v:.2f}" for v in r["load_before"]), ", ".join(f"{v:.2f}" for v in r["load_after"])
    return "\n".join([
        "## Real class-folder images: deploykit's pipeline against a plain CNN",
        "",
        f"Latest `python bench/imagefolder_benchmark.py`, {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, on "
        f"{cpu_model()} with {isa({'isa': cpu_isa()})}, 2 threads; load average [{load[0]}] before, [{load[1]}] "
        f"after. 12 classes of 28x28 crops of three real photographs (bench/photo_patches.py, 10,080 images; "
        f"{val_samples} in the seeded validation split, the same for both).",
        "",
        "| model | val top-1 | training wall time | epochs |",
        "|---|---|---|---|",
        f"| plain 3-block CNN (Adam 1e-3, no augmentation) | {b['val_acc']:.2%} | {b['train_s']:.0f} s | {b['epochs']} |",
        f"| deploykit `pipelines/photo-patches.yaml` (ResNet-18 cifar stem, width 0.25) | {d['val_acc']:.2%} | "
        f"{d['train_s']:.0f} s | {d['epochs']} |",
        f"| the same, INT8 (ONNX Runtime QDQ, {r['fp32_layers']} layer(s) kept FP32) | {r['int8_acc']:.2%} | | |",
        "",
        f"Target: at least the CNN's accuracy: {gap:+.2f} points, {'met' if gap >= 0 else 'NOT met'}. "
        f"Target: INT8 within 1 point: {drop:.2f} points lost, {'met' if drop <= 1.0 else 'NOT met'}.",
    ])  # fmt: skip


if __name__ == "__main__":
    main()
