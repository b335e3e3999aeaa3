"""The run directory's owner (nnclr.rundir): torch-free, the only module naming the files, readers, metrics log."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nnclr import rundir
from nnclr.checkpoint import CHECKPOINT_NAME
from nnclr.errors import UserError

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
    assert rundir.tmp_path(path).name == ".results.json.nnclr.tmp"


def test_every_file_of_the_run_directory_is_in_the_manual_and_fresh_says_what_it_deletes() -> None:
    running = (PACKAGE.parent / "docs" / "running.md").read_text()
    table = running[running.index("## The run directory") :]
    for name in (*FILES, rundir.TENSORBOARD + "/", rundir.FEATURES + "/", rundir.EVAL + "/"):
        assert f"| `{name}` |" in table, name
    fresh = next(line for line in running.splitlines() if line.startswith("- `--fresh`"))
    fresh += running.split(fresh, 1)[1].split("\n- ", 1)[0]
    for name in (*rundir.FRESH_DELETES, rundir.TENSORBOARD):
        assert f"`{name}" in fresh, name


# --------------------------------------------------------------------------- links planted in a run directory

TARGETS = ("outside file", "dangling", "directory")


def _plant(link: Path, kind: str, outside: Path) -> Path:
    """A symbolic link at ``link`` to a file outside (holding KEEP), to nothing, or to a folder outside."""
    names = {"outside file": "victim", "dangling": "nothing", "directory": "folder"}
    target = outside / names[kind]
    if kind == "outside file":
        target.write_text("KEEP")
    elif kind == "directory":
        target.mkdir(exist_ok=True)
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(target)
    return target


def _outside_unchanged(outside: Path) -> None:
    """The victim still holds KEEP, nothing was created at the dangling target or in the folder."""
    assert (outside / "victim").read_text() == "KEEP" if (outside / "victim").exists() else True
    assert not (outside / "nothing").exists()
    assert not (outside / "folder").exists() or list((outside / "folder").iterdir()) == []


@pytest.mark.parametrize("kind", TARGETS)
@pytest.mark.parametrize("at", ["file", "tmp"])
def test_an_atomic_write_replaces_a_planted_link_and_never_writes_through_it(tmp_path: Path, kind: str,
                                                                             at: str) -> None:
    run, outside = tmp_path / "run", tmp_path / "outside"
    outside.mkdir()
    path = run / rundir.RESULTS
    _plant(path if at == "file" else rundir.tmp_path(path), kind, outside)
    rundir.write_results(run, {"steps": 3})
    _outside_unchanged(outside)
    assert not path.is_symlink() and rundir.read_json(path) == {"steps": 3}
    assert not os.path.lexists(rundir.tmp_path(path))


@pytest.mark.parametrize("kind", TARGETS)
def test_appending_to_a_planted_link_is_refused_in_one_line(tmp_path: Path, kind: str) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    _plant(tmp_path / rundir.METRICS, kind, outside)
    with pytest.raises(UserError, match="metrics") as raised:
        rundir.append_line(tmp_path / rundir.METRICS, "{}", what="the metrics")
    assert "\n" not in str(raised.value)
    _outside_unchanged(outside)


@pytest.mark.parametrize("kind", TARGETS)
def test_the_lock_never_writes_through_a_planted_link(tmp_path: Path, kind: str) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    _plant(tmp_path / "run" / rundir.LOCK, kind, outside)
    lock = rundir.acquire_lock(tmp_path / "run")
    try:
        _outside_unchanged(outside)
        assert json.loads((tmp_path / "run" / rundir.LOCK).read_text())["pid"] == os.getpid()
    finally:
        lock.release()


@pytest.mark.parametrize("name", [rundir.FEATURES, rundir.EVAL_SUBSETS, rundir.TENSORBOARD])
def test_a_planted_link_at_a_folder_of_the_run_is_refused_in_one_line(tmp_path: Path, name: str) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    _plant(tmp_path / "run" / name, "directory", outside)
    with pytest.raises(UserError, match="symbolic link") as raised:
        rundir.make_dir(tmp_path / "run", name)
    assert "\n" not in str(raised.value) and str(tmp_path / "run" / name) in str(raised.value)
    _outside_unchanged(outside)
    assert rundir.make_dir(tmp_path / "run2", name) == tmp_path / "run2" / name
    assert (tmp_path / "run2" / name).is_dir()


# --------------------------------------------------------------------------- the lock


def _try_lock(run_dir: Path, flag: str = "--run-dir") -> subprocess.CompletedProcess:
    """Another process asks for the lock of ``run_dir`` (rundir imports no torch: a fraction of a second)."""
    code = ("import sys; from pathlib import Path; from nnclr import rundir; from nnclr.errors import UserError\n"
            "try:\n    rundir.acquire_lock(Path(sys.argv[1]), flag=sys.argv[2])\n"
            "except UserError as e:\n    print(e, file=sys.stderr); sys.exit(2)\n")
    return subprocess.run([sys.executable, "-c", code, str(run_dir), flag], capture_output=True, text=True)


def test_deleting_the_lock_file_does_not_let_a_second_process_in(tmp_path: Path) -> None:
    lock = rundir.acquire_lock(tmp_path / "run")
    try:
        (tmp_path / "run" / rundir.LOCK).unlink()
        second = _try_lock(tmp_path / "run", "--out")
        assert second.returncode == 2, second.stderr
        assert second.stderr.count("\n") == 1
        assert f"{tmp_path / 'run'} is in use by another nnclr process" in second.stderr
        assert "--out" in second.stderr
    finally:
        lock.release()
    assert _try_lock(tmp_path / "run").returncode == 0  # released: the next one gets in


def test_the_lock_is_reentrant_in_one_process_and_held_until_the_last_release(tmp_path: Path) -> None:
    outer = rundir.acquire_lock(tmp_path / "run")
    inner = rundir.acquire_lock(tmp_path / "run")  # e.g. pretrain inside the command that then writes the report
    inner.release()
    assert _try_lock(tmp_path / "run").returncode == 2
    outer.release()
    assert _try_lock(tmp_path / "run").returncode == 0


def test_a_run_directory_that_is_a_file_is_named_in_one_line(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match=f"--out {tmp_path / 'file'} is a file") as raised:
        rundir.acquire_lock(tmp_path / "file", flag="--out")
    assert "free space" not in str(raised.value)


# --------------------------------------------------------------------------- temporary files left by kills


def test_temporary_files_a_killed_writer_left_are_removed_and_those_being_written_are_not(tmp_path: Path) -> None:
    features = tmp_path / rundir.FEATURES
    features.mkdir()
    stale = [rundir.tmp_path(features / "a.pt"), features / "b.pt.999999999.tmp",
             rundir.tmp_path(tmp_path / rundir.RESULTS)]
    for path in stale:
        path.write_bytes(b"x" * 1000)
    other = [features / "notes.tmp", features / ".notes.tmp", features / "c.pt"]  # not nnclr's temporary files
    for path in other:
        path.write_bytes(b"y")
    busy = rundir.tmp_path(features / "d.pt")  # a live writer holds it
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, os, sys, time\nfd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT)\n"
         "fcntl.flock(fd, fcntl.LOCK_EX); print('held', flush=True); time.sleep(60)", str(busy)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        rundir.write_bytes_atomic(features / "e.pt", b"new", what="the features")
        assert [p.exists() for p in stale[:2]] == [False, False] and busy.exists()
        assert all(p.exists() for p in other) and stale[2].exists()  # another folder: cleaned when written there
    finally:
        holder.kill()
        holder.wait()


# --------------------------------------------------------------------------- the campaign: every command, every name

RUN_FILES = (rundir.CONFIG, rundir.CHECKPOINT, rundir.METRICS, rundir.RESULTS, rundir.DATA_INDEX, rundir.LOCK,
             rundir.REPORT)
EMB_FILES = ("embeddings.npy", "index.csv", "manifest.json", rundir.LOCK)


def _cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nnclr", *args], capture_output=True, text=True, timeout=600,
                          cwd=cwd)


def _succeeded_or_refused(result: subprocess.CompletedProcess) -> None:
    """The command succeeded, or refused in one line (exit 1 or 2), never a traceback."""
    if result.returncode != 0:
        lines = result.stderr.strip().splitlines()
        assert result.returncode in (1, 2) and len(lines) == 1 and lines[0].startswith("nnclr: error: "), \
            result.stderr
    assert "Traceback" not in result.stderr


def _plant_everywhere(folder: Path, names: tuple[str, ...], outside: Path) -> list[Path]:
    """Links at every name and its temporary name, to an outside file, nothing or an outside folder in turn."""
    links = []
    for i, name in enumerate(names):
        for j, link in enumerate((folder / name, rundir.tmp_path(folder / name))):
            _plant(link, TARGETS[(i + j) % len(TARGETS)], outside / link.name)
            links.append(link)
    return links


def _outside(tmp_path: Path, names: tuple[str, ...]) -> Path:
    outside = tmp_path / "outside"
    for name in names:
        for link in (Path(name), rundir.tmp_path(Path(name))):
            (outside / link.name).mkdir(parents=True, exist_ok=True)
    return outside


def _outside_untouched(outside: Path) -> None:
    for folder in outside.iterdir():
        _outside_unchanged(folder)


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from use_helpers import save_demo_image

    root = tmp_path_factory.mktemp("images") / "photos"
    for i in range(24):
        save_demo_image(i, root / ("a" if i % 2 else "b") / f"{i}.png")
    return root


def _pretrain_args(run: Path, images: Path, *extra: str) -> list[str]:
    from tiny import SMALLER_HEADS

    return ["pretrain", "--run-dir", str(run), "--no-progress", "--set", *SMALLER_HEADS, f"data.name=folder:{images}",
            "data.image_size=16", "data.test_split=", "optim.batch_size=8", "train.threads=1", "train.max_steps=2",
            "train.checkpoint_every=1", "train.log_every=1", *extra]


@pytest.mark.slow
def test_no_command_writes_through_a_link_planted_at_a_name_it_writes(tmp_path: Path, image_folder: Path) -> None:
    """pretrain (with its report and data index), report, eval, export and embed, with links at every file name."""
    run, emb = tmp_path / "run", tmp_path / "emb"
    outside = _outside(tmp_path, (*RUN_FILES, *EMB_FILES, "model.safetensors", "knn-demo.json"))
    links = _plant_everywhere(run, RUN_FILES, outside)
    left = [run / ".checkpoint.pt.tmp", run / "report.html.tmp", run / ".data-index.npz.999999999.0.tmp"]
    for path in left:  # what killed runs of earlier versions left (51 MB each for CIFAR-10 features)
        path.write_bytes(b"x" * 100_000)
    result = _cli(*_pretrain_args(run, image_folder, "train.report=true"))
    _succeeded_or_refused(result)  # a file linked at checkpoint.pt or data-index.npz is read as the run's: refused
    _outside_untouched(outside)
    if result.returncode != 0:
        result = _cli(*_pretrain_args(run, image_folder, "train.report=true"), "--fresh")
        assert result.returncode == 0, result.stderr
        _outside_untouched(outside)
    assert not any(link.is_symlink() for link in links if not link.name.endswith(".tmp"))
    assert not any(os.path.lexists(link) for link in links if link.name.endswith(".tmp"))
    assert (run / rundir.REPORT).is_file() and (run / rundir.DATA_INDEX).is_file()
    assert not any(path.exists() for path in left)

    (run / rundir.REPORT).unlink()
    _plant_everywhere(run, (rundir.REPORT,), outside)
    _succeeded_or_refused(_cli("report", str(run)))
    _outside_untouched(outside)

    _plant_everywhere(tmp_path, ("model.safetensors",), outside)
    _succeeded_or_refused(_cli("export", "--checkpoint", str(run), "--format", "safetensors",
                               "--out", str(tmp_path / "model.safetensors")))
    _outside_untouched(outside)

    _plant_everywhere(emb, EMB_FILES, outside)
    result = _cli("embed", "--checkpoint", str(run), "--images", str(image_folder), "--out", str(emb),
                  "--no-progress")
    _succeeded_or_refused(result)
    _outside_untouched(outside)


@pytest.mark.slow
def test_a_link_planted_at_a_folder_of_the_run_is_refused_in_one_line(tmp_path: Path, image_folder: Path) -> None:
    from nnclr.tensorboard_log import available

    if not available():
        pytest.skip("tensorboard is not installed: nnclr writes no tensorboard/ folder")
    outside = tmp_path / "outside"
    outside.mkdir()
    run = tmp_path / "run"
    _plant(run / rundir.TENSORBOARD, "directory", outside)
    result = _cli(*_pretrain_args(run, image_folder, "train.report=false"))
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and "symbolic link" in lines[0], result.stderr
    _outside_unchanged(outside)


# --------------------------------------------------------------------------- the lock, as users meet it


@pytest.mark.slow
def test_fresh_is_refused_while_a_run_writes_its_report(tmp_path: Path, tiny_data: Path, monkeypatch, capsys) -> None:
    from robust_helpers import run_overrides

    import nnclr.report
    from nnclr.cli import main
    from nnclr.report.build import write_report as build_report

    run = tmp_path / "run"
    args = ["pretrain", "--run-dir", str(run), "--no-progress", "--set",
            *run_overrides(tiny_data, "train.max_steps=2", "data.test_split=")]
    seen: list[subprocess.CompletedProcess] = []

    def report_with_a_fresh_start_meanwhile(run_dir: Path) -> Path:
        seen.append(_cli(*args, "--fresh"))  # a user starts over while the first run writes its report
        return build_report(run_dir)

    monkeypatch.setattr(nnclr.report, "write_report", report_with_a_fresh_start_meanwhile)
    assert main([*args, "train.report=true"]) == 0
    assert len(seen) == 1 and seen[0].returncode == 2, seen[0].stderr
    assert f"{run} is in use by another nnclr process (pid {os.getpid()}" in seen[0].stderr
    assert (run / rundir.CHECKPOINT).is_file() and (run / rundir.RESULTS).is_file() and (run / rundir.REPORT).is_file()


@pytest.mark.slow
def test_deleting_the_lock_file_during_a_run_does_not_let_a_second_run_in(tmp_path: Path, tiny_data: Path) -> None:
    from robust_helpers import run_overrides

    run = tmp_path / "run"
    args = ["pretrain", "--run-dir", str(run), "--no-progress", "--set",
            *run_overrides(tiny_data, "train.epochs=500", "data.test_split=")]
    first = subprocess.Popen([sys.executable, "-m", "nnclr", *args], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not (run / rundir.CHECKPOINT).is_file():
            assert first.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        (run / rundir.LOCK).unlink()
        for extra in ([], ["--fresh"]):
            second = _cli(*args, *extra)
            assert second.returncode == 2 and second.stderr.count("\n") == 1, second.stderr
            assert f"{run} is in use by another nnclr process" in second.stderr
        assert first.poll() is None and (run / rundir.CHECKPOINT).is_file()
    finally:
        first.kill()
        first.wait()


@pytest.mark.slow
def test_a_second_embed_into_the_same_emb_dir_is_refused_in_one_line(tmp_path: Path, image_folder: Path,
                                                                     monkeypatch) -> None:
    from use_helpers import make_checkpoint

    import nnclr
    from nnclr.cli import main

    checkpoint, emb = make_checkpoint(tmp_path / "model.pt", "data.image_size=16"), tmp_path / "emb"
    args = ["embed", "--checkpoint", str(checkpoint), "--images", str(image_folder), "--out", str(emb), "--no-progress"]
    seen: list[subprocess.CompletedProcess] = []
    real_load = nnclr.load

    def load_while_another_embed_starts(*a, **k):
        seen.append(_cli(*args))  # a user starts the same embed while the first one runs
        return real_load(*a, **k)

    monkeypatch.setattr(nnclr, "load", load_while_another_embed_starts)
    assert main(args) == 0
    assert len(seen) == 1 and seen[0].returncode == 2, seen[0].stderr
    assert seen[0].stderr.count("\n") == 1 and "Traceback" not in seen[0].stderr
    assert f"{emb} is in use by another nnclr process (pid {os.getpid()}" in seen[0].stderr
    assert "--out" in seen[0].stderr
    from nnclr.use.embeddings import open_embeddings

    assert len(open_embeddings(emb)) == 24  # the first one finished
