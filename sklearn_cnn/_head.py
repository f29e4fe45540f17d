"""The classifier head of FineTuneClassifier: installing it, reading logits, its
linear-probe initialisation (``head_init``) and its temperature
(``calibrate``)."""

from __future__ import annotations

import warnings
from contextlib import nullcontext
from typing import Any

import numpy as np
import torch
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax, softmax
from sklearn import config_context
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV, StratifiedKFold
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits
from torch import nn

from ._layers import Trace, pool

#: The probe's regularisation is chosen by a 3-fold internal CV over these
#: strengths (on standardized features), as a user would tune a probe.
PROBE_CS = (1e-3, 1e-2, 1e-1, 1.0, 10.0)
_PROBE_MAX_ITER = 1000
#: The probe divides each feature by at least this fraction of the median spread.
SCALE_FLOOR = 0.1
#: Up to this many feature values, the probe's BLAS runs on one thread (L-BFGS's
#: many small calls; figures in benchmarks/README.md).
PROBE_ONE_THREAD = 2**24


def logits(out: Any) -> torch.Tensor:
    """The logits of a model's output (torchvision's aux-logit tuples included)."""
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, (tuple, list)) and out:
        return out[0]
    raise TypeError(
        f"The model returned a {type(out).__name__}; FineTuneClassifier needs a "
        "tensor of logits (or a tuple whose first element is one)."
    )


def float_logits(outputs: list[Any]) -> torch.Tensor:
    """A Tapper without taps returns ``[model output]``: its float32 logits."""
    return logits(outputs[0]).float()


