"""The network inference runs (``_inference``): BatchNorms folded into their
convolutions and weights stored in the autocast dtype, on a private copy that
gives the fitted network's numbers, for every layer, and follows every change
made to the fitted network."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from numpy.testing import assert_allclose
from tiny_cnn import make_tiny_cnn
from torch import nn

from sklearn_cnn import CNNFeatureTransformer
from sklearn_cnn._inference import foldable_pairs
from sklearn_cnn._layers import Tap

pytestmark = pytest.mark.usefixtures("one_torch_thread")

MEAN = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
STD = torch.tensor([0.229, 0.224, 0.225])[:, None, None]


def pretrained_like(model: nn.Module, seed: int = 0) -> nn.Module:
    """``model`` with BatchNorm statistics and affine weights far from the
    identity, as trained ones are: a wrong fold cannot hide."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.rand(n, generator=g) * 0.4 - 0.2)
                m.running_var.copy_(torch.rand(n, generator=g) * 2 + 0.3)
                m.weight.copy_(torch.rand(n, generator=g) * 1.5 + 0.25)
                m.bias.copy_(torch.rand(n, generator=g) * 0.4 - 0.2)
    return model.eval()


def normalized(X: np.ndarray) -> torch.Tensor:
    return (torch.from_numpy(X).permute(0, 3, 1, 2).float() / 255 - MEAN) / STD


def hooked_mean(model: nn.Module, name: str, x: torch.Tensor, **autocast) -> np.ndarray:
    """The output of layer ``name`` of ``model``, averaged over space, by hand."""
    seen = []
    handle = model.get_submodule(name).register_forward_hook(
        lambda m, a, out: seen.append(out.detach().float().clone())
    )
    with torch.no_grad(), torch.autocast("cpu", enabled=bool(autocast), **autocast):
        model(x)
    handle.remove()
    return seen[0].mean((2, 3)).double().numpy()


def transformer(model: nn.Module, size: int, **params) -> CNNFeatureTransformer:
    params = {"image_size": size, "precision": "fp32", **params}
    return CNNFeatureTransformer(model, **params)


# Families with conv -> BatchNorm pairs, each with a mid layer and one of its
# convolutions whose BatchNorm gets folded (a tap of its output must read the
# convolution alone).
FAMILIES = [
    ("resnet18", "layer2", "layer2.0.conv1"),
    ("mobilenet_v3_small", "features.3", "features.3.block.0.0"),
    ("efficientnet_b0", "features.4", "features.4.0.block.1.0"),
    ("regnet_x_400mf", "trunk_output.block2", "stem.0"),
    ("densenet121", "features.denseblock1", "features.conv0"),
]


@pytest.mark.parametrize(
    "name, layer, conv",
    # resnet18 in the quick loop, the other families with the slow tests.
    [
        f if f[0] == "resnet18" else pytest.param(*f, marks=pytest.mark.slow)
        for f in FAMILIES
    ],
    ids=[f[0] for f in FAMILIES],
)
def test_folded_features_are_the_fitted_networks(name, layer, conv):
    torch.manual_seed(0)
    model = pretrained_like(torchvision.models.get_model(name, weights=None))
    X = np.random.default_rng(0).integers(0, 256, (3, 48, 48, 3), dtype=np.uint8)
    x = normalized(X)
    est = transformer(model, 48, layer=[layer, conv]).fit(X)
    out = est.transform(X)
    copy = est._network.inference_copy(X)
    assert conv in {c for c, _ in copy.pairs}  # the fold this test is about
    mid, raw = hooked_mean(model, layer, x), hooked_mean(model, conv, x)
    # float32 rounding, folded or not, relative to each layer's largest value
    assert_allclose(
        out[:, : mid.shape[1]], mid, rtol=1e-4, atol=1e-4 * np.abs(mid).max()
    )
    assert_allclose(
        out[:, mid.shape[1] :], raw, rtol=1e-4, atol=1e-4 * np.abs(raw).max()
    )


