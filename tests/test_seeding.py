"""RNG streams: named once, distinct, and never passed to derive_seed as a literal number."""

from __future__ import annotations

import ast
from pathlib import Path

from nnclr import seeding

PACKAGE = Path(__file__).resolve().parents[1] / "nnclr"


def test_the_streams_keep_their_numbers() -> None:
    """Checkpoints replay draws made with these numbers: they never change."""
    streams = (seeding.ORDER, seeding.AUGMENT, seeding.CLUSTER, seeding.CROPS, seeding.SELECT)
    assert streams == (1, 2, 3, 4, 5)


def _derive_seed_calls(path: Path) -> list[ast.Call]:
    calls = [node for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.Call)]
    return [call for call in calls if getattr(call.func, "id", getattr(call.func, "attr", "")) == "derive_seed"]


def test_derive_seed_is_called_with_named_streams_only() -> None:
    calls = {path: _derive_seed_calls(path) for path in PACKAGE.rglob("*.py")}
    assert sum(map(len, calls.values())) >= 5  # the check sees the calls (loop, streaming loader)
    literal = [f"{path.relative_to(PACKAGE)}:{call.lineno}" for path, found in calls.items() for call in found
               if len(call.args) < 2 or isinstance(call.args[1], ast.Constant)]
    assert not literal
