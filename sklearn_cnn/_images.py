"""Turn what users pass as images into preprocessed float tensors.

Accepted inputs: uint8 or integer arrays (N, H, W) / (N, H, W, C) with values in
[0, 255], float arrays with values in [0, 1], array-likes with ``__array__``
(dask, xarray, h5py, zarr: read a batch at a time), and sequences of file
paths, PIL images or per-image arrays (which may differ in size). Every image
becomes RGB; EXIF orientation is applied.

Files are untrusted input: a path that is not a regular file, a decompression
bomb or an image whose aspect ratio would make resizing allocate gigabytes is
refused with an error naming the file and its index in X.
"""

from __future__ import annotations

import contextlib
import os
import stat
import sys
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps
from torchvision.transforms.v2 import functional as TF


@dataclass(frozen=True)
class Preprocessing:
    """How an image becomes the network's input.

    ``resize`` is ``None`` (keep the size), an int (the shorter side, as
    torchvision's weights transforms do) or ``(h, w)``; ``crop`` is ``None`` or
    ``(h, w)`` taken from the centre after resizing.
    """

    resize: int | tuple[int, int] | None
    crop: tuple[int, int] | None
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: TF.InterpolationMode = TF.InterpolationMode.BILINEAR

    @property
    def output_size(self) -> tuple[int, int] | None:
        """The (h, w) every image has after preprocessing, if fixed."""
        if self.crop is not None:
            return self.crop
        if isinstance(self.resize, tuple):
            return self.resize
        return None

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        """uint8 or float (C, H, W) or (N, C, H, W) RGB -> normalized float32."""
        return self.normalize(self.geometry(image))

    def geometry(self, image: torch.Tensor) -> torch.Tensor:
        """Resize and crop, in the input's dtype (uint8 resizes fastest).

        torchvision returns the image itself when it already has the target
        size, so images of the network's size cost nothing here.
        """
        if self.resize is not None:
            size = (
                list(self.resize) if isinstance(self.resize, tuple) else [self.resize]
            )
            image = TF.resize(
                image, size, interpolation=self.interpolation, antialias=True
            )
        if self.crop is not None and tuple(image.shape[-2:]) != self.crop:
            image = TF.center_crop(image, list(self.crop))
        return image

    def normalize(self, image: torch.Tensor) -> torch.Tensor:
        """uint8 in [0, 255] or float in [0, 1] -> ``(x - mean) / std``, float32.

        One conversion to a new float32 tensor (never the caller's memory), in
        the input's memory format, then one fused multiply-add over it:
        ``x * scale + shift`` with ``scale = 1 / (255 std)`` for uint8.
        """
        x = image.to(torch.float32, copy=True)
        div = 255.0 if image.dtype == torch.uint8 else 1.0
        scale = torch.tensor([1.0 / (s * div) for s in self.std])
        shift = torch.tensor([-m / s for m, s in zip(self.mean, self.std, strict=True)])
        c, h, w = x.shape[-3:]
        if x.movedim(-3, -1).is_contiguous():
            # H x W x C in memory (an array's layout, channels_last): rows of
            # W * C values with the per-channel factors tiled along them, so
            # that the inner loop is long and vectorizes (C = 3 would not).
            rows = x.movedim(-3, -1).view(-1, w * c)
            scale, shift = scale.repeat(w), shift.repeat(w)
        elif x.is_contiguous():
            rows = x.view(-1, c, h * w)
            scale, shift = scale.view(c, 1), shift.view(c, 1)
        else:
            rows = x
            scale, shift = scale.view(c, 1, 1), shift.view(c, 1, 1)
        torch.addcmul(shift.to(x.device), rows, scale.to(x.device), out=rows)
        return x


def _is_path(x: Any) -> bool:
    return isinstance(x, (str, os.PathLike))


