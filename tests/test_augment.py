"""Tests of nnclr.augment: shapes, determinism, the recipes' distributions, torchvision parity."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from hypothesis import given, settings
from hypothesis import strategies as st

from nnclr import augment as A
from nnclr.augment import CIFAR_MEAN, CIFAR_STD, RECIPES, BatchAugment, ViewRecipe, eval_transform
from nnclr.augment import ops as view_ops
from nnclr.errors import UserError

MEAN = torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1)
STD = torch.tensor(CIFAR_STD).view(1, 3, 1, 1)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _unnormalise(view: torch.Tensor) -> torch.Tensor:
    """Normalised view -> [0, 1] pixel values."""
    return view * STD + MEAN


def _binomial_ok(count: int, n: int, p: float, sigmas: float = 5.0) -> bool:
    return abs(count / n - p) <= sigmas * math.sqrt(p * (1 - p) / n) + 1e-9


def _random_images(batch: int, size: int, seed: int = 0, low: int = 0) -> torch.Tensor:
    return torch.randint(low, 256, (batch, 3, size, size), dtype=torch.uint8, generator=_gen(seed))


# Identity crop (full image, aspect 1) and no other operation: recipes below switch on one op.
_NOTHING = ViewRecipe(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip_p=0.0)


# --------------------------------------------------------------------------- API and shapes


@pytest.mark.parametrize("recipe", sorted(RECIPES))
@pytest.mark.parametrize(("height", "width", "size"), [(32, 32, 32), (40, 48, 24), (16, 16, 20)])
def test_shapes_dtype_device(recipe: str, height: int, width: int, size: int) -> None:
    images = torch.randint(0, 256, (5, 3, height, width), dtype=torch.uint8)
    views = BatchAugment(recipe, size)(images, _gen())
    assert isinstance(views, list) and len(views) == 2
    for view in views:
        assert view.shape == (5, 3, size, size)
        assert view.dtype == torch.float32
        assert view.device == images.device
        assert torch.isfinite(view).all()
        pixels = _unnormalise(view)
        assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5


def test_normalisation_of_a_constant_image() -> None:
    """Crops of a constant image are constant: the output is exactly (v / 255 - mean) / std.

    Upsampling 12 -> 20 puts edge samples outside the pixel centres: they must be clamped to
    the border, not blended with zero padding.
    """
    mean, std = (0.1, 0.2, 0.3), (0.5, 0.25, 2.0)
    images = torch.full((64, 3, 12, 12), 200, dtype=torch.uint8)
    views = BatchAugment("crops", 20, mean=mean, std=std)(images, _gen())
    expected = (200 / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(
        1, 3, 1, 1
    )
    for view in views:
        torch.testing.assert_close(view, expected.expand_as(view), atol=1e-5, rtol=0)


def test_empty_batch() -> None:
    views = BatchAugment("byol", 16)(torch.zeros(0, 3, 20, 20, dtype=torch.uint8), _gen())
    assert [tuple(v.shape) for v in views] == [(0, 3, 16, 16)] * 2


def test_unknown_recipe_lists_the_valid_ones() -> None:
    with pytest.raises(UserError, match="byol.*crops.*simclr"):
        BatchAugment("moco")


@pytest.mark.parametrize(
    "images",
    [
        torch.zeros(2, 3, 8, 8),  # float
        torch.zeros(3, 8, 8, dtype=torch.uint8),  # 3-D
        torch.zeros(2, 1, 8, 8, dtype=torch.uint8),  # 1 channel
    ],
)
def test_bad_input_raises_value_error_naming_shape_and_dtype(images: torch.Tensor) -> None:
    with pytest.raises(ValueError, match=r"shape \(.*dtype"):
        BatchAugment("byol", 8)(images, _gen())
    with pytest.raises(ValueError, match=r"shape \(.*dtype"):
        eval_transform(images, 8)


def test_invalid_crop_scale_is_a_user_error() -> None:
    with pytest.raises(UserError, match="crop scale"):
        BatchAugment("byol", 32, crop_scale=(0.0, 1.0))
    with pytest.raises(UserError, match="crop scale"):
        BatchAugment("byol", 32, crop_scale=(0.9, 0.5))


def test_blur_kernel_size_is_odd_and_about_a_tenth() -> None:
    assert [A.blur_kernel_size(s) for s in (8, 32, 96, 224)] == [3, 3, 9, 23]


@settings(max_examples=20, deadline=None)
@given(
    batch=st.integers(1, 4),
    height=st.integers(2, 24),
    width=st.integers(2, 24),
    size=st.integers(2, 24),
    recipe=st.sampled_from(sorted(RECIPES)),
    seed=st.integers(0, 2**31),
)
def test_any_shape_gives_finite_views_in_range(
    batch: int, height: int, width: int, size: int, recipe: str, seed: int
) -> None:
    images = torch.randint(
        0, 256, (batch, 3, height, width), dtype=torch.uint8, generator=_gen(seed)
    )
    for view in BatchAugment(recipe, size)(images, _gen(seed)):
        assert view.shape == (batch, 3, size, size)
        pixels = _unnormalise(view)
        assert torch.isfinite(pixels).all() and pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5


# --------------------------------------------------------------------------- determinism


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_same_seed_same_views_other_seed_other_views(recipe: str) -> None:
    images = _random_images(16, 32)
    augment = BatchAugment(recipe, 32)
    a1, a2 = augment(images, _gen(1))
    b1, b2 = augment(images, _gen(1))
    c1, c2 = augment(images, _gen(2))
    assert torch.equal(a1, b1) and torch.equal(a2, b2)
    assert not torch.equal(a1, c1) and not torch.equal(a2, c2)
    assert not torch.equal(a1, a2)  # the two views differ


def test_generator_state_advances_and_restores() -> None:
    """A run can save the generator state and replay the exact views after a resume."""
    images = _random_images(8, 16)
    augment = BatchAugment("byol", 16)
    generator = _gen(3)
    augment(images, generator)
    state = generator.get_state()
    first = augment(images, generator)
    second = augment(images, generator)
    assert not torch.equal(first[0], second[0])
    generator.set_state(state)
    replay = augment(images, generator)
    assert torch.equal(first[0], replay[0]) and torch.equal(first[1], replay[1])


def test_cpu_batch_slicing_gives_the_same_views() -> None:
    images = _random_images(10, 24)
    whole = BatchAugment("byol", 24)
    sliced = BatchAugment("byol", 24)
    sliced.chunk_elements = 3 * 24 * 24 * 3  # 3 samples per slice: slices of 3, 3, 3, 1
    assert sliced.chunk_size(images) == 3
    for a, b in zip(whole(images, _gen(1)), sliced(images, _gen(1))):
        assert torch.equal(a, b)


def test_default_generator_follows_torch_manual_seed() -> None:
    images = _random_images(8, 16)
    augment = BatchAugment("simclr", 16)
    torch.manual_seed(5)
    a = augment(images)
    torch.manual_seed(5)
    b = augment(images)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_views_are_the_sampled_params_applied() -> None:
    """__call__ == sample_params then apply, with the generator drawn in that order."""
    images = _random_images(8, 24)
    augment = BatchAugment("byol", 16)
    views = augment(images, _gen(4))
    params = augment.sample_params(8, 24, 24, _gen(4))
    again = augment.apply_params(images, params)
    assert all(torch.equal(v, w) for v, w in zip(views, again))


# --------------------------------------------------------------------------- crops and flips


def test_crop_boxes_recovered_from_coordinate_images() -> None:
    """Pixels encode their coordinates (R = 8x, G = 8y); the output reveals each crop box.

    Bilinear interpolation of a linear ramp is exact, so the slope and offset of the output's
    ramps give the crop width, height, position and flip. Interior columns 2..29 avoid the
    clamped border samples of the smallest crops.
    """
    batch, size = 4000, 32
    ramp = torch.arange(size, dtype=torch.uint8) * 8  # (32,)
    images = torch.zeros(batch, 3, size, size, dtype=torch.uint8)
    images[:, 0] = ramp.view(1, 1, size)  # R = 8 x
    images[:, 1] = ramp.view(1, size, 1)  # G = 8 y
    augment = BatchAugment("crops", size)
    view = _unnormalise(augment(images, _gen(7))[0]) * 255  # (B, 3, S, S) pixel values
    lo, hi = 2, size - 3
    red, green = view[:, 0] / 8, view[:, 1] / 8  # input index coordinates
    slope_x = (red[:, size // 2, hi] - red[:, size // 2, lo]) / (hi - lo)  # (B,) = +-w / S
    slope_y = (green[:, hi, size // 2] - green[:, lo, size // 2]) / (hi - lo)
    flipped = slope_x < 0
    w, h = slope_x.abs() * size, slope_y * size
    # x of output column lo: x0 + (lo + 0.5) w / S - 0.5; flipped, column hi has that value.
    left = (
        torch.where(flipped, red[:, size // 2, hi], red[:, size // 2, lo])
        + 0.5
        - (lo + 0.5) * w / size
    )
    top = green[:, lo, size // 2] + 0.5 - (lo + 0.5) * h / size

    # The recovered boxes are the sampled ones.
    params = augment.sample_params(batch, size, size, _gen(7))[0]
    torch.testing.assert_close(torch.stack([left, top, w, h], 1), params["box"], atol=2e-3, rtol=0)
    assert torch.equal(flipped, params["flip"])

    area = w * h / size**2
    ratio = w / h
    tol = 2e-3
    assert area.min() >= 0.08 - tol and area.max() <= 1 + tol
    assert ratio.min() >= 3 / 4 - tol and ratio.max() <= 4 / 3 + tol
    assert left.min() >= -tol and (left + w).max() <= size + tol
    assert top.min() >= -tol and (top + h).max() <= size + tol
    # Spread over the range. Area ~ U(0.08, 1) and log ratio ~ U, conditioned on the box
    # fitting in the image (torchvision's retry loop): areas a > 3/4 fit only when the ratio is
    # in [a, 1/a], which skews the areas towards small ones.
    width = 2 * math.log(4 / 3)  # of the log-ratio range
    fit_large = 2 * (0.25 - 0.75 * math.log(4 / 3)) / width  # int_{3/4}^1 P(r in [a, 1/a]) da
    p_fit = (0.75 - 0.08 + fit_large) / 0.92
    assert area.min() < 0.1 and area.max() > 0.97
    for below in (0.2, 0.54, 0.75):
        expected = (below - 0.08) / 0.92 / p_fit
        assert abs((area < below).float().mean() - expected) < 0.03, below
    assert ratio.min() < 0.77 and ratio.max() > 1.3
    assert 0.45 <= (ratio < 1).float().mean() <= 0.55
    assert _binomial_ok(int(flipped.sum()), batch, 0.5)


def test_crop_scale_override() -> None:
    augment = BatchAugment("byol", 32, crop_scale=(0.5, 1.0))
    for params in augment.sample_params(2000, 32, 32, _gen()):
        x0, _, w, h = params["box"].unbind(1)
        area = w * h / 32**2
        assert area.min() >= 0.5 - 1e-5 and area.min() < 0.52
        assert x0.min() >= 0 and (x0 + w).max() <= 32 + 1e-4


def test_crop_falls_back_to_a_central_crop_when_nothing_fits() -> None:
    """Very wide images with square-ish ratios: torchvision's fallback clamps the ratio."""
    recipe = ViewRecipe(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0))
    params = A.sample_view_params(recipe, 10, 10, 40, _gen())  # area 400 as a square: 20x20 > H
    torch.testing.assert_close(params["box"], torch.tensor([[15.0, 0.0, 10.0, 10.0]]).expand(10, 4))


