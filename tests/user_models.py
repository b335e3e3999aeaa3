"""A user's own encoder, as docs/backbones.md writes it: the tests name it ``py:user_models:TinyCNN``."""

from __future__ import annotations

import torch
from torch import nn


class TinyCNN(nn.Module):
    """Two 3x3 convolutions with batch-norm, global average pooling: images (B, 3, S, S) -> features (B, 2 * width)."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(2 * width), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


class SpatialCNN(nn.Module):
    """A mistake: returns feature maps (B, C, H, W), not pooled features."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class WrongWidth(TinyCNN):
    """A mistake: declares num_features = 5 but returns 2 * width features."""

    num_features = 5


def tiny_cnn(width: int = 16) -> nn.Module:
    """A factory function: nnclr refuses to call functions named in a config (only nn.Module classes)."""
    return TinyCNN(width)


class ScalarFromPython(TinyCNN):
    """Reads a value back to Python in forward (``float(tensor)``): torch.export needs its fallback for it, which
    reports on stderr; nnclr export stays quiet."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.features(x)
        return h * (1.0 + 0.0 * float(h.sum()))


class SingularValues(TinyCNN):
    """Features are singular values (torch.linalg.svdvals): (B, 2); ONNX has no such operator."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.linalg.svdvals(self.features(x).unflatten(1, (2, -1)))
