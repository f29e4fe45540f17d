"""Find a network's layers by running it once, and tap their outputs.

Layers are named as in ``model.named_modules()`` and tapped with forward hooks
(any module works); the forward stops once the last tapped layer has run.

The trace also works out each output's *layout* (which axis holds the
channels: ``"NCHW"``, ``"NHWC"``, ``"NLD"`` tokens or ``"NC"`` vectors) by
following the tensors: modules of known kinds fix it (``Conv2d``: first;
``Linear``, ``LayerNorm``: last; ``Permute``: permuted), shape-keeping modules
keep it, consumers tell it backwards. What stays unknown is reported, never
guessed.
"""

from __future__ import annotations

import difflib
import functools
import threading
import weakref
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from copy import deepcopy
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import nn

#: ``layer=None`` taps the input of the network's last ``nn.Linear``: the
#: pooled "CNN codes" that the pretrained classifier reads.
PENULTIMATE = "penultimate"

# Layout names by number of axes (batch included), channels first or last.
_FIRST = {3: "NCL", 4: "NCHW", 5: "NCDHW"}
_LAST = {3: "NLD", 4: "NHWC", 5: "NDHWC"}
LAYOUTS = ("NC", *_FIRST.values(), *_LAST.values())


def layout_name(kind: str | None, ndim: int) -> str | None:
    """``kind`` ("first", "last" or "vector") of an ``ndim``-axis tensor."""
    if ndim <= 2:
        return "NC"
    if kind == "first":
        return _FIRST.get(ndim)
    if kind == "last":
        return _LAST.get(ndim)
    return None


def layout_kind(name: str) -> str:
    """The inverse of ``layout_name``: "vector", "first" or "last"."""
    if name == "NC":
        return "vector"
    return "first" if name in _FIRST.values() else "last"


class Layer(NamedTuple):
    """A layer that can be tapped: its name, output shape (no batch axis) and
    layout (``"NCHW"``, ``"NHWC"``, ``"NLD"``, ``"NC"``..., None if unknown)."""

    name: str
    output_shape: tuple[int, ...]
    layout: str | None = None


@dataclass
class _Call:
    """One module call seen by the trace."""

    name: str
    module: nn.Module
    in_key: int | None
    out_key: int | None
    in_shape: tuple[int, ...] | None  # without the batch axis
    out_shape: tuple[int, ...] | None
    tensor_out: bool = True  # returns a tensor (not a tuple): can be tapped


