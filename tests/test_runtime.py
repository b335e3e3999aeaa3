"""Runtime defaults: threads = this process's physical cores, and the optional torch.compile of the network."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch

from nnclr import runtime
from nnclr.config import load_config
from nnclr.train import build_run, epoch_order, train_step


def _fake_sysfs(root: Path, cores_of_cpus: list[tuple[int, int]]) -> Path:
    """cpuN/topology with (package, core) per CPU N."""
    for cpu, (package, core) in enumerate(cores_of_cpus):
        topology = root / f"cpu{cpu}" / "topology"
        topology.mkdir(parents=True)
        (topology / "physical_package_id").write_text(f"{package}\n")
        (topology / "core_id").write_text(f"{core}\n")
    return root


@pytest.fixture
def four_cpus_two_cores(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """4 CPUs = 2 cores x 2 SMT siblings, all in the affinity mask, no cgroup limit."""
    monkeypatch.setattr(runtime, "SYSFS_CPU", _fake_sysfs(tmp_path / "cpu", [(0, 0), (0, 1), (0, 0), (0, 1)]))
    monkeypatch.setattr(runtime, "CGROUP", tmp_path / "cgroup")
    monkeypatch.setattr(runtime.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    return tmp_path


def test_physical_cores_count_smt_siblings_once(four_cpus_two_cores: Path) -> None:
    assert runtime.physical_cores() == 2


def test_physical_cores_follow_the_affinity_mask(four_cpus_two_cores: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runtime.os, "sched_getaffinity", lambda pid: {1, 3})  # two siblings of core 1
    assert runtime.physical_cores() == 1


@pytest.mark.parametrize(("files", "expected"), [
    ({"cpu.max": "150000 100000\n"}, 2),  # cgroup v2: 1.5 CPUs -> 2
    ({"cpu.max": "max 100000\n"}, 2),  # unlimited
    ({"cpu/cpu.cfs_quota_us": "100000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 1),  # v1: 1 CPU
    ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, 2),
])
def test_physical_cores_are_capped_by_a_cgroup_quota(four_cpus_two_cores: Path, files: dict, expected: int) -> None:
    for name, text in files.items():
        (four_cpus_two_cores / "cgroup" / name).parent.mkdir(parents=True, exist_ok=True)
        (four_cpus_two_cores / "cgroup" / name).write_text(text)
    assert runtime.physical_cores() == expected


def test_default_threads_share_the_cores_among_local_processes(
    four_cpus_two_cores: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert runtime.default_threads() == 2
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert runtime.default_threads() == 1
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert runtime.default_threads() == 1


def test_omp_num_threads_is_the_default(four_cpus_two_cores: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert runtime.default_threads() == 1  # more cases in test_validation.py


def test_set_threads_zero_uses_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    before = torch.get_num_threads()
    monkeypatch.setattr(runtime, "default_threads", lambda: 1)
    try:
        runtime.set_threads(0)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def _two_losses(overrides: list[str]) -> list[float]:
    config = load_config(None, [
        "model.proj_hidden_dim=64", "model.proj_dim=32", "model.pred_hidden_dim=64", "optim.batch_size=32",
        "method.support_size=64", "data.test_split=", "train.precision=fp32", "train.threads=1", *overrides,
    ])
    run = build_run(config)
    order = epoch_order(run, 0)
    return [train_step(run, step, order)[0] for step in range(2)]


@pytest.mark.slow
def test_train_compile_runs_the_compiled_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """train.compile=true trains through torch.compile and gives eager's losses (dynamo traced, compiled to
    eager kernels here: inductor's C++ code generation would take a minute)."""
    compiled = []
    real_compile = torch.compile

    def recording_compile(model: torch.nn.Module, **kwargs: object) -> torch.nn.Module:
        compiled.append(model)
        return functools.partial(real_compile, backend="eager")(model, **kwargs)

    before = torch.get_num_threads()
    try:
        eager = _two_losses([])
        monkeypatch.setattr(torch, "compile", recording_compile)
        assert not compiled
        with_compile = _two_losses(["train.compile=true"])
    finally:
        torch.set_num_threads(before)
    assert len(compiled) == 1
    assert with_compile == pytest.approx(eager, rel=1e-4)
