"""Running the transformer: batches, precision, progress, workers, devices."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
import torchvision
from hypothesis import given, settings
from hypothesis import strategies as st
from numpy.testing import assert_allclose, assert_array_equal
from PIL import Image
from tiny_cnn import tiny

from sklearn_cnn import CNNFeatureTransformer

pytestmark = pytest.mark.usefixtures("one_torch_thread")

NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="needs no CUDA")


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


# ---------------------------------------------------------------------------
# Batch size: the features do not depend on it
# ---------------------------------------------------------------------------

RNG = np.random.default_rng(7)
X_ARRAY = RNG.integers(0, 256, (20, 16, 16, 3), dtype=np.uint8)
X_LIST = [
    Image.fromarray(RNG.integers(0, 256, (h, w, 3), dtype=np.uint8))
    for h, w in RNG.integers(8, 30, (20, 2))
]


@functools.cache
def _fitted(kind: str) -> tuple[CNNFeatureTransformer, np.ndarray]:
    """A fitted transformer and its one-image-at-a-time reference output."""
    X = X_ARRAY if kind == "array" else X_LIST
    est = tiny(layer=["stage1.1", "stage2", "fc"], pooling="gem", image_size=16)
    est.set_params(batch_size=1).fit(X)
    return est, est.transform(X)


@settings(max_examples=20, deadline=None, database=None)
@given(
    kind=st.sampled_from(["array", "list"]),
    n_images=st.integers(1, 20),
    batch_size=st.integers(1, 25),
)
def test_features_do_not_depend_on_batch_size(kind, n_images, batch_size):
    est, reference = _fitted(kind)
    X = X_ARRAY if kind == "array" else X_LIST
    out = est.set_params(batch_size=batch_size).transform(X[:n_images])
    assert out.shape == (n_images, reference.shape[1])
    assert_allclose(out, reference[:n_images], rtol=1e-5, atol=1e-5)


def test_rows_follow_the_input_order(images):
    est = tiny(batch_size=5).fit(images)
    full = est.transform(images)
    order = np.random.default_rng(0).permutation(12)
    assert_allclose(est.transform(images[order]), full[order], rtol=1e-5, atol=1e-6)
    assert_allclose(est.transform(images[3:4]), full[3:4], rtol=1e-5, atol=1e-6)


def test_fit_transform_equals_fit_then_transform(images):
    a = tiny().fit_transform(images)
    b = tiny().fit(images).transform(images)
    assert_array_equal(a, b)
    # fit only probes X: another X at transform gives the same rows.
    c = tiny().fit(images[:2]).transform(images)
    assert_array_equal(a, c)


# ---------------------------------------------------------------------------
# Precision
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_reduced_precision_is_close_to_fp32(precision, images):
    exact = tiny().fit_transform(images)
    low = tiny(precision=precision).fit_transform(images)
    assert low.dtype == np.float32
    assert not np.array_equal(low, exact)  # autocast did run
    assert cosine(low, exact).min() > 0.99


def test_bf16_close_to_fp32_on_resnet(images):
    torch.manual_seed(0)
    module = torchvision.models.resnet18()
    params = {"image_size": 32, "layer": ["layer2", "layer4"]}
    exact = CNNFeatureTransformer(module, precision="fp32", **params)
    low = CNNFeatureTransformer(module, precision="bf16", **params)
    a, b = exact.fit_transform(images), low.fit_transform(images)
    assert b.dtype == np.float32
    assert cosine(a, b).min() > 0.99


@pytest.mark.parametrize("native_bf16", [True, False])
def test_auto_precision_follows_the_cpu(native_bf16, monkeypatch, images):
    monkeypatch.setattr("sklearn_cnn._runtime.cpu_has_native_bf16", lambda: native_bf16)
    auto = tiny(precision="auto", device="cpu").fit_transform(images)
    expected = tiny(precision="bf16" if native_bf16 else "fp32").fit_transform(images)
    assert_array_equal(auto, expected)


# ---------------------------------------------------------------------------
# Progress, workers, devices
# ---------------------------------------------------------------------------


def test_verbose_reports_progress_on_stderr(images, capsys):
    tiny(batch_size=5).fit(images).transform(images)
    assert capsys.readouterr() == ("", "")
    tiny(batch_size=5, verbose=1).fit(images).transform(images)
    out, err = capsys.readouterr()
    assert out == ""
    # a tqdm bar: it ends at all the images, on its own line
    assert "transform: 100%" in err and "12/12" in err and "img/s" in err
    assert err.endswith("\n")


def test_workers_give_the_same_features(images, tmp_path):
    paths = []
    for i, im in enumerate(images):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(im).save(paths[-1])
    est = tiny(batch_size=5, image_size=12).fit(paths)
    expected = est.transform(paths)
    assert_array_equal(est.set_params(num_workers=2).transform(paths), expected)
    assert_array_equal(est.transform(images), expected)


@NO_CUDA
def test_auto_device_is_the_cpu_here(images):
    est = tiny(device="auto").fit(images)
    assert est.device_ == torch.device("cpu")
    assert all(p.device.type == "cpu" for p in est.model_.parameters())


@pytest.mark.parametrize("device", ["cpu", torch.device("cpu")])
def test_explicit_cpu_device(device, images):
    est = tiny(device=device).fit(images)
    assert est.device_ == torch.device("cpu")


@NO_CUDA
@pytest.mark.parametrize("device", ["cuda", "cuda:1", torch.device("cuda", 0)])
def test_cuda_without_cuda_warns_and_uses_the_cpu(device, images):
    expected = tiny().fit_transform(images)
    with pytest.warns(RuntimeWarning, match="CUDA is not available.*CPU"):
        est = tiny(device=device).fit(images)
    assert est.device_ == torch.device("cpu")
    assert_array_equal(est.transform(images), expected)


def test_bad_device(images):
    with pytest.raises(ValueError, match="device='gpu0' is not a device"):
        tiny(device="gpu0").fit(images)
