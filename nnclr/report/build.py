"""``write_report(run_dir)``: read a run directory, compute galleries and the embedding map, write the HTML.

The report never needs the training data unless galleries are asked for (``galleries=True``, the
default); then it loads the run's own data set (never downloading) and says which splits it used.
Every missing piece (no checkpoint, no evaluation yet, no labels, data not found) becomes a
sentence in the report instead of an error.
"""

from __future__ import annotations

import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

from nnclr import __version__
from nnclr.errors import UserError
from nnclr.report import html as H
from nnclr.report.data import RunData, hardware_info, read_run

KEY_SETTINGS = (
    "data.name", "data.image_size", "augment.recipe", "model.backbone", "model.proj_dim", "method.name",
    "method.temperature", "method.support_size", "method.num_prototypes", "optim.name", "optim.lr",
    "optim.batch_size", "optim.weight_decay", "train.epochs", "train.max_steps", "train.precision", "train.seed",
)


def write_report(run_dir: str | Path, out: str | Path | None = None, galleries: bool = True) -> Path:
    """Write the HTML report of ``run_dir`` to ``out`` (default ``RUN_DIR/report.html``); returns its path.

    Args:
        run_dir: a run directory of ``nnclr pretrain``.
        out: the HTML file to write.
        galleries: load the run's data set for the neighbour galleries, the embedding map and the
            KMCLR prototype members (False: only what the run directory holds).

    Raises:
        UserError: ``run_dir`` is not a run directory, or ``out`` cannot be written.
    """
    started = time.perf_counter()
    run = read_run(run_dir)
    out = Path(out).expanduser() if out else run.run_dir / "report.html"
    visual = _visual_sections(run) if galleries else _no_data_sections(run)
    sections = [("summary", "Summary", _summary(run)), ("training", "Training", _training(run)),
                ("evaluation", "Evaluation", _evaluation(run)), *visual]
    generated = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    subtitle = (f"{H.esc(run.run_dir.resolve())} &middot; written {generated} by nnclr {__version__} "
                f"in {time.perf_counter() - started:.0f} s")
    document = H.page(f"nnclr report: {run.method} on {run.config.get('data', {}).get('name', '?')}",
                      subtitle, sections, list(run.missing.values()))
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(document, encoding="utf-8")
        tmp.replace(out)
    except OSError as error:
        raise UserError(f"cannot write the report to {out}: {error.strerror or error}") from None
    return out


def _get(config: dict[str, Any], dotted: str) -> Any:
    section, _, key = dotted.partition(".")
    return config.get(section, {}).get(key)


def _summary(run: RunData) -> str:
    c, r = run.config, run.results or {}
    before, after = r.get("knn_before"), r.get("knn_after")
    knn = "&mdash;"
    if after:
        knn = f"{after['top1']:.1f}%" + (f" <small>({after['top1'] - before['top1']:+.1f})</small>" if before else "")
    steps = f"{run.step:,}" if run.step is not None else "&mdash;"
    items = [
        (H.esc(run.method), "method"), (H.esc(_get(c, "data.name")), "data"),
        (H.esc(_get(c, "model.backbone")), "backbone"), (steps, "steps (checkpoint)"),
        (H.fmt(r.get("wall_time"), 0) + (" s" if r.get("wall_time") is not None else ""), "training wall time"),
        (H.fmt(r.get("images_per_second"), 0), "images / s"), (knn, "kNN top-1 after (gain)"),
    ]
    if run.evals:
        best = max((e for e in run.evals if isinstance(e.get("top1"), (int, float))),
                   key=lambda e: e["top1"], default=None)
        if best:
            items.append((f"{best['top1']:.1f}%", f"best eval top-1 ({best.get('protocol')})"))
    settings = [(H.esc(key), H.fmt(_get(c, key), 4) if isinstance(_get(c, key), float) else H.fmt(_get(c, key)))
                for key in KEY_SETTINGS if _get(c, key) is not None]
    if run.method == "simclr":
        settings = [s for s in settings if "support_size" not in s[0] and "num_prototypes" not in s[0]]
    elif run.method == "nnclr":
        settings = [s for s in settings if "num_prototypes" not in s[0]]
    metrics = []
    for name, result in (("before pretraining", before), ("after pretraining", after)):
        if result:
            metrics.append((f"kNN on {H.esc(_get(c, 'data.test_split'))}, {name}", f"top-1 {result['top1']:.1f}%, "
                            f"top-5 {result['top5']:.1f}% (k={result.get('k')}, {result.get('num_test', '?')} images)"))
    if r:
        metrics.append(("steps trained in the last session", H.fmt(r.get("steps", 0) - r.get("resumed_from", 0))))
    hardware = r.get("hardware")
    where = "the run (results.json)"
    if not hardware:
        hardware, where = hardware_info(), "the machine that wrote this report (the run did not record its own)"
    hw = [(H.esc(k), H.esc(v)) for k, v in hardware.items()]
    config = H.esc(yaml.safe_dump(c, sort_keys=False))
    return (
        H.cards(items)
        + "<h3>Key settings</h3>" + H.table(("key", "value"), settings)
        + ("<h3>Final metrics</h3>" + H.table(("", ""), metrics) if metrics else "")
        + f"<h3>Hardware</h3><p class='note'>Of {H.esc(where)}.</p>" + H.table(("", ""), hw)
        + f"<details><summary>Resolved config (config.yaml)</summary><pre>{config}</pre></details>"
    )


