"""What the epochs of one FineTuneClassifier fit train and validate on.

Images, augmented if ``augment`` says so; or, without augmentation, what the
frozen part of the network computes, stored once per image (and with
``memory=`` on disk, for the next fit): the pooled features when only the head
trains, else the frozen prefix's outputs, after which every epoch runs only
the rest of the network (``PrefixSkip``, checked against the whole network).
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any

import numpy as np
import torch

from ._cache import ActivationCache, entry_name, fine_tune_key, image_digests
from ._freezing import frozen_prefix
from ._head import check_vector_head, float_logits
from ._layers import Tap
from ._network import Network
from ._runtime import uses_channels_last
from ._training import Augmented, FeatureSource, ImageSource, Labelled, PrefixSkip

#: Most memory that the stored outputs of a frozen prefix may take.
PREFIX_BYTES = 2 * 2**30


def _flat(outputs: list[torch.Tensor]) -> torch.Tensor:
    """The tapped tensors of a batch, float32, flattened side by side."""
    return torch.cat([t.float().reshape(len(t), -1) for t in outputs], dim=1)


class Sources:
    """The sources of one fit: images ``X`` with encoded labels ``y`` and
    weights ``w``, split into ``train_idx`` and ``val_idx``, read through
    ``network`` (its classifier ``head``); the rest are the estimator's
    parameters (``memory``: a cache folder or None).
    """

    def __init__(
        self, network: Network, X: Any, y: np.ndarray, w: np.ndarray,
        train_idx: np.ndarray, val_idx: np.ndarray, *, head: str,
        stages: list[str], n_classes: int, augment: Any, memory: str | None,
        batch_size: int, num_workers: Any, verbose: int,
    ) -> None:  # fmt: skip
        self.network, self.X, self.y, self.w = network, X, y, w
        self.index = {"train": train_idx, "valid": val_idx}
        self.head, self.stages, self.n_classes = head, stages, n_classes
        self.augment, self.memory = augment, memory
        self.batch_size, self.num_workers = batch_size, num_workers
        self.verbose = verbose
        self.stored: dict[str, torch.Tensor] = {}
        self.digests: list[bytes] | None = None  # of X's images, for memory=

    def _run(
        self, taps: list[Tap], reduce: Any, n_columns: int, label: str,
        index: np.ndarray,
    ) -> np.ndarray:  # fmt: skip
        return self.network.run(
            self.X, taps, reduce, n_columns, label=label, index=index,
            batch_size=self.batch_size, num_workers=self.num_workers,
            verbose=self.verbose,
        )  # fmt: skip

    # -- what is stored ----------------------------------------------------------

    def head_inputs(self, part: str, frozen: set[str]) -> torch.Tensor:
        """The pooled features that the head reads (the probe's), computed in
        the same pass as the frozen prefix's outputs where those will serve."""
        if part not in self.stored:
            self._compute(part, frozen, head=True)
        return self.stored[part]

    def _head_only(self) -> bool:
        return not any(
            p.requires_grad
            for n, p in self.network.module.named_parameters()
            if not n.startswith(self.head + ".")
        )

    def _prefix(self, frozen: set[str]) -> list[str] | None:
        """The leading frozen stages, when their outputs are worth storing:
        no augmentation, a fixed image size, at most ``PREFIX_BYTES``."""
        prefix = frozen_prefix(self.stages, frozen)
        if not prefix or self.augment is not None:
            return None
        shape = self.network.trace.shapes.get(prefix[-1])
        if shape is None or self.network.preprocessing.output_size is None:
            return None
        return prefix if 4 * math.prod(shape) * len(self.X) <= PREFIX_BYTES else None

    def _compute(self, part: str, frozen: set[str], head: bool) -> None:
        """One pass over the images of ``part``: the head's input (if ``head``
        or only the head trains) and the frozen prefix's outputs (if they
        will serve), on the CPU."""
        taps, shapes = [], []
        prefix = self._prefix(frozen)
        head = head or self._head_only()
        if prefix is not None and not self._head_only():
            taps.append(Tap(prefix[-1]))
            shapes.append(self.network.trace.shapes[prefix[-1]])
        if head:
            check_vector_head(self.network.trace, self.head)
            taps.append(Tap(self.head, pre=True))
            shapes.append(self.network.trace.input_shapes[self.head])
        outputs = self._outputs(taps, shapes, self.index[part])
        if head:
            self.stored[part] = outputs.pop()
        if outputs:
            self.stored["prefix " + part] = outputs.pop()

    def _outputs(
        self, taps: list[Tap], shapes: list[tuple], index: np.ndarray
    ) -> list[torch.Tensor]:
        """Each tap's outputs for the images ``index``, float32 on the CPU: read
        from ``memory`` where stored, the rest in one pass (and stored there)."""
        directory = self.memory
        missing = np.ones(len(index), dtype=bool)
        outputs = [np.empty((len(index), *shape), np.float32) for shape in shapes]
        names = [entry_name(t) for t in taps]
        if directory is not None:
            cache = ActivationCache(directory)
            key, about = fine_tune_key(self.network, self.head)
            if self.digests is None:
                self.digests = image_digests(self.X, self.network.preprocessing)
            digests = [self.digests[i] for i in index]
            found, rows = cache.fetch(key, digests, names)
            if found.any():
                for out, name in zip(outputs, names, strict=True):
                    out[found] = rows[name]
            missing = ~found
        if missing.any():
            sizes = [math.prod(shape) for shape in shapes]
            flat = self._run(taps, _flat, sum(sizes), "features", index[missing])
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
        if self.augment is None and self._head_only():
            return (
                self.network.module.get_submodule(self.head),
                *(self._features(p, self.head_inputs(p, frozen)) for p in self.index),
                None,
            )
        prefix = self._prefix(frozen)
        if prefix is not None:
            for part in self.index:
                if "prefix " + part not in self.stored:
                    self._compute(part, frozen, head=False)
            size = self.network.preprocessing.output_size
            skip = PrefixSkip(self.network.module, prefix[:-1], prefix[-1], (3, *size))
            if self._replays_exactly(skip):
                outputs = (self.stored["prefix " + p] for p in self.index)
                features = map(self._features, self.index, outputs)
                return (skip, *features, self.network.dtype)
        images = map(self._images, self.index)
        return (self.network.module, *images, self.network.dtype)

    def _features(self, part: str, features: torch.Tensor) -> FeatureSource:
        i, net = self.index[part], self.network
        return FeatureSource(
            features, self.y[i], self.w[i], net.device, uses_channels_last(net.module)
        )

    def _images(self, part: str) -> ImageSource:
        i = self.index[part]
        pre: Any = self.network.preprocessing
        if part == "train" and self.augment is not None:
            pre = Augmented(self.augment, pre)
        predict = partial(self._run, [], float_logits, self.n_classes, "validate", i)
        network = self.network
        return ImageSource(
            Labelled(self.X, i, self.y, self.w, pre), predict, device=network.device,
            num_workers=self.num_workers,
            channels_last=uses_channels_last(network.module),
        )  # fmt: skip

    def _replays_exactly(self, skip: PrefixSkip) -> bool:
        """Whether the network after the prefix, on stored outputs, gives what
        the whole network gives on the first training images."""
        index = self.index["train"][:4]
        whole = self._run([], float_logits, self.n_classes, "check", index)
        outputs = self.stored["prefix train"][: len(index)].to(self.network.device)
        try:
            with torch.inference_mode(), skip:
                self.network.module.eval()
                part = float_logits([skip(outputs)]).cpu().numpy()
        except Exception:  # the blank input broke it: not a cut
            return False
        scale = max(1.0, float(np.abs(whole).max()))
        return bool(np.allclose(part, whole, rtol=1e-2, atol=1e-2 * scale))

    def valid_logits(self, loop: Any) -> np.ndarray:
        """Logits of the validation images (from stored features when only the
        head trained), for calibration."""
        head = self.network.module.get_submodule(self.head)
        if loop is not None and loop.forward is head:
            return loop.valid.logits(loop.forward, self.batch_size, None).numpy()
        index = self.index["valid"]
        return self._run([], float_logits, self.n_classes, "calibrate", index)
