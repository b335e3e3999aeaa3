"""Run every speed and accuracy benchmark of issue 6 and write BENCHMARKS.md.

Parts, in this order (each is a script of its own in ``bench/``; ``--parts`` picks some):

1. ``throughput``: end-to-end pretraining images/s and peak RSS, ResNet-18-CIFAR and the small CNN,
   NNCLR/SimCLR/KMCLR against lightly's NNCLR example loop, interleaved (``bench/throughput.py``);
2. ``accuracy``: time to accuracy against lightly's loop, and bf16 against fp32 (``bench/accuracy.py``);
   the model it trains is the trained encoder of part 3;
3. ``lookup``: support-set lookup time and agreement with exact fp32 (``bench/lookup.py``);
4. ``eval``: feature extraction and kNN speed (``bench/eval_speed.py``).

Usage::

    pip install --no-deps -r bench/requirements.txt   # lightly, for the comparison (no torch change)
    python bench/run.py                      # everything, 43 minutes on 2 idle cores -> BENCHMARKS.md
    python bench/run.py --quick              # the same with short settings, a few minutes
    python bench/run.py --parts lookup eval  # some parts

``--smoke`` runs each script for one tiny iteration on the demo data (what the test suite does);
``--out`` chooses the file (default: BENCHMARKS.md at the repository root).
"""

from __future__ import annotations

import argparse
import datetime
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import accuracy  # noqa: E402
import eval_speed  # noqa: E402
import lookup  # noqa: E402
import throughput  # noqa: E402
from common import REPO, load_average, machine, spread  # noqa: E402

PARTS = ("throughput", "accuracy", "lookup", "eval")
QUICK = {  # 4.5 minutes on 2 idle cores (measured 2026-12-04): NNCLR and lightly only, a 30 s budget, kNN on 10,000
    "throughput": ["--rounds", "2", "--steps", "2", "--methods", "nnclr"],
    "accuracy": ["--budget", "30", "--precision-epochs", "0.1", "--seeds", "0", "--knn-images", "10000"],
    "lookup": ["--repeats", "3", "--queries", "2560"],
    "eval": ["--repeats", "1", "--images", "2000"],
}


