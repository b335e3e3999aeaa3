"""DeepCluster: sampling uniform over pseudo-labels, empty clusters re-seeded, the classifier reset after each
clustering, a CLI run, and ``nnclr eval``/``embed``/``report`` on its checkpoint."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from use_helpers import run_main

from nnclr import train
from nnclr.config import load_config
from nnclr.deepcluster import CLASSIFIER_INIT_STD, PseudoLabels, balanced_order
from nnclr.errors import UserError
from nnclr.report import write_report
from nnclr.rundir import NoLog
from nnclr.train import build_run, pretrain, train_step


@pytest.fixture
def tiny_deepcluster(tiny_run: tuple[str, ...], demo_data: str) -> list[str]:
    """A tiny DeepCluster run (8 clusters, no report) on ``demo_data``: 96 training images (3 steps of 32 per
    epoch) and 40 test images."""
    return [*tiny_run, "method.name=deepcluster", "method.num_clusters=8", "train.report=false",
            f"data.name={demo_data}"]


def test_balanced_order_draws_every_pseudo_label_about_equally_often() -> None:
    g = torch.Generator().manual_seed(0)
    # 1,000 samples: 910 in cluster 0, 10 in each of clusters 1-9, shuffled
    labels = torch.cat([torch.zeros(910, dtype=torch.long), torch.arange(1, 10).repeat_interleave(10)])
    labels = labels[torch.randperm(1000, generator=g)]
    order = balanced_order(labels, 1000, torch.Generator().manual_seed(1))
    assert order.shape == (1000,) and order.dtype == torch.long and 0 <= order.min() and order.max() < 1000
    counts = torch.bincount(labels[order], minlength=10)
    per = 1000 // 10 + 1  # 101 draws of every label, shuffled, then 10 of the 1,010 cut off
    assert counts.sum() == 1000 and counts.max() <= per and counts.min() >= per - 10, counts.tolist()
    assert order[labels[order] == 0].unique().numel() == counts[0]  # the big cluster: no sample twice
    assert set(order[labels[order] == 3].tolist()) == set(torch.nonzero(labels == 3).flatten().tolist())
    assert torch.equal(order, balanced_order(labels, 1000, torch.Generator().manual_seed(1)))  # seeded
    # labels need not be contiguous: only the non-empty clusters count
    sparse = torch.tensor([2, 2, 2, 2, 7, 7, 40, 40, 40, 40, 40, 40])
    assert torch.bincount(sparse[balanced_order(sparse, 12, g)], minlength=41)[[2, 7, 40]].tolist() == [4, 4, 4]


def test_empty_clusters_are_reseeded() -> None:
    # 60 rows with only 4 distinct directions: assignment alone can fill at most 4 of the 10 clusters
    z = F.normalize(torch.randn(4, 16), dim=1).repeat_interleave(15, dim=0)
    pseudo = PseudoLabels(num_samples=60, num_clusters=10)
    stats = pseudo.recluster(z, epoch=0, generator=torch.Generator().manual_seed(0))
    assert torch.bincount(pseudo.labels, minlength=10).min() >= 1
    assert stats["smallest_cluster"] >= 1 and stats["largest_cluster"] < 60
    assert stats["nmi_labels"] is None and stats["nmi_previous"] is None  # no labels, first clustering


def test_recluster_finds_separated_classes_and_measures_nmi() -> None:
    g = torch.Generator().manual_seed(0)
    centres = F.normalize(torch.randn(5, 32, generator=g), dim=1)
    classes = torch.arange(5).repeat(40)  # 200 samples
    z = F.normalize(centres[classes] + 0.05 * torch.randn(200, 32, generator=g), dim=1)
    pseudo = PseudoLabels(num_samples=200, num_clusters=5)
    first = pseudo.recluster(z, epoch=0, generator=torch.Generator().manual_seed(0), true_labels=classes)
    assert first["nmi_labels"] == pytest.approx(1.0) and first["kmeans_similarity"] > 0.9
    second = pseudo.recluster(z, epoch=1, generator=torch.Generator().manual_seed(5), true_labels=classes)
    assert second["nmi_previous"] == pytest.approx(1.0) and int(pseudo.epoch) == 1
    assert torch.equal(pseudo(torch.tensor([3, 0])), pseudo.labels[[3, 0]])


def test_classifier_is_reinitialised_after_each_clustering(tiny_deepcluster: list[str], tmp_path: Path) -> None:
    run = build_run(load_config(None, [*tiny_deepcluster, "data.test_split=", "train.epochs=2",
                                       f"train.run_dir={tmp_path}"]))
    classifier, log = run.model.classifier, NoLog()

    def fresh() -> bool:
        std = float(classifier.weight.detach().std())
        return abs(std - CLASSIFIER_INIT_STD) < 0.2 * CLASSIFIER_INIT_STD and not classifier.bias.any()

    train.start_epoch(run, 0, 0, log)
    initial = classifier.weight.detach().clone()
    assert fresh() and int(run.selector.epoch) == 0 and run.selector.labels.min() >= 0
    order = train.epoch_order(run, 0)
    train_step(run, 0, order)
    trained = classifier.weight.detach().clone()
    assert not torch.equal(trained, initial) and classifier.bias.any()
    assert all(p in run.optimizer.state for p in classifier.parameters())
    first_conv = next(run.model.backbone.parameters())
    momentum = run.optimizer.state[first_conv]["momentum_buffer"].clone()

    train.start_epoch(run, 1, 1, log)
    assert fresh() and int(run.selector.epoch) == 1
    assert not torch.equal(classifier.weight, trained) and not torch.equal(classifier.weight, initial)
    assert not any(p in run.optimizer.state for p in classifier.parameters())  # its momentum is gone too
    assert torch.equal(run.optimizer.state[first_conv]["momentum_buffer"], momentum)  # the rest keeps its own
    again = classifier.weight.detach().clone()
    train.start_epoch(run, 1, 1, log)  # this epoch is clustered already (a resumed run): nothing changes
    assert torch.equal(classifier.weight, again)


def test_more_clusters_than_images_is_a_user_error(tiny_deepcluster: list[str], tmp_path: Path) -> None:
    config = load_config(None, [*tiny_deepcluster, "method.num_clusters=500",
                                f"train.run_dir={tmp_path}"])
    with pytest.raises(UserError, match=r"method\.num_clusters=500 must be at most the 96 training images"):
        pretrain(config, progress=False)


@pytest.mark.slow
def test_cli_run_then_eval_embed_and_report(
    tiny_deepcluster: list[str], demo_data: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """``nnclr pretrain`` as a user runs it (2 epochs of 3 steps), then the commands that use its checkpoint."""
    run_dir = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "nnclr", "pretrain", "--run-dir", str(run_dir), "--no-progress", "--set",
         *tiny_deepcluster, "train.epochs=2"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert "nnclr pretrain: deepcluster on npz:" in result.stdout and "kNN top-1 on npz:" in result.stdout
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    clusterings = [r for r in records if r["type"] == "clustering"]
    assert [(r["step"], r["epoch"]) for r in clusterings] == [(0, 0), (3, 1)]
    assert all(0 <= r["nmi_labels"] <= 1 for r in clusterings) and clusterings[1]["nmi_previous"] is not None
    trained = [r for r in records if r["type"] == "train"]
    assert len(trained) == 6 and all("pseudo_label_accuracy" in r for r in trained)
    assert not any(key.startswith(("nn_", "support")) for r in trained for key in r)  # no support set

    evaluated = run_main(capsys, "eval", "knn", "--checkpoint", str(run_dir), "--no-progress")
    assert evaluated.returncode == 0, evaluated.stderr
    assert json.loads(next((run_dir / "eval").glob("knn-*.json")).read_text())["top1"] >= 0
    out = tmp_path / "emb"
    embedded = run_main(capsys, "embed", "--checkpoint", str(run_dir), "--images", demo_data, "--split", "test",
                        "--out", str(out), "--no-progress")
    assert embedded.returncode == 0, embedded.stderr
    assert np.load(out / "embeddings.npy").shape[0] == 40

    page = write_report(run_dir).read_text()
    assert "Clustering diagnostics" in page and "Nearest-neighbour diagnostics" not in page
    assert re.search(r"Pseudo-labels of the checkpoint: 8 clusters of 96 training images", page)
    assert "deepcluster has no support set: only training-set neighbours are shown" in page


def test_the_trainer_samples_uniformly_over_pseudo_labels(tmp_path: Path, tiny_deepcluster: list[str]) -> None:
    """DeepCluster Sec. 3.3: with one pseudo-class holding most images, the trainer's epoch order still draws
    every pseudo-class about N / C times (a plain shuffle would draw the large class ~N * 0.9 times)."""
    run = build_run(load_config(None, [*tiny_deepcluster, "data.test_split=",
                                       f"train.run_dir={tmp_path}"]))
    n, c = len(run.train_set), run.config.method.num_clusters
    labels = torch.zeros(n, dtype=torch.long)
    labels[: c - 1] = torch.arange(1, c)  # class 0 holds n - c + 1 images, the others one each
    run.selector.labels.copy_(labels)
    run.selector.epoch.fill_(0)
    order = train.epoch_order(run, 0)
    assert order.shape == (n,)
    counts = torch.bincount(labels[order], minlength=c)
    assert int(counts.max()) <= n // c + 1 and int(counts.min()) >= n // c + 1 - c
