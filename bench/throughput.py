"""End-to-end pretraining throughput (data, augmentation, step) and peak memory, ours against lightly's loop.

For each backbone (ResNet-18 with the CIFAR stem, the small CNN), every alternative runs in its
own process (:class:`common.Worker`): nnclr's training step for each method (NNCLR, SimCLR,
KMCLR; the library's defaults: bf16 autocast where fast, channels_last, mallopt, the bf16
support-set lookup) and lightly's NNCLR example loop (:class:`loops.LightlyLoop`), on the same
CIFAR-10 images, backbone, batch and support-set size. After one warm-up step each, the
alternatives take turns (A B C D A B C D ...), ``--steps`` steps per turn, ``--rounds`` turns
each; only the one whose turn it is computes. Images/s counts samples (each gives two views), so
batch 256 is 256 images. The support sets are full from the start (ours: random unit vectors, as
after 256 steps of a real run; lightly's bank starts full of random vectors anyway).

Peak RSS is each process's ``ru_maxrss`` at the end (lightly's loader workers are separate
processes: their largest is shown apart). Also shown: the rate from CPU time (the process's and
its ended loader workers', / threads), what a machine without other jobs would give.

Usage::

    python bench/throughput.py [--backbones resnet18 small_cnn] [--rounds 5] [--batch 256] [--support 65536]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import CIFAR10, Worker, load_average, spread  # noqa: E402
from loops import LightlyLoop, OurLoop, lightly_available  # noqa: E402

from nnclr.runtime import physical_cores  # noqa: E402

METHODS = ("nnclr", "simclr", "kmclr")
LIGHTLY = "lightly nnclr"
STEPS_PER_TURN = {"resnet18": 3, "small_cnn": 12}  # a turn of ~8-20 s on 2 cores
TARGETS = {("resnet18", "nnclr"): 90.0, ("small_cnn", "nnclr"): 650.0}  # images/s (issue 6)
TARGET_VS_LIGHTLY = 2.5  # ResNet-18: ours / lightly's, in the same run


def _workers(args: argparse.Namespace, backbone: str) -> dict[str, Worker]:
    workers = {}
    for method in args.methods:
        overrides = [*args.data_overrides, f"model.backbone={backbone}", f"method.name={method}",
                     f"optim.batch_size={args.batch}", f"method.support_size={args.support}", "data.test_split=",
                     f"method.num_prototypes={min(400, args.support)}", *args.set]
        workers[method] = Worker(OurLoop, overrides, True, threads=args.threads)
    if args.lightly:
        workers[LIGHTLY] = Worker(LightlyLoop, args.data, backbone, args.batch, args.support, args.loader_workers,
                                  threads=args.threads)
    return workers


def bench_backbone(args: argparse.Namespace, backbone: str) -> dict[str, dict[str, Any]]:
    """Per alternative: images/s per turn, the same from CPU time, peak RSS (MiB)."""
    steps = args.steps or STEPS_PER_TURN.get(backbone, 5)
    workers = _workers(args, backbone)
    try:
        for worker in workers.values():
            worker.wait_ready()
        for worker in workers.values():
            worker.call("steps", 1)  # warm-up: oneDNN picks its kernels, buffers are allocated
        rates: dict[str, list[float]] = {name: [] for name in workers}
        cpu: dict[str, list[float]] = {name: [] for name in workers}
        for _ in range(args.rounds):
            for name, worker in workers.items():
                t = worker.call("steps", steps)
                rates[name].append(t["images"] / t["seconds"])
                cpu[name].append(t["images"] / (t["cpu_seconds"] / args.threads))
        return {name: {"rates": rates[name], "cpu_rates": cpu[name], "peak_rss": worker.call("peak_rss"),
                       "steps_per_turn": steps} for name, worker in workers.items()}
    finally:
        for worker in workers.values():
            worker.close()


def verdicts(results: dict[str, dict[str, dict[str, Any]]]) -> list[str]:
    """One line per target of issue 6 that this run measured: median against the target."""
    lines = []
    for (backbone, method), target in TARGETS.items():
        if method in results.get(backbone, {}):
            median = spread(results[backbone][method]["rates"])[1]
            lines.append(f"{backbone} {method} end to end: median {median:.0f} images/s, target >= {target:.0f}: "
                         f"{'met' if median >= target else 'MISSED'}")
    both = results.get("resnet18", {})
    if "nnclr" in both and LIGHTLY in both:
        ratio = spread(both["nnclr"]["rates"])[1] / spread(both[LIGHTLY]["rates"])[1]
        lines.append(f"resnet18 nnclr / lightly's loop (medians, same run): x{ratio:.2f}, target >= "
                     f"x{TARGET_VS_LIGHTLY}: {'met' if ratio >= TARGET_VS_LIGHTLY else 'MISSED'}")
    return lines


def table(results: dict[str, dict[str, dict[str, Any]]], batch: int, support: int) -> list[str]:
    """Markdown table rows."""
    rows = ["| backbone | loop | images/s min / median / max | from CPU time (best) | peak RSS (MiB) |",
            "| --- | --- | --- | --- | --- |"]
    for backbone, cases in results.items():
        for name, r in cases.items():
            low, median, high = spread(r["rates"])
            rss = f"{r['peak_rss']['self']:.0f}"
            if name == LIGHTLY:
                rss += f" (+ loader worker {r['peak_rss']['children']:.0f})"
            rows.append(f"| {backbone} | {name} | {low:.1f} / **{median:.1f}** / {high:.1f} | "
                        f"{max(r['cpu_rates']):.1f} | {rss} |")
    return rows


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbones", nargs="+", default=["resnet18", "small_cnn"])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--no-lightly", dest="lightly", action="store_false", help="only our loops")
    parser.add_argument("--data", default=CIFAR10, help="cifar10:ROOT or a data.name (default: %(default)s)")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--support", type=int, default=65536)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=0, help=f"steps per turn (0 = per backbone: {STEPS_PER_TURN})")
    parser.add_argument("--threads", type=int, default=physical_cores())
    parser.add_argument("--loader-workers", type=int, default=physical_cores(), help="lightly's DataLoader workers")
    parser.add_argument("--set", nargs="*", default=[], help="more config overrides for our loops")
    parser.add_argument("--smoke", action="store_true", help="tiny: demo data, small_cnn, batch 32, 1 round of 1 step")
    args = parser.parse_args(argv)
    if args.smoke:
        args.data, args.backbones, args.batch, args.support = "demo", ["small_cnn"], 32, 512
        args.rounds, args.steps, args.loader_workers = 1, 1, 1
    if args.lightly and not lightly_available():
        print("lightly is not installed (pip install --no-deps -r bench/requirements.txt): only our loops are measured")
        args.lightly = False
    from loops import data_overrides

    args.data_overrides = data_overrides(args.data)
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse(argv)
    load_before = load_average()
    results = {backbone: bench_backbone(args, backbone) for backbone in args.backbones}
    out = {"results": results, "batch": args.batch, "support": args.support, "rounds": args.rounds,
           "threads": args.threads, "load": (load_before, load_average()), "lightly": args.lightly,
           "loader_workers": args.loader_workers}
    print("\n".join(table(results, args.batch, args.support) + verdicts(results)))
    print(f"load average {load_before:.1f} before, {load_average():.1f} after")
    return out


if __name__ == "__main__":
    main()