def run_parts(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """Each part's ``main`` with the mode's arguments; returns part -> (argv, result, seconds)."""
    model = workdir / "nnclr_tta.pt"
    done: dict[str, Any] = {}
    for part in args.parts:
        argv = ["--smoke"] if args.smoke else list(QUICK[part]) if args.quick else []
        if part == "accuracy":
            argv += ["--save", str(model)]
        if part == "lookup" and model.is_file():
            argv += ["--checkpoint", str(model)]
        module = {"throughput": throughput, "accuracy": accuracy, "lookup": lookup, "eval": eval_speed}[part]
        print(f"== {part}: bench/{Path(module.__file__).name} {shlex.join(argv)}", flush=True)
        start = time.perf_counter()
        result = module.main(argv)
        done[part] = {"argv": argv, "result": result, "seconds": time.perf_counter() - start}
    return done


def _fmt(values: list[float], digits: int = 1) -> str:
    low, median, high = spread(values)
    return f"{low:.{digits}f} / **{median:.{digits}f}** / {high:.{digits}f}"


def throughput_section(r: dict[str, Any]) -> list[str]:
    lines = ["## End-to-end pretraining throughput and peak memory", "",
             f"Batch {r['batch']} (x 2 views, 32x32), support set {r['support']:,} x 256 (full from the start), "
             f"{r['threads']} threads, {r['rounds']} interleaved turns per loop; images/s counts samples. "
             f"Ours: `nnclr.train.train_step` with the defaults (bf16 autocast where fast, channels_last, mallopt, "
             f"bf16 support-set lookup, views made in-process from uint8). lightly: its NNCLR example loop "
             f"(`SimCLRTransform` in a `DataLoader` with {r['loader_workers']} workers, two forward passes, "
             f"`NNMemoryBankModule`, `NTXentLoss`, SGD, fp32) on the same backbone, heads, batch and support size."
             + ("" if r["lightly"] else " **lightly was not installed: its rows are missing.**"), ""]
    lines += throughput.table(r["results"], r["batch"], r["support"])
    lines += ["", f"Load average {r['load'][0]:.1f} before, {r['load'][1]:.1f} after.", ""]
    return lines


def accuracy_section(r: dict[str, Any]) -> list[str]:
    lines = []
    tta = r.get("tta")
    if tta:
        lines += ["## Time to accuracy", "",
                  f"Each loop pretrains `{tta['backbone']}` on the CIFAR-10 training split for {tta['budget']:.0f} s "
                  "of wall clock, alone on the machine; then the weighted-kNN top-1 on the test split (k=20, T=0.07, "
                  "the training split as memory, the same code for both). Ours: the default recipe (`nnclr pretrain` "
                  "defaults, LARS warm-up + cosine fitted to the budget). lightly: its example (SGD lr 0.06, "
                  "constant).",
                  "", "| loop | steps | epochs | images/s | kNN top-1 | kNN top-5 | load before / after |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        for name in ("nnclr", "lightly"):
            if name in tta:
                t = tta[name]
                lines.append(f"| {name} | {t['steps']} | {t['epochs']:.2f} | {t['images'] / t['seconds']:.1f} | "
                             f"**{t['knn']['top1']:.2f}%** | {t['knn']['top5']:.2f}% | "
                             f"{t['load'][0]:.1f} / {t['load'][1]:.1f} |")
        lines.append("")
    check = r.get("precision")
    if check:
        lines += ["## bf16 against fp32: accuracy", "",
                  f"The same run (`{check['backbone']}`, {check['epochs']:g} epochs of CIFAR-10, same seed: same "
                  "initialisation, data order and views) in `train.precision=fp32` and `bf16`; kNN evaluated in fp32.",
                  "", "| seed | fp32 kNN top-1 | bf16 kNN top-1 | fp32 images/s | bf16 images/s |",
                  "| --- | --- | --- | --- | --- |"]
        for seed, fp32 in check["runs"]["fp32"].items():
            bf16 = check["runs"]["bf16"][seed]
            lines.append(f"| {seed} | {fp32['knn']['top1']:.2f}% | {bf16['knn']['top1']:.2f}% | "
                         f"{fp32['images'] / fp32['seconds']:.1f} | {bf16['images'] / bf16['seconds']:.1f} |")
        lines += ["", f"Mean: bf16 {check['mean_top1']['bf16']:.2f}%, fp32 {check['mean_top1']['fp32']:.2f}% "
                  f"(difference {check['difference']:+.2f} points).", ""]
    return lines


def lookup_section(r: dict[str, Any]) -> list[str]:
    return lookup.section(r)


def eval_section(r: dict[str, Any]) -> list[str]:
    lines = ["## Evaluation speed", "",
             f"`extract_features` (eval mode, channels_last, bf16 where fast) and `knn_accuracy` (k=20), "
             f"{r['threads']} threads, {r['repeats']} interleaved repeats.", "",
             "| case | min / median / max | from CPU time (best) |", "| --- | --- | --- |"]
    for name, values in r["values"].items():
        unit = r["units"][name]
        lines.append(f"| {name} | {_fmt(values, 2)} {unit} | {r['cpu'][name]:.2f} {unit} |")
    return [*lines, ""]


def markdown(done: dict[str, Any], args: argparse.Namespace, command: str, seconds: float,
             load: tuple[float, float]) -> str:
    info = machine()
    mode = "smoke (tiny sizes: the numbers mean nothing)" if args.smoke else "quick" if args.quick else "full"
    lines = ["# Benchmarks", "",
             f"Written by `{command}` ({mode}) on {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}, in "
             f"{seconds / 60:.1f} minutes; load average {load[0]:.1f} at the start, {load[1]:.1f} at the end "
             "(on a machine shared with other jobs every rate is low and noisy; the alternatives of a table were "
             "interleaved, so their ratios hold better than their values). See `bench/README.md`.", "",
             "| | |", "| --- | --- |", *[f"| {k} | {v} |" for k, v in info.items()], "", "## Targets (issue 6)", ""]
    verdicts = []
    if "throughput" in done:
        verdicts += throughput.verdicts(done["throughput"]["result"]["results"])
    if "accuracy" in done:
        verdicts += accuracy.verdicts(done["accuracy"]["result"])
    if "lookup" in done:
        verdicts += lookup.verdicts(done["lookup"]["result"]["results"])
    lines += [f"- {v}" for v in verdicts] or ["- (no part with a target was run)"]
    lines += ["", "## Commands", ""]
    lines += [f"- `python bench/{part if part != 'eval' else 'eval_speed'}.py {shlex.join(d['argv'])}`: "
              f"{d['seconds'] / 60:.1f} min" for part, d in done.items()]
    lines.append("")
    sections = {"throughput": throughput_section, "accuracy": accuracy_section, "lookup": lookup_section,
                "eval": eval_section}
    for part, d in done.items():
        lines += sections[part](d["result"])
    return "\n".join(lines)


KEPT = "<!-- below: benchmarks of other scripts, kept as they are by bench/run.py -->"


def kept_sections(path: Path) -> str:
    """The part of an existing BENCHMARKS.md from the :data:`KEPT` marker on (the streaming loader's
    benchmarks, run by their own scripts), so that a new run of this script does not drop them."""
    text = path.read_text() if path.is_file() else ""
    return "\n" + text[text.index(KEPT):] if KEPT in text else ""


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS)
    parser.add_argument("--quick", action="store_true", help="short settings: a few minutes")
    parser.add_argument("--smoke", action="store_true", help="one tiny iteration of each script (the test suite)")
    parser.add_argument("--out", type=Path, default=REPO / "BENCHMARKS.md")
    args = parser.parse_args(argv)
    # Workers always come from the fork server, also in --smoke (the test suite): a plain fork of a
    # process that has run OpenMP-parallel torch ops deadlocks the child in its first parallel op.
    command = "python bench/run.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    start, load = time.perf_counter(), load_average()
    with tempfile.TemporaryDirectory() as tmp:
        done = run_parts(args, Path(tmp))
    text = markdown(done, args, command.strip(), time.perf_counter() - start, (load, load_average()))
    args.out.write_text(text + "\n" + kept_sections(args.out))
    print(f"wrote {args.out}")
    return args.out


if __name__ == "__main__":
    main()
