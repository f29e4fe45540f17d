"""Where the network looks: class activation maps of fitted estimators.

:func:`activation_maps` gives Grad-CAM (Selvaraju et al. 2017) for a fitted
:class:`~sklearn_cnn.FineTuneClassifier`, and the exact CAM (Zhou et al. 2016)
for a ``Pipeline`` of a :class:`~sklearn_cnn.CNNFeatureTransformer`, affine
scalers and a linear model; maps and ViT tokens alike, from the layouts the
network's trace found. :class:`ActivationMapDisplay` draws them over the
images, in scikit-learn's Display convention.

Not grad-cam or captum: Grad-CAM is a dozen lines; what they leave to their
users (the layer and its layout, a pipeline's exact CAM) is this module's job.
"""

from __future__ import annotations

from numbers import Integral
from typing import Any

import numpy as np
import torch
from sklearn.frozen import FrozenEstimator
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import (
    MaxAbsScaler,
    MinMaxScaler,
    RobustScaler,
    StandardScaler,
)
from sklearn.utils.validation import check_is_fitted

from ._base import NetworkMixin
from ._cam import (
    Network,
    check_spatial,
    default_layer,
    grad_cam,
    input_batches,
    linear_cam,
    map_before_head,
    tapped_maps,
    unnormalize,
    upsample,
)
from ._features import CNNFeatureTransformer
from ._images import check_images
from ._layers import PENULTIMATE, Tap, pool, resolve_layers

__all__ = ["activation_maps", "ActivationMapDisplay"]

#: Scalers whose transform is ``x * a + b`` per feature, foldable into the CAM.
_AFFINE = (StandardScaler, MinMaxScaler, MaxAbsScaler, RobustScaler)


def activation_maps(
    estimator: Any,
    X: Any,
    *,
    layer: str | None = None,
    target: Any = None,
    upsample: bool = True,
    batch_size: int = 16,
) -> np.ndarray:
    """Class activation maps: where in each image the evidence for a class lies.

    Parameters
    ----------
    estimator : fitted estimator
        A :class:`~sklearn_cnn.FineTuneClassifier` (Grad-CAM), or a
        :class:`~sklearn.pipeline.Pipeline` whose first step is a
        :class:`~sklearn_cnn.CNNFeatureTransformer` with ``pooling="avg"`` and
        whose last step is a linear model (``coef_``, ``intercept_``), with
        ``"passthrough"``, ``StandardScaler``, ``RobustScaler``,
        ``MaxAbsScaler`` or ``MinMaxScaler`` steps in between (exact CAM). A
        fitted search (``GridSearchCV``) stands for its ``best_estimator_``.
    X : array-like of images or list of paths / PIL images
        Images, in any form the estimator accepts.
    layer : str or None, default=None
        Grad-CAM's layer, a name from :func:`~sklearn_cnn.list_layers` whose
        output is a map or tokens. None takes the last such layer (for a ViT
        with a class token, the last block's input norm: later patch tokens
        have zero gradients). A pipeline's CAM reads the layer its transformer
        pools; leave None (or name that layer).
    target : None, label or array-like of shape (n_samples,), default=None
        The class to explain: a label of ``classes_`` for every image, one
        label per image, or None for each image's predicted class. For a
        regressor in a pipeline, the index of the output (None for a single
        output). For two classes, the map of ``classes_[0]`` uses the
        negated coefficients (its evidence is the other class's counter
        evidence).
    upsample : bool, default=True
        Bring the maps from the layer's resolution to the network input's,
        bilinearly. False returns them at the layer's resolution.
    batch_size : int, default=16
        Images per forward (and backward) pass.

    Returns
    -------
    maps : ndarray of shape (n_samples, height, width), dtype float32
        Non-negative, largest where the evidence is strongest. ``height`` and
        ``width`` are those of the network's input: the images after the
        estimator's preprocessing (resize, centre crop), not the images as
        given; the layer's own grid with ``upsample=False``.

    See Also
    --------
    ActivationMapDisplay : The maps drawn over the images.

    Notes
    -----
    The maps are computed in float32 whatever ``precision`` the estimator
    predicts with.

    For the pipeline, let ``A_c(h, w)`` be channel ``c`` of the tapped map,
    ``w_c`` the linear model's coefficient of the class, ``b`` its intercept,
    and ``(x_c - mu_c) / s_c`` what the scalers between them compute (any
    chain of them folds into one such pair). Average pooling makes the class
    score ``mean_hw M(h, w) + k``, with ``M(h, w) = sum_c (w_c / s_c) A_c(h, w)``
    and ``k = b - sum_c w_c mu_c / s_c``. The map is ``M`` clipped at 0, as CAM
    does. The identity is checked on every batch against the pipeline's own
    ``decision_function`` (``predict`` for a regressor), so a final step that
    is not linear is refused rather than explained wrongly. With several
    tapped layers, their maps are upsampled and summed. With ``layer=None``,
    the CAM reads the map whose average the network's last linear layer
    reads, where there is one (checked on the images).

    Grad-CAM weights each channel of the layer's output by the spatial mean
    of the gradient of the class's logit (before softmax and temperature),
    sums them and clips at 0; ``tta`` is not applied. A layer whose
    gradients are zero at every position gives zero maps, with a warning.

    Examples
    --------
    >>> import numpy as np
    >>> from sklearn.linear_model import LogisticRegression
    >>> from sklearn.pipeline import make_pipeline
    >>> from sklearn_cnn import CNNFeatureTransformer
    >>> from sklearn_cnn.inspection import activation_maps
    >>> rng = np.random.default_rng(0)
    >>> X = rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
    >>> y = [0, 1] * 4
    >>> pipe = make_pipeline(
    ...     CNNFeatureTransformer("resnet18", weights=None, layer="layer2",
    ...                           image_size=32, random_state=0),
    ...     LogisticRegression(),
    ... ).fit(X, y)
    >>> activation_maps(pipe, X[:2]).shape  # the network input's size
    (2, 32, 32)
    >>> activation_maps(pipe, X[:2], upsample=False).shape  # layer2's grid
    (2, 4, 4)
    """
    maps, _, _ = _explain(estimator, X, layer, target, upsample, batch_size)
    return maps


