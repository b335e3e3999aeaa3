"""``nnclr export``: the files load without nnclr and give the same features as the PyTorch encoder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torchvision
from safetensors import safe_open
from safetensors.torch import load_file
from test_use_embed import assert_user_error, make_checkpoint, nnclr_cli
from torch import nn

import nnclr
from nnclr.cli import main
from nnclr.use.export import export


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("small") / "checkpoint.pt")


def _images(n: int = 3, size: int = 32) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("cifar_stem", [True, False])
def test_safetensors_loads_into_torchvision_resnet(tmp_path: Path, cifar_stem: bool) -> None:
    checkpoint = make_checkpoint(tmp_path / "c.pt", "model.backbone=resnet18", f"model.cifar_stem={cifar_stem}")
    pretrained = nnclr.load(checkpoint, precision="fp32")
    out = export(pretrained, tmp_path / "encoder.safetensors", "safetensors")
    state = load_file(str(out))
    resnet = torchvision.models.resnet18()
    if cifar_stem:  # what the header's left_out says to do
        resnet.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        resnet.maxpool = nn.Identity()
    missing, unexpected = resnet.load_state_dict(state, strict=False)
    assert sorted(missing) == ["fc.bias", "fc.weight"] and unexpected == []
    resnet.fc = nn.Identity()
    x = _images()
    with torch.no_grad():
        torch.testing.assert_close(resnet.eval()(x), pretrained.encoder(x), atol=1e-5, rtol=1e-5)
    with safe_open(str(out), framework="pt") as file:
        meta = file.metadata()
    assert json.loads(meta["preprocessing"])["image_size"] == 32 and meta["backbone"] == "resnet18"
    assert ("CIFAR stem" in meta["left_out"]) == cifar_stem
    if not cifar_stem:  # a stock torchvision ResNet rejects the CIFAR stem's conv1: the reason for left_out
        return
    with pytest.raises(RuntimeError, match="conv1.weight"):
        torchvision.models.resnet18().load_state_dict(state, strict=False)


def test_safetensors_with_projector_round_trips_through_nnclr_load(
    small: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "encoder.safetensors"
    assert main(["export", "--checkpoint", str(small), "--format", "safetensors", "--out", str(out),
                 "--with-projector"]) == 0
    assert "small_cnn is not a torchvision model" in capsys.readouterr().out
    assert any(k.startswith("projector.") for k in load_file(str(out)))
    original, loaded = nnclr.load(small, precision="fp32"), nnclr.load(out, precision="fp32")
    images = (torch.rand(4, 3, 32, 32) * 255).to(torch.uint8)
    torch.testing.assert_close(loaded.embed(images), original.embed(images), atol=1e-6, rtol=0)
    h = original.encoder(original.transform(images))
    torch.testing.assert_close(loaded.projector(h), original.projector(h))


def test_torchscript_gives_the_same_features(small: Path, tmp_path: Path) -> None:
    pretrained = nnclr.load(small, precision="fp32")
    out = tmp_path / "encoder.pt"
    assert main(["export", "--checkpoint", str(small), "--format", "torchscript", "--out", str(out),
                 "--with-projector"]) == 0
    extra = {"preprocessing.json": ""}
    scripted = torch.jit.load(str(out), _extra_files=extra)
    x = _images(5)  # another batch size than the trace's
    h, z = scripted(x)
    with torch.no_grad():
        torch.testing.assert_close(h, pretrained.encoder(x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(z, pretrained.projector(pretrained.encoder(x)), atol=1e-5, rtol=1e-5)
    assert json.loads(json.loads(extra["preprocessing.json"])["preprocessing"])["mean"] == list(pretrained.mean)


def test_onnx_gives_the_same_features(small: Path, tmp_path: Path) -> None:
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    pretrained = nnclr.load(small, precision="fp32")
    out = export(pretrained, tmp_path / "encoder.onnx", "onnx")
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    x = _images(7)
    (h,) = session.run(None, {"images": x.numpy()})
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(h), pretrained.encoder(x), atol=1e-4, rtol=1e-4)
    meta = session.get_modelmeta().custom_metadata_map
    assert json.loads(meta["preprocessing"])["image_size"] == 32


def test_bad_export_arguments(small: Path, tmp_path: Path) -> None:
    assert_user_error(
        nnclr_cli("export", "--checkpoint", str(tmp_path / "missing"), "--format", "onnx", "--out", "x.onnx"),
        "not found",
    )
    assert main(["export", "--checkpoint", str(small), "--format", "safetensors", "--out", str(tmp_path)]) == 2
