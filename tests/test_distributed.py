"""Two processes on the CPU (gloo), started the way torchrun starts them, give one process's results.

One ``torch.multiprocessing.spawn`` of two ranks (module fixture) runs every distributed scenario
and saves what each rank saw; the tests compare that with a single process on the whole global
batch. The end-to-end tests run `torchrun ... -m nnclr pretrain` for real (single machine, and two c10d "nodes").

The equivalence runs keep the network in float64 (``float64_network``): the backbone gradient of
a freshly initialised small CNN amplifies rounding enormously (measured: the same single-process
step in float32 and float64 gives gradients 3.5% apart, as does scaling the input by 1 + 1e-7),
so float32 could not tell a bug from rounding. Losses, support set and k-means stay float32.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image
from tiny import SMALLER_HEADS, demo_npz

from nnclr import distributed, train
from nnclr.augment import BatchAugment, eval_transform
from nnclr.checkpoint import CHECKPOINT_NAME, load_checkpoint
from nnclr.config import load_config
from nnclr.data import load_dataset
from nnclr.evaluate import features
from nnclr.methods import METHODS as REGISTRY
from nnclr.model import build_model
from nnclr.rundir import NoLog
from nnclr.train import build_run, pretrain, train_step

METHODS = (*REGISTRY, "nnclr-topk")  # every registered method, and top-k sampling of a neighbour
STEPS = 4
GLOBAL_BATCH = 16
# support_size 40 is no multiple of the global batch 16: by step 3 the ring has wrapped mid-batch.
TINY = [
    *SMALLER_HEADS, f"optim.batch_size={GLOBAL_BATCH}", "optim.warmup_epochs=0", "optim.name=sgd", "train.epochs=1",
    "method.support_size=40", "method.num_prototypes=4",
    "data.test_split=", "train.threads=1", "train.precision=fp32", "train.log_every=1",
]


def tiny(*overrides: str):
    return load_config(None, [*TINY, *overrides])


@pytest.fixture(scope="module")
def small_data(tmp_path_factory: pytest.TempPathFactory) -> str:
    """97 demo images for DeepCluster to cluster (odd: the two ranks' shards of the features differ in size)."""
    return demo_npz(tmp_path_factory.mktemp("small"), {"train": 97}, classes=False)


def method_config(method: str, data: str):
    """The tiny config of a method with global batch-norm everywhere, so that 2 x B equals 1 x 2B."""
    if method == "nnclr-topk":
        return tiny("method.name=nnclr", "method.topk=3", "model.sync_bn=all")
    extra = [f"data.name={data}", "method.num_clusters=8"] if REGISTRY[method].diagnostics == "clustering" else []
    return tiny(f"method.name={method}", "model.sync_bn=all", *extra)


class Float64Views(BatchAugment):
    def apply_params(self, images: torch.Tensor, params: list) -> list[torch.Tensor]:
        return [view.double() for view in super().apply_params(images, params)]

    def apply_to_crops(self, crops: torch.Tensor, params: list) -> list[torch.Tensor]:
        return [view.double() for view in super().apply_to_crops(crops, params)]


@contextmanager
def float64_network() -> Iterator[None]:
    """build_run makes a float64 model and float64 views (see the module docstring)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train, "build_model", lambda *a, **k: build_model(*a, **k).double())
        patch.setattr(train, "BatchAugment", Float64Views)
        patch.setattr(features, "eval_transform", lambda *a, **k: eval_transform(*a, **k).double())
        yield


def run_steps(config) -> dict:
    """Build a run and take STEPS steps by hand; the losses, last gradients, support, parameters.

    The selector's epoch hook runs first (DeepCluster clusters the training set and draws its epoch order from
    the pseudo-labels).
    """
    run = build_run(config)
    train.start_epoch(run, 0, 0, NoLog())
    order = train.epoch_order(run, 0)
    read: list[list[int]] = []  # the streaming loader's samples of each step, this rank's
    if run.feed is not None:
        batches = run.feed.epoch(order, 0, STEPS)
        losses = []
        for step in range(STEPS):
            streamed = next(batches)
            read.append(streamed.indices.tolist())
            losses.append(train_step(run, step, order, streamed)[0])
        run.feed.close()
    else:
        losses = [train_step(run, step, order)[0] for step in range(STEPS)]
    return {
        "read": read,
        "losses": losses,
        "grads": {n: p.grad.clone() for n, p in run.model.named_parameters() if p.grad is not None},
        "params": {n: p.detach().clone() for n, p in run.model.named_parameters()},
        "support": {k: v.clone() for k, v in run.support.state_dict().items()} if run.support is not None else {},
        "selector": {k: v.clone() for k, v in run.selector.state_dict().items()},
        "local_batch": run.config.optim.batch_size // distributed.world_size(),
        "order": order,
    }


def stream_config(folder: Path):
    """NNCLR on a folder of non-square images, streamed by one loader worker per process."""
    return tiny("model.sync_bn=all", f"data.name=folder:{folder}", "data.loader=stream", "data.workers=1",
                "data.image_size=24")


def worker(rank: int, world: int, port: int, out: Path, data: str, folder: Path) -> None:
    """One rank: torchrun's environment variables, a gloo group, every scenario; saves its results."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank), NNCLR_CACHE_DIR=str(out / "cache"))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    results: dict = {"rank": rank}
    with float64_network():
        for method in METHODS:
            results[method] = run_steps(method_config(method, data))
        results["stream"] = run_steps(stream_config(folder))
    results["heads_only"] = run_steps(tiny("model.sync_bn=heads"))  # the default
    n = 7  # not a multiple of the world size
    part = distributed.shard(n)
    results["shard"] = (part.start, part.stop)
    results["gathered"] = distributed.gather_in_order(torch.arange(part.start, part.stop) * 10, n)
    # Stop after 3 steps and resume to 6 (what a kill between checkpoints leaves), vs 6 in one go.
    quiet = {"progress": False, "echo": lambda *a, **k: None}
    pretrain(tiny("train.run_dir=" + str(out / "parts"), "train.max_steps=3"), **quiet)
    resumed = pretrain(tiny("train.run_dir=" + str(out / "parts"), "train.max_steps=6"), **quiet)
    pretrain(tiny("train.run_dir=" + str(out / "whole"), "train.max_steps=6"), **quiet)
    results["resumed_from"] = resumed.resumed_from
    torch.save(results, out / f"rank{rank}.pt")
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """48 demo images upscaled to non-square sizes, PNG, in 3 class folders."""
    root = tmp_path_factory.mktemp("photos")
    demo = load_dataset("demo", "train")
    for i in range(48):
        (root / f"c{i % 3}").mkdir(exist_ok=True)
        image = Image.fromarray(demo.images[i].permute(1, 2, 0).numpy())
        image.resize(((40, 30), (30, 44), (36, 36))[i % 3]).save(root / f"c{i % 3}" / f"{i:02d}.png")
    return root


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory, small_data: str, folder: Path) -> list[dict]:
    out = tmp_path_factory.mktemp("ddp")
    mp.spawn(worker, args=(2, free_port(), out, small_data, folder), nprocs=2, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)] + [{"out": out}]


