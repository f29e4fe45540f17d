"""Shared fixtures: a tiny CNN and small images, so the suite runs in minutes.

What test modules import (builders, helpers) is in ``tiny_cnn``: a module
named ``conftest`` would be the repository's root conftest in a worker
process that unpickles a test's object."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from tiny_cnn import colour_images, make_tiny_cnn


@pytest.fixture
def tiny_builder():
    """A zero-argument callable that builds the same TinyCNN every time."""
    return functools.partial(make_tiny_cnn, 0)


@pytest.fixture
def images():
    """12 uint8 RGB images, 16 x 16."""
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(12, 16, 16, 3), dtype=np.uint8)


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
