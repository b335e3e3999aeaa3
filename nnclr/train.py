"""Pretraining: build everything from a config, then one readable loop.

The loop (DINO's shape): per step, take the batch of the epoch's permutation, augment it on the
device, forward both views, compute the method's loss (``nnclr.step``), step the optimiser with
the precomputed learning rate, enqueue view 1's ``z`` into the support set, log, checkpoint.
A ``folder:`` source too large for memory (``data.loader``, :mod:`nnclr.data.loaders`) is streamed:
loader workers read the batch's files and cut both views' random resized crops of the full images
(:mod:`nnclr.data.stream`), and the device applies the rest of the augmentation.

Exact resume: everything random is drawn from generators seeded by (seed, epoch) for the data
order and (seed, step) for augmentation, the streamed crops and the selector's choices (top-k
sampling, online k-means seeding; :mod:`nnclr.seeding`), each drawn for the global batch, so a resumed
run and any number of processes replay the same batches, views and positives; the checkpoint holds
model, optimiser, support set and selector state. What the method is made of comes from its record
(:mod:`nnclr.methods`); the loop calls the selector's hooks and never asks which method it trains.

Under ``torchrun`` (docs/distributed.md) ``optim.batch_size`` is the global batch: each of W
processes takes its contiguous 1/W of every global batch of the same permutation, with the
views drawn for the whole global batch, the model is wrapped in DistributedDataParallel (with
batch-norm over the global batch in the heads by default), and rank 0 alone writes files.
"""

from __future__ import annotations

import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from nnclr import distributed, nonfinite, rundir, runtime
from nnclr.augment import BatchAugment, normalization_for
from nnclr.checkpoint import save_checkpoint
from nnclr.config import Config, check_memory, dump_yaml
from nnclr.data import ImageDataset
from nnclr.data.loaders import LoaderChoice, load_training_data
from nnclr.data.stream import StreamBatch, StreamFeed, default_workers
from nnclr.deepcluster import classifier_without_lars
from nnclr.errors import Interrupted, UserError
from nnclr.evaluate import monitor
from nnclr.evaluate.knn import KnnResult
from nnclr.methods import BuildContext, Method, method_of
from nnclr.model import ContrastiveModel, build_model, target_momentum
from nnclr.optim import build_optimizer, param_groups, scaled_lr, warmup_cosine
from nnclr.resume import checkpoint_state, read_for_resume, restore
from nnclr.seeding import AUGMENT, CLUSTER, ORDER, SELECT, derive_seed
from nnclr.selectors import EpochContext, Selector
from nnclr.step import contrastive_step, instance_weight
from nnclr.stopping import stop_requests
from nnclr.support import SupportSet
from nnclr.tensorboard_log import TensorBoardLog
from nnclr.weights import init_encoder


@dataclass
class Run:
    """Everything a pretraining run is made of, built once from its config."""

    config: Config
    method: Method
    run_dir: Path
    device: torch.device
    dtype: torch.dtype
    train_set: ImageDataset
    test_set: ImageDataset | None
    model: ContrastiveModel  # what is saved (never wrapped)
    network: torch.nn.Module  # what is trained: ``model``, or it wrapped in DistributedDataParallel
    support: SupportSet | None  # the method's support set, if its record keeps one
    selector: Selector  # the method's state and hooks
    optimizer: torch.optim.Optimizer
    augment: BatchAugment
    lr_schedule: torch.Tensor  # (total_steps,)
    steps_per_epoch: int
    total_steps: int  # where the run stops (train.max_steps or the end of the schedule)
    loader: LoaderChoice = LoaderChoice("memory", "")
    feed: StreamFeed | None = None  # the streaming loader's workers (data.loader chose stream)
    knn_before: dict[str, Any] | None = None
    last_checkpoint_step: int | None = None
    lock: rundir.RunLock | None = None  # rank 0's hold on the run directory
    skipped_steps: int = 0  # steps skipped for a non-finite loss or gradient (train.nonfinite=skip)
    consecutive_skips: int = 0
    log_window: list = field(default_factory=list)  # (loss, diagnostics) of the steps since the last metrics record


@dataclass
class RunResult:
    """What ``nnclr pretrain`` reports at the end."""

    run_dir: Path
    steps: int
    knn_before: dict[str, Any] | None
    knn_after: dict[str, Any] | None
    wall_time: float
    images_per_second: float
    resumed_from: int


