"""FineTuneClassifier: fine-tune a pretrained CNN as a scikit-learn classifier.

``fit`` only orchestrates; each concern has its module, which owns its
parameters: ``_targets`` (labels, weights, the validation split), ``_head``
(the head, the probe, calibration), ``_freezing`` (what trains, train/eval
modes), ``_optim`` (parameter groups, optimizer, schedule) and ``_training``
(the epochs, selection, early stopping, augmentation).
"""

from __future__ import annotations

import math
import os
import sys
import time
import warnings
from contextlib import nullcontext
from functools import partial
from numbers import Integral, Real
from typing import Any

import numpy as np
import torch
from scipy.special import expit, log_softmax, softmax
from sklearn.base import BaseEstimator, ClassifierMixin, _fit_context
from sklearn.utils import check_random_state
from sklearn.utils._param_validation import HasMethods, Interval, StrOptions
from sklearn.utils.multiclass import type_of_target
from sklearn.utils.validation import check_is_fitted

from ._base import (
    ImageClassifierMixin,
    NetworkMixin,
    _network_constraints,
    restore_on_failure,
)
from ._cache import cache_directory
from ._freezing import (
    _frozen_modules,
    _stages,
    apply_freeze,
    frozen_summary,
    phases,
    train_mode,
)
from ._head import drop_auxiliary_heads, float_logits, install_head, set_head
from ._images import check_images
from ._layers import trace
from ._optim import SCHEDULES, make_optimizer, make_schedule, param_groups
from ._persistence import register
from ._runtime import resolve_device
from ._sources import Sources
from ._targets import check_sample_weight
from ._tasks import MultiLabel, SingleLabel, cross_validated_logits
from ._training import EpochLoop, Guard, Loss, PrefixSkip, Selection


