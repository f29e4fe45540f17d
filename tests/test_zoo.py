"""One model of every torchvision family: list_layers, and transform at
layer=None and at a mid-network layer, checked against hooks of our own.

The references come from tools/zoo.py, which runs the same checks, and
fine-tuning, on all 80 models: the mid layer's channel axis is found
independently of the library (the one axis whose length does not change when
the input size does), and features are the hooked output averaged by hand
over every other axis (ViT tokens without their class token).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torchvision
from numpy.testing import assert_allclose

from sklearn_cnn import CNNFeatureTransformer, list_layers


def _load_zoo():
    path = Path(__file__).resolve().parents[1] / "tools" / "zoo.py"
    spec = importlib.util.spec_from_file_location("zoo", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


zoo = _load_zoo()

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# (model, smallest input size it accepts among the sizes we use)
FAMILIES = [
    ("resnet18", 32),
    ("resnext50_32x4d", 32),
    ("wide_resnet50_2", 32),
    ("vgg11", 32),
    ("alexnet", 64),
    ("squeezenet1_1", 32),
    ("densenet121", 32),
    ("inception_v3", 75),
    ("googlenet", 32),
    ("mobilenet_v2", 32),
    ("mobilenet_v3_small", 32),
    ("mnasnet0_5", 32),
    ("shufflenet_v2_x0_5", 32),
    ("efficientnet_b0", 32),
    ("efficientnet_v2_s", 32),
    ("regnet_x_400mf", 32),
    ("convnext_tiny", 32),
    ("vit_b_32", 224),
    ("swin_t", 32),
    ("swin_v2_t", 32),
    ("maxvit_t", 224),
]


@pytest.mark.slow  # integration: real architectures, seconds each
@pytest.mark.parametrize("name, size", FAMILIES, ids=[n for n, _ in FAMILIES])
def test_family(name, size):
    rng = np.random.default_rng(0)
    X = rng.integers(0, 256, (2, size, size, 3), dtype=np.uint8)
    x = zoo.normalized(X)
    model = zoo.build(name)

    # list_layers: every layer's layout is known.
    layers = list_layers(model, image_size=size)
    assert [la.name for la in layers if la.layout is None] == []

    # layer=None: the classifier's input.
    est = CNNFeatureTransformer(model, image_size=size, precision="fp32").fit(X)
    head = est.trace_.head
    out = est.transform(X)
    expected = zoo.expected_penultimate(model, head, x)
    if head is not None:
        assert out.shape == (2, model.get_submodule(head).in_features)
    assert_allclose(out, expected.numpy(), rtol=1e-3, atol=zoo.atol(expected))

    # A mid-network layer, pooled over the axes that scale with the input.
    maps = [la for la in layers if len(la.output_shape) >= 2]
    mid = maps[len(maps) // 2]
    expected = zoo.expected_mid(name, model, mid.name, x, size)
    est = CNNFeatureTransformer(
        model, layer=mid.name, image_size=size, precision="fp32"
    ).fit(X)
    out = est.transform(X)
    assert out.shape == expected.shape, (mid, est.layouts_)
    assert_allclose(out, expected.numpy(), rtol=1e-3, atol=zoo.atol(expected))


def test_family_names_are_torchvision_models():
    available = set(torchvision.models.list_models(module=torchvision.models))
    assert {n for n, _ in FAMILIES} <= available