class _AppendedHead:
    """Forward hook for a model without ``nn.Linear``: its pooled output goes
    through the new head ``name`` (a class, so that the model pickles)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __call__(self, module: nn.Module, _args: tuple, output: Any) -> torch.Tensor:
        return getattr(module, self.name)(pool(logits(output), "avg"))


def drop_auxiliary_heads(model: nn.Module) -> None:
    """Remove the auxiliary classifiers of inception_v3 and googlenet (their
    logits are discarded, and inception's needs 299 px images)."""
    if getattr(model, "aux_logits", False):
        model.aux_logits = False
        for name in ("AuxLogits", "aux1", "aux2"):
            if getattr(model, name, None) is not None:
                setattr(model, name, None)


def install_head(
    model: nn.Module, tr: Trace, n_classes: int, example: torch.Tensor
) -> tuple[str, bool]:
    """Replace the last ``nn.Linear`` by a fresh one with ``n_classes`` outputs
    (a model without one gets one on its average-pooled output); return the
    head's module name and whether it was appended."""
    name = tr.head
    if name is not None:
        old = model.get_submodule(name)
        device = old.weight.device
        model.set_submodule(name, nn.Linear(old.in_features, n_classes).to(device))
        return name, False
    with torch.inference_mode():
        width = pool(logits(model(example)), "avg").shape[1]
    name = "head" if not hasattr(model, "head") else "sklearn_cnn_head"
    model.add_module(name, nn.Linear(width, n_classes).to(example.device))
    model.register_forward_hook(_AppendedHead(name))
    return name, True


def check_vector_head(tr: Trace, head: str) -> None:
    """The probe and the cached-features path need pooled vectors as input."""
    shape = tr.input_shapes.get(head)
    if shape is None or len(shape) != 1:
        raise ValueError(
            f"The head {head!r} reads a tensor of shape {shape}, not a vector of "
            "pooled features, which head_init='probe' and training on cached "
            "features need. Use head_init='random' and an augment."
        )


def standardize(features: np.ndarray) -> tuple[StandardScaler, np.ndarray]:
    """The probes' standardisation of ``features`` (float64): the fitted
    scaler, whose spreads have a floor, and the standardised features."""
    Z = features.astype(np.float64)
    scaler = StandardScaler().fit(Z)
    # Nearly dead features' tiny spreads would fold huge weights into the head
    # (its outputs jump once fine-tuning wakes them): a floor at a tenth of the
    # median spread (benchmarks/README.md).
    spread = scaler.scale_[scaler.var_ > 0]
    if spread.size:
        scaler.scale_ = np.maximum(scaler.scale_, SCALE_FLOOR * np.median(spread))
    return scaler, scaler.transform(Z)


def scalings(
    features: np.ndarray, raw: bool
) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """The probe's inputs to choose from, each as ``(Z, mean, scale)`` with
    ``Z = (features - mean) / scale``: standardised (``standardize``) and,
    with ``raw``, the features as they are. On ReLU features with many nearly
    dead units the raw ones can win: standardising gives each of those the
    weight of an active feature under the penalty."""
    scaler, Z = standardize(features)
    options = [(Z, scaler.mean_, scaler.scale_)]
    if raw:
        n = features.shape[1]
        options.append((features.astype(np.float64), np.zeros(n), np.ones(n)))
    return options


def fit_probe(
    features: np.ndarray,
    y: np.ndarray,
    n_classes: int,
    weights: np.ndarray | None,
    seed: int,
    choose_scaling: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """A logistic regression on standardized features, folded into the head's
    weight and bias (``n_classes`` rows); ``weights`` are per image. ``C``
    comes from a stratified 3-fold CV over ``PROBE_CS`` by log-loss (1 where a
    class has fewer than 3 images); with ``choose_scaling`` the same CV also
    chooses between standardized and raw features (``scalings``)."""
    searches = np.bincount(y, minlength=n_classes).min() >= 3
    # Our own search: plain fit parameters, whatever the caller's routing.
    one_thread = features.size <= PROBE_ONE_THREAD
    best = None
    with (
        warnings.catch_warnings(),
        config_context(enable_metadata_routing=False),
        threadpool_limits(1, user_api="blas") if one_thread else nullcontext(),
    ):
        # The probe is a starting point; fine-tuning goes on from it.
        warnings.simplefilter("ignore", ConvergenceWarning)
        for Z, mean, scale in scalings(features, choose_scaling and searches):
            probe = LogisticRegression(max_iter=_PROBE_MAX_ITER)
            if searches:
                probe = GridSearchCV(
                    probe,
                    {"C": list(PROBE_CS)},
                    cv=StratifiedKFold(3, shuffle=True, random_state=seed),
                    scoring="neg_log_loss",
                )
            probe.fit(Z, y, sample_weight=weights)
            score = getattr(probe, "best_score_", 0.0)
            if best is None or score > best[0]:
                best = score, getattr(probe, "best_estimator_", probe), mean, scale
    _, probe, mean, scale = best
    coef, intercept = probe.coef_, probe.intercept_
    if coef.shape[0] == 1:  # binary: softmax of (-z/2, z/2) is sigmoid(z)
        coef = np.vstack([-coef / 2, coef / 2])
        intercept = np.array([-intercept[0] / 2, intercept[0] / 2])
    weight = coef / scale
    return weight, intercept - weight @ mean


def set_head(head: nn.Linear, weight: np.ndarray, bias: np.ndarray) -> None:
    with torch.no_grad():
        head.weight.copy_(torch.as_tensor(weight, dtype=head.weight.dtype))
        head.bias.copy_(torch.as_tensor(bias, dtype=head.bias.dtype))


# -- Calibration: one temperature for the logits, fitted on held-out images ---


def fit_temperature(z: np.ndarray, y: np.ndarray) -> float:
    """The temperature T > 0 that minimises the log-loss of ``softmax(z / T)``
    (Guo et al., 2017): one parameter, so argmax and accuracy never change."""

    def nll(log_t: float) -> float:
        return -log_softmax(z / np.exp(log_t), axis=1)[np.arange(len(y)), y].mean()

    return float(np.exp(minimize_scalar(nll, bounds=(-4.0, 4.0), method="bounded").x))


def fit_binary_temperature(z: np.ndarray, y: np.ndarray) -> float:
    """The temperature T > 0 that minimises the log loss of ``sigmoid(z / T)``
    for one label's logits ``z`` and 0/1 targets ``y``."""

    def nll(log_t: float) -> float:
        t = z / np.exp(log_t)
        return float(np.mean(np.logaddexp(0, t) - y * t))

    return float(np.exp(minimize_scalar(nll, bounds=(-4.0, 4.0), method="bounded").x))


def expected_calibration_error(
    proba: np.ndarray, y: np.ndarray, bins: int = 10
) -> float:
    """Mean |accuracy - confidence| over equal-width confidence bins,
    weighted by their share of the images."""
    confidence = proba.max(axis=1)
    correct = proba.argmax(axis=1) == y
    which = np.minimum((confidence * bins).astype(int), bins - 1)
    return float(
        sum(
            abs(correct[which == b].mean() - confidence[which == b].mean())
            * np.mean(which == b)
            for b in range(bins)
            if np.any(which == b)
        )
    )


def calibration(z: np.ndarray, y: np.ndarray) -> tuple[float, dict[str, float]]:
    """Temperature and validation ECE before and after applying it."""
    t = fit_temperature(z, y)
    return t, {
        "before": expected_calibration_error(softmax(z, axis=1), y),
        "after": expected_calibration_error(softmax(z / t, axis=1), y),
    }
