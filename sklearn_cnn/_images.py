"""Turn what users pass as images into preprocessed float tensors.

Accepted inputs: uint8 or integer arrays (N, H, W) / (N, H, W, C) with values in
[0, 255], float arrays with values in [0, 1], and sequences of file paths, PIL
images or per-image arrays (which may differ in size). Every image becomes RGB.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
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
        if self.resize is not None:
            size = (
                list(self.resize) if isinstance(self.resize, tuple) else [self.resize]
            )
            image = TF.resize(
                image, size, interpolation=self.interpolation, antialias=True
            )
        if self.crop is not None:
            image = TF.center_crop(image, list(self.crop))
        if image.dtype == torch.uint8:
            image = image.float().div_(255.0)
        else:
            image = image.float()
        return TF.normalize(image, list(self.mean), list(self.std))


def _is_path(x: Any) -> bool:
    return isinstance(x, (str, os.PathLike))


def check_images(X: Any) -> np.ndarray | list:
    """Validate ``X`` without copying or modifying it; return an indexable view.

    Arrays come back as arrays (a read-only view is fine), sequences as lists.
    Raises a ValueError or TypeError that names the problem and the fix.
    """
    if isinstance(X, Image.Image):
        raise TypeError(
            "X is a single PIL image; pass a list of images, e.g. X=[image]."
        )
    if hasattr(X, "to_numpy") and not isinstance(X, np.ndarray):
        X = X.to_numpy()  # a pandas Series or one-column DataFrame of paths
    if isinstance(X, np.ndarray) and X.dtype.kind in "USO":
        # (n,) or (n, 1): what ColumnTransformer passes for a column of paths.
        X = list(X.ravel()) if X.ndim == 1 or X.shape[1:] == (1,) else X
    if isinstance(X, (list, tuple)):
        if len(X) == 0:
            raise ValueError("X is empty: pass at least one image.")
        for i, item in enumerate(X):
            if not (_is_path(item) or isinstance(item, (Image.Image, np.ndarray))):
                raise TypeError(
                    f"X[{i}] is a {type(item).__name__}; a list X must hold file "
                    "paths, PIL images or per-image arrays."
                )
        return list(X)
    if not isinstance(X, np.ndarray):
        if isinstance(X, torch.Tensor):
            raise TypeError(
                "X is a torch.Tensor; pass a NumPy array (X.numpy()) in "
                "N x H x W x C layout, values in [0, 255] (uint8) or [0, 1]."
            )
        raise TypeError(
            f"X must be an array of images or a list of paths or PIL images; "
            f"got {type(X).__name__}."
        )
    if X.shape[0:1] == (0,) or X.size == 0:
        raise ValueError(f"X is empty (shape {X.shape}): pass at least one image.")
    if X.ndim not in (3, 4):
        hint = (
            " A 2-D array looks like tabular data or flattened images: reshape "
            "it to (n_samples, height, width), e.g. X.reshape(-1, 8, 8)."
            if X.ndim == 2
            else ""
        )
        raise ValueError(
            f"X has {X.ndim} dimension(s) (shape {X.shape}); image arrays must be "
            f"N x H x W (grey) or N x H x W x C with C in (1, 3, 4).{hint}"
        )
    if X.ndim == 4 and X.shape[-1] not in (1, 3, 4):
        hint = (
            " It looks channels-first: transpose it, X.transpose(0, 2, 3, 1)."
            if X.shape[1] in (1, 3, 4)
            else ""
        )
        raise ValueError(
            f"X has shape {X.shape}: the last axis must hold 1, 3 or 4 channels "
            f"(N x H x W x C).{hint}"
        )
    _check_values(X, "X")
    return X


def _check_values(a: np.ndarray, name: str) -> None:
    kind = a.dtype.kind
    if kind == "f":
        if not np.isfinite(a).all():
            raise ValueError(
                f"{name} contains NaN or infinity; images must be finite. "
                "Replace or drop those images."
            )
        lo, hi = float(a.min()), float(a.max())
        if lo < 0.0 or hi > 1.0:
            raise ValueError(
                f"{name} is a float array with values in [{lo:g}, {hi:g}]; float "
                "images must be scaled to [0, 1]. Divide by the maximum "
                f"(e.g. {name} / {hi:g}) or pass uint8 values in [0, 255]."
            )
    elif kind in "iu":
        if a.dtype != np.uint8:
            lo, hi = int(a.min()), int(a.max())
            if lo < 0 or hi > 255:
                raise ValueError(
                    f"{name} is an integer array with values in [{lo}, {hi}]; "
                    "integer images must lie in [0, 255]."
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


def _load_file(path: str | os.PathLike) -> torch.Tensor:
    try:
        with Image.open(path) as im:
            return _pil_to_tensor(im)
    except FileNotFoundError:
        raise ValueError(
            f"Image file not found: {os.fspath(path)!r}. Check the path (relative "
            f"paths are resolved from {os.getcwd()!r})."
        ) from None
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise ValueError(
            f"Cannot read image file {os.fspath(path)!r}: {exc}. The file is "
            "missing, truncated or not an image; remove it or re-export it."
        ) from None


def _pil_to_tensor(im: Image.Image) -> torch.Tensor:
    if im.mode.startswith("I;16"):
        # 16-bit grey (PNG, TIFF): convert("RGB") would clip it at 255.
        grey = np.asarray(im).astype(np.float32) / 65535.0
        return array_to_tensor(grey, batched=False)
    if im.mode != "RGB":
        im = im.convert("RGB")
    return TF.pil_to_tensor(im)


def image_to_tensor(item: Any, index: int) -> torch.Tensor:
    """One element of a list X -> RGB (3, H, W) uint8 or float tensor."""
    if _is_path(item):
        return _load_file(item)
    if isinstance(item, Image.Image):
        return _pil_to_tensor(item)
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

    def __init__(self, X: np.ndarray | list, preprocess: Preprocessing) -> None:
        self.X = X
        self.preprocess = preprocess

    def __len__(self) -> int:
        return len(self.X)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.__getitems__([i])[0]

    def __getitems__(self, indices: list[int]) -> torch.Tensor:
        if isinstance(self.X, np.ndarray):
            return self.preprocess(array_to_tensor(self.X[indices], batched=True))
        images = [self.preprocess(image_to_tensor(self.X[i], i)) for i in indices]
        shapes = {tuple(im.shape) for im in images}
        if len(shapes) > 1:
            raise ValueError(
                f"Images differ in size after preprocessing ({sorted(shapes)}); "
                "set image_size (an int or (height, width)) so that they are "
                "resized to one size."
            )
        return torch.stack(images)


def collate_batch(batch: torch.Tensor) -> torch.Tensor:
    """The dataset already returns a stacked batch."""
    return batch
