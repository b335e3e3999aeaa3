"""``nnclr report``: one self-contained HTML file that shows what a pretraining run learned.

:func:`write_report` reads a run directory (config, checkpoint, ``metrics.jsonl``,
``results.json``, ``eval/*.json``), plots the training curves and the nearest-neighbour
diagnostics, and, with the run's encoder and images, draws neighbour galleries, a 2-D map of the
test embeddings and (KMCLR) prototype usage. Modules: ``data`` (reading the run directory),
``run_sections`` (summary, curves, evaluation table), ``visuals`` (galleries, map, prototypes),
``galleries``, ``embedding_map``, ``plots``, ``html`` and ``build`` (putting the page together).
"""

from __future__ import annotations

from pathlib import Path

from nnclr.rundir import REPORT as REPORT_NAME

__all__ = ["REPORT_NAME", "write_report"]


def write_report(run_dir: str | Path, out: str | Path | None = None, galleries: bool = True) -> Path:
    """Write the HTML report of a run directory: see :func:`nnclr.report.build.write_report` (imports torch)."""
    from nnclr.report.build import write_report as _write_report

    return _write_report(run_dir, out, galleries=galleries)
