"""``nnclr search --embeddings EMB_DIR QUERY_IMAGE_OR_DIR [-k 10] [--json] [--html FILE]``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from nnclr.cli import device_type


def add_parser(commands: Any) -> None:
    search = commands.add_parser(
        "search",
        help="find the images most similar to a query image (or to every image of a folder)",
        description="Embed the query image(s) with the checkpoint that made EMB_DIR and list the k most similar "
        "images by cosine similarity: a table, JSON (--json) and/or a self-contained HTML gallery (--html).",
    )
    search.add_argument("query", metavar="QUERY_IMAGE_OR_DIR", help="an image file or a folder of images")
    search.add_argument("--embeddings", required=True, metavar="EMB_DIR", help="output folder of nnclr embed")
    search.add_argument("-k", type=int, default=10, help="neighbours per query (default: 10)")
    search.add_argument("--json", action="store_true", help="print JSON instead of a table")
    search.add_argument("--html", metavar="FILE", help="also write a self-contained HTML gallery")
    search.add_argument(
        "--checkpoint", metavar="RUN",
        help="the checkpoint to embed queries with (default: the one recorded in EMB_DIR; must be the same)",
    )
    search.add_argument(
        "--index", choices=("auto", "exact", "approx"), default="auto",
        help="exact (torch), approx (faiss IVF, saved in EMB_DIR), auto: approx when faiss is installed and "
        "EMB_DIR holds more than --approx-threshold vectors (default)",
    )
    search.add_argument("--approx-threshold", type=int, default=100_000, metavar="N",
                        help="see --index (default: 100000)")
    search.add_argument("--device", default="cpu", type=device_type, help="cpu (default), cuda, cuda:N, auto")


def _table(results: list[dict[str, Any]]) -> str:
    lines = []
    for result in results:
        lines.append(f"query: {result['query']}")
        lines.append(f"  {'rank':>4}  {'score':>6}  {'label':<12}  path")
        for n in result["neighbours"]:
            label = n["class"] or (str(n["label"]) if n["label"] >= 0 else "-")
            lines.append(f"  {n['rank']:>4}  {n['score']:>6.3f}  {label:<12}  {n['path']}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Search (:func:`nnclr.use.query.find_similar`), then print a table or JSON and write the HTML gallery."""
    from nnclr.errors import UserError
    from nnclr.use.embeddings import open_embeddings, warn_if_incomplete
    from nnclr.use.outputs import output_file

    if args.k < 1:
        raise UserError(f"-k {args.k}: must be at least 1")
    from nnclr.runtime import resolve_device

    resolve_device(args.device, "--device")  # CUDA where there is none: named as the user typed it
    html = output_file(args.html, "--html") if args.html else None  # before any work is done
    embeddings = open_embeddings(args.embeddings)
    warn_if_incomplete(embeddings)

    from nnclr.use.query import find_similar

    found = find_similar(
        embeddings, args.query, args.k, checkpoint=args.checkpoint, method=args.index,
        approx_threshold=args.approx_threshold, device=args.device,
        on_skip=lambda path, reason: print(f"skipped query {path}: {reason}", file=sys.stderr),
    )
    index = found.index
    if index is not None:
        state = "loaded" if not index.built else f"built, not saved: {index.not_saved}" if index.not_saved \
            else "built and saved"
        print(
            f"faiss IVF index ({state}, nlist={index.nlist}, nprobe={index.nprobe}): "
            f"recall@{index.k_recall} {index.recall:.3f} against exact search on a sample",
            file=sys.stderr,
        )
    results = [result.as_dict() for result in found.results]
    if html is not None:
        _write_html(html, embeddings, results)
    if args.json:
        print(json.dumps({"embeddings": str(embeddings.root), "k": args.k, "search": found.method,
                          "results": results}, indent=1))
    else:
        print(_table(results))
    if args.html:
        print(f"gallery: {args.html}", file=sys.stderr)
    return 0


def _write_html(out: Path, embeddings: Any, results: list[dict[str, Any]]) -> None:
    from nnclr.rundir import write_text_atomic
    from nnclr.use.gallery import Tile, open_image, render, source_images

    images = source_images(embeddings, sorted({n["index"] for r in results for n in r["neighbours"]}))
    rows = []
    for r in results:
        lead = Tile(open_image(Path(r["query"])), [Path(r["query"]).name, "query"])
        tiles = [
            Tile(images[n["index"]], [n["path"], n["class"]] if n["class"] else [n["path"]], n["score"])
            for n in r["neighbours"]
        ]
        rows.append((lead, tiles))
    page = render(f"nnclr search: {len(results)} quer{'y' if len(results) == 1 else 'ies'}", rows,
                  note=f"embeddings: {embeddings.root}; scores are cosine similarities")
    write_text_atomic(out, page, what="the gallery", kept="nothing was written")
