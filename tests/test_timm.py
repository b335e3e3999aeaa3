"""``model.backbone=timm:NAME``: built without classifier or download, the small-image variants, timm's names.

Skipped without timm, failed instead under CI (``NNCLR_REQUIRE_TIMM=1``, see tests/backbone_helpers.py).
"""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from backbone_helpers import TIMM_RESNET, TIMM_VIT, assert_trains_bf16_channels_last, require_timm
from safetensors.torch import save_file
from torch import nn

from nnclr.backbones import build_backbone, rebuild_note
from nnclr.config import load_config
from nnclr.errors import UserError
from nnclr.model import build_model
from nnclr.pretrained import fold_batchnorm
from nnclr.timm_backbone import recipe
from nnclr.weights import init_encoder


@pytest.fixture(autouse=True)
def timm(monkeypatch: pytest.MonkeyPatch):
    """timm (or a skip), and any connection (a weight download, the hub) fails the test."""
    module = require_timm()

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("backbones must not touch the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    return module


def test_vit_small_image_variant_has_patch_4_at_the_data_size(timm) -> None:
    model, features = build_backbone(TIMM_VIT, cifar_stem=True, image_size=32)
    assert isinstance(model, timm.models.vision_transformer.VisionTransformer) and len(model.blocks) == 1
    assert model.patch_embed.patch_size == (4, 4) and model.patch_embed.grid_size == (8, 8)
    assert model.pos_embed.shape == (1, 1 + 64, 192) and features == 192
    assert isinstance(model.head, nn.Identity)  # num_classes=0: pooled pre-logits features
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 192)
    stock, _ = build_backbone(TIMM_VIT, cifar_stem=False, image_size=32)  # the model as timm defines it, at 32 px
    assert stock.patch_embed.patch_size == (16, 16) and stock.patch_embed.grid_size == (2, 2)
    given, _ = build_backbone("timm:vit_tiny_patch16_224(depth=1, patch_size=8)", cifar_stem=True, image_size=32)
    assert given.patch_embed.patch_size == (8, 8)  # the spec's patch size wins over the variant's


def test_timm_resnet_cifar_stem_and_timm_names(timm) -> None:
    model, features = build_backbone("timm:resnet18", cifar_stem=True, image_size=32)
    assert features == 512 and isinstance(model, timm.models.resnet.ResNet)
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1) and model.conv1.bias is None
    assert isinstance(model.maxpool, nn.Identity)
    reference = timm.create_model("resnet18", num_classes=0)
    ours = {k: v.shape for k, v in model.state_dict().items()}
    theirs = {k: v.shape for k, v in reference.state_dict().items()}
    assert ours.keys() == theirs.keys() and {k for k in ours if ours[k] != theirs[k]} == {"conv1.weight"}
    stock, _ = build_backbone("timm:resnet18", cifar_stem=False, image_size=32)
    reference.load_state_dict(stock.state_dict(), strict=True)  # timm's own model loads it, strictly
    deep, _ = build_backbone("timm:resnet10t", cifar_stem=True, image_size=32)  # a deep stem: built as timm has it
    assert isinstance(deep.conv1, nn.Sequential) and isinstance(deep.maxpool, nn.MaxPool2d)


def test_feature_width_is_what_forward_returns(timm) -> None:
    """MobileNetV3's pooled output goes through conv_head: F is head_hidden_size (1024), not num_features (288)."""
    model, features = build_backbone("timm:mobilenetv3_small_050", cifar_stem=True, image_size=32)
    assert (model.num_features, features) == (288, 1024)
    with torch.no_grad():
        assert model.eval()(torch.randn(2, 3, 32, 32)).shape == (2, 1024)


@pytest.mark.parametrize("spec", [TIMM_RESNET, TIMM_VIT])
def test_random_weights_from_the_seed(spec: str) -> None:
    torch.manual_seed(1)
    a, _ = build_backbone(spec, cifar_stem=True, image_size=16)
    torch.manual_seed(1)
    b, _ = build_backbone(spec, cifar_stem=True, image_size=16)
    torch.manual_seed(2)
    c, _ = build_backbone(spec, cifar_stem=True, image_size=16)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not torch.equal(next(a.parameters()), next(c.parameters()))


def test_vit_uses_pytorch_fused_attention(timm, monkeypatch: pytest.MonkeyPatch) -> None:
    """timm's Attention calls F.scaled_dot_product_attention when timm.layers.use_fused_attn() (its default)."""
    assert timm.layers.use_fused_attn()
    model, _ = build_backbone("timm:vit_tiny_patch16_224(depth=2)", cifar_stem=True, image_size=32)
    assert all(block.attn.fused_attn for block in model.blocks)
    calls = []
    fused = F.scaled_dot_product_attention

    def counted(*args, **kwargs):
        calls.append(args[0].shape)
        return fused(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", counted)
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
    assert calls == [(2, 3, 65, 64)] * 2  # (B, heads, 1 + 8x8 tokens, head dim) in each block


@pytest.mark.parametrize("spec", [TIMM_RESNET, TIMM_VIT])
def test_trains_in_bf16_channels_last(spec: str) -> None:
    """The fast CPU path of the training loop: bf16 autocast + channels_last, forward and backward."""
    assert_trains_bf16_channels_last(*build_backbone(spec, cifar_stem=True, image_size=16), size=16)


def test_missing_timm_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm raises ImportError
    with pytest.raises(UserError, match=r"needs the timm package: pip install 'nnclr\[timm\]'"):
        build_backbone("timm:resnet18")


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("timm:resnet_18", "timm has no model 'resnet_18'; did you mean"),
        ("timm:resnet18(pretrained=True)", "never downloads weights.*model.init_from"),
        ("timm:resnet18(checkpoint_path='w.pth')", "model.init_from"),
        ("timm:vit_tiny_patch16_224(img_size=64)", "data.image_size"),
        ("timm:resnet18(num_classes=10)", "no classifier"),
        ("timm:resnet18(block_size=3)", "timm cannot build it .*block_size"),
        ("timm:resnet18(global_pool='')", r"returns \(2, 512, 4, 4\), not pooled features"),
        ("timm:resnet18(depth=)", "KEY=VALUE"),
        ("timm:resnet18(layers=x)", "Python literals"),
    ],
)
def test_bad_timm_specs_are_one_line(spec: str, message: str) -> None:
    with pytest.raises(UserError, match=message):
        build_backbone(spec, cifar_stem=True, image_size=32)


