"""What both estimators share: parameters that say which network runs where,
building it in ``fit``, streaming batches through it, and pickling it."""

from __future__ import annotations

import contextlib
import copy
import functools
import os
import threading
import time
import types
import warnings
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterator
from numbers import Integral
from typing import Any, TypeVar

import numpy as np
import torch
from sklearn.exceptions import NotFittedError
from sklearn.utils._param_validation import Interval, StrOptions
from torch import nn
from torchvision.models import WeightsEnum

from ._images import ImageDataset, Preprocessing
from ._inference import InferenceCopy, inference_copy
from ._inspect import probe_network
from ._layers import Tap, Tapper, Trace, without_tap_hooks
from ._models import build_model, resolve_preprocessing
from ._runtime import (
    PRECISIONS,
    CompiledForward,
    auto_batch_size,
    auto_compile_pays,
    autocast,
    batches,
    compiled_forward,
    place,
    progress,
    resolve_device,
    resolve_precision,
    uses_channels_last,
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
    "num_workers": [Interval(Integral, 0, None, closed="left"), StrOptions({"auto"})],
    "compile": ["boolean", StrOptions({"auto"})],
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


# ---------------------------------------------------------------------------
# Fit as a transaction: a failed fit leaves the estimator as it was
# ---------------------------------------------------------------------------


def cpu_state(model: nn.Module) -> OrderedDict:
    """A copy of the state dict on the CPU, tensor by tensor (never a second
    copy on a GPU), with its ``_metadata`` (module versions, which MNASNet's
    loader needs)."""
    state = model.state_dict()
    out = OrderedDict((k, v.detach().to("cpu", copy=True)) for k, v in state.items())
    out._metadata = getattr(state, "_metadata", None)  # type: ignore[attr-defined]
    return out


def _module_snapshot(module: nn.Module) -> tuple[dict, dict, dict]:
    """What training changes in place: weights (copied to the CPU, tensor by
    tensor), ``requires_grad`` flags and train/eval modes."""
    weights = cpu_state(module)
    grads = {name: p.requires_grad for name, p in module.named_parameters()}
    modes = {name: m.training for name, m in module.named_modules()}
    return weights, grads, modes


def _module_restore(module: nn.Module, snapshot: tuple[dict, dict, dict]) -> None:
    weights, grads, modes = snapshot
    with torch.no_grad():
        module.load_state_dict(weights)
    for name, p in module.named_parameters():
        p.requires_grad_(grads.get(name, False))
    for name, m in module.named_modules():
        m.training = modes.get(name, False)


@contextlib.contextmanager
def restore_on_failure(estimator: Any, *, mutated: tuple[str, ...] = ()) -> Iterator:
    """Leave ``estimator`` exactly as it was if the block raises.

    Use it around the body of ``fit``: an unfitted estimator stays unfitted
    (``NotFittedError``, not a half-set ``AttributeError``), a fitted one keeps
    its previous fitted attributes, whatever the exception (``KeyboardInterrupt``
    included: it is re-raised).

    The instance ``__dict__`` is snapshot (a shallow copy): attributes that the
    block *rebinds* come back by themselves. Objects that the block changes *in
    place* must be named in ``mutated``: a ``torch.nn.Module`` (a warm-started
    ``model_``) is restored by value (weights copied to the CPU tensor by tensor,
    ``requires_grad`` flags, train/eval modes), anything else (``history_``) by
    a deep copy. A fit that builds everything anew needs no ``mutated``.

    Examples
    --------
    >>> class Est:
    ...     def fit(self, fail):
    ...         with restore_on_failure(self):
    ...             self.coef_ = 1
    ...             if fail:
    ...                 raise ValueError("bad input")
    ...         return self
    >>> est = Est()
    >>> try:
    ...     est.fit(fail=True)
    ... except ValueError:
    ...     pass
    >>> hasattr(est, "coef_")
    False
    """
    saved = dict(estimator.__dict__)
    copies = {}
    for name in mutated:
        value = saved.get(name)
        if isinstance(value, nn.Module):
            copies[name] = _module_snapshot(value)
        elif value is not None:
            copies[name] = copy.deepcopy(value)
    try:
        yield
    except BaseException:
        for name, kept in copies.items():
            if isinstance(saved[name], nn.Module):
                _module_restore(saved[name], kept)
            else:
                saved[name] = kept
        estimator.__dict__.clear()
        estimator.__dict__.update(saved)
        raise


# ---------------------------------------------------------------------------
# Parameters take effect at fit
# ---------------------------------------------------------------------------


def _snapshot_value(value: Any) -> Any:
    """A copy of a container parameter, so that changing it in place shows."""
    if isinstance(value, (list, dict, np.ndarray)):
        return copy.copy(value)
    return value


def _same(a: Any, b: Any) -> bool:
    """Whether two parameter values mean the same thing.

    Lists, tuples and arrays compare by element (a saved and loaded ``mean``
    comes back as a list), partials by their function and arguments, modules
    and other objects by identity (their ``==``).
    """
    if a is b:
        return True
    if isinstance(a, functools.partial) and isinstance(b, functools.partial):
        return (
            _same(a.func, b.func)
            and _same(a.args, b.args)
            and _same(a.keywords, b.keywords)
        )
    sequences = (list, tuple, np.ndarray)
    if isinstance(a, sequences) and isinstance(b, sequences):
        a, b = list(a), list(b)
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (functools.partial, *sequences, dict)) or isinstance(
        b, (functools.partial, *sequences, dict)
    ):
        return False
    try:
        return bool(a == b)
    except Exception:  # an object whose == is not a truth value
        return False


