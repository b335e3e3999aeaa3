"""Values of the right type that would then crash, hang or give garbage are refused where they enter (issue 23,
item 11): with one line naming the key or flag the user typed and what would work.

Floats must be finite; ints lie in ranges that make sense; what only this machine bounds (its memory, its CPUs,
a C++ compiler for ``train.compile``, CUDA) is checked against this machine, and the message says what the
setting would need and what there is.
"""

from __future__ import annotations

import argparse
import subprocess
from pathlib import Path

import pytest
import torch
from use_helpers import assert_user_error, make_checkpoint, run_main

from nnclr import machine, runtime
from nnclr.config import Config, flatten, load_config, to_dict
from nnclr.errors import UserError

DEFAULTS = flatten(to_dict(Config()))
FLOAT_KEYS = sorted(k for k, v in DEFAULTS.items() if isinstance(v, float))
CPUS = len(machine.usable_cpus())


def refused(*overrides: str, needles: tuple[str, ...] = ()) -> str:
    """The one-line UserError of ``load_config`` with ``overrides``; it contains every needle."""
    with pytest.raises(UserError) as error:
        load_config(None, list(overrides))
    message = str(error.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, message
    return message


def _cli(capsys: pytest.CaptureFixture, *args: str) -> subprocess.CompletedProcess:
    try:
        return run_main(capsys, *args)
    except SystemExit as exit_:
        captured = capsys.readouterr()
        return subprocess.CompletedProcess(["nnclr", *args], exit_.code, captured.out, captured.err)


# ---------------------------------------------------------------------------- floats


@pytest.mark.parametrize("key", FLOAT_KEYS)
@pytest.mark.parametrize("value", ["nan", ".nan", "inf", "-inf", ".inf", "1e999", "1e300"])
def test_every_float_key_must_be_a_finite_float32(key: str, value: str) -> None:
    """NaN passed every ``<= 0`` check (``train.epochs=.nan`` was a traceback, ``train.knn_temperature=.nan`` a
    silent 15% kNN); 1e300 overflows the float32 tensors the values end up in."""
    refused(f"{key}={value}", needles=(key, "finite"))


def test_a_recipe_with_nan_is_refused_too(tmp_path: Path) -> None:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("train:\n  knn_temperature: .nan\n")
    with pytest.raises(UserError, match=r"train\.knn_temperature.*finite"):
        load_config(recipe)


@pytest.mark.parametrize("key", ["train.epochs", "optim.warmup_epochs", "train.knn_every_epochs",
                                 "method.kmeans_reset_epochs"])
def test_epoch_counts_have_a_cap(key: str) -> None:
    """The schedule is precomputed per step: 1e30 epochs would allocate it for ever."""
    refused(f"{key}=1e30", needles=(key, "10000"))
    section, name = key.split(".")
    assert getattr(getattr(load_config(None, [f"{key}=10000"]), section), name) == 10000


# ---------------------------------------------------------------------------- ints


@pytest.mark.parametrize("value", ["18446744073709551616", "-1", str(10**30)])
def test_the_seed_is_what_torch_and_numpy_accept(value: str) -> None:
    refused(f"train.seed={value}", needles=("train.seed", "18446744073709551615"))


def test_the_largest_seed_runs() -> None:
    from nnclr.seeding import ORDER, derive_seed

    seed = load_config(None, ["train.seed=18446744073709551615"]).train.seed
    assert seed == 2**64 - 1
    assert torch.Generator().manual_seed(seed).initial_seed() == seed
    assert 0 <= torch.Generator().manual_seed(derive_seed(seed, ORDER, 0)).initial_seed() < 2**64


def test_projection_layers_have_a_cap() -> None:
    """10,000 layers of 64 fit in memory and then trained silently for minutes."""
    refused("model.proj_layers=10000", "model.proj_hidden_dim=64", needles=("model.proj_layers", "at most 8"))
    assert load_config(None, ["model.proj_layers=8", "model.proj_hidden_dim=64"]).model.proj_layers == 8


@pytest.mark.parametrize(("backbone", "cifar_stem", "smallest"), [
    ("small_cnn", "true", 8), ("small_cnn", "false", 8), ("resnet18", "true", 8), ("resnet18", "false", 32),
    ("resnet50", "true", 8), ("resnet50", "false", 32),
])
def test_images_smaller_than_the_backbone_takes_are_refused(backbone: str, cifar_stem: str, smallest: int) -> None:
    base = [f"model.backbone={backbone}", f"model.cifar_stem={cifar_stem}"]
    for size in (1, 2, 4, smallest - 1):
        refused(*base, f"data.image_size={size}", needles=("data.image_size", backbone, f">= {smallest}"))
    assert load_config(None, [*base, f"data.image_size={smallest}"]).data.image_size == smallest


def test_resnets_without_the_cifar_stem_advise_it() -> None:
    refused("model.backbone=resnet18", "model.cifar_stem=false", "data.image_size=16",
            needles=("model.cifar_stem=true",))


@pytest.mark.slow  # builds every backbone
def test_every_registered_backbone_has_a_smallest_size_and_trains_at_it() -> None:
    """The sizes of :func:`smallest_image_size` are the backbones' total stride (the last stage sees 1x1): a train-mode
    forward and backward pass works there; smaller sizes crashed (small_cnn) or gave non-finite gradients under bf16
    (ResNets at 1-4 px with the CIFAR stem, below 32 without it)."""
    from nnclr.backbones import BACKBONES
    from nnclr.config import smallest_image_size

    for name, build in BACKBONES.items():
        for cifar_stem in (True, False):
            smallest = smallest_image_size(name, cifar_stem)
            assert smallest is not None, f"{name}: add its smallest image size to nnclr.config.smallest_image_size"
            network = build(cifar_stem=cifar_stem).train()
            network(torch.randn(2, 3, smallest[0], smallest[0])).sum().backward()


# ---------------------------------------------------------------------------- memory


@pytest.mark.parametrize(("overrides", "key"), [
    (["method.support_size=1000000000"], "method.support_size"),
    (["model.proj_hidden_dim=100000000"], "model.proj_hidden_dim"),
    (["model.pred_hidden_dim=100000000000"], "model.pred_hidden_dim"),
    (["data.image_size=100000"], "data.image_size"),
    (["optim.batch_size=100000000"], "optim.batch_size"),
    (["method.name=kmclr", "method.num_prototypes=10000000000"], "method.num_prototypes"),
])
def test_what_cannot_fit_in_this_machines_memory_is_refused(overrides: list[str], key: str) -> None:
    """These were allocation tracebacks (or an attempt to allocate terabytes)."""
    have = f"{machine.total_memory() / 2**30:.1f} GiB"
    message = refused(*overrides, needles=(key, "needs at least", "GiB", have))
    assert message.index(key) > message.index("needs at least")  # the advice names the key to lower


def test_the_memory_bound_is_this_machines(monkeypatch: pytest.MonkeyPatch) -> None:
    overrides = ["method.support_size=1000000", "model.proj_dim=256"]  # 0.95 GiB of support set
    assert load_config(None, overrides).method.support_size == 1_000_000
    monkeypatch.setattr(machine, "total_memory", lambda: 2**29)
    refused(*overrides, needles=("needs at least 1.1 GiB", "the support set 1.0 GiB", "this machine has 0.5 GiB",
                                 "lower method.support_size"))
    assert load_config(None, [*overrides, "method.name=simclr"]).method.name == "simclr"  # no support set
    monkeypatch.setattr(machine, "total_memory", lambda: 0)  # unknown: not checked
    assert load_config(None, overrides).method.support_size == 1_000_000


def test_the_prior_space_of_the_training_images_is_held_to_memory(
    monkeypatch: pytest.MonkeyPatch, tiny_run: tuple[str, ...], tiny_data: Path, tmp_path: Path
) -> None:
    """method.prior holds a vector per training image (and its extraction a second copy): 2.9 GB for ImageNet at
    pixels. The config alone does not know the images' count, so the run checks again once the data is loaded."""
    from nnclr import train
    from nnclr.config import memory_needed
    from nnclr.prior import PIXELS_DIM

    config = load_config(None, ["method.prior=pixels"])
    parts = {what: size for size, what, _ in memory_needed(config, num_samples=1_281_167)}
    assert parts["the prior space"] == 2 * 1_281_167 * PIXELS_DIM * 4
    for prior in ("initial", "current"):  # z of every image
        z_prior = load_config(None, [f"method.prior={prior}", "model.proj_dim=64"])
        assert {w: s for s, w, _ in memory_needed(z_prior, num_samples=1000)}["the prior space"] == 2 * 1000 * 64 * 4
    assert "the prior space" not in {w for _, w, _ in memory_needed(config)}  # the count is not known yet
    settings = [*tiny_run, f"data.name=npz:{tiny_data}", "data.image_size=16", "data.test_split=",
                "method.support_size=100", "train.threads=1", f"train.run_dir={tmp_path}", "method.prior=pixels"]
    config = load_config(None, settings)  # fits: the check before the data knows no prior
    others = sum(size for size, _, _ in memory_needed(config))
    monkeypatch.setattr(machine, "total_memory", lambda: others + 256 * PIXELS_DIM * 4)  # half the prior's need
    with pytest.raises(UserError) as error:
        train.build_run(config)
    message = str(error.value)
    assert "the prior space" in message and "set method.prior=none" in message and "\n" not in message
    assert train.build_run(load_config(None, [*settings[:-1], "method.prior=none"])).selector.prior is None


# ---------------------------------------------------------------------------- threads, devices, compile


def test_threads_at_most_the_cpus_this_process_may_use() -> None:
    """train.threads=999 took 200 s for 2 steps on 2 CPUs."""
    refused("train.threads=999", needles=("train.threads=999", f"{CPUS} CPUs", "train.threads=0"))
    refused(f"train.threads={CPUS + 1}", needles=("train.threads",))
    assert load_config(None, [f"train.threads={CPUS}"]).train.threads == CPUS


def test_loader_workers_at_most_eight_or_the_cpus() -> None:
    """A recipe for a GPU machine may ask for 8 (configs/imagenet_nnclr_paper.yaml); 100,000 processes never ran."""
    most = max(8, CPUS)
    refused("data.workers=100000", needles=("data.workers", f"{CPUS} CPUs"))
    refused(f"data.workers={most + 1}", needles=("data.workers",))
    assert load_config(None, [f"data.workers={most}"]).data.workers == most





@pytest.fixture
def four_cpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runtime, "usable_cpus", lambda: [0, 1, 2, 3])
    monkeypatch.setattr(runtime, "physical_cores", lambda: 2)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_omp_num_threads_is_the_default_and_an_explicit_setting_wins(
    four_cpus: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What docs/configuration.md and docs/running.md say: train.threads > 0 wins; 0 takes OMP_NUM_THREADS when
    set (torchrun sets 1), else one thread per physical core; never more than the CPUs this process may use."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert runtime.default_threads() == 2
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert runtime.default_threads() == 3
    runtime.set_threads(1)
    assert torch.get_num_threads() == 1  # the explicit setting wins over OMP_NUM_THREADS
    runtime.set_threads(0)
    assert torch.get_num_threads() == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "999")
    assert runtime.default_threads() == 4  # capped at the CPUs this process may use
    monkeypatch.setenv("OMP_NUM_THREADS", "banana")
    assert runtime.default_threads() == 2  # not a number: as if unset (torch ignores it too)


