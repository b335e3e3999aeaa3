"""The ``nnclr`` command: one subcommand per module of :mod:`nnclr.commands`.

Every mistake a user can make ends in a one-line ``nnclr: error: ...`` and exit code 2, with
no traceback; an interrupted run (Ctrl-C, SIGTERM) saves what it has and exits with 130 (143 for SIGTERM).
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
from collections.abc import Sequence

from nnclr import __version__
from nnclr.commands import COMMANDS
from nnclr.errors import UserError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nnclr",
        description="Self-supervised contrastive pretraining of image encoders (NNCLR, SimCLR, KMCLR), "
        "and what to do with them afterwards.",
    )
    parser.add_argument("--version", action="version", version=f"nnclr {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        importlib.import_module(f"nnclr.commands.{name}").add_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``nnclr`` console script."""
    args = _parser().parse_args(argv)
    command = importlib.import_module(f"nnclr.commands.{args.command}")
    try:
        return command.run(args)
    except UserError as error:
        rank = os.environ.get("RANK", "0")  # under torchrun every process reports; name the others
        where = "" if rank == "0" else f" (rank {rank})"
        print(f"nnclr: error{where}: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as interrupt:  # 130 for Ctrl-C, 143 for SIGTERM (128 + the signal, as shells report)
        print("nnclr: interrupted", file=sys.stderr)
        return 128 + getattr(interrupt, "signum", signal.SIGINT)
