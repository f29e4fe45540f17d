"""Find a network's layers by running it once, and tap their outputs.

Layers are named as in ``model.named_modules()``. Outputs are captured with
forward hooks (no graph tracing, so any module works), and the forward pass is
cut short once the last tapped layer has run: an early layer costs only the
compute up to it.
"""

from __future__ import annotations

import difflib
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import nn

#: ``layer=None`` taps the input of the network's last ``nn.Linear``: the
#: pooled "CNN codes" that the pretrained classifier reads.
PENULTIMATE = "penultimate"


class Layer(NamedTuple):
    """A layer that can be tapped: its name and output shape (no batch axis)."""

    name: str
    output_shape: tuple[int, ...]


@dataclass
class Trace:
    """What one forward pass of a network revealed."""

    calls: list[str]  # module names in call order, with repeats
    shapes: dict[str, tuple[int, ...]]  # first output shape of tensor outputs
    input_shapes: dict[str, tuple[int, ...]]
    types: dict[str, type]

    @property
    def counts(self) -> Counter:
        return Counter(self.calls)

    @property
    def layers(self) -> list[Layer]:
        """Modules that run exactly once and return a tensor, in forward order."""
        counts = self.counts
        return [
            Layer(name, self.shapes[name])
            for name in dict.fromkeys(self.calls)
            if counts[name] == 1 and name in self.shapes
        ]

    @property
    def head(self) -> str | None:
        """The last ``nn.Linear`` to run (once): the pretrained classifier."""
        counts = self.counts
        for name in reversed(self.calls):
            if issubclass(self.types[name], nn.Linear) and counts[name] == 1:
                return name
        return None


def trace(module: nn.Module, example: torch.Tensor) -> Trace:
    """Run ``module`` once on ``example`` and record every submodule's call."""
    calls: list[str] = []
    shapes: dict[str, tuple[int, ...]] = {}
    input_shapes: dict[str, tuple[int, ...]] = {}
    types = {name: type(m) for name, m in module.named_modules() if name}

    def make_hook(name: str):
        def hook(_m: nn.Module, args: tuple, output: Any) -> None:
            calls.append(name)
            if isinstance(output, torch.Tensor) and name not in shapes:
                shapes[name] = tuple(output.shape[1:])
            if args and isinstance(args[0], torch.Tensor) and name not in input_shapes:
                input_shapes[name] = tuple(args[0].shape[1:])

        return hook

    handles = [
        m.register_forward_hook(make_hook(name))
        for name, m in module.named_modules()
        if name
    ]
    try:
        with torch.inference_mode():
            module(example)
    finally:
        for h in handles:
            h.remove()
    return Trace(calls, shapes, input_shapes, types)


@dataclass(frozen=True)
class Tap:
    """Where to read a tensor: a module's output, or its input (``pre``)."""

    module: str
    pre: bool = False


def resolve_layers(layer: Any, tr: Trace) -> tuple[list[str], list[Tap]]:
    """Validate ``layer`` against a trace; return display names and taps."""
    if layer is None:
        head = tr.head
        if head is None:
            # No classifier to strip: the network's own output is its features.
            return [PENULTIMATE], []
        return [PENULTIMATE], [Tap(head, pre=True)]
    names = [layer] if isinstance(layer, str) else list(layer)
    if not names:
        raise ValueError("layer is an empty list: name at least one layer.")
    if len(set(names)) != len(names):
        raise ValueError(f"layer={names!r} names a layer twice.")
    return names, [Tap(_check_layer_name(name, tr)) for name in names]