# ---------------------------------------------------------------------------
# CUDA out of memory: halve the batch and retry
# ---------------------------------------------------------------------------

T = TypeVar("T")


def _free_device_memory() -> None:
    if torch.cuda.is_initialized():  # never initialise CUDA just to free it
        torch.cuda.empty_cache()


def halve_on_oom(run: Callable[[int], T], size: int, *, what: str) -> tuple[T, int]:
    """``run(size)``; on CUDA out of memory, halve ``size`` and run again.

    ``run(k)`` must process a whole batch in chunks of at most ``k`` images and
    be safe to repeat (a training step zeroes its gradients first). Each
    halving warns; one image that still does not fit raises
    ``torch.OutOfMemoryError`` with advice. Returns the result and the size
    that worked, which the caller passes to the next batch so that the retries
    happen once, not at every batch.

    Examples
    --------
    >>> def run(k):
    ...     if k > 2:
    ...         raise torch.OutOfMemoryError("CUDA out of memory")
    ...     return k
    >>> import warnings
    >>> with warnings.catch_warnings():
    ...     warnings.simplefilter("ignore")
    ...     halve_on_oom(run, 8, what="predict")
    (2, 2)
    """
    while True:
        failed = False
        try:
            return run(size), size
        except torch.OutOfMemoryError as exc:
            if size <= 1:
                raise torch.OutOfMemoryError(
                    f"The device ran out of memory in {what} with one image per "
                    "batch. Use a smaller image_size, precision='bf16' or "
                    f"'fp16', or device='cpu'. ({str(exc).splitlines()[0]})"
                ) from exc
            failed = True
        # Outside the except block, so that the traceback (and the tensors its
        # frames hold) is released before the cache is emptied.
        if failed:
            _free_device_memory()
            smaller = size // 2
            warnings.warn(
                f"The device ran out of memory in {what} with {size} images per "
                f"batch; retrying with {smaller}. Set batch_size={smaller} (or "
                "lower) to avoid the retries.",
                RuntimeWarning,
                stacklevel=4,
            )
            size = smaller


def in_chunks(
    fn: Callable[[torch.Tensor], torch.Tensor], batch: torch.Tensor, size: int
) -> torch.Tensor:
    """``fn`` of ``batch``, applied to chunks of at most ``size`` rows."""
    if len(batch) <= size:
        return fn(batch)
    return torch.cat([fn(batch[i : i + size]) for i in range(0, len(batch), size)])


# ---------------------------------------------------------------------------
# Pickling: CPU copies of the tensors, one at a time
# ---------------------------------------------------------------------------


def _off_cpu(module: nn.Module) -> bool:
    return any(t.device.type != "cpu" for t in module.state_dict().values())


def cpu_copy(module: nn.Module) -> nn.Module:
    """A copy of ``module`` whose parameters and buffers are on the CPU.

    Each tensor is copied straight to the CPU (``copy.deepcopy`` with a memo
    that maps it to its CPU copy): the module is never duplicated on its
    device, which ``copy.deepcopy(module).cpu()`` would do, doubling the
    device memory it takes. Tied weights stay tied.
    """
    memo: dict[int, Any] = {}
    for t in [*module.parameters(), *module.buffers()]:
        if id(t) in memo:
            continue
        data = t.detach().to("cpu", copy=True)
        if isinstance(t, nn.Parameter):
            data = nn.Parameter(data, requires_grad=t.requires_grad)
        memo[id(t)] = data
    return copy.deepcopy(module, memo)


