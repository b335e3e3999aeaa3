"""Training-step throughput of vision transformers against ResNet-18 on 32x32 images (issue 24).

Backbones: ViT-Tiny and ViT-Small as solo-learn trains ViTs on CIFAR (timm's ``vit_tiny_patch16_224`` and
``vit_small_patch16_224`` with patch size 4 at 32x32, i.e. 8x8 patches + the class token: nnclr's
``model.cifar_stem`` variant) and ResNet-18 with the CIFAR stem, at the same batch. Each case runs nnclr's
whole training step (:class:`loops.OurLoop`: both views made on the device, one forward of the two views,
the NNCLR loss against a full support set, the optimiser step) in its own process (:class:`common.Worker`);
after one warm-up step each, the cases take turns (A B C A B C ...), so that load from other processes
hits them alike. Images/s counts samples (each gives two views).

1. Backbones: the three at the library's defaults (bf16 autocast where fast, channels_last), interleaved.
2. Settings: for each backbone in turn, its ``--settings`` interleaved with its default: ``fp32``
   (``train.precision=fp32``), ``contiguous`` (``train.channels_last=false``), ``compile``
   (``train.compile=true``; its minutes of compiling fall in the untimed warm-up step). The ratio to the
   default says whether each helps that family. One backbone at a time, so that memory holds.

Usage::

    python bench/vit.py                                  # CIFAR-10, batch 128, settings fp32 and contiguous
    python bench/vit.py --settings compile --rounds 3
    python bench/vit.py --smoke                          # what the test suite runs: demo data, batch 8, 1 step

Peak RSS at batch 256 (512 views), bf16, measured once on the 2-core AMD EPYC: ViT-S 7.3 GiB, ViT-T
4.3 GiB, ResNet-18 2.1 GiB; hence batch 128 by default.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from common import CIFAR10, Worker, load_average, spread  # noqa: E402
from loops import OurLoop, data_overrides  # noqa: E402

from nnclr.backbones import build_backbone  # noqa: E402
from nnclr.runtime import physical_cores  # noqa: E402

BACKBONES = {
    "resnet18": "resnet18",
    "vit_tiny": "timm:vit_tiny_patch16_224",
    "vit_small": "timm:vit_small_patch16_224",
}
SETTINGS = {
    "fp32": ["train.precision=fp32"],
    "contiguous": ["train.channels_last=false"],
    "compile": ["train.compile=true"],
}
STEPS_PER_TURN = {"resnet18": 2, "vit_tiny": 2, "vit_small": 1}  # turns of similar length at batch 128


def size(backbone: str) -> tuple[int, int]:
    """(parameters, F) of a backbone at 32x32, built on the meta device (no memory, no initialisation)."""
    with torch.device("meta"):
        model, features = build_backbone(BACKBONES[backbone], cifar_stem=True, image_size=32)
    return sum(p.numel() for p in model.parameters()), features


def interleaved(args: argparse.Namespace, cases: dict[str, tuple[str, list[str]]]) -> dict[str, dict[str, Any]]:
    """``name -> (backbone, overrides)``, each in its own worker, timed in turns; per case: images/s per turn,
    the same from CPU time, peak RSS (MiB)."""
    workers = {}
    for name, (backbone, extra) in cases.items():
        overrides = [*args.data_overrides, f"model.backbone={BACKBONES[backbone]}", "model.cifar_stem=true",
                     f"optim.batch_size={args.batch}", f"method.support_size={args.support}", "data.test_split=",
                     *extra, *args.set]
        workers[name] = Worker(OurLoop, overrides, True, threads=args.threads)
    try:
        for worker in workers.values():
            worker.wait_ready()
        for worker in workers.values():
            worker.call("steps", 1)  # warm-up: oneDNN picks its kernels, torch.compile compiles
        rates: dict[str, list[float]] = {name: [] for name in workers}
        cpu: dict[str, list[float]] = {name: [] for name in workers}
        for _ in range(args.rounds):
            for name, worker in workers.items():
                t = worker.call("steps", args.steps or STEPS_PER_TURN[cases[name][0]])
                rates[name].append(t["images"] / t["seconds"])
                cpu[name].append(t["images"] / (t["cpu_seconds"] / args.threads))
        return {name: {"rates": rates[name], "cpu_rates": cpu[name], "peak_rss": worker.call("peak_rss")["self"]}
                for name, worker in workers.items()}
    finally:
        for worker in workers.values():
            worker.close()


def tables(results: dict[str, Any], batch: int) -> list[str]:
    """The two markdown tables: backbones at the defaults, then each setting against its backbone's default."""
    base = spread(results["backbones"]["resnet18"]["rates"])[1] if "resnet18" in results["backbones"] else None
    rows = [f"Batch {batch} (x 2 views, 32x32), the library's defaults; images/s counts samples.", "",
            "| backbone | parameters | F | images/s min / median / max | from CPU time (best) | peak RSS (MiB) "
            "| / resnet18 |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, r in results["backbones"].items():
        low, median, high = spread(r["rates"])
        params, features = results["sizes"][name]
        ratio = f"x{median / base:.2f}" if base else "-"
        rows.append(f"| {name} | {params / 1e6:.1f}M | {features} | {low:.1f} / **{median:.1f}** / {high:.1f} | "
                    f"{max(r['cpu_rates']):.1f} | {r['peak_rss']:.0f} | {ratio} |")
    if results["settings"]:
        rows += ["", "| backbone | setting | images/s median | / default (same turns) |", "| --- | --- | --- | --- |"]
        for backbone, cases in results["settings"].items():
            default = spread(cases["default"]["rates"])[1]
            for setting, r in cases.items():
                median = spread(r["rates"])[1]
                rows.append(f"| {backbone} | {setting} | {median:.1f} | x{median / default:.2f} |")
    return rows


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbones", nargs="+", default=list(BACKBONES), choices=list(BACKBONES))
    parser.add_argument("--settings", nargs="*", default=["fp32", "contiguous"], choices=list(SETTINGS),
                        help="compared with the default, per backbone (none: only the backbones table)")
    parser.add_argument("--settings-for", nargs="+", default=list(BACKBONES), choices=list(BACKBONES),
                        help="the backbones whose settings are compared (default: all)")
    parser.add_argument("--data", default=CIFAR10, help="cifar10:ROOT or a data.name (default: %(default)s)")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--support", type=int, default=65536)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=0, help=f"steps per turn (0 = per backbone: {STEPS_PER_TURN})")
    parser.add_argument("--threads", type=int, default=physical_cores())
    parser.add_argument("--set", nargs="*", default=[], help="more config overrides for every case")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny: demo data, batch 8, 1 round of 1 step; only fp32, only for vit_tiny")
    args = parser.parse_args(argv)
    if args.smoke:
        args.data, args.batch, args.support, args.rounds, args.steps = "demo", 8, 64, 1, 1
        args.settings, args.settings_for = ["fp32"], ["vit_tiny"]
    args.data_overrides = data_overrides(args.data)
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse(argv)
    load_before = load_average()
    results: dict[str, Any] = {"sizes": {name: size(name) for name in args.backbones}}
    results["backbones"] = interleaved(args, {name: (name, []) for name in args.backbones})
    results["settings"] = {
        name: interleaved(args, {"default": (name, []), **{s: (name, SETTINGS[s]) for s in args.settings}})
        for name in args.backbones if args.settings and name in args.settings_for
    }
    results.update(batch=args.batch, rounds=args.rounds, threads=args.threads, load=(load_before, load_average()))
    print("\n".join(tables(results, args.batch)))
    print(f"load average {load_before:.1f} before, {load_average():.1f} after")
    return results


if __name__ == "__main__":
    main()
