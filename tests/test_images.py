"""Image inputs: arrays, files and PIL images give the same features; bad input
raises a clear error."""

from __future__ import annotations

import functools
import os
import pathlib

import numpy as np
import pytest
import torch
from numpy.testing import assert_allclose, assert_array_equal
from PIL import Image
from tiny_cnn import make_tiny_cnn, tiny

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ``stem.0`` flattened is a linear function of every pixel of every channel,
# so any input difference shows.
tiny = functools.partial(tiny, layer="stem.0", pooling="flatten")


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


@pytest.mark.parametrize("dtype", [np.int64, np.int32, np.int16])
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
        (np.zeros((2, 4, 8, 8), np.uint8), ValueError, "channels-first.*transpose"),
        (np.zeros((1, 2, 8, 8, 3), np.uint8), ValueError, "5 dimension"),
        (np.full((2, 8, 8, 3), np.nan), ValueError, "NaN or infinity"),
        (np.full((2, 8, 8, 3), np.inf, np.float32), ValueError, "NaN or infinity"),
        (np.full((2, 8, 8, 3), 255.0), ValueError, r"must lie in \[0, 1\].*X / 255"),
        (np.full((2, 8, 8, 3), -0.5), ValueError, r"must lie in \[0, 1\]"),
        (np.full((2, 8, 8, 3), 256), ValueError, r"integer images must lie"),
        (np.full((2, 8, 8, 3), -1), ValueError, r"integer images must lie"),
        (np.zeros((2, 8, 8, 3), bool), TypeError, "dtype bool"),
        (torch.zeros(2, 8, 8, 3), TypeError, "torch.Tensor.*numpy"),
        (Image.new("RGB", (8, 8)), TypeError, "single PIL image.*X=\\[image\\]"),
        ("image.png", TypeError, "got str"),
        ([U8[0], 3], TypeError, r"X\[1\] is a int"),
        ([np.zeros((2, 8, 8, 3), np.uint8)], ValueError, r"X\[0\] has shape"),
        ([np.full((8, 8, 3), 2.0)], ValueError, r"array X\[0\] has values in \[2, 2\]"),
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


@pytest.mark.parametrize("channels", [3, 4, 1])
def test_one_image_array_is_refused_not_read_as_rows(channels):
    # Regression: one H x W x 3 image was read as H grey images of W x 3 pixels.
    one = np.zeros((8, 8, channels), np.uint8)
    with pytest.raises(ValueError, match=r"looks like one image.*X\[None\]"):
        tiny().fit(one)
    fitted = tiny().fit(U8)
    with pytest.raises(ValueError, match=r"looks like one image.*X\[None\]"):
        fitted.transform(one)
    assert fitted.transform(one[None]).shape == (1, fitted.n_features_out_)
    # Grey images of another width are not refused.
    assert tiny().fit(np.zeros((16, 16, 5), np.uint8)).n_features_out_ == 8 * 16 * 5


# ---------------------------------------------------------------------------
# Real-world files: EXIF orientation, 16- and 32-bit grey, float images
# ---------------------------------------------------------------------------


