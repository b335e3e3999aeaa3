"""Bad arguments, bad config values, bad checkpoints: one line naming the problem, exit code 2.

Every flag of every command is tried with a wrong value (found from the parsers themselves, so
a new flag is covered without a new test), every config key with a value of the wrong type, and
every key with choices with a value outside them.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from use_helpers import assert_user_error, make_checkpoint, run_main

from nnclr import __version__
from nnclr.cli import build_parser
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
    action = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
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


# ---------------------------------------------------------------------------- bad image files


def _image_matrix(root: Path) -> tuple[set[str], set[str]]:
    """A folder of every kind of file a real image folder holds; returns (convertible, unreadable) names."""
    import io

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8))
    good, cls = root / "good", root / "bad"
    good.mkdir(parents=True)
    cls.mkdir()
    convertible = {
        "rgb.png": rgb, "gray.png": rgb.convert("L"), "palette.gif": rgb.convert("P"), "rgba.png": rgb.convert("RGBA"),
        "gray_alpha.png": rgb.convert("LA"), "cmyk.jpg": rgb.convert("CMYK"), "bilevel.bmp": rgb.convert("1"),
        "gray16.png": Image.fromarray(rng.integers(0, 65535, (20, 30), dtype=np.uint16)),
        "float.tif": Image.fromarray(rng.random((20, 30), dtype=np.float32)),
        "one_pixel.png": Image.new("RGB", (1, 1), (200, 10, 10)), "wide.webp": rgb.resize((300, 2)),
        "large.jpg": Image.new("RGB", (6000, 4000), (10, 120, 30)),
        "UPPER.JPEG": rgb,
    }
    for name, image in convertible.items():
        image.save(good / name)
    png = io.BytesIO()
    rgb.save(png, "PNG")
    bomb = io.BytesIO()
    Image.new("L", (1, 1)).save(bomb, "PNG")
    data = bomb.getvalue()  # IHDR claims 30000 x 30000 pixels: Pillow's decompression-bomb limit
    bomb_bytes = data[:16] + (30000).to_bytes(4, "big") * 2 + data[24:]
    unreadable = {
        "truncated.png": png.getvalue()[: len(png.getvalue()) // 2], "corrupt.png": png.getvalue()[:40] + b"\0" * 500,
        "text.jpg": b"hello, I am text", "empty.png": b"", "bomb.png": bomb_bytes,
    }
    for name, content in unreadable.items():
        (cls / name).write_bytes(content)
    (cls / "loop_a.png").symlink_to(cls / "loop_b.png")
    (cls / "loop_b.png").symlink_to(cls / "loop_a.png")
    (cls / "dir_loop").symlink_to(cls)  # a folder that contains itself
    (root / "empty_class").mkdir()
    (root / "only_bad").mkdir()
    (root / "only_bad" / "x.png").write_bytes(b"\x89PNG nope")
    return set(convertible), {*unreadable, "loop_a.png", "loop_b.png", "x.png"}


def test_bad_image_files_are_converted_or_skipped_with_a_count_never_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from nnclr.data import load_dataset

    convertible, unreadable = _image_matrix(tmp_path)
    ds = load_dataset(f"folder:{tmp_path}", image_size=8)
    assert len(ds) == len(convertible) and ds.images.dtype == torch.uint8 and ds.images.shape[1:] == (3, 8, 8)
    assert ds.classes == ["bad", "good", "only_bad"] and ds.labels.tolist() == [1] * len(convertible)
    warning = capsys.readouterr().err.strip()
    assert "\n" not in warning and "Traceback" not in warning
    assert f"skipped {len(unreadable)} unreadable file(s) or folder(s) " \
        f"({len(convertible) + len(unreadable)} image files found): {tmp_path / 'bad'}/" in warning
    assert f"and {len(unreadable) - 3} more" in warning
    only_bad = tmp_path / "only_bad"  # a data set with no usable image is an error
    with pytest.raises(UserError, match=f"none of the 1 image files in {only_bad} could be read"):
        load_dataset(f"folder:{only_bad}", image_size=8)
    with pytest.raises(UserError, match="no images found"):
        load_dataset(f"folder:{tmp_path / 'empty_class'}", image_size=8)


def test_broken_links_among_unlabelled_images_are_counted(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from PIL import Image

    from nnclr.data import load_dataset

    Image.new("RGB", (5, 7), (9, 8, 7)).save(tmp_path / "ok.png")
    (tmp_path / "gone.png").symlink_to(tmp_path / "deleted.png")
    (tmp_path / "loop.jpg").symlink_to(tmp_path / "loop.jpg")
    assert len(load_dataset(f"folder:{tmp_path}", image_size=4)) == 1
    warning = capsys.readouterr().err
    assert "skipped 2 unreadable file(s) or folder(s) (3 image files found)" in warning
    assert f"{tmp_path / 'gone.png'}: " in warning and f"{tmp_path / 'loop.jpg'}: " in warning

@pytest.mark.slow
def test_unreadable_permissions_are_skipped(tmp_path: Path) -> None:
    """Files and folders without read permission (as root, run without the capabilities that bypass it)."""
    import shutil
    import sys

    from PIL import Image

    root = tmp_path / "images"
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    for name in ("ok.png", "locked.png"):
        Image.new("RGB", (4, 4), (1, 2, 3)).save(root / "a" / name)
    Image.new("RGB", (4, 4)).save(root / "b" / "hidden.png")
    (root / "a" / "locked.png").chmod(0o200)
    (root / "b").chmod(0o300)  # cannot be listed
    code = f"from nnclr.data import load_dataset; ds = load_dataset('folder:{root}', image_size=4); print(len(ds))"
    command = [sys.executable, "-c", code]
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("root reads everything; setpriv (util-linux) is needed to drop that")
        command = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", *command]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=120,
                                env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    finally:
        (root / "b").chmod(0o700)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "1"
    assert "skipped 2 unreadable" in result.stderr and "Permission denied" in result.stderr
    assert str(root / "a" / "locked.png") in result.stderr and str(root / "b") in result.stderr
    assert "Traceback" not in result.stderr


def _corrupt_tiffs(folder: Path, n: int = 40) -> None:
    """``n`` compressed TIFFs (LZW, deflate, JPEG, PackBits, none) with 4 random bytes overwritten each, and 40 PNGs."""
    import io
    import random

    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(40):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(folder / f"ok{i}.png")
    rgb = Image.fromarray(rng.integers(0, 256, (12, 17, 3), dtype=np.uint8))
    seeds = []
    for compression in ("tiff_lzw", "tiff_adobe_deflate", "jpeg", "packbits", None):
        buffer = io.BytesIO()
        rgb.save(buffer, format="TIFF", compression=compression)
        seeds.append(buffer.getvalue())
    draw = random.Random(1)
    for i in range(n):
        data = bytearray(draw.choice(seeds))
        for _ in range(4):
            data[draw.randrange(len(data))] = draw.randrange(256)
        (folder / f"bad{i}.tif").write_bytes(bytes(data))


@pytest.mark.slow
def test_corrupt_tiffs_print_nothing_but_nnclr_s_own_lines(tmp_path: Path, tiny_run: tuple[str, ...]) -> None:
    """libtiff printed its own lines from C (and Pillow logged some) beside the one warning line (issue 23, item 17):
    ``nnclr pretrain`` and ``nnclr embed`` on a folder of corrupt TIFFs, as a user runs them."""
    import sys

    _corrupt_tiffs(tmp_path / "images" / "a")

    def nnclr(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "nnclr", *args], cwd=tmp_path, capture_output=True, text=True,
                              timeout=300)

    trained = nnclr("pretrain", "--run-dir", "run", "--no-progress", "--set", *tiny_run, "method.support_size=64",
                    "data.name=folder:images", "data.image_size=16", "data.test_split=", "train.max_steps=1",
                    "train.report=false")
    assert trained.returncode == 0, trained.stderr
    lines = trained.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("nnclr: warning: images: skipped "), trained.stderr
    embedded = nnclr("embed", "--checkpoint", "run", "--images", "images", "--out", "emb", "--no-progress")
    assert embedded.returncode == 0, embedded.stderr
    lines = embedded.stderr.strip().splitlines()  # embed names the first 10 files it skips, then counts the rest
    assert len(lines) == 11 and all(line.startswith("skipped a/bad") for line in lines[:10]), embedded.stderr
    manifest = Path("emb", "manifest.json")
    listed = len(json.loads((tmp_path / manifest).read_text())["skipped"])
    assert listed > 10 and lines[10] == f"skipped {listed - 10} more unreadable files, each listed with its reason " \
                                        f"in {manifest}"


def _without_read_bypass(command: list[str]) -> list[str]:
    """``command`` run without root's capabilities to read everything (skips where they cannot be dropped)."""
    import shutil

    if os.geteuid() != 0:
        return command
    if shutil.which("setpriv") is None:
        pytest.skip("root reads everything; setpriv (util-linux) is needed to drop that")
    return ["setpriv", "--bounding-set=-dac_override,-dac_read_search", *command]


