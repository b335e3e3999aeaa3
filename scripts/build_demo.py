#!/usr/bin/env python
"""Build the ``demo`` data set shipped in ``nnclr/data/demo/`` from a local CIFAR-10 copy.

The demo set is a class-balanced random subset of CIFAR-10 (fixed seed, numpy ``Generator``),
in order of the original index, stored as lossless WebP sprite sheets plus ``labels.npz``.
The script checks that the files decode, through the package's own loader, to exactly the
source pixels, and that all files together stay within the size budget.

Usage (from the repository root)::

    python scripts/build_demo.py --source ../shared/data/cifar10 --out nnclr/data/demo

Encoding is slow (about 9 s per 1,000 images at WebP ``method=6``); decoding is fast.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import math
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from nnclr.data.demo_set import META_FILE, TILE, load_demo, pixel_sha256, sprite_path  # noqa: E402
from nnclr.data.sprites import tile  # noqa: E402

MAX_TOTAL_BYTES = 8_000_000
WEBP_MAX_SIDE = 16383


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--source",
        type=Path,
        default=REPO.parent / "shared" / "data" / "cifar10",
        help="folder with CIFAR-10 train.npz and test.npz",
    )
    parser.add_argument(
        "--out", type=Path, default=REPO / "nnclr" / "data" / "demo", help="output folder"
    )
    parser.add_argument("--train-per-class", type=int, default=350)
    parser.add_argument("--test-per-class", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--max-bytes",
        type=int,
        default=MAX_TOTAL_BYTES,
        help="fail when all demo files together are larger",
    )
    return parser.parse_args(argv)


def read_source(path: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Read ``images`` [N,32,32,3] uint8, ``labels`` [N] and ``classes`` from a CIFAR-10 npz."""
    with np.load(path, allow_pickle=False) as data:
        images, labels, classes = data["images"], data["labels"], data["classes"]
    if images.dtype != np.uint8 or images.shape[1:] != (TILE, TILE, 3):
        raise SystemExit(
            f"{path}: images are {images.dtype} {images.shape}, want uint8 [N,32,32,3]"
        )
    return images, labels.astype(np.int64), [str(c) for c in classes.tolist()]


def balanced_subset(labels: np.ndarray, per_class: int, rng: np.random.Generator) -> np.ndarray:
    """Pick ``per_class`` indices of every class without replacement; return them sorted."""
    picks = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        if len(members) < per_class:
            raise SystemExit(f"class {c} has only {len(members)} images, fewer than {per_class}")
        picks.append(rng.choice(members, size=per_class, replace=False))
    return np.sort(np.concatenate(picks))