def test_rebuild_note_names_the_create_model_call() -> None:
    note = rebuild_note(TIMM_VIT, cifar_stem=True, image_size=32)
    assert "timm.create_model('vit_tiny_patch16_224', num_classes=0, depth=1, img_size=32, patch_size=4)" in note
    note = rebuild_note("timm:resnet18", cifar_stem=True, image_size=32)
    assert "timm.create_model('resnet18', num_classes=0)" in note and "nn.Conv2d(3, 64, 3, 1, 1, bias=False)" in note
    assert "maxpool" not in rebuild_note("timm:resnet18", cifar_stem=False, image_size=224)


def test_init_from_a_timm_state_dict_with_its_classifier(timm, tmp_path: Path) -> None:
    """A classification checkpoint of the same model: its classifier (pretrained_cfg['classifier']) is left out."""
    source = timm.create_model("resnet18", num_classes=10)
    save_file(source.state_dict(), str(tmp_path / "model.safetensors"))
    model, _ = build_backbone("timm:resnet18", cifar_stem=False, image_size=32)
    note = init_encoder(model, tmp_path / "model.safetensors", "timm:resnet18")
    assert "classifier left out (fc.bias, fc.weight)" in note and "a safetensors state dict" in note
    expected = {k: v for k, v in source.state_dict().items() if not k.startswith("fc.")}
    assert all(torch.equal(model.state_dict()[k], v) for k, v in expected.items())
    vit = timm.create_model("vit_tiny_patch16_224", depth=1, num_classes=10)
    torch.save(vit.state_dict(), tmp_path / "vit.pth")
    small, _ = build_backbone(TIMM_VIT, cifar_stem=True, image_size=32)  # patch 4 at 32 px: other shapes
    with pytest.raises(UserError, match=r"other shapes \(file vs model\) \(2\): pos_embed \(1, 197, 192\) vs "
                                        r"\(1, 65, 192\), patch_embed.proj.weight"):
        init_encoder(small, tmp_path / "vit.pth", TIMM_VIT)
    stock, _ = build_backbone(TIMM_VIT, cifar_stem=False, image_size=224)
    assert "(head.bias, head.weight)" in init_encoder(stock, tmp_path / "vit.pth", TIMM_VIT)


def test_recipe_holds_what_create_model_gets() -> None:
    from nnclr.backbones import parse_spec

    made = recipe(parse_spec(TIMM_VIT), cifar_stem=True, image_size=32)
    assert (made.name, made.kwargs, made.stem_width) == ("vit_tiny_patch16_224",
                                                         {"depth": 1, "img_size": 32, "patch_size": 4}, 0)
    made = recipe(parse_spec("timm:convnext_atto"), cifar_stem=True, image_size=32)
    assert made.kwargs == {} and made.stem_width == 0  # ConvNeXt has a patch_size but no img_size: left as it is


@pytest.mark.parametrize("spec", [TIMM_RESNET, TIMM_VIT])
def test_embedding_folds_batchnorm_without_changing_features(spec: str) -> None:
    """nnclr.load's embed runs a torch.fx copy with batch-norm folded into the convolutions: same features."""
    model, _ = build_backbone(spec, cifar_stem=True, image_size=16)
    with torch.no_grad():
        model(torch.randn(8, 3, 16, 16))  # train mode: running statistics move from their initial values
        model.eval()
        x = torch.randn(3, 3, 16, 16)
        torch.testing.assert_close(fold_batchnorm(model)(x), model(x), atol=1e-5, rtol=1e-5)


def test_the_vit_recipe_builds_vit_tiny_with_patch_4_and_adamw() -> None:
    recipe_file = Path(__file__).resolve().parents[1] / "configs" / "cifar10_nnclr_vit_tiny.yaml"
    header = recipe_file.read_text().split("\ndata:")[0]
    assert "vturrisi/solo-learn" in header and "scripts/pretrain/cifar/mae.yaml" in header and "NOT RUN" in header
    assert "not measured yet" in header and "mocov3_vit.yaml" in header
    config = load_config(recipe_file)
    assert (config.optim.name, config.optim.lr, config.optim.weight_decay) == ("adamw", 3.0e-4, 0.1)
    model = build_model(config)
    assert model.backbone.patch_embed.patch_size == (4, 4) and len(model.backbone.blocks) == 12
    assert model.projector[0].in_features == 192
