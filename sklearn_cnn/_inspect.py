"""list_layers, and the first forward pass of a network: the probe that
finds its layers, with errors that say which input size it needs."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ._layers import Layer, Trace, trace
from ._models import build_model, resolve_preprocessing
from ._runtime import uses_channels_last

# Sizes tried when a network fails on the probe image, to tell the user one
# that works: torchvision's ViTs and MaxViT need 224, inception_v3 at least 75.
_CANDIDATE_SIZES = (32, 48, 64, 75, 96, 112, 128, 160, 192, 224, 256, 299, 384, 518)
_ERRORS = (RuntimeError, ValueError, AssertionError, IndexError, TypeError)


def list_layers(
    model: Any, weights: Any = None, *, image_size: int | tuple[int, int] | None = None
) -> list[Layer]:
    """The layers of ``model`` that can be tapped, in forward order.

    Every module that runs exactly once in a forward pass and returns a tensor
    is listed, nested ones included, in the order their outputs are computed
    (a block after its sublayers); a module reused at several places is left
    out. Each layer's layout says which axis holds the channels: ``"NCHW"``,
    ``"NHWC"`` (Swin stages), ``"NLD"`` (ViT tokens), ``"NC"`` (vectors), or
    None where the network does not show it (then tap it with ``layout=`` or
    ``pooling="flatten"``).

    Parameters
    ----------
    model : str, torch.nn.Module or callable
        As for :class:`CNNFeatureTransformer`.
    weights : None, str, path or WeightsEnum, default=None
        As for :class:`CNNFeatureTransformer`; shapes do not depend on it, so
        the default loads nothing.
    image_size : int, (height, width) or None, default=None
        Input size for the probe; None takes the weights' crop size, else 224.

    Returns
    -------
    layers : list of Layer
        Named tuples ``(name, output_shape, layout)``, the shape without the
        batch axis.

    Examples
    --------
    >>> from sklearn_cnn import list_layers
    >>> [layer.name for layer in list_layers("resnet18")][4:8]
    ['layer1.0.conv1', 'layer1.0.bn1', 'layer1.0.conv2', 'layer1.0.bn2']
    >>> [layer for layer in list_layers("resnet18") if layer.name == "layer3"]
    [Layer(name='layer3', output_shape=(256, 14, 14), layout='NCHW')]
    >>> vit = list_layers("vit_b_16")
    >>> {layer.layout for layer in vit if "encoder_layer" in layer.name}
    {'NLD'}
    """
    module, enum = build_model(model, weights)
    pre = resolve_preprocessing(model, enum, image_size, None, None, module=module)
    h, w = pre.output_size or (224, 224)
    return probe_network(module.eval(), torch.zeros(1, 3, h, w)).layers


def probe_network(module: nn.Module, example: torch.Tensor) -> Trace:
    """``trace(module, example)``, with the failures a user can act on: a
    channels_last network that fails (``x.view``) goes back to the contiguous
    format; one that fails on this size but runs on another says which
    ``image_size`` to set."""
    channels_last = uses_channels_last(module) and example.ndim == 4
    if channels_last:
        example = example.contiguous(memory_format=torch.channels_last)
    try:
        return trace(module, example)
    except _ERRORS as exc:
        error = exc
    if channels_last:
        module.to(memory_format=torch.contiguous_format)
        try:
            return trace(module, example.contiguous())
        except _ERRORS:
            module.to(memory_format=torch.channels_last)
    raise _size_error(module, example, error) from error


def _runs(module: nn.Module, size: int, like: torch.Tensor) -> bool:
    x = torch.zeros(1, like.shape[1], size, size, device=like.device)
    if uses_channels_last(module):
        x = x.contiguous(memory_format=torch.channels_last)
    try:
        with torch.inference_mode():
            module(x)
    except _ERRORS:
        return False
    return True


def _size_error(module: nn.Module, example: torch.Tensor, exc: Exception) -> Exception:
    h, w = example.shape[-2:]
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    what = (
        f"{type(module).__name__} failed on a {h}x{w} input "
        f"({type(exc).__name__}: {first})"
    )
    fixed = getattr(module, "image_size", None)  # torchvision's ViTs
    cfg = getattr(module, "pretrained_cfg", None)  # timm
    if isinstance(cfg, dict) and cfg.get("fixed_input_size"):
        fixed = int(cfg["input_size"][-1])
    if isinstance(fixed, int) and (h, w) != (fixed, fixed):
        return ValueError(
            f"{what}. This model is built for {fixed}x{fixed} images only: set "
            f"image_size={fixed}."
        )
    larger = [s for s in _CANDIDATE_SIZES if s > max(h, w)]
    smaller = [s for s in reversed(_CANDIDATE_SIZES) if s < min(h, w)]
    for size in [*larger, *smaller]:
        if _runs(module, size, example):
            return ValueError(
                f"{what}. It runs on {size}x{size} images: set image_size={size}."
            )
    return RuntimeError(
        f"{what}. The network does not run on the probe image; check that it "
        "takes (N, 3, H, W) float images."
    )
