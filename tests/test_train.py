"""The pretraining loop: a smoke run of each method, exact resume, checkpoints and errors."""

from __future__ import annotations

import dataclasses
import json
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from robust_helpers import metrics_without_timing, tiny_config

import nnclr.train
from nnclr.checkpoint import CHECKPOINT_NAME, load_checkpoint, save_checkpoint
from nnclr.config import load_config
from nnclr.errors import Interrupted, UserError
from nnclr.methods import METHODS
from nnclr.train import pretrain


@pytest.fixture(scope="module")
def tiny(tiny_run: tuple[str, ...]):
    """``tiny(run_dir, *overrides)``: the config of a tiny, fast run on the shipped demo data (a support set of
    100, 8 prototypes, a checkpoint every 2 steps); no kNN (test_split="") unless a test asks for it."""
    overrides = [*tiny_run, "train.epochs=1", "method.support_size=100", "method.num_prototypes=8",
                 "data.test_split=", "train.checkpoint_every=2"]

    def config(run_dir: Path, *more: str):
        return load_config(None, [*overrides, f"train.run_dir={run_dir}", *more])

    return config


# Every registered method, and the options that draw random choices (top-k sampling of a neighbour).
VARIANTS = {**{name: [f"method.name={name}"] for name in METHODS}, "nnclr-topk": ["method.name=nnclr", "method.topk=3"]}


def method_overrides(method: str, demo_data: str) -> list[str]:
    """Methods that cluster the training set every epoch run on ``demo_data`` (96 images: 3 steps of 32 per epoch)
    for 3 epochs, so that 7 steps cross two re-clusterings."""
    if METHODS[VARIANTS[method][0].split("=")[1]].diagnostics != "clustering":
        return VARIANTS[method]
    return [*VARIANTS[method], f"data.name={demo_data}", "method.num_clusters=8", "train.epochs=3"]


def all_slow_but(fast: str, names) -> list:
    """``names`` as parameters, each marked slow but ``fast``: ``pytest -m "not slow"`` runs that one only."""
    return [name if name == fast else pytest.param(name, marks=pytest.mark.slow) for name in names]


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("method", all_slow_but("nnclr", METHODS))
def test_two_step_smoke_run(tmp_path: Path, method: str, demo_data: str, tiny) -> None:
    result = pretrain(tiny(tmp_path, *method_overrides(method, demo_data), "train.max_steps=2"), progress=False)
    assert result.steps == 2
    records = [r for r in read_metrics(tmp_path) if r["type"] == "train"]
    assert [r["step"] for r in records] == [1, 2]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in records)
    if METHODS[method].support:
        assert "nn_label_agreement" in records[-1] and "support_fill" in records[-1]
    else:  # the neighbour diagnostics do not apply
        assert not any(key.startswith(("nn_", "support")) for key in records[-1])
    if METHODS[method].head == "classifier":
        assert 0 <= records[-1]["pseudo_label_accuracy"] <= 1
    state = load_checkpoint(tmp_path / CHECKPOINT_NAME)
    assert state["step"] == 2 and state["config"]["method"]["name"] == method
    assert (tmp_path / "config.yaml").is_file() and (tmp_path / "results.json").is_file()


@pytest.mark.slow
def test_support_set_is_filled_and_checkpointed(tmp_path: Path, tiny) -> None:
    pretrain(tiny(tmp_path, "train.max_steps=5"), progress=False)
    support = load_checkpoint(tmp_path / CHECKPOINT_NAME)["support"]
    # steps 0..4 x 32 samples = 160 > 100 rows: full and wrapped; the oldest 60 rows were
    # overwritten (all of step 0, 28 of step 1), so 4 rows of step 1 and 32 of steps 2-4 remain.
    assert int(support["num_filled"]) == 100
    assert (support["indices"] >= 0).all()
    assert torch.bincount(support["steps"]).tolist() == [0, 4, 32, 32, 32]


