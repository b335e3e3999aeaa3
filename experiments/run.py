"""The NNCLR paper's claims at CPU scale (issue 9): one command per table, raw JSON and RESULTS.md.

Each row of a table is a set of ``--set`` overrides for ``nnclr pretrain``; every row is trained for the
same number of epochs (the budget: equal images seen, the wall time each row took is reported beside
it) once per seed, then evaluated with the weighted kNN that ``nnclr pretrain`` prints (k=20, T=0.07,
test split) and the fast linear probe (``nnclr eval linear``). Mean and standard deviation over seeds.

Tables (Dwibedi et al., ICCV 2021):

- ``methods``: NNCLR vs SimCLR vs KMCLR vs DeepCluster (paper Table 1 / Sec. 4.2 against the others);
- ``crops``: random crops only against the full BYOL recipe, the relative drop of each method (paper
  Table 6 and Fig. 4: 2.1% for NNCLR on ImageNet);
- ``support``: support-set size and top-1 against top-k neighbours (paper Table 7 and Fig. 5);
- ``prototypes``: KMCLR's number of prototypes and what each keeps against NNCLR's support set;
- ``budget``: NNCLR against SimCLR with the default recipe at a fixed wall-clock budget (``--budget``, the
  issue's 10-minute target: NNCLR's kNN at least 62% and at least SimCLR's);
- ``neighbours``: the neighbour methods of issue 21 (``nnclr_multi``, ``nnclr_soft``, ``nnclr_mean``, ``snclr``,
  ``nnbyol``, ``nnsiam``, ``msf``) against NNCLR and SimCLR, with the label agreement of each run's positives at
  its end; ``neighbours_budget``: the same at a wall-clock budget (``--budget 600``: issue 21's 10-minute table),
  SimCLR and NNCLR first, then the neighbour methods (``--rows`` runs some of them per session);
- ``cold_start``: NNCLR with its neighbours chosen in a prior space for the first ``method.prior_epochs``
  (the images at 8x8, or the initial encoder's z; issue 21, item 2) against today's lookup in z from step 0;
- ``recipe``: NNCLR settings studied against that target at the same budget (a larger support set, a
  shorter fade of the SimCLR part of the short-run schedule) beside the default NNCLR and SimCLR, so that
  the table compares on one machine; ``--rows`` runs some of them.

The budget of a run is ``--epochs`` (equal images seen) or, with ``--budget SECONDS``, a wall-clock
budget of training: every row is first timed by short calibration runs (``--calibration-rounds`` runs of
``--calibration-steps`` steps, the rows interleaved round by round, the median rate kept; all rows before any
trains, so that other work on the machine afterwards slows the runs but cannot change their epochs), and its
``train.epochs`` is set to what the budget holds at that rate, so that the learning-rate schedule ends when the
budget does. The training time each run took is reported beside it.

Usage (from the repository root; experiments are not part of the installed package)::

    python experiments/run.py --table methods --data npz:../shared/data/cifar10 --epochs 2 --seeds 0 1 2
    python experiments/run.py --table budget --budget 600 --seeds 0 1 2   # 10 minutes of training per run
    python experiments/run.py --table recipe --budget 600 --rows "nnclr, support 16,384"   # one row
    python experiments/run.py --table all --smoke      # a few steps on tiny data (the test suite; a row
                                                       # that several tables share trains once)

Raw results: ``experiments/results/<table>.json`` (one record per run); the table is written into
``RESULTS.md`` between markers, so that tables from separate commands sit side by side. The runs start
in the repository root, and every path in a table and its commands (data, run directories) is relative
to it, so that the commands printed run as they are from a checkout anywhere.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # nnclr from this checkout, as the runs below use it

from nnclr.config import METHODS  # noqa: E402


@dataclass(frozen=True)
class Row:
    """One configuration of a table: a label and the ``--set`` overrides that make it."""

    label: str
    overrides: tuple[str, ...]
    group: str = ""  # rows of one group are compared with each other (crops: per method)
    # a pass over the training set before every epoch (method.prior=current): under --budget its calibration
    # times that pass apart and the budget pays one per epoch started (a 60-step calibration holds only one)
    epoch_pass: bool = False


TABLES: dict[str, tuple[Row, ...]] = {
    "methods": tuple(Row(m, (f"method.name={m}",)) for m in METHODS),
    "crops": tuple(
        Row(f"{m}, {recipe}", (f"method.name={m}", f"augment.recipe={recipe}"), group=m)
        for m in METHODS for recipe in ("byol", "crops")
    ),
    "support": tuple(Row(f"support {q:,}, top-1", ("method.name=nnclr", f"method.support_size={q}"))
                     for q in (1024, 4096, 16384, 65536))
    + (Row("support 16,384, top-5 (sampled)", ("method.name=nnclr", "method.support_size=16384", "method.topk=5")),),
    "prototypes": tuple(Row(f"kmclr, {k} prototypes", ("method.name=kmclr", f"method.num_prototypes={k}"))
                        for k in (50, 200, 400))
    + (Row("nnclr, support 16,384", ("method.name=nnclr", "method.support_size=16384")),),
    "budget": (Row("nnclr", ("method.name=nnclr",)), Row("simclr", ("method.name=simclr",))),
    "neighbours": tuple(Row(m, (f"method.name={m}",)) for m in ("simclr", "nnclr", "nnclr_multi", "nnclr_soft",
                                                                 "nnclr_mean", "snclr", "nnbyol", "nnsiam", "msf",
                                                                 "all4one")),
    "neighbours_budget": tuple(Row(m, (f"method.name={m}",)) for m in ("simclr", "nnclr", "snclr", "msf", "nnclr_soft",
                                                                        "all4one", "nnbyol", "nnsiam",
                                                                        "nnclr_multi", "nnclr_mean")) + (
        # neighbours chosen among un-augmented views by the current encoder, re-extracted every epoch (the whole
        # run), from the default support set and from 8,192 rows (experiments/neighbour_agreement.py: un-augmented
        # lookups in 8,192 rows share the query's label about 47% of the time after 10 minutes, in 1,024 about 39%)
        Row("nnclr_soft, prior current", ("method.name=nnclr_soft", "method.prior=current",
                                          "method.prior_epochs=1000"), epoch_pass=True),
        Row("nnclr_soft, prior current, support 8,192", ("method.name=nnclr_soft", "method.prior=current",
                                                         "method.prior_epochs=1000", "method.support_size=8192"),
            epoch_pass=True)),
    # issue 21's longer budget (--budget 1800 or more) for the best neighbour method at 10 minutes against the two
    # (nnclr_mean and nnclr_multi tied at 59.1 kNN; nnclr_mean's linear is higher and its steps are 5% faster)
    "neighbours_long": tuple(Row(m, (f"method.name={m}",)) for m in ("simclr", "nnclr", "nnclr_mean")),
    # the demo's own settings are the command's: --data demo --epochs 20 (what `nnclr pretrain` runs by default)
    "demo": tuple(Row(m, (f"method.name={m}",)) for m in ("simclr", "nnclr", "nnclr_multi", "nnclr_soft", "nnclr_mean",
                                                         "snclr", "nnbyol", "nnsiam", "msf", "all4one")),
    "cold_start": (Row("nnclr", ("method.name=nnclr",)),  # neighbours from z from the first step (today)
                   Row("nnclr, prior pixels", ("method.name=nnclr", "method.prior=pixels")),
                   Row("nnclr, prior initial", ("method.name=nnclr", "method.prior=initial"))),
    "recipe": (Row("nnclr", ("method.name=nnclr",)), Row("simclr", ("method.name=simclr",)),  # the references
               Row("nnclr, support 16,384", ("method.name=nnclr", "method.support_size=16384")),
               Row("nnclr, support 16,384, instance_decay 0.5",
                   ("method.name=nnclr", "method.support_size=16384", "method.instance_decay=0.5"))),
}

SMOKE = ("model.proj_hidden_dim=32", "model.proj_dim=16", "model.pred_hidden_dim=32", "optim.batch_size=16",
         "method.support_size=256", "method.num_prototypes=8", "method.num_clusters=8", "data.image_size=16",
         "train.max_steps=2", "train.checkpoint_every=1000")


def stored_bytes(run_dir: Path) -> int:
    """What a method keeps between steps besides the network, counted in its checkpoint: the bytes of every
    tensor of the support set and of the selector (NNCLR's support rows with their labels, indices and steps;
    KMCLR's prototypes and counts; DeepCluster's pseudo-labels)."""
    from nnclr.checkpoint import load_checkpoint

    state = load_checkpoint(run_dir / "checkpoint.pt")
    tensors = [t for part in ("support", "selector") for t in (state.get(part) or {}).values()]
    return sum(t.numel() * t.element_size() for t in tensors if hasattr(t, "element_size"))


def storage(count: int) -> str:
    """``stored_bytes`` in words."""
    return f"{count / 2**20:.2f} MiB" if count >= 2**16 else f"{count / 2**10:.1f} KiB"


def relative(path: Path | str) -> str:
    """``path`` (absolute, or relative to the current directory) relative to the repository root, where the runs
    start: RESULTS.md's commands then hold no path of the machine that ran them."""
    return os.path.relpath(os.path.realpath(path), REPO)


