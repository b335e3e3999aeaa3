"""``nnclr report``: the HTML report of a real tiny run, its sections, missing pieces, the CLI, and a browser.

One module-scoped NNCLR run (a subprocess ``nnclr pretrain``, which writes the automatic report)
on a small labelled subset of the shipped demo data, evaluated with ``nnclr eval knn``, is shared
by most tests; KMCLR and an unlabelled run are trained in-process, a few steps each.
"""

from __future__ import annotations

import html
import importlib.machinery
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from nnclr.config import load_config
from nnclr.data import load_dataset
from nnclr.report import write_report
from nnclr.report.embedding_map import available_method, project_2d
from nnclr.report.galleries import Embedded, galleries
from nnclr.train import pretrain

SECTIONS = ("summary", "training", "evaluation", "galleries", "map")
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--hide-scrollbars")


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nnclr", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600)


def write_npz(folder: Path, splits: dict[str, int], labelled: bool = True) -> str:
    """A seeded subset of the demo data as ``folder/{split}.npz``; returns the ``data.name``."""
    folder.mkdir(parents=True)
    for split, n in splits.items():
        demo = load_dataset("demo", split)
        pick = torch.randperm(len(demo), generator=torch.Generator().manual_seed(0))[:n]
        arrays = {"images": demo.images[pick].permute(0, 2, 3, 1).numpy()}
        if labelled:
            arrays |= {"labels": demo.labels[pick].numpy(), "classes": np.array(demo.classes)}
        np.savez(folder / f"{split}.npz", **arrays)
    return f"npz:{folder}"


def sections(page: str) -> dict[str, str]:
    """Section id -> its HTML, entities unescaped (the report writes attributes with single quotes)."""
    return {name: html.unescape(body)
            for name, body in re.findall(r"<section id='([a-z]+)'>(.*?)</section>", page, flags=re.S)}


def missing_notes(page: str) -> str:
    found = re.search(r"<div class='missing'>(.*?)</div>", page, flags=re.S)
    return html.unescape(found.group(1)) if found else ""


def plot_points(section: str) -> list[dict[str, int]]:
    return [json.loads(m) for m in re.findall(r"data-points='([^']*)'", section)]


@pytest.fixture(scope="module")
def tiny(tiny_run: tuple[str, ...]) -> list[str]:
    """The tiny run of this module: one epoch, a support set of 100, a metrics record every 2 steps (not 1)."""
    return [*tiny_run, "train.epochs=1", "train.log_every=2", "method.support_size=100"]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, tiny: list[str]) -> dict:
    """A tiny real NNCLR run (CLI), then a kNN evaluation (CLI) and a semi-supervised record of the eval shape."""
    root = tmp_path_factory.mktemp("report")
    data = write_npz(root / "data", {"train": 400, "test": 150})
    pretrained = cli("pretrain", "--run-dir", "run", "--no-progress", "--set", *tiny, f"data.name={data}",
                       "train.max_steps=6", cwd=root)
    assert pretrained.returncode == 0, pretrained.stderr
    run_dir = root / "run"
    auto = (run_dir / "report.html").read_text()
    evaluated = cli("eval", "knn", "--checkpoint", "run", "--no-progress", cwd=root)
    assert evaluated.returncode == 0, evaluated.stderr
    semi = {"protocol": "semi", "data": data, "top1": 20.0, "top5": 60.0, "step": 6, "splits": {"train": 400},
            "metrics": {"subsets": {"1%": {"labelled_images": 4, "epochs": 60, "top1": 20.0, "top5": 60.0},
                                    "10%": {"labelled_images": 40, "epochs": 30, "top1": 27.5, "top5": 71.0}}}}
    (run_dir / "eval" / "semi-test.json").write_text(json.dumps(semi))
    (run_dir / "eval" / "future-protocol.json").write_text(json.dumps({"protocol": "future", "metrics": [1, 2]}))
    return {"root": root, "dir": run_dir, "data": data, "stdout": pretrained.stdout, "auto": auto}


