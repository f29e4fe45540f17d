"""Turn what users pass as images into preprocessed float tensors.

Accepted inputs: arrays (N, H, W) / (N, H, W, C) of uint8 (or other integers
in [0, 255]), uint16 (divided by 65535) or floats (in [0, 1] unless ``mean``
and ``std`` are given or fitted), array-likes (dask, xarray, h5py, zarr: read
a batch at a time), and sequences of file paths, PIL images or per-image
arrays. Channels: 1, 3 and 4 become RGB (grey repeated, alpha dropped); any
other number is kept as bands (``Preprocessing.bands``: every channel).

Files are untrusted input: a path that is not a regular file, a decompression
bomb or an image whose resize would allocate gigabytes is refused with an
error naming the file and its index in X.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import stat
import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps
from torchvision.transforms.v2 import functional as TF


@dataclass(frozen=True)
class Preprocessing:
    """How an image becomes the network's input.

    ``resize``: None, an int (the shorter side, as torchvision's weights
    transforms do) or ``(h, w)``; ``crop``: None or a centre ``(h, w)``.
    ``mean`` and ``std``: one value per channel, in scaled pixels (uint8 / 255,
    uint16 / 65535). ``bands``: every channel is a band (1 and 4 channels are
    not grey and RGBA). ``unit_floats``: float images must lie in [0, 1].
    """

    resize: int | tuple[int, int] | None
    crop: tuple[int, int] | None
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: TF.InterpolationMode = TF.InterpolationMode.BILINEAR
    bands: bool = False
    unit_floats: bool = True

    @property
    def channels(self) -> int:
        """The number of channels the network takes."""
        return len(self.mean)

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
        """Resize and crop, in the input's dtype (uint8 resizes fastest)."""
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
        """uint8 (divided by 255) or float -> ``(x - mean) / std``, float32: a
        new tensor in the input's memory format, then one fused multiply-add."""
        x = image.to(torch.float32, copy=True)
        div = 255.0 if image.dtype == torch.uint8 else 1.0
        scale = torch.tensor([1.0 / (s * div) for s in self.std])
        shift = torch.tensor([-m / s for m, s in zip(self.mean, self.std, strict=True)])
        c, h, w = x.shape[-3:]
        if x.movedim(-3, -1).is_contiguous():
            # channels_last: rows of W * C values, the factors tiled along them
            # (a long inner loop that vectorizes).
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
    """An array-like ``X`` that is not a NumPy array (dask, xarray, h5py,
    zarr), read and checked one batch at a time: one slice for consecutive
    indices, else sorted unique indices (what h5py requires), reordered here.
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

    def read(self, indices: list[int], unit_floats: bool = True) -> np.ndarray:
        """The images ``indices`` as one NumPy array, checked (floats in [0, 1]
        with ``unit_floats``)."""
        with _in_this_thread():
            batch = self._read(indices)
        where = f"X[{indices[0]}]" if len(indices) == 1 else "X"
        _check_values(
            batch, where, f" (in the images {_describe(indices)})", unit_floats
        )
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
    """In a DataLoader worker, dask computes in the worker's own thread: the
    forked copy of a dask thread pool has no threads and would hang."""
    if "dask" in sys.modules and torch.utils.data.get_worker_info() is not None:
        import dask

        return dask.config.set(scheduler="synchronous")
    return contextlib.nullcontext()


def _describe(indices: list[int]) -> str:
    """A short description of a batch's indices, for error messages."""
    if len(indices) > 4:
        return f"X[{indices[0]}], X[{indices[1]}], ..., X[{indices[-1]}]"
    return ", ".join(f"X[{i}]" for i in indices)


