"""Every default in one place, YAML recipes on top, ``--set a.b=v`` overrides on top of that.

The dataclasses below are the only place defaults live (nanoGPT's rule: one source of truth).
A recipe in ``configs/*.yaml`` and ``--set`` overrides are merged strictly: an unknown key or a
value of the wrong type is a :class:`~nnclr.errors.UserError` that names the key. The resolved
config is saved in the run directory and in every checkpoint.

Defaults are the NNCLR paper's where the paper gives one (Dwibedi et al., ICCV 2021, Sec. 4.1:
projection MLP [2048, 2048, d=256], prediction MLP [4096, d], temperature 0.1, LARS with
lr 0.3 x batch/256, weight decay 1e-6, 10 warm-up epochs, cosine decay, BYOL augmentations).
The data, backbone, support-set size, learning rate (0.6) and run length default to the shipped demo, so that
``nnclr pretrain`` with no arguments is a three-minute CPU run.

Evaluation (``nnclr eval``) has its defaults here too, apart from the run's config: :data:`EVAL`.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import reprlib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from nnclr.errors import UserError

METHODS = ("nnclr", "simclr", "kmclr", "deepcluster", "nnclr_multi", "nnclr_soft", "nnclr_mean", "snclr", "nnbyol",
           "nnsiam", "msf", "all4one")


@dataclass
class DataConfig:
    """Where the images come from (see ``nnclr.data.load_dataset``)."""

    name: str = "demo"  # demo | cifar10 | cifar100 | stl10 | npz:PATH | folder:PATH
    root: str | None = None  # where cifar10/cifar100/stl10 live or download to
    image_size: int = 32  # side of the square images the encoder sees
    download: bool = True  # cifar10/cifar100/stl10: download (with checksums) if absent
    train_split: str = "train"
    test_split: str = "test"  # used by the kNN monitor; "" for none (e.g. unlabelled folders)
    # folder: sources: memory decodes every image once (centred square) and holds it; stream reads each batch
    # from disk in loader workers (random resized crops of the full image); auto streams when memory would not fit
    loader: str = "auto"  # auto | memory | stream
    memory_gb: float = 0.0  # loader=auto: budget for the decoded images of this machine's processes; 0 = half its RAM
    workers: int = -1  # stream: loader worker processes per training process; -1 = a default for the device and cores
    prefetch: int = 2  # stream: batches each worker prepares ahead


@dataclass
class AugmentConfig:
    """View augmentation (``nnclr.augment``)."""

    recipe: str = "byol"  # byol (the paper's) | simclr | crops
    crop_min_scale: float = 0.08  # random resized crop scale range is (crop_min_scale, 1)
    blur: bool = False  # Gaussian blur; off by default for 32x32 images, as in CIFAR recipes


@dataclass
class ModelConfig:
    """Encoder f and heads g (projection) and q (prediction)."""

    # small_cnn | resnet18 | resnet34 | resnet50 | timm:NAME(k=v, ...) | py:MODULE:CLASS(k=v, ...) (docs/backbones.md)
    backbone: str = "small_cnn"
    cifar_stem: bool = True  # small images: ResNets' 3x3 stride-1 first conv without max-pool; timm ViTs' patch size 4
    init_from: str = ""  # encoder weights to start from: an export, run dir, checkpoint or state dict file; "" = random
    proj_hidden_dim: int = 2048
    proj_dim: int = 256  # d in the paper
    proj_layers: int = 3
    pred_hidden_dim: int = 4096  # prediction MLP hidden size; 0 for no predictor
    sync_bn: str = "heads"  # under torchrun, batch-norm over the global batch in: heads | all | none


@dataclass
class MethodConfig:
    """The method: which positive each sample is pulled towards, and the loss."""

    name: str = "nnclr"  # one of METHODS, each a record in nnclr.methods
    temperature: float = 0.1
    support_size: int = 1024  # support set Q (the paper: 98,304 for ImageNet)
    topk: int = 1  # 1 = the nearest neighbour; k > 1 samples one of the k nearest
    exclude_self: bool = True  # never use the sample's own older copy as its neighbour
    # nnclr_multi, nnclr_soft, nnclr_mean, snclr, msf: k, the nearest neighbours used as positives; all4one: the
    # length of the neighbour sequence its transformer reads
    neighbours: int = 5
    soft_temperature: float = 0.1  # nnclr_soft: neighbour weights softmax(cosine / soft_temperature)
    attention_temperature: float = 1.0  # snclr: positiveness softmax(cosine / attention_temperature); its code: 1
    target_momentum: float = 0.99  # nnbyol, msf, all4one: BYOL's tau_base; the target's EMA rate rises to 1 (cosine)
    # The support-set methods: for the first prior_epochs epochs choose each neighbour by the similarity of the
    # samples in a prior space (GPS-SSL) instead of z's: none | initial (the initial encoder's z) | current (z
    # of every image without augmentation, again at every epoch's start) | pixels (8x8)
    prior: str = "none"
    prior_epochs: float = 1.0
    # Short-run schedule (the methods whose record has short_run: nnclr, kmclr):
    # loss = w * NT-Xent(z1, z2) + (1 - w) * NNCLR loss, with w falling
    # linearly from instance_weight to 0 over the first instance_decay share of the run; 0 = the paper.
    instance_weight: float = 1.0
    instance_decay: float = 1.0
    num_prototypes: int = 400  # kmclr: K, the prototypes of its online k-means
    kmeans_reset_epochs: float = 3.0  # kmclr: re-seed the k-means from the stream every this many epochs; 0 = never
    kmeans_iters: int = 10  # deepcluster: Lloyd iterations per clustering
    num_clusters: int = 100  # deepcluster: K, the k-means clusters (pseudo-classes) of the training set


@dataclass
class OptimConfig:
    """Optimiser and learning-rate schedule (linear warm-up then cosine, precomputed per step)."""

    name: str = "lars"  # lars | sgd | adamw
    # Base learning rate; the used one is lr x batch_size / 256 when lr_scaling=linear. The paper's is 0.3
    # (the recipes in configs/ set it); the 20-epoch demo learns more at 0.6: kNN gain +11.3 vs +9.4
    # (mean of seeds 0/1/2, README "Short runs").
    lr: float = 0.6
    lr_scaling: str = "linear"  # linear | none
    final_lr: float = 0.0  # the cosine ends here (absolute, after scaling)
    momentum: float = 0.9
    weight_decay: float = 1.0e-6
    warmup_epochs: float = 2.0  # the paper: 10 of 1000 epochs; the 20-epoch demo needs a short one
    batch_size: int = 256  # global batch (all processes together; each of W processes takes batch_size / W)


@dataclass
class TrainConfig:
    """Run length, device, precision, checkpoints and logging."""

    epochs: float = 20.0
    max_steps: int = 0  # > 0 stops after this many steps (the schedule still spans `epochs`)
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "auto"  # auto (bf16 where fast: CUDA, CPUs with AVX512-BF16/AMX) | bf16 | fp32
    channels_last: bool = True
    threads: int = 0  # CPU threads; 0 = the physical cores this process may use (runtime.default_threads)
    compile: bool = False  # torch.compile the network (+0-5% on a CPU after 30-45 s of compiling)
    run_dir: str = ""  # "" = runs/<method>-<data>
    checkpoint_every: int = 100  # steps
    log_every: int = 10  # steps
    knn_every_epochs: float = 0.0  # online kNN monitor on the test split; 0 = only before/after
    knn_k: int = 20
    knn_temperature: float = 0.07
    report: bool = True  # write RUN_DIR/report.html (``nnclr report``) at the end of ``nnclr pretrain``
    nonfinite: str = "stop"  # a NaN/inf loss or gradient: stop the run, or skip the step and count it


@dataclass
class Config:
    """The whole, resolved configuration of a run."""

    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


@dataclass(frozen=True)
class EvalDefaults:
    """The defaults of ``nnclr eval`` and of the :mod:`nnclr.evaluate` protocols it runs.

    Not part of :class:`Config`: a run's saved config (``config.yaml``, checkpoints) does not hold them, and
    evaluation never changes it. The values are the published protocols' (README.md, section Evaluation):

    * kNN: Wu et al. 2018 (as used by DINO, Caron et al. 2021): k = 20, vote weight exp(sim / 0.07).
    * paper linear probe: SGD, Nesterov momentum 0.9, learning rate 0.1 x batch / 256, batch 256, 100 epochs,
      cosine schedule, no weight decay (the standard linear protocol of SimCLR, BYOL and NNCLR).
    * semi-supervised fine-tuning: SimCLR (Chen et al. 2020, Appendix B.5): 1% and 10% of the labels,
      learning rate 0.05 x batch / 256, 60 epochs for 1% of the labels (or fewer), 30 above.
    * retrieval: recall@1/5/10 (Musgrave et al. 2020).
    """

    train_split: str = "train"  # memory / classifier training split
    test_split: str = "test"
    device: str = "auto"
    seed: int = 0  # validation splits, label subsets, SGD
    threads: int = 0  # CPU threads; 0 = one per physical core, as train.threads
    knn_k: int = 20
    knn_temperature: float = 0.07
    linear_mode: str = "fast"  # fast: L-BFGS on cached features | paper: SGD on augmented images
    batch_size: int = 256  # SGD batch of the paper linear probe and of fine-tuning
    momentum: float = 0.9  # SGD's Nesterov momentum, both
    paper_epochs: int = 100
    paper_lr: float = 0.1  # at batch 256, scaled linearly
    paper_weight_decay: float = 0.0
    semi_fractions: tuple[float, ...] = (0.01, 0.1)
    semi_few_labels: float = 0.01  # fine-tuning on at most this fraction of the labels runs semi_epochs_few epochs
    semi_epochs_few: int = 60
    semi_epochs_many: int = 30
    semi_lr: float = 0.05  # at batch 256, scaled linearly
    retrieval_ks: tuple[int, ...] = (1, 5, 10)

    def semi_epochs(self, fraction: float) -> int:
        """SimCLR's fine-tuning length for a label ``fraction``: 60 epochs for 1% of the labels or less, 30 above."""
        return self.semi_epochs_few if fraction <= self.semi_few_labels + 1e-9 else self.semi_epochs_many


