"""The method registry: every method is one record that the config, model, loop and report follow;
the import direction of the package; the version written once."""

from __future__ import annotations

import ast
import dataclasses
import re
from pathlib import Path

import pytest
import torch
from tiny import SMALLER_HEADS

from nnclr.config import METHODS as CONFIG_METHODS
from nnclr.config import MethodConfig, load_config
from nnclr.errors import UserError
from nnclr.methods import METHODS, BuildContext, method_of
from nnclr.model import build_model
from nnclr.selectors import Selector
from nnclr.version import __version__

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "nnclr"


def test_the_config_offers_exactly_the_registered_methods() -> None:
    assert set(CONFIG_METHODS) == set(METHODS)
    assert all(name == method.name for name, method in METHODS.items())


@pytest.mark.parametrize("name", list(METHODS))
def test_a_record_reads_only_keys_that_exist(name: str) -> None:
    fields = {f"method.{f.name}" for f in dataclasses.fields(MethodConfig)}
    assert set(METHODS[name].keys) <= fields


@pytest.mark.parametrize("name", list(METHODS))
def test_a_record_has_a_recipe_and_a_paper(name: str) -> None:
    recipes = [p for p in (ROOT / "configs").glob("*.yaml") if load_config(p).method.name == name]
    assert recipes, f"no recipe in configs/ trains {name}"
    assert METHODS[name].paper and METHODS[name].summary


@pytest.mark.parametrize("name", list(METHODS))
def test_the_model_has_the_heads_the_record_names(name: str) -> None:
    config = load_config(None, [*SMALLER_HEADS, "method.num_clusters=4", f"method.name={name}"])
    model = build_model(config)
    head = METHODS[name].head
    assert (model.classifier is not None) == (head == "classifier")
    assert (model.predictor is not None) == (head == "predictor")
    _, z, p = model(torch.rand(4, 3, 32, 32))
    assert p.shape == ((4, 4) if head == "classifier" else z.shape)


@pytest.mark.parametrize("name", list(METHODS))
def test_a_record_builds_its_selector(name: str) -> None:
    config = load_config(None, [*SMALLER_HEADS, "method.num_clusters=4", f"method.name={name}"])
    selector = METHODS[name].selector(config, BuildContext(num_samples=100, steps_per_epoch=3, dtype=torch.float32))
    assert isinstance(selector, Selector)
    assert method_of(config) is METHODS[name]


def test_an_unknown_method_is_a_user_error() -> None:
    config = load_config()
    config.method.name = "byol"
    with pytest.raises(UserError, match="nnclr, simclr"):
        method_of(config)


