"""Signals at chosen moments, for the tests that run ``python -m nnclr`` as a user does (``tests/test_cli.py``).

With this folder on ``PYTHONPATH``, Python imports this file at start-up (``sitecustomize``). It does nothing
unless ``NNCLR_TEST_SIGNALS`` is set (and removes it, so that child processes do nothing): moments separated
by ``;``, each ``WHERE=SIG[,SIG...]``, where ``WHERE`` is

* ``module:attribute[:n]``: at the start of the n-th call (default 1) of ``module.attribute`` (dotted, e.g.
  ``nnclr.pretrained:Pretrained.embed``), replaced before the commands import it;
* ``write:NAME:n[:k]``: at the k-th write (default 1) into the n-th file whose name contains ``NAME`` opened
  through :mod:`nnclr.rundir`'s writers (the ``_open`` seam the kill campaign uses), e.g. inside a checkpoint.

There the process sends itself each signal in turn, every one of them even when an earlier one raised (a
user pressing Ctrl-C again while the first unwinds), and notes each on stderr's file descriptor as
``seam: SIGINT at WHERE``.
"""

from __future__ import annotations

import functools
import importlib
import os
import signal

_SPEC = os.environ.pop("NNCLR_TEST_SIGNALS", "")


def _send(signals: list[int], where: str) -> None:
    if not signals:
        return
    try:
        os.write(2, f"seam: {signal.Signals(signals[0]).name} at {where}\n".encode())
        os.kill(os.getpid(), signals[0])
    finally:
        _send(signals[1:], where)


def _at_call(target: str, n: int, signals: list[int]) -> None:
    module_name, attribute = target.split(":")
    owner = importlib.import_module(module_name)
    *path, name = attribute.split(".")
    for part in path:
        owner = getattr(owner, part)
    real, calls = getattr(owner, name), [0]

    @functools.wraps(real)
    def wrapper(*args, **kwargs):
        calls[0] += 1
        if calls[0] == n:
            _send(signals, f"{target}:{n}")
        return real(*args, **kwargs)

    setattr(owner, name, wrapper)


class _SignallingFile:
    def __init__(self, file, signals: list[int], where: str, write: int) -> None:
        self.file, self.signals, self.where, self.left = file, signals, where, write

    def write(self, data) -> int:
        self.left -= 1
        if self.left == 0:
            _send(self.signals, self.where)
        return self.file.write(data)

    def __getattr__(self, name: str):
        return getattr(self.file, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.file.close()


def _at_write(name: str, n: int, write: int, signals: list[int]) -> None:
    from nnclr import rundir

    real, opened = rundir._open, [0]

    def open_(path, mode):
        file = real(path, mode)
        if name in os.path.basename(str(path)):
            opened[0] += 1
            if opened[0] == n:
                return _SignallingFile(file, signals, f"write:{name}:{n}:{write}", write)
        return file

    rundir._open = open_


for _moment in filter(None, _SPEC.split(";")):
    _where, _names = _moment.split("=")
    _signals = [getattr(signal, s) for s in _names.split(",")]
    _kind, _target, *_counts = _where.split(":")
    if _kind == "write":
        _at_write(_target, int(_counts[0]), int((_counts[1:] or [1])[0]), _signals)
    else:
        _at_call(f"{_kind}:{_target}", int((_counts or [1])[0]), _signals)
