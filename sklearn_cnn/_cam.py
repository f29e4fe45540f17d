"""Class activation maps of a network: Grad-CAM and the exact linear CAM.

Everything here works on a network, never on an estimator (that is
:mod:`sklearn_cnn.inspection`'s part). A map is (N, h, w) float64 on the CPU,
at the layer's resolution; :func:`upsample` brings it to the input's.
"""

from __future__ import annotations

import math
import threading
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ._images import ImageDataset, Preprocessing
from ._layers import Tap, Tapper, Trace, first_tensor, layout_kind
from ._runtime import batches, uses_channels_last

#: Layouts whose outputs have positions in the image (2-D grids or tokens).
SPATIAL = ("NCHW", "NHWC", "NLD")


@dataclass
class Network:
    """What a map needs of a fitted estimator's network."""

    module: nn.Module
    preprocessing: Preprocessing
    device: torch.device
    trace: Trace


def input_batches(net: Network, X: Any, batch_size: int) -> Iterator[torch.Tensor]:
    """Preprocessed float32 batches of ``X`` on the network's device."""
    return batches(
        ImageDataset(X, net.preprocessing), batch_size=batch_size, num_workers=0,
        device=net.device, channels_last=uses_channels_last(net.module),
    )  # fmt: skip


def unnormalize(net: Network, batch: torch.Tensor) -> np.ndarray:
    """Network inputs back to (N, H, W, 3) floats in [0, 1], for display
    (bands: the grey mean of the channels, stretched to [0, 1] per image)."""
    pre = net.preprocessing
    x = batch.float()
    mean = torch.tensor(pre.mean, device=x.device).view(1, -1, 1, 1)
    std = torch.tensor(pre.std, device=x.device).view(1, -1, 1, 1)
    if mean.shape[1] in (1, x.shape[1]):
        x = x * std + mean
    if x.shape[1] != 3:
        x = x.mean(1, keepdim=True)
        low = x.amin((1, 2, 3), keepdim=True)
        high = x.amax((1, 2, 3), keepdim=True)
        x = ((x - low) / (high - low).clamp(min=1e-12)).expand(-1, 3, -1, -1)
    return x.clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()


# -- layers and layouts ---------------------------------------------------------


def _positions(shape: tuple[int, ...] | None, layout: str | None, prefix: int) -> int:
    """Number of positions in an output of ``shape`` (no batch axis)."""
    if shape is None or layout not in SPATIAL:
        return 0
    if layout == "NCHW":
        return shape[1] * shape[2]
    if layout == "NHWC":
        return shape[0] * shape[1]
    return shape[0] - prefix


def is_spatial(tr: Trace, tap: Tap) -> bool:
    """Whether ``tap`` reads a map (or tokens) with more than one position."""
    return _positions(tr.shape_of(tap), tr.layout_of(tap), tr.prefix_tokens) > 1


def default_layer(tr: Trace) -> str:
    """The layer Grad-CAM reads by default: the last whose output is a map
    with more than one position (or patch tokens). With a class token, the
    last token output *before* the last attention (the tokens after it have
    zero gradients), as pytorch-grad-cam recommends for ViTs.
    """
    layers = tr.layers
    last_attention = None
    if tr.prefix_tokens:
        for i, name in enumerate(tr.calls):
            kind = tr.types[name]
            if issubclass(kind, nn.MultiheadAttention) or "attention" in (
                kind.__name__.lower()
            ):
                last_attention = i
    first_call = tr.first_calls
    found = None
    for layer in layers:
        if not is_spatial(tr, Tap(layer.name)):
            continue
        if last_attention is not None and layer.layout == "NLD":
            # Calls are recorded as they end: the attention's own sublayers
            # (timm's ``attn.proj``) end before it, but read its output.
            attention = tr.calls[last_attention]
            inside = layer.name.startswith(attention + ".")
            if inside or first_call[layer.name] >= last_attention:
                continue
        found = layer.name
    if found is None:
        raise ValueError(
            "The network has no layer whose output is a map or patch tokens "
            "(each layer gives one vector per image), so there is nothing to "
            "place in the image."
        )
    return found


def map_before_head(tr: Trace) -> Tap | None:
    """For ``layer=None`` (the input of the last ``nn.Linear``): the last map
    before the head, which that vector may be the average of (the caller
    checks on the data)."""
    head = tr.head
    if head is None:
        return None
    end = len(tr.calls) - 1 - tr.calls[::-1].index(head)
    counts = tr.counts
    for name in reversed(tr.calls[:end]):
        if counts[name] != 1 or head.startswith(name + "."):
            continue
        if name in tr.shapes and is_spatial(tr, Tap(name)):
            return Tap(name)
        if is_spatial(tr, Tap(name, pre=True)):
            return Tap(name, pre=True)
    return None


def to_grid(
    t: torch.Tensor, layout: str, prefix: int, image_hw: tuple[int, int]
) -> torch.Tensor:
    """A tapped output as (N, C, h, w) maps: tokens lose their ``prefix`` ones
    and are laid row-major on the grid of the image's aspect ratio."""
    if layout == "NCHW":
        return t
    if layout == "NHWC":
        return t.permute(0, 3, 1, 2)
    if layout != "NLD":
        raise ValueError(f"A {layout} output has no positions in the image.")
    tokens = t[:, prefix:]
    n = tokens.shape[1]
    height, width = image_hw
    h = max(1, round(math.sqrt(n * height / width)))
    w = n // h
    if h * w != n:
        raise ValueError(
            f"{n} patch tokens do not form a grid of the input's aspect ratio "
            f"({height} x {width} px); the map cannot be placed in the image."
        )
    return tokens.reshape(len(t), h, w, -1).permute(0, 3, 1, 2)


