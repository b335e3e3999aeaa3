"""Streaming a folder from disk: the loader choice, the workers' crops, exact resume, changed and broken files.

Test data: demo (CIFAR-10) images upscaled to several sizes and aspect ratios, saved as PNG (exact
pixels) and JPEG in class subfolders.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tiny import SMALLER_HEADS

from nnclr.augment.params import CROP_DRAWS
from nnclr.checkpoint import CHECKPOINT_NAME, load_checkpoint
from nnclr.config import load_config
from nnclr.data import load_dataset
from nnclr.data.crops import decode_views, probe_size, read_image_bytes
from nnclr.data.loaders import GIB, choose_loader
from nnclr.data.scan import load_index
from nnclr.data.stream import CropBatches, StepSampler, StreamFeed
from nnclr.errors import UserError
from nnclr.train import pretrain

SIZES = [(48, 40), (40, 56), (64, 64), (70, 36)]  # (width, height): wide, tall, square, very wide
CROPS = (((0.08, 1.0), (3 / 4, 4 / 3)), ((0.08, 1.0), (3 / 4, 4 / 3)))
TINY = [
    *SMALLER_HEADS, "optim.batch_size=16", "optim.warmup_epochs=0", "train.epochs=1", "train.log_every=1",
    "method.support_size=40", "data.test_split=", "train.checkpoint_every=2", "train.threads=1",
    "train.report=false", "data.image_size=32", "data.loader=stream",
]


def write_folder(root: Path, n: int = 64, classes: int = 4) -> Path:
    """``n`` demo images in ``classes`` class folders, each upscaled to one of SIZES, alternately PNG and JPEG."""
    demo = load_dataset("demo", "train")
    for i in range(n):
        folder = root / f"class{i % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        image = Image.fromarray(demo.images[i].permute(1, 2, 0).numpy()).resize(SIZES[i % len(SIZES)])
        image.save(folder / f"{i:03d}.{'png' if i % 2 else 'jpg'}")
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_folder(tmp_path_factory.mktemp("photos"))


@pytest.fixture(autouse=True)
def _index_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NNCLR_CACHE_DIR", str(tmp_path / "cache"))


def tiny(run_dir: Path, data: Path, *overrides: str):
    return load_config(None, [*TINY, f"data.name=folder:{data}", f"train.run_dir={run_dir}", *overrides])


# --- which loader -----------------------------------------------------------------------------------


def test_auto_streams_a_folder_only_when_its_decoded_images_exceed_the_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    need = 1000 * 3 * 224 * 224  # bytes, one process
    assert choose_loader("auto", "folder:/x", 1000, 224, memory_gb=need / GIB).loader == "memory"
    streamed = choose_loader("auto", "folder:/x", 1000, 224, memory_gb=need / GIB * 0.99)
    assert streamed.loader == "stream" and "1,000 images" in streamed.reason and "\n" not in streamed.reason
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # every process on the machine holds its own copy
    assert choose_loader("auto", "folder:/x", 1000, 224, memory_gb=need / GIB * 1.5).loader == "stream"
    assert choose_loader("memory", "folder:/x", 10**9, 224).loader == "memory"  # asked for: obeyed


def test_arrays_stay_in_memory_and_cannot_stream() -> None:
    assert choose_loader("auto", "cifar10", 50_000, 32, memory_gb=0.001) == choose_loader("memory", "cifar10", 1, 32)
    with pytest.raises(UserError, match="only folder: sources stream"):
        choose_loader("stream", "npz:/data", 10, 32)


# --- the workers' batches ---------------------------------------------------------------------------


def test_a_batch_holds_both_crops_of_the_full_image_of_each_sample(folder: Path) -> None:
    """Row r of a rank's batch is decode_views of file indices[r] with row first_row + r of the global uniforms."""
    index, _ = load_index(folder)
    batches = CropBatches(index, 32, CROPS, seed=3, batch_size=8)
    indices = torch.tensor([5, 0, 17, 33])
    batch = batches[(7, indices, 4)]  # the second half of a global batch of 8 (rank 1 of 2)
    u = batches.uniforms(7)
    assert u.shape == (8, 2, CROP_DRAWS)
    assert batch.views.shape == (2, 4, 3, 32, 32) and batch.views.dtype == torch.uint8
    for row, i in enumerate(indices.tolist()):
        expected = decode_views(read_image_bytes(index.path(i)), u[4 + row], CROPS, 32)
        assert torch.equal(batch.views[:, row], expected)
    assert batch.labels.tolist() == [int(index.labels[i]) for i in indices] and batch.skipped == []