@pytest.mark.slow
@pytest.mark.parametrize("mode", [0o000, 0o300, 0o600])  # nothing; not listable; listable but not searchable
def test_an_unreadable_data_folder_is_named_as_unreadable_not_empty(tmp_path: Path, mode: int) -> None:
    """``data.name=folder:X`` where X cannot be read: one line saying so (was a PermissionError traceback from
    looking for X/test; "no images found" would send the user looking for images that are there) (item 14)."""
    import sys

    from PIL import Image

    root = tmp_path / "locked"
    (root / "cats").mkdir(parents=True)
    Image.new("RGB", (4, 4)).save(root / "cats" / "a.png")
    root.chmod(mode)
    code = f"from nnclr.cli import main; raise SystemExit(main(['pretrain', '--set', 'data.name=folder:{root}']))"
    try:
        result = subprocess.run(_without_read_bypass([sys.executable, "-c", code]), capture_output=True, text=True,
                                timeout=120, env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    finally:
        root.chmod(0o700)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and str(root) in lines[0] and "cannot be read" in lines[0], result.stderr
    assert "Permission denied" in lines[0] and "no images" not in lines[0]


@pytest.mark.parametrize("n", [1, 2])
def test_a_folder_of_one_or_two_images_gets_advice_that_works(
    tmp_path: Path, capsys: pytest.CaptureFixture, tiny_run: tuple[str, ...], n: int
) -> None:
    """1 image: no batch size works (was told "--set optim.batch_size=2"); 2 images: batch 2 does (item 14)."""
    from PIL import Image

    for i in range(n):
        Image.new("RGB", (16, 16), (i, 0, 0)).save(tmp_path / f"{i}.png")
    result = _cli(capsys, "pretrain", "--run-dir", str(tmp_path / "run"), "--set", *tiny_run,
                  f"data.name=folder:{tmp_path}", "data.image_size=16", "data.test_split=", "train.report=false")
    if n == 1:
        assert_user_error(result, "1 image", "at least 2", "add images")
        assert "optim.batch_size=2" not in result.stderr
    else:
        assert_user_error(result, "optim.batch_size=32", "--set optim.batch_size=2")
        advised = _cli(capsys, "pretrain", "--run-dir", str(tmp_path / "run"), "--set", *tiny_run,
                       f"data.name=folder:{tmp_path}", "data.image_size=16", "data.test_split=", "train.report=false",
                       "optim.batch_size=2", "train.max_steps=1")
        assert advised.returncode == 0, advised.stderr  # the advice works


def test_a_metrics_file_with_a_non_numeric_step_or_non_utf8_bytes_is_read_without_them(tmp_path: Path) -> None:
    """metrics.jsonl edited or damaged by hand: resume (MetricsLog) and the readers (report, read_jsonl) skip
    the lines that are not nnclr's records (were TypeError and UnicodeDecodeError tracebacks) (issue 23, item 12)."""
    from nnclr import rundir

    path = tmp_path / rundir.METRICS
    good = [{"type": "train", "step": 1, "loss": 1.0}, {"type": "train", "step": 2, "loss": 0.5}]
    lines = [json.dumps(good[0]).encode(), b'{"type": "train", "step": "x"}', b"\xff\xfe{\"step\": 1}",
             b'{"type": "knn", "step": null}', json.dumps(good[1]).encode(), b'{"type": "train", "step": 3.5e400}']
    path.write_bytes(b"\n".join(lines) + b"\n")
    assert rundir.read_jsonl(path) == good
    log = rundir.MetricsLog(path, resume_step=2)  # resuming from step 2 keeps steps 1 and 2
    assert rundir.read_jsonl(path) == good and log.has("train", 2)
