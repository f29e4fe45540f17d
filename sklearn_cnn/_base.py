"""What both estimators share: parameters that say which network runs where,
building it in ``fit``, streaming batches through it, and pickling it."""

from __future__ import annotations

import copy
import os
from collections.abc import Callable
from numbers import Integral
from typing import Any

import numpy as np
import torch
from sklearn.utils._param_validation import Interval, StrOptions
from torch import nn
from torchvision.models import WeightsEnum

from ._images import ImageDataset, Preprocessing
from ._layers import Tap, Tapper, Trace, trace
from ._models import build_model, resolve_preprocessing
from ._runtime import (
    PRECISIONS,
    Progress,
    autocast,
    batches,
    has_conv2d,
    place,
    resolve_device,
    resolve_precision,
)

_network_constraints: dict = {
    "model": [str, callable],
    "weights": [None, str, os.PathLike, WeightsEnum],
    "image_size": [
        None,
        Interval(Integral, 1, None, closed="left"),
        tuple,
        list,
        StrOptions({"native"}),
    ],
    "mean": [None, "array-like"],
    "std": [None, "array-like"],
    "batch_size": [Interval(Integral, 1, None, closed="left")],
    "device": [str, torch.device],
    "precision": [StrOptions(set(PRECISIONS))],
    "num_workers": [Interval(Integral, 0, None, closed="left")],
    "verbose": ["verbose"],
}


def _check_triplet(value: Any, name: str) -> None:
    if value is None:
        return
    arr = np.asarray(value, dtype=float)
    if arr.shape != (3,) or not np.isfinite(arr).all():
        raise ValueError(f"{name} must hold 3 finite numbers (R, G, B); got {value!r}.")
    if name == "std" and (arr <= 0).any():
        raise ValueError(f"std must be positive; got {value!r}.")


def _check_image_size(value: Any) -> None:
    if isinstance(value, (tuple, list)) and not (
        len(value) == 2 and all(isinstance(v, Integral) and v > 0 for v in value)
    ):
        raise ValueError(
            f"image_size must be an int, (height, width) or 'native'; got {value!r}."
        )


class NetworkMixin:
    """Builds and runs the network; the estimators add what they do with it.

    Fitted attributes set by ``_build_network``: ``model_``, ``device_``,
    ``preprocessing_``, ``trace_`` (what one forward pass revealed).
    """

    def _build_network(self, example_source: Any) -> None:
        _check_triplet(self.mean, "mean")
        _check_triplet(self.std, "std")
        _check_image_size(self.image_size)
        module, enum = build_model(self.model, self.weights)
        self.preprocessing_: Preprocessing = resolve_preprocessing(
            self.model, enum, self.image_size, self.mean, self.std
        )
        self.device_ = resolve_device(self.device)
        self.model_: nn.Module = place(module.eval(), self.device_)
        self.trace_: Trace = trace(self.model_, self._example(example_source))

    def _example(self, X: Any) -> torch.Tensor:
        """The first image of X, preprocessed: the probe for tracing."""
        batch = ImageDataset(X, self.preprocessing_).__getitems__([0])
        return batch.to(self.device_)

    @property
    def _autocast_dtype(self) -> torch.dtype | None:
        return resolve_precision(self.precision, self.device_)

    def _batches(self, X: Any, index: np.ndarray | None = None):
        """Preprocessed batches of ``X`` (of the images ``index`` if given)."""
        dataset = ImageDataset(X, self.preprocessing_)
        if index is not None:
            dataset = torch.utils.data.Subset(dataset, index.tolist())
        return batches(
            dataset,
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            device=self.device_,
            channels_last=has_conv2d(self.model_),
        )

    def _run(
        self,
        X: Any,
        taps: list[Tap],
        reduce: Callable[[list[torch.Tensor]], torch.Tensor],
        n_columns: int,
        label: str,
        index: np.ndarray | None = None,
    ) -> np.ndarray:
        """``reduce(tapped tensors)`` of every image (of ``index`` if given),
        as one float32 array.

        Batches stream through the network in inference mode; only the reduced
        rows of each batch are kept.
        """
        n = len(X) if index is None else len(index)
        out = np.empty((n, n_columns), dtype=np.float32)
        progress = Progress(n, label, enabled=bool(self.verbose))
        self.model_.eval()
        start = 0
        with torch.inference_mode(), Tapper(self.model_, taps) as tapper:
            for batch in self._batches(X, index):
                with autocast(self.device_, self._autocast_dtype):
                    rows = reduce(tapper(batch))
                out[start : start + len(rows)] = rows.cpu().numpy()
                start += len(rows)
                progress.update(len(batch))
        return out

    # Pickling: the module travels on the CPU, so that an estimator fitted on a
    # GPU loads on a machine without one; it moves back to a device on load.
    def __getstate__(self) -> dict:
        # A copy: BaseEstimator.__getstate__ returns the live __dict__ itself.
        state = dict(super().__getstate__())
        model = state.get("model_")
        if model is not None and any(
            t.device.type != "cpu" for t in model.state_dict().values()
        ):
            state["model_"] = copy.deepcopy(model).cpu()
        state.pop("device_", None)
        return state

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        if "model_" in state:
            self.device_ = resolve_device(self.device)
            place(self.model_, self.device_)
