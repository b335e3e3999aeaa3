"""experiments/run.py: every table runs end to end for a few steps and lands in RESULTS.md (issue 9)."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
TABLES = ("methods", "crops", "support", "prototypes", "budget", "neighbours", "neighbours_budget", "neighbours_long",
          "demo", "cold_start", "recipe")


@pytest.mark.slow
def test_every_experiment_table_runs_and_is_written(tmp_path: Path, tiny_data: Path) -> None:
    data = tiny_data
    results, json_dir = tmp_path / "RESULTS.md", tmp_path / "json"
    results.write_text("# Results\n\nkept text\n")
    command = [sys.executable, str(REPO / "experiments" / "run.py"), "--table", "all", "--smoke", "--seeds", "0",
               "--threads", "1", "--data", f"npz:{data}", "--runs", str(tmp_path / "runs"),
               "--results", str(results), "--json-dir", str(json_dir)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    text = results.read_text()
    assert "kept text" in text
    for name in TABLES:
        records = json.loads((json_dir / f"{name}.json").read_text())
        assert len(records) == 2  # the smoke run's two rows, one seed
        assert {r["seed"] for r in records} == {0}
        for r in records:
            assert 0 <= r["knn_after"] <= 100 and 0 <= r["linear"] <= 100 and r["wall_time_s"] > 0
            assert r["commands"][0].startswith("nnclr pretrain") and f"train.seed={r['seed']}" in r["commands"][0]
            _assert_relative_to_the_repository(r["commands"], tmp_path / "runs", data)
        assert text.count(f"<!-- table {name} -->") == 1
        block = text[text.index(f"<!-- table {name} -->"):text.index(f"<!-- end table {name} -->")]
        for label in dict.fromkeys(r["row"] for r in records):
            assert f"| {label} |" in block
    # a row that an earlier table ran with the same settings is not trained again: the recipe table's two smoke
    # rows (nnclr, simclr) are the methods table's, so their records are those runs'
    assert not (tmp_path / "runs" / "recipe").exists()
    methods = {r["row"]: r for r in json.loads((json_dir / "methods.json").read_text())}
    for r in json.loads((json_dir / "recipe.json").read_text()):
        assert r["commands"] == methods[r["row"]]["commands"] and r["knn_after"] == methods[r["row"]]["knn_after"]
    cpu = _run_module().cpu_name()
    assert cpu and f"Machine: {cpu}, " in text
    assert f"Data `npz:{os.path.relpath(data, REPO)}`" in text and f"npz:{data}" not in text
    crops = text[text.index("<!-- table crops -->"):]
    assert "relative drop" in crops and "nnclr:" in crops
    neighbours = {r["row"]: r for r in json.loads((json_dir / "neighbours.json").read_text())}
    assert neighbours["simclr"]["label_agreement"] is None  # no neighbours
    assert 0 <= neighbours["nnclr"]["label_agreement"] <= 100
    prototypes = {r["row"]: r for r in json.loads((json_dir / "prototypes.json").read_text())}
    kept = {row: r["stored_bytes"] for row, r in prototypes.items()}
    # the smoke run's two rows: KMCLR keeps K prototypes x 16 fp32 and a count per prototype, no support set
    for k in (50, 200):
        assert k * 16 * 4 <= kept[f"kmclr, {k} prototypes"] < 2 * k * 16 * 4


def _fake_cli(calls: list[list[str]], rates: dict[str, list[float]] | None = None):
    """A stand-in for ``nnclr`` (run.py's ``nnclr``) that writes the files run.py reads, as the CLI does: a
    pretrain's results.json (its training rate: the next of ``rates[method]``, else 100 images/s for NNCLR and 200
    for the rest) and metrics.jsonl, a linear probe's eval/linear-*.json. The real CLI runs in
    ``test_every_experiment_table_runs_and_is_written``; these tests are about run.py's own logic, in a second
    instead of a minute of subprocesses."""
    def nnclr(*args: str) -> None:
        calls.append(list(args))
        if args[0] == "pretrain":
            run_dir = REPO / args[args.index("--run-dir") + 1]
            assert not run_dir.exists()  # a fresh run: a finished run left there would only resume
            run_dir.mkdir(parents=True)
            method = next(a.removeprefix("method.name=") for a in args if a.startswith("method.name="))
            rate = (rates or {}).get(method, []).pop(0) if (rates or {}).get(method) else (
                100.0 if method == "nnclr" else 200.0)
            (run_dir / "results.json").write_text(json.dumps({"knn_before": {"top1": 10.0}, "knn_after": {
                "top1": 20.0 + len(calls)}, "wall_time": 1.0, "images_per_second": rate}))
            (run_dir / "metrics.jsonl").write_text(json.dumps({"type": "train", "nn_label_agreement": 0.25}) + "\n")
        else:
            assert args[:2] == ("eval", "linear")
            (REPO / args[args.index("--checkpoint") + 1] / "eval").mkdir()
            (REPO / args[args.index("--checkpoint") + 1] / "eval" / "linear-1.json").write_text('{"top1": 30.0}')
    return nnclr


def _main_with_fake_cli(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, *args: str,
                        rates: dict[str, list[float]] | None = None) -> list[list[str]]:
    """run.py's main with ``args`` and the files of ``tmp_path``; the CLI calls it made."""
    run, calls = _run_module(), []
    monkeypatch.setattr(run, "nnclr", _fake_cli(calls, rates))
    monkeypatch.setattr(run, "stored_bytes", lambda run_dir: 0)  # no checkpoint: the fake wrote none
    run.main([*args, "--seeds", "0", "--runs", str(tmp_path / "runs"), "--results", str(tmp_path / "R.md"),
              "--json-dir", str(tmp_path / "json")])
    return calls


