"""The report's sections that need the encoder and images: neighbour galleries, the 2-D map, KMCLR prototypes.

Images come from the run's own data set (``data.name`` of its config), loaded offline (never
downloading). The training split is loaded only for the galleries (``galleries=True``): it
supplies the support-set entries' images and the training-set neighbours. The map needs only the
query split: the test split, or the training split when the run has no test split. Whatever cannot
be computed becomes a sentence in :attr:`RunData.missing` and in its section.

A ``folder:`` data set is indexed, not decoded (``lazy=True``), and a split of more than
``SAMPLE`` images is represented by a seeded sample of ``SAMPLE`` of them (the same in every
report): only those are decoded and encoded, in batches, so the report's memory and time do not
grow with the data set. The report says where its numbers come from a sample.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from nnclr.errors import UserError
from nnclr.methods import METHODS
from nnclr.report import html as H
from nnclr.report.data import RunData
from nnclr.report.galleries import Embedded

Section = tuple[str, str, str]  # (anchor, heading, body html)
SAMPLE = 5000  # at most this many images of a split are encoded (a seeded sample of a larger split)


@dataclass
class Images:
    """What the visual sections work on: the encoder, the query split (encoded), the training split or None."""

    pretrained: Any
    queries: Embedded
    query_split: str
    classes: list[str]
    train: Embedded | None
    used: str  # which data, in words

    @property
    def same_split(self) -> bool:
        """True when the queries are the training images themselves (the run has no test split)."""
        return self.train is not None and self.train.images is self.queries.images


def load_images(run: RunData, galleries: bool) -> Images:
    """Load the encoder, encode the query split and (``galleries``) the training split; UserError if impossible."""
    if not run.checkpoint.is_file():
        raise UserError("the run directory has no checkpoint.pt")
    import nnclr
    from nnclr.data import load_dataset
    from nnclr.report.galleries import embed, sample_rows

    pretrained = nnclr.load(run.run_dir, device="auto")
    d = pretrained.config.data

    def load(split: str) -> Any:
        return load_dataset(d.name, split, root=d.root, image_size=pretrained.image_size, download=False, lazy=True)

    def encode(dataset: Any) -> Embedded:
        return embed(pretrained, dataset.images, dataset.labels, rows=sample_rows(len(dataset), SAMPLE))

    query_split, test_set, note = d.test_split, None, ""
    if d.test_split:
        try:
            test_set = load(d.test_split)
        except UserError as error:
            note = f" (its test split {d.test_split!r} could not be loaded: {error})"
    else:
        note = " (the run has no test split, data.test_split is empty)"
    if test_set is None and not galleries:
        raise UserError(f"no test split to draw the map from{note}; galleries (which load the training split) are off")
    train_set = load(d.train_split) if galleries or test_set is None else None
    if test_set is None:
        query_split, test_set = d.train_split, train_set
    queries = encode(test_set)
    train = None
    if train_set is not None:
        train = queries if train_set is test_set else encode(train_set)
    used = f"{d.name}: split {query_split!r} ({_count(queries)}) for the queries and the map{note}"
    if train_set is not None and train_set is not test_set:
        used += f"; split {d.train_split!r} ({_count(train)}) as the training set"
    elif train_set is None:
        used += "; the training split was not loaded (galleries off)"
    return Images(pretrained, queries, query_split, test_set.classes or (train_set.classes if train_set else []),
                  train, used)


def _count(split: Embedded) -> str:
    """``"1,000 images"``, or ``"a seeded sample of 5,000 of its 120,000 images"``."""
    if split.sampled:
        return f"a seeded sample of {len(split.labels):,} of its {len(split.images):,} images"
    return f"{len(split.images):,} images"


def visual_sections(run: RunData, galleries: bool) -> tuple[list[Section], str | None]:
    """The galleries, map and (KMCLR) prototype sections, and a sentence naming the data used (None: no data)."""
    try:
        images = load_images(run, galleries)
    except UserError as error:
        run.missing["data"] = f"galleries and embedding map not computed: {error}"
        text = f"<p class='muted'>Not computed: {H.esc(error)}.</p>"
        sections = [("galleries", "Neighbour galleries", text), ("map", "Embedding map", text)]
        if _shows_prototypes(run):
            sections.append(("prototypes", f"{run.method.upper()} prototypes", prototype_section(run, None)))
        return sections, None
    if images.queries.labels.lt(0).all():
        run.missing["labels"] = ("no labels in the data: neighbours cannot be marked right or wrong and the map "
                                 "is not coloured by class")
    sections = [("galleries", "Neighbour galleries", gallery_section(run, images)),
                ("map", "Embedding map", map_section(run, images))]
    if _shows_prototypes(run):
        sections.append(("prototypes", f"{run.method.upper()} prototypes", prototype_section(run, images)))
    return sections, images.used


def _shows_prototypes(run: RunData) -> bool:
    """Whether the run's method has prototypes to show (its record in :mod:`nnclr.methods` says)."""
    method = METHODS.get(run.method)
    return method is not None and method.prototypes


