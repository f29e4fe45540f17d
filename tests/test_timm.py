"""timm models (the optional extra): ``model="timm/<name>"`` or a timm module,
preprocessing from ``pretrained_cfg``, weights from a local state-dict file.

Nothing is downloaded: weights are random (``weights=None``) or a state dict
that the test saves itself. Features are checked against timm's own API
(``forward_features`` / ``forward_head(pre_logits=True)``) and against tokens
and maps pooled by hand.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from numpy.testing import assert_allclose
from torchvision.transforms import InterpolationMode

from sklearn_cnn import CNNFeatureTransformer, FineTuneClassifier, list_layers

timm = pytest.importorskip("timm")

# Integration: real timm architectures.
pytestmark = [pytest.mark.usefixtures("one_torch_thread"), pytest.mark.slow]

MEAN = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
STD = torch.tensor([0.229, 0.224, 0.225])[:, None, None]


def normalized(images: np.ndarray, mean=MEAN, std=STD) -> torch.Tensor:
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    return ((x - mean) / std).contiguous()


def saved_timm(name: str, path, seed: int = 0, **kwargs):
    """A timm model with seeded random weights, and its state dict on disk."""
    torch.manual_seed(seed)
    model = timm.create_model(name, **kwargs).eval()
    torch.save(model.state_dict(), path)
    return model


def images(size: int, n: int = 2) -> np.ndarray:
    rng = np.random.default_rng(size)
    return rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)


# name, image_size the test runs at (None: the model's own 224)
MODELS = [
    ("resnet18", 64),
    ("convnext_atto", 64),
    ("efficientnet_b0", 64),
    ("vit_tiny_patch16_224", None),
]


@pytest.mark.parametrize("name, size", MODELS, ids=[m for m, _ in MODELS])
def test_penultimate_features_are_timms_pre_logits(name, size, tmp_path):
    model = saved_timm(name, tmp_path / "w.pt")
    X = images(size or 224)
    est = CNNFeatureTransformer(
        f"timm/{name}", weights=tmp_path / "w.pt", image_size=size, precision="fp32"
    ).fit(X)
    with torch.no_grad():
        x = normalized(X, MEAN, STD)
        if size is None:  # default preprocessing of a 224 image: resize, crop
            x = torch.stack(
                [est.preprocessing_(torch.from_numpy(i).permute(2, 0, 1)) for i in X]
            )
        expected = model.forward_head(model.forward_features(x), pre_logits=True)
    out = est.transform(X)
    assert out.shape == (2, model.num_features)
    assert_allclose(out, expected.numpy(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", [m for m, _ in MODELS])
def test_preprocessing_comes_from_pretrained_cfg(name):
    est = CNNFeatureTransformer(f"timm/{name}", weights=None).fit(images(32, 1))
    cfg = est.model_.pretrained_cfg
    pre = est.preprocessing_
    assert pre.crop == tuple(cfg["input_size"][1:])
    assert pre.resize == math.floor(cfg["input_size"][-1] / cfg["crop_pct"])
    assert (
        pre.interpolation
        == InterpolationMode.BICUBIC
        == {"bicubic": InterpolationMode.BICUBIC}.get(cfg["interpolation"])
    )
    assert pre.mean == tuple(cfg["mean"]) and pre.std == tuple(cfg["std"])
    # Given values win.
    est = CNNFeatureTransformer(
        f"timm/{name}", weights=None, image_size=224, mean=(0.5,) * 3, std=(0.5,) * 3
    ).fit(images(32, 1))
    assert est.preprocessing_.resize == (224, 224) and est.preprocessing_.crop is None
    assert est.preprocessing_.mean == (0.5,) * 3


def test_vit_tokens_cls_and_mean_of_patches(tmp_path):
    model = saved_timm("vit_tiny_patch16_224", tmp_path / "w.pt")
    X = images(224)
    seen = []
    model.blocks[5].register_forward_hook(lambda m, a, out: seen.append(out))
    cfg = model.pretrained_cfg  # this ViT is normalized with 0.5, 0.5
    mean, std = (torch.tensor(cfg[k])[:, None, None] for k in ("mean", "std"))
    with torch.no_grad():
        model(normalized(X, mean, std))
    tokens = seen[0].double()  # (N, 1 + 196, 192), class token first
    assert tokens.shape == (2, 197, 192)
    for pooling, expected in [
        ("cls", tokens[:, 0]),
        ("avg", tokens[:, 1:].mean(1)),
        ("max", tokens[:, 1:].amax(1)),
    ]:
        est = CNNFeatureTransformer(
            "timm/vit_tiny_patch16_224", weights=tmp_path / "w.pt", layer="blocks.5",
            pooling=pooling, image_size=224, precision="fp32",
        )  # fmt: skip
        out = est.fit_transform(X)
        assert est.layouts_ == ["NLD"]
        assert_allclose(out, expected.numpy(), rtol=1e-4, atol=1e-4)


def test_timm_module_instance_swin_nhwc():
    """A timm module passed as a module: its pretrained_cfg preprocessing, and
    its (N, H, W, C) Swin stages pooled over H and W."""
    torch.manual_seed(0)
    swin = timm.create_model(
        "swin_tiny_patch4_window7_224", img_size=32, window_size=2, embed_dim=8,
        depths=(1, 1), num_heads=(1, 1), num_classes=3,
    ).eval()  # fmt: skip
    X = images(32)
    layouts = {la.name: la.layout for la in list_layers(swin, image_size=32)}
    assert layouts["layers.0"] == layouts["layers.1"] == layouts["norm"] == "NHWC"
    seen = []
    swin.layers[1].register_forward_hook(lambda m, a, out: seen.append(out))
    with torch.no_grad():
        swin(normalized(X))
    est = CNNFeatureTransformer(swin, layer="layers.1", image_size=32, precision="fp32")
    out = est.fit_transform(X)
    assert out.shape == (2, 16)
    assert_allclose(out, seen[0].double().mean((1, 2)).numpy(), rtol=1e-4, atol=1e-5)
    assert est.preprocessing_.interpolation == InterpolationMode.BICUBIC


def test_convnext_stage_maps_and_layer_names(tmp_path):
    model = saved_timm("convnext_atto", tmp_path / "w.pt")
    names = [la.name for la in list_layers("timm/convnext_atto", image_size=64)]
    assert set(names) <= {n for n, _ in model.named_modules()}
    assert "stages.2" in names and "head.fc" in names
    seen = []
    model.stages[2].register_forward_hook(lambda m, a, out: seen.append(out))
    X = images(64)
    with torch.no_grad():
        model(normalized(X))
    est = CNNFeatureTransformer(
        "timm/convnext_atto", weights=tmp_path / "w.pt", layer="stages.2",
        image_size=64, precision="fp32",
    )  # fmt: skip
    assert_allclose(
        est.fit_transform(X),
        seen[0].double().mean((2, 3)).numpy(),
        rtol=1e-4,
        atol=1e-5,
    )


def test_fine_tune_a_timm_model():
    X = images(32, 12)
    y = np.repeat([0, 1, 2], 4)
    clf = FineTuneClassifier(
        "timm/resnet18", weights=None, image_size=32, epochs=1, batch_size=6,
        validation_fraction=None, random_state=0, precision="fp32",
    ).fit(X, y)  # fmt: skip
    proba = clf.predict_proba(X)
    assert proba.shape == (12, 3)
    assert_allclose(proba.sum(1), 1, rtol=1e-5)


@pytest.mark.parametrize(
    "model, weights, match",
    [
        ("timm/resnet_18", None, r"Unknown timm model 'resnet_18'.*'resnet18'"),
        ("timm/resnet18", "IMAGENET1K_V1", r"weights='IMAGENET1K_V1' for a timm model"),
    ],
)
def test_timm_errors(model, weights, match):
    with pytest.raises(ValueError, match=match):
        CNNFeatureTransformer(model, weights=weights).fit(images(32, 1))


def test_weights_file_that_does_not_fit_a_timm_model(tmp_path):
    saved_timm("resnet18", tmp_path / "w.pt")
    with pytest.raises(ValueError, match="does not fit the model ResNet"):
        CNNFeatureTransformer("timm/resnet34", weights=tmp_path / "w.pt").fit(
            images(32, 1)
        )
