"""The README and the configuration page stay true: every config key documented in docs/configuration.md with its
real default, the test command the README gives is the one .ci/run runs."""

from __future__ import annotations

import re
from pathlib import Path

from nnclr.config import Config, flatten, to_dict

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()
CONFIGURATION = (REPO / "docs" / "configuration.md").read_text()


def _yaml_text(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if value == "":
        return '""'
    return str(value)


def test_every_config_key_is_documented_with_its_default() -> None:
    rows = dict(re.findall(r"^\| `([a-z_]+\.[a-z_]+)` \| `([^`]*)` \|", CONFIGURATION, flags=re.M))
    keys = flatten(to_dict(Config()))
    assert set(rows) == set(keys), f"undocumented: {set(keys) - set(rows)}, stale: {set(rows) - set(keys)}"
    for key, value in keys.items():
        assert rows[key] == _yaml_text(value), f"configuration.md says {key} defaults to {rows[key]}, code: {value!r}"


def test_ci_runs_the_readme_test_command() -> None:
    command = 'python -m pip install -e ".[dev]" && python -m pytest'
    assert command in README
    ci = [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines()]
    assert command in ci
    assert ci.index("python -m ruff check .") > ci.index(command)  # the linter runs too (issue 22)


def test_the_readme_quickstart_is_the_default_run() -> None:
    # the two commands, and the output of the default run: the demo's kNN before and after, and the run directory
    assert "pip install . && nnclr pretrain\n" in README
    assert re.search(r"kNN top-1 on demo/test \(k=20\): before pretraining [\d.]+%, after [\d.]+%", README)
    assert "run directory: runs/nnclr-demo" in README