class ArrayLikeImages:
    """An array-like ``X`` that is not a NumPy array (a dask or xarray array,
    an h5py or zarr dataset), read one batch at a time.

    The whole array never has to fit in memory: each batch is read with one
    slice when its indices are consecutive (the order of ``transform``), else
    with sorted unique indices (what h5py requires) and reordered here. Values
    are checked batch by batch, as they are read.
    """

    def __init__(self, data: Any) -> None:
        self.data = data
        self.shape = tuple(int(n) for n in data.shape)
        self.dtype = np.dtype(data.dtype)
        self.ndim = len(self.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key: slice) -> ArrayLikeImages:
        """A slice of the images, still lazy (``read`` gives the pixels)."""
        if not isinstance(key, slice):
            raise TypeError("ArrayLikeImages takes slices; read(indices) reads.")
        return ArrayLikeImages(self.data[key])

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        return np.asarray(self.data, dtype=dtype)

    def read(self, indices: list[int]) -> np.ndarray:
        """The images ``indices`` as one NumPy array, checked."""
        with _in_this_thread():
            batch = self._read(indices)
        where = f"X[{indices[0]}]" if len(indices) == 1 else "X"
        _check_values(batch, where, f" (in the images {_describe(indices)})")
        return batch

    def _read(self, indices: list[int]) -> np.ndarray:
        idx = np.asarray(indices, dtype=np.intp)
        if len(idx) and (np.diff(idx) == 1).all():
            return np.asarray(self.data[int(idx[0]) : int(idx[-1]) + 1])
        unique, inverse = np.unique(idx, return_inverse=True)
        try:
            batch = np.asarray(self.data[unique.tolist()])
        except (TypeError, IndexError, ValueError, NotImplementedError):
            # No list indexing (zarr's basic indexing): one image at a time.
            batch = np.stack([np.asarray(self.data[int(i)]) for i in unique])
        return batch[inverse]


def _in_this_thread() -> contextlib.AbstractContextManager:
    """In a DataLoader worker, dask computes in the worker's own thread.

    A worker is a fork of a process whose dask thread pool may already exist:
    the copy of that pool has no threads, and a compute on it waits forever
    (measured: a dask X with num_workers=2 hung).
    """
    if "dask" in sys.modules and torch.utils.data.get_worker_info() is not None:
        import dask

        return dask.config.set(scheduler="synchronous")
    return contextlib.nullcontext()


def _describe(indices: list[int]) -> str:
    """A short description of a batch's indices, for error messages."""
    if len(indices) > 4:
        return f"X[{indices[0]}], X[{indices[1]}], ..., X[{indices[-1]}]"
    return ", ".join(f"X[{i}]" for i in indices)


def check_images(X: Any) -> np.ndarray | ArrayLikeImages | list:
    """Validate ``X`` without copying or modifying it; return an indexable view.

    Arrays come back as arrays (a read-only view is fine), other array-likes
    with a shape and a dtype (dask, xarray, h5py) as :class:`ArrayLikeImages`,
    read lazily; sequences come back as lists. Raises a ValueError or TypeError
    that names the problem and the fix.
    """
    if isinstance(X, Image.Image):
        raise TypeError(
            "X is a single PIL image; pass a list of images, e.g. X=[image]."
        )
    if isinstance(X, torch.Tensor):
        raise TypeError(
            "X is a torch.Tensor; pass a NumPy array (X.numpy()) in "
            "N x H x W x C layout, values in [0, 255] (uint8) or [0, 1]."
        )
    if isinstance(X, ArrayLikeImages):
        return X  # checked already (a slice of one)
    if hasattr(X, "tocsr") or type(X).__module__.startswith("sparse"):
        raise TypeError(
            f"X is a sparse matrix ({type(X).__name__}); images must be dense: "
            "pass X.toarray() reshaped to N x H x W x C, or a list of paths."
        )
    if hasattr(X, "iloc") and hasattr(X, "to_numpy"):
        X = X.to_numpy()  # a pandas Series or one-column DataFrame of paths
    if not isinstance(X, (np.ndarray, list, tuple)) and hasattr(X, "__array__"):
        if _numeric_array_like(X):
            X = ArrayLikeImages(X)  # read batch by batch, never all at once
            _check_shape(X.shape, X.dtype)
            return X
        X = np.asarray(X)  # e.g. a polars Series of paths
    if isinstance(X, np.ndarray) and X.dtype.kind in "USO":
        # (n,) or (n, 1): what ColumnTransformer passes for a column of paths.
        X = list(X.ravel()) if X.ndim == 1 or X.shape[1:] == (1,) else X
    if isinstance(X, (list, tuple)):
        if len(X) == 0:
            raise ValueError("X is empty: pass at least one image.")
        for i, item in enumerate(X):
            if _is_path(item):
                _check_path_text(item, i)
            elif not isinstance(item, (Image.Image, np.ndarray)):
                raise TypeError(
                    f"X[{i}] is a {type(item).__name__}; a list X must hold file "
                    "paths, PIL images or per-image arrays."
                )
        return list(X)
    if not isinstance(X, np.ndarray):
        raise TypeError(
            f"X must be an array of images or a list of paths or PIL images; "
            f"got {type(X).__name__}."
        )
    _check_shape(X.shape, X.dtype)
    _check_values(X, "X")
    return X


