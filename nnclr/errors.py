"""User-facing errors.

Anything a user can cause (a bad path, a config mistake, a corrupt image, a checkpoint from
another run) raises :class:`UserError` with a one-line message that says what is wrong and
what to do. The CLI prints it without a traceback and exits with code 2.
"""


class UserError(Exception):
    """A mistake the user can fix; the message is shown as-is, on one line."""


class Interrupted(KeyboardInterrupt):
    """A run stopped by a signal (Ctrl-C, SIGTERM) after saving; the CLI exits with 128 + ``signum``."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum
