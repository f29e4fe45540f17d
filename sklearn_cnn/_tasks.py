"""What one kind of fine-tuning decides, for the fit that the estimators share
(``_finetune.FineTuneBase``): how the targets are encoded and split, the loss
and the validation score that selection maximises, the probe head, what a
network that learned nothing scores (for the wreck guard), calibration, and
how the head's outputs become predictions.

- :class:`SingleLabel`: one class per image (FineTuneClassifier with labels
  of shape (n,)): cross-entropy, accuracy, a logistic-regression probe.
- :class:`Regression`: one or several numbers per image (FineTuneRegressor):
  targets standardised inside, squared, Huber or absolute error, R², a ridge
  probe with its alpha chosen by efficient leave-one-out.

A task is built from the estimator's parameters and, once fitted, from its
fitted attributes (``fitted_attributes``): it is never stored itself, so that
the estimators save, load and pickle as plain values.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
import torch
from sklearn import config_context
from sklearn.linear_model import RidgeCV
from sklearn.metrics import average_precision_score, precision_recall_curve
from sklearn.model_selection import KFold, StratifiedKFold
from sklearn.utils.validation import check_array
from torch.nn import functional as F

from ._head import calibration, fit_binary_temperature, fit_probe, scalings
from ._targets import (
    MIN_VALIDATION,
    check_targets,
    class_weights,
    example_weights,
    validation_split,
)
from ._training import Loss, chance_accuracy, chance_loss


def random_split(
    n: int, fraction: float | None, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Sorted training and validation indices, not stratified (targets that
    are numbers or sets of labels); fewer than ``MIN_VALIDATION`` validation
    images train on everything, with a warning."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        split = validation_split(np.zeros(n, np.int64), 1, fraction, seed)
    if caught:
        n_val = max(math.ceil((fraction or 0) * n), 1)
        warnings.warn(
            f"validation_fraction={fraction} leaves {n_val} validation "
            f"image(s) of {n}; selecting epochs needs at least {MIN_VALIDATION}. "
            "Training on all the images and keeping the last epoch; pass "
            "validation_fraction=None to say so, or more images.",
            UserWarning,
            stacklevel=6,  # the caller of the estimator's fit
        )
    return split


class _Labels:
    """What the classification tasks share: ``class_weight``,
    ``label_smoothing``, and ``classes`` once fitted (None before)."""

    def __init__(
        self, class_weight: Any, label_smoothing: float, classes: np.ndarray | None
    ) -> None:
        self.class_weight, self.label_smoothing = class_weight, label_smoothing
        self.classes = classes

    @property
    def n_outputs(self) -> int:
        return len(self.classes)


class SingleLabel(_Labels):
    """One class per image; ``classes`` sorted."""

    metric = "valid_accuracy"
    #: How the wreck guard names the validation score and its floor.
    names = ("validation accuracy", "largest class")

    def encode(self, y: Any, n_images: int) -> np.ndarray:
        """Encoded labels; the classes are learned unless already fitted (a
        warm start), when they must be the same."""
        classes, encoded = check_targets(y, n_images)
        if self.classes is not None and not np.array_equal(classes, self.classes):
            raise ValueError(
                f"warm_start=True but y has the classes {classes.tolist()} while the "
                f"fitted classifier has {self.classes.tolist()}. Fit with the same "
                "classes, or set warm_start=False to start over."
            )
        self.classes = classes
        return encoded

    def fitted_attributes(self) -> dict[str, Any]:
        return {"classes_": self.classes, "_multilabel": False}

    def split(
        self, y: np.ndarray, fraction: float | None, seed: int
    ) -> tuple[np.ndarray, np.ndarray]:
        return validation_split(y, self.n_outputs, fraction, seed)

    def weights(
        self, y: np.ndarray, train_idx: np.ndarray, sample_weight: np.ndarray | None
    ) -> tuple[np.ndarray | None, np.ndarray | None]:
        """Class weights ("balanced" counts the training images) and each
        image's weight in the loss."""
        cw = class_weights(self.class_weight, self.classes, y[train_idx])
        return cw, example_weights(y, cw, sample_weight)

    def loss(self, class_weight: np.ndarray | None, device: torch.device) -> Loss:
        return Loss(class_weight, self.label_smoothing, device)

    def probe(
        self, features: np.ndarray, y: np.ndarray, weights: np.ndarray | None,
        seed: int,
    ) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
        return fit_probe(features, y, self.n_outputs, weights, seed)

    def chance(
        self, y: torch.Tensor, w: torch.Tensor, loss: Loss
    ) -> tuple[float, float]:
        """The loss and the score of a network that learned nothing."""
        return (
            chance_loss(y, w, loss, self.n_outputs),
            chance_accuracy(y, w, loss, self.n_outputs),
        )

    def calibration(self, z: np.ndarray, y: np.ndarray) -> tuple[Any, dict]:
        return calibration(z, y)