class ImageClassifierMixin:
    """``score`` with a docstring that speaks of images, not of a table.

    scikit-learn's ``ClassifierMixin.score`` describes ``X`` as an array of
    shape (n_samples, n_features); place this mixin left of it.
    """

    def score(self, X: Any, y: Any, sample_weight: Any = None) -> float:
        """Mean accuracy of ``predict(X)`` against ``y``.

        Parameters
        ----------
        X : array-like of images or list of paths / PIL images
            Test images, in any form that ``fit`` accepts.
        y : array-like of shape (n_samples,)
            True labels of ``X``.
        sample_weight : array-like of shape (n_samples,), default=None
            Sample weights.

        Returns
        -------
        score : float
            Fraction of the images whose predicted class is ``y``.
        """
        return super().score(X, y, sample_weight=sample_weight)


#: Networks that fits with ``share=True`` (CNNFeatureTransformer with
#: ``memory=``: the network is only read) reuse within a process: in a search,
#: building and probing the network (0.3 + 0.7 s for Lite0 under load) would
#: otherwise cost more than reading the cached features of a fold.
_SHARED: OrderedDict = OrderedDict()
_SHARED_SIZE = 2
_SHARED_LOCK = threading.Lock()


#: What fits computed from a shared network, to reuse (its weights' digest,
#: its layers' feature widths); dropped with the network.
_SHARED_MEMO: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def is_shared(module: nn.Module) -> bool:
    """Whether ``module`` is a network that fits in this process share (and
    so only read: its weights never change)."""
    with _SHARED_LOCK:
        return any(entry[0] is module for entry in _SHARED.values())


def shared_memo(module: nn.Module) -> dict:
    """Where fits keep what they compute from ``module`` if it is shared (it
    is only read, so what one fit computed holds for the next); otherwise a
    new dict that nothing else sees."""
    if not is_shared(module):
        return {}
    with _SHARED_LOCK:
        return _SHARED_MEMO.setdefault(module, {})


def _network_key(est: Any) -> tuple | None:
    """What decides the network a fit builds, or None where that cannot be
    told safely (a module instance, unseeded random weights, a lambda or a
    function defined inside another).

    A builder is keyed by the function object itself, not its name: a
    function redefined in a notebook is a new object and builds anew."""
    model, weights = est.model, est.weights
    func = model.func if isinstance(model, functools.partial) else model
    if isinstance(model, str):
        pass
    elif isinstance(func, types.FunctionType) and "<" not in func.__qualname__:
        args = (model.args, sorted(model.keywords.items())) if func is not model else ()
        model = (func, repr(args))
    else:
        return None
    if weights is None and not isinstance(est.random_state, Integral):
        return None
    if isinstance(weights, (str, os.PathLike)) and os.path.isfile(weights):
        info = os.stat(weights)
        weights = (os.path.abspath(weights), info.st_mtime_ns, info.st_size)
    return (
        type(est).__name__, model, repr(weights), repr(est.random_state),
        repr(est.image_size), repr(est.mean), repr(est.std), str(est.device),
    )  # fmt: skip