def relative_data(name: str) -> str:
    """A data source with its path relative to the repository root (``npz:PATH``, ``folder:PATH``); names as is."""
    kind, colon, path = name.partition(":")
    return f"{kind}:{relative(path)}" if colon and kind in ("npz", "folder") else name


def nnclr(*args: str) -> subprocess.CompletedProcess[str]:
    """Run the CLI as a user runs it, from the repository root (the tables' paths are relative to it); a failure
    stops the experiment with the CLI's own message."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, (str(REPO), os.environ.get("PYTHONPATH")))))
    command = [sys.executable, "-m", "nnclr", *args]
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO)
    if result.returncode != 0:
        raise SystemExit(f"experiment failed: {shlex.join(command)}\n{result.stderr.strip()}")
    return result


def overrides_for(row: Row, seed: int, epochs: float, args: argparse.Namespace) -> list[str]:
    """The ``--set`` values of one run. Smoke sizes first, so that a row's own setting (e.g. its number of
    prototypes) is what runs; ``--set`` last, so that it wins."""
    return [*(SMOKE if args.smoke else ()), *row.overrides, f"data.name={args.data}", f"train.epochs={epochs!r}",
            f"train.seed={seed}", f"train.threads={args.threads}", "train.report=false", *args.set]


def fresh_pretrain(run_dir: Path, overrides: list[str]) -> list[str]:
    """``nnclr pretrain`` in an emptied ``run_dir`` (a finished run left there would only resume, in no time);
    its arguments, for the table's commands."""
    shutil.rmtree(run_dir, ignore_errors=True)
    pretrain = ["pretrain", "--run-dir", relative(run_dir), "--no-progress", "--set", *overrides]
    nnclr(*pretrain)
    return pretrain