# --------------------------------------------------------------------------- colour operations


def test_grayscale_rate_is_a_fifth() -> None:
    """BYOL view: R == G == B only for the grayscale samples (jitter never desaturates fully)."""
    batch = 4000
    images = _random_images(batch, 8, seed=1)
    augment = BatchAugment("byol", 8)
    views = augment(images, _gen(11))
    params = augment.sample_params(batch, 8, 8, _gen(11))
    for view, p in zip(views, params):
        pixels = _unnormalise(view)
        gray = ((pixels[:, 0] - pixels[:, 1]).abs().amax((1, 2)) < 1e-4) & (
            (pixels[:, 1] - pixels[:, 2]).abs().amax((1, 2)) < 1e-4
        )
        assert torch.equal(gray, p["gray"])
        assert _binomial_ok(int(gray.sum()), batch, 0.2)


def test_solarize_rate_view2_only() -> None:
    """BYOL's solarize (0 on view 1, 0.2 on view 2) on a constant 0.8 image: 0.8 -> 0.2."""
    batch = 4000
    v1, v2 = (
        replace(
            r,
            **{f: getattr(_NOTHING, f) for f in ("crop_scale", "crop_ratio", "flip_p")},
            jitter_p=0.0,
            gray_p=0.0,
            blur_p=0.0,
        )
        for r in RECIPES["byol"]
    )
    images = torch.full((batch, 3, 8, 8), 204, dtype=torch.uint8)
    out1, out2 = (_unnormalise(v)[:, :, 4, 4] for v in BatchAugment((v1, v2), 8)(images, _gen(5)))
    assert torch.allclose(out1, torch.tensor(0.8), atol=1e-5)  # view 1 never
    solarized = (out2 - 0.2).abs().amax(1) < 1e-5
    assert ((out2 - 0.8).abs().amax(1) < 1e-5).logical_xor(solarized).all()
    assert _binomial_ok(int(solarized.sum()), batch, 0.2)