class FineTuneBase(NetworkMixin, BaseEstimator):
    """The fit that FineTuneClassifier and FineTuneRegressor share.

    ``fit`` builds the network, installs a linear head, fits it as a probe on
    the frozen network's features and trains (LP-FT), selecting the best epoch
    on a validation split. What depends on the kind of target is the task's
    (``_tasks``), which a subclass builds in ``_task`` and holds parameters for.
    """

    def _task(self, y: Any = None, fitted: bool = True) -> Any:
        """The task for targets ``y`` (None: as fitted); with ``fitted``,
        holding what the last fit learned of the targets (classes, scale)."""
        raise NotImplementedError

    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X: Any, y: Any, sample_weight: Any = None) -> FineTuneBase:
        """Fine-tune the network on images ``X`` and targets ``y`` (the
        subclasses document their own)."""
        X = check_images(X, unit_floats=self.mean is None and self.std is None)
        resume = self.warm_start and hasattr(self, "model_")
        task = self._task(y, fitted=resume)
        y_enc = task.encode(y, len(X))
        sw = check_sample_weight(sample_weight, len(X))
        if resume:
            self._check_warm_start()
        seed = int(check_random_state(self.random_state).randint(2**31 - 1))
        train_idx, val_idx = task.split(y_enc, self.validation_fraction, seed)
        cw, weights = task.weights(y_enc, train_idx, sw)
        if resume:
            device = self.device_
        else:
            with warnings.catch_warnings():  # _build_network warns, once
                warnings.simplefilter("ignore", RuntimeWarning)
                device = resolve_device(self.device)
        # Seed torch without touching the caller's generators, and without
        # initialising CUDA for a CPU fit.
        gpus = [device.index or 0] if device.type == "cuda" else []
        with (
            torch.random.fork_rng(devices=gpus),
            restore_on_failure(self, mutated=("model_", "history_")),
        ):
            torch.manual_seed(seed)
            if not resume:
                self._setup(X, task)
            interrupted = self._train(
                X, y_enc, weights, cw, train_idx, val_idx, seed, resume
            )
        if interrupted:
            raise KeyboardInterrupt
        return self

    def _check_warm_start(self) -> None:
        """Refuse the parameters a warm start cannot apply to the built network."""
        changed, what = self._changed_params()
        if changed:
            raise ValueError(
                f"warm_start=True continues training the fitted network, which "
                f"keeps the {', '.join(changed)} it was built with, but "
                f"{', '.join(what)}. "
                "Set them back to go on training, or set warm_start=False to fit "
                "anew with the new value(s)."
            )

    def _setup(self, X: Any, task: Any) -> None:
        self._build_network(X)
        for name, value in task.fitted_attributes().items():
            setattr(self, name, value)
        self.head_ = self._install_head(task.n_outputs, self._example(X))
        self.stages_ = _stages(self.model_, self.trace_, self.head_)
        self.history_: list[dict] = []
        self.n_iter_ = 0

    def _install_head(self, n_outputs: int, example: torch.Tensor) -> str:
        """Drop the auxiliary heads and install the head (an appended one shows
        in the trace); return its name."""
        drop_auxiliary_heads(self.model_)
        head, appended = install_head(self.model_, self.trace_, n_outputs, example)
        if appended:
            self.trace_ = trace(self.model_, example)
        return head

    def _rebuild_for_load(self, example: torch.Tensor) -> None:
        """``sklearn_cnn.load`` rebuilt the network from the parameters: redo
        fit's structural steps; the saved weights are loaded next."""
        head = self._install_head(self._task().n_outputs, example)
        if head != self.head_:
            raise ValueError(
                f"The rebuilt network's head is {head!r}, not {self.head_!r}: the "
                "model's code changed since the estimator was saved."
            )
        self.model_.eval().requires_grad_(False)

    def _train(
        self, X: Any, y: np.ndarray, weights: np.ndarray | None,
        cw: np.ndarray | None, train_idx: np.ndarray, val_idx: np.ndarray,
        seed: int, resume: bool,
    ) -> bool:  # fmt: skip
        """The probe, then the phases of training; return whether Ctrl-C ended it."""
        start, model, bs = time.perf_counter(), self.model_, self.batch_size
        task = self._task()
        w = np.ones(len(y), np.float32) if weights is None else weights.astype("f4")
        frozen = _frozen_modules(
            model, self.trace_, self.head_, self.stages_, self.freeze
        )
        self.frozen_, self.frozen_fraction_ = frozen_summary(model, self.head_, frozen)
        sources = Sources(
            self._network, X, y, w, train_idx, val_idx, head=self.head_,
            stages=self.stages_, n_classes=task.n_outputs, augment=self.augment,
            memory=cache_directory(self.memory), batch_size=bs,
            num_workers=self.num_workers, verbose=self.verbose,
        )  # fmt: skip
        has_val = len(val_idx) > 0
        selects = has_val and self.early_stopping
        self.backbone_lr_ = self._backbone_lr(selects)
        probe = not resume and self.head_init == "probe"
        loss = task.loss(cw, self.device_)
        start_loss = None
        if probe:
            features = sources.head_inputs("train", frozen)
            self._fit_probe(features, y, weights, train_idx, seed)
            start_loss = self._head_loss(features, y[train_idx], w[train_idx], loss)
        generator = torch.Generator().manual_seed(seed)
        selection, status, loop, guard = None, "done", None, None
        thawed = _frozen_modules(model, self.trace_, self.head_, self.stages_, 0)
        for epochs, frozen_now in phases(
            frozen, thawed, self.epochs, self.unfreeze_at, self.n_iter_
        ):
            apply_freeze(model, self.trace_, frozen_now)
            forward, train, valid, dtype = sources.phase(frozen_now)
            loop = EpochLoop(
                model, forward, train, valid,
                loss=loss, device=self.device_, batch_size=bs, dtype=dtype,
                train_mode=partial(train_mode, model, frozen_now, self.batchnorm),
                history=self.history_, verbose=self.verbose,
            )  # fmt: skip
            with forward if isinstance(forward, PrefixSkip) else nullcontext():
                if selection is None:
                    val_loss, val_acc = loop.evaluate()
                    if not self.history_:
                        known = {} if start_loss is None else {"train_loss": start_loss}
                        loop.log(
                            epoch=0, **known, valid_loss=val_loss,
                            **{loss.metric: val_acc},
                            time=time.perf_counter() - start,
                        )  # fmt: skip
                    last = self.history_[-1]["epoch"]
                    selection = Selection(last, val_acc, val_loss, model, has_val)
                    guard = Guard(  # what tells a wrecked network in this fit
                        chance_loss=task.chance(*loop.train.targets, loss)[0],
                        start_loss=start_loss,
                        chance_accuracy=task.chance(*loop.valid.targets, loss)[1],
                        names=task.names,
                    )
                self.n_trainable_params_ = sum(
                    p.numel() for p in model.parameters() if p.requires_grad
                )
                trains_backbone = self.n_trainable_params_ > sum(
                    p.numel() for p in model.get_submodule(self.head_).parameters()
                )
                loop.guard = guard if trains_backbone else None
                loop.backbone_lr = self.backbone_lr_ if trains_backbone else None
                status = self._run_phase(loop, epochs, selection, generator, has_val)
            if status not in ("done", "restored"):
                break
        if status == "restored":  # the last epoch wrecked the network
            self.best_epoch_ = selection.epoch
        elif status != "done" or selects:
            self.best_epoch_ = selection.restore()
        else:
            self.best_epoch_ = self.history_[-1]["epoch"]
        refit = probe and self.best_epoch_ == 0 and has_val
        # A regressor has no ``calibrate``.
        cross_validated = refit and getattr(self, "calibrate", False)
        if not cross_validated:
            self._calibrate(sources.valid_logits(loop), y[val_idx])
        if refit:
            # The probe head won: refit it on all the training images, and
            # calibrate it on the same probe's cross-validated logits.
            both = torch.cat([features, sources.head_inputs("valid", set())])
            rows = np.r_[train_idx, val_idx]
            if cross_validated:
                w = None if weights is None else weights[rows]
                z = cross_validated_logits(self._task(), both.numpy(), y[rows], w, seed)
                self._calibrate(z, y[rows])
            self._fit_probe(both, y, weights, rows, seed)
        model.eval().requires_grad_(False)
        return status == "interrupted"

    def _run_phase(
        self, loop: EpochLoop, epochs: int, selection: Selection,
        generator: torch.Generator, has_val: bool,
    ) -> str:  # fmt: skip
        """Train one phase of ``epochs`` epochs; an epoch that wrecks the
        network (``loop.guard``) is undone and the epochs left train at a
        tenth of the backbone's rate. Returns ``loop.run``'s status, or
        "restored" when the last epoch was undone."""
        patience = self.n_iter_no_change if self.early_stopping and has_val else None
        while True:
            selection.new_phase()
            optimizer = make_optimizer(self.optimizer, self._param_groups())
            steps = loop.train.n_batches(self.batch_size) * epochs
            schedule = make_schedule(
                optimizer, self.schedule, steps, self.warmup_fraction
            )
            done = len(self.history_)
            status = loop.run(
                epochs, optimizer, schedule, selection, generator, patience
            )
            trained = len(self.history_) - done
            self.n_iter_ += trained
            epochs -= trained
            if status != "wrecked":
                return status
            back_to = selection.restore()
            loop.guard.left -= 1
            self.backbone_lr_ /= 10
            loop.backbone_lr = self.backbone_lr_
            what = (
                f"Epoch {self.history_[-1]['epoch']} wrecked the pretrained network "
                f"({loop.wreck}): back to the weights of epoch {back_to}, the "
                f"backbone now trains at {self.backbone_lr_:.0e}"
            )
            if self.verbose:
                print(what, file=sys.stderr, flush=True)
            if self.backbone_lr is not None:
                # The caller chose the rate: say that it was too high.
                warnings.warn(
                    f"{what}. Set a lower backbone_lr (None chooses).",
                    UserWarning,
                    stacklevel=6,  # the caller of the estimator's fit
                )
            if epochs == 0:
                return "restored"

    def _head_loss(
        self, features: torch.Tensor, y: np.ndarray, w: np.ndarray, loss: Loss
    ) -> float:
        """The head's training loss on the frozen network's ``features``,
        computed on the CPU, where they are."""
        head = self.model_.get_submodule(self.head_)
        with torch.inference_mode():
            weight, bias = (
                None if p is None else p.detach().float().cpu()
                for p in (head.weight, head.bias)
            )
            z = torch.nn.functional.linear(features.float(), weight, bias)
            z = z.to(head.weight.device)  # where the loss's class weights are
            total, weight_sum = loss(
                z, torch.from_numpy(y).to(z.device), torch.from_numpy(w).to(z.device)
            )
        return float(total / weight_sum)

    def _fit_probe(
        self, features: torch.Tensor, y: np.ndarray, weights: np.ndarray | None,
        index: np.ndarray, seed: int,
    ) -> None:  # fmt: skip
        w = None if weights is None else weights[index]
        head = self.model_.get_submodule(self.head_)
        set_head(head, *self._task().probe(features.numpy(), y[index], w, seed))

    def _backbone_lr(self, selects: bool) -> float:
        """``backbone_lr``, or what None means for this fit (see its doc)."""
        if self.backbone_lr is not None:
            return self.backbone_lr
        lp_ft = self.head_init == "probe" and selects
        return self.lr if lp_ft else self.lr / 10

    def _param_groups(self) -> list[dict]:
        return param_groups(
            self.model_, self.head_, self.stages_, lr=self.lr,
            backbone_lr=self.backbone_lr_,
            layer_decay=self.layer_decay, weight_decay=self.weight_decay,
        )  # fmt: skip

    def _calibrate(self, z: np.ndarray, y: np.ndarray) -> None:
        """Temperature scaling on validation logits ``z`` (none if empty)."""
        self.temperature_ = 1.0
        self.calibration_ = {"before": math.nan, "after": math.nan}
        if self.calibrate and len(y):
            task = self._task()
            self.temperature_, self.calibration_ = task.calibration(z.astype(float), y)

    # -- prediction ------------------------------------------------------------

    def _outputs_of(self, X: Any) -> np.ndarray:
        """The head's outputs for images ``X``, float64 (with ``tta="flip"``,
        the mean of each image's and its mirror's)."""
        check_is_fitted(self)
        X = check_images(X, unit_floats=self.preprocessing_.unit_floats)
        n_outputs = self._task().n_outputs
        flip = self.tta == "flip"
        z = self._run(X, [], float_logits, n_outputs, "predict", flip=flip)
        return z.astype(np.float64)


