"""Pretrained CNNs as scikit-learn estimators: features and fine-tuning."""

from ._cache import cache_size, clear_cache
from ._features import CNNFeatureTransformer
from ._finetune import FineTuneClassifier
from ._folder import load_image_folder
from ._inspect import list_layers
from ._persistence import load

__version__ = "0.1.0"

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
