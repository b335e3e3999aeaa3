"""Fuzzing the files of an EMB_DIR that search, duplicates and embed read: ``manifest.json`` and ``index.csv``.

The guarantee (as ``test_fuzz.py``'s for images and the config): whatever a damaged or crafted
``manifest.json`` (any JSON value, any field replaced, removed or added) or ``index.csv`` holds,
:func:`nnclr.use.embeddings.open_embeddings` returns a usable EMB_DIR or raises a one-line
:class:`~nnclr.errors.UserError`, and ``nnclr duplicates`` on it exits 0 or 2 with one line,
never a traceback. ``NNCLR_FUZZ_EXAMPLES`` / ``NNCLR_LONG_CAMPAIGN`` set the number of cases, as
for the other fuzzers; the figures are printed in the test summary.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from use_helpers import run_main

from nnclr.errors import UserError
from nnclr.use.embeddings import INDEX_FILE, MANIFEST_FILE, Entry, open_embeddings, save_embeddings

LONG = os.environ.get("NNCLR_LONG_CAMPAIGN") == "1"
EXAMPLES = int(os.environ.get("NNCLR_FUZZ_EXAMPLES", "5000" if LONG else "150"))
FUZZ = settings(
    max_examples=EXAMPLES, deadline=None, derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
pytestmark = pytest.mark.slow  # 300 cases, about 12 s
N, DIM = 5, 8
FIELDS = ["format_version", "checkpoint_hash", "checkpoint", "source", "count", "embeddings_sha256", "skipped",
          "feature_dim", "classes", "complete", "commit", "precision", "data_root", "step", "config"]

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.sampled_from(FIELDS + ["path", "kind",
                                                                                              "name", "split",
                                                                                              "reason", "size",
                                                                                              "mtime_ns"]),
                                                                       children, max_size=4),
    max_leaves=12,
)
TRIED: Counter = Counter()


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A valid EMB_DIR of 5 vectors: what each case changes a copy of."""
    root = tmp_path_factory.mktemp("good")
    vectors = np.eye(N, DIM, dtype=np.float32)
    manifest = {"format_version": 1, "checkpoint_hash": "0123456789abcdef", "checkpoint": "/nowhere/checkpoint.pt",
                "source": {"kind": "folder", "path": "/nowhere"}, "feature_dim": DIM, "precision": "fp32",
                "skipped": [{"path": "bad.png", "reason": "truncated", "size": 3, "mtime_ns": 4}],
                "classes": ["a", "b"], "complete": True}
    save_embeddings(root, vectors, [Entry(f"{'ab'[i % 2]}/{i}.png", i % 2, "ab"[i % 2], i, i) for i in range(N)],
                    manifest)
    return root


@pytest.fixture(scope="module", autouse=True)
def _report(figures: list[str]):
    yield
    if TRIED:
        figures.append(f"fuzz EMB_DIR files: {sum(TRIED.values())} inputs tried, {TRIED['opened']} opened, "
                       f"{TRIED['refused']} refused with a one-line error")


def _copy(good: Path, tmp_path: Path) -> Path:
    root = tmp_path / f"emb{sum(TRIED.values())}"
    root.mkdir()
    for path in good.iterdir():
        (root / path.name).write_bytes(path.read_bytes())
    return root


def _check(root: Path, capsys: pytest.CaptureFixture) -> None:
    try:
        emb = open_embeddings(root)
    except UserError as error:
        assert "\n" not in str(error) and str(root) in str(error)
        TRIED["refused"] += 1
    else:
        assert emb.vectors.shape == (len(emb.entries), DIM) and isinstance(emb.checkpoint_hash, str)
        assert emb.source["kind"] in ("folder", "dataset")
        TRIED["opened"] += 1
    result = run_main(capsys, "duplicates", "--embeddings", str(root), "--threshold", "0.5")
    assert result.returncode in (0, 2), result.stderr
    if result.returncode == 2:
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr


@FUZZ
@given(changes=st.dictionaries(st.sampled_from(FIELDS), json_values | st.just(...), max_size=4),
       whole=st.none() | json_values)
def test_a_crafted_manifest_opens_or_is_one_line(
    good: Path, tmp_path: Path, capsys: pytest.CaptureFixture, changes: dict, whole: object
) -> None:
    root = _copy(good, tmp_path)
    manifest = json.loads((root / MANIFEST_FILE).read_text())
    if whole is not None:
        manifest = whole
    else:
        for key, value in changes.items():
            if value is ...:
                manifest.pop(key, None)
            else:
                manifest[key] = value
    (root / MANIFEST_FILE).write_text(json.dumps(manifest))
    _check(root, capsys)


@FUZZ
@given(lines=st.lists(st.lists(st.text(max_size=8) | st.integers(-2**70, 2**70).map(str), max_size=8), max_size=7),
       keep_header=st.booleans())
def test_a_crafted_index_opens_or_is_one_line(
    good: Path, tmp_path: Path, capsys: pytest.CaptureFixture, lines: list, keep_header: bool
) -> None:
    root = _copy(good, tmp_path)
    header = (root / INDEX_FILE).read_text().splitlines()[0]
    rows = [",".join(json.dumps(cell) if "," in cell or '"' in cell else cell for cell in line) for line in lines]
    (root / INDEX_FILE).write_text("\n".join(([header] if keep_header else []) + rows) + "\n")
    _check(root, capsys)