def test_bf16_folded_features_are_close_to_autocast_by_hand():
    torch.manual_seed(0)
    model = pretrained_like(torchvision.models.resnet18())
    X = np.random.default_rng(1).integers(0, 256, (4, 64, 64, 3), dtype=np.uint8)
    est = transformer(model, 64, layer="layer3", precision="bf16").fit(X)
    out = est.transform(X)
    expected = hooked_mean(model, "layer3", normalized(X), dtype=torch.bfloat16)
    cos = (out * expected).sum(1) / np.linalg.norm(out, axis=1)
    assert (cos / np.linalg.norm(expected, axis=1)).min() > 0.999
    assert len(est._network.inference_copy(X).pairs) == 20  # every pair of resnet18


class NoBatchNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(F.relu(self.conv(x)).mean((2, 3)))


class ConvBnLinear(NoBatchNorm):
    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x):
        return self.fc(F.relu(self.bn(self.conv(x))).mean((2, 3)))


@pytest.mark.parametrize(
    "precision, dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)]
)
def test_weights_stored_in_the_autocast_dtype_give_autocasts_numbers(precision, dtype):
    torch.manual_seed(0)
    model = pretrained_like(ConvBnLinear())
    X = np.random.default_rng(2).integers(0, 256, (5, 20, 20, 3), dtype=np.uint8)
    est = transformer(model, 20, layer="fc", precision=precision).fit(X)
    out = est.transform(X)
    copy = est._network.inference_copy(X).module
    assert copy.conv.weight.dtype == dtype and copy.fc.weight.dtype == dtype
    assert est.model_.conv.weight.dtype == torch.float32  # the fitted one unchanged
    # By hand: torch's own fold, then autocast (which casts the weights).
    by_hand = ConvBnLinear().eval()
    by_hand.load_state_dict(model.state_dict())
    by_hand.conv = torch.nn.utils.fusion.fuse_conv_bn_eval(by_hand.conv, by_hand.bn)
    by_hand.bn = nn.Identity()
    by_hand.to(memory_format=torch.channels_last)
    x = normalized(X).contiguous(memory_format=torch.channels_last)
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype):
        expected = by_hand(x).float().numpy()
    assert_allclose(out, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_nothing_to_fold_keeps_no_copy(images, precision):
    model = NoBatchNorm().eval()
    est = transformer(model, 16, layer="fc", precision=precision).fit(images)
    out = est.transform(images)
    assert est._network.inference_copy(images).module is None
    dtype = torch.bfloat16 if precision == "bf16" else None
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype, enabled=bool(dtype)):
        expected = model(normalized(images)).float().numpy()
    assert_allclose(out, expected, rtol=1e-5, atol=1e-6)


