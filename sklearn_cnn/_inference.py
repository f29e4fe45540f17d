"""The network inference runs: a private copy of the fitted one with each
BatchNorm folded into the convolution before it, and the convolution and
linear weights stored in the autocast dtype (what ``torch.compile``'s
``freezing`` does, without the compile). A network with nothing to fold runs
as fitted, without a copy (the casts alone gain too little).

Pairs are found in one pass of the first image (a BatchNorm whose input was a
convolution's output that nothing else read), and each rewrite is checked on
a made-up input: one that changes the layer's output beyond float tolerance is
not made. A tap of a folded convolution's output reads the fitted convolution
run on the same input. The copy is made anew whenever the fitted network's
modules, tensors or hooks change.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval
from torch.overrides import TorchFunctionMode

from ._layers import Tap, drop_tap_hooks, is_tap_hook
from ._runtime import autocast, uses_channels_last

#: The copies made so far, one per network, device and autocast dtype.
#: Invalidation: dropped with the network (weak keys); made anew when the
#: network's snapshot (modules, tensors and their versions, hooks) changes.
_COPIES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()


class _Readers(TorchFunctionMode):
    """Counts the torch operations that read each watched tensor, outside
    BatchNorms' own forwards (a mode is per thread, unlike ``torch.fx``)."""

    def __init__(self) -> None:
        super().__init__()
        self.watched: dict[int, str] = {}  # id(tensor) -> convolution
        self.reads: dict[str, int] = {}
        self.in_bn = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if not self.in_bn:
            for t in torch.utils._pytree.tree_leaves((args, kwargs or {})):
                name = self.watched.get(id(t)) if isinstance(t, torch.Tensor) else None
                if name is not None:
                    self.reads[name] += 1
        return func(*args, **(kwargs or {}))


def foldable_pairs(module: nn.Module, example: torch.Tensor) -> list[tuple[str, str]]:
    """``(convolution, BatchNorm)`` names where, in a forward pass of
    ``example``, the BatchNorm's input was the convolution's output and
    nothing else read it; each module ran once. None where the pass fails.
    """
    modules = dict(module.named_modules())
    readers, outs, inputs = _Readers(), {}, {}
    calls: dict[str, int] = {}

    def conv_out(name: str, _m: nn.Module, _args: tuple, out: Any) -> None:
        calls[name] = calls.get(name, 0) + 1
        outs[name] = out  # kept alive: its id stays its own
        readers.watched[id(out)] = name
        readers.reads[name] = 0

    def bn_in(name: str, _m: nn.Module, args: tuple) -> None:
        calls[name] = calls.get(name, 0) + 1
        inputs[name] = args[0] if args else None
        readers.in_bn += 1

    def bn_out(*_: Any) -> None:
        readers.in_bn -= 1

    with _hooks_off(module):  # the user's hooks are not for this pass
        for name, m in modules.items():
            if isinstance(m, nn.Conv2d):
                m.register_forward_hook(functools.partial(conv_out, name))
            elif _is_plain_bn(m):
                m.register_forward_pre_hook(functools.partial(bn_in, name))
                m.register_forward_hook(bn_out)
        try:
            with torch.inference_mode(), readers:
                out = module(example)
        except Exception:  # noqa: BLE001 - a network that fails here: no fold
            return []
    returned = {id(t) for t in torch.utils._pytree.tree_leaves(out)}
    by_id = {id(t): name for name, t in outs.items()}
    pairs = []
    for bn, x in inputs.items():
        conv = by_id.get(id(x))
        if (
            conv is None
            or calls[conv] != 1
            or calls[bn] != 1
            or readers.reads[conv] != 0
            or id(x) in returned
            or modules[conv].out_channels != modules[bn].num_features
            or any(next(_user_hooks(modules[n]), None) is not None for n in (conv, bn))
        ):
            continue  # read elsewhere, or seen by a hook of the user's
        pairs.append((conv, bn))
    return pairs


