"""Resuming a run: what its checkpoint holds, how rank 0 reads it (or starts afresh) and how a run picks up from it.

The checkpoint (:func:`checkpoint_state`, written by :func:`nnclr.checkpoint.save_checkpoint`) holds the
step, the config, the model, the support set, the selector's state (prototypes, pseudo-labels), the optimiser,
the kNN accuracy before training, the loader a run started with, the non-finite-step counters, the steps
since the last metrics record (so that the next record averages the same steps as in an uninterrupted run)
and a fingerprint of the training data (:func:`data_fingerprint`; a resume on other data is refused,
:func:`check_data`): with the generators seeded by (seed, epoch) and (seed, step) (:mod:`nnclr.seeding`),
everything a resumed run needs to replay the uninterrupted one step for step. A ``folder:`` source also keeps
its file index in the run directory (:func:`check_folder`), so that sample ``i`` stays the same file.
"""

from __future__ import annotations

import hashlib
import weakref
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from nnclr import checkpoint, distributed, rundir, runtime
from nnclr.checkpoint import config_differences, load_checkpoint, load_state_strict, written_by
from nnclr.config import to_dict
from nnclr.data.dataset import ImageDataset
from nnclr.data.index import FileIndex
from nnclr.errors import UserError

if TYPE_CHECKING:
    from nnclr.train import Run


def checkpoint_state(run: Run, step: int) -> dict[str, Any]:
    """What the checkpoint of ``run`` after ``step`` steps holds (see the module docstring)."""
    return {
        "step": step,
        "config": to_dict(run.config),
        "model": run.model.state_dict(),
        "support": run.support.state_dict() if run.support is not None else {},
        "selector": run.selector.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "knn_before": run.knn_before,
        "loader": run.loader.loader,
        "skipped_steps": run.skipped_steps,
        "consecutive_skips": run.consecutive_skips,
        "log_window": list(run.log_window),
        "data": data_fingerprint(run.train_set),
    }


def restore(run: Run, state: dict[str, Any]) -> int:
    """Load ``state`` (:func:`checkpoint_state`) into ``run``; the step to go on from.

    Raises:
        UserError: If the checkpoint was written with another config, or its tensors do not fit the run.
    """
    differences = config_differences(state["config"], to_dict(run.config))
    if differences:
        raise UserError(
            f"{run.run_dir} holds a run with a different config ({'; '.join(differences[:3])}); "
            "use the same config to resume, another --run-dir, or --fresh to start over"
        )
    origin = written_by(state)
    load_state_strict(run.model, state["model"], "model", origin)
    if run.support is not None:
        load_state_strict(run.support, state["support"], "support set", origin)
    load_state_strict(run.selector, state["selector"], "selector", origin)
    try:
        run.optimizer.load_state_dict(state["optimizer"])
    except (ValueError, KeyError, TypeError, IndexError, RuntimeError) as error:
        raise UserError(
            f"the checkpoint's optimiser state does not fit this run{origin} ({str(error).splitlines()[0][:160]}); "
            f"the file is damaged or crafted: start over with --fresh, or use another --run-dir"
        ) from None
    run.knn_before = state.get("knn_before")
    run.skipped_steps, run.consecutive_skips = state.get("skipped_steps", 0), state.get("consecutive_skips", 0)
    # the steps since the last metrics record (older checkpoints: none), so that the next record averages them all
    run.log_window = [(float(loss), dict(diagnostics)) for loss, diagnostics in state.get("log_window", [])]
    # every rank adds its own files to the total, which the checkpoint holds: rank 0 carries it on
    if run.feed is not None:
        run.feed.unreadable = state.get("unreadable_files", 0) if distributed.is_main() else 0
    run.last_checkpoint_step = int(state["step"])
    return run.last_checkpoint_step


