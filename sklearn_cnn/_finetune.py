"""FineTuneClassifier: fine-tune a pretrained CNN as a scikit-learn classifier.

The pieces, in the order ``fit`` uses them:

* the network is built by ``NetworkMixin`` and its classifier (the last
  ``nn.Linear``) replaced by a fresh head sized to ``classes_``;
* ``freeze`` is resolved against the forward order that one traced pass
  revealed: frozen modules lose ``requires_grad`` and stay in eval mode;
* the head is warmed up as a linear probe on the frozen network's pooled
  features (a standardized logistic regression folded into the linear layer);
* then mini-batch training with parameter groups, a warm-up + cosine schedule,
  a validation split that selects the best epoch (the probe included).
"""

from __future__ import annotations

import math
import sys
import time
import warnings
from numbers import Integral, Real
from typing import Any

import numpy as np
import torch
from scipy.special import log_softmax, softmax
from sklearn.base import BaseEstimator, ClassifierMixin, _fit_context
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler
from sklearn.utils import check_random_state
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.class_weight import compute_class_weight
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, column_or_1d
from torch import nn

from ._base import NetworkMixin, _network_constraints
from ._freezing import (
    _float_logits,
    _frozen_modules,
    _install_head,
    _logits,
    _stages,
)
from ._images import check_images
from ._layers import Tap, trace
from ._runtime import Progress, autocast, has_conv2d
from ._training import (
    _Augmented,
    _cosine_warmup,
    _FeatureSource,
    _ImageSource,
    _Labelled,
    _Loss,
    _Selection,
    light_augment,
)

_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
#: The probe's logistic regression: sklearn's default strength on standardized
#: features, iterations enough for a few thousand features.
_PROBE_C, _PROBE_MAX_ITER = 1.0, 1000


# ---------------------------------------------------------------------------
# The estimator
# ---------------------------------------------------------------------------


def _first_float(outputs: list[torch.Tensor]) -> torch.Tensor:
    """The one tapped tensor, as float32 (autocast may have made it bf16)."""
    return outputs[0].float()


