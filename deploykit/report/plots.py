"""The report's two figures, drawn with matplotlib's Agg canvas (no display, no pyplot global state)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import TYPE_CHECKING

from deploykit.files import atomic_write_bytes

if TYPE_CHECKING:
    from matplotlib.figure import Figure

_MARKERS = "osD^vP*Xph"  # distinct shapes keep artifacts with equal numbers visible on top of each other


def save_png(fig: Figure, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    atomic_write_bytes(path, buf.getvalue())


def plot_curves(histories: dict[str, list[dict]], path: Path) -> None:
    """Train/val loss and accuracy per epoch; stages follow each other on one epoch axis (train, then fine-tunes)."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(10, 4))
    loss_ax, acc_ax = fig.subplots(1, 2)
    offset = 0
    for i, (stage, history) in enumerate(histories.items()):
        epochs = [offset + n + 1 for n in range(len(history))]
        for ax, key in ((loss_ax, "loss"), (acc_ax, "acc")):
            for split, style in (("train", "-"), ("val", "--")):
                values = [h.get(f"{split}_{key}") for h in history]
                label = f"{stage}: {split}"
                ax.plot(epochs, values, color=f"C{i % 10}", linestyle=style, marker="o", markersize=3, label=label)
        offset = epochs[-1]
    for ax, name in ((loss_ax, "loss"), (acc_ax, "top-1 accuracy")):
        ax.set(title=name.capitalize(), xlabel="epoch (stages in pipeline order)", ylabel=name)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    save_png(fig, path)


def plot_tradeoff(points: list[tuple[str, float, float]], path: Path, latency_label: str) -> None:
    """One point per artifact, named in the legend: (label, latency in ms, top-1 accuracy as a fraction)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5))
    ax = fig.subplots()
    for i, (label, latency, accuracy) in enumerate(points):
        marker = _MARKERS[i % len(_MARKERS)]
        ax.scatter([latency], [100 * accuracy], color=f"C{i % 10}", marker=marker, s=50, label=label, zorder=3)
    latencies = [p[1] for p in points]
    if min(latencies) > 0 and max(latencies) / min(latencies) > 20:  # torch eager vs INT8 can be 100x apart
        ax.set_xscale("log")
    ax.set(title="Accuracy vs latency (up and left is better)", xlabel=latency_label, ylabel="top-1 accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_png(fig, path)
