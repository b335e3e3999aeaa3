"""The report's sections drawn from the run directory's files alone: summary, training curves, evaluation.

None of them needs the encoder or any image: they read ``config.yaml``/the checkpoint's config,
``metrics.jsonl``, ``results.json`` and ``eval/*.json`` (see :mod:`nnclr.report.data`). Fields
that a file lacks show as a dash; records of unknown shape are shown with what they have.
"""

from __future__ import annotations

from typing import Any

import yaml

from nnclr import runtime
from nnclr.config import flatten
from nnclr.methods import METHODS
from nnclr.report import html as H
from nnclr.report.data import RunData

KEY_SETTINGS = (
    "data.name", "data.image_size", "augment.recipe", "model.backbone", "model.proj_dim", "method.name",
    "method.temperature", "method.support_size", "method.instance_weight", "method.num_prototypes",
    "method.num_clusters", "optim.name", "optim.lr", "optim.batch_size",
    "optim.weight_decay", "train.epochs", "train.max_steps", "train.precision", "train.seed",
)
FINAL_TRAIN_KEYS = (("loss", "loss"), ("nn_label_agreement", "neighbour label agreement"),
                    ("positive_similarity", "cosine of z with its positive"), ("support_fill", "support-set fill"),
                    ("pseudo_label_accuracy", "classifier accuracy on the pseudo-labels"))
MAX_DETAILS = 6


def get(config: dict[str, Any], dotted: str) -> Any:
    """``config["a"]["b"]`` for ``"a.b"``; None where absent."""
    section, _, key = dotted.partition(".")
    value = config.get(section)
    return value.get(key) if isinstance(value, dict) else None


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def summary_section(run: RunData, data_used: str | None) -> str:
    """Headline cards, key settings, final metrics, hardware, the data the report used, the whole config."""
    c, r = run.config, run.results or {}
    before, after = r.get("knn_before"), r.get("knn_after")
    knn = "&mdash;"
    if isinstance(after, dict) and _number(after.get("top1")):
        gain = after["top1"] - before["top1"] if isinstance(before, dict) and _number(before.get("top1")) else None
        knn = f"{after['top1']:.1f}%" + (f" <small>({gain:+.1f})</small>" if gain is not None else "")
    wall = r.get("wall_time")
    cards = [
        (H.esc(run.method), "method"), (H.esc(get(c, "data.name")), "data"),
        (H.esc(get(c, "model.backbone")), "backbone"), (H.fmt(run.step), "steps (checkpoint)"),
        (H.fmt(wall, 0) + (" s" if _number(wall) else ""), "training wall time"),
        (H.fmt(r.get("images_per_second"), 0), "images / s"), (knn, "kNN top-1 after (gain)"),
    ]
    best = max((e for e in run.evals if _number(e.get("top1"))), key=lambda e: e["top1"], default=None)
    if best:
        cards.append((f"{best['top1']:.1f}%", f"best evaluation top-1 ({best.get('protocol')})"))
    method = METHODS.get(run.method)  # None: a method this version does not know (all keys shown)
    settings = [(H.esc(key), H.fmt(get(c, key), None)) for key in KEY_SETTINGS if get(c, key) is not None
                and (method is None or not key.startswith("method.") or key in ("method.name", *method.keys))]
    hardware = r.get("hardware")
    where = "as recorded by the run"
    if not isinstance(hardware, dict):
        hardware, where = runtime.hardware_info(), "of this report's machine: the run recorded none"
    side = (H.table(("key setting", "value"), settings),
            H.table(("final metric", "value"), _final_metrics(run)) if run.results or run.train else "")
    machine = "; ".join(f"{k} {v}" for k, v in hardware.items())
    used = data_used or "none (only the run directory's files)"
    config = H.esc(yaml.safe_dump(c, sort_keys=False))
    return (
        H.cards(cards) + "<div class='columns'>" + "".join(f"<div>{part}</div>" for part in side if part) + "</div>"
        + f"<p class='note'><b>Hardware</b> ({H.esc(where)}): {H.esc(machine)}.</p>"
        + f"<p class='note'><b>Data this report loaded</b>: {H.esc(used)}.</p>"
        + f"<details><summary>Resolved config (config.yaml)</summary><pre>{config}</pre></details>"
    )


