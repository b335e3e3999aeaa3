"""User-facing errors.

Anything a user can cause (a bad path, a config mistake, a corrupt image, a checkpoint from
another run) raises :class:`UserError` with a one-line message that says what is wrong and
what to do. The CLI prints it without a traceback and exits with code 2.
"""

from __future__ import annotations

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