def _numeric_array_like(X: Any) -> bool:
    """An array-like that can be sliced and has a numeric NumPy dtype."""
    if not (hasattr(X, "shape") and hasattr(X, "__getitem__")):
        return False
    try:
        return np.dtype(X.dtype).kind in "iufb"
    except (AttributeError, TypeError):
        return False


def _check_path_text(path: str | os.PathLike, index: int) -> None:
    """Refuse what no file system accepts before any file is opened."""
    if "\0" in str(os.fspath(path)):
        raise ValueError(
            f"X[{index}] is the path {os.fspath(path)!r}, which holds a NUL byte "
            "('\\x00'); no file can have that name. Check how the paths were "
            "built (a C string or a fixed-width field read as text?)."
        )


def _check_shape(shape: tuple[int, ...], dtype: np.dtype) -> None:
    if shape[0:1] == (0,) or 0 in shape:
        raise ValueError(f"X is empty (shape {shape}): pass at least one image.")
    ndim = len(shape)
    if ndim not in (3, 4):
        hint = (
            " A 2-D array looks like tabular data or flattened images: reshape "
            "it to (n_samples, height, width), e.g. X.reshape(-1, 8, 8)."
            if ndim == 2
            else ""
        )
        raise ValueError(
            f"X has {ndim} dimension(s) (shape {shape}); image arrays must be "
            f"N x H x W (grey) or N x H x W x C with C in (1, 3, 4).{hint}"
        )
    if ndim == 3 and shape[-1] in (1, 3, 4):
        # N grey images 1, 3 or 4 pixels wide are far less likely than one
        # colour image, which would otherwise be read as H grey images.
        raise ValueError(
            f"X has shape {shape}: this looks like one image (H x W x C), which "
            f"would be read as {shape[0]} grey images of {shape[1]} x {shape[2]} "
            "pixels. Pass a batch of one, X[None] (shape (1, H, W, C)). If these "
            "really are grey images that narrow, pass X[..., None]."
        )
    if ndim == 4 and shape[-1] not in (1, 3, 4):
        hint = (
            " It looks channels-first: transpose it, X.transpose(0, 2, 3, 1)."
            if shape[1] in (1, 3, 4)
            else ""
        )
        raise ValueError(
            f"X has shape {shape}: the last axis must hold 1, 3 or 4 channels "
            f"(N x H x W x C).{hint}"
        )
    if dtype.kind not in "iuf":
        raise TypeError(
            f"X has dtype {dtype}; images must be uint8 in [0, 255] or float in [0, 1]."
        )


def _check_float(a: np.ndarray, what: str, fix: str) -> None:
    """Float pixels must be finite and in [0, 1] (they are never clipped): a
    ValueError naming ``what`` and, for the range, ``fix`` (formatted with the
    largest magnitude as ``peak``)."""
    if not np.isfinite(a).all():
        raise ValueError(
            f"{what} contains NaN or infinity; images must be finite. Replace or "
            "drop those images."
        )
    lo, hi = float(a.min()), float(a.max())
    if lo < 0.0 or hi > 1.0:
        raise ValueError(
            f"{what} has values in [{lo:g}, {hi:g}]; float images must lie in "
            "[0, 1] (they are not clipped). " + fix.format(peak=max(abs(lo), hi))
        )