def _final_metrics(run: RunData) -> list[tuple[str, str]]:
    c, r = run.config, run.results or {}
    rows = []
    for name, result in (("before pretraining", r.get("knn_before")), ("after pretraining", r.get("knn_after"))):
        if isinstance(result, dict):
            rows.append((f"kNN {name}", f"top-1 {H.fmt(result.get('top1'))}%, top-5 {H.fmt(result.get('top5'))}% "
                         f"(k={H.fmt(result.get('k'))}, {H.fmt(result.get('num_test'))} "
                         f"{H.esc(get(c, 'data.test_split'))} images)"))
    last = run.train[-1] if run.train else {}
    for key, name in FINAL_TRAIN_KEYS:
        if _number(last.get(key)):
            rows.append((f"{name} (step {H.fmt(last.get('step'))})", H.fmt(last[key], 3)))
    if _number(r.get("steps")):
        rows.append(("steps trained in the last session", H.fmt(r["steps"] - (r.get("resumed_from") or 0))))
    return rows


def training_section(run: RunData) -> str:
    """Loss, learning rate, kNN monitor and throughput; then the nearest-neighbour diagnostics."""
    from nnclr.report.plots import diagnostics_plot, training_plot

    if not run.train and not run.knn:
        return "<p class='muted'>No training metrics in this run directory (metrics.jsonl is absent or empty).</p>"
    curves = training_plot(run.train, run.knn)
    parts = [H.plot(curves.png, curves.title, curves.points)]
    method = METHODS.get(run.method)
    shown = method.diagnostics if method is not None else "neighbours"
    if shown == "none":
        return "".join(parts) + (f"<p class='note'>{H.esc(run.method)} has no support set, so there are no "
                                 "nearest-neighbour diagnostics.</p>")
    if shown == "clustering":
        return "".join(parts) + _clustering_part(run)
    diagnostics = diagnostics_plot(run.train)
    parts += [
        "<h3>Nearest-neighbour diagnostics</h3><p class='note'>Label agreement: share of positives (support-set "
        "neighbours) with the query's label; cosine of z with its positive (and with its nearest neighbour); age: "
        "steps since the neighbour was written; copy of the query: share of neighbours that are an older copy of "
        "the sample itself (excluded when <code>method.exclude_self</code> is on); fill: share of the support set "
        "in use. Rising agreement means the support set supplies semantically close positives.</p>",
        H.plot(diagnostics.png, diagnostics.title, diagnostics.points),
    ]
    return "".join(parts)


def _clustering_part(run: RunData) -> str:
    """DeepCluster: the per-epoch clustering diagnostics and the sizes of the checkpoint's pseudo-classes."""
    from nnclr.report.plots import bar_plot, clustering_plot

    diagnostics = clustering_plot(run.clustering, run.train)
    parts = [
        "<h3>Clustering diagnostics</h3><p class='note'>DeepCluster has no support set: every epoch it clusters "
        "z of the whole training set into pseudo-labels and learns to classify them. NMI with the labels: how much "
        "the clusters agree with the classes (where labels are known); NMI with the previous epoch: how stable the "
        "clustering is (both as in Caron et al., 2018, Fig. 2); cluster sizes; cosine of z with its centroid; the "
        "classifier's accuracy on its pseudo-labels (re-initialised after each clustering).</p>",
        H.plot(diagnostics.png, diagnostics.title, diagnostics.points),
    ]
    if run.pseudo_labels is not None:
        counts = sorted(run.pseudo_labels.bincount(minlength=int(get(run.config, "method.num_clusters") or 0)).tolist(),
                        reverse=True)
        n = sum(counts)
        parts += [
            f"<p>Pseudo-labels of the checkpoint: {len(counts):,} clusters of {n:,} training images, the largest "
            f"{counts[0]:,} images ({100 * counts[0] / max(1, n):.1f}%), the median {counts[len(counts) // 2]:,}, "
            f"the smallest {counts[-1]:,}. Images are drawn uniformly over the pseudo-labels, so each is seen about "
            f"{n / len(counts):,.0f} times per epoch whatever its cluster's size.</p>",
            H.plot(bar_plot(counts, "training images per pseudo-label (sorted)", "cluster (by rank)", "images"),
                   "pseudo-label usage"),
        ]
    return "".join(parts)


