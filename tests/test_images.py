"""Image inputs: arrays, files and PIL images give the same features; bad input
raises a clear error."""

from __future__ import annotations

import functools
import pathlib

import numpy as np
import pytest
import torch
from conftest import make_tiny_cnn
from numpy.testing import assert_allclose, assert_array_equal
from PIL import Image

from sklearn_cnn import CNNFeatureTransformer

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny(**params) -> CNNFeatureTransformer:
    """TinyCNN, exact float32; ``stem.0`` flattened is a linear function of
    every pixel of every channel, so any input difference shows."""
    params = {"layer": "stem.0", "pooling": "flatten", "precision": "fp32", **params}
    return CNNFeatureTransformer(functools.partial(make_tiny_cnn, 0), **params)


def features(X, **params) -> np.ndarray:
    return tiny(**params).fit(X).transform(X)


def save_all(images: np.ndarray, folder: pathlib.Path, suffix: str, **kw) -> list:
    paths = []
    for i, im in enumerate(images):
        path = folder / f"im{i}{suffix}"
        Image.fromarray(im).save(path, **kw)
        paths.append(path)
    return paths


# ---------------------------------------------------------------------------
# Arrays
# ---------------------------------------------------------------------------


def test_uint8_rgb_array_gives_float32_2d(images):
    out = features(images)
    assert out.dtype == np.float32
    assert out.shape == (12, 8 * 16 * 16)
    assert np.isfinite(out).all()


def test_grey_array_equals_rgb_with_repeated_channels(images):
    grey = images[..., 0]
    rgb = np.repeat(grey[..., None], 3, axis=-1)
    expected = features(rgb)
    assert_array_equal(features(grey), expected)  # N x H x W
    assert_array_equal(features(grey[..., None]), expected)  # N x H x W x 1


def test_rgba_array_drops_alpha(images):
    alpha = np.random.default_rng(1).integers(0, 256, images.shape[:-1] + (1,))
    rgba = np.concatenate([images, alpha.astype(np.uint8)], axis=-1)
    assert_array_equal(features(rgba), features(images))


def test_float_array_in_unit_range_matches_uint8(images):
    as_float = images.astype(np.float32) / 255
    assert_allclose(features(as_float), features(images), rtol=1e-5, atol=1e-5)
    assert_allclose(
        features(images.astype(np.float64) / 255),
        features(images),
        rtol=1e-5,
        atol=1e-5,
    )


def test_float_array_resized_close_to_uint8(images):
    # uint8 images are resized in uint8 (rounded), floats in float: close only.
    a = features(images, image_size=24, layer=None, pooling="avg")
    b = features(images / 255, image_size=24, layer=None, pooling="avg")
    assert_allclose(a, b, atol=2e-2)


@pytest.mark.parametrize("dtype", [np.int64, np.int32, np.uint16, np.int16])
def test_integer_array_in_0_255_equals_uint8(images, dtype):
    expected = features(images, image_size=20)
    assert_array_equal(features(images.astype(dtype), image_size=20), expected)


def test_list_of_per_image_arrays_equals_stacked_array(images):
    assert_array_equal(features(list(images)), features(images))


def test_reversed_views_are_accepted(images):
    # Regression: torch.from_numpy refuses negative strides (img[:, ::-1]).
    flipped = images[:, :, ::-1]
    expected = features(np.ascontiguousarray(flipped))
    assert_array_equal(features(list(flipped)), expected)
    assert_array_equal(features(flipped), expected)
    assert_array_equal(features(images[::-1]), features(images)[::-1])


def test_read_only_and_non_contiguous_input(images):
    expected = features(images)
    frozen = images.copy()
    frozen.setflags(write=False)
    assert_array_equal(features(frozen), expected)
    assert_array_equal(features([im for im in frozen]), expected)
    fortran = np.asfortranarray(images)
    assert_array_equal(features(fortran), expected)


def test_input_is_not_modified(images):
    # float32 without resizing is the path where torch shares the memory.
    as_float = images.astype(np.float32) / 255
    for X in (images, as_float, list(as_float)):
        before = [np.array(x, copy=True) for x in X]
        est = tiny(image_size="native").fit(X)
        est.transform(X)
        for x, b in zip(X, before, strict=True):
            assert_array_equal(x, b)


# ---------------------------------------------------------------------------
# Files and PIL images
# ---------------------------------------------------------------------------


def test_png_paths_equal_array(images, tmp_path):
    paths = save_all(images, tmp_path, ".png")
    expected = features(images)
    assert_array_equal(features(paths), expected)  # pathlib.Path
    assert_array_equal(features([str(p) for p in paths]), expected)  # str
    assert_array_equal(features(np.array([str(p) for p in paths])), expected)