def build_augment(config: Config) -> BatchAugment:
    """The two training views' augmentation of ``config`` (recipe, crop scale, blur, the data's normalisation)."""
    mean, std = normalization_for(config.data.name)
    return BatchAugment(config.augment.recipe, config.data.image_size, mean=mean, std=std,
                        crop_scale=(config.augment.crop_min_scale, 1.0), blur=config.augment.blur)


def build_run(
    config: Config, device: torch.device | None = None, loader: str | None = None,
    backbone: torch.nn.Module | None = None,
) -> Run:
    """Load data, build model, the method's support set and selector, optimiser and schedule.

    ``device`` defaults to ``train.device``; under torchrun, :func:`pretrain` passes this rank's.
    ``loader`` (``memory`` or ``stream``) overrides ``data.loader``: a resumed run keeps its own.
    ``backbone``: an encoder built in Python instead of ``model.backbone`` (:func:`nnclr.model.build_model`).
    """
    t, d, o, m = config.train, config.data, config.optim, config.method
    runtime.tune_allocator()
    runtime.set_threads(t.threads)
    device = device if device is not None else runtime.resolve_device(t.device)
    dtype = runtime.resolve_dtype(t.precision, device)
    data = load_training_data(d, loader)
    train_set, test_set = data.train_set, data.test_set
    if len(train_set) < 2:  # no batch size works: advise none
        raise UserError(
            f"{d.name} holds {len(train_set)} image{'s' * (len(train_set) != 1)}; contrastive pretraining needs at "
            "least 2 (the other images of a batch are the negatives): add images or use another data set"
        )
    if o.batch_size > len(train_set):
        raise UserError(
            f"optim.batch_size={o.batch_size} is larger than the data set ({len(train_set)} images "
            f"in {d.name}); lower it, e.g. --set optim.batch_size={max(2, len(train_set) // 4)}"
        )
    if o.batch_size < 2:
        raise UserError("optim.batch_size must be at least 2: the other samples are the negatives")
    world = distributed.world_size()
    if o.batch_size % world:
        raise UserError(
            f"optim.batch_size={o.batch_size} is the global batch and must be divisible by the {world} processes; "
            f"use e.g. --set optim.batch_size={max(world, o.batch_size // world * world)}"
        )
    check_memory(config, num_samples=len(train_set))  # what only the data's size tells: the prior space
    torch.manual_seed(t.seed)
    model = build_model(config, backbone).to(device)
    if t.channels_last:
        model = model.to(memory_format=torch.channels_last)
    network = distributed.data_parallel(model, config.model.sync_bn, device)
    network = torch.compile(network) if t.compile else network  # shares model's parameters
    method = method_of(config)
    support = SupportSet(m.support_size, config.model.proj_dim).to(device) if method.support else None
    steps_per_epoch = len(train_set) // o.batch_size
    context = BuildContext(num_samples=len(train_set), steps_per_epoch=steps_per_epoch, dtype=dtype)
    selector = method.selector(config, context).to(device)
    base_lr = scaled_lr(o.lr, o.batch_size) if o.lr_scaling == "linear" else o.lr
    groups = param_groups(model, o.weight_decay)
    if model.classifier is not None:  # re-initialised after every clustering: out of LARS's adaptation
        groups = classifier_without_lars(groups, model.classifier, weight_decay=o.weight_decay)
    optimizer = build_optimizer(o.name, groups, lr=base_lr, momentum=o.momentum, weight_decay=o.weight_decay)
    schedule_steps = max(1, math.ceil(t.epochs * steps_per_epoch))
    schedule = warmup_cosine(base_lr, schedule_steps, round(o.warmup_epochs * steps_per_epoch), o.final_lr)
    augment = build_augment(config)
    feed = None
    if data.choice.loader == "stream":
        feed = StreamFeed(
            train_set.index, size=d.image_size, crops=tuple((v.crop_scale, v.crop_ratio) for v in augment.views),
            seed=t.seed, batch_size=o.batch_size, steps_per_epoch=steps_per_epoch,
            rows=distributed.local_slice(o.batch_size),
            workers=d.workers if d.workers >= 0 else default_workers(device), prefetch=d.prefetch, device=device,
        )
    run_dir = Path(t.run_dir) if t.run_dir else rundir.default_run_dir(m.name, d.name)
    return Run(
        loader=data.choice, feed=feed, config=config, method=method, run_dir=run_dir, device=device,
        dtype=dtype, train_set=train_set, test_set=test_set, model=model, network=network, support=support,
        selector=selector, optimizer=optimizer, augment=augment, lr_schedule=schedule, steps_per_epoch=steps_per_epoch,
        total_steps=min(schedule_steps, t.max_steps) if t.max_steps else schedule_steps,
    )


