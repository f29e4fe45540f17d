"""Pretrained CNNs as scikit-learn estimators: features and fine-tuning.

The package in layers; a module imports only from the layers below it
(an import-linter contract in ``pyproject.toml``, checked by ``nox -s lint``):

====================  =========================================================
layer                 modules (what each owns)
====================  =========================================================
extras                ``dask`` (featurize on a cluster), ``distributed`` /
                      ``_distributed`` (fine-tuning with DDP), ``inspection``
                      (activation maps)
estimators            ``_regressor`` (FineTuneRegressor, on
                      ``_finetune.FineTuneBase``), ``_features``
                      (CNNFeatureTransformer), ``_finetune``
                      (FineTuneClassifier and the fit it shares), ``_base``
                      (what all share: building their network, the parameter
                      checks at fit), ``_tasks`` (what each kind of
                      fine-tuning decides: targets, loss, score, probe)
training              ``_sources`` (what epochs train on), ``_training`` (the
                      epochs, selection, recovery, the data-parallel hook)
storage               ``_cache`` (the activation cache on disk)
the network           ``_network`` (the fitted network; the inference loop)
parts                 ``_inspect``, ``_cam`` (class activation maps),
                      ``_inference`` (folded copy), ``_head``,
                      ``_freezing``, ``_optim``, ``_targets``, ``_folder``,
                      ``_persistence`` (the save file: format, checks, and
                      the registry estimator classes fill; ``_base`` saves
                      and rebuilds an estimator)
bottom                ``_models``, ``_runtime``, ``_bands`` (the first
                      convolution adapted to the images' bands),
                      ``_images``, ``_image_array`` (ImageArray: images
                      that folds share), ``_layers``, ``_version``
====================  =========================================================

Where each parameter takes effect:

=========================================  ====================================
parameter                                  where
=========================================  ====================================
``model``, ``weights``                     ``_models.build_model``, called by
                                           ``_network.Network.build``
``random_state``                           the estimator's ``fit`` draws every
                                           seed from it (``_models.seeded``
                                           weights, the split, the probe, the
                                           epochs' order)
``image_size``, ``mean``, ``std``          ``_models.resolve_preprocessing``;
                                           per band (and "fit") by
                                           ``_images.band_preprocessing``;
                                           applied by ``_images.Preprocessing``
``bands``, ``stem``                        ``_images`` (which channels are
                                           bands), ``_bands.adapt_stem``,
                                           called by ``_network.Network.build``
``layer``                                  ``_layers.resolve_layers`` (names
                                           to taps)
``pooling``, ``layout``                    ``_layers.pool``, through
                                           ``CNNFeatureTransformer._pool_tap``
``device``, ``precision``                  ``_network.Network`` (placed at
                                           build; autocast in ``stream``)
``batch_size``, ``num_workers``,           ``_network.Network.stream`` (the one
``compile``, ``verbose``, ``tta``          inference loop)
``memory``                                 ``_cache`` (transform:
                                           ``cached_transform``; fine-tuning:
                                           ``_sources``)
``freeze``, ``batchnorm``, ``unfreeze_at`` ``_freezing``
``head_init``, ``calibrate``               ``_head`` (head, probe, temperature)
``lr``, ``backbone_lr``, ``layer_decay``,  ``_optim`` (parameter groups,
``weight_decay``, ``optimizer``,           optimizer, schedule)
``schedule``, ``warmup_fraction``
``class_weight``, ``validation_fraction``, ``_targets``
``sample_weight`` (fit)
``epochs``, ``augment``,                   ``_training`` (epochs, selection,
``early_stopping``, ``n_iter_no_change``,  recovery); ``augment`` also decides
``label_smoothing``                        what ``_sources`` stores once
=========================================  ====================================

Process-wide state: ``_network.SHARED`` (networks that fits with ``memory=``
share), ``_inference`` (folded copies, per network), ``_layers`` (tap hubs,
per network), ``_cache._class_source`` (source digests, per class),
``_persistence`` (the estimator registry) and ``dask`` (networks on a worker);
an :class:`ImageArray` keeps its images' digests for all its views (its
images cannot change);
each states its invalidation rule where it is defined.
"""

from ._cache import cache_size, clear_cache
from ._features import CNNFeatureTransformer
from ._finetune import FineTuneClassifier
from ._folder import load_image_folder
from ._image_array import ImageArray
from ._inspect import list_layers
from ._persistence import load
from ._regressor import FineTuneRegressor
from ._version import __version__

__all__ = [
    "CNNFeatureTransformer",
    "FineTuneClassifier",
    "FineTuneRegressor",
    "ImageArray",
    "cache_size",
    "clear_cache",
    "list_layers",
    "load",
    "load_image_folder",
    "__version__",
]
