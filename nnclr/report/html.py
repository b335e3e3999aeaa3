"""Render the report as one self-contained HTML page: inline CSS, images as ``data:`` URIs, no scripts.

Nothing refers to the network or to other files, so the page opens from disk anywhere (and can be
mailed or archived as one file). The resolved config sits in a collapsible ``<details>`` block.
"""

from __future__ import annotations

import base64
import html
import io
import json
from collections.abc import Iterable
from typing import Any

import torch
from PIL import Image

from nnclr.report.galleries import GalleryRow, Neighbour, PrototypeUsage

CSS = """
body { font: 14px/1.45 -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; color: #222; margin: 0;
       background: #f6f7f9; }
main { max-width: 1180px; margin: 0 auto; padding: 20px 28px 40px; background: #fff; }
h1 { font-size: 24px; margin: 8px 0 2px; } h2 { font-size: 19px; margin: 30px 0 8px; border-bottom: 1px solid #ddd;
     padding-bottom: 4px; } h3 { font-size: 15px; margin: 18px 0 6px; }
.sub { color: #666; margin: 0 0 14px; } .muted { color: #777; } .note { color: #555; font-size: 13px; }
.missing { background: #fff7e0; border: 1px solid #f0d48a; padding: 8px 14px; border-radius: 4px; }
.missing ul { margin: 4px 0; padding-left: 20px; }
table { border-collapse: collapse; margin: 6px 0; } td, th { padding: 3px 10px; text-align: left;
     vertical-align: top; border-bottom: 1px solid #eee; } th { background: #f1f3f5; font-weight: 600; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.columns { display: flex; flex-wrap: wrap; gap: 8px 36px; align-items: flex-start; }
.cards { display: flex; flex-wrap: wrap; gap: 10px; margin: 10px 0; }
.card { border: 1px solid #e3e3e3; border-radius: 6px; padding: 8px 12px; min-width: 100px; }
.card b { display: block; font-size: 20px; } .card span { color: #666; font-size: 12px; }
img.plot { max-width: 100%; display: block; margin: 6px 0; }
pre { background: #f6f8fa; padding: 10px; overflow-x: auto; font-size: 12px; }
details summary { cursor: pointer; color: #245; margin: 6px 0; }
.gallery td { border: none; padding: 2px 3px; } .gallery th { background: none; font-size: 12px; color: #555; }
.tile { display: inline-block; text-align: center; font-size: 10px; line-height: 1.2; width: 70px; }
.tile img { width: 64px; height: 64px; image-rendering: pixelated; border: 3px solid #999; display: block;
     margin: 0 auto 1px; } .tile .ph { width: 64px; height: 64px; border: 3px solid #ddd; margin: 0 auto 1px;
     background: #fafafa; }
.q img { border-color: #2a5ac8; } .ok img { border-color: #1e963c; } .bad img { border-color: #d22828; }
.bad { color: #b01818; } .sep { border-left: 2px solid #ccc; }
"""


def png_uri(data: bytes) -> str:
    """PNG bytes -> a ``data:image/png;base64,...`` URI."""
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def image_uri(image: torch.Tensor) -> str:
    """uint8 image (3, H, W) -> a PNG data URI."""
    buffer = io.BytesIO()
    Image.fromarray(image.permute(1, 2, 0).contiguous().numpy()).save(buffer, format="PNG", optimize=True)
    return png_uri(buffer.getvalue())


def esc(value: Any) -> str:
    """``str(value)`` with ``& < > " '`` escaped for HTML."""
    return html.escape(str(value))


def fmt(value: Any, digits: int | None = 1) -> str:
    """Numbers with ``digits`` decimals (None: as short as exact, ``1e-06``; ints as is), None as an em dash,
    the rest as text; escaped."""
    if value is None:
        return "&mdash;"
    if isinstance(value, bool):
        return esc(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:g}" if digits is None else f"{value:,.{digits}f}"
    return esc(value)


def table(header: Iterable[str], rows: Iterable[Iterable[Any]], numeric: Iterable[int] = ()) -> str:
    """An HTML table; cells are inserted as given (escape them first), columns in ``numeric`` right-aligned."""
    numeric = set(numeric)
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td class='num'>{c}</td>" if i in numeric else f"<td>{c}</td>" for i, c in enumerate(row))
        + "</tr>" for row in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def cards(items: Iterable[tuple[str, str]]) -> str:
    """Headline numbers as cards: (value html, caption)."""
    return "<div class='cards'>" + "".join(
        f"<div class='card'><b>{value}</b><span>{esc(caption)}</span></div>" for value, caption in items
    ) + "</div>"


def plot(png: bytes, alt: str, points: dict[str, int] | None = None) -> str:
    """A PNG figure; ``points`` (data points per panel) is kept in a ``data-points`` attribute, as JSON."""
    counts = f" data-points='{esc(json.dumps(points))}'" if points is not None else ""
    return f"<img class='plot' alt='{esc(alt)}'{counts} src='{png_uri(png)}'>"