def test_a_wall_clock_budget_fits_each_rows_epochs_to_it(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, tiny_data: Path
) -> None:
    rates = {"nnclr": [130.0, 100.0, 90.0], "simclr": [150.0, 260.0, 200.0]}  # medians 100 and 200
    calls = _main_with_fake_cli(monkeypatch, tmp_path, "--table", "budget", "--smoke", "--budget", "7",
                                "--data", f"npz:{tiny_data}", rates=rates)
    images = len(np.load(tiny_data / "train.npz")["labels"])
    records = json.loads((tmp_path / "json" / "budget.json").read_text())
    assert [r["row"] for r in records] == ["nnclr", "simclr"]
    calibrations = [c for c in calls if c[0] == "pretrain" and "data.test_split=" == c[-1]]  # no kNN: not timed
    assert [c[-2] for c in calibrations] == ["train.max_steps=2"] * 6
    methods = [next(a for a in c if a.startswith("method.name=")) for c in calibrations]
    assert methods == ["method.name=nnclr", "method.name=simclr"] * 3  # three rounds, the rows interleaved
    assert calls.index(calibrations[-1]) < min(
        calls.index(c) for c in calls if c[0] == "pretrain" and c not in calibrations)  # every row timed first
    for r in records:
        # the epochs are what 7 s hold at the median calibration rate, and the run used them
        assert r["epochs"] == pytest.approx(7 * (100.0 if r["row"] == "nnclr" else 200.0) / images)
        assert f"train.epochs={r['epochs']!r}" in r["commands"][0]
    text = (tmp_path / "R.md").read_text()
    assert "a budget of 7 s of training per run (each row's epochs fitted from the median rate of 3 interleaved" \
           " 2-step calibration runs: nnclr " in text
    bad = subprocess.run([sys.executable, str(REPO / "experiments" / "run.py"), "--table", "budget", "--budget", "-1"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "--budget must be" in bad.stderr
    bad = subprocess.run([*bad.args[:-1], "7", "--calibration-rounds", "0"], capture_output=True, text=True)
    assert bad.returncode == 2 and "--calibration-rounds >= 1" in bad.stderr


def _assert_relative_to_the_repository(commands: list[str], runs: Path, data: Path) -> None:
    """The commands RESULTS.md prints name the run directory and the data relative to the repository root (where
    the runs start), never by an absolute path of the machine that ran them; run from there, they find both."""
    pretrain, linear = (shlex.split(c) for c in commands)
    run_dir = pretrain[pretrain.index("--run-dir") + 1]
    assert not os.path.isabs(run_dir) and linear[linear.index("--checkpoint") + 1] == run_dir
    assert (REPO / run_dir).resolve().parent.parent == runs.resolve()  # runs/TABLE/RUN
    source = next(v.removeprefix("data.name=npz:") for v in pretrain if v.startswith("data.name="))
    assert not os.path.isabs(source) and (REPO / source).resolve() == data.resolve()


def _script(name: str):
    """experiments/NAME.py imported as a module (the experiments are scripts, not part of the package)."""
    spec = importlib.util.spec_from_file_location(f"experiments_{name}", REPO / "experiments" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def _run_module():
    """experiments/run.py imported as a module."""
    return _script("run")


def test_every_row_of_every_table_is_a_valid_config() -> None:
    # the smoke run trains two rows per table; the others' overrides are checked here, without training
    from nnclr.config import load_config, parse_override

    run = _run_module()
    assert set(run.TABLES) == set(TABLES)
    for name, rows in run.TABLES.items():
        assert len({row.label for row in rows}) == len(rows), name  # --rows finds rows by label
        for row in rows:
            config = load_config(overrides=list(row.overrides))
            for override in row.overrides:  # each setting is in the config the run gets
                key, value = parse_override(override)
                section, name = key.split(".")
                assert getattr(getattr(config, section), name) == value, (name, override)


def test_a_table_written_again_replaces_its_block(tmp_path: Path) -> None:
    run = _run_module()
    results = tmp_path / "RESULTS.md"
    run.write_results_md(results, "methods", "<!-- table methods -->\nfirst\n<!-- end table methods -->")
    run.write_results_md(results, "crops", "<!-- table crops -->\ncrops\n<!-- end table crops -->")
    run.write_results_md(results, "methods", "<!-- table methods -->\nsecond\n<!-- end table methods -->")
    text = results.read_text()
    assert text.count("<!-- table methods -->") == 1 and "second" in text and "first" not in text
    assert text.index("second") < text.index("crops")  # in place, not moved to the end


def test_rows_runs_the_rows_named_afresh_keeps_the_others_and_refuses_an_unknown_one(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, tiny_data: Path
) -> None:
    command = ["--table", "methods", "--smoke", "--data", f"npz:{tiny_data}", "--rows", "simclr"]
    for attempt in range(2):  # the second run finds the first one's finished run dir and must not resume it
        if attempt:
            (tmp_path / "runs" / "methods" / "simclr-s0" / "left-from-before").touch()
        calls = _main_with_fake_cli(monkeypatch, tmp_path, *command)  # the fake CLI asserts a fresh run dir
        assert [c[0] for c in calls] == ["pretrain", "eval"] and "method.name=simclr" in calls[0]
        records = json.loads((tmp_path / "json" / "methods.json").read_text())
        assert [r["row"] for r in records] == ["simclr"] and records[0]["knn_after"] == 21.0
    assert not (tmp_path / "runs" / "methods" / "simclr-s0" / "left-from-before").exists()
    _main_with_fake_cli(monkeypatch, tmp_path, *command[:-1], "nnclr")
    records = json.loads((tmp_path / "json" / "methods.json").read_text())
    assert [r["row"] for r in records] == ["nnclr", "simclr"]  # the simclr record kept, in the table's order
    assert "| nnclr |" in (tmp_path / "R.md").read_text() and "| simclr |" in (tmp_path / "R.md").read_text()
    run = [sys.executable, str(REPO / "experiments" / "run.py")]
    unknown = subprocess.run([*run, *command[:-1], "no such row"], capture_output=True, text=True)
    assert unknown.returncode == 2 and "--rows: no row 'no such row' in table 'methods'" in unknown.stderr
    assert "'nnclr', 'simclr'" in unknown.stderr
    every = subprocess.run([*run, "--table", "all", "--rows", "nnclr"], capture_output=True, text=True)
    assert every.returncode == 2 and "--rows needs one --table" in every.stderr


def test_a_table_stopped_midway_keeps_the_rows_it_finished(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A 10-minute table of several rows takes hours: a stop (the session's end, Ctrl-C) during a later row
    must leave the finished rows in the JSON and in RESULTS.md, merged with the rows of an earlier run."""
    run = _run_module()
    json_dir = tmp_path / "json"
    json_dir.mkdir()
    earlier = {"row": "nnsiam", "group": "", "seed": 0, "knn_before": 40.0, "knn_after": 45.0, "linear": 47.0,
               "wall_time_s": 1.0, "train_time_s": 1.0, "epochs": 1.0, "stored_bytes": 0, "label_agreement": None,
               "commands": ["nnclr pretrain", "nnclr eval linear"]}
    (json_dir / "neighbours.json").write_text(json.dumps([earlier]))

    def run_one(row, seed, epochs, args, run_dir):  # noqa: ANN001, ANN202 - the stand-in of a real run
        if row.label == "nnclr":
            raise KeyboardInterrupt
        return {**earlier, "row": row.label, "seed": seed, "knn_after": 50.0 + seed}

    monkeypatch.setattr(run, "run_one", run_one)
    with pytest.raises(KeyboardInterrupt):
        run.main(["--table", "neighbours", "--seeds", "0", "1", "--rows", "simclr", "nnclr",
                  "--results", str(tmp_path / "R.md"), "--json-dir", str(json_dir), "--runs", str(tmp_path / "runs")])
    records = json.loads((json_dir / "neighbours.json").read_text())
    assert [(r["row"], r["seed"]) for r in records] == [("simclr", 0), ("simclr", 1), ("nnsiam", 0)]
    text = (tmp_path / "R.md").read_text()
    assert "| simclr | 40.0 ± 0.0 | 50.5 ± 0.7 |" in text and "| nnsiam |" in text and "| nnclr |" not in text


def test_neighbour_agreement_is_the_share_of_nearest_rows_with_the_query_label() -> None:
    import torch
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(0)
    queries = F.normalize(torch.randn(30, 8, generator=g), dim=1)
    bank = F.normalize(torch.randn(50, 8, generator=g), dim=1)
    yq, yb = torch.randint(0, 3, (30,), generator=g), torch.randint(0, 3, (50,), generator=g)
    nearest_hits, five_hits = 0, 0
    for i in range(30):  # slow reference: rank the bank by cosine for each query
        ranked = sorted(range(50), key=lambda j: -float(queries[i] @ bank[j]))
        nearest_hits += int(yb[ranked[0]] == yq[i])
        five_hits += sum(int(yb[j] == yq[i]) for j in ranked[:5])
    nearest, five = _script("neighbour_agreement").agreement(queries, bank, yq, yb)
    assert nearest == pytest.approx(100 * nearest_hits / 30) and five == pytest.approx(100 * five_hits / 150)


def test_neighbour_agreement_runs_on_a_checkpoint_with_its_support_set(tmp_path: Path, tiny_data: Path,
                                                                        tiny_run: tuple[str, ...]) -> None:
    from nnclr.config import load_config
    from nnclr.train import pretrain

    run_dir = tmp_path / "run"
    pretrain(load_config(None, [*tiny_run, f"data.name=npz:{tiny_data}", "method.support_size=64",
                                "train.max_steps=3", "train.report=false", "train.threads=1",
                                f"train.run_dir={run_dir}"]), progress=False, echo=lambda *a, **k: None)
    lines: list[str] = []
    module = _script("neighbour_agreement")
    out = module.main([str(run_dir), "--data", f"npz:{tiny_data}", "--queries", "64", "--banks", "32", "128"],
                      echo=lines.append)
    kinds = ("h", "z", "view z", "mean of 2 views' z")
    assert list(out) == [*(f"bank {n}, {kind}" for n in (32, 128) for kind in kinds),
                         *(f"training support (64 rows), {kind}" for kind in kinds[1:])]
    assert all(0 <= nearest <= 100 and 0 <= five <= 100 for nearest, five in out.values())
    assert len(lines) == len(out) and lines[-1].startswith("training support (64 rows), mean of 2 views' z: nearest ")
    with pytest.raises(SystemExit):  # 64 queries + a bank of 250 is more than the 256 training images
        module.main([str(run_dir), "--data", f"npz:{tiny_data}", "--queries", "64", "--banks", "250"])


def test_epochs_in_budget_pay_a_pass_for_every_epoch_started() -> None:
    epochs_in_budget = _run_module().epochs_in_budget
    assert epochs_in_budget(600, 500, 50_000) == pytest.approx(6.0)
    for budget, rate, images, seconds in ((600, 500, 50_000, 20), (600, 480, 50_000, 33.3), (50, 100, 1_000, 4),
                                          (100, 300, 50_000, 60)):
        # slow reference: the largest e on a grid of 1/10,000 epoch whose time ceil(e) * pass + e * N / rate fits
        fits = [e / 10_000 for e in range(1, 200_000)
                if -(-e // 10_000) * seconds + e / 10_000 * images / rate <= budget + 1e-9]
        assert epochs_in_budget(budget, rate, images, seconds) == pytest.approx(max(fits), abs=1e-4)
    with pytest.raises(SystemExit, match="does not hold the 700.0 s pass"):
        epochs_in_budget(600, 500, 50_000, pass_seconds=700)


def test_a_row_with_a_pass_every_epoch_times_it_apart(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The calibration logs every step; the pass is the first step's time less the median step's, and the rate is
    over the run's time without it."""
    run, calls = _run_module(), []

    def nnclr(*args: str) -> None:  # 5 steps of 100 images: 4.0 s (the pass and a step), then 0.5 s each
        calls.append(args)
        run_dir = REPO / args[args.index("--run-dir") + 1]
        run_dir.mkdir(parents=True)
        (run_dir / "results.json").write_text(json.dumps({"images_per_second": 500 / 6.0, "wall_time": 6.0,
                                                          "steps": 5}))
        (run_dir / "metrics.jsonl").write_text("".join(json.dumps({"type": "train", "step": s + 1,
                                                                   "images_per_s": 100 / t}) + "\n"
                                                       for s, t in enumerate((4.0, 0.5, 0.5, 0.6, 0.4))))
    monkeypatch.setattr(run, "nnclr", nnclr)
    args = argparse.Namespace(smoke=False, data="npz:x", threads=1, set=[], calibration_steps=5)
    row = run.Row("nnclr, prior current", ("method.name=nnclr", "method.prior=current"), epoch_pass=True)
    rate, seconds = run.calibrate(row, args, tmp_path / "calibration")
    assert seconds == pytest.approx(3.5) and rate == pytest.approx(500 / 2.5)
    assert "train.log_every=1" in calls[0]
    plain, _ = run.calibrate(run.Row("nnclr", ("method.name=nnclr",)), args, tmp_path / "plain")
    assert plain == pytest.approx(500 / 6.0) and "train.log_every=1" not in calls[1]


def test_a_budget_table_says_how_each_row_was_timed() -> None:
    timed = _run_module()._calibration_runs
    assert timed([{"row": "a"}, {"row": "b"}], 60) == "a 60-step calibration run"  # records of before the rounds
    assert timed([{"row": "a", "calibration_rounds": 3}], 60) == (
        "the median rate of 3 interleaved 60-step calibration runs")
    assert timed([{"row": "a", "calibration_rounds": 3}, {"row": "b, c"}], 60) == (  # labels may hold commas
        "the median rate of interleaved 60-step calibration runs (per row: a 3; b, c 1)")
