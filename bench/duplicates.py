"""Memory and time of ``nnclr duplicates`` (:func:`nnclr.use.duplicates.duplicate_groups`) as linked pairs grow.

Issue 23 found the peak memory growing with the number of linked pairs (every pair was kept until the end:
2.3 GB for 10,000 images at a low threshold against 1.0 GB at 0.95). Each case runs in its own process
(:class:`common.Worker`), so its peak resident memory (``ru_maxrss``) is its own: random clustered
L2-normalised vectors (N, 256), grouped at a high threshold (few pairs) and at a low one (about a third of all
N^2/2 pairs linked). ``--baseline REV`` runs the same cases with ``nnclr/use/duplicates.py`` as of git
``REV``. Cases are run one after another (not interleaved: each is one call); run it on an idle machine.

Usage::

    python bench/duplicates.py [--images 10000] [--thresholds 0.95 0.1] [--baseline REV] [--quick]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from common import Worker, machine, module_at  # noqa: E402


class Grouper:
    """One worker's ``duplicate_groups``: this checkout's, or that of git ``revision``."""

    def __init__(self, revision: str | None) -> None:
        if revision:
            self.groups = module_at(revision, "nnclr/use/duplicates.py").duplicate_groups
        else:
            from nnclr.use.duplicates import duplicate_groups

            self.groups = duplicate_groups

    def run(self, n: int, threshold: float) -> dict[str, float]:
        vectors = clustered(n)
        start = time.perf_counter()
        groups = self.groups(vectors, threshold)
        return {"seconds": time.perf_counter() - start, "groups": len(groups)}


def clustered(n: int, seed: int = 0) -> torch.Tensor:
    """(n, 256) L2-normalised vectors around n / 100 random centres (cosine ~0.7 within a cluster)."""
    generator = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(max(1, n // 100), 256, generator=generator), dim=1)
    vectors = centres[torch.randint(len(centres), (n,), generator=generator)]
    return F.normalize(vectors + 0.04 * torch.randn(n, 256, generator=generator), dim=1)


def linked_pairs(vectors: torch.Tensor, threshold: float, chunk: int = 1000) -> int:
    """The number of pairs ``i < j`` with ``cos >= threshold`` (counted here, not in the measured worker)."""
    n = len(vectors)
    total = sum(int((vectors[s : s + chunk] @ vectors.t() >= threshold).sum()) for s in range(0, n, chunk))
    return (total - n) // 2


def main(argv: list[str] | None = None) -> list[dict[str, object]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=10000)
    parser.add_argument("--thresholds", type=float, nargs="+", default=[0.95, 0.1])
    parser.add_argument("--baseline", metavar="REV", help="also run nnclr/use/duplicates.py as of this git revision")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="tiny sizes (a smoke test of the script)")
    args = parser.parse_args(argv)
    n = 300 if args.quick else args.images
    print(f"machine: {machine()['cpu']}; {n} vectors of 256, {args.threads} threads")
    rows = []
    for revision in [None, *([args.baseline] if args.baseline else [])]:
        for threshold in args.thresholds:
            with Worker(Grouper, revision, threads=args.threads) as worker:
                result = worker.call("run", n, threshold)
                peak = worker.call("peak_rss")["self"]
            result["pairs"] = linked_pairs(clustered(n), threshold)
            row = {"code": revision or "this checkout", "threshold": threshold, **result, "peak_rss_mib": peak}
            rows.append(row)
            print(f"{row['code']:>14}  threshold {threshold:<5} linked pairs {result['pairs']:>12,}  "
                  f"groups {result['groups']:>6}  {result['seconds']:7.2f} s  peak RSS {peak:8.0f} MiB")
    return rows


if __name__ == "__main__":
    main()
