"""Streaming loader speed: images/s of two random resized crops per JPEG read from disk.

    python bench/loader.py [--images 640] [--size 224] [--workers 0 1 2] [--rounds 5] [--batch 32]

Writes a folder of photo-like 500 x 375 JPEGs (quality 90, about 110 KiB each: upscaled CIFAR-10
images plus texture noise, in 10 class subfolders) to a temporary directory, then times, per worker
count, two ``DataLoader`` pipelines that both end in uint8 tensors of two S x S views per image:

(a) torchvision's: ``ImageFolder`` (Pillow decode + ``convert("RGB")``) whose transform returns two
    ``RandomResizedCrop(S)`` + ``PILToTensor()`` views, default collate (batch ``B``);
(b) ours: the training loader itself, :class:`nnclr.data.stream.StreamFeed` over the folder's
    index: workers return one ``uint8 (2, B, 3, S, S)`` batch per step, made with
    :func:`nnclr.data.crops.read_image_bytes` + :func:`nnclr.data.crops.decode_views`.

Both shuffle the same way, every process runs one torch thread, and the two alternate (a b a b ...)
so load from other processes hits them alike; the table gives medians. A pass times every batch
after the first (so worker start-up is left out) and counts images, not views; it also gives images
per CPU second (main process + workers, whole pass), the steadier number on a busy machine.

How ``decode_views`` chose its decoder and resize (the scratch measurements behind its docstring):
each candidate decoded / cropped the same synthetic JPEGs in one process with one thread, medians of
interleaved repeats: Pillow ``Image.open(BytesIO)``, Pillow with ``draft()`` at 1/2, 1/4, 1/8,
``torchvision.io.decode_jpeg`` / ``decode_image``; crop + resize by Pillow ``resize(box=...)``,
``torch.nn.functional.interpolate(antialias=True)`` on the uint8 slice, and torchvision v2
``resized_crop``; on 500 x 375 (110 KiB) and 4000 x 3000 (3.3 MiB) photos at S = 224, scale 0.08..1.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run from a checkout: this nnclr
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import PIL  # noqa: E402
import torch  # noqa: E402
import torchvision  # noqa: E402
from PIL import Image, ImageFilter  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402
from torchvision import datasets, transforms  # noqa: E402

from nnclr.data.scan import load_index  # noqa: E402
from nnclr.data.stream import StreamBatch, StreamFeed  # noqa: E402

CROP = ((0.08, 1.0), (3 / 4, 4 / 3))  # RandomResizedCrop's defaults: the NNCLR/BYOL crop
WIDTH, HEIGHT = 500, 375
CIFAR10 = Path(os.environ.get("NNCLR_CIFAR10_DIR") or REPO.parent / "shared" / "data" / "cifar10") / "train.npz"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def write_jpegs(root: Path, count: int, seed: int = 0) -> float:
    """``count`` photo-like 500 x 375 JPEGs in ``root/class{k}/``; returns their mean size in KiB."""
    rng = np.random.default_rng(seed)
    if CIFAR10.is_file():
        sources = np.load(CIFAR10)["images"][:count]
    else:  # no CIFAR-10 copy: smooth random colour fields instead
        sources = rng.integers(0, 256, (count, 6, 8, 3), dtype=np.uint8)
    sizes = []
    for i in range(count):
        base = np.asarray(Image.fromarray(sources[i % len(sources)]).resize((WIDTH, HEIGHT), Image.Resampling.BICUBIC))
        noise = np.clip(128 + 40 * rng.normal(0, 1, base.shape), 0, 255).astype(np.uint8)
        texture = np.asarray(Image.fromarray(noise).filter(ImageFilter.GaussianBlur(0.7)), dtype=np.float32) - 128
        pixels = np.clip(base + 1.6 * texture + rng.normal(0, 3, base.shape), 0, 255).astype(np.uint8)
        folder = root / f"class{i % 10}"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{i:05d}.jpg"
        Image.fromarray(pixels).save(path, "JPEG", quality=90)
        sizes.append(path.stat().st_size)
    return float(np.mean(sizes)) / 1024


class TwoViews:
    """torchvision's side: two independent RandomResizedCrop + PILToTensor views of one PIL image."""

    def __init__(self, size: int) -> None:
        self.view = transforms.Compose([transforms.RandomResizedCrop(size), transforms.PILToTensor()])

    def __call__(self, image: Image.Image) -> list[torch.Tensor]:
        return [self.view(image), self.view(image)]


def torchvision_loader(root: Path, size: int, batch: int, workers: int, seed: int) -> DataLoader:
    dataset = datasets.ImageFolder(str(root), transform=TwoViews(size))
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch, shuffle=True, num_workers=workers, generator=generator)


