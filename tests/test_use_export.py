"""``nnclr export``: the files load without nnclr and give the same features as the PyTorch encoder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torchvision
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn
from use_helpers import assert_user_error, make_checkpoint, run_main

import nnclr
from nnclr.cli import main
from nnclr.use.export import export


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("small") / "checkpoint.pt")


def _images(n: int = 3, size: int = 32) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(1))


@pytest.mark.slow
@pytest.mark.parametrize("cifar_stem", [True, False])
def test_safetensors_loads_into_torchvision_resnet(tmp_path: Path, cifar_stem: bool) -> None:
    size = 16 if cifar_stem else 32  # small inputs (a fast test); the stock stem takes 32 x 32 at the least
    checkpoint = make_checkpoint(tmp_path / "c.pt", "model.backbone=resnet18", f"model.cifar_stem={cifar_stem}",
                                 f"data.image_size={size}")
    pretrained = nnclr.load(checkpoint, precision="fp32")
    out = export(pretrained, tmp_path / "encoder.safetensors", "safetensors")
    state = load_file(str(out))
    resnet = torchvision.models.resnet18()
    with pytest.raises(RuntimeError, match="Missing key.*fc.weight"):  # the classifier is not part of the encoder
        resnet.load_state_dict(state)
    resnet.fc = nn.Identity()  # what the header's left_out says to do
    if cifar_stem:
        with pytest.raises(RuntimeError, match="conv1.weight"):  # a stock stem rejects the CIFAR stem's conv1
            resnet.load_state_dict(state)
        resnet.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        resnet.maxpool = nn.Identity()
    resnet.load_state_dict(state)  # strict: every key and shape matches
    x = _images(size=size)
    with torch.no_grad():
        torch.testing.assert_close(resnet.eval()(x), pretrained.encoder(x), atol=1e-5, rtol=1e-5)
    with safe_open(str(out), framework="pt") as file:
        meta = file.metadata()
    assert json.loads(meta["preprocessing"])["image_size"] == size and meta["backbone"] == "resnet18"
    assert ("CIFAR stem" in meta["left_out"]) == cifar_stem and "fc" in meta["left_out"]


@pytest.mark.slow
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


@pytest.mark.filterwarnings("ignore:.*torch.jit.*:FutureWarning")  # deprecated in torch >= 2.10, still loads
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


@pytest.mark.slow
def test_onnx_gives_the_same_features(small: Path, tmp_path: Path) -> None:
    ort = pytest.importorskip("onnxruntime", reason="the onnx extra (pip install 'nnclr[onnx]'; part of the dev extra)")
    pytest.importorskip("onnxscript", reason="the onnx extra (pip install 'nnclr[onnx]'; part of the dev extra)")
    pretrained = nnclr.load(small, precision="fp32")
    out = export(pretrained, tmp_path / "encoder.onnx", "onnx", with_projector=True)
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["h", "z"]
    for batch in (1, 7):  # the batch dimension is dynamic
        x = _images(batch)
        h, z = session.run(None, {"images": x.numpy()})
        with torch.no_grad():
            torch.testing.assert_close(torch.from_numpy(h), pretrained.encoder(x), atol=1e-4, rtol=1e-4)
            z_torch = pretrained.projector(pretrained.encoder(x))
        torch.testing.assert_close(torch.from_numpy(z), z_torch, atol=1e-4, rtol=1e-4)
    meta = session.get_modelmeta().custom_metadata_map
    assert json.loads(meta["preprocessing"])["image_size"] == 32 and meta["with_projector"] == "true"


def test_export_leaves_the_loaded_model_as_it_was(small: Path, tmp_path: Path) -> None:
    pretrained = nnclr.load(small, precision="bf16")
    pretrained.encoder.to(torch.bfloat16)
    export(pretrained, tmp_path / "encoder.safetensors", "safetensors")
    assert next(pretrained.encoder.parameters()).dtype == torch.bfloat16  # the export worked on a copy
    assert load_file(str(tmp_path / "encoder.safetensors"))["stem.0.weight"].dtype == torch.float32


def test_bad_export_arguments(small: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    export_ = ("export", "--format", "safetensors")
    assert_user_error(run_main(capsys, *export_, "--checkpoint", str(tmp_path / "missing"), "--out", "x.safetensors"),
                      "not found")
    assert_user_error(run_main(capsys, *export_, "--checkpoint", str(small), "--out", str(tmp_path)), "is a directory")
    assert_user_error(run_main(capsys, *export_, "--checkpoint", str(small), "--out", str(tmp_path / "no" / "x")),
                      "does not exist")
    assert list(tmp_path.iterdir()) == []