@pytest.fixture(scope="module")
def report(run: dict) -> Path:
    """The report regenerated with ``nnclr report RUN_DIR --out FILE`` after the evaluation."""
    out = run["root"] / "out" / "report.html"
    result = cli("report", str(run["dir"]), "--out", str(out), cwd=run["root"])
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"report: {out}"
    return out


@pytest.mark.slow
def test_pretrain_ends_with_the_report_path(run: dict) -> None:
    last = run["stdout"].strip().splitlines()[-1]
    assert last.startswith(f"report: {Path('run') / 'report.html'} ("), run["stdout"]  # --run-dir run
    assert set(sections(run["auto"])) == set(SECTIONS)
    assert "No evaluation yet" in sections(run["auto"])["evaluation"]  # the eval came after


@pytest.mark.slow
def test_report_has_every_section_with_non_empty_plots(report: Path) -> None:
    page = report.read_text()
    parts = sections(page)
    assert list(parts) == list(SECTIONS)
    summary = parts["summary"]
    for needle in ("nnclr", "small_cnn", "training wall time", "images / s", "kNN before pretraining",
                   "kNN after pretraining", "Hardware</b> (as recorded by the run): cpu ",
                   "<details><summary>Resolved config"):
        assert needle in summary, needle
    points = plot_points(parts["training"])
    assert len(points) == 2  # training curves, NN diagnostics
    for panel, count in (points[0] | points[1]).items():
        assert count > 0, f"plot panel {panel} is empty"
    assert points[0]["knn"] == 4  # top-1 and top-5 before and after
    for name in ("galleries", "map"):
        assert "<img" in parts[name] and "Not computed" not in parts[name], name


@pytest.mark.slow
def test_evaluation_table_shows_records_and_tolerates_unknown_ones(run: dict, report: Path) -> None:
    table = sections(report.read_text())["evaluation"]
    knn = json.loads(next((run["dir"] / "eval").glob("knn-*.json")).read_text())
    assert f"<td class='num'>{knn['top1']:.1f}</td>" in table  # the real kNN evaluation
    assert "semi 1%" in table and "semi 10%" in table and "27.5" in table  # one row per label fraction
    assert "<td>future</td>" in table  # an unknown protocol is still listed


@pytest.mark.slow
def test_galleries_show_support_and_training_neighbours_with_labels(report: Path, run: dict) -> None:
    gallery = sections(report.read_text())["galleries"]
    assert gallery.count("class='tile q'") == 10  # one query per class
    assert gallery.count("'muted'>age ") == 10 * 6 and gallery.count("'muted'>train #") == 10 * 6  # 6 + 6 each
    assert f"{run['data']}: split 'test' (150 images)" in gallery and "split 'train' (400 images)" in gallery
    assert gallery.count("\u2717<br>") == gallery.count("class='tile bad'")  # every red border has the cross


@pytest.mark.slow
def test_no_external_references(report: Path) -> None:
    page = report.read_text()
    links = re.findall(r"(?:src|href)=['\"]([^'\"]*)['\"]", page)
    assert links and all(link.startswith(("data:image/png;base64,", "#")) for link in links)
    # no http link; the base64 payload of an inlined PNG may spell "http" by chance (seen in CI)
    assert not any("http" in link for link in links if not link.startswith("data:image/png;base64,"))
    assert "<script" not in page and "<link" not in page and "url(" not in page and "@import" not in page


def test_cli_bad_run_dir_is_one_line_exit_2(tmp_path: Path) -> None:
    for target in (tmp_path / "nowhere", tmp_path):  # absent; present but not a run directory
        result = cli("report", str(target), cwd=tmp_path)
        assert result.returncode == 2, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("nnclr: error: ") and str(target) in lines[0], result.stderr


