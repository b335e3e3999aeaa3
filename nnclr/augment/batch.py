"""The batch-level entry points: :class:`BatchAugment` (two training views) and :func:`eval_transform`."""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F

from nnclr.augment.ops import apply_view
from nnclr.augment.params import sample_view_params
from nnclr.augment.recipes import CIFAR_MEAN, CIFAR_STD, RECIPES, ViewRecipe
from nnclr.errors import UserError


def _check_images(images: torch.Tensor) -> None:
    if (
        not isinstance(images, torch.Tensor)
        or images.dim() != 4
        or images.shape[1] != 3
        or images.dtype != torch.uint8
    ):
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        dtype = images.dtype if isinstance(images, torch.Tensor) else None
        raise ValueError(
            f"expected uint8 images of shape (B, 3, H, W), got shape {shape} and dtype {dtype}"
        )


def _stats(values: tuple[float, float, float], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32, device=device).view(1, 3, 1, 1)


class BatchAugment(torch.nn.Module):
    """Two augmented views of a uint8 batch, made on the batch's device.

    Example:
        >>> augment = BatchAugment("byol", 32)
        >>> g = torch.Generator().manual_seed(0)
        >>> v1, v2 = augment(torch.zeros(8, 3, 32, 32, dtype=torch.uint8), g)
        >>> v1.shape
        torch.Size([8, 3, 32, 32])

    Args:
        recipe: ``"byol"`` (NNCLR's, from BYOL Table 6), ``"simclr"`` (SimCLR Appendix A),
            ``"crops"`` (crop + flip only), or a pair of :class:`ViewRecipe`.
        size: Output side S.
        mean: Per-channel mean used for normalisation.
        std: Per-channel standard deviation used for normalisation.
        crop_scale: Overrides the recipes' random-resized-crop area range (both views).
        blur: False turns the Gaussian blur off (both views), as in CIFAR recipes.

    Raises:
        UserError: Unknown recipe name or invalid crop scale.
    """

    def __init__(
        self,
        recipe: str | tuple[ViewRecipe, ViewRecipe] = "byol",
        size: int = 32,
        *,
        mean: tuple[float, float, float] = CIFAR_MEAN,
        std: tuple[float, float, float] = CIFAR_STD,
        crop_scale: tuple[float, float] | None = None,
        blur: bool = True,
    ) -> None:
        super().__init__()
        if isinstance(recipe, str):
            if recipe not in RECIPES:
                raise UserError(
                    f"unknown augmentation recipe {recipe!r}; valid: {', '.join(sorted(RECIPES))}"
                )
            views = RECIPES[recipe]
        else:
            views = tuple(recipe)
        if len(views) != 2 or not all(isinstance(v, ViewRecipe) for v in views):
            raise ValueError("recipe must be a name or a pair of ViewRecipe")
        if crop_scale is not None:
            views = tuple(replace(v, crop_scale=tuple(float(s) for s in crop_scale)) for v in views)
        if not blur:
            views = tuple(replace(v, blur_p=0.0) for v in views)
        if size < 1:
            raise UserError(f"augmentation output size must be >= 1, got {size}")
        self.name = recipe if isinstance(recipe, str) else "custom"
        self.views: tuple[ViewRecipe, ViewRecipe] = views  # type: ignore[assignment]
        self.size = int(size)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)

    def extra_repr(self) -> str:
        return f"recipe={self.name!r}, size={self.size}"

    def sample_params(
        self,
        batch: int,
        height: int,
        width: int,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> list[dict[str, torch.Tensor]]:
        """The parameters of both views (view 1 drawn first), see :func:`sample_view_params`."""
        return [sample_view_params(v, batch, height, width, generator, device) for v in self.views]

    def apply_params(
        self, images: torch.Tensor, params: list[dict[str, torch.Tensor]]
    ) -> list[torch.Tensor]:
        """Apply both views' parameters to a uint8 (B, 3, H, W) batch; returns 2 x (B, 3, S, S).

        (Not named ``apply``: that is ``nn.Module.apply(fn)``, which parents call recursively.)
        """
        _check_images(images)
        return self._views([images], params, crop=True)

    def apply_to_crops(self, crops: torch.Tensor, params: list[dict[str, torch.Tensor]]) -> list[torch.Tensor]:
        """Both views from crops already cut and resized to S x S (the streaming loader's workers).

        Args:
            crops: uint8 (2, B, 3, S, S): view v's random resized crop of each sample in ``crops[v]``.
            params: Both views' parameters from :meth:`sample_params`; their ``box`` is ignored.

        Returns:
            [view1, view2], each (B, 3, S, S) float32 normalised: flip, colour jitter, grayscale,
            blur and solarize as in :meth:`apply_params`.
        """
        if crops.dim() != 5 or crops.shape[0] != len(self.views) or tuple(crops.shape[-2:]) != (self.size, self.size):
            raise ValueError(f"expected uint8 crops (2, B, 3, {self.size}, {self.size}), got {tuple(crops.shape)}")
        for images in crops:
            _check_images(images)
        return self._views(list(crops), params, crop=False)

    def _views(
        self, sources: list[torch.Tensor], params: list[dict[str, torch.Tensor]], *, crop: bool
    ) -> list[torch.Tensor]:
        """The views from one uint8 (B, 3, H, W) batch shared by all views, or one per view.

        ``crop=False``: the sources are the views' crops already (S x S), only the flip is left of the warp.
        On the CPU, large batches go in slices of :meth:`chunk_size` samples.
        """
        first = sources[0]
        mean, std = _stats(self.mean, first.device), _stats(self.std, first.device)
        batch = first.shape[0]
        chunk = self.chunk_size(first) if first.device.type == "cpu" else batch

        def views_of(part: slice) -> list[torch.Tensor]:
            xs = [s[part].to(torch.float32).mul_(1.0 / 255) for s in sources]  # (b, 3, H, W) in [0, 1]
            out = []
            for v, (p, recipe) in enumerate(zip(params, self.views)):
                sliced = {k: t[part] for k, t in p.items()}
                if not crop:
                    sliced["box"] = None
                out.append(apply_view(xs[min(v, len(xs) - 1)], sliced, recipe, self.size, mean, std))
            return out

        if chunk >= batch:
            return views_of(slice(None))
        views = [first.new_empty((batch, 3, self.size, self.size), dtype=torch.float32) for _ in self.views]
        for start in range(0, batch, chunk):
            part = slice(start, start + chunk)
            for out, view in zip(views, views_of(part)):
                out[part] = view
        return views

    # On CPU, batches whose (B, 3, S, S) float tensors exceed this many elements are processed
    # in slices of the batch (same values: parameters are drawn for the whole batch first), to
    # keep the temporaries in cache: 1.3-1.8x faster at B=256, 96x96; no slicing at 32x32.
    chunk_elements = 1 << 20

    def chunk_size(self, images: torch.Tensor) -> int:
        """Samples per slice on CPU: about ``chunk_elements`` floats per (b, 3, S, S) tensor."""
        per_sample = 3 * max(self.size * self.size, images.shape[2] * images.shape[3])
        return max(1, self.chunk_elements // per_sample)

    def forward(
        self, images: torch.Tensor, generator: torch.Generator | None = None
    ) -> list[torch.Tensor]:
        """Two views of ``images``.

        Args:
            images: (B, 3, H, W) uint8 on the training device.
            generator: On the images' device; None uses torch's default generator there.

        Returns:
            [view1, view2], each (B, 3, S, S) float32 normalised with ``mean``/``std``.

        Raises:
            ValueError: Not a uint8 (B, 3, H, W) tensor, or the generator is on another device.
        """
        _check_images(images)
        if generator is not None and generator.device.type != images.device.type:
            raise ValueError(
                f"generator is on {generator.device} but the images are on {images.device}"
            )
        batch, _, height, width = images.shape
        params = self.sample_params(batch, height, width, generator, images.device)
        return self.apply_params(images, params)


def eval_transform(
    images: torch.Tensor,
    size: int,
    mean: tuple[float, float, float] = CIFAR_MEAN,
    std: tuple[float, float, float] = CIFAR_STD,
) -> torch.Tensor:
    """Deterministic evaluation transform: scale to [0, 1], resize if needed, normalise.

    Args:
        images: (B, 3, H, W) uint8.
        size: Output side S. Images are resized (bilinear, antialiased) to (S, S) only when
            (H, W) != (S, S); non-square inputs are stretched, not cropped.
        mean: Per-channel mean.
        std: Per-channel standard deviation.

    Returns:
        (B, 3, S, S) float32.

    Raises:
        ValueError: Not a uint8 (B, 3, H, W) tensor.
    """
    _check_images(images)
    x = images.to(torch.float32).mul_(1.0 / 255)  # (B, 3, H, W)
    if x.shape[-2:] != (size, size):
        x = F.interpolate(
            x, size=(size, size), mode="bilinear", antialias=True, align_corners=False
        )
    return x.sub_(_stats(mean, x.device)).div_(_stats(std, x.device))
