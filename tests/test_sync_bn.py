"""``model.sync_bn``'s conversion: plain batch-norm becomes global batch-norm; a batch-norm that does more is
refused rather than silently replaced (timm's ``BatchNormAct2d`` would lose its activation)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from nnclr.distributed import GlobalBatchNorm, convert_sync_batchnorm
from nnclr.errors import UserError


class BatchNormReLU(nn.BatchNorm2d):
    """Batch-norm fused with its activation, as timm's ``BatchNormAct2d``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(super().forward(x))


def test_plain_batch_norm_becomes_global_and_keeps_its_statistics() -> None:
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)))
    net[1].running_mean.fill_(0.5)
    converted = convert_sync_batchnorm(net, torch.device("cpu"))
    assert isinstance(converted[1], GlobalBatchNorm) and isinstance(converted[2][1], GlobalBatchNorm)
    assert torch.equal(converted[1].running_mean, torch.full((4,), 0.5))


def test_a_batch_norm_that_does_more_is_refused_naming_it() -> None:
    net = nn.Sequential(nn.Conv2d(3, 4, 3), BatchNormReLU(4))
    with pytest.raises(UserError, match="BatchNormReLU.*model.sync_bn=heads"):
        convert_sync_batchnorm(net, torch.device("cpu"))
    assert type(net[1]) is BatchNormReLU  # nothing replaced
