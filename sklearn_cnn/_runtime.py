"""Where and how the network runs: device, precision, memory format, batches."""

from __future__ import annotations

import contextlib
import sys
import time
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from ._images import collate_batch, raise_worker_failure

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(device: Any) -> torch.device:
    """ "auto" -> CUDA when available, else the CPU.

    A CUDA device asked for on a machine without one (an estimator fitted on a
    GPU and loaded elsewhere) falls back to the CPU with a warning.
    """
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(
            f"device={device!r} is not a device: use 'auto', 'cpu', 'cuda', "
            "'cuda:1' or a torch.device."
        ) from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        warnings.warn(
            f"device={device!r} but CUDA is not available here; running on the CPU.",
            RuntimeWarning,
            stacklevel=3,
        )
        return torch.device("cpu")
    return dev


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX: CPUs where bf16 matmuls beat fp32."""
    cpu = getattr(torch, "cpu", None)
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(cpu, c, lambda: False)() for c in checks)


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for plain float32."""
    if precision == "fp32":
        return None
    if precision == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        if device.type == "cpu" and cpu_has_native_bf16():
            return torch.bfloat16
        return None
    return _DTYPES[precision]


def autocast(device: torch.device, dtype: torch.dtype | None):
    """An autocast context for ``dtype``, or a no-op for float32."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def has_conv2d(module: nn.Module) -> bool:
    return any(isinstance(m, nn.Conv2d) for m in module.modules())


def place(module: nn.Module, device: torch.device) -> nn.Module:
    """Move ``module`` to ``device``; channels_last for conv nets.

    channels_last is faster for convolutions on CUDA and with oneDNN on the
    CPU (resnet18 at 224 px: 1.3x on this project's CI machine).
    """
    module.to(device)
    if has_conv2d(module):
        module.to(memory_format=torch.channels_last)
    return module


def batches(
    dataset: torch.utils.data.Dataset,
    *,
    batch_size: int,
    num_workers: int,
    device: torch.device,
    channels_last: bool,
    shuffle: bool = False,
    generator: torch.Generator | None = None,
    drop_last: bool = False,
) -> Iterator[Any]:
    """The batches of ``dataset`` on ``device``, one at a time.

    A batch is an image tensor, or a tuple whose first item is one (images
    with labels). Only one batch (per worker) is in memory at once, whatever
    the size of the data.
    """
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        generator=generator,
        drop_last=drop_last,
        num_workers=num_workers,
        collate_fn=collate_batch,
        pin_memory=device.type == "cuda",
    )
    for batch in loader:
        raise_worker_failure(batch)  # a worker's error, as the main process's
        parts = batch if isinstance(batch, tuple) else (batch,)
        parts = tuple(t.to(device, non_blocking=True) for t in parts)
        if channels_last and parts[0].ndim == 4:
            images = parts[0].contiguous(memory_format=torch.channels_last)
            parts = (images, *parts[1:])
        yield parts if isinstance(batch, tuple) else parts[0]


class Progress:
    """A one-line progress report on stderr, for ``verbose > 0``."""

    def __init__(self, total: int, label: str, enabled: bool) -> None:
        self.total, self.label, self.enabled = total, label, enabled
        self.done = 0
        self.start = time.perf_counter()

    def update(self, n: int) -> None:
        if not self.enabled:
            return
        self.done += n
        rate = self.done / max(time.perf_counter() - self.start, 1e-9)
        end = "\n" if self.done >= self.total else ""
        print(
            f"\r{self.label}: {self.done}/{self.total} images ({rate:.0f}/s)",
            end=end,
            file=sys.stderr,
            flush=True,
        )