def read_for_resume(run: Run, path: Path, fresh: bool, accept_changes: bool, echo: Any) -> dict[str, Any] | None:
    """Rank 0 clears (``fresh``) or reads the checkpoint and sends it to every rank.

    Before that it compares a ``folder:`` source's files with those the run started on
    (:func:`check_folder`).

    Sending rank 0's copy (rather than every rank reading the file) needs no shared file system
    across machines and cannot race with rank 0 deleting or rewriting the file.
    """
    state: Any = None
    if distributed.is_main():
        try:
            run.lock = rundir.acquire_lock(run.run_dir)  # before --fresh deletes anything
            if fresh:
                rundir.clear_for_fresh(run.run_dir)
            check_folder(run, path.is_file(), accept_changes, echo)
            if path.is_file():  # one process loads onto its device; several share a CPU copy
                state = load_checkpoint(path, run.device if distributed.world_size() == 1 else "cpu")
                needed = checkpoint.RESUME_FIELDS + (("support",) if run.support is not None else ())
                checkpoint.check_fields(state, path, needed)
                check_data(run, state, accept_changes, echo)
        except UserError as error:
            if distributed.world_size() == 1:
                raise
            state = error  # raised on every rank below, so that no rank waits for the others
    if distributed.world_size() > 1:
        state = distributed.broadcast_object(state, run.device)
        if isinstance(state, UserError):
            raise state
        state = runtime.to_device(state, run.device)
    return state


def check_folder(run: Run, resuming: bool, accept_changes: bool, echo: Any) -> None:
    """Keep the index of a ``folder:`` training split in the run directory; on resume, refuse a changed folder.

    Sample ``i`` of a resumed run must be the file it was before the interruption, so files added,
    removed or modified since the run started make the resumed run a different one.
    """
    index, saved = run.train_set.index, run.run_dir / rundir.DATA_INDEX
    if index is None:
        return
    if resuming and saved.is_file():
        change = index.changes_from(FileIndex.load(saved))
        if change is None:
            return
        if not accept_changes:
            raise UserError(
                f"{run.config.data.name} changed since this run started: {change}; restore it, pass "
                "--accept-data-changes to go on with the folder as it is now, or start over with --fresh"
            )
        echo(f"data: going on with the changed folder ({change})")
    index.save(saved)




_FINGERPRINTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # a data set's, computed once
SAMPLED_IMAGES = 256  # images of an array source hashed for its fingerprint, spread evenly over it


def data_fingerprint(dataset: ImageDataset) -> dict[str, Any]:
    """What identifies the training data a checkpoint was trained on: the number of images, their shape, and a
    SHA-256 of a ``folder:`` source's index (files, labels, sizes, mtimes: :meth:`FileIndex.fingerprint`) or of an
    array source's labels and :data:`SAMPLED_IMAGES` images spread evenly over it (a few milliseconds for CIFAR-10).
    """
    if dataset in _FINGERPRINTS:
        return _FINGERPRINTS[dataset]
    n, shape = len(dataset), [int(s) for s in dataset.images.shape[1:]]
    if dataset.index is not None:
        digest = dataset.index.fingerprint()
    else:
        sha = hashlib.sha256(repr((n, shape)).encode())
        picks = torch.linspace(0, n - 1, min(n, SAMPLED_IMAGES)).round().long().unique() if n else torch.zeros(0).long()
        sha.update(dataset.images[picks].contiguous().numpy().tobytes())
        sha.update(dataset.labels.contiguous().numpy().tobytes())
        digest = sha.hexdigest()
    _FINGERPRINTS[dataset] = {"images": n, "shape": shape, "sha256": digest}
    return _FINGERPRINTS[dataset]


def check_data(run: Run, state: dict[str, Any], accept_changes: bool, echo: Any) -> None:
    """Refuse to resume on other training data than the checkpoint's (:func:`data_fingerprint`).

    A checkpoint without a fingerprint (written before nnclr kept one) resumes as before. With ``accept_changes``
    the run goes on with the data as it is now (a ``folder:`` source has said so in :func:`check_folder`).
    """
    saved, now = state.get("data"), data_fingerprint(run.train_set)
    if saved is None or saved == now:
        return
    then = f"{saved.get('images', '?')} images of {'x'.join(map(str, saved.get('shape', [])))}"
    if saved.get("images") == now["images"] and saved.get("shape") == now["shape"]:
        change = f"the same {then}, other content"
    else:
        change = f"{then} when it started, {now['images']} images of {'x'.join(map(str, now['shape']))} now"
    batch = run.config.optim.batch_size
    steps = f"{int(saved.get('images', 0)) // batch} steps per epoch then, {run.steps_per_epoch} now"
    if accept_changes:
        if run.train_set.index is None:
            echo(f"data: going on with the changed data ({change}; {steps})")
        return
    raise UserError(
        f"{run.config.data.name} changed since this run started ({change}; {steps}); restore it, pass "
        "--accept-data-changes to go on with the data as it is now, or start over with --fresh"
    )