def _training(run: RunData) -> str:
    from nnclr.report.plots import diagnostics_plot, training_plot

    if not run.train and not run.knn:
        return "<p class='muted'>No training metrics in this run directory (metrics.jsonl is absent or empty).</p>"
    parts = [plot_html(training_plot(run.train, run.knn))]
    if run.method == "simclr":
        parts.append("<p class='note'>SimCLR has no support set: the neighbour diagnostics apply to NNCLR and "
                     "KMCLR only (the positive similarity is that of the two views).</p>")
    parts.append("<h3>Nearest-neighbour diagnostics</h3><p class='note'>Label agreement: share of positives "
                 "(support-set neighbours) with the query's label; positive similarity: mean cosine between z and "
                 "its positive; age: steps since the neighbour was written; fill: share of the support set in use. "
                 "Rising agreement means the support set supplies semantically close positives.</p>")
    parts.append(plot_html(diagnostics_plot(run.train)))
    return "".join(parts)


def plot_html(p: Any) -> str:
    return H.plot(p.png, p.title)


def _evaluation(run: RunData) -> str:
    if not run.evals:
        return ("<p class='muted'>No evaluation yet: <code>nnclr eval all --checkpoint RUN_DIR</code> writes results "
                "into <code>RUN_DIR/eval/</code>, and the next report shows them here.</p>")
    rows, checkpoint_hash = [], _checkpoint_hash(run)
    for e in run.evals:
        extra = _flat_numbers(e.get("metrics") or {})
        extra_text = ", ".join(f"{H.esc(k)} {H.fmt(v, 3) if isinstance(v, float) else H.fmt(v)}"
                               for k, v in list(extra.items())[:8])
        splits = ", ".join(f"{H.esc(k)} {H.fmt(v)}" for k, v in (e.get("splits") or {}).items())
        step = H.fmt(e.get("step"))
        if checkpoint_hash and e.get("checkpoint_hash") and e["checkpoint_hash"] != checkpoint_hash:
            step += " <span class='bad'>(older checkpoint)</span>"
        rows.append((H.esc(e.get("protocol")), H.esc(e.get("data")), H.fmt(e.get("top1")), H.fmt(e.get("top5")),
                     extra_text or "&mdash;", splits, step, H.fmt(e.get("wall_time_s"), 0)))
    return H.table(("protocol", "data", "top-1 %", "top-5 %", "other metrics", "splits", "step", "time (s)"),
                   rows, numeric=(2, 3, 7)) + "<p class='note'>From " + ", ".join(
        H.esc(e["_file"]) for e in run.evals) + " in eval/.</p>"


