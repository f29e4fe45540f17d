"""What does not train in FineTuneClassifier (``freeze``, ``unfreeze_at``) and
the train/eval mode of every module (``batchnorm``)."""

from __future__ import annotations

from itertools import takewhile
from numbers import Integral
from typing import Any

import numpy as np
from torch import nn

from ._layers import Trace, _check_layer_name

_BACKBONE = "backbone"
BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def _has_state(module: nn.Module) -> bool:
    return any(True for _ in module.parameters()) or any(True for _ in module.buffers())


def _stages(model: nn.Module, tr: Trace, head: str) -> list[str]:
    """Top-level modules that hold parameters or buffers, in forward order; a
    never-called container (``nn.ModuleList``) and one that holds the head are
    expanded into their children, and the head is not a stage."""
    first = tr.first_calls
    found: list[str] = []

    def visit(module: nn.Module, prefix: str) -> None:
        for child_name, child in module.named_children():
            name = prefix + child_name
            if name == head:
                continue
            if head.startswith(name + ".") or (
                name not in first and isinstance(child, (nn.ModuleList, nn.ModuleDict))
            ):
                visit(child, name + ".")
            elif name in first and _has_state(child):
                found.append(name)

    visit(model, "")
    return sorted(found, key=first.__getitem__)


def _is_head(name: str, head: str) -> bool:
    return name == head or name.startswith(head + ".")


def _frozen_modules(
    model: nn.Module, tr: Trace, head: str, stages: list[str], freeze: Any
) -> set[str]:
    """Names of the modules that ``freeze`` freezes (kept in eval mode): those
    whose first call ends at or before the cut, and those never called."""
    first = tr.first_calls
    names = [n for n, _ in model.named_modules() if n and not _is_head(n, head)]
    never_called = {n for n in names if n not in first}
    everything = set(names)
    if isinstance(freeze, (bool, np.bool_)):  # bools pass the constraints as ints
        raise ValueError(
            f"freeze={freeze!r}: pass a number of stages (int), a fraction (float), "
            "a module name, 'backbone' or 0."
        )
    if isinstance(freeze, str):
        if freeze == _BACKBONE:
            return everything
        if _is_head(freeze, head):
            raise ValueError(
                f"freeze={freeze!r} names the classifier head, which always trains. "
                "To train only the head, use freeze='backbone'."
            )
        try:
            _check_layer_name(freeze, tr)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"freeze={freeze!r} cannot be used: {exc}") from None
        cut = first[freeze]
    elif isinstance(freeze, Integral):
        k = int(freeze)
        if k > len(stages):
            raise ValueError(
                f"freeze={k} but the model has {len(stages)} stages: "
                f"{', '.join(map(repr, stages))}. Pass at most {len(stages)}, a "
                "fraction such as freeze=0.5, a module name, or freeze='backbone' "
                "to train only the head."
            )
        if k == 0:
            return never_called
        if k == len(stages):
            return everything
        cut = first[stages[k - 1]]
    else:  # a fraction in [0, 1] (the constraints checked it)
        f = float(freeze)
        counted = sorted(
            (first[n], sum(p.numel() for p in m.parameters(recurse=False)))
            for n, m in model.named_modules()
            if n in first and not _is_head(n, head)
        )
        total = sum(n for _, n in counted) + _root_params(model)
        if f == 0.0 or total == 0:
            return never_called
        # A module joins the prefix while that brings it nearer to f * total
        # (one large module is not frozen for f = 0.5).
        cut, acc = -1, _root_params(model)
        for pos, n in counted:
            if acc + n / 2 >= f * total:
                break
            acc += n
            cut = pos
    frozen = {n for n in names if n in first and first[n] <= cut} | never_called
    trainable = [
        p
        for n, m in model.named_modules()
        if n and n not in frozen and not _is_head(n, head)
        for p in m.parameters(recurse=False)
    ]
    return everything if not trainable else frozen


def _root_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters(recurse=False))


def apply_freeze(model: nn.Module, tr: Trace, frozen: set[str]) -> None:
    """``requires_grad`` off for the parameters of the ``frozen`` modules."""
    for p in model.parameters():
        p.requires_grad_(True)
    for name, m in model.named_modules():
        if name in frozen:
            for p in m.parameters(recurse=False):
                p.requires_grad_(False)
    if frozen & set(tr.calls):
        # The root's own parameters (a class token) are used first.
        for p in model.parameters(recurse=False):
            p.requires_grad_(False)


def train_mode(model: nn.Module, frozen: set[str], batchnorm: str) -> None:
    """Train mode, except frozen modules (and BatchNorm unless "train")."""
    model.train()
    for name, m in model.named_modules():
        if name in frozen or (batchnorm == "frozen" and isinstance(m, BATCHNORMS)):
            m.training = False


def frozen_summary(
    model: nn.Module, head: str, frozen: set[str]
) -> tuple[list[str], float]:
    """The outermost frozen modules that hold parameters, in definition order,
    and their share of the backbone's parameters."""
    names = [
        n
        for n, m in model.named_modules()
        if n in frozen
        and n.rpartition(".")[0] not in frozen
        and any(True for _ in m.parameters())
    ]
    size = {
        n: sum(p.numel() for p in model.get_submodule(n).parameters()) for n in names
    }
    total = sum(p.numel() for n, p in model.named_parameters() if not _is_head(n, head))
    return names, (sum(size.values()) / total if total else 0.0)


def frozen_prefix(stages: list[str], frozen: set[str]) -> list[str]:
    """The stages, from the first, that are all frozen."""
    return list(takewhile(frozen.__contains__, stages))


def phases(
    frozen: set[str], thawed: set[str], epochs: int, unfreeze_at: int | None,
    epochs_done: int,
) -> list[tuple[int, set[str]]]:  # fmt: skip
    """(epochs, frozen modules) of each phase of a fit: one, or two with
    gradual unfreezing (``unfreeze_at``, counted over ``epochs_done`` of
    earlier warm-started fits), the second freezing only ``thawed``."""
    if unfreeze_at is None:
        return [(epochs, frozen)]
    first = min(epochs, max(0, unfreeze_at - 1 - epochs_done))
    both = [(first, frozen), (epochs - first, thawed)]
    return [p for p in both if p[0]] or both[:1]