def cross_validated_logits(
    task: _Labels,
    features: np.ndarray,
    y: np.ndarray,
    weights: np.ndarray | None,
    seed: int,
) -> np.ndarray:
    """Each image's logits from ``task.probe`` fitted on the other images (3
    folds): what the temperature of a probe fitted on all of them is fitted
    on. Every class needs 3 images (a validation split that selects epochs
    leaves at least that many)."""
    if y.ndim == 1:
        folds = StratifiedKFold(3, shuffle=True, random_state=seed).split(features, y)
    else:
        folds = KFold(3, shuffle=True, random_state=seed).split(features)
    z = np.empty((len(features), task.n_outputs))
    for fit, out in folds:
        w = None if weights is None else weights[fit]
        weight, bias = task.probe(features[fit], y[fit], w, seed)
        z[out] = features[out].astype(np.float64) @ weight.T + bias
    return z


# ---------------------------------------------------------------------------
# Multi-label: a binary indicator matrix
# ---------------------------------------------------------------------------


def mean_average_precision(
    z: np.ndarray, y: np.ndarray, w: np.ndarray | None = None
) -> float:
    """Average precision of each label's scores ``z`` against ``y``, averaged
    over the labels that have both a positive and a negative image here
    (NaN if none has)."""
    both = (y.max(0) > 0) & (y.min(0) < 1)
    if not both.any():
        return math.nan
    return float(
        average_precision_score(
            y[:, both], z[:, both], average="macro", sample_weight=w
        )
    )


