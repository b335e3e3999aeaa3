"""``bench/run.py --smoke`` runs every benchmark script once on tiny sizes and writes BENCHMARKS.md.

The numbers are not checked (tiny sizes, a shared machine); what is checked is that every script
ran and that the file holds each section with a row per alternative. lightly's side runs only where
lightly is installed (``pip install --no-deps -r bench/requirements.txt``); its checks skip otherwise.
``bench/vit.py --smoke`` (not part of run.py) is run on its own; it needs timm (tests/backbone_helpers.py).
"""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
pytestmark = pytest.mark.slow  # every benchmark script, once


def _module(name: str):
    sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> str:
    out = tmp_path_factory.mktemp("bench") / "BENCHMARKS.md"
    assert _module("run").main(["--smoke", "--out", str(out)]) == out
    return out.read_text()


def _rows(text: str, heading: str) -> list[list[str]]:
    section = text.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in section.splitlines()
            if line.startswith("| ") and not line.startswith("| ---")][1:]


NUMBER = re.compile(r"\d+\.\d+")


def test_our_side_of_every_benchmark(report: str) -> None:
    assert "smoke" in report and "| torch |" in report and "## Targets (issue 6)" in report
    throughput = {(row[0], row[1]): row for row in _rows(report, "End-to-end pretraining throughput and peak memory")}
    for method in ("nnclr", "simclr", "kmclr"):
        row = throughput["small_cnn", method]
        assert NUMBER.search(row[2]) and float(row[4]) > 0  # images/s, peak RSS
    assert "small_cnn nnclr end to end: median" in report
    tta = {row[0]: row for row in _rows(report, "Time to accuracy")}
    assert int(tta["nnclr"][1]) >= 1 and tta["nnclr"][4].strip("*").endswith("%")
    precision = _rows(report, "bf16 against fp32: accuracy")
    assert len(precision) == 1 and all(cell.endswith("%") for cell in precision[0][1:3])
    lookup = _rows(report, "Support-set lookup")
    assert [row[0] for row in lookup] == ["512", "1,024"] and all("%" in row[3] for row in lookup)
    evaluation = {row[0]: row for row in _rows(report, "Evaluation speed")}
    assert "features small_cnn" in evaluation and any(name.startswith("kNN") for name in evaluation)
    assert "- `python bench/throughput.py --smoke`" in report and "- `python bench/eval_speed.py --smoke`" in report


def test_lightly_side(report: str) -> None:
    if not _module("loops").lightly_available():
        pytest.skip("lightly is not installed (pip install --no-deps -r bench/requirements.txt): our side only")
    throughput = {(row[0], row[1]): row for row in _rows(report, "End-to-end pretraining throughput and peak memory")}
    assert NUMBER.search(throughput["small_cnn", "lightly nnclr"][2])
    assert "loader worker" in throughput["small_cnn", "lightly nnclr"][4]
    tta = {row[0]: row for row in _rows(report, "Time to accuracy")}
    assert tta["lightly"][4].strip("*").endswith("%") and "time to accuracy (1 s, small_cnn): ours" in report


def test_vit_throughput_smoke(capsys: pytest.CaptureFixture) -> None:
    """``bench/vit.py --smoke``: every backbone trains a step, ViT-Tiny also in fp32 against its default."""
    from backbone_helpers import require_timm

    require_timm()
    results = _module("vit").main(["--smoke"])
    names = list(results["sizes"])
    assert names == ["resnet18", "vit_tiny", "vit_small"] and list(results["settings"]) == ["vit_tiny"]
    out = capsys.readouterr().out
    tables = [block for block in out.split("\n\n") if block.startswith("| backbone |")]
    backbones, settings = ([[cell.strip() for cell in line.strip("|").split("|")] for line in table.splitlines()[2:]
                            if line.startswith("| ")]
                           for table in tables)
    assert [row[0] for row in backbones] == names and all(NUMBER.search(row[3]) for row in backbones)
    assert [row[:2] for row in settings] == [["vit_tiny", "default"], ["vit_tiny", "fp32"]]
