"""``nnclr embed --checkpoint RUN --images DIR_OR_DATASET --out EMB_DIR [--split S] [--fresh]``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any


def add_parser(commands: Any) -> None:
    embed = commands.add_parser(
        "embed",
        help="embed a folder of images (or a data set) into L2-normalised vectors",
        description="Embed every image below a folder (any depth, any common format) or every image of a data "
        "set with a trained encoder: EMB_DIR gets embeddings.npy (float32), index.csv and manifest.json. "
        "Unreadable files are skipped and listed in the manifest. Re-running embeds only new or changed files.",
    )
    embed.add_argument("--checkpoint", required=True, metavar="RUN", help="a run directory or checkpoint.pt")
    embed.add_argument(
        "--images", required=True, metavar="DIR_OR_DATASET",
        help="a folder of images, or a data set name: demo, cifar10, npz:PATH, ... (see nnclr pretrain)",
    )
    embed.add_argument("--out", required=True, metavar="EMB_DIR", help="where the embeddings go")
    embed.add_argument("--split", default="train", help="split of a data set (default: train)")
    embed.add_argument(
        "--fresh", action="store_true",
        help="re-embed everything (needed when EMB_DIR holds embeddings of another checkpoint or source)",
    )
    embed.add_argument("--device", default="cpu", help="cpu (default), cuda, auto")
    embed.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    """Embed, then print a one-line summary (and the skipped files)."""
    from nnclr.data.registry import parse_name
    from nnclr.errors import UserError

    images = args.images
    path = Path(images[len("folder:"):] if images.startswith("folder:") else images).expanduser()
    if path.is_file():
        raise UserError(f"--images {images} is a file; pass a folder of images or a data set name (e.g. demo)")
    if not path.is_dir():
        source, _ = parse_name(images)  # an unknown name -> a UserError listing the valid ones
        if source == "folder":
            raise UserError(f"--images {images}: no such directory")

    import nnclr
    from nnclr.use.embeddings import embed_dataset, embed_folder, scan_images

    if path.is_dir():
        scan_images(path)  # a folder without images fails before the checkpoint is loaded
    progress = not args.no_progress and sys.stderr.isatty()
    pretrained = nnclr.load(args.checkpoint, device=args.device)
    if path.is_dir():
        report = embed_folder(pretrained, path, args.out, fresh=args.fresh, progress=progress)
    else:
        report = embed_dataset(pretrained, images, args.split, args.out, fresh=args.fresh, progress=progress)
    for item in report.skipped:
        print(f"skipped {item['path']}: {item['reason']}", file=sys.stderr)
    rate = f" ({report.images_per_second:.0f} images/s)" if report.embedded else ""
    print(
        f"{report.total} images in {report.out}: {report.embedded} embedded{rate}, {report.reused} unchanged, "
        f"{report.removed} removed, {len(report.skipped)} skipped (listed in manifest.json)"
    )
    return 0