def test_pandas_series_of_paths(images, tmp_path):
    pd = pytest.importorskip("pandas")
    paths = [str(p) for p in save_all(images, tmp_path, ".png")]
    assert_array_equal(features(pd.Series(paths)), features(images))


def test_one_column_of_paths_as_column_transformer_passes_it(images, tmp_path):
    pd = pytest.importorskip("pandas")
    paths = [str(p) for p in save_all(images, tmp_path, ".png")]
    frame = pd.DataFrame({"path": paths})
    assert_array_equal(features(frame), features(images))
    assert_array_equal(features(np.array(paths)[:, None]), features(images))


def test_jpeg_paths_close_to_array(images, tmp_path):
    # JPEG is lossy: close, not equal. Smooth images keep the loss small.
    smooth = np.repeat(np.repeat(images[:, ::4, ::4], 4, axis=1), 4, axis=2)
    paths = save_all(smooth, tmp_path, ".jpg", quality=95)
    a = features(paths, layer=None, pooling="avg")
    b = features(smooth, layer=None, pooling="avg")
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cos.min() > 0.99


def test_pil_rgb_images_equal_array(images):
    pil = [Image.fromarray(im) for im in images]
    assert_array_equal(features(pil), features(images))


def test_pil_grey_images_equal_grey_array(images):
    grey = images[..., 1]
    pil = [Image.fromarray(im, mode="L") for im in grey]
    assert all(im.mode == "L" for im in pil)
    assert_array_equal(features(pil), features(np.repeat(grey[..., None], 3, -1)))


def test_pil_rgba_images_drop_alpha(images):
    alpha = np.full(images.shape[:-1] + (1,), 7, dtype=np.uint8)
    rgba = np.concatenate([images, alpha], axis=-1)
    pil = [Image.fromarray(im, mode="RGBA") for im in rgba]
    assert all(im.mode == "RGBA" for im in pil)
    assert_array_equal(features(pil), features(images))


def test_pil_palette_images_use_their_colours(images):
    pil = [
        Image.fromarray(im).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
        for im in images
    ]
    assert all(im.mode == "P" for im in pil)
    rgb = np.stack([np.asarray(im.convert("RGB")) for im in pil])
    assert not np.array_equal(rgb, images)  # the palette changed the colours
    assert_array_equal(features(pil), features(rgb))


def test_grey_and_rgba_png_files(images, tmp_path):
    grey = images[..., 2]
    grey_paths = save_all(grey, tmp_path, "_l.png")
    assert_array_equal(
        features(grey_paths), features(np.repeat(grey[..., None], 3, -1))
    )
    rgba = np.concatenate([images, images[..., :1]], axis=-1)
    rgba_paths = save_all(rgba, tmp_path, "_rgba.png")
    assert Image.open(rgba_paths[0]).mode == "RGBA"
    assert_array_equal(features(rgba_paths), features(images))


def test_16_bit_grey_images_keep_their_range(tmp_path):
    # Regression: PIL's convert("RGB") clips 16-bit grey at 255 (all white).
    grey16 = np.random.default_rng(2).integers(0, 65536, (3, 16, 16), np.uint16)
    paths = []
    for i, im in enumerate(grey16):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(im).save(paths[-1])
    assert Image.open(paths[0]).mode.startswith("I;16")
    expected = features(grey16.astype(np.float32) / 65535)
    assert_allclose(features(paths), expected, rtol=1e-5, atol=1e-5)
    big_endian = [
        Image.frombytes("I;16B", (16, 16), im.astype(">u2").tobytes()) for im in grey16
    ]
    assert_allclose(features(big_endian), expected, rtol=1e-5, atol=1e-5)


def test_mixed_list_of_paths_pil_and_arrays(images, tmp_path):
    paths = save_all(images[:4], tmp_path, ".png")
    mixed = [
        *paths,
        *[Image.fromarray(im) for im in images[4:8]],
        *images[8:],
    ]
    assert_array_equal(features(mixed), features(images))


def test_images_of_different_sizes_with_image_size(images):
    rng = np.random.default_rng(3)
    shapes = [(16, 16), (24, 30), (40, 12), (9, 9)]
    X = [rng.integers(0, 256, (*s, 3), dtype=np.uint8) for s in shapes]
    X[1] = Image.fromarray(X[1])
    X[2] = X[2][..., 0]  # grey too
    est = tiny(image_size=20, layer=None, pooling="avg", batch_size=3).fit(X)
    out = est.transform(X)
    assert out.shape == (4, 32)
    # Each row is what the image gives on its own.
    for i, image in enumerate(X):
        assert_allclose(out[i], est.transform([image])[0], rtol=1e-5, atol=1e-6)


