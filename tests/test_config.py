"""Config: defaults, YAML recipes, strict --set overrides with errors that name the key."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from nnclr.config import EVAL, Config, from_dict, load_config, parse_override, to_dict
from nnclr.errors import UserError

REPO = Path(__file__).resolve().parents[1]


def test_defaults_are_the_demo_and_the_paper() -> None:
    config = load_config()
    assert config.data.name == "demo"
    assert config.method.name == "nnclr"
    assert config.method.temperature == 0.1  # NNCLR Sec. 4.1
    assert config.model.proj_dim == 256 and config.model.pred_hidden_dim == 4096


def test_overrides_are_typed() -> None:
    config = load_config(None, ["optim.lr=0.5", "train.epochs=3", "data.name=npz:/x/y", "train.channels_last=false"])
    assert config.optim.lr == 0.5
    assert config.train.epochs == 3.0 and isinstance(config.train.epochs, float)
    assert config.data.name == "npz:/x/y"
    assert config.train.channels_last is False


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("optim.lrr=0.5", "optim.lrr"),
        ("optimizer.lr=0.5", "optimizer"),
        ("optim.lr=fast", "optim.lr"),
        ("optim.batch_size=1.5", "optim.batch_size"),
        ("train.channels_last=3", "train.channels_last"),
        ("method.name=byol", "method.name"),
        ("optim.lr=-1", "optim.lr"),
        ("lr=0.1", "SECTION.NAME"),
        ("optim.lr", "KEY=VALUE"),
    ],
)
def test_bad_overrides_name_the_key(override: str, needle: str) -> None:
    with pytest.raises(UserError, match=needle.replace(".", r"\.")):
        load_config(None, [override])


def test_yaml_recipes_load(tmp_path: Path) -> None:
    for recipe in sorted((REPO / "configs").glob("*.yaml")):
        config = load_config(recipe)
        assert config.method.name in recipe.stem
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim:\n  learning_rate: 0.1\n")
    with pytest.raises(UserError, match="optim.learning_rate"):
        load_config(bad)
    with pytest.raises(UserError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("optim: [unclosed\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_config(broken)


def test_round_trip_through_dict() -> None:
    config = load_config(None, ["method.name=kmclr", "optim.lr=0.7"])
    again = from_dict(to_dict(config))
    assert again == config
    assert Config() != config


def test_parse_override_keeps_names_as_strings() -> None:
    assert parse_override("data.name=folder:/a b/c") == ("data.name", "folder:/a b/c")
    assert parse_override("data.root=") == ("data.root", None)  # str | None: an empty value is None
    assert parse_override("data.root=null") == ("data.root", "null")  # a folder called null


@pytest.mark.parametrize(
    "text", ["runs/exp #2", "runs/exp ", " runs/exp", "'quoted'", '"double"', "a\nb", "2024", "yes", "null", "~",
             "[1, 2]", "{a: 1}", "x: y", "0x10", "1e-3", "&anchor", "*alias", "!!python/object x", "%", "", "#"],
)
def test_str_values_are_taken_verbatim(text: str) -> None:
    """--set KEY=VALUE of a str key keeps VALUE as typed: no YAML folding of '#' comments, spaces, quotes, newlines,
    and no refusal of what YAML would read as a number, a boolean or null (issue 23, item 2)."""
    config = load_config(None, [f"train.run_dir={text}", f"data.test_split={text}"])
    assert config.train.run_dir == text and config.data.test_split == text
    assert parse_override(f"train.run_dir={text}") == ("train.run_dir", text)
    root = load_config(None, [f"data.root={text}"]).data.root
    assert root == (text or None)


@pytest.mark.parametrize(
    ("text", "value"),
    [("1e-3", 0.001), ("1E-3", 0.001), ("3", 3.0), ("+0.5e1", 5.0), (".5", 0.5), ("1_000.5", 1000.5), (" 0.1 ", 0.1)],
)
def test_float_values_take_pythons_float_syntax(text: str, value: float) -> None:
    """``--set optim.final_lr=1e-3`` is a float (YAML 1.1 reads 1e-3 as a string; issue 23, item 14)."""
    assert parse_override(f"optim.final_lr={text}") == ("optim.final_lr", value)
    config = load_config(None, [f"optim.final_lr={text}"])
    assert config.optim.final_lr == value and isinstance(config.optim.final_lr, float)


def test_a_yaml_recipe_may_write_floats_as_1e_minus_3(tmp_path: Path) -> None:
    """PyYAML (YAML 1.1) gives the string '1e-3' for ``lr: 1e-3``; a float key takes it as the number."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("optim:\n  lr: 1e-3\n  weight_decay: 5E-4\nmethod:\n  temperature: 1.0e-1\n")
    config = load_config(recipe)
    assert (config.optim.lr, config.optim.weight_decay, config.method.temperature) == (0.001, 0.0005, 0.1)
    recipe.write_text("optim:\n  lr: fast\n")
    with pytest.raises(UserError, match=r"optim\.lr.*float"):
        load_config(recipe)


