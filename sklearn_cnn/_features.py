"""CNNFeatureTransformer: a pretrained CNN's activations as sklearn features."""

from __future__ import annotations

import os
from numbers import Integral
from typing import Any

import numpy as np
import torch
from sklearn.base import BaseEstimator, TransformerMixin, _fit_context
from sklearn.utils._param_validation import HasMethods, Interval, StrOptions
from sklearn.utils.validation import check_is_fitted

from ._base import NetworkMixin, _network_constraints, restore_on_failure
from ._cache import cache_directory, cached_transform, network_key_parts
from ._images import check_images
from ._layers import (
    LAYOUTS,
    POOLINGS,
    Tap,
    Tapper,
    check_pooling,
    network_output,
    pool,
    resolve_layers,
)
from ._models import seeded
from ._persistence import register


@register
class CNNFeatureTransformer(NetworkMixin, TransformerMixin, BaseEstimator):
    """Activations of a pretrained CNN's layer, pooled, as a feature matrix.

    The "CNN codes" of transfer learning: run a pretrained network on images and
    return the output of one of its layers (by default the input of its final
    classifier) as a 2-D float32 array, ready for any scikit-learn estimator.
    ``layer`` is a plain parameter, so ``GridSearchCV`` can search it.

    Parameters
    ----------
    model : str, torch.nn.Module or callable, default="resnet18"
        A torchvision model name (``torchvision.models.list_models()``), a module
        of your own (copied, never modified), or a zero-argument callable that
        builds one (cheap for :func:`~sklearn.base.clone` to copy in a search;
        use :func:`functools.partial` rather than a lambda so that it pickles).
    weights : None, str, path or torchvision WeightsEnum, default="DEFAULT"
        For a torchvision name: ``"DEFAULT"``, an enum name such as
        ``"IMAGENET1K_V1"``, a ``WeightsEnum`` (downloaded on first use), None
        (random weights) or the path of a state-dict file (read with
        ``torch.load(weights_only=True)``). For a module of your own: a
        state-dict file, or None/"DEFAULT" to keep the module's weights.
    layer : str, list of str or None, default=None
        Module name(s) from ``model.named_modules()``, as
        :func:`~sklearn_cnn.list_layers` shows them. None taps the input of the
        network's last ``nn.Linear`` (the pooled penultimate features); a model
        without one gives its output (its first tensor). Several names
        concatenate their features in the order given. Tapping an early layer
        stops the forward pass there.
    pooling : {"avg", "max", "avgmax", "gem", "cls", "flatten"}, default="avg"
        How a layer's output becomes a vector: global average, max, the mean of
        the two, generalized mean (p=3) over its spatial positions (or its patch
        tokens), the class token ("cls", for ViT tokens), or all values
        flattened; vectors are left as they are. The channel axis is found
        from the network (NCHW or NHWC maps, NLD tokens);
        :func:`~sklearn_cnn.list_layers` shows it.
    layout : None, str or dict, default=None
        The layout of the tapped output where it cannot be found from the
        network (fit says so): "NCHW" (channels first), "NHWC" (channels last),
        "NLD" (tokens), "NC" (vectors), or a dict ``{layer: layout}``. A hint
        that contradicts the layout found is refused.
    image_size : int, (height, width), "native" or None, default=None
        None uses the weights' own preprocessing (torchvision: resize the shorter
        side, then centre crop); for a module of your own without metadata it
        keeps each image's size. An int or pair resizes every image to that size
        (no crop); "native" keeps the input size.
    mean, std : sequence of floats, "fit" or None, default=None
        Normalization ``(x - mean) / std``, one value per channel (R, G, B) or
        per band, in the units of the scaled pixels (uint8 / 255, uint16 /
        65535, floats as they are). None takes the weights' metadata, else
        ImageNet's values (for bands: repeated as the RGB filters are by
        ``stem="repeat"``); float images must then lie in [0, 1]. "fit"
        estimates each band's value from the images given to ``fit`` (every
        pixel); then, as with given values, floats may lie in any range.
    bands : {"auto", "all"}, default="auto"
        Which images are bands rather than colour. "auto": images of 2 or 5+
        channels are bands; 1 channel is grey (repeated to RGB), 3 is RGB and
        4 is RGBA (alpha dropped, as PIL does). "all": every channel is a
        band, 1 and 4 included: for RGB + near-infrared in a 4-channel array
        (the network then takes 4 channels). See ``stem``.
    stem : {"repeat", "mean", "random"}, default="repeat"
        For images of other than 3 channels, how the network's first
        convolution gets one input channel per band. "repeat" is timm's
        ``adapt_input_conv``: for one band the sum of the RGB filters; else
        band ``i`` gets the filter of RGB channel ``i % 3``, scaled by ``3 /
        bands``. "mean": every band gets the mean of the RGB filters (scaled
        likewise). "random": new random filters from ``random_state``.
        ``stem_`` says what was done.
    batch_size : int or "auto", default="auto"
        Images per forward pass (it bounds peak memory, not the features).
        "auto": 64 on a GPU; on a CPU, which runs small batches fastest, a
        power of two near 400,000 pixels (8 images at 224 px, at most 128).
    device : "auto", str or torch.device, default="auto"
        "auto" runs on CUDA when available, else on the CPU.
    precision : {"auto", "fp32", "bf16", "fp16"}, default="auto"
        "auto" uses bfloat16 autocast where the hardware runs it natively (CUDA;
        CPUs with AVX512-BF16 or AMX), float32 elsewhere. "fp32" gives exact
        float32 features.
    num_workers : int or "auto", default=0
        DataLoader worker processes that decode and preprocess image files.
        "auto" uses one per CPU beyond the two running the network (at most
        8) when there are enough files to pay for starting them; none for
        arrays and PIL images, which need no decoding.
    memory : None, str, path or joblib.Memory, default=None
        Cache the pooled activations on disk (in ``<location>/sklearn_cnn``)
        so that no image runs through the network twice: across folds, the
        candidates of a layer search, later fits and sessions. An image not
        yet cached goes once through the whole network, which stores every
        layer down to the depth of the deepest one asked for (at least stages
        and blocks, ``"layer3"`` and ``"layer3.1"``). Entries are found by the
        image's pixels (in any form and order) and by everything that decides
        them: the network's code and weights, preprocessing, pooling,
        precision and device. :func:`~sklearn_cnn.cache_size` gives its size,
        :func:`~sklearn_cnn.clear_cache` deletes it. None caches nothing.
        Takes effect at once: it does not change the features.
    compile : bool or "auto", default=False
        Run the network through :func:`torch.compile` (inductor, inference
        only). The compile, tens of seconds, is paid at the first
        ``transform`` and reused while the fitted network stays the same.
        "auto" compiles during a ``transform`` whose images left are
        predicted to take over five minutes uncompiled. The features agree
        with the uncompiled network's to float tolerance; a model that does
        not compile runs uncompiled, with a warning. ``verbose`` reports the
        compile time.
    random_state : int, RandomState instance or None, default=None
        Seeds the random initialisation of the network when it has no
        pretrained weights (``weights=None``, or a callable that builds a
        fresh module): two fits give the same features. Other weights do not
        depend on it.
    verbose : int, default=0
        Above 0, report progress on stderr.

    Attributes
    ----------
    model_ : torch.nn.Module
        The network with its weights, in eval mode, on ``device_``.
    device_ : torch.device
        Where the network runs.
    preprocessing_ : Preprocessing
        Resize, crop, mean and std used for every image.
    stem_ : dict or None
        How the first convolution was adapted to the images' bands: its
        ``layer`` name, the number of ``bands`` and the ``rule`` (``stem``);
        None when the network takes RGB as it was built.
    layers_ : list of str
        The tapped layers ("penultimate" for ``layer=None``).
    layouts_ : list of str
        The layout of each tapped layer's output ("NCHW", "NHWC", "NLD", "NC").
    n_features_out_ : int
        Number of columns ``transform`` returns.

    See Also
    --------
    FineTuneClassifier : Train the network itself on your labels.
    list_layers : The layer names a model offers, with output shapes.

    Notes
    -----
    ``X``: uint8 or integer arrays N x H x W x C or N x H x W in [0, 255],
    float arrays in [0, 1], lists of file paths, PIL images or per-image
    arrays (sizes may differ when images are resized). ``fit`` learns nothing
    from ``X``: it loads the network and checks ``X`` and ``layer``.

    Parameters take effect at ``fit``: after ``set_params`` of ``model``,
    ``weights``, ``layer``, ``pooling``, ``image_size``, ``mean``, ``std`` or
    ``precision``, ``transform`` raises ``NotFittedError`` until ``fit`` runs
    again. ``batch_size``, ``num_workers`` and ``verbose`` take effect at
    once; ``device`` at the next fit or load. A fit that fails leaves the
    transformer as it was.

    On CUDA, a batch that runs out of memory is split in halves (down to one
    image) with a warning, and the results stay the same. ``save(path)`` and
    :func:`~sklearn_cnn.load` store the fitted transformer without pickle:
    unpickling a file runs code from it, loading a saved file does not.

    Examples
    --------
    >>> import numpy as np
    >>> from sklearn_cnn import CNNFeatureTransformer
    >>> X = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    >>> cnn = CNNFeatureTransformer("resnet18", weights=None, layer="layer2")
    >>> cnn.fit_transform(X).shape
    (4, 128)

    A layer search that runs the network once per image, whatever the number
    of layers and folds (``random_state`` gives every fit the same random
    weights, so that they share the cache):

    >>> import tempfile
    >>> from sklearn_cnn import cache_size
    >>> memory = tempfile.mkdtemp()
    >>> cnn = CNNFeatureTransformer(
    ...     "resnet18", weights=None, random_state=0, layer="layer2", memory=memory
    ... )
    >>> cnn.fit_transform(X).shape  # one pass; stores layer1 to layer4 too
    (4, 128)
    >>> cnn.set_params(layer="layer4").fit_transform(X).shape  # read, not run
    (4, 512)
    >>> cache_size(memory) > 0
    True
    """

    _parameter_constraints: dict = {
        **_network_constraints,
        "batch_size": [
            Interval(Integral, 1, None, closed="left"),
            StrOptions({"auto"}),
        ],
        "layer": [None, str, list, tuple],
        "pooling": [StrOptions(set(POOLINGS))],
        "layout": [None, StrOptions(set(LAYOUTS)), dict],
        "random_state": ["random_state"],
        "memory": [None, str, os.PathLike, HasMethods(["cache"])],
    }
    _inference_params = (
        *NetworkMixin._inference_params, "layer", "pooling", "layout", "random_state",
    )  # fmt: skip

    def __init__(
        self,
        model: Any = "resnet18",
        weights: Any = "DEFAULT",
        *,
        layer: str | list[str] | None = None,
        pooling: str = "avg",
        layout: str | dict | None = None,
        image_size: Any = None,
        mean: Any = None,
        std: Any = None,
        bands: str = "auto",
        stem: str = "repeat",
        batch_size: int | str = "auto",
        device: Any = "auto",
        precision: str = "auto",
        num_workers: int | str = 0,
        memory: Any = None,
        compile: bool | str = False,
        random_state: Any = None,
        verbose: int = 0,
    ) -> None:
        self.model = model
        self.weights = weights
        self.layer = layer
        self.pooling = pooling
        self.layout = layout
        self.image_size = image_size
        self.mean = mean
        self.std = std
        self.bands = bands
        self.stem = stem
        self.batch_size = batch_size
        self.device = device
        self.precision = precision
        self.num_workers = num_workers
        self.memory = memory
        self.compile = compile
        self.random_state = random_state
        self.verbose = verbose

    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X: Any, y: Any = None) -> CNNFeatureTransformer:
        """Load the network and check ``X`` and ``layer`` against it.

        Parameters
        ----------
        X : array-like of images or list of paths / PIL images
            Images; only checked (and the first one used to probe the network).
        y : None
            Ignored.

        Returns
        -------
        self : CNNFeatureTransformer
            The fitted transformer.
        """
        X = check_images(X, unit_floats=self.mean is None and self.std is None)
        with restore_on_failure(self):
            with seeded(self.random_state):  # random weights, reproducibly
                # With memory=, a search's fits share the (read-only) network.
                self._build_network(X, share=self.memory is not None)
            self.layers_, self._taps = resolve_layers(self.layer, self.trace_)
            self.layouts_ = self._resolve_layouts()
            self._measure_widths(self._example(X))
            directory = cache_directory(self.memory)
            if directory is not None:
                os.makedirs(directory, exist_ok=True)  # a clear error now if not
                self._key_parts()  # weights hashed now, once while unchanged
        return self

    def _measure_widths(self, example: torch.Tensor) -> None:
        """Feature widths of each tapped layer, from the traced shapes or one
        image; kept with the network while its weights are unchanged."""
        key = ("widths", tuple(self._taps), self._pooling, tuple(self.layouts_))
        known = self._network.memo()
        widths = known.get(key)
        if widths is None:
            widths = known[key] = self._traced_widths() or self._probed_widths(example)
        self._widths = list(widths)
        self.n_features_out_ = int(sum(widths))

    def _traced_widths(self) -> list[int] | None:
        """The widths from the traced shapes, pooled on the meta device; None
        where that cannot tell."""
        widths = []
        for tap in self._tapped:
            shape = self.trace_.shape_of(tap)
            if shape is None:
                return None
            try:
                blank = torch.empty((1, *shape), device="meta")
                widths.append(int(self._pool_tap(tap, blank).shape[1]))
            except Exception:  # noqa: BLE001 - any failure: probe instead
                return None
        return widths

    def _probed_widths(self, example: torch.Tensor) -> list[int]:
        """The widths from a one-image forward pass."""
        with torch.inference_mode(), Tapper(self.model_, self._taps) as tapper:
            tensors = tapper(example)
        return [
            self._pool_tap(tap, t).shape[1]
            for tap, t in zip(self._tapped, tensors, strict=True)
        ]

    def _key_parts(self) -> dict[str, Any]:
        return network_key_parts(
            self._network, self._pooling, self._fitted_params.get("layout")
        )

    @property
    def _pooling(self) -> str:
        return self._fitted_params["pooling"]

    @property
    def _tapped(self) -> list[Tap]:
        """The taps, or the network's output for none."""
        return self._taps or [Tap("")]

    def _resolve_layouts(self) -> list[str | None]:
        """The layout of each tapped output: the trace's, or the user's hint
        where the trace cannot tell; refuses a pooling that cannot be right."""
        hint = self._fitted_params.get("layout")
        if isinstance(hint, dict):
            unknown = [k for k in hint if k not in self.layers_]
            if unknown:
                raise ValueError(
                    f"layout names layers that are not tapped: {unknown}; the "
                    f"tapped layers are {self.layers_}."
                )
            bad = {k: v for k, v in hint.items() if v not in LAYOUTS}
            if bad:
                raise ValueError(f"layout values must be one of {LAYOUTS}; got {bad}.")
        layouts = []
        for name, tap in zip(self.layers_, self._tapped, strict=True):
            shape = self.trace_.shape_of(tap) or ()
            found = self.trace_.layout_of(tap)
            given = hint.get(name) if isinstance(hint, dict) else hint
            if given is not None and found is not None and given != found:
                raise ValueError(
                    f"layout={given!r} for layer {name!r}, but its output is "
                    f"{found} (shape {(None, *shape)}), as the network shows. "
                    "Leave layout=None for this layer."
                )
            layout = found if found is not None else given
            check_pooling(name, shape, layout, self._pooling, self.trace_.prefix_tokens)
            layouts.append(layout)
        return layouts

    def _rebuild_for_load(self, example: torch.Tensor) -> None:
        """After the network is rebuilt by ``sklearn_cnn.load``: the taps."""
        _, self._taps = resolve_layers(self._fitted_params["layer"], self.trace_)

    def transform(self, X: Any) -> np.ndarray:
        """Run the network on ``X`` and return the pooled activations.

        Parameters
        ----------
        X : array-like of images or list of paths / PIL images
            Images to describe.

        Returns
        -------
        features : ndarray of shape (n_samples, n_features), dtype float32
            One row per image; several layers are concatenated in order.
        """
        check_is_fitted(self)
        X = check_images(X, unit_floats=self.preprocessing_.unit_floats)
        directory = cache_directory(self.memory)
        if directory is not None:
            self._check_params_unchanged()
            return cached_transform(
                directory, self._network, self._key_parts(), X, self._taps,
                self.n_features_out_, self._pool_tap, self._check_widths,
                self._pooling, batch_size=self.batch_size,
                num_workers=self.num_workers, verbose=self.verbose,
            )  # fmt: skip
        return self._run(
            X, self._taps, self._pool_all, self.n_features_out_, "transform"
        )

    # fit_transform and set_output only restate scikit-learn's methods: their
    # inherited docstrings describe tables, not images.
    def fit_transform(self, X: Any, y: Any = None, **fit_params: Any) -> np.ndarray:
        """Load the network, then return the pooled activations of ``X``.

        The same as ``fit(X).transform(X)``.

        Parameters
        ----------
        X : array-like of images or list of paths / PIL images
            Images to describe.
        y : None
            Ignored.
        **fit_params : dict
            Passed to ``fit`` (which takes none).

        Returns
        -------
        features : ndarray of shape (n_samples, n_features), dtype float32
            One row per image; several layers are concatenated in order.
        """
        return super().fit_transform(X, y, **fit_params)

    def set_output(self, *, transform: str | None = None) -> CNNFeatureTransformer:
        """Choose the container that ``transform`` and ``fit_transform`` return.

        Parameters
        ----------
        transform : {"default", "pandas", "polars"} or None, default=None
            "default": a NumPy array; "pandas" or "polars": a DataFrame whose
            columns are :meth:`get_feature_names_out` (``"<layer>_<index>"``);
            None leaves the choice unchanged.

        Returns
        -------
        self : CNNFeatureTransformer
            The transformer.

        Examples
        --------
        >>> import numpy as np
        >>> from sklearn_cnn import CNNFeatureTransformer
        >>> X = np.zeros((2, 32, 32, 3), dtype=np.uint8)
        >>> cnn = CNNFeatureTransformer("resnet18", weights=None, layer="layer1")
        >>> cnn.set_output(transform="pandas").fit_transform(X).iloc[:, :2].shape
        (2, 2)
        """
        return super().set_output(transform=transform)

    def _pool_tap(self, tap: Tap, t: torch.Tensor) -> torch.Tensor:
        """The features of one tapped tensor: the one place this is decided
        (``memory=`` stores what it gives for every layer)."""
        if not tap.module:
            t = network_output(t)
        taps = self._tapped
        if tap in taps:  # what fit resolved, the user's hint included
            layout = self.layouts_[taps.index(tap)]
        else:  # another layer (``memory=`` stores them too)
            layout = self.trace_.layout_of(tap)
        return pool(t, self._pooling, layout, self.trace_.prefix_tokens)

    def _pool_all(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        taps = self._tapped
        parts = [self._pool_tap(tap, t) for tap, t in zip(taps, tensors, strict=True)]
        self._check_widths([p.shape[1] for p in parts])
        return torch.cat(parts, dim=1)

    def _check_widths(self, widths: list[int]) -> None:
        if widths != self._widths:
            raise ValueError(
                f"These images give {sum(widths)} features but the transformer was "
                f"fitted on images that gave {self.n_features_out_}: with "
                f"pooling={self._pooling!r} the number of features depends on the "
                "image size. Set image_size so that every image is resized alike, "
                "or use pooling='avg'."
            )

    def get_feature_names_out(self, input_features: Any = None) -> np.ndarray:
        """Feature names: ``"<layer>_<index>"`` for each tapped layer.

        Parameters
        ----------
        input_features : None
            Ignored; images have no input feature names.

        Returns
        -------
        feature_names_out : ndarray of str
            One name per output column.
        """
        check_is_fitted(self)
        self._check_params_unchanged()
        return np.asarray(
            [
                f"{name}_{i}"
                for name, width in zip(self.layers_, self._widths, strict=True)
                for i in range(width)
            ],
            dtype=object,
        )