def calibrate(row: Row, args: argparse.Namespace, run_dir: Path) -> tuple[float, float]:
    """The training rate of ``row`` in images/s and the seconds of its pass before every epoch (0 unless
    ``row.epoch_pass``): a run of ``args.calibration_steps`` steps, measured by ``nnclr pretrain`` over its steps
    only (no kNN evaluation: it is not timed, so it would only cost wall time)."""
    log_every = ("train.log_every=1",) if row.epoch_pass else ()
    fresh_pretrain(run_dir, [*overrides_for(row, 0, 1.0, args), f"train.max_steps={args.calibration_steps}",
                             "data.test_split=", *log_every])
    results = json.loads((run_dir / "results.json").read_text())
    seconds = epoch_pass_seconds(run_dir, results) if row.epoch_pass else 0.0
    images = results["images_per_second"] * results["wall_time"]
    return images / (results["wall_time"] - seconds), seconds


def train_records(run_dir: Path) -> list[dict]:
    """The ``train`` records of a run's metrics.jsonl, in order."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in records if r.get("type") == "train"]


def epoch_pass_seconds(run_dir: Path, results: dict) -> float:
    """The seconds of the pass before the first step of a run logged every step (``results``: its results.json):
    its first step's time less the median step's (so it also holds the first step's warm-up: a slight
    overestimate)."""
    batch = results["images_per_second"] * results["wall_time"] / results["steps"]
    step_seconds = [batch / r["images_per_s"] for r in train_records(run_dir)]
    if len(step_seconds) < 2:
        raise SystemExit(f"{run_dir}: the calibration logged {len(step_seconds)} steps; a pass is timed from >= 2")
    return max(0.0, step_seconds[0] - statistics.median(step_seconds[1:]))


def epochs_in_budget(budget: float, rate: float, images: int, pass_seconds: float = 0.0) -> float:
    """The most epochs e whose training fits ``budget`` seconds: e * images / rate, plus ``pass_seconds`` for each
    epoch started (ceil(e) passes).

    >>> epochs_in_budget(600, 500, 50_000), epochs_in_budget(600, 500, 50_000, pass_seconds=20)
    (6.0, 5.0)
    """
    if not pass_seconds:
        return budget * rate / images
    best, started = 0.0, 1
    while True:
        epochs = min(float(started), (budget - started * pass_seconds) * rate / images)
        if epochs <= started - 1:
            if best <= 0:
                raise SystemExit(f"a budget of {budget:g} s does not hold the {pass_seconds:.1f} s pass before an "
                                 "epoch")
            return best
        best, started = epochs, started + 1


def calibrated_epochs(rows: list[Row], args: argparse.Namespace, run_dirs: dict[str, Path], images: int,
                      name: str) -> dict[str, float]:
    """The epochs of ``args.budget`` seconds of training for each row (``images`` training images), from the median
    of ``args.calibration_rounds`` calibration rates, the rows interleaved round by round so that a change in the
    machine's speed meanwhile spreads over every row instead of falling on one."""
    rates: dict[str, list[float]] = {row.label: [] for row in rows}
    passes: dict[str, list[float]] = {row.label: [] for row in rows}
    for _ in range(args.calibration_rounds):
        for row in rows:
            rate, seconds = calibrate(row, args, run_dirs[row.label])
            rates[row.label].append(rate)
            passes[row.label].append(seconds)
    epochs = {}
    for row in rows:
        rate, seconds = statistics.median(rates[row.label]), statistics.median(passes[row.label])
        epochs[row.label] = epochs_in_budget(args.budget, rate, images, seconds)
        paid = f", a {seconds:.1f} s pass before every epoch" if row.epoch_pass else ""
        print(f"{name}: {row.label}: {rate:.0f} images/s (median of {', '.join(f'{r:.0f}' for r in rates[row.label])};"
              f" {args.calibration_steps} steps each{paid}) -> {epochs[row.label]:.2f} epochs in {args.budget:g} s",
              flush=True)
    return epochs


