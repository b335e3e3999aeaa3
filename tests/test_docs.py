"""The manual stays whole: every flag of every command is documented on the command's page, every relative link of
the README and of docs/ leads to a file (and heading) that exists, the README stays a front page, and the manual
describes the software, not the machines it was developed on."""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

import nnclr
from nnclr.cli import build_parser
from nnclr.commands import COMMANDS
from nnclr.config import Config, flatten, to_dict

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
DOCS = sorted((REPO / "docs").glob("*.md"))
LINKED = [README, *DOCS, REPO / "RESULTS.md", REPO / "BENCHMARKS.md"]
FENCE = re.compile(r"^```.*?^```", flags=re.S | re.M)
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
FILE_SUFFIX = r"\.(?:py|pt|html|yaml|json|jsonl|md|npz|npy|csv|png)$"


def _prose(path: Path) -> str:
    """A markdown file without its fenced code blocks (their `#` lines are not headings, their brackets no links)."""
    return FENCE.sub("", path.read_text())


def _flags(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> Iterator[tuple[str, str]]:
    """(command path, long flag) of a parser and of its nested subcommands (``nnclr eval knn``), without --help."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _flags(sub, (*path, name))
        for flag in action.option_strings:
            if flag.startswith("--") and flag != "--help":
                yield " ".join(path), flag


def _documented(flag: str, text: str) -> bool:
    return re.search(re.escape(flag) + r"(?![\w-])", text) is not None


def _command_pages() -> dict[str, Path]:
    """Each command's manual page, as the README's table of commands links it (its row's last cell)."""
    pages = {}
    for line in README.read_text().splitlines():
        row = re.match(r"^\| `nnclr (\w+)[^`]*` \|.*\]\((docs/[\w.-]+\.md)\) \|$", line)
        if row:
            pages[row.group(1)] = REPO / row.group(2)
    return pages


def test_every_command_has_a_row_in_the_readme_and_a_page() -> None:
    pages = _command_pages()
    assert list(pages) == list(COMMANDS), "README's table of commands lists every command, in `nnclr --help` order"
    assert all(page.is_file() for page in pages.values()), pages


@pytest.mark.parametrize("command", COMMANDS)
def test_every_flag_of_every_command_is_on_its_page(command: str) -> None:
    parser = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
    page = _command_pages()[command]
    text = page.read_text()
    flags = list(_flags(parser, (command,)))
    assert flags, command
    missing = sorted({f"nnclr {path} {flag}" for path, flag in flags if not _documented(flag, text)})
    assert missing == [], f"not in {page.relative_to(REPO)}: {missing}"


def test_the_top_level_flags_are_in_the_readme() -> None:
    flags = [flag for path, flag in _flags(build_parser()) if path == ""]
    assert flags == ["--version"]
    assert all(_documented(flag, README.read_text()) for flag in flags)


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped (not `-` or `_`), spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    anchors: set[str] = set()
    seen: dict[str, int] = {}
    for heading in re.findall(r"^#{1,6} (.+)$", _prose(path), flags=re.M):
        slug = _slug(heading)
        anchors.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
        seen[slug] = seen.get(slug, 0) + 1
    return anchors


def test_the_slug_is_githubs() -> None:
    assert _slug("Python: `nnclr.load`") == "python-nnclrload"
    assert _slug("Start-up on 100,000 files") == "start-up-on-100000-files"
    assert _slug("What nnclr guarantees") == "what-nnclr-guarantees"


@pytest.mark.parametrize("path", LINKED, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_leads_to_a_file_and_heading_that_exist(path: Path) -> None:
    broken = []
    for target in LINK.findall(_prose(path)):
        if re.match(r"^[a-z]+:", target):  # https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        linked = (path.parent / file).resolve() if file else path
        if not linked.exists():
            broken.append(f"{target}: no such file")
        elif anchor and linked.suffix == ".md" and anchor not in _anchors(linked):
            broken.append(f"{target}: no heading #{anchor} in {linked.relative_to(REPO)}")
    assert broken == [], f"{path.relative_to(REPO)}: {broken}"


def test_every_docs_page_is_linked_from_the_readme() -> None:
    links = {(REPO / target.partition("#")[0]).resolve() for target in LINK.findall(_prose(README))}
    assert [page.name for page in DOCS if page not in links] == []


def test_the_readme_is_a_front_page() -> None:
    lines = README.read_text().splitlines()
    assert len(lines) <= 200, f"README.md has {len(lines)} lines: the reference belongs in docs/"


@pytest.mark.parametrize("path", [README, *DOCS], ids=lambda p: str(p.relative_to(REPO)))
def test_the_manual_speaks_of_the_software_not_of_a_machine(path: Path) -> None:
    # measurements name their CPU in RESULTS.md and BENCHMARKS.md; the manual describes what nnclr does anywhere
    phrases = r"this (?:project's |session's |2-core )?(?:machine|VM|CPU)\b|shared (?:machine|VM)|machine was shared"
    found = re.findall(phrases, path.read_text(), flags=re.I)
    assert found == [], f"{path.relative_to(REPO)}: {found}"


@pytest.mark.parametrize("path", [p for p in LINKED if p.name != "kmclr.md"], ids=lambda p: str(p.relative_to(REPO)))
def test_every_file_and_name_of_the_package_the_manual_cites_exists(path: Path) -> None:
    # `nnclr/x.py`, `tests/test_x.py`, `configs/x.yaml` and `module.Name` (e.g. `train.train_step`) in code spans;
    # docs/kmclr.md cites another repository's files. Config keys (`train.seed`) and file names are not names.
    modules = {m.name.removeprefix("nnclr.") for m in pkgutil.walk_packages(nnclr.__path__, "nnclr.")}
    keys = set(flatten(to_dict(Config())))
    missing = []
    for code in re.findall(r"`([^`\n]+)`", path.read_text()):
        for cited in re.finditer(r"(?<![\w/])((?:nnclr|tests|bench|configs|experiments)/[\w/.-]*\w)", code):
            if not code[cited.end():].startswith("/<") and not (REPO / cited.group(1)).exists():
                missing.append(cited.group(1))
        name = re.fullmatch(r"(?:nnclr\.)?([a-z_]+(?:\.[a-z_]+)*)\.([A-Za-z_]\w*)(?:\.(\w+))?", code.strip())
        if name and name.group(1) in modules and code.strip() not in keys and not re.search(FILE_SUFFIX, code):
            found = getattr(importlib.import_module(f"nnclr.{name.group(1)}"), name.group(2), None)
            if found is None or (name.group(3) and not hasattr(found, name.group(3))):
                missing.append(code)
    assert missing == [], f"{path.relative_to(REPO)} cites what the repository does not have: {missing}"
