"""``bench/bench_use.py --quick`` runs and reports every case (a smoke test; the numbers are not checked)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "bench_use.py"


def test_bench_use_quick_reports_the_three_targets(capsys: pytest.CaptureFixture) -> None:
    spec = importlib.util.spec_from_file_location("bench_use", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    values = bench.main(["--quick"])
    out = capsys.readouterr().out
    for name in ("embed memory", "embed folder", "exact search"):
        assert len(values[name]) == 1 and values[name][0] > 0
        assert next(line for line in out.splitlines() if line.startswith(name)).count("target") == 1
    assert "decode PNG only" in out and "load average" in out