def check_images(
    X: Any, unit_floats: bool = True
) -> np.ndarray | ArrayLikeImages | list:
    """Validate ``X`` without copying it; return arrays as they are, other
    array-likes as :class:`ArrayLikeImages` (read lazily), sequences as lists.
    Errors name the problem and the fix. ``unit_floats``: see ``Preprocessing``.
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
            check_shape(X.shape, X.dtype)
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
    check_shape(X.shape, X.dtype)
    _check_values(X, "X", unit_floats=unit_floats)
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


def check_shape(shape: tuple[int, ...], dtype: np.dtype) -> None:
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
            f"N x H x W (grey) or N x H x W x C (C channels or bands).{hint}"
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
    if ndim == 4 and shape[1] in (1, 3, 4) and shape[-1] > 4:
        # Any number of bands is accepted last; images 1 to 4 pixels tall with
        # more bands than that are a channels-first batch, not bands.
        raise ValueError(
            f"X has shape {shape}: it looks channels-first (N x C x H x W), "
            "which would be read as images of "
            f"{shape[1]} x {shape[2]} pixels with {shape[3]} bands. Transpose "
            "it, X.transpose(0, 2, 3, 1)."
        )
    if dtype.kind not in "iuf":
        raise TypeError(
            f"X has dtype {dtype}; images must be uint8 in [0, 255], uint16 or float."
        )


def _check_float(a: np.ndarray, what: str, fix: str) -> None:
    """Float pixels must be finite and in [0, 1] (never clipped); ``fix`` is
    formatted with the largest magnitude as ``peak``."""
    _check_finite(a, what)
    lo, hi = float(a.min()), float(a.max())
    if lo < 0.0 or hi > 1.0:
        raise ValueError(
            f"{what} has values in [{lo:g}, {hi:g}]; float images must lie in "
            "[0, 1] (they are not clipped). " + fix.format(peak=max(abs(lo), hi))
        )


def _check_values(
    a: np.ndarray, name: str, where: str = "", unit_floats: bool = True
) -> None:
    kind = a.dtype.kind
    if kind == "f":
        if not unit_floats:
            _check_finite(a, f"The float array {name}{where}")
            return
        _check_float(
            a,
            f"The float array {name}{where}",
            f"Divide by the maximum (e.g. {name} / {{peak:g}}), pass uint8 "
            "values in [0, 255], or set mean and std (one value per band, or "
            "mean='fit', std='fit') for values in any range.",
        )
    elif kind in "iu":
        if a.dtype == np.uint16 and a.size and int(a.max()) <= 255:
            warnings.warn(
                f"{name} is uint16 with values in [0, 255]{where}: uint16 is read "
                "as 16-bit (divided by 65535), which makes these images nearly "
                f"black. If they hold 8-bit values, pass {name}.astype(np.uint8).",
                UserWarning,
                stacklevel=4,
            )
        if a.dtype not in (np.uint8, np.uint16):
            lo, hi = int(a.min()), int(a.max())
            if lo < 0 or hi > 255:
                fix = (
                    f" For 16-bit values pass {name}.astype(np.uint16)."
                    if lo >= 0 and hi <= 65535
                    else " Pass a float array (with mean and std, or "
                    "mean='fit', std='fit')."
                )
                raise ValueError(
                    f"{name} is an integer array ({a.dtype}) with values in "
                    f"[{lo}, {hi}]{where}; integer images must lie in [0, 255] "
                    f"(uint8) or be uint16 (16-bit, divided by 65535).{fix}"
                )
    else:
        raise TypeError(
            f"{name} has dtype {a.dtype}; images must be uint8 in [0, 255], "
            "uint16 or float."
        )


def _check_finite(a: np.ndarray, what: str) -> None:
    if not np.isfinite(a).all():
        raise ValueError(
            f"{what} contains NaN or infinity; images must be finite. Replace or "
            "drop those images (or fill the missing pixels, e.g. with "
            "np.nan_to_num)."
        )


def array_to_tensor(a: np.ndarray, batched: bool, bands: bool = False) -> torch.Tensor:
    """(H, W) or (H, W, C) array, or a batch of them -> (..., C', H, W) tensor.

    1, 3 and 4 channels become RGB unless ``bands``; others stay bands. uint8
    stays uint8, uint16 becomes float32 / 65535, other integers uint8, floats
    float32. Never writes to ``a``.
    """
    if a.dtype == np.uint16:
        t = torch.from_numpy(a.astype(np.float32) / np.float32(65535.0))
        return _channels_first(t, a.ndim == (3 if batched else 2), bands)
    dtype = np.uint8 if a.dtype.kind in "iu" else np.float32
    # torch.from_numpy shares memory: copy read-only arrays and reversed views
    # (torch has no negative strides).
    a = np.asarray(a, dtype=dtype)
    if not a.flags.writeable or any(s < 0 for s in a.strides):
        a = a.copy()
    t = torch.from_numpy(a)
    return _channels_first(t, a.ndim == (3 if batched else 2), bands)


def _channels_first(t: torch.Tensor, grey_2d: bool, bands: bool) -> torch.Tensor:
    if grey_2d:
        t = t.unsqueeze(-1)
    t = t.movedim(-1, -3)  # channels last -> channels first (a view)
    channels = t.shape[-3]
    if bands:
        return t
    if channels == 1:
        t = t.expand(*t.shape[:-3], 3, *t.shape[-2:])
    elif channels == 4:
        t = t[..., :3, :, :]  # drop alpha, as PIL's convert("RGB") does
    return t


def describe_item(item: Any, index: int) -> str:
    """``X[index]``, with the path when it is one, for error messages."""
    return f"X[{index}] ({os.fspath(item)!r})" if _is_path(item) else f"X[{index}]"


def _load_file(
    path: str | os.PathLike, index: int, unit_floats: bool = True, bands: bool = False
) -> torch.Tensor:
    """Image file ``X[index]`` -> (C, H, W) tensor, upright (as
    :func:`array_to_tensor`). The checks before decoding make untrusted files
    safe: a faster decoder must keep them, PIL's pixel limit and the EXIF
    orientation."""
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
    if os.fspath(path).lower().endswith(_TIFF_SUFFIXES):
        a = _read_tiff(path, where)
        if a is not None:
            _check_values(a, where, unit_floats=unit_floats)
            return array_to_tensor(a, batched=False, bands=bands)
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
        hint = (
            " A multi-band TIFF needs tifffile: pip install 'sklearn-cnn[tiff]'."
            if os.fspath(path).lower().endswith(_TIFF_SUFFIXES)
            else ""
        )
        raise ValueError(
            f"Cannot read image file {where}: {detail}. The file is truncated, "
            f"corrupt or not an image; remove it or re-export it.{hint}"
        ) from None
    with im:
        return _pil_to_tensor(im, where, bands, unit_floats)


_TIFF_SUFFIXES = (".tif", ".tiff")


def _read_tiff(path: str | os.PathLike, where: str) -> np.ndarray | None:
    """A TIFF file as one (H, W) or (H, W, bands) array, read by tifffile
    (None without it, or for grey: PIL reads it). The layout comes from the
    file's axes (YXS, SYX, CYX); pages of unknown meaning are refused."""
    try:
        import tifffile
    except ImportError:
        return None
    try:
        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            axes, a = series.axes, series.asarray()
    except Exception as exc:  # noqa: BLE001 - a corrupt file fails in many ways
        raise ValueError(
            f"Cannot read TIFF file {where}: {type(exc).__name__}: {exc}. The "
            "file is truncated, corrupt or not a TIFF; remove it or re-export it."
        ) from None
    keep = [i for i, n in enumerate(a.shape) if n != 1 or axes[i] in "YX"]
    a, axes = a.reshape([a.shape[i] for i in keep]), "".join(axes[i] for i in keep)
    if axes == "YX":
        return None  # grey: PIL reads it (16- and 32-bit modes included)
    if a.dtype.kind in "iu" and a.dtype not in (np.uint8, np.uint16):
        lo, hi = int(a.min()), int(a.max())
        if lo < 0 or hi > 65535:
            raise ValueError(
                f"{where} is a TIFF of {a.dtype} values in [{lo}, {hi}]; integer "
                "images are read as 16-bit, values 0 to 65535. Scale it to a "
                "float array and pass that (with mean and std, or mean='fit')."
            )
        a = a.astype(np.uint16)  # as PIL's 32-bit mode "I" is read
    if axes == "YXS":
        return a
    if axes in ("SYX", "CYX"):
        return np.moveaxis(a, 0, -1)
    raise ValueError(
        f"{where} is a TIFF holding an array of shape {a.shape} with axes "
        f"{axes!r}, not one image of H x W (x bands): "
        + (
            "its pages could hold the bands first or last. "
            if axes in ("QYX", "IYX", "ZYX")
            else "it holds several images or planes. "
        )
        + "Write one image per file with its layout: tifffile.imwrite(path, "
        "image, photometric='minisblack', planarconfig='contig') for an "
        "(H, W, bands) array, or planarconfig='separate' for (bands, H, W)."
    )


def _close(im: Image.Image | None) -> None:
    if im is not None:
        im.close()


def _exif_orientation(im: Image.Image) -> int:
    """The EXIF orientation tag (1 = as stored, or unreadable)."""
    try:
        return int(im.getexif().get(0x0112, 1))  # 0x0112: Orientation
    except Exception:  # noqa: BLE001 - malformed EXIF must not lose the image
        return 1


def _pil_to_tensor(
    im: Image.Image, where: str, bands: bool = False, unit_floats: bool = True
) -> torch.Tensor:
    if _exif_orientation(im) in range(2, 9):  # exif_transpose always copies
        im = ImageOps.exif_transpose(im)
    if im.mode in ("I", "F") or im.mode.startswith("I;"):
        # 16- and 32-bit grey: convert("RGB") would clip at 255.
        grey = _wide_grey(im, where, unit_floats)
        return array_to_tensor(grey, batched=False, bands=bands)
    if bands and im.mode in ("L", "LA", "RGB", "RGBA"):
        # Every channel a band: grey stays one band, alpha is a band.
        return array_to_tensor(np.asarray(im), batched=False, bands=True)
    if im.mode != "RGB":
        try:
            im = im.convert("RGB")
        except ValueError as exc:
            raise ValueError(
                f"{where} is an image in PIL mode {im.mode!r}, which PIL cannot "
                f"convert to RGB ({exc}). Convert it to 'RGB' or 'L' first."
            ) from None
    return TF.pil_to_tensor(im)


def _wide_grey(im: Image.Image, where: str, unit_floats: bool = True) -> np.ndarray:
    """A 16- or 32-bit grey PIL image as a float32 array in [0, 1], scaled, not
    clipped (floats in any range without ``unit_floats``)."""
    a = np.asarray(im)
    if im.mode == "F" and not unit_floats:
        _check_finite(a, f"{where} is a 32-bit float image (PIL mode 'F') and")
        return a.astype(np.float32, copy=False)
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


#: The most pixels an image may have after a resize that enlarges it (192 MiB
#: as float32 RGB: only an extreme aspect ratio gets there); a batch of an
#: array is resized in parts of at most that many pixels.
MAX_RESIZED_PIXELS = 2**24


def check_resize(preprocess: Any, height: int, width: int, where: str) -> int | None:
    """Refuse an image that the preprocessing's resize would blow up; return
    its pixels after resizing its shorter side (None: no such resize)."""
    size = getattr(fitted_preprocessing(preprocess), "resize", None)
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


def image_to_tensor(
    item: Any, index: int, unit_floats: bool = True, bands: bool = False
) -> torch.Tensor:
    """One element of a list X -> (C, H, W) tensor (see :func:`array_to_tensor`)."""
    if _is_path(item):
        return _load_file(item, index, unit_floats, bands)
    if isinstance(item, Image.Image):
        return _pil_to_tensor(item, f"X[{index}]", bands, unit_floats)
    if item.ndim not in (2, 3) or (
        item.ndim == 3 and item.shape[0] in (1, 3, 4) and item.shape[-1] > 4
    ):
        raise ValueError(
            f"X[{index}] has shape {item.shape}; each image must be H x W or "
            "H x W x C (C channels or bands, last)."
        )
    _check_values(item, f"X[{index}]", unit_floats=unit_floats)
    return array_to_tensor(item, batched=False, bands=bands)


def fitted_preprocessing(preprocess: Any) -> Any:
    """The :class:`Preprocessing` of ``preprocess`` (an augmenting wrapper's)."""
    return getattr(preprocess, "preprocess", preprocess)


def check_channels(images: torch.Tensor, preprocess: Any, where: str) -> None:
    """Refuse images whose channels are not those the network was fitted on."""
    pre = fitted_preprocessing(preprocess)
    expected = getattr(pre, "channels", 3)
    got = images.shape[-3]
    if got == expected:
        return

    def what(n: int) -> str:
        rgb = n == 3 and not getattr(pre, "bands", False)
        return "RGB images (3 channels)" if rgb else f"images of {n} bands"

    raise ValueError(
        f"{where}: {what(got)}, but the network was fitted on {what(expected)}. "
        "Pass images with the channels fit saw, in the same order, or fit "
        "again on these."
        + (
            " (1, 3 and 4 channels are read as grey, RGB and RGBA; with "
            "bands='all' every channel is a band.)"
            if got == 3 or expected == 3
            else ""
        )
    )


def array_batches(
    X: np.ndarray | ArrayLikeImages, size: int, unit_floats: bool
) -> Iterator[np.ndarray]:
    """The images of an array ``X``, ``size`` at a time, as their pixels are."""
    for start in range(0, len(X), size):
        if isinstance(X, np.ndarray):
            yield X[start : start + size]
        else:
            yield X.read(list(range(start, min(start + size, len(X)))), unit_floats)


def band_statistics(
    X: np.ndarray | ArrayLikeImages | list, bands: bool = False
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The mean and standard deviation of each channel over every pixel of
    ``X``, in scaled units, accumulated in float64 a batch at a time (a
    constant channel gets a standard deviation of 1)."""
    total = squares = None
    count = 0

    def add(t: torch.Tensor) -> None:
        nonlocal total, squares, count
        x = t.to(torch.float64)
        if t.dtype == torch.uint8:
            x = x / 255.0
        x = x.movedim(-3, 0).reshape(x.shape[-3], -1)
        s, q = x.sum(1), (x * x).sum(1)
        if total is not None and len(s) != len(total):
            raise ValueError(
                f"X holds images of {len(total)} and of {len(s)} channels; "
                "every image must have the same channels (or bands)."
            )
        total = s if total is None else total + s
        squares = q if squares is None else squares + q
        count += x.shape[1]

    if isinstance(X, (np.ndarray, ArrayLikeImages)):
        for batch in array_batches(X, 64, unit_floats=False):
            add(array_to_tensor(batch, batched=True, bands=bands))
    else:
        for i, item in enumerate(X):
            add(image_to_tensor(item, i, unit_floats=False, bands=bands))
    mean = total / count
    std = (squares / count - mean * mean).clamp_min(0).sqrt()
    std = torch.where(std > 1e-12, std, torch.ones_like(std))
    return tuple(mean.tolist()), tuple(std.tolist())


class ImageDataset(torch.utils.data.Dataset):
    """Index -> preprocessed (C, h, w) float tensor, for a torch DataLoader;
    ``__getitems__`` preprocesses a batch of an array at once."""

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
        pre = fitted_preprocessing(self.preprocess)
        bands = getattr(pre, "bands", False)
        if isinstance(self.X, (np.ndarray, ArrayLikeImages)):
            batch = (
                self.X[indices]
                if isinstance(self.X, np.ndarray)
                else self.X.read(indices, getattr(pre, "unit_floats", True))
            )
            pixels = check_resize(
                self.preprocess, *batch.shape[1:3], _describe(indices)
            )
            images = array_to_tensor(batch, batched=True, bands=bands)
            check_channels(images, pre, "X")
            # Elongated images still add up in one batch before the crop.
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
        pre = fitted_preprocessing(self.preprocess)
        image = image_to_tensor(
            self.X[i],
            i,
            getattr(pre, "unit_floats", True),
            getattr(pre, "bands", False),
        )
        check_channels(image, pre, describe_item(self.X[i], i))
        check_resize(self.preprocess, *image.shape[-2:], describe_item(self.X[i], i))
        return self.preprocess(image)


class WorkerFailure:
    """What a DataLoader worker returns instead of a batch it could not make:
    the main process raises ``error`` as it is (raised in the worker, torch
    would wrap it, and wait seconds per worker to shut them down)."""

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


def _first_image(X: Any, unit_floats: bool, bands: bool) -> torch.Tensor:
    """The first image of ``X`` (as :func:`check_images` returns it), as the
    network's preprocessing receives it: (C, H, W)."""
    if isinstance(X, (np.ndarray, ArrayLikeImages)):
        first = next(array_batches(X, 1, unit_floats))[0]
        return array_to_tensor(first, batched=False, bands=bands)
    return image_to_tensor(X[0], 0, unit_floats, bands)


def band_preprocessing(
    pre: Preprocessing, X: Any, bands: bool, mean: Any, std: Any
) -> Preprocessing:
    """``pre`` for the channels of the images of ``X``, given the estimator's
    ``mean`` and ``std``: None (the weights' RGB values, repeated over bands
    as the "repeat" stem repeats filters, averaged for one band), one value
    per channel, or "fit" (:func:`band_statistics`)."""
    unit_floats = mean is None and std is None
    n = _first_image(X, unit_floats, bands).shape[-3]
    stats = None
    if "fit" in (mean, std):
        stats = band_statistics(X, bands)

    def per_band(given: Any, values: tuple[float, ...], name: str, fitted: Any):
        if isinstance(given, str):
            return fitted
        if len(values) == n:
            return values
        if given is None:
            if n == 1:
                return (sum(values) / len(values),)
            return tuple(values[i % len(values)] for i in range(n))
        raise ValueError(
            f"{name} has {len(values)} value(s) but the images have {n} "
            f"{'channels' if n == 3 else 'bands'}: give one value per band, or "
            f"{name}='fit' to estimate them from the training images."
        )

    return dataclasses.replace(
        pre,
        mean=per_band(mean, pre.mean, "mean", stats and stats[0]),
        std=per_band(std, pre.std, "std", stats and stats[1]),
        bands=bands,
        unit_floats=unit_floats,
    )
