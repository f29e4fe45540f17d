"""What both estimators share: parameters that say which network runs where,
building it in ``fit``, streaming batches through it, and pickling it."""

from __future__ import annotations

import contextlib
import copy
import functools
import os
from collections.abc import Callable, Iterator
from numbers import Integral
from typing import Any

import numpy as np
import torch
from sklearn.exceptions import NotFittedError
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.validation import check_is_fitted
from torch import nn
from torchvision.models import WeightsEnum

from ._bands import STEM_RULES, adapt_stem
from ._images import Preprocessing
from ._inspect import probe_network
from ._layers import Tap, Trace
from ._models import build_architecture, check_image_size
from ._network import SHARED, Network, network_key
from ._persistence import NETWORK, check_registered, write
from ._persistence import snapshot_value as _snapshot_value
from ._runtime import PRECISIONS, cpu_state, place, resolve_device

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
    "mean": [None, "array-like", StrOptions({"fit"})],
    "std": [None, "array-like", StrOptions({"fit"})],
    "bands": [StrOptions({"auto", "all"})],
    "stem": [StrOptions(set(STEM_RULES))],
    "batch_size": [Interval(Integral, 1, None, closed="left")],
    "device": [str, torch.device],
    "precision": [StrOptions(set(PRECISIONS))],
    "num_workers": [Interval(Integral, 0, None, closed="left"), StrOptions({"auto"})],
    "compile": ["boolean", StrOptions({"auto"})],
    "verbose": ["verbose"],
}


def _check_triplet(value: Any, name: str) -> None:
    """``mean`` / ``std``: None, "fit", or one finite number per channel
    (3 for RGB; their number is checked against the images' bands at fit)."""
    if value is None or isinstance(value, str):
        return
    arr = np.asarray(value, dtype=float)
    if arr.ndim != 1 or len(arr) == 0 or not np.isfinite(arr).all():
        raise ValueError(
            f"{name} must hold one finite number per channel (R, G, B; or one "
            f"per band), or be 'fit'; got {value!r}."
        )
    if name == "std" and (arr <= 0).any():
        raise ValueError(f"std must be positive; got {value!r}.")


# -- Fit as a transaction: a failed fit leaves the estimator as it was --------


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
    """Leave ``estimator`` exactly as it was if the block (``fit``'s body)
    raises, whatever the exception (it is re-raised).

    The instance ``__dict__`` is snapshot (a shallow copy): attributes that the
    block *rebinds* come back by themselves. Objects that it changes *in place*
    must be named in ``mutated``: a ``torch.nn.Module`` is restored by value
    (weights, ``requires_grad`` flags, train/eval modes), anything else by a
    deep copy.

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
    # The fitted network's own attributes (its trace, say) come back too.
    network = saved.get("_network")
    network_state = dict(vars(network)) if network is not None else {}
    copies: dict[str, tuple[nn.Module | None, Any]] = {}
    for name in mutated:
        value = getattr(estimator, name, None)
        if isinstance(value, nn.Module):
            copies[name] = (value, _module_snapshot(value))
        elif value is not None:
            copies[name] = (None, copy.deepcopy(value))
    try:
        yield
    except BaseException:
        for name, (module, kept) in copies.items():
            if module is not None:
                _module_restore(module, kept)
            else:
                saved[name] = kept
        if network is not None:
            vars(network).update(network_state)
        estimator.__dict__.clear()
        estimator.__dict__.update(saved)
        raise


# -- Parameters take effect at fit --------------------------------------------


def _same(a: Any, b: Any) -> bool:
    """Whether two parameter values mean the same thing: sequences by element
    (a loaded ``mean`` is a list), partials by function and arguments, other
    objects by their ``==``."""
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


class ImageClassifierMixin:
    """``score`` with a docstring that speaks of images, not of a table (place
    it left of ``ClassifierMixin``)."""

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
            Fraction of the images whose predicted class is ``y`` (with a
            multi-label ``y``, whose predicted labels are exactly ``y``'s: the
            subset accuracy; see ``average_precision_score`` and
            ``f1_score(average="samples")`` for measures that give partial
            credit).
        """
        return super().score(X, y, sample_weight=sample_weight)


#: The parameters ``Network.build`` takes.
_BUILD_PARAMS = (
    "model", "weights", "image_size", "mean", "std", "bands", "stem", "precision",
    "device",
)  # fmt: skip

#: Attributes that save() does not store: rebuilt on load with the network.
_NOT_SAVED = frozenset({"_network", "_taps", "_fitted_params"})