def evaluation_section(run: RunData) -> str:
    """The ``eval/*.json`` results as one table (semi-supervised: one row per label fraction)."""
    if not run.evals:
        return ("<p class='muted'>No evaluation yet: <code>nnclr eval all --checkpoint RUN_DIR</code> writes results "
                "into <code>RUN_DIR/eval/</code>, and the next report shows them here.</p>")
    current = _checkpoint_hash(run)
    rows = []
    for e in run.evals:
        step = H.fmt(e.get("step"))
        if current and e.get("checkpoint_hash") and e["checkpoint_hash"] != current:
            step += " <span class='bad'>(older checkpoint)</span>"
        splits = e.get("splits") if isinstance(e.get("splits"), dict) else {}
        sizes = ", ".join(f"{H.esc(k)} {H.fmt(v)}" for k, v in splits.items())
        for protocol, top1, top5, details in _eval_lines(e):
            rows.append((protocol, H.fmt(e.get("data")), H.fmt(top1), H.fmt(top5), details or "&mdash;", sizes, step,
                         H.fmt(e.get("wall_time_s"), 0)))
    files = ", ".join(H.esc(e["_file"]) for e in run.evals)
    return (H.table(("protocol", "data", "top-1 %", "top-5 %", "details", "images", "step", "time (s)"), rows,
                    numeric=(2, 3, 7))
            + f"<p class='note'>From {files} in <code>eval/</code>. Top-1 of retrieval is recall@1.</p>")


def _eval_lines(e: dict[str, Any]) -> list[tuple[str, Any, Any, str]]:
    """(protocol, top-1, top-5, details html) rows of one record; a semi record gives one per label subset."""
    metrics = e.get("metrics") if isinstance(e.get("metrics"), dict) else {}
    protocol = H.esc(e.get("protocol"))
    subsets = metrics.get("subsets")
    if isinstance(subsets, dict) and subsets:
        return [(f"{protocol} {H.esc(name)}", sub.get("top1"), sub.get("top5"),
                 f"{H.fmt(sub.get('labelled_images'))} labelled images, {H.fmt(sub.get('epochs'))} epochs")
                for name, sub in subsets.items() if isinstance(sub, dict)]
    settings = e.get("settings") if isinstance(e.get("settings"), dict) else {}
    shown = {k: v for k, v in settings.items() if k in ("k", "temperature", "mode") and not isinstance(v, dict)}
    # Top-level numbers and a sweep's best; per-grid-point tables (validation_top1 by l2, the kNN grid)
    # stay in the JSON, they would crowd the row.
    shown |= {k: v for k, v in flatten(metrics).items()
              if _number(v) and ("." not in k or k.startswith("best."))}
    details = ", ".join(f"{H.esc(k)} {H.fmt(v, 3) if isinstance(v, float) else H.fmt(v)}"
                        for k, v in list(shown.items())[:MAX_DETAILS])
    return [(protocol, e.get("top1"), e.get("top5"), details)]


def _checkpoint_hash(run: RunData) -> str | None:
    if not run.checkpoint.is_file():
        return None
    from nnclr.pretrained import file_hash

    return file_hash(run.checkpoint)
