"""``nnclr duplicates --embeddings EMB_DIR [--threshold 0.95] [--json] [--html FILE]``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def add_parser(commands: Any) -> None:
    duplicates = commands.add_parser(
        "duplicates",
        help="list groups of near-duplicate images of an embedding folder",
        description="Link every two images whose cosine similarity is at least --threshold and print the "
        "connected groups, largest first (a chain A~B~C is one group).",
    )
    duplicates.add_argument("--embeddings", required=True, metavar="EMB_DIR", help="output folder of nnclr embed")
    duplicates.add_argument("--threshold", type=float, default=0.95, help="cosine similarity (default: 0.95)")
    duplicates.add_argument("--json", action="store_true", help="print JSON instead of text")
    duplicates.add_argument("--html", metavar="FILE", help="also write a self-contained HTML gallery")


def run(args: argparse.Namespace) -> int:
    from nnclr.errors import UserError
    from nnclr.use.duplicates import duplicate_groups
    from nnclr.use.embeddings import open_embeddings, warn_if_incomplete
    from nnclr.use.outputs import output_file

    if not -1.0 <= args.threshold <= 1.0:
        raise UserError(f"--threshold {args.threshold}: a cosine similarity lies in [-1, 1]")
    html = output_file(args.html, "--html") if args.html else None  # before any work is done
    embeddings = open_embeddings(args.embeddings)
    warn_if_incomplete(embeddings)
    groups = duplicate_groups(embeddings.tensor(), args.threshold, progress=sys.stderr.isatty())
    data = [
        {"size": len(g.rows), "min_similarity": round(g.min_similarity, 6),
         "max_similarity": round(g.max_similarity, 6),
         "members": [{"index": r, "path": embeddings.entries[r].path, "label": embeddings.entries[r].label}
                     for r in g.rows]}
        for g in groups
    ]
    if html is not None:
        _write_html(html, embeddings, data, args.threshold)
    if args.json:
        print(json.dumps({"embeddings": str(embeddings.root), "threshold": args.threshold, "groups": data}, indent=1))
        return 0
    in_groups = sum(g["size"] for g in data)
    print(f"{len(data)} groups of near-duplicates (cosine >= {args.threshold}) among {len(embeddings)} images, "
          f"{in_groups} images in them")
    for i, g in enumerate(data, start=1):
        print(f"group {i}: {g['size']} images, similarity {g['min_similarity']:.3f}-{g['max_similarity']:.3f}")
        for m in g["members"]:
            print(f"  {m['path']}")
    if args.html:
        print(f"gallery: {args.html}", file=sys.stderr)
    return 0


def _write_html(out: Path, embeddings: Any, groups: list[dict[str, Any]], threshold: float) -> None:
    from nnclr.rundir import write_text_atomic
    from nnclr.use.gallery import Tile, render, source_images

    images = source_images(embeddings, sorted({m["index"] for g in groups for m in g["members"]}))
    rows = [(None, [Tile(images[m["index"]], [m["path"]]) for m in g["members"]]) for g in groups]
    page = render(f"nnclr duplicates: {len(groups)} groups (cosine >= {threshold})", rows,
                  note=f"embeddings: {embeddings.root}")
    write_text_atomic(out, page, what="the gallery", kept="nothing was written")
