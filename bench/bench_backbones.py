"""Training-step throughput of the encoders on CPU: fp32 vs bf16 autocast, channels_last off/on.

One step is forward + backward of the backbone alone (no heads, no optimizer) on a random batch
in training mode. The four settings of a backbone are timed interleaved (one step of each per
round) so that a noisy shared machine affects them alike; the median over rounds is reported.

Usage::

    python bench/bench_backbones.py        # small_cnn (batch 512) and resnet18 cifar (batch 32)
    python bench/bench_backbones.py --backbones small_cnn --repeats 5 --threads 2

Images per second count every image in the batch (batch 512 = 256 images x 2 views).

Measured on the 2-core AMD EPYC (AVX512-BF16) development machine, torch 2.14.1, 2 threads,
shared with other jobs, so the spread between runs is large:

    small_cnn  batch 512   fp32 ~420 images/s   bf16 + channels_last ~1100-1200 images/s
    resnet18   batch 32    fp32 ~10-20          bf16 + channels_last ~35-90   (CIFAR stem)

bf16 autocast only pays off together with channels_last here; use both on CPU.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled
from nnclr.backbones import build_backbone  # noqa: E402

# name -> (cifar_stem, default batch size); ResNet-18 is ~15x the compute of small_cnn.
DEFAULTS: dict[str, tuple[bool, int]] = {"small_cnn": (False, 512), "resnet18": (True, 32)}


def train_step(model: nn.Module, x: torch.Tensor, *, bf16: bool) -> float:
    """Time one forward + backward pass; returns seconds."""
    model.zero_grad(set_to_none=True)
    start = time.perf_counter()
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else nullcontext()
    with autocast:
        out = model(x)
    out.float().square().mean().backward()
    return time.perf_counter() - start


def bench(name: str, *, batch: int, size: int, repeats: int) -> dict[str, float]:
    """Median images/s of each (precision, memory format) setting of one backbone."""
    cifar_stem = DEFAULTS.get(name, (True, batch))[0]
    model, _ = build_backbone(name, cifar_stem=cifar_stem)
    model.train()
    x = torch.randn(batch, 3, size, size)
    settings = {}
    for channels_last in (False, True):
        m = copy.deepcopy(model)
        xi = x
        if channels_last:
            m = m.to(memory_format=torch.channels_last)
            xi = x.contiguous(memory_format=torch.channels_last)
        for bf16 in (False, True):
            fmt = "channels_last" if channels_last else "contiguous"
            label = f"{'bf16' if bf16 else 'fp32'} {fmt}"
            settings[label] = (m, xi, bf16)
    for m, xi, bf16 in settings.values():  # warm-up: oneDNN builds its kernels on first use
        train_step(m, xi, bf16=bf16)
    times: dict[str, list[float]] = {label: [] for label in settings}
    for _ in range(repeats):
        for label, (m, xi, bf16) in settings.items():
            times[label].append(train_step(m, xi, bf16=bf16))
    return {label: batch / statistics.median(t) for label, t in times.items()}


def main() -> None:
    """Parse arguments, run the benchmark and print a table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbones", nargs="+", default=list(DEFAULTS))
    parser.add_argument("--batch", type=int, default=None, help="default: per backbone")
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {args.threads} threads, {args.size}x{args.size}, "
          f"median of {args.repeats} interleaved steps (fwd+bwd, train mode)")
    for name in args.backbones:
        batch = args.batch or DEFAULTS.get(name, (False, 64))[1]
        model, features = build_backbone(name, cifar_stem=DEFAULTS.get(name, (True, 0))[0])
        params = sum(p.numel() for p in model.parameters())
        print(f"\n{name} (F={features}, {params / 1e6:.2f}M params, batch {batch})")
        results = bench(name, batch=batch, size=args.size, repeats=args.repeats)
        base = results["fp32 contiguous"]
        for label, ips in results.items():
            print(f"  {label:<24} {ips:8.0f} images/s  x{ips / base:.2f}")


if __name__ == "__main__":
    main()
