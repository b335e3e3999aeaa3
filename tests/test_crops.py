"""nnclr.data.crops: random resized crops of one image file, decoded once (streaming loader workers)."""

from __future__ import annotations

import io
import os
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, JpegImagePlugin
from torchvision.transforms.v2 import functional as TF

from nnclr.augment.params import CROP_DRAWS, crop_boxes
from nnclr.data import crops
from nnclr.data.crops import DecodeError, decode_eval, decode_views, draft_scale, read_image_bytes
from nnclr.data.decode import to_rgb, try_load_square

PAPER = ((0.08, 1.0), (3 / 4, 4 / 3))  # the NNCLR/BYOL crop: (scale, ratio)


def _texture(height: int, width: int, seed: int, noise: float = 12.0) -> np.ndarray:
    """A photo-like uint8 (H, W, 3) image: a smooth random field plus a little noise."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8))
    smooth = np.asarray(coarse.resize((width, height), Image.Resampling.BICUBIC)).astype(np.float32)
    return np.clip(smooth + rng.normal(0, noise, smooth.shape), 0, 255).astype(np.uint8)


def _encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def _reference(image: Image.Image, u: torch.Tensor, crop_list, size: int) -> torch.Tensor:
    """The slow reference: Pillow decode + to_rgb, crop_boxes per view, each box rounded to whole pixels
    (round x0, y0, w, h; clamp inside the image), torchvision v2 resized_crop with antialias."""
    rgb = torch.from_numpy(np.array(to_rgb(image))).permute(2, 0, 1).contiguous()
    _, height, width = rgb.shape
    views = []
    for v, (scale, ratio) in enumerate(crop_list):
        x0, y0, w, h = crop_boxes(u[v : v + 1], height, width, scale, ratio)[0].tolist()
        wr, hr = min(max(1, round(w)), width), min(max(1, round(h)), height)
        left, top = min(max(0, round(x0)), width - wr), min(max(0, round(y0)), height - hr)
        views.append(TF.resized_crop(rgb, top, left, hr, wr, [size, size], antialias=True))
    return torch.stack(views)


def _uniforms(views: int, seed: int) -> torch.Tensor:
    return torch.rand(views, CROP_DRAWS, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("height, width", [(61, 97), (200, 300)])
def test_views_equal_resized_crop_of_the_rounded_box(height: int, width: int) -> None:
    # PNG: lossless, so both sides see the same pixels. decode_views runs the same uint8 antialiased
    # bilinear kernel as resized_crop on the same rounded box, so the tolerance is 0 grey levels.
    image = Image.fromarray(_texture(height, width, seed=height))
    data = _encode(image, "PNG")
    # Two views with different crop rules; the second (area >= 99 %, aspect 3/4..4/3 on a 1.5-1.6 wide
    # image) never fits, so it exercises the central fallback crop.
    crop_list = [PAPER, ((0.99, 1.0), (3 / 4, 4 / 3))]
    for seed in range(4):
        u = _uniforms(2, seed)
        for size in (32, 64, 224):  # down- and up-scaling
            got = decode_views(data, u, crop_list, size)
            assert got.dtype == torch.uint8 and got.shape == (2, 3, size, size)
            want = _reference(Image.open(io.BytesIO(data)), u, crop_list, size)
            assert torch.equal(got, want), (seed, size, (got.int() - want.int()).abs().max())


def test_views_are_within_one_level_of_torchvisions_pil_crop() -> None:
    # torchvision's RandomResizedCrop on a PIL image: crop(), then resize(BILINEAR). PyTorch's
    # antialiased uint8 bilinear reproduces Pillow's filter; only the fixed-point rounding may differ
    # (<= 1 level). (Pillow's resize(box=...) on the whole image is not the same thing: its filter
    # reads pixels beyond the box, so the border rows differ by a few levels.)
    image = Image.fromarray(_texture(200, 300, seed=1))
    data = _encode(image, "PNG")
    u = _uniforms(2, 7)
    got = decode_views(data, u, [PAPER, PAPER], 64)
    for v in range(2):
        x0, y0, w, h = crop_boxes(u[v : v + 1], 200, 300, *PAPER)[0].tolist()
        x, y, bw, bh = crops.pixel_box(x0, y0, w, h, 300, 200)
        pil = image.crop((x, y, x + bw, y + bh)).resize((64, 64), Image.Resampling.BILINEAR)
        want = torch.from_numpy(np.array(pil)).permute(2, 0, 1)
        assert (got[v].int() - want.int()).abs().max() <= 1


def test_pixel_box_stays_inside_the_image() -> None:
    for x0, y0, w, h in [(0.5, 0.5, 9.6, 4.5), (9.4, 0.0, 0.6, 5.0), (0.0, 0.0, 10.0, 5.0), (3.3, 1.2, 0.2, 0.1)]:
        x, y, bw, bh = crops.pixel_box(x0, y0, w, h, 10, 5)
        assert 1 <= bw <= 10 and 1 <= bh <= 5 and 0 <= x <= 10 - bw and 0 <= y <= 5 - bh
        assert abs(bw - max(w, 1.0)) <= 0.5 and abs(bh - max(h, 1.0)) <= 0.5  # rounded sizes
        assert abs(x - x0) <= 1 and abs(y - y0) <= 1  # corners moved by rounding / clamping only


class _DraftSpy:
    """Records the reductions Pillow's JPEG draft() applied."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.scales: list[float] = []
        original = JpegImagePlugin.JpegImageFile.draft

        def draft(image, mode, size):
            width = image.size[0]
            result = original(image, mode, size)
            if result is not None:
                self.scales.append(width / result[1][2])
            return result

        monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", draft)