@pytest.mark.parametrize("device", ["meta", "mps", "banana", "cuda:x", "cuda:-1", "xla", "cpu cuda", ""])
def test_devices_nnclr_cannot_run_on_are_refused(device: str) -> None:
    refused(f"train.device={device}", needles=("train.device", "auto, cpu, cuda or cuda:N"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("device", ["cuda", "cuda:0", "cuda:7"])
def test_cuda_without_cuda_is_refused_when_the_config_is_read(device: str) -> None:
    refused(f"train.device={device}", needles=(f"train.device={device}", "CUDA is not available", "train.device=cpu"))


def test_compile_without_a_cpp_compiler_is_one_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """torch.compile's inductor builds C++ kernels on the CPU: without a compiler it failed in a 101-line error."""
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-g++"))
    refused("train.compile=true", "train.device=cpu",
            needles=("train.compile=true", "C++ compiler", "no-such-g++", "CXX", "train.compile=false"))
    assert load_config(None, ["train.compile=false"]).train.compile is False
    monkeypatch.delenv("CXX")
    monkeypatch.setenv("PATH", str(tmp_path))  # no g++ on the PATH
    refused("train.compile=true", "train.device=cpu", needles=("train.compile=true", "g++"))


# ---------------------------------------------------------------------------- the commands' flags


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("run") / "checkpoint.pt")


@pytest.mark.parametrize("device", ["banana", "meta", "mps"])
def test_device_flags_name_the_flag(capsys: pytest.CaptureFixture, checkpoint: Path, tmp_path: Path,
                                    device: str) -> None:
    """``nnclr eval --device banana`` was reported as ``train.device``."""
    for args in (["eval", "knn", "--checkpoint", str(checkpoint)],
                 ["embed", "--checkpoint", str(checkpoint), "--images", "demo", "--out", str(tmp_path / "e")],
                 ["search", "--embeddings", str(tmp_path), str(tmp_path)]):
        result = _cli(capsys, *args, "--device", device)
        assert_user_error(result, "--device", device, "auto, cpu, cuda or cuda:N")
        assert "train.device" not in result.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_eval_on_cuda_without_cuda_names_the_flag(capsys: pytest.CaptureFixture, checkpoint: Path) -> None:
    result = _cli(capsys, "eval", "knn", "--checkpoint", str(checkpoint), "--device", "cuda")
    assert_user_error(result, "--device cuda", "CUDA is not available", "--device cpu")


@pytest.mark.parametrize("value", ["99999999999", str(CPUS + 1), "-1"])
def test_eval_threads_at_most_the_cpus(capsys: pytest.CaptureFixture, checkpoint: Path, value: str) -> None:
    """``nnclr eval --threads 99999999999`` was an overflow traceback."""
    result = _cli(capsys, "eval", "knn", "--checkpoint", str(checkpoint), "--threads", value)
    assert_user_error(result, "--threads", value)


@pytest.mark.parametrize(("value", "needle"), [("18446744073709551616", "at most 18446744073709551615"),
                                               ("-1", ">= 0")])
def test_eval_seed_is_what_torch_accepts(capsys: pytest.CaptureFixture, checkpoint: Path, value: str,
                                         needle: str) -> None:
    result = _cli(capsys, "eval", "knn", "--checkpoint", str(checkpoint), "--seed", value)
    assert_user_error(result, "--seed", needle)


@pytest.mark.parametrize(("flag", "value"), [("--temperature", "inf"), ("--temperature", "nan"),
                                             ("--temperature", "1e300"), ("--lr", "inf"), ("--lr", "1e300")])
def test_eval_floats_are_finite(capsys: pytest.CaptureFixture, checkpoint: Path, flag: str, value: str) -> None:
    protocol = "knn" if flag == "--temperature" else "linear"
    result = _cli(capsys, "eval", protocol, "--checkpoint", str(checkpoint), flag, value)
    assert_user_error(result, flag, "finite")


@pytest.mark.parametrize("args", [["linear", "--mode", "paper"], ["all", "--mode", "paper"]])
def test_eval_paper_linear_needs_two_images_per_batch(capsys: pytest.CaptureFixture, checkpoint: Path,
                                                       args: list[str]) -> None:
    """Its head starts with batch-norm in training mode: --batch-size 1 was a ValueError traceback."""
    result = _cli(capsys, "eval", *args, "--checkpoint", str(checkpoint), "--batch-size", "1")
    assert_user_error(result, "--batch-size", "batch-norm", "--batch-size 2")


def test_eval_flag_types_are_argparse_types() -> None:
    """The bounded flags stay argparse types: the error names the flag before anything is loaded."""
    from nnclr.cli import build_parser

    eval_parser = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices["eval"]
    knn = next(a for a in eval_parser._actions if isinstance(a, argparse._SubParsersAction)).choices["knn"]
    flags = {o: a for a in knn._actions for o in a.option_strings}
    for flag in ("--threads", "--seed", "--device", "--temperature"):
        assert callable(flags[flag].type), flag


# ---------------------------------------------------------------------------- --run-dir


def test_run_dir_is_taken_verbatim(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture,
                                   tmp_path: Path) -> None:
    """``--run-dir "runs/exp #2"`` became runs/exp (YAML comment), and with --fresh deleted an unrelated run."""
    import nnclr.train

    seen = []

    def pretrain(config: Config, **kwargs: object) -> None:
        seen.append(config.train.run_dir)
        raise UserError("stop here")

    monkeypatch.setattr(nnclr.train, "pretrain", pretrain)
    monkeypatch.chdir(tmp_path)  # the command locks the run directory before it trains: keep them out of the checkout
    for run_dir in ("runs/exp #2", "runs/exp ", "2024", "yes", "null", "'quoted'"):
        result = _cli(capsys, "pretrain", "--run-dir", run_dir, "--fresh", "--set", "train.report=false")
        assert result.returncode == 2 and seen[-1] == run_dir
    _cli(capsys, "pretrain", "--run-dir", "flag", "--set", "train.run_dir=key")
    assert seen[-1] == "flag"  # the flag wins over --set train.run_dir


# ---------------------------------------------------------------------------- --config files


@pytest.mark.parametrize(("content", "needle"), [
    (b"optim:\n  lr: 0.5 \xff\xfe\n", "UTF-8"),
    (b"[" * 10000 + b"]" * 10000, "nested"),
    (b"a: " + b"{b: " * 5000 + b"1" + b"}" * 5000, "nested"),
    (b"optim:\n  lr: " + b"[" * 900 + b"]" * 900 + b"\n", "recipe.yaml"),  # its repr went too deep, if it parses
    (b"optim:\n  lr: [" + b", ".join([b"123456789"] * 20_000) + b"]\n", "optim.lr"),  # a 220 kB message
], ids=["not-utf8", "deep-list", "deep-mapping", "deep-value", "wide-value"])
def test_config_files_that_cannot_be_read_are_one_line(tmp_path: Path, content: bytes, needle: str) -> None:
    path = tmp_path / "recipe.yaml"
    path.write_bytes(content)
    with pytest.raises(UserError, match="recipe.yaml") as error:
        load_config(path)
    assert needle in str(error.value) and "\n" not in str(error.value) and len(str(error.value)) < 300


def test_an_unreadable_config_file_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "recipe.yaml"
    path.write_text("optim:\n  lr: 0.5\n")

    def denied(self: Path) -> bytes:
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_bytes", denied)  # as chmod 0 does for anyone but root
    with pytest.raises(UserError, match="recipe.yaml.*cannot be read"):
        load_config(path)


def test_a_config_that_is_a_folder_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="is a folder"):
        load_config(tmp_path)


