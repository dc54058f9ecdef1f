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


# (history key prefix, legend name, line style): the eval-mode train numbers are what compares with val.
_CURVE_SERIES = (("train_eval", "train (eval)", "-"), ("val", "val", "--"), ("train", "train (as trained)", ":"))


def plot_curves(histories: dict[str, list[dict]], path: Path, metric: str = "top-1") -> None:
    """Loss (log scale: an early epoch's loss can be 100x the final one) and accuracy per epoch, for train evaluated
    like val, val, and train as trained (regularized, augmented); stages follow each other on one epoch axis."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(10, 4))
    loss_ax, acc_ax = fig.subplots(1, 2)
    offset = 0
    for i, (stage, history) in enumerate(histories.items()):
        epochs = [offset + n + 1 for n in range(len(history))]
        for ax, key in ((loss_ax, "loss"), (acc_ax, "acc")):
            for prefix, name, style in _CURVE_SERIES:
                values = [h.get(f"{prefix}_{key}") for h in history]
                if all(v is None for v in values):
                    continue
                thin = style == ":"
                ax.plot(epochs, values, color=f"C{i % 10}", linestyle=style, marker="" if thin else "o", markersize=3,
                        linewidth=1.0 if thin else 1.5, label=f"{stage}: {name}")  # fmt: skip
        offset = epochs[-1]
    loss_ax.set_yscale("log")
    for ax, name in ((loss_ax, "loss (log scale)"), (acc_ax, "top-1 accuracy" if metric == "top-1" else metric)):
        ax.set(title=name[:1].upper() + name[1:], xlabel="epoch (stages in pipeline order)", ylabel=name)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    save_png(fig, path)


def plot_tradeoff(
    points: list[TradeoffPoint], path: Path, latency_label: str, slo_latency_ms: float | None, metric: str = "top-1"
) -> None:
    """Accuracy against latency, marker area by file size; the Pareto front in colour and joined, dominated points
    grey, every point labelled with its artifact, and the SLO's latency target as a line."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 5))
    ax = fig.subplots()
    biggest = max(p.size_mb for p in points) or 1.0
    for i, p in enumerate(points):
        colour = f"C{i % 10}" if p.on_front else "0.7"
        area = 30 + 270 * p.size_mb / biggest
        ax.scatter([p.latency_ms], [100 * p.accuracy], color=colour, marker=_MARKERS[i % len(_MARKERS)], s=area,
                   label=f"{p.label} ({p.size_mb:.2f} MB)", zorder=3, edgecolors="black" if p.on_front else "none")  # fmt: skip
    # Candidates often share an accuracy: labels climb in steps, left to right, each tied to its point by a line.
    for step, p in enumerate(sorted(points, key=lambda p: p.latency_ms)):
        ax.annotate(p.label, (p.latency_ms, 100 * p.accuracy), fontsize=7, xytext=(6, 8 + 11 * (step % 5)),
                    textcoords="offset points", color="black" if p.on_front else "0.45",
                    arrowprops={"arrowstyle": "-", "color": "0.6", "linewidth": 0.5})  # fmt: skip
    front = sorted((p for p in points if p.on_front), key=lambda p: p.latency_ms)
    ax.plot([p.latency_ms for p in front], [100 * p.accuracy for p in front], color="C0", alpha=0.5, zorder=2)
    latencies = [p.latency_ms for p in points]
    if slo_latency_ms is not None:
        ax.axvline(slo_latency_ms, color="red", linestyle=":", label=f"SLO latency target {slo_latency_ms:g} ms")
        latencies.append(slo_latency_ms)
    if min(latencies) > 0 and max(latencies) / min(latencies) > 20:  # torch eager vs INT8 can be 100x apart
        ax.set_xscale("log")
    accuracies = [100 * p.accuracy for p in points]
    low = min(accuracies)
    ax.set_ylim(low - max(1.0, 0.3 * (max(accuracies) - low)), min(100.5, max(accuracies) + 3.0))  # room for labels
    ax.set(title="Accuracy vs latency (up and left is better; marker area: file size)", xlabel=latency_label,
           ylabel=f"{metric} accuracy (%)" if metric == "top-1" else f"{metric} (%)")  # fmt: skip
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the axes: it never hides a point
    save_png(fig, path)