class NetworkMixin:
    """Builds and runs the network; the estimators add what they do with it.

    Fitted attributes set by ``_build_network``: ``model_``, ``device_``,
    ``preprocessing_``, ``trace_`` (what one forward pass revealed).

    Parameters take effect at ``fit``: ``_build_network`` records the values
    of ``_inference_params`` (the parameters that decide what inference
    computes) and inference uses only what fit resolved from them. Inference
    (``_run``) refuses to run once one of them has been changed by
    ``set_params`` without a new fit, rather than silently compute with the
    old value. ``batch_size``, ``num_workers`` and ``verbose`` do not change the
    results and take effect at once; ``device`` takes effect at the next fit or
    load.
    """

    #: Parameters whose value at fit decides what inference computes.
    _inference_params: tuple[str, ...] = (
        "model",
        "weights",
        "image_size",
        "mean",
        "std",
        "precision",
    )

    def _build_network(self, example_source: Any, share: bool = False) -> None:
        _check_triplet(self.mean, "mean")
        _check_triplet(self.std, "std")
        _check_image_size(self.image_size)
        self._fitted_params = {
            name: _snapshot_value(getattr(self, name))
            for name in self._inference_params
        }
        key = _network_key(self) if share else None
        if key is not None and self._reuse_network(key, example_source):
            return
        module, enum = build_model(self.model, self.weights)
        self.preprocessing_: Preprocessing = resolve_preprocessing(
            self.model, enum, self.image_size, self.mean, self.std, module=module
        )
        self.device_ = resolve_device(self.device)
        self.model_: nn.Module = place(module.eval(), self.device_)
        example = self._example(example_source)
        self._example_shape = tuple(example.shape[1:])
        # Errors that name the image_size a model needs; a network that fails
        # in channels_last format (x.view) falls back to contiguous tensors.
        self.trace_: Trace = probe_network(self.model_, example)
        if key is not None:
            with _SHARED_LOCK:
                _SHARED[key] = (
                    self.model_, self.preprocessing_, self.device_, self.trace_,
                    self._example_shape,
                )  # fmt: skip
                while len(_SHARED) > _SHARED_SIZE:
                    _SHARED.popitem(last=False)

    def _reuse_network(self, key: tuple, example_source: Any) -> bool:
        """Take the network that an earlier fit in this process built from the
        same parameters, if the images give the same input shape."""
        with _SHARED_LOCK:
            found = _SHARED.get(key)
        if found is None:
            return False
        model, self.preprocessing_, self.device_, trace, shape = found
        self.model_ = model
        example = self._example(example_source)
        if tuple(example.shape[1:]) != shape:
            del self.model_
            return False
        self.trace_, self._example_shape = trace, shape
        return True

    def _check_params_unchanged(self) -> None:
        """Refuse to run with parameters that changed since fit."""
        fitted = getattr(self, "_fitted_params", None)
        if fitted is None:
            return
        changed = [
            name
            for name, value in fitted.items()
            if not _same(getattr(self, name), value)
        ]
        if changed:
            what = "; ".join(
                f"{name}={getattr(self, name)!r} (fitted with {fitted[name]!r})"
                for name in changed
            )
            raise NotFittedError(
                f"{type(self).__name__}'s parameters changed after fit: {what}. "
                "Parameters take effect at fit: call fit again to use the new "
                "value(s), or set them back."
            )

    def _example(self, X: Any) -> torch.Tensor:
        """The first image of X, preprocessed: the probe for tracing."""
        batch = ImageDataset(X, self.preprocessing_).__getitems__([0])
        model = getattr(self, "model_", None)
        fmt = (
            torch.channels_last
            if model is not None and uses_channels_last(model)
            else torch.contiguous_format
        )
        return batch.to(self.device_).contiguous(memory_format=fmt)

    @property
    def _autocast_dtype(self) -> torch.dtype | None:
        # The precision fit saw, for the device the network is on now.
        fitted = getattr(self, "_fitted_params", {})
        return resolve_precision(fitted.get("precision", self.precision), self.device_)

    def _inference_batch_size(self) -> int:
        """Images per forward pass of inference: ``batch_size``, or what
        "auto" means on this device for the images fit saw."""
        if self.batch_size != "auto":
            return self.batch_size
        return auto_batch_size(self.device_, self._example_shape)

    def _batches(self, X: Any, index: np.ndarray | None = None):
        """Preprocessed batches of ``X`` (of the images ``index`` if given)."""
        dataset = ImageDataset(X, self.preprocessing_)
        if index is not None:
            dataset = torch.utils.data.Subset(dataset, index.tolist())
        return batches(
            dataset,
            batch_size=self._inference_batch_size(),
            num_workers=self.num_workers,
            device=self.device_,
            channels_last=uses_channels_last(self.model_),
        )

    def _run(
        self,
        X: Any,
        taps: list[Tap],
        reduce: Callable[[list[torch.Tensor]], torch.Tensor],
        n_columns: int,
        label: str,
        index: np.ndarray | None = None,
        flip: bool = False,
    ) -> np.ndarray:
        """``reduce(tapped tensors)`` of every image (of ``index`` if given),
        as one float32 array; with ``flip``, the mean of the image's and its
        mirror's (test-time augmentation).

        Batches stream through the network in inference mode; only the reduced
        rows of each batch are kept. A batch that runs out of CUDA memory is
        split in halves (see ``halve_on_oom``), and so are the next ones.
        """
        self._check_params_unchanged()
        n = len(X) if index is None else len(index)
        out = np.empty((n, n_columns), dtype=np.float32)
        bar = progress(n, label, enabled=bool(self.verbose))
        self.model_.eval()
        start = 0
        size = self._inference_batch_size()
        dtype = self._autocast_dtype
        mode = self.compile
        auto = isinstance(mode, str)  # "auto": compile once it pays, below
        rewritten = self._inference_copy(X)
        network, taps = rewritten.network(self.model_), rewritten.taps_for(taps)
        # compile=False still reuses nothing; "auto" reuses a compile it paid.
        compiled = self._compiled_forward(
            network, taps, dtype, reuse_only=auto or not mode
        )
        if not auto and not mode:
            compiled = None
        began = time.perf_counter()
        with (
            torch.inference_mode(),
            Tapper(network, taps) as tapper,
            autocast(self.device_, dtype),
        ):

            def forward(images: torch.Tensor) -> list[torch.Tensor]:
                return tapper(images) if compiled is None else compiled(images, tapper)

            def rows_of(images: torch.Tensor) -> torch.Tensor:
                rows = reduce(forward(images))
                if flip:
                    rows = 0.5 * (rows + reduce(forward(images.flip(-1))))
                return rows

            for batch in self._batches(X, index):
                if (
                    auto
                    and compiled is None
                    and auto_compile_pays(time.perf_counter() - began, start, n - start)
                ):
                    compiled = self._compiled_forward(network, taps, dtype)
                rows, size = halve_on_oom(
                    lambda k, b=batch: in_chunks(rows_of, b, k), size, what=label
                )
                out[start : start + len(rows)] = rows.cpu().numpy()
                start += len(rows)
                bar.update(len(batch))
        bar.close()
        return out

    def _inference_copy(self, X: Any) -> InferenceCopy:
        """The fitted network with BatchNorms folded and weights in the
        autocast dtype, for inference (see ``_inference``); made at the
        first call, from a pass of the first image of ``X``."""
        return inference_copy(
            self.model_, self._autocast_dtype, lambda: self._example(X)
        )

    def _compiled_forward(
        self,
        network: nn.Module,
        taps: list[Tap],
        dtype: torch.dtype | None,
        reuse_only: bool = False,
    ) -> CompiledForward | None:
        """The compiled tapped forward of ``network`` (the one inference runs
        on, see ``_inference_copy``) for ``taps`` (see ``compile``), kept
        across calls while the network stays the same: the compile time is
        paid once. With ``reuse_only``, only one already compiled (or None)."""
        cached = getattr(self, "_compiled", None)
        key = (tuple(taps), dtype, str(self.device_))
        if reuse_only:
            fresh = cached is not None and cached.fresh_for(network, key)
            return cached if fresh and not cached.failed else None
        self._compiled = compiled_forward(
            cached, network, taps, key, verbose=bool(self.verbose)
        )
        return self._compiled

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        # Images, not a table: arrays N x H x W (x C), or lists of file paths.
        tags.input_tags.two_d_array = False
        tags.input_tags.three_d_array = True
        tags.input_tags.string = True
        if tags.transformer_tags is not None:  # float32 whatever the input
            tags.transformer_tags.preserves_dtype = []
        return tags

    def save(self, path: str | os.PathLike) -> None:
        """Write the fitted estimator to ``path``, without pickle.

        The file holds the parameters and fitted attributes as JSON and the
        network's weights as tensors (safetensors when installed, the
        ``persist`` extra; else ``torch.save`` of plain tensors), with a
        checksum: :func:`sklearn_cnn.load` runs no code from it and refuses a
        truncated or modified file. The network is rebuilt from the
        parameters on load, so ``model`` must be a torchvision name or an
        importable callable (a function, a class, or ``functools.partial`` of
        one with JSON-like arguments), not a module instance.

        Parameters
        ----------
        path : str or path-like
            Where to write; an existing file is replaced (atomically).

        Examples
        --------
        >>> import os, tempfile
        >>> import numpy as np
        >>> from sklearn_cnn import CNNFeatureTransformer, load
        >>> X = np.zeros((2, 32, 32, 3), dtype=np.uint8)
        >>> cnn = CNNFeatureTransformer("resnet18", weights=None).fit(X)
        >>> path = os.path.join(tempfile.mkdtemp(), "cnn.safetensors")
        >>> cnn.save(path)
        >>> load(path).n_features_out_
        512
        """
        from ._persistence import save

        save(self, path)

    # Pickling: the module travels on the CPU, so that an estimator fitted on a
    # GPU loads on a machine without one; it moves back to a device on load.
    def __getstate__(self) -> dict:
        # A copy: BaseEstimator.__getstate__ returns the live __dict__ itself.
        state = dict(super().__getstate__())
        model = state.get("model_")
        if model is not None:
            # Another thread may be transforming: its tap hooks stay behind.
            model = state["model_"] = without_tap_hooks(model)
        if model is not None and _off_cpu(model):
            state["model_"] = cpu_copy(model)
        state.pop("device_", None)
        state.pop("_compiled", None)  # compiled code does not pickle; recompiles
        return state

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        if "model_" in state:
            self.device_ = resolve_device(self.device)
            place(self.model_, self.device_, uses_channels_last(self.model_))