EVAL = EvalDefaults()
"""The evaluation defaults (one instance; frozen)."""


# Keys earlier versions had: a saved config (checkpoint, export) that has them still loads; a user's is told why.
RETIRED = {
    "method.recluster_every": "KMCLR's k-means learns online from every step's projections since nnclr 0.2 "
                              "(docs/kmclr.md); method.kmeans_reset_epochs sets how often it starts afresh",
}

CHOICES: dict[str, tuple[str, ...]] = {
    "method.name": METHODS,
    "method.prior": ("none", "initial", "current", "pixels"),
    "augment.recipe": ("byol", "simclr", "crops"),
    "data.loader": ("auto", "memory", "stream"),
    "model.sync_bn": ("heads", "all", "none"),
    "optim.name": ("lars", "sgd", "adamw"),
    "optim.lr_scaling": ("linear", "none"),
    "train.precision": ("auto", "bf16", "fp32"),
    "train.nonfinite": ("stop", "skip"),
}
POSITIVE = (
    "data.image_size", "data.prefetch", "model.proj_hidden_dim", "model.proj_dim", "model.proj_layers",
    "method.temperature", "method.support_size", "method.topk", "method.num_prototypes", "method.neighbours",
    "method.soft_temperature", "method.attention_temperature",
    "method.kmeans_iters", "optim.lr", "optim.batch_size",
    "train.epochs", "train.checkpoint_every", "train.log_every", "train.knn_k",
    "train.knn_temperature",
    "method.num_clusters",
)
FLOAT32_MAX = 3.4028234663852886e38  # every float key must be finite and at most this (float32's largest)
EPOCH_KEYS = ("train.epochs", "optim.warmup_epochs", "train.knn_every_epochs", "method.kmeans_reset_epochs",
              "method.prior_epochs")