def gallery_section(run: RunData, images: Images) -> str:
    """For fixed query images: their nearest support-set entries (by z) and training images (by h)."""
    if images.train is None:
        run.missing["galleries"] = "neighbour galleries not computed (galleries off: the training split is not loaded)"
        return ("<p class='muted'>Not computed: the report was written with galleries off, which does not load the "
                "training split. <code>nnclr report RUN_DIR</code> (galleries on) shows them.</p>")
    from nnclr.report.galleries import galleries, gallery_grid, pick_queries
    from nnclr.tensorboard_log import TensorBoardLog

    picks = pick_queries(images.queries.labels, count=10)
    rows = galleries(images.queries, picks, images.train, run.support, run.step or 0, same_split=images.same_split)
    with_support = run.support is not None and int(run.support["num_filled"]) > 0
    intro = (f"<p class='note'>Data used: {H.esc(images.used)}. For {len(rows)} fixed images of split "
             f"{H.esc(repr(images.query_split))} (one per class, the same in every report), "
             + ("the nearest entries of the support set by the projection z (the positives NNCLR actually uses; "
                "each entry is shown as the training image it was computed from, with its age in steps) and "
                if with_support else "")
             + "the nearest training images by backbone features h (what kNN evaluation uses), with labels and "
             "cosine similarities. Borders: blue query, green same class, "
             "<span class='bad'>red &#10007; another class</span>.</p>")
    if images.train.sampled:
        intro += (f"<p class='note'>The training-set neighbours and the agreement below are searched among a seeded "
                  f"sample of {len(images.train.labels):,} of the {len(images.train.images):,} training images, "
                  "not all of them (nearer images may exist outside the sample).</p>")
    if run.support is None:
        intro += f"<p class='note'>{H.esc(run.method)} has no support set: only training-set neighbours are shown.</p>"
    elif not with_support:
        intro += "<p class='note'>The support set is still empty: only training-set neighbours are shown.</p>"
    with TensorBoardLog(run.run_dir) as tensorboard:
        tensorboard.image("report/galleries", gallery_grid(rows), run.step or 0)
    return intro + _agreement(rows) + H.gallery_table(rows, images.classes, with_support, images.query_split)


def _agreement(rows: list[Any]) -> str:
    """How many shown neighbours share the query's class, per source."""
    parts = []
    for name, attr in (("support set", "support"), ("training set", "train")):
        shown = [n for r in rows for n in getattr(r, attr) if r.label >= 0 and n.label >= 0]
        if shown:
            right = sum(not n.wrong for n in shown)
            parts.append(f"{name}: {right}/{len(shown)} shown neighbours of the query's class "
                         f"({100 * right / len(shown):.0f}%)")
    return f"<p>{H.esc('; '.join(parts))}.</p>" if parts else ""


def map_section(run: RunData, images: Images) -> str:
    """A 2-D map (UMAP, t-SNE or PCA) of the query split's backbone features, coloured by label."""
    from nnclr.report.embedding_map import project_2d, subset
    from nnclr.report.plots import scatter_plot

    q = images.queries
    pick = subset(q.h.shape[0])
    xy, method = project_2d(q.h[pick])
    name = images.pretrained.config.data.name
    title = f"{method} of backbone features h: {len(pick):,} images of {name} split {images.query_split!r}"
    if q.sampled:
        title += f" (from a seeded sample of {len(q.labels):,} of its {len(q.images):,})"
    return (H.plot(scatter_plot(xy, q.labels[pick].numpy(), images.classes, title), "embedding map")
            + f"<p class='note'>{H.esc(method)} of the L2-normalised backbone features, coloured by label. "
            "Methods: UMAP when <code>umap-learn</code> is installed (<code>pip install nnclr[umap]</code>), else "
            "t-SNE (scikit-learn), else PCA. Classes that form separate islands are what a kNN or linear probe "
            "can pick apart.</p>")


def prototype_section(run: RunData, images: Images | None) -> str:
    """KMCLR: the images claimed by each prototype (by z), and the members of the largest prototypes."""
    from nnclr.report.galleries import prototype_usage
    from nnclr.report.plots import bar_plot

    if run.prototypes is None:
        run.missing["prototypes"] = "no k-means prototypes in the checkpoint yet (KMCLR makes them at its first step)"
        return "<p class='muted'>No prototypes yet: KMCLR initialises them at its first step.</p>"
    if images is None:
        return "<p class='muted'>Not computed: the report could not load the data to assign to the prototypes.</p>"
    split, name = ((images.train, "the training split") if images.train is not None
                   else (images.queries, f"split {images.query_split!r}"))
    usage = prototype_usage(run.prototypes, split)
    counts = sorted(usage.counts, reverse=True)
    bars = bar_plot(counts, "images claimed per prototype (sorted)", "prototype (by rank)", "images")
    return H.prototype_section(usage, bars, images.classes, name)