def test_different_sizes_without_resize_need_batch_size_1(images):
    rng = np.random.default_rng(3)
    X = [rng.integers(0, 256, (h, h, 3), dtype=np.uint8) for h in (16, 24)]
    est = tiny(layer=None, pooling="avg").fit(X)  # own module: native size
    with pytest.raises(ValueError, match="differ in size.*set image_size"):
        est.transform(X)
    out = est.set_params(batch_size=1).transform(X)
    assert out.shape == (2, 32)


def test_feature_count_must_match_fit(images):
    est = tiny(image_size="native").fit(images)
    bigger = np.zeros((2, 20, 20, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match="give 3200 features.*fitted on images"):
        est.transform(bigger)
    # Averaging makes the count independent of the size.
    est = tiny(image_size="native", pooling="avg").fit(images)
    assert est.transform(bigger).shape == (2, 8)


# ---------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------

U8 = np.zeros((2, 8, 8, 3), dtype=np.uint8)


@pytest.mark.parametrize(
    "X, error, match",
    [
        (np.zeros((0, 8, 8, 3), np.uint8), ValueError, "X is empty"),
        ([], ValueError, "X is empty"),
        (np.zeros((5, 64), np.uint8), ValueError, r"2 dimension.*reshape"),
        (np.zeros(64, np.uint8), ValueError, r"1 dimension"),
        (np.zeros((2, 3, 8, 8), np.uint8), ValueError, "channels-first.*transpose"),
        (np.zeros((2, 8, 8, 5), np.uint8), ValueError, "last axis must hold 1, 3 or 4"),
        (np.zeros((1, 2, 8, 8, 3), np.uint8), ValueError, "5 dimension"),
        (np.full((2, 8, 8, 3), np.nan), ValueError, "NaN or infinity"),
        (np.full((2, 8, 8, 3), np.inf, np.float32), ValueError, "NaN or infinity"),
        (np.full((2, 8, 8, 3), 255.0), ValueError, r"scaled to \[0, 1\].*X / 255"),
        (np.full((2, 8, 8, 3), -0.5), ValueError, r"scaled to \[0, 1\]"),
        (np.full((2, 8, 8, 3), 256), ValueError, r"integer images must lie"),
        (np.full((2, 8, 8, 3), -1), ValueError, r"integer images must lie"),
        (np.zeros((2, 8, 8, 3), bool), TypeError, "dtype bool"),
        (torch.zeros(2, 8, 8, 3), TypeError, "torch.Tensor.*numpy"),
        (Image.new("RGB", (8, 8)), TypeError, "single PIL image.*X=\\[image\\]"),
        ("image.png", TypeError, "got str"),
        ([U8[0], 3], TypeError, r"X\[1\] is a int"),
        ([np.zeros((8, 8, 2), np.uint8)], ValueError, r"X\[0\] has shape"),
        ([np.full((8, 8, 3), 2.0)], ValueError, r"X\[0\] is a float array"),
    ],
)
def test_bad_input_raises_clear_error(X, error, match):
    est = tiny()
    with pytest.raises(error, match=match):
        est.fit(X)
    fitted = tiny().fit(U8)
    with pytest.raises(error, match=match):
        fitted.transform(X)


def test_missing_file(tmp_path):
    missing = tmp_path / "nope.png"
    with pytest.raises(ValueError, match="Image file not found.*nope.png"):
        tiny().fit([missing])
    # A later missing file is found when transform reads it.
    good = save_all(U8[:1], tmp_path, ".png")
    est = tiny().fit(good)
    with pytest.raises(ValueError, match="Image file not found.*nope.png"):
        est.transform([*good, str(missing)])


def test_corrupt_file(tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"this is not a jpeg" * 10)
    with pytest.raises(ValueError, match="Cannot read image file.*broken.jpg"):
        tiny().fit([bad])


def test_truncated_file(tmp_path):
    rng = np.random.default_rng(0)
    (path,) = save_all(
        [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)], tmp_path, ".jpg"
    )
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="Cannot read image file.*truncated"):
        tiny().fit([path])


def test_folder_instead_of_file(tmp_path):
    with pytest.raises(ValueError, match="Cannot read image file"):
        tiny().fit([tmp_path])


def test_corrupt_file_with_workers(tmp_path):
    good = save_all(U8, tmp_path, ".png")
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG garbage")
    est = tiny(num_workers=2, batch_size=1).fit(good)
    with pytest.raises(ValueError, match="Cannot read image file.*broken.png"):
        est.transform([*good, bad])