def run_one(row: Row, seed: int, epochs: float, args: argparse.Namespace, run_dir: Path) -> dict:
    """Pretrain one row with one seed for ``epochs``, then the fast linear probe; the record of RESULTS.md's row."""
    overrides = overrides_for(row, seed, epochs, args)
    start = time.perf_counter()
    pretrain = fresh_pretrain(run_dir, overrides)
    wall = time.perf_counter() - start
    results = json.loads((run_dir / "results.json").read_text())
    linear = ["eval", "linear", "--checkpoint", relative(run_dir), "--threads", str(args.threads)]
    nnclr(*linear)
    probe = json.loads(next((run_dir / "eval").glob("linear-*.json")).read_text())
    return {"row": row.label, "group": row.group, "seed": seed, "overrides": overrides,
            "commands": ["nnclr " + shlex.join(pretrain), "nnclr " + shlex.join(linear)],
            "knn_before": results["knn_before"]["top1"], "knn_after": results["knn_after"]["top1"],
            "linear": probe["top1"], "wall_time_s": wall, "train_time_s": results["wall_time"],
            "epochs": epochs, "images_per_second": results["images_per_second"],
            **({"calibration_rounds": args.calibration_rounds} if args.budget else {}),
            "stored_bytes": stored_bytes(run_dir), "label_agreement": final_agreement(run_dir)}


def final_agreement(run_dir: Path) -> float | None:
    """The share of positives with the query's label in the run's last ``train`` record (%), None without one."""
    last = train_records(run_dir)[-1:]
    value = last[0].get("nn_label_agreement") if last else None
    return None if value is None else 100 * value


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux), else what ``platform`` knows: tables from machines
    that differ several times in speed must say which one they come from."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def mean_std(values: list[float]) -> str:
    """'m ± s' over seeds (sample standard deviation; '± -' for one seed)."""
    spread = f"{statistics.stdev(values):.1f}" if len(values) > 1 else "-"
    return f"{statistics.mean(values):.1f} ± {spread}"


def _mean_of(records: list[dict], key: str) -> str:
    """The mean of ``key`` over records, '-' where a record (written before the key existed) lacks it."""
    values = [r[key] for r in records if key in r]
    return f"{statistics.mean(values):.0f}" if len(values) == len(records) else "-"


def _agreement(records: list[dict]) -> str:
    """Mean ± sd of the runs' final label agreement, '-' where the method has no neighbours (or older records)."""
    values = [r["label_agreement"] for r in records if r.get("label_agreement") is not None]
    return mean_std(values) if len(values) == len(records) else "-"


