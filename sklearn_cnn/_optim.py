"""How FineTuneClassifier's parameters move: parameter groups and learning
rates (``lr``, ``backbone_lr``, ``layer_decay``, ``weight_decay``), the
optimizer (``optimizer``) and its schedule (``schedule``,
``warmup_fraction``), all from ``torch.optim``."""

from __future__ import annotations

from torch import nn
from torch.optim import SGD, AdamW, Optimizer
from torch.optim.lr_scheduler import (
    ConstantLR,
    CosineAnnealingLR,
    LinearLR,
    LRScheduler,
    OneCycleLR,
    SequentialLR,
)

SCHEDULES = ("cosine", "onecycle", "constant")


def _stage_of(name: str, stages: list[str]) -> int:
    """Index of the stage that holds parameter ``name``; 0 for the root's own."""
    for i, stage in enumerate(stages):
        if name.startswith(stage + "."):
            return i
    return 0


def param_groups(
    model: nn.Module,
    head: str,
    stages: list[str],
    *,
    lr: float,
    backbone_lr: float,
    layer_decay: float | None,
    weight_decay: float,
) -> list[dict]:
    """The head's and the backbone's trainable parameters, each split into
    decayed (matrices, kernels) and not decayed (biases, norms) groups; with
    ``layer_decay``, the backbone's by stage (timm's layer-wise decay)."""
    rates: dict[str, float] = {}
    members: dict[str, list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name.startswith(head + "."):
            key, rate = "head", lr
        elif layer_decay is None:
            key, rate = "backbone", backbone_lr
        else:
            i = _stage_of(name, stages)
            key = f"backbone {stages[i] if stages else ''}".rstrip()
            rate = backbone_lr * layer_decay ** (len(stages) - 1 - i)
        rates[key] = rate
        members.setdefault(key, []).append(p)
    groups = []
    for key, params in members.items():
        for decayed in (True, False):
            chosen = [p for p in params if (p.ndim > 1) == decayed]
            if chosen:
                groups.append(
                    {
                        "name": key + ("" if decayed else " (no decay)"),
                        "params": chosen,
                        "lr": rates[key],
                        "weight_decay": weight_decay if decayed else 0.0,
                    }
                )
    return groups


def make_optimizer(name: str, groups: list[dict]) -> Optimizer:
    """AdamW, or SGD with Nesterov momentum 0.9; rates come from the groups."""
    if name == "sgd":
        return SGD(groups, lr=groups[0]["lr"], momentum=0.9, nesterov=True)
    return AdamW(groups, lr=groups[0]["lr"])


def make_schedule(
    optimizer: Optimizer, schedule: str, total_steps: int, warmup_fraction: float
) -> LRScheduler:
    """A per-step schedule: linear warm-up over ``warmup_fraction`` of the
    steps from ``1 / warmup_steps`` of each group's rate, then "cosine" decay to
    zero, "constant", or fastai's "onecycle" (its own warm-up and annealing)."""
    total = max(1, total_steps)
    warmup = max(1, round(warmup_fraction * total))
    if schedule == "onecycle":
        return OneCycleLR(
            optimizer,
            max_lr=[g["lr"] for g in optimizer.param_groups],
            total_steps=total,
            pct_start=min(max(warmup_fraction, 1 / total), 0.99),
        )
    # (step + 1) / warmup during the warm-up: LinearLR from 1/warmup to 1.
    ramp = LinearLR(
        optimizer, start_factor=1 / warmup, end_factor=1.0, total_iters=warmup - 1
    )
    rest = (
        CosineAnnealingLR(optimizer, T_max=max(1, total - warmup))
        if schedule == "cosine"
        else ConstantLR(optimizer, factor=1.0, total_iters=0)
    )
    return SequentialLR(optimizer, [ramp, rest], milestones=[warmup])
