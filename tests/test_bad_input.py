"""Bad arguments, bad config values, bad checkpoints: one line naming the problem, exit code 2.

Every flag of every command is tried with a wrong value (found from the parsers themselves, so
a new flag is covered without a new test), every config key with a value of the wrong type, and
every key with choices with a value outside them.
"""

from __future__ import annotations

import argparse
import os
import subprocess
from pathlib import Path

import pytest
import torch
from use_helpers import assert_user_error, make_checkpoint, run_main

from nnclr import __version__
from nnclr.cli import _parser
from nnclr.config import CHOICES, Config, flatten, load_config, to_dict
from nnclr.errors import UserError


def _cli(capsys: pytest.CaptureFixture, *args: str):
    """``nnclr ARGS`` in this process, argparse's exits included."""
    try:
        return run_main(capsys, *args)
    except SystemExit as exit_:
        captured = capsys.readouterr()
        return subprocess.CompletedProcess(["nnclr", *args], exit_.code, captured.out, captured.err)


def _commands() -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def _flag_cases() -> list[tuple[str, str, str, list[str]]]:
    """(command, flag, bad value, needles) for every flag that takes a typed or chosen value."""
    cases = []
    for command, parser in _commands().items():
        for action in parser._actions:
            flag = next((o for o in action.option_strings if o.startswith("--")), None) or (
                action.option_strings[0] if action.option_strings else None)
            if flag is None or action.nargs == 0:
                continue
            if action.choices:
                cases.append((command, flag, "bogus", [flag, "invalid choice", *map(str, action.choices)]))
            elif action.type in (int, float):
                cases.append((command, flag, "bogus", [flag, f"invalid {action.type.__name__} value"]))
    return cases


@pytest.mark.parametrize(("command", "flag", "value", "needles"), _flag_cases())
def test_every_bad_flag_value_is_one_line_naming_the_flag_and_allowed_values(
    capsys: pytest.CaptureFixture, command: str, flag: str, value: str, needles: list[str]
) -> None:
    assert_user_error(_cli(capsys, command, flag, value), *needles)


@pytest.mark.parametrize("command", sorted(_commands()))
def test_unknown_flags_and_missing_arguments(capsys: pytest.CaptureFixture, command: str) -> None:
    required = [a for a in _commands()[command]._actions if a.required]  # reported first when missing
    if required:
        assert_user_error(_cli(capsys, command, "--no-such-flag"), "the following arguments are required",
                          *(a.option_strings[0] if a.option_strings else a.metavar or a.dest for a in required))
    else:
        assert_user_error(_cli(capsys, command, "--no-such-flag"), "unrecognized arguments: --no-such-flag",
                          f"nnclr {command} takes: ", "--help")


def test_unknown_command(capsys: pytest.CaptureFixture) -> None:
    assert_user_error(_cli(capsys, "pretrian"), "invalid choice: 'pretrian'", "'pretrain'")


_WRONG_TYPE = {bool: "maybe", int: "1.5", float: "fast", str: "bogus"}
_DEFAULTS = flatten(to_dict(Config()))
# free-form strings (paths, names checked where they are used) cannot have a wrong type
_TYPED_KEYS = sorted(k for k, v in _DEFAULTS.items() if k in CHOICES or not (v is None or isinstance(v, str)))


@pytest.mark.parametrize("key", _TYPED_KEYS)
def test_every_config_key_with_a_wrong_value_is_named(key: str) -> None:
    with pytest.raises(UserError) as error:
        load_config(None, [f"{key}={_WRONG_TYPE[type(_DEFAULTS[key])]}"])
    message = str(error.value)
    assert key in message and "\n" not in message
    assert all(choice in message for choice in CHOICES.get(key, ()))


def test_bad_backbone_names_the_key_and_the_choices(
    capsys: pytest.CaptureFixture, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    result = _cli(capsys, "pretrain", "--set", "model.backbone=resnet99", "train.report=false")
    assert_user_error(result, "resnet99", "small_cnn", "resnet18")


# ---------------------------------------------------------------------------- checkpoints


class _RunsCodeWhenUnpickled:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.marker}",))


def test_a_malicious_checkpoint_in_a_run_directory_is_refused_without_running_it(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    marker = tmp_path / "code_ran"
    (tmp_path / "run").mkdir()
    evil = {"format_version": 1, "step": 1, "model": _RunsCodeWhenUnpickled(marker)}
    torch.save(evil, tmp_path / "run" / "checkpoint.pt")
    for args in (["pretrain", "--run-dir", str(tmp_path / "run"), "--set", "train.report=false"],
                 ["export", "--checkpoint", str(tmp_path / "run"), "--format", "safetensors", "--out",
                  str(tmp_path / "x.safetensors")]):
        assert_user_error(_cli(capsys, *args), "refused to load", "weights_only=True", "posix.system")
    assert not marker.exists()


def test_a_checkpoint_of_another_format_or_version_is_explained(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = make_checkpoint(tmp_path / "c.pt")
    state = torch.load(path, weights_only=True)
    torch.save({**state, "format_version": 2, "nnclr_version": "9.0.0"}, tmp_path / "future.pt")
    assert_user_error(_cli(capsys, "export", "--checkpoint", str(tmp_path / "future.pt"), "--format", "safetensors",
                           "--out", str(tmp_path / "x")),
                      "has format 2, written by nnclr 9.0.0", f"this nnclr {__version__} reads format 1")
    model = dict(state["model"])
    model.pop(next(iter(model)))  # a model whose layers changed between versions
    torch.save({**state, "model": model, "nnclr_version": "0.0.9"}, tmp_path / "old.pt")
    assert_user_error(_cli(capsys, "export", "--checkpoint", str(tmp_path / "old.pt"), "--format", "safetensors",
                           "--out", str(tmp_path / "x")),
                      "(written by nnclr 0.0.9, this is", "does not match this model", "Missing key")