@pytest.fixture(scope="module")
def single(small_data: str, folder: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The same scenarios in this one process, on the whole global batch."""
    threads = torch.get_num_threads()
    try:
        with float64_network(), pytest.MonkeyPatch.context() as patch:
            patch.setenv("NNCLR_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
            results = {method: run_steps(method_config(method, small_data)) for method in METHODS}
            results["stream"] = run_steps(stream_config(folder))
            return results
    finally:
        torch.set_num_threads(threads)


def assert_close_dicts(a: dict, b: dict, what: str, **tolerance: float) -> None:
    assert a.keys() == b.keys(), what
    for key in a:
        torch.testing.assert_close(a[key], b[key], msg=lambda m, key=key: f"{what} {key}: {m}", **tolerance)


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_two_processes_of_b_equal_one_process_of_2b(ranks: list[dict], single: dict, method: str) -> None:
    one = single[method]
    for r in range(2):
        two = ranks[r][method]
        assert two["local_batch"] == GLOBAL_BATCH // 2 and one["local_batch"] == GLOBAL_BATCH
        # The logged loss is the global batch's: not lower (or higher) than one process's.
        torch.testing.assert_close(torch.tensor(two["losses"]), torch.tensor(one["losses"]), rtol=1e-5, atol=1e-5)
        assert_close_dicts(two["grads"], one["grads"], f"{method} rank {r} gradient", rtol=1e-3, atol=1e-5)
        assert_close_dicts(two["params"], one["params"], f"{method} rank {r} parameter", rtol=1e-4, atol=1e-5)
        assert_close_dicts(two["support"], one["support"], f"{method} rank {r} support set", rtol=1e-4, atol=1e-5)
        assert_close_dicts(two["selector"], one["selector"], f"{method} rank {r} selector", rtol=1e-4, atol=1e-4)
    # Every rank clustered the same pseudo-labels as one process and drew the same epoch order from them.
    torch.testing.assert_close(two["order"], one["order"], rtol=0, atol=0)
    # Wrapped: 4 steps x 16 = 64 rows written into 40, the write pointer is at 64 mod 40.
    if method in ("nnclr", "nnclr-topk"):
        assert int(one["support"]["ptr"]) == (STEPS * GLOBAL_BATCH) % 40 and int(one["support"]["num_filled"]) == 40


@pytest.mark.slow
def test_streaming_ranks_read_only_their_rows_and_equal_one_process(ranks: list[dict], single: dict) -> None:
    """Each rank's loader read its half of every global batch; the two halves are one process's batch."""
    one = single["stream"]
    local = GLOBAL_BATCH // 2
    for step in range(STEPS):
        assert ranks[0]["stream"]["read"][step] == one["read"][step][:local]
        assert ranks[1]["stream"]["read"][step] == one["read"][step][local:]
    for r in range(2):
        two = ranks[r]["stream"]
        torch.testing.assert_close(torch.tensor(two["losses"]), torch.tensor(one["losses"]), rtol=1e-5, atol=1e-5)
        assert_close_dicts(two["params"], one["params"], f"stream rank {r} parameter", rtol=1e-4, atol=1e-5)
        assert_close_dicts(two["support"], one["support"], f"stream rank {r} support set", rtol=1e-4, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("scenario", ["nnclr", "nnclr-topk", "heads_only"])
def test_every_rank_holds_the_same_support_set(ranks: list[dict], scenario: str) -> None:
    a, b = ranks[0][scenario]["support"], ranks[1][scenario]["support"]
    assert int(a["num_filled"]) == 40 and int(a["ptr"]) == (STEPS * GLOBAL_BATCH) % 40  # wrapped
    for key in a:
        assert torch.equal(a[key], b[key]), f"support {key} differs between ranks"
    # every sample written by the last step (both ranks' halves) is in it exactly once
    last = a["indices"][a["steps"] == STEPS - 1]
    assert last.numel() == GLOBAL_BATCH and last.unique().numel() == GLOBAL_BATCH
    for key in ranks[0][scenario]["params"]:  # DDP keeps the replicas identical
        assert torch.equal(ranks[0][scenario]["params"][key], ranks[1][scenario]["params"][key]), key


@pytest.mark.slow
def test_resume_under_two_processes_continues_exactly(ranks: list[dict]) -> None:
    out = ranks[2]["out"]
    assert ranks[0]["resumed_from"] == 3
    whole, parts = load_checkpoint(out / "whole" / CHECKPOINT_NAME), load_checkpoint(out / "parts" / CHECKPOINT_NAME)
    assert whole["step"] == parts["step"] == 6
    for part in ("model", "support", "selector"):
        for key in whole[part]:
            assert torch.equal(whole[part][key], parts[part][key]), f"{part}.{key} differs after resume"
    lines = (out / "parts" / "metrics.jsonl").read_text().splitlines()
    assert [int(line.split('"step": ')[1].split(",")[0]) for line in lines] == [1, 2, 3, 4, 5, 6]


@pytest.mark.slow
def test_shard_and_gather_in_order_return_each_sample_once(ranks: list[dict]) -> None:
    assert [ranks[r]["shard"] for r in range(2)] == [(0, 3), (3, 7)]
    for r in range(2):
        assert ranks[r]["gathered"].tolist() == [10 * i for i in range(7)]


def test_shard_and_gather_in_one_process() -> None:
    assert distributed.shard(5) == range(5)
    x = torch.randn(5, 3)
    assert torch.equal(distributed.gather_in_order(x, 5), x)
    with pytest.raises(ValueError, match="holds 4 rows"):
        distributed.gather_in_order(x[:4], 5)


@pytest.mark.slow
def test_batch_not_divisible_by_processes_is_a_user_error(ranks: list[dict]) -> None:
    """Under torchrun with 2 processes, an odd global batch fails on every rank with one message."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port", str(free_port()),
               "-m", "nnclr", "pretrain", "--no-progress", "--run-dir", str(ranks[2]["out"] / "odd"),
               "--set", *TINY, "optim.batch_size=15", "train.max_steps=1"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode != 0
    assert "optim.batch_size=15 is the global batch and must be divisible by the 2 processes" in result.stderr
    # torchrun itself prints a traceback of its own (ChildFailedError); none may come from nnclr
    assert not re.search(r'File "[^"]*[/\\]nnclr[/\\]', result.stderr), result.stderr
    assert result.stderr.count("nnclr: error: optim.batch_size=15") == 1  # rank 0; rank 1 is named


@pytest.mark.slow
def test_torchrun_kill_and_rerun_continues_exactly(ranks: list[dict], tmp_path: Path) -> None:
    """The real launcher: kill -9 the whole torchrun job mid-run, rerun the same command, compare."""
    run_dir = tmp_path / "run"
    command = [*torchrun(), "--nproc_per_node=2", "--master_port", str(free_port()),
               "-m", "nnclr", "pretrain", "--no-progress", "--run-dir", str(run_dir),
               "--set", *TINY, "train.max_steps=6", "train.checkpoint_every=1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    job = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, start_new_session=True)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and job.poll() is None:
        path = run_dir / CHECKPOINT_NAME
        if path.is_file() and load_checkpoint(path)["step"] >= 2:
            break
        time.sleep(0.2)
    killed = job.poll() is None
    if killed:
        os.killpg(job.pid, signal.SIGKILL)
    job.communicate()
    again = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert again.returncode == 0, again.stderr
    if killed:
        assert "resuming" in again.stdout
    assert again.stdout.count("run directory:") >= 1
    final = load_checkpoint(run_dir / CHECKPOINT_NAME)
    whole = load_checkpoint(ranks[2]["out"] / "whole" / CHECKPOINT_NAME)  # 6 uninterrupted steps, 2 ranks
    assert final["step"] == 6
    for part in ("model", "support"):
        for key in whole[part]:
            assert torch.equal(final[part][key], whole[part][key]), f"{part}.{key} differs after kill and rerun"


def torchrun() -> list[str]:
    """The ``torchrun`` console script of this interpreter's environment (as users type it)."""
    script = Path(sys.executable).with_name("torchrun")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "torch.distributed.run"]


@pytest.mark.slow
def test_two_nodes_with_c10d_rendezvous_equal_two_local_processes(ranks: list[dict], tmp_path: Path) -> None:
    """The multi-machine command of docs/running.md, as two 1-process "nodes" here, gives the 2-process run."""
    run_dir = tmp_path / "nodes"
    endpoint = f"127.0.0.1:{free_port()}"
    command = [*torchrun(), "--nnodes=2", "--nproc_per_node=1", "--rdzv-backend=c10d",
               f"--rdzv-endpoint={endpoint}", "--rdzv-id=nnclr-test",
               "-m", "nnclr", "pretrain", "--no-progress", "--run-dir", str(run_dir),
               "--set", *TINY, "train.max_steps=6"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    nodes = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for _ in range(2)]
    outputs = [node.communicate(timeout=300) for node in nodes]
    for node, (_, stderr) in zip(nodes, outputs):
        assert node.returncode == 0, stderr
    assert sum(out.count("run directory:") for out, _ in outputs) == 1  # rank 0 alone speaks
    final = load_checkpoint(run_dir / CHECKPOINT_NAME)
    whole = load_checkpoint(ranks[2]["out"] / "whole" / CHECKPOINT_NAME)
    for part in ("model", "support"):
        for key in whole[part]:
            assert torch.equal(final[part][key], whole[part][key]), f"{part}.{key} differs between launchers"
