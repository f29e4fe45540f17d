"""The fitted network: one object that ``fit`` builds and every pass runs on.

:class:`Network` owns what fit resolves for a network (module, preprocessing,
device, precision, trace, folded and compiled copies, what is computed from
the weights). :meth:`Network.stream` is the one inference loop. Networks that
fits may share (a search with ``memory=``) are kept in :data:`SHARED`.
"""

from __future__ import annotations

import copy
import functools
import os
import threading
import time
import types
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from numbers import Integral
from typing import Any

import numpy as np
import torch
from torch import nn

from ._bands import adapt_stem
from ._images import ImageDataset, Preprocessing, band_preprocessing
from ._inference import InferenceCopy, inference_copy
from ._inspect import probe_network
from ._layers import PooledTapper, Tap, Tapper, Trace, without_tap_hooks
from ._models import build_model, resolve_preprocessing
from ._runtime import (
    CompiledForward,
    auto_batch_size,
    auto_compile_pays,
    autocast,
    batches,
    halve_on_oom,
    place,
    progress,
    resolve_device,
    resolve_precision,
    uses_channels_last,
    weights_version,
)


def _concat(parts: list[Any]) -> Any:
    """Rows of chunks side by side: tensors, or dicts of tensors (a key
    missing from one chunk is left out)."""
    if len(parts) == 1:
        return parts[0]
    if isinstance(parts[0], dict):
        keys = [k for k in parts[0] if all(k in p for p in parts)]
        return {k: torch.cat([p[k] for p in parts]) for k in keys}
    return torch.cat(parts)


def _renamed(
    reduce: Callable[[Any], Any], names: dict[Tap, Tap], rows: dict[Tap, Any]
) -> Any:
    return reduce({t: rows[m] for t, m in names.items() if m in rows})


def _mean(a: Any, b: Any) -> Any:
    if isinstance(a, dict):
        return {k: 0.5 * (a[k] + b[k]) for k in a if k in b}
    return 0.5 * (a + b)