def test_brightness_only_ratios_within_the_range() -> None:
    """Only brightness 0.4 on a constant mid-gray: out / in in [0.6, 1.4], 20% untouched."""
    batch = 4000
    recipe = replace(_NOTHING, jitter_p=0.8, brightness=0.4)
    images = torch.full((batch, 3, 4, 4), 128, dtype=torch.uint8)
    view, _ = BatchAugment((recipe, recipe), 4)(images, _gen(9))
    ratio = _unnormalise(view)[:, 0, 0, 0] / (128 / 255)
    assert ratio.min() >= 0.6 - 1e-4 and ratio.max() <= 1.4 + 1e-4
    assert ratio.min() < 0.62 and ratio.max() > 1.38
    untouched = (ratio - 1).abs() < 1e-5
    assert _binomial_ok(int(untouched.sum()), batch, 0.2, sigmas=6)


@pytest.mark.parametrize(
    ("recipe", "ranges"),
    [
        (
            "byol",
            {
                "brightness": (0.6, 1.4),
                "contrast": (0.6, 1.4),
                "saturation": (0.8, 1.2),
                "hue": (-0.1, 0.1),
            },
        ),
        (
            "simclr",
            {
                "brightness": (0.2, 1.8),
                "contrast": (0.2, 1.8),
                "saturation": (0.2, 1.8),
                "hue": (-0.2, 0.2),
            },
        ),
    ],
)
def test_jitter_factor_ranges_and_orders(
    recipe: str, ranges: dict[str, tuple[float, float]]
) -> None:
    batch = 4000
    for params in BatchAugment(recipe, 32).sample_params(batch, 32, 32, _gen(2)):
        for name, (lo, hi) in ranges.items():
            values = params[name]
            width = hi - lo
            assert values.min() >= lo and values.max() <= hi, name
            assert values.min() < lo + 0.01 * width and values.max() > hi - 0.01 * width, name
        assert _binomial_ok(int(params["jitter"].sum()), batch, 0.8)
        order = params["order"]
        assert torch.equal(order.sort(1).values, torch.arange(4).expand(batch, 4))  # permutations
        assert len({tuple(row) for row in order.tolist()}) == 24  # all of them occur


