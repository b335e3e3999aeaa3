"""Evaluation speed: backbone feature extraction (images/s) and the weighted kNN over CIFAR-10-sized sets.

Timed with the library's own functions (:func:`nnclr.evaluate.features.extract_features`,
:func:`nnclr.evaluate.knn.knn_accuracy`), repeats interleaved: features of ``--images`` CIFAR-10
test images per backbone (random weights: speed does not depend on them; eval mode, channels_last,
the precision ``auto`` picks), and the kNN vote of 10,000 queries against 50,000 training features
(k=20, F=512) from random unit vectors.

Usage::

    python bench/eval_speed.py [--backbones small_cnn resnet18] [--images 10000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from common import CIFAR10, measure, spread  # noqa: E402
from loops import load_split  # noqa: E402

from nnclr.augment import CIFAR_MEAN, CIFAR_STD  # noqa: E402
from nnclr.backbones import build_backbone  # noqa: E402
from nnclr.evaluate.features import extract_features  # noqa: E402
from nnclr.evaluate.knn import knn_accuracy  # noqa: E402
from nnclr.evaluate.preprocess import Preprocess  # noqa: E402
from nnclr.runtime import physical_cores, resolve_dtype  # noqa: E402


def cases(args: argparse.Namespace) -> dict[str, tuple[Any, float, str]]:
    cpu = torch.device("cpu")
    images = load_split(args.data, "test").images[: args.images]
    extract = dict(preprocess=Preprocess(images.shape[-1], tuple(CIFAR_MEAN), tuple(CIFAR_STD), cpu,
                                         resolve_dtype("auto", cpu)), channels_last=True)
    timed: dict[str, tuple[Any, float, str]] = {}
    for name in args.backbones:
        backbone = build_backbone(name, cifar_stem=True)[0].to(memory_format=torch.channels_last)
        timed[f"features {name}"] = (lambda b=backbone: extract_features(b, images, **extract), len(images),
                                     "images/s")
    generator = torch.Generator().manual_seed(0)
    train = F.normalize(torch.randn(args.train, 512, generator=generator), dim=1)
    test = F.normalize(torch.randn(args.test, 512, generator=generator), dim=1)
    train_labels = torch.randint(0, 10, (args.train,), generator=generator)
    test_labels = torch.randint(0, 10, (args.test,), generator=generator)
    timed[f"kNN {args.test:,} x {args.train:,}"] = (
        lambda: knn_accuracy(train, train_labels, test, test_labels), 0.0, "s")
    return timed


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=CIFAR10)
    parser.add_argument("--backbones", nargs="+", default=["small_cnn", "resnet18"])
    parser.add_argument("--images", type=int, default=10000)
    parser.add_argument("--train", type=int, default=50000)
    parser.add_argument("--test", type=int, default=10000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=physical_cores())
    parser.add_argument("--smoke", action="store_true", help="tiny: demo data, 64 images, small_cnn, 1 repeat")
    args = parser.parse_args(argv)
    if args.smoke:
        args.data, args.backbones, args.images, args.repeats = "demo", ["small_cnn"], 64, 1
        args.train, args.test = 500, 100
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse(argv)
    torch.set_num_threads(args.threads)
    timed = cases(args)
    values, cpu = measure(timed, args.repeats, args.threads, warm_up=not args.smoke)
    for name, vs in values.items():
        low, median, high = spread(vs)
        print(f"{name:28s} {low:9.2f} / {median:9.2f} / {high:9.2f} {timed[name][2]}  (from CPU time {cpu[name]:.2f})")
    return {"values": values, "cpu": cpu, "units": {name: unit for name, (_, _, unit) in timed.items()},
            "repeats": args.repeats, "threads": args.threads}


if __name__ == "__main__":
    main()
