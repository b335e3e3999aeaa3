"""The ``nnclr`` command as a user runs it: a subprocess, its output and exit code."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from nnclr import rundir
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
    lowered = nnclr("pretrain", "--set", *tiny, "train.max_steps=2", "train.epochs=1", cwd=tmp_path)
    assert lowered.returncode == 0 and "resuming" not in lowered.stdout  # was "resuming ... from step 3/2"
    assert "its checkpoint is at step 3, past the 2 steps this config trains" in lowered.stdout


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


def test_a_run_that_needs_no_torchvision_never_imports_it(tmp_path: Path, tiny: list[str]) -> None:
    """``import torchvision`` takes 1-2 s (its models and torch._dynamo): pretraining the small CNN on arrays, then
    evaluating and embedding PNGs, must not pay it (it is imported for ResNets, JPEGs and torchvision's data sets)."""
    images = tmp_path / "images"
    images.mkdir()
    for i in range(3):
        Image.new("RGB", (8, 8), (80 * i, 0, 0)).save(images / f"{i}.png")
    commands = [["pretrain", "--run-dir", "run", "--set", *tiny, "data.test_split=", "train.max_steps=1"],
                ["eval", "knn", "--checkpoint", "run", "--no-progress"],
                ["embed", "--checkpoint", "run", "--images", "images", "--out", "emb", "--no-progress"]]
    for args in commands:
        result = subprocess.run([sys.executable, "-X", "importtime", "-m", "nnclr", *args], cwd=tmp_path,
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-2000:]
        assert re.findall(r"\|\s+(torchvision[\w.]*)$", result.stderr, re.MULTILINE) == [], args[0]


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


# --- a second (and third) Ctrl-C or SIGTERM at chosen moments (issue 23, item 4) ---------------------------------

SEAM = Path(__file__).parent / "signal_seam"  # its sitecustomize.py sends the signals: NNCLR_TEST_SIGNALS


def nnclr_signalled(*args: str, cwd: Path, signals: str = "") -> subprocess.CompletedProcess:
    """``python -m nnclr ARGS`` that sends itself signals where ``signals`` says (tests/signal_seam)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(SEAM), os.environ.get("PYTHONPATH")]))}
    if signals:
        env["NNCLR_TEST_SIGNALS"] = signals
    return subprocess.run([sys.executable, "-m", "nnclr", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


def assert_interrupted(result: subprocess.CompletedProcess, code: int, signals: str) -> None:
    """Exit ``code``, and stderr is the one line ``nnclr: interrupted`` besides the seam's notes of what it sent."""
    sent = [line for line in result.stderr.splitlines() if line.startswith("seam: ")]
    assert len(sent) == len(signals.split("=")[1].split(",")), result.stderr  # every signal was sent
    rest = [line for line in result.stderr.splitlines() if line.strip() and not line.startswith("seam: ")]
    assert result.returncode == code and rest == ["nnclr: interrupted"], (result.returncode, result.stderr)


def no_tmp_files(folder: Path) -> list[Path]:
    return [path for path in folder.rglob("*") if path.name.endswith(".tmp")]


LONG = os.environ.get("NNCLR_LONG_CAMPAIGN") == "1"
LONG_ONLY = pytest.mark.skipif(not LONG, reason="the same promise as a pair CI runs; NNCLR_LONG_CAMPAIGN=1 runs it")


@pytest.mark.slow
@pytest.mark.parametrize(("names", "write"), [pytest.param("SIGINT,SIGINT", 2, marks=LONG_ONLY),
                                             pytest.param("SIGTERM,SIGTERM", 5, marks=LONG_ONLY),
                                             ("SIGINT,SIGINT,SIGINT", 3), ("SIGTERM,SIGINT", 1)])
def test_a_second_signal_inside_the_checkpoint_write_stops_at_once_and_the_run_resumes(
    tmp_path: Path, tiny: list[str], names: str, write: int
) -> None:
    """The first signal asks the loop to stop; the second lands inside the checkpoint's write (torch's zip writer:
    was a 40-line RuntimeError traceback and exit 1); a third one while that unwinds changes nothing."""
    args = ["pretrain", "--run-dir", "run", "--no-progress", "--set", *tiny, "data.test_split=", "train.epochs=1",
            "train.max_steps=6", "train.checkpoint_every=2"]
    # the first signal at the write-th write into the second checkpoint's temporary file (step 4's), the others after
    signals = f"write:{rundir.tmp_path(Path(CHECKPOINT_NAME)).name}:2:{write}={names}"
    stopped = nnclr_signalled(*args, cwd=tmp_path, signals=signals)
    assert_interrupted(stopped, 128 + getattr(signal, names.split(",")[-1]), signals)  # the last one raised
    assert "stopped by" not in stopped.stdout  # it did not finish the checkpoint it was writing
    assert load_checkpoint(tmp_path / "run" / CHECKPOINT_NAME)["step"] == 2  # the previous one, intact
    assert not no_tmp_files(tmp_path / "run")
    resumed = nnclr_signalled(*args, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming run from step 2/6" in resumed.stdout


@pytest.fixture(scope="module")
def two_steps(tmp_path_factory: pytest.TempPathFactory, tiny_run: tuple[str, ...], demo_data: str
              ) -> tuple[Path, list[str]]:
    """A run directory at step 2 of 6 (3 steps an epoch, a checkpoint and a kNN every 2 steps) and its command."""
    folder = tmp_path_factory.mktemp("two-steps")
    args = ["pretrain", "--run-dir", "run", "--no-progress", "--set", *tiny_run, "method.support_size=64",
            f"data.name={demo_data}", "train.report=false", "train.epochs=2", "train.checkpoint_every=2",
            "train.knn_every_epochs=0.67"]
    first = nnclr_signalled(*args, "train.max_steps=2", cwd=folder)
    assert first.returncode == 0, first.stderr
    return folder / "run", args


@pytest.mark.slow
@pytest.mark.parametrize(
    ("moment", "names", "step", "again"),
    [  # where; the signals; the checkpoint's step afterwards; what the same command then says
        ("nnclr.data.loaders:load_training_data", "SIGTERM,SIGTERM", 2, "resuming run from step 2/6"),
        ("nnclr.evaluate.monitor:knn_monitor:1", "SIGINT,SIGINT", 2, "resuming run from step 2/6"),  # at step 4
        ("nnclr.evaluate.monitor:knn_monitor:2", "SIGTERM,SIGTERM,SIGTERM", 6, "already complete"),  # the final one
        ("nnclr.report:write_report", "SIGINT,SIGINT", 6, "already complete"),
    ],
)
def test_signals_at_any_moment_stop_in_one_line_and_the_same_command_goes_on(
    tmp_path: Path, two_steps: tuple[Path, list[str]], moment: str, names: str, step: int, again: str
) -> None:
    """During data start-up, the kNN monitor (in the loop: the first signal asks to stop after it, the second
    stops it), the final kNN and the report: exit 130 / 143 in one line, the checkpoint intact, no tmp file."""
    run_dir, args = two_steps
    shutil.copytree(run_dir, tmp_path / "run")
    if "report" in moment:
        args = [*args, "train.report=true"]
    stopped = nnclr_signalled(*args, cwd=tmp_path, signals=f"{moment}={names}")
    assert_interrupted(stopped, 128 + getattr(signal, names.split(",")[-1]), f"{moment}={names}")
    assert load_checkpoint(tmp_path / "run" / CHECKPOINT_NAME)["step"] == step
    assert not no_tmp_files(tmp_path / "run")
    resumed = nnclr_signalled(*args, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert again in resumed.stdout


@pytest.mark.slow
def test_two_ctrl_c_stop_embed_and_eval_in_one_line(tmp_path: Path, two_steps: tuple[Path, list[str]]) -> None:
    """``nnclr embed``: the first Ctrl-C while embedding, the second inside the save of what it embedded;
    ``nnclr eval``: both while extracting features. Exit 130, one line; embed then resumes."""
    run_dir, _ = two_steps
    images = tmp_path / "images"
    images.mkdir()
    for i in range(600):  # three chunks of 256
        Image.new("RGB", (8, 8), (i % 256, 0, 0)).save(images / f"{i}.png")
    embed = ["embed", "--checkpoint", str(run_dir), "--images", str(images), "--out", "emb", "--no-progress"]
    signals = "nnclr.pretrained:Pretrained.embed:2=SIGINT;write:embeddings:1=SIGINT"
    stopped = nnclr_signalled(*embed, cwd=tmp_path, signals=signals)
    sent = [line for line in stopped.stderr.splitlines() if line.startswith("seam: ")]
    assert len(sent) == 2, stopped.stderr
    rest = [line for line in stopped.stderr.splitlines() if line.strip() and not line.startswith("seam: ")]
    assert stopped.returncode == 130 and rest == ["nnclr: interrupted"], stopped.stderr
    assert not no_tmp_files(tmp_path / "emb") if (tmp_path / "emb").exists() else True
    again = nnclr_signalled(*embed, cwd=tmp_path)
    assert again.returncode == 0, again.stderr

    signals = "nnclr.augment:eval_transform:2=SIGINT,SIGINT"
    evaluated = nnclr_signalled("eval", "knn", "--checkpoint", str(run_dir), "--no-progress", cwd=tmp_path,
                                signals=signals)
    assert_interrupted(evaluated, 130, signals)
