"""Tests of the data layer: the demo set, npz, CIFAR via npz, image folders, and the errors."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from nnclr.data import ImageDataset, load_dataset
from nnclr.data.demo_set import DEMO_DIR, demo_source_indices
from nnclr.data.resize import resize_images
from nnclr.data.sprites import tile, untile
from nnclr.errors import UserError

DEMO_BUDGET = 8_000_000


def _rgb(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def _save(path: Path, image: Image.Image, **kwargs: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **kwargs)
    return path


def _png(path: Path, h: int = 20, w: int = 30, seed: int = 0) -> Path:
    return _save(path, Image.fromarray(_rgb(h, w, seed)))


def _check_images(ds: ImageDataset, n: int, size: int) -> None:
    assert ds.images.shape == (n, 3, size, size)
    assert ds.images.dtype == torch.uint8 and ds.images.is_contiguous()
    assert ds.labels.shape == (n,) and ds.labels.dtype == torch.int64


# ---------------------------------------------------------------------------- demo


@pytest.fixture(scope="module")
def demo() -> dict[str, ImageDataset]:
    return {split: load_dataset("demo", split) for split in ("train", "test")}


def test_demo_shapes_balance_and_items(demo: dict[str, ImageDataset]) -> None:
    for split, per_class in (("train", 350), ("test", 100)):
        ds = demo[split]
        _check_images(ds, 10 * per_class, 32)
        assert ds.name == "demo" and ds.has_labels
        assert len(ds.classes) == 10 and ds.classes[0] == "airplane"
        assert ds.labels.bincount().tolist() == [per_class] * 10
        image, label, index = ds[5]
        assert torch.equal(image, ds.images[5]) and label == int(ds.labels[5]) and index == 5
        assert isinstance(label, int) and isinstance(index, int)
        assert ds[-1][2] == len(ds) - 1


def test_demo_files_within_budget() -> None:
    files = [p for p in DEMO_DIR.iterdir() if p.is_file()]
    assert {"train.webp", "test.webp", "labels.npz", "README.md"} <= {p.name for p in files}
    assert sum(p.stat().st_size for p in files) <= DEMO_BUDGET


def test_demo_bit_identical_to_cifar10(demo: dict[str, ImageDataset], cifar10_dir: Path) -> None:
    for split in ("train", "test"):
        indices = demo_source_indices(split)
        assert np.all(np.diff(indices) > 0)  # sorted by original index, no repeats
        with np.load(cifar10_dir / f"{split}.npz") as data:
            images, labels = data["images"][indices], data["labels"][indices]
        assert np.array_equal(demo[split].images.permute(0, 2, 3, 1).numpy(), images)
        assert np.array_equal(demo[split].labels.numpy(), labels)


def test_demo_image_size_resizes_once() -> None:
    ds = load_dataset("demo", "test", image_size=16)
    _check_images(ds, 1000, 16)


def test_demo_unknown_split() -> None:
    with pytest.raises(UserError, match="unknown split 'val'.*train, test"):
        load_dataset("demo", "val")


# ---------------------------------------------------------------------------- npz and CIFAR


def _write_npz(path: Path, n: int = 6, h: int = 8, w: int = 8, **extra: np.ndarray) -> Path:
    images = np.stack([_rgb(h, w, i) for i in range(n)])
    np.savez(path, images=images, **extra)
    return path


def test_npz_dir_and_file(tmp_path: Path) -> None:
    labels = np.array([0, 1, 0, 1, 1, 0])
    _write_npz(tmp_path / "train.npz", labels=labels, classes=np.array(["a", "b"]))
    _write_npz(tmp_path / "test.npz", n=3)
    ds = load_dataset(f"npz:{tmp_path}", "train")
    _check_images(ds, 6, 8)
    assert ds.labels.tolist() == labels.tolist() and ds.classes == ["a", "b"]
    with np.load(tmp_path / "train.npz") as data:
        assert np.array_equal(ds.images.permute(0, 2, 3, 1).numpy(), data["images"])
    unlabelled = load_dataset(f"npz:{tmp_path}", "test")
    assert unlabelled.labels.tolist() == [-1] * 3 and not unlabelled.has_labels
    single = load_dataset(f"npz:{tmp_path / 'train.npz'}", "test")  # a file serves any split
    assert torch.equal(single.images, ds.images)
    assert load_dataset(f"npz:{tmp_path}", image_size=4).images.shape == (6, 3, 4, 4)


def test_npz_missing_split(tmp_path: Path) -> None:
    _write_npz(tmp_path / "train.npz")
    with pytest.raises(UserError, match=r"no test\.npz.*train"):
        load_dataset(f"npz:{tmp_path}", "test")


@pytest.mark.parametrize(
    ("arrays", "match"),
    [
        ({"pixels": np.zeros((2, 4, 4, 3), np.uint8)}, "no 'images'"),
        ({"images": np.zeros((2, 4, 4, 3), np.float32)}, "'images' is float32"),
        ({"images": np.zeros((2, 3, 4, 4), np.uint8)}, r"'images' is uint8 \[2, 3, 4, 4\]"),
        ({"images": np.zeros((2, 4, 4, 3), np.uint8), "labels": np.zeros(3, np.int64)}, "'labels'"),
        (
            {
                "images": np.zeros((2, 4, 4, 3), np.uint8),
                "labels": np.array([0, 2]),
                "classes": np.array(["a", "b"]),
            },
            "2 classes",
        ),
    ],
)
def test_npz_bad_format(tmp_path: Path, arrays: dict[str, np.ndarray], match: str) -> None:
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(UserError, match=match) as info:
        load_dataset(f"npz:{path}")
    assert str(path) in str(info.value) and "uint8 [N,H,W,3]" in str(info.value)


def test_npz_not_an_archive(tmp_path: Path) -> None:
    path = tmp_path / "junk.npz"
    path.write_bytes(b"not a zip file")
    with pytest.raises(UserError, match="cannot read it"):
        load_dataset(f"npz:{path}")


def test_npz_object_array_refused(tmp_path: Path) -> None:
    path = tmp_path / "pickled.npz"
    np.savez(path, images=np.array([{"a": 1}], dtype=object))
    with pytest.raises(UserError, match=str(path)):
        load_dataset(f"npz:{path}")


def test_npz_missing_path(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=f"'npz:{tmp_path / 'nope'}': no such file"):
        load_dataset(f"npz:{tmp_path / 'nope'}")


def test_cifar10_from_npz_root(cifar10_dir: Path) -> None:
    ds = load_dataset("cifar10", "test", root=str(cifar10_dir), download=False)
    _check_images(ds, 10_000, 32)
    assert ds.name == "cifar10" and len(ds.classes) == 10
    assert ds.labels[:10].tolist() == [3, 8, 8, 0, 6, 6, 1, 6, 3, 1]


def test_cifar10_offline_empty_root(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=f"{tmp_path}.*test.npz.*download=False") as info:
        load_dataset("cifar10", "test", root=str(tmp_path), download=False)
    assert "\n" not in str(info.value)


def test_default_root_respects_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NNCLR_DATA_DIR", str(tmp_path))
    with pytest.raises(UserError, match=str(tmp_path / "stl10")):
        load_dataset("stl10", "unlabeled", download=False)


def test_torchvision_unknown_split() -> None:
    with pytest.raises(UserError, match="unknown split 'unlabeled'.*train, test"):
        load_dataset("cifar100", "unlabeled", download=False)


def test_unknown_source(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="'imagenet'.*demo, cifar10, cifar100, stl10, npz:PATH"):
        load_dataset("imagenet")
    with pytest.raises(UserError, match="did you mean 'folder:"):
        load_dataset(str(tmp_path))
    with pytest.raises(UserError, match="empty path"):
        load_dataset("folder:")


def test_bad_image_size() -> None:
    with pytest.raises(UserError, match="image_size=0"):
        load_dataset("demo", image_size=0)


# ---------------------------------------------------------------------------- folders


def test_folder_with_classes_and_odd_modes(tmp_path: Path) -> None:
    rgb = _rgb(40, 25)
    _save(tmp_path / "cat" / "a.png", Image.fromarray(rgb))  # odd size, portrait
    _save(tmp_path / "cat" / "B.JPG", Image.fromarray(_rgb(17, 50, 1)), quality=90)
    _save(tmp_path / "cat" / "deep" / "c.gif", Image.fromarray(rgb).convert("P"))  # palette
    _save(tmp_path / "dog" / "g.bmp", Image.fromarray(rgb[..., 0]))  # grayscale
    _save(tmp_path / "dog" / "rgba.png", Image.fromarray(np.dstack([rgb, rgb[..., :1]])))
    sixteen = np.full((9, 9), 65535 // 2, dtype=np.uint16)
    _save(tmp_path / "dog" / "s16.png", Image.fromarray(sixteen))  # 16-bit grayscale
    _save(tmp_path / "dog" / "t.TIFF", Image.fromarray(rgb).convert("LA"))
    _save(tmp_path / "emu" / "e.webp", Image.fromarray(rgb), lossless=True)
    (tmp_path / "empty").mkdir()
    (tmp_path / "dog" / "notes.txt").write_text("not an image")
    (tmp_path / "dog" / ".hidden.png").write_bytes(b"macOS resource fork junk")
    ds = load_dataset(f"folder:{tmp_path}", image_size=12)
    _check_images(ds, 8, 12)
    assert ds.classes == ["cat", "dog", "emu"]
    assert ds.labels.tolist() == [0, 0, 0, 1, 1, 1, 1, 2]
    assert ds.name == f"folder:{tmp_path}"
    s16 = ds.images[5]  # dog: g.bmp, rgba.png, s16.png, t.TIFF (sorted)
    assert s16.min() == s16.max() == 127  # 16-bit mid-grey -> 8-bit mid-grey
    again = load_dataset(f"folder:{tmp_path}", image_size=12)
    assert torch.equal(ds.images, again.images) and torch.equal(ds.labels, again.labels)


def test_folder_resize_is_shorter_side_then_center_crop(tmp_path: Path) -> None:
    wide = np.zeros((10, 30, 3), dtype=np.uint8)
    wide[:, 10:20] = 200  # only the centre third is bright
    _save(tmp_path / "wide.png", Image.fromarray(wide))
    ds = load_dataset(f"folder:{tmp_path}", image_size=10)
    assert ds.images.shape == (1, 3, 10, 10)
    assert int(ds.images.min()) == 200  # the crop keeps just the centre square


def test_folder_default_size_is_64(tmp_path: Path) -> None:
    _png(tmp_path / "x.png", 5, 7)
    assert load_dataset(f"folder:{tmp_path}").images.shape == (1, 3, 64, 64)


def test_folder_unlabelled(tmp_path: Path) -> None:
    for value in (20, 0, 10):  # written out of order; loaded sorted by path
        _save(
            tmp_path / f"img{value:02d}.png", Image.fromarray(np.full((5, 5, 3), value, np.uint8))
        )
    ds = load_dataset(f"folder:{tmp_path}", image_size=8)
    _check_images(ds, 3, 8)
    assert ds.labels.tolist() == [-1, -1, -1] and ds.classes == [] and not ds.has_labels
    assert ds.images[:, 0, 0, 0].tolist() == [0, 10, 20]


def test_folder_transparency_composited_on_black(tmp_path: Path) -> None:
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[..., :3] = 250  # hidden colour under alpha 0 must not leak
    _save(tmp_path / "clear.png", Image.fromarray(rgba))
    palette = Image.new("P", (4, 4), 3)
    palette.putpalette([250] * 768)
    _save(tmp_path / "pal.gif", palette, transparency=3)
    ds = load_dataset(f"folder:{tmp_path}", image_size=4)
    assert ds.images.shape == (2, 3, 4, 4) and int(ds.images.max()) == 0


def test_folder_loose_images_next_to_classes_warn(tmp_path: Path) -> None:
    _png(tmp_path / "a" / "1.png")
    _png(tmp_path / "stray.png")
    with pytest.warns(UserWarning, match="ignoring 1 image"):
        ds = load_dataset(f"folder:{tmp_path}", image_size=8)
    assert len(ds) == 1 and ds.classes == ["a"]


def test_folder_train_test_subfolders(tmp_path: Path) -> None:
    for split, n in (("train", 3), ("val", 2)):
        for i in range(n):
            _png(tmp_path / split / ("x" if i % 2 else "y") / f"{i}.png", seed=i)
    train = load_dataset(f"folder:{tmp_path}", "train", image_size=8)
    test = load_dataset(f"folder:{tmp_path}", "test", image_size=8)
    assert len(train) == 3 and len(test) == 2
    assert train.classes == ["x", "y"] and train.labels.tolist() == [0, 1, 1]
    with pytest.raises(UserError, match="unknown split 'unlabeled'"):
        load_dataset(f"folder:{tmp_path}", "unlabeled")


def test_folder_without_test_split(tmp_path: Path) -> None:
    _png(tmp_path / "a.png")
    with pytest.raises(UserError, match=f"{tmp_path}.*no 'test' split"):
        load_dataset(f"folder:{tmp_path}", "test")


def test_folder_missing(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=f"'folder:{tmp_path / 'missing'}': no such directory"):
        load_dataset(f"folder:{tmp_path / 'missing'}")


def test_folder_is_a_file(tmp_path: Path) -> None:
    path = _png(tmp_path / "a.png")
    with pytest.raises(UserError, match=f"'folder:{path}': is a file, not a directory"):
        load_dataset(f"folder:{path}")


def test_folder_without_images(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "readme.txt").write_text("hi")
    with pytest.raises(UserError, match=f"no images found in {tmp_path} "):
        load_dataset(f"folder:{tmp_path}")


@pytest.mark.parametrize("content", [b"definitely not a png", "truncated"])
def test_folder_corrupt_image_is_skipped_and_named(tmp_path: Path, content: bytes | str, capsys) -> None:
    _png(tmp_path / "c" / "good.png")
    bad = tmp_path / "c" / "bad.png"
    if content == "truncated":
        buffer = io.BytesIO()
        Image.fromarray(_rgb(64, 64)).save(buffer, "PNG")
        content = buffer.getvalue()[:200]
    bad.write_bytes(content)
    assert len(load_dataset(f"folder:{tmp_path}", image_size=8)) == 1
    warning = capsys.readouterr().err.strip()
    assert warning.startswith(f"nnclr: warning: {tmp_path}: skipped 1 unreadable file") and f"{bad}: " in warning
    assert "\n" not in warning
    good = tmp_path / "c" / "good.png"
    good.write_bytes(b"")
    with pytest.raises(UserError, match=f"none of the 2 image files in {tmp_path} could be read"):
        load_dataset(f"folder:{tmp_path}", image_size=8)


def test_folder_many_files_threaded_order(tmp_path: Path) -> None:
    for i in range(20):
        arr = np.full((6, 6, 3), i, dtype=np.uint8)
        _save(tmp_path / f"{i:02d}.png", Image.fromarray(arr))
    ds = load_dataset(f"folder:{tmp_path}", image_size=4)
    assert ds.images[:, 0, 0, 0].tolist() == list(range(20))


# ---------------------------------------------------------------------------- building blocks


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 9), h=st.integers(1, 5), w=st.integers(1, 5), columns=st.integers(1, 4))
def test_tile_untile_roundtrip(n: int, h: int, w: int, columns: int) -> None:
    images = np.random.default_rng(n).integers(0, 256, (n, h, w, 3), dtype=np.uint8)
    sheet = tile(images, columns)
    assert sheet.shape == (-(-n // columns) * h, columns * w, 3)
    assert np.array_equal(untile(sheet, n, h, w), images)


def test_resize_images_identity_and_constant() -> None:
    images = torch.randint(0, 256, (3, 3, 8, 8), dtype=torch.uint8)
    assert resize_images(images, 8) is images
    flat = torch.full((2, 3, 8, 12), 77, dtype=torch.uint8)
    out = resize_images(flat, 5)
    assert out.shape == (2, 3, 5, 5) and out.dtype == torch.uint8 and bool((out == 77).all())


def test_image_dataset_defaults() -> None:
    ds = ImageDataset(torch.zeros((2, 3, 4, 4), dtype=torch.uint8))
    assert ds.labels.tolist() == [-1, -1] and ds.classes == [] and not ds.has_labels
    with pytest.raises(IndexError):
        ds[2]
    with pytest.raises(ValueError):
        ImageDataset(torch.zeros((2, 4, 4, 3), dtype=torch.uint8))