class MultiLabelLoss:
    """Binary cross-entropy of each label (``BCEWithLogitsLoss``, with a
    positive weight per label and label smoothing), averaged over the labels,
    weighted by sample weights. Its validation score is the mean average
    precision (``mean_average_precision``). Follows ``_training.Loss``'s
    protocol."""

    metric = "valid_average_precision"
    class_weights = None

    def __init__(
        self, pos_weight: np.ndarray | None, smoothing: float, device: torch.device
    ) -> None:
        self.pos_weight = (
            None
            if pos_weight is None
            else torch.as_tensor(pos_weight, dtype=torch.float32, device=device)
        )
        self.smoothing = smoothing

    def weights(self, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return weight

    def __call__(
        self, out: torch.Tensor, target: torch.Tensor, weight: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        out = out.float()
        target = target.to(out.device, torch.float32)
        if self.smoothing:
            target = target * (1 - self.smoothing) + self.smoothing / 2
        pos_weight = None if self.pos_weight is None else self.pos_weight.to(out.device)
        each = F.binary_cross_entropy_with_logits(
            out, target, pos_weight=pos_weight, reduction="none"
        )
        weight = weight.to(out.device)
        return (each.mean(1) * weight).sum(), weight.sum()

    def score(
        self, out: torch.Tensor, target: torch.Tensor, weight: torch.Tensor
    ) -> float:
        return mean_average_precision(
            out.double().cpu().numpy(),
            target.cpu().numpy(),
            weight.double().cpu().numpy(),
        )


def _binary_log_loss(z: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean(np.logaddexp(0, z) - y * z))


class MultiLabel(_Labels):
    """Any number of labels per image, as a binary indicator matrix
    (n_images, n_labels): ``class_weight`` ("balanced" or {label index:
    weight}) gives each label's positives a weight, ``label_smoothing``
    smooths the 0/1 targets; ``classes`` (the label indices) once fitted."""

    metric = MultiLabelLoss.metric
    names = ("validation mAP", "label prevalence")

    def encode(self, y: Any, n_images: int) -> np.ndarray:
        """The indicator matrix as float32 (one column per label)."""
        y = np.asarray(y)
        if y.ndim != 2 or y.dtype.kind not in "biuf":
            raise ValueError(
                "A multi-label y is a binary indicator matrix of shape (n_samples, "
                "n_labels); encode label sets with "
                "sklearn.preprocessing.MultiLabelBinarizer."
            )
        if len(y) != n_images:
            raise ValueError(
                f"X has {n_images} images but y has {len(y)} rows: pass one row "
                "of labels per image, in the same order."
            )
        if not np.isin(y, (0, 1)).all():
            raise ValueError(
                "A multi-label y holds only 0 and 1 (or False and True): one "
                "column per label, 1 where the image has it."
            )
        if (y.min(0) == y.max(0)).all():
            raise ValueError(
                "Every column of the multi-label y is constant (all 0 or all 1): "
                "nothing to learn. Pass labels that some images have and others "
                "lack; for one label per image, pass y of shape (n_samples,)."
            )
        if self.classes is not None and y.shape[1] != self.n_outputs:
            raise ValueError(
                f"warm_start=True but y has {y.shape[1]} labels while the fitted "
                f"classifier has {self.n_outputs}. Fit with the same labels, or "
                "set warm_start=False to start over."
            )
        self.classes = np.arange(y.shape[1])
        return y.astype(np.float32)

    def fitted_attributes(self) -> dict[str, Any]:
        return {"classes_": self.classes, "_multilabel": True}

    def split(
        self, y: np.ndarray, fraction: float | None, seed: int
    ) -> tuple[np.ndarray, np.ndarray]:
        return random_split(len(y), fraction, seed)

    def weights(
        self, y: np.ndarray, train_idx: np.ndarray, sample_weight: np.ndarray | None
    ) -> tuple[np.ndarray | None, np.ndarray | None]:
        """Each label's positive weight ("balanced": its negatives over its
        positives among the training images), and the sample weights."""
        cw = self.class_weight
        if cw is None:
            return None, sample_weight
        if isinstance(cw, dict):
            unknown = [k for k in cw if k not in set(self.classes.tolist())]
            if unknown:
                raise ValueError(
                    f"class_weight has keys that are not labels of y: {unknown}. "
                    f"A multi-label y's labels are its column indices, 0 to "
                    f"{self.n_outputs - 1}."
                )
            pos = np.array([float(cw.get(k, 1.0)) for k in self.classes.tolist()])
        else:  # "balanced"
            positives = y[train_idx].sum(0)
            pos = (len(train_idx) - positives) / np.maximum(positives, 1)
        return pos, sample_weight

    def loss(
        self, class_weight: np.ndarray | None, device: torch.device
    ) -> MultiLabelLoss:
        return MultiLabelLoss(class_weight, self.label_smoothing, device)

    def probe(
        self, features: np.ndarray, y: np.ndarray, weights: np.ndarray | None,
        seed: int,
    ) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
        """One-vs-rest logistic regressions (each as ``fit_probe``'s, its C and
        the features' scaling by 3-fold CV), one row of the head per label; a
        label constant on these images gets no weights and the bias of its
        (smoothed) frequency."""
        rows, biases = [], []
        for j in range(y.shape[1]):
            column = y[:, j].astype(np.int64)
            if column.min() == column.max():
                share = (column.sum() + 0.5) / (len(column) + 1.0)
                rows.append(np.zeros(features.shape[1]))
                biases.append(math.log(share / (1 - share)))
                continue
            weight, bias = fit_probe(
                features, column, 2, weights, seed, choose_scaling=True
            )
            # Softmax over (z0, z1) is the sigmoid of z1 - z0.
            rows.append(weight[1] - weight[0])
            biases.append(bias[1] - bias[0])
        return np.vstack(rows), np.array(biases)

    def chance(
        self, y: torch.Tensor, w: torch.Tensor, loss: MultiLabelLoss
    ) -> tuple[float, float]:
        """The loss of predicting each label's weighted frequency, and the
        mean average precision of a random ranking (the labels' frequencies,
        over the labels with both kinds of images)."""
        if len(y) == 0:
            return math.nan, math.nan
        y, w = y.double(), w.double()
        share = ((w[:, None] * y).sum(0) / w.sum()).clamp(1e-6, 1 - 1e-6)
        logits = (share / (1 - share)).log().float().expand(len(y), -1)
        total, weight = loss(logits, y.float(), w.float())
        both = (share > 1e-6) & (share < 1 - 1e-6)
        floor = float(share[both].mean()) if both.any() else math.nan
        return float(total / weight), floor

    def calibration(self, z: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, dict]:
        """One temperature per label, minimising its validation log loss; the
        mean binary log loss of the validation images before and after."""
        temperatures = np.ones(z.shape[1])
        for j in range(z.shape[1]):
            if y[:, j].min() == y[:, j].max():
                continue  # nothing to fit on
            temperatures[j] = fit_binary_temperature(z[:, j], y[:, j])
        return temperatures, {
            "before": _binary_log_loss(z, y),
            "after": _binary_log_loss(z / temperatures, y),
        }

    @staticmethod
    def tune_thresholds(proba: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Each label's probability threshold with the highest F1 on the
        validation images, halfway to the next lower probability (0.5 for a
        label without positives there)."""
        thresholds = np.full(proba.shape[1], 0.5)
        for j in range(proba.shape[1]):
            if y[:, j].max() == 0:
                continue
            precision, recall, cut = precision_recall_curve(y[:, j], proba[:, j])
            f1 = 2 * precision * recall / np.maximum(precision + recall, 1e-12)
            best = cut[int(np.argmax(f1[:-1]))]
            # Halfway to the next lower score: the cut itself is one image's
            # probability, which images like it would fall either side of.
            below = proba[:, j][proba[:, j] < best]
            thresholds[j] = (best + below.max()) / 2 if below.size else best
        return thresholds


# ---------------------------------------------------------------------------
# Regression
# ---------------------------------------------------------------------------

#: The ridge probe's alphas, on standardised targets: chosen by efficient
#: leave-one-out (RidgeCV's default), as a user would tune a probe.
RIDGE_ALPHAS = tuple(np.logspace(-2, 5, 15))


class RegressionLoss:
    """Squared, Huber (delta 1 standardised unit) or absolute error of
    standardised targets, averaged over the outputs, weighted by sample
    weights; the validation score is R² (averaged over the outputs), which
    standardisation leaves unchanged. Follows ``_training.Loss``'s protocol."""

    metric = "valid_r2"
    class_weights = None

    def __init__(self, kind: str) -> None:
        self.kind = kind

    def weights(self, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return weight

    def __call__(
        self, out: torch.Tensor, target: torch.Tensor, weight: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        out, target = out.float(), target.to(out.device, torch.float32)
        if self.kind == "squared_error":
            each = F.mse_loss(out, target, reduction="none")
        elif self.kind == "huber":
            each = F.huber_loss(out, target, reduction="none", delta=1.0)
        else:
            each = F.l1_loss(out, target, reduction="none")
        weight = weight.to(out.device)
        return (each.mean(1) * weight).sum(), weight.sum()

    def score(
        self, out: torch.Tensor, target: torch.Tensor, weight: torch.Tensor
    ) -> float:
        """Weighted R², averaged over the outputs (an output constant on
        these images counts 1 if predicted exactly, else 0, as in
        scikit-learn's ``r2_score``)."""
        out, target = out.double().cpu(), target.double().cpu()
        w = weight.double().cpu()[:, None]
        mean = (w * target).sum(0) / w.sum()
        residual = (w * (target - out) ** 2).sum(0)
        total = (w * (target - mean) ** 2).sum(0)
        r2 = torch.where(
            total > 0,
            1 - residual / total.clamp(min=1e-300),
            (residual == 0).double(),
        )
        return float(r2.mean())


class Regression:
    """One or several numbers per image (``loss``); ``mean`` and ``scale``
    standardise the targets (per output) once fitted, None before."""

    metric = RegressionLoss.metric
    names = ("validation R²", "a constant")

    def __init__(
        self, loss: str, mean: np.ndarray | None = None,
        scale: np.ndarray | None = None, one_column: bool = False,
    ) -> None:  # fmt: skip
        self.kind, self.mean, self.scale = loss, mean, scale
        self.one_column = one_column

    @property
    def n_outputs(self) -> int:
        return len(self.mean)

    def encode(self, y: Any, n_images: int) -> np.ndarray:
        """Standardised float32 targets of shape (n, n_outputs): the mean and
        spread are learned unless already fitted (a warm start continues in
        the units the head was trained in)."""
        if y is None:
            raise ValueError(
                "FineTuneRegressor.fit needs targets: pass y, one number (or one "
                "row of numbers) per image."
            )
        if np.ndim(y) not in (1, 2) or (np.ndim(y) == 2 and np.shape(y)[1] == 0):
            raise ValueError(
                f"y has shape {np.shape(y)}; pass one number per image, shape "
                "(n_samples,), or one row per image, shape (n_samples, n_outputs)."
            )
        y = check_array(
            y, ensure_2d=False, dtype=np.float64, input_name="y",
            ensure_all_finite=True,
        )  # fmt: skip
        if len(y) != n_images:
            raise ValueError(
                f"X has {n_images} images but y has {len(y)} targets: pass one "
                "target per image, in the same order."
            )
        one_column = y.ndim == 1
        y2 = y.reshape(len(y), -1)
        if self.mean is None:
            self.mean = y2.mean(0)
            spread = y2.std(0)
            # A constant output is predicted exactly by its bias.
            self.scale = np.where(spread > 0, spread, 1.0)
            self.one_column = one_column
        elif y2.shape[1] != self.n_outputs:
            raise ValueError(
                f"warm_start=True but y has {y2.shape[1]} output(s) while the "
                f"fitted regressor has {self.n_outputs}. Fit with the same "
                "outputs, or set warm_start=False to start over."
            )
        return ((y2 - self.mean) / self.scale).astype(np.float32)

    def fitted_attributes(self) -> dict[str, Any]:
        return {
            "n_outputs_": self.n_outputs,
            "y_mean_": self.mean,
            "y_scale_": self.scale,
            "_one_column": self.one_column,
        }

    def split(
        self, y: np.ndarray, fraction: float | None, seed: int
    ) -> tuple[np.ndarray, np.ndarray]:
        return random_split(len(y), fraction, seed)

    def weights(
        self, y: np.ndarray, train_idx: np.ndarray, sample_weight: np.ndarray | None
    ) -> tuple[None, np.ndarray | None]:
        return None, sample_weight

    def loss(self, class_weight: None, device: torch.device) -> RegressionLoss:
        return RegressionLoss(self.kind)

    def probe(
        self, features: np.ndarray, y: np.ndarray, weights: np.ndarray | None,
        seed: int,
    ) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
        """A ridge regression as the head's weight and bias: closed form, so
        epoch 0 is the probe a user would fit. Alpha (over ``RIDGE_ALPHAS``)
        and the features' scaling (``_head.scalings``) are chosen by
        efficient leave-one-out."""
        best = None
        for Z, mean, scale in scalings(features, raw=True):
            with config_context(enable_metadata_routing=False):
                ridge = RidgeCV(alphas=RIDGE_ALPHAS).fit(Z, y, sample_weight=weights)
            if best is None or ridge.best_score_ > best[0].best_score_:
                best = ridge, mean, scale
        ridge, mean, scale = best
        weight = np.atleast_2d(ridge.coef_) / scale
        intercept = np.atleast_1d(ridge.intercept_)
        return weight, intercept - weight @ mean

    def chance(
        self, y: torch.Tensor, w: torch.Tensor, loss: RegressionLoss
    ) -> tuple[float, float]:
        """The loss of the weighted mean (R² 0): what a network that learned
        nothing scores."""
        if len(y) == 0:
            return math.nan, math.nan
        y, w = y.double(), w.double()
        mean = (w[:, None] * y).sum(0) / w.sum()
        total, weight = loss(mean.float().expand(len(y), -1), y, w.float())
        return float(total / weight), 0.0

    def calibration(self, z: np.ndarray, y: np.ndarray) -> tuple[float, dict]:
        return 1.0, {}

    def predict(self, z: np.ndarray) -> np.ndarray:
        """Predictions in the user's units, shaped as ``y`` was."""
        out = z.astype(np.float64) * self.scale + self.mean
        return out[:, 0] if self.one_column else out
