"""``nnclr report RUN_DIR [--out FILE.html] [--no-galleries]``."""

from __future__ import annotations

import argparse
from typing import Any

from nnclr.rundir import EVAL, REPORT


def add_parser(commands: Any) -> None:
    """Add the ``report`` subcommand to ``commands`` (argparse subparsers)."""
    report = commands.add_parser(
        "report",
        help="write a self-contained HTML report of a run (curves, NN diagnostics, evaluation, galleries, map)",
        description="Write one HTML file that opens offline: the run's summary and config, training curves and "
        f"nearest-neighbour diagnostics, evaluation results found in RUN_DIR/{EVAL}, neighbour galleries, a 2-D map "
        "of the test embeddings and, for KMCLR, prototype usage. Anything missing is named in the report.",
    )
    report.add_argument("run_dir", metavar="RUN_DIR", help="a run directory of `nnclr pretrain`")
    report.add_argument("--out", metavar="FILE.html", help=f"where to write it (default RUN_DIR/{REPORT})")
    report.add_argument(
        "--no-galleries", action="store_true",
        help="do not load the training split: no neighbour galleries (the map still uses the test split)",
    )


def run(args: argparse.Namespace) -> int:
    """Write the report and print its path."""
    from nnclr.report.data import require_run_dir

    require_run_dir(args.run_dir)  # a wrong path fails before torch is imported
    from nnclr.report import write_report

    path = write_report(args.run_dir, args.out, galleries=not args.no_galleries)
    print(f"report: {path}")
    return 0
