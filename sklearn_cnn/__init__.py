"""Pretrained CNNs as scikit-learn estimators: features and fine-tuning.

Where each parameter is handled (one module per concern):

=========================================  ====================================
parameter                                  module
=========================================  ====================================
``model``, ``weights``, ``random_state``   ``_models`` (build, load, seed)
``image_size``, ``mean``, ``std``          ``_models`` (resolve), ``_images``
                                           (``Preprocessing``, input checks)
``layer``, ``pooling``                     ``_layers`` (trace, taps, layouts)
``batch_size``, ``device``, ``precision``, ``_runtime`` (devices, autocast,
``num_workers``, ``compile``, ``verbose``  batches, progress), ``_base``
                                           (the inference loop)
``memory``                                 ``_cache``
``freeze``, ``batchnorm``, ``unfreeze_at`` ``_freezing``
``head_init``, ``calibrate``               ``_head`` (head, probe, temperature)
``lr``, ``backbone_lr``, ``layer_decay``,  ``_optim`` (parameter groups,
``weight_decay``, ``optimizer``,           optimizer, schedule)
``schedule``, ``warmup_fraction``
``class_weight``, ``validation_fraction``, ``_targets``
``sample_weight`` (fit)
``epochs``, ``augment``,                   ``_training`` (epochs, selection,
``early_stopping``, ``n_iter_no_change``,  frozen prefix computed once)
``label_smoothing``
``tta``                                    ``_base`` (the inference loop)
``save``/``load``                          ``_persistence``
=========================================  ====================================

The estimators themselves (``_features``, ``_finetune``) hold the parameter
constraints, ``fit`` as an orchestration of those modules, and the
prediction methods.
"""

from ._cache import cache_size, clear_cache
from ._features import CNNFeatureTransformer
from ._finetune import FineTuneClassifier
from ._folder import load_image_folder
from ._inspect import list_layers
from ._persistence import load
from ._version import __version__

__all__ = [
    "CNNFeatureTransformer",
    "FineTuneClassifier",
    "cache_size",
    "clear_cache",
    "list_layers",
    "load",
    "load_image_folder",
    "__version__",
]