def knn_monitor(run: Run) -> KnnResult | None:
    """The run's kNN monitor (:func:`nnclr.evaluate.monitor.knn_monitor`); None without a labelled test split."""
    return monitor.knn_monitor(run.model.backbone, run.train_set, run.test_set, run.config, run.device, run.dtype)


def start_epoch(run: Run, epoch: int, step: int, log: rundir.Log) -> None:
    """The selector's hook before ``epoch`` (DeepCluster clusters the training set); logs what it returns.

    ``features()`` gives z of the whole training set, the model in eval mode without augmentation
    (:func:`nnclr.evaluate.monitor.extract_in_shards`), computed only if the hook asks; ``extract(module)`` any
    module's outputs on the same images (the pixel prior's thumbnails).
    """
    def extract(module: torch.nn.Module) -> torch.Tensor:
        options = monitor.extract_options(run.config, run.device, run.dtype)
        return monitor.extract_in_shards(module, run.train_set.images, options)  # (N, F) L2-normalised

    def features() -> torch.Tensor:
        return extract(torch.nn.Sequential(run.model.backbone, run.model.projector))  # (N, D)

    generator = torch.Generator().manual_seed(derive_seed(run.config.train.seed, CLUSTER, epoch))
    stats = run.selector.start_epoch(EpochContext(
        epoch=epoch, first_step=epoch * run.steps_per_epoch, features=features, extract=extract, generator=generator,
        true_labels=run.train_set.labels, classifier=run.model.classifier, optimizer=run.optimizer,
    ))
    if stats is not None:
        log.write({"type": "clustering", "step": step, "epoch": epoch, **stats})


