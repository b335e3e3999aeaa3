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
