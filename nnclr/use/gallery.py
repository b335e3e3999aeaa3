"""A self-contained HTML gallery: one file, thumbnails embedded as base64 ``data:`` URIs.

Nothing in the page refers to anything outside it (no scripts, fonts, style sheets or image
URLs), so it opens offline and can be mailed as one file.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from nnclr.data.decode import to_rgb

THUMBNAIL = 128
_STYLE = """
body{font-family:system-ui,sans-serif;margin:1em;background:#fafafa;color:#222}
h1{font-size:1.3em} .row{display:flex;gap:.6em;align-items:flex-start;margin:1em 0;padding:.6em;
background:#fff;border:1px solid #ddd;border-radius:6px;overflow-x:auto}
figure{margin:0;width:{t}px;flex:none;text-align:center;font-size:.75em}
figure.query{border-right:3px solid #36c;padding-right:.6em;width:{t}px}
img{width:{t}px;height:{t}px;object-fit:contain;image-rendering:pixelated;background:#eee}
figcaption{word-break:break-all} .score{font-weight:bold} .missing{width:{t}px;height:{t}px;
background:#eee;display:flex;align-items:center;justify-content:center;color:#999}
""".replace("{t}", str(THUMBNAIL))


@dataclass
class Tile:
    """One picture of the gallery: the image (or None when unavailable) and its caption lines."""

    image: Image.Image | None
    caption: Sequence[str]
    score: float | None = None


def data_uri(image: Image.Image, size: int = THUMBNAIL) -> str:
    """A PNG thumbnail (longer side ``size``, never enlarged past 4x) as a ``data:`` URI."""
    image = to_rgb(image)
    scale = min(size / max(image.size), 4.0)
    if scale < 1:
        image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def open_image(path: Path) -> Image.Image | None:
    """The image at ``path`` (first frame, loaded), or None when it cannot be read."""
    try:
        with Image.open(path) as image:
            image.load()
            return image.copy()
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return None


def _figure(tile: Tile, css: str = "") -> str:
    caption = "<br>".join(html.escape(line) for line in tile.caption)
    if tile.score is not None:
        caption = f'<span class="score">{tile.score:.3f}</span><br>{caption}'
    alt = html.escape(tile.caption[0] if tile.caption else "")
    picture = (
        f'<img src="{data_uri(tile.image)}" alt="{alt}">' if tile.image is not None
        else '<div class="missing">not available</div>'
    )
    klass = f' class="{css}"' if css else ""
    return f"<figure{klass}>{picture}<figcaption>{caption}</figcaption></figure>"


def render(title: str, rows: Sequence[tuple[Tile | None, Sequence[Tile]]], note: str = "") -> str:
    """A complete HTML page: one row per (lead tile or None, other tiles)."""
    body = []
    for lead, others in rows:
        figures = ([_figure(lead, "query")] if lead is not None else []) + [_figure(t) for t in others]
        body.append(f'<div class="row">{"".join(figures)}</div>')
    paragraph = f"<p>{html.escape(note)}</p>" if note else ""
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head>"
        f"<body><h1>{html.escape(title)}</h1>{paragraph}{''.join(body)}</body></html>\n"
    )


def source_images(embeddings: Any, rows: Sequence[int]) -> dict[int, Image.Image | None]:
    """The images of some rows of an EMB_DIR (:class:`nnclr.use.embeddings.Embeddings`).

    Folder sources are read from their files (None when a file is gone or unreadable); data-set
    sources are loaded again at their native size (a ``folder:`` data set is only indexed and just
    the rows asked for are decoded).
    """
    source = embeddings.source
    if source["kind"] == "folder":
        return {r: open_image(Path(source["path"]) / embeddings.entries[r].path) for r in rows}
    from nnclr.data import load_dataset

    root = embeddings.manifest.get("data_root")
    # lazy: a folder: data set decodes only the rows shown (the others load as arrays, as before)
    images = load_dataset(source["name"], source["split"], root=root, download=False, lazy=True).images
    rows = list(rows)
    chosen = images[torch.tensor(rows, dtype=torch.long)] if rows else []
    return {r: Image.fromarray(image.permute(1, 2, 0).numpy()) for r, image in zip(rows, chosen)}
