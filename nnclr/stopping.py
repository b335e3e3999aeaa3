"""Stopping a run cleanly: the first Ctrl-C or SIGTERM asks the loop to stop at the next step boundary.

The training loop then saves a checkpoint and raises :class:`~nnclr.errors.Interrupted`; a second
signal interrupts at once.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from nnclr.errors import Interrupted


@contextmanager
def stop_requests() -> Iterator[list[int]]:
    """Turn the first Ctrl-C/SIGTERM into a request to stop at the next step boundary.

    Yields a one-element list holding the signal's number once one came (0 before).
    """
    requested = [0]

    def handler(signum: int, frame: Any) -> None:
        if requested[0]:
            raise Interrupted(signum)
        requested[0] = signum

    try:
        previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    except ValueError:  # not the main thread: no signal handling
        previous = {}
    try:
        yield requested
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
