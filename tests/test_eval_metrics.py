"""The evaluation maths on data made up in the test: kNN, linear probes, retrieval, label subsets, fine-tuning."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from nnclr.augment import RECIPES, apply_view, eval_transform, sample_view_params
from nnclr.backbones import build_backbone
from nnclr.errors import UserError
from nnclr.evaluate.knn import knn_accuracy, knn_sweep
from nnclr.evaluate.linear import (
    PAPER_SGD,
    fast_linear_probe,
    fit_logistic,
    paper_linear_probe,
    standardise,
    state_snapshot,
    topk_accuracy,
)
from nnclr.evaluate.linear import unchanged as backbone_unchanged
from nnclr.evaluate.preprocess import Preprocess
from nnclr.evaluate.retrieval import retrieval_metrics
from nnclr.evaluate.semi import FINETUNE_SGD, balanced_subset, finetune, read_subset, write_subset
from nnclr.evaluate.sgd import ClassifierTask, SGDSettings


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """These problems are tiny: one thread avoids waiting on a second one on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def clusters(
    n_per_class: int, num_classes: int = 5, dim: int = 32, spread: float = 0.1, seed: int = 0, noise_seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian clusters around random unit centres (drawn from ``seed``): features (n*C, dim), labels (n*C,)."""
    centre_generator = torch.Generator().manual_seed(seed)
    centres = torch.nn.functional.normalize(torch.randn(num_classes, dim, generator=centre_generator), dim=1)
    g = torch.Generator().manual_seed(1000 + noise_seed)
    labels = torch.arange(num_classes).repeat_interleave(n_per_class)
    features = centres[labels] + spread * torch.randn(labels.shape[0], dim, generator=g)
    order = torch.randperm(labels.shape[0], generator=g)
    return features[order], labels[order]


def shuffled(labels: torch.Tensor, seed: int = 1) -> torch.Tensor:
    return labels[torch.randperm(labels.shape[0], generator=torch.Generator().manual_seed(seed))]


def test_knn_separable_clusters_reach_100_and_shuffled_labels_reach_chance() -> None:
    train_x, train_y = clusters(200, num_classes=5)
    test_x, test_y = clusters(100, num_classes=5, noise_seed=1)
    assert knn_accuracy(train_x, train_y, test_x, test_y).top1 > 99.0
    chance = knn_accuracy(train_x, shuffled(train_y), test_x, test_y).top1
    assert abs(chance - 20.0) < 8.0, chance


def test_knn_sweep_matches_single_runs_and_contains_the_default() -> None:
    train_x, train_y = clusters(60, num_classes=4, spread=0.8)
    test_x, test_y = clusters(30, num_classes=4, spread=0.8, noise_seed=3)
    grid = knn_sweep(train_x, train_y, test_x, test_y, ks=(5, 20), temperatures=(0.07, 0.5), chunk_size=17)
    assert [(r.k, r.temperature) for r in grid] == [(5, 0.07), (5, 0.5), (20, 0.07), (20, 0.5)]
    for result in grid:
        single = knn_accuracy(train_x, train_y, test_x, test_y, k=result.k, temperature=result.temperature)
        assert result.top1 == pytest.approx(single.top1) and result.top5 == pytest.approx(single.top5)


def test_linear_probe_separable_clusters_reach_100_and_shuffled_labels_reach_chance() -> None:
    train_x, train_y = clusters(100, num_classes=5, spread=0.2)
    test_x, test_y = clusters(60, num_classes=5, spread=0.2, noise_seed=1)
    result = fast_linear_probe(train_x, train_y, test_x, test_y, max_iter=60)
    assert result.top1 > 99.0 and result.l2 is not None and len(result.validation) == 6
    chance = fast_linear_probe(train_x, shuffled(train_y), test_x, test_y, max_iter=60).top1
    assert abs(chance - 20.0) < 10.0, chance


def test_linear_probe_matches_scikit_learn_within_half_a_point() -> None:
    """Same features, same objective (sklearn's C = 1 / (l2 * N)): test accuracies within 0.5 points."""
    linear_model = pytest.importorskip("sklearn.linear_model")
    train_x, train_y = clusters(300, num_classes=6, dim=24, spread=0.9, seed=4)  # overlapping: ~60-70%
    test_x, test_y = clusters(200, num_classes=6, dim=24, spread=0.9, seed=4, noise_seed=5)
    ours = fast_linear_probe(train_x, train_y, test_x, test_y)
    assert 40.0 < ours.top1 < 95.0, "the clusters should overlap, or the comparison is trivial"
    std_train, std_test = standardise(train_x, test_x)
    reference = linear_model.LogisticRegression(C=1.0 / (ours.l2 * train_x.shape[0]), max_iter=5000, tol=1e-8)
    reference.fit(std_train.numpy(), train_y.numpy())
    sklearn_top1 = 100.0 * (reference.predict(std_test.numpy()) == test_y.numpy()).mean()
    assert abs(ours.top1 - sklearn_top1) <= 0.5, (ours.top1, sklearn_top1)
    # and the coefficients themselves agree (same convex problem)
    weight, bias = fit_logistic(std_train, train_y, 6, ours.l2, max_iter=500)
    centred = weight - weight.mean(dim=0)  # multinomial logits are defined up to a shared shift
    sk = torch.from_numpy(reference.coef_).float()
    assert torch.allclose(centred, sk - sk.mean(dim=0), atol=2e-2)


def test_retrieval_metrics_on_a_hand_computed_example() -> None:
    """Gallery on a circle; two queries whose rankings are worked out by hand.

    Gallery (angle, label): 0 deg A, 10 deg A, 20 deg B, 30 deg A, 180 deg B, 190 deg B.
    Query 1 at 1 deg, label A (R=3): ranking A, A, B, A, ... -> hits at 1, 2; AP@R = (1/1 + 2/2) / 3 = 2/3.
    Query 2 at 21 deg, label B (R=3): ranking B(20), A(30), A(10), A(0), B, B -> hit at 1 within R=3;
    AP@R = (1/1) / 3 = 1/3. recall@1 = 2/2; recall@2: q1 yes, q2 yes (rank 1) -> 100%.
    Query 3 at 185 deg, label A: nearest are B(180), B(190), then A(30) at rank 3 -> AP@R = (1/3)/3 = 1/9;
    recall@1 = no, recall@3 = yes.
    """

    def at(degrees: list[float]) -> torch.Tensor:
        radians = torch.tensor(degrees) * torch.pi / 180
        return torch.stack([radians.cos(), radians.sin()], dim=1)

    gallery = at([0, 10, 20, 30, 180, 190])
    gallery_labels = torch.tensor([0, 0, 1, 0, 1, 1])
    queries = at([1, 21, 185])
    query_labels = torch.tensor([0, 1, 0])
    result = retrieval_metrics(queries, query_labels, gallery, gallery_labels, ks=(1, 3), chunk_size=2)
    assert result.recall[1] == pytest.approx(100 * 2 / 3)
    assert result.recall[3] == pytest.approx(100.0)
    assert result.map_at_r == pytest.approx(100 * (2 / 3 + 1 / 3 + 1 / 9) / 3)
    assert (result.num_queries, result.num_gallery) == (3, 6)


def test_retrieval_ignores_unknown_labels_and_perfect_clusters_score_100() -> None:
    x, y = clusters(20, num_classes=3, spread=0.01)
    y_gallery = y.clone()
    y_gallery[:5] = -1
    result = retrieval_metrics(x, y, x, y_gallery, ks=(1, 5))
    assert result.num_gallery == 55 and result.recall[1] == 100.0 and result.map_at_r == pytest.approx(100.0)


def test_label_subsets_are_balanced_deterministic_and_seeded(tmp_path: Path) -> None:
    labels = torch.arange(10).repeat_interleave(300)  # 10 classes x 300
    labels[::7] = -1  # some unlabelled images are never chosen
    one = balanced_subset(labels, 0.01, seed=0)
    again = balanced_subset(labels, 0.01, seed=0)
    other = balanced_subset(labels, 0.01, seed=1)
    assert torch.equal(one, again) and not torch.equal(one, other)
    counts = torch.bincount(labels[one], minlength=10)
    assert counts.min() >= 2 and counts.max() - counts.min() <= 1, counts
    assert bool((labels[one] >= 0).all()) and one.unique().numel() == one.numel()
    ten = balanced_subset(labels, 0.1, seed=0)
    assert torch.bincount(labels[ten], minlength=10).min() >= 25
    path = tmp_path / "subset.txt"
    write_subset(path, ten)
    assert torch.equal(read_subset(path, labels.shape[0], labels), ten)


def test_subset_files_with_names_bad_indices_or_unlabelled_images_are_user_errors(tmp_path: Path) -> None:
    labels = torch.tensor([0, 1, -1, 1])
    cases = {"names.txt": "n01440764_10026.JPEG\n", "range.txt": "0\n9\n", "unlabelled.txt": "2\n", "empty.txt": "\n"}
    for name, text in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(UserError):
            read_subset(tmp_path / name, 4, labels)
    (tmp_path / "ok.txt").write_text("# SimCLR-style list\n3\n0\n\n")
    assert read_subset(tmp_path / "ok.txt", 4, labels).tolist() == [0, 3]


def colour_images(n: int, seed: int = 0, side: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images (n, 3, side, side) whose class (4, balanced) is their colour, plus noise; labels (n,)."""
    g = torch.Generator().manual_seed(seed)
    palette = torch.tensor([[220, 40, 40], [40, 200, 60], [50, 60, 220], [200, 200, 200]])
    labels = torch.arange(n) % 4
    images = palette[labels][:, :, None, None] + torch.randint(-60, 61, (n, 3, side, side), generator=g)
    return images.clamp(0, 255).to(torch.uint8), labels


def tiny_encoder(seed: int = 0) -> torch.nn.Module:
    """A conv + batch-norm encoder (B, 3, H, W) -> (B, 16) whose running statistics are not the defaults."""
    torch.manual_seed(seed)
    encoder = torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.BatchNorm2d(16), torch.nn.ReLU(),
        torch.nn.Conv2d(16, 16, 3, padding=1), torch.nn.BatchNorm2d(16), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
    )
    with torch.no_grad():
        encoder(torch.randn(8, 3, 8, 8) * 3 + 1)  # train mode: running statistics move off (0, 1)
    return encoder.eval()


PREPROCESS = Preprocess(size=8, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), device=torch.device("cpu"))
EVAL_KWARGS = {"num_classes": 4, "num_features": 16, "preprocess": PREPROCESS}


@pytest.mark.slow
def test_semi_finetune_trains_batch_norm_and_stays_finite_where_frozen_statistics_diverged() -> None:
    """With the pretrained batch-norm statistics frozen (the old behaviour) this fine-tune of the small
    CNN reached a NaN loss in epoch 10 of 15; with batch norm in training mode (as SimCLR fine-tunes)
    it learns the colours."""
    torch.manual_seed(0)
    encoder, num_features = build_backbone("small_cnn")
    with torch.no_grad():
        encoder(torch.randn(8, 3, 8, 8) * 3 + 1)  # train mode: running statistics move off (0, 1)
    encoder.eval()
    before = state_snapshot(encoder)
    x, y = colour_images(256)
    test_x, test_y = colour_images(64, seed=1)
    task = ClassifierTask(encoder, x, y, test_x, test_y, **(EVAL_KWARGS | {"num_features": num_features}))
    result = finetune(task, SGDSettings(epochs=15, batch_size=256, lr=1.0))
    assert all(math.isfinite(v) for v in result.extra["epoch_losses"]) and len(result.extra["epoch_losses"]) == 15
    assert result.top1 > 90.0, result
    assert backbone_unchanged(encoder, before)  # a copy was fine-tuned


def test_semi_finetune_that_diverges_is_a_user_error() -> None:
    encoder = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 16))
    torch.nn.init.constant_(encoder[1].weight, float("nan"))
    x, y = colour_images(16)
    with pytest.raises(UserError, match="diverged.*lower --lr"):
        finetune(ClassifierTask(encoder, x, y, x, y, **EVAL_KWARGS), replace(FINETUNE_SGD, epochs=1))


def test_paper_linear_probe_leaves_the_backbone_bit_identical_and_notices_when_it_is_not() -> None:
    encoder = tiny_encoder()
    before = state_snapshot(encoder)
    x, y = colour_images(128)
    task = ClassifierTask(encoder, x, y, x[:32], y[:32], **EVAL_KWARGS)
    result = paper_linear_probe(task, SGDSettings(epochs=3, batch_size=64, lr=1.0))
    assert backbone_unchanged(encoder, before) and result.extra["backbone_bit_identical"] is True
    assert not encoder.training and all(p.requires_grad for p in encoder.parameters())  # restored as it was

    class Drifting(torch.nn.Module):
        """A backbone that changes a buffer on every forward pass, frozen or not."""

        def __init__(self) -> None:
            super().__init__()
            self.inner = tiny_encoder()
            self.register_buffer("calls", torch.zeros(()))

        def forward(self, images: torch.Tensor) -> torch.Tensor:
            self.calls += 1
            return self.inner(images)

    with pytest.raises(RuntimeError, match="backbone changed"):
        paper_linear_probe(ClassifierTask(Drifting(), x, y, x[:32], y[:32], **EVAL_KWARGS),
                           replace(PAPER_SGD, epochs=1, batch_size=64))


def reference_sgd(
    logits_of: Callable[[torch.Tensor], torch.Tensor], parameters: list[torch.nn.Parameter], images: torch.Tensor,
    labels: torch.Tensor, settings: SGDSettings, *, equal_batches: bool,
) -> list[float]:
    """The SGD of the paper linear probe and of fine-tuning, written out from their description; every step's loss.

    Per epoch a permutation from a CPU generator seeded ``seed``; batches of ``batch_size`` (or, with
    ``equal_batches``, the same number of batches cut near-equal); one random-resized-crop + flip view per image
    from a second generator seeded ``seed``; cross-entropy; SGD with Nesterov momentum
    (``v <- m v + g``, ``p <- p - lr_t (g + m v)``, ``g`` including ``weight_decay * p``), learning rate
    ``lr x batch / 256`` (the largest batch) cosine-annealed to 0 over all steps.
    """
    epochs, batch_size, lr, momentum, weight_decay, seed = (
        settings.epochs, settings.batch_size, settings.lr, settings.momentum, settings.weight_decay, settings.seed)
    recipe = RECIPES["crops"][0]
    steps = max(1, math.ceil(images.shape[0] / batch_size))
    if equal_batches:
        batch_size = math.ceil(images.shape[0] / steps)
    total, base = epochs * steps, lr * batch_size / 256
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (PREPROCESS.mean, PREPROCESS.std))
    views, shuffles = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
    velocity = [torch.zeros_like(p) for p in parameters]
    losses: list[float] = []
    for _ in range(epochs):
        order = torch.randperm(images.shape[0], generator=shuffles)
        for idx in order.tensor_split(steps) if equal_batches else order.split(batch_size):
            params = sample_view_params(recipe, len(idx), images.shape[2], images.shape[3], views, images.device)
            x = apply_view(images[idx].float().mul_(1.0 / 255), params, recipe, PREPROCESS.size, mean, std)
            loss = torch.nn.functional.cross_entropy(logits_of(x), labels[idx])
            grads = torch.autograd.grad(loss, parameters)
            step_lr = base * (1 + math.cos(math.pi * len(losses) / total)) / 2
            with torch.no_grad():
                for p, g, v in zip(parameters, grads, velocity):
                    g = g + weight_decay * p
                    v.mul_(momentum).add_(g)
                    p.sub_(step_lr * (g + momentum * v))
            losses.append(loss.item())
    return losses


def reference_accuracy(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """Top-1/top-5 of ``model`` in eval mode on centre (un-augmented) images."""
    x = eval_transform(images, PREPROCESS.size, mean=PREPROCESS.mean, std=PREPROCESS.std)
    with torch.no_grad():
        return topk_accuracy(model.eval()(x), labels)


def test_paper_linear_probe_is_the_described_sgd_on_a_frozen_encoder() -> None:
    x, y = colour_images(60, side=10)
    test_x, test_y = colour_images(24, seed=1, side=10)
    settings = SGDSettings(epochs=2, batch_size=16, lr=2.0, momentum=0.8, weight_decay=1e-3, seed=3)
    result = paper_linear_probe(ClassifierTask(tiny_encoder(), x, y, test_x, test_y, **EVAL_KWARGS), settings)

    encoder = tiny_encoder()
    head = torch.nn.Sequential(torch.nn.BatchNorm1d(16, affine=False), torch.nn.Linear(16, 4))
    torch.nn.init.zeros_(head[1].weight)
    torch.nn.init.zeros_(head[1].bias)

    def logits_of(images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            features = encoder(images)
        return head(features)

    losses = reference_sgd(logits_of, list(head.parameters()), x, y, settings, equal_batches=False)
    assert len(losses) == result.extra["steps"] == 2 * 4  # batches of 16, 16, 16 and 12
    assert result.extra["final_loss"] == pytest.approx(losses[-1], rel=1e-4)
    assert (result.top1, result.top5) == reference_accuracy(torch.nn.Sequential(encoder, head), test_x, test_y)


def test_semi_finetune_is_the_described_sgd_then_precise_batch_norm() -> None:
    x, y = colour_images(60, side=10)
    test_x, test_y = colour_images(24, seed=1, side=10)
    settings = SGDSettings(epochs=2, batch_size=16, lr=0.3, momentum=0.8, seed=2)
    result = finetune(ClassifierTask(tiny_encoder(1), x, y, test_x, test_y, **EVAL_KWARGS), settings)

    model = torch.nn.Sequential(tiny_encoder(1).train(), torch.nn.Linear(16, 4))
    torch.nn.init.zeros_(model[1].weight)
    torch.nn.init.zeros_(model[1].bias)
    losses = reference_sgd(model, list(model.parameters()), x, y, settings, equal_batches=True)
    assert result.extra["steps"] == len(losses) == 2 * 4 and result.extra["batch_size"] == 15  # 4 batches of 15
    assert result.extra["final_loss"] == pytest.approx(losses[-1], rel=1e-4)
    assert result.extra["epoch_losses"] == pytest.approx([sum(losses[:4]) / 4, sum(losses[4:]) / 4], abs=2e-4)
    # precise BN: running statistics = the average over the labelled images' centre views, in batches of 15
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None
    with torch.no_grad():
        for batch in x.split(15):
            model(eval_transform(batch, PREPROCESS.size, mean=PREPROCESS.mean, std=PREPROCESS.std))
    assert (result.top1, result.top5) == reference_accuracy(model, test_x, test_y)