@pytest.mark.slow
def test_missing_pieces_are_named(run: dict, tmp_path: Path) -> None:
    """A run killed before its first checkpoint: config and metrics only."""
    partial = tmp_path / "partial"
    partial.mkdir()
    for name in ("config.yaml", "metrics.jsonl"):
        shutil.copy(run["dir"] / name, partial / name)
    page = write_report(partial).read_text()
    notes = missing_notes(page)
    for needle in ("no checkpoint.pt", "no results.json", "no evaluation yet"):
        assert needle in notes, needle
    parts = sections(page)
    assert set(parts) == set(SECTIONS)
    assert "Not computed" in parts["galleries"] and "No evaluation yet" in parts["evaluation"]
    assert all(count > 0 for p in plot_points(parts["training"]) for count in p.values())


@pytest.mark.slow
def test_no_galleries_never_loads_the_training_split(run: dict, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import nnclr.data

    loaded: list[str] = []
    real = nnclr.data.load_dataset

    def spy(name: str, split: str = "train", **kwargs: object) -> object:
        loaded.append(split)
        return real(name, split, **kwargs)

    monkeypatch.setattr(nnclr.data, "load_dataset", spy)
    page = write_report(run["dir"], tmp_path / "r.html", galleries=False).read_text()
    assert loaded == ["test"]
    parts = sections(page)
    assert "<img" in parts["map"] and "galleries off" in parts["galleries"]
    assert "the training split was not loaded" in parts["summary"]


@pytest.mark.slow
def test_unlabelled_run_without_test_split_says_what_is_missing(tmp_path: Path, tiny: list[str]) -> None:
    data = write_npz(tmp_path / "data", {"train": 200}, labelled=False)
    config = load_config(None, [*tiny, f"data.name={data}", "data.test_split=", "train.max_steps=3",
                                f"train.run_dir={tmp_path / 'run'}", "train.report=false"])
    pretrain(config, progress=False, echo=lambda *a, **k: None)
    page = write_report(tmp_path / "run").read_text()
    notes = missing_notes(page)
    assert "no labels in the data" in notes and "no kNN monitor records" in notes and "no evaluation yet" in notes
    parts = sections(page)
    assert "split 'train' (200 images) for the queries" in parts["galleries"]  # no test split: queries from train
    assert parts["galleries"].count("'muted'>train #") == 10 * 6
    assert "class='tile bad'" not in parts["galleries"] and "class='tile ok'" not in parts["galleries"]


@pytest.mark.slow
def test_kmclr_report_shows_prototype_usage_and_members(tmp_path: Path, tiny: list[str]) -> None:
    data = write_npz(tmp_path / "data", {"train": 200, "test": 60})
    config = load_config(None, [*tiny, f"data.name={data}", "method.name=kmclr", "method.num_prototypes=8",
                                "train.max_steps=5", f"train.run_dir={tmp_path / 'run'}",
                                "train.report=false"])
    pretrain(config, progress=False, echo=lambda *a, **k: None)
    parts = sections(write_report(tmp_path / "run").read_text())
    prototypes = parts["prototypes"]
    claimed = [int(n.replace(",", "")) for n in re.findall(r"<b>#\d+</b><br>([\d,]+) images", prototypes)]
    assert 1 <= len(claimed) <= 5 and claimed == sorted(claimed, reverse=True) and sum(claimed) <= 200
    # each training image goes to the prototype nearest to its projection z, as KMCLR's positive does
    assert "The 8 k-means prototypes claim the 200 images of the training split" in prototypes
    assert prototypes.count("<img alt=''") >= len(claimed)  # member images


def test_galleries_rank_neighbours_and_never_show_the_query_itself() -> None:
    n, dim = 30, 8
    h = F.normalize(torch.randn(n, dim), dim=1)
    labels = torch.arange(n) % 3
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 3, 4, 4)
    split = Embedded(images, labels, h, h)
    support = {"embeddings": h[:20], "labels": labels[:20], "indices": torch.arange(20), "steps": torch.full((20,), 7),
               "num_filled": torch.tensor(20)}
    picks = torch.tensor([0, 5, 25])
    rows = galleries(split, picks, split, support, step=10, k=4, same_split=True)
    for row, query in zip(rows, picks.tolist()):
        expected = [j for j in (h @ h[query]).argsort(descending=True).tolist() if j != query][:4]
        assert [int(n.image[0, 0, 0]) for n in row.train] == expected
        assert [n.similarity for n in row.train] == sorted((n.similarity for n in row.train), reverse=True)
        assert all(n.wrong == (n.label != row.label) for n in row.train + row.support)
        shown = [int(n.image[0, 0, 0]) for n in row.support]
        assert query not in shown and len(shown) == 4 and all(s < 20 for s in shown)
        assert all(n.note == "age 3" for n in row.support)