# ---------------------------------------------------------------------------- kNN temperature


@pytest.mark.parametrize("temperature", [0.01, 0.005, 1e-30])
def test_knn_with_a_small_temperature_is_not_garbage(temperature: float) -> None:
    """exp(sim / T) overflowed float32 for T below ~1/88: T = 0.01 (a value people use) gave 15% on the demo, the
    share of one class. The votes are now exp((sim - the nearest's sim) / T): the same ranking as float64's
    exp(sim / T) without overflow, and the nearest neighbour's label as T goes to 0."""
    from nnclr.evaluate.knn import knn_accuracy

    generator = torch.Generator().manual_seed(0)
    centres = torch.nn.functional.normalize(torch.randn(5, 16, generator=generator), dim=1)
    train_y, test_y = torch.arange(5).repeat(60), torch.arange(5).repeat(40)
    train_x = torch.nn.functional.normalize(centres[train_y] + 0.4 * torch.randn(300, 16, generator=generator), dim=1)
    test_x = torch.nn.functional.normalize(centres[test_y] + 0.4 * torch.randn(200, 16, generator=generator), dim=1)
    similarity = test_x.double() @ train_x.double().T
    top_sim, top_idx = similarity.topk(20, dim=1)
    votes = torch.zeros(200, 5, dtype=torch.float64).scatter_add_(1, train_y[top_idx], (top_sim / temperature).exp())
    if temperature < 1e-3:  # float64 overflows too: the limit, the nearest neighbour's label
        votes = torch.nn.functional.one_hot(train_y[top_idx[:, 0]], 5).double()
    expected = 100.0 * (votes.argmax(dim=1) == test_y).double().mean().item()
    assert 40 < expected < 100  # the neighbours' labels are mixed: an overflow shows
    assert knn_accuracy(train_x, train_y, test_x, test_y, temperature=temperature).top1 == pytest.approx(expected)


