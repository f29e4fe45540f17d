"""Untrusted image files: decompression bombs, extreme aspect ratios, paths that
are not regular files or hold a NUL byte, and which image a bad file is in X.

Each is refused with a clear error that names the file and its index in X,
before anything large is allocated and without blocking."""

from __future__ import annotations

import contextlib
import functools
import os
import pathlib
import struct
import threading
import zlib

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_cnn import make_tiny_cnn, tiny

from sklearn_cnn import CNNFeatureTransformer

pytestmark = pytest.mark.usefixtures("one_torch_thread")

U8 = np.random.default_rng(0).integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)


tiny = functools.partial(tiny, layer="stem.0", pooling="avg")

#: Two DataLoader worker processes: slow to start, so out of the quick loop.
WORKERS = pytest.param(2, marks=pytest.mark.slow)


def save(images: np.ndarray, folder: pathlib.Path) -> list[str]:
    paths = []
    for i, im in enumerate(images):
        paths.append(str(folder / f"good{i}.png"))
        Image.fromarray(im).save(paths[-1])
    return paths


def png_declaring(width: int, height: int) -> bytes:
    """A few bytes of PNG whose header declares ``width`` x ``height`` pixels:
    a decompression bomb's header, without the bomb."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b""))
        + chunk(b"IEND", b"")
    )


@pytest.mark.parametrize("num_workers", [0, WORKERS])
def test_decompression_bomb_is_a_clear_error(tmp_path, num_workers):
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_declaring(60_000, 60_000))  # 3.6 gigapixels
    est = tiny(num_workers=num_workers, batch_size=2).fit(U8)
    good = save(U8, tmp_path)
    with pytest.raises(ValueError) as info:
        est.transform([*good, bomb])
    message = str(info.value)
    assert "X[3] (" in message and "bomb.png" in message
    assert "decompression bomb" in message and "MAX_IMAGE_PIXELS" in message
    assert "DecompressionBombError" not in message.splitlines()[-1]


def test_pixel_limit_is_pil_s(tmp_path, monkeypatch):
    # The limit is PIL's own, so a user who trusts a file can raise it.
    (path,) = save(U8[:1], tmp_path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 16)  # 8 x 8 > 2 x 16
    with pytest.raises(ValueError, match=r"X\[0\] .*good0.png.*decompression bomb"):
        tiny().fit([path])
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    assert tiny().fit([path]).transform([path]).shape == (1, 8)


# ---------------------------------------------------------------------------
# Extreme aspect ratios: torchvision's preprocessing resizes the shorter side
# ---------------------------------------------------------------------------


def resnet18_conv1() -> CNNFeatureTransformer:
    # A torchvision name: its weights' preprocessing (shorter side to 256, crop
    # 224, read from a static table: nothing is downloaded), random weights.
    return CNNFeatureTransformer("resnet18", weights=None, layer="conv1")


@pytest.mark.slow
def test_extreme_aspect_ratio_cannot_allocate_gigabytes(tmp_path):
    # 1 x 1000 pixels: the shorter side to 256 px would make 256 x 256,000.
    strip = np.zeros((1, 1000, 3), np.uint8)
    path = tmp_path / "strip.png"
    Image.fromarray(strip).save(path)
    match = r"1 x 1000 pixels.*256 x 256000 pixels.*aspect ratio.*image_size="
    fitted = resnet18_conv1().fit(U8)
    for X, where in [
        ([path], r"X\[0\] \('.*strip.png'\)"),
        ([U8[0], strip], r"X\[1\]"),
        ([Image.fromarray(strip)], r"X\[0\]"),
        (strip[None], r"X\[0\]"),
    ]:
        with pytest.raises(ValueError, match=where + ".*" + match):
            fitted.transform(X)
    with pytest.raises(ValueError, match=match):
        resnet18_conv1().fit(strip[None])
    # Resizing to a fixed size is the fix; a panorama (1:10) needs none.
    est = resnet18_conv1().set_params(image_size=(32, 32)).fit([path])
    assert est.transform([path]).shape == (1, 64)
    panorama = np.zeros((1, 30, 300, 3), np.uint8)
    assert resnet18_conv1().fit(panorama).transform(panorama).shape == (1, 64)


# ---------------------------------------------------------------------------
# Paths that are not regular files, or not paths at all
# ---------------------------------------------------------------------------


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no named pipes")
@pytest.mark.parametrize("num_workers", [0, WORKERS])
def test_named_pipe_is_refused_without_blocking(tmp_path, num_workers):
    pipe = tmp_path / "pipe.jpg"
    os.mkfifo(pipe)

    def unblock() -> None:
        # Guard: if the library opened the pipe, a writer lets it return (to
        # fail the test on the message) instead of hanging the suite.
        with contextlib.suppress(OSError):
            os.close(os.open(pipe, os.O_WRONLY | os.O_NONBLOCK))

    guard = threading.Timer(20, unblock)
    guard.start()
    try:
        est = tiny(num_workers=num_workers).fit(U8)
        with pytest.raises(ValueError, match=r"X\[1\] \('.*pipe.jpg'\).*not a regular"):
            est.transform([save(U8[:1], tmp_path)[0], pipe])
    finally:
        guard.cancel()


@pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="no /dev/zero")
def test_device_is_refused():
    # Reading /dev/zero never ends.
    with pytest.raises(ValueError, match=r"X\[0\] \('/dev/zero'\).*not a regular"):
        tiny().fit(["/dev/zero"])


@pytest.mark.parametrize("path", ["photos/cat\x00.jpg", pathlib.Path("a\x00b.png")])
def test_path_with_nul_byte_is_a_clear_error(path):
    with pytest.raises(ValueError, match=r"X\[1\] is the path .*NUL byte"):
        tiny().fit([U8[0], path])
    fitted = tiny().fit(U8)
    with pytest.raises(ValueError, match=r"X\[1\] is the path .*NUL byte"):
        fitted.transform([U8[0], path])


# ---------------------------------------------------------------------------
# A bad file's error names the file and its index in X
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("num_workers", [0, WORKERS])
@pytest.mark.parametrize(
    "content, match",
    [
        (b"\x89PNG garbage", "Cannot read image file"),
        (None, "Image file not found"),
    ],
)
def test_bad_file_error_names_file_and_index(tmp_path, num_workers, content, match):
    good = save(U8, tmp_path)
    bad = tmp_path / "broken.png"
    if content is not None:
        bad.write_bytes(content)
    X = [good[0], good[1], bad, good[2]]
    est = tiny(num_workers=num_workers, batch_size=2).fit(good)
    with pytest.raises(ValueError, match=rf"^{match}.*X\[2\] \('.*broken.png'\)"):
        est.transform(X)  # ^: the error itself, not torch's "Caught ... in worker"
    # In a fine-tuning subset too, the index is the one in X.
    with pytest.raises(ValueError, match=r"X\[2\] \('.*broken.png'\)"):
        est._run(X, est._taps, est._pool_all, 8, "t", index=np.array([2, 0]))


class Spy:
    """Wraps a preprocessing as an augmenting wrapper does; records the
    batches it is given."""

    def __init__(self, preprocess) -> None:
        self.preprocess, self.sizes = preprocess, []

    def __call__(self, images):
        self.sizes.append(len(images))
        return self.preprocess(images)


def test_a_batch_of_elongated_images_is_resized_in_parts(monkeypatch):
    # Each 2 x 40 image becomes 16 x 320 = 5,120 pixels before the crop: below
    # a limit of 12,000 alone, over it in a batch of 7. (At real sizes: 64
    # images of 1 x 200 pixels, shorter side to 256: 3.1 GiB as float32.)
    from sklearn_cnn import _images
    from sklearn_cnn._images import ImageDataset, Preprocessing

    monkeypatch.setattr(_images, "MAX_RESIZED_PIXELS", 12_000)
    pre = Preprocessing(resize=16, crop=(16, 16), mean=(0.5,) * 3, std=(0.5,) * 3)
    X = np.random.default_rng(1).integers(0, 256, (7, 2, 40, 3), dtype=np.uint8)
    spy = Spy(pre)
    out = ImageDataset(X, spy).__getitems__(list(range(7)))
    assert spy.sizes == [2, 2, 2, 1]
    expected = torch.stack([pre(_images.array_to_tensor(x, batched=False)) for x in X])
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    # One image over the limit is refused, in a list or an array.
    monkeypatch.setattr(_images, "MAX_RESIZED_PIXELS", 5_000)
    with pytest.raises(ValueError, match=r"X\[3\], X\[4\]: an image of 2 x 40"):
        ImageDataset(X, spy).__getitems__([3, 4])
    with pytest.raises(ValueError, match=r"X\[1\]: an image of 2 x 40"):
        ImageDataset(list(X), spy).__getitems__([1, 0])


@pytest.mark.slow  # worker processes
def test_bad_file_while_fine_tuning_with_workers(tmp_path, labelled_images):
    from sklearn_cnn import FineTuneClassifier

    X, y = labelled_images
    paths = save(X[::5], tmp_path)  # 12 images of 3 classes
    (tmp_path / "good5.png").write_bytes(b"\x89PNG garbage")
    clf = FineTuneClassifier(
        functools.partial(make_tiny_cnn, 0),
        epochs=1,
        batch_size=4,
        num_workers=2,
        validation_fraction=None,
        random_state=0,
    )
    with pytest.raises(ValueError, match=r"^Cannot read image file X\[5\] \('.*good5"):
        clf.fit(paths, y[::5])