class Network:
    """A built network and everything fit resolved to run it: ``precision`` is
    the parameter (see :attr:`dtype`), ``trace`` the forward pass of an image
    of ``example_shape`` (C, H, W), ``stem`` how the first convolution was
    adapted to bands (``_bands``; None for RGB)."""

    def __init__(
        self,
        module: nn.Module,
        preprocessing: Preprocessing,
        device: torch.device,
        precision: str,
        trace: Trace,
        example_shape: tuple[int, ...],
        stem: dict | None = None,
    ) -> None:
        self.module = module
        self.stem = stem
        self.preprocessing = preprocessing
        self.device = device
        self.precision = precision
        self.trace = trace
        self.example_shape = tuple(example_shape)
        self.compiled: CompiledForward | None = None
        self._memo: dict = {}
        self._memo_version: tuple[int, ...] | None = None
        self._lock = threading.Lock()

    @classmethod
    def build(
        cls,
        model: Any,
        weights: Any,
        *,
        image_size: Any,
        mean: Any,
        std: Any,
        device: Any,
        precision: str,
        X: Any,
        bands: str = "auto",
        stem: str = "repeat",
    ) -> Network:
        """Build the network ``model`` and ``weights`` name, place it on
        ``device`` and trace it on the first image of ``X`` (bands: the first
        convolution adapted by the rule ``stem``, see ``_bands``)."""
        module, enum = build_model(model, weights)
        rgb_mean = None if isinstance(mean, str) else mean  # "fit": below
        rgb_std = None if isinstance(std, str) else std
        pre = resolve_preprocessing(
            model, enum, image_size, rgb_mean, rgb_std, module=module
        )
        pre = band_preprocessing(pre, X, bands == "all", mean, std)
        adapted = None
        if pre.channels != 3:
            rgb = _example(module, pre, torch.device("cpu"), X)
            rgb = torch.zeros(1, 3, *rgb.shape[-2:])
            adapted = adapt_stem(module.eval(), pre.channels, stem, rgb)
        dev = resolve_device(device)
        module = place(module.eval(), dev)
        example = _example(module, pre, dev, X)
        # Errors that name the image_size a model needs; a network that fails
        # in channels_last format (x.view) falls back to contiguous tensors.
        try:
            tr = probe_network(module, example)
        except Exception as exc:
            if adapted is None:
                raise
            raise ValueError(
                f"{type(module).__name__} does not run on images of "
                f"{pre.channels} bands after its first convolution "
                f"{adapted['layer']!r} was adapted to them ({exc}). A model "
                "that reads the image's channels elsewhere (inception's "
                "transform_input) cannot be adapted: pass RGB images."
            ) from exc
        shape = tuple(example.shape[1:])
        return cls(module, pre, dev, precision, tr, shape, adapted)

    # -- what the network is now ----------------------------------------------------

    @property
    def dtype(self) -> torch.dtype | None:
        """The autocast dtype: ``precision`` on the device the network is on."""
        return resolve_precision(self.precision, self.device)

    def memo(self) -> dict:
        """What callers compute from the weights (digest, feature widths),
        emptied whenever a parameter or buffer has been written since."""
        version = weights_version(self.module)
        with self._lock:
            if version != self._memo_version:
                self._memo, self._memo_version = {}, version
            return self._memo

    def place(self, device: torch.device) -> None:
        """Move the network to ``device`` (after unpickling or loading)."""
        self.device = device
        place(self.module, device, uses_channels_last(self.module))

    def __getstate__(self) -> dict:
        # The module travels on the CPU; compiled code and locks stay behind.
        state = dict(self.__dict__)
        module = without_tap_hooks(self.module)  # another thread's taps
        if _off_cpu(module):
            module = cpu_copy(module)
        state.update(module=module, compiled=None, _memo={}, _memo_version=None)
        del state["_lock"]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    # -- inputs -----------------------------------------------------------------------

    def example(self, X: Any) -> torch.Tensor:
        """The first image of ``X``, preprocessed, on the device."""
        return _example(self.module, self.preprocessing, self.device, X)

    def batch_size(self, requested: int | str) -> int:
        """Images per forward pass: ``requested``, or what "auto" means on
        this device for the images fit traced."""
        if requested != "auto":
            return int(requested)
        return auto_batch_size(self.device, self.example_shape)

    def batches(
        self, X: Any, index: np.ndarray | None, batch_size: int, num_workers: Any
    ) -> Iterator[torch.Tensor]:
        """Preprocessed batches of ``X`` (of the images ``index`` if given)."""
        dataset = ImageDataset(X, self.preprocessing)
        if index is not None:
            dataset = torch.utils.data.Subset(dataset, np.asarray(index).tolist())
        return batches(
            dataset,
            batch_size=batch_size,
            num_workers=num_workers,
            device=self.device,
            channels_last=uses_channels_last(self.module),
        )

    def inference_copy(self, X: Any) -> InferenceCopy:
        """The network with BatchNorms folded and weights in the autocast
        dtype (see ``_inference``), made anew whenever the network changes."""
        return inference_copy(self.module, self.dtype, lambda: self.example(X))

    # -- the inference loop ----------------------------------------------------------

    def _compiled(
        self, network: nn.Module, taps: list[Tap], reuse_only: bool, verbose: int
    ) -> CompiledForward | None:
        """The compiled tapped forward of ``network`` for ``taps`` (compiled
        at its first full batch), kept while the network stays the same
        (``reuse_only``: None if none is)."""
        key = (tuple(taps), self.dtype, str(self.device))
        cached = self.compiled
        fresh = cached is not None and cached.fresh_for(network, key)
        if reuse_only:
            return cached if fresh and not cached.failed else None
        if not fresh:
            self.compiled = CompiledForward(network, taps, key, bool(verbose))
        return self.compiled

    def stream(
        self,
        X: Any,
        taps: Sequence[Tap],
        reduce: Callable[[Any], Any],
        *,
        label: str,
        index: np.ndarray | None = None,
        pool: Callable[[Tap, Any], torch.Tensor] | None = None,
        flip: bool = False,
        batch_size: int | str = "auto",
        num_workers: Any = 0,
        compile: bool | str = False,
        verbose: int = 0,
    ) -> Iterator[Any]:
        """``reduce`` of each batch of ``X`` (of the images ``index``), in order,
        on the folded copy (:meth:`inference_copy`) under autocast.

        Without ``pool``, ``reduce`` takes the list of the ``taps``' tensors
        (the output for no taps) and the forward stops at the last tap. With
        ``pool(tap, tensor)``, taps are pooled in their hooks and ``reduce``
        takes the dict of those that gave rows; such a pass is never compiled.
        ``flip``: the mean of each image's and its mirror's. Batches that run
        out of CUDA memory are halved.
        """
        n = len(X) if index is None else len(index)
        self.module.eval()
        dtype = self.dtype
        size = self.batch_size(batch_size)
        rewritten = self.inference_copy(X)
        network, asked = rewritten.network(self.module), list(taps)
        # The folded copy names a folded BatchNorm's input by its convolution.
        taps = rewritten.taps_for(asked)
        if pool is not None:  # rows come back under the taps asked for
            reduce = functools.partial(
                _renamed, reduce, dict(zip(asked, taps, strict=True))
            )
            taps = list(dict.fromkeys(taps))
        auto = compile == "auto" and pool is None
        compiled = None
        if pool is None and compile:
            compiled = self._compiled(network, taps, auto, verbose)
        bar = progress(n, label, enabled=bool(verbose))
        began, done = time.perf_counter(), 0
        tapper: Any = (
            Tapper(network, taps) if pool is None else PooledTapper(network, taps, pool)
        )
        with torch.inference_mode(), tapper, autocast(self.device, dtype):

            def forward(images: torch.Tensor) -> Any:
                return tapper(images) if compiled is None else compiled(images, tapper)

            def rows_of(images: torch.Tensor) -> Any:
                rows = reduce(forward(images))
                if flip:
                    rows = _mean(rows, reduce(forward(images.flip(-1))))
                return rows

            def chunked(k: int, batch: torch.Tensor) -> Any:
                chunks = range(0, len(batch), k)
                return _concat([rows_of(batch[i : i + k]) for i in chunks])

            for batch in self.batches(X, index, size, num_workers):
                if (
                    auto
                    and compiled is None
                    and auto_compile_pays(time.perf_counter() - began, done, n - done)
                ):
                    compiled = self._compiled(network, taps, False, verbose)
                rows, size = halve_on_oom(
                    functools.partial(chunked, batch=batch), size, what=label
                )
                done += len(batch)
                bar.update(len(batch))
                yield rows
        bar.close()

    def run(
        self,
        X: Any,
        taps: Sequence[Tap],
        reduce: Callable[[list[torch.Tensor]], torch.Tensor],
        n_columns: int,
        **kwargs: Any,
    ) -> np.ndarray:
        """:meth:`stream` collected into one float32 array of ``n_columns``."""
        index = kwargs.get("index")
        n = len(X) if index is None else len(index)
        out = np.empty((n, n_columns), dtype=np.float32)
        start = 0
        for rows in self.stream(X, taps, reduce, **kwargs):
            out[start : start + len(rows)] = rows.float().cpu().numpy()
            start += len(rows)
        return out