# ---------------------------------------------------------------------------- found by the sweep in test_fuzz.py


@pytest.mark.parametrize("key", sorted(k for k, v in DEFAULTS.items() if type(v) is int and k != "train.seed"))
def test_every_int_key_fits_in_int64(key: str) -> None:
    """2^63 went into int64 tensors: method.topk and method.neighbours were OverflowError tracebacks."""
    refused(f"{key}={2**63}", needles=(key, str(2**63 - 1)))


def test_momentum_is_below_one() -> None:
    """LARS refused it with a ValueError traceback."""
    for value in ("1", "1.5", "1e30"):
        refused(f"optim.momentum={value}", needles=("optim.momentum", "[0, 1)"))
    assert load_config(None, ["optim.momentum=0.99"]).optim.momentum == 0.99


def test_kmeans_iterations_have_a_cap() -> None:
    """DeepCluster's Lloyd iterations: 1e30 ran for ever."""
    refused("method.kmeans_iters=100000", needles=("method.kmeans_iters", "at most 1000"))
    assert load_config(None, ["method.kmeans_iters=1000"]).method.kmeans_iters == 1000


@pytest.mark.parametrize(("method", "key"), [("nnclr", "method.topk"), ("nnclr_multi", "method.neighbours")])
def test_neighbours_at_most_the_support_set(method: str, key: str) -> None:
    refused(f"method.name={method}", "method.support_size=100", f"{key}=101",
            needles=(key, "method.support_size=100"))
    assert load_config(None, [f"method.name={method}", "method.support_size=100", f"{key}=100"])
    assert load_config(None, ["method.name=simclr", "method.support_size=100", f"{key}=101"])  # not read