@pytest.mark.parametrize("method", all_slow_but("nnclr_mean", VARIANTS))
def test_resume_equals_uninterrupted(tmp_path: Path, method: str, demo_data: str, tiny) -> None:
    """Every method and option. DeepCluster: stopped at step 3, the end of its first epoch, the resumed run does
    the second clustering."""
    whole, parts, overrides = tmp_path / "whole", tmp_path / "parts", method_overrides(method, demo_data)
    pretrain(tiny(whole, *overrides, "train.max_steps=7"), progress=False)
    pretrain(tiny(parts, *overrides, "train.max_steps=3"), progress=False)
    result = pretrain(tiny(parts, *overrides, "train.max_steps=7"), progress=False)
    assert result.resumed_from == 3 and result.steps == 7
    a, b = load_checkpoint(whole / CHECKPOINT_NAME), load_checkpoint(parts / CHECKPOINT_NAME)
    for part in ("model", "support", "selector"):
        assert a[part].keys() == b[part].keys()
        assert part != "model" or a[part], "the comparison covers the model"
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), f"{part}.{key} differs after resume"
    for key, value in a["optimizer"]["state"].items():
        assert torch.equal(value["momentum_buffer"], b["optimizer"]["state"][key]["momentum_buffer"])
    # metrics.jsonl of the resumed run has each step exactly once
    steps = [r["step"] for r in read_metrics(parts) if r["type"] == "train"]
    assert steps == list(range(1, 8))
    if method == "deepcluster":  # each clustering logged once, and the pseudo-labels are in the checkpoint
        assert [r["step"] for r in read_metrics(parts) if r["type"] == "clustering"] == [0, 3, 6]
        assert int(b["selector"]["epoch"]) == 2 and int(b["selector"]["labels"].min()) >= 0


@pytest.mark.slow
def test_metrics_after_a_ctrl_c_between_two_records_equal_an_uninterrupted_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny
) -> None:
    """Issue 23, item 5: a checkpoint every 3 steps, a record every 2; Ctrl-C during step 3 saves a checkpoint
    between two records, and the record of step 4 still averages steps 3 and 4 (the partial logging window is in
    the checkpoint): every record equals the uninterrupted run's, bitwise, but the wall-clock images_per_s."""
    settings = ("train.log_every=2", "train.checkpoint_every=3", "train.max_steps=7")
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    pretrain(tiny(whole, *settings), progress=False)
    original = nnclr.train.contrastive_step

    def ctrl_c_during_step_3(*args, **kwargs):
        if kwargs["step"] == 2:
            signal.raise_signal(signal.SIGINT)
        return original(*args, **kwargs)

    monkeypatch.setattr(nnclr.train, "contrastive_step", ctrl_c_during_step_3)
    with pytest.raises(Interrupted):
        pretrain(tiny(parts, *settings), progress=False)
    assert load_checkpoint(parts / CHECKPOINT_NAME)["step"] == 3
    monkeypatch.setattr(nnclr.train, "contrastive_step", original)
    assert pretrain(tiny(parts, *settings), progress=False).resumed_from == 3
    assert [r["step"] for r in read_metrics(whole) if r["type"] == "train"] == [2, 4, 6, 7]
    assert metrics_without_timing(parts) == metrics_without_timing(whole)


