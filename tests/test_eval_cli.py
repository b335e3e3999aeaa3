"""``nnclr eval`` as a user runs it: every protocol as a subprocess, its JSON result, table and exit code.

The data are tiny 8x8 images whose class is their colour (4 classes, 200 train / 40 test), so that
even the random-weight encoder of :func:`use_helpers.make_checkpoint` separates them: a protocol
that mixes up images, labels or splits scores near chance (25%) instead of near 100%.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from use_helpers import make_checkpoint, run_main

from nnclr.checkpoint import CHECKPOINT_NAME, load_checkpoint
from nnclr.evaluate.cache import safe_name
from nnclr.evaluate.linear import L2_GRID
from nnclr.evaluate.protocols import SWEEP_KS, SWEEP_TEMPERATURES
from nnclr.pretrained import file_hash

REPO = Path(__file__).resolve().parents[1]
FIELDS = {"protocol", "data", "settings", "splits", "top1", "top5", "metrics", "wall_time_s", "checkpoint",
          "checkpoint_hash", "step", "config"}
PALETTE = [(220, 40, 40), (40, 200, 60), (50, 60, 220), (200, 200, 200)]  # red, green, blue, grey
OTHER_PALETTE = [(230, 220, 40), (40, 220, 220), (220, 40, 220)]  # yellow, cyan, magenta: the transfer set


def colour_npz(folder: Path, palette: list[tuple[int, int, int]], train: int, test: int, side: int = 8) -> Path:
    """``train.npz`` / ``test.npz``: class c is colour ``palette[c]`` plus uniform noise of +-60 per pixel."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(len(palette))
    for split, n in (("train", train), ("test", test)):
        labels = np.arange(n) % len(palette)  # balanced
        rng.shuffle(labels)
        base = np.asarray(palette, dtype=np.int64)[labels][:, None, None, :]
        images = np.clip(base + rng.integers(-60, 61, (n, side, side, 3)), 0, 255).astype(np.uint8)
        np.savez(folder / f"{split}.npz", images=images, labels=labels)
    return folder


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The data sets and one checkpoint, shared by the tests (each copies it into a run directory of its own)."""
    root = tmp_path_factory.mktemp("eval")
    data = colour_npz(root / "colours", PALETTE, train=200, test=40)
    other = colour_npz(root / "other", OTHER_PALETTE, train=90, test=30, side=12)  # resized to 8 on load
    unlabelled = root / "unlabelled"
    unlabelled.mkdir()
    for split, n in (("train", 32), ("test", 8)):
        np.savez(unlabelled / f"{split}.npz", images=np.zeros((n, 8, 8, 3), dtype=np.uint8))
    checkpoint = make_checkpoint(root / "checkpoint.pt", f"data.name=npz:{data}", "data.image_size=8")
    return {"root": root, "data": data, "other": other, "unlabelled": unlabelled, "checkpoint": checkpoint}


@pytest.fixture
def run(world: dict[str, Path], tmp_path: Path) -> Path:
    """A fresh run directory holding the shared checkpoint."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    shutil.copy(world["checkpoint"], run_dir / CHECKPOINT_NAME)
    return run_dir


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """``python -m nnclr ARGS`` as a subprocess that imports nnclr from this checkout."""
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return subprocess.run([sys.executable, "-m", "nnclr", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONPATH": path})


def nnclr_eval(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """``nnclr eval ARGS --no-progress --threads 1``."""
    return cli("eval", *args, "--no-progress", "--threads", "1", cwd=cwd)


def record_of(run_dir: Path, name: str, data: str) -> dict:
    """The JSON result ``<run_dir>/eval/<name>-<data>.json``, checked for the fields every record has."""
    record = json.loads((run_dir / "eval" / f"{name}-{safe_name(data)}.json").read_text())
    assert FIELDS <= record.keys(), FIELDS - record.keys()
    assert record["data"] == data
    checkpoint = run_dir / CHECKPOINT_NAME
    assert record["checkpoint_hash"] == file_hash(checkpoint)
    assert record["config"] == json.loads(json.dumps(load_checkpoint(checkpoint)["config"]))
    assert record["wall_time_s"] > 0 and record["step"] == 0
    return record


def assert_table_row(result: subprocess.CompletedProcess, record: dict) -> None:
    """The printed table has the record's row: protocol, data, split sizes and top-1."""
    assert result.returncode == 0, result.stderr
    rows = [line.split() for line in result.stdout.splitlines()]
    assert ["protocol", "data", "train/test", "top1", "top5", "time", "details"] in rows
    top1 = "-" if record["top1"] is None else f"{record['top1']:.2f}"
    row = [record["protocol"], record["data"], f"{record['splits']['train']}/{record['splits']['test']}", top1]
    assert any(line[:4] == row for line in rows), (row, result.stdout)


def data_name(path: Path) -> str:
    return f"npz:{path}"


@pytest.mark.slow
def test_knn_default_and_sweep_report_the_best_and_the_full_grid(run: Path, world: dict[str, Path]) -> None:
    result = nnclr_eval("knn", "--checkpoint", str(run), "--sweep", "--k", "5", "--temperature", "0.1", cwd=run)
    record = record_of(run, "knn", data_name(world["data"]))
    assert_table_row(result, record)
    assert record["protocol"] == "knn" and record["splits"] == {"train": 200, "test": 40}
    assert record["settings"]["k"] == 5 and record["settings"]["temperature"] == 0.1
    grid = record["metrics"]["grid"]
    assert {(g["k"], g["temperature"]) for g in grid} == {(k, t) for k in SWEEP_KS for t in SWEEP_TEMPERATURES}
    best = max(grid, key=lambda g: g["top1"])
    assert record["metrics"]["best"]["top1"] == best["top1"] == record["top1"]
    assert record["metrics"]["default"]["k"] == 5 and record["metrics"]["default"]["top1"] > 95.0
    assert record["top1"] > 95.0 and record["top5"] == 100.0  # 4 classes: top-5 holds them all


@pytest.mark.slow
def test_features_cached_once_reused_by_other_protocols_and_invalidated_by_a_new_checkpoint(
    run: Path, world: dict[str, Path]
) -> None:
    data = data_name(world["data"])
    first = nnclr_eval("knn", "--checkpoint", str(run), cwd=run)
    assert first.returncode == 0, first.stderr
    assert record_of(run, "knn", data)["metrics"]["features_cached"] is False
    old_hash = file_hash(run / CHECKPOINT_NAME)
    cached = sorted((run / "features").glob("*.pt"))
    assert [p.name for p in cached] == [f"{old_hash}-{safe_name(data)}-{split}.pt" for split in ("test", "train")]
    stamps = [p.stat().st_mtime_ns for p in cached]

    retrieval = nnclr_eval("retrieval", "--checkpoint", str(run), cwd=run)  # another protocol, same features
    assert retrieval.returncode == 0, retrieval.stderr
    assert [p.stat().st_mtime_ns for p in cached] == stamps  # read, not written again

    make_checkpoint(run / CHECKPOINT_NAME, f"data.name={data}", "data.image_size=8", seed=1)  # other weights
    new_hash = file_hash(run / CHECKPOINT_NAME)
    assert new_hash != old_hash
    again = nnclr_eval("knn", "--checkpoint", str(run / CHECKPOINT_NAME), cwd=run)
    assert again.returncode == 0, again.stderr
    record = record_of(run, "knn", data)
    assert record["metrics"]["features_cached"] is False and record["checkpoint_hash"] == new_hash
    assert (run / "features" / f"{new_hash}-{safe_name(data)}-train.pt").is_file()
    new_features = torch.load(run / "features" / f"{new_hash}-{safe_name(data)}-train.pt", weights_only=True)
    old_features = torch.load(cached[1], weights_only=True)
    assert not torch.equal(new_features["features"], old_features["features"])


@pytest.mark.slow
def test_retrieval_reports_recall_at_1_5_10_and_map_at_r(run: Path, world: dict[str, Path]) -> None:
    result = nnclr_eval("retrieval", "--checkpoint", str(run), cwd=run)
    record = record_of(run, "retrieval", data_name(world["data"]))
    assert_table_row(result, record)
    metrics = record["metrics"]
    assert set(metrics) == {"recall@1", "recall@5", "recall@10", "mAP@R"}
    assert record["top1"] == metrics["recall@1"] and record["top5"] is None
    assert metrics["recall@1"] <= metrics["recall@5"] <= metrics["recall@10"]
    assert metrics["recall@1"] > 95.0 and metrics["mAP@R"] > 80.0
    assert record["splits"] == {"train": 200, "test": 40}
    assert record["settings"]["queries"] == "test" and record["settings"]["gallery"] == "train"


@pytest.mark.slow
def test_linear_fast_chooses_l2_on_a_validation_split(run: Path, world: dict[str, Path]) -> None:
    result = nnclr_eval("linear", "--checkpoint", str(run), cwd=run)
    record = record_of(run, "linear", data_name(world["data"]))
    assert_table_row(result, record)
    settings, metrics = record["settings"], record["metrics"]
    assert settings["mode"] == "fast" and settings["l2_grid"] == sorted(L2_GRID)
    assert settings["validation_fraction"] == 0.1
    assert record["splits"] == {"train": 180, "val": 20, "test": 40}
    assert set(metrics["validation_top1"]) == {f"{v:g}" for v in L2_GRID}
    assert metrics["l2"] in L2_GRID
    assert metrics["validation_top1"][f"{metrics['l2']:g}"] == max(metrics["validation_top1"].values())
    assert record["top1"] > 95.0


@pytest.mark.slow
def test_linear_paper_trains_on_augmented_images_and_leaves_the_backbone_bit_identical(
    run: Path, world: dict[str, Path]
) -> None:
    before = file_hash(run / CHECKPOINT_NAME)
    result = nnclr_eval("linear", "--checkpoint", str(run), "--mode", "paper", "--epochs", "3", "--batch-size", "64",
                        "--lr", "0.5", cwd=run)
    record = record_of(run, "linear-paper", data_name(world["data"]))
    assert_table_row(result, record)
    assert "backbone bit-identical" in result.stdout
    assert record["protocol"] == "linear" and record["settings"]["mode"] == "paper"
    assert record["settings"]["epochs"] == 3 and record["settings"]["lr_scaled"] == pytest.approx(0.5 * 64 / 256)
    assert record["metrics"]["backbone_bit_identical"] is True
    assert record["metrics"]["steps"] == 3 * math.ceil(200 / 64)
    assert record["splits"] == {"train": 200, "test": 40}
    assert file_hash(run / CHECKPOINT_NAME) == before
    assert record["top1"] > 90.0
    assert not (run / "eval" / f"linear-{safe_name(data_name(world['data']))}.json").exists()  # fast's file


@pytest.mark.slow
def test_semi_writes_balanced_1_and_10_percent_subsets_that_a_second_run_reuses(
    run: Path, world: dict[str, Path]
) -> None:
    data = data_name(world["data"])
    args = ("--checkpoint", str(run), "--epochs", "3", "--batch-size", "32")
    first = nnclr_eval("semi", *args, "--fractions", "1%", "10%", cwd=run)
    record = record_of(run, "semi", data)
    assert_table_row(first, record)
    labels = np.load(world["data"] / "train.npz")["labels"]
    subsets = record["metrics"]["subsets"]
    assert list(subsets) == ["1pct", "10pct"]
    for name, per_class in (("1pct", 1), ("10pct", 5)):  # 50 training images per class
        path = Path(subsets[name]["subset_file"])
        assert path == run / "eval" / "subsets" / f"{safe_name(data)}-train-{name}-seed0.txt"
        indices = [int(line) for line in path.read_text().split()]
        assert len(set(indices)) == len(indices) == subsets[name]["labelled_images"] == 4 * per_class
        assert np.bincount(labels[indices], minlength=4).tolist() == [per_class] * 4
        assert all(np.isfinite(subsets[name]["epoch_losses"])) and len(subsets[name]["epoch_losses"]) == 3
        assert record["splits"][f"labelled_{name}"] == 4 * per_class
    assert subsets["10pct"]["top1"] > 90.0 and record["top1"] == subsets["1pct"]["top1"]

    ten = subsets["10pct"]["subset_file"]
    reused = nnclr_eval("semi", *args, "--subset-file", ten, cwd=run)  # raised KeyError '10pct' once
    again = record_of(run, "semi", data)
    assert_table_row(reused, again)
    (entry,) = again["metrics"]["subsets"].values()
    assert entry["subset_file"] == ten and entry["labelled_images"] == 20 and entry["fraction"] == pytest.approx(0.1)
    assert entry["top1"] == subsets["10pct"]["top1"]  # same subset, same seed: the same fine-tuning
    assert again["settings"]["subset_file"] == ten


@pytest.mark.slow
def test_transfer_probes_another_data_set_resized_to_the_encoder_input(run: Path, world: dict[str, Path]) -> None:
    other = data_name(world["other"])
    result = nnclr_eval("transfer", "--checkpoint", str(run), "--transfer-data", other, cwd=run)
    record = record_of(run, "transfer", other)
    assert_table_row(result, record)
    assert record["protocol"] == "transfer" and record["settings"]["mode"] == "fast"
    assert record["settings"]["pretrain_data"] == data_name(world["data"])
    assert record["settings"]["image_size"] == 8
    assert record["splits"] == {"train": 81, "val": 9, "test": 30}
    assert record["top1"] > 90.0  # 3 classes: chance is 33%


@pytest.mark.slow
def test_all_runs_every_protocol_that_fits_and_writes_one_result_each(run: Path, world: dict[str, Path]) -> None:
    data, other = data_name(world["data"]), data_name(world["other"])
    result = nnclr_eval("all", "--checkpoint", str(run), "--transfer-data", other, "--fractions", "10%",
                        "--epochs", "2", "--batch-size", "32", cwd=run)
    records = [record_of(run, name, data) for name in ("knn", "linear", "retrieval", "semi")]
    records.append(record_of(run, "transfer", other))
    for record in records:
        assert_table_row(result, record)
    assert [r["protocol"] for r in records] == ["knn", "linear", "retrieval", "semi", "transfer"]
    assert len({r["checkpoint_hash"] for r in records}) == 1
    assert sorted(p.name for p in (run / "eval").glob("*.json")) == sorted(
        [f"{n}-{safe_name(data)}.json" for n in ("knn", "linear", "retrieval", "semi")]
        + [f"transfer-{safe_name(other)}.json"])
    assert result.stdout.count("wrote ") == 5 and "skipping" not in result.stderr


@pytest.fixture
def in_process() -> Iterator[None]:
    """``nnclr eval --threads 1`` in this process: give the test process its threads back afterwards."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def assert_one_line_error(result: subprocess.CompletedProcess, *needles: str) -> None:
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("nnclr: error: "), result.stderr
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["knn"], ["has no labels", "knn protocol"]),
        (["linear", "--mode", "paper"], ["has no labels", "linear protocol"]),
        (["semi", "--epochs", "1"], ["has no labels", "semi protocol"]),
        (["retrieval"], ["has no labels", "retrieval protocol"]),
    ],
)
def test_data_without_labels_is_a_one_line_error(
    run: Path, world: dict[str, Path], capsys: pytest.CaptureFixture, in_process: None, args: list[str],
    needles: list[str],
) -> None:
    data = data_name(world["unlabelled"])
    result = run_main(capsys, "eval", *args, "--checkpoint", str(run), "--data", data, "--threads", "1",
                      "--no-progress")
    assert_one_line_error(result, data, *needles)
    assert not (run / "eval").exists()


def test_a_file_that_is_not_a_checkpoint_and_other_bad_input_are_one_line_errors(
    run: Path, capsys: pytest.CaptureFixture, in_process: None
) -> None:
    text = run / "notes.txt"
    text.write_text("not a checkpoint\n")
    torch_file = run / "weights.pt"
    torch.save({"weights": torch.zeros(3)}, torch_file)
    cases = [
        (["knn", "--checkpoint", str(text)], ["notes.txt", "cannot be read"]),
        (["linear", "--checkpoint", str(torch_file)], ["weights.pt", "is not an nnclr checkpoint"]),
        (["transfer", "--checkpoint", str(run)], ["another data set", "--transfer-data"]),
        (["semi", "--checkpoint", str(run), "--subset-file", str(run / "missing.txt")], ["missing.txt", "not found"]),
    ]
    for args, needles in cases:
        assert_one_line_error(run_main(capsys, "eval", *args, "--threads", "1", "--no-progress"), *needles)


def test_a_bad_data_flag_is_named_as_typed(run: Path, capsys: pytest.CaptureFixture, in_process: None) -> None:
    # the data layer names its config key (data.name=...); the user typed --data / --transfer-data
    missing = str(run / "missing")
    cases = [
        (["knn", "--data", "bogus"], "--data 'bogus': unknown data set"),
        (["linear", "--data", f"npz:{missing}"], f"--data 'npz:{missing}': no such file or folder"),
        (["transfer", "--transfer-data", "bogus"], "--transfer-data 'bogus': unknown data set"),
    ]
    for args, needle in cases:
        result = run_main(capsys, "eval", *args, "--checkpoint", str(run), "--threads", "1", "--no-progress")
        assert_one_line_error(result, needle)
        assert "data.name" not in result.stderr


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["ridge", "--checkpoint", "run"], ["invalid choice: 'ridge'", "knn", "retrieval"]),
        (["knn", "--checkpoint", "run", "--epochs", "3"], ["--epochs", "nnclr eval knn takes", "--sweep"]),
        (["semi", "--checkpoint", "run", "--fractions", "150%"], ["150%", "fraction"]),
        (["knn", "--checkpoint", "run", "--threads", "-1"], ["--threads", ">= 0"]),
    ],
)
def test_bad_arguments_are_one_line_errors_naming_the_flag(tmp_path: Path, args: list[str], needles: list[str]) -> None:
    assert_one_line_error(cli("eval", *args, cwd=tmp_path), *needles)
