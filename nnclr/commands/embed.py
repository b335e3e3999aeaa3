"""``nnclr embed --checkpoint RUN --images DIR_OR_DATASET --out EMB_DIR [options]``; also under torchrun."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from nnclr.cli import device_type

SHOWN_SKIPPED = 10  # the skipped files named on stderr; manifest.json lists them all


def add_parser(commands: Any) -> None:
    embed = commands.add_parser(
        "embed",
        help="embed a folder of images (or a data set) into L2-normalised vectors",
        description="Embed every image below a folder (any depth, any common format) or every image of a data "
        "set with a trained encoder: EMB_DIR gets embeddings.npy (float32), index.csv and manifest.json. "
        "Unreadable files are skipped and listed in the manifest. Re-running embeds only new or changed files. "
        "Runs under torchrun too (the images are split over the processes; rank 0 writes).",
    )
    embed.add_argument("--checkpoint", required=True, metavar="RUN", help="a run directory or checkpoint.pt")
    embed.add_argument(
        "--images", required=True, metavar="DIR_OR_DATASET",
        help="a folder of images, or a data set name: demo, cifar10, npz:PATH, ... (see nnclr pretrain)",
    )
    embed.add_argument("--out", required=True, metavar="EMB_DIR", help="where the embeddings go")
    embed.add_argument("--split", default="train", help="split of a data set (default: train)")
    embed.add_argument(
        "--data-root", metavar="DIR",
        help="folder of cifar10/cifar100/stl10 (default: the checkpoint's data.root for its own data set)",
    )
    embed.add_argument(
        "--fresh", action="store_true",
        help="re-embed everything (needed when EMB_DIR holds embeddings of another checkpoint or source)",
    )
    embed.add_argument("--batch-size", type=int, default=256, metavar="B", help="images per batch (default: 256)")
    embed.add_argument("--device", default="cpu", type=device_type, help="cpu (default), cuda, cuda:N, auto")
    embed.add_argument(
        "--precision", choices=("auto", "bf16", "fp32"), default="auto",
        help="auto (default): bf16 autocast where it is fast (CUDA, CPUs with AVX512-BF16/AMX), else fp32",
    )
    embed.add_argument("--no-progress", action="store_true", help="no progress bar")


@contextmanager
def _named_as_typed(images: str, split: str) -> Iterator[None]:
    """The data layer's errors name the config key ``data.name``; here the user typed ``--images`` and ``--split``."""
    from nnclr.errors import UserError, data_named_as_typed

    try:
        with data_named_as_typed(images=images):
            yield
    except UserError as error:
        text = str(error)
        if text.startswith("--images ") and f"unknown split {split!r}" in text:
            raise UserError(f"--split {split}: not a split of {images}; {text.partition('; ')[2]}") from None
        raise


def _folder(images: str) -> Path | None:
    """The folder ``--images`` names, or None for a data set name; a UserError for anything else."""
    from nnclr.data.registry import VALID_SOURCES, parse_name
    from nnclr.errors import UserError

    path = Path(images[len("folder:"):] if images.startswith("folder:") else images).expanduser()
    try:
        if path.is_file():
            raise UserError(f"--images {images} is a file; pass a folder of images or a data set name (e.g. demo)")
        if path.is_dir():
            return path
    except OSError as error:  # a name too long, a folder we may not enter
        raise UserError(f"--images {images}: cannot be looked up ({error.strerror or error}); pass a folder of "
                        "images or a data set name (e.g. demo)") from None
    try:
        source, _ = parse_name(images)
    except UserError:
        raise UserError(f"--images {images}: no such folder, and not a data set name; pass a folder of images or "
                        f"one of {VALID_SOURCES}") from None
    if source == "folder":
        raise UserError(f"--images {images}: no such folder; pass a folder of images")
    return None


@contextmanager
def _one_embed(out: str) -> Iterator[None]:
    """Rank 0 holds EMB_DIR while it embeds (:func:`nnclr.rundir.acquire_lock`): a second embed into it is refused.

    An EMB_DIR the lock created is removed again when the command fails before writing into it.
    """
    import os

    from nnclr import rundir

    if os.environ.get("RANK", "0") != "0":
        yield
        return
    folder = Path(out).expanduser()
    new = not os.path.lexists(folder)
    with rundir.acquire_lock(folder, flag="--out"):
        try:
            yield
        except BaseException:
            if new:
                try:
                    (folder / rundir.LOCK).unlink(missing_ok=True)
                    folder.rmdir()  # only when nothing else was written
                except OSError:
                    pass
            raise


def run(args: argparse.Namespace) -> int:
    """Embed, then print a one-line summary (and the skipped files) on rank 0."""
    from nnclr.errors import UserError

    if args.batch_size < 1:
        raise UserError(f"--batch-size {args.batch_size}: must be at least 1")
    folder = _folder(args.images)
    from nnclr.use.outputs import output_folder

    output_folder(args.out, "--out")  # before the checkpoint is loaded

    import nnclr
    from nnclr import distributed, runtime
    from nnclr.use.embed import embed_dataset, embed_folder, scan_images

    if folder is not None:
        scan_images(folder)  # a folder without images fails before the checkpoint is loaded
    progress = not args.no_progress and sys.stderr.isatty()
    with _one_embed(args.out), distributed.process_group(runtime.resolve_device(args.device, "--device")) as device:
        main = distributed.is_main()
        pretrained = nnclr.load(args.checkpoint, device=str(device), precision=args.precision)
        if folder is not None:
            report = embed_folder(pretrained, folder, args.out, fresh=args.fresh, progress=progress,
                                  batch=args.batch_size)
        else:
            with _named_as_typed(args.images, args.split):
                report = embed_dataset(pretrained, args.images, args.split, args.out, root=args.data_root,
                                       fresh=args.fresh, progress=progress, batch=args.batch_size)
    if not main:
        return 0
    for item in report.skipped[:SHOWN_SKIPPED]:
        print(f"skipped {item['path']}: {item['reason']}", file=sys.stderr)
    if len(report.skipped) > SHOWN_SKIPPED:  # a folder of 100,000 broken files is not 100,000 lines
        print(f"skipped {len(report.skipped) - SHOWN_SKIPPED} more unreadable files, each listed with its reason in "
              f"{Path(report.out) / 'manifest.json'}", file=sys.stderr)
    rate = f" ({report.images_per_second:.0f} images/s)" if report.embedded else ""
    print(
        f"{report.total} images in {report.out}: {report.embedded} embedded{rate}, {report.reused} unchanged, "
        f"{report.removed} removed, {len(report.skipped)} skipped (listed in manifest.json)"
    )
    return 0
