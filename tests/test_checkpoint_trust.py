"""Checkpoints and exports you can trust (issue 23, items 12, 13 and 14).

A checkpoint damaged on disk is refused by every reader (``nnclr.load``, ``export``, ``eval``, ``embed``, a
resume) naming the file; so is a damaged safetensors export. A checkpoint with wrongly typed or missing fields,
a safetensors export whose config is not JSON or asks for a huge model, an unreadable file, a plain pickle and a
300-character path are each one line, no traceback.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import random
import re
import shutil
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from robust_helpers import run_overrides
from use_helpers import assert_user_error, make_checkpoint, nnclr_cli, run_main

import nnclr
from nnclr.checkpoint import CHECKPOINT_NAME, FIELDS, load_checkpoint, save_checkpoint
from nnclr.errors import UserError
from nnclr.integrity import SAFETENSORS_KEY
from nnclr.use.export import export
from nnclr.weights import read_encoder_state


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("run") / "checkpoint.pt")


def _tensor_ranges(path: Path) -> list[tuple[int, int]]:
    """Where the tensors' bytes are in a torch zip file: (start, end) of each ``data/N`` entry."""
    data = path.read_bytes()
    ranges = []
    with zipfile.ZipFile(path) as archive:
        for info in archive.infolist():
            if "/data/" in info.filename and info.file_size:
                at = info.header_offset
                name_length, extra_length = struct.unpack("<HH", data[at + 26 : at + 30])
                start = at + 30 + name_length + extra_length
                ranges.append((start, start + info.file_size))
    return ranges


def _flip(path: Path, out: Path, ranges: list[tuple[int, int]], count: int = 200, seed: int = 0) -> Path:
    """A copy of ``path`` with ``count`` bytes flipped at random places inside ``ranges``."""
    data = bytearray(path.read_bytes())
    rng = random.Random(seed)
    for _ in range(count):
        start, end = rng.choice(ranges)
        data[rng.randrange(start, end)] ^= 0xFF
    out.write_bytes(bytes(data))
    return out


def _readers(path: Path, tmp_path: Path) -> list[list[str]]:
    """The commands that read a checkpoint: export, eval, embed."""
    return [
        ["export", "--checkpoint", str(path), "--format", "safetensors", "--out", str(tmp_path / "out.safetensors")],
        ["eval", "knn", "--checkpoint", str(path), "--threads", "1", "--no-progress"],
        ["embed", "--checkpoint", str(path), "--images", "demo", "--out", str(tmp_path / "emb"), "--no-progress"],
    ]


# ---------------------------------------------------------------------------- item 13: damage is found


def test_every_checkpoint_ends_with_the_sha256_of_its_bytes_and_stays_a_standard_zip(checkpoint: Path) -> None:
    data = checkpoint.read_bytes()
    with zipfile.ZipFile(checkpoint) as archive:
        assert archive.testzip() is None
        comment = archive.comment
    assert comment.startswith(b"nnclr-sha256:")
    assert comment[len(b"nnclr-sha256:"):].decode() == hashlib.sha256(data[: -len(comment)]).hexdigest()
    assert torch.load(checkpoint, weights_only=True)["step"] == 0  # torch reads it as it is


