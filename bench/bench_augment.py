"""Throughput of :class:`nnclr.augment.BatchAugment` (both views of a uint8 batch), on CPU.

Times each recipe (byol, simclr, crops) at B=256 for 32x32 -> 32 and 96x96 -> 96, repeats
interleaved across recipes so that load from other processes hits all of them alike, and
prints the median and best images/s (B images -> 2 views counts as B images). It then
compares with ``torchvision.transforms.v2`` applied image by image (the usual DataLoader
pipeline), on a smaller batch.

Page faults: as a standalone loop, glibc returns the freed temporaries to the kernel after
every call and re-faults them on the next (tens of MB per call here, which costs as much as the
arithmetic). Inside a training loop the heap stays large and the augmentation does not fault.
So the timings are shown twice: with glibc's default settings ("default malloc"), and after
``mallopt`` keeps freed memory in the process ("steady heap"), which is what a training step
sees. Minor page faults per call are printed alongside.

Usage::

    python bench/bench_augment.py [--threads 2] [--batch 256] [--repeats 7] [--sizes 32 96]
"""

from __future__ import annotations

import argparse
import ctypes
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nnclr.augment import (
    CIFAR_MEAN,
    CIFAR_STD,
    RECIPES,
    BatchAugment,
    ViewRecipe,
    blur_kernel_size,
)

RECIPE_NAMES = ("byol", "simclr", "crops")


def _faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _keep_heap() -> bool:
    """Ask glibc to keep freed memory (no trimming, no mmap for big blocks). False if not glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(libc.mallopt(m_trim_threshold, 1 << 30)) and bool(
        libc.mallopt(m_mmap_threshold, 1 << 30)
    )


def bench_batch(size: int, batch: int, repeats: int) -> dict[str, tuple[float, float, float]]:
    """Median images/s, best images/s and page faults per call, per recipe."""
    images = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8)
    augments = {name: BatchAugment(name, size) for name in RECIPE_NAMES}
    generator = torch.Generator().manual_seed(0)
    for augment in augments.values():  # warm-up
        augment(images, generator)
    times: dict[str, list[float]] = {name: [] for name in RECIPE_NAMES}
    faults: dict[str, int] = dict.fromkeys(RECIPE_NAMES, 0)
    for _ in range(repeats):
        for name, augment in augments.items():  # interleaved
            f0 = _faults()
            start = time.perf_counter()
            augment(images, generator)
            times[name].append(time.perf_counter() - start)
            faults[name] += _faults() - f0
    return {
        name: (batch / statistics.median(ts), batch / min(ts), faults[name] / repeats)
        for name, ts in times.items()
    }


def _torchvision_view(recipe: ViewRecipe, size: int):  # -> torchvision.transforms.v2.Compose
    from torchvision.transforms import v2

    ops = [
        v2.RandomResizedCrop(
            size, scale=recipe.crop_scale, ratio=recipe.crop_ratio, antialias=True
        ),
        v2.RandomHorizontalFlip(recipe.flip_p),
    ]
    if recipe.jitter_p > 0:
        jitter = v2.ColorJitter(recipe.brightness, recipe.contrast, recipe.saturation, recipe.hue)
        ops.append(v2.RandomApply([jitter], p=recipe.jitter_p))
    if recipe.gray_p > 0:
        ops.append(v2.RandomGrayscale(recipe.gray_p))
    if recipe.blur_p > 0:
        blur = v2.GaussianBlur(blur_kernel_size(size), sigma=recipe.blur_sigma)
        ops.append(v2.RandomApply([blur], p=recipe.blur_p))
    if recipe.solarize_p > 0:
        ops.append(v2.RandomSolarize(128, p=recipe.solarize_p))
    ops += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(CIFAR_MEAN, CIFAR_STD)]
    return v2.Compose(ops)


def bench_torchvision(size: int, count: int, repeats: int = 3) -> dict[str, float]:
    """Images/s of torchvision.transforms.v2, one uint8 image at a time, both views."""
    images = torch.randint(0, 256, (count, 3, size, size), dtype=torch.uint8)
    result = {}
    for name in RECIPE_NAMES:
        views = [_torchvision_view(r, size) for r in RECIPES[name]]
        for view in views:  # warm-up
            view(images[0])
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            for image in images:
                for view in views:
                    view(image)
            best = min(best, time.perf_counter() - start)
        result[name] = count / best
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 96])
    parser.add_argument(
        "--torchvision-images", type=int, default=128, help="0 skips the comparison"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, {args.threads} threads, B={args.batch}, "
        f"{args.repeats} interleaved repeats"
    )

    results = {}
    for heap in ("default malloc", "steady heap"):
        if heap == "steady heap" and not _keep_heap():
            print("(mallopt unavailable: skipping the steady-heap run)")
            break
        for size in args.sizes:
            results[heap, size] = bench_batch(size, args.batch, args.repeats)
            for name, (median, best, faults) in results[heap, size].items():
                print(
                    f"{heap:>14s} {size:3d}x{size:<3d} {name:7s} median {median:8.0f} img/s  "
                    f"best {best:8.0f} img/s  {faults:7.0f} page faults/call"
                )

    if args.torchvision_images > 0:
        for size in args.sizes:
            count = args.torchvision_images if size <= 32 else max(16, args.torchvision_images // 4)
            tv = bench_torchvision(size, count)
            ours = results.get(("steady heap", size)) or results[("default malloc", size)]
            for name in RECIPE_NAMES:
                print(
                    f"torchvision.v2 per image {size:3d}x{size:<3d} {name:7s} "
                    f"{tv[name]:8.0f} img/s "
                    f"(BatchAugment median {ours[name][0]:.0f}: x{ours[name][0] / tv[name]:.1f})"
                )


if __name__ == "__main__":
    main()