class NetworkMixin:
    """Builds and runs the network; the estimators add what they do with it.

    ``fit`` builds a :class:`~sklearn_cnn._network.Network` (or shares one);
    ``model_``, ``device_``, ``preprocessing_``, ``stem_`` and ``trace_`` are
    views of it. Parameters take effect at ``fit``: inference (``_run``)
    refuses to run once one of ``_inference_params`` changed since, rather
    than compute with the old value; ``device`` takes effect at the next fit
    or load, the others at once (they do not change the results).
    """

    #: Parameters whose value at fit decides what inference computes: what
    #: builds the network, but where it runs.
    _inference_params: tuple[str, ...] = tuple(
        p for p in _BUILD_PARAMS if p != "device"
    )

    # The fitted network's parts, as public fitted attributes.
    model_ = property(lambda self: self._network.module, doc="The network.")
    device_ = property(lambda self: self._network.device, doc="Its device.")
    preprocessing_ = property(
        lambda self: self._network.preprocessing, doc="Its preprocessing."
    )
    stem_ = property(
        lambda self: self._network.stem,
        doc="How its first convolution was adapted to the bands (or None).",
    )

    @property
    def trace_(self) -> Trace:
        """What one forward pass of the network revealed."""
        return self._network.trace

    @trace_.setter
    def trace_(self, value: Trace) -> None:  # after a new head is installed
        self._network.trace = value

    def _record_params(self) -> None:
        """Remember the values of ``_inference_params`` the network is built with."""
        self._fitted_params = {
            name: _snapshot_value(getattr(self, name))
            for name in self._inference_params
        }

    def _changed_params(self) -> tuple[list[str], list[str]]:
        """The parameters changed since fit, and what each is and was."""
        fitted = getattr(self, "_fitted_params", None) or {}
        changed = [n for n, v in fitted.items() if not _same(getattr(self, n), v)]
        what = [
            f"{n}={getattr(self, n)!r} (fitted with {fitted[n]!r})" for n in changed
        ]
        return changed, what

    def _build_network(self, X: Any, share: bool = False) -> None:
        """Build the network (``_network.Network.build``); with ``share``, take
        the one an earlier fit in this process built from the same parameters
        (``_network.SHARED``)."""
        _check_triplet(self.mean, "mean")
        _check_triplet(self.std, "std")
        check_image_size(self.image_size)  # before the network is built
        self._record_params()
        params = {name: getattr(self, name) for name in _BUILD_PARAMS}
        key = None
        if share:
            key = network_key(type(self).__name__, self.random_state, params)
        network = SHARED.get(key, X) if key is not None else None
        if network is None:
            network = Network.build(X=X, **params)
            if key is not None:
                SHARED.put(key, network)
        self._network = network

    def _check_params_unchanged(self) -> None:
        """Refuse to run with parameters that changed since fit."""
        changed, what = self._changed_params()
        if changed:
            raise NotFittedError(
                f"{type(self).__name__}'s parameters changed after fit: "
                f"{'; '.join(what)}. "
                "Parameters take effect at fit: call fit again to use the new "
                "value(s), or set them back."
            )

    def _example(self, X: Any) -> torch.Tensor:
        """The first image of X, preprocessed: the probe for tracing."""
        return self._network.example(X)

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
        as one float32 array (``Network.run``, the one inference loop)."""
        self._check_params_unchanged()
        return self._network.run(
            X, taps, reduce, n_columns, label=label, index=index, flip=flip,
            batch_size=self.batch_size, num_workers=self.num_workers,
            compile=getattr(self, "compile", False), verbose=self.verbose,
        )  # fmt: skip

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
        check_registered(type(self))
        check_is_fitted(self)
        if not hasattr(self, "_rebuild_for_load"):
            raise NotImplementedError(
                f"{type(self).__name__} cannot be saved by save() yet."
            )
        self._check_params_unchanged()
        params = self.get_params(deep=False)
        fitted = {
            k: v
            for k, v in self.__dict__.items()
            if k not in params and k not in _NOT_SAVED
        }
        network = self._network
        fitted.update(
            preprocessing_=network.preprocessing, _example_shape=network.example_shape
        )
        write(path, type(self), params, fitted, network.module)

    @classmethod
    def _from_saved(
        cls, params: dict, fitted: dict, tensors: dict, path: str, device: Any
    ) -> NetworkMixin:
        """The estimator that ``save`` wrote (``_persistence.read``'s values)."""
        estimator = cls(**params)
        if device is not None:
            estimator.set_params(device=device)
        preprocessing, example_shape = (fitted.pop(k) for k in NETWORK)
        for key, value in fitted.items():
            setattr(estimator, key, value)
        estimator._rebuild_network(preprocessing, tuple(example_shape), tensors, path)
        return estimator

    def _rebuild_network(
        self,
        preprocessing: Preprocessing,
        example_shape: tuple[int, ...],
        tensors: dict[str, torch.Tensor],
        path: str,
    ) -> None:
        """Rebuild the network from the parameters, traced on a blank image of
        the size fit saw; ``_rebuild_for_load(example)`` redoes the estimator's
        structural steps (taps, a head); then load the tensors strictly."""
        self._record_params()
        device = resolve_device(self.device)
        module = build_architecture(self.model, self.weights).eval()
        stem = None
        if example_shape[0] != 3:  # a first convolution fit adapted to the bands
            rgb = torch.zeros((1, 3, *example_shape[1:]))
            # Its shape only (no random draw): the saved tensors fill it.
            stem = adapt_stem(module, example_shape[0], "mean", rgb)
            stem["rule"] = self.stem
        module = place(module, device)
        example = torch.zeros((1, *example_shape), device=device)
        trace = probe_network(module, example)  # as fit does (memory format too)
        self._network = Network(
            module, preprocessing, device, self.precision, trace, example_shape, stem
        )
        self._rebuild_for_load(example)
        module = self._network.module
        expected = module.state_dict()
        missing = sorted(set(expected) - set(tensors))
        unexpected = sorted(set(tensors) - set(expected))
        shapes = [
            k
            for k in expected
            if k in tensors and tensors[k].shape != expected[k].shape
        ]
        if missing or unexpected or shapes:
            raise ValueError(
                f"The tensors in {path!r} do not fit the network rebuilt from its "
                f"parameters (missing {missing[:3]}, unexpected {unexpected[:3]}, "
                f"other shapes {shapes[:3]}): the model's code changed since it "
                "was saved."
            )
        with torch.no_grad():
            module.load_state_dict(tensors, strict=True)
        place(module.eval(), device)

    # The network travels on the CPU (``Network.__getstate__``) and moves to
    # ``device`` on load.
    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        if "_network" in state:
            self._network.place(resolve_device(self.device))