def encode_sheet(images: np.ndarray) -> bytes:
    """Tile the images into a near-square sheet and encode it as lossless WebP."""
    columns = max(
        math.ceil(math.sqrt(len(images))), math.ceil(len(images) / (WEBP_MAX_SIDE // TILE))
    )
    buffer = io.BytesIO()
    Image.fromarray(tile(images, columns)).save(
        buffer, "WEBP", lossless=True, quality=100, method=6, exact=True
    )
    return buffer.getvalue()


def sha256_file(path: Path) -> str:
    """Return the hex sha256 of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


README = """\
# `demo`: a small, balanced subset of CIFAR-10

Shipped with `nnclr` so that `nnclr` runs and its tests work offline, without any download.
Load it with `nnclr.data.load_dataset("demo", split)`.

| split | images | per class | file | bytes |
| --- | --- | --- | --- | --- |
{rows}
| | | | `{meta}` (labels, indices, pixel hashes, class names) | {meta_bytes:,} |
| **total** (data files) | | | | **{total:,}** |

Images are 32x32 RGB, in order of their index in the official CIFAR-10 split. Classes
(label order): {classes}.

## Source and citation

CIFAR-10: Alex Krizhevsky, *Learning Multiple Layers of Features from Tiny Images*, technical
report, University of Toronto, 2009. <https://www.cs.toronto.edu/~kriz/cifar.html>

## How it was built

`python scripts/build_demo.py --train-per-class {train_k} --test-per-class {test_k} --seed {seed}`
from the lossless CIFAR-10 arrays in `shared/data/cifar10` (official order; `train.npz` sha256
`{train_src}`, `test.npz` sha256 `{test_src}`):

1. per split and per class, `{train_k}` (train) / `{test_k}` (test) indices drawn without
   replacement with `numpy.random.default_rng({seed}).choice` (one generator, train first, classes
   in label order), then all indices sorted;
2. the images tiled row-major into one sprite sheet per split (32x32 cells, unused cells
   black) and saved as lossless WebP (`lossless=True, quality=100, method=6, exact=True`);
3. `labels.npz` stores per split `<split>_labels`, `<split>_indices` (index into the official
   split), `<split>_sha256` (sha256 of the decoded `uint8 [N,32,32,3]` pixels), and `classes`.

The build decodes the files with the package's loader and checks that every pixel equals
the source (bit-identical); the loader checks the pixel hash each time.
"""


def write_readme(
    out: Path, args: argparse.Namespace, counts: dict[str, int], classes: list[str]
) -> None:
    """Write ``README.md`` describing the built files (sizes are of the data files only)."""
    sizes = {split: sprite_path(split, out).stat().st_size for split in counts}
    meta_bytes = (out / META_FILE).stat().st_size
    per = {"train": args.train_per_class, "test": args.test_per_class}
    rows = "\n".join(
        f"| {s} | {counts[s]:,} | {per[s]} | `{s}.webp` | {sizes[s]:,} |" for s in counts
    )
    text = README.format(
        rows=rows,
        meta=META_FILE,
        meta_bytes=meta_bytes,
        total=sum(sizes.values()) + meta_bytes,
        classes=", ".join(classes),
        train_k=args.train_per_class,
        test_k=args.test_per_class,
        seed=args.seed,
        train_src=sha256_file(args.source / "train.npz"),
        test_src=sha256_file(args.source / "test.npz"),
    )
    (out / "README.md").write_text(text)


def verify(out: Path, sources: dict[str, np.ndarray], indices: dict[str, np.ndarray]) -> float:
    """Decode with the package loader; check pixels bit-identical; return the decode seconds."""
    start = time.perf_counter()
    loaded = {split: load_demo(split, out) for split in sources}
    seconds = time.perf_counter() - start
    for split, dataset in loaded.items():
        expected = sources[split][indices[split]]
        got = dataset.images.permute(0, 2, 3, 1).numpy()
        if not np.array_equal(got, expected):
            raise SystemExit(f"{split}: decoded pixels differ from the source")
    return seconds


def main(argv: list[str] | None = None) -> int:
    """Build, verify and report."""
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(args.seed)
    per_class = {"train": args.train_per_class, "test": args.test_per_class}
    meta: dict[str, np.ndarray] = {}
    sources: dict[str, np.ndarray] = {}
    indices: dict[str, np.ndarray] = {}
    classes: list[str] = []
    for split, k in per_class.items():
        images, labels, classes = read_source(args.source / f"{split}.npz")
        chosen = balanced_subset(labels, k, rng)
        subset = images[chosen]
        t = time.perf_counter()
        sprite_path(split, args.out).write_bytes(encode_sheet(subset))
        print(
            f"{split}: {len(chosen)} images encoded in {time.perf_counter() - t:.1f} s", flush=True
        )
        sources[split], indices[split] = images, chosen
        meta[f"{split}_labels"] = labels[chosen]
        meta[f"{split}_indices"] = chosen.astype(np.int64)
        meta[f"{split}_sha256"] = np.array(pixel_sha256(subset))
    np.savez_compressed(args.out / META_FILE, classes=np.array(classes), **meta)
    seconds = verify(args.out, sources, indices)
    write_readme(args.out, args, {s: len(indices[s]) for s in per_class}, classes)
    data_files = [sprite_path(s, args.out) for s in per_class] + [args.out / META_FILE]
    total = sum(p.stat().st_size for p in data_files + [args.out / "README.md"])
    for p in data_files + [args.out / "README.md"]:
        print(f"{p.name}: {p.stat().st_size:,} bytes")
    print(
        f"total {total:,} bytes (budget {args.max_bytes:,}); decoded both splits in "
        f"{seconds:.2f} s; pixels bit-identical to the source"
    )
    if total > args.max_bytes:
        print("over budget: rebuild with a smaller --train-per-class", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
