"""FineTuneRegressor: fine-tune a pretrained CNN as a scikit-learn regressor.

The fit is FineTuneClassifier's (``_finetune.FineTuneBase``); what regression
decides, the targets' standardisation, the loss, R², the ridge probe and the
predictions in the user's units, is ``_tasks.Regression``'s.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.base import RegressorMixin
from sklearn.utils._param_validation import StrOptions

from ._finetune import FineTuneBase, FineTuneClassifier
from ._persistence import register
from ._tasks import Regression

#: The classifier's parameters that mean nothing for regression.
_CLASSIFIER_ONLY = ("class_weight", "label_smoothing", "calibrate")


@register
class FineTuneRegressor(RegressorMixin, FineTuneBase):
    """Fine-tune a pretrained CNN on numbers read off images (a severity, an
    age, a count, a measurement), as a scikit-learn regressor.

    The network's classifier is replaced by a linear head with one output per
    target, the head is first fitted as a ridge regression on the frozen
    network's pooled features (closed form, its alpha chosen by efficient
    leave-one-out), and then the head and the unfrozen part of the backbone
    train together (LP-FT). Epoch 0 is that ridge probe: with a validation
    split, selection keeps it unless a later epoch has a higher validation
    R². The targets are standardised inside (per output) and ``predict``
    returns them in your units. Several outputs train one network, with no
    ``MultiOutputRegressor``.

    Parameters
    ----------
    model, weights, freeze, lr, backbone_lr, batchnorm, epochs, batch_size, \
optimizer, schedule, warmup_fraction, layer_decay, unfreeze_at, \
weight_decay, n_iter_no_change, image_size, mean, std, bands, stem, device, \
precision, compile, num_workers, memory, random_state, warm_start, verbose :
        As for :class:`FineTuneClassifier`. Whatever ``backbone_lr``, an
        epoch that wrecks the pretrained network (its validation R² loses
        more than half of the best epoch's; without a validation split, its
        training loss goes back more than half the way from the probe's to
        that of predicting the mean) is undone within the fit.
    loss : {"squared_error", "huber", "absolute_error"}, \