def _check_layer_name(name: Any, tr: Trace) -> str:
    valid = [layer.name for layer in tr.layers]
    if not isinstance(name, str):
        raise TypeError(f"Layer names are strings; got {name!r}.")
    if name in valid:
        return name
    counts = tr.counts
    if counts[name] > 1:
        idx = [i for i, c in enumerate(tr.calls) if c == name]
        near = _neighbours(tr, idx[-1], set(valid))
        raise ValueError(
            f"Layer {name!r} runs {counts[name]} times in one forward pass (one "
            "module object used at several places), so its output is ambiguous. "
            f"Tap a layer that runs once, such as {near}."
        )
    if name in tr.types and name not in tr.shapes:
        children = [v for v in valid if v.startswith(name + ".")][:4]
        why = (
            "is never called by the forward pass"
            if counts[name] == 0
            else "does not return a tensor"
        )
        hint = (
            f" Its sublayers are: {', '.join(map(repr, children))}." if children else ""
        )
        raise ValueError(f"Layer {name!r} {why}, so it cannot be tapped.{hint}")
    matches = difflib.get_close_matches(name, valid, n=5, cutoff=0.6)
    suggestion = (
        f" Close matches: {', '.join(map(repr, matches))}."
        if matches
        else f" Valid names include: {', '.join(map(repr, valid[:10]))}"
        + (", ..." if len(valid) > 10 else ".")
    )
    raise ValueError(
        f"Unknown layer {name!r}.{suggestion} sklearn_cnn.list_layers(model) "
        "lists them all."
    )


def _neighbours(tr: Trace, position: int, valid: set[str]) -> str:
    before = next((c for c in reversed(tr.calls[:position]) if c in valid), None)
    after = next((c for c in tr.calls[position + 1 :] if c in valid), None)
    return " or ".join(repr(n) for n in (before, after) if n) or "another layer"


class _Stop(Exception):
    """Raised from a hook once every tapped tensor is in: ends the forward."""


class Tapper:
    """Hooks that collect tapped tensors; use as a context manager."""

    def __init__(self, module: nn.Module, taps: Sequence[Tap]) -> None:
        self.module = module
        self.taps = list(taps)
        self._store: dict[Tap, torch.Tensor] = {}
        self._handles: list = []

    def __enter__(self) -> Tapper:
        modules = dict(self.module.named_modules())
        for tap in self.taps:
            m = modules[tap.module]
            if tap.pre:
                self._handles.append(m.register_forward_pre_hook(self._pre(tap)))
            else:
                self._handles.append(m.register_forward_hook(self._post(tap)))
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _collect(self, tap: Tap, value: torch.Tensor) -> None:
        self._store[tap] = value
        if len(self._store) == len(self.taps):
            raise _Stop
        # The forward goes on, and in-place ops after this layer (resnet's
        # ReLU(inplace=True), ``out += identity``) would overwrite the tensor.
        self._store[tap] = value.clone()

    def _pre(self, tap: Tap):
        def hook(_m: nn.Module, args: tuple) -> None:
            self._collect(tap, args[0])

        return hook

    def _post(self, tap: Tap):
        def hook(_m: nn.Module, _args: tuple, output: torch.Tensor) -> None:
            self._collect(tap, output)

        return hook

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The tapped tensors for input ``x``, in the order of ``taps``."""
        self._store.clear()
        try:
            out = self.module(x)
        except _Stop:
            return [self._store[t] for t in self.taps]
        if not self.taps:
            return [out]
        missing = [t.module for t in self.taps if t not in self._store]
        raise RuntimeError(f"Layers {missing} did not run in the forward pass.")


POOLINGS = ("avg", "max", "avgmax", "gem", "flatten")


def pool(t: torch.Tensor, how: str, gem_p: float = 3.0) -> torch.Tensor:
    """(N, C, ...) activations -> (N, F) float32 features.

    "avgmax" is the mean of average and max pooling (timm's convention);
    "gem" is generalized-mean pooling with p=3 on activations clamped at 1e-6.
    """
    t = t.float()
    if t.ndim <= 2 or how == "flatten":
        return t.reshape(t.shape[0], -1)
    dims = tuple(range(2, t.ndim))
    if how == "avg":
        return t.mean(dims)
    if how == "max":
        return t.amax(dims)
    if how == "avgmax":
        return 0.5 * (t.mean(dims) + t.amax(dims))
    if how == "gem":
        return t.clamp(min=1e-6).pow(gem_p).mean(dims).pow(1.0 / gem_p)
    raise ValueError(f"Unknown pooling {how!r}; choose one of {POOLINGS}.")


def pooled_width(shape: tuple[int, ...], how: str) -> int:
    """Number of features ``pool`` makes of an output of ``shape`` (no batch)."""
    if len(shape) <= 1 or how == "flatten":
        n = 1
        for s in shape:
            n *= s
        return n
    return shape[0]
