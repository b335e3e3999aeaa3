"""Fuzzing the two parsers a user feeds directly, image decoding and the config, and every numeric key at its extremes.

The guarantee: whatever the bytes of an image file or the text of a ``--set`` override or YAML
recipe, the result is a valid value or a :class:`~nnclr.errors.UserError` (a one-line message
and exit code 2 in the CLI), never another exception. ``NNCLR_FUZZ_EXAMPLES`` sets the number
of cases per test; CI runs 150 per test (600 in all), ``NNCLR_LONG_CAMPAIGN=1`` 5,000 per test.
How many inputs were tried, and how many decoded or were refused, is printed in the test
summary (docs/robustness.md records the latest long campaign).
"""

from __future__ import annotations

import io
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from nnclr.config import Config, flatten, load_config, to_dict
from nnclr.data.decode import load_square
from nnclr.errors import UserError

LONG = os.environ.get("NNCLR_LONG_CAMPAIGN") == "1"
EXAMPLES = int(os.environ.get("NNCLR_FUZZ_EXAMPLES", "5000" if LONG else "150"))
FUZZ = settings(
    max_examples=EXAMPLES, deadline=None, derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
KEYS = sorted(flatten(to_dict(Config())))
NAMES = sorted({part for key in KEYS for part in key.split(".")})  # section and key names


def _seed_files() -> dict[str, bytes]:
    """Small valid files in the formats users have, to be mutated."""
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (12, 17, 3), dtype=np.uint8))
    files = {}
    for fmt, image in [
        ("PNG", rgb), ("JPEG", rgb), ("GIF", rgb.convert("P")), ("BMP", rgb), ("WEBP", rgb),
        ("TIFF", rgb), ("PNG", rgb.convert("LA")),
        ("PNG", Image.fromarray(np.arange(64, dtype=np.uint16).reshape(8, 8))),  # 16-bit grayscale
    ]:
        buffer = io.BytesIO()
        image.save(buffer, format=fmt)
        files[f"{fmt}-{image.mode}"] = buffer.getvalue()
    return files


SEEDS = _seed_files()


def _decode_or_user_error(path: Path, size: int = 8, fuzzer: str = "") -> np.ndarray | None:
    try:
        array = load_square(path, size)
    except UserError as error:
        assert "\n" not in str(error) and str(path) in str(error)
        TRIED[fuzzer, "refused"] += 1
        return None
    assert array.dtype == np.uint8 and array.shape == (3, size, size)
    TRIED[fuzzer, "valid"] += 1
    return array


TRIED: Counter = Counter()  # (fuzzer, "valid" | "refused") -> inputs tried; conftest prints it


@pytest.fixture(scope="module", autouse=True)
def _report_tried(figures: list[str]):
    yield
    for fuzzer in dict.fromkeys(name for name, _ in TRIED if name):
        valid, refused = TRIED[fuzzer, "valid"], TRIED[fuzzer, "refused"]
        figures.append(f"fuzz {fuzzer}: {valid + refused} inputs tried, {valid} valid, {refused} refused with a "
                       "one-line error, 0 other exceptions")


@pytest.mark.slow
@FUZZ
@given(
    seed=st.sampled_from(sorted(SEEDS)),
    flips=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=8),
    cut=st.one_of(st.none(), st.integers(0, 10_000)),
)
def test_mutated_image_files_decode_or_fail_cleanly(tmp_path: Path, seed: str, flips: list, cut: int | None) -> None:
    data = bytearray(SEEDS[seed])
    for position, value in flips:  # overwrite bytes: headers, chunk lengths, pixel data
        data[position % len(data)] = value
    if cut is not None:  # truncation, as from an interrupted copy
        data = data[: cut % (len(data) + 1)]
    path = tmp_path / "image.png"
    path.write_bytes(bytes(data))
    _decode_or_user_error(path, fuzzer="mutated image files")  # asserts: a uint8 (3, S, S) array or a UserError


