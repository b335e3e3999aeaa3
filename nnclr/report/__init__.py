"""``nnclr report``: one self-contained HTML file that shows what a pretraining run learned.

:func:`write_report` reads a run directory (config, checkpoint, ``metrics.jsonl``,
``results.json``, ``eval/*.json``), plots the training curves and the nearest-neighbour
diagnostics, and, with the run's encoder and images, draws neighbour galleries, a 2-D map of the
test embeddings and (KMCLR) prototype usage. Modules: ``data`` (reading the run directory),
``run_sections`` (summary, curves, evaluation table), ``visuals`` (galleries, map, prototypes),
``galleries``, ``embedding_map``, ``plots``, ``html`` and ``build`` (putting the page together).
"""

from nnclr.report.build import REPORT_NAME, write_report

__all__ = ["REPORT_NAME", "write_report"]
