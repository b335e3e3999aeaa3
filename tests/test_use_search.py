"""``nnclr search`` and ``nnclr duplicates``: exact search, faiss, the HTML gallery, bad input."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from use_helpers import assert_user_error, make_checkpoint, make_image_folder, run_main

import nnclr
from nnclr.cli import main
from nnclr.errors import UserError
from nnclr.use.duplicates import duplicate_groups
from nnclr.use.embed import embed_folder, scan_images
from nnclr.use.embeddings import (
    EMBEDDINGS_FILE,
    INDEX_FILE,
    MANIFEST_FILE,
    Entry,
    open_embeddings,
    save_embeddings,
    vectors_hash,
)
from nnclr.use.query import find_similar
from nnclr.use.search import FAISS_INDEX_FILE, exact_search, recall_at_k, rows_per_chunk, search


@pytest.fixture(scope="module")
def indexed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(checkpoint, image folder, EMB_DIR)."""
    root = tmp_path_factory.mktemp("search")
    checkpoint = make_checkpoint(root / "checkpoint.pt")
    folder = make_image_folder(root / "images")
    embed_folder(nnclr.load(checkpoint), folder, root / "emb")
    return checkpoint, folder, root / "emb"


def test_exact_search_matches_a_full_sort() -> None:
    keys = F.normalize(torch.randn(1000, 16), dim=1)
    queries = F.normalize(torch.randn(37, 16), dim=1)
    full = queries @ keys.t()
    expected = full.argsort(dim=1, descending=True)[:, :5]
    for chunk in (8, None):  # several chunks, and the default
        scores, indices = exact_search(queries, keys, k=5, chunk=chunk)
        assert torch.equal(indices, expected)
        torch.testing.assert_close(scores, full.gather(1, expected))
    assert exact_search(queries, keys[:3], k=10)[1].shape == (37, 3)  # k clipped to N
    assert rows_per_chunk(10_000_000) * 10_000_000 <= 1 << 25 and rows_per_chunk(10) == 1024  # memory bounded


