"""Support-set lookup: time per view and agreement with the exact fp32 top-1, on real embeddings.

The embeddings are the projections ``z`` of a trained model (``--checkpoint``, as saved by
``bench/accuracy.py``; without one, a model is first pretrained for ``--train-steps`` steps) of
augmented CIFAR-10 training images, made as in training: view 1 of the BYOL recipe, so that a
support set larger than the data set holds several views of the same image (as in a real run).
Queries are other views of random training images, with their own older copies excluded
(``method.exclude_self``), B = 256 per call: one view of one step.

For each support-set size (8,192 / 65,536 / 98,304) the two paths of
:meth:`nnclr.support.SupportSet.nearest` are timed, interleaved: the exact fp32 blocked scan, and
the bf16 blocked scan with an fp32 re-rank of the top 8 (the default where bf16 is fast). Agreement
is the share of ``--queries`` queries whose bf16 neighbour is the fp32 one (or scores exactly
the same in fp32: a tie); shown too, the agreement of a plain bf16 argmax without the re-rank.

Usage::

    python bench/lookup.py [--checkpoint FILE] [--sizes 8192 65536 98304] [--queries 10240] [--repeats 7]
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from common import CIFAR10, Worker, measure, spread  # noqa: E402
from loops import OurLoop, data_overrides  # noqa: E402

from nnclr import runtime  # noqa: E402
from nnclr.config import from_dict  # noqa: E402
from nnclr.support import SupportSet, _scan_topk  # noqa: E402
from nnclr.train import build_run  # noqa: E402

BATCH = 256  # queries per call: one view of a step at batch 256
TARGET_MS, TARGET_AGREEMENT, TARGET_SIZE = 25.0, 0.999, 98304  # issue 6


@torch.no_grad()
def embeddings(checkpoint: Path, count: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` L2-normalised z (count, D) of view 1 of augmented training images, and their sample indices."""
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    config = from_dict(state["config"])
    config.data.test_split = ""
    run = build_run(config)
    run.model.load_state_dict(state["model"])
    run.model.eval()
    generator = torch.Generator().manual_seed(seed)
    n = len(run.train_set)
    order = torch.cat([torch.randperm(n, generator=generator) for _ in range(math.ceil(count / n))])[:count]
    zs = []
    for start in range(0, count, 512):
        indices = order[start : start + 512]
        view, _ = run.augment(run.train_set.images[indices], generator)
        if config.train.channels_last:
            view = view.contiguous(memory_format=torch.channels_last)
        with runtime.autocast(run.device, run.dtype):
            _, z, _ = run.model(view)
        zs.append(torch.nn.functional.normalize(z.float(), dim=1))
    return torch.cat(zs), order


def bench(z: torch.Tensor, indices: torch.Tensor, sizes: list[int], queries: int, repeats: int,
          threads: int) -> dict[int, dict[str, Any]]:
    """Per size: ms per call of each path (interleaved) and the agreement of the bf16 paths with fp32."""
    bank_z, bank_idx = z[: max(sizes)], indices[: max(sizes)]
    query_z, query_idx = z[max(sizes) :], indices[max(sizes) :]
    supports = {}
    for size in sizes:
        supports[size] = SupportSet(size, z.shape[1])
        supports[size].enqueue(bank_z[:size], None, bank_idx[:size], step=0)
    first_z, first_idx = query_z[:BATCH], query_idx[:BATCH]
    timed = {
        f"{size} {low}": (lambda s=support, low=low: s.nearest(first_z, exclude_indices=first_idx, low_precision=low),
                          0.0, "s")
        for size, support in supports.items() for low in (False, True)
    }
    values, _ = measure(timed, repeats, threads)
    results = {}
    for size, support in supports.items():
        same = same_raw = 0
        for start in range(0, queries, BATCH):
            q, qi = query_z[start : start + BATCH], query_idx[start : start + BATCH]
            exact_rows, exact_sim = support.nearest(q, exclude_indices=qi)
            rows, _ = support.nearest(q, exclude_indices=qi, low_precision=True)
            same += _agree(support, q, rows, exact_rows, exact_sim)
            _, raw = _scan_topk(q.bfloat16(), support.embeddings.bfloat16(), support.indices, qi, 1, 4096)
            same_raw += _agree(support, q, raw[:, 0], exact_rows, exact_sim)
        results[size] = {
            "fp32_ms": [1000 * v for v in values[f"{size} False"]],
            "bf16_ms": [1000 * v for v in values[f"{size} True"]],
            "agreement": same / queries, "agreement_no_rerank": same_raw / queries, "queries": queries,
        }
    return results


def _agree(support: SupportSet, q: torch.Tensor, rows: torch.Tensor, exact_rows: torch.Tensor,
           exact_sim: torch.Tensor) -> int:
    """Queries whose ``rows`` is the exact row, or scores the same in fp32 (a tie)."""
    sim = (q * support.embeddings[rows.clamp_min(0)]).sum(dim=1)
    return int(((rows == exact_rows) | (sim == exact_sim)).sum())


def verdicts(results: dict[int, dict[str, Any]]) -> list[str]:
    if TARGET_SIZE not in results:
        return []
    r = results[TARGET_SIZE]
    median = spread(r["bf16_ms"])[1]
    return [f"support-set lookup at {TARGET_SIZE:,}: median {median:.1f} ms per view, target <= {TARGET_MS:g}: "
            f"{'met' if median <= TARGET_MS else 'MISSED'}; same top-1 as fp32 in {100 * r['agreement']:.2f}% "
            f"of {r['queries']:,} queries, target >= {100 * TARGET_AGREEMENT:g}%: "
            f"{'met' if r['agreement'] >= TARGET_AGREEMENT else 'MISSED'}"]


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, default=None, help="a model saved by bench/accuracy.py --save")
    parser.add_argument("--data", default=CIFAR10, help="for --train-steps without --checkpoint")
    parser.add_argument("--train-steps", type=int, default=300, help="pretraining steps when no --checkpoint")
    parser.add_argument("--sizes", type=int, nargs="+", default=[8192, 65536, 98304])
    parser.add_argument("--queries", type=int, default=10240, help="for the agreement")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=runtime.physical_cores())
    parser.add_argument("--smoke", action="store_true", help="tiny: demo data, 2 training steps, small sets")
    args = parser.parse_args(argv)
    if args.smoke:
        args.data, args.train_steps, args.sizes, args.queries, args.repeats = "demo", 1, [512, 1024], 256, 1
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint, trained = args.checkpoint, "given"
        if checkpoint is None:
            checkpoint, trained = Path(tmp) / "model.pt", f"{args.train_steps} steps"
            with Worker(OurLoop, [*data_overrides(args.data), "data.test_split="], threads=args.threads) as worker:
                worker.call("steps", args.train_steps)
                worker.call("save", str(checkpoint))
        z, indices = embeddings(checkpoint, max(args.sizes) + args.queries)
    results = bench(z, indices, args.sizes, args.queries, args.repeats, args.threads)
    for size, r in results.items():
        print(f"{size:>7,} rows  fp32 {spread(r['fp32_ms'])[1]:7.1f} ms  bf16+re-rank {spread(r['bf16_ms'])[1]:7.1f} ms"
              f"  agreement {100 * r['agreement']:.2f}% (bf16 argmax alone {100 * r['agreement_no_rerank']:.2f}%)")
    print("\n".join(verdicts(results)))
    return {"results": results, "model": trained, "threads": args.threads, "batch": BATCH}


if __name__ == "__main__":
    main()