def _batch(run: Run, step: int, order: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """This rank's uint8 images (b, 3, H, W), labels (b,) and indices (b,) of ``step``, on the device.

    The global batch is B consecutive entries of the epoch's permutation; rank r takes its rows
    [r*b, (r+1)*b), b = B / W (DistributedSampler with drop_last, but resumable by step).
    """
    b = run.config.optim.batch_size
    position = step % run.steps_per_epoch
    indices = order[position * b : (position + 1) * b][distributed.local_slice(b)]
    pin = run.device.type == "cuda"
    images = run.train_set.images[indices]
    labels = run.train_set.labels[indices]
    if pin:
        images, labels, indices = images.pin_memory(), labels.pin_memory(), indices.pin_memory()
    move = dict(device=run.device, non_blocking=pin)
    return images.to(**move), labels.to(**move), indices.to(**move)


def epoch_order(run: Run, epoch: int) -> torch.Tensor:
    """The selector's order of the training set for ``epoch`` (a permutation, or DeepCluster's balanced draw)."""
    generator = torch.Generator().manual_seed(derive_seed(run.config.train.seed, ORDER, epoch))
    return run.selector.epoch_order(len(run.train_set), generator)


def train_step(
    run: Run, step: int, order: torch.Tensor | None = None, streamed: StreamBatch | None = None
) -> tuple[float, dict[str, float]]:
    """One optimisation step; returns the loss and the NN diagnostics.

    The batch is the step's slice of ``order`` from the in-memory set, or ``streamed``: the crops the
    streaming loader's workers cut (then only flip, colour, blur and solarize are applied here).
    """
    config = run.config
    if streamed is None:
        images, labels, indices = _batch(run, step, order)
        height, width = images.shape[2:]
    else:
        move = dict(device=run.device, non_blocking=run.device.type == "cuda")
        images, labels, indices = (t.to(**move) for t in (streamed.views, streamed.labels, streamed.indices))
        height = width = config.data.image_size
    generator = torch.Generator(device=run.device).manual_seed(derive_seed(config.train.seed, AUGMENT, step))
    # Views' parameters are drawn for the global batch and sliced, so that W processes see the
    # same views as one process would.
    params = run.augment.sample_params(config.optim.batch_size, height, width, generator, run.device)
    local = distributed.local_slice(config.optim.batch_size)
    params = [{key: value[local] for key, value in view.items()} for view in params]
    if streamed is None:
        views = torch.cat(run.augment.apply_params(images, params))  # (2b, 3, S, S)
    else:
        views = torch.cat(run.augment.apply_to_crops(images, params))
    if config.train.channels_last:
        views = views.contiguous(memory_format=torch.channels_last)
    for group in run.optimizer.param_groups:
        group["lr"] = float(run.lr_schedule[min(step, len(run.lr_schedule) - 1)]) * group.get("lr_scale", 1.0)
    saved = nonfinite.save_buffers(run.model) if config.train.nonfinite == "skip" else []
    weight = instance_weight(config.method, step, len(run.lr_schedule)) if run.method.short_run else 0.0
    # the selector's random choices: uniforms for the global batch, sliced like the views' parameters
    choices = torch.Generator().manual_seed(derive_seed(config.train.seed, SELECT, step))
    uniforms = torch.rand(2, config.optim.batch_size, generator=choices)[:, local]  # (2, b)
    with runtime.autocast(run.device, run.dtype):
        out = contrastive_step(
            run.network, views, loss=run.method.loss, temperature=config.method.temperature,
            support=run.support, selector=run.selector, labels=labels, indices=indices, step=step,
            uniforms=uniforms, instance_weight=weight, target=run.model.target, extras=run.model.extras,
        )
    loss, diagnostics = distributed.global_mean(out.loss.detach(), out.diagnostics)
    run.optimizer.zero_grad(set_to_none=True)
    problem = None if math.isfinite(loss) else f"the loss became {loss}"
    if problem is None:
        out.loss.backward()
        problem = nonfinite.gradient_problem(run.model)
    if problem is not None:
        return _nonfinite_step(run, step, problem, saved)
    run.consecutive_skips = 0
    run.optimizer.step()
    if run.model.target is not None:  # BYOL's target network follows the online one
        run.model.update_target(target_momentum(config.method.target_momentum, step, len(run.lr_schedule)))
    if run.support is not None:
        run.support.enqueue(out.z1, labels, indices, step)
    return loss, diagnostics | run.selector.after_step(out.z1, choices)


def _nonfinite_step(run: Run, step: int, problem: str, buffers: list) -> tuple[float, dict[str, float]]:
    """Stop the run (``train.nonfinite=stop``) or skip the step: weights, batch-norm ``buffers`` as saved before
    the forward, optimiser and support set as before it."""
    run.optimizer.zero_grad(set_to_none=True)
    if run.config.train.nonfinite == "stop":
        raise nonfinite.stop(problem, step + 1, run.run_dir, run.last_checkpoint_step)
    nonfinite.restore_buffers(run.model, buffers)
    run.skipped_steps += 1
    run.consecutive_skips += 1
    if run.consecutive_skips > nonfinite.MAX_CONSECUTIVE_SKIPS:
        raise nonfinite.stop(
            problem, step + 1, run.run_dir, run.last_checkpoint_step,
            advice=f"{run.consecutive_skips} steps in a row were skipped, the run is not recovering: lower optim.lr "
            "or use train.precision=fp32 and start over with --fresh",
        )
    nonfinite.skip(problem, step + 1, run.skipped_steps)
    return math.nan, {}


def pretrain(
    config: Config, *, fresh: bool = False, progress: bool = True, echo: Any = print,
    accept_data_changes: bool = False, backbone: torch.nn.Module | None = None,
) -> RunResult:
    """Pretrain (or resume) the run ``config`` describes; returns kNN before/after and timings.

    Under torchrun every process calls this: the process group is made from the environment
    (and destroyed at the end), and only rank 0 writes files, prints and shows progress.
    A ``folder:`` source that changed since the run started is refused on resume unless
    ``accept_data_changes`` (then the run goes on with the folder as it is now). ``backbone``: your own
    encoder instance, trained in place (``model.backbone`` must rebuild it: docs/backbones.md).
    """
    with distributed.process_group(runtime.resolve_device(config.train.device)) as device:
        main = distributed.is_main()
        return _pretrain(config, device, fresh=fresh, progress=progress and main,
                         echo=echo if main else _silent, accept_data_changes=accept_data_changes,
                         backbone=backbone)


def _silent(*args: Any, **kwargs: Any) -> None:
    pass


def _pretrain(
    config: Config, device: torch.device, *, fresh: bool, progress: bool, echo: Any, accept_data_changes: bool,
    backbone: torch.nn.Module | None = None,
) -> RunResult:
    run = build_run(config, device, backbone=backbone)
    if run.loader.reason:
        echo(run.loader.reason)
    path = run.run_dir / rundir.CHECKPOINT
    main = distributed.is_main()
    log: rundir.Log = rundir.NoLog()
    try:
        state = read_for_resume(run, path, fresh, accept_data_changes, echo)
        saved_loader = state.get("loader", "memory") if state is not None else run.loader.loader
        if saved_loader != run.loader.loader:  # data.loader=auto may choose otherwise on another machine
            echo(f"data: resuming with the loader this run started with ({saved_loader}), not {run.loader.loader}")
            lock, run.lock = run.lock, None
            _close_feed(run)
            run = build_run(config, device, loader=saved_loader, backbone=backbone)
            run.lock = lock
        start = restore(run, state) if state is not None else 0
        if state is None and config.model.init_from:  # a new run starts from these weights (nnclr.weights)
            echo(init_encoder(run.model.backbone, config.model.init_from, config.model.backbone))
            if run.model.target is not None:
                run.model.copy_to_target()
        del state
        if main:
            rundir.write_config(run.run_dir, dump_yaml(config))
            # TensorBoard drops what an interrupted session logged after the checkpoint, as metrics.jsonl does
            tensorboard = TensorBoardLog(run.run_dir, purge_step=start + 1 if start else 0)
            log = rundir.MetricsLog(run.run_dir / rundir.METRICS, start, mirror=tensorboard)
        return _train(run, log, start, progress=progress, echo=echo)
    finally:
        log.close()
        _close_feed(run)
        if run.lock is not None:
            run.lock.release()


def _close_feed(run: Run) -> None:
    if run.feed is not None:
        run.feed.close()


def _train(run: Run, log: rundir.Log, start: int, *, progress: bool, echo: Any) -> RunResult:
    """The loop from step ``start`` to ``run.total_steps``, then the final kNN and ``results.json``."""
    config, path, main = run.config, run.run_dir / rundir.CHECKPOINT, distributed.is_main()
    if start > run.total_steps:  # a lowered train.max_steps or train.epochs: say so instead of "resuming 300/200"
        echo(f"{run.run_dir}: its checkpoint is at step {start}, past the {run.total_steps} steps this config trains "
             "(train.max_steps, train.epochs); nothing to train")
    elif start:
        echo(f"resuming {run.run_dir} from step {start}/{run.total_steps}")
    if start == 0:
        before = knn_monitor(run)
        run.knn_before = vars(before) if before else None
        if before:
            log.write({"type": "knn", "step": 0, "epoch": 0.0, "top1": before.top1, "top5": before.top5})
    t0, images_seen, window, last_log = time.perf_counter(), 0, run.log_window, time.perf_counter()  # (resumed)
    knn_every = round(config.train.knn_every_epochs * run.steps_per_epoch)
    knn_every = max(1, knn_every) if config.train.knn_every_epochs else 0
    bar = tqdm(total=run.total_steps, initial=start, disable=not progress, unit="step", dynamic_ncols=True)
    step, order, epoch = start, None, -1
    report_every = 0 if progress else max(1, (run.total_steps - start) // 10)  # lines instead of a bar
    with stop_requests() as stop:
        stopping = False
        while step < run.total_steps and not stopping:
            if step // run.steps_per_epoch != epoch:
                epoch = step // run.steps_per_epoch
                start_epoch(run, epoch, step, log)
                order = epoch_order(run, epoch)
                if run.feed is not None:
                    run.feed.epoch(order, step, min((epoch + 1) * run.steps_per_epoch, run.total_steps))
            streamed = run.feed.next(step) if run.feed is not None else None
            loss, diagnostics = train_step(run, step, order, streamed)
            step += 1
            stopping = distributed.any_rank(bool(stop[0]), run.device)  # every rank stops after the same step
            images_seen += config.optim.batch_size
            window.append((loss, diagnostics))
            bar.update(1)
            if report_every and step % report_every == 0:
                recent = sum(loss for loss, _ in window[-report_every:]) / len(window[-report_every:])
                echo(f"step {step}/{run.total_steps}  loss {recent:.3f}  {time.perf_counter() - t0:.0f} s")
            if step % config.train.log_every == 0 or step == run.total_steps:
                now = time.perf_counter()
                record = _log_record(run, step, window, len(window) * config.optim.batch_size / (now - last_log))
                _log_unreadable(run, log)
                log.write(record)
                shown = math.nan if record["loss"] is None else record["loss"]  # None: every step skipped
                bar.set_postfix(loss=f"{shown:.3f}", img_s=f"{record['images_per_s']:.0f}")
                window = run.log_window = []  # the checkpoint holds what is not logged yet
                last_log = now
            if knn_every and step % knn_every == 0 and step < run.total_steps:
                result = knn_monitor(run)
                if result:
                    log.write({"type": "knn", "step": step, "epoch": step / run.steps_per_epoch,
                               "top1": result.top1, "top5": result.top5})
            if step % config.train.checkpoint_every == 0 or step == run.total_steps or stopping:
                problem = nonfinite.weights_problem(run.model)  # never replace a good checkpoint with NaN weights
                if problem:
                    advice = "lower optim.lr or use train.precision=fp32 and start over with --fresh"
                    raise nonfinite.stop(problem, step, run.run_dir, run.last_checkpoint_step, advice=advice)
                _log_unreadable(run, log)  # what the checkpoint counts is in metrics.jsonl before it
                unreadable = run.feed.unreadable_total(run.device) if run.feed is not None else 0  # every rank
                if main:
                    state = {**checkpoint_state(run, step), "unreadable_files": unreadable}
                    save_checkpoint(state, path, previous_step=run.last_checkpoint_step)
                run.last_checkpoint_step = step
    bar.close()
    train_time = time.perf_counter() - t0
    if step < run.total_steps:
        signum = stop[0] or signal.SIGINT  # (a rank the signal did not reach stops with the others)
        echo(f"stopped by {signal.Signals(signum).name} at step {step}/{run.total_steps}; checkpoint saved in {path}. "
             "Run the same command to resume.")
        distributed.barrier()  # the checkpoint is written before any rank exits
        raise Interrupted(signum)
    return _finish(run, log, step, start, train_time, images_seen)


def _log_unreadable(run: Run, log: rundir.Log) -> None:
    """One ``unreadable`` record per file the loaders replaced since the last log (gathered from every rank)."""
    if run.feed is None:
        return
    for step, path, reason in run.feed.take_unlogged():
        log.write({"type": "unreadable", "step": step, "path": path, "reason": reason})


def _log_record(run: Run, step: int, window: list, images_per_s: float) -> dict[str, Any]:
    losses = [loss for loss, _ in window if math.isfinite(loss)]  # skipped steps have none
    record: dict[str, Any] = {
        "type": "train", "step": step, "epoch": round(step / run.steps_per_epoch, 4),
        "loss": sum(losses) / len(losses) if losses else None,
        "lr": float(run.lr_schedule[min(step - 1, len(run.lr_schedule) - 1)]),
        "images_per_s": images_per_s,
    }
    if run.config.train.nonfinite == "skip":
        record["skipped_steps"] = run.skipped_steps
    if run.feed is not None:
        record["unreadable_files"] = run.feed.unreadable_total(run.device)
    for key in dict.fromkeys(key for _, diagnostics in window for key in diagnostics):
        values = [d[key] for _, d in window if key in d and math.isfinite(d[key])]
        record[key] = sum(values) / len(values) if values else None
    return record


def _finish(run: Run, log: rundir.Log, step: int, start: int, train_time: float, images_seen: int) -> RunResult:
    after = knn_monitor(run)
    if after and not log.has("knn", step):  # also when a kill came between the last checkpoint and this record
        log.write({"type": "knn", "step": step, "epoch": step / run.steps_per_epoch,
                   "top1": after.top1, "top5": after.top5})
    result = RunResult(
        run_dir=run.run_dir, steps=step, knn_before=run.knn_before, knn_after=vars(after) if after else None,
        wall_time=train_time, images_per_second=images_seen / train_time if train_time > 0 else 0.0,
        resumed_from=start,
    )
    if distributed.is_main():
        results = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(result).items()}
        results["hardware"] = runtime.hardware_info(run.device, run.dtype, distributed.world_size())
        rundir.write_results(run.run_dir, results)
    distributed.barrier()  # every file is written before any rank returns
    return result