def _is_plain_bn(m: Any) -> bool:
    """A BatchNorm2d whose forward is torch's own (not one with an activation
    built in) and that normalises with running statistics in eval mode."""
    return (
        isinstance(m, nn.BatchNorm2d)
        and type(m).forward is nn.BatchNorm2d.forward
        and m.track_running_stats
        and m.running_mean is not None
    )


def _fold(net: nn.Module, pairs: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    """Fold each pair in ``net`` whose folded convolution gives what the pair
    gave, on a made-up input; the pairs folded."""
    folded = []
    for conv_name, bn_name in pairs:
        conv, bn = net.get_submodule(conv_name), net.get_submodule(bn_name)
        with torch.inference_mode(False):
            fused = fuse_conv_bn_eval(conv, bn)
        x = _probe(conv, next(conv.parameters()).device)
        if _same(fused, nn.Sequential(conv, bn), x, None):
            net.set_submodule(conv_name, fused)
            # In eval mode, as the rest of the copy: a Tapper stops early only then.
            net.set_submodule(bn_name, nn.Identity().eval())
            folded.append((conv_name, bn_name))
    return folded


def _raw_output(raw: nn.Module, args: tuple, output: Any) -> torch.Tensor:
    """What a tap of a folded convolution's output reads: the fitted
    convolution ``raw`` run on the same input (without its hooks)."""
    return type(raw).forward(raw, *args)


def _store_weights(module: nn.Module, dtype: torch.dtype) -> None:
    """Store convolution and linear weights (not shared with another module)
    in ``dtype``, as autocast would cast them at every forward, where that
    gives the same output under autocast."""
    owners: dict[int, int] = {}
    for _, p in module.named_parameters(remove_duplicate=False):
        owners[id(p)] = owners.get(id(p), 0) + 1
    for m in list(module.modules()):
        if not isinstance(m, (nn.Conv2d, nn.Linear)):
            continue
        params = [getattr(m, a, None) for a in ("weight", "bias")]
        params = [p for p in params if isinstance(p, nn.Parameter)]
        if not params or any(owners[id(p)] != 1 for p in params):
            continue
        cast = copy.copy(m)  # the same module, its own parameter dict
        cast._parameters = {
            name: None if p is None else nn.Parameter(p.detach().to(dtype), False)
            for name, p in m._parameters.items()
        }
        if _same(cast, m, _probe(m, params[0].device), dtype):
            m._parameters = cast._parameters


@contextlib.contextmanager
def _hooks_off(module: nn.Module) -> Iterator[None]:
    """``module`` without its forward hooks (a user's counters) for a while."""
    saved = [(m, m._forward_hooks, m._forward_pre_hooks) for m in module.modules()]
    for m, _, _ in saved:
        m._forward_hooks, m._forward_pre_hooks = OrderedDict(), OrderedDict()
    try:
        yield
    finally:
        for m, post, pre in saved:
            m._forward_hooks, m._forward_pre_hooks = post, pre


def _probe(m: nn.Module, device: torch.device) -> torch.Tensor:
    """A made-up input for one convolution or linear layer."""
    g = torch.Generator().manual_seed(0)
    if isinstance(m, nn.Linear):
        return torch.randn(2, m.in_features, generator=g).to(device)
    reach = [(k - 1) * d + 1 for k, d in zip(m.kernel_size, m.dilation, strict=True)]
    size = [max(16, r + 4 * st) for r, st in zip(reach, m.stride, strict=True)]
    return torch.randn(1, m.in_channels, *size, generator=g).to(device)


def _same(
    got: nn.Module, want: nn.Module, x: torch.Tensor, dtype: torch.dtype | None
) -> bool:
    """Whether ``got`` gives ``want``'s output for ``x`` (up to float rounding;
    False if either fails on it)."""
    try:
        with torch.inference_mode(), autocast(x.device, dtype):
            # forward, not __call__: a check is not a pass hooks should see
            a = type(got).forward(got, x).float()
            b = type(want).forward(want, x).float()
    except Exception:  # noqa: BLE001 - a layer that wants other inputs
        return False
    return a.shape == b.shape and bool((a - b).abs().max() <= 1e-4 * b.abs().max())


def _copy(module: nn.Module) -> nn.Module:
    """A copy of ``module`` whose hooks are the original's own objects (a
    user's counter counts in one place), without the library's tap hooks."""
    memo = {
        id(fn): fn
        for m in module.modules()
        for hooks in (m._forward_hooks, m._forward_pre_hooks)
        for fn in hooks.values()
    }
    with torch.inference_mode(False):  # a copy of ordinary tensors
        net = copy.deepcopy(module, memo).eval()
    drop_tap_hooks(net)
    return net


class _Snapshot:
    """What the copy was made from: every submodule and hook, every tensor
    and its version, storage, dtype and device; it holds the objects (but the
    root, a weak cache key), so that a replaced one is told apart."""

    def __init__(self, module: nn.Module) -> None:
        subs = list(module.modules())
        tensors = [*module.parameters(), *module.buffers()]
        self.objects = [*subs[1:], *tensors]
        self.keys = (
            [tuple(_user_hooks(m)) for m in subs],
            [(t._version, t.data_ptr(), t.dtype, t.device) for t in tensors],
        )

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, _Snapshot)
            and self.keys == other.keys
            and len(self.objects) == len(other.objects)
            and all(a is b for a, b in zip(self.objects, other.objects, strict=True))
        )

    __hash__ = None  # type: ignore[assignment]