def _check_values(a: np.ndarray, name: str, where: str = "") -> None:
    kind = a.dtype.kind
    if kind == "f":
        _check_float(
            a,
            f"The float array {name}{where}",
            f"Divide by the maximum (e.g. {name} / {{peak:g}}) or pass uint8 "
            "values in [0, 255].",
        )
    elif kind in "iu":
        if a.dtype != np.uint8:
            lo, hi = int(a.min()), int(a.max())
            if lo < 0 or hi > 255:
                raise ValueError(
                    f"{name} is an integer array with values in [{lo}, {hi}]"
                    f"{where}; integer images must lie in [0, 255]."
                )
    else:
        raise TypeError(
            f"{name} has dtype {a.dtype}; images must be uint8 in [0, 255] or "
            "float in [0, 1]."
        )


def array_to_tensor(a: np.ndarray, batched: bool) -> torch.Tensor:
    """(H, W) or (H, W, C) array, or a batch of them -> RGB (..., 3, H, W) tensor.

    uint8 stays uint8 (resizing is cheaper there); other integers become uint8,
    floats become float32. Never writes to ``a``.
    """
    dtype = np.uint8 if a.dtype.kind in "iu" else np.float32
    # torch.from_numpy shares memory: copy read-only arrays (torch wants them
    # writable), reversed views such as img[:, ::-1] (torch has no negative
    # strides) and anything that needs a dtype change; never write to them.
    a = np.asarray(a, dtype=dtype)
    if not a.flags.writeable or any(s < 0 for s in a.strides):
        a = a.copy()
    t = torch.from_numpy(a)
    grey_2d = a.ndim == (3 if batched else 2)
    if grey_2d:
        t = t.unsqueeze(-1)
    t = t.movedim(-1, -3)  # channels last -> channels first (a view)
    channels = t.shape[-3]
    if channels == 1:
        t = t.expand(*t.shape[:-3], 3, *t.shape[-2:])
    elif channels == 4:
        t = t[..., :3, :, :]  # drop alpha, as PIL's convert("RGB") does
    return t


def describe_item(item: Any, index: int) -> str:
    """``X[index]``, with the path when it is one, for error messages."""
    return f"X[{index}] ({os.fspath(item)!r})" if _is_path(item) else f"X[{index}]"


def _load_file(path: str | os.PathLike, index: int) -> torch.Tensor:
    """Image file ``X[index]`` -> RGB (3, H, W) tensor, upright.

    The checks before decoding are what makes untrusted files safe; a faster
    decoder (``torchvision.io.decode_jpeg``) must keep them, PIL's pixel limit
    (it has none) and the EXIF orientation (``apply_exif_orientation=True``).
    """
    where = describe_item(path, index)
    _check_path_text(path, index)
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise ValueError(
            f"Image file not found: {where}. Check the path (relative paths are "
            f"resolved from {os.getcwd()!r})."
        ) from None
    except OSError as exc:
        raise ValueError(f"Cannot read image file {where}: {exc}.") from None
    if stat.S_ISDIR(info.st_mode):
        raise ValueError(
            f"Cannot read image file {where}: it is a folder. Pass the image files "
            "in it (load_image_folder lists a folder of class subfolders)."
        )
    if not stat.S_ISREG(info.st_mode):
        # Opening a FIFO blocks until someone writes to it; a device may never end.
        raise ValueError(
            f"{where} is not a regular file (a named pipe, socket or device): "
            "reading it could block forever. Pass image files only."
        )
    im = None
    try:
        im = Image.open(path)
        im.load()
    except Image.DecompressionBombError as exc:
        _close(im)
        raise ValueError(
            f"{where} is too large to decode safely, a possible decompression "
            f"bomb: {exc} If you trust this file, raise PIL.Image.MAX_IMAGE_PIXELS "
            "(or resize the file) before passing it."
        ) from None
    except MemoryError:
        _close(im)
        raise
    except Exception as exc:  # noqa: BLE001 - a corrupt file fails PIL in many ways
        _close(im)
        detail = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        raise ValueError(
            f"Cannot read image file {where}: {detail}. The file is truncated, "
            "corrupt or not an image; remove it or re-export it."
        ) from None
    with im:
        return _pil_to_tensor(im, where)