@pytest.mark.slow
@FUZZ
@given(data=st.binary(max_size=512))
def test_random_bytes_with_an_image_extension(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "not-really.jpg"
    path.write_bytes(data)
    _decode_or_user_error(path, fuzzer="random bytes as .jpg")  # asserts: a uint8 (3, S, S) array or a UserError


def test_unmutated_seed_files_decode(tmp_path: Path) -> None:
    for name, data in SEEDS.items():
        path = tmp_path / f"{name}.img"
        path.write_bytes(data)
        assert _decode_or_user_error(path) is not None, name


_VALUES = st.one_of(
    st.text(max_size=12), st.integers(-(10**12), 10**12).map(str), st.floats(allow_nan=True).map(str),
    st.sampled_from(["true", "no", "null", "~", "[1, 2]", "{a: 1}", "1e-3", "0x10", ".inf", "-", "'", "demo"]),
    st.sampled_from(["nan", ".nan", "-inf", "1e308", "3.4e38", "1e-308", "-0", "0", "-1", str(2**63), str(2**64),
                     str(10**30), "1_000", " 7 "]),  # the extremes every numeric key must take or refuse in one line
)


@pytest.mark.slow
@FUZZ
@given(
    keys=st.lists(st.one_of(st.sampled_from(KEYS), st.text(max_size=15)), min_size=1, max_size=4),
    values=st.lists(_VALUES, min_size=4, max_size=4),
    separator=st.sampled_from(["=", "==", ":", " = ", ""]),
)
def test_overrides_parse_or_name_the_problem(keys: list[str], values: list[str], separator: str) -> None:
    overrides = [f"{key}{separator}{value}" for key, value in zip(keys, values)]
    try:
        config = load_config(None, overrides)
    except UserError as error:
        assert "\n" not in str(error)
        TRIED["--set overrides", "refused"] += 1
        return
    assert isinstance(config, Config)
    TRIED["--set overrides", "valid"] += 1


@pytest.mark.slow
@FUZZ
@given(
    tree=st.recursive(
        st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=8)),
        lambda children: st.one_of(
            st.lists(children, max_size=3),
            st.dictionaries(st.one_of(st.sampled_from(NAMES), st.text(max_size=6)), children, max_size=4),
        ),
        max_leaves=12,
    )
)
def test_yaml_recipes_load_or_name_the_problem(tmp_path: Path, tree: object) -> None:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(tree))
    try:
        config = load_config(path)
    except UserError as error:
        assert "\n" not in str(error)
        TRIED["YAML recipes", "refused"] += 1
        return
    assert isinstance(config, Config)
    TRIED["YAML recipes", "valid"] += 1


def _load_recipe_bytes(path: Path, data: bytes, fuzzer: str) -> None:
    """``--config`` of these bytes: a Config or a one-line UserError naming the file, never another exception."""
    path.write_bytes(data)
    try:
        config = load_config(path)
    except UserError as error:
        assert "\n" not in str(error) and path.name in str(error), str(error)
        TRIED[fuzzer, "refused"] += 1
        return
    assert isinstance(config, Config)
    TRIED[fuzzer, "valid"] += 1


_YAML_PIECES = [b"data:", b" name:", b" demo", b"\n", b"  ", b"- ", b"[", b"]", b"{", b"}", b": ", b"&a ", b"*a",
                b"!!binary ", b"'", b'"', b"#", b"---\n", b"...", b"\xff", b"\xfe\xff", b"\xc3", b"\xef\xbb\xbf",
                b"\x00", b"\t", b"optim:", b" lr: ", b"1e-3", b".nan", b"? ", b"|", b">"]


@pytest.mark.slow
@FUZZ
@given(data=st.one_of(
    st.binary(max_size=256),  # raw bytes: not UTF-8, NUL, byte-order marks (issue 23, item 12)
    st.lists(st.sampled_from(_YAML_PIECES), max_size=40).map(b"".join),  # YAML-shaped, often not UTF-8
))
def test_raw_bytes_as_a_recipe_load_or_name_the_problem(tmp_path: Path, data: bytes) -> None:
    _load_recipe_bytes(tmp_path / "recipe.yaml", data, "raw bytes as --config")


@pytest.mark.parametrize("depth", [10, 500, pytest.param(5_000, marks=pytest.mark.slow),
                                   pytest.param(100_000, marks=pytest.mark.slow)])  # about 2 s each
