"""``nnclr.load``: a trained encoder with its preprocessing, loaded safely and lazily."""

from __future__ import annotations

import contextlib
import io
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from use_helpers import make_checkpoint, save_demo_image

import nnclr
from nnclr.augment import eval_transform
from nnclr.errors import UserError


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("run") / "checkpoint.pt")


def test_import_nnclr_does_not_import_torch() -> None:
    code = "import sys, nnclr; assert callable(nnclr.load); print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_load_run_dir_or_file_gives_encoder_transform_and_embed(checkpoint: Path) -> None:
    from_dir, from_file = nnclr.load(checkpoint.parent), nnclr.load(checkpoint)
    assert from_dir.checkpoint == from_file.checkpoint and from_dir.checkpoint_hash == from_file.checkpoint_hash
    assert not from_dir.encoder.training and from_dir.feature_dim == 256 and from_dir.image_size == 32
    images = (torch.rand(6, 3, 32, 32) * 255).to(torch.uint8)
    features = from_dir.embed(images)
    assert features.shape == (6, 256) and features.dtype == torch.float32
    torch.testing.assert_close(features.norm(dim=1), torch.ones(6))
    expected = eval_transform(images, 32, mean=from_dir.mean, std=from_dir.std)
    torch.testing.assert_close(from_dir.transform(images), expected)


def test_transform_accepts_pil_images_of_any_mode_and_size(checkpoint: Path) -> None:
    pretrained = nnclr.load(checkpoint)
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 60, 3), dtype=np.uint8))
    for image in (rgb, rgb.convert("L"), rgb.convert("P"), rgb.convert("RGBA"), rgb.convert("I;16")):
        x = pretrained.transform(image)
        assert x.shape == (1, 3, 32, 32) and x.dtype == torch.float32
    batch = pretrained.transform([rgb, rgb.convert("L")])
    assert batch.shape == (2, 3, 32, 32)
    gray = batch[1] * torch.tensor(pretrained.std)[:, None, None] + torch.tensor(pretrained.mean)[:, None, None]
    torch.testing.assert_close(gray[0], gray[1])  # a grayscale image becomes three equal channels
    torch.testing.assert_close(gray[1], gray[2])
    hwc = np.array(rgb.resize((32, 32)))
    torch.testing.assert_close(pretrained.transform(hwc), pretrained.transform(torch.from_numpy(hwc).permute(2, 0, 1)))
    with pytest.raises(UserError, match="uint8"):
        pretrained.transform(torch.rand(3, 32, 32))
    with pytest.raises(UserError, match="uint8"):
        pretrained.transform(torch.rand(2, 3, 32, 32))


def test_tensors_of_any_size_get_the_centre_square_like_pil_images(checkpoint: Path) -> None:
    pretrained = nnclr.load(checkpoint)
    wide = np.random.default_rng(1).integers(0, 256, (40, 64, 3), dtype=np.uint8)  # H=40, W=64
    from_pil = pretrained.transform(Image.fromarray(wide))
    from_tensor = pretrained.transform(torch.from_numpy(wide).permute(2, 0, 1))
    from_batch = pretrained.transform(torch.from_numpy(wide).permute(2, 0, 1)[None])
    assert from_tensor.shape == from_batch.shape == (1, 3, 32, 32)
    torch.testing.assert_close(from_tensor, from_batch)
    # Pillow's and torch's antialiased bilinear differ by rounding only; a stretch would differ a lot
    assert (from_pil - from_tensor).abs().mean() < 0.05
    squashed = np.array(Image.fromarray(wide).resize((32, 32)))  # the whole image, stretched
    stretched = pretrained.transform(torch.from_numpy(squashed).permute(2, 0, 1))
    assert (from_pil - stretched).abs().mean() > 4 * (from_pil - from_tensor).abs().mean()


def test_embed_folds_batchnorm_and_follows_weight_changes(checkpoint: Path) -> None:
    pretrained = nnclr.load(checkpoint, precision="fp32")
    images = (torch.rand(8, 3, 32, 32) * 255).to(torch.uint8)
    with torch.no_grad():
        reference = torch.nn.functional.normalize(pretrained.encoder(pretrained.transform(images)), dim=1)
    torch.testing.assert_close(pretrained.embed(images), reference, atol=1e-5, rtol=0)
    folded = pretrained.inference_encoder()
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    assert pretrained.inference_encoder() is folded  # built once
    with torch.no_grad():
        pretrained.encoder.stem[1].running_mean.add_(1.0)  # changed in place: the folded copy is stale
        reference = torch.nn.functional.normalize(pretrained.encoder(pretrained.transform(images)), dim=1)
    torch.testing.assert_close(pretrained.embed(images), reference, atol=1e-5, rtol=0)


def test_an_unknown_precision_is_a_user_error_naming_the_choices(checkpoint: Path) -> None:
    # was silent: any word but fp32/bf16 meant auto
    with pytest.raises(UserError, match="precision must be one of auto, bf16, fp32, got 'xyz'"):
        nnclr.load(checkpoint, precision="xyz")
    assert nnclr.load(checkpoint, precision="fp32").dtype == torch.float32


def test_load_errors_are_user_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="not found"):
        nnclr.load(tmp_path / "missing.pt")
    with pytest.raises(UserError, match="no checkpoint.pt"):
        nnclr.load(tmp_path)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="cannot be read"):
        nnclr.load(tmp_path / "junk.pt")
    (tmp_path / "junk.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")
    with pytest.raises(UserError, match="safetensors|nnclr metadata"):
        nnclr.load(tmp_path / "junk.safetensors")


def test_the_readme_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The README's Python example (the one of docs/use.md too) runs and prints what it says."""
    repo = Path(__file__).resolve().parents[1]
    readme = (repo / "README.md").read_text()
    section = readme[readme.index("## Use what was learned") :]
    code = re.search(r"```python\n(.*?)```", section, flags=re.S).group(1)
    assert len([line for line in code.splitlines() if line.strip()]) <= 10
    assert f"```python\n{code}```" in (repo / "docs" / "use.md").read_text()
    monkeypatch.chdir(tmp_path)
    make_checkpoint(tmp_path / "runs" / "nnclr-demo" / "checkpoint.pt")
    save_demo_image(0, tmp_path / "photos" / "cat.jpg")
    save_demo_image(1, tmp_path / "photos" / "dog.png")
    out = io.StringIO()
    namespace: dict = {}
    with contextlib.redirect_stdout(out):
        exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102 - the README's own example
    vectors, h = namespace["vectors"], namespace["h"]
    assert vectors.shape == h.shape == (2, 256)
    similarity = vectors @ vectors.T
    torch.testing.assert_close(similarity.diagonal(), torch.ones(2))
    assert f"{similarity[0, 1].item():.4f}" in out.getvalue()

