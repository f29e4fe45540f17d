"""The training loop of FineTuneClassifier (``epochs``, ``augment``,
``early_stopping``, ``n_iter_no_change``, ``label_smoothing``): batches of
images or of features computed once, the loss, the epochs, best-epoch
selection and early stopping."""

from __future__ import annotations

import copy
import math
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn
from torchvision.transforms import RandomResizedCrop
from torchvision.transforms.v2 import functional as TF

from ._head import logits as _logits
from ._images import ImageDataset, Preprocessing
from ._runtime import autocast, batches, cpu_state, halve_on_oom, in_chunks, progress

# -- The extension point for data-parallel training ---------------------------


class DataParallel(Protocol):
    """How a process of a data-parallel fit (``sklearn_cnn.distributed``, set
    in :data:`DATA_PARALLEL`) takes part in the training loop; validation, the
    probe and calibration never go through it."""

    def image_batches(
        self, dataset: Any, batch_size: int, generator: torch.Generator,
        drop_last: bool, loader: dict[str, Any],
    ) -> Iterator[tuple[torch.Tensor, ...]]:  # fmt: skip
        """This process's part of each shuffled training batch of ``dataset``
        (``loader``: the arguments of ``_runtime.batches``)."""
        ...

    def shard(self, order: list[int], batch_size: int) -> list[list[int]]:
        """This process's part of each global batch of ``order``."""
        ...

    def wrap(self, forward: nn.Module) -> nn.Module:
        """The module that training steps run (gradients averaged)."""
        ...


#: The data-parallel role of the fits run in this context (None: one device).
DATA_PARALLEL: ContextVar[DataParallel | None] = ContextVar(
    "sklearn_cnn_data_parallel", default=None
)


# -- Data: labelled batches of a subset of X, augmentation --------------------


#: ``augment="light"``: fraction of the area and aspect ratios of the crop.
LIGHT_SCALE, LIGHT_RATIO = (0.85, 1.0), (0.9, 1 / 0.9)


def light_augment(image: torch.Tensor) -> torch.Tensor:
    """``augment="light"`` on one (C, H, W) tensor: a random resized crop
    (85-100 % of the area, aspect ratio within 10 %, to the image's own size)
    and a horizontal flip with probability 1/2. Light on purpose: the usual
    crops move small data so far that the probe head starts far from its
    optimum (benchmarks/README.md)."""
    h, w = image.shape[-2:]
    top, left, ch, cw = RandomResizedCrop.get_params(
        image, scale=list(LIGHT_SCALE), ratio=list(LIGHT_RATIO)
    )
    image = TF.resized_crop(image, top, left, ch, cw, [h, w], antialias=True)
    if torch.rand(()) < 0.5:
        image = TF.horizontal_flip(image)
    return image


class Augmented:
    """Augment each image (``augment``: "light" or a callable), then preprocess
    as for prediction."""

    def __init__(self, augment: Any, preprocess: Preprocessing) -> None:
        self.augment = light_augment if augment == "light" else augment
        self.preprocess = preprocess

    def _one(self, image: torch.Tensor) -> torch.Tensor:
        out = self.augment(image)
        if not isinstance(out, torch.Tensor) or out.ndim != 3:
            what = type(out).__name__
            shape = f" of shape {tuple(out.shape)}" if hasattr(out, "shape") else ""
            raise TypeError(
                f"augment returned a {what}{shape}; it must return one (C, H, W) "
                "torch.Tensor (convert a NumPy result with torch.from_numpy and "
                "move the channels first), or set augment=None."
            )
        return out

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        if image.ndim == 3:
            return self.preprocess(self._one(image))
        out = [self._one(im) for im in image]
        if len({tuple(o.shape) for o in out}) > 1:
            raise ValueError(
                "augment returned images of different sizes; it must return one "
                "size for every image of a batch (end it with a resize)."
            )
        return self.preprocess(torch.stack(out))


