"""``model.init_from``: encoder weights from a local file, read safely, loaded strictly, mismatches named."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch
import torchvision
from safetensors.torch import save_file
from tiny import SMALLER_HEADS
from use_helpers import make_checkpoint

import nnclr
from nnclr.backbones import build_backbone
from nnclr.checkpoint import load_checkpoint
from nnclr.config import load_config
from nnclr.errors import UserError
from nnclr.train import pretrain
from nnclr.use.export import export
from nnclr.weights import init_encoder, read_encoder_state, state_mismatch

TINY = [*SMALLER_HEADS, "optim.batch_size=32", "optim.warmup_epochs=0", "method.support_size=64", "data.test_split=",
        "train.report=false"]


def _equal(module: torch.nn.Module, state: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(module.state_dict()[k], v) for k, v in state.items()) and \
        module.state_dict().keys() == state.keys()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("source") / "checkpoint.pt")


def test_from_a_run_dir_a_checkpoint_and_an_export(checkpoint: Path, tmp_path: Path) -> None:
    source = nnclr.load(checkpoint, precision="fp32")
    expected = {k: v.cpu() for k, v in source.encoder.state_dict().items()}
    exported = export(source, tmp_path / "encoder.safetensors", "safetensors", with_projector=True)
    for path, kind in [(checkpoint.parent, "an nnclr checkpoint"), (checkpoint, "an nnclr checkpoint"),
                       (exported, "an nnclr export")]:
        torch.manual_seed(5)
        model, _ = build_backbone("small_cnn")
        assert not _equal(model, expected)
        note = init_encoder(model, path, "small_cnn")
        assert _equal(model, expected) and f"({kind}, {len(expected)} tensors)" in note


@pytest.mark.parametrize("wrap", [None, "state_dict", "model"])
def test_a_torchvision_state_dict_with_its_classifier(tmp_path: Path, wrap: str | None) -> None:
    """A torchvision ResNet's own file (fc included; or inside {'state_dict': ...} / {'model': ...})."""
    reference = torchvision.models.resnet18()
    state = reference.state_dict()
    torch.save(state if wrap is None else {wrap: state, "epoch": 3}, tmp_path / "resnet18.pth")
    model, _ = build_backbone("resnet18", cifar_stem=False)
    note = init_encoder(model, tmp_path / "resnet18.pth", "resnet18")
    assert "its classifier left out (fc.bias, fc.weight)" in note
    assert _equal(model, {k: v for k, v in state.items() if not k.startswith("fc.")})
    cifar, _ = build_backbone("resnet18", cifar_stem=True)  # the CIFAR stem's conv1 has another shape
    with pytest.raises(UserError, match=r"does not fit model.backbone=resnet18: other shapes \(file vs model\) \(1\): "
                                        r"conv1.weight \(64, 3, 7, 7\) vs \(64, 3, 3, 3\)"):
        init_encoder(cifar, tmp_path / "resnet18.pth", "resnet18")


def test_mismatches_are_named(tmp_path: Path) -> None:
    model, _ = build_backbone("small_cnn")
    state = model.state_dict()
    del state["stem.0.weight"]
    state["extra.weight"] = torch.zeros(1)
    save_file(state, str(tmp_path / "w.safetensors"))
    with pytest.raises(UserError, match=r"missing \(1\): stem.0.weight; unexpected \(1\): extra.weight"):
        init_encoder(model, tmp_path / "w.safetensors", "small_cnn")
    many = {f"module.{k}": v for k, v in model.state_dict().items()}  # saved from DistributedDataParallel
    torch.save(many, tmp_path / "ddp.pt")
    with pytest.raises(UserError, match=r"missing \(\d+\): .*, \.\.\.; .*keys start with 'module.'"):
        init_encoder(model, tmp_path / "ddp.pt", "small_cnn")
    assert state_mismatch(model.state_dict(), model.state_dict()) is None


def test_unsafe_unreadable_and_missing_files_are_refused(tmp_path: Path) -> None:
    model, _ = build_backbone("small_cnn")
    torch.save({"state_dict": model.state_dict(), "args": argparse.Namespace(lr=0.1)}, tmp_path / "train.pth")
    with pytest.raises(UserError, match=r"refused.*argparse.Namespace.*torch.save\(model.state_dict\(\), FILE\)"):
        read_encoder_state(tmp_path / "train.pth")
    (tmp_path / "broken.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="cannot be read"):
        read_encoder_state(tmp_path / "broken.pt")
    (tmp_path / "broken.safetensors").write_bytes(b"nothing")
    with pytest.raises(UserError, match="cannot be read as safetensors"):
        read_encoder_state(tmp_path / "broken.safetensors")
    with pytest.raises(UserError, match="not found"):
        read_encoder_state(tmp_path / "nothing.pt")
    torch.save({"epoch": 3, "lr": 0.1}, tmp_path / "no_weights.pt")
    with pytest.raises(UserError, match="holds no state dict of tensors .*epoch, lr"):
        read_encoder_state(tmp_path / "no_weights.pt")


@pytest.mark.slow
def test_pretraining_starts_from_init_from_and_resumes_without_it(tmp_path: Path) -> None:
    """The first step's weights come from the file (lr tiny: they stay within 1e-6); a resumed run takes its
    weights from its checkpoint and no longer reads the file."""
    source = make_checkpoint(tmp_path / "source" / "checkpoint.pt", "data.image_size=32")
    init = tmp_path / "init.pt"
    init.write_bytes(source.read_bytes())
    lines: list[str] = []
    overrides = [*TINY, f"model.init_from={init}", "optim.lr=1e-12", f"train.run_dir={tmp_path / 'run'}",
                 "train.epochs=1"]
    pretrain(load_config(None, [*overrides, "train.max_steps=1"]), progress=False, echo=lines.append)
    assert any(line.startswith(f"backbone initialised from {init} (an nnclr checkpoint") for line in lines)
    trained = load_checkpoint(tmp_path / "run" / "checkpoint.pt")["model"]
    original = torch.load(source, weights_only=True)["model"]
    for key, value in original.items():
        if key.startswith("backbone.") and key.endswith("weight"):
            torch.testing.assert_close(trained[key], value, atol=1e-6, rtol=0)
    init.unlink()
    lines.clear()
    pretrain(load_config(None, [*overrides, "train.max_steps=2"]), progress=False, echo=lines.append)
    assert not any("initialised" in line for line in lines) and any("resuming" in line for line in lines)
    with pytest.raises(UserError, match="model.init_from=.*not found"):
        pretrain(load_config(None, [*overrides, "train.max_steps=1", f"train.run_dir={tmp_path / 'new'}"]),
                 progress=False)