def test_2d_map_methods(monkeypatch: pytest.MonkeyPatch) -> None:
    x = F.normalize(torch.randn(60, 16), dim=1)
    assert available_method() == ("umap" if importlib.util.find_spec("umap") else "t-SNE")
    for method in ("PCA", "t-SNE"):
        xy, used = project_2d(x, method=method)
        assert used == method and xy.shape == (60, 2) and np.isfinite(xy).all() and xy.std(axis=0).min() > 0

    class FakeUMAP:  # stands in for umap-learn (an optional extra, not installed in CI)
        def __init__(self, **kwargs: object) -> None:
            self.kwargs = kwargs

        def fit_transform(self, data: np.ndarray) -> np.ndarray:
            assert self.kwargs["metric"] == "cosine" and self.kwargs["n_components"] == 2
            return data[:, :2]

    fake = types.ModuleType("umap")
    fake.__spec__ = importlib.machinery.ModuleSpec("umap", None)
    fake.UMAP = FakeUMAP
    monkeypatch.setitem(sys.modules, "umap", fake)
    assert available_method() == "umap"
    xy, used = project_2d(x)
    assert used == "UMAP" and np.allclose(xy, x[:, :2].numpy())


@pytest.mark.slow
def test_tensorboard_gets_the_scalars_and_the_galleries(run: dict) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run["dir"] / "tensorboard"), size_guidance={"images": 0}).Reload()
    scalars = set(events.Tags()["scalars"])
    records = [json.loads(line) for line in (run["dir"] / "metrics.jsonl").read_text().splitlines()]
    for record in records:
        for key, value in record.items():
            if key not in ("type", "step", "epoch") and isinstance(value, float) and np.isfinite(value):
                assert f"{record['type']}/{key}" in scalars
    assert [e.step for e in events.Scalars("train/loss")] == [r["step"] for r in records if r["type"] == "train"]
    assert "report/galleries" in events.Tags()["images"]


def chromium() -> str:
    path = shutil.which("chromium")
    if path is None:
        message = "chromium not found (Debian: apt-get install chromium)"
        if os.environ.get("NNCLR_REQUIRE_CHROMIUM") == "1":
            pytest.fail(message + "; NNCLR_REQUIRE_CHROMIUM=1 forbids skipping")
        pytest.skip(message)
    return path


@pytest.mark.slow
def test_report_renders_in_headless_chromium(report: Path, tmp_path: Path) -> None:
    """A tall screenshot: the page's white column ends where the content does; it is long and not blank."""
    png, height = tmp_path / "report.png", 9000
    result = subprocess.run(
        [chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={png}",
         f"--window-size=1280,{height}", report.as_uri()], capture_output=True, text=True, timeout=180,
    )
    assert png.is_file(), result.stderr
    pixels = np.asarray(Image.open(png).convert("RGB"))
    assert pixels.shape == (height, 1280, 3)
    background = pixels[-1, 640]  # below the content: the body's grey
    column = (pixels[:, 640] != background).any(axis=1)
    page_height = int(np.nonzero(column)[0].max()) + 1
    assert 3000 < page_height < height, f"rendered page height {page_height}px (screenshot {png})"
    content = pixels[:page_height, 40:-40]
    not_white = (content < 245).any(axis=2).mean()
    colours = len(np.unique(content.reshape(-1, 3)[::7], axis=0))
    assert not_white > 0.05 and colours > 500, f"looks blank: {not_white:.3f} non-white, {colours} colours ({png})"