def check_spatial(name: str, tr: Trace, tap: Tap, layout: str | None) -> None:
    """Refuse, with the fix, a layer whose output cannot be placed in the image."""
    shape = tr.shape_of(tap)
    if layout is None:
        raise ValueError(
            f"The layout of layer {name!r}'s output (shape {shape}) is unknown, "
            "so its positions cannot be placed in the image. Choose a layer "
            "that sklearn_cnn.list_layers shows with a layout."
        )
    if (
        _positions(shape, layout, tr.prefix_tokens) <= 1
        or layout_kind(layout) == "vector"
    ):
        raise ValueError(
            f"Layer {name!r} gives {layout} outputs of shape {shape}: one "
            "position per image, so no map. Choose an earlier layer whose "
            "output is a map (NCHW, NHWC) or tokens (NLD); "
            "sklearn_cnn.list_layers shows them."
        )


# -- Grad-CAM ---------------------------------------------------------------------


def grad_cam(
    net: Network,
    batch: torch.Tensor,
    layer: str,
    layout: str,
    choose: Callable[[torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """Grad-CAM (Selvaraju et al. 2017) of one batch at ``layer``, before the
    ReLU; ``choose(logits)`` gives the output index to explain for each image.

    The layer's output becomes a leaf that requires a gradient (only what
    follows is differentiated; the parameters get none), and a clone of it
    flows on (in-place operations after the layer do not change it).
    """
    module = net.module.get_submodule(layer)
    store: dict[str, torch.Tensor] = {}
    thread = threading.get_ident()

    def hook(_m: nn.Module, _args: tuple, output: Any) -> Any:
        if threading.get_ident() != thread:
            return None  # another thread's inference on the same network
        if not isinstance(output, torch.Tensor):
            raise TypeError(f"Layer {layer!r} returns a {type(output).__name__}.")
        leaf = output.detach().float().requires_grad_(True)
        store["a"] = leaf
        return leaf.clone().to(output.dtype)

    handle = module.register_forward_hook(hook)
    try:
        with torch.enable_grad():
            out = net.module(batch)
    finally:
        handle.remove()
    logits = _logits(out).float()
    index = choose(logits.detach())
    score = logits.gather(1, index.view(-1, 1).to(logits.device)).sum()
    (grad,) = torch.autograd.grad(score, store["a"])
    hw = tuple(batch.shape[-2:])
    prefix = net.trace.prefix_tokens
    a = to_grid(store["a"].detach(), layout, prefix, hw).double()
    g = to_grid(grad, layout, prefix, hw).double()
    if not g.any():  # at the positions shown (class tokens dropped)
        warnings.warn(
            f"The class scores' gradients at layer {layer!r} are zero at every "
            "position, so the maps are zero: the layer reaches the output only "
            "through positions it does not show (the tokens after a ViT's last "
            "attention reach the head only through its class token). Choose an "
            "earlier layer, or leave layer=None.",
            UserWarning,
            stacklevel=4,
        )
    weights = g.mean(dim=(2, 3), keepdim=True)  # alpha_c: pooled gradients
    return (weights * a).sum(1).cpu()


def _logits(out: Any) -> torch.Tensor:
    """A network's logits: its output, or its first tensor (aux-logit tuples)."""
    if hasattr(out, "logits") and isinstance(out.logits, torch.Tensor):
        return out.logits
    t = first_tensor(out)
    if t is None:
        raise TypeError(f"The network returned a {type(out).__name__}, not logits.")
    return t


# -- the exact CAM of a linear model on average-pooled maps ----------------------


def tapped_maps(
    net: Network, batch: torch.Tensor, taps: list[Tap]
) -> list[torch.Tensor]:
    """The float32 outputs of ``taps`` for one batch (the forward stops
    after the last of them)."""
    with torch.inference_mode(), Tapper(net.module, taps) as tapper:
        return [t.float() for t in tapper(batch)]


def linear_cam(
    maps: list[torch.Tensor],
    layouts: list[str],
    prefix: int,
    image_hw: tuple[int, int],
    weights: np.ndarray,
) -> list[torch.Tensor]:
    """``sum_c weights[c] * A_c(h, w)`` for each tapped map, before the ReLU:
    one (N, h, w) float64 map per layer; ``weights`` (N, F) holds each image's
    coefficients over the maps' pooled features (layers concatenated)."""
    w = torch.as_tensor(weights, dtype=torch.float64)
    out, start = [], 0
    for t, layout in zip(maps, layouts, strict=True):
        grid = to_grid(t, layout, prefix, image_hw).double().cpu()
        c = grid.shape[1]
        out.append(torch.einsum("nc,nchw->nhw", w[:, start : start + c], grid))
        start += c
    if start != w.shape[1]:
        raise ValueError(
            f"The tapped layers give {start} features but the linear model has "
            f"{w.shape[1]} coefficients."
        )
    return out


def upsample(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(N, h, w) maps to (N, *size), bilinearly (corners not aligned, as
    the grid cells' centres sit)."""
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    return F.interpolate(
        maps[:, None], size=size, mode="bilinear", align_corners=False
    )[:, 0]