def test_crops_depend_on_the_step_and_sample_not_on_the_workers(folder: Path) -> None:
    index, _ = load_index(folder)
    order = torch.randperm(len(index), generator=torch.Generator().manual_seed(0))

    def views(workers: int, first: int) -> dict[int, torch.Tensor]:
        feed = StreamFeed(index, size=32, crops=CROPS, seed=0, batch_size=8, steps_per_epoch=8, rows=slice(0, 8),
                          workers=workers, prefetch=2, device=torch.device("cpu"))
        try:
            return {b.step: b.views for b in feed.epoch(order, first, 6)}
        finally:
            feed.close()

    serial, parallel, resumed = views(0, 0), views(2, 0), views(2, 3)
    assert list(parallel) == list(range(6))
    for step in range(6):
        assert torch.equal(serial[step], parallel[step])
    for step in range(3, 6):
        assert torch.equal(resumed[step], serial[step])
    assert not torch.equal(serial[0], serial[1])


def test_the_sampler_gives_each_rank_its_rows_of_the_global_batch() -> None:
    order = torch.arange(40).flip(0)
    rank1 = StepSampler(batch_size=8, steps_per_epoch=5, rows=slice(4, 8))
    rank1.set_epoch(order, 1, 3)
    assert [(step, idx.tolist(), first) for step, idx, first in rank1] == [
        (1, [27, 26, 25, 24], 4), (2, [19, 18, 17, 16], 4)]


def test_an_unreadable_file_is_replaced_by_the_next_one_and_the_others_are_untouched(tmp_path: Path) -> None:
    root = write_folder(tmp_path / "photos", n=16)
    index, _ = load_index(root)
    batches = CropBatches(index, 32, CROPS, seed=0, batch_size=4)
    before = batches[(2, torch.tensor([3, 9, 12, 0]), 0)]
    Path(index.path(9)).write_bytes(b"not an image any more")  # truncated/corrupted after indexing
    os.remove(index.path(12))  # deleted after indexing
    after = batches[(2, torch.tensor([3, 9, 12, 0]), 0)]
    assert after.indices.tolist() == [3, 10, 13, 0]
    assert [path for path, _ in after.skipped] == [index.relpath(9), index.relpath(12)]
    assert torch.equal(after.views[:, 0], before.views[:, 0]) and torch.equal(after.views[:, 3], before.views[:, 3])
    row_of_10 = decode_views(read_image_bytes(index.path(10)), batches.uniforms(2)[1], CROPS, 32)
    assert torch.equal(after.views[:, 1], row_of_10)


# --- pretraining ------------------------------------------------------------------------------------


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def assert_same_checkpoints(a: Path, b: Path) -> None:
    x, y = load_checkpoint(a / CHECKPOINT_NAME), load_checkpoint(b / CHECKPOINT_NAME)
    for part in ("model", "support"):
        assert x[part].keys() == y[part].keys()
        for key in x[part]:
            assert torch.equal(x[part][key], y[part][key]), f"{part}.{key} differs"


@pytest.mark.slow
def test_resume_with_workers_equals_an_uninterrupted_run(tmp_path: Path, folder: Path) -> None:
    """4 steps of 16 per epoch: stop at 3 (mid-epoch), resume to 7 (across an epoch) with another worker count."""
    quiet = {"progress": False, "echo": lambda *a, **k: None}
    pretrain(tiny(tmp_path / "whole", folder, "train.max_steps=7", "data.workers=0", "train.epochs=2"), **quiet)
    pretrain(tiny(tmp_path / "parts", folder, "train.max_steps=3", "data.workers=2", "train.epochs=2"), **quiet)
    result = pretrain(tiny(tmp_path / "parts", folder, "train.max_steps=7", "data.workers=1", "train.epochs=2"),
                      **quiet)
    assert result.resumed_from == 3 and result.steps == 7
    assert_same_checkpoints(tmp_path / "whole", tmp_path / "parts")
    records = [r for r in read_metrics(tmp_path / "parts") if r["type"] == "train"]
    assert [r["step"] for r in records] == list(range(1, 8)) and records[-1]["unreadable_files"] == 0