def conv_bn_relu_pool(conv: nn.Conv2d) -> nn.Sequential:
    """``conv`` -> BatchNorm -> ReLU -> average pooling."""
    bn = nn.BatchNorm2d(conv.out_channels)
    pool = [nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    return pretrained_like(nn.Sequential(conv, bn, *pool))


class StdConv2d(nn.Conv2d):
    """Weight standardization (as timm's ResNetV2 has): a BatchNorm's scale
    folded into these weights would be standardized away."""

    def forward(self, x):
        w = self.weight
        w = (w - w.mean((1, 2, 3), keepdim=True)) / (
            w.std((1, 2, 3), keepdim=True) + 1e-5
        )
        return F.conv2d(x, w, self.bias, self.stride, self.padding)


def test_a_fold_that_changes_the_output_is_undone(images):
    torch.manual_seed(0)
    model = conv_bn_relu_pool(StdConv2d(3, 8, 3))
    x = torch.randn(1, 3, 16, 16)
    assert foldable_pairs(model, x) == [("0", "1")]  # the dataflow alone would
    est = transformer(model, 16, layer="2").fit(images)
    out = est.transform(images)
    assert est._network.inference_copy(images).pairs == []
    assert_allclose(
        out, hooked_mean(model, "2", normalized(images)), rtol=1e-5, atol=1e-6
    )


class SharedOutput(nn.Module):
    """conv -> bn, where the conv's output is also added back: not foldable."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.conv2 = nn.Conv2d(3, 4, 1)
        self.bn2 = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        return self.bn2(self.conv2(self.bn(y) + y))


def test_only_pairs_where_the_batchnorm_alone_reads_the_convolution():
    x = torch.randn(1, 3, 8, 8)
    assert foldable_pairs(SharedOutput().eval(), x) == [("conv2", "bn2")]
    hooked = SharedOutput().eval()
    hooked.conv2.register_forward_hook(lambda m, a, out: None)
    assert foldable_pairs(hooked, x) == []  # a hook of the user's sees the raw output

    class Twice(SharedOutput):
        def forward(self, x):
            return self.bn2(self.conv2(self.bn(self.conv(self.bn(self.conv(x))))))

    assert foldable_pairs(Twice().eval(), x) == [("conv2", "bn2")]  # ran twice

    class Broken(SharedOutput):
        def forward(self, x):
            raise ValueError

    assert foldable_pairs(Broken().eval(), x) == []


def test_batchnorm_input_tap_reads_the_convolution_output(images):
    est = transformer(functools.partial(make_tiny_cnn, 0), 16, layer="stem").fit(images)
    copy = est._network.inference_copy(images)
    assert ("stem.0", "stem.1") in copy.pairs
    assert copy.taps_for([Tap("stem.1", pre=True), Tap("stem.1"), Tap("stem.0")]) == [
        Tap("stem.0"), Tap("stem.1"), Tap("stem.0")
    ]  # fmt: skip


def test_changes_to_the_fitted_network_are_followed(images):
    est = transformer(functools.partial(make_tiny_cnn, 0), 16, layer="stage2").fit(
        images
    )
    x = normalized(images)
    est.transform(images)  # the copy is made

    with torch.no_grad():  # weights written in place
        est.model_.stage1[0].weight.mul_(-2)
        est.model_.stage2[1].running_var.mul_(3)
    expected = hooked_mean(est.model_, "stage2", x)
    assert_allclose(est.transform(images), expected, rtol=1e-4, atol=1e-5)

    est.model_.stage1[1] = nn.Identity()  # a module replaced
    expected = hooked_mean(est.model_, "stage2", x)
    assert_allclose(est.transform(images), expected, rtol=1e-4, atol=1e-5)

    seen = []  # a hook registered since: it sees each batch, once
    est.model_.stage2.register_forward_hook(lambda m, a, out: seen.append(len(out)))
    est.set_params(batch_size=5).transform(images)
    assert seen == [5, 5, 2]


class PaddedConv(nn.Conv2d):
    """A convolution with its padding as a submodule (EfficientNet-Lite's
    "same" padding): the layers inside a folded convolution can be tapped."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.pad = nn.ZeroPad2d(1)

    def forward(self, x):
        return F.conv2d(self.pad(x), self.weight, self.bias, self.stride)


def test_layers_inside_a_folded_convolution_can_be_tapped(images, tmp_path):
    torch.manual_seed(0)
    model = conv_bn_relu_pool(PaddedConv(3, 6, 3))
    est = transformer(model, 16, layer=["0.pad", "0", "1", "2"], layout="NCHW")
    est.fit(images)
    out = est.transform(images)
    assert est._network.inference_copy(images).pairs == [("0", "1")]
    x = normalized(images)
    for i, name in enumerate(["0.pad", "0", "1", "2"]):
        expected = hooked_mean(model, name, x)
        got = out[:, sum(w for w in (3, 6, 6, 6)[:i]) :][:, : expected.shape[1]]
        assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
    # Through the cache of memory= (its pass stores every layer): the same.
    cached = est.set_params(memory=str(tmp_path)).fit(images)
    assert_allclose(cached.transform(images), out, rtol=1e-6, atol=1e-7)
