"""The run directory's owner (nnclr.rundir): torch-free, the only module naming the files, readers, metrics log."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

from nnclr import rundir
from nnclr.checkpoint import CHECKPOINT_NAME

PACKAGE = Path(__file__).resolve().parents[1] / "nnclr"
FILES = (rundir.CONFIG, rundir.CHECKPOINT, rundir.METRICS, rundir.RESULTS, rundir.DATA_INDEX, rundir.REPORT,
         rundir.LOCK)


def test_importing_rundir_does_not_import_torch() -> None:
    code = "import sys, nnclr.rundir; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_the_names_are_those_runs_have_always_had() -> None:
    assert FILES == ("config.yaml", "checkpoint.pt", "metrics.jsonl", "results.json", "data-index.npz",
                     "report.html", ".lock")
    assert (rundir.TENSORBOARD, rundir.FEATURES, rundir.EVAL) == ("tensorboard", "features", "eval")
    assert Path("run") / rundir.EVAL_SUBSETS == Path("run") / "eval" / "subsets"
    assert CHECKPOINT_NAME == rundir.CHECKPOINT


def test_no_other_module_spells_a_file_name_of_the_run_directory() -> None:
    spelled = re.compile("|".join(re.escape(f'"{name}"') for name in FILES))
    offenders = [str(path.relative_to(PACKAGE)) for path in PACKAGE.rglob("*.py")
                 if path.name != "rundir.py" and spelled.search(path.read_text())]
    assert not offenders


def test_default_run_dir_makes_the_data_name_safe_for_a_path() -> None:
    assert rundir.default_run_dir("nnclr", "demo") == Path("runs/nnclr-demo")
    assert rundir.default_run_dir("simclr", "folder:/data/my photos/") == Path("runs/simclr-folder--data-my-photos")


def test_fresh_deletes_the_run_and_keeps_evaluations(tmp_path: Path) -> None:
    for name in (*FILES, f"{rundir.TENSORBOARD}/events", f"{rundir.EVAL}/knn-demo.json", f"{rundir.FEATURES}/x.pt"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x")
    rundir.clear_for_fresh(tmp_path)
    left = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    assert left == sorted([rundir.CONFIG, rundir.REPORT, rundir.LOCK, "eval/knn-demo.json", "features/x.pt"])


def test_readers_skip_what_a_kill_or_a_bad_edit_left(tmp_path: Path) -> None:
    assert rundir.read_json(tmp_path / "missing.json") is None and rundir.read_jsonl(tmp_path / "missing") == []
    (tmp_path / "cut.json").write_text('{"steps": 1')
    assert rundir.read_json(tmp_path / "cut.json") is None
    (tmp_path / "m.jsonl").write_text('{"step": 1}\n[1, 2]\n{"step": 2}\n{"st')
    assert rundir.read_jsonl(tmp_path / "m.jsonl") == [{"step": 1}, {"step": 2}]
    (tmp_path / "c.yaml").write_text("a: [1\n")
    assert rundir.read_yaml(tmp_path / "c.yaml") is None
    (tmp_path / "c.yaml").write_text("a: {b: 1}\n")
    assert rundir.read_yaml(tmp_path / "c.yaml") == {"a": {"b": 1}}


def test_metrics_log_keeps_what_came_before_the_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / rundir.METRICS
    records = [{"type": "knn", "step": 0}, {"type": "train", "step": 2}, {"type": "clustering", "step": 2},
               {"type": "train", "step": 3}]
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + '{"type": "tr')
    mirrored: list[dict] = []

    class Mirror:
        def write(self, record: dict) -> None:
            mirrored.append(record)

        def close(self) -> None:
            mirrored.append({"closed": True})

    log = rundir.MetricsLog(path, resume_step=2, mirror=Mirror())
    assert rundir.read_jsonl(path) == records[:2]  # the next epoch's clustering is redone on resume
    assert log.has("train", 2) and not log.has("clustering", 2) and not log.has("train", 3)
    log.write({"type": "train", "step": 3})
    log.close()
    assert rundir.read_jsonl(path) == [*records[:2], {"type": "train", "step": 3}]
    assert mirrored == [{"type": "train", "step": 3}, {"closed": True}]
    rundir.MetricsLog(path, resume_step=0)  # a run that starts at step 0 starts a new file
    assert path.read_text() == ""


def test_atomic_write_leaves_no_temporary_file(tmp_path: Path) -> None:
    path = tmp_path / rundir.RESULTS
    rundir.write_results(tmp_path, {"steps": 3})
    assert rundir.read_json(path) == {"steps": 3} and not rundir.tmp_path(path).exists()
    assert rundir.tmp_path(path).name == ".results.json.tmp"


def test_every_file_of_the_run_directory_is_in_the_manual_and_fresh_says_what_it_deletes() -> None:
    running = (PACKAGE.parent / "docs" / "running.md").read_text()
    table = running[running.index("## The run directory") :]
    for name in (*FILES, rundir.TENSORBOARD + "/", rundir.FEATURES + "/", rundir.EVAL + "/"):
        assert f"| `{name}` |" in table, name
    fresh = next(line for line in running.splitlines() if line.startswith("- `--fresh`"))
    fresh += running.split(fresh, 1)[1].split("\n- ", 1)[0]
    for name in (*rundir.FRESH_DELETES, rundir.TENSORBOARD):
        assert f"`{name}" in fresh, name