def test_a_checkpoint_with_200_flipped_bytes_is_refused_by_every_reader(
    checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    damaged = _flip(checkpoint, tmp_path / "damaged.pt", _tensor_ranges(checkpoint))
    torch.load(damaged, weights_only=True)  # torch alone accepts it: only the tensors' values changed
    with pytest.raises(UserError, match="damaged.pt is damaged: its bytes no longer match the SHA-256"):
        nnclr.load(damaged)
    assert_user_error(nnclr_cli(*_readers(damaged, tmp_path)[0]), "damaged.pt is damaged", "copy it again")
    for args in _readers(damaged, tmp_path)[1:]:
        assert_user_error(run_main(capsys, *args), "damaged.pt is damaged")
    assert not (tmp_path / "out.safetensors").exists() and not (tmp_path / "emb" / "embeddings.npy").exists()


@pytest.mark.slow
def test_a_resume_from_a_damaged_checkpoint_is_refused(
    tiny_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    command = ["pretrain", "--run-dir", str(tmp_path / "run"), "--no-progress", "--set",
               *run_overrides(tiny_data, "train.max_steps=2")]
    assert run_main(capsys, *command).returncode == 0
    path = tmp_path / "run" / CHECKPOINT_NAME
    shutil.copy(_flip(path, tmp_path / "damaged.pt", _tensor_ranges(path)), path)
    before = path.read_bytes()
    assert_user_error(run_main(capsys, *command[:-1], "train.max_steps=4"), "checkpoint.pt is damaged", "--fresh")
    assert path.read_bytes() == before


def test_a_checkpoint_without_a_checksum_is_still_loaded(checkpoint: Path, tmp_path: Path) -> None:
    """Checkpoints written before checksums (a plain torch.save) are read as before, unchecked."""
    old = tmp_path / "old.pt"
    torch.save(torch.load(checkpoint, weights_only=True), old)
    assert not zipfile.ZipFile(old).comment
    loaded, reference = nnclr.load(old), nnclr.load(checkpoint)
    for key, value in reference.encoder.state_dict().items():
        assert torch.equal(loaded.encoder.state_dict()[key], value)


def test_a_damaged_safetensors_export_is_refused_by_load_and_init_from(checkpoint: Path, tmp_path: Path) -> None:
    out = export(nnclr.load(checkpoint), tmp_path / "encoder.safetensors", "safetensors")
    from safetensors import safe_open

    with safe_open(str(out), framework="pt") as file:
        assert SAFETENSORS_KEY in file.metadata()
    (length,) = struct.unpack("<Q", out.read_bytes()[:8])
    damaged = _flip(out, tmp_path / "damaged.safetensors", [(8 + length, out.stat().st_size)])
    with pytest.raises(UserError, match="damaged.safetensors is damaged: its SHA-256 does not match"):
        nnclr.load(damaged)
    with pytest.raises(UserError, match="damaged.safetensors is damaged"):
        read_encoder_state(damaged)
    read_encoder_state(out)  # the intact export is read


# ---------------------------------------------------------------------------- item 14: unreadable, pickles


def test_an_unreadable_checkpoint_says_it_cannot_be_read_and_why(checkpoint: Path, tmp_path: Path) -> None:
    path = tmp_path / "locked.pt"
    shutil.copy(checkpoint, path)
    path.chmod(0)
    prefix: list[str] = []
    if os.access(path, os.R_OK):  # root reads anything: run the command without that capability
        if shutil.which("setpriv") is None:
            pytest.skip("running as root without setpriv: cannot make a file unreadable")
        prefix = ["setpriv", "--inh-caps=-dac_override,-dac_read_search",
                  "--bounding-set=-dac_override,-dac_read_search"]
    args = ["export", "--checkpoint", str(path), "--format", "safetensors", "--out", str(tmp_path / "x.safetensors")]
    result = subprocess.run([*prefix, sys.executable, "-m", "nnclr", *args], capture_output=True, text=True,
                            timeout=300)
    assert_user_error(result, "locked.pt cannot be read (Permission denied)", "chmod u+r")
    assert "truncated" not in result.stderr and "delete it" not in result.stderr


class _Note:  # a class a legacy pickle refers to
    pass


@pytest.mark.parametrize("kind", ["pickle", "legacy torch.save"])
def test_a_plain_pickle_is_explained_without_advising_to_unpickle_it(
    kind: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    path = tmp_path / "weights.pkl"
    if kind == "pickle":
        path.write_bytes(pickle.dumps({"model": {"w": [1.0, 2.0]}, "note": _Note()}, protocol=4))
    else:
        torch.save({"model": torch.zeros(2), "note": _Note()}, path, _use_new_zipfile_serialization=False)
    result = run_main(capsys, *_readers(path, tmp_path)[0])
    assert_user_error(result, "weights.pkl cannot be read as a checkpoint", "not in torch's zip format",
                      "never unpickles code", "torch.save(model.state_dict(), FILE)")
    assert "weights_only=False" not in result.stderr and "set to `False`" not in result.stderr


# ---------------------------------------------------------------------------- item 12: crafted fields


CRAFTED = [
    ("model", "abc", "field 'model' is 'abc', not a mapping of names to tensors"),
    ("model", {"backbone.x": 3}, "field 'model' is a dict of 1, not a mapping of names to tensors"),
    ("step", "abc", "field 'step' is 'abc', not a whole number >= 0"),
    ("step", -3, "field 'step' is -3"),
    ("step", True, "field 'step' is True"),
    ("config", "abc", "field 'config' is 'abc'"),
    ("config", {"model": "resnet18"}, "the config stored in it"),
    ("config", {"model": {"proj_dim": "wide"}}, "the config stored in it is refused"),
    ("knn_before", 3, "field 'knn_before' is 3"),
    ("loader", "disk", "field 'loader' is 'disk'"),
    ("format_version", [1], "has format a list of 1"),
    ("model", None, "has no model"),  # None: the field is removed
    ("config", None, "has no config"),
    ("step", None, "has no step"),
]


def _crafted(checkpoint: Path, path: Path, field: str, value: object) -> Path:
    state = torch.load(checkpoint, weights_only=True)
    if value is None:
        del state[field]
    else:
        state[field] = value
    if field == "format_version":
        torch.save(state, path)
    else:
        state.pop("format_version")
        save_checkpoint(state, path)  # a valid checksum: the content itself is wrong
    return path


@pytest.mark.parametrize(("field", "value", "needle"), CRAFTED, ids=[f"{f}-{v!r}"[:30] for f, v, _ in CRAFTED])
def test_a_checkpoint_with_a_wrongly_typed_or_missing_field_is_one_line(
    checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture, field: str, value: object, needle: str
) -> None:
    path = _crafted(checkpoint, tmp_path / "crafted.pt", field, value)
    with pytest.raises(UserError, match="crafted.pt") as raised:
        nnclr.load(path)
    assert needle in str(raised.value) and "\n" not in str(raised.value)
    for args in _readers(path, tmp_path):
        assert_user_error(run_main(capsys, *args), "crafted.pt", needle)


@pytest.mark.parametrize("field", sorted(FIELDS))
def test_every_known_field_of_the_wrong_type_is_refused_naming_it(checkpoint: Path, tmp_path: Path, field: str) -> None:
    path = _crafted(checkpoint, tmp_path / "crafted.pt", field, 3 if field == "nnclr_version" else "not-valid")
    with pytest.raises(UserError, match=f"crafted.pt: field '{field}' is .*, not {re.escape(FIELDS[field][1])}"):
        load_checkpoint(path)


@pytest.mark.slow
@pytest.mark.parametrize(("field", "value", "needle"), [
    ("optimizer", "abc", "field 'optimizer' is 'abc'"),
    ("optimizer", {"state": {}, "param_groups": [{"params": [0]}]}, "the checkpoint's optimiser state does not fit"),
    ("selector", [1], "field 'selector' is a list of 1"),
    ("support", None, "has no support"),
    ("skipped_steps", "x", "field 'skipped_steps' is 'x'"),
])
def test_a_resume_from_a_crafted_checkpoint_is_one_line(
    tiny_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture, field: str, value: object, needle: str
) -> None:
    command = ["pretrain", "--run-dir", str(tmp_path / "run"), "--no-progress", "--set",
               *run_overrides(tiny_data, "train.max_steps=2")]
    assert run_main(capsys, *command).returncode == 0
    path = tmp_path / "run" / CHECKPOINT_NAME
    _crafted(path, path, field, value)
    assert_user_error(run_main(capsys, *command[:-1], "train.max_steps=4"), needle)


# ---------------------------------------------------------------------------- item 12: crafted exports


def _export_with_config(checkpoint: Path, out: Path, config: str | None, with_projector: bool) -> Path:
    """An export of ``checkpoint`` whose ``config`` metadata is replaced (and no checksum: an older export)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    source = export(nnclr.load(checkpoint), out.with_suffix(".orig.safetensors"), "safetensors", with_projector)
    with safe_open(str(source), framework="pt") as file:
        metadata = {k: v for k, v in file.metadata().items() if k != SAFETENSORS_KEY}
        tensors = {key: file.get_tensor(key) for key in file.keys()}
    if config is not None:
        metadata["config"] = config
    save_file(tensors, str(out), metadata=metadata)
    return out


def _huge(hidden: int) -> str:
    return f'{{"model": {{"backbone": "small_cnn", "proj_hidden_dim": {hidden}}}, "data": {{"name": "demo"}}}}'


@pytest.mark.parametrize(("config", "with_projector", "needle"), [
    ("{not json", False, "its config metadata is not JSON"),
    ('["a list"]', False, "its config metadata is not a mapping of config sections"),
    ('{"model": 3}', False, "its config metadata is not a mapping of config sections"),
    ('{"model": {"proj_dim": "wide"}}', False, "the config stored in it is refused"),
    (_huge(2**20), False, "its config asks for a model of 4,"),  # 4 TiB: more than any test machine has
    (_huge(2**20), True, "does not match this model"),
    (_huge(2**40), False, "its config asks for a model too large to build"),  # 2^80 weights
])
def test_a_safetensors_export_with_a_crafted_config_is_one_line(
    checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture, config: str, with_projector: bool, needle: str
) -> None:
    path = _export_with_config(checkpoint, tmp_path / "crafted.safetensors", config, with_projector)
    with pytest.raises(UserError, match="crafted.safetensors") as raised:
        nnclr.load(path)
    assert needle in str(raised.value)
    for args in _readers(path, tmp_path):
        assert_user_error(run_main(capsys, *args), "crafted.safetensors", needle)


def test_an_export_of_an_older_nnclr_without_a_checksum_is_still_loaded(checkpoint: Path, tmp_path: Path) -> None:
    path = _export_with_config(checkpoint, tmp_path / "older.safetensors", None, with_projector=True)
    assert nnclr.load(path).projector is not None


# ---------------------------------------------------------------------------- item 12: long paths


def test_a_300_character_path_is_one_line(checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    long_name = "x" * 300
    assert_user_error(nnclr_cli("eval", "knn", "--checkpoint", str(tmp_path / long_name), "--threads", "1"),
                      "cannot be looked up (File name too long)", "characters)")
    assert_user_error(run_main(capsys, "export", "--checkpoint", str(checkpoint), "--format", "safetensors",
                               "--out", str(tmp_path / (long_name + ".safetensors"))),
                      "--out", "File name too long")
    for args in _readers(tmp_path / long_name, tmp_path)[1:]:
        assert_user_error(run_main(capsys, *args), "File name too long")