class Labelled(torch.utils.data.Dataset):
    """Images ``index`` of X, preprocessed, with their labels and weights."""

    def __init__(
        self, X: Any, index: np.ndarray, targets: np.ndarray, weights: np.ndarray, pre
    ) -> None:
        self.images = ImageDataset(X, pre)
        self.index, self.targets, self.weights = index, targets, weights

    def __len__(self) -> int:
        return len(self.index)

    def __getitems__(self, ids: list[int]) -> tuple[torch.Tensor, ...]:
        rows = self.index[ids]
        return (
            self.images.__getitems__(rows.tolist()),
            torch.from_numpy(self.targets[rows]),
            torch.from_numpy(self.weights[rows]),
        )


class Loss:
    """Cross-entropy with class weights, label smoothing and sample weights:
    the weighted sum and the total weight (batches add up to one mean)."""

    def __init__(
        self, class_weights: np.ndarray | None, smoothing: float, device: torch.device
    ) -> None:
        weight = (
            None
            if class_weights is None
            else torch.as_tensor(class_weights, dtype=torch.float32, device=device)
        )
        self.class_weights = weight
        self.fn = nn.CrossEntropyLoss(
            weight=weight, label_smoothing=smoothing, reduction="none"
        )

    def weights(self, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """Each image's weight in the mean: its sample weight times its class's."""
        if self.class_weights is None:
            return weight
        return weight * self.class_weights[target]

    def __call__(
        self, logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        per_image = self.fn(logits.float(), target) * weight
        return per_image.sum(), self.weights(target, weight).sum()

    #: The history column of the validation score that selection maximises.
    metric = "valid_accuracy"

    def score(
        self, logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor
    ) -> float:
        """Accuracy, weighted as the loss is (sample and class weights)."""
        w = self.weights(target, weight)
        correct = (logits.argmax(1) == target).to(w.dtype)
        return float((correct * w).sum() / w.sum())


class Selection:
    """The best epoch so far (whose weights are kept), and early stopping's
    patience, counted from the best *trained* epoch (a dip in the first epochs
    below the probe head's start does not stop training)."""

    def __init__(
        self, epoch: int, acc: float, loss: float, model: nn.Module, has_val: bool
    ) -> None:
        self.model, self.has_val = model, has_val
        self.epoch, self.score, self.state = epoch, (acc, loss), cpu_state(model)
        self.trained: tuple[float, float] | None = None
        self.stall = 0

    @staticmethod
    def _better(a: tuple[float, float], b: tuple[float, float]) -> bool:
        """Higher accuracy, or the same and a lower loss (by more than 1e-4)."""
        return a[0] > b[0] or (a[0] == b[0] and a[1] < b[1] - 1e-4)

    def update(self, epoch: int, acc: float, loss: float) -> None:
        score = (acc, loss)
        if not self.has_val or self._better(score, self.score):
            self.epoch, self.score, self.state = epoch, score, cpu_state(self.model)
        if self.trained is None or self._better(score, self.trained):
            self.trained, self.stall = score, 0
        else:
            self.stall += 1

    def new_phase(self) -> None:
        """Patience starts again (gradual unfreezing changes what trains)."""
        self.trained, self.stall = None, 0

    def restore(self) -> int:
        self.model.load_state_dict(self.state)
        return self.epoch


# -- Sources of training batches: images, or features computed once -----------


class ImageSource:
    """Labelled images, and their logits by the callable ``predict``."""

    def __init__(
        self, dataset: Labelled, predict: Callable[[], np.ndarray], *,
        device: torch.device, num_workers: int, channels_last: bool,
    ) -> None:  # fmt: skip
        self.dataset, self.predict = dataset, predict
        self.device, self.num_workers = device, num_workers
        self.channels_last = channels_last

    def __len__(self) -> int:
        return len(self.dataset)

    def _drop_last(self, batch_size: int) -> bool:
        # A last batch of one image breaks BatchNorm in train mode.
        n = len(self.dataset)
        return n > batch_size and n % batch_size == 1

    def n_batches(self, batch_size: int) -> int:
        n = len(self.dataset)
        return n // batch_size if self._drop_last(batch_size) else -(-n // batch_size)

    def n_used(self, batch_size: int) -> int:
        n = len(self.dataset)
        return n - 1 if self._drop_last(batch_size) else n

    def batches(
        self, batch_size: int, generator: torch.Generator
    ) -> Iterator[tuple[torch.Tensor, ...]]:
        loader = {
            "num_workers": self.num_workers,
            "device": self.device,
            "channels_last": self.channels_last,
        }
        drop_last = self._drop_last(batch_size)
        parallel = DATA_PARALLEL.get()
        if parallel is not None:
            return parallel.image_batches(
                self.dataset, batch_size, generator, drop_last, loader
            )
        return batches(
            self.dataset, batch_size=batch_size, shuffle=True, generator=generator,
            drop_last=drop_last, **loader,
        )  # fmt: skip

    def logits(self, forward: nn.Module, batch_size: int, dtype) -> torch.Tensor:
        return torch.from_numpy(self.predict())

    @property
    def targets(self) -> tuple[torch.Tensor, torch.Tensor]:
        index = self.dataset.index
        return (
            torch.from_numpy(self.dataset.targets[index]),
            torch.from_numpy(self.dataset.weights[index]),
        )


class FeatureSource:
    """Inputs of the trainable part, computed once (``features``), with their
    labels and weights, on the device."""

    def __init__(
        self, features: torch.Tensor, y: np.ndarray, w: np.ndarray,
        device: torch.device, channels_last: bool = False,
    ) -> None:  # fmt: skip
        self.y = torch.from_numpy(y).to(device)
        self.w = torch.from_numpy(w).to(device)
        self.features = features.to(device)
        if channels_last and self.features.ndim == 4:  # as the stage's output was:
            # convolutions give (slightly) different sums in another format
            self.features = self.features.contiguous(memory_format=torch.channels_last)

    def __len__(self) -> int:
        return len(self.y)

    def n_batches(self, batch_size: int) -> int:
        return -(-len(self.y) // batch_size)

    def n_used(self, batch_size: int) -> int:
        return len(self.y)

    def batches(
        self, batch_size: int, generator: torch.Generator
    ) -> Iterator[tuple[torch.Tensor, ...]]:
        n = len(self.y)
        # A shuffled DataLoader's draws (base seed, permutation): the same order.
        torch.empty((), dtype=torch.int64).random_(generator=generator)
        order = torch.randperm(n, generator=generator).to(self.y.device)
        parallel = DATA_PARALLEL.get()
        if parallel is None:
            groups = [order[i : i + batch_size] for i in range(0, n, batch_size)]
        else:
            groups = [
                torch.as_tensor(rows, device=order.device)
                for rows in parallel.shard(order.tolist(), batch_size)
            ]
        for rows in groups:
            yield self.features[rows], self.y[rows], self.w[rows]

    def logits(self, forward: nn.Module, batch_size: int, dtype) -> torch.Tensor:
        def logits_of(xb: torch.Tensor) -> torch.Tensor:
            with autocast(self.y.device, dtype):
                return _logits(forward(xb)).float()

        out, size = [], batch_size
        with torch.inference_mode():
            for start in range(0, len(self.y), batch_size):
                xb = self.features[start : start + batch_size]
                z, size = halve_on_oom(
                    lambda k, b=xb: in_chunks(logits_of, b, k), size, what="fit"
                )
                out.append(z.cpu())
        return torch.cat(out) if out else torch.empty(0, 0)

    @property
    def targets(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.y.cpu(), self.w.cpu()


def _on_loss_device(loss: Loss, *tensors: torch.Tensor) -> list[torch.Tensor]:
    cw = loss.class_weights
    return [t if cw is None else t.to(cw.device) for t in tensors]


def _shares(y: torch.Tensor, w: torch.Tensor, loss: Loss, n_classes: int):
    weights = loss.weights(y, w).double()
    share = torch.zeros(n_classes, dtype=torch.float64, device=y.device)
    share.index_add_(0, y, weights)
    return share / share.sum()


def chance_loss(y: torch.Tensor, w: torch.Tensor, loss: Loss, n_classes: int) -> float:
    """The loss of the best constant prediction (the weighted class shares as
    probabilities): what a network that learned nothing scores."""
    if len(y) == 0:
        return math.nan
    y, w = _on_loss_device(loss, y, w)
    share = _shares(y, w, loss, n_classes)
    logits = share.clamp(min=1e-12).log().float().expand(len(y), -1)
    total, weight = loss(logits, y, w)
    return float(total / weight)


def chance_accuracy(
    y: torch.Tensor, w: torch.Tensor, loss: Loss, n_classes: int
) -> float:
    """The weighted share of the largest class: the accuracy of always
    predicting it (NaN without images)."""
    if len(y) == 0:
        return math.nan
    y, w = _on_loss_device(loss, y, w)
    return float(_shares(y, w, loss, n_classes).max())


#: An epoch wrecked the network when it gave back more than this share of the
#: lead over a network that learned nothing (see ``Guard``).
WRECK_SHARE = 0.75
#: Recoveries per fit, each at a tenth of the backbone's rate before it.
MAX_RECOVERIES = 2


@dataclass
class Guard:
    """Tells a wrecked network from the dip of a first epoch, by the rule
    ``backbone_lr``'s doc states: with validation images, by the score's lead
    over ``chance_accuracy`` (``names`` name both); without, by the training
    loss's way from ``start_loss`` (the probe head's; None: unknown) back to
    ``chance_loss``. Smaller dips are left to selection."""

    chance_loss: float
    start_loss: float | None
    chance_accuracy: float
    left: int = MAX_RECOVERIES
    names: tuple[str, str] = ("validation accuracy", "largest class")

    def wrecked(self, train_loss: float, val_acc: float, best_acc: float) -> str:
        """Why the epoch wrecked the network ("" when it did not)."""
        if self.left <= 0:
            return ""
        if math.isfinite(val_acc):
            floor = self.chance_accuracy
            if best_acc > floor and val_acc < best_acc - WRECK_SHARE * (
                best_acc - floor
            ):
                score, floor_name = self.names
                return (
                    f"{score} {val_acc:.3f}, best {best_acc:.3f}, "
                    f"{floor_name} {floor:.3f}"
                )
            return ""
        start, chance = self.start_loss, self.chance_loss
        if start is not None and start < chance:
            limit = start + WRECK_SHARE * (chance - start)
            if train_loss > limit:
                return (
                    f"training loss {train_loss:.3f}, start {start:.3f}, "
                    f"learning nothing {chance:.3f}"
                )
        return ""


def validation_metrics(
    logits: torch.Tensor, y: torch.Tensor, w: torch.Tensor, loss: Loss
) -> tuple[float, float]:
    """Loss and score (``loss.score``) weighted as in training (NaN without
    validation images): selection sees what training optimises."""
    if len(y) == 0:
        return math.nan, math.nan
    total, weight = loss(logits, y, w)
    return float(total / weight), loss.score(logits, y, w)


# -- The epochs ---------------------------------------------------------------


def _train_forward(forward: nn.Module, x: torch.Tensor) -> Any:
    """``forward(x)``, with BatchNorm's one-value error explained."""
    try:
        return forward(x)
    except ValueError as exc:
        if "more than 1 value per channel" not in str(exc):
            raise
        raise ValueError(
            f"A BatchNorm layer in training mode got one value per channel "
            f"({exc}): its input is a 1 x 1 map of a single image. Keep "
            "batchnorm='frozen' (the default), use a larger image_size, or a "
            "batch_size above 1."
        ) from None


@dataclass
class EpochLoop:
    """Runs epochs of one training phase and records them in ``history``
    (``forward``: a batch of the source to logits; ``train_mode``: the model
    in training mode, frozen parts in eval)."""

    model: nn.Module
    forward: nn.Module
    train: ImageSource | FeatureSource
    valid: ImageSource | FeatureSource
    loss: Loss
    device: torch.device
    dtype: torch.dtype | None
    batch_size: int
    train_mode: Callable[[], None]
    history: list[dict] = field(default_factory=list)
    verbose: int = 0
    chunk: int | None = None  # images per forward once CUDA ran out of memory
    #: Stops ``run`` at an epoch that wrecked the network (None: never).
    guard: Guard | None = None
    #: The peak rate of the pretrained layers, recorded in each trained row.
    backbone_lr: float | None = None
    #: Why ``run`` returned "wrecked".
    wreck: str = ""
    #: What training steps run: ``forward``, or its data-parallel wrapper.
    stepped: nn.Module | None = None

    def step(
        self,
        xb: torch.Tensor,
        yb: torch.Tensor,
        wb: torch.Tensor,
        optimizer: torch.optim.Optimizer,
        scaler: torch.amp.GradScaler,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The gradient of the batch's mean loss, accumulated over chunks of at
        most ``chunk`` images (halved on CUDA out of memory, and kept so);
        returns the batch's summed loss and weight."""
        total = self.loss.weights(yb, wb).sum()
        norm = total.clamp(min=1e-12)

        def accumulate(k: int) -> torch.Tensor:
            optimizer.zero_grad(set_to_none=True)
            loss_sum = torch.zeros((), device=self.device)
            for i in range(0, len(yb), k):
                with autocast(self.device, self.dtype):
                    forward = self.forward if self.stepped is None else self.stepped
                    out = _logits(_train_forward(forward, xb[i : i + k]))
                part, _ = self.loss(out, yb[i : i + k], wb[i : i + k])
                scaler.scale(part / norm).backward()
                loss_sum += part.detach()
            return loss_sum

        loss_sum, self.chunk = halve_on_oom(
            accumulate, self.chunk or self.batch_size, what="fit"
        )
        return loss_sum, total

    def evaluate(self) -> tuple[float, float]:
        if len(self.valid) == 0:
            return math.nan, math.nan
        self.model.eval()
        z = self.valid.logits(self.forward, self.batch_size, self.dtype)
        return validation_metrics(z, *self.valid.targets, self.loss)

    def log(self, **row: float) -> None:
        """Append ``row`` to the history; with ``verbose``, print its values."""
        self.history.append(row)
        if self.verbose:
            names = {
                "train_loss": ("train loss", ".4f"),
                "valid_loss": ("valid loss", ".4f"),
                "valid_accuracy": ("valid accuracy", ".4f"),
                "valid_r2": ("valid R2", ".4f"),
                "valid_average_precision": ("valid mAP", ".4f"),
                "backbone_lr": ("backbone lr", ".0e"),
            }
            parts = [
                f"{label} {row[key]:{fmt}}"
                for key, (label, fmt) in names.items()
                if key in row and math.isfinite(row[key])
            ]
            print(
                f"epoch {row['epoch']}: {', '.join(parts)} ({row['time']:.1f} s)",
                file=sys.stderr,
                flush=True,
            )

    def run(
        self,
        epochs: int,
        optimizer: torch.optim.Optimizer,
        schedule: torch.optim.lr_scheduler.LRScheduler,
        selection: Selection,
        generator: torch.Generator,
        patience: int | None,
    ) -> str:
        """Train ``epochs`` epochs (fewer when ``patience`` epochs in a row do not
        improve). Return "done", "interrupted" (Ctrl-C), "wrecked" (``guard``
        judged the last epoch, not offered to ``selection``, wrecked the
        network; ``wreck`` says why) or "diverged" (a non-finite loss)."""
        scaler = torch.amp.GradScaler(
            self.device.type, enabled=self.dtype == torch.float16
        )
        parallel = DATA_PARALLEL.get()
        self.stepped = None if parallel is None else parallel.wrap(self.forward)
        first = self.history[-1]["epoch"] + 1
        last = first + epochs - 1
        for epoch in range(first, last + 1):
            tic = time.perf_counter()
            bar = progress(
                self.train.n_used(self.batch_size),
                f"epoch {epoch}/{last}",
                enabled=bool(self.verbose),
            )
            try:
                self.train_mode()
                total = torch.zeros((), device=self.device)
                weight = torch.zeros((), device=self.device)
                for xb, yb, wb in self.train.batches(self.batch_size, generator):
                    loss_sum, w_sum = self.step(xb, yb, wb, optimizer, scaler)
                    scaler.step(optimizer)
                    scaler.update()
                    schedule.step()
                    total += loss_sum.detach()
                    weight += w_sum.detach()
                    bar.update(len(yb))
                bar.close()
                val_loss, val_acc = self.evaluate()
            except KeyboardInterrupt:
                bar.close()
                warnings.warn(
                    f"fit was interrupted during epoch {epoch}: the classifier "
                    f"keeps the weights of epoch {selection.epoch}, the "
                    f"{'best' if selection.has_val else 'last'} completed so far "
                    "(see history_).",
                    UserWarning,
                    stacklevel=7,  # the caller of the estimator's fit
                )
                return "interrupted"
            train_loss = float(total / weight.clamp(min=1e-12))
            rate = {} if self.backbone_lr is None else {"backbone_lr": self.backbone_lr}
            self.log(
                epoch=epoch, train_loss=train_loss, valid_loss=val_loss,
                **{self.loss.metric: val_acc}, **rate,
                time=time.perf_counter() - tic,
            )  # fmt: skip
            if not math.isfinite(train_loss):
                warnings.warn(
                    f"Training diverged in epoch {epoch} (training loss "
                    f"{train_loss}): stopped, keeping the weights of epoch "
                    f"{selection.epoch}. Lower lr (and backbone_lr).",
                    UserWarning,
                    stacklevel=7,  # the caller of the estimator's fit
                )
                return "diverged"
            if self.guard is not None:
                best = selection.score[0] if selection.has_val else math.nan
                self.wreck = self.guard.wrecked(train_loss, val_acc, best)
                if self.wreck:
                    return "wrecked"
            selection.update(epoch, val_acc, val_loss)
            if patience is not None and selection.stall >= patience:
                break
        return "done"


# -- A frozen prefix computed once: the rest of the network on its outputs ----


class _PassThrough(nn.Module):
    """Stands for a skipped stage: returns its input."""

    def forward(self, x: Any, *args: Any, **kwargs: Any) -> Any:
        return x


class _Replay(nn.Module):
    """Stands for the cut stage: returns the stored batch of its outputs."""

    def __init__(self) -> None:
        super().__init__()
        self.value: torch.Tensor | None = None

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor | None:
        return self.value


def _view(
    root: nn.Module, replacements: dict[str, nn.Module]
) -> tuple[nn.Module, list[tuple[nn.Module, nn.Module]]]:
    """A view of ``root`` with the submodules ``replacements`` names swapped:
    the modules on their paths are shallow copies, everything else is
    ``root``'s own. Returns the view and the (copy, original) pairs."""

    def own(m: nn.Module) -> nn.Module:
        c = copy.copy(m)
        c._modules = dict(m._modules)
        pairs.append((c, m))
        return c

    pairs: list[tuple[nn.Module, nn.Module]] = []
    copies = {"": own(root)}
    for name, new in replacements.items():
        *path, last = name.split(".")
        parent = ""
        for i, part in enumerate(path):
            child = ".".join(path[: i + 1])
            if child not in copies:
                copies[child] = own(root.get_submodule(child))
                copies[parent]._modules[part] = copies[child]
            parent = child
        copies[parent]._modules[last] = new
    return copies[""], pairs


class PrefixSkip(nn.Module):
    """The network from the output of stage ``cut`` on, given that output.

    A view of ``model`` (``_view``, sharing its weights) in which the stages
    before ``cut`` pass their input through and ``cut`` returns the stored
    batch, run on a blank input of the images' shape (so that parameter-free
    operations see the shapes they expect). Leaving the context drops the batch.
    """

    def __init__(
        self, model: nn.Module, skipped: list[str], cut: str, image_shape: tuple
    ) -> None:
        super().__init__()
        self.image_shape = tuple(image_shape)
        self._replay = _Replay()
        swapped = {name: _PassThrough() for name in skipped}
        view, pairs = _view(model, {**swapped, cut: self._replay})
        self.model = view
        self._pairs = pairs  # a plain list: not registered as submodules

    def __enter__(self) -> PrefixSkip:
        return self

    def __exit__(self, *exc: object) -> None:
        self._replay.value = None

    def forward(self, outputs: torch.Tensor) -> Any:
        for view, original in self._pairs:  # train/eval as the model is
            view.training = original.training
        self._replay.value = outputs
        blank = outputs.new_zeros((len(outputs), *self.image_shape))
        return self.model(blank)