def _user_hooks(m: nn.Module) -> Iterator[int]:
    for hooks in (m._forward_hooks, m._forward_pre_hooks):
        for key, fn in hooks.items():
            if not is_tap_hook(fn):
                yield key


class InferenceCopy:
    """The rewritten copy of one network (``module``; None where nothing was
    folded), and which pairs it folded."""

    def __init__(
        self,
        module: nn.Module,
        dtype: torch.dtype | None,
        example: Callable[[], torch.Tensor],
    ) -> None:
        self.snapshot = _Snapshot(module)
        net, pairs = None, []
        if any(_is_plain_bn(m) for m in module.modules()):  # else nothing to copy
            net = _copy(module)
            pairs = _fold(net, foldable_pairs(net, example()))
        if pairs and uses_channels_last(module):
            net.to(memory_format=torch.channels_last)
        if pairs and dtype is not None:
            _store_weights(net, dtype)
        for conv, _ in pairs:  # see _layers.tapped_output
            raw = functools.partial(_raw_output, module.get_submodule(conv))
            net.get_submodule(conv).__dict__["sklearn_cnn_tapped_output"] = raw
        self.module = net if pairs else None
        self.pairs = pairs
        self._bn_to_conv = {bn: conv for conv, bn in pairs}

    def network(self, fitted: nn.Module) -> nn.Module:
        return fitted if self.module is None else self.module

    def taps_for(self, taps: Sequence[Tap]) -> list[Tap]:
        """``taps`` as the copy gives them: the input of a folded BatchNorm is
        its convolution's output."""
        return [
            Tap(self._bn_to_conv[t.module]) if t.pre and t.module in self._bn_to_conv
            else t
            for t in taps
        ]  # fmt: skip


def inference_copy(
    module: nn.Module, dtype: torch.dtype | None, example: Callable[[], torch.Tensor]
) -> InferenceCopy:
    """The rewritten copy of ``module`` for ``dtype``: made once per network,
    device and dtype (its pairs found in a pass of the image ``example()``),
    and anew when the network changes."""
    device = next(module.parameters(), torch.empty(0)).device
    key = (str(device), dtype)
    with _LOCK:
        copies = _COPIES.setdefault(module, {})
        made = copies.get(key)
        if made is None or made.snapshot != _Snapshot(module):
            made = copies[key] = InferenceCopy(module, dtype, example)
    return made
