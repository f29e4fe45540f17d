"""Training pieces of FineTuneClassifier: batches (images or cached features),
augmentation, the schedule, the loss and best-epoch selection."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.transforms import RandomResizedCrop
from torchvision.transforms.v2 import functional as TF

from ._images import ImageDataset, Preprocessing
from ._runtime import batches

#: Fraction of all optimizer steps spent warming the learning rate up.
_WARMUP = 0.1


# ---------------------------------------------------------------------------
# Data: labelled batches of a subset of X, augmentation
# ---------------------------------------------------------------------------


#: ``augment="light"``: fraction of the area and aspect ratios of the crop.
LIGHT_SCALE, LIGHT_RATIO = (0.85, 1.0), (0.9, 1 / 0.9)


def light_augment(image: torch.Tensor) -> torch.Tensor:
    """``augment="light"``: a random resized crop (85-100 % of the area, aspect
    ratio within 10 %, back to the image's own size) and a horizontal flip with
    probability 1/2.

    Works on one (C, H, W) tensor, uint8 or float, before normalization. Light
    on purpose: on small data, the usual crops (torchvision's 8-100 % of the
    area, or 70-100 %) move the training images so far from the test images
    that the probe-initialised head starts far from its optimum (Animal-MNIST,
    Lite0, ``freeze=0.5``: training loss 0.65 instead of 0.43 after the first
    epoch, test accuracy 0.918 instead of 0.934 after five).
    """
    h, w = image.shape[-2:]
    top, left, ch, cw = RandomResizedCrop.get_params(
        image, scale=list(LIGHT_SCALE), ratio=list(LIGHT_RATIO)
    )
    image = TF.resized_crop(image, top, left, ch, cw, [h, w], antialias=True)
    if torch.rand(()) < 0.5:
        image = TF.horizontal_flip(image)
    return image


class _Augmented:
    """Augment each image, then preprocess as for prediction."""

    def __init__(self, augment: Callable, preprocess: Preprocessing) -> None:
        self.augment, self.preprocess = augment, preprocess

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        if image.ndim == 3:
            return self.preprocess(self.augment(image))
        out = [self.augment(im) for im in image]
        if len({tuple(o.shape) for o in out}) > 1:
            raise ValueError(
                "augment returned images of different sizes; it must return one "
                "size for every image of a batch (end it with a resize)."
            )
        return self.preprocess(torch.stack(out))


class _Labelled(torch.utils.data.Dataset):
    """Images ``index`` of X, preprocessed, with their encoded labels."""

    def __init__(self, X: Any, index: np.ndarray, targets: np.ndarray, pre) -> None:
        self.images = ImageDataset(X, pre)
        self.index, self.targets = index, targets

    def __len__(self) -> int:
        return len(self.index)

    def __getitems__(self, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        rows = self.index[ids]
        return (
            self.images.__getitems__(rows.tolist()),
            torch.from_numpy(self.targets[rows]),
        )


def _cosine_warmup(total: int) -> Callable[[int], float]:
    """Learning-rate factor: linear warm-up, then cosine decay to zero."""
    warmup = max(1, round(_WARMUP * total))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        t = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(t, 1.0)))

    return factor


class _Loss:
    """Cross-entropy with class weights and label smoothing."""

    def __init__(
        self, class_weights: np.ndarray | None, smoothing: float, device: torch.device
    ) -> None:
        self.weight = (
            None
            if class_weights is None
            else torch.as_tensor(class_weights, dtype=torch.float32, device=device)
        )
        self.smoothing = smoothing

    def __call__(
        self, logits: torch.Tensor, target: torch.Tensor, reduction: str = "mean"
    ) -> torch.Tensor:
        return F.cross_entropy(
            logits.float(),
            target,
            weight=self.weight,
            label_smoothing=self.smoothing,
            reduction=reduction,
        )

    def total_weight(self, target: torch.Tensor) -> float:
        """What a "mean" reduction divides the "sum" by."""
        if self.weight is None:
            return float(len(target))
        return float(self.weight[target].sum())


class _Selection:
    """The best epoch so far (whose weights are kept), and early stopping's
    patience, which counts from the best *trained* epoch: the start (the probe
    head) competes for best, but a dip in the first epochs, while the head and
    backbone adjust to each other, does not stop training."""

    def __init__(
        self, epoch: int, acc: float, loss: float, model: nn.Module, has_val: bool
    ) -> None:
        self.model, self.has_val = model, has_val
        self.epoch, self.score, self.state = epoch, (acc, loss), self._snapshot()
        self.trained: tuple[float, float] | None = None
        self.stall = 0

    def _snapshot(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    @staticmethod
    def _better(a: tuple[float, float], b: tuple[float, float]) -> bool:
        """Higher accuracy, or the same and a lower loss (by more than 1e-4)."""
        return a[0] > b[0] or (a[0] == b[0] and a[1] < b[1] - 1e-4)

    def update(self, epoch: int, acc: float, loss: float) -> None:
        score = (acc, loss)
        if not self.has_val or self._better(score, self.score):
            self.epoch, self.score, self.state = epoch, score, self._snapshot()
        if self.trained is None or self._better(score, self.trained):
            self.trained, self.stall = score, 0
        else:
            self.stall += 1


# ---------------------------------------------------------------------------
# Sources of training batches: images, or features computed once
# ---------------------------------------------------------------------------


class _ImageSource:
    def __init__(
        self, dataset: _Labelled, *, device: torch.device, num_workers: int,
        channels_last: bool,
    ) -> None:  # fmt: skip
        self.dataset, self.device = dataset, device
        self.num_workers, self.channels_last = num_workers, channels_last

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
        self, batch_size: int, generator: torch.Generator | None = None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        shuffle = generator is not None
        return batches(
            self.dataset,
            batch_size=batch_size,
            num_workers=self.num_workers,
            device=self.device,
            channels_last=self.channels_last,
            shuffle=shuffle,
            generator=generator,
            drop_last=shuffle and self._drop_last(batch_size),
        )


class _FeatureSource:
    def __init__(
        self, features: torch.Tensor | None, y: np.ndarray, device: torch.device
    ) -> None:
        self.y = torch.from_numpy(y).to(device)
        self.features = None if features is None else features.to(device)

    def __len__(self) -> int:
        return len(self.y)

    def n_batches(self, batch_size: int) -> int:
        return -(-len(self.y) // batch_size)

    def n_used(self, batch_size: int) -> int:
        return len(self.y)

    def batches(
        self, batch_size: int, generator: torch.Generator | None = None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self.y)
        order = (
            torch.randperm(n, generator=generator).to(self.y.device)
            if generator is not None
            else torch.arange(n, device=self.y.device)
        )
        for start in range(0, n, batch_size):
            rows = order[start : start + batch_size]
            yield self.features[rows], self.y[rows]
