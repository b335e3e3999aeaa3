"""Values of the right type that would then crash, hang or give garbage are refused where they enter (issue 23,
item 11): with one line naming the key or flag the user typed and what would work.

Floats must be finite; ints lie in ranges that make sense; what only this machine bounds (its memory, its CPUs,
a C++ compiler for ``train.compile``, CUDA) is checked against this machine, and the message says what the
setting would need and what there is.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch
from use_helpers import run_main

from nnclr import machine
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
    load_config(None, [f"{key}=10000"])


# ---------------------------------------------------------------------------- ints


@pytest.mark.parametrize("value", ["18446744073709551616", "-1", str(10**30)])
def test_the_seed_is_what_torch_and_numpy_accept(value: str) -> None:
    refused(f"train.seed={value}", needles=("train.seed", "18446744073709551615"))


def test_the_largest_seed_runs() -> None:
    from nnclr.seeding import ORDER, derive_seed

    seed = load_config(None, ["train.seed=18446744073709551615"]).train.seed
    torch.Generator().manual_seed(seed)
    torch.Generator().manual_seed(derive_seed(seed, ORDER, 0))


def test_projection_layers_have_a_cap() -> None:
    """10,000 layers of 64 fit in memory and then trained silently for minutes."""
    refused("model.proj_layers=10000", "model.proj_hidden_dim=64", needles=("model.proj_layers", "at most 8"))
    assert load_config(None, ["model.proj_layers=8", "model.proj_hidden_dim=64"]).model.proj_layers == 8


# ---------------------------------------------------------------------------- devices


@pytest.mark.parametrize("device", ["meta", "mps", "banana", "cuda:x", "cuda:-1", "xla", "cpu cuda", ""])
def test_devices_nnclr_cannot_run_on_are_refused(device: str) -> None:
    refused(f"train.device={device}", needles=("train.device", "auto, cpu, cuda or cuda:N"))


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
    for run_dir in ("runs/exp #2", "runs/exp ", "2024", "yes", "null", "'quoted'"):
        result = _cli(capsys, "pretrain", "--run-dir", run_dir, "--fresh", "--set", "train.report=false")
        assert result.returncode == 2 and seen[-1] == run_dir
    _cli(capsys, "pretrain", "--run-dir", "flag", "--set", "train.run_dir=key")
    assert seen[-1] == "flag"  # the flag wins over --set train.run_dir