def _example(
    module: nn.Module, pre: Preprocessing, device: torch.device, X: Any
) -> torch.Tensor:
    batch = ImageDataset(X, pre).__getitems__([0])
    fmt = torch.channels_last if uses_channels_last(module) else torch.contiguous_format
    return batch.to(device).contiguous(memory_format=fmt)


def _off_cpu(module: nn.Module) -> bool:
    return any(t.device.type != "cpu" for t in module.state_dict().values())


def cpu_copy(module: nn.Module) -> nn.Module:
    """A copy of ``module`` on the CPU, each tensor copied straight there (never
    duplicated on its device); tied weights stay tied."""
    memo: dict[int, Any] = {}
    for t in [*module.parameters(), *module.buffers()]:
        if id(t) in memo:
            continue
        data = t.detach().to("cpu", copy=True)
        if isinstance(t, nn.Parameter):
            data = nn.Parameter(data, requires_grad=t.requires_grad)
        memo[id(t)] = data
    return copy.deepcopy(module, memo)


# -- Networks shared between fits ---------------------------------------------


class SharedNetworks:
    """Networks that fits in this process share (CNNFeatureTransformer with
    ``memory=``, which only reads its network): in a search, building one
    would cost more than reading a fold's cached features.

    The ``size`` most recently used are kept; one whose weights were written
    since it was built is dropped at the next lookup.
    """

    def __init__(self, size: int = 2) -> None:
        self.size = size
        self._entries: OrderedDict = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple, X: Any) -> Network | None:
        """The network built for ``key``, if unchanged and the images of
        ``X`` give the input shape it was traced with."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            network, version = entry
            if weights_version(network.module) != version:
                del self._entries[key]
                return None
            self._entries.move_to_end(key)
        try:
            shape = tuple(network.example(X).shape[1:])
        except ValueError:  # images of other channels than it takes
            return None
        if shape != network.example_shape:
            return None
        return network

    def put(self, key: tuple, network: Network) -> None:
        with self._lock:
            self._entries[key] = (network, weights_version(network.module))
            while len(self._entries) > self.size:
                self._entries.popitem(last=False)

    def holds(self, network: Network) -> bool:
        with self._lock:
            return any(entry[0] is network for entry in self._entries.values())

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


#: The process's one registry of shared networks.
SHARED = SharedNetworks()


def _builder_identity(model: Any) -> Any:
    """What identifies a builder: a name, a function (a redefined one is a new
    object), a bound classmethod's class and function, a partial's function
    and arguments; None where that cannot be told safely (a module, a lambda).
    """
    if isinstance(model, str):
        return model
    if isinstance(model, functools.partial):
        func = _builder_identity(model.func)
        if func is None:
            return None
        return (func, repr((model.args, sorted(model.keywords.items()))))
    if isinstance(model, types.MethodType) and isinstance(model.__self__, type):
        func = model.__func__
        if "<" in func.__qualname__:
            return None
        return (model.__self__, func)
    if isinstance(model, (types.FunctionType, type)) and "<" not in model.__qualname__:
        return model
    return None


def network_key(kind: str, random_state: Any, params: dict[str, Any]) -> tuple | None:
    """What decides the network ``Network.build(**params)`` builds, or None
    where that cannot be told safely (see :func:`_builder_identity`; unseeded
    random weights; a mean or std fitted to the images, which differ between
    folds)."""
    builder = _builder_identity(params["model"])
    weights, mean, std = params["weights"], params["mean"], params["std"]
    if builder is None or isinstance(mean, str) or isinstance(std, str):
        return None
    if weights is None and not isinstance(random_state, Integral):
        return None
    if isinstance(weights, (str, os.PathLike)) and os.path.isfile(weights):
        info = os.stat(weights)
        weights = (os.path.abspath(weights), info.st_mtime_ns, info.st_size)
    return (
        kind, builder, repr(weights), repr(random_state),
        repr(params["image_size"]), repr(mean), repr(std), str(params["device"]),
        params["precision"], params["bands"], params["stem"],
    )  # fmt: skip