@dataclass
class Trace:
    """What one forward pass of a network revealed."""

    calls: list[str]  # module names in call order, with repeats
    shapes: dict[str, tuple[int, ...]]  # first output shape of tensor outputs
    input_shapes: dict[str, tuple[int, ...]]
    types: dict[str, type]
    layouts: dict[str, str | None] = field(default_factory=dict)
    input_layouts: dict[str, str | None] = field(default_factory=dict)
    output_shape: tuple[int, ...] | None = None  # the network's own output
    output_layout: str | None = None
    prefix_tokens: int = 0  # class (and register) tokens before the patches

    @property
    def counts(self) -> Counter:
        return Counter(self.calls)

    @property
    def first_calls(self) -> dict[str, int]:
        """Module name -> position of its first (completed) call."""
        first: dict[str, int] = {}
        for i, name in enumerate(self.calls):
            first.setdefault(name, i)
        return first

    @property
    def layers(self) -> list[Layer]:
        """Modules that run exactly once and return a tensor, in forward order."""
        counts = self.counts
        return [
            Layer(name, self.shapes[name], self.layouts.get(name))
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

    def layout_of(self, tap: Tap) -> str | None:
        """The layout of the tensor ``tap`` reads."""
        if not tap.module:
            return self.output_layout
        return (self.input_layouts if tap.pre else self.layouts).get(tap.module)

    def shape_of(self, tap: Tap) -> tuple[int, ...] | None:
        if not tap.module:
            return self.output_shape
        return (self.input_shapes if tap.pre else self.shapes).get(tap.module)


def first_tensor(output: Any) -> torch.Tensor | None:
    """A module's output, or the first tensor of a tuple, list or dict output."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping):
        output = list(output.values())
    if isinstance(output, (tuple, list)):
        return next((o for o in output if isinstance(o, torch.Tensor)), None)
    return None


def network_output(output: Any) -> torch.Tensor:
    """The features of a network's own output (``layer=None`` without a head)."""
    tensor = first_tensor(output)
    if tensor is None:
        raise TypeError(
            f"The model returned a {type(output).__name__}, which holds no tensor. "
            "Its forward must return a tensor, or a tuple, list or dict whose "
            "first tensor holds the features; or name a layer to tap."
        )
    return tensor


class _TensorIds:
    """Keys for tensors during one forward pass, by identity (weak references:
    a recycled ``id`` is not confused, and no activation is held)."""

    def __init__(self) -> None:
        self._refs: dict[int, tuple[weakref.ref, int]] = {}
        self._count = 0

    def key(self, t: Any) -> int | None:
        if not isinstance(t, torch.Tensor):
            return None
        entry = self._refs.get(id(t))
        if entry is not None and entry[0]() is t:
            return entry[1]
        self._count += 1
        self._refs[id(t)] = (weakref.ref(t), self._count)
        return self._count


def trace(module: nn.Module, example: torch.Tensor) -> Trace:
    """Run ``module`` once on ``example`` and record every submodule's call."""
    calls: list[_Call] = []
    ids = _TensorIds()
    input_key = ids.key(example)
    types = {name: type(m) for name, m in module.named_modules() if name}

    def make_hook(name: str):
        def hook(m: nn.Module, args: tuple, output: Any) -> None:
            x = args[0] if args and isinstance(args[0], torch.Tensor) else None
            # A tuple's first tensor has a layout, though it cannot be tapped.
            y = first_tensor(output)
            calls.append(
                _Call(
                    name,
                    m,
                    ids.key(x),
                    ids.key(y),
                    None if x is None else tuple(x.shape[1:]),
                    None if y is None else tuple(y.shape[1:]),
                    isinstance(output, torch.Tensor) or not name,
                )
            )

        return hook

    handles = [m.register_forward_hook(make_hook(n)) for n, m in module.named_modules()]
    try:
        with torch.inference_mode():
            module(example)
    finally:
        for h in handles:
            h.remove()
    root = calls.pop() if calls and calls[-1].name == "" else None
    kinds = _solve_layouts(calls, root, input_key, len(example.shape))
    tr = Trace([c.name for c in calls], {}, {}, types, prefix_tokens=_prefix(module))
    for c in calls:
        if c.tensor_out and c.out_shape is not None and c.name not in tr.shapes:
            tr.shapes[c.name] = c.out_shape
            tr.layouts[c.name] = layout_name(kinds.get(c.out_key), len(c.out_shape) + 1)
        if c.in_shape is not None and c.name not in tr.input_shapes:
            tr.input_shapes[c.name] = c.in_shape
            ndim = len(c.in_shape) + 1
            tr.input_layouts[c.name] = layout_name(kinds.get(c.in_key), ndim)
    if root is not None and root.out_shape is not None:
        tr.output_shape = root.out_shape
        tr.output_layout = layout_name(kinds.get(root.out_key), len(root.out_shape) + 1)
    return tr


def _prefix(module: nn.Module) -> int:
    """Tokens before the patch tokens: timm's ``num_prefix_tokens``,
    torchvision's ViT ``class_token``."""
    n = getattr(module, "num_prefix_tokens", None)
    if isinstance(n, int):
        return n
    if isinstance(getattr(module, "class_token", None), torch.Tensor):
        return 1
    return 0


# -- layouts -----------------------------------------------------------------

_CHANNELS_FIRST = (
    nn.modules.conv._ConvNd,
    nn.modules.batchnorm._BatchNorm,
    nn.modules.instancenorm._InstanceNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
    nn.modules.pooling._MaxPoolNd,
    nn.modules.pooling._AvgPoolNd,
    nn.modules.pooling._AdaptiveAvgPoolNd,
    nn.modules.pooling._AdaptiveMaxPoolNd,
    nn.modules.pooling._LPPoolNd,
    nn.Dropout1d,  # whole channels dropped (not nn.Dropout: any layout)
    nn.Dropout2d,
    nn.Dropout3d,
    nn.Upsample,
    nn.PixelShuffle,
)


# Modules that change the layout: (qualified class name) -> (input, output).
_CONVERTERS = {
    "torchvision.models.maxvit.WindowPartition": ("first", "last"),
    "torchvision.models.maxvit.WindowDepartition": ("last", "first"),
}


def _converter(m: nn.Module) -> tuple[str, str] | None:
    return _CONVERTERS.get(f"{type(m).__module__}.{type(m).__qualname__}")


def _expects(m: nn.Module, shape: tuple[int, ...] | None) -> str | None:
    """The layout a module of a known kind reads and writes, if any."""
    if shape is None or len(shape) < 2:
        return None
    if isinstance(m, nn.MultiheadAttention):
        return "last" if m.batch_first else None
    if isinstance(m, nn.LayerNorm):
        # LayerNorm2d (torchvision's ConvNeXt, timm) normalizes channels first.
        if "2d" in type(m).__name__.lower():
            return "first"
        norm = tuple(m.normalized_shape)
        return "last" if len(norm) == 1 and norm[0] == shape[-1] else None
    if isinstance(m, nn.Linear):
        return "last" if shape[-1] == m.out_features else None
    if isinstance(m, _CHANNELS_FIRST):
        return "first"
    return None


def _axis_map(m: nn.Module, ndim: int) -> list[int] | None:
    """For a pure axis permutation (torchvision's ``Permute``, MaxViT's
    ``SwapAxes``): output axis i is input axis perm[i]."""
    dims = getattr(m, "dims", None)
    if type(m).__name__ == "Permute" and isinstance(dims, (list, tuple)):
        return list(dims) if len(dims) == ndim else None
    a, b = getattr(m, "a", None), getattr(m, "b", None)
    if "swap" in type(m).__name__.lower() and isinstance(a, int) and isinstance(b, int):
        perm = list(range(ndim))
        a, b = a % ndim, b % ndim
        perm[a], perm[b] = perm[b], perm[a]
        return perm
    return None


def _channel_axis(kind: str, ndim: int) -> int:
    return 1 if kind == "first" else ndim - 1


def _kind_at(axis: int, ndim: int) -> str | None:
    return "first" if axis == 1 else "last" if axis == ndim - 1 else None


def _spatial(shape: tuple[int, ...], kind: str) -> tuple[int, ...]:
    return shape[1:] if kind == "first" else shape[:-1]


def _solve_layouts(
    calls: list[_Call], root: _Call | None, input_key: int | None, input_ndim: int
) -> dict[int, str]:
    """Tensor key -> "first", "last" or "vector", by propagating known layouts
    forward (producer to output) and backward (consumer to input) until
    nothing changes."""
    kinds: dict[int, str] = {}
    if input_key is not None:
        kinds[input_key] = "first" if input_ndim > 2 else "vector"
    everything = [*calls, *([root] if root else [])]
    for c in everything:
        if c.out_key is not None and c.out_shape is not None and len(c.out_shape) <= 1:
            kinds.setdefault(c.out_key, "vector")
    changed = True
    while changed:
        changed = False
        for i, c in enumerate(everything):
            if c.out_key is not None and c.out_key not in kinds:
                kind = _forward_kind(c, kinds, everything[:i])
                if kind is not None:
                    kinds[c.out_key] = kind
                    changed = True
            if c.in_key is not None and c.in_key not in kinds:
                kind = _backward_kind(c, kinds)
                if kind is not None:
                    kinds[c.in_key] = kind
                    changed = True
    return kinds


def _forward_kind(c: _Call, kinds: dict[int, str], before: list[_Call]) -> str | None:
    if c.out_shape is None:
        return None
    ndim = len(c.out_shape) + 1
    converter = _converter(c.module)
    if converter is not None:
        return converter[1]
    known = _expects(c.module, c.out_shape)
    if known is not None:
        return known
    in_kind = kinds.get(c.in_key)  # None for a key of no tensor
    perm = _axis_map(c.module, ndim)
    if perm is not None:
        if in_kind in ("first", "last"):
            return _kind_at(perm.index(_channel_axis(in_kind, ndim)), ndim)
        return None
    if in_kind is not None and c.in_shape == c.out_shape:
        return in_kind
    # A block that combines its sublayers' outputs: their layout, if they all
    # agree and one has the same spatial size.
    prefix = c.name + "." if c.name else ""
    found = set()
    for d in before:
        if not d.name.startswith(prefix) or d.out_shape is None:
            continue
        kind = kinds.get(d.out_key)
        if kind in ("first", "last") and len(d.out_shape) == len(c.out_shape):
            found.add(
                (kind, _spatial(d.out_shape, kind) == _spatial(c.out_shape, kind))
            )
    if len({k for k, _ in found}) == 1 and any(same for _, same in found):
        return found.pop()[0]
    return None


def _backward_kind(c: _Call, kinds: dict[int, str]) -> str | None:
    if c.in_shape is None:
        return None
    ndim = len(c.in_shape) + 1
    if ndim <= 2:
        return "vector"
    converter = _converter(c.module)
    if converter is not None:
        return converter[0]
    if isinstance(c.module, nn.Linear):
        return "last" if c.in_shape[-1] == c.module.in_features else None
    known = _expects(c.module, c.in_shape)
    if known is not None:
        return known
    out_kind = kinds.get(c.out_key)
    perm = _axis_map(c.module, ndim)
    if perm is not None:
        if out_kind in ("first", "last"):
            return _kind_at(perm[_channel_axis(out_kind, ndim)], ndim)
        return None
    if out_kind is not None and c.in_shape == c.out_shape:
        return out_kind
    return None


# -- choosing layers -----------------------------------------------------------


@dataclass(frozen=True)
class Tap:
    """Where to read a tensor: a module's output, or its input (``pre``); the
    empty name is the network's own output."""

    module: str
    pre: bool = False


def resolve_layers(layer: Any, tr: Trace) -> tuple[list[str], list[Tap]]:
    """Validate ``layer`` against a trace; return display names and taps."""
    if layer is None:  # the classifier's input, else the network's output
        taps = [] if tr.head is None else [Tap(tr.head, pre=True)]
        return [PENULTIMATE], taps
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


# -- tapping ---------------------------------------------------------------------


class _Stop(BaseException):
    """Ends the forward once every tapped tensor is in (in eval mode only); a
    BaseException, so that a forward catching ``Exception`` cannot swallow it."""


class _Hub:
    """The tap hooks of one module, shared by every call in flight: registered
    for the first call, removed after the last; each hook hands its tensor to
    the call of its own thread."""

    def __init__(self) -> None:
        self.local = threading.local()
        self.hooks: dict[Tap, list] = {}  # tap -> [handle, number of users]

    def current(self) -> _TapCall | None:
        stack = getattr(self.local, "stack", None)
        return stack[-1] if stack else None

    def make_hook(self, tap: Tap):
        def deliver(value: Any) -> None:
            call = self.current()
            if call is not None and tap in call.wanted:
                call.collect(tap, value)

        if tap.pre:
            hook = lambda _m, args: deliver(args[0])  # noqa: E731
        else:
            hook = lambda m, args, output: deliver(tapped_output(m, args, output))  # noqa: E731
        hook.sklearn_cnn_tap = True  # see is_tap_hook
        return hook


def tapped_output(m: nn.Module, args: tuple, output: Any) -> Any:
    """What a tap of ``m``'s output reads: the output, unless ``m`` says
    otherwise (a convolution with a folded BatchNorm, see ``_inference``)."""
    read = m.__dict__.get("sklearn_cnn_tapped_output")
    return output if read is None else read(args, output)


def is_tap_hook(fn: Any) -> bool:
    """Whether ``fn`` is a tap hook of this library, not the network's own."""
    return getattr(fn, "sklearn_cnn_tap", False)


def drop_tap_hooks(module: nn.Module) -> None:
    """Remove from ``module`` (a copy) the tap hooks of calls in flight: they
    would feed the original's taps, and do not pickle."""
    for m in module.modules():
        for hooks in (m._forward_hooks, m._forward_pre_hooks):
            for key, hook in list(hooks.items()):
                if is_tap_hook(hook):
                    del hooks[key]
                    m._forward_hooks_with_kwargs.pop(key, None)
                    m._forward_hooks_always_called.pop(key, None)
                    m._forward_pre_hooks_with_kwargs.pop(key, None)


def without_tap_hooks(module: nn.Module) -> nn.Module:
    """``module`` itself, or a copy without the tap hooks of calls in flight
    in other threads: what pickling takes."""
    tapped = any(
        is_tap_hook(h)
        for m in module.modules()
        for hooks in (m._forward_hooks, m._forward_pre_hooks)
        for h in list(hooks.values())
    )
    if not tapped:
        return module
    copy = deepcopy(module)
    drop_tap_hooks(copy)
    return copy


#: One hub of tap hooks per network, shared by the threads that tap it.
#: Invalidation: dropped with the network (weak keys); holds no results.
_HUBS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_HUBS_LOCK = threading.Lock()


class _TapCall:
    """The taps and tensors of one call of a Tapper."""

    def __init__(self, taps: Sequence[Tap]) -> None:
        self.taps = list(taps)
        self.wanted = set(self.taps)
        self.store: dict[Tap, torch.Tensor] = {}
        self.stop = True  # end the forward once every tap is in

    def collect(self, tap: Tap, value: torch.Tensor) -> None:
        self.store[tap] = value
        if self.stop and len(self.store) == len(self.wanted):
            raise _Stop
        self.store[tap] = value.clone()  # in-place ops later would change it


class Tapper:
    """Hooks that collect tapped tensors; use as a context manager.

    Thread-safe: each thread that enters a Tapper on one module sees only its
    own tensors. An empty ``taps`` returns the network's output. In eval mode
    the forward ends at the last tap (``_Stop``); in training mode it runs to
    its end, so that it updates the module (BatchNorm statistics, dropout's
    draws) as ``module(x)`` would.
    """

    def __init__(self, module: nn.Module, taps: Sequence[Tap]) -> None:
        self.module = module
        self.taps = list(taps)
        self._hub: _Hub | None = None
        self._call = _TapCall(self.taps)

    def __enter__(self) -> Tapper:
        modules = dict(self.module.named_modules())
        with _HUBS_LOCK:
            hub = _HUBS.get(self.module)
            if hub is None:
                hub = _HUBS[self.module] = _Hub()
            for tap in self.taps:
                entry = hub.hooks.get(tap)
                if entry is None:
                    m = modules[tap.module]
                    hook = hub.make_hook(tap)
                    handle = (
                        m.register_forward_pre_hook(hook)
                        if tap.pre
                        else m.register_forward_hook(hook)
                    )
                    entry = hub.hooks[tap] = [handle, 0]
                entry[1] += 1
        self._hub = hub
        hub.local.__dict__.setdefault("stack", []).append(self._call)
        return self

    def __exit__(self, *exc: object) -> None:
        hub, self._hub = self._hub, None
        if hub is None:
            return
        hub.local.stack.remove(self._call)
        with _HUBS_LOCK:
            for tap in self.taps:
                entry = hub.hooks[tap]
                entry[1] -= 1
                if entry[1] == 0:
                    entry[0].remove()
                    del hub.hooks[tap]

    def __call__(self, x: torch.Tensor) -> list[Any]:
        """The tapped tensors for input ``x``, in the order of ``taps``."""
        call = self._call
        call.store.clear()
        call.stop = not any(m.training for m in self.module.modules())
        try:
            out = self.module(x)
        except _Stop:
            return [call.store[t] for t in self.taps]
        if not self.taps:
            return [out]
        missing = [t.module for t in self.taps if t not in call.store]
        if missing:
            raise RuntimeError(f"Layers {missing} did not run in the forward pass.")
        return [call.store[t] for t in self.taps]


# -- pooling -----------------------------------------------------------------------

POOLINGS = ("avg", "max", "avgmax", "gem", "cls", "flatten")
#: Values per chunk that ``pool`` converts to float32 at once (4 MiB).
POOL_CHUNK = 2**20


def pool(
    t: torch.Tensor,
    how: str,
    layout: str | None = "NCHW",
    prefix_tokens: int = 0,
    gem_p: float = 3.0,
) -> torch.Tensor:
    """(N, ...) activations of ``layout`` -> (N, F) float32 features.

    Maps are reduced over their spatial axes, tokens (``"NLD"``) over the
    patch tokens after ``prefix_tokens`` ("cls": the first token). "avgmax" is
    timm's mean of average and max; "gem" is generalized-mean pooling (p=3,
    clamped at 1e-6). ``layout`` is needed except for vectors and "flatten".
    """
    rows = max(1, POOL_CHUNK // max(1, t[0].numel())) if len(t) else 1
    if t.ndim > 2 and how != "flatten" and len(t) > rows:
        # A few images at a time: a whole batch's float32 copy costs more.
        parts = [pool(c, how, layout, prefix_tokens, gem_p) for c in t.split(rows)]
        return torch.cat(parts)
    t = t.float()
    if t.ndim <= 2 or how == "flatten":
        return t.reshape(t.shape[0], -1)
    if layout is None:
        raise ValueError("The layout of this output is unknown; see check_pooling.")
    if layout_kind(layout) == "last":
        t = t.movedim(-1, 1)  # (N, C, ...)
    if layout == "NLD":
        if how == "cls":
            return t[:, :, 0]
        t = t[:, :, prefix_tokens:]
    elif how == "cls":
        raise ValueError(f"pooling='cls' needs tokens (NLD), not {layout}.")
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


def check_pooling(
    name: str, shape: tuple[int, ...], layout: str | None, how: str, prefix_tokens: int
) -> None:
    """Refuse, with the fix, a pooling that cannot be done right on ``name``."""
    if len(shape) <= 1 or how == "flatten":
        if how == "cls" and len(shape) <= 1:
            raise ValueError(
                f"pooling='cls' takes the class token of a token output (N, L, D), "
                f"but layer {name!r} gives vectors of {shape[0] if shape else 1}. "
                "Use pooling='avg', or tap an encoder layer."
            )
        return
    if layout is None:
        raise ValueError(
            f"Cannot tell which axis of layer {name!r}'s output (shape "
            f"{tuple(shape)}, batch axis left out) holds the channels. Declare it "
            "with layout='NCHW' (channels first), 'NHWC' (channels last) or 'NLD' "
            f"(tokens), or per layer with layout={{{name!r}: ...}}; or use "
            "pooling='flatten'."
        )
    if len(layout) != len(shape) + 1:
        raise ValueError(
            f"layout={layout!r} has {len(layout)} axes but layer {name!r}'s output "
            f"has {len(shape) + 1} (shape {(None, *shape)})."
        )
    if how == "cls":
        if layout != "NLD":
            raise ValueError(
                f"pooling='cls' takes the class token of a token output (NLD), but "
                f"layer {name!r} gives a {layout} map. Use pooling='avg'."
            )
        if prefix_tokens == 0:
            raise ValueError(
                f"pooling='cls' but the model has no class token before layer "
                f"{name!r}'s tokens. Use pooling='avg' (the mean of the tokens)."
            )


class PooledTapper:
    """Hooks that pool each tapped tensor in its hook, as it is computed (the
    forward runs to its end, nothing is cloned). A tap that ``pool_fn``
    refuses is left out; hooks act only on the thread that entered."""

    def __init__(
        self,
        module: nn.Module,
        taps: Sequence[Tap],
        pool_fn: Callable[[Tap, Any], torch.Tensor],
    ) -> None:
        self.module, self.taps, self.pool_fn = module, list(taps), pool_fn
        self._rows: dict[Tap, torch.Tensor] = {}
        self._handles: list = []
        self._thread = threading.get_ident()

    def __enter__(self) -> PooledTapper:
        self._thread = threading.get_ident()
        modules = dict(self.module.named_modules())
        for tap in self.taps:
            m = modules[tap.module]
            hook = functools.partial(self._pre if tap.pre else self._post, tap)
            hook.sklearn_cnn_tap = True  # see is_tap_hook
            register = (
                m.register_forward_pre_hook if tap.pre else m.register_forward_hook
            )
            self._handles.append(register(hook))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _keep(self, tap: Tap, value: Any) -> None:
        if threading.get_ident() != self._thread:
            return
        try:
            self._rows[tap] = self.pool_fn(tap, value)
        except (ValueError, TypeError, AttributeError, RuntimeError):
            self._rows.pop(tap, None)  # not poolable: not stored

    def _pre(self, tap: Tap, _m: nn.Module, args: tuple) -> None:
        self._keep(tap, args[0] if args else None)

    def _post(self, tap: Tap, m: nn.Module, args: tuple, output: Any) -> None:
        self._keep(tap, tapped_output(m, args, output))

    def __call__(self, x: torch.Tensor) -> dict[Tap, torch.Tensor]:
        """The pooled rows of every tap that ran, for input ``x``."""
        self._rows = {}
        self.module(x)
        return self._rows
