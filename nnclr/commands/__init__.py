"""The ``nnclr`` subcommands, one module each.

Each module has ``add_parser(commands)``, which adds its ``argparse`` subparser, and
``run(args) -> int``. Modules import torch and the heavy parts of the package inside ``run``,
so that ``nnclr --help`` and argument mistakes stay fast. Add a command by writing its module
and one entry in :data:`COMMANDS`.
"""

COMMANDS: tuple[str, ...] = ("pretrain", "eval", "report", "embed", "search", "duplicates", "export")
"""Subcommand names, in the order ``nnclr --help`` lists them; module ``nnclr.commands.<name>``."""