@pytest.mark.parametrize(
    ("override", "value"),
    [("train.channels_last=false", False), ("train.channels_last=True", True), ("train.channels_last=no", False),
     ("train.channels_last=on", True), ("optim.batch_size=64", 64), ("optim.batch_size=1_024", 1024),
     ("optim.batch_size= 64", 64), ("train.seed=-0", 0)],
)
def test_bool_and_int_values(override: str, value: object) -> None:
    key, parsed = parse_override(override)
    assert parsed == value and type(parsed) is type(value)


@pytest.mark.parametrize(
    ("override", "needle"),
    [("optim.batch_size=1e3", "optim.batch_size"), ("optim.batch_size=true", "optim.batch_size"),
     ("train.channels_last=1", "train.channels_last"), ("train.channels_last=", "train.channels_last"),
     ("optim.lr=", "optim.lr"), ("optim.lr=true", "optim.lr"), ("optim.lr=0x10", "optim.lr")],
)
def test_values_of_the_wrong_type_are_refused(override: str, needle: str) -> None:
    with pytest.raises(UserError, match=needle.replace(".", r"\.")) as error:
        parse_override(override)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(
    ("recipe", "published"),
    [("imagenet_nnclr_paper", "75.6%"), ("cifar10_nnclr_sololearn", "91.88%"), ("cifar100_nnclr_sololearn", "69.62%")],
)
def test_recipes_of_published_setups_state_their_number_and_source(recipe: str, published: str) -> None:
    lines = (REPO / "configs" / f"{recipe}.yaml").read_text().splitlines()
    header = "\n".join(line for line in lines[: next(i for i, line in enumerate(lines) if not line.startswith("#"))])
    assert f"Published: {published}" in header and "NOT RUN" in header
    assert ("solo-learn" if "sololearn" in recipe else "Dwibedi") in header
    config = load_config(REPO / "configs" / f"{recipe}.yaml")
    assert config.model.backbone == ("resnet50" if "imagenet" in recipe else "resnet18")


def test_a_retired_key_still_loads_from_a_saved_config_and_is_explained_to_a_user() -> None:
    """Checkpoints of nnclr 0.1 saved method.recluster_every (KMCLR's old re-clustering interval): they must keep
    loading for eval/embed/export and resuming, and a user who sets the key is told what replaced it."""
    from nnclr.checkpoint import config_differences
    from nnclr.config import RETIRED

    saved = to_dict(load_config())
    saved["method"]["recluster_every"] = 100
    assert "method.recluster_every" in RETIRED
    assert to_dict(from_dict(saved)) == to_dict(load_config())
    assert config_differences(saved, to_dict(load_config())) == []
    with pytest.raises(UserError, match="no longer used.*kmeans_reset_epochs"):
        load_config(overrides=["method.recluster_every=5"])


def test_eval_defaults_are_the_protocols_and_stay_out_of_a_runs_config() -> None:
    assert (EVAL.knn_k, EVAL.knn_temperature) == (20, 0.07)  # Wu et al. 2018
    assert (EVAL.paper_epochs, EVAL.paper_lr, EVAL.semi_lr, EVAL.batch_size) == (100, 0.1, 0.05, 256)
    assert [EVAL.semi_epochs(f) for f in (0.005, 0.01, 0.1, 1.0)] == [60, 60, 30, 30]  # SimCLR, Appendix B.5
    with pytest.raises(dataclasses.FrozenInstanceError):
        EVAL.knn_k = 5  # type: ignore[misc]
    config = load_config()
    assert list(to_dict(config)) == ["data", "augment", "model", "method", "optim", "train"]  # config.yaml's sections
    assert from_dict(to_dict(config)) == config
