"""``nnclr export --checkpoint RUN --format safetensors|torchscript|onnx --out FILE [--with-projector]``."""

from __future__ import annotations

import argparse
from typing import Any

FORMATS = ("safetensors", "torchscript", "onnx")


def add_parser(commands: Any) -> None:
    export = commands.add_parser(
        "export",
        help="export the trained backbone (safetensors with torchvision's or timm's names, TorchScript, ONNX)",
        description="Write the encoder alone, loadable without nnclr. safetensors keys are torchvision's for "
        "ResNet backbones and timm's for timm: backbones; TorchScript and ONNX take normalised images (B, 3, S, S) "
        "and return the features h (B, F). The preprocessing is stored in the file's metadata.",
    )
    export.add_argument("--checkpoint", required=True, metavar="RUN", help="a run directory or checkpoint.pt")
    export.add_argument("--format", required=True, choices=FORMATS, help="file format")
    export.add_argument("--out", required=True, metavar="FILE", help="the file to write")
    export.add_argument(
        "--with-projector", action="store_true",
        help="also export the projection MLP (safetensors: keys projector.*; TorchScript/ONNX: outputs h and z)",
    )


def run(args: argparse.Namespace) -> int:
    import nnclr
    from nnclr.use.export import export, left_out

    pretrained = nnclr.load(args.checkpoint, device="cpu", precision="fp32")
    out = export(pretrained, args.out, args.format, with_projector=args.with_projector)
    parts = "backbone + projector" if args.with_projector else "backbone"
    print(f"wrote {out} ({args.format}, {parts} {pretrained.config.model.backbone}, F={pretrained.feature_dim})")
    if args.format == "safetensors":
        print(f"note: {left_out(pretrained)}")
    return 0
