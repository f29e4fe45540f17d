"""Shared fixtures: a tiny CNN and small images, so the suite runs in minutes."""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from tiny_cnn import TinyCNN, make_tiny_cnn  # noqa: F401 - test modules import them from here

from sklearn_cnn import CNNFeatureTransformer


def tiny(model: Any = None, **params: Any) -> CNNFeatureTransformer:
    """A CNNFeatureTransformer of ``model`` (default: the seeded TinyCNN) in
    exact float32; ``params`` set or override the others."""
    model = functools.partial(make_tiny_cnn, 0) if model is None else model
    return CNNFeatureTransformer(model, **{"precision": "fp32", **params})


@pytest.fixture
def tiny_builder():
    """A zero-argument callable that builds the same TinyCNN every time."""
    return functools.partial(make_tiny_cnn, 0)


@pytest.fixture
def images():
    """12 uint8 RGB images, 16 x 16."""
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(12, 16, 16, 3), dtype=np.uint8)


def colour_images(per_class: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """16 x 16 images of 3 classes that a tiny CNN can tell apart (mean colour)."""
    rng = np.random.default_rng(seed)
    y = np.repeat(np.array(["red", "green", "blue"]), per_class)
    X = rng.integers(0, 96, size=(3 * per_class, 16, 16, 3), dtype=np.uint8)
    for channel, name in enumerate(["red", "green", "blue"]):
        X[y == name, :, :, channel] += 150
    return X, y


@pytest.fixture
def labelled_images():
    """60 images of 3 classes that a tiny CNN can tell apart (mean colour)."""
    return colour_images(20)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Run torch on one thread for a test module (opt in with usefixtures).

    The test networks are tiny: a second intra-op thread does not speed them
    up, and on a busy machine each op then waits for it (measured on a loaded
    2-core machine: 36 ms instead of 11 us per small convolution).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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