default="squared_error"
        The training loss on the standardised targets, averaged over the
        outputs: squared error, Huber (quadratic within one standard deviation
        of the target, linear beyond: robust to a few wrong targets) or
        absolute error (the median's loss).
    head_init : {"probe", "random"}, default="probe"
        "probe" fits the head first as a ridge regression on the pooled
        features of the un-augmented training images (alpha over
        ``_tasks.RIDGE_ALPHAS``, and whether to standardise the features, by
        efficient leave-one-out), folded into the linear layer. "random"
        keeps PyTorch's default initialisation.
    augment : "light", None or callable, default="light"
        As for :class:`FineTuneClassifier`; "light" crops slightly and mirrors.
        Set None (or an augmentation of your own) when a mirror image or a
        crop changes the target: an angle, a position, a count near the edges.
    validation_fraction : float or None, default=0.1
        Fraction of the training images held out (at random, drawn from
        ``random_state``) to measure each epoch and select the best one;
        fewer than 20 such images train on everything instead, with a
        warning. None (or 0): train on all the images, keep the last epoch.
    early_stopping : bool, default=True
        With a validation split: stop once ``n_iter_no_change`` epochs in a
        row bring no improvement, and keep the best epoch (highest validation
        R², ties broken by the lower loss). When the probe (epoch 0) wins, it
        is refitted on all the training images.
    tta : {None, "flip"}, default=None
        "flip": ``predict`` averages the predictions for each image and its
        mirror (only for targets a mirror leaves unchanged).

    Attributes
    ----------
    n_outputs_ : int
        Number of targets per image.
    y_mean_, y_scale_ : ndarray of shape (n_outputs,)
        The standardisation of the targets: the head predicts
        ``(y - y_mean_) / y_scale_``.
    model_, device_, preprocessing_, stem_, stages_, frozen_, \
frozen_fraction_, head_, n_trainable_params_, best_epoch_, n_iter_, \
backbone_lr_ :
        As for :class:`FineTuneClassifier`.
    history_ : list of dict
        One row per epoch: ``epoch``, ``train_loss``, ``valid_loss``,
        ``valid_r2`` (NaN without a validation split), ``backbone_lr`` (absent
        when only the head trains) and ``time`` (s). Row 0 is the start (the
        ridge probe); the losses are on the standardised targets.

    See Also
    --------
    FineTuneClassifier : The same fit, for class labels.
    CNNFeatureTransformer : Features for :class:`~sklearn.linear_model.RidgeCV`.

    Examples
    --------
    >>> import numpy as np
    >>> from sklearn_cnn import FineTuneRegressor
    >>> rng = np.random.default_rng(0)
    >>> X = rng.integers(0, 256, (20, 32, 32, 3), dtype=np.uint8)
    >>> y = X.mean(axis=(1, 2, 3))  # brightness
    >>> reg = FineTuneRegressor("resnet18", weights=None, image_size=32,
    ...                         epochs=1, validation_fraction=None,
    ...                         random_state=0)
    >>> reg.fit(X, y).predict(X[:3]).shape
    (3,)
    """

    _parameter_constraints: dict = {
        **{
            k: v
            for k, v in FineTuneClassifier._parameter_constraints.items()
            if k not in _CLASSIFIER_ONLY
        },
        "loss": [StrOptions({"squared_error", "huber", "absolute_error"})],
    }

    def __init__(
        self,
        model: Any = "resnet18",
        weights: Any = "DEFAULT",
        *,
        loss: str = "squared_error",
        freeze: int | float | str = 0,
        lr: float = 1e-3,
        backbone_lr: float | None = None,
        head_init: str = "probe",
        batchnorm: str = "frozen",
        epochs: int = 10,
        batch_size: int = 32,
        optimizer: str = "adamw",
        schedule: str = "cosine",
        warmup_fraction: float = 0.1,
        layer_decay: float | None = None,
        unfreeze_at: int | None = None,
        weight_decay: float = 1e-4,
        augment: Any = "light",
        validation_fraction: float | None = 0.1,
        early_stopping: bool = True,
        n_iter_no_change: int = 3,
        tta: str | None = None,
        image_size: Any = None,
        mean: Any = None,
        std: Any = None,
        bands: str = "auto",
        stem: str = "repeat",
        device: Any = "auto",
        precision: str = "auto",
        compile: bool | str = False,
        num_workers: int = 0,
        memory: Any = None,
        random_state: Any = None,
        warm_start: bool = False,
        verbose: int = 0,
    ) -> None:
        self.model = model
        self.weights = weights
        self.loss = loss
        self.freeze = freeze
        self.lr = lr
        self.backbone_lr = backbone_lr
        self.head_init = head_init
        self.batchnorm = batchnorm
        self.epochs = epochs
        self.batch_size = batch_size
        self.optimizer = optimizer
        self.schedule = schedule
        self.warmup_fraction = warmup_fraction
        self.layer_decay = layer_decay
        self.unfreeze_at = unfreeze_at
        self.weight_decay = weight_decay
        self.augment = augment
        self.validation_fraction = validation_fraction
        self.early_stopping = early_stopping
        self.n_iter_no_change = n_iter_no_change
        self.tta = tta
        self.image_size = image_size
        self.mean = mean
        self.std = std
        self.bands = bands
        self.stem = stem
        self.device = device
        self.precision = precision
        self.compile = compile
        self.num_workers = num_workers
        self.memory = memory
        self.random_state = random_state
        self.warm_start = warm_start
        self.verbose = verbose

    def fit(self, X: Any, y: Any, sample_weight: Any = None) -> FineTuneRegressor:
        """Fine-tune the network on images ``X`` and targets ``y``.

        Parameters
        ----------
        X : array-like of images or list of paths / PIL images
            Training images.
        y : array-like of shape (n_samples,) or (n_samples, n_outputs)
            Finite numbers, in any units (standardised inside).
        sample_weight : array-like of shape (n_samples,), default=None
            Weights of the images in the loss, the ridge probe and the
            validation loss and R².

        Returns
        -------
        self : FineTuneRegressor
            The fitted regressor.
        """
        return super().fit(X, y, sample_weight=sample_weight)

    def _task(self, y: Any = None, fitted: bool = True) -> Regression:
        if fitted and hasattr(self, "y_mean_"):
            return Regression(self.loss, self.y_mean_, self.y_scale_, self._one_column)
        return Regression(self.loss)

    def _calibrate(self, z: np.ndarray, y: np.ndarray) -> None:
        """Nothing to calibrate: the outputs are the predictions."""

    def predict(self, X: Any) -> np.ndarray:
        """The targets of each image, in the units of ``y``.

        Parameters
        ----------
        X : array-like of images or list of paths / PIL images
            Images to read the targets off.

        Returns
        -------
        y : ndarray of shape (n_samples,) or (n_samples, n_outputs)
            Shaped as the ``y`` that ``fit`` saw, float64.
        """
        return self._task().predict(self._outputs_of(X))

    def score(self, X: Any, y: Any, sample_weight: Any = None) -> float:
        """R² of ``predict(X)`` against ``y`` (averaged over the outputs).

        Parameters
        ----------
        X : array-like of images or list of paths / PIL images
            Test images, in any form that ``fit`` accepts.
        y : array-like of shape (n_samples,) or (n_samples, n_outputs)
            True targets of ``X``.
        sample_weight : array-like of shape (n_samples,), default=None
            Sample weights.

        Returns
        -------
        score : float
            The coefficient of determination, 1 for perfect predictions.
        """
        return super().score(X, y, sample_weight=sample_weight)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.target_tags.multi_output = True
        return tags
