"""Ctrl-C and SIGTERM: every command stops in one line, a training run first at a step boundary.

* :func:`interrupts` (the CLI, around every command): a Ctrl-C or SIGTERM raises
  :class:`~nnclr.errors.Interrupted` (a ``KeyboardInterrupt`` carrying the signal's number), so SIGTERM
  unwinds like Ctrl-C: ``finally`` blocks run, a half-written temporary file is removed, locks are released.
  Every further signal raises again (the user insists: whatever cleanup is slow is cut short).
* :func:`stop_requests` (the training loop): the first signal only asks the loop to stop at the next step
  boundary (it then saves a checkpoint and raises :class:`~nnclr.errors.Interrupted` itself); the second
  interrupts at once, as above.
* :func:`interrupted_by`: an exception raised *because of* an interrupt is the interrupt. Raised inside
  a callback of C code, or in a ``with`` block whose ``__exit__`` then fails (``torch.save``'s zip writer
  turns it into ``RuntimeError: ... unexpected pos``), the ``Interrupted`` survives only as the
  ``__context__`` of another error; a ``from None`` (a one-line UserError) keeps it there too.
* :func:`exit_at_once_on_signal`: once the command has stopped, a signal during the interpreter's exit
  (joining decode threads, atexit handlers) ends the process at once with the exit code already chosen,
  instead of a second traceback ("Exception ignored in ...") or a wait.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from nnclr.errors import Interrupted

SIGNALS = (signal.SIGINT, signal.SIGTERM)
_raised: list[int] = []  # the signals that raised Interrupted in this process (the last command's)


def _raise(signum: int) -> None:
    _raised.append(signum)
    raise Interrupted(signum)


def _install(handler: Any) -> dict[int, Any]:
    """Install ``handler`` for SIGINT and SIGTERM; the previous handlers ({} when not in the main thread)."""
    try:
        return {s: signal.signal(s, handler) for s in SIGNALS}
    except ValueError:  # not the main thread: no signal handling
        return {}


def _restore(previous: dict[int, Any]) -> None:
    for s, h in previous.items():
        signal.signal(s, h)


@contextmanager
def interrupts(restore: bool = True) -> Iterator[None]:
    """Within: Ctrl-C and SIGTERM raise :class:`~nnclr.errors.Interrupted` (``signum`` 2 or 15).

    ``restore``: put the previous handlers back at the end (False: the process ends next, and keeps whatever
    handler is installed last, e.g. :func:`exit_at_once_on_signal`'s).
    """
    _raised.clear()
    previous = _install(lambda signum, frame: _raise(signum))
    try:
        yield
    finally:
        if restore:
            _restore(previous)


@contextmanager
def stop_requests() -> Iterator[list[int]]:
    """Turn the first Ctrl-C/SIGTERM into a request to stop at the next step boundary; the second raises.

    Yields a one-element list holding the signal's number once one came (0 before).
    """
    requested = [0]

    def handler(signum: int, frame: Any) -> None:
        if requested[0]:
            _raise(signum)
        requested[0] = signum

    previous = _install(handler)
    try:
        yield requested
    finally:
        _restore(previous)


def interrupted_by(error: BaseException) -> Interrupted | None:
    """The interrupt ``error`` is (a KeyboardInterrupt) or was raised while handling, else None.

    Follows ``__context__`` and ``__cause__`` (an error raised in a ``finally``/``__exit__`` or translated
    ``from None`` while an interrupt propagated). An error of any kind that ends a command after a signal
    raised :class:`~nnclr.errors.Interrupted` in :func:`interrupts` or :func:`stop_requests` counts too: C
    code may have swallowed the interrupt and raised its own error without a context.
    """
    seen: set[int] = set()
    link: BaseException | None = error
    while link is not None and id(link) not in seen:
        seen.add(id(link))
        if isinstance(link, KeyboardInterrupt):
            return link if isinstance(link, Interrupted) else Interrupted(getattr(link, "signum", signal.SIGINT))
        link = link.__cause__ or link.__context__
    return Interrupted(_raised[0]) if _raised else None


def exit_at_once_on_signal(code: int) -> None:
    """From now on, a Ctrl-C or SIGTERM ends the process at once with ``code`` (nothing more is printed).

    For the ``nnclr`` process after its command stopped on an interrupt: the interpreter's exit joins
    worker threads and runs atexit handlers, which a further signal would otherwise interrupt with a traceback.
    """

    def handler(signum: int, frame: Any) -> None:
        os._exit(code)

    _install(handler)
