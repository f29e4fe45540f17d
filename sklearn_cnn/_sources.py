"""What the epochs of one FineTuneClassifier fit train and validate on.

Images, augmented if ``augment`` says so; or, without augmentation, what the
frozen part of the network computes, stored once per image: the pooled
features when only the head trains (shared with the probe), else the outputs
of the frozen prefix of stages, after which every epoch runs only the rest of
the network (``PrefixSkip``, checked against the whole network first).
With ``memory=``, what is stored once per image also goes to the disk cache
(``_cache``), for the next fit: a later fold, or a candidate of a search.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any

import numpy as np
import torch

from ._cache import (
    ActivationCache,
    cache_directory,
    entry_name,
    fine_tune_key,
    image_digests,
)
from ._freezing import frozen_prefix
from ._head import check_vector_head, float_logits
from ._layers import Tap
from ._runtime import uses_channels_last
from ._training import (
    Augmented,
    FeatureSource,
    ImageSource,
    Labelled,
    PrefixSkip,
)

#: Most memory that the stored outputs of a frozen prefix may take.
PREFIX_BYTES = 2 * 2**30


def _flat(outputs: list[torch.Tensor]) -> torch.Tensor:
    """The tapped tensors of a batch, float32, flattened side by side."""
    return torch.cat([t.float().reshape(len(t), -1) for t in outputs], dim=1)


class Sources:
    """The sources of one fit: images ``X`` with encoded labels ``y`` and
    weights ``w``, split into ``train_idx`` and ``val_idx``. Reads the
    estimator (its network, parameters and inference loop), never changes it.
    """

    def __init__(
        self, est: Any, X: Any, y: np.ndarray, w: np.ndarray,
        train_idx: np.ndarray, val_idx: np.ndarray,
    ) -> None:  # fmt: skip
        self.est, self.X, self.y, self.w = est, X, y, w
        self.index = {"train": train_idx, "valid": val_idx}
        self.stored: dict[str, torch.Tensor] = {}
        self.digests: list[bytes] | None = None  # of X's images, for memory=

    # -- what is stored ----------------------------------------------------------

    def head_inputs(self, part: str, frozen: set[str]) -> torch.Tensor:
        """The pooled features that the head reads (the probe's), computed in
        the same pass as the frozen prefix's outputs where those will serve."""
        if part not in self.stored:
            self._compute(part, frozen, head=True)
        return self.stored[part]

    def _head_only(self) -> bool:
        est = self.est
        return not any(
            p.requires_grad
            for n, p in est.model_.named_parameters()
            if not n.startswith(est.head_ + ".")
        )

    def _prefix(self, frozen: set[str]) -> list[str] | None:
        """The leading frozen stages, when their outputs are worth storing:
        no augmentation, a fixed image size, at most ``PREFIX_BYTES``."""
        est = self.est
        prefix = frozen_prefix(est.stages_, frozen)
        if not prefix or est.augment is not None:
            return None
        shape = est.trace_.shapes.get(prefix[-1])
        if shape is None or est.preprocessing_.output_size is None:
            return None
        return prefix if 4 * math.prod(shape) * len(self.X) <= PREFIX_BYTES else None

    def _compute(self, part: str, frozen: set[str], head: bool) -> None:
        """One pass over the images of ``part``: the head's input (if ``head``
        or only the head trains) and the frozen prefix's outputs (if they
        will serve), on the CPU."""
        est, taps, shapes = self.est, [], []
        prefix = self._prefix(frozen)
        head = head or self._head_only()
        if prefix is not None and not self._head_only():
            taps.append(Tap(prefix[-1]))
            shapes.append(est.trace_.shapes[prefix[-1]])
        if head:
            check_vector_head(est.trace_, est.head_)
            taps.append(Tap(est.head_, pre=True))
            shapes.append(est.trace_.input_shapes[est.head_])
        outputs = self._outputs(taps, shapes, self.index[part])
        if head:
            self.stored[part] = outputs.pop()
        if outputs:
            self.stored["prefix " + part] = outputs.pop()

    def _outputs(
        self, taps: list[Tap], shapes: list[tuple], index: np.ndarray
    ) -> list[torch.Tensor]:
        """Each tap's outputs for the images ``index``, float32 on the CPU: read
        from the cache in ``memory`` where stored, the rest in one pass (and
        stored there for the next fit: a later fold or candidate)."""
        est = self.est
        directory = cache_directory(getattr(est, "memory", None))
        missing = np.ones(len(index), dtype=bool)
        outputs = [np.empty((len(index), *shape), np.float32) for shape in shapes]
        names = [entry_name(t) for t in taps]
        if directory is not None:
            cache, (key, about) = ActivationCache(directory), fine_tune_key(est._network, est.head_)
            if self.digests is None:
                self.digests = image_digests(self.X)
            digests = [self.digests[i] for i in index]
            found, rows = cache.fetch(key, digests, names)
            if found.any():
                for out, name in zip(outputs, names, strict=True):
                    out[found] = rows[name]
            missing = ~found
        if missing.any():
            sizes = [math.prod(shape) for shape in shapes]
            flat = est._run(
                self.X, taps, _flat, sum(sizes), "features", index=index[missing]
            )
            parts = np.split(flat, np.cumsum(sizes)[:-1], axis=1)
            for out, a, shape in zip(outputs, parts, shapes, strict=True):
                out[missing] = a.reshape(-1, *shape)
            if directory is not None:
                new = [d for d, m in zip(digests, missing, strict=True) if m]
                arrays = {
                    n: out[missing] for n, out in zip(names, outputs, strict=True)
                }
                cache.store(key, new, arrays, about)
        return [torch.from_numpy(out) for out in outputs]

    # -- the sources of a phase ------------------------------------------------------

    def phase(self, frozen: set[str]) -> tuple:
        """The module that maps training batches to logits, the training and
        validation sources, and the autocast dtype, for a phase that trains
        all but ``frozen``."""
        est = self.est
        if est.augment is None and self._head_only():
            return (
                est.model_.get_submodule(est.head_),
                *(self._features(p, self.head_inputs(p, frozen)) for p in self.index),
                None,
            )
        prefix = self._prefix(frozen)
        if prefix is not None:
            for part in self.index:
                if "prefix " + part not in self.stored:
                    self._compute(part, frozen, head=False)
            size = est.preprocessing_.output_size
            skip = PrefixSkip(est.model_, prefix[:-1], prefix[-1], (3, *size))
            if self._replays_exactly(skip):
                return (
                    skip,
                    *(
                        self._features(p, self.stored["prefix " + p])
                        for p in self.index
                    ),
                    est._autocast_dtype,
                )
        return (
            est.model_,
            self._images("train"),
            self._images("valid"),
            est._autocast_dtype,
        )

    def _features(self, part: str, features: torch.Tensor) -> FeatureSource:
        i = self.index[part]
        est = self.est
        return FeatureSource(
            features, self.y[i], self.w[i], est.device_, uses_channels_last(est.model_)
        )

    def _images(self, part: str) -> ImageSource:
        est, i = self.est, self.index[part]
        pre: Any = est.preprocessing_
        if part == "train" and est.augment is not None:
            pre = Augmented(est.augment, pre)
        predict = partial(
            est._run, self.X, [], float_logits, len(est.classes_), "validate", i
        )
        return ImageSource(
            Labelled(self.X, i, self.y, self.w, pre), predict, device=est.device_,
            num_workers=est.num_workers, channels_last=uses_channels_last(est.model_),
        )  # fmt: skip

    def _replays_exactly(self, skip: PrefixSkip) -> bool:
        """Whether the network after the prefix, on stored outputs, gives what
        the whole network gives (a model that reuses an early tensor later,
        say, would not), on the first training images."""
        est, index = self.est, self.index["train"][:4]
        whole = est._run(self.X, [], float_logits, len(est.classes_), "check", index)
        outputs = self.stored["prefix train"][: len(index)].to(est.device_)
        try:
            with torch.inference_mode(), skip:
                est.model_.eval()
                part = float_logits([skip(outputs)]).cpu().numpy()
        except Exception:  # the blank input broke it: not a cut
            return False
        scale = max(1.0, float(np.abs(whole).max()))
        return bool(np.allclose(part, whole, rtol=1e-2, atol=1e-2 * scale))

    def valid_logits(self, loop: Any) -> np.ndarray:
        """Logits of the validation images (from stored features when only the
        head trained), for calibration."""
        est = self.est
        if loop is not None and loop.forward is est.model_.get_submodule(est.head_):
            return loop.valid.logits(loop.forward, est.batch_size, None).numpy()
        n, index = len(est.classes_), self.index["valid"]
        return est._run(self.X, [], float_logits, n, "calibrate", index=index)
