"""Training curves as PNG images (matplotlib, Agg backend: no display needed).

Two figures: training (loss, learning rate, kNN accuracy of the online monitor, throughput) and
the nearest-neighbour diagnostics that tell whether the support set is helping (neighbour label
agreement, similarity of z to its positive, neighbour age, self-hits, support-set fill, share of
queries with a neighbour), or for DeepCluster its clustering diagnostics. A panel without data says
"not recorded" instead of being left empty; :attr:`Plot.points` counts what each panel drew.
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
    (("nn_label_agreement",), "neighbour label agreement"),
    (("positive_similarity", "nn_similarity"), "cosine of z with its positive / neighbour"),
    (("nn_age",), "neighbour age (steps)"),
    (("nn_self_hit",), "neighbour is a copy of the query (share)"),
    (("support_fill",), "support-set fill"),
    (("nn_found",), "queries with a neighbour (share)"),
)
CLUSTERING_PANELS = (  # (record source, keys, title): DeepCluster, one clustering record per epoch
    ("clustering", ("nmi_labels", "nmi_previous"), "NMI of the pseudo-labels with the labels / previous epoch"),
    ("clustering", ("largest_cluster", "smallest_cluster"), "largest / smallest cluster (images)"),
    ("clustering", ("kmeans_similarity",), "cosine of z with its centroid (mean)"),
    ("train", ("pseudo_label_accuracy",), "classifier accuracy on the pseudo-labels"),
)
COLOURS = ("tab:blue", "tab:olive")


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


def _panel(ax: Any, series: list[tuple[str, list[float], list[float]]], title: str) -> int:
    """Draw ``series`` of (name, steps, values) on ``ax``; returns the number of points drawn (0: says so)."""
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("step", fontsize=8)
    ax.tick_params(labelsize=8)
    ax.grid(alpha=0.3)
    drawn = [(name, steps, values) for name, steps, values in series if values]
    if not drawn:
        ax.text(0.5, 0.5, "not recorded", ha="center", va="center", transform=ax.transAxes, color="0.5")
        ax.set_xticks([])
        ax.set_yticks([])
        return 0
    for (name, steps, values), colour in zip(drawn, COLOURS):
        ax.plot(steps, values, color=colour, marker="o" if len(values) < 30 else None, markersize=3, linewidth=1.5,
                label=name)
    if len(series) > 1:
        ax.legend(fontsize=8)
    return sum(len(values) for _, _, values in drawn)


def _png(fig: Any) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


def training_plot(train: list[dict[str, Any]], knn: list[dict[str, Any]]) -> Plot:
    """Loss, learning rate, kNN top-1/top-5 of the online monitor and throughput over steps (one row)."""
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.0))
    points = {}
    for ax, (key, title) in zip(axes[[0, 1, 3]], TRAIN_PANELS):
        points[key] = _panel(ax, [(key, *_series(train, key))], title)
    points["knn"] = _panel(axes[2], [("top-1", *_series(knn, "top1")), ("top-5", *_series(knn, "top5"))],
                           "kNN accuracy of the monitor (%)")
    fig.tight_layout()
    return Plot("training curves", _png(fig), points)


def diagnostics_plot(train: list[dict[str, Any]]) -> Plot:
    """The NN diagnostics over steps (two rows of three panels)."""
    fig, axes = plt.subplots(2, 3, figsize=(16, 5.6))
    points = {}
    for ax, (keys, title) in zip(axes.flat, NN_PANELS):
        points["+".join(keys)] = _panel(ax, [(key, *_series(train, key)) for key in keys], title)
    fig.tight_layout()
    return Plot("nearest-neighbour diagnostics", _png(fig), points)


def clustering_plot(clustering: list[dict[str, Any]], train: list[dict[str, Any]]) -> Plot:
    """DeepCluster's diagnostics over steps (one row of four panels; Caron et al., 2018, Fig. 2)."""
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.0))
    points = {}
    for ax, (source, keys, title) in zip(axes, CLUSTERING_PANELS):
        records = clustering if source == "clustering" else train
        points["+".join(keys)] = _panel(ax, [(key, *_series(records, key)) for key in keys], title)
    fig.tight_layout()
    return Plot("clustering diagnostics", _png(fig), points)


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
