"""method.prior: for the first method.prior_epochs the support-set neighbours are chosen in a prior space (GPS-SSL,
Feizi et al., arXiv 2401.01990), the positives are still the chosen rows' stored z; afterwards NNCLR's z lookup.

The lookups are checked against slow loops written from the definition; the switch, ``prior=none``, the
diagnostics, the pixel prior, the checkpoint and resume of a tiny command-line run, two processes and the errors.
"""

from __future__ import annotations

import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from nnclr import distributed, train
from nnclr.augment import eval_transform, normalization_for
from nnclr.checkpoint import CHECKPOINT_NAME, load_checkpoint
from nnclr.config import load_config
from nnclr.errors import UserError
from nnclr.methods import METHODS, BuildContext
from nnclr.prior import THUMBNAIL, PriorSpace, prior_steps
from nnclr.rundir import NoLog
from nnclr.selectors import NearestNeighbourSelector, NeighboursSelector
from nnclr.step import StepInputs, positive_loss
from nnclr.support import SupportSet

N, DIM, PRIOR_DIM = 40, 8, 6  # samples in the data set, width of z, width of the prior


def prior_space(vectors: torch.Tensor, until_step: int = 5) -> PriorSpace:
    """A computed prior (as after the run's first ``start_epoch``) of ``vectors`` (N, Dp)."""
    prior = PriorSpace("initial", num_samples=vectors.shape[0], dim=vectors.shape[1], until_step=until_step)
    prior.vectors.copy_(F.normalize(vectors, dim=1))
    prior.ready.fill_(True)
    return prior


def filled_support(size: int, batches: list[torch.Tensor], seed: int = 0) -> SupportSet:
    """A support set that was enqueued one batch of sample indices per step, with random z and labels = sample % 4."""
    generator = torch.Generator().manual_seed(seed)
    support = SupportSet(size, DIM)
    for step, samples in enumerate(batches):
        support.enqueue(torch.randn(len(samples), DIM, generator=generator), samples % 4, samples, step)
    return support


def reference_rows(prior: torch.Tensor, support: SupportSet, queries: list[int], k: int,
                   exclude_self: bool = True) -> list[list[int]]:
    """From the definition: for each query sample q, among the filled rows whose sample is not q, the k of highest
    prior[q] · prior[sample of the row], nearest first (of a sample held by several rows, its newest row; ties: the
    lowest row); -1 where there are fewer than k."""
    out = []
    for q in queries:
        newest: dict[int, int] = {}
        for row in range(int(support.num_filled)):
            sample = int(support.indices[row])
            if sample < 0 or (exclude_self and sample == q):
                continue
            if sample not in newest or int(support.steps[row]) >= int(support.steps[newest[sample]]):
                newest[sample] = row
        score = {row: float(prior[q] @ prior[sample]) for sample, row in newest.items()}
        ranked = sorted(score, key=lambda row: (-score[row], row))[:k]
        out.append(ranked + [-1] * (k - len(ranked)))
    return out


def _setting(seed: int = 0, duplicates: bool = False) -> tuple[torch.Tensor, SupportSet, torch.Tensor, torch.Tensor]:
    """Prior vectors (N, Dp), a support set of 32 rows, and 8 queries: their z (8, D) and sample indices (8,)."""
    generator = torch.Generator().manual_seed(seed)
    vectors = F.normalize(torch.randn(N, PRIOR_DIM, generator=generator), dim=1)
    if duplicates:  # 5 batches of 8 drawn with repeats, into 24 rows: samples held by several rows, the ring wrapped
        batches = [torch.randint(0, 12, (8,), generator=generator) for _ in range(5)]
        support = filled_support(24, batches, seed)
    else:  # every sample once, 32 rows of 40 samples, 8 samples not in the support set
        batches = list(torch.randperm(N, generator=generator)[:32].split(8))
        support = filled_support(32, batches, seed)
    queries = torch.cat([support.indices[:5], torch.tensor([int(i) for i in range(N)
                                                            if i not in support.indices.tolist()][:3])])
    z = torch.randn(len(queries), DIM, generator=generator)
    return vectors, support, z, queries