@register
class FineTuneClassifier(ImageClassifierMixin, ClassifierMixin, FineTuneBase):
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
        ``nn.ModuleList`` counts as its blocks; ``stages_`` lists them).

        - int k: the first k stages (0: everything trains).
        - float f in [0, 1]: the first modules, in forward order, whose
          parameters come closest to a fraction f of the backbone's (1.0: only
          the head trains); ``frozen_`` shows what that froze.
          Note ``freeze=1`` (one stage) and ``freeze=1.0`` (all) differ.
        - a module name from ``model.named_modules()`` (as
          :func:`~sklearn_cnn.list_layers` shows them): everything up to and
          including it.
        - ``"backbone"``: only the head trains.

        Frozen modules get no gradients, are left out of the optimizer and stay
        in eval mode (BatchNorm statistics and dropout included); with only
        the head training and ``augment=None``, the backbone's features are
        computed once and the epochs train the head on them.
    lr : float, default=1e-3
        Peak learning rate of the new head.
    backbone_lr : float or None, default=None
        Peak learning rate of the pretrained layers that train. None chooses
        (see ``backbone_lr_``): ``lr``, LP-FT's one rate for the whole
        network, when the head starts from the probe (``head_init="probe"``)
        and a validation split selects the epoch (``early_stopping``): the
        probe head keeps the first steps from distorting the features, and
        the selection, where the probe head is epoch 0, falls back to it if
        they do anyway. Otherwise ``lr / 10``, so that nothing but the slower
        rate guards the pretrained layers. On data unlike ImageNet the faster
        rate is what beats the probe on the best layer; without selection it
        can wreck a network trained a few steps on a few hundred images (see
        the user guide).

        Whatever the rate, an epoch that wrecks the pretrained network is
        undone within the fit: when its validation accuracy loses more than
        three quarters of the best epoch's lead over the largest class
        (without a validation split: when its training loss goes back more
        than three quarters of the way from the probe head's to that of a
        network that learned nothing), the weights go back to the best epoch
        (the last one without a validation split) and the epochs left train
        at a tenth of the backbone's rate, at most twice a fit. A smaller dip
        is left to the selection (the measurements behind the rule are in
        the user guide). Recoveries show in ``history_`` (its
        ``backbone_lr`` column) and ``backbone_lr_``; with a ``backbone_lr``
        of your own they also warn.
    head_init : {"probe", "random"}, default="probe"
        "probe" fits the new head first as a logistic regression (standardized,
        ``C`` chosen by a 3-fold internal CV) on the frozen pretrained
        network's pooled features of the un-augmented training images,
        computed once, and folds the standardization into the linear layer:
        fine-tuning starts from the probe's accuracy instead of from chance.
        "random" keeps PyTorch's default initialisation.
    batchnorm : {"frozen", "train"}, default="frozen"
        "frozen": every BatchNorm keeps its pretrained running statistics (eval
        mode), also in the layers that train; its scale and shift still train
        (Keras's advice for small data). "train": BatchNorm layers in the
        trainable part update their statistics (frozen ones never do).
    epochs : int, default=10
        Passes over the training images. 0 keeps the probe head (or the random
        one) without training.
    batch_size : int, default=32
        Images per optimizer step; also per forward pass in prediction.
    optimizer : {"adamw", "sgd"}, default="adamw"
        AdamW, or SGD with Nesterov momentum 0.9.
    schedule : {"cosine", "onecycle", "constant"}, default="cosine"
        Learning rate per optimizer step (``torch.optim.lr_scheduler``): a
        linear warm-up over ``warmup_fraction`` of the steps, then a cosine
        decay to zero ("cosine") or the peak rate ("constant"); "onecycle" is
        ``OneCycleLR`` (fastai's ``fit_one_cycle``).
    warmup_fraction : float, default=0.1
        Fraction of the steps spent warming the learning rate up, in [0, 1).
    layer_decay : float or None, default=None
        In (0, 1]: layer-wise learning-rate decay (timm's ``layer_decay``).
        The last stage trains at ``backbone_lr``, and each earlier stage at the
        rate of the stage after it times ``layer_decay``.
    unfreeze_at : int or None, default=None
        Gradual unfreezing (fastai's ``fine_tune``): the part that ``freeze``
        freezes starts training at this epoch (counted over warm-started fits,
        from 1), with a new optimizer and its own warm-up; before it only the
        rest trains. A warm-started fit past that epoch refreezes nothing.
    weight_decay : float, default=1e-4
        Weight decay of weight matrices and convolution kernels; never applied
        to biases and normalization parameters (one-dimensional parameters).
    augment : "light", None or callable, default="light"
        Training-time augmentation of each image (before normalization).
        "light": a random resized crop keeping 85-100 % of the area and a
        horizontal flip. A callable receives one (C, H, W) tensor, uint8 for
        integer images, and returns one of the batch's common size, drawing
        from torch's global generator (seeded from ``random_state``). Disable
        it (None) for images whose orientation matters, e.g. digits and text.
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
        when it wins, the probe is refitted on all the training images, so
        that the result is the linear probe itself. Without a validation
        split every epoch runs and the last weights are kept.
    n_iter_no_change : int, default=3
        Epochs without improvement before early stopping.
    class_weight : dict, "balanced" or None, default=None
        Weights of the classes in the loss and in the probe, as in
        :class:`~sklearn.linear_model.LogisticRegression`. With a multi-label
        ``y``, the weight of each label's positive images in its loss
        (``pos_weight`` of ``BCEWithLogitsLoss``): "balanced" gives each label
        its negatives over its positives (training images), a dict maps label
        indices (``classes_``) to weights; the probe is not weighted.
    label_smoothing : float, default=0.0
        Label smoothing of the cross-entropy loss, in [0, 1) (multi-label: the
        0/1 targets move ``label_smoothing / 2`` towards 1/2).
    image_size, mean, std, bands, stem :
        Preprocessing and images of any number of bands (the first
        convolution adapted to them), as for :class:`CNNFeatureTransformer`.
    device : "auto", str or torch.device, default="auto"
        "auto" trains on CUDA when available, else on the CPU.
    precision : {"auto", "fp32", "bf16", "fp16"}, default="auto"
        Autocast dtype for the forward passes; "auto" uses bfloat16 where the
        hardware runs it natively (CUDA, CPUs with AVX512-BF16 or AMX), float16
        with loss scaling on older GPUs, float32 elsewhere. Conv nets run in
        the channels_last memory format.
    num_workers : int, default=0
        DataLoader worker processes that decode and augment images.
    compile : bool or "auto", default=False
        :func:`torch.compile` the network for ``predict``, ``predict_proba``
        and ``decision_function``, as :class:`CNNFeatureTransformer` does for
        ``transform``: "auto" compiles during a call whose images left are
        predicted to take over five minutes uncompiled.
    memory : None, str, path or joblib.Memory, default=None
        Cache on disk (as :class:`CNNFeatureTransformer` does) what a fit
        computes once per image without augmentation: the head's input (the
        probe's features) and the outputs of a frozen prefix, which a later
        fit on the same images with the same pretrained network reads instead
        of running the backbone (the folds and candidates of a search).
        Entries are keyed by the images' pixels, the network's code and
        weights (its head aside), preprocessing, precision and device, so they
        are used only where exact. None caches nothing.
    random_state : int, RandomState instance or None, default=None
        Seeds the head, the validation split, the shuffling, the augmentation
        and dropout. With a fixed value, two fits on the CPU give identical
        predictions (torch's global generator is left as it was).
    warm_start : bool, default=False
        When fitted already, continue training the current network for
        ``epochs`` more epochs (new optimizer and schedule; ``freeze`` is
        applied anew; no probe) instead of starting from the pretrained one.
        The network keeps the ``model``, ``weights``, ``image_size``, ``mean``,
        ``std`` and ``precision`` it was built with: a warm start after one of
        them changed raises a ValueError.
    calibrate : bool, default=True
        With a validation split: fit a temperature on the validation images
        after training (temperature scaling), so that ``predict_proba`` is
        calibrated without the refits of
        :class:`~sklearn.calibration.CalibratedClassifierCV`; ``predict`` does
        not change. A winning probe head, refitted on all the images, gets the
        temperature of the same probe's cross-validated logits instead.
        Without a validation split the temperature is 1. Multi-label: one
        temperature per label.
    tune_thresholds : bool, default=False
        Multi-label only: after training (and calibration), set each label's
        probability threshold in ``predict`` to the one with the highest F1 on
        the validation images (``thresholds_``) instead of 0.5; it needs
        enough positives of each label there to be more than noise.
    tta : {None, "flip"}, default=None
        Test-time augmentation in ``predict``, ``predict_proba`` and
        ``decision_function``: "flip" averages the logits of each image and of
        its mirror image (twice the compute).
    verbose : int, default=0
        Above 0, progress bars (tqdm) for the feature pass, each epoch and
        prediction, and each epoch's metrics on stderr.

    Attributes
    ----------
    classes_ : ndarray of shape (n_classes,)
        The class labels; for a multi-label ``y``, the indices of its
        columns.
    thresholds_ : ndarray of shape (n_classes,)
        Multi-label only: each label's probability threshold in ``predict``
        (0.5 unless ``tune_thresholds``).
    model_ : torch.nn.Module
        The fine-tuned network, in eval mode, on ``device_``.
    device_, preprocessing_, stem_ :
        As for :class:`CNNFeatureTransformer`.
    stages_ : list of str
        The stages that an int ``freeze`` counts, in forward order.
    frozen_ : list of str
        The outermost modules that ``freeze`` kept frozen in the last fit
        (gradual unfreezing aside), in forward order.
    frozen_fraction_ : float
        Their share of the backbone's parameters.
    head_ : str
        Module name of the classifier head.
    n_trainable_params_ : int
        Parameters that trained in the last fit (the head's included; with
        ``unfreeze_at``, once everything trains).
    temperature_ : float or ndarray of shape (n_classes,)
        The logits are divided by it (``calibrate``); 1 without calibration.
        Multi-label: one per label.
    calibration_ : dict
        Expected calibration error on the validation images "before" and
        "after" temperature scaling (NaN without calibration); multi-label:
        their mean binary log loss.
    history_ : list of dict
        One row per epoch: ``epoch``, ``train_loss``, ``valid_loss``,
        ``valid_accuracy`` (NaN without a validation split), ``backbone_lr``
        (the peak rate the pretrained layers trained at in that epoch; absent
        when only the head trains) and ``time`` (s). Row 0 describes the start
        (the probe head): its ``train_loss`` is the probe head's loss on the
        un-augmented training images (absent with ``head_init="random"``) and
        its ``time`` the setup (network, probe). An epoch that wrecked the
        network (see ``backbone_lr``) keeps its row; the next row's
        ``backbone_lr`` is a tenth of it.
    best_epoch_ : int
        The epoch whose weights the classifier holds: with a validation split
        and ``early_stopping`` the best one (0: the probe head won; see
        ``early_stopping``), otherwise the last one trained.
    n_iter_ : int
        Epochs trained, over all warm-started fits.
    backbone_lr_ : float
        The peak learning rate the pretrained layers trained at at the end of
        the last fit: ``backbone_lr``, or what None chose, divided by 10 for
        each epoch that wrecked the network and was undone.

    See Also
    --------
    CNNFeatureTransformer : The frozen network's features for any estimator.

    Notes
    -----
    Ctrl-C during ``fit`` stops training; the estimator keeps the best weights
    so far (the last completed epoch's without a validation split), warns and
    re-raises ``KeyboardInterrupt`` (so a ``GridSearchCV`` stops too). Any
    other failure leaves the estimator as it was before ``fit``.
    A model fitted on a GPU pickles with its weights on the CPU and loads on a
    machine without CUDA. ``save(path)`` and :func:`~sklearn_cnn.load` store
    the fitted classifier without pickle: unpickling a file runs code from it,
    loading a saved file does not.

    Parameters take effect at ``fit``: after ``set_params`` of ``model``,
    ``weights``, ``image_size``, ``mean``, ``std`` or ``precision``, prediction
    raises ``NotFittedError`` until ``fit`` runs again. On CUDA, a batch that
    runs out of memory is split in halves with a warning (in training, the
    halves' gradients add up to the whole batch's).

    Examples
    --------
    >>> import numpy as np
    >>> from sklearn_cnn import FineTuneClassifier
    >>> rng = np.random.default_rng(0)
    >>> X = rng.integers(0, 256, (20, 32, 32, 3), dtype=np.uint8)
    >>> y = np.array(["cat", "dog"] * 10)
    >>> clf = FineTuneClassifier("resnet18", weights=None, image_size=32,
    ...                          epochs=2, validation_fraction=None,
    ...                          random_state=0)
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
        "schedule": [StrOptions(set(SCHEDULES))],
        "warmup_fraction": [Interval(Real, 0, 1, closed="left")],
        "layer_decay": [None, Interval(Real, 0, 1, closed="right")],
        "unfreeze_at": [None, Interval(Integral, 1, None, closed="left")],
        "weight_decay": [Interval(Real, 0, None, closed="left")],
        "augment": [None, StrOptions({"light"}), callable],
        "validation_fraction": [None, Interval(Real, 0, 1, closed="left")],
        "early_stopping": ["boolean"],
        "n_iter_no_change": [Interval(Integral, 1, None, closed="left")],
        "class_weight": [None, dict, StrOptions({"balanced"})],
        "label_smoothing": [Interval(Real, 0, 1, closed="left")],
        "calibrate": ["boolean"],
        "tune_thresholds": ["boolean"],
        "tta": [None, StrOptions({"flip"})],
        "memory": [None, str, os.PathLike, HasMethods(["cache"])],
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
        schedule: str = "cosine",
        warmup_fraction: float = 0.1,
        layer_decay: float | None = None,
        unfreeze_at: int | None = None,
        weight_decay: float = 1e-4,
        augment: Any = "light",
        validation_fraction: float | None = 0.1,
        early_stopping: bool = True,
        n_iter_no_change: int = 3,
        class_weight: Any = None,
        label_smoothing: float = 0.0,
        calibrate: bool = True,
        tune_thresholds: bool = False,
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
        self.class_weight = class_weight
        self.label_smoothing = label_smoothing
        self.calibrate = calibrate
        self.tune_thresholds = tune_thresholds
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

    def fit(self, X: Any, y: Any, sample_weight: Any = None) -> FineTuneClassifier:
        """Fine-tune the network on images ``X`` and labels ``y``.

        Parameters
        ----------
        X : array-like of images or list of paths / PIL images
            Training images.
        y : array-like of shape (n_samples,) or (n_samples, n_labels)
            Class labels (ints, strings, ...), at least two classes; or a
            binary indicator matrix, one column per label, for images with
            any number of labels (multi-label: sigmoid outputs trained with
            ``BCEWithLogitsLoss``, one-vs-rest logistic probes, epochs
            selected by the validation mean average precision).
        sample_weight : array-like of shape (n_samples,), default=None
            Weights of the images in the loss, the probe and the validation
            metrics (times the class weights).

        Returns
        -------
        self : FineTuneClassifier
            The fitted classifier.
        """
        return super().fit(X, y, sample_weight=sample_weight)

    def _task(self, y: Any = None, fitted: bool = True) -> SingleLabel | MultiLabel:
        if fitted and hasattr(self, "classes_"):
            multilabel = getattr(self, "_multilabel", False)
        else:
            try:
                columns = np.ndim(y) == 2 and np.shape(y)[1] > 1
            except ValueError:  # ragged: sequences of labels
                columns = True
            # type_of_target names MultiLabelBinarizer for sequences of labels.
            kind = type_of_target(y, input_name="y") if columns else "1d"
            if columns and kind != "multilabel-indicator":
                raise ValueError(
                    f"y has shape {np.shape(y)} with values other than 0 and 1; "
                    "FineTuneClassifier takes one label per image, shape "
                    "(n_samples,), or a binary indicator matrix, one column per "
                    "label (encode label sets with MultiLabelBinarizer)."
                )
            multilabel = columns
            if self.tune_thresholds and not multilabel:
                raise ValueError(
                    "tune_thresholds=True tunes the threshold of each label of a "
                    "multi-label y (a binary indicator matrix); y has one label "
                    "per image. For two classes, wrap the classifier in "
                    "sklearn.model_selection.TunedThresholdClassifierCV instead."
                )
        classes = getattr(self, "classes_", None) if fitted else None
        kind = MultiLabel if multilabel else SingleLabel
        return kind(self.class_weight, self.label_smoothing, classes)

    def _calibrate(self, z: np.ndarray, y: np.ndarray) -> None:
        """Temperature scaling, then (multi-label) the thresholds of each label."""
        super()._calibrate(z, y)
        if not getattr(self, "_multilabel", False):
            return
        self.thresholds_ = np.full(len(self.classes_), 0.5)
        if self.tune_thresholds and len(y):
            proba = expit(z.astype(np.float64) / self.temperature_)
            self.thresholds_ = MultiLabel.tune_thresholds(proba, y)

    def _logits_of(self, X: Any) -> np.ndarray:
        return self._outputs_of(X) / self.temperature_

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        # A binary indicator matrix as y: one sigmoid output per label.
        tags.classifier_tags.multi_label = True
        tags.target_tags.multi_output = True
        return tags

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
            Multi-label: each label's logit, (n_samples, n_classes).
        """
        logits = self._logits_of(X)
        if logits.shape[1] == 2 and not getattr(self, "_multilabel", False):
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
            Rows sum to 1; columns follow ``classes_``. Multi-label: each
            label's probability (the sigmoid of its logit), as
            :class:`~sklearn.neural_network.MLPClassifier` gives them.
        """
        if getattr(self, "_multilabel", False):
            return expit(self._logits_of(X))
        return softmax(self._logits_of(X), axis=1)

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
        if getattr(self, "_multilabel", False):
            return -np.logaddexp(0, -self._logits_of(X))
        return log_softmax(self._logits_of(X), axis=1)

    def predict(self, X: Any) -> np.ndarray:
        """The most probable class of each image.

        Parameters
        ----------
        X : array-like of images or list of paths / PIL images
            Images to classify.

        Returns
        -------
        y : ndarray of shape (n_samples,) or (n_samples, n_classes)
            Labels from ``classes_``. Multi-label: the indicator matrix, 1
            where a label's probability reaches its threshold
            (``thresholds_``).
        """
        logits = self._logits_of(X)
        if getattr(self, "_multilabel", False):
            return (expit(logits) >= self.thresholds_).astype(np.int64)
        return self.classes_[logits.argmax(axis=1)]
