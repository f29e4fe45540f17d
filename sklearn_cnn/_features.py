"""CNNFeatureTransformer: a pretrained CNN's activations as sklearn features."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from sklearn.base import BaseEstimator, TransformerMixin, _fit_context
from sklearn.utils._param_validation import StrOptions
from sklearn.utils.validation import check_is_fitted

from ._base import NetworkMixin, _network_constraints, restore_on_failure
from ._images import check_images
from ._layers import POOLINGS, Tapper, pool, resolve_layers


class CNNFeatureTransformer(TransformerMixin, NetworkMixin, BaseEstimator):
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
        ``"IMAGENET1K_V1"``, a ``WeightsEnum``, None (random weights) or the path
        of a state-dict file. Enum weights are downloaded by torchvision on
        first use. For a module of your own: the path of a state-dict file, or
        None/"DEFAULT" to keep the module's weights. Files are read with
        ``torch.load(weights_only=True)``.
    layer : str, list of str or None, default=None
        Module name(s) from ``model.named_modules()``, as
        :func:`~sklearn_cnn.list_layers` shows them. None taps the input of the
        network's last ``nn.Linear`` (the pooled penultimate features); a model
        without one gives its output. Several names concatenate their features
        in the order given. Tapping an early layer stops the forward pass there.
    pooling : {"avg", "max", "avgmax", "gem", "flatten"}, default="avg"
        How a spatial map (N, C, H, W) becomes a vector: global average, max,
        the mean of the two, generalized mean (p=3), or all values flattened.
        Outputs that are already vectors are left as they are.
    image_size : int, (height, width), "native" or None, default=None
        None uses the weights' own preprocessing (torchvision: resize the shorter
        side, then centre crop); for a module of your own without metadata it
        keeps each image's size. An int or pair resizes every image to that size
        (no crop); "native" keeps the input size.
    mean, std : sequence of 3 floats or None, default=None
        Normalization; None takes the weights' metadata, else ImageNet's values.
    batch_size : int, default=64
        Images per forward pass; peak memory is bounded by it, not by the data.
        The features do not depend on it.
    device : "auto", str or torch.device, default="auto"
        "auto" runs on CUDA when available, else on the CPU.
    precision : {"auto", "fp32", "bf16", "fp16"}, default="auto"
        "auto" uses bfloat16 autocast where the hardware runs it natively (CUDA;
        CPUs with AVX512-BF16 or AMX), float32 elsewhere. "fp32" gives exact
        float32 features.
    num_workers : int, default=0
        DataLoader worker processes that decode and preprocess image files.
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
    layers_ : list of str
        The tapped layers ("penultimate" for ``layer=None``).
    n_features_out_ : int
        Number of columns ``transform`` returns.

    See Also
    --------
    FineTuneClassifier : Train the network itself on your labels.
    list_layers : The layer names a model offers, with output shapes.

    Notes
    -----
    Any ``X`` the estimators accept: uint8 or integer arrays N x H x W x C or
    N x H x W in [0, 255], float arrays in [0, 1], lists of file paths, PIL
    images or per-image arrays (sizes may differ when images are resized).
    Grey and RGBA images become RGB. ``fit`` learns nothing from ``X``: it loads
    the network and checks ``X`` and ``layer``.

    Parameters take effect at ``fit``. ``transform`` uses what fit resolved
    (the network, its taps, pooling, preprocessing, precision); after
    ``set_params`` of ``model``, ``weights``, ``layer``, ``pooling``,
    ``image_size``, ``mean``, ``std`` or ``precision`` it raises
    ``NotFittedError`` until ``fit`` runs again, rather than return the old
    setting's features. ``batch_size``, ``num_workers`` and ``verbose`` do not
    change the features and take effect at once; ``device`` at the next fit
    or load. A fit that fails leaves the transformer as it was (unfitted, or
    with its previous fit).

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
    """

    _parameter_constraints: dict = {
        **_network_constraints,
        "layer": [None, str, list, tuple],
        "pooling": [StrOptions(set(POOLINGS))],
    }
    _inference_params = (*NetworkMixin._inference_params, "layer", "pooling")

    def __init__(
        self,
        model: Any = "resnet18",
        weights: Any = "DEFAULT",
        *,
        layer: str | list[str] | None = None,
        pooling: str = "avg",
        image_size: Any = None,
        mean: Any = None,
        std: Any = None,
        batch_size: int = 64,
        device: Any = "auto",
        precision: str = "auto",
        num_workers: int = 0,
        verbose: int = 0,
    ) -> None:
        self.model = model
        self.weights = weights
        self.layer = layer
        self.pooling = pooling
        self.image_size = image_size
        self.mean = mean
        self.std = std
        self.batch_size = batch_size
        self.device = device
        self.precision = precision
        self.num_workers = num_workers
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
        X = check_images(X)
        # A fit that fails (unknown layer, bad weights) changes nothing.
        with restore_on_failure(self):
            self._build_network(X)
            self.layers_, self._taps = resolve_layers(self.layer, self.trace_)
            self._measure_widths(self._example(X))
        return self

    def _measure_widths(self, example: torch.Tensor) -> None:
        """Feature widths of each tapped layer, from one preprocessed image."""
        with torch.inference_mode(), Tapper(self.model_, self._taps) as tapper:
            widths = [pool(t, self._pooling).shape[1] for t in tapper(example)]
        self._widths = widths
        self.n_features_out_ = int(sum(widths))

    @property
    def _pooling(self) -> str:
        return self._fitted_params["pooling"]

    def _rebuild_for_load(self, example: torch.Tensor) -> None:
        """After the network is rebuilt by ``sklearn_cnn.load``: the taps."""
        _, self._taps = resolve_layers(self._fitted_params["layer"], self.trace_)

    @property
    def _n_features_out(self) -> int:
        return self.n_features_out_

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
        X = check_images(X)
        return self._run(
            X, self._taps, self._pool_all, self.n_features_out_, "transform"
        )

    def _pool_all(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        parts = [pool(t, self._pooling) for t in tensors]
        widths = [p.shape[1] for p in parts]
        if widths != self._widths:
            raise ValueError(
                f"These images give {sum(widths)} features but the transformer was "
                f"fitted on images that gave {self.n_features_out_}: with "
                f"pooling={self._pooling!r} the number of features depends on the "
                "image size. Set image_size so that every image is resized alike, "
                "or use pooling='avg'."
            )
        return torch.cat(parts, dim=1)

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

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        # Images, not a table: arrays N x H x W (x C), or lists of file paths.
        tags.input_tags.two_d_array = False
        tags.input_tags.three_d_array = True
        tags.input_tags.string = True
        tags.transformer_tags.preserves_dtype = []
        return tags