@pytest.mark.parametrize(
    ("recipe", "blur_p"), [("byol", (1.0, 0.1)), ("simclr", (0.5, 0.5)), ("crops", (0, 0))]
)
def test_blur_rates_and_sigma_range(recipe: str, blur_p: tuple[float, float]) -> None:
    batch = 4000
    for params, p in zip(BatchAugment(recipe, 32).sample_params(batch, 32, 32, _gen(6)), blur_p):
        sigma = params["sigma"]
        assert sigma.min() >= 0.1 and sigma.max() <= 2.0
        assert sigma.min() < 0.12 and sigma.max() > 1.98
        assert _binomial_ok(int(params["blur"].sum()), batch, p)
    for params in BatchAugment(recipe, 32, blur=False).sample_params(100, 32, 32, _gen(6)):
        assert not params["blur"].any()


def test_blur_off_changes_only_the_blurred_samples() -> None:
    images = _random_images(64, 16, seed=3)
    with_blur = BatchAugment("byol", 16)(images, _gen(8))
    without = BatchAugment("byol", 16, blur=False)(images, _gen(8))
    params = BatchAugment("byol", 16).sample_params(64, 16, 16, _gen(8))
    for a, b, p in zip(with_blur, without, params):
        differs = (a - b).abs().amax((1, 2, 3)) > 1e-6
        visible = p["sigma"] > 0.3  # sigma ~0.1 puts weight exp(-50) on the neighbours: a no-op
        assert torch.equal(differs[visible], p["blur"][visible])
        assert not differs[~p["blur"]].any()


# --------------------------------------------------------------------------- torchvision parity


def test_hue_matches_torchvision() -> None:
    x = torch.rand(64, 3, 8, 8, generator=_gen(1))
    x[0] = 0.5  # gray: hue undefined, must stay gray
    x[1, :, :4] = torch.tensor([1.0, 0.0, 0.0]).view(3, 1, 1)  # pure red: max ties
    x[2, :, :4] = torch.tensor([1.0, 1.0, 0.0]).view(3, 1, 1)  # R == G max
    shift = torch.rand(64, generator=_gen(2)) - 0.5
    ours = view_ops.adjust_hue(x, shift)
    reference = torch.stack([TF.adjust_hue(x[i], float(shift[i])) for i in range(64)])
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=0)