MAX_EPOCHS = 10_000  # the cap of EPOCH_KEYS: 10x the paper's 1000 epochs
MAX_INT = 2**63 - 1  # every int key but train.seed: int64, as the tensors they end up in
MAX_KMEANS_ITERS = 1000  # method.kmeans_iters: 50x DeepCluster's reference (20 per clustering)
MAX_SEED = 2**64 - 1  # train.seed: torch.manual_seed takes 0..2^64 - 1, numpy's SeedSequence no negative numbers
MAX_PROJ_LAYERS = 8  # model.proj_layers: the paper's projection MLP has 3 (SimCLR v2 tried up to 4)
MAX_WORKERS = 8  # data.workers may be up to this or the CPUs, whichever is more (-1 picks up to 8 on a GPU)
DEVICES = "auto, cpu, cuda or cuda:N"  # train.device and the --device flags
NON_NEGATIVE = (
    "data.memory_gb", "model.pred_hidden_dim", "optim.final_lr",
    "optim.momentum", "optim.weight_decay", "optim.warmup_epochs", "train.max_steps",
    "train.threads", "train.knn_every_epochs", "method.kmeans_reset_epochs", "method.prior_epochs",
)


def to_dict(config: Config) -> dict[str, Any]:
    """The config as nested plain dicts (for YAML, JSON and checkpoints)."""
    return dataclasses.asdict(config)


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


