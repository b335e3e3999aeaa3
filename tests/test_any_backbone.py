"""Everything downstream works for every kind of backbone: a timm ResNet, a timm ViT (patch 4), the user's module.

Each is pretrained for two steps on tiny colour images (16x16, 4 classes), then evaluated with every protocol,
embedded and searched, exported in every format (the files give the encoder's features without nnclr; timm's
safetensors load into ``timm.create_model`` strictly) and reported. timm's cases skip without timm (fail under CI).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from backbone_helpers import CUSTOM, OTHER_PALETTE, PALETTE, TIMM_RESNET, TIMM_VIT, colour_npz, needs_timm
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn
from use_helpers import run_main

import nnclr
from nnclr.config import load_config
from nnclr.train import pretrain
from nnclr.use.export import export

pytestmark = pytest.mark.slow
SPECS = {"timm-resnet": TIMM_RESNET, "timm-vit": TIMM_VIT, "custom": CUSTOM}


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("colours")
    return {"data": colour_npz(root / "colours", PALETTE, train=128, test=32, side=16),
            "other": colour_npz(root / "other", OTHER_PALETTE, train=60, test=30, side=12)}


@pytest.fixture(scope="module", params=list(SPECS))
def run(request: pytest.FixtureRequest, data: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run directory: two steps of NNCLR with the backbone, the kNN monitor before and after."""
    spec = SPECS[request.param]
    needs_timm(spec)
    run_dir = tmp_path_factory.mktemp(request.param) / "run"
    config = load_config(None, [
        f"model.backbone={spec}", f"data.name=npz:{data['data']}", "data.image_size=16", "model.proj_hidden_dim=32",
        "model.proj_dim=16", "model.pred_hidden_dim=32", "optim.batch_size=32", "train.max_steps=2",
        "method.support_size=64", f"train.run_dir={run_dir}", "train.report=false",
    ])
    result = pretrain(config, progress=False, echo=lambda *args: None)
    assert result.steps == 2 and result.knn_before and result.knn_after
    return run_dir


def test_every_evaluation_protocol(run: Path, data: dict[str, Path], capsys: pytest.CaptureFixture) -> None:
    common = ["--checkpoint", str(run), "--no-progress", "--threads", "1"]
    result = run_main(capsys, "eval", "linear", *common)  # fast: L-BFGS on cached features
    assert result.returncode == 0, result.stderr
    result = run_main(capsys, "eval", "all", *common, "--mode", "paper", "--epochs", "1", "--batch-size", "32",
                      "--fractions", "0.25", "--transfer-data", f"npz:{data['other']}")
    assert result.returncode == 0, result.stderr
    records = {path.name.split("-")[0]: json.loads(path.read_text()) for path in (run / "eval").glob("*.json")}
    assert set(records) >= {"knn", "linear", "semi", "transfer", "retrieval"}
    for protocol in ("knn", "linear", "semi", "transfer"):
        assert 0 <= records[protocol]["top1"] <= 100, records[protocol]


def test_embed_and_search(run: Path, data: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "emb"
    result = run_main(capsys, "embed", "--checkpoint", str(run), "--images", f"npz:{data['data']}", "--split",
                      "test", "--out", str(out), "--no-progress")
    assert result.returncode == 0, result.stderr
    images = np.load(data["data"] / "test.npz")["images"]
    query = tmp_path / "query.png"
    Image.fromarray(images[7]).save(query)  # lossless: the same pixels as test image 7
    result = run_main(capsys, "search", "--embeddings", str(out), str(query), "-k", "3", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["results"][0]["neighbours"][0]["path"] == f"npz:{data['data']}/test/7"


def _timm_model(path: Path) -> nn.Module:
    """The export's network built by timm alone from the header's ``timm`` key."""
    import timm

    with safe_open(str(path), framework="pt") as file:
        made = json.loads(file.metadata()["timm"])
    model = timm.create_model(made["name"], num_classes=0, **made["kwargs"])
    if made["cifar_stem_width"]:
        model.conv1 = nn.Conv2d(3, made["cifar_stem_width"], 3, 1, 1, bias=False)
        model.maxpool = nn.Identity()
    return model


@pytest.mark.filterwarnings("ignore:.*torch.jit.*:FutureWarning")
def test_every_export_format(run: Path, tmp_path: Path) -> None:
    pretrained = nnclr.load(run, precision="fp32")
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        h = pretrained.encoder(x)
    safetensors = export(pretrained, tmp_path / "encoder.safetensors", "safetensors", with_projector=True)
    images = (torch.rand(4, 3, 16, 16) * 255).to(torch.uint8)
    torch.testing.assert_close(nnclr.load(safetensors, precision="fp32").embed(images), pretrained.embed(images))
    if pretrained.config.model.backbone.startswith("timm:"):  # timm's own model, timm's names: a strict load
        plain = export(pretrained, tmp_path / "plain.safetensors", "safetensors")
        model = _timm_model(plain)
        model.load_state_dict(load_file(str(plain)), strict=True)
        with torch.no_grad():
            torch.testing.assert_close(model.eval()(x), h, atol=1e-5, rtol=1e-5)
    scripted = torch.jit.load(str(export(pretrained, tmp_path / "encoder.pt", "torchscript")))
    torch.testing.assert_close(scripted(x), h, atol=1e-5, rtol=1e-5)
    ort = pytest.importorskip("onnxruntime", reason="the onnx extra (part of the dev extra)")
    pytest.importorskip("onnxscript", reason="the onnx extra (part of the dev extra)")
    onnx = export(pretrained, tmp_path / "encoder.onnx", "onnx")
    session = ort.InferenceSession(str(onnx), providers=["CPUExecutionProvider"])
    for batch in (1, 3):
        (out,) = session.run(None, {"images": x[:batch].numpy()})
        torch.testing.assert_close(torch.from_numpy(out), h[:batch], atol=1e-4, rtol=1e-4)


def test_report(run: Path, capsys: pytest.CaptureFixture) -> None:
    result = run_main(capsys, "report", str(run))
    assert result.returncode == 0, result.stderr
    assert (run / "report.html").is_file()
