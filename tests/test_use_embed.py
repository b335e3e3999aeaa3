"""``nnclr embed`` on a folder of real images (CIFAR-10 demo images written as PNG files).

Also holds the helpers the other ``test_use_*`` modules import: a tiny checkpoint and the folder.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import nnclr
from nnclr.checkpoint import save_checkpoint
from nnclr.cli import main
from nnclr.config import load_config, to_dict
from nnclr.data import load_dataset
from nnclr.data.decode import load_square
from nnclr.errors import UserError
from nnclr.model import build_model
from nnclr.use.embeddings import EMBEDDINGS_FILE, INDEX_FILE, MANIFEST_FILE, embed_folder, open_embeddings

TINY = ["model.proj_hidden_dim=64", "model.proj_dim=32", "model.pred_hidden_dim=64", "data.name=demo"]


def make_checkpoint(path: Path, *overrides: str, seed: int = 0) -> Path:
    """A checkpoint of a small model with random weights and non-trivial batch-norm statistics."""
    config = load_config(None, [*TINY, *overrides])
    torch.manual_seed(seed)
    model = build_model(config)
    with torch.no_grad():  # one train-mode pass: running statistics differ from their init
        model(torch.rand(4, 3, config.data.image_size, config.data.image_size) * 2 - 0.5)
    save_checkpoint({"config": to_dict(config), "model": model.state_dict(), "step": 0}, path)
    return path


def make_image_folder(root: Path, n: int = 40) -> Path:
    """Demo images as PNG files in class folders (one nested), plus odd files a real folder has."""
    demo = load_dataset("demo", "test")
    for i in range(n):
        cls = demo.classes[int(demo.labels[i])]
        folder = root / cls / ("nested" if i % 7 == 0 else "")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(demo.images[i].permute(1, 2, 0).numpy()).save(folder / f"{i:03d}.png")
    rgb = Image.fromarray(demo.images[n].permute(1, 2, 0).numpy())
    rgb.convert("L").save(root / "gray.png")
    rgb.convert("P", palette=Image.Palette.ADAPTIVE).save(root / "palette.png")
    rgb.convert("RGBA").save(root / "rgba.png")
    rgb.resize((75, 50)).save(root / "wide.jpg")  # any size: shorter side scaled, centre square
    rgb.save(root / "copy_of_40.png")
    png = (root / "gray.png").read_bytes()
    (root / "truncated.png").write_bytes(png[: len(png) // 2])
    (root / "not_an_image.jpg").write_text("hello, I am text")
    (root / "notes.txt").write_text("ignored: not an image extension")
    return root


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("run") / "checkpoint.pt")


@pytest.fixture(scope="session")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("images"))


def nnclr_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nnclr", *args], capture_output=True, text=True, timeout=300)


def assert_user_error(result: subprocess.CompletedProcess, *needles: str) -> None:
    """Exit code 2, one line on stderr naming the problem, no traceback."""
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("nnclr: error: "), result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_embed_folder_cli_writes_normalised_vectors_index_and_manifest(
    checkpoint: Path, folder: Path, tmp_path: Path
) -> None:
    out = tmp_path / "emb"
    result = nnclr_cli("embed", "--checkpoint", str(checkpoint), "--images", str(folder), "--out", str(out))
    assert result.returncode == 0, result.stderr
    emb = open_embeddings(out)
    paths = [e.path for e in emb.entries]
    images = [p for p in folder.rglob("*") if p.suffix in (".png", ".jpg")]
    assert len(paths) == len(images) - 2  # every image but the truncated PNG and the text file
    for name in ("gray.png", "palette.png", "rgba.png", "wide.jpg", "airplane/nested/021.png"):
        assert name in paths or any(p.endswith(name.split("/")[-1]) for p in paths)
    assert any("/nested/" in p for p in paths)
    assert emb.vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb.vectors, axis=1), 1.0, atol=1e-5)
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    skipped = {s["path"]: s["reason"] for s in manifest["skipped"]}
    assert set(skipped) == {"truncated.png", "not_an_image.jpg"} and all(skipped.values())
    assert manifest["checkpoint_hash"] == nnclr.load(checkpoint).checkpoint_hash
    assert manifest["preprocessing"]["image_size"] == 32 and manifest["config"]["model"]["backbone"] == "small_cnn"
    assert "2 skipped" in result.stdout and "truncated.png" in result.stderr
    # labels come from the class folders; loose files are unlabelled
    by_path = {e.path: e for e in emb.entries}
    assert by_path["gray.png"].label == -1
    demo = load_dataset("demo", "test")
    first = next(p for p in paths if p.endswith("/000.png"))
    assert by_path[first].cls == demo.classes[int(demo.labels[0])] == first.split("/")[0]


def test_vectors_equal_the_encoder_on_the_decoded_files(checkpoint: Path, folder: Path, tmp_path: Path) -> None:
    pretrained = nnclr.load(checkpoint)
    emb = open_embeddings(embed_folder(pretrained, folder, tmp_path / "emb").out)
    rows = [i for i, e in enumerate(emb.entries) if e.path in ("gray.png", "palette.png", "rgba.png", "wide.jpg")]
    decoded = torch.from_numpy(np.stack([load_square(folder / emb.entries[i].path, 32) for i in rows]))
    expected = pretrained.embed(decoded)
    torch.testing.assert_close(torch.from_numpy(emb.vectors[rows]), expected, atol=1e-5, rtol=0)
    # the same image through the PIL path of .transform gives the same vector (an RGBA image included)
    direct = pretrained.embed([Image.open(folder / emb.entries[i].path) for i in rows])
    torch.testing.assert_close(direct, expected, atol=2e-2, rtol=0)  # PIL vs Pillow-draft decode, bf16


def test_rerun_embeds_only_new_or_changed_files(checkpoint: Path, folder: Path, tmp_path: Path) -> None:
    pretrained = nnclr.load(checkpoint)
    images = tmp_path / "images"
    shutil.copytree(folder, images)
    out = tmp_path / "emb"
    first = embed_folder(pretrained, images, out)
    before = open_embeddings(out)
    again = embed_folder(pretrained, images, out)
    assert (again.embedded, again.reused, again.removed) == (0, first.total, 0)

    (images / "gray.png").unlink()  # removed
    Image.open(images / "rgba.png").rotate(90).save(images / "rgba.png")  # changed
    shutil.copy(images / "palette.png", images / "new.png")  # new
    third = embed_folder(pretrained, images, out)
    after = open_embeddings(out)
    assert (third.embedded, third.removed, third.reused) == (2, 1, first.total - 2)
    assert "gray.png" not in [e.path for e in after.entries] and "new.png" in [e.path for e in after.entries]
    old = {e.path: before.vectors[i] for i, e in enumerate(before.entries)}
    new = {e.path: after.vectors[i] for i, e in enumerate(after.entries)}
    unchanged = [p for p in new if p in old and p != "rgba.png"]
    assert all(np.array_equal(old[p], new[p]) for p in unchanged)
    assert not np.allclose(old["rgba.png"], new["rgba.png"])
    np.testing.assert_allclose(new["new.png"], new["palette.png"], atol=1e-6)


def test_another_checkpoint_is_refused_without_fresh_and_nothing_is_lost(
    checkpoint: Path, folder: Path, tmp_path: Path
) -> None:
    out = tmp_path / "emb"
    embed_folder(nnclr.load(checkpoint), folder, out)
    files = {name: (out / name).read_bytes() for name in (EMBEDDINGS_FILE, INDEX_FILE, MANIFEST_FILE)}
    other = make_checkpoint(tmp_path / "other.pt", seed=1)
    with pytest.raises(UserError, match="--fresh"):
        embed_folder(nnclr.load(other), folder, out)
    assert files == {name: (out / name).read_bytes() for name in files}
    report = embed_folder(nnclr.load(other), folder, out, fresh=True)
    assert report.embedded == report.total and open_embeddings(out).checkpoint_hash == nnclr.load(other).checkpoint_hash


def test_embed_a_data_set_records_index_and_label(checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "emb"
    assert main(["embed", "--checkpoint", str(checkpoint), "--images", "demo", "--split", "test",
                 "--out", str(out), "--no-progress"]) == 0
    emb = open_embeddings(out)
    demo = load_dataset("demo", "test")
    assert len(emb) == len(demo) and emb.entries[5].path == "demo/test/5"
    assert [e.label for e in emb.entries] == demo.labels.tolist()
    expected = nnclr.load(checkpoint).embed(demo.images[:64])
    torch.testing.assert_close(torch.from_numpy(emb.vectors[:64]), expected, atol=1e-5, rtol=0)


def test_bad_input_exits_2_with_one_line(checkpoint: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "sub" / "readme.txt").write_text("no images here")
    out = tmp_path / "emb"
    assert_user_error(
        nnclr_cli("embed", "--checkpoint", str(checkpoint), "--images", str(empty), "--out", str(out)),
        "no images found", str(empty),
    )
    assert not out.exists()


class _RunsCodeWhenUnpickled:
    """Unpickling this calls os.system: what a malicious checkpoint does."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.marker}",))


def test_a_pickle_that_would_run_code_is_refused_without_running_it(folder: Path, tmp_path: Path) -> None:
    marker = tmp_path / "code_ran"
    evil = tmp_path / "evil.pt"
    torch.save({"format_version": 1, "config": {}, "model": _RunsCodeWhenUnpickled(marker)}, evil)
    result = nnclr_cli("embed", "--checkpoint", str(evil), "--images", str(folder), "--out", str(tmp_path / "e"))
    assert_user_error(result, "refused", "weights_only=True")
    assert not marker.exists()
    with pytest.raises(UserError, match="refused"):
        nnclr.load(evil)
    assert not marker.exists()