def test_colour_jitter_matches_torchvision_in_each_samples_order() -> None:
    batch = 64
    x = torch.rand(batch, 3, 8, 8, generator=_gen(1))
    recipe = RECIPES["simclr"][0]
    params = A.sample_view_params(recipe, batch, 8, 8, _gen(3))
    ours = view_ops.color_jitter(x, params, recipe)
    ops = {
        A.BRIGHTNESS: (TF.adjust_brightness, "brightness"),
        A.CONTRAST: (TF.adjust_contrast, "contrast"),
        A.SATURATION: (TF.adjust_saturation, "saturation"),
        A.HUE: (TF.adjust_hue, "hue"),
    }
    for i in range(batch):
        y = x[i]
        if params["jitter"][i]:
            for op in params["order"][i].tolist():
                fn, key = ops[op]
                y = fn(y, float(params[key][i]))
        torch.testing.assert_close(ours[i], y, atol=1e-5, rtol=0)


def test_grayscale_matches_torchvision() -> None:
    x = torch.rand(4, 3, 8, 8, generator=_gen(1))
    torch.testing.assert_close(view_ops.grayscale(x), TF.rgb_to_grayscale(x), atol=1e-6, rtol=0)


@pytest.mark.parametrize("select", [True, False])  # CPU subset path / delta-kernel path (GPUs)
@pytest.mark.parametrize("kernel_size", [3, 9])
def test_blur_matches_torchvision(kernel_size: int, select: bool) -> None:
    batch = 12
    x = torch.rand(batch, 3, 20, 20, generator=_gen(1))
    sigma = 0.1 + 1.9 * torch.rand(batch, generator=_gen(2))
    apply = torch.arange(batch) % 3 != 0
    ours = view_ops.gaussian_blur(x.clone(), sigma, apply, kernel_size, select=select)
    for i in range(batch):
        expected = (
            TF.gaussian_blur(x[i], [kernel_size] * 2, [float(sigma[i])] * 2) if apply[i] else x[i]
        )
        torch.testing.assert_close(ours[i], expected, atol=1e-5, rtol=0)


def test_solarize_matches_torchvision() -> None:
    x = torch.rand(6, 3, 8, 8, generator=_gen(1))
    apply = torch.tensor([True, False, True, True, False, True])
    for threshold in (0.5, 0.3):
        ours = view_ops.solarize(x, apply, threshold)
        for i in range(6):
            expected = TF.solarize(x[i], threshold) if apply[i] else x[i]
            torch.testing.assert_close(ours[i], expected, atol=1e-6, rtol=0)


# --------------------------------------------------------------------------- eval transform


def test_eval_transform_same_size_is_exact_and_deterministic() -> None:
    images = _random_images(6, 16)
    state = torch.get_rng_state()
    out = eval_transform(images, 16)
    assert torch.equal(torch.get_rng_state(), state)  # no randomness drawn
    torch.testing.assert_close(out, (images.float() / 255 - MEAN) / STD, atol=1e-6, rtol=0)
    assert torch.equal(out, eval_transform(images, 16))


def test_eval_transform_resizes_with_antialiasing_only_when_needed() -> None:
    images = _random_images(3, 32)
    out = eval_transform(images, 16, mean=(0, 0, 0), std=(1, 1, 1))
    assert out.shape == (3, 3, 16, 16)
    expected = F.interpolate(images.float() / 255, size=(16, 16), mode="bilinear", antialias=True)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)
    # Antialiased: a 1-pixel checkerboard averages to gray (plain bilinear would alias).
    checker = ((torch.arange(32)[:, None] + torch.arange(32)[None, :]) % 2 * 255).to(torch.uint8)
    gray = eval_transform(
        checker.expand(1, 3, 32, 32).contiguous(), 16, mean=(0, 0, 0), std=(1, 1, 1)
    )
    assert (gray - 0.5).abs().max() < 0.05


# --------------------------------------------------------------------------- devices


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_views_stay_on_the_device_and_match_the_delta_kernel_path() -> None:
    images = _random_images(32, 32).cuda()
    generator = torch.Generator(device="cuda").manual_seed(0)
    views = BatchAugment("byol", 32)(images, generator)
    assert all(v.device == images.device for v in views)
    with pytest.raises(ValueError, match="generator"):
        BatchAugment("byol", 32)(images, _gen())