def test_search_table_json_and_html_on_real_images(indexed: tuple[Path, Path, Path], tmp_path: Path,
                                                   capsys: pytest.CaptureFixture) -> None:
    _, folder, emb = indexed
    query = folder / "airplane" / "003.png"
    html = tmp_path / "gallery.html"
    assert main(["search", "--embeddings", str(emb), str(query), "-k", "4", "--html", str(html)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0] == f"query: {query}"
    first = table[2].split()
    assert first[0] == "1" and float(first[1]) == pytest.approx(1.0, abs=1e-3) and first[-1] == "airplane/003.png"
    assert len(table) == 2 + 4

    assert main(["search", "--embeddings", str(emb), str(folder / "airplane"), "-k", "3", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert len(data["results"]) == len(list((folder / "airplane").rglob("*.png")))
    for result in data["results"]:  # every indexed query finds itself first, scores descending
        assert result["neighbours"][0]["path"] == Path(result["query"]).relative_to(folder).as_posix()
        scores = [n["score"] for n in result["neighbours"]]
        assert scores == sorted(scores, reverse=True) and len(scores) == 3

    page = html.read_text()
    assert page.startswith("<!DOCTYPE html>") and page.count("<img ") == 1 + 4
    assert page.count('src="data:image/png;base64,') == 5
    for link in re.findall(r'(?:src|href)="([^"]*)"', page):
        assert link.startswith("data:") and "http" not in link
    assert "<script" not in page and "<link" not in page and "url(" not in page


def test_find_similar_from_python_gives_what_the_cli_prints(
    indexed: tuple[Path, Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    checkpoint, folder, emb = indexed
    query = folder / "airplane" / "003.png"
    found = find_similar(emb, query, k=4)
    (result,) = found.results
    assert result.query == query and [n.rank for n in result.neighbours] == [1, 2, 3, 4]
    first = result.neighbours[0]
    assert first.path == "airplane/003.png" and first.cls == "airplane" and first.score == pytest.approx(1.0, abs=1e-3)
    assert found.index is None and found.method == "exact"
    assert main(["search", "--embeddings", str(emb), str(query), "-k", "4", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["results"] == [r.as_dict() for r in found.results] and printed["search"] == found.method

    skipped: list[Path] = []
    whole = find_similar(open_embeddings(emb), folder, k=2, checkpoint=checkpoint,
                         on_skip=lambda path, reason: skipped.append(path))
    assert {p.name for p in skipped} == {"truncated.png", "not_an_image.jpg"} and list(whole.skipped) == skipped
    assert len(whole.results) == len(scan_images(folder)[0]) - 2
    listed = find_similar(emb, [query, folder / "gray.png"], k=1)  # a list of files
    assert [r.neighbours[0].path for r in listed.results] == ["airplane/003.png", "gray.png"]
    with pytest.raises(UserError, match="at least 1"):
        find_similar(emb, query, k=0)
    with pytest.raises(UserError, match="none of the 2 query files could be read"):
        find_similar(emb, [folder / "truncated.png", folder / "not_an_image.jpg"], k=1)


def test_not_an_image_query_and_another_checkpoint_exit_2(
    indexed: tuple[Path, Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    checkpoint, folder, emb = indexed
    assert_user_error(run_main(capsys, "search", "--embeddings", str(emb), str(folder / "not_an_image.jpg")),
                      "not_an_image.jpg", "not an image")
    assert_user_error(run_main(capsys, "search", "--embeddings", str(emb), str(tmp_path / "nothing.png")), "not found")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_user_error(run_main(capsys, "search", "--embeddings", str(emb), str(empty)), "no images found")
    other = make_checkpoint(tmp_path / "other.pt", seed=3)
    assert_user_error(
        run_main(capsys, "search", "--embeddings", str(emb), "--checkpoint", str(other), str(folder / "gray.png")),
        "was made with checkpoint", "--fresh",
    )
    assert_user_error(run_main(capsys, "search", "--embeddings", str(tmp_path), str(folder / "gray.png")),
                      "manifest.json")


def test_corrupt_npy_is_an_error_and_stays_untouched(
    indexed: tuple[Path, Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    _, folder, emb = indexed
    broken = tmp_path / "emb"
    shutil.copytree(emb, broken)
    data = (broken / EMBEDDINGS_FILE).read_bytes()
    (broken / EMBEDDINGS_FILE).write_bytes(data[: len(data) // 2])
    assert_user_error(run_main(capsys, "duplicates", "--embeddings", str(broken)), EMBEDDINGS_FILE, "corrupt")
    assert_user_error(run_main(capsys, "search", "--embeddings", str(broken), str(folder / "gray.png")), "corrupt")
    assert (broken / EMBEDDINGS_FILE).read_bytes() == data[: len(data) // 2]
    flipped = bytearray(data)
    flipped[-5] ^= 0xFF  # a changed byte: np.load still works, the hash does not match
    (broken / EMBEDDINGS_FILE).write_bytes(bytes(flipped))
    assert_user_error(run_main(capsys, "duplicates", "--embeddings", str(broken)), "does not match the hash")
    assert (broken / EMBEDDINGS_FILE).read_bytes() == bytes(flipped)


def _rewrite_manifest(root: Path, change) -> None:
    path = root / MANIFEST_FILE
    path.write_text(json.dumps(change(json.loads(path.read_text()))))


def _rewrite_vectors(root: Path, vectors: np.ndarray, count: bool = True) -> None:
    """Another embeddings.npy with its hash (and row count) written into the manifest: a crafted EMB_DIR."""
    np.save(root / EMBEDDINGS_FILE, vectors)

    def change(manifest: dict) -> dict:
        return {**manifest, "embeddings_sha256": vectors_hash(vectors), **({"count": len(vectors)} if count else {})}

    _rewrite_manifest(root, change)


def _without(key: str):
    return lambda manifest: {k: v for k, v in manifest.items() if k != key}


CRAFTED = {  # what is changed in a copy of a good EMB_DIR -> what the one-line error says
    "manifest a list": (lambda root: (root / MANIFEST_FILE).write_text("[1, 2]"), ["manifest.json holds a list"]),
    "no checkpoint_hash": (lambda root: _rewrite_manifest(root, _without("checkpoint_hash")),
                           ["manifest.json has no 'checkpoint_hash'"]),
    "count a string": (lambda root: _rewrite_manifest(root, lambda m: {**m, "count": "46"}),
                       ["'count' is a string, not a whole number"]),
    "source a list": (lambda root: _rewrite_manifest(root, lambda m: {**m, "source": ["folder"]}),
                      ["'source' is a list, not an object"]),
    "skipped entries": (lambda root: _rewrite_manifest(root, lambda m: {**m, "skipped": [1]}), ["'skipped'"]),
    "commit a path": (lambda root: _rewrite_manifest(root, lambda m: {**m, "commit": "../../etc"}),
                      ["'commit' is not 16 hex digits"]),
    "wider vectors": (lambda root: _rewrite_vectors(root, np.zeros((46, 7), np.float32)),
                      ["holds vectors of width 7", "the encoder's features have"]),
    "fewer vectors": (lambda root: _rewrite_vectors(root, np.load(root / EMBEDDINGS_FILE)[:-1]),
                      ["index.csv has 46 rows, embeddings.npy 45 vectors, manifest.json says 45"]),
    "count only": (lambda root: _rewrite_manifest(root, lambda m: {**m, "count": 45}),
                   ["index.csv has 46 rows, embeddings.npy 46 vectors, manifest.json says 45"]),
    "index row gone": (lambda root: (root / INDEX_FILE).write_text(
        "".join((root / INDEX_FILE).read_text().splitlines(keepends=True)[:-1])),
        ["index.csv has 45 rows, embeddings.npy 46 vectors, manifest.json says 46"]),
}


@pytest.mark.parametrize("case", sorted(CRAFTED))
def test_crafted_emb_dir_files_are_one_line_errors_for_search_duplicates_and_embed(
    indexed: tuple[Path, Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture, case: str
) -> None:
    checkpoint, folder, emb = indexed
    crafted = tmp_path / "emb"
    shutil.copytree(emb, crafted)
    craft, needles = CRAFTED[case]
    craft(crafted)
    files = {p.name: p.read_bytes() for p in crafted.iterdir()}
    advice = "re-create it with `nnclr embed --checkpoint"
    for command in (("duplicates", "--embeddings", str(crafted)),
                    ("search", "--embeddings", str(crafted), str(folder / "gray.png")),
                    ("embed", "--checkpoint", str(checkpoint), "--images", str(folder), "--out", str(crafted))):
        assert_user_error(run_main(capsys, *command), str(crafted), *needles, advice, "--fresh")
    assert files == {p.name: p.read_bytes() for p in crafted.iterdir() if p.name != ".lock"}  # left as it was
    fresh = run_main(capsys, "embed", "--checkpoint", str(checkpoint), "--images", str(folder), "--out", str(crafted),
                     "--fresh", "--no-progress")  # the advice works
    assert fresh.returncode == 0 and len(open_embeddings(crafted)) == 46, fresh.stderr


def test_vectors_of_another_width_without_a_recorded_width_are_refused_by_search_and_embed(
    indexed: tuple[Path, Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    checkpoint, folder, emb = indexed
    crafted = tmp_path / "emb"
    shutil.copytree(emb, crafted)
    _rewrite_manifest(crafted, _without("feature_dim"))
    _rewrite_vectors(crafted, F.normalize(torch.randn(46, 7), dim=1).numpy())
    assert_user_error(run_main(capsys, "search", "--embeddings", str(crafted), str(folder / "gray.png")),
                      f"{crafted}/embeddings.npy holds vectors of width 7", "--fresh")
    assert_user_error(run_main(capsys, "embed", "--checkpoint", str(checkpoint), "--images", str(folder),
                               "--out", str(crafted)), "holds vectors of width 7", "--fresh")
    assert run_main(capsys, "duplicates", "--embeddings", str(crafted)).returncode == 0  # needs no encoder


def test_300_character_names_are_one_line_errors_naming_the_flag(
    indexed: tuple[Path, Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    checkpoint, folder, emb = indexed
    long = "x" * 300
    result = run_main(capsys, "embed", "--checkpoint", str(checkpoint), "--images", str(folder),
                      "--out", str(tmp_path / long))
    assert_user_error(result, "--out", "is 300 bytes", "at most 255", "choose a shorter name")
    query = str(folder / "gray.png")
    for command in (("search", "--embeddings", str(emb), query), ("duplicates", "--embeddings", str(emb))):
        result = run_main(capsys, *command, "--html", str(tmp_path / f"{long}.html"))
        assert_user_error(result, "--html", "is 305 bytes", "choose a shorter name")
        result = run_main(capsys, *command, "--html", str(tmp_path / f"{'y' * 250}.html"))  # fits, its temporary not
        assert_user_error(result, "--html", "is 255 bytes", "temporary name", "choose a shorter name")
    result = run_main(capsys, "search", "--embeddings", str(tmp_path / long), query)
    assert_user_error(result, "embedding directory", "File name too long")
    result = run_main(capsys, "search", "--embeddings", str(emb), str(tmp_path / long))
    assert_user_error(result, "query", "File name too long")
    crafted = tmp_path / "crafted"
    shutil.copytree(emb, crafted)
    _rewrite_manifest(crafted, lambda m: {**m, "checkpoint": "/" + "c" * 300})  # the checkpoint search would load
    assert_user_error(run_main(capsys, "search", "--embeddings", str(crafted), query), "is gone; pass --checkpoint")
    shutil.rmtree(crafted)
    result = run_main(capsys, "embed", "--checkpoint", str(checkpoint), "--images", str(tmp_path / long),
                      "--out", str(tmp_path / "emb"))
    assert_user_error(result, "--images", "File name too long")
    assert list(tmp_path.iterdir()) == []  # nothing was written


def test_duplicate_groups_are_connected_components() -> None:
    base = F.normalize(torch.randn(3, 8), dim=1)
    vectors = torch.stack([
        base[0], base[1], F.normalize(base[0] + 0.01 * base[1], dim=0), base[2],
        F.normalize(base[1] + 0.01 * base[2], dim=0),
    ])
    groups = duplicate_groups(vectors, threshold=0.999, chunk=2)
    assert [g.rows for g in groups] == [[0, 2], [1, 4]]
    assert all(0.999 <= g.min_similarity <= g.max_similarity <= 1.0 + 1e-6 for g in groups)
    chain = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.28, 0.96]])  # 0~1 and 1~2 at 0.8 + ..., 0~2 at 0.28
    assert [g.rows for g in duplicate_groups(chain, threshold=0.79)] == [[0, 1, 2]]
    assert duplicate_groups(chain, threshold=0.99) == []


def test_duplicates_cli_finds_the_copied_image(indexed: tuple[Path, Path, Path], tmp_path: Path,
                                               capsys: pytest.CaptureFixture) -> None:
    _, _, emb = indexed
    html = tmp_path / "dups.html"
    assert main(["duplicates", "--embeddings", str(emb), "--threshold", "0.999", "--json", "--html", str(html)]) == 0
    groups = json.loads(capsys.readouterr().out)["groups"]
    paths = [sorted(m["path"] for m in g["members"]) for g in groups]
    assert ["copy_of_40.png", "palette.png"] not in paths  # a palette image is not a pixel copy
    assert any("copy_of_40.png" in p for p in paths)
    assert html.read_text().count("data:image/png;base64,") == sum(len(p) for p in paths)


def _clustered_embeddings(root: Path, n: int = 3000, dim: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """An EMB_DIR of n vectors around 50 centres; returns (vectors, queries near some of them)."""
    generator = torch.Generator().manual_seed(0)
    centres = F.normalize(torch.randn(50, dim, generator=generator), dim=1)
    points = F.normalize(centres.repeat(n // 50, 1) + 0.3 * torch.randn(n, dim, generator=generator), dim=1)
    manifest = {"format_version": 1, "checkpoint_hash": "x", "source": {"kind": "folder", "path": "/nowhere"},
                "skipped": []}
    save_embeddings(root, points.numpy(), [Entry(f"{i}.png") for i in range(n)], manifest)
    return points, F.normalize(points[:100] + 0.05 * torch.randn(100, dim, generator=generator), dim=1)


def test_faiss_index_is_built_once_saved_and_reports_recall(tmp_path: Path) -> None:
    pytest.importorskip("faiss", reason="the faiss extra (pip install 'nnclr[faiss]'; part of the dev extra)")
    _, queries = _clustered_embeddings(tmp_path)
    emb = open_embeddings(tmp_path)
    scores, indices, index = search(emb, queries, 10, approx_threshold=1000)
    assert index is not None and index.built and (tmp_path / FAISS_INDEX_FILE).is_file()
    assert index.nlist > 1 and 1 <= index.nprobe <= index.nlist
    _, exact = exact_search(queries, emb.tensor(), 10)
    measured = recall_at_k(indices.numpy(), exact.numpy())
    assert index.recall >= 0.95 and measured >= 0.9  # nprobe was raised until the sample reached 0.95
    assert (scores[:, :-1] >= scores[:, 1:]).all()
    again = search(emb, queries, 10, approx_threshold=1000)[2]
    assert again is not None and not again.built and again.recall == index.recall
    assert search(emb, queries, 10)[2] is None  # below the default threshold: exact
    assert search(emb, queries, 10, method="exact", approx_threshold=1000)[2] is None
    assert recall_at_k(np.array([[1, 2]]), np.array([[2, 3]])) == 0.5


def test_search_cli_with_the_approximate_index(
    indexed: tuple[Path, Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    pytest.importorskip("faiss", reason="the faiss extra (pip install 'nnclr[faiss]'; part of the dev extra)")
    _, folder, emb = indexed
    copy = tmp_path / "emb"
    shutil.copytree(emb, copy)
    query = folder / "airplane" / "003.png"
    result = run_main(capsys, "search", "--embeddings", str(copy), str(query), "-k", "3", "--json",
                      "--index", "approx")
    assert result.returncode == 0, result.stderr
    assert re.search(r"faiss IVF index \(built and saved, nlist=\d+, nprobe=\d+\): recall@3 [01]\.\d+", result.stderr)
    data = json.loads(result.stdout)
    assert data["search"].startswith("faiss-ivf recall@3=") and (copy / FAISS_INDEX_FILE).is_file()
    assert data["results"][0]["neighbours"][0]["path"] == "airplane/003.png"
    assert "loaded" in run_main(capsys, "search", "--embeddings", str(copy), str(query), "--index", "approx").stderr