def exif_rotated(stored: np.ndarray, path: pathlib.Path, orientation: int) -> None:
    """Save ``stored`` with an EXIF orientation tag, as a phone camera does."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(stored).save(path, exif=exif.tobytes(), quality=95)


@pytest.mark.parametrize("suffix", [".jpg", ".png"])
def test_exif_orientation_is_applied(images, tmp_path, suffix):
    rng = np.random.default_rng(4)
    stored = rng.integers(0, 256, (2, 12, 20, 3), dtype=np.uint8)  # not square
    paths = []
    for i, im in enumerate(stored):
        paths.append(tmp_path / f"{i}{suffix}")
        exif_rotated(im, paths[-1], orientation=6)  # "rotate 90 clockwise to show"
    # What is stored, decoded (JPEG is lossy) and turned clockwise by hand.
    decoded = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in paths])
    upright = np.rot90(decoded, k=-1, axes=(1, 2))
    assert upright.shape == (2, 20, 12, 3)
    expected = features(np.ascontiguousarray(upright))
    assert_array_equal(features(paths), expected)
    # An opened file passed as a PIL image is the same photo.
    assert_array_equal(features([Image.open(p) for p in paths]), expected)
    # Not applied twice: an image already turned upright has no tag left.
    from PIL import ImageOps

    turned = [ImageOps.exif_transpose(Image.open(p)) for p in paths]
    assert_array_equal(features(turned), expected)


@pytest.mark.parametrize(
    "orientation, k, flip", [(3, 2, False), (8, 1, False), (2, 0, True)]
)
def test_other_exif_orientations(tmp_path, orientation, k, flip):
    stored = np.random.default_rng(5).integers(0, 256, (10, 14, 3), dtype=np.uint8)
    path = tmp_path / "a.png"
    exif_rotated(stored, path, orientation)
    upright = np.rot90(stored[:, ::-1] if flip else stored, k=k)
    assert_array_equal(features([path]), features(np.ascontiguousarray(upright)[None]))


def test_32_bit_integer_images_are_16_bit_scaled_not_clipped(tmp_path):
    # PIL mode "I": 16-bit PGM files, 32-bit TIFFs, any op on a 16-bit image.
    grey = np.random.default_rng(6).integers(0, 65536, (3, 16, 16)).astype(np.int32)
    pil = [Image.fromarray(im) for im in grey]
    assert all(im.mode == "I" for im in pil)
    expected = features(grey.astype(np.float32) / 65535)
    assert_allclose(features(pil), expected, rtol=1e-5, atol=1e-5)
    paths = []
    for i, im in enumerate(pil):
        paths.append(tmp_path / f"{i}.tif")
        im.save(paths[-1])
    assert Image.open(paths[0]).mode == "I"
    assert_allclose(features(paths), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("low, high", [(-5, 100), (0, 70000)])
def test_32_bit_integer_images_out_of_16_bit_range_are_refused(tmp_path, low, high):
    im = np.linspace(low, high, 256).reshape(16, 16).astype(np.int32)
    path = tmp_path / "wide.tif"
    Image.fromarray(im).save(path)
    with pytest.raises(
        ValueError, match=rf"X\[1\] .*wide.tif.*mode 'I'.*\[{low}, {high}\]"
    ):
        features([U8[0], path])
    with pytest.raises(ValueError, match=r"X\[0\] is a 32-bit integer image"):
        features([Image.fromarray(im)])


def test_float_images_in_unit_range_equal_float_arrays(tmp_path):
    grey = np.random.default_rng(7).random((3, 16, 16), dtype=np.float32)
    pil = [Image.fromarray(im) for im in grey]
    assert all(im.mode == "F" for im in pil)
    expected = features(grey)
    assert_allclose(features(pil), expected, rtol=1e-6, atol=1e-6)
    path = tmp_path / "f.tif"
    pil[0].save(path)
    assert Image.open(path).mode == "F"
    assert_allclose(features([path]), expected[:1], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "value, match",
    [(1000.0, r"mode 'F'.*\[0, 1000\].*not clipped"), (np.nan, "NaN or infinity")],
)
def test_float_images_out_of_range_are_refused(tmp_path, value, match):
    im = np.zeros((16, 16), np.float32)
    im[3, 4] = value
    path = tmp_path / "depth.tif"
    Image.fromarray(im).save(path)
    with pytest.raises(ValueError, match=rf"X\[0\] \(.*depth.tif'\).*{match}"):
        features([path])
    with pytest.raises(ValueError, match=rf"X\[0\] is a .*{match}"):
        features([Image.fromarray(im)])


def test_mode_pil_cannot_convert_is_a_clear_error():
    odd = Image.new("La", (8, 8))
    with pytest.raises(ValueError, match=r"X\[0\] .*mode 'La'.*Convert it"):
        features([odd])


# ---------------------------------------------------------------------------
# Array-likes with __array__ (dask, xarray, h5py, zarr)
# ---------------------------------------------------------------------------


class LazyDataset:
    """Like an h5py dataset: shape, dtype, slices and *increasing* index lists;
    records every read and refuses to be loaded whole."""

    def __init__(self, data: np.ndarray, lists: bool = True) -> None:
        self._data, self.lists = data, lists
        self.shape, self.dtype = data.shape, data.dtype
        self.reads: list[int] = []

    def __len__(self) -> int:
        return len(self._data)

    def __getitem__(self, key):
        if isinstance(key, list):
            if not self.lists:  # zarr's basic indexing
                raise IndexError("unsupported selection item for basic indexing")
            assert key == sorted(set(key)), "h5py wants increasing indices"
        out = self._data[key]
        self.reads.append(len(out) if out.ndim == self._data.ndim else 1)
        return out

    def __array__(self, dtype=None, copy=None):
        raise AssertionError("the whole array was loaded")


def test_lazy_array_like_is_read_batch_by_batch(images):
    lazy = LazyDataset(images)
    expected = features(images, batch_size=5)
    assert_array_equal(features(lazy, batch_size=5), expected)
    assert max(lazy.reads) <= 5
    # Shuffled batches (fine-tuning) read sorted indices and reorder them.
    from sklearn_cnn._images import ArrayLikeImages

    order = [7, 2, 2, 11, 0]
    assert_array_equal(ArrayLikeImages(lazy).read(order), images[order])
    # Without list indexing (zarr), one image at a time.
    basic = LazyDataset(images, lists=False)
    assert_array_equal(ArrayLikeImages(basic).read(order), images[order])
    assert basic.reads == [1, 1, 1, 1]


def test_lazy_array_like_bad_values_named_when_read(images):
    bad = images.astype(np.float32)  # 0..255 as float: not scaled
    with pytest.raises(ValueError, match=r"must lie in \[0, 1\]"):
        features(LazyDataset(bad))
    with pytest.raises(ValueError, match=r"looks like one image"):
        features(LazyDataset(images[0]))


def test_dask_array(images):
    da = pytest.importorskip("dask.array")
    X = da.from_array(images, chunks=(4, 16, 16, 3))
    assert_array_equal(features(X, batch_size=5), features(images))


def test_object_with_only_array_interface(images):
    class Wrapped:
        def __array__(self, dtype=None, copy=None):
            return images

    assert_array_equal(features(Wrapped()), features(images))


def test_xarray(images):
    xr = pytest.importorskip("xarray")
    X = xr.DataArray(images, dims=("n", "y", "x", "c"))
    assert_array_equal(features(X), features(images))


def test_fine_tuning_on_a_lazy_array(labelled_images):
    from sklearn_cnn import FineTuneClassifier

    X, y = labelled_images
    params = dict(epochs=1, batch_size=8, random_state=0, validation_fraction=0.5)
    model = functools.partial(make_tiny_cnn, 0)
    lazy = LazyDataset(X)
    clf = FineTuneClassifier(model, **params).fit(lazy, y)
    ref = FineTuneClassifier(model, **params).fit(X, y)
    assert_allclose(clf.predict_proba(lazy), ref.predict_proba(X), rtol=1e-5, atol=1e-6)
    assert max(lazy.reads) <= 8


# ---------------------------------------------------------------------------
# load_image_folder
# ---------------------------------------------------------------------------


def junk_tree(root: pathlib.Path) -> list[str]:
    """A class tree with what archives, notebooks and file managers leave;
    returns the image files expected, in order."""
    png = lambda path: Image.new("RGB", (4, 4)).save(path, format="PNG")  # noqa: E731
    for folder in ["cat/.ipynb_checkpoints", "cat/sub", "dog", "__MACOSX/cat", ".git"]:
        (root / folder).mkdir(parents=True)
    for name in ["cat/a.png", "cat/sub/b.jpg", "dog/c.PNG"]:
        png(root / name)
    png(root / "cat/.ipynb_checkpoints/a-checkpoint.png")
    png(root / "cat/.hidden.png")
    (root / "cat/._a.png").write_bytes(b"\x00\x05\x16\x07AppleDouble")
    png(root / "__MACOSX/cat/._a.png")
    (root / "cat/.DS_Store").write_bytes(b"\x00")
    (root / "dog/notes.txt").write_text("not an image")
    (root / "README.md").write_text("root file")
    png(root / ".git/x.png")
    return [str(root / n) for n in ["cat/a.png", "cat/sub/b.jpg", "dog/c.PNG"]]


def test_load_image_folder_skips_junk(tmp_path, capsys):
    from sklearn_cnn import load_image_folder

    expected = junk_tree(tmp_path)
    paths, labels = load_image_folder(tmp_path)
    assert paths == expected
    assert labels.tolist() == ["cat", "cat", "dog"]
    assert capsys.readouterr().err == ""  # quiet by default
    features(paths)  # every listed file is an image


def test_load_image_folder_verbose_says_what_it_skipped(tmp_path, capsys):
    from sklearn_cnn import load_image_folder

    junk_tree(tmp_path)
    load_image_folder(tmp_path, verbose=1)
    err = capsys.readouterr().err
    assert "3 images in 2 classes" in err
    assert "skipped 8 entries" in err
    assert "hidden (5)" in err and ".ipynb_checkpoints" in err and "._a.png" in err
    assert "junk folder (1): __MACOSX" in err
    assert "not an image (1)" in err and "notes.txt" in err
    assert "not in a class folder (1): README.md" in err


def test_load_image_folder_skips_pipes_and_warns_of_empty_classes(tmp_path, capsys):
    from sklearn_cnn import load_image_folder

    (tmp_path / "cat").mkdir()
    (tmp_path / "bird").mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / "cat/a.png")
    (tmp_path / "bird/.DS_Store").write_bytes(b"\x00")
    (tmp_path / "cat/b.png").symlink_to(tmp_path / "missing.png")  # broken link
    if hasattr(os, "mkfifo"):
        os.mkfifo(tmp_path / "cat/pipe.png")
    with pytest.warns(UserWarning, match=r"\['bird'\].*hold no image"):
        paths, labels = load_image_folder(tmp_path, verbose=2)
    assert paths == [str(tmp_path / "cat/a.png")]
    err = capsys.readouterr().err
    assert "class folder with no image (1): bird" in err
    assert "not a regular file" in err and "b.png" in err


def test_load_image_folder_without_images(tmp_path):
    from sklearn_cnn import load_image_folder

    (tmp_path / ".ipynb_checkpoints").mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / ".ipynb_checkpoints/a.png")
    with pytest.raises(ValueError, match="No image files found"):
        load_image_folder(tmp_path)
    with pytest.raises(ValueError, match="is not a folder"):
        load_image_folder(tmp_path / "nope")


def test_lazy_images_slice_stays_lazy(images):
    from sklearn_cnn._images import ArrayLikeImages, check_images

    lazy = LazyDataset(images)
    X = check_images(lazy)
    assert isinstance(X, ArrayLikeImages) and lazy.reads == []
    part = X[4:9]  # what sklearn_cnn.dask does with blocks of X
    assert check_images(part) is part and len(part) == 5
    assert_array_equal(features(part), features(images[4:9]))


def test_load_image_folder_warns_of_photos_it_cannot_read(tmp_path, capsys):
    from sklearn_cnn import load_image_folder

    (tmp_path / "cat").mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / "cat/a.jpg")
    (tmp_path / "cat/IMG_0001.HEIC").write_bytes(b"\x00\x00\x00\x18ftypheic")
    (tmp_path / "cat/data.h5").write_bytes(b"\x89HDF\r\n\x1a\n")  # PIL: a stub
    with pytest.warns(UserWarning, match=r"cannot read here \(\.heic\).*pillow-heif"):
        paths, _ = load_image_folder(tmp_path, verbose=1)
    assert paths == [str(tmp_path / "cat/a.jpg")]
    assert "not an image (2)" in capsys.readouterr().err


def test_dask_array_with_worker_processes(images):
    # Regression: a worker forked after dask's thread pool started waited
    # forever on its copy of the pool.
    import signal

    da = pytest.importorskip("dask.array")
    if not hasattr(signal, "SIGALRM"):
        pytest.skip("needs SIGALRM for its hang guard")
    X = da.from_array(images, chunks=(4, 16, 16, 3))
    est = tiny(batch_size=5).fit(X)
    expected = est.transform(X)  # dask's thread pool now exists

    def hung(*_):
        raise TimeoutError("transform with worker processes hung")

    previous = signal.signal(signal.SIGALRM, hung)  # a hang fails, not blocks
    signal.alarm(120)
    try:
        out = est.set_params(num_workers=2).transform(X)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert_array_equal(out, expected)
