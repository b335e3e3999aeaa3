"""Read a run directory of ``nnclr pretrain`` into plain data for the report.

Everything here works from the files alone (no training data): ``config.yaml``,
``checkpoint.pt`` (support set and k-means prototypes), ``metrics.jsonl``, ``results.json`` and
``eval/*.json`` (written by ``nnclr eval``). A missing piece is recorded in :attr:`RunData.missing`
with a sentence that says what is missing and how to get it, so the report can show it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nnclr import rundir
from nnclr.errors import UserError
from nnclr.rundir import CHECKPOINT, CONFIG, EVAL, METRICS, RESULTS


@dataclass
class RunData:
    """The pieces of one run directory; ``None``/empty where a piece is absent.

    Attributes:
        run_dir: the run directory.
        config: the resolved config as a nested dict (from the checkpoint, else ``config.yaml``).
        step: the checkpoint's optimiser step (None without a checkpoint).
        train: ``metrics.jsonl`` records of type ``train`` (step, loss, lr, images_per_s, NN diagnostics).
        knn: ``metrics.jsonl`` records of type ``knn`` (step, top1, top5).
        results: ``results.json`` (steps, knn_before, knn_after, wall_time, images_per_second).
        evals: the ``eval/*.json`` results, sorted by file name, each with ``_file`` added.
        support: the support-set buffers (embeddings (Q, D), labels, indices, steps (Q,), num_filled), or None.
        prototypes: KMCLR's k-means prototypes (K, D), or None.
        clustering: ``metrics.jsonl`` records of type ``clustering`` (DeepCluster, one per epoch).
        pseudo_labels: DeepCluster's pseudo-labels of the training set (N,) in the checkpoint, or None.
        missing: one sentence per missing piece.
    """

    run_dir: Path
    config: dict[str, Any]
    step: int | None = None
    train: list[dict[str, Any]] = field(default_factory=list)
    knn: list[dict[str, Any]] = field(default_factory=list)
    results: dict[str, Any] | None = None
    evals: list[dict[str, Any]] = field(default_factory=list)
    support: dict[str, Any] | None = None
    prototypes: Any = None
    clustering: list[dict[str, Any]] = field(default_factory=list)
    pseudo_labels: Any = None
    missing: dict[str, str] = field(default_factory=dict)

    @property
    def checkpoint(self) -> Path:
        """The run's ``checkpoint.pt`` (it may not exist)."""
        return self.run_dir / CHECKPOINT

    @property
    def method(self) -> str:
        """``method.name`` of the config (``?`` when absent)."""
        return str(self.config.get("method", {}).get("name", "?"))


def require_run_dir(run_dir: str | Path) -> Path:
    """``run_dir`` as a Path if it holds a checkpoint or a config.yaml, else a UserError (torch is not imported)."""
    run_dir = Path(run_dir).expanduser()
    if not run_dir.is_dir():
        raise UserError(f"run directory {run_dir} not found; pass the --run-dir of an `nnclr pretrain` run")
    if not (run_dir / CHECKPOINT).is_file() and not (run_dir / CONFIG).is_file():
        raise UserError(
            f"{run_dir} has neither {CHECKPOINT} nor {CONFIG}; is it a run directory of `nnclr pretrain`?"
        )
    return run_dir


def read_run(run_dir: str | Path) -> RunData:
    """Read what a run directory holds; raises UserError only if it is not a run directory at all."""
    run_dir = require_run_dir(run_dir)
    state = _read_checkpoint(run_dir / CHECKPOINT)
    config = state.get("config") if state else None
    if config is None and (run_dir / CONFIG).is_file():
        config = rundir.read_yaml(run_dir / CONFIG)
    if not isinstance(config, dict):
        raise UserError(
            f"{run_dir}/{CONFIG} cannot be read and there is no {CHECKPOINT}; "
            "is it a run directory of `nnclr pretrain`?"
        )
    data = RunData(run_dir=run_dir, config=config)
    if state is None:
        data.missing["checkpoint"] = f"no {CHECKPOINT} yet (the run wrote none): no galleries, map or prototypes"
    else:
        data.step = int(state.get("step", 0))
        support = state.get("support") or {}
        if "embeddings" in support:
            data.support = {k: support[k] for k in ("embeddings", "labels", "indices", "steps", "num_filled")}
        selector = state.get("selector") or {}
        prototypes = selector.get("kmeans.prototypes")  # KMCLR's online k-means (nnclr.selectors.PrototypeSelector)
        if prototypes is not None and int(selector.get("kmeans.filled", 0)) == prototypes.shape[0]:
            data.prototypes = prototypes
        if "labels" in selector and int(selector.get("epoch", -1)) >= 0:  # DeepCluster's PseudoLabels
            data.pseudo_labels = selector["labels"]
    records = rundir.read_jsonl(run_dir / METRICS)
    data.train = [r for r in records if r.get("type") == "train"]
    data.knn = [r for r in records if r.get("type") == "knn"]
    data.clustering = [r for r in records if r.get("type") == "clustering"]
    if not data.train:
        data.missing["metrics"] = f"no training metrics ({METRICS} is absent or empty)"
    if not data.knn:
        data.missing["knn"] = ("no kNN monitor records (the test split is unlabelled or absent, "
                               "or data.test_split is empty)")
    results = run_dir / RESULTS
    if results.is_file():
        data.results = record if isinstance(record := rundir.read_json(results), dict) else None
        if data.results is None:
            data.missing["results"] = f"{RESULTS} cannot be read (wall time and final kNN unknown)"
    else:
        data.missing["results"] = f"no {RESULTS}: the run has not finished (wall time and final kNN unknown)"
    for path in sorted((run_dir / EVAL).glob("*.json")):
        record = rundir.read_json(path)
        if isinstance(record, dict) and "protocol" in record:
            data.evals.append(record | {"_file": path.name})
    if not data.evals:
        data.missing["eval"] = "no evaluation yet: run `nnclr eval all --checkpoint RUN_DIR` to add one"
    return data


def _read_checkpoint(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    from nnclr.checkpoint import load_checkpoint

    return load_checkpoint(path)