def test_reduced_jpeg_decode_gives_views_close_to_the_full_decode(monkeypatch: pytest.MonkeyPatch) -> None:
    image = Image.fromarray(_texture(1200, 1600, seed=3, noise=4.0))
    data = _encode(image, "JPEG", quality=90)
    full = Image.open(io.BytesIO(data))
    full.load()
    spy = _DraftSpy(monkeypatch)
    size, errors = 64, []
    for seed in range(6):
        u = _uniforms(2, seed)
        got = decode_views(data, u, [PAPER, PAPER], size)
        want = _reference(full, u, [PAPER, PAPER], size)
        errors.append((got.float() - want.float()).abs().mean().item())
    # Every crop here is >= 339 px on a side (8 % of 1600 x 1200, aspect 3/4), so draft divided by 4 or 8.
    assert len(spy.scales) == 6 and all(s in (4, 8) for s in spy.scales), spy.scales
    # libjpeg's DCT downscale averages 2^k x 2^k blocks and the crop then still spans >= size pixels,
    # so the antialiased resize sees almost the same signal; the rest is the box's sub-pixel shift
    # (rounding at the reduced scale moves an edge by up to 2^k / 2 full-size pixels) and DCT
    # rounding. Observed about 0.5-1; a wrong box scaling would give tens of levels.
    assert max(errors) < 2.0, errors


def test_no_reduction_when_a_crop_would_fall_below_size(monkeypatch: pytest.MonkeyPatch) -> None:
    data = _encode(Image.fromarray(_texture(1200, 1600, seed=4)), "JPEG", quality=90)
    full = Image.open(io.BytesIO(data))
    # View 0: the smallest square crop, sqrt(8 % of 1600 x 1200) = 391.9 px; view 1: a big one.
    u = torch.full((2, CROP_DRAWS), 0.5)
    u[0, :10], u[1, :10] = 0.0, 0.99
    spy = _DraftSpy(monkeypatch)
    decode_views(data, u, [PAPER, PAPER], 195)  # 391.9 / 2 >= 195: halved
    assert spy.scales == [2]
    spy.scales.clear()
    got = decode_views(data, u, [PAPER, PAPER], 197)  # 391.9 / 2 < 197: no reduction at all
    assert spy.scales == []
    # Without reduction the views equal the full decode's exactly (torchvision's libjpeg-turbo == Pillow's).
    assert torch.equal(got, _reference(full, u, [PAPER, PAPER], 197))


def test_draft_scale_keeps_every_crop_at_least_size() -> None:
    generator = torch.Generator().manual_seed(0)
    for size in (32, 96, 224):
        for _ in range(200):
            boxes = crop_boxes(torch.rand(2, CROP_DRAWS, generator=generator), 3000, 4000, *PAPER).tolist()
            scale = draft_scale(boxes, size)
            shortest = min(min(w, h) for _, _, w, h in boxes)
            assert scale in (1, 2, 4, 8)
            assert shortest / scale >= size or scale == 1  # never below size after the reduction
            assert scale == 8 or shortest / (2 * scale) < size  # and the largest such reduction
    assert draft_scale([(0, 0, 100.0, 5000.0), (0, 0, 3000.0, 3000.0)], 224) == 1  # one small box: none


def _rgba_hidden() -> Image.Image:
    array = np.zeros((40, 50, 4), dtype=np.uint8)
    array[..., :3] = 200  # colour under fully transparent pixels must not leak
    array[:, 25:, 3] = 255  # right half opaque
    return Image.fromarray(array, "RGBA")


def _palette() -> Image.Image:
    image = Image.fromarray(_texture(40, 50, seed=5)).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    image.info["transparency"] = 3
    return image


