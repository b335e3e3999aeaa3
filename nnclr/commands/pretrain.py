"""``nnclr pretrain [--config FILE.yaml] [--set KEY=VALUE ...] [--run-dir DIR] [--fresh] [--accept-data-changes]``."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any


def add_parser(commands: Any) -> None:
    pretrain = commands.add_parser(
        "pretrain",
        help="pretrain an encoder (with no arguments: NNCLR on the shipped demo data, ~3 min on a CPU)",
        description="Pretrain an encoder. Rerun the same command to resume an interrupted run.",
    )
    pretrain.add_argument("--config", metavar="FILE.yaml", help="a recipe, e.g. configs/cifar10_nnclr.yaml")
    pretrain.add_argument(
        "--set", dest="overrides", metavar="KEY=VALUE", nargs="+", action="extend", default=[],
        help="override config keys, e.g. --set optim.lr=0.5 data.name=cifar10 method.name=simclr",
    )
    pretrain.add_argument("--run-dir", metavar="DIR", help="where checkpoints and metrics go (train.run_dir)")
    pretrain.add_argument("--fresh", action="store_true", help="start over instead of resuming the run directory")
    pretrain.add_argument(
        "--accept-data-changes", action="store_true",
        help="resume although the training data changed since the run started (a folder's files added, removed or "
        "modified; other images in an array source)",
    )
    pretrain.add_argument("--no-progress", action="store_true", help="no progress bar")


def _silent(*args: Any, **kwargs: Any) -> None:
    pass


def _percent(result: dict | None) -> str:
    return f"{result['top1']:.1f}%" if result else "n/a"


def run(args: argparse.Namespace) -> int:
    """Resolve the config, train, print kNN before/after and the run directory."""
    from nnclr.config import load_config

    config = load_config(args.config, args.overrides)  # config mistakes fail before torch is imported
    if args.run_dir:  # a path, as typed: not through the text of an override
        config.train.run_dir = args.run_dir
    from nnclr import rundir

    main = os.environ.get("RANK", "0") == "0"
    echo = print if main else _silent  # under torchrun: rank 0 speaks
    run_dir = Path(config.train.run_dir or rundir.default_run_dir(config.method.name, config.data.name))
    # rank 0 holds the run directory from before training reads it until the report is written
    lock = rundir.acquire_lock(run_dir, flag="--run-dir" if args.run_dir else "train.run_dir") if main else None
    try:
        from nnclr.train import pretrain  # torch: after a refusal, which is instant

        return _pretrain(args, config, pretrain, echo)
    finally:
        if lock is not None:
            lock.release()


def _pretrain(args: argparse.Namespace, config: Any, pretrain: Any, echo: Any) -> int:
    """Train, print kNN before/after and the run directory, write the report."""
    echo(
        f"nnclr pretrain: {config.method.name} on {config.data.name}, backbone {config.model.backbone}, "
        f"batch {config.optim.batch_size}, {config.train.epochs:g} epochs",
        flush=True,
    )
    result = pretrain(config, fresh=args.fresh, progress=not args.no_progress and sys.stderr.isatty(),
                      accept_data_changes=args.accept_data_changes)
    if result.resumed_from >= result.steps:
        echo(f"this run was already complete ({result.steps} steps); --fresh starts it over")
    else:
        echo(f"trained {result.steps - result.resumed_from} steps in {result.wall_time:.0f} s "
              f"({result.images_per_second:.0f} images/s)")
    if result.knn_after:
        k = result.knn_after["k"]
        gain = (
            f" ({result.knn_after['top1'] - result.knn_before['top1']:+.1f} points)" if result.knn_before else ""
        )
        echo(
            f"kNN top-1 on {config.data.name}/{config.data.test_split} (k={k}): "
            f"before pretraining {_percent(result.knn_before)}, after {_percent(result.knn_after)}{gain}"
        )
    echo(f"run directory: {result.run_dir}")
    if config.train.report and os.environ.get("RANK", "0") == "0":
        _report(result.run_dir)
    return 0


def _report(run_dir: Any) -> None:
    """Write the run's report (train.report); a report that cannot be written is a warning, not a failure."""
    import time

    from nnclr.errors import UserError
    from nnclr.report import write_report

    started = time.perf_counter()
    try:
        path = write_report(run_dir)
    except UserError as error:
        print(f"nnclr: warning: no report written: {error}", file=sys.stderr)
        return
    print(f"report: {path} ({time.perf_counter() - started:.0f} s; turn off with --set train.report=false)")
