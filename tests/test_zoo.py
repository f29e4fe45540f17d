"""One model of every torchvision family: list_layers, and transform at
layer=None and at a mid-network layer, checked against our own hooks.

The mid layer's channel axis is found independently of the library: it is the
one axis whose length does not change when the input size does (the model is
run at a second size; fixed-size ViTs and MaxViT are rebuilt for it). Features
are the hooked output averaged by hand over every other axis (ViT tokens
without their class token). tools/zoo.py runs the same checks, and
fine-tuning, on all 80 models.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torchvision
from numpy.testing import assert_allclose

from sklearn_cnn import CNNFeatureTransformer, list_layers

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
SLOW = {"vit_b_32", "maxvit_t", "wide_resnet50_2", "vgg11"}

MEAN = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
STD = torch.tensor([0.229, 0.224, 0.225])[:, None, None]


def build(name: str, size: int | None = None) -> torch.nn.Module:
    """``name`` with seeded random weights, built for input ``size`` where
    the architecture fixes it."""
    kwargs = {}
    if size is not None and name.startswith("vit_"):
        kwargs["image_size"] = size
    if size is not None and name.startswith("maxvit"):
        kwargs["input_size"] = (size, size)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # inception's init
        model = torchvision.models.get_model(name, weights=None, **kwargs).eval()
    # BatchNorm statistics as trained ones are, not the identity of a fresh
    # init: transform folds BatchNorms into convolutions, and a wrong fold
    # must show.
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.3, 2.0)
                m.weight.uniform_(0.25, 1.75)
                m.bias.uniform_(-0.2, 0.2)
    return model


def hooked(model, name: str, x: torch.Tensor, pre: bool = False) -> torch.Tensor:
    seen = []
    module = model.get_submodule(name)
    handle = (
        module.register_forward_pre_hook(lambda m, a: seen.append(a[0].clone()))
        if pre
        # A copy: an in-place op after the layer (ReLU(inplace=True)) would
        # change the tensor itself.
        else module.register_forward_hook(lambda m, a, out: seen.append(out.clone()))
    )
    with torch.no_grad():
        model(x)
    handle.remove()
    return seen[0].detach().double()


def atol(expected: torch.Tensor) -> float:
    """Random weights without pretrained statistics give activations up to
    1e7 (inception): a tolerance relative to the largest."""
    return 1e-4 * max(1.0, float(expected.abs().max()))


def second_size(name: str, size: int) -> int:
    if name.startswith("vit_"):
        return size + 64  # a multiple of every ViT patch size
    if name.startswith("maxvit"):
        return 2 * size  # windows of 7 at every stage
    return size + 32


@pytest.mark.parametrize(
    "name, size",
    [
        pytest.param(n, s, marks=[pytest.mark.slow] if n in SLOW else [])
        for n, s in FAMILIES
    ],
    ids=[n for n, _ in FAMILIES],
)
def test_family(name, size):
    rng = np.random.default_rng(0)
    X = rng.integers(0, 256, (2, size, size, 3), dtype=np.uint8)
    x = (
        (torch.from_numpy(X).permute(0, 3, 1, 2).float() / 255 - MEAN) / STD
    ).contiguous()
    model = build(name)

    # list_layers: every layer's layout is known.
    layers = list_layers(model, image_size=size)
    assert [la.name for la in layers if la.layout is None] == []

    # layer=None: the classifier's input.
    est = CNNFeatureTransformer(model, image_size=size, precision="fp32").fit(X)
    head = est.trace_.head
    out = est.transform(X)
    if head is None:  # squeezenet: a convolutional classifier, no Linear
        with torch.no_grad():
            expected = model(x).double()
    else:
        expected = hooked(model, head, x, pre=True).flatten(1)
        assert out.shape == (2, model.get_submodule(head).in_features)
    assert_allclose(out, expected.numpy(), rtol=1e-3, atol=atol(expected))

    # A mid-network layer, pooled over the axes that scale with the input.
    maps = [la for la in layers if len(la.output_shape) >= 2]
    mid = maps[len(maps) // 2]
    t = hooked(model, mid.name, x)
    size2 = second_size(name, size)
    other = build(name, size2) if name.startswith(("vit_", "maxvit")) else model
    t2 = hooked(other, mid.name, torch.zeros(1, 3, size2, size2))
    fixed = [i for i in range(1, t.ndim) if t.shape[i] == t2.shape[i]]
    if name.startswith("maxvit") and len(fixed) == 2:
        # (N, windows, tokens per window, C): a window holds 7 x 7 tokens at
        # any input size.
        fixed = [i for i in fixed if t.shape[i] != model.partition_size**2]
    assert len(fixed) == 1, (mid, t.shape, t2.shape)
    axis = fixed[0]
    if name.startswith("vit_") and t.ndim == 3:  # (N, L, D): class token first
        t = t[:, 1:] if axis == 2 else t[:, :, 1:]
    expected = t.mean(tuple(i for i in range(1, t.ndim) if i != axis))
    est = CNNFeatureTransformer(
        model, layer=mid.name, image_size=size, precision="fp32"
    ).fit(X)
    out = est.transform(X)
    assert out.shape == (2, t.shape[axis]), (mid, est.layouts_)
    assert_allclose(out, expected.numpy(), rtol=1e-3, atol=atol(expected))


def test_family_names_are_torchvision_models():
    available = set(torchvision.models.list_models(module=torchvision.models))
    assert {n for n, _ in FAMILIES} <= available