@pytest.mark.parametrize("opening", ["[", "{a: ", "- "])
def test_deeply_nested_recipes_load_or_name_the_problem(tmp_path: Path, opening: str, depth: int) -> None:
    """YAML nested thousands deep (PyYAML recurses: a RecursionError traceback before 202b944) (item 12)."""
    closing = {"[": "]", "{a: ": "}", "- ": ""}[opening]  # "- - - 1": block sequences in one another
    _load_recipe_bytes(tmp_path / "recipe.yaml", (opening * depth + "1" + closing * depth).encode(), "deep YAML")


@pytest.mark.parametrize(
    "text", ["data: [", "\t- x", "a: b: c", "%YAML 9.9\n---\n", "\x00", "key: !!python/object:os.system x"]
)
def test_broken_yaml_text(tmp_path: Path, text: str) -> None:
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    with pytest.raises(UserError, match="recipe.yaml"):
        load_config(path)


# ---------------------------------------------------------------------------- every numeric key at its extremes


NUMERIC = sorted(key for key, value in flatten(to_dict(Config())).items() if type(value) in (int, float))
_FLOAT_EXTREMES = ["nan", "-inf", "inf", "1e30", "3.4e38", "1e-30", "-1", "0"]
_INT_EXTREMES = [str(10**30), str(2**64), str(2**63), str(2**63 - 1), "-1", "0", "1"]
EXTREMES = [(key, value) for key in NUMERIC
            for value in (_FLOAT_EXTREMES if isinstance(flatten(to_dict(Config()))[key], float) else _INT_EXTREMES)]
# a tiny run on 256 random 16x16 images (64 in the test split: the kNN monitor runs), 2 steps
_TINY_RUN = ["model.proj_hidden_dim=64", "model.proj_dim=32", "model.pred_hidden_dim=64", "optim.batch_size=32",
             "method.support_size=100", "method.num_prototypes=8", "method.num_clusters=8", "data.image_size=16",
             "data.test_split=test", "train.threads=1", "train.max_steps=2", "train.epochs=1", "train.report=false",
             "optim.warmup_epochs=0", "train.checkpoint_every=1"]


def _method_reading(key: str) -> str:
    """The first method whose record reads ``key`` (nnclr for keys every method reads)."""
    from nnclr.methods import METHODS

    return next((name for name, method in METHODS.items() if key in method.keys), "nnclr")


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("extremes")
    rng = np.random.default_rng(0)
    for split, n in (("train", 256), ("test", 64)):
        np.savez(folder / f"{split}.npz", images=rng.integers(0, 256, (n, 16, 16, 3), dtype=np.uint8),
                 labels=rng.integers(0, 4, n))
    return folder


@pytest.mark.slow  # 260 cases, about 20 s on 2 cores: 60 of them train
@pytest.mark.parametrize(("key", "value"), EXTREMES)
def test_every_numeric_key_at_its_extremes_runs_or_is_one_line(
    tmp_path: Path, tiny_data: Path, key: str, value: str
) -> None:
    """NaN, infinities, huge, negative and zero values of every int and float key: the config is refused in one line,
    or a tiny pretraining runs, or stops with one line (issue 23, item 11: values that passed validation crashed,
    hung or gave garbage). A value that is refused when read may not fail later with another exception."""
    import torch

    from nnclr.train import pretrain

    overrides = [*_TINY_RUN, f"data.name=npz:{tiny_data}", f"method.name={_method_reading(key)}", f"{key}={value}",
                 f"train.run_dir={tmp_path / 'run'}"]
    fuzzer = "numeric keys at their extremes"
    try:
        config = load_config(None, overrides)
    except UserError as error:
        assert "\n" not in str(error) and key in str(error), str(error)
        TRIED[fuzzer, "refused"] += 1
        return
    threads = torch.get_num_threads()
    try:
        pretrain(config, fresh=True, progress=False)
    except UserError as error:  # e.g. optim.lr=1e30: the loss becomes NaN and the run stops, saying what to do
        assert "\n" not in str(error), str(error)
        TRIED[fuzzer, "refused"] += 1
        return
    finally:
        torch.set_num_threads(threads)
    TRIED[fuzzer, "valid"] += 1
