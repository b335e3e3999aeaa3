"""Support-set lookup: time per view and agreement with the exact fp32 top-1, on real embeddings and near-duplicates.

The embeddings are the projections ``z`` of a trained model (``--checkpoint``, as saved by
``bench/accuracy.py``; without one, a model is first pretrained for ``--train-steps`` steps) of
augmented CIFAR-10 training images, made as in training: view 1 of the BYOL recipe, so that a
support set larger than the data set holds several views of the same image (as in a real run).
Queries are other views of random training images, with their own older copies excluded
(``method.exclude_self``), B = 256 per call: one view of one step.

For each support-set size (8,192 / 65,536 / 98,304) the two paths of
:meth:`nnclr.support.SupportSet.nearest` are timed, interleaved: the exact fp32 blocked scan, and
the bf16 path (``low_precision=True``, the default where bf16 is fast: a bf16 scan, then every row
within the proven bf16 error bound of the best re-scored in fp32). Agreement is the share of
``--queries`` queries whose bf16-path neighbour is the fp32 one (or scores exactly the same in
fp32: a tie); shown too, the agreement of a plain bf16 argmax without the re-score.

The same on adversarial near-duplicates (``--copies`` copies of each of size / copies random unit
vectors, each moved by about 0.05, and queries near them: a query's scores against the copies of
its base lie within about 6e-4 of each other, inside bf16 resolution), timed too: every copy is a
candidate there, and a query with more candidates than the path's cap is scanned in fp32.

``--baseline REV`` also times, interleaved with the rest, the low-precision lookup of
``nnclr/support.py`` as of git revision REV (the top-8 re-rank before issue 20: ``426fd9a``), with
its agreement, in a second table.

Usage::

    python bench/lookup.py [--checkpoint FILE] [--sizes 8192 65536 98304] [--queries 10240] [--repeats 7]
                           [--copies 64] [--baseline REV]
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import types
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from common import CIFAR10, Worker, measure, module_at, spread  # noqa: E402
from loops import OurLoop, data_overrides  # noqa: E402

from nnclr import runtime  # noqa: E402
from nnclr.config import from_dict  # noqa: E402
from nnclr.support import SupportSet, scan_topk  # noqa: E402
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


def near_duplicates(size: int, copies: int, dim: int, queries: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """``size`` rows: ``copies`` copies of each of size / copies random unit vectors, moved by about 0.05,
    shuffled; and ``queries`` queries near random ones of those vectors."""
    generator = torch.Generator().manual_seed(seed)
    base = torch.nn.functional.normalize(torch.randn(max(1, size // copies), dim, generator=generator), dim=1)
    bank = base.repeat(copies, 1)[:size]
    bank = bank + 0.05 * torch.randn(bank.shape, generator=generator) / dim**0.5
    near = base[torch.randint(0, len(base), (queries,), generator=generator)]
    near = near + 0.05 * torch.randn(near.shape, generator=generator) / dim**0.5
    return bank[torch.randperm(len(bank), generator=generator)], near


def bench(z: torch.Tensor, indices: torch.Tensor, sizes: list[int], queries: int, repeats: int,
          threads: int, copies: int, baseline: types.ModuleType | None = None) -> dict[int, dict[str, Any]]:
    """Per size and data (real z, near-duplicates): ms per call of each path (interleaved) and the agreement."""
    bank_z, bank_idx = z[: max(sizes)], indices[: max(sizes)]
    query_z, query_idx = z[max(sizes) :], indices[max(sizes) :]
    sets: dict[tuple[int, str], tuple[list[Any], torch.Tensor, torch.Tensor | None]] = {}
    for size in sizes:
        bank, near = near_duplicates(size, copies, z.shape[1], queries)
        for data, rows, row_index, query, query_index in (("real", bank_z[:size], bank_idx[:size], query_z, query_idx),
                                                          ("dup", bank, None, near, None)):
            supports = [kind(size, z.shape[1]) for kind in (SupportSet, *([baseline.SupportSet] if baseline else []))]
            for support in supports:
                support.enqueue(rows, None, row_index, step=0)
            sets[size, data] = (supports, query, query_index)
    timed = {
        f"{size} {data} {path}": (lambda s=supports[path == "base"], q=q[:BATCH], qi=None if qi is None else qi[:BATCH],
                                  low=path != "fp32": s.nearest(q, exclude_indices=qi, low_precision=low), 0.0, "s")
        for (size, data), (supports, q, qi) in sets.items() for path in ("fp32", "bf16", "base")[: 1 + len(supports)]
    }
    values, _ = measure(timed, repeats, threads)
    results: dict[int, dict[str, Any]] = {}
    for (size, data), (supports, query, query_index) in sets.items():
        support = supports[0]
        same = same_raw = same_base = 0
        for start in range(0, queries, BATCH):
            q = query[start : start + BATCH]
            qi = None if query_index is None else query_index[start : start + BATCH]
            exact_rows, _ = support.nearest(q, exclude_indices=qi)
            rows, _ = support.nearest(q, exclude_indices=qi, low_precision=True)
            same += _agree(support, q, rows, exact_rows)
            q16 = torch.nn.functional.normalize(q, dim=1).bfloat16()
            _, raw = scan_topk(q16, support.embeddings.bfloat16(), support.indices, qi, 1, 4096)
            same_raw += _agree(support, q, raw[:, 0], exact_rows)
            if baseline:
                same_base += _agree(support, q, supports[1].nearest(q, exclude_indices=qi, low_precision=True)[0],
                                    exact_rows)
        r = {"fp32_ms": [1000 * v for v in values[f"{size} {data} fp32"]],
             "bf16_ms": [1000 * v for v in values[f"{size} {data} bf16"]],
             "agreement": same / queries, "agreement_no_rerank": same_raw / queries, "queries": queries}
        if baseline:
            r |= {"baseline_ms": [1000 * v for v in values[f"{size} {data} base"]],
                  "agreement_baseline": same_base / queries}
        if data == "real":
            results[size] = r
        else:
            results[size]["near_duplicates"] = r | {"copies": copies}
    return results


def _agree(support: SupportSet, q: torch.Tensor, rows: torch.Tensor, exact_rows: torch.Tensor) -> int:
    """Queries whose ``rows`` is the exact row, or scores the same in fp32 (a tie; both scored alike here)."""
    q = torch.nn.functional.normalize(q, dim=1)
    sim, exact = ((q * support.embeddings[r.clamp_min(0)]).sum(dim=1) for r in (rows, exact_rows))
    return int(((rows == exact_rows) | ((sim == exact) & (rows >= 0))).sum())


def section(r: dict[str, Any]) -> list[str]:
    """The "Support-set lookup" section of BENCHMARKS.md (``bench/run.py``), from :func:`main`'s result."""
    lines = ["## Support-set lookup", "",
             f"`SupportSet.nearest` for {r['batch']} queries (one view of a step), {r['threads']} threads. Real z: "
             f"of augmented CIFAR-10 training images through the model trained {r['model']}; queries exclude their "
             f"own older copies. Near-duplicates: each row one of {r['copies']} copies of a random unit vector "
             "moved by about 0.05, queries near them (scores within bf16 resolution of each other). ms per call, "
             "min / median / max of the interleaved repeats; agreement = same neighbour as the exact fp32 scan (or "
             "an exact fp32 tie). bf16 exact: `low_precision=True`, every row within the bf16 error bound of the "
             "best re-scored in fp32.", "",
             "| entries | fp32 exact (ms) | bf16 exact (ms) | agreement | bf16 argmax alone "
             "| near-duplicates: fp32 (ms) | bf16 exact (ms) | agreement | bf16 argmax alone |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for size, s in r["results"].items():
        cells = [f"{size:,}"]
        for d in (s, s["near_duplicates"]):
            cells += [_fmt(d["fp32_ms"]), _fmt(d["bf16_ms"]), f"{100 * d['agreement']:.2f}% of {d['queries']:,}",
                      f"{100 * d['agreement_no_rerank']:.2f}%"]
        lines.append(f"| {' | '.join(cells)} |")
    if r.get("baseline"):
        lines += ["", f"Against `nnclr/support.py` as of `{r['baseline']}` (`--baseline`), interleaved with the above:",
                  "", "| entries | data | fp32 exact (ms) | bf16, baseline (ms) | agreement | bf16 exact (ms) "
                  "| agreement |", "| --- | --- | --- | --- | --- | --- | --- |"]
        for size, s in r["results"].items():
            for data, d in (("real", s), ("near-duplicates", s["near_duplicates"])):
                lines.append(f"| {size:,} | {data} | {_fmt(d['fp32_ms'])} | {_fmt(d['baseline_ms'])} | "
                             f"{100 * d['agreement_baseline']:.2f}% | {_fmt(d['bf16_ms'])} | "
                             f"{100 * d['agreement']:.2f}% |")
    return [*lines, ""]


def _fmt(values: list[float]) -> str:
    low, median, high = spread(values)
    return f"{low:.1f} / **{median:.1f}** / {high:.1f}"


def verdicts(results: dict[int, dict[str, Any]]) -> list[str]:
    if TARGET_SIZE not in results:
        return []
    r = results[TARGET_SIZE]
    median = spread(r["bf16_ms"])[1]
    dup = r.get("near_duplicates", {}).get("agreement", float("nan"))
    return [f"support-set lookup at {TARGET_SIZE:,}: median {median:.1f} ms per view, target <= {TARGET_MS:g}: "
            f"{'met' if median <= TARGET_MS else 'MISSED'}; same top-1 as fp32 in {100 * r['agreement']:.2f}% "
            f"of {r['queries']:,} queries (near-duplicates: {100 * dup:.2f}%), target >= {100 * TARGET_AGREEMENT:g}%: "
            f"{'met' if min(r['agreement'], dup) >= TARGET_AGREEMENT else 'MISSED'}"]


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, default=None, help="a model saved by bench/accuracy.py --save")
    parser.add_argument("--data", default=CIFAR10, help="for --train-steps without --checkpoint")
    parser.add_argument("--train-steps", type=int, default=300, help="pretraining steps when no --checkpoint")
    parser.add_argument("--sizes", type=int, nargs="+", default=[8192, 65536, 98304])
    parser.add_argument("--queries", type=int, default=10240, help="for the agreement")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--copies", type=int, default=64, help="near-duplicates per base vector")
    parser.add_argument("--baseline", default=None, help="also time nnclr/support.py of this git revision")
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
    baseline = module_at(args.baseline, "nnclr/support.py") if args.baseline else None
    results = bench(z, indices, args.sizes, args.queries, args.repeats, args.threads, args.copies, baseline)
    for size, r in results.items():
        for data, d in (("real", r), ("near-dup", r["near_duplicates"])):
            base = (f"  baseline {spread(d['baseline_ms'])[1]:7.1f} ms, {100 * d['agreement_baseline']:.2f}%"
                    if baseline else "")
            print(f"{size:>7,} rows {data:>8}  fp32 {spread(d['fp32_ms'])[1]:7.1f} ms  bf16 exact "
                  f"{spread(d['bf16_ms'])[1]:7.1f} ms  agreement {100 * d['agreement']:.2f}% "
                  f"(bf16 argmax alone {100 * d['agreement_no_rerank']:.2f}%){base}")
    print("\n".join(verdicts(results)))
    return {"results": results, "model": trained, "threads": args.threads, "batch": BATCH, "copies": args.copies,
            "baseline": args.baseline}


if __name__ == "__main__":
    main()