def test_a_streaming_loader_prefetch_is_held_to_memory(tmp_path: Path) -> None:
    refused(f"data.name=folder:{tmp_path}", "data.prefetch=1000000000000", needles=("data.prefetch", "GiB"))
    assert load_config(None, [f"data.name=folder:{tmp_path}", "data.prefetch=4"]).data.prefetch == 4


# ---------------------------------------------------------------------------- end to end


@pytest.mark.parametrize(("overrides", "needles"), [
    (["train.epochs=.nan"], ["train.epochs", "finite"]),
    (["data.image_size=4"], ["data.image_size", "small_cnn", ">= 8"]),
    (["method.support_size=1000000000"], ["method.support_size", "GiB"]),
    (["model.proj_layers=10000"], ["model.proj_layers"]),
    (["train.seed=18446744073709551616"], ["train.seed"]),
    (["train.device=meta"], ["train.device"]),
    (["train.threads=999"], ["train.threads"]),
    (["optim.lr=1e-3", "train.knn_temperature=.nan"], ["train.knn_temperature"]),
    (["method.kmeans_iters=1000000000", "method.name=deepcluster"], ["method.kmeans_iters"]),
], ids=lambda case: " ".join(case) if isinstance(case, list) and "=" in case[0] else None)
def test_pretrain_refuses_in_one_line(capsys: pytest.CaptureFixture, tmp_path: Path,
                                      monkeypatch: pytest.MonkeyPatch, overrides: list[str],
                                      needles: list[str]) -> None:
    monkeypatch.chdir(tmp_path)
    result = _cli(capsys, "pretrain", "--no-progress", "--set", "train.report=false", *overrides)
    assert_user_error(result, *needles)
    assert not (tmp_path / "runs").exists()


