"""The fast paths of inference give the same results as the plain ones:
preprocessing (no resize at the target size, one fused normalization),
``compile`` (and its fallback), and ``num_workers="auto"``."""

from __future__ import annotations

import functools
import pickle
import warnings

import numpy as np
import pytest
import torch
from numpy.testing import assert_allclose, assert_array_equal
from PIL import Image
from sklearn.utils._param_validation import InvalidParameterError
from tiny_cnn import make_tiny_cnn, tiny

import sklearn_cnn._runtime as runtime
from sklearn_cnn import CNNFeatureTransformer, FineTuneClassifier
from sklearn_cnn._images import ImageDataset, Preprocessing, array_to_tensor

pytestmark = pytest.mark.usefixtures("one_torch_thread")

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
X = np.random.default_rng(3).integers(0, 256, (20, 16, 16, 3), dtype=np.uint8)


tiny = functools.partial(tiny, device="cpu", batch_size=8)


def by_hand(images: np.ndarray, layer: str | None = None) -> np.ndarray:
    """TinyCNN features written out in plain torch: the independent reference."""
    model = make_tiny_cnn(0).eval()
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    x = (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    with torch.no_grad():
        h = model.stem(x)
        if layer == "stem":
            return h.mean((2, 3)).numpy()
        h = model.stage2(model.stage1(h))
        return torch.flatten(model.pool(h), 1).numpy()


@pytest.fixture
def eager_compile(monkeypatch):
    """torch.compile with its eager backend: the machinery, in milliseconds."""
    monkeypatch.setattr(runtime, "COMPILE_KWARGS", {"backend": "eager"})


# ---------------------------------------------------------------------------
# Preprocessing
# ---------------------------------------------------------------------------


def textbook(image: torch.Tensor) -> torch.Tensor:
    x = image.float() / 255.0 if image.dtype == torch.uint8 else image.float()
    mean, std = torch.tensor(MEAN).view(3, 1, 1), torch.tensor(STD).view(3, 1, 1)
    return (x - mean) / std


BATCH = array_to_tensor(X, batched=True)  # N x 3 x H x W, channels_last strides
LAYOUTS = {
    "array batch (channels_last)": BATCH,
    "contiguous batch": BATCH.contiguous(),
    "one image": BATCH[0],
    "strided view": BATCH[:, :, ::2, 1::3],
    "float in [0, 1]": BATCH.float() / 255.0,
    "grey, expanded": torch.from_numpy(X[0, :, :, 0]).expand(3, 16, 16),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_normalize_is_the_textbook_formula(layout):
    image = LAYOUTS[layout]
    before = image.clone()
    pre = Preprocessing(resize=None, crop=None, mean=MEAN, std=STD)
    out = pre(image)
    assert out.dtype == torch.float32
    assert_allclose(out.numpy(), textbook(image).numpy(), rtol=1e-6, atol=1e-6)
    assert torch.equal(image, before)  # the input is never written to


def test_normalize_keeps_the_array_layout():
    pre = Preprocessing(resize=None, crop=None, mean=MEAN, std=STD)
    assert pre(BATCH).is_contiguous(memory_format=torch.channels_last)
    assert pre(BATCH.contiguous()).is_contiguous()


def test_normalize_never_shares_memory_with_a_float_input():
    image = torch.rand(2, 3, 8, 8)
    out = Preprocessing(resize=None, crop=None, mean=MEAN, std=STD)(image)
    assert out.data_ptr() != image.data_ptr()


@pytest.mark.parametrize(
    ("resize", "crop"), [((16, 16), None), (16, (16, 16)), (None, (16, 16))]
)
def test_no_resize_or_crop_at_the_target_size(resize, crop):
    pre = Preprocessing(resize=resize, crop=crop, mean=MEAN, std=STD)
    one = BATCH[0]
    assert pre.geometry(BATCH) is BATCH  # nothing computed, nothing copied
    assert pre.geometry(one) is one


def test_resize_still_happens_at_another_size():
    pre = Preprocessing(resize=(8, 8), crop=None, mean=MEAN, std=STD)
    assert tuple(pre(BATCH).shape) == (20, 3, 8, 8)


def test_batch_of_an_array_equals_image_by_image():
    pre = Preprocessing(resize=12, crop=(10, 10), mean=MEAN, std=STD)
    batch = ImageDataset(X, pre).__getitems__(list(range(5)))
    single = torch.stack([pre(array_to_tensor(im, batched=False)) for im in X[:5]])
    assert_allclose(batch.numpy(), single.numpy(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("layer", [None, "stem"])
def test_features_at_the_target_size_match_plain_torch(layer):
    est = tiny(image_size=16, mean=MEAN, std=STD, layer=layer).fit(X)
    assert_allclose(est.transform(X), by_hand(X, layer), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------
# compile
# ---------------------------------------------------------------------------


@pytest.mark.slow
def test_compile_matches_uncompiled_with_inductor(capsys):
    """The real thing, once: inductor with frozen weights, on the CPU;
    ``verbose`` reports the compile time."""
    expected = tiny().fit(X).transform(X)
    est = tiny(compile=True, verbose=1).fit(X)
    assert_allclose(est.transform(X), expected, rtol=1e-4, atol=1e-5)
    assert est._network.compiled.compile_seconds is not None
    assert not est._network.compiled.failed
    assert "compiled the network in" in capsys.readouterr().err


@pytest.mark.slow  # torch.compile traces the network
@pytest.mark.parametrize("layer", [None, "stem", ["stem", "stage2"]])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_compile_gives_the_same_features(layer, precision, eager_compile):
    # 20 images in batches of 8: the last, smaller batch runs uncompiled.
    expected = tiny(layer=layer, precision=precision).fit(X).transform(X)
    est = tiny(layer=layer, precision=precision, compile=True).fit(X)
    assert_allclose(est.transform(X), expected, rtol=1e-5, atol=1e-6)
    assert est._network.compiled.shape == (8, 3, 16, 16)


@pytest.mark.slow  # torch.compile traces the network
def test_compile_stops_early_at_the_tapped_layer(eager_compile):
    # A tap on the stem: the compiled forward never runs the later stages.
    est = tiny(layer="stem", compile=True).fit(X)
    ran = []
    est.transform(X)
    copy = est._network.compiled._tapper.module
    copy.stage2.register_forward_hook(lambda *_: ran.append(True))
    est.transform(X)
    assert ran == []


@pytest.mark.slow  # torch.compile traces the network
def test_compiled_network_is_reused_then_refreshed(eager_compile):
    est = tiny(compile=True).fit(X)
    first = est.transform(X)
    compiled = est._network.compiled
    assert_array_equal(est.transform(X), first)
    assert est._network.compiled is compiled  # compiled once, reused
    with torch.no_grad():  # the fitted weights change (as training does)
        est.model_.fc.weight.mul_(2.0)
        est.model_.stage2[0].weight.mul_(0.5)
    changed = est.transform(X)
    assert est._network.compiled is not compiled
    assert np.abs(changed - first).max() > 1e-3
    uncompiled = est.set_params(compile=False).transform(X)
    assert_allclose(changed, uncompiled, rtol=1e-5, atol=1e-6)


@pytest.mark.slow  # torch.compile traces the network
def test_refit_never_reuses_the_old_compiled_network(eager_compile):
    est = tiny(compile=True).fit(X)
    first = est.transform(X)
    for seed in (1, 2, 3):  # new networks, whatever ids they get
        est.set_params(model=functools.partial(make_tiny_cnn, seed)).fit(X)
        expected = tiny(model=functools.partial(make_tiny_cnn, seed)).fit(X)
        out = est.transform(X)
        assert np.abs(out - first).max() > 1e-3
        assert_allclose(out, expected.transform(X), rtol=1e-5, atol=1e-6)


@pytest.mark.slow  # torch.compile traces the network
def test_compile_leaves_the_fitted_network_without_hooks(eager_compile):
    est = tiny(compile=True).fit(X)
    est.transform(X)
    for m in est.model_.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks


def test_model_that_does_not_compile_warns_and_falls_back(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("this model does not compile")

    monkeypatch.setattr(torch, "compile", broken)
    expected = tiny().fit(X).transform(X)
    est = tiny(compile=True).fit(X)
    with pytest.warns(RuntimeWarning, match="compile.*does not compile"):
        out = est.transform(X)
    assert_array_equal(out, expected)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once, not at every call
        assert_array_equal(est.transform(X), expected)


@pytest.mark.slow
def test_failure_at_the_first_compiled_call_falls_back(monkeypatch):
    def backend(gm, example_inputs):
        raise RuntimeError("backend exploded")

    monkeypatch.setattr(runtime, "COMPILE_KWARGS", {"backend": backend})
    expected = tiny().fit(X).transform(X)
    est = tiny(compile=True).fit(X)
    with pytest.warns(RuntimeWarning, match="running it uncompiled"):
        out = est.transform(X)
    assert_array_equal(out, expected)
    assert est._network.compiled.failed


@pytest.mark.slow  # torch.compile traces the network
def test_auto_compiles_only_when_it_pays(monkeypatch, eager_compile):
    expected = tiny().fit(X).transform(X)
    est = tiny(compile="auto").fit(X)
    assert_array_equal(est.transform(X), expected)  # 20 images: never pays
    assert est._network.compiled is None
    monkeypatch.setattr(runtime, "AUTO_COMPILE_AFTER_S", 0.0)
    assert_allclose(est.transform(X), expected, rtol=1e-5, atol=1e-6)
    compiled = est._network.compiled
    assert compiled is not None and compiled.shape == (8, 3, 16, 16)


def test_auto_compile_rule():
    assert not runtime.auto_compile_pays(1.0, 0, 10**9)  # nothing measured yet
    assert runtime.auto_compile_pays(1.0, 10, 10_000)  # 0.1 s an image, 1000 s left
    assert not runtime.auto_compile_pays(1.0, 10, 100)  # 10 s left


@pytest.mark.slow  # torch.compile traces the network
def test_compiled_estimator_pickles(eager_compile):
    est = tiny(compile=True).fit(X)
    expected = est.transform(X)
    loaded = pickle.loads(pickle.dumps(est))
    assert loaded._network.compiled is None
    assert_allclose(loaded.transform(X), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.slow  # torch.compile traces the network
def test_finetune_predict_with_compile(eager_compile, labelled_images):
    Xl, y = labelled_images
    params = dict(
        model=functools.partial(make_tiny_cnn, 0),
        weights=None,
        epochs=1,
        batch_size=8,
        precision="fp32",
        device="cpu",
        validation_fraction=None,
        random_state=0,
    )
    plain = FineTuneClassifier(**params).fit(Xl, y)
    compiled = FineTuneClassifier(compile=True, **params).fit(Xl, y)
    assert_allclose(
        compiled.predict_proba(Xl), plain.predict_proba(Xl), rtol=1e-4, atol=1e-6
    )


@pytest.mark.parametrize("value", ["yes", 2, None])
def test_compile_is_validated(value):
    with pytest.raises(InvalidParameterError, match="compile"):
        tiny(compile=value).fit(X)


# ---------------------------------------------------------------------------
# num_workers="auto"
# ---------------------------------------------------------------------------


@pytest.fixture
def paths(tmp_path):
    out = []
    for i, image in enumerate(X):
        out.append(str(tmp_path / f"{i}.png"))
        Image.fromarray(image).save(out[-1])
    return out


def test_auto_workers_count(paths, monkeypatch):
    monkeypatch.setattr(runtime, "available_cpus", lambda: 4)
    pre = Preprocessing(resize=None, crop=None, mean=MEAN, std=STD)
    resolve = runtime.resolve_num_workers
    assert resolve("auto", ImageDataset(X, pre), 2) == 0  # arrays: no decoding
    assert resolve("auto", ImageDataset(paths, pre), 8) == 0  # 3 batches: too few
    assert resolve("auto", ImageDataset(paths, pre), 1) == 2  # CPUs - 2
    assert resolve("auto", ImageDataset(paths, pre), 4) == 1  # 5 batches
    subset = torch.utils.data.Subset(ImageDataset(paths, pre), list(range(20)))
    assert resolve("auto", subset, 1) == 2
    assert resolve(2, ImageDataset(X, pre), 1) == 2
    for cpus in (1, 2):  # a worker would take a core from the network
        monkeypatch.setattr(runtime, "available_cpus", lambda cpus=cpus: cpus)
        assert resolve("auto", ImageDataset(paths, pre), 1) == 0


def test_auto_workers_give_the_same_features(paths, monkeypatch):
    monkeypatch.setattr(runtime, "available_cpus", lambda: 3)
    est = tiny(batch_size=2).fit(paths)
    expected = est.transform(paths)
    assert_array_equal(est.set_params(num_workers="auto").transform(paths), expected)
    assert_array_equal(est.transform(X), expected)


def test_num_workers_is_validated():
    with pytest.raises(InvalidParameterError, match="num_workers"):
        tiny(num_workers="many").fit(X)


def _doubled_stem() -> torch.nn.Module:
    model = make_tiny_cnn(0)
    model.stem.register_forward_hook(lambda _m, _a, out: out * 2.0)
    return model


@pytest.mark.slow  # torch.compile traces the network
def test_compile_keeps_the_networks_own_hooks(eager_compile):
    params = dict(model=_doubled_stem, weights=None, precision="fp32", batch_size=8)
    expected = CNNFeatureTransformer(**params).fit(X).transform(X)
    assert np.abs(expected - tiny().fit(X).transform(X)).max() > 1e-3  # the hook acts
    compiled = CNNFeatureTransformer(compile=True, **params).fit(X)
    assert_allclose(compiled.transform(X), expected, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------
# batch_size="auto"
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "shape, expected",
    [((3, 224, 224), 8), ((3, 160, 160), 16), ((3, 96, 96), 32), ((3, 48, 48), 128),
     ((3, 16, 16), 128), ((3, 1024, 1024), 8), ((3, 224, 448), 8)],
)  # fmt: skip
def test_auto_batch_size_on_a_cpu_is_about_400k_pixels(shape, expected):
    assert runtime.auto_batch_size(torch.device("cpu"), shape) == expected


def test_auto_batch_size_on_a_gpu_is_larger():
    assert runtime.auto_batch_size(torch.device("cuda"), (3, 224, 224)) == 64


def test_auto_batch_size_gives_the_features_of_any_batch_size(monkeypatch):
    seen = []
    plain = runtime.batches
    monkeypatch.setattr(
        "sklearn_cnn._network.batches",
        lambda *a, **kw: seen.append(kw["batch_size"]) or plain(*a, **kw),
    )
    expected = tiny(batch_size=1).fit(X).transform(X)
    seen.clear()
    out = tiny(batch_size="auto").fit(X).transform(X)
    assert seen == [128]  # 16 x 16 images: the largest auto batch
    assert_allclose(out, expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(InvalidParameterError, match="batch_size"):
        tiny(batch_size="large").fit(X)
