"""The user's own encoder: ``model.backbone=py:MODULE:CLASS(k=v, ...)``, or an instance passed from Python.

The user's module is tests/user_models.py (importable as ``user_models``: pytest puts tests/ on the path).
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

import pytest
import torch
from backbone_helpers import CUSTOM
from tiny import SMALLER_HEADS
from torch import nn
from use_helpers import assert_user_error, make_checkpoint, nnclr_cli, run_main
from user_models import TinyCNN

import nnclr
from nnclr.backbones import build_backbone, parse_spec
from nnclr.checkpoint import save_checkpoint
from nnclr.config import load_config, to_dict
from nnclr.custom_backbone import spec_of
from nnclr.errors import UserError
from nnclr.model import build_model

TESTS = Path(__file__).resolve().parent
TINY = [*SMALLER_HEADS, "data.image_size=16"]


def test_parse_spec() -> None:
    assert parse_spec("resnet18").family == "registered"
    spec = parse_spec("py:pkg.models:Net(width=8, sizes=(1, 2), name='a', flag=True)")
    assert (spec.family, spec.target) == ("py", "pkg.models:Net")
    assert spec.kwargs == {"width": 8, "sizes": (1, 2), "name": "a", "flag": True}
    assert parse_spec("timm:vit_tiny_patch16_224").kwargs == {}
    for bad, message in [("py:models", "py:MODULE:ATTR"), ("py:a:B(1)", "keywords only"), ("py:a:B(x=y)", "literals"),
                         ("py:a:B(x=1", "must end the spec"), ("resnet18(x=1)", "take no arguments"),
                         ("py:a:B(**k)", "keywords only")]:
        with pytest.raises(UserError, match=message):
            parse_spec(bad)


def test_build_from_spec_reads_the_width_from_one_forward_pass() -> None:
    model, features = build_backbone(CUSTOM, image_size=16)
    assert isinstance(model, TinyCNN) and features == 32 and model.num_features == 32  # set: it had none
    assert model.training  # the measuring pass ran in eval mode and left it as it was
    wide, features = build_backbone("py:user_models:TinyCNN(width=24)", image_size=16)
    assert features == 48 and wide(torch.randn(3, 3, 16, 16)).shape == (3, 48)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("py:user_models:tiny_cnn", "not an nn.Module class.*builds classes only"),
        ("py:os:system", "not an nn.Module class"),
        ("py:builtins:exec", "not an nn.Module class"),
        ("py:user_models:Nothing", "module user_models has no Nothing"),
        ("py:no_such_module_here:Net", "cannot import no_such_module_here .*run nnclr from the folder that holds "
                                       "no_such_module_here.py or add that folder to PYTHONPATH"),
        ("py:user_models:SpatialCNN", r"returns \(2, 8, 16, 16\).*must return pooled features \(B, F\)"),
        ("py:user_models:WrongWidth", "num_features is 5 but its output has 32 features"),
        ("py:user_models:TinyCNN(depth=3)", r"TinyCNN\(depth=3\) failed .*unexpected keyword"),
        ("py:__main__:MyCNN", "defined in the script or notebook that trained this run .*module file"),
    ],
)
def test_bad_custom_specs_are_one_line(spec: str, message: str) -> None:
    with pytest.raises(UserError, match=message):
        build_backbone(spec, image_size=16)


def test_the_module_is_found_in_the_current_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """As ``python -m`` does: a mymodels.py where nnclr runs is importable, also from the ``nnclr`` script."""
    (tmp_path / "cwd_models_for_test.py").write_text((TESTS / "user_models.py").read_text())
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    model, features = build_backbone("py:cwd_models_for_test:TinyCNN(width=4)", image_size=16)
    assert features == 8 and type(model).__module__ == "cwd_models_for_test"
    assert str(tmp_path) not in sys.path  # the path is restored


def test_an_instance_from_python_is_adopted_with_the_spec_that_rebuilds_it() -> None:
    config = load_config(None, TINY)  # model.backbone is the default small_cnn: it does not rebuild TinyCNN
    net = TinyCNN()
    model = build_model(config, backbone=net)
    assert model.backbone is net and config.model.backbone == "py:user_models:TinyCNN" == spec_of(net)
    assert model.projector[0].in_features == 32
    rebuilt = build_model(config)  # what nnclr eval / embed / export do with the saved config
    assert rebuilt.backbone.state_dict().keys() == net.state_dict().keys()


def test_an_instance_needing_arguments_must_be_named_with_them() -> None:
    config = load_config(None, TINY)
    with pytest.raises(UserError, match=r"must be rebuildable from model\.backbone.*py:user_models:TinyCNN builds "
                                        r"another network \(other shapes.*\).*py:MODULE:CLASS\(KEY=VALUE"):
        build_model(config, backbone=TinyCNN(width=8))
    config = load_config(None, [*TINY, "model.backbone=py:user_models:TinyCNN(width=8)"])
    net = TinyCNN(width=8)
    assert build_model(config, backbone=net).backbone is net
    assert config.model.backbone == "py:user_models:TinyCNN(width=8)"


def test_an_instance_of_a_class_defined_in_a_function_is_refused() -> None:
    class Local(TinyCNN):
        pass

    with pytest.raises(UserError, match="defined inside a function"):
        build_model(load_config(None, TINY), backbone=Local())


def test_adoption_leaves_the_random_numbers_as_a_spec_would() -> None:
    """Rebuilding to check the spec draws from a forked RNG: the heads are initialised as without the check."""
    config = load_config(None, [*TINY, f"model.backbone={CUSTOM}"])
    torch.manual_seed(3)
    net = TinyCNN()
    passed = build_model(config, backbone=net)
    torch.manual_seed(3)
    built = build_model(config)
    for a, b in zip(passed.state_dict().values(), built.state_dict().values()):
        assert torch.equal(a, b)


def test_a_run_of_main_module_class_warns_and_loading_it_elsewhere_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """A class defined in a notebook or script (``__main__``) is adopted with a warning: the command line cannot
    import it, and says so in one line."""
    import __main__

    config = load_config(None, TINY)
    Main = type("MainCNN", (TinyCNN,), {"__module__": "__main__"})  # as if defined in a notebook
    Main.__qualname__ = "MainCNN"
    __main__.MainCNN = Main
    try:
        with pytest.warns(UserWarning, match="cannot import a class defined in __main__"):
            model = build_model(config, backbone=Main())
        assert config.model.backbone == "py:__main__:MainCNN"
        path = tmp_path / "checkpoint.pt"
        save_checkpoint({"config": to_dict(config), "model": model.state_dict(), "step": 0}, path)
        assert nnclr.load(path).feature_dim == 32  # where __main__.MainCNN exists, the run loads
    finally:
        delattr(__main__, "MainCNN")
    assert_user_error(run_main(capsys, "export", "--checkpoint", str(path), "--format", "safetensors", "--out",
                               str(tmp_path / "x.safetensors")), "defined in the script or notebook")


@pytest.mark.slow
def test_the_command_line_loads_a_custom_run_from_its_folder_and_explains_elsewhere(tmp_path: Path) -> None:
    """``nnclr`` as a subprocess: from the folder holding user_models.py the run exports; elsewhere it exits 2
    with one line naming what to do."""
    checkpoint = make_checkpoint(tmp_path / "checkpoint.pt", f"model.backbone={CUSTOM}", "data.image_size=16")
    out = tmp_path / "encoder.safetensors"
    cwd = os.getcwd()
    try:
        os.chdir(TESTS)
        result = nnclr_cli("export", "--checkpoint", str(checkpoint), "--format", "safetensors", "--out", str(out))
    finally:
        os.chdir(cwd)
    assert result.returncode == 0, result.stderr
    assert "user_models.TinyCNN() loads it with load_state_dict(strict=True)" in result.stdout
    os.chdir(tmp_path)
    try:
        result = nnclr_cli("export", "--checkpoint", str(checkpoint), "--format", "safetensors", "--out",
                           str(tmp_path / "again.safetensors"))
    finally:
        os.chdir(cwd)
    assert_user_error(result, "cannot import user_models", "run nnclr from the folder that holds user_models.py")


def test_nnclr_load_gives_the_users_module(tmp_path: Path) -> None:
    checkpoint = make_checkpoint(tmp_path / "c.pt", f"model.backbone={CUSTOM}(width=4)", "data.image_size=16")
    pretrained = nnclr.load(checkpoint, precision="fp32")
    assert isinstance(pretrained.encoder, TinyCNN) and pretrained.feature_dim == 8
    images = (torch.rand(3, 3, 16, 16) * 255).to(torch.uint8)
    with torch.no_grad():
        expected = nn.functional.normalize(pretrained.encoder(pretrained.transform(images)), dim=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # embedding folds batch-norm (torch.fx) without a warning
        torch.testing.assert_close(pretrained.embed(images), expected, atol=1e-5, rtol=1e-5)


def test_the_documented_example_is_the_tested_module() -> None:
    """docs/backbones.md's TinyCNN is tests/user_models.py's, which these tests build, adopt and train."""
    import inspect

    import user_models

    page = (TESTS.parent / "docs" / "backbones.md").read_text()
    example = next(block for block in page.split("```python\n")[1:] if "class TinyCNN" in block).split("```")[0]
    assert inspect.getsource(user_models.TinyCNN) in example


@pytest.mark.filterwarnings("ignore:.*torch.jit.*:FutureWarning")
def test_a_module_torch_cannot_convert_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("onnxscript", reason="the onnx extra (part of the dev extra)")
    export = ("export", "--format", "onnx", "--out")
    quirky = make_checkpoint(tmp_path / "q.pt", "model.backbone=py:user_models:ScalarFromPython", "data.image_size=16")
    result = run_main(capsys, *export, str(tmp_path / "q.onnx"), "--checkpoint", str(quirky))
    assert result.returncode == 0 and result.stderr == ""  # the exporter's reports on stderr are kept from the user
    checkpoint = make_checkpoint(tmp_path / "c.pt", "model.backbone=py:user_models:SingularValues",
                                 "data.image_size=16")
    assert_user_error(run_main(capsys, *export, str(tmp_path / "e.onnx"), "--checkpoint", str(checkpoint)),
                      "--format onnx: torch.onnx.export cannot convert backbone py:user_models:SingularValues "
                      "(Failed to convert the exported program to an ONNX model. This is step 3/3",
                      "export --format safetensors")

    def untraceable(*args: object, **kwargs: object) -> None:
        raise RuntimeError("Tracer cannot infer type of output\nmore detail")

    monkeypatch.setattr(torch.jit, "trace", untraceable)
    assert_user_error(run_main(capsys, "export", "--checkpoint", str(checkpoint), "--format", "torchscript", "--out",
                               str(tmp_path / "f.pt")),
                      "--format torchscript: torch.jit.trace cannot convert", "(Tracer cannot infer type of output)")
    assert not (tmp_path / "e.onnx").exists() and not (tmp_path / "f.pt").exists()


@pytest.mark.slow
def test_pretrain_trains_an_instance_in_place_and_the_run_loads_without_it(tmp_path: Path) -> None:
    from nnclr.train import pretrain

    config = load_config(None, [*TINY, "data.image_size=32", "optim.batch_size=32", "method.support_size=64",
                                "data.test_split=", "train.max_steps=2", "train.report=false",
                                f"train.run_dir={tmp_path}"])
    net = TinyCNN(width=8)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(UserError, match="py:user_models:TinyCNN builds another network"):
        pretrain(load_config(None, [*TINY, f"train.run_dir={tmp_path / 'refused'}"]), backbone=net, progress=False)
    config.model.backbone = "py:user_models:TinyCNN(width=8)"
    pretrain(config, backbone=net, progress=False, echo=lambda *args: None)
    assert not torch.equal(net.features[0].weight, before["features.0.weight"])  # trained in place
    assert "backbone: py:user_models:TinyCNN(width=8)" in (tmp_path / "config.yaml").read_text()
    loaded = nnclr.load(tmp_path, precision="fp32")
    assert isinstance(loaded.encoder, TinyCNN) and loaded.encoder is not net
    for key, value in net.state_dict().items():
        torch.testing.assert_close(loaded.encoder.state_dict()[key], value)
