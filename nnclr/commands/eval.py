"""``nnclr eval {knn,linear,semi,transfer,retrieval,all} --checkpoint RUN_DIR_OR_FILE [--data NAME] ...``."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Any

from nnclr.cli import device_type, positive_int, seed_type, threads_type
from nnclr.config import EVAL, FLOAT32_MAX

if TYPE_CHECKING:
    from nnclr.pretrained import Pretrained


def _percent(fraction: float) -> str:
    """0.01 -> ``1%%`` (argparse help strings are %-formatted)."""
    return f"{100 * fraction:g}%%"


_FRACTIONS_HELP = " and ".join(_percent(f) for f in EVAL.semi_fractions)
PROTOCOL_HELP = {
    "knn": f"weighted kNN on frozen features (k={EVAL.knn_k}, T={EVAL.knn_temperature:g}; --sweep for a grid)",
    "linear": "linear probe on frozen features (--mode fast: L-BFGS on cached features; paper: SGD, augmented)",
    "semi": f"fine-tune the whole network on class-balanced {_FRACTIONS_HELP} label subsets",
    "transfer": "fast linear probe on another data set than the pretraining one (--transfer-data)",
    "retrieval": "test images as queries against the training images: recall@1/5/10, mAP@R",
    "all": "every protocol that fits the data (transfer only with --transfer-data)",
}




def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < value <= FLOAT32_MAX:  # NaN fails every comparison
        raise argparse.ArgumentTypeError(f"{value:g} must be a finite number > 0 (at most {FLOAT32_MAX:.3g})")
    return value


def _batch_size(text: str) -> int:
    value = positive_int(text)
    if value < 2:
        raise argparse.ArgumentTypeError(
            f"{value} is too small: the paper linear probe and fine-tuning train batch-norm layers, which need at "
            "least 2 images per batch (use --batch-size 2 or more)")
    return value


def _fraction(text: str) -> float:
    value = _positive_float(text.rstrip("%")) / (100 if text.endswith("%") else 1)
    if value > 1:
        raise argparse.ArgumentTypeError(f"{text} is not a fraction in (0, 1] (write 0.01 or 1%)")
    return value


def _shown(value: Any) -> str:
    """A default as the help shows it: 0.07, ``0.01 0.1`` for a list."""
    if isinstance(value, (list, tuple)):
        return " ".join(_shown(v) for v in value)
    return f"{value:g}" if isinstance(value, float) else str(value)


def _with_default(parser: argparse.ArgumentParser, flag: str, default: Any, text: str, note: str = "",
                  **kwargs: Any) -> None:
    """Add ``flag`` with ``default`` (from :data:`nnclr.config.EVAL`), its help ending in ``(default VALUE)``."""
    parser.add_argument(flag, default=default, help=f"{text} (default {_shown(default)}{note})", **kwargs)


def add_parser(commands: Any) -> None:
    evaluate = commands.add_parser(
        "eval",
        help="evaluate a pretrained encoder: kNN, linear probe, semi-supervised, transfer, retrieval",
        description="Evaluate a pretrained encoder with a fixed protocol. Each protocol writes "
        "<run_dir>/eval/<protocol>-<data>.json and prints a table; features are cached in <run_dir>/features/.",
    )
    protocols = evaluate.add_subparsers(dest="protocol", metavar="PROTOCOL", required=True)
    for name, text in PROTOCOL_HELP.items():
        sub = protocols.add_parser(name, help=text, description=text)
        sub.add_argument("--checkpoint", required=True, metavar="RUN_DIR_OR_FILE",
                         help="a run directory of `nnclr pretrain` or its checkpoint.pt")
        sub.add_argument("--data", metavar="NAME", help="data set (default: the one the checkpoint was trained on)")
        _with_default(sub, "--train-split", EVAL.train_split, "memory / classifier training split")
        _with_default(sub, "--test-split", EVAL.test_split, "test split")
        sub.add_argument("--device", default=EVAL.device, type=device_type,
                         help="auto (CUDA if available), cpu, cuda, cuda:N")
        _with_default(sub, "--seed", EVAL.seed, "seed of validation splits, subsets, SGD", type=seed_type)
        _with_default(sub, "--threads", EVAL.threads, "CPU threads, at most the CPUs this process may use",
                      ": OMP_NUM_THREADS if set, else one per physical core, as train.threads", type=threads_type)
        sub.add_argument("--no-progress", action="store_true", help="no progress bars")
        if name in ("knn", "all"):
            _with_default(sub, "--k", EVAL.knn_k, "kNN neighbours", type=positive_int)
            _with_default(sub, "--temperature", EVAL.knn_temperature, "kNN vote weight exp(sim/T)",
                          type=_positive_float)
            sub.add_argument("--sweep", action="store_true", help="kNN over a grid of k and T; reports the best")
        if name in ("linear", "all"):
            _with_default(sub, "--mode", EVAL.linear_mode,
                          "fast: L-BFGS on cached features; paper: SGD on augmented images", choices=("fast", "paper"))
        if name in ("linear", "semi", "all"):
            semi_epochs = ", ".join(f"{EVAL.semi_epochs(f)} for {_percent(f)}" for f in EVAL.semi_fractions)
            sub.add_argument("--epochs", type=positive_int,
                             help=f"paper linear: epochs (default {EVAL.paper_epochs}); semi: epochs "
                             f"(default {semi_epochs})")
            _with_default(sub, "--batch-size", EVAL.batch_size, "SGD batch size", type=_batch_size)
            sub.add_argument("--lr", type=_positive_float,
                             help=f"SGD learning rate at batch 256 (default {EVAL.paper_lr:g} paper linear, "
                             f"{EVAL.semi_lr:g} semi)")
        if name in ("semi", "all"):
            _with_default(sub, "--fractions", list(EVAL.semi_fractions), "label fractions, e.g. 0.01 0.1 or 1%% 10%%",
                          type=_fraction, nargs="+", metavar="F")
            sub.add_argument("--subset-file", metavar="FILE",
                             help="a subset to reuse: one 0-based training index per line")
        if name in ("transfer", "all"):
            sub.add_argument("--transfer-data", metavar="NAME",
                             help="the data set to transfer to (transfer: default --data)")


def _format(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _extra(record: dict[str, Any]) -> str:
    metrics, settings = record["metrics"], record["settings"]
    if record["protocol"] == "knn":
        best = metrics.get("best")
        text = f"k={settings['k']} T={settings['temperature']:g}"
        return text + (f"; best k={best['k']} T={best['temperature']:g}" if best else "")
    if record["protocol"] in ("linear", "transfer"):
        if settings["mode"] == "fast":
            return f"fast, l2={metrics['l2']:g}" + (f", from {settings['pretrain_data']}"
                                                    if "pretrain_data" in settings else "")
        same = "bit-identical" if metrics.get("backbone_bit_identical") else "CHANGED"
        return f"paper, {settings['epochs']} epochs, backbone {same}"
    if record["protocol"] == "semi":
        return "; ".join(f"{name}: {v['top1']:.2f} ({v['labelled_images']} labels)"
                         for name, v in metrics["subsets"].items())
    if record["protocol"] == "retrieval":
        return " ".join(f"{key}={value:.2f}" for key, value in metrics.items())
    return ""


def print_table(records: list[dict[str, Any]]) -> None:
    """One line per protocol: data, split sizes, top-1/top-5, wall time and the protocol's own numbers."""
    rows = [("protocol", "data", "train/test", "top1", "top5", "time", "details")]
    for r in records:
        splits = f"{r['splits'].get('train', 0)}/{r['splits'].get('test', 0)}"
        rows.append((r["protocol"], r["data"], splits, _format(r["top1"]), _format(r["top5"]),
                     f"{r['wall_time_s']:.1f}s", _extra(r)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[-1])


def run(args: argparse.Namespace) -> int:
    """Load the encoder, run the protocol(s), write their JSON and print a table."""
    import nnclr
    from nnclr import runtime
    from nnclr.errors import data_named_as_typed

    runtime.set_threads(args.threads)
    runtime.resolve_device(args.device, "--device")  # CUDA where there is none: named as the user typed it
    with data_named_as_typed(data=args.data, transfer_data=getattr(args, "transfer_data", None)):
        return _evaluate(args, nnclr.load(args.checkpoint, device=args.device))


def _evaluate(args: argparse.Namespace, pretrained: Pretrained) -> int:
    """The protocol(s) of ``args`` on ``pretrained``."""
    from nnclr.errors import UserError
    from nnclr.evaluate import protocols

    progress = False if args.no_progress else None
    evaluation = protocols.Evaluation(
        pretrained=pretrained, data=args.data or pretrained.config.data.name, train_split=args.train_split,
        test_split=args.test_split, run_dir=pretrained.checkpoint.parent, progress=progress,
    )
    echo = print
    print(f"nnclr eval {args.protocol}: checkpoint {pretrained.checkpoint} (step {pretrained.step}, "
          f"{pretrained.checkpoint_hash}), data {evaluation.data}, device {pretrained.device}", flush=True)
    records = []
    name = args.protocol
    if name == "knn":
        records.append(protocols.knn(evaluation, k=args.k, temperature=args.temperature, sweep=args.sweep))
    elif name == "linear":
        records.append(_linear(protocols, evaluation, args))
    elif name == "semi":
        records.append(_semi(protocols, evaluation, args, echo))
    elif name == "transfer":
        records.append(protocols.transfer(evaluation, data=args.transfer_data or args.data, seed=args.seed))
    elif name == "retrieval":
        records.append(protocols.retrieval(evaluation))
    elif name == "all":
        records.append(protocols.knn(evaluation, k=args.k, temperature=args.temperature, sweep=args.sweep))
        records.append(_linear(protocols, evaluation, args))
        records.append(protocols.retrieval(evaluation))
        why = protocols.semi_fits(evaluation, tuple(args.fractions)) if args.subset_file is None else None
        if why is None:
            records.append(_semi(protocols, evaluation, args, echo))
        else:
            print(f"skipping semi: {why}", file=sys.stderr)
        if args.transfer_data:
            records.append(protocols.transfer(evaluation, data=args.transfer_data, seed=args.seed))
        else:
            print("skipping transfer: no --transfer-data", file=sys.stderr)
    else:  # pragma: no cover - argparse restricts the choices
        raise UserError(f"unknown protocol {name!r}")
    paths = [protocols.write_record(evaluation.run_dir, record) for record in records]
    print_table(records)
    for path in paths:
        print(f"wrote {path}")
    return 0


def _linear(protocols: Any, evaluation: Any, args: argparse.Namespace) -> dict[str, Any]:
    """The linear protocol; ``--epochs`` and ``--lr`` left out take the protocol's defaults (``EVAL``)."""
    return protocols.linear(
        evaluation, mode=args.mode, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
    )


def _semi(protocols: Any, evaluation: Any, args: argparse.Namespace, echo: Any) -> dict[str, Any]:
    """The semi protocol; ``--epochs`` and ``--lr`` left out take the protocol's defaults (``EVAL``)."""
    return protocols.semi_supervised(
        evaluation, fractions=tuple(args.fractions), subset_file=args.subset_file, epochs=args.epochs,
        batch_size=args.batch_size, lr=args.lr, seed=args.seed, echo=echo,
    )
