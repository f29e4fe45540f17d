"""Labels, class and sample weights, and the validation split of
FineTuneClassifier (``class_weight``, ``validation_fraction``, ``sample_weight``)."""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
from sklearn.model_selection import train_test_split
from sklearn.utils.class_weight import compute_class_weight
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import _check_sample_weight, column_or_1d

#: Fewest validation images that selection trusts (below, one image moves the
#: accuracy by over 5 points).
MIN_VALIDATION = 20


def check_targets(y: Any, n_images: int) -> tuple[np.ndarray, np.ndarray]:
    """Validate class labels; return the classes and the encoded labels."""
    if y is None:
        raise ValueError(
            "FineTuneClassifier.fit needs labels: pass y, one class label per image."
        )
    y = column_or_1d(y, warn=True)
    if len(y) != n_images:
        raise ValueError(
            f"X has {n_images} images but y has {len(y)} labels: pass one label "
            "per image, in the same order."
        )
    if y.dtype.kind == "f":
        missing = np.flatnonzero(np.isnan(y))
    elif y.dtype.kind == "O":
        missing = np.flatnonzero(
            [v is None or (isinstance(v, float) and v != v) for v in y]
        )
    else:
        missing = np.array([], dtype=int)
    if len(missing):
        raise ValueError(
            f"y has {len(missing)} missing label(s) (NaN or None), at positions "
            f"{missing[:5].tolist()}{' ...' if len(missing) > 5 else ''}. Drop "
            "those images or fill their labels in."
        )
    check_classification_targets(y)
    try:
        classes, encoded = np.unique(y, return_inverse=True)
    except TypeError:
        raise ValueError(
            "y mixes label types (e.g. strings and numbers) that cannot be "
            "sorted; use one type for every label."
        ) from None
    if len(classes) < 2:
        raise ValueError(
            f"y has a single class ({classes[0]!r}); a classifier needs at least "
            "2 classes. Add images of another class."
        )
    return classes, encoded.reshape(-1).astype(np.int64)


def check_sample_weight(sample_weight: Any, n_images: int) -> np.ndarray | None:
    """None, or one finite non-negative float64 weight per image (not all zero)."""
    if sample_weight is None:
        return None
    weights = _check_sample_weight(
        sample_weight,
        np.empty((n_images, 1)),
        dtype=np.float64,
        ensure_non_negative=True,
    )
    if not weights.any():
        raise ValueError("sample_weight is zero for every image: nothing to fit.")
    return weights


def class_weights(
    class_weight: Any, classes: np.ndarray, y: np.ndarray
) -> np.ndarray | None:
    """One weight per class (``class_weight`` as in LogisticRegression), or
    None; ``y`` is encoded (the training images')."""
    if class_weight is None:
        return None
    if isinstance(class_weight, dict):
        unknown = [k for k in class_weight if k not in set(classes.tolist())]
        if unknown:
            raise ValueError(
                f"class_weight has keys that are not classes of y: {unknown}. "
                f"The classes are {classes.tolist()}."
            )
    return compute_class_weight(class_weight, classes=classes, y=classes[y])


def validation_split(
    y: np.ndarray, n_classes: int, fraction: float | None, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Sorted training and validation indices, stratified by class: at least
    ``ceil(fraction * n)`` and one per class; none, with a warning, for data
    too small (fewer than ``MIN_VALIDATION``, or a class of one image)."""
    index = np.arange(len(y))
    if not fraction:
        return index, index[:0]
    counts = np.bincount(y, minlength=n_classes)
    n_val = max(math.ceil(fraction * len(y)), n_classes)
    if n_val < MIN_VALIDATION or counts.min() < 2 or len(y) - n_val < n_classes:
        warnings.warn(
            f"validation_fraction={fraction} leaves {n_val} validation image(s) "
            f"of {len(y)} ({n_classes} classes, the smallest with {counts.min()} "
            f"image(s)); selecting epochs needs at least {MIN_VALIDATION} and two "
            "images of every class. Training on all the images and keeping the "
            "last epoch; pass validation_fraction=None to say so, or more images.",
            UserWarning,
            stacklevel=6,  # the caller of the estimator's fit (through its task)
        )
        return index, index[:0]
    train, val = train_test_split(index, test_size=n_val, stratify=y, random_state=seed)
    return np.sort(train), np.sort(val)


def example_weights(
    y: np.ndarray, class_weight: np.ndarray | None, sample_weight: np.ndarray | None
) -> np.ndarray | None:
    """Each image's weight in the loss: its class weight times its sample weight."""
    if class_weight is None and sample_weight is None:
        return None
    w = np.ones(len(y)) if class_weight is None else class_weight[y]
    return w if sample_weight is None else w * sample_weight
