"""What nnclr guarantees when things go wrong while it writes (docs/running.md: "What nnclr guarantees").

* a full disk or a read-only run directory while writing a checkpoint, the metrics or the
  results: a one-line error naming the file, the previous checkpoint intact, and the same command
  resumes once there is room again;
* the same for ``nnclr export``;
* a second process on the same run directory is refused while the first lives, and resumes it
  once the first is gone (even after ``kill -9``).
"""

from __future__ import annotations

import hashlib
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from robust_helpers import metrics_without_timing, run_overrides, small_filesystem, tiny_config
from use_helpers import assert_user_error, make_checkpoint, run_main

import nnclr.train
from nnclr.checkpoint import CHECKPOINT_NAME, load_checkpoint
from nnclr.errors import UserError
from nnclr.rundir import tmp_path as partial_file
from nnclr.train import pretrain


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _at_step(monkeypatch: pytest.MonkeyPatch, step: int, action) -> dict:
    """Run ``action()`` just before training step ``step`` (0-based); returns what it saw."""
    seen: dict = {}
    original = nnclr.train.train_step

    def wrapped(run, index, order, streamed=None):
        if index == step and not seen:
            seen["checkpoint_sha"] = _sha(run.run_dir / CHECKPOINT_NAME)
            action()
        return original(run, index, order, streamed)

    monkeypatch.setattr(nnclr.train, "train_step", wrapped)
    return seen


@pytest.mark.parametrize(
    ("failure", "needles"),
    [
        ("full", ["cannot write the checkpoint", "No space left on device", "previous checkpoint (step 2) is intact"]),
        ("read-only", ["cannot write the metrics", "Read-only file system", "last checkpoint is intact"]),
    ],
)
def test_full_or_read_only_disk_mid_run_keeps_the_checkpoint_and_resumes(
    tmp_path: Path, tiny_data: Path, monkeypatch: pytest.MonkeyPatch, failure: str, needles: list[str]
) -> None:
    with small_filesystem(tmp_path / "disk") as disk:
        run_dir = disk.path / "run"
        config = tiny_config(tiny_data, run_dir, "train.max_steps=4", "data.test_split=")
        # 64 KiB left: the metrics lines of steps 3 and 4 fit, the 10 MB checkpoint of step 4 does not
        action = (lambda: disk.fill(leave=64 * 1024)) if failure == "full" else disk.read_only
        seen = _at_step(monkeypatch, 2, action)
        with pytest.raises(UserError) as error:
            pretrain(config, progress=False)
        message = str(error.value)
        assert "\n" not in message and str(run_dir) in message
        for needle in needles:
            assert needle in message, message
        assert _sha(run_dir / CHECKPOINT_NAME) == seen["checkpoint_sha"]  # untouched
        assert load_checkpoint(run_dir / CHECKPOINT_NAME)["step"] == 2
        assert not partial_file(run_dir / CHECKPOINT_NAME).exists()  # the partial file was removed

        disk.free() if failure == "full" else disk.read_only(False)
        monkeypatch.undo()
        result = pretrain(config, progress=False)  # the same command, with room again
        assert result.resumed_from == 2 and result.steps == 4
        steps = [r["step"] for r in metrics_without_timing(run_dir) if r["type"] == "train"]
        assert steps == [1, 2, 3, 4]


