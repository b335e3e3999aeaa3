"""The ``nnclr`` command: one subcommand per module of :mod:`nnclr.commands`.

Every mistake a user can make ends in a one-line ``nnclr: error: ...`` and exit code 2, with
no traceback; an interrupted run (Ctrl-C, SIGTERM) saves what it has and exits with 130 (143 for SIGTERM), in
one line also when a second or third signal cuts the save short (:mod:`nnclr.stopping`).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import warnings
from collections.abc import Sequence
from typing import NoReturn

from nnclr import stopping
from nnclr.commands import COMMANDS
from nnclr.config import MAX_SEED, device_problem
from nnclr.errors import UserError
from nnclr.libtiff import quiet_libtiff
from nnclr.machine import usable_cpus
from nnclr.version import __version__


def device_type(text: str) -> str:
    """An argparse type for ``--device``: auto, cpu, cuda or cuda:N (CUDA's presence is checked when the command runs,
    by :func:`nnclr.runtime.resolve_device`)."""
    problem = device_problem(text)
    if problem:
        raise argparse.ArgumentTypeError(f"{text!r} {problem}")
    return text


def whole_number(text: str, lowest: int, highest: int = 2**63 - 1, why: str = "int64") -> int:
    """An argparse value: the whole number ``text`` in [``lowest``, ``highest``] (``why``: where the top comes from)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < lowest:
        raise argparse.ArgumentTypeError(f"{value} must be >= {lowest}")
    if value > highest:
        raise argparse.ArgumentTypeError(f"{value} must be at most {highest} ({why})")
    return value


def positive_int(text: str) -> int:
    """An argparse type: a whole number >= 1."""
    return whole_number(text, 1)


def threads_type(text: str) -> int:
    """An argparse type for ``--threads``: 0 (the default, as ``train.threads=0``) to the CPUs this process may use."""
    cpus = len(usable_cpus())
    return whole_number(text, 0, cpus, f"the {cpus} CPUs this process may use; 0 = one per physical core")


def seed_type(text: str) -> int:
    """An argparse type for ``--seed``: what torch.manual_seed takes, as ``train.seed``."""
    return whole_number(text, 0, MAX_SEED, "2^64 - 1: what torch.manual_seed takes")


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors as one line ``nnclr: error: ...`` (no usage block), exit code 2.

    argparse's messages name the flag and, for choices, the allowed values; an unknown flag also
    gets the command's flags listed.
    """

    def error(self, message: str) -> NoReturn:
        if message.startswith("unrecognized arguments"):
            flags = sorted({o for a in self._actions for o in a.option_strings if o.startswith("--")})
            message += f"; {self.prog} takes: {', '.join(flags)}"
        self.exit(2, f"nnclr: error: {' '.join(message.split())} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The whole ``nnclr`` parser, every command's subparser added (the documentation tests read every flag from it)."""
    parser = _Parser(
        prog="nnclr",
        description="Self-supervised contrastive pretraining of image encoders (NNCLR, SimCLR, KMCLR), "
        "and what to do with them afterwards.",
    )
    parser.add_argument("--version", action="version", version=f"nnclr {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        importlib.import_module(f"nnclr.commands.{name}").add_parser(commands)
    return parser


def _innermost(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.ArgumentParser:
    """The parser of the subcommand ``args`` chose, descending nested subcommands (``nnclr eval knn``)."""
    while True:
        nested = next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
        if nested is None or getattr(args, nested.dest, None) not in nested.choices:
            return parser
        parser = nested.choices[getattr(args, nested.dest)]


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``nnclr`` console script."""
    # Pillow warns about damaged metadata ("Truncated File Read", "Corrupt EXIF data") in two
    # lines per file; such files are decoded or skipped and reported in one line all the same.
    # (In the CLI only: a library must not change the warning filters of its caller.)
    warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.")
    # libtiff's own lines about a corrupt TIFF (from C), and Pillow's logged errors ("More samples per pixel than
    # can be decoded", which Python's last-resort handler prints): the file is skipped and named all the same
    quiet_libtiff()
    logging.getLogger("PIL").addHandler(logging.NullHandler())  # records still reach handlers configured above
    # argv None: this process is the ``nnclr`` command, which ends once main returns; once a signal stopped it,
    # a further one while the interpreter exits (joining decode threads, atexit) ends it at once
    with stopping.interrupts(restore=argv is not None):
        try:
            parser = build_parser()
            args, unknown = parser.parse_known_args(argv)
            if unknown:  # reported by the innermost subcommand's parser (``nnclr eval knn``), which lists its flags
                _innermost(parser, args).error(f"unrecognized arguments: {' '.join(unknown)}")
            command = importlib.import_module(f"nnclr.commands.{args.command}")
            return command.run(args)
        except BaseException as error:  # noqa: BLE001 - an interrupt may hide in any error's context
            return _stopped(error)


def _stopped(error: BaseException) -> int:
    """Report ``error`` in one line and return the exit code: 130 for Ctrl-C, 143 for SIGTERM (128 + the signal,
    as shells report), also when the interrupt surfaced as another error (:func:`nnclr.stopping.interrupted_by`);
    2 for a UserError. Anything else (a bug, argparse's exit) is re-raised."""
    interrupt = stopping.interrupted_by(error)
    if interrupt is not None:
        code = 128 + interrupt.signum
        stopping.exit_at_once_on_signal(code)  # the user insists: no traceback from here on
        print("nnclr: interrupted", file=sys.stderr)
        return code
    if isinstance(error, UserError):
        rank = os.environ.get("RANK", "0")  # under torchrun every process reports; name the others
        where = "" if rank == "0" else f" (rank {rank})"
        print(f"nnclr: error{where}: {error}", file=sys.stderr)
        return 2
    raise error