class StreamPasses:
    """(b) Ours: the training loader itself (:class:`nnclr.data.stream.StreamFeed`) over the folder's index,
    one epoch of a random order per pass; each pass starts its workers and stops them at the end."""

    def __init__(self, root: Path, size: int, batch: int, workers: int, seed: int) -> None:
        self.index, _ = load_index(root, progress=False)
        self.size, self.batch, self.workers, self.seed = size, batch, workers, seed

    def __iter__(self) -> Iterator[StreamBatch]:
        steps = len(self.index) // self.batch
        order = torch.randperm(len(self.index), generator=torch.Generator().manual_seed(self.seed))
        feed = StreamFeed(self.index, size=self.size, crops=(CROP, CROP), seed=self.seed, batch_size=self.batch,
                          steps_per_epoch=steps, rows=slice(0, self.batch), workers=self.workers, prefetch=2,
                          device=torch.device("cpu"))
        try:
            yield from feed.epoch(order, 0, steps)
        finally:
            feed.close()


def ours_loader(root: Path, size: int, batch: int, workers: int, seed: int) -> StreamPasses:
    return StreamPasses(root, size, batch, workers, seed)


def images_of(batch: object) -> int:
    if isinstance(batch, StreamBatch):  # ours: views (2, B, 3, S, S)
        return batch.views.shape[1]
    views, _labels = batch  # torchvision: ([view1, view2], labels)
    return views[0].shape[0]


def cpu_seconds() -> float:
    """User + system CPU time of this process and of its ended children (the loader's workers)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def one_pass(loader: DataLoader) -> tuple[float, float]:
    """Images/s over one epoch, the first batch (worker start-up) left out; and images per CPU second
    of the whole pass (main process + workers, start-up included), which load from other processes
    on a shared machine changes far less than the wall-clock rate."""
    cpu_start = cpu_seconds()
    iterator = iter(loader)
    total = images_of(next(iterator))
    start, images = time.perf_counter(), 0
    for batch in iterator:
        images += images_of(batch)
    seconds = time.perf_counter() - start
    del iterator  # shuts the workers down and reaps them: their CPU time is now the children's
    return images / seconds, (total + images) / (cpu_seconds() - cpu_start)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=640, help="JPEGs in the folder (default 640)")
    parser.add_argument("--size", type=int, default=224, help="view side S (default 224)")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="DataLoader worker counts")
    parser.add_argument("--rounds", type=int, default=5, help="passes of each pipeline per worker count")
    parser.add_argument("--batch", type=int, default=32, help="batch size (default 32)")
    args = parser.parse_args(argv)
    if args.images < 2 * args.batch:
        parser.error("--images must be at least two batches (the first batch of a pass is not timed)")
    torch.set_num_threads(1)  # as in a loader worker; DataLoader workers run one thread anyway

    with tempfile.TemporaryDirectory(prefix="nnclr-loader-bench-") as tmp:
        root = Path(tmp) / "jpegs"
        os.environ["NNCLR_CACHE_DIR"] = str(Path(tmp) / "cache")  # the folder's index: not in ~/.cache
        kib = write_jpegs(root, args.images)
        pipelines = {"torchvision": torchvision_loader, "ours": ours_loader}
        rows = []
        for workers in args.workers:
            rates: dict[str, list[float]] = {name: [] for name in pipelines}
            per_cpu: dict[str, list[float]] = {name: [] for name in pipelines}
            loaders = {name: make(root, args.size, args.batch, workers, seed=0) for name, make in pipelines.items()}
            for loader in loaders.values():  # warm-up: page cache, lazy imports
                one_pass(loader)
            for _ in range(args.rounds):
                for name, loader in loaders.items():
                    rate, cpu_rate = one_pass(loader)
                    rates[name].append(rate)
                    per_cpu[name].append(cpu_rate)
            tv, ours = (statistics.median(rates[name]) for name in pipelines)
            cpu_tv, cpu_ours = (statistics.median(per_cpu[name]) for name in pipelines)
            rows.append((workers, tv, ours, rates, cpu_tv, cpu_ours))
            print(f"workers {workers}: torchvision {tv:.0f} img/s, ours {ours:.0f} img/s ({ours / tv:.2f}x)",
                  file=sys.stderr, flush=True)

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"\nCPU: {cpu_model()} ({os.cpu_count()} logical CPUs); torch {torch.__version__}, "
          f"torchvision {torchvision.__version__}, Pillow {PIL.__version__}; 1-min load average at the end {load:.1f}")
    print(f"{args.images} JPEGs {WIDTH} x {HEIGHT} (mean {kib:.0f} KiB, quality 90), two {args.size} x {args.size} "
          f"uint8 views per image, batch {args.batch}, median of {args.rounds} interleaved passes "
          f"(min..max in brackets)\n")
    print("| workers | (a) torchvision ImageFolder + 2x RandomResizedCrop, img/s "
          "| (b) ours, nnclr's StreamFeed, img/s | (b) / (a) | img per CPU-second (a) / (b) "
          "| (b) / (a) per CPU-second |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    for workers, tv, ours, rates, cpu_tv, cpu_ours in rows:
        spread_tv = f"{min(rates['torchvision']):.0f}..{max(rates['torchvision']):.0f}"
        spread_ours = f"{min(rates['ours']):.0f}..{max(rates['ours']):.0f}"
        print(f"| {workers} | {tv:.0f} ({spread_tv}) | {ours:.0f} ({spread_ours}) | {ours / tv:.2f}x "
              f"| {cpu_tv:.0f} / {cpu_ours:.0f} | {cpu_ours / cpu_tv:.2f}x |")


if __name__ == "__main__":
    main()