def _close(im: Image.Image | None) -> None:
    if im is not None:
        im.close()


def _exif_orientation(im: Image.Image) -> int:
    """The EXIF orientation tag (1 = as stored); 1 when the EXIF is unreadable,
    as image viewers do."""
    try:
        return int(im.getexif().get(0x0112, 1))  # 0x0112: Orientation
    except Exception:  # noqa: BLE001 - malformed EXIF must not lose the image
        return 1


def _pil_to_tensor(im: Image.Image, where: str) -> torch.Tensor:
    if _exif_orientation(im) in range(2, 9):
        # Phone photos store the sensor's pixels and the rotation to show them.
        # (Only then: exif_transpose copies the image even when nothing changes.)
        im = ImageOps.exif_transpose(im)
    if im.mode in ("I", "F") or im.mode.startswith("I;"):
        # 16- and 32-bit grey: convert("RGB") would clip at 255.
        return array_to_tensor(_wide_grey(im, where), batched=False)
    if im.mode != "RGB":
        try:
            im = im.convert("RGB")
        except ValueError as exc:
            raise ValueError(
                f"{where} is an image in PIL mode {im.mode!r}, which PIL cannot "
                f"convert to RGB ({exc}). Convert it to 'RGB' or 'L' first."
            ) from None
    return TF.pil_to_tensor(im)


def _wide_grey(im: Image.Image, where: str) -> np.ndarray:
    """A 16- or 32-bit grey PIL image as a float32 array in [0, 1], scaled, not
    clipped; values that cannot be scaled without a guess are refused."""
    a = np.asarray(im)
    if im.mode == "F":
        _check_float(
            a,
            f"{where} is a 32-bit float image (PIL mode 'F') and",
            "Scale it, e.g. np.asarray(image) / {peak:g}, and pass the array.",
        )
        return a.astype(np.float32, copy=False)
    # Integer modes: PIL holds 16-bit PNG, TIFF and PGM files in "I;16*" or "I"
    # (the latter also after most operations on a 16-bit image): read as 16-bit.
    lo, hi = int(a.min()), int(a.max())
    if lo < 0 or hi > 65535:
        raise ValueError(
            f"{where} is a 32-bit integer image (PIL mode {im.mode!r}) with values "
            f"in [{lo}, {hi}]; integer images are read as 16-bit, values 0 to "
            "65535. Scale it to a float array in [0, 1] and pass that."
        )
    return a.astype(np.float32) / np.float32(65535.0)


#: The most pixels an image may have after the preprocessing's resize when that
#: resize enlarges it: 2**24 pixels are 192 MiB as float32 RGB. Only an extreme
#: aspect ratio gets there (a 1 x 5000 image whose shorter side goes to 256 px
#: would be 256 x 1,280,000 pixels, 3.7 GiB). A batch of an array is resized
#: in parts of at most that many pixels.
MAX_RESIZED_PIXELS = 2**24


def check_resize(preprocess: Any, height: int, width: int, where: str) -> int | None:
    """Refuse an image that the preprocessing's resize would blow up.

    Returns the number of pixels the image has after resizing its shorter
    side, or None when the preprocessing does not do that.
    """
    pre = getattr(preprocess, "preprocess", preprocess)  # an augmenting wrapper
    size = getattr(pre, "resize", None)
    if not isinstance(size, int) or height <= 0 or width <= 0:
        return None  # (h, w) or no resize: the output size is fixed or the input's
    scale = size / min(height, width)
    new_h, new_w = max(size, int(height * scale)), max(size, int(width * scale))
    if new_h * new_w > max(MAX_RESIZED_PIXELS, height * width):
        mib = new_h * new_w * 3 * 4 / 2**20
        amount = f"{mib / 1024:.1f} GiB" if mib >= 1024 else f"{mib:.1f} MiB"
        raise ValueError(
            f"{where}: an image of {height} x {width} pixels, whose shorter side "
            f"the preprocessing resizes to {size} pixels: it would become "
            f"{new_h} x {new_w} pixels ({amount} as float32). Its aspect "
            "ratio is too extreme: crop it to a less elongated region first, or "
            "set image_size=(height, width) to resize every image to one size."
        )
    return new_h * new_w