def _calibration_runs(records: list[dict], steps: int) -> str:
    """How the rows of a budget table were timed: by one calibration run each (before --calibration-rounds
    existed) or by the median rate of N interleaved ones; the count of each row where they differ."""
    rounds = {r.get("calibration_rounds", 1) for r in records}
    if rounds == {1}:
        return f"a {steps}-step calibration run"
    if len(rounds) == 1:
        return f"the median rate of {rounds.pop()} interleaved {steps}-step calibration runs"
    per_row = dict.fromkeys((r["row"], r.get("calibration_rounds", 1)) for r in records)
    return (f"the median rate of interleaved {steps}-step calibration runs (per row: " +
            "; ".join(f"{row} {n}" for row, n in per_row) + ")")  # '; ': labels hold commas


def table_markdown(name: str, records: list[dict], args: argparse.Namespace) -> str:
    """The table of one experiment with its machine, versions, budget, wall time and exact commands."""
    import torch

    rows = list(dict.fromkeys(r["row"] for r in records))
    budget = (f"a budget of {args.budget:g} s of training per run (each row's epochs fitted from "
              f"{_calibration_runs(records, args.calibration_steps)}: " +
              "; ".join(f"{label} {next(r['epochs'] for r in records if r['row'] == label):.2f}" for label in rows) +
              " epochs)" if args.budget else
              f"{args.epochs} epochs per run (every row sees the same images)")
    lines = [f"<!-- table {name} -->", f"### {name}", "",
             f"Data `{args.data}`, {budget}, seeds "
             f"{' '.join(map(str, args.seeds))}; kNN: k=20, T=0.07 on the test split; linear: `nnclr eval linear` "
             f"(fast mode). Machine: {cpu_name()}, {os.cpu_count()} CPUs, "
             f"{args.threads or 'all'} threads; torch {torch.__version__}, Python {platform.python_version()}. "
             f"Written {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.", "",
             "| row | kNN top-1 before | kNN top-1 after | linear top-1 | training per run (s) | wall time per run (s) "
             "| kept besides the network | positives' label agreement at the end (%) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    after: dict[str, float] = {}
    for label in rows:
        rs = [r for r in records if r["row"] == label]
        after[label] = statistics.mean(r["knn_after"] for r in rs)
        lines.append(f"| {label} | {mean_std([r['knn_before'] for r in rs])} | {mean_std([r['knn_after'] for r in rs])}"
                     f" | {mean_std([r['linear'] for r in rs])} | {_mean_of(rs, 'train_time_s')}"
                     f" | {statistics.mean(r['wall_time_s'] for r in rs):.0f}"
                     f" | {storage(rs[0]['stored_bytes']) if 'stored_bytes' in rs[0] else rs[0].get('storage', '-')}"
                     f" | {_agreement(rs)} |")
    groups = [g for g in dict.fromkeys(r["group"] for r in records if r["group"])  # both rows run (a table is
              if all(f"{g}, {recipe}" in after for recipe in ("byol", "crops"))]  # written after every row)
    if groups:
        lines += ["", "Relative drop of the kNN top-1 from the full recipe to random crops only:", ""]
        for g in groups:
            full, crops = (after[f"{g}, {recipe}"] for recipe in ("byol", "crops"))
            lines.append(f"- {g}: {full:.1f} -> {crops:.1f} ({100 * (full - crops) / full:.1f}% relative drop)")
    example = records[0]["commands"]
    lines += ["", "Commands of one run (the others differ in their `--set` values):", "", "```",
              *example, "```", f"<!-- end table {name} -->"]
    return "\n".join(lines)


def write_results_md(path: Path, name: str, block: str) -> None:
    """Replace table ``name`` in RESULTS.md (between its markers) or append it."""
    text = path.read_text() if path.exists() else (
        "# Results\n\nThe paper's claims at CPU scale, written by `experiments/run.py` (see docs/experiments.md).\n")
    begin, end = f"<!-- table {name} -->", f"<!-- end table {name} -->"
    if begin in text and end in text:
        text = text[: text.index(begin)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(text)


def write_table(name: str, records: list[dict], args: argparse.Namespace) -> None:
    """Write table ``name``'s JSON and its block in RESULTS.md from ``records``, the rows run so far; with
    ``--rows``, the other rows' records of an earlier run are kept, in the table's order."""
    json_path = args.json_dir / f"{name}.json"
    if args.rows and json_path.exists():
        done = {r["row"] for r in records}
        kept = [r for r in json.loads(json_path.read_text()) if r["row"] not in done]
        place = {row.label: i for i, row in enumerate(TABLES[name])}
        records = sorted(kept + records, key=lambda r: place.get(r["row"], len(place)))
    json_path.write_text(json.dumps(records, indent=1))
    write_results_md(args.results, name, table_markdown(name, records, args))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--table", choices=(*TABLES, "all"), required=True)
    parser.add_argument("--data", default="npz:" + str(REPO.parent / "shared" / "data" / "cifar10"),
                        help="data source of every run (default: the CIFAR-10 arrays in ../shared/data/cifar10)")
    parser.add_argument("--epochs", type=float, default=2.0, help="the budget of every run")
    parser.add_argument("--budget", type=float, default=0.0,
                        help="seconds of training per run instead of --epochs (epochs fitted per row)")
    parser.add_argument("--calibration-steps", type=int, default=60, help="steps timed to fit --budget")
    parser.add_argument("--calibration-rounds", type=int, default=3,
                        help="calibration runs per row, interleaved over the rows; their median rate fits --budget")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=0, help="0 = every physical core")
    parser.add_argument("--set", nargs="*", default=[], help="extra overrides for every run")
    parser.add_argument("--runs", type=Path, default=REPO / "experiments" / "runs")
    parser.add_argument("--results", type=Path, default=REPO / "RESULTS.md")
    parser.add_argument("--json-dir", type=Path, default=REPO / "experiments" / "results")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny models, 2 steps per run, the first two rows of each table (the test suite);"
                        " a row that several tables share trains once")
    parser.add_argument("--rows", nargs="+", metavar="LABEL", help="run only these rows of --table (their labels)")
    args = parser.parse_args(argv)
    if args.budget < 0 or args.calibration_steps < 1 or args.calibration_rounds < 1:
        parser.error("--budget must be >= 0, --calibration-steps and --calibration-rounds >= 1")
    if args.rows and args.table == "all":
        parser.error("--rows needs one --table")
    labels = [row.label for row in TABLES.get(args.table, ())]
    for label in args.rows or ():
        if label not in labels:
            parser.error(f"--rows: no row {label!r} in table {args.table!r}; its rows: "
                         + ", ".join(map(repr, labels)))
    if args.smoke:
        args.calibration_steps = 2
    if args.budget:
        from nnclr.data import load_dataset

        images = len(load_dataset(args.data, "train", download=False))
    args.data, args.runs = relative_data(args.data), Path(os.path.realpath(args.runs))  # the runs start in REPO
    names = list(TABLES) if args.table == "all" else [args.table]
    args.json_dir.mkdir(parents=True, exist_ok=True)
    smoke_runs: dict[tuple[str, ...], dict] = {}  # --smoke: a row several tables share trains once
    for name in names:
        records = []
        rows = [row for row in TABLES[name] if not args.rows or row.label in args.rows]
        rows = rows[:2] if args.smoke else rows  # smoke: two rows (crops: one method's pair)
        slugs = {row.label: "".join(c if c.isalnum() else "-" for c in row.label) for row in rows}
        epochs_of = {row.label: args.epochs for row in rows}
        if args.budget:  # every row timed before any trains: later work beside the runs cannot change epochs
            run_dirs = {row.label: args.runs / name / f"{slugs[row.label]}-calibration" for row in rows}
            epochs_of = calibrated_epochs(rows, args, run_dirs, images, name)
        for row in rows:
            slug, epochs = slugs[row.label], epochs_of[row.label]
            for seed in args.seeds:
                key = tuple(overrides_for(row, seed, epochs, args))
                if args.smoke and key in smoke_runs:  # the same run in an earlier table: its record again
                    record = {**smoke_runs[key], "row": row.label, "group": row.group}
                else:
                    record = run_one(row, seed, epochs, args, args.runs / name / f"{slug}-s{seed}")
                    smoke_runs[key] = record
                records.append(record)
                print(f"{name}: {row.label} seed {seed}: kNN {record['knn_before']:.1f} -> {record['knn_after']:.1f},"
                      f" linear {record['linear']:.1f} ({record['wall_time_s']:.0f} s)", flush=True)
            write_table(name, records, args)  # after every row: a long table stopped midway keeps its finished rows
        print(f"wrote {args.json_dir / (name + '.json')} and the {name} table in {args.results}")


if __name__ == "__main__":
    main()
