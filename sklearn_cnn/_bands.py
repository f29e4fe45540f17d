"""A pretrained network's first convolution, adapted to images of any number
of bands: :func:`adapt_stem` gives it one input channel per band, in place, by
the rule ``stem`` names (``CNNFeatureTransformer``'s parameter). "repeat" is
timm's ``adapt_input_conv`` (and torchgeo's rule): bands that repeat an RGB
image k times give the RGB image's output exactly.

The first convolution is the first ``nn.Conv2d`` that runs in a forward pass,
or a timm model's ``pretrained_cfg["first_conv"]``; it must read the image.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

#: The rules of the ``stem`` parameter.
STEM_RULES = ("repeat", "mean", "random")


class _Found(Exception):
    """Stops the forward pass at the first convolution."""


def first_conv(module: nn.Module, example: torch.Tensor) -> tuple[str, nn.Conv2d]:
    """The name and module of the first convolution ``module`` runs on
    ``example`` (an RGB batch), checked to read the image itself."""
    cfg = getattr(module, "pretrained_cfg", None)
    named = dict(module.named_modules())
    if isinstance(cfg, dict) and cfg.get("first_conv"):
        # timm names its stem (the convolution its in_chans adapts).
        first = cfg["first_conv"]
        name = first if isinstance(first, str) else first[0]
        for candidate in (name, f"{name}.conv", f"{name}.0"):
            if isinstance(named.get(candidate), nn.Conv2d):
                return candidate, named[candidate]
    names = {m: n for n, m in module.named_modules()}
    seen: list[tuple[str, torch.Size]] = []

    def hook(conv: nn.Module, args: tuple) -> None:
        seen.append((names[conv], args[0].shape if args else torch.Size()))
        raise _Found

    handles = [
        m.register_forward_pre_hook(hook)
        for m in module.modules()
        if isinstance(m, nn.Conv2d)
    ]
    try:
        with torch.no_grad():
            module(example)
    except _Found:
        pass
    except Exception as exc:  # noqa: BLE001 - reported with what was expected
        raise ValueError(
            f"Cannot adapt {type(module).__name__} to other than 3 channels: a "
            f"forward pass on an RGB image failed before any convolution "
            f"({type(exc).__name__}: {exc})."
        ) from None
    finally:
        for h in handles:
            h.remove()
    if not seen:
        raise ValueError(
            f"Cannot adapt {type(module).__name__} to other than 3 channels: no "
            "torch.nn.Conv2d runs in its forward pass, so there is no first "
            "convolution to give one input channel per band. Pass RGB images, "
            "or a model whose stem is a Conv2d."
        )
    name, shape = seen[0]
    conv = named[name]
    if (
        conv.in_channels != 3
        or conv.groups != 1
        or tuple(shape[1:]) != tuple(example.shape[1:])
    ):
        raise ValueError(
            f"Cannot adapt {type(module).__name__} to other than 3 channels: its "
            f"first convolution {name!r} ({conv}) does not read the RGB image "
            f"itself (it reads a tensor of shape {tuple(shape)}; the image is "
            f"{tuple(example.shape)}). A model that transforms the image before "
            "its first convolution cannot be adapted: pass RGB images."
        )
    return name, conv


def adapted_weight(weight: torch.Tensor, bands: int, rule: str) -> torch.Tensor:
    """The first convolution's RGB ``weight`` (O, 3, kh, kw) for ``bands``
    input channels by ``rule`` (see ``CNNFeatureTransformer``'s ``stem``)."""
    w = weight.detach().float()
    if rule == "repeat":
        if bands == 1:
            out = w.sum(1, keepdim=True)
        else:
            out = w.repeat(1, math.ceil(bands / 3), 1, 1)[:, :bands] * (3.0 / bands)
    elif rule == "mean":
        out = w.mean(1, keepdim=True).repeat(1, bands, 1, 1) * (3.0 / bands)
    else:  # "random" (the constraints checked the rule): Conv2d's own draw
        out = torch.empty(w.shape[0], bands, *w.shape[2:])
        nn.init.kaiming_uniform_(out, a=math.sqrt(5))
    return out.to(weight.dtype)


def adapt_stem(
    module: nn.Module, bands: int, rule: str, example: torch.Tensor
) -> dict[str, Any]:
    """Give ``module``'s first convolution ``bands`` input channels by
    ``rule``, in place (``example``: an RGB batch of the image size); return
    what was done (the estimators' ``stem_``)."""
    name, conv = first_conv(module, example)
    if rule == "repeat" and isinstance(getattr(module, "pretrained_cfg", None), dict):
        # A timm model: timm's own rule, as its in_chans applies it.
        from timm.models import adapt_input_conv

        try:
            weight = adapt_input_conv(bands, conv.weight.detach().clone())
        except NotImplementedError as exc:
            raise ValueError(
                f"Cannot adapt the first convolution {name!r} of this timm "
                f"model to {bands} bands: {exc}"
            ) from None
    elif conv.in_channels != 3:
        raise ValueError(
            f"Cannot adapt the first convolution {name!r} ({conv}) to {bands} "
            "bands: it does not take 3 channels. Pass RGB images."
        )
    else:
        weight = adapted_weight(conv.weight, bands, rule)
    with torch.no_grad():
        conv.weight = nn.Parameter(
            weight.to(conv.weight.device), requires_grad=conv.weight.requires_grad
        )
    conv.in_channels = bands
    return {"layer": name, "bands": bands, "rule": rule}