def _class_name(label: int, classes: list[str]) -> str:
    if label < 0:
        return "?"
    return classes[label] if label < len(classes) else str(label)


def tile(image: torch.Tensor | None, caption: str, kind: str = "") -> str:
    """One thumbnail with a caption; ``kind`` q (query), ok, bad (wrong class) sets the border colour."""
    picture = f"<img alt='' src='{image_uri(image)}'>" if image is not None else "<div class='ph'></div>"
    return f"<div class='tile {kind}'>{picture}{caption}</div>"


def neighbour_tile(n: Neighbour, query_label: int, classes: list[str]) -> str:
    """A neighbour's tile: class name (with a cross when it is not the query's), similarity and note."""
    kind = "" if query_label < 0 or n.label < 0 else ("bad" if n.wrong else "ok")
    mark = " &#10007;" if n.wrong else ""
    note = f"<br><span class='muted'>{esc(n.note)}</span>" if n.note else ""
    return tile(n.image, f"{esc(_class_name(n.label, classes))}{mark}<br>{n.similarity:.2f}{note}", kind)


def gallery_table(rows: list[GalleryRow], classes: list[str], with_support: bool, split: str = "test") -> str:
    """One line per query image of ``split``: the query, its support-set neighbours, its training-set neighbours."""
    k_support = max((len(r.support) for r in rows), default=0)
    k_train = max((len(r.train) for r in rows), default=0)
    head = f"<tr><th>{esc(split)} image</th>"
    if with_support:
        head += f"<th colspan='{max(1, k_support)}' class='sep'>nearest in the support set (by z)</th>"
    head += f"<th colspan='{k_train}' class='sep'>nearest training images (by backbone features)</th></tr>"
    body = []
    for row in rows:
        caption = f"<b>{esc(_class_name(row.label, classes))}</b><br>{esc(split)} #{row.test_index}"
        cells = [tile(row.image, caption, "q")]
        if with_support:
            support = [neighbour_tile(n, row.label, classes) for n in row.support]
            support = support or ["<span class='muted'>no neighbour</span>"]
            support += [""] * (max(1, k_support) - len(support))
            cells += support
        cells += [neighbour_tile(n, row.label, classes) for n in row.train]
        first_train = 1 + (max(1, k_support) if with_support else 0)
        body.append("<tr>" + "".join(
            f"<td class='sep'>{c}</td>" if i in (1, first_train) else f"<td>{c}</td>" for i, c in enumerate(cells)
        ) + "</tr>")
    return f"<table class='gallery'>{head}{''.join(body)}</table>"


def prototype_section(usage: PrototypeUsage, bars_png: bytes, classes: list[str], split: str) -> str:
    """KMCLR: a sentence on prototype usage, the usage bar chart, and the largest prototypes' members."""
    counts = sorted(usage.counts, reverse=True)
    used = sum(1 for c in counts if c > 0)
    parts = [
        f"<p>The {len(counts)} k-means prototypes claim the {usage.rows:,} images of {esc(split)} as follows "
        f"(each image goes to the prototype nearest to its projection z; this is how KMCLR picks positives): "
        f"{used} prototypes are used, the largest claims {counts[0]:,} images "
        f"({100 * counts[0] / max(1, usage.rows):.1f}%), the median {counts[len(counts) // 2]:,}.</p>",
        plot(bars_png, "prototype usage"),
        "<h3>Members of the largest prototypes</h3><p class='note'>The images whose projection is most similar "
        "to each prototype, with labels and cosine similarity.</p>",
    ]
    rows = []
    for prototype, count, members in usage.largest:
        tiles = "".join(
            tile(m.image, f"{esc(_class_name(m.label, classes))}<br>{m.similarity:.2f}") for m in members
        )
        rows.append(f"<tr><td><b>#{prototype}</b><br>{count:,} images</td><td>{tiles}</td></tr>")
    parts.append(f"<table class='gallery'>{''.join(rows)}</table>")
    return "".join(parts)


def page(title: str, subtitle: str, sections: list[tuple[str, str, str]], missing: list[str]) -> str:
    """The whole document: sections are (anchor id, heading, body html)."""
    nav = " &middot; ".join(f"<a href='#{anchor}'>{esc(heading)}</a>" for anchor, heading, _ in sections)
    notice = ""
    if missing:
        items = "".join(f"<li>{esc(m)}</li>" for m in missing)
        notice = f"<div class='missing'><b>Not in this report</b><ul>{items}</ul></div>"
    body = "".join(f"<section id='{anchor}'><h2>{esc(heading)}</h2>{content}</section>"
                   for anchor, heading, content in sections)
    return (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        f"<meta name='viewport' content='width=device-width, initial-scale=1'><title>{esc(title)}</title>"
        f"<style>{CSS}</style></head><body><main><h1>{esc(title)}</h1><p class='sub'>{subtitle}</p>"
        f"<p class='note'>{nav}</p>{notice}{body}</main></body></html>\n"
    )
