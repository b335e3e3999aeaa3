"""Speed of using a trained encoder (issue 4's targets), on the CPU, with the small backbone.

Measures, with the repeats of all cases interleaved so that load from other processes hits them
alike, and prints min / median / max:

* ``embed memory``: :func:`nnclr.use.embed.embed_tensor` on the demo's 3,500 training images
  (uint8 in memory; preprocessing + encoder). Target: at least 1,000 images/s.
* ``embed folder``: :func:`nnclr.use.embed.embed_folder` (``fresh=True``) on CIFAR-10 demo images
  written as PNG files: listing, decoding on the thread pool, encoder, writing the EMB_DIR.
  Target: at least 300 images/s.
* ``exact search``: :func:`nnclr.use.search.exact_search` of 1,000 queries against 50,000
  L2-normalised vectors of F=256, k=10. Target: under 2 seconds.

and, to explain a miss, the parts: decoding the PNG files alone (the thread pool), the encoder
with its batch-norm layers as trained (not folded into the convolutions), and, with faiss
installed, building the IVF index over the 50,000 vectors and searching it (with its recall).

The checkpoint has random weights (speed does not depend on them). The machine's load average
is printed before and after: on a shared machine, the best of the repeats is the closest to an
idle machine's speed. ``--quick`` runs tiny sizes once (a smoke test of the script).

Usage::

    python bench/bench_use.py [--threads 2] [--repeats 5] [--quick]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import measure  # noqa: E402  (puts this checkout's nnclr on sys.path)

import nnclr  # noqa: E402
from nnclr.checkpoint import save_checkpoint  # noqa: E402
from nnclr.config import load_config, to_dict  # noqa: E402
from nnclr.data import load_dataset  # noqa: E402
from nnclr.model import build_model  # noqa: E402
from nnclr.use import embed as embed_module  # noqa: E402
from nnclr.use.search import exact_search, faiss_available  # noqa: E402

TARGETS = {"embed memory": (">=", 1000.0, "images/s"), "embed folder": (">=", 300.0, "images/s"),
           "exact search": ("<=", 2.0, "s")}


def _checkpoint(root: Path, backbone: str) -> Path:
    config = load_config(None, [f"model.backbone={backbone}", "data.name=demo"])
    model = build_model(config).eval()
    path = root / "checkpoint.pt"
    save_checkpoint({"config": to_dict(config), "model": model.state_dict(), "step": 0}, path)
    return path


def _png_folder(root: Path, images: torch.Tensor) -> Path:
    folder = root / "png"
    folder.mkdir()
    for i, image in enumerate(images):
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(folder / f"{i:05d}.png")
    return folder


def _unfolded(pretrained: nnclr.pretrained.Pretrained, images: torch.Tensor) -> None:
    """The encoder as trained (batch-norm layers kept), same batches and precision as ``embed``."""
    memory_format = torch.channels_last if pretrained.config.train.channels_last else torch.contiguous_format
    with torch.no_grad():
        for start in range(0, images.shape[0], 512):
            x = pretrained.transform(images[start : start + 512]).contiguous(memory_format=memory_format)
            with nnclr.runtime.autocast(pretrained.device, pretrained.dtype):
                pretrained.encoder(x)


def cases(args: argparse.Namespace, root: Path) -> dict[str, tuple[Callable[[], object], float, str]]:
    """name -> (function to time, amount of work, unit): the rate is work / seconds, or seconds for searches."""
    pretrained = nnclr.load(_checkpoint(root, args.backbone))
    demo = load_dataset("demo", "train").images
    memory = demo[: args.memory_images]
    folder = _png_folder(root, demo[: args.folder_images])
    files = sorted(folder.iterdir())
    keys = _clustered(args.keys)
    queries = _clustered(args.keys + args.queries)[args.keys :]  # the same centres, other points
    result: dict[str, tuple[Callable[[], object], float, str]] = {
        "embed memory": (lambda: embed_module.embed_tensor(pretrained, memory), len(memory), "images/s"),
        "embed folder": (lambda: embed_module.embed_folder(pretrained, folder, root / "emb", fresh=True),
                         len(files), "images/s"),
        "exact search": (lambda: exact_search(queries, keys, 10), 0.0, "s"),
        "  decode PNG only": (
            lambda: sum(len(c) for c in embed_module._decoded_chunks(files, pretrained.image_size, 256)),
            len(files), "images/s",
        ),
        "  encoder, batch-norm not folded": (lambda: _unfolded(pretrained, memory), len(memory), "images/s"),
    }
    if faiss_available():
        result.update(_faiss_cases(root, keys, queries))
    return result


def _clustered(n: int, dim: int = 256, clusters: int = 500) -> torch.Tensor:
    """n L2-normalised vectors around ``clusters`` centres (embeddings of real images are clustered)."""
    generator = torch.Generator().manual_seed(0)
    centres = F.normalize(torch.randn(clusters, dim, generator=generator), dim=1)
    which = torch.randint(0, clusters, (n,), generator=generator)
    return F.normalize(centres[which] + 0.06 * torch.randn(n, dim, generator=generator), dim=1)


def _faiss_cases(
    root: Path, keys: torch.Tensor, queries: torch.Tensor
) -> dict[str, tuple[Callable[[], object], float, str]]:
    """Build the IVF index of an EMB_DIR (nprobe tuned to recall 0.95 on a sample) and search it."""
    from nnclr.use.embeddings import Entry, open_embeddings, save_embeddings
    from nnclr.use.search import FAISS_INDEX_FILE, approx_index, recall_at_k

    manifest = {"format_version": 1, "checkpoint_hash": "bench", "source": {"kind": "folder", "path": "-"},
                "skipped": []}
    save_embeddings(root / "faiss", keys.numpy(), [Entry(f"{i}") for i in range(len(keys))], manifest)
    embeddings = open_embeddings(root / "faiss")

    def build() -> object:
        (root / "faiss" / FAISS_INDEX_FILE).unlink(missing_ok=True)
        return approx_index(embeddings, k_recall=10)

    index = build()
    _, exact = exact_search(queries, keys, 10)
    _, approx = index.search(queries, 10)
    print(f"faiss IVF over {len(keys)} vectors: nlist={index.nlist}, nprobe={index.nprobe}, recall@10 on the "
          f"index's sample {index.recall:.3f}, on the queries {recall_at_k(approx.numpy(), exact.numpy()):.3f}")
    return {
        "  faiss IVF build + recall": (build, 0.0, "s"),
        "  faiss IVF search": (lambda: index.search(queries, 10), 0.0, "s"),
    }


def main(argv: list[str] | None = None) -> dict[str, list[float]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--backbone", default="small_cnn")
    parser.add_argument("--memory-images", type=int, default=3500)
    parser.add_argument("--folder-images", type=int, default=2000)
    parser.add_argument("--keys", type=int, default=50_000)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one repeat: a smoke test")
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats, args.memory_images, args.folder_images, args.keys, args.queries = 1, 64, 32, 2000, 50
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        timed = cases(args, Path(tmp))
        load_before = os.getloadavg()[0]
        values, cpu = measure(timed, args.repeats, args.threads, warm_up=not args.quick)
    print(f"torch {torch.__version__}, {args.threads} threads, {args.backbone}, {args.repeats} interleaved repeats; "
          f"load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after "
          f"(cpu: from CPU time / {args.threads}, the best repeat)")
    for name, vs in values.items():
        unit = timed[name][2]
        line = (f"{name:32s} min {min(vs):8.2f}  median {statistics.median(vs):8.2f}  max {max(vs):8.2f}  "
                f"cpu {cpu[name]:8.2f} {unit}")
        if name in TARGETS:
            op, target, _ = TARGETS[name]
            ok = {key: (v >= target if op == ">=" else v <= target) for key, v in
                  (("median", statistics.median(vs)), ("best", max(vs) if op == ">=" else min(vs)), ("cpu", cpu[name]))}
            line += f"  target {op} {target:g}: " + ", ".join(f"{k} {'met' if v else 'MISSED'}" for k, v in ok.items())
        print(line)
    return values


if __name__ == "__main__":
    main()
