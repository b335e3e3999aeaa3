"""``nnclr report``: a self-contained HTML report of a pretraining run (see docs/report.md).

:func:`write_report` reads a run directory (config, checkpoint, metrics, results, eval results),
plots the training curves and NN diagnostics, and, from the run's data, draws neighbour galleries,
a 2-D map of the test embeddings and (KMCLR) prototype usage. :class:`TensorBoardLog` mirrors the
scalars and galleries to TensorBoard when it is installed.
"""

from nnclr.report.build import write_report
from nnclr.report.tensorboard import TensorBoardLog

__all__ = ["TensorBoardLog", "write_report"]
