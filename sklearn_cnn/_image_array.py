"""ImageArray: images that cross-validation indexes without copying, and
whose digests the activation cache (``memory=``) computes once."""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any

import numpy as np


class ImageArray:
    """Images that a search's folds share instead of copying.

    ``GridSearchCV``, ``cross_validate`` and the like copy the rows of a NumPy
    ``X`` for every fit and every score, and a transformer with ``memory=``
    reads every copy again to recognise its images. An ImageArray holds one
    read-only copy of the images: indexing it, as scikit-learn does for each
    fold, gives a view that shares them, and each image's digest for the cache
    is computed once for all views.

    Use it where ``X`` is a NumPy array of large images and a search or
    cross-validation runs with ``memory=``; the estimators take it wherever
    they take an array, and give the same results.

    Parameters
    ----------
    images : array-like of shape (n_images, height, width[, channels])
        The images, copied once. Changing ``images`` afterwards does not
        change the ImageArray (so the digests it keeps stay true).

    Attributes
    ----------
    shape : tuple of int
        ``(n_images, height, width[, channels])`` of this view.
    dtype : numpy.dtype
        The images' dtype.

    See Also
    --------
    CNNFeatureTransformer : Its ``memory`` caches activations by image digest.

    Examples
    --------
    >>> import numpy as np
    >>> from sklearn_cnn import ImageArray
    >>> X = ImageArray(np.zeros((10, 64, 64, 3), np.uint8))
    >>> X.shape, X[[0, 2, 4]].shape
    ((10, 64, 64, 3), (3, 64, 64, 3))
    >>> np.asarray(X[1:3]).shape
    (2, 64, 64, 3)
    """

    def __init__(self, images: Any) -> None:
        base = np.array(images)  # its own copy: nobody else can write to it
        if base.ndim < 3:
            raise ValueError(
                f"ImageArray takes images of shape (n_images, height, width[, "
                f"channels]); got an array of shape {base.shape}."
            )
        base.flags.writeable = False
        self._base = base
        self._rows: np.ndarray | None = None  # None: all of _base, in order
        # Per-image values computed once for every view (see ``memoized``).
        self._memo: dict[Hashable, dict[int, Any]] = {}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._base.flags.writeable = False  # pickle does not keep the flag

    def _view(self, rows: np.ndarray) -> ImageArray:
        view = object.__new__(ImageArray)
        view._base, view._rows, view._memo = self._base, rows, self._memo
        return view

    @property
    def rows(self) -> np.ndarray:
        """The indices of this view's images in the images first given."""
        if self._rows is None:
            return np.arange(len(self._base))
        return self._rows

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self), *self._base.shape[1:])

    @property
    def dtype(self) -> np.dtype:
        return self._base.dtype

    @property
    def ndim(self) -> int:
        return self._base.ndim

    def __len__(self) -> int:
        return len(self._base) if self._rows is None else len(self._rows)

    def __getitem__(self, key: Any) -> Any:
        """An integer gives one image (read-only); a slice, an index array or
        a boolean mask gives a view that shares the images."""
        if isinstance(key, tuple):  # X[rows, ...], as scikit-learn indexes
            key, *rest = key
            if not all(k is Ellipsis or k == slice(None) for k in rest):
                raise IndexError(
                    "ImageArray is indexed along its images only (X[rows] or "
                    "X[rows, ...]); np.asarray(X) gives a NumPy array."
                )
        if isinstance(key, (int, np.integer)):
            return self._base[self.rows[key]]
        return self._view(self.rows[key])

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        images = self._base if self._rows is None else self._base[self._rows]
        return images if dtype is None else images.astype(dtype)

    def __repr__(self) -> str:
        shared = "" if self._rows is None else f", a view of {len(self._base)}"
        return f"ImageArray(shape={self.shape}, dtype={self.dtype}{shared})"

    @property
    def images(self) -> np.ndarray:
        """All the images first given, read-only (views share them)."""
        return self._base

    def memoized(self, key: Hashable, compute: Callable[[list[int]], list]) -> list:
        """One value per image of this view, computed once for all views:
        ``compute(rows)`` gives those of ``images[rows]``, ``key`` names them."""
        table = self._memo.setdefault(key, {})
        rows = self.rows.tolist()
        missing = [r for r in dict.fromkeys(rows) if r not in table]
        for start in range(0, len(missing), 64):  # bounded memory per call
            chunk = missing[start : start + 64]
            table.update(zip(chunk, compute(chunk), strict=True))
        return [table[r] for r in rows]