def test_as_a_user_runs_it(tmp_path: Path, checkpoint: Path) -> None:
    """Two of the cases as subprocesses: exit code 2 and one line on stderr, nothing else."""
    import sys

    def nnclr(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "nnclr", *args], cwd=tmp_path, capture_output=True, text=True,
                              timeout=300)

    assert_user_error(nnclr("pretrain", "--set", "train.epochs=.nan"), "train.epochs=nan", "finite")
    assert_user_error(nnclr("eval", "knn", "--checkpoint", str(checkpoint), "--threads", "99999999999"),
                      "--threads", "99999999999")
    assert not (tmp_path / "runs").exists()


def test_the_paper_linear_probe_with_one_image_left_over() -> None:
    """N % batch == 1 left a last batch of one image for the head's batch-norm in training mode: ``nnclr eval linear
    --mode paper --batch-size 3499`` on the demo's 3,500 images was a ValueError traceback. It joins the batch
    before it."""
    from test_eval_metrics import EVAL_KWARGS, colour_images, tiny_encoder

    from nnclr.evaluate.linear import paper_linear_probe
    from nnclr.evaluate.sgd import ClassifierTask, SGDSettings

    x, y = colour_images(65)
    result = paper_linear_probe(ClassifierTask(tiny_encoder(), x, y, x[:32], y[:32], **EVAL_KWARGS),
                                SGDSettings(epochs=2, batch_size=32, lr=1.0))
    assert result.extra["steps"] == 4  # 32 and 33 images, twice
