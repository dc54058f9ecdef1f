"""The report's two figures, drawn with matplotlib's Agg canvas (no display, no pyplot global state)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import TYPE_CHECKING

from deploykit.files import atomic_write_bytes

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from deploykit.report.content import TradeoffPoint

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


def plot_tradeoff(points: list[TradeoffPoint], path: Path, latency_label: str, slo_latency_ms: float | None) -> None:
    """Accuracy against latency, marker area by file size; the Pareto front in colour and joined, dominated points
    grey, every point labelled with its artifact, and the SLO's latency target as a line."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 5))
    ax = fig.subplots()
    biggest = max(p.size_mb for p in points) or 1.0
    for i, p in enumerate(points):
        colour = f"C{i % 10}" if p.on_front else "0.7"
        area = 30 + 270 * p.size_mb / biggest
        ax.scatter([p.latency_ms], [100 * p.accuracy], color=colour, marker=_MARKERS[i % len(_MARKERS)], s=area,
                   label=f"{p.label} ({p.size_mb:.2f} MB)", zorder=3, edgecolors="black" if p.on_front else "none")  # fmt: skip
        ax.annotate(p.label, (p.latency_ms, 100 * p.accuracy), fontsize=7, xytext=(4, 4), textcoords="offset points",
                    color="black" if p.on_front else "0.5")  # fmt: skip
    front = sorted((p for p in points if p.on_front), key=lambda p: p.latency_ms)
    ax.plot([p.latency_ms for p in front], [100 * p.accuracy for p in front], color="C0", alpha=0.5, zorder=2)
    latencies = [p.latency_ms for p in points]
    if slo_latency_ms is not None:
        ax.axvline(slo_latency_ms, color="red", linestyle=":", label=f"SLO latency target {slo_latency_ms:g} ms")
        latencies.append(slo_latency_ms)
    if min(latencies) > 0 and max(latencies) / min(latencies) > 20:  # torch eager vs INT8 can be 100x apart
        ax.set_xscale("log")
    ax.set(title="Accuracy vs latency (up and left is better; marker area: file size)", xlabel=latency_label,
           ylabel="top-1 accuracy (%)")  # fmt: skip
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    save_png(fig, path)