@pytest.mark.slow
def test_a_resume_on_other_data_is_refused_in_one_line(tmp_path: Path, tiny_data: Path) -> None:
    """Issue 23, item 15: images added to (or changed in) an npz source since the run started are refused with the
    counts and --fresh; --accept-data-changes goes on; a checkpoint without a fingerprint resumes as before."""
    data, run_dir = tmp_path / "data", tmp_path / "run"
    shutil.copytree(tiny_data, data)
    pretrain(tiny_config(data, run_dir, "train.max_steps=1"), progress=False)
    train = dict(np.load(data / "train.npz"))
    more = {key: np.concatenate([value, value[:64]]) for key, value in train.items()}
    np.savez(data / "train.npz", **more)
    with pytest.raises(UserError) as error:
        pretrain(tiny_config(data, run_dir, "train.max_steps=2"), progress=False)
    assert str(error.value) == (
        f"npz:{data} changed since this run started (256 images of 3x16x16 when it started, 320 images of 3x16x16 "
        "now; 8 steps per epoch then, 10 now); restore it, pass --accept-data-changes to go on with the data as it "
        "is now, or start over with --fresh")
    other = {**train, "images": 255 - train["images"]}
    np.savez(data / "train.npz", **other)
    with pytest.raises(UserError, match=r"\(the same 256 images of 3x16x16, other content; "):
        pretrain(tiny_config(data, run_dir, "train.max_steps=2"), progress=False)
    said: list[str] = []
    result = pretrain(tiny_config(data, run_dir, "train.max_steps=2"), progress=False, accept_data_changes=True,
                      echo=said.append)
    assert result.resumed_from == 1 and any("going on with the changed data" in line for line in said)
    state = load_checkpoint(run_dir / CHECKPOINT_NAME)
    del state["data"], state["format_version"]  # as nnclr wrote it before the fingerprint
    save_checkpoint(state, run_dir / CHECKPOINT_NAME)
    np.savez(data / "train.npz", **more)
    assert pretrain(tiny_config(data, run_dir, "train.max_steps=3"), progress=False).resumed_from == 2


@pytest.mark.slow
def test_resume_with_another_config_is_refused(tmp_path: Path, tiny) -> None:
    pretrain(tiny(tmp_path, "train.max_steps=2"), progress=False)
    with pytest.raises(UserError, match=r"different config \(optim\.lr"):
        pretrain(tiny(tmp_path, "train.max_steps=4", "optim.lr=0.9"), progress=False)
    # --fresh starts over instead
    result = pretrain(tiny(tmp_path, "train.max_steps=1", "optim.lr=0.9"), fresh=True, progress=False)
    assert result.resumed_from == 0 and result.steps == 1


@pytest.mark.slow
def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny
) -> None:
    original = nnclr.train.contrastive_step

    def nan_loss_at_step_3(*args, **kwargs):
        out = original(*args, **kwargs)
        return dataclasses.replace(out, loss=out.loss * float("nan")) if kwargs["step"] == 2 else out

    monkeypatch.setattr(nnclr.train, "contrastive_step", nan_loss_at_step_3)
    with pytest.raises(UserError, match="loss became") as error:
        pretrain(tiny(tmp_path, "train.checkpoint_every=1"), progress=False)
    step = load_checkpoint(tmp_path / CHECKPOINT_NAME)["step"]
    assert step == 2 and "at step 3" in str(error.value)  # the checkpoint holds the last good step
    assert f"checkpoint (step {step})" in str(error.value)


@pytest.mark.slow
def test_a_learning_rate_far_too_high_stops_before_writing_non_finite_weights(tmp_path: Path, tiny) -> None:
    config = tiny(tmp_path, "optim.name=sgd", "optim.lr=1.0e+30", "train.checkpoint_every=1", "train.precision=fp32")
    with pytest.raises(UserError, match=r"the weight \S+ is not finite at step 1, so the run stopped; no checkpoint"):
        pretrain(config, progress=False)
    assert not (tmp_path / CHECKPOINT_NAME).exists()


@pytest.mark.slow
def test_knn_before_and_after_are_reported(tmp_path: Path, tiny) -> None:
    result = pretrain(tiny(tmp_path, "train.max_steps=2", "data.test_split=test"), progress=False)
    assert result.knn_before is not None and result.knn_after is not None
    assert 0 < result.knn_before["top1"] <= 100 and result.knn_after["num_test"] == 1000
    knn = [r for r in read_metrics(tmp_path) if r["type"] == "knn"]
    assert [r["step"] for r in knn] == [0, 2]


def test_batch_larger_than_data_is_a_user_error(tmp_path: Path, tiny) -> None:
    with pytest.raises(UserError, match="optim.batch_size=4096"):
        pretrain(tiny(tmp_path, "optim.batch_size=4096"), progress=False)