def image_to_tensor(item: Any, index: int) -> torch.Tensor:
    """One element of a list X -> RGB (3, H, W) uint8 or float tensor."""
    if _is_path(item):
        return _load_file(item, index)
    if isinstance(item, Image.Image):
        return _pil_to_tensor(item, f"X[{index}]")
    if item.ndim not in (2, 3) or (item.ndim == 3 and item.shape[-1] not in (1, 3, 4)):
        raise ValueError(
            f"X[{index}] has shape {item.shape}; each image must be H x W or "
            "H x W x C with C in (1, 3, 4)."
        )
    _check_values(item, f"X[{index}]")
    return array_to_tensor(item, batched=False)


class ImageDataset(torch.utils.data.Dataset):
    """Index -> preprocessed (3, h, w) float tensor, for a torch DataLoader.

    ``__getitems__`` lets the DataLoader fetch a whole batch of an array at once,
    so that resizing and normalizing run vectorized instead of per image.
    """

    def __init__(
        self, X: np.ndarray | ArrayLikeImages | list, preprocess: Preprocessing
    ) -> None:
        self.X = X
        self.preprocess = preprocess

    def __len__(self) -> int:
        return len(self.X)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.__getitems__([i])[0]

    def __getitems__(self, indices: list[int]) -> torch.Tensor | WorkerFailure:
        if torch.utils.data.get_worker_info() is None:
            return self._get(indices)
        try:
            return self._get(indices)
        except (ValueError, TypeError, OSError) as exc:
            return WorkerFailure(exc)  # raised as it is by the main process

    def _get(self, indices: list[int]) -> torch.Tensor:
        if isinstance(self.X, (np.ndarray, ArrayLikeImages)):
            batch = (
                self.X[indices]
                if isinstance(self.X, np.ndarray)
                else self.X.read(indices)
            )
            pixels = check_resize(
                self.preprocess, *batch.shape[1:3], _describe(indices)
            )
            images = array_to_tensor(batch, batched=True)
            # Elongated images each below the limit still add up in one batch
            # before the crop: resize at most MAX_RESIZED_PIXELS at a time.
            step = len(images) if pixels is None else MAX_RESIZED_PIXELS // pixels
            if step >= len(images):
                return self.preprocess(images)
            step = max(1, step)
            parts = [
                self.preprocess(images[i : i + step])
                for i in range(0, len(images), step)
            ]
            return torch.cat(parts)
        images = [self._one(i) for i in indices]
        shapes = {tuple(im.shape) for im in images}
        if len(shapes) > 1:
            raise ValueError(
                f"Images differ in size after preprocessing ({sorted(shapes)}); "
                "set image_size (an int or (height, width)) so that they are "
                "resized to one size."
            )
        return torch.stack(images)

    def _one(self, i: int) -> torch.Tensor:
        """Image ``i`` of a list X, checked and preprocessed."""
        image = image_to_tensor(self.X[i], i)
        check_resize(self.preprocess, *image.shape[-2:], describe_item(self.X[i], i))
        return self.preprocess(image)


class WorkerFailure:
    """What a DataLoader worker returns instead of a batch it could not make
    (a bad file, bad values): the main process raises ``error`` as it is.

    Raised in the worker, torch would wrap it in a message holding the worker's
    traceback and, once the iterator is dropped, wait about 5 s per worker to
    shut them down (measured: 10.5 s with 2 workers; 0.4 s this way).
    """

    def __init__(self, error: Exception) -> None:
        self.error = error


def raise_worker_failure(batch: Any) -> None:
    """Raise the error a worker returned as ``batch`` (or as its first item)."""
    first = batch[0] if isinstance(batch, tuple) else batch
    if isinstance(first, WorkerFailure):
        raise first.error


def collate_batch(batch: torch.Tensor) -> torch.Tensor:
    """The dataset already returns a stacked batch."""
    return batch
