"""list_layers: the names a user may pass as ``layer``."""

from __future__ import annotations

from typing import Any

import torch

from ._layers import Layer, trace
from ._models import build_model, resolve_preprocessing


def list_layers(
    model: Any, weights: Any = None, *, image_size: int | tuple[int, int] | None = None
) -> list[Layer]:
    """The layers of ``model`` that can be tapped, in forward order.

    Every module that runs exactly once in a forward pass and returns a tensor
    is listed, nested ones included (``"layer3"`` and ``"layer3.1.conv2"``), in
    the order their outputs are computed (a block after its sublayers). A module
    object reused at several places (resnet's ``layer1.0.relu``, say) is left
    out: its output would be ambiguous.

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
        Named tuples ``(name, output_shape)``, the shape without the batch axis.

    Examples
    --------
    >>> from sklearn_cnn import list_layers
    >>> [layer.name for layer in list_layers("resnet18")][4:8]
    ['layer1.0.conv1', 'layer1.0.bn1', 'layer1.0.conv2', 'layer1.0.bn2']
    >>> [layer for layer in list_layers("resnet18") if layer.name == "layer3"]
    [Layer(name='layer3', output_shape=(256, 14, 14))]
    """
    module, enum = build_model(model, weights)
    pre = resolve_preprocessing(model, enum, image_size, None, None)
    h, w = pre.output_size or (224, 224)
    return trace(module.eval(), torch.zeros(1, 3, h, w)).layers