def _explain(
    estimator: Any,
    X: Any,
    layer: str | None,
    target: Any,
    upsample_maps: bool = True,
    batch_size: int = 16,
    images: bool = False,
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """Maps, the input images (with ``images``) and each map's target."""
    if not (isinstance(batch_size, Integral) and batch_size >= 1):
        raise ValueError(f"batch_size must be a positive int; got {batch_size!r}.")
    estimator = getattr(estimator, "best_estimator_", estimator)
    # Float images in any range where fit gave or estimated mean and std.
    first = estimator[0] if isinstance(estimator, Pipeline) else estimator
    pre = getattr(first, "preprocessing_", None)
    X = check_images(X, unit_floats=getattr(pre, "unit_floats", True))
    if isinstance(estimator, Pipeline):
        explain = _PipelineCAM(estimator, layer)
    elif isinstance(estimator, CNNFeatureTransformer):
        raise TypeError(
            "A CNNFeatureTransformer gives features, not class scores, so there "
            "is no class to explain. Fit it in a Pipeline with a linear model "
            "(make_pipeline(CNNFeatureTransformer(...), LogisticRegression())) "
            "and pass the pipeline."
        )
    elif isinstance(estimator, NetworkMixin):
        explain = _GradCAM(estimator, layer)
    else:
        raise TypeError(
            f"activation_maps takes a fitted FineTuneClassifier or a Pipeline "
            f"that starts with a CNNFeatureTransformer; got "
            f"{type(estimator).__name__}."
        )
    fixed = _target_indices(target, explain.classes, len(X))
    maps, shown, chosen = [], [], []
    start, shape = 0, None
    for batch in input_batches(explain.net, X, batch_size):
        if shape is not None and batch.shape[-2:] != shape:
            raise ValueError(
                f"Images differ in size after preprocessing ({tuple(shape)} and "
                f"{tuple(batch.shape[-2:])}), so their maps cannot be stacked. "
                "Fit the estimator with image_size set, or pass images of one size."
            )
        shape = batch.shape[-2:]
        wanted = None if fixed is None else fixed[start : start + len(batch)]
        raw, index = explain(batch, wanted)
        maps.append(_finish(raw, tuple(batch.shape[-2:]), upsample_maps))
        chosen.append(index)
        if images:
            shown.append(unnormalize(explain.net, batch))
        start += len(batch)
    out = torch.cat(maps).numpy().astype(np.float32)
    index = np.concatenate(chosen)
    labels = index if explain.classes is None else explain.classes[index]
    return out, (np.concatenate(shown) if images else None), labels


def _finish(raw: list[torch.Tensor], size: tuple[int, int], up: bool) -> torch.Tensor:
    """One map from the per-layer maps before the ReLU: clipped, then
    upsampled (Grad-CAM's order); several are upsampled and summed first."""
    if len(raw) == 1:
        clipped = raw[0].clamp(min=0)
        return upsample(clipped, size) if up else clipped
    if not up and len({tuple(r.shape[-2:]) for r in raw}) > 1:
        raise ValueError(
            "The tapped layers' maps differ in size; upsample=False cannot "
            "return one map per image. Use upsample=True."
        )
    target = size if up else tuple(raw[0].shape[-2:])
    return sum(upsample(r, target) for r in raw).clamp(min=0)


def _target_indices(target: Any, classes: Any, n: int) -> np.ndarray | None:
    """Output indices of ``target`` for ``n`` images (None: the predicted)."""
    if target is None:
        return None
    many = np.ndim(target) > 0
    values = np.asarray(target, dtype=object).ravel() if many else [target]
    if many and len(values) != n:
        raise ValueError(
            f"target has {len(values)} entries for {n} images: give one label "
            "for all images, or one per image."
        )
    index = []
    for value in values:
        if classes is None:
            index.append(value)
            continue
        hit = np.flatnonzero(np.asarray(classes, dtype=object) == value)
        if not len(hit):
            raise ValueError(
                f"target {value!r} is not one of the classes "
                f"{list(np.asarray(classes).tolist())}."
            )
        index.append(int(hit[0]))
    index = np.asarray(index)
    if not many:
        index = np.repeat(index, n)
    return index


def _network(estimator: Any) -> Network:
    """The network of a fitted estimator (parameters unchanged since fit)."""
    check_is_fitted(estimator)
    estimator._check_params_unchanged()
    return Network(
        estimator.model_, estimator.preprocessing_, estimator.device_, estimator.trace_
    )


class _GradCAM:
    """Grad-CAM of a fine-tuned network at one layer."""

    def __init__(self, est: NetworkMixin, layer: str | None) -> None:
        self.net = _network(est)
        self.classes = getattr(est, "classes_", None)
        tr = self.net.trace
        if layer is None:
            layer = default_layer(tr)
        elif not isinstance(layer, str):
            raise TypeError(f"layer must be one layer name (a str); got {layer!r}.")
        resolve_layers(layer, tr)  # unknown names: close matches
        self.layer = layer
        self.layout = tr.layouts.get(layer)
        check_spatial(layer, tr, Tap(layer), self.layout)
        self.net.module.eval()

    def __call__(
        self, batch: torch.Tensor, wanted: np.ndarray | None
    ) -> tuple[list[torch.Tensor], np.ndarray]:
        chosen: list[torch.Tensor] = []

        def choose(logits: torch.Tensor) -> torch.Tensor:
            if wanted is not None:
                index = torch.as_tensor(np.asarray(wanted, dtype=np.int64))
                if (index < 0).any() or (index >= logits.shape[1]).any():
                    raise ValueError(
                        f"target indices must be in [0, {logits.shape[1]}); got "
                        f"{index.tolist()}."
                    )
            elif logits.shape[1] == 1 or self.classes is not None:
                index = logits.argmax(1).cpu()
            else:
                raise ValueError(
                    f"The network has {logits.shape[1]} outputs: pass target=<index>."
                )
            chosen.append(index)
            return index

        raw = grad_cam(self.net, batch, self.layer, self.layout, choose)
        return [raw], chosen[0].numpy()


class _PipelineCAM:
    """The exact CAM of a linear model on a transformer's average-pooled maps."""

    def __init__(self, pipe: Pipeline, layer: str | None) -> None:
        # A FrozenEstimator step computes what the estimator it wraps does.
        steps = [
            s.estimator if isinstance(s, FrozenEstimator) else s for _, s in pipe.steps
        ]
        cnn = steps[0]
        if not isinstance(cnn, CNNFeatureTransformer):
            raise TypeError(
                "The pipeline's first step must be a CNNFeatureTransformer; got "
                f"{type(cnn).__name__}."
            )
        if len(steps) < 2:
            raise TypeError(
                "The pipeline has no model after its CNNFeatureTransformer, so "
                "there is no class to explain."
            )
        self.net = _network(cnn)
        if cnn.pooling != "avg":
            raise ValueError(
                f"The CAM of a pipeline needs pooling='avg' (a class score that "
                f"is the average of a map over positions); the transformer has "
                f"pooling={cnn.pooling!r}. Refit with pooling='avg', or explain "
                "a FineTuneClassifier with Grad-CAM."
            )
        if layer is not None and layer != cnn.layer:
            raise ValueError(
                f"The CAM of a pipeline reads the layer its transformer pools "
                f"(layer={cnn.layer!r}); got layer={layer!r}. Leave layer=None, "
                "or refit the transformer with that layer."
            )
        self.pipe = pipe
        self.tail = pipe[1:]
        final = steps[-1]
        for step in steps[1:]:
            if step is not None and step != "passthrough":
                check_is_fitted(step)
        scale, shift = self._fold(steps[1:-1], cnn.n_features_out_)
        if not (hasattr(final, "coef_") and hasattr(final, "intercept_")):
            raise TypeError(
                f"The pipeline's last step, {type(final).__name__}, is not a "
                "linear model (no coef_ and intercept_): its class scores are no "
                "weighted sum of the features, so there is no exact CAM. Use a "
                "linear model (LogisticRegression, RidgeClassifier, LinearSVC, "
                "Ridge, ...), or fine-tune and use Grad-CAM."
            )
        coef = final.coef_
        coef = np.asarray(coef.toarray() if hasattr(coef, "toarray") else coef, float)
        coef = np.atleast_2d(coef)
        intercept = np.broadcast_to(
            np.asarray(final.intercept_, float).ravel(), (len(coef),)
        )
        # score = coef @ (scale * x + shift) + intercept
        self.weights = coef * scale
        self.constant = coef @ shift + intercept
        self.classes = getattr(final, "classes_", None)
        self.binary = self.classes is not None and len(self.classes) == 2
        self._taps(cnn)

    @staticmethod
    def _fold(steps: list, width: int) -> tuple[np.ndarray, np.ndarray]:
        """The scalers between transformer and model as ``x * scale + shift``."""
        scale, shift = np.ones(width), np.zeros(width)
        for step in steps:
            if step is None or step == "passthrough":
                continue
            if not isinstance(step, _AFFINE):
                raise TypeError(
                    f"Between the CNNFeatureTransformer and the linear model, "
                    f"only StandardScaler, RobustScaler, MaxAbsScaler, MinMaxScaler "
                    f"or 'passthrough' keep the class score a weighted sum of the "
                    f"features; got {type(step).__name__}."
                )
            a, b = np.ones(width), np.zeros(width)
            # The flags: StandardScaler(with_mean=False) still computes mean_.
            if isinstance(step, StandardScaler):
                if step.with_std:
                    a = 1.0 / step.scale_
                if step.with_mean:
                    b = -step.mean_ * a
            elif isinstance(step, RobustScaler):
                if step.with_scaling:
                    a = 1.0 / step.scale_
                if step.with_centering:
                    b = -step.center_ * a
            elif isinstance(step, MaxAbsScaler):
                a = 1.0 / step.scale_
            else:  # MinMaxScaler
                if step.clip:
                    raise TypeError(
                        "MinMaxScaler(clip=True) clips features, so the class "
                        "score is not a weighted sum of them: no exact CAM."
                    )
                a, b = np.asarray(step.scale_, float), np.asarray(step.min_, float)
            scale, shift = scale * a, shift * a + b
        return scale, shift

    def _taps(self, cnn: CNNFeatureTransformer) -> None:
        """What to tap: each layer's map; for ``layer=None``, the map that
        the penultimate vector averages (checked on each batch)."""
        tr = self.net.trace
        self.check_tap = None
        self.taps, self.layouts = [], []
        for name, layout in zip(cnn.layers_, cnn.layouts_, strict=True):
            if name == PENULTIMATE:
                tap = map_before_head(tr)
                if tap is None:
                    raise ValueError(
                        "The transformer's layer=None features are not computed "
                        "from a map this CAM can find. Refit it with a layer "
                        "whose output is a map, e.g. the last stage "
                        f"({default_layer(tr)!r}), and pooling='avg'."
                    )
                self.check_tap = Tap(tr.head, pre=True)
                layout = tr.layout_of(tap)  # a map: map_before_head checked
            else:
                tap = Tap(name)
                check_spatial(name, tr, tap, layout)
            self.taps.append(tap)
            self.layouts.append(layout)

    def __call__(
        self, batch: torch.Tensor, wanted: np.ndarray | None
    ) -> tuple[list[torch.Tensor], np.ndarray]:
        taps = self.taps + ([self.check_tap] if self.check_tap else [])
        tensors = tapped_maps(self.net, batch, taps)
        prefix = self.net.trace.prefix_tokens
        if self.check_tap is not None:
            self._check_penultimate(tensors[0], tensors.pop())
        hw = tuple(batch.shape[-2:])
        # Every output's score, checked against the pipeline's own.
        pooled = torch.cat(
            [
                pool(t, "avg", lay, prefix).double().cpu()
                for t, lay in zip(tensors, self.layouts, strict=True)
            ],
            dim=1,
        )
        scores = pooled.numpy() @ self.weights.T + self.constant  # (n, k)
        self._check_scores(pooled.numpy(), scores)
        index, sign = self._choose(scores, wanted)
        w = self.weights[index] * sign[:, None]
        raw = linear_cam(tensors, self.layouts, prefix, hw, w)
        return raw, index if not self.binary else np.where(sign > 0, 1, 0)

    def _choose(
        self, scores: np.ndarray, wanted: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Row of the coefficients and its sign for each image's target."""
        n, k = scores.shape
        if self.binary:
            cls = (scores[:, 0] > 0).astype(int) if wanted is None else wanted
            cls = np.asarray(cls, dtype=int)
            return np.zeros(n, int), np.where(cls == 1, 1.0, -1.0)
        if wanted is None:
            if self.classes is None and k > 1:
                raise ValueError(
                    f"The regressor has {k} outputs: pass target=<output index>."
                )
            return scores.argmax(1), np.ones(n)
        index = np.asarray(wanted)
        if self.classes is None and (
            not np.issubdtype(index.dtype, np.integer)
            or ((index < 0) | (index >= k)).any()
        ):
            raise ValueError(
                f"target must be an output index in [0, {k}); got {index.tolist()}."
            )
        return index.astype(int), np.ones(n)

    def _check_scores(self, pooled: np.ndarray, scores: np.ndarray) -> None:
        """The CAM's identity against the pipeline's own scores."""
        features = pooled.astype(np.float32)
        if hasattr(self.tail, "decision_function"):
            theirs = self.tail.decision_function(features)
        else:
            theirs = self.tail.predict(features)
        theirs = np.asarray(theirs, float).reshape(len(pooled), -1)
        if theirs.shape != scores.shape or not np.allclose(
            theirs, scores, rtol=1e-4, atol=1e-4 * (1 + np.abs(theirs).max())
        ):
            final = self.pipe.steps[-1][1]
            raise TypeError(
                f"The scores of {type(final).__name__} are not coef_ @ features + "
                "intercept_ (after the scalers), so the map would not explain "
                "them. Use a linear model whose decision_function is linear in "
                "its input."
            )

    def _check_penultimate(self, grid: torch.Tensor, vector: torch.Tensor) -> None:
        pooled = pool(grid, "avg", self.layouts[0], self.net.trace.prefix_tokens)
        vector = vector.reshape(len(vector), -1).float()
        if pooled.shape != vector.shape or not torch.allclose(
            pooled, vector, rtol=1e-4, atol=1e-4 * (1 + float(vector.abs().max()))
        ):
            tap = self.taps[0]
            raise ValueError(
                "The transformer's layer=None features (the input of the "
                f"network's last linear layer, {self.net.trace.head!r}) are not "
                f"the average of the map before it ({tap.module!r}), so the "
                "CAM of that vector is not defined. Refit the transformer with "
                "a layer whose output is a map, and pooling='avg'."
            )


class ActivationMapDisplay:
    """Class activation maps drawn over their images.

    Use :meth:`from_estimator` to compute and draw them in one call; the
    constructor takes maps computed already (:func:`activation_maps`).

    Parameters
    ----------
    maps : ndarray of shape (n_samples, height, width)
        Non-negative maps.
    images : ndarray of shape (n_samples, height, width, 3)
        The images the maps belong to, floats in [0, 1] or uint8, at the
        maps' resolution.
    targets : array-like of shape (n_samples,), default=None
        What each map explains (class labels); shown as titles.

    Attributes
    ----------
    ax_ : ndarray of matplotlib Axes
        One axes per image.
    figure_ : matplotlib Figure
        The figure that holds them.
    overlays_ : list of matplotlib AxesImage
        The drawn maps.

    See Also
    --------
    activation_maps : The maps themselves.

    Examples
    --------
    >>> import matplotlib
    >>> matplotlib.use("Agg")
    >>> import numpy as np
    >>> from sklearn_cnn.inspection import ActivationMapDisplay
    >>> maps = np.zeros((2, 8, 8)); maps[:, 2, 3] = 1
    >>> images = np.full((2, 8, 8, 3), 0.5)
    >>> disp = ActivationMapDisplay(maps, images, targets=["cat", "dog"]).plot()
    >>> disp.ax_.shape
    (2,)
    """

    def __init__(self, maps: Any, images: Any, *, targets: Any = None) -> None:
        self.maps = maps
        self.images = images
        self.targets = targets

    def plot(
        self,
        ax: Any = None,
        *,
        alpha: float = 0.5,
        cmap: str = "jet",
        n_cols: int = 4,
    ) -> ActivationMapDisplay:
        """Draw each image with its map over it.

        Parameters
        ----------
        ax : matplotlib Axes, array-like of Axes or None, default=None
            Where to draw: one axes per image. None makes a new figure with
            a grid of ``n_cols`` columns.
        alpha : float, default=0.5
            Opacity of the maps (0: the images alone).
        cmap : str, default="jet"
            Colour map of the maps, each scaled to its own maximum.
        n_cols : int, default=4
            Columns of the new figure's grid.

        Returns
        -------
        display : ActivationMapDisplay
            The display, with ``ax_``, ``figure_`` and ``overlays_`` set.
        """
        import matplotlib.pyplot as plt

        maps = np.asarray(self.maps, dtype=float)
        images = np.asarray(self.images)
        if maps.ndim != 3 or images.shape[:3] != maps.shape:
            raise ValueError(
                f"maps (shape {maps.shape}) and images (shape {images.shape}) "
                "must be (n, height, width) and (n, height, width, 3)."
            )
        n = len(maps)
        if ax is None:
            cols = max(1, min(n_cols, n))
            rows = -(-n // cols)
            fig, grid = plt.subplots(
                rows, cols, figsize=(2.5 * cols, 2.5 * rows), squeeze=False
            )
            axes = grid.ravel()
            for extra in axes[n:]:
                extra.set_axis_off()
            axes = axes[:n]
        else:
            axes = np.atleast_1d(np.asarray(ax, dtype=object)).ravel()
            if len(axes) < n:
                raise ValueError(f"{n} images but {len(axes)} axes were given.")
            axes = axes[:n]
            fig = axes[0].figure
        targets = None if self.targets is None else list(self.targets)
        self.overlays_ = []
        for i, a in enumerate(axes):
            a.imshow(images[i])
            peak = maps[i].max()
            shown = maps[i] / peak if peak > 0 else maps[i]
            self.overlays_.append(
                a.imshow(shown, cmap=cmap, alpha=alpha, vmin=0, vmax=1)
            )
            if targets is not None:
                a.set_title(str(targets[i]))
            a.set_axis_off()
        self.ax_ = np.asarray(axes, dtype=object)
        self.figure_ = fig
        return self

    @classmethod
    def from_estimator(
        cls,
        estimator: Any,
        X: Any,
        *,
        layer: str | None = None,
        target: Any = None,
        batch_size: int = 16,
        ax: Any = None,
        alpha: float = 0.5,
        cmap: str = "jet",
        n_cols: int = 4,
    ) -> ActivationMapDisplay:
        """Compute the maps of ``X`` and draw them over the images.

        The images are drawn as the network sees them (after the
        estimator's resize and crop), under maps at that resolution.

        Parameters
        ----------
        estimator : fitted estimator
            As for :func:`activation_maps`.
        X : array-like of images or list of paths / PIL images
            Images to explain (a few: one axes each).
        layer, target, batch_size :
            As for :func:`activation_maps`; titles show the targets.
        ax, alpha, cmap, n_cols :
            As for :meth:`plot`.

        Returns
        -------
        display : ActivationMapDisplay
            The display, drawn.
        """
        maps, images, targets = _explain(
            estimator, X, layer, target, True, batch_size, images=True
        )
        disp = cls(maps, images, targets=targets)
        return disp.plot(ax=ax, alpha=alpha, cmap=cmap, n_cols=n_cols)