@pytest.mark.parametrize("duplicates", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_nearest_neighbour_in_the_prior_space_is_the_reference_loops(seed: int, duplicates: bool) -> None:
    vectors, support, z, queries = _setting(seed, duplicates)
    selector = NearestNeighbourSelector(prior=prior_space(vectors))
    selection = selector(z, support, indices=queries, uniform=torch.zeros(len(z)), step=0)
    expected = [rows[0] for rows in reference_rows(vectors, support, queries.tolist(), k=1)]
    assert selection.rows.tolist() == expected
    assert torch.equal(selection.positives, support.embeddings[expected])  # that row's stored z, as NNCLR
    cosines = (F.normalize(z, dim=1) * support.embeddings[expected]).sum(dim=1)
    assert torch.allclose(selection.similarity, cosines, atol=1e-6)  # z's cosine with the positive used
    assert not (support.indices[selection.rows] == queries).any()  # never the query's own sample


@pytest.mark.parametrize("duplicates", [False, True])
def test_top_k_sampling_picks_among_the_prior_top_k(duplicates: bool) -> None:
    vectors, support, z, queries = _setting(3, duplicates)
    selector = NearestNeighbourSelector(topk=3, prior=prior_space(vectors))
    uniform = torch.tensor([0.0, 0.4, 0.7, 0.99, 0.5, 0.2, 0.9, 0.34])
    selection = selector(z, support, indices=queries, uniform=uniform, step=1)
    for i, top in enumerate(reference_rows(vectors, support, queries.tolist(), k=3)):
        found = [row for row in top if row >= 0]
        assert int(selection.rows[i]) == found[min(math.floor(float(uniform[i]) * len(found)), len(found) - 1)]


@pytest.mark.parametrize("weighting", ["uniform", "soft"])
@pytest.mark.parametrize("duplicates", [False, True])
def test_the_k_neighbours_in_the_prior_space_are_the_reference_loops(weighting: str, duplicates: bool) -> None:
    vectors, support, z, queries = _setting(4, duplicates)
    selector = NeighboursSelector(k=3, weighting=weighting, soft_temperature=0.5, prior=prior_space(vectors))
    neighbours = selector.neighbours(z, support, indices=queries, step=2)
    expected = torch.tensor(reference_rows(vectors, support, queries.tolist(), k=3))
    assert torch.equal(neighbours.rows, expected)
    found = expected >= 0
    stored = support.embeddings[expected.clamp_min(0)]
    assert torch.equal(neighbours.positives[found], stored[found])
    cosines = torch.einsum("bd,bkd->bk", F.normalize(z, dim=1), stored)
    assert torch.allclose(neighbours.similarity[found], cosines[found], atol=1e-6)
    logits = cosines / 0.5 if weighting == "soft" else torch.zeros_like(cosines)
    weights = torch.where(found, logits, float("-inf")).softmax(dim=1)  # the soft weights: z's cosines
    assert torch.allclose(neighbours.weights, weights, atol=1e-6)


def test_the_prior_lookup_does_not_exclude_the_query_without_exclude_self() -> None:
    vectors, support, z, queries = _setting(5)
    selector = NearestNeighbourSelector(exclude_self=False, prior=prior_space(vectors))
    rows = selector(z, support, indices=queries, uniform=torch.zeros(len(z)), step=0).rows
    assert rows.tolist() == [r[0] for r in reference_rows(vectors, support, queries.tolist(), 1, exclude_self=False)]
    assert torch.equal(support.indices[rows[:5]], queries[:5])  # a held sample is its own nearest (cosine 1)


@pytest.mark.parametrize("selector_class", [NearestNeighbourSelector, NeighboursSelector])
def test_after_prior_epochs_the_lookup_is_in_z_space(selector_class: type) -> None:
    """Steps [0, until_step) choose in the prior space; from until_step on exactly as a selector without a prior."""
    vectors, support, z, queries = _setting(6)
    with_prior, without = selector_class(prior=prior_space(vectors, until_step=5)), selector_class()
    u = torch.zeros(len(z))
    before, plain = with_prior(z, support, indices=queries, uniform=u, step=4), without(z, support, indices=queries,
                                                                                          uniform=u)
    assert not torch.equal(before.rows, plain.rows)  # the prior chose other rows (else this test proves nothing)
    for step in (5, 6, 1000):
        after = with_prior(z, support, indices=queries, uniform=u, step=step)
        for a, b in zip(after, plain):
            assert torch.equal(a, b)


def test_after_its_phase_the_prior_is_released_and_a_checkpoint_of_it_loads() -> None:
    """The prior (N x Dp floats: 1.3 GB for ImageNet's 1.28 M images at 256) is not needed after its phase: the
    first step after it drops the vectors, so they leave memory and the checkpoints; such a state loads into a
    fresh selector, which then looks up as one without a prior."""
    vectors, support, z, queries = _setting(6)
    selector, plain = NearestNeighbourSelector(prior=prior_space(vectors, until_step=5)), NearestNeighbourSelector()
    u = torch.zeros(len(z))
    selector(z, support, indices=queries, uniform=u, step=4)
    assert selector.prior.vectors.shape == vectors.shape  # still in its phase
    selector(z, support, indices=queries, uniform=u, step=5)
    assert selector.prior.vectors.shape == (0, PRIOR_DIM) and bool(selector.prior.ready)
    fresh = NearestNeighbourSelector(prior=PriorSpace("initial", num_samples=N, dim=PRIOR_DIM, until_step=5))
    fresh.load_state_dict(selector.state_dict())
    assert fresh.prior.vectors.shape == (0, PRIOR_DIM) and bool(fresh.prior.ready)
    for a, b in zip(fresh(z, support, indices=queries, uniform=u, step=6), plain(z, support, indices=queries,
                                                                              uniform=u)):
        assert torch.equal(a, b)
    early = NearestNeighbourSelector(prior=PriorSpace("initial", num_samples=N, dim=PRIOR_DIM, until_step=9))
    early.load_state_dict(selector.state_dict())  # a prior released at step 5 cannot serve a phase to step 9
    with pytest.raises(RuntimeError, match="released"):
        early(z, support, indices=queries, uniform=u, step=6)


def test_prior_steps_counts_the_steps_of_prior_epochs() -> None:
    assert [prior_steps(e, 390) for e in (0.0, 0.1, 0.5, 1.0, 2.5)] == [0, 39, 195, 390, 975]
    assert prior_steps(0.01, 10) == 1  # part of a step is a step
    selector = NearestNeighbourSelector(prior=prior_space(torch.randn(N, PRIOR_DIM), until_step=3))
    assert [selector.uses_prior(step) for step in range(5)] == [True, True, True, False, False]
    with pytest.raises(ValueError, match="training step"):
        selector.uses_prior(None)
    unready = NearestNeighbourSelector(prior=PriorSpace("pixels", num_samples=N, dim=PRIOR_DIM, until_step=3))
    with pytest.raises(RuntimeError, match="before it was computed"):
        unready.uses_prior(0)


def _config(*overrides: str):
    return load_config(None, ["model.proj_hidden_dim=32", "model.proj_dim=16", "model.pred_hidden_dim=32",
                              *overrides])


@pytest.mark.parametrize("name", [name for name, method in METHODS.items() if method.support])
def test_every_support_set_method_reads_the_prior_and_none_builds_todays_selector(name: str) -> None:
    assert {"method.prior", "method.prior_epochs"} <= set(METHODS[name].keys)
    context = BuildContext(num_samples=N, steps_per_epoch=10, dtype=torch.float32)
    today = METHODS[name].selector(_config(f"method.name={name}"), context)
    assert today.prior is None and not any("prior" in key for key in today.state_dict())
    built = METHODS[name].selector(_config(f"method.name={name}", "method.prior=pixels", "method.prior_epochs=0.25"),
                                   context)
    assert isinstance(built.prior, PriorSpace) and built.prior.until_step == 3
    assert built.state_dict()["prior.vectors"].shape == (N, 3 * THUMBNAIL**2)


@pytest.mark.parametrize("seed", [0, 1])
def test_prior_none_selects_as_the_z_space_lookup_always_did(seed: int) -> None:
    """``prior=none``: the rows and positives of SupportSet.nearest/topk at every step (today's NNCLR)."""
    _, support, z, queries = _setting(seed, duplicates=True)
    context = BuildContext(num_samples=N, steps_per_epoch=10, dtype=torch.float32)
    nn = METHODS["nnclr"].selector(_config("method.topk=2"), context)
    u = torch.tensor([0.1, 0.6, 0.9, 0.3, 0.5, 0.0, 0.8, 0.7])
    rows, _ = support.nearest(z, exclude_indices=queries, k=2, uniform=u)
    for step in (None, 0, 10**6):
        selection = nn(z, support, indices=queries, uniform=u, step=step)
        assert torch.equal(selection.rows, rows) and torch.equal(selection.positives[rows >= 0],
                                                                 support.embeddings[rows[rows >= 0]])
    several = METHODS["nnclr_multi"].selector(_config("method.neighbours=3"), context)
    _, top = support.topk(z, k=3, exclude_indices=queries)
    assert torch.equal(several.neighbours(z, support, indices=queries, step=0).rows, top)


def test_the_diagnostics_report_the_positives_chosen_in_the_prior_space() -> None:
    """A prior that knows the labels: every neighbour it chooses shares the query's label, and the step's
    nn_label_agreement says so; after the prior phase (z is random here) it does not."""
    b, labels = 8, torch.arange(N) % 4
    vectors = F.one_hot(labels, 4).float() + 0.01 * torch.randn(N, 4)
    support = filled_support(32, list(torch.arange(8, N).split(8)), seed=7)  # samples 8..39, z unlike z1's
    selector = NearestNeighbourSelector(prior=prior_space(vectors, until_step=1))
    z1, z2 = (F.normalize(torch.randn(b, DIM), dim=1) for _ in range(2))

    def diagnostics(step: int) -> dict[str, float]:
        return positive_loss(StepInputs(
            z1=z1, z2=z2, p1=torch.randn(b, DIM), p2=torch.randn(b, DIM), support=support, selector=selector,
            labels=labels[:b], indices=torch.arange(b), step=step, uniforms=torch.zeros(2, b), temperature=0.1,
            instance_weight=0.0)).diagnostics

    prior = diagnostics(0)
    rows = selector(z1, support, indices=torch.arange(b), uniform=torch.zeros(b), step=0).rows
    z_space = diagnostics(1)  # steps only go forward: the prior is released here
    assert prior["nn_label_agreement"] == 1.0 and prior["nn_found"] == 1.0 and prior["nn_self_hit"] == 0.0
    assert z_space["nn_label_agreement"] < 1.0
    assert prior["nn_age"] == pytest.approx(float((0 - support.steps[rows]).float().mean()))
    expected = (z1 * support.embeddings[rows]).sum(dim=1).mean()  # z's cosine with the positive used
    assert prior["positive_similarity"] == pytest.approx(float(expected), abs=1e-6)


@pytest.fixture
def tiny(tiny_run: tuple[str, ...], tiny_data: Path) -> list[str]:
    """A tiny run on ``tiny_data`` (256 random images: 8 steps of 32 per epoch), no kNN, no report."""
    return [*tiny_run, f"data.name=npz:{tiny_data}", "data.image_size=16", "data.test_split=", "train.epochs=2",
            "method.support_size=100", "train.threads=1", "train.report=false", "train.checkpoint_every=2"]


def test_the_pixel_prior_is_each_image_at_8x8_centred_and_normalised(tiny: list[str], tmp_path: Path) -> None:
    config = load_config(None, [*tiny, "method.name=nnclr_mean", "method.prior=pixels", "train.precision=fp32",
                                f"train.run_dir={tmp_path}"])
    run = train.build_run(config)
    train.start_epoch(run, 0, 0, NoLog())
    mean, std = normalization_for(config.data.name)
    images = eval_transform(run.train_set.images, 16, mean=mean, std=std)  # as the features are prepared
    thumbnails = F.avg_pool2d(images, 2).flatten(1)  # 16x16 -> 8x8: means of 2x2 blocks
    expected = F.normalize(thumbnails - thumbnails.mean(dim=1, keepdim=True), dim=1)
    assert bool(run.selector.prior.ready)
    assert torch.allclose(run.selector.prior.vectors, expected, atol=1e-5)


def test_the_initial_prior_is_the_initial_encoders_z_computed_once(tiny: list[str], tmp_path: Path) -> None:
    config = load_config(None, [*tiny, "method.prior=initial", "train.precision=fp32", f"train.run_dir={tmp_path}"])
    run = train.build_run(config)
    train.start_epoch(run, 0, 0, NoLog())
    prior = run.selector.prior.vectors.clone()
    encoder = torch.nn.Sequential(run.model.backbone, run.model.projector).eval()
    mean, std = normalization_for(config.data.name)
    with torch.no_grad():
        z = F.normalize(encoder(eval_transform(run.train_set.images[:64], 16, mean=mean, std=std)), dim=1)
    assert torch.allclose(prior[:64], z, atol=1e-4)
    order = train.epoch_order(run, 0)
    for step in range(3):
        train.train_step(run, step, order)
    train.start_epoch(run, 1, 8, NoLog())  # a later epoch (or a resumed run) keeps the initial encoder's prior
    assert torch.equal(run.selector.prior.vectors, prior)


def _current_z(run: train.Run, config) -> torch.Tensor:
    """z of the first 64 training images by the run's encoder now, eval mode, no augmentation."""
    encoder = torch.nn.Sequential(run.model.backbone, run.model.projector)
    was_training = encoder.training
    mean, std = normalization_for(config.data.name)
    with torch.no_grad():
        z = F.normalize(encoder.eval()(eval_transform(run.train_set.images[:64], 16, mean=mean, std=std)), dim=1)
    encoder.train(was_training)
    return z


def test_the_current_prior_is_the_encoders_z_at_every_epoch_start_of_its_phase(tiny: list[str], tmp_path: Path) -> None:
    """8 steps per epoch, a phase of 1.5 epochs: computed before step 0 and again before step 8 with the weights of
    then; a resume inside an epoch (start_epoch again at step 3) keeps the epoch's vectors; none after the phase."""
    config = load_config(None, [*tiny, "method.prior=current", "method.prior_epochs=1.5", "train.precision=fp32",
                                f"train.run_dir={tmp_path}"])
    run = train.build_run(config)
    train.start_epoch(run, 0, 0, NoLog())
    first = run.selector.prior.vectors.clone()
    assert torch.allclose(first[:64], _current_z(run, config), atol=1e-4) and int(run.selector.prior.epoch) == 0
    order = train.epoch_order(run, 0)
    for step in range(8):
        train.train_step(run, step, order)
        if step == 2:
            train.start_epoch(run, 0, 3, NoLog())  # as a run resumed at step 3 does
            assert torch.equal(run.selector.prior.vectors, first)
    train.start_epoch(run, 1, 8, NoLog())
    second = run.selector.prior.vectors.clone()
    assert int(run.selector.prior.epoch) == 1 and not torch.allclose(second, first, atol=1e-3)
    assert torch.allclose(second[:64], _current_z(run, config), atol=1e-4)
    order = train.epoch_order(run, 1)
    for step in range(8, 16):
        train.train_step(run, step, order)
    assert run.selector.prior.vectors.shape == (0, 32)  # released by step 12, the first after the phase
    train.start_epoch(run, 2, 16, NoLog())  # an epoch past the phase computes nothing
    assert run.selector.prior.vectors.shape == (0, 32)


def _model_and_support(run_dir: Path) -> dict[str, torch.Tensor]:
    state = load_checkpoint(run_dir / CHECKPOINT_NAME)
    return {f"{part}.{key}": value for part in ("model", "support") for key, value in state[part].items()}


def test_prior_epochs_zero_trains_exactly_as_prior_none(tiny: list[str], tmp_path: Path) -> None:
    results = {}
    for name, more in (("none", []), ("zero", ["method.prior=initial", "method.prior_epochs=0"]),
                       ("initial", ["method.prior=initial"])):
        config = load_config(None, [*tiny, "train.max_steps=4", f"train.run_dir={tmp_path / name}", *more])
        train.pretrain(config, progress=False, echo=lambda *a: None)
        results[name] = _model_and_support(tmp_path / name)
    assert all(torch.equal(results["none"][key], results["zero"][key]) for key in results["none"])
    assert not all(torch.equal(results["none"][key], results["initial"][key]) for key in results["none"])


def test_a_run_past_the_prior_phase_checkpoints_no_prior(tiny: list[str], tmp_path: Path) -> None:
    config = load_config(None, [*tiny, "method.prior=pixels", "method.prior_epochs=0.25", "train.max_steps=4",
                                f"train.run_dir={tmp_path}"])  # a phase of 2 steps of the 8 of an epoch
    train.pretrain(config, progress=False, echo=lambda *a: None)
    state = load_checkpoint(tmp_path / CHECKPOINT_NAME)
    assert state["step"] == 4 and state["selector"]["prior.vectors"].shape == (0, 3 * THUMBNAIL * THUMBNAIL)


def nnclr(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nnclr", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.slow
@pytest.mark.parametrize("prior", ["initial", "pixels"])
def test_a_resumed_command_line_run_continues_exactly(tiny: list[str], tmp_path: Path, prior: str) -> None:
    """Stopped at step 3 of a 5-step prior phase (8 steps per epoch) and resumed to step 7: the checkpoint's prior
    is the one computed at the start (not recomputed from the weights of step 3) and everything equals the
    uninterrupted run's."""
    settings = [*tiny, "method.name=nnclr_soft", f"method.prior={prior}", "method.prior_epochs=0.625"]
    whole = nnclr("pretrain", "--run-dir", "whole", "--set", *settings, "train.max_steps=7", cwd=tmp_path)
    assert whole.returncode == 0, whole.stderr
    first = nnclr("pretrain", "--run-dir", "parts", "--set", *settings, "train.max_steps=3", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    state = load_checkpoint(tmp_path / "parts" / CHECKPOINT_NAME)
    assert state["step"] == 3 and bool(state["selector"]["prior.ready"])
    vectors = state["selector"]["prior.vectors"]
    assert vectors.shape == (256, 32 if prior == "initial" else 192) and torch.allclose(vectors.norm(dim=1),
                                                                                       torch.ones(256))
    second = nnclr("pretrain", "--run-dir", "parts", "--set", *settings, "train.max_steps=7", cwd=tmp_path)
    assert second.returncode == 0 and "resuming" in second.stdout, second.stderr
    a, b = (load_checkpoint(tmp_path / d / CHECKPOINT_NAME) for d in ("whole", "parts"))
    assert a["step"] == b["step"] == 7
    for part in ("model", "support", "selector"):
        assert a[part].keys() == b[part].keys()
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), f"{part}.{key} differs after resume"
    assert b["selector"]["prior.vectors"].shape == (0, vectors.shape[1])  # released after the phase (5 steps)


@pytest.mark.slow
def test_a_resumed_run_with_the_current_prior_continues_exactly(tiny: list[str], tmp_path: Path) -> None:
    """Stopped at the epoch boundary (step 8: the checkpoint holds epoch 0's prior, the resume computes epoch 1's)
    and inside the second epoch (step 10: it holds epoch 1's, the resume keeps it): equal to the run not stopped."""
    settings = [*tiny, "method.name=nnclr_soft", "method.prior=current", "method.prior_epochs=2"]
    whole = nnclr("pretrain", "--run-dir", "whole", "--set", *settings, "train.max_steps=13", cwd=tmp_path)
    assert whole.returncode == 0, whole.stderr
    for stop, epoch in ((8, 0), (10, 1), (13, 1)):
        done = nnclr("pretrain", "--run-dir", "parts", "--set", *settings, f"train.max_steps={stop}", cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        state = load_checkpoint(tmp_path / "parts" / CHECKPOINT_NAME)
        assert state["step"] == stop and int(state["selector"]["prior.epoch"]) == epoch
    a, b = (load_checkpoint(tmp_path / d / CHECKPOINT_NAME) for d in ("whole", "parts"))
    for part in ("model", "support", "selector"):
        assert a[part].keys() == b[part].keys()
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), f"{part}.{key} differs after resume"


@pytest.mark.parametrize(("overrides", "needle"), [
    (["method.prior=clip"], "method.prior='clip' is not one of: none, initial, current, pixels"),
    (["method.prior=initial", "method.prior_epochs=-0.5"], "method.prior_epochs=-0.5 must be >= 0"),
    (["method.prior_epochs=nan"], "method.prior_epochs=nan must be a finite number"),
    (["method.prior_epochs=20000"], "method.prior_epochs=20000 must be at most 10000 epochs"),
    (["method.prior_epochs=soon"], "method.prior_epochs expects a number"),
    (["method.name=simclr", "method.prior=pixels"], "method.prior=pixels chooses support-set neighbours"),
    (["method.name=kmclr", "method.prior=initial"], "method.name=kmclr has none"),
])
def test_bad_values_are_one_line_errors(overrides: list[str], needle: str) -> None:
    with pytest.raises(UserError) as error:
        load_config(None, overrides)
    assert needle in str(error.value) and "\n" not in str(error.value)


def test_a_bad_value_on_the_command_line_is_one_line(tmp_path: Path) -> None:
    result = nnclr("pretrain", "--set", "method.prior=initial", "method.prior_epochs=-1", cwd=tmp_path)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and "method.prior_epochs=-1.0 must be >= 0" in lines[0]


def _rank(rank: int, world: int, port: int, config, out: Path) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.save(_steps(config), out / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


QUERIES = torch.arange(16) * 7 % 256  # a global batch of 16 samples: rank r looks up [8 r, 8 r + 8)


def _steps(config) -> dict[str, torch.Tensor]:
    """The prior after the first epoch hook, the support set after 3 steps in the prior phase and the rows the
    selector then chooses for this process's share of :data:`QUERIES`."""
    run = train.build_run(config)
    train.start_epoch(run, 0, 0, NoLog())
    order = train.epoch_order(run, 0)
    for step in range(3):
        train.train_step(run, step, order)
    mine = QUERIES[distributed.local_slice(len(QUERIES))]
    z = torch.randn(len(mine), config.model.proj_dim)  # (in the prior phase z does not choose the rows)
    rows = run.selector.neighbours(z, run.support, indices=mine, step=3).rows
    return {"prior": run.selector.prior.vectors.clone(), "indices": run.support.indices.clone(),
            "steps": run.support.steps.clone(), "rows": rows}


@pytest.mark.slow
@pytest.mark.parametrize("prior", ["initial", "pixels"])
def test_two_processes_hold_the_same_prior_as_one(tiny: list[str], tmp_path: Path, prior: str) -> None:
    """Each rank extracts its share; both hold the whole prior, the one a single process computes."""
    config = load_config(None, [*tiny, "method.name=nnclr_multi", f"method.prior={prior}", "train.precision=fp32",
                                "optim.batch_size=16", f"train.run_dir={tmp_path / 'run'}"])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_rank, args=(2, port, config, tmp_path), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    single = _steps(config)
    assert torch.equal(ranks[0]["prior"], ranks[1]["prior"])
    assert torch.allclose(ranks[0]["prior"], single["prior"], atol=1e-5)
    for key in ("indices", "steps"):  # the global batches went into the support set in the same order
        assert torch.equal(ranks[0][key], single[key]) and torch.equal(ranks[1][key], single[key])
    assert torch.equal(torch.cat([ranks[0]["rows"], ranks[1]["rows"]]), single["rows"])  # the same choices
    assert (single["rows"] >= 0).all()
