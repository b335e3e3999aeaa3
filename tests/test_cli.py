"""The ``nnclr`` command as a user runs it: a subprocess, its output and exit code."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from nnclr.checkpoint import CHECKPOINT_NAME, load_checkpoint


@pytest.fixture
def tiny(tiny_run: tuple[str, ...]) -> list[str]:
    """The tiny run with a support set of 100 and no report (test_report.py has its own tests)."""
    return [*tiny_run, "method.support_size=100", "train.report=false"]


def nnclr(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "nnclr", *args], cwd=cwd, capture_output=True, text=True, timeout=timeout
    )


def assert_user_error(result: subprocess.CompletedProcess, *needles: str) -> None:
    """Exit code 2, one line on stderr naming the problem, no traceback."""
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("nnclr: error: "), result.stderr
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.mark.slow
def test_demo_run_prints_knn_before_after_and_run_dir(tmp_path: Path, tiny: list[str]) -> None:
    result = nnclr("pretrain", "--set", *tiny, "train.max_steps=3", "train.epochs=1", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "kNN top-1 on demo/test (k=20): before pretraining" in result.stdout
    assert "run directory: runs/nnclr-demo" in result.stdout
    assert (tmp_path / "runs" / "nnclr-demo" / CHECKPOINT_NAME).is_file()
    assert not (tmp_path / "runs" / "nnclr-demo" / "report.html").exists() and "report:" not in result.stdout
    again = nnclr("pretrain", "--set", *tiny, "train.max_steps=3", "train.epochs=1", cwd=tmp_path)
    assert again.returncode == 0 and "already complete" in again.stdout


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["--set", "optim.lrr=0.5"], ["optim.lrr", "keys in optim"]),
        (["--set", "optim.lr=fast"], ["optim.lr", "float"]),
        (["--set", "method.name=byol"], ["method.name", "nnclr, simclr, kmclr"]),
        (["--config", "missing.yaml"], ["missing.yaml", "not found"]),
        # found after the fresh process imported torch: seconds each
        pytest.param(["--set", "data.name=folder:/no/such/folder"], ["/no/such/folder"], marks=pytest.mark.slow),
        pytest.param(["--set", "data.name=imagenet"], ["imagenet"], marks=pytest.mark.slow),
        pytest.param(["--set", "train.device=cuda:0"] if not torch.cuda.is_available() else ["--set", "optim.lr=0"],
                     ["train.device" if not torch.cuda.is_available() else "optim.lr"], marks=pytest.mark.slow),
    ],
)
def test_bad_input_is_one_line_and_exit_code_2(tmp_path: Path, args: list[str], needles: list[str]) -> None:
    assert_user_error(nnclr("pretrain", *args, cwd=tmp_path), *needles)


@pytest.mark.slow
def test_folder_errors(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_user_error(nnclr("pretrain", "--set", f"data.name=folder:{empty}", cwd=tmp_path), str(empty))
    broken = tmp_path / "broken" / "cats"
    broken.mkdir(parents=True)
    (broken / "bad.jpg").write_bytes(b"not a jpeg at all")  # only unreadable files: nothing to train on
    tiff = io.BytesIO()
    Image.new("RGB", (4, 4)).save(tiff, "TIFF")
    tiff = bytearray(tiff.getvalue())
    tiff[42:46] = (10_000).to_bytes(4, "little")  # BitsPerSample's values past the end: Pillow warns, then refuses
    (broken / "cut.tif").write_bytes(tiff)
    assert_user_error(  # one line: Pillow's warnings about the file are not printed
        nnclr("pretrain", "--set", f"data.name=folder:{broken.parent}", cwd=tmp_path), "none of the 2", "bad.jpg"
    )


@pytest.mark.slow
def test_checkpoint_from_another_config_is_refused(tmp_path: Path, tiny: list[str]) -> None:
    base = ["pretrain", "--run-dir", "run", "--set", *tiny, "data.test_split=", "train.max_steps=1"]
    assert nnclr(*base, cwd=tmp_path).returncode == 0
    assert_user_error(nnclr(*base, "optim.lr=0.9", cwd=tmp_path), "different config", "optim.lr", "--fresh")
    assert nnclr(*base, "optim.lr=0.9", "--fresh", cwd=tmp_path).returncode == 0


@pytest.mark.slow
def test_kill_and_rerun_resumes_exactly(tmp_path: Path, tiny: list[str]) -> None:
    """SIGKILL mid-run, the same command again: same final weights as a run never stopped."""
    args = ["pretrain", "--set", *tiny, "data.test_split=", "train.epochs=1", "train.max_steps=40",
            "train.checkpoint_every=3"]
    whole = nnclr(*args, "--run-dir", "whole", cwd=tmp_path)
    assert whole.returncode == 0, whole.stderr

    command = [sys.executable, "-m", "nnclr", *args, "--run-dir", "killed"]
    process = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoint = tmp_path / "killed" / CHECKPOINT_NAME
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if checkpoint.is_file() and load_checkpoint(checkpoint)["step"] >= 6:
            break
        time.sleep(0.05)
    assert process.poll() is None, "the run ended before it could be killed; make it longer"
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    killed_at = load_checkpoint(checkpoint)["step"]
    assert 6 <= killed_at < 40

    resumed = nnclr(*args, "--run-dir", "killed", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming killed from step {killed_at}/40" in resumed.stdout
    a = load_checkpoint(tmp_path / "whole" / CHECKPOINT_NAME)
    b = load_checkpoint(checkpoint)
    assert a["step"] == b["step"] == 40
    for part in ("model", "support"):
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), f"{part}.{key} differs"


@pytest.mark.slow
@pytest.mark.parametrize(("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_ctrl_c_or_sigterm_finishes_the_step_saves_and_says_how_to_resume(
    tmp_path: Path, tiny: list[str], signum: signal.Signals, code: int
) -> None:
    args = ["pretrain", "--run-dir", "run", "--set", *tiny, "data.test_split=", "train.epochs=1",
            "train.checkpoint_every=1000"]
    process = subprocess.Popen([sys.executable, "-m", "nnclr", *args], cwd=tmp_path,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if metrics.is_file() and metrics.read_text().count('"train"') >= 2:
            break
        time.sleep(0.05)
    process.send_signal(signum)
    out, err = process.communicate(timeout=120)
    assert process.returncode == code, err
    step = load_checkpoint(tmp_path / "run" / CHECKPOINT_NAME)["step"]
    assert 2 <= step < 109  # 3,500 demo images // 32 = 109 steps in the epoch
    assert f"stopped by {signum.name} at step {step}/109; checkpoint saved in run/{CHECKPOINT_NAME}. " \
        "Run the same command to resume." in out
    assert err.strip().splitlines()[-1] == "nnclr: interrupted" and "Traceback" not in err
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["type"] == "train"] == list(range(1, step + 1))  # the step was finished
