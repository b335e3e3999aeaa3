"""Training curves as PNG images (matplotlib, Agg backend: no display needed).

Two figures, four panels each: training (loss, learning rate, throughput, kNN accuracy of the
online monitor) and the NNCLR neighbour diagnostics of Dwibedi et al. (2021) that tell whether
the support set is helping (neighbour label agreement, mean positive similarity, neighbour age,
support-set fill). A panel without data says so instead of being left empty.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

TRAIN_PANELS = (
    ("loss", "loss"), ("lr", "learning rate"), ("images_per_s", "throughput (images/s)"),
)
NN_PANELS = (
    ("nn_label_agreement", "neighbour label agreement"), ("positive_similarity", "mean positive similarity"),
    ("nn_age", "neighbour age (steps)"), ("support_fill", "support-set fill"),
)


@dataclass
class Plot:
    """A rendered figure: PNG bytes and how many data points each panel drew (0 = empty panel)."""

    title: str
    png: bytes
    points: dict[str, int]


def _series(records: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of ``key`` over records, skipping missing or non-finite values."""
    steps, values = [], []
    for record in records:
        value = record.get(key)
        if isinstance(value, (int, float)) and math.isfinite(value):
            steps.append(record.get("step", len(steps)))
            values.append(value)
    return steps, values


def _panel(ax: Any, steps: list[float], values: list[float], title: str, colour: str) -> int:
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("step", fontsize=8)
    ax.tick_params(labelsize=8)
    ax.grid(alpha=0.3)
    if not values:
        ax.text(0.5, 0.5, "not recorded", ha="center", va="center", transform=ax.transAxes, color="0.5")
        ax.set_xticks([])
        ax.set_yticks([])
        return 0
    ax.plot(steps, values, color=colour, marker="o" if len(values) < 30 else None, markersize=3, linewidth=1.5)
    return len(values)


def _png(fig: Any) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


def training_plot(train: list[dict[str, Any]], knn: list[dict[str, Any]]) -> Plot:
    """Loss, learning rate, throughput and kNN top-1/top-5 of the online monitor over steps."""
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.2))
    points = {}
    for ax, (key, title) in zip(axes, TRAIN_PANELS):
        points[key] = _panel(ax, *_series(train, key), title, "tab:blue")
    points["knn_top1"] = _panel(axes[3], *_series(knn, "top1"), "kNN accuracy (%)", "tab:green")
    if points["knn_top1"]:
        steps, top5 = _series(knn, "top5")
        axes[3].plot(steps, top5, color="tab:olive", marker="o" if len(top5) < 30 else None, markersize=3)
        axes[3].legend(["top-1", "top-5"], fontsize=8)
    fig.tight_layout()
    return Plot("training", _png(fig), points)


def diagnostics_plot(train: list[dict[str, Any]]) -> Plot:
    """The NN diagnostics over steps: label agreement, positive similarity, neighbour age, support fill."""
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.2))
    points = {key: _panel(ax, *_series(train, key), title, "tab:purple")
              for ax, (key, title) in zip(axes, NN_PANELS)}
    fig.tight_layout()
    return Plot("nearest-neighbour diagnostics", _png(fig), points)


def bar_plot(counts: list[int], title: str, xlabel: str, ylabel: str) -> bytes:
    """A bar chart of ``counts`` in the given order (e.g. prototype usage, sorted)."""
    fig, ax = plt.subplots(figsize=(8, 2.8))
    ax.bar(range(len(counts)), counts, width=1.0, color="tab:orange")
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel, fontsize=8)
    ax.set_ylabel(ylabel, fontsize=8)
    ax.tick_params(labelsize=8)
    fig.tight_layout()
    return _png(fig)


def scatter_plot(xy: Any, labels: Any, classes: list[str], title: str) -> bytes:
    """A 2-D map (N, 2) coloured by label (N,) with a legend of class names; -1 = unlabelled, grey."""
    fig, ax = plt.subplots(figsize=(7.5, 6))
    known = sorted({int(label) for label in labels if int(label) >= 0})
    cmap = plt.get_cmap("tab10" if len(known) <= 10 else "tab20" if len(known) <= 20 else "nipy_spectral")
    unlabelled = labels < 0
    if unlabelled.any():
        ax.scatter(xy[unlabelled, 0], xy[unlabelled, 1], s=6, color="0.6", alpha=0.7, label="unlabelled")
    for i, label in enumerate(known):
        mask = labels == label
        name = classes[label] if label < len(classes) else str(label)
        colour = cmap(i % cmap.N) if len(known) <= 20 else cmap(i / max(1, len(known) - 1))
        ax.scatter(xy[mask, 0], xy[mask, 1], s=6, color=colour, alpha=0.8, label=name)
    if len(known) <= 20:
        ax.legend(fontsize=8, markerscale=2.5, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    ax.set_title(title, fontsize=10)
    ax.set_xticks([])
    ax.set_yticks([])
    fig.tight_layout()
    return _png(fig)