class FineTuneClassifier(ClassifierMixin, NetworkMixin, BaseEstimator):
    """Fine-tune a pretrained CNN on your labels, as a scikit-learn classifier.

    The network's classifier is replaced by a linear head with one output per
    class, the head is first fitted as a linear probe on the frozen network's
    features, and then the head and the unfrozen part of the backbone train
    together (LP-FT). With the defaults it starts from, and never returns
    weights worse on the validation split than, the linear probe.

    Parameters
    ----------
    model : str, torch.nn.Module or callable, default="resnet18"
        A torchvision model name, a module of your own (copied, never
        modified), or a zero-argument callable that builds one (cheap for
        :func:`~sklearn.base.clone` to copy; use :func:`functools.partial`,
        not a lambda, so that it pickles). Its last ``nn.Linear`` is the
        classifier that is replaced; a model without one gets a linear head on
        its globally average-pooled output.
    weights : None, str, path or torchvision WeightsEnum, default="DEFAULT"
        As for :class:`CNNFeatureTransformer`: ``"DEFAULT"``, an enum name, a
        ``WeightsEnum``, None (random weights) or a state-dict file.
    freeze : int, float, str, default=0
        What does not train. The *stages* are the model's top-level modules
        that hold parameters or buffers, in forward order (a never-called
        ``nn.ModuleList`` such as EfficientNet's ``_blocks`` counts as its
        blocks; ``stages_`` lists them after fit and an out-of-range value
        lists them in its error). Parameter-free modules (ReLU, pooling) are
        not stages: freezing them would change nothing.

        - int k: the first k stages (0: everything trains).
        - float f in [0, 1]: the first modules, in forward order, that hold a
          fraction f of the backbone's parameters (1.0: only the head trains).
          Note ``freeze=1`` (one stage) and ``freeze=1.0`` (all) differ.
        - a module name from ``model.named_modules()`` (as
          :func:`~sklearn_cnn.list_layers` shows them): everything up to and
          including it.
        - ``"backbone"``: only the head trains.

        Frozen modules get no gradients, are left out of the optimizer and stay
        in eval mode (BatchNorm statistics and dropout included). Autograd
        records nothing for a frozen prefix, so no backward pass runs through
        it; with only the head training and ``augment=None``, the backbone's
        features are computed once and the epochs train the head on them.
    lr : float, default=1e-3
        Peak learning rate of the new head.
    backbone_lr : float or None, default=None
        Peak learning rate of the pretrained layers that train; None is
        ``lr / 10``, so that they move slower than the new head.
    head_init : {"probe", "random"}, default="probe"
        "probe" fits the new head first as a logistic regression (standardized,
        ``C=1``) on the frozen pretrained network's pooled features of the
        training images, computed once, and folds the standardization into
        the linear layer: fine-tuning starts from the probe's accuracy instead
        of from chance. "random" keeps PyTorch's default initialisation.
    batchnorm : {"frozen", "train"}, default="frozen"
        "frozen": every BatchNorm keeps its pretrained running statistics (eval
        mode), also in the layers that train; its scale and shift still train.
        This is what Keras advises for small data sets: a few hundred steps at
        small batch sizes move the statistics away from what the pretrained
        weights expect. "train": BatchNorm layers in the trainable part update
        their statistics (frozen ones never do).
    epochs : int, default=10
        Passes over the training images. 0 keeps the probe head (or the random
        one) without training.
    batch_size : int, default=32
        Images per optimizer step; also per forward pass in prediction.
    optimizer : {"adamw", "sgd"}, default="adamw"
        AdamW, or SGD with Nesterov momentum 0.9. Either way the learning rate
        warms up linearly over the first 10 % of the steps and then follows a
        cosine decay to zero.
    weight_decay : float, default=1e-4
        Weight decay of weight matrices and convolution kernels; never applied
        to biases and normalization parameters (one-dimensional parameters).
    augment : "light", None or callable, default="light"
        Training-time augmentation of each image (before normalization).
        "light": a random resized crop keeping 85-100 % of the area and a
        horizontal flip (see ``light_augment`` for why so light). A callable
        receives one (C, H, W) tensor, uint8 for integer images, and returns
        one (every image of a batch must end up the same size); it draws its
        randomness from torch's global generator, which ``fit`` seeds from
        ``random_state``. Disable it (None) for images whose orientation
        matters, e.g. digits and text.
    validation_fraction : float or None, default=0.1
        Fraction of the training images held out (stratified, drawn from
        ``random_state``) to measure each epoch and select the best one. The
        network then trains on the rest only, and in cross-validation this
        split happens again inside every fold: for a fixed number of epochs
        on all the data, set ``validation_fraction=None`` (or 0).
    early_stopping : bool, default=True
        With a validation split: stop once ``n_iter_no_change`` epochs in a row
        bring no improvement over the best trained epoch, and keep the weights
        of the best epoch (highest validation accuracy, ties broken by the
        lower loss). The start (epoch 0, the probe head) is a candidate too;
        when it wins, the probe is refitted on all the training images, so that
        the result is the linear probe itself. Without a validation split
        every epoch runs and the last weights are kept.
    n_iter_no_change : int, default=3
        Epochs without improvement before early stopping.
    class_weight : dict, "balanced" or None, default=None
        Weights of the classes in the loss and in the probe, as in
        :class:`~sklearn.linear_model.LogisticRegression`.
    label_smoothing : float, default=0.0
        Label smoothing of the cross-entropy loss, in [0, 1).
    image_size, mean, std :
        Preprocessing, as for :class:`CNNFeatureTransformer`.
    device : "auto", str or torch.device, default="auto"
        "auto" trains on CUDA when available, else on the CPU.
    precision : {"auto", "fp32", "bf16", "fp16"}, default="auto"
        Autocast dtype for the forward passes; "auto" uses bfloat16 where the
        hardware runs it natively (CUDA, CPUs with AVX512-BF16 or AMX), float16
        with loss scaling on older GPUs, float32 elsewhere. Conv nets run in
        the channels_last memory format.
    num_workers : int, default=0
        DataLoader worker processes that decode and augment images.
    random_state : int, RandomState instance or None, default=None
        Seeds the head, the validation split, the shuffling, the augmentation
        and dropout. With a fixed value, two fits on the CPU give identical
        predictions (torch's global generator is left as it was).
    warm_start : bool, default=False
        When fitted already, continue training the current network for
        ``epochs`` more epochs (new optimizer and schedule; ``freeze`` is
        applied anew; no probe) instead of starting from the pretrained one.
    verbose : int, default=0
        Above 0, report the progress of each epoch and its metrics on stderr.

    Attributes
    ----------
    classes_ : ndarray of shape (n_classes,)
        The class labels.
    model_ : torch.nn.Module
        The fine-tuned network, in eval mode, on ``device_``.
    device_ : torch.device
        Where the network runs.
    preprocessing_ : Preprocessing
        Resize, crop, mean and std used for every image.
    stages_ : list of str
        The stages that an int ``freeze`` counts, in forward order.
    n_trainable_params_ : int
        Parameters that trained in the last fit (the head's included).
    history_ : list of dict
        One row per epoch: ``epoch``, ``train_loss``, ``valid_loss``,
        ``valid_accuracy`` (NaN without a validation split) and ``time`` (s).
        Row 0 describes the start (the probe head) and its ``time`` the setup
        (network, probe).
    best_epoch_ : int
        The epoch whose weights the classifier holds: with a validation split
        and ``early_stopping`` the best one (0: the probe head won, and was
        refitted on all the images), otherwise the last one trained.
    n_iter_ : int
        Epochs trained, over all warm-started fits.

    See Also
    --------
    CNNFeatureTransformer : The frozen network's features for any estimator.

    Notes
    -----
    Ctrl-C during ``fit`` stops training; the estimator keeps the best weights
    so far (the last completed epoch's without a validation split) and warns.
    A model fitted on a GPU pickles with its weights on the CPU and loads on a
    machine without CUDA.

    Examples
    --------
    >>> import numpy as np
    >>> from sklearn_cnn import FineTuneClassifier
    >>> rng = np.random.default_rng(0)
    >>> X = rng.integers(0, 256, (20, 32, 32, 3), dtype=np.uint8)
    >>> y = np.array(["cat", "dog"] * 10)
    >>> clf = FineTuneClassifier("resnet18", weights=None, image_size=32,
    ...                          epochs=2, random_state=0)
    >>> clf.fit(X, y).predict_proba(X[:3]).shape
    (3, 2)
    >>> clf.classes_
    array(['cat', 'dog'], dtype='<U3')
    """

    _parameter_constraints: dict = {
        **_network_constraints,
        "freeze": [
            Interval(Integral, 0, None, closed="left"),
            Interval(Real, 0, 1, closed="both"),
            str,
        ],
        "lr": [Interval(Real, 0, None, closed="neither")],
        "backbone_lr": [None, Interval(Real, 0, None, closed="left")],
        "head_init": [StrOptions({"probe", "random"})],
        "batchnorm": [StrOptions({"frozen", "train"})],
        "epochs": [Interval(Integral, 0, None, closed="left")],
        "optimizer": [StrOptions({"adamw", "sgd"})],
        "weight_decay": [Interval(Real, 0, None, closed="left")],
        "augment": [None, StrOptions({"light"}), callable],
        "validation_fraction": [None, Interval(Real, 0, 1, closed="left")],
        "early_stopping": ["boolean"],
        "n_iter_no_change": [Interval(Integral, 1, None, closed="left")],
        "class_weight": [None, dict, StrOptions({"balanced"})],
        "label_smoothing": [Interval(Real, 0, 1, closed="left")],
        "random_state": ["random_state"],
        "warm_start": ["boolean"],
    }

    def __init__(
        self,
        model: Any = "resnet18",
        weights: Any = "DEFAULT",
        *,
        freeze: int | float | str = 0,
        lr: float = 1e-3,
        backbone_lr: float | None = None,
        head_init: str = "probe",
        batchnorm: str = "frozen",
        epochs: int = 10,
        batch_size: int = 32,
        optimizer: str = "adamw",
        weight_decay: float = 1e-4,
        augment: Any = "light",
        validation_fraction: float | None = 0.1,
        early_stopping: bool = True,
        n_iter_no_change: int = 3,
        class_weight: Any = None,
        label_smoothing: float = 0.0,
        image_size: Any = None,
        mean: Any = None,
        std: Any = None,
        device: Any = "auto",
        precision: str = "auto",
        num_workers: int = 0,
        random_state: Any = None,
        warm_start: bool = False,
        verbose: int = 0,
    ) -> None:
        self.model = model
        self.weights = weights
        self.freeze = freeze
        self.lr = lr
        self.backbone_lr = backbone_lr
        self.head_init = head_init
        self.batchnorm = batchnorm
        self.epochs = epochs
        self.batch_size = batch_size
        self.optimizer = optimizer
        self.weight_decay = weight_decay
        self.augment = augment
        self.validation_fraction = validation_fraction
        self.early_stopping = early_stopping
        self.n_iter_no_change = n_iter_no_change
        self.class_weight = class_weight
        self.label_smoothing = label_smoothing
        self.image_size = image_size
        self.mean = mean
        self.std = std
        self.device = device
        self.precision = precision
        self.num_workers = num_workers
        self.random_state = random_state
        self.warm_start = warm_start
        self.verbose = verbose

    # -- fit -----------------------------------------------------------------

    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X: Any, y: Any) -> FineTuneClassifier:
        """Fine-tune the network on images ``X`` and labels ``y``.

        Parameters
        ----------
        X : array-like of images or list of paths / PIL images
            Training images.
        y : array-like of shape (n_samples,)
            Class labels (ints, strings, ...); at least two classes.

        Returns
        -------
        self : FineTuneClassifier
            The fitted classifier.
        """
        X = check_images(X)
        classes, y_enc = _check_targets(y, len(X))
        resume = self.warm_start and hasattr(self, "model_")
        if resume and not np.array_equal(classes, self.classes_):
            raise ValueError(
                f"warm_start=True but y has the classes {classes.tolist()} while the "
                f"fitted classifier has {self.classes_.tolist()}. Fit with the same "
                "classes, or set warm_start=False to start over."
            )
        seed = int(check_random_state(self.random_state).randint(2**31 - 1))
        train_idx, val_idx = self._split(y_enc, len(classes), seed)
        weights = self._class_weights(classes, y_enc[train_idx])
        start = time.perf_counter()
        devices = list(range(torch.cuda.device_count()))
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            try:
                if not resume:
                    self._setup(X, classes)
                self._apply_freeze()
                self._train(X, y_enc, train_idx, val_idx, weights, seed, resume, start)
            except BaseException:
                if not resume:  # no half-fitted estimator
                    self._forget()
                raise
        return self

    def _setup(self, X: Any, classes: np.ndarray) -> None:
        self._build_network(X)
        self.classes_ = classes
        self._head, appended = _install_head(
            self.model_, self.trace_, len(classes), self._example(X)
        )
        if appended:  # the trace now shows the head
            self.trace_ = trace(self.model_, self._example(X))
        self.stages_ = _stages(self.model_, self.trace_, self._head)
        self.history_: list[dict] = []
        self.n_iter_ = 0

    def _forget(self) -> None:
        for name in list(self.__dict__):
            if name.endswith("_") and not name.startswith("__"):
                del self.__dict__[name]

    def _split(
        self, y: np.ndarray, n_classes: int, seed: int
    ) -> tuple[np.ndarray, np.ndarray]:
        index = np.arange(len(y))
        fraction = self.validation_fraction
        if not fraction:
            return index, index[:0]
        n_val = math.ceil(fraction * len(y))
        counts = np.bincount(y, minlength=n_classes)
        if n_val < n_classes or len(y) - n_val < n_classes or counts.min() < 2:
            raise ValueError(
                f"validation_fraction={fraction} is too large for this data: a "
                f"stratified split of {len(y)} images of {n_classes} classes (the "
                f"smallest has {counts.min()} image(s)) into {len(y) - n_val} for "
                f"training and {n_val} for validation needs at least one image of "
                "every class on each side. Pass more images, a fraction that "
                "fits, or validation_fraction=None to train on all of them "
                "(early stopping then has nothing to watch)."
            )
        train, val = train_test_split(
            index, test_size=n_val, stratify=y, random_state=seed
        )
        return np.sort(train), np.sort(val)

    def _class_weights(self, classes: np.ndarray, y: np.ndarray) -> np.ndarray | None:
        if self.class_weight is None:
            return None
        if isinstance(self.class_weight, dict):
            unknown = [k for k in self.class_weight if k not in set(classes.tolist())]
            if unknown:
                raise ValueError(
                    f"class_weight has keys that are not classes of y: {unknown}. "
                    f"The classes are {classes.tolist()}."
                )
        labels = classes[y]
        return compute_class_weight(self.class_weight, classes=classes, y=labels)

    def _apply_freeze(self) -> set[str]:
        """Set ``requires_grad``; return the names of the frozen modules."""
        model = self.model_
        frozen = _frozen_modules(
            model, self.trace_, self._head, self.stages_, self.freeze
        )
        self._frozen = frozen
        for p in model.parameters():
            p.requires_grad_(True)
        for name, m in model.named_modules():
            if name in frozen:
                for p in m.parameters(recurse=False):
                    p.requires_grad_(False)
        if frozen & set(self.trace_.calls):
            # The root's own parameters (a class token) are used first.
            for p in model.parameters(recurse=False):
                p.requires_grad_(False)
        return frozen

    def _train_mode(self) -> None:
        """Train mode, except frozen modules (and BatchNorm unless "train")."""
        self.model_.train()
        for name, m in self.model_.named_modules():
            if name in self._frozen or (
                self.batchnorm == "frozen" and isinstance(m, _BATCHNORMS)
            ):
                m.training = False

    def _head_params(self) -> list[nn.Parameter]:
        return list(self.model_.get_submodule(self._head).parameters())

    def _param_groups(self) -> list[dict]:
        """Head and backbone, each split into decayed and not decayed."""
        head_ids = {id(p) for p in self._head_params()}
        head = self._head_params()
        backbone = [
            p
            for p in self.model_.parameters()
            if p.requires_grad and id(p) not in head_ids
        ]
        backbone_lr = self.lr / 10 if self.backbone_lr is None else self.backbone_lr
        groups = []
        for name, params, lr in (
            ("head", head, self.lr),
            ("backbone", backbone, backbone_lr),
        ):
            for decayed in (True, False):
                chosen = [p for p in params if (p.ndim > 1) == decayed]
                if chosen:
                    groups.append(
                        {
                            "name": f"{name}" + ("" if decayed else " (no decay)"),
                            "params": chosen,
                            "lr": lr,
                            "weight_decay": self.weight_decay if decayed else 0.0,
                        }
                    )
        return groups

    def _make_optimizer(self) -> torch.optim.Optimizer:
        groups = self._param_groups()
        if self.optimizer == "sgd":
            return torch.optim.SGD(groups, lr=self.lr, momentum=0.9, nesterov=True)
        return torch.optim.AdamW(groups, lr=self.lr)

    # -- the training loop -----------------------------------------------------

    def _train(
        self,
        X: Any,
        y: np.ndarray,
        train_idx: np.ndarray,
        val_idx: np.ndarray,
        class_weights: np.ndarray | None,
        seed: int,
        resume: bool,
        start: float,
    ) -> None:
        model = self.model_
        self.n_trainable_params_ = sum(
            p.numel() for p in model.parameters() if p.requires_grad
        )
        head_params = {id(p) for p in self._head_params()}
        head_only = all(
            not p.requires_grad for p in model.parameters() if id(p) not in head_params
        )
        # Only the head trains and the images are not augmented: the backbone's
        # output never changes, so compute it once and train the head on it.
        cached = head_only and self.augment is None
        probe = not resume and self.head_init == "probe"
        features: dict[str, torch.Tensor] = {}
        if probe or cached:
            self._check_vector_head()
            features["train"] = self._head_inputs(X, train_idx)
            if cached:
                features["valid"] = self._head_inputs(X, val_idx)
        if probe:
            self._fit_probe(features["train"], y[train_idx], class_weights)

        if cached:
            device = self.device_
            train_src = _FeatureSource(features["train"], y[train_idx], device)
            val_src = _FeatureSource(features["valid"], y[val_idx], device)
            forward = model.get_submodule(self._head)
        else:
            train_src = self._image_source(X, train_idx, y, augment=True)
            val_src = self._image_source(X, val_idx, y, augment=False)
            forward = model
        kept, interrupted = self._run_epochs(
            train_src,
            val_src,
            forward,
            dtype=None if cached else self._autocast_dtype,
            class_weights=class_weights,
            generator=torch.Generator().manual_seed(seed),
            start=start,
        )
        if probe and kept == 0 and len(val_idx) and not interrupted:
            # The probe head won: the validation images were only needed to
            # tell, so refit it on all the training images, as a probe would be.
            if "valid" not in features:
                features["valid"] = self._head_inputs(X, val_idx)
            both = torch.cat([features["train"], features["valid"]])
            self._fit_probe(both, y[np.r_[train_idx, val_idx]], class_weights)
        self.best_epoch_ = kept
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)

    def _check_vector_head(self) -> None:
        shape = self.trace_.input_shapes.get(self._head)
        if shape is None or len(shape) != 1:
            raise ValueError(
                f"The head {self._head!r} reads a tensor of shape {shape}, not a "
                "vector of pooled features, which head_init='probe' and training "
                "on cached features need. Use head_init='random' and an augment."
            )

    def _run_epochs(
        self,
        train_src: _ImageSource | _FeatureSource,
        val_src: _ImageSource | _FeatureSource,
        forward: nn.Module,
        *,
        dtype: torch.dtype | None,
        class_weights: np.ndarray | None,
        generator: torch.Generator,
        start: float,
    ) -> tuple[int, bool]:
        """Train for ``epochs``; return the epoch whose weights the model keeps
        and whether Ctrl-C ended the training."""
        model, device = self.model_, self.device_
        criterion = _Loss(class_weights, self.label_smoothing, device)
        scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
        optimizer = self._make_optimizer()
        steps = train_src.n_batches(self.batch_size) * self.epochs
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, _cosine_warmup(max(1, steps))
        )
        has_val = len(val_src) > 0
        first = self.history_[-1]["epoch"] + 1 if self.history_ else 1
        last = first + self.epochs - 1
        val_loss, val_acc = self._evaluate(val_src, forward, dtype, criterion)
        if not self.history_:
            self._log(
                epoch=0, train_loss=math.nan, valid_loss=val_loss,
                valid_accuracy=val_acc, time=time.perf_counter() - start,
            )  # fmt: skip
        selection = _Selection(first - 1, val_acc, val_loss, model, has_val)
        epoch, done = first, first - 1
        try:
            for epoch in range(first, last + 1):
                tic = time.perf_counter()
                progress = Progress(
                    train_src.n_used(self.batch_size),
                    f"epoch {epoch}/{last}",
                    enabled=bool(self.verbose),
                )
                self._train_mode()
                total = torch.zeros((), device=device)
                for xb, yb in train_src.batches(self.batch_size, generator):
                    with autocast(device, dtype):
                        logits = _logits(forward(xb))
                    loss = criterion(logits, yb, "mean")
                    optimizer.zero_grad(set_to_none=True)
                    scaler.scale(loss).backward()
                    scaler.step(optimizer)
                    scaler.update()
                    schedule.step()
                    total += loss.detach() * len(yb)
                    progress.update(len(yb))
                train_loss = total.item() / train_src.n_used(self.batch_size)
                val_loss, val_acc = self._evaluate(val_src, forward, dtype, criterion)
                self.n_iter_ += 1
                self._log(
                    epoch=epoch, train_loss=train_loss, valid_loss=val_loss,
                    valid_accuracy=val_acc, time=time.perf_counter() - tic,
                )  # fmt: skip
                selection.update(epoch, val_acc, val_loss)
                done = epoch
                if (
                    has_val
                    and self.early_stopping
                    and selection.stall >= self.n_iter_no_change
                ):
                    break
        except KeyboardInterrupt:
            which = "best" if has_val else "last"
            warnings.warn(
                f"fit was interrupted during epoch {epoch}: the classifier keeps "
                f"the weights of epoch {selection.epoch}, the {which} completed so "
                "far (see history_).",
                UserWarning,
                stacklevel=5,  # the caller of fit
            )
            model.load_state_dict(selection.state)
            return selection.epoch, True
        if has_val and self.early_stopping:
            model.load_state_dict(selection.state)
            return selection.epoch, False
        return done, False

    def _evaluate(
        self,
        source: _ImageSource | _FeatureSource,
        forward: nn.Module,
        dtype: torch.dtype | None,
        criterion: _Loss,
    ) -> tuple[float, float]:
        """Validation loss and accuracy (NaN without validation images)."""
        if len(source) == 0:
            return math.nan, math.nan
        self.model_.eval()
        loss_sum = weight_sum = correct = 0.0
        with torch.inference_mode():
            for xb, yb in source.batches(self.batch_size):
                with autocast(self.device_, dtype):
                    logits = _logits(forward(xb)).float()
                loss_sum += criterion(logits, yb, "sum").item()
                weight_sum += criterion.total_weight(yb)
                correct += float((logits.argmax(1) == yb).sum())
        return loss_sum / weight_sum, correct / len(source)

    def _log(self, **row: float) -> None:
        self.history_.append(row)
        if self.verbose:
            print(
                f"epoch {row['epoch']}: train loss {row['train_loss']:.4f}, valid "
                f"loss {row['valid_loss']:.4f}, valid accuracy "
                f"{row['valid_accuracy']:.4f} ({row['time']:.1f} s)",
                file=sys.stderr,
                flush=True,
            )

    def _image_source(
        self, X: Any, index: np.ndarray, y: np.ndarray, augment: bool
    ) -> _ImageSource:
        pre: Any = self.preprocessing_
        if augment and self.augment is not None:
            fn = light_augment if self.augment == "light" else self.augment
            pre = _Augmented(fn, pre)
        return _ImageSource(
            _Labelled(X, index, y, pre),
            device=self.device_,
            num_workers=self.num_workers,
            channels_last=has_conv2d(self.model_),
        )

    def _head_inputs(self, X: Any, index: np.ndarray) -> torch.Tensor:
        """The frozen network's pooled features (the head's input), on the CPU."""
        width = self.trace_.input_shapes[self._head][0]
        taps = [Tap(self._head, pre=True)]
        return torch.from_numpy(
            self._run(X, taps, _first_float, width, "features", index=index)
        )

    def _fit_probe(
        self, features: torch.Tensor, y: np.ndarray, class_weights: np.ndarray | None
    ) -> None:
        """Logistic regression on standardized features, folded into the head."""
        Z = features.numpy().astype(np.float64)
        scaler = StandardScaler().fit(Z)
        cw = None if class_weights is None else dict(enumerate(class_weights))
        probe = LogisticRegression(
            C=_PROBE_C, max_iter=_PROBE_MAX_ITER, class_weight=cw
        )
        with warnings.catch_warnings():
            # The probe is a starting point; fine-tuning goes on from it.
            warnings.simplefilter("ignore", ConvergenceWarning)
            probe.fit(scaler.transform(Z), y)
        coef, intercept = probe.coef_, probe.intercept_
        if coef.shape[0] == 1:  # binary: softmax of (-z/2, z/2) is sigmoid(z)
            coef = np.vstack([-coef / 2, coef / 2])
            intercept = np.array([-intercept[0] / 2, intercept[0] / 2])
        weight = coef / scaler.scale_
        bias = intercept - weight @ scaler.mean_
        head = self.model_.get_submodule(self._head)
        with torch.no_grad():
            head.weight.copy_(torch.as_tensor(weight, dtype=head.weight.dtype))
            head.bias.copy_(torch.as_tensor(bias, dtype=head.bias.dtype))

    # -- prediction ------------------------------------------------------------

    def _logits_of(self, X: Any) -> np.ndarray:
        check_is_fitted(self)
        X = check_images(X)
        return self._run(X, [], _float_logits, len(self.classes_), "predict")

    def decision_function(self, X: Any) -> np.ndarray:
        """The head's logits.

        Parameters
        ----------
        X : array-like of images or list of paths / PIL images
            Images to score.

        Returns
        -------
        scores : ndarray of shape (n_samples,) or (n_samples, n_classes)
            For two classes, the logit of ``classes_[1]`` minus that of
            ``classes_[0]`` (positive means ``classes_[1]``), as sklearn expects.
        """
        logits = self._logits_of(X)
        if logits.shape[1] == 2:
            return logits[:, 1] - logits[:, 0]
        return logits

    def predict_proba(self, X: Any) -> np.ndarray:
        """Class probabilities (softmax of the logits).

        Parameters
        ----------
        X : array-like of images or list of paths / PIL images
            Images to classify.

        Returns
        -------
        proba : ndarray of shape (n_samples, n_classes), dtype float64
            Rows sum to 1; columns follow ``classes_``.
        """
        return softmax(self._logits_of(X).astype(np.float64), axis=1)

    def predict_log_proba(self, X: Any) -> np.ndarray:
        """Logarithm of :meth:`predict_proba`.

        Parameters
        ----------
        X : array-like of images or list of paths / PIL images
            Images to classify.

        Returns
        -------
        log_proba : ndarray of shape (n_samples, n_classes)
            Log-probabilities; columns follow ``classes_``.
        """
        return log_softmax(self._logits_of(X).astype(np.float64), axis=1)

    def predict(self, X: Any) -> np.ndarray:
        """The most probable class of each image.

        Parameters
        ----------
        X : array-like of images or list of paths / PIL images
            Images to classify.

        Returns
        -------
        y : ndarray of shape (n_samples,)
            Labels from ``classes_``.
        """
        logits = self._logits_of(X)
        return self.classes_[logits.argmax(axis=1)]

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        # Images, not a table: arrays N x H x W (x C), or lists of file paths.
        tags.input_tags.two_d_array = False
        tags.input_tags.three_d_array = True
        tags.input_tags.string = True
        return tags


# ---------------------------------------------------------------------------
# Labels
# ---------------------------------------------------------------------------


def _check_targets(y: Any, n_images: int) -> tuple[np.ndarray, np.ndarray]:
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