def _flat_numbers(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat |= _flat_numbers(value, f"{prefix}{key}.")
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            flat[f"{prefix}{key}"] = value
    return flat


def _checkpoint_hash(run: RunData) -> str | None:
    if not run.checkpoint.is_file():
        return None
    from nnclr.pretrained import file_hash

    return file_hash(run.checkpoint)


def _no_data_sections(run: RunData) -> list[tuple[str, str, str]]:
    text = ("<p class='muted'>Not computed: the report was written without loading data (galleries off). "
            "<code>nnclr report RUN_DIR</code> computes it from the run's data set.</p>")
    run.missing["galleries"] = "galleries, embedding map and prototype members were not computed (galleries off)"
    sections = [("galleries", "Neighbour galleries", text), ("map", "Embedding map", text)]
    if run.method == "kmclr":
        sections.append(("prototypes", "KMCLR prototypes", _prototypes(run, None)))
    return sections


def _visual_sections(run: RunData) -> list[tuple[str, str, str]]:
    """Galleries, the 2-D map and (KMCLR) prototypes, from the checkpoint's encoder and the run's data."""
    try:
        loaded = _load_data(run)
    except UserError as error:
        run.missing["data"] = f"galleries and map skipped: {error}"
        text = f"<p class='muted'>Not computed: {H.esc(error)}</p>"
        sections = [("galleries", "Neighbour galleries", text), ("map", "Embedding map", text)]
        if run.method == "kmclr":
            sections.append(("prototypes", "KMCLR prototypes", _prototypes(run, None)))
        return sections
    pretrained, train_set, test_set, used = loaded
    from nnclr.report.embedding_map import project_2d, subset
    from nnclr.report.galleries import embed, galleries, gallery_grid, pick_queries
    from nnclr.report.plots import scatter_plot
    from nnclr.report.tensorboard import TensorBoardLog

    train_h, _ = embed(pretrained, train_set.images)
    test_h, test_z = embed(pretrained, test_set.images)
    queries = pick_queries(test_set.labels, count=10)
    rows = galleries(test_set.images, test_set.labels, test_h, test_z, train_set.images, train_set.labels, train_h,
                     run.support, run.step or 0, queries)
    classes = test_set.classes or train_set.classes
    intro = (f"<p class='note'>Data used: {H.esc(used)}. For {len(rows)} fixed test images (one per class, the same "
             "in every report), the nearest entries of the support set by the projection z (the positives NNCLR "
             "actually uses; each entry is shown as the training image it was computed from, its label, cosine "
             "similarity and age in steps) and the nearest training images by backbone features (what kNN "
             "evaluation uses). Borders: blue query, green same class, "
             "<span class='bad'>red &#10007; another class</span>.</p>")
    with_support = run.support is not None
    if not with_support:
        intro += "<p class='note'>This method has no support set, so only training-set neighbours are shown.</p>"
    if not test_set.has_labels:
        run.missing["labels"] = "no labels in the data: neighbours cannot be marked right or wrong, the map is grey"
    agreement = _agreement(rows)
    gallery_html = intro + agreement + H.gallery_table(rows, classes, with_support)
    with TensorBoardLog(run.run_dir) as tb:
        tb.images("report/galleries", gallery_grid(rows), run.step or 0)
    pick = subset(test_h.shape[0])
    xy, method = project_2d(test_h[pick])
    title = f"{method} of backbone features, {len(pick):,} {test_set.name} {_get(run.config, 'data.test_split')} images"
    map_html = (H.plot(scatter_plot(xy, test_set.labels[pick].numpy(), classes, title), "embedding map")
                + f"<p class='note'>{H.esc(method)} of the L2-normalised backbone features of the test split, coloured "
                "by label. Install the <code>umap</code> extra for UMAP (used when available), else t-SNE from "
                "scikit-learn, else PCA.</p>")
    sections = [("galleries", "Neighbour galleries", gallery_html), ("map", "Embedding map", map_html)]
    if run.method == "kmclr":
        sections.append(("prototypes", "KMCLR prototypes", _prototypes(run, train_set)))
    return sections


def _agreement(rows: list[Any]) -> str:
    """How many shown neighbours share the query's class, per source."""
    parts = []
    for name, attr in (("support set", "support"), ("training set", "train")):
        shown = [(r.label, n) for r in rows for n in getattr(r, attr) if r.label >= 0 and n.label >= 0]
        if shown:
            right = sum(not n.wrong for _, n in shown)
            parts.append(f"{name}: {right}/{len(shown)} neighbours of the query's class ({100 * right / len(shown):.0f}%)")
    return f"<p>{H.esc('; '.join(parts))}.</p>" if parts else ""


def _load_data(run: RunData) -> tuple[Any, Any, Any, str]:
    """The encoder and the run's train and test splits at the encoder's image size (never downloading)."""
    if not run.checkpoint.is_file():
        raise UserError("no checkpoint.pt in the run directory")
    import nnclr
    from nnclr.data import load_dataset

    pretrained = nnclr.load(run.run_dir, device="auto")
    d = pretrained.config.data
    if not d.test_split:
        raise UserError("the run has no test split (data.test_split is empty)")
    train_set = load_dataset(d.name, d.train_split, root=d.root, image_size=pretrained.image_size, download=False)
    test_set = load_dataset(d.name, d.test_split, root=d.root, image_size=pretrained.image_size, download=False)
    used = (f"{d.name} split {d.train_split} ({len(train_set):,} images) as the training set and split "
            f"{d.test_split} ({len(test_set):,} images) for queries and the map")
    return pretrained, train_set, test_set, used


def _prototypes(run: RunData, train_set: Any) -> str:
    from nnclr.report.galleries import prototype_usage
    from nnclr.report.plots import bar_plot

    if run.prototypes is None or run.support is None:
        run.missing["prototypes"] = "no k-means prototypes in the checkpoint yet (KMCLR clusters once the support set holds K rows)"
        return "<p class='muted'>No prototypes yet: KMCLR clusters once the support set holds K rows.</p>"
    usage = prototype_usage(run.prototypes, run.support, train_set.images if train_set is not None else None)
    counts = sorted(usage.counts, reverse=True)
    bars = bar_plot(counts, "support rows claimed per prototype (sorted)", "prototype (by rank)", "rows")
    classes = train_set.classes if train_set is not None else []
    return H.prototype_section(usage, bars, classes)
