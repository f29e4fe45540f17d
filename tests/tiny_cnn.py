"""The tiny CNN of the tests, in a module of its own: builders pickled into
worker processes (joblib, Dask, DDP) are found there by name, where the name
``conftest`` could mean the repository's root conftest instead."""

from __future__ import annotations

import torch
from torch import nn


class TinyCNN(nn.Module):
    """conv-bn-relu stem, two stages, pooled head: the shape of a real CNN."""

    def __init__(self, num_classes: int = 10, width: int = 8) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
        )
        self.stage1 = nn.Sequential(
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(),
        )
        self.stage2 = nn.Sequential(
            nn.Conv2d(2 * width, 4 * width, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(4 * width),
            nn.ReLU(),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stage2(self.stage1(self.stem(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


def make_tiny_cnn(seed: int = 0) -> TinyCNN:
    """A TinyCNN with fixed random weights (a picklable builder via partial)."""
    torch.manual_seed(seed)
    model = TinyCNN()
    # Non-trivial BatchNorm statistics, as a pretrained network has.
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    return model