def test_full_disk_while_writing_the_results(tmp_path: Path, tiny_data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with small_filesystem(tmp_path / "disk") as disk:
        run_dir = disk.path / "run"
        original = nnclr.train.knn_monitor
        calls = []

        def fill_before_the_final_knn(run):  # called once before training and once after
            calls.append(1)
            if len(calls) == 2:
                disk.fill()
            return original(run)

        monkeypatch.setattr(nnclr.train, "knn_monitor", fill_before_the_final_knn)
        with pytest.raises(UserError, match=r"cannot write the (metrics|results) .*No space left on device"):
            pretrain(tiny_config(tiny_data, run_dir, "train.max_steps=2"), progress=False)
        assert load_checkpoint(run_dir / CHECKPOINT_NAME)["step"] == 2  # the final checkpoint
        disk.free()
        monkeypatch.undo()
        result = pretrain(tiny_config(tiny_data, run_dir, "train.max_steps=2"), progress=False)
        assert result.resumed_from == 2 and result.knn_after is not None
        assert [r["step"] for r in metrics_without_timing(run_dir) if r["type"] == "knn"] == [0, 2]


def test_read_only_run_directory_from_the_start(tmp_path: Path, tiny_data: Path) -> None:
    with small_filesystem(tmp_path / "disk") as disk:
        disk.read_only()
        with pytest.raises(UserError, match=r"cannot write the run's lock file .*Read-only file system"):
            pretrain(tiny_config(tiny_data, disk.path / "run"), progress=False)


@pytest.mark.parametrize("fmt", ["safetensors", "torchscript"])
@pytest.mark.parametrize("failure", ["full", "read-only"])
def test_export_to_a_full_or_read_only_disk(
    tmp_path: Path, capsys: pytest.CaptureFixture, fmt: str, failure: str
) -> None:
    checkpoint = make_checkpoint(tmp_path / "checkpoint.pt")
    with small_filesystem(tmp_path / "disk") as disk:
        disk.fill() if failure == "full" else disk.read_only()
        out = disk.path / f"encoder.{fmt}"
        result = run_main(capsys, "export", "--checkpoint", str(checkpoint), "--format", fmt, "--out", str(out))
        reason = "No space left on device" if failure == "full" else "Read-only file system"
        assert_user_error(result, f"cannot write the {fmt} export {out}", reason, "nothing was written")
        assert not out.exists() and not partial_file(out).exists()


# ---------------------------------------------------------------------------- one process per run directory


def _start(args: list[str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "nnclr", *args], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _wait_for(condition, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


@pytest.mark.slow
def test_a_second_process_is_refused_until_the_first_dies(
    tmp_path: Path, tiny_data: Path, capsys: pytest.CaptureFixture
) -> None:
    args = ["pretrain", "--run-dir", str(tmp_path / "run"), "--no-progress",
            "--set", *run_overrides(tiny_data, "train.epochs=500", "data.test_split=")]
    first = _start(args, tmp_path)
    checkpoint = tmp_path / "run" / CHECKPOINT_NAME
    try:
        _wait_for(checkpoint.is_file, first)
        for extra in ([], ["--fresh"]):  # resuming and starting over are both refused while it runs
            second = run_main(capsys, *args, *extra)
            assert_user_error(second, f"{tmp_path / 'run'} is in use by another nnclr process",
                              f"pid {first.pid}", "nnclr pretrain")
        assert first.poll() is None
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    killed_at = load_checkpoint(checkpoint)["step"]
    # the kernel released the dead process's lock: the same command resumes
    resumed = run_main(capsys, *args, f"train.max_steps={killed_at + 2}")  # (max_steps may change on resume)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming {tmp_path / 'run'} from step {killed_at}" in resumed.stdout


# ---------------------------------------------------------------------------- non-finite loss, gradients, weights


def _poison_gradients(monkeypatch: pytest.MonkeyPatch, steps: set[int]) -> dict[int, dict]:
    """Make the gradient of the first backbone weight NaN in the given (0-based) steps.

    Returns, per poisoned step, the model's weights before and after it.
    """
    original = nnclr.train.train_step
    seen: dict[int, dict] = {}

    def wrapped(run, index, order, streamed=None):
        if index not in steps:
            return original(run, index, order, streamed)
        weight = next(run.model.backbone.parameters())
        handle = weight.register_hook(lambda grad: grad * float("nan"))
        before = {k: v.clone() for k, v in run.model.state_dict().items()}
        try:
            return original(run, index, order, streamed)
        finally:
            handle.remove()
            seen[index] = {"before": before, "after": {k: v.clone() for k, v in run.model.state_dict().items()}}

    monkeypatch.setattr(nnclr.train, "train_step", wrapped)
    return seen


def _all_finite(state: dict) -> bool:
    return all(bool(v.isfinite().all()) for v in state.values() if v.is_floating_point())


def test_a_non_finite_gradient_stops_naming_the_step_and_the_parameter(
    tmp_path: Path, tiny_data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _poison_gradients(monkeypatch, {4})
    with pytest.raises(UserError) as error:
        pretrain(tiny_config(tiny_data, tmp_path, "data.test_split="), progress=False)
    assert str(error.value).startswith("the gradient of backbone.stem.0.weight is not finite at step 5, so the run "
                                       f"stopped; the last good checkpoint (step 4) in {tmp_path} is intact")
    assert "train.nonfinite=skip" in str(error.value)
    state = load_checkpoint(tmp_path / CHECKPOINT_NAME)
    assert state["step"] == 4 and _all_finite(state["model"])


def test_with_skip_non_finite_steps_are_skipped_counted_and_resumed(
    tmp_path: Path, tiny_data: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    seen = _poison_gradients(monkeypatch, {2, 5})
    config = tiny_config(tiny_data, tmp_path, "data.test_split=", "train.nonfinite=skip", "train.max_steps=6")
    assert pretrain(config, progress=False).steps == 6
    for step in (2, 5):  # the optimiser did not step: the weights are those before the step
        for key, value in seen[step]["before"].items():
            assert torch.equal(value, seen[step]["after"][key]), key
    err = capsys.readouterr().err
    assert "nnclr: warning: step 3 skipped: the gradient of backbone.stem.0.weight is not finite (1 skipped so far)" \
        in err and "step 6 skipped" in err
    records = [r for r in metrics_without_timing(tmp_path) if r["type"] == "train"]
    assert [r["skipped_steps"] for r in records] == [0, 0, 1, 1, 1, 2]
    assert [r["loss"] is None for r in records] == [False, False, True, False, False, True]  # no loss: no step
    state = load_checkpoint(tmp_path / CHECKPOINT_NAME)
    assert state["skipped_steps"] == 2 and _all_finite(state["model"]) and _all_finite(state["support"])
    # the count survives a resume
    monkeypatch.undo()
    result = pretrain(tiny_config(tiny_data, tmp_path, "data.test_split=", "train.nonfinite=skip", "train.max_steps=8"),
                      progress=False)
    assert result.resumed_from == 6
    assert [r["skipped_steps"] for r in metrics_without_timing(tmp_path) if r["type"] == "train"][-1] == 2


def test_non_finite_weights_are_never_written(tmp_path: Path, tiny_data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    original = nnclr.train.train_step

    def blow_up(run, index, order, streamed=None):  # finite gradients, then an infinite weight (a huge lr)
        result = original(run, index, order, streamed)
        if index == 2:
            with torch.no_grad():
                next(run.model.projector.parameters())[0, 0] = float("inf")
        return result

    monkeypatch.setattr(nnclr.train, "train_step", blow_up)
    with pytest.raises(UserError, match=r"the weight projector\.\S+ is not finite at step 4, so the run stopped; "
                                        r"the last good checkpoint \(step 2\)"):
        pretrain(tiny_config(tiny_data, tmp_path, "data.test_split=", "train.nonfinite=skip"), progress=False)
    state = load_checkpoint(tmp_path / CHECKPOINT_NAME)
    assert state["step"] == 2 and _all_finite(state["model"])
