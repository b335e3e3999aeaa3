"""Everything after training on a ``folder:`` source read on demand (:class:`nnclr.data.lazy.FolderImages`).

The folder is made here: 56 demo images (4 classes) upscaled to non-square sizes, as PNG, in
``train/<class>/`` (40) and ``test/<class>/`` (16). The tests show that

* every evaluation protocol gives the same numbers on the lazily read folder as on the same folder
  decoded into memory (same decoding: shorter side scaled, centre crop);
* those evaluations never decode more than one batch at a time (the largest decode is recorded);
* the report encodes at most ``SAMPLE`` images of a split and says so.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from use_helpers import make_checkpoint

import nnclr
from nnclr.data import load_dataset
from nnclr.data.lazy import FolderImages
from nnclr.evaluate import cache, linear, protocols
from nnclr.evaluate.protocols import Evaluation

CLASSES = 4
SIZES = ((48, 40), (40, 56), (64, 36), (33, 47))  # (width, height): none square, none the encoder's size
BATCH = 8  # the batch size of the streaming test: smaller than either split


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("stream") / "pets"
    demo = load_dataset("demo", "train")
    counts = {"train": 10, "test": 4}  # per class
    taken = dict.fromkeys(range(CLASSES), 0)
    for i in range(len(demo)):
        label = int(demo.labels[i])
        if label >= CLASSES or taken[label] >= sum(counts.values()):
            continue
        split = "train" if taken[label] < counts["train"] else "test"
        path = root / split / demo.classes[label] / f"{i:05d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        image = Image.fromarray(demo.images[i].permute(1, 2, 0).numpy())
        image.resize(SIZES[i % len(SIZES)], Image.Resampling.BICUBIC).save(path)
        taken[label] += 1
        if all(v == sum(counts.values()) for v in taken.values()):
            break
    return root


@pytest.fixture
def env(folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict:
    monkeypatch.setenv("NNCLR_CACHE_DIR", str(tmp_path / "cache"))
    checkpoint = make_checkpoint(tmp_path / "run" / "checkpoint.pt", f"data.name=folder:{folder}",
                                 "data.image_size=16")
    return {"data": f"folder:{folder}", "checkpoint": checkpoint, "tmp": tmp_path}


def evaluation(env: dict, name: str, *, in_memory: bool) -> Evaluation:
    """An Evaluation with its own feature cache; ``in_memory``: the splits decoded whole beforehand."""
    pretrained = nnclr.load(env["checkpoint"], device="cpu")
    run_dir = env["tmp"] / name
    run_dir.mkdir()
    result = Evaluation(pretrained=pretrained, data=env["data"], run_dir=run_dir, progress=False)
    for split in ("train", "test"):
        dataset = load_dataset(env["data"], split, image_size=pretrained.image_size, lazy=not in_memory)
        assert dataset.in_memory == in_memory
        result.datasets[(env["data"], split)] = dataset
    return result


def run_all(e: Evaluation) -> dict[str, dict]:
    return {
        "knn": protocols.knn(e, k=5),
        "linear": protocols.linear(e, mode="fast"),
        "paper": protocols.linear(e, mode="paper", epochs=2, batch_size=BATCH, lr=0.1),
        "semi": protocols.semi_supervised(e, fractions=(0.2,), epochs=1, batch_size=BATCH, echo=lambda *a, **k: None),
        "retrieval": protocols.retrieval(e),
    }


def numbers(record: dict) -> dict:
    """What a protocol measured (no times, paths or cache flags)."""
    metrics = {k: v for k, v in record["metrics"].items() if k != "features_cached"}
    if "subsets" in metrics:
        metrics = {name: {k: v for k, v in s.items() if k != "subset_file"} for name, s in metrics["subsets"].items()}
    return {"top1": record["top1"], "top5": record["top5"], "splits": record["splits"], "metrics": metrics}


def test_lazy_folder_evaluates_like_the_folder_in_memory(env: dict) -> None:
    memory, lazy = evaluation(env, "memory", in_memory=True), evaluation(env, "lazy", in_memory=False)
    for split in ("train", "test"):  # the same pixels either way
        a, b = memory.dataset(env["data"], split), lazy.dataset(env["data"], split)
        assert torch.equal(a.images, b.images[:]) and torch.equal(a.labels, b.labels)
        assert torch.equal(memory.features(env["data"], split).features, lazy.features(env["data"], split).features)
    expected, got = run_all(memory), run_all(lazy)
    for name in expected:
        same = json.dumps(numbers(got[name]), sort_keys=True) == json.dumps(numbers(expected[name]), sort_keys=True)
        assert same, (name, numbers(got[name]), numbers(expected[name]))
    assert got["knn"]["splits"] == {"train": 40, "test": 16}
    assert got["semi"]["metrics"]["subsets"]["20pct"]["labelled_images"] == 8
    assert got["paper"]["metrics"]["backbone_bit_identical"] is True


def test_evaluation_never_decodes_more_than_a_batch(env: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    decoded: list[int] = []
    real = FolderImages._decode

    def recording(self: FolderImages, positions: list[int]) -> torch.Tensor:
        decoded.append(len(positions))
        return real(self, positions)

    def no_whole_folder(*args: object, **kwargs: object) -> None:
        raise AssertionError("the folder was decoded into memory")

    monkeypatch.setattr(FolderImages, "_decode", recording)
    monkeypatch.setattr("nnclr.data.registry.load_folder", no_whole_folder)
    monkeypatch.setattr(cache, "BATCH", BATCH)
    monkeypatch.setattr(linear, "EVAL_BATCH", BATCH)
    pretrained = nnclr.load(env["checkpoint"], device="cpu")
    run_dir = env["tmp"] / "streamed"
    e = Evaluation(pretrained=pretrained, data=env["data"], run_dir=run_dir, progress=False)
    records = run_all(e)
    assert all(r["top1"] is not None for r in records.values())
    assert isinstance(e.dataset(env["data"], "train").images, FolderImages)
    # features of 40 + 16 images, 2 epochs of paper linear on 40, 1 of semi on 8 + precise BN, 2 test passes
    assert sum(decoded) >= 40 + 16 + 2 * 40 + 8 + 8 + 2 * 16
    assert max(decoded) <= BATCH, decoded


@pytest.mark.slow
def test_report_samples_the_training_split(env: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    from nnclr.report import visuals
    from nnclr.report.build import write_report

    decoded: dict[str, set[int]] = {"train": set(), "test": set()}
    largest = [0]
    real = FolderImages._decode

    def recording(self: FolderImages, positions: list[int]) -> torch.Tensor:
        decoded[self.index.root.name].update(positions)
        largest[0] = max(largest[0], len(positions))
        return real(self, positions)

    monkeypatch.setattr(FolderImages, "_decode", recording)
    monkeypatch.setattr(visuals, "SAMPLE", 12)
    page = write_report(env["checkpoint"].parent, env["tmp"] / "report.html").read_text()
    assert 0 < len(decoded["train"]) <= 12 and 0 < len(decoded["test"]) <= 12 and largest[0] <= 12
    assert "a seeded sample of 12 of its 40 images" in page and "a seeded sample of 12 of its 16 images" in page
    assert "searched among a seeded sample of 12 of the 40 training images" in page
    # the sample is seeded: the same images in another report
    first = {k: set(v) for k, v in decoded.items()}
    for v in decoded.values():
        v.clear()
    write_report(env["checkpoint"].parent, env["tmp"] / "again.html")
    assert decoded == first
    # without the cap every image is encoded, and nothing speaks of a sample
    monkeypatch.setattr(visuals, "SAMPLE", 5000)
    for v in decoded.values():
        v.clear()
    page = write_report(env["checkpoint"].parent, env["tmp"] / "all.html").read_text()
    assert decoded == {"train": set(range(40)), "test": set(range(16))} and "seeded sample" not in page


def test_folder_images_select_and_prefetch_match_the_tensor(env: dict) -> None:
    from nnclr.data.lazy import batch_slices, prefetched, select

    lazy = load_dataset(env["data"], "train", image_size=16, lazy=True).images
    eager = load_dataset(env["data"], "train", image_size=16).images
    mask = torch.arange(40) % 3 == 0
    picked = torch.tensor([7, 2, 39, 2])
    for key in (mask, picked):
        view = select(lazy, key)
        assert isinstance(view, FolderImages) and len(view) == len(eager[key])
        assert torch.equal(view[:], eager[key]) and torch.equal(view[torch.tensor([1, 0])], eager[key][[1, 0]])
        assert torch.equal(view.rows(1, 3)[:], eager[key][1:3])
    assert torch.equal(lazy[5], eager[5]) and torch.equal(lazy[torch.tensor(5)], eager[5])
    assert torch.equal(lazy[-1], eager[-1])
    with pytest.raises(IndexError):
        lazy[40]
    with pytest.raises(IndexError):
        lazy[torch.tensor([0, 40])]
    keys = [*batch_slices(40, 16), picked]
    assert all(torch.equal(a, eager[k]) for a, k in zip(prefetched(lazy, keys), keys, strict=True))