def _method_name_tests(path: Path) -> list[str]:
    """Comparisons of a string with a registered method's name (``x == "kmclr"``, ``x in ("nnclr", ...)``)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Compare):
            strings = [c.value for c in ast.walk(node) if isinstance(c, ast.Constant) and isinstance(c.value, str)]
            found += [f"{path.relative_to(ROOT)}:{node.lineno}" for s in strings if s in METHODS]
    return found


def test_no_method_name_is_tested_outside_the_registry() -> None:
    """The model, loop, step and report ask the record; only the registry and the config know the names."""
    allowed = {PACKAGE / "methods.py", PACKAGE / "config.py"}
    found = [hit for path in sorted(PACKAGE.rglob("*.py")) if path not in allowed for hit in _method_name_tests(path)]
    assert found == []


def _type_only(tree: ast.Module) -> set[ast.AST]:
    """The statements under ``if TYPE_CHECKING:`` (imports for annotations only: nothing runs them)."""
    blocks = [node for node in ast.walk(tree) if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING"]
    return {inner for block in blocks for statement in block.body for inner in ast.walk(statement)}


def _imports(path: Path) -> set[str]:
    """The nnclr modules ``path`` imports when it runs (at any depth in the file, absolute imports only)."""
    names = set()
    tree = ast.parse(path.read_text())
    type_only = _type_only(tree)
    for node in ast.walk(tree):
        if node in type_only:
            continue
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
    return {name for name in names if name == "nnclr" or name.startswith("nnclr.")}


def _module(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")


METHOD_MATH = ("losses", "support", "selectors", "prior", "kmeans", "online_kmeans", "step", "methods", "deepcluster",
               "heads", "backbones", "model")
LOOP_DRIVERS_AND_RUN_FILES = ("nnclr.train", "nnclr.commands", "nnclr.cli", "nnclr.rundir", "nnclr.stopping",
                              "nnclr.resume", "nnclr.checkpoint", "nnclr.report", "nnclr.use", "nnclr.evaluate",
                              "nnclr.pretrained")


@pytest.mark.parametrize("name", METHOD_MATH)
def test_method_math_never_imports_the_loop_the_drivers_or_the_run_files(name: str) -> None:
    imported = _imports(PACKAGE / f"{name}.py")
    assert not [m for m in imported if m.startswith(LOOP_DRIVERS_AND_RUN_FILES)]


def test_only_the_commands_import_the_training_loop() -> None:
    importers = {_module(path) for path in PACKAGE.rglob("*.py")
                 if any(m == "nnclr.train" or m.startswith("nnclr.train.") for m in _imports(path))}
    importers.discard("nnclr.train")
    assert importers and all(m.startswith("nnclr.commands.") for m in importers), importers


def _within(name: str, packages: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in packages)


def test_only_the_command_line_imports_the_cli_and_the_commands() -> None:
    """The drivers sit on top: no library module reaches up into the command line (nor, test above, the loop)."""
    command_line = ("nnclr.__main__", "nnclr.cli", "nnclr.commands")
    reaching_up = sorted(f"{_module(path)} imports {m}" for path in PACKAGE.rglob("*.py")
                         if not _within(_module(path), command_line)
                         for m in _imports(path) if _within(m, ("nnclr.cli", "nnclr.commands")))
    assert not reaching_up, reaching_up
    assert "nnclr.cli" in _imports(PACKAGE / "__main__.py")


# What the libraries under the drivers sit below: they import none of it (augment < data < model, evaluation,
# report, use < the loop and the commands).
DRIVERS = ("nnclr.train", "nnclr.commands", "nnclr.cli")
BELOW = {
    "augment": ("nnclr.data", "nnclr.model", "nnclr.backbones", "nnclr.checkpoint", "nnclr.pretrained",
                "nnclr.evaluate", "nnclr.report", "nnclr.use", *DRIVERS),
    "data": ("nnclr.model", "nnclr.backbones", "nnclr.checkpoint", "nnclr.pretrained", "nnclr.evaluate",
             "nnclr.report", "nnclr.use", *DRIVERS),
    "evaluate": ("nnclr.report", "nnclr.use", *DRIVERS),
    "report": ("nnclr.evaluate", "nnclr.use", *DRIVERS),
    "use": ("nnclr.evaluate", "nnclr.report", *DRIVERS),
}


@pytest.mark.parametrize("package", list(BELOW))
def test_the_libraries_import_only_downwards(package: str) -> None:
    files = sorted((PACKAGE / package).rglob("*.py"))
    upward = sorted(f"{_module(path)} imports {m}"
                    for path in files for m in _imports(path) if _within(m, BELOW[package]))
    assert files and not upward, upward


def test_the_import_checks_see_imports_inside_functions() -> None:
    """The two tests above would pass vacuously if _imports missed the lazy imports the commands use."""
    assert "nnclr.train" in _imports(PACKAGE / "commands" / "pretrain.py")
    source = (PACKAGE / "resume.py").read_text()
    assert "from nnclr.train import Run" in source and "nnclr.train" not in _imports(PACKAGE / "resume.py")


def test_the_version_is_written_once() -> None:
    pyproject = (ROOT / "pyproject.toml").read_text()  # (tomllib is Python >= 3.11)
    assert not re.search(r"^version\s*=\s*\"", pyproject, re.MULTILINE)  # no literal version
    assert 'dynamic = ["version"]' in pyproject and 'attr = "nnclr.version.__version__"' in pyproject
    written = [p for p in PACKAGE.rglob("*.py") if re.search(r"^__version__\s*=", p.read_text(), re.MULTILINE)]
    assert written == [PACKAGE / "version.py"]
    import nnclr

    assert nnclr.__version__ == __version__
