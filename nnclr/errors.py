"""User-facing errors.

Anything a user can cause (a bad path, a config mistake, a corrupt image, a checkpoint from
another run) raises :class:`UserError` with a one-line message that says what is wrong and
what to do. The CLI prints it without a traceback and exits with code 2.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def shown_path(path: str | Path, limit: int = 80) -> str:
    """``path`` for a one-line message: cut in the middle when longer than ``limit`` characters, saying how long."""
    text = str(path)
    return text if len(text) <= limit else f"{text[:limit // 2]}...{text[-limit // 4:]} ({len(text)} characters)"


class UserError(Exception):
    """A mistake the user can fix; the message is shown as-is, on one line."""


class Interrupted(KeyboardInterrupt):
    """A run stopped by a signal (Ctrl-C, SIGTERM) after saving; the CLI exits with 128 + ``signum``."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


@contextmanager
def data_named_as_typed(**flags: str | None) -> Iterator[None]:
    """The data layer names its config key (``data.name='X': ...``); where the user typed X as a flag of a
    command (``--data X``: ``data_named_as_typed(data=args.data)``), its errors name that flag instead.

    The flag is the one whose value the message quotes, else the only one given; messages about the data a
    checkpoint was trained on (no flag typed) keep ``data.name``.
    """
    try:
        yield
    except UserError as error:
        text = str(error)
        given = {flag: value for flag, value in flags.items() if value}
        if not text.startswith("data.name=") or not given:
            raise
        rest = text.removeprefix("data.name=")
        quoted = [flag for flag, value in given.items() if rest.startswith(repr(value))]
        if not quoted and len(given) > 1:
            raise
        flag = (quoted or list(given))[0]
        raise UserError(f"--{flag.replace('_', '-')} {rest}") from None
