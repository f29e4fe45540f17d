"""What the test modules share besides fixtures: the tiny CNN, a transformer
and labelled images made for it, and a thread helper.

A module of its own, not ``conftest``: worker processes (joblib, Dask, DDP)
that unpickle a test's builder or model import it by name, and there
``conftest`` would be the repository's root conftest."""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from sklearn_cnn import CNNFeatureTransformer


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


def tiny(model: Any = None, **params: Any) -> CNNFeatureTransformer:
    """A CNNFeatureTransformer of ``model`` (default: the seeded TinyCNN) in
    exact float32; ``params`` set or override the others."""
    model = functools.partial(make_tiny_cnn, 0) if model is None else model
    return CNNFeatureTransformer(model, **{"precision": "fp32", **params})


def colour_images(per_class: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """16 x 16 images of 3 classes that a tiny CNN can tell apart (mean colour)."""
    rng = np.random.default_rng(seed)
    y = np.repeat(np.array(["red", "green", "blue"]), per_class)
    X = rng.integers(0, 96, size=(3 * per_class, 16, 16, 3), dtype=np.uint8)
    for channel, name in enumerate(["red", "green", "blue"]):
        X[y == name, :, :, channel] += 150
    return X, y


def in_threads(call: Callable[[int], Any], n: int = 4, repeat: int = 1) -> list[list]:
    """``repeat`` results of ``call(i)`` from each of ``n`` threads released
    together by a barrier (thread i's in item i); raises the first error that
    a thread met."""
    barrier = threading.Barrier(n)
    results: list[list] = [[] for _ in range(n)]
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            barrier.wait()
            results[i] = [call(i) for _ in range(repeat)]
        except BaseException as exc:  # noqa: BLE001 - raised below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results