@pytest.mark.parametrize(
    "name, make, fmt",
    [
        ("grayscale PNG", lambda: Image.fromarray(_texture(40, 50, seed=6)[..., 0]), "PNG"),
        ("palette PNG with transparency", _palette, "PNG"),
        ("RGBA PNG", _rgba_hidden, "PNG"),
        ("16-bit PNG", lambda: Image.fromarray(_texture(40, 50, seed=7)[..., 0].astype(np.uint16) * 257), "PNG"),
        ("grayscale JPEG", lambda: Image.fromarray(_texture(40, 50, seed=8)[..., 0]), "JPEG"),
        ("CMYK JPEG", lambda: Image.fromarray(_texture(40, 50, seed=9)).convert("CMYK"), "JPEG"),
    ],
)
def test_every_mode_gives_rgb_views_as_to_rgb(name: str, make, fmt: str) -> None:
    data = _encode(make(), fmt)
    u = _uniforms(2, 1)
    got = decode_views(data, u, [PAPER, PAPER], 24)
    assert got.shape == (2, 3, 24, 24) and got.dtype == torch.uint8
    # The same colours as decode.to_rgb; for JPEG this also checks torchvision's RGB conversion of
    # grayscale and (Adobe) CMYK against Pillow's, which must be exact for the fast path to be used.
    assert torch.equal(got, _reference(Image.open(io.BytesIO(data)), u, [PAPER, PAPER], 24)), name
    if name == "RGBA PNG":  # the whole image as one view: the transparent left half is black
        whole = decode_views(data, u[:1], [((1.0, 1.0), (1.25, 1.25))], 50)[0]
        assert int(whole[:, :, :20].max()) == 0 and int(whole[:, :, 30:].min()) == 200


@pytest.mark.parametrize(
    "name, data",
    [
        ("truncated JPEG", _encode(Image.fromarray(_texture(120, 160, seed=10)), "JPEG", quality=90)[:3000]),
        ("truncated PNG", _encode(Image.fromarray(_texture(120, 160, seed=11)), "PNG")[:2000]),
        ("header only JPEG", _encode(Image.fromarray(_texture(120, 160, seed=12)), "JPEG")[:700]),
        ("not an image", b"GIF89a? no, just text" * 10),
        ("empty", b""),
    ],
)
def test_unreadable_bytes_raise_decode_error_with_a_reason(name: str, data: bytes) -> None:
    with pytest.raises(DecodeError) as caught:
        decode_views(data, _uniforms(2, 0), [PAPER, PAPER], 32)
    reason = caught.value.reason
    assert isinstance(caught.value, ValueError)
    assert reason and "\n" not in reason and "BytesIO" not in reason and ".cpp" not in reason, reason
    with pytest.raises(DecodeError):
        decode_eval(data, 32)


def test_decompression_bomb_raises_decode_error(monkeypatch: pytest.MonkeyPatch) -> None:
    data = _encode(Image.fromarray(_texture(120, 160, seed=13)), "JPEG")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 19,200 pixels > 2 x 100: Pillow refuses
    with pytest.raises(DecodeError, match="decompression bomb"):
        decode_views(data, _uniforms(2, 0), [PAPER, PAPER], 32)


def test_read_image_bytes_reads_a_regular_file(tmp_path: Path) -> None:
    path = tmp_path / "a.jpg"
    path.write_bytes(b"\xff\xd8" + bytes(range(256)) * 300)
    assert read_image_bytes(str(path)) == path.read_bytes()


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this OS")
def test_read_image_bytes_refuses_a_fifo_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "x.jpg"
    os.mkfifo(fifo)
    outcome: list[BaseException | bytes] = []

    def read() -> None:
        try:
            outcome.append(read_image_bytes(str(fifo)))
        except BaseException as exc:  # noqa: BLE001 - inspected below
            outcome.append(exc)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(timeout=5)
    try:
        assert not reader.is_alive(), "read_image_bytes blocked on a FIFO"
        assert len(outcome) == 1 and isinstance(outcome[0], OSError), outcome
        assert "FIFO" in outcome[0].strerror
    finally:
        if reader.is_alive():  # release a blocked reader so the thread ends
            try:
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
            except OSError:
                pass


def test_read_image_bytes_refuses_a_directory(tmp_path: Path) -> None:
    folder = tmp_path / "folder.jpg"
    folder.mkdir()
    with pytest.raises(OSError) as caught:
        read_image_bytes(str(folder))
    assert caught.value.strerror


@pytest.mark.parametrize(
    "make, fmt",
    [
        (lambda: Image.fromarray(_texture(300, 450, seed=14)), "JPEG"),  # draft path of try_load_square
        (lambda: Image.fromarray(_texture(61, 97, seed=15)), "PNG"),
        (_rgba_hidden, "PNG"),
    ],
)
def test_decode_eval_equals_try_load_square(tmp_path: Path, make, fmt: str) -> None:
    path = tmp_path / f"image.{fmt.lower()}"
    make().save(path, fmt)
    for size in (32, 96):
        want = try_load_square(path, size)
        assert isinstance(want, np.ndarray)
        got = decode_eval(read_image_bytes(str(path)), size)
        assert got.dtype == torch.uint8 and got.shape == (3, size, size)
        assert np.array_equal(got.numpy(), want)