@pytest.mark.slow
def test_a_changed_folder_is_refused_on_resume_unless_accepted(tmp_path: Path) -> None:
    data = write_folder(tmp_path / "photos", n=40)
    quiet = {"progress": False, "echo": lambda *a, **k: None}
    pretrain(tiny(tmp_path / "run", data, "train.max_steps=2", "train.epochs=2"), **quiet)
    write_folder(tmp_path / "extra", n=2)
    os.replace(tmp_path / "extra" / "class0" / "000.jpg", data / "class0" / "new.jpg")
    with pytest.raises(UserError, match=r"changed since this run started: 1 files? added \(e\.g\. class0/new\.jpg\)"):
        pretrain(tiny(tmp_path / "run", data, "train.max_steps=3", "train.epochs=2"), **quiet)
    said: list[str] = []
    result = pretrain(tiny(tmp_path / "run", data, "train.max_steps=3", "train.epochs=2"), progress=False,
                      echo=said.append, accept_data_changes=True)
    assert result.resumed_from == 2 and result.steps == 3
    assert any("going on with the changed folder" in line for line in said)


@pytest.mark.slow
def test_the_cli_streams_a_folder_and_names_an_unreadable_file(tmp_path: Path) -> None:
    """As a user runs it: one line says why it streams; a file broken mid-run is skipped, named and counted."""
    data = write_folder(tmp_path / "photos", n=40)
    (data / "class1" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    env = {**os.environ, "NNCLR_CACHE_DIR": str(tmp_path / "cache")}
    command = [sys.executable, "-m", "nnclr", "pretrain", "--no-progress", "--run-dir", str(tmp_path / "run"),
               "--set", *[o for o in TINY if not o.startswith("data.loader")], f"data.name=folder:{data}",
               "data.memory_gb=0.00001", "data.workers=1", "train.max_steps=3", "optim.batch_size=40"]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "data: streaming folder:" in done.stdout and "> 0 MiB, data.memory_gb" in done.stdout
    assert "Traceback" not in done.stderr
    assert "broken.jpg" in done.stderr and "skipped" in done.stderr
    records = [r for r in read_metrics(tmp_path / "run") if r["type"] == "train"]
    assert records[-1]["unreadable_files"] >= 1
    assert {r["path"] for r in read_metrics(tmp_path / "run") if r["type"] == "unreadable"} == {"class1/broken.jpg"}


def test_memory_use_of_the_lazy_images_is_one_slice(tmp_path: Path) -> None:
    data = write_folder(tmp_path / "photos", n=24)
    dataset = load_dataset(f"folder:{data}", image_size=32, lazy=True)
    assert dataset.images.shape == (24, 3, 32, 32) and not dataset.in_memory
    eager = load_dataset(f"folder:{data}", image_size=32)
    assert torch.equal(dataset.images[3:9], eager.images[3:9])
    assert torch.equal(dataset.images[torch.tensor([5, 1])], eager.images[[5, 1]])
    assert torch.equal(dataset.images.rows(8, 16)[2:4], eager.images[10:12])
    assert np.array_equal(dataset.labels.numpy(), eager.labels.numpy())


@pytest.mark.slow
def test_ctrl_c_to_the_process_group_stops_a_streaming_run_cleanly(tmp_path: Path) -> None:
    """A terminal's Ctrl-C reaches the loader workers too: the run still saves its checkpoint and exits 130."""
    data = write_folder(tmp_path / "photos", n=40)
    run_dir = tmp_path / "run"
    env = {**os.environ, "NNCLR_CACHE_DIR": str(tmp_path / "cache")}
    command = [sys.executable, "-m", "nnclr", "pretrain", "--no-progress", "--run-dir", str(run_dir),
               "--set", *TINY, f"data.name=folder:{data}", "data.workers=2", "train.epochs=200"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                               start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not (run_dir / "metrics.jsonl").is_file() or len(read_metrics(run_dir)) < 3:
            assert process.poll() is None and time.monotonic() < deadline, process.communicate()
            time.sleep(0.1)
        os.killpg(process.pid, signal.SIGINT)
        out, err = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 130, err
    assert "stopped by SIGINT" in out and "Traceback" not in err
    stopped = load_checkpoint(run_dir / CHECKPOINT_NAME)["step"]
    assert stopped >= 3


def test_a_file_whose_data_is_cut_after_a_readable_header_is_replaced_too(tmp_path: Path) -> None:
    root = write_folder(tmp_path / "photos", n=8)
    index, _ = load_index(root)
    batches = CropBatches(index, 32, CROPS, seed=0, batch_size=2)
    path = Path(index.path(2))  # a PNG
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # the header parses, half the pixels are gone
    assert probe_size(path.read_bytes()) == Image.open(path).size
    batch = batches[(0, torch.tensor([2, 1]), 0)]
    assert batch.indices.tolist() == [3, 1] and [p for p, _ in batch.skipped] == [index.relpath(2)]
    assert "truncated" in batch.skipped[0][1]
    expected = decode_views(read_image_bytes(index.path(3)), batches.uniforms(0)[0], CROPS, 32)
    assert torch.equal(batch.views[:, 0], expected)


@pytest.mark.parametrize("method", ["simclr", "kmclr", "deepcluster"])
def test_every_method_pretrains_on_a_streamed_folder(tmp_path: Path, folder: Path, method: str) -> None:
    """DeepCluster clusters the streamed folder's features (decoded in slices) before its first epoch."""
    extra = {"kmclr": ["method.num_prototypes=4"], "deepcluster": ["method.num_clusters=4"]}
    config = tiny(tmp_path, folder, f"method.name={method}", "train.max_steps=3", *extra.get(method, []))
    result = pretrain(config, progress=False, echo=lambda *a, **k: None)
    assert result.steps == 3
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records if r["type"] == "train"] == [1, 2, 3]
    assert all(np.isfinite(r["loss"]) for r in records if r["type"] == "train")
    if method == "deepcluster":
        assert [r["step"] for r in records if r["type"] == "clustering"] == [0]
    assert load_checkpoint(tmp_path / CHECKPOINT_NAME)["loader"] == "stream"


@pytest.mark.slow
def test_a_resumed_run_keeps_the_loader_it_started_with(tmp_path: Path, folder: Path) -> None:
    """data.loader=auto decides by a memory budget; resumed with another budget (or machine) it must not switch."""
    auto = ["data.loader=auto", "train.epochs=2"]
    pretrain(tiny(tmp_path / "whole", folder, *auto, "data.memory_gb=100", "train.max_steps=5"),
             progress=False, echo=lambda *a, **k: None)
    pretrain(tiny(tmp_path / "parts", folder, *auto, "data.memory_gb=100", "train.max_steps=2"),
             progress=False, echo=lambda *a, **k: None)
    said: list[str] = []
    result = pretrain(tiny(tmp_path / "parts", folder, *auto, "data.memory_gb=0.000001", "train.max_steps=5"),
                      progress=False, echo=said.append)
    assert result.resumed_from == 2
    assert any("data: streaming" in line for line in said)  # what auto would choose now
    assert any("resuming with the loader this run started with (memory)" in line for line in said)
    assert load_checkpoint(tmp_path / "parts" / CHECKPOINT_NAME)["loader"] == "memory"
    assert_same_checkpoints(tmp_path / "whole", tmp_path / "parts")


@pytest.mark.slow
def test_unreadable_files_are_logged_by_name_and_a_resumed_run_logs_the_same(tmp_path: Path) -> None:
    """Each replaced file is a metrics.jsonl record; stopped at 3 and resumed, the log equals an uninterrupted one."""
    data = write_folder(tmp_path / "photos", n=40)
    for name in ("broken.jpg", "empty.png"):
        (data / "class2" / name).write_bytes(b"\xff\xd8\xff\xe0 cut short" if name.endswith("jpg") else b"")
    quiet = {"progress": False, "echo": lambda *a, **k: None}
    settings = ["train.epochs=4", "train.log_every=3", "train.checkpoint_every=2", "data.workers=1"]
    pretrain(tiny(tmp_path / "whole", data, *settings, "train.max_steps=7"), **quiet)
    pretrain(tiny(tmp_path / "parts", data, *settings, "train.max_steps=3"), **quiet)
    pretrain(tiny(tmp_path / "parts", data, *settings, "train.max_steps=7"), **quiet)
    whole, parts = read_metrics(tmp_path / "whole"), read_metrics(tmp_path / "parts")
    named = [r for r in whole if r["type"] == "unreadable"]
    assert {r["path"] for r in named} == {"class2/broken.jpg", "class2/empty.png"}
    assert all(r["reason"] for r in named)
    last = [r for r in whole if r["type"] == "train"][-1]
    assert last["unreadable_files"] == len(named)
    assert [r for r in parts if r["type"] == "unreadable"] == named
    assert [r["unreadable_files"] for r in parts if r["type"] == "train"] == \
        [r["unreadable_files"] for r in whole if r["type"] == "train"]