_TRUE, _FALSE = ("true", "yes", "on"), ("false", "no", "off")
_YAML_FLOATS = {".nan": math.nan, ".inf": math.inf, "+.inf": math.inf, "-.inf": -math.inf}  # YAML's spellings


def _float(text: str) -> float:
    """Python's float syntax (``1e-3``, ``.5``, ``1_000.5``, ``nan``, ``inf``) and YAML's ``.nan``/``.inf``."""
    word = text.strip()
    return _YAML_FLOATS[word.lower()] if word.lower() in _YAML_FLOATS else float(word)


def _type_name(annotation: Any) -> str:
    return {bool: "true or false", int: "a whole number (int)", float: "a number (float)"}.get(
        annotation, getattr(annotation, "__name__", str(annotation)))


def _union_options(annotation: Any) -> tuple[Any, ...] | None:
    """The options of ``X | Y`` (None for any other hint)."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return typing.get_args(annotation)
    return None


_SHORT = reprlib.Repr()  # (Python 3.11's Repr takes no keywords)
_SHORT.maxlevel, _SHORT.maxlist, _SHORT.maxdict, _SHORT.maxstring, _SHORT.maxother = 2, 4, 4, 60, 60


def _shown(value: Any) -> str:
    """``repr(value)``, cut short: a message stays one readable line whatever a recipe holds."""
    return _SHORT.repr(value)


def _coerce(key: str, value: Any, annotation: Any) -> Any:
    """Check ``value`` (from YAML or already parsed) against a field's type hint.

    Ints are accepted for floats, and so are strings in float syntax: PyYAML (YAML 1.1) reads ``lr: 1e-3`` as the
    string ``'1e-3'``.
    """
    options = _union_options(annotation)
    if options is not None:
        if value is None and type(None) in options:
            return None
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(key, value, option)
            except UserError:
                pass
        names = " or ".join("null" if o is type(None) else o.__name__ for o in options)
        raise UserError(f"config key {key} expects {names}, got {_shown(value)}")
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation is float and isinstance(value, str):
        try:
            return _float(value)
        except ValueError:
            pass
    if annotation is bool and not isinstance(value, bool):
        raise UserError(f"config key {key} expects true or false, got {_shown(value)}")
    if annotation in (int, float) and isinstance(value, bool):
        raise UserError(f"config key {key} expects {_type_name(annotation)}, got {_shown(value)}")
    if not isinstance(value, annotation):
        raise UserError(f"config key {key} expects {_type_name(annotation)}, got {_shown(value)}")
    return value


def _parse(key: str, text: str, annotation: Any) -> Any:
    """The text of ``--set KEY=TEXT`` as the key's type.

    str: the text verbatim (spaces, quotes, ``#`` and all); ``str | None``: an empty text is None. bool: true/false
    (also yes/no, on/off; any case). int: Python's int syntax (``64``, ``-1``, ``1_024``). float: Python's float
    syntax (``0.5``, ``1e-3``, ``nan``, ``inf``) or YAML's ``.nan``/``.inf``. Spaces around a bool or a number are
    ignored.
    """
    options = _union_options(annotation)
    if options is not None:
        if text == "" and type(None) in options:
            return None
        for option in options:
            if option is type(None):
                continue
            try:
                return _parse(key, text, option)
            except UserError:
                pass
        names = " or ".join("empty for null" if o is type(None) else _type_name(o) for o in options)
        raise UserError(f"config key {key} expects {names}, got {text!r}")
    if annotation is str:
        return text
    word = text.strip()
    try:
        if annotation is bool and word.lower() in _TRUE + _FALSE:
            return word.lower() in _TRUE
        if annotation is int:
            return int(word)
        if annotation is float:
            return _float(word)
    except ValueError:
        pass
    raise UserError(f"config key {key} expects {_type_name(annotation)}, got {text!r}")


def _hint(key: str) -> Any:
    """The type hint of config key ``SECTION.NAME``; a UserError names an unknown or retired key."""
    sections = typing.get_type_hints(Config)
    parts = key.split(".")
    if len(parts) != 2:
        raise UserError(f"config key {_shown(key)} must be SECTION.NAME, one of: " + ", ".join(sections))
    section_name, name = parts
    if section_name not in sections:
        raise UserError(f"unknown config section {_shown(section_name)} in {_shown(key)}; sections: "
                        f"{', '.join(sections)}")
    hints = typing.get_type_hints(sections[section_name])
    if key in RETIRED:
        raise UserError(f"config key {key!r} is no longer used: {RETIRED[key]}")
    if name not in hints:
        raise UserError(f"unknown config key {_shown(key)}; keys in {section_name}: {', '.join(hints)}")
    return hints[name]


def _set(config: Config, key: str, value: Any) -> None:
    annotation = _hint(key)
    section_name, name = key.split(".")
    setattr(getattr(config, section_name), name, _coerce(key, value, annotation))


def merge(config: Config, tree: dict[str, Any], source: str) -> Config:
    """Merge a nested dict (from YAML) into ``config`` in place, strictly."""
    if not isinstance(tree, dict):
        raise UserError(f"{source}: expected a mapping of sections (data:, model:, ...)")
    for section, values in tree.items():
        if not isinstance(values, dict):
            raise UserError(f"{source}: section {_shown(section)} must be a mapping of keys to values")
        for name, value in values.items():
            try:
                _set(config, f"{section}.{name}", value)
            except UserError as error:
                raise UserError(f"{source}: {error}") from None
    return config


def parse_override(text: str) -> tuple[str, Any]:
    """``"optim.lr=1e-3"`` -> ``("optim.lr", 0.001)``: the value is read as the key's type (see :func:`_parse`)."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise UserError(f"--set {text!r}: expected KEY=VALUE, e.g. --set optim.lr=0.5")
    return key, _parse(key, raw, _hint(key))


def device_problem(name: str) -> str | None:
    """Why nnclr cannot run on device ``name`` (None when it can: :data:`DEVICES`); CUDA's presence is checked by
    :func:`nnclr.runtime.resolve_device`."""
    if re.fullmatch(r"auto|cpu|cuda(:[0-9]+)?", name):
        return None
    return f"is not a device nnclr runs on: use {DEVICES}"


def validate(config: Config) -> Config:
    """Check choices and ranges; every error names the key and what is allowed.

    Only what holds on any machine (a saved config is validated when a checkpoint is loaded elsewhere): every
    float finite, the ranges of :data:`POSITIVE`, :data:`NON_NEGATIVE` and the caps below. What this machine
    bounds is :func:`check_runnable`'s.
    """
    flat = flatten(to_dict(config))
    for key, allowed in CHOICES.items():
        if flat[key] not in allowed:
            raise UserError(f"config key {key}={_shown(flat[key])} is not one of: {', '.join(allowed)}")
    for key, value in flat.items():
        if isinstance(value, float) and not abs(value) <= FLOAT32_MAX:  # NaN too: every comparison with it is False
            raise UserError(f"config key {key}={value!r} must be a finite number (at most {FLOAT32_MAX:.3g}, "
                            "float32's largest: the value ends up in float32 tensors)")
    for key, value in flat.items():
        if type(value) is int and key != "train.seed" and value > MAX_INT:
            raise UserError(f"config key {key}={value} must be at most {MAX_INT} (2^63 - 1: it goes into int64 "
                            "tensors)")
    if not 0 <= config.optim.momentum < 1:
        raise UserError(f"config key optim.momentum={config.optim.momentum:g} must be in [0, 1)")
    if not 0 <= config.method.target_momentum <= 1:
        raise UserError(f"config key method.target_momentum={config.method.target_momentum:g} must be in [0, 1] "
                        "(BYOL's tau_base: 0.99 on CIFAR, 0.996 on ImageNet)")
    if config.method.kmeans_iters > MAX_KMEANS_ITERS:
        raise UserError(f"config key method.kmeans_iters={config.method.kmeans_iters} must be at most "
                        f"{MAX_KMEANS_ITERS} (DeepCluster's reference runs 20 Lloyd iterations per clustering)")
    for key in EPOCH_KEYS:
        if flat[key] > MAX_EPOCHS:
            raise UserError(f"config key {key}={flat[key]:g} must be at most {MAX_EPOCHS} epochs (10x the paper's "
                            "1000; the learning-rate schedule is computed for every step ahead)")
    if not 0 <= config.train.seed <= MAX_SEED:
        raise UserError(f"config key train.seed={config.train.seed} must be in 0..{MAX_SEED} (2^64 - 1: what "
                        "torch.manual_seed and numpy take)")
    if config.model.proj_layers > MAX_PROJ_LAYERS:
        raise UserError(f"config key model.proj_layers={config.model.proj_layers} must be at most {MAX_PROJ_LAYERS} "
                        "(the paper's projection MLP has 3 layers; deeper ones only train slower)")
    problem = device_problem(config.train.device)
    if problem:
        raise UserError(f"config key train.device={config.train.device!r} {problem}")
    for key in POSITIVE:
        if flat[key] <= 0:
            raise UserError(f"config key {key}={flat[key]!r} must be > 0")
    for key in NON_NEGATIVE:
        if flat[key] < 0:
            raise UserError(f"config key {key}={flat[key]!r} must be >= 0")
    if not 0 < config.augment.crop_min_scale <= 1:
        raise UserError(
            f"config key augment.crop_min_scale={config.augment.crop_min_scale} must be in (0, 1]"
        )
    if config.data.workers < -1:
        raise UserError(f"config key data.workers={config.data.workers} must be >= 0, or -1 for the default")
    for key in ("method.instance_weight", "method.instance_decay"):
        if not 0 <= flat[key] <= 1:
            raise UserError(f"config key {key}={flat[key]!r} must be in [0, 1]")
    return config


def smallest_image_size(backbone: str, cifar_stem: bool) -> tuple[int, str] | None:
    """The smallest ``data.image_size`` a registered backbone takes, and why; None for ``timm:`` and ``py:`` specs
    (:mod:`nnclr.timm_backbone` tries those on the meta device).

    It is the backbone's total stride, where its last stage sees 1x1: small_cnn's three 2x2 max-pools crash below 8
    px; ResNets ran below it, but their stride-2 stages then convolve padding and gave non-finite gradients under
    bf16 (tests/test_validation.py).
    """
    if backbone == "small_cnn":
        return 8, "its three 2x2 max-pools need 8x8 pixels"
    if backbone in ("resnet18", "resnet34", "resnet50"):
        if cifar_stem:
            return 8, "its three stride-2 stages need 8x8 pixels"
        return 32, ("without the CIFAR stem it downsamples by 32 and its last stages would see only padding; "
                    "model.cifar_stem=true takes images down to 8x8")
    return None


def _gib(size: float) -> str:
    gib = size / 2**30
    return f"{gib:,.1f} GiB" if gib < 1e6 else f"{gib:.3g} GiB"


def memory_needed(config: Config, processes: int = 1, world: int = 1,
                  num_samples: int | None = None) -> list[tuple[int, str, str]]:
    """Lower bounds of the memory a run holds at once on one device, in bytes: ``(bytes, what, keys to lower)``
    (or ``set ...``: the advice).

    The support set (float32 rows plus three int64 fields each), the k-means prototypes, the projection and
    prediction heads (weights, gradients and the optimiser's state: momentum; AdamW's two moments), DeepCluster's
    classifier, the method's own modules (``Method.extras``, counted without allocating them), one batch of two
    float32 views (``optim.batch_size / world`` per process) and, for a ``folder:`` source that may stream, the
    uint8 batches its workers prepare ahead (``data.prefetch`` each). ``processes`` is
    how many processes of the run share the device (a machine's CPU memory under torchrun). With ``num_samples``,
    the training images' count (known once the data is loaded), also ``method.prior``'s prior space: a float32
    vector per image, twice while it is extracted (:mod:`nnclr.prior`).
    """
    from nnclr.methods import method_of
    from nnclr.prior import PIXELS_DIM

    m, mo, method = config.model, config.method, method_of(config)
    keys = method.keys
    copies = 4 if config.optim.name == "adamw" else 3
    hidden, layers, d = m.proj_hidden_dim, m.proj_layers, m.proj_dim
    projector = (layers - 2) * hidden * hidden + hidden * d if layers >= 2 else 0  # the backbone's width left out
    predictor = 2 * d * m.pred_hidden_dim if method.head == "predictor" else 0
    classifier = (d + 1) * mo.num_clusters if method.head == "classifier" else 0
    extras = 0
    if method.extras is not None:
        import torch

        with torch.device("meta"):  # shapes only
            extras = sum(p.numel() for p in method.extras(config).parameters())
    image = config.data.image_size
    parts = [
        (projector * 4 * copies, "the projection MLP", "model.proj_hidden_dim, model.proj_layers or model.proj_dim"),
        (predictor * 4 * copies, "the prediction MLP", "model.pred_hidden_dim or model.proj_dim"),
        (classifier * 4 * copies, "the classifier", "method.num_clusters or model.proj_dim"),
        (extras * 4 * copies, f"{mo.name}'s own modules", "model.proj_dim or model.pred_hidden_dim"),
        (mo.support_size * (4 * d + 24) if "method.support_size" in keys else 0, "the support set",
         "method.support_size or model.proj_dim"),
        (mo.num_prototypes * (4 * d + 8) if "method.num_prototypes" in keys else 0, "the prototypes",
         "method.num_prototypes or model.proj_dim"),
        (2 * -(-config.optim.batch_size // world) * 3 * image * image * 4, "a batch of views",
         "optim.batch_size or data.image_size"),
        (max(1, config.data.workers) * config.data.prefetch * -(-config.optim.batch_size // world) * 3 * image * image
         if config.data.name.startswith("folder:") and config.data.loader != "memory" else 0,
         "the batches the streaming loader prepares ahead", "data.prefetch"),
        (2 * num_samples * 4 * (PIXELS_DIM if mo.prior == "pixels" else d)
         if num_samples and mo.prior != "none" and "method.prior" in keys else 0, "the prior space",
         "set method.prior=none"),
    ]
    return [(size * processes, what, lower) for size, what, lower in parts if size]


def check_runnable(config: Config) -> Config:
    """What a new run of ``config`` needs of this machine and its backbone, checked before it starts: images at least
    the backbone's :func:`smallest_image_size`, threads and loader workers at most the CPUs this process may use,
    a C++ compiler for ``train.compile``, CUDA for a CUDA device, and :func:`memory_needed` within the device's
    memory. Each error says what the setting needs and what there is.
    """
    from nnclr import machine

    t, d = config.train, config.data
    smallest = smallest_image_size(config.model.backbone, config.model.cifar_stem)
    if smallest is not None and d.image_size < smallest[0]:
        raise UserError(f"config key data.image_size={d.image_size} is too small for model.backbone="
                        f"{config.model.backbone}: {smallest[1]}; use data.image_size >= {smallest[0]}")
    from nnclr.methods import method_of

    keys = method_of(config).keys
    for key in ("method.topk", "method.neighbours"):
        value = getattr(config.method, key.split(".")[1])
        if key in keys and "method.support_size" in keys and value > config.method.support_size:
            raise UserError(f"config key {key}={value} is more than the method.support_size="
                            f"{config.method.support_size} entries it chooses from; use at most that")
    if config.method.prior != "none" and "method.prior" not in keys:
        from nnclr.methods import METHODS

        readers = ", ".join(name for name, method in METHODS.items() if "method.prior" in method.keys)
        raise UserError(f"config key method.prior={config.method.prior} chooses support-set neighbours and "
                        f"method.name={config.method.name} has none; use it with {readers}, or method.prior=none")
    cpus = len(machine.usable_cpus())
    if t.threads > cpus:
        raise UserError(f"config key train.threads={t.threads} is more than the {cpus} CPUs this process may use; "
                        f"use at most {cpus}, or train.threads=0 for one per physical core")
    if d.workers > max(MAX_WORKERS, cpus):
        raise UserError(f"config key data.workers={d.workers} must be at most {MAX_WORKERS} or the {cpus} CPUs this "
                        "process may use, whichever is more (each worker is a process decoding images); -1 for the "
                        "default")
    if t.compile:
        name, path = machine.cpp_compiler()
        if path is None:
            where = "from CXX" if os.environ.get("CXX") else "on the PATH"
            raise UserError(f"config key train.compile=true needs a C++ compiler (torch.compile's inductor compiles "
                            f"the kernels it generates) and {name!r} ({where}) is not found; install one, point CXX "
                            "to one, or set train.compile=false")
    check_memory(config)
    return config


def check_memory(config: Config, num_samples: int | None = None) -> None:
    """:func:`memory_needed` within the memory of ``train.device`` (all of its run's processes on this machine), or
    a UserError naming the largest part and what lowers it; ``num_samples`` as for :func:`memory_needed` (the run
    checks again once its data is loaded)."""
    from nnclr import machine, runtime

    device = runtime.resolve_device(config.train.device, "train.device")
    have, where = runtime.device_memory(device)
    world = max(1, int(os.environ.get("WORLD_SIZE", "1") or 1))
    parts = memory_needed(config, machine.local_processes() if device.type == "cpu" else 1, world, num_samples)
    needed = sum(size for size, _, _ in parts)
    if have and needed > have:
        parts.sort(reverse=True)
        shown = ", ".join(f"{what} {_gib(size)}" for size, what, _ in parts if size >= needed / 100)
        advice = parts[0][2] if parts[0][2].startswith("set ") else f"lower {parts[0][2]}"
        raise UserError(f"this config needs at least {_gib(needed)} of memory ({shown}) and {where} has "
                        f"{_gib(have)}; {advice}")


def _read_recipe(path: Path) -> Any:
    """The YAML of a recipe file; anything that cannot be read is a one-line UserError naming the file."""
    if path.is_dir():
        raise UserError(f"config file {path} is a folder; pass a YAML file to --config (see configs/)")
    if not path.exists():
        raise UserError(f"config file {path} not found; pass an existing YAML file to --config")
    try:
        data = path.read_bytes()
    except OSError as error:
        raise UserError(f"config file {path} cannot be read ({error.strerror or error}); check its permissions") \
            from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise UserError(f"config file {path} is not UTF-8 text (byte {error.start} is {data[error.start]:#04x}); "
                        "save it as UTF-8") from None
    try:
        return yaml.safe_load(text) or {}
    except yaml.YAMLError as error:
        first = str(error).splitlines()[0]
        raise UserError(f"config file {path} is not valid YAML ({first})") from None
    except RecursionError:
        raise UserError(f"config file {path} is nested too deeply to read; a recipe is sections of KEY: VALUE "
                        "(see configs/)") from None


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults, then the YAML file at ``path`` (if any), then ``KEY=VALUE`` overrides."""
    config = Config()
    if path is not None:
        merge(config, _read_recipe(Path(path)), str(path))
    for text in overrides:
        key, value = parse_override(text)
        _set(config, key, value)
    return check_runnable(validate(config))


def from_dict(tree: dict[str, Any]) -> Config:
    """Rebuild a Config saved with :func:`to_dict` (e.g. from a checkpoint); keys of :data:`RETIRED` are dropped."""
    tree = {section: ({k: v for k, v in keys.items() if f"{section}.{k}" not in RETIRED} if isinstance(keys, dict)
                      else keys) for section, keys in tree.items()}
    return validate(merge(Config(), tree, "saved config"))


def dump_yaml(config: Config) -> str:
    """The resolved config as YAML text."""
    return yaml.safe_dump(to_dict(config), sort_keys=False)
