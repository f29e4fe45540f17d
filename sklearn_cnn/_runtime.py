"""Where and how the network runs: device, precision, memory format, batches."""

from __future__ import annotations

import contextlib
import copy
import math
import os
import sys
import threading
import time
import types
import warnings
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import torch
from torch import nn
from tqdm.auto import tqdm

from ._images import collate_batch, raise_worker_failure
from ._layers import Tapper, drop_tap_hooks

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(device: Any) -> torch.device:
    """ "auto" -> CUDA when available, else the CPU; CUDA on a machine without
    it (an estimator loaded elsewhere) falls back to the CPU with a warning."""
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


def place(
    module: nn.Module, device: torch.device, channels_last: bool | None = None
) -> nn.Module:
    """Move ``module`` to ``device``; channels_last (faster convolutions) when
    ``channels_last``, or for None when it has a ``Conv2d``."""
    module.to(device)
    if channels_last is None:
        channels_last = any(isinstance(m, nn.Conv2d) for m in module.modules())
    if channels_last:
        module.to(memory_format=torch.channels_last)
    return module


def uses_channels_last(module: nn.Module) -> bool:
    """Whether ``module``'s convolutions are in channels_last format, so its
    batches should be too (``_inspect.probe_network`` puts a network that
    needs contiguous tensors back in that format)."""
    return any(
        isinstance(m, nn.Conv2d)
        and m.weight.ndim == 4
        and not m.weight.is_contiguous()
        and m.weight.is_contiguous(memory_format=torch.channels_last)
        for m in module.modules()
    )


def batches(
    dataset: torch.utils.data.Dataset,
    *,
    batch_size: int,
    num_workers: int | str,
    device: torch.device,
    channels_last: bool,
    shuffle: bool = False,
    generator: torch.Generator | None = None,
    drop_last: bool = False,
) -> Iterator[Any]:
    """The batches of ``dataset`` on ``device``, one at a time: image tensors,
    or tuples whose first item is one (images with labels)."""
    if generator is None:
        # The loader's base seed, drawn from its own generator: an inference
        # pass never changes what torch's global one draws next.
        generator = torch.Generator().manual_seed(0)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        generator=generator,
        drop_last=drop_last,
        num_workers=resolve_num_workers(num_workers, dataset, batch_size),
        collate_fn=collate_batch,
        pin_memory=device.type == "cuda",
    )
    for batch in loader:
        raise_worker_failure(batch)  # a worker's error, as the main process's
        parts = batch if isinstance(batch, tuple) else (batch,)
        parts = tuple(t.to(device, non_blocking=True) for t in parts)
        if parts[0].ndim == 4:
            # Preprocessed arrays may come channels_last in memory; a network
            # that refused that format (x.view) gets contiguous tensors.
            fmt = torch.channels_last if channels_last else torch.contiguous_format
            parts = (parts[0].contiguous(memory_format=fmt), *parts[1:])
        yield parts if isinstance(batch, tuple) else parts[0]


def progress(total: int, label: str, enabled: bool) -> tqdm:
    """A tqdm progress bar on stderr for ``verbose > 0``; none for no images."""
    return tqdm(
        total=total, desc=label, unit="img", disable=not enabled or total == 0,
        leave=True, dynamic_ncols=True,
    )  # fmt: skip


# -- Decoding workers ---------------------------------------------------------

#: Files per worker below which ``num_workers="auto"`` keeps decoding in the
#: main process: starting a worker costs more than decoding a few batches.
_MIN_BATCHES_PER_WORKER = 4


#: ``batch_size="auto"`` on a CPU: a power of two near this many pixels per
#: batch (larger batches' activations no longer fit in the caches).
CPU_BATCH_PIXELS = 400_000
#: ``batch_size="auto"`` on a GPU, which wants large batches.
GPU_BATCH = 64


def auto_batch_size(device: torch.device, image_shape: Sequence[int]) -> int:
    """Images per forward pass for ``batch_size="auto"``: ``GPU_BATCH`` on a
    GPU; on a CPU, the power of two nearest ``CPU_BATCH_PIXELS`` pixels for
    images of ``image_shape`` (..., H, W), from 8 to 128."""
    if device.type != "cpu":
        return GPU_BATCH
    pixels = max(1, int(image_shape[-1]) * int(image_shape[-2]))
    return int(min(128, max(8, 2 ** round(math.log2(CPU_BATCH_PIXELS / pixels)))))


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask, as containers set it)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def _holds_files(dataset: Any) -> bool:
    """Whether ``dataset`` reads image files (a list X of paths), looking
    through ``Subset`` and labelled wrappers."""
    for _ in range(4):
        X = getattr(dataset, "X", None)
        if X is not None:
            return isinstance(X, list) and isinstance(X[0], (str, os.PathLike))
        dataset = getattr(dataset, "dataset", None) or getattr(dataset, "images", None)
        if dataset is None:
            return False
    return False


def resolve_num_workers(num_workers: int | str, dataset: Any, batch_size: int) -> int:
    """``"auto"``: decoding workers for image files (one per CPU beyond the two
    that run the network, at most 8, ``_MIN_BATCHES_PER_WORKER`` batches
    each), none for decoded images (a worker would only add a copy)."""
    if num_workers != "auto":
        return int(num_workers)
    if not _holds_files(dataset):
        return 0
    n_batches = -(-len(dataset) // batch_size)
    if n_batches < _MIN_BATCHES_PER_WORKER:
        return 0
    cpus = available_cpus() - 2
    return max(0, min(cpus, 8, n_batches // _MIN_BATCHES_PER_WORKER))


# -- torch.compile of the tapped forward --------------------------------------

#: What ``compile`` passes to ``torch.compile``: ``freezing`` treats the
#: weights of the private copy as constants (BatchNorm folds, oneDNN packs the
#: weights once). Tests swap in ``{"backend": "eager"}``.
COMPILE_KWARGS: dict[str, Any] = {"options": {"freezing": True}, "dynamic": False}

#: ``compile="auto"`` compiles once the images left are predicted to take
#: longer than this uncompiled: enough to pay for a first compile.
AUTO_COMPILE_AFTER_S = 300.0


def _own_code(method: Any) -> Any:
    """``method`` with a code object of its own: torch.compile caches graphs
    per code object, which every Tapper's ``__call__`` would share."""
    func = method.__func__
    own = types.FunctionType(
        func.__code__.replace(),
        func.__globals__,
        func.__name__,
        func.__defaults__,
        func.__closure__,
    )
    return types.MethodType(own, method.__self__)


def weights_version(module: nn.Module) -> tuple[int, ...]:
    """Changes whenever a parameter or buffer is written in place (training,
    ``load_state_dict``), so a compiled copy can tell it is stale."""
    return tuple(t._version for t in [*module.parameters(), *module.buffers()])


class CompiledForward:
    """``torch.compile`` of the tapped forward of a private copy of a network,
    which carries its taps' hooks for good (no recompiling). One input shape
    is compiled; others (the last batch) run ``fallback``, as does a model
    that does not compile (it warns once).
    """

    def __init__(
        self, module: nn.Module, taps: Sequence[Any], key: tuple, verbose: bool
    ) -> None:
        self.key, self.verbose = key, verbose
        self.source = weakref.ref(module)  # not id(): ids are reused
        self.version = weights_version(module)
        self.shape: tuple[int, ...] | None = None
        self.failed = False
        self.compile_seconds: float | None = None
        self._lock = threading.Lock()  # the tapper's store is per copy
        with torch.inference_mode(False):  # a copy of ordinary tensors
            private = copy.deepcopy(module).eval()
        drop_tap_hooks(private)
        self._tapper = Tapper(private, taps).__enter__()
        try:
            self._fn = torch.compile(_own_code(self._tapper.__call__), **COMPILE_KWARGS)
        except Exception as exc:  # noqa: BLE001 - any failure means "not compiled"
            self._fail(exc)

    def fresh_for(self, module: nn.Module, key: tuple) -> bool:
        """Compiled from ``module`` as it is now (the same object, none of its
        tensors written since) and for ``key``."""
        return (
            self.source() is module
            and key == self.key
            and weights_version(module) == self.version
        )

    def _fail(self, exc: BaseException) -> None:
        self.failed = True
        self._fn = None
        cause = getattr(exc, "inner_exception", None) or exc  # BackendCompilerFailed
        lines = str(cause).strip().splitlines() or [""]
        warnings.warn(
            "compile: torch.compile failed on this network "
            f"({type(cause).__name__}: {lines[0][:300]}); "
            "running it uncompiled, with the same results. Set compile=False to "
            "silence this warning.",
            RuntimeWarning,
            stacklevel=4,
        )

    def __call__(
        self, images: torch.Tensor, fallback: Callable[[torch.Tensor], Any]
    ) -> list[torch.Tensor]:
        if self.failed:
            return fallback(images)
        shape = tuple(images.shape)
        if self.shape is not None and shape != self.shape:
            return fallback(images)
        with self._lock:
            if self.shape is None:  # the first call compiles
                start = time.perf_counter()
                try:
                    out = self._fn(images)
                except torch.OutOfMemoryError:
                    raise  # the caller halves the batch
                except Exception as exc:  # noqa: BLE001
                    self._fail(exc)
                    return fallback(images)
                self.shape = shape
                self.compile_seconds = time.perf_counter() - start
                if self.verbose:
                    print(
                        f"compiled the network in {self.compile_seconds:.1f} s",
                        file=sys.stderr,
                        flush=True,
                    )
                return out
            return self._fn(images)


def auto_compile_pays(
    seconds_so_far: float, images_done: int, images_left: int
) -> bool:
    """Whether the images left would take longer than ``AUTO_COMPILE_AFTER_S``
    at the uncompiled rate measured so far."""
    if images_done == 0:
        return False
    return seconds_so_far / images_done * images_left > AUTO_COMPILE_AFTER_S


# -- CUDA out of memory: halve the batch and retry ----------------------------

T = TypeVar("T")


def halve_on_oom(run: Callable[[int], T], size: int, *, what: str) -> tuple[T, int]:
    """``run(size)``; on CUDA out of memory, halve ``size`` (with a warning)
    and run again. ``run(k)`` processes a whole batch in chunks of at most
    ``k`` images and is safe to repeat. Returns the result and the size that
    worked, for the next batch.

    Examples
    --------
    >>> def run(k):
    ...     if k > 2:
    ...         raise torch.OutOfMemoryError("CUDA out of memory")
    ...     return k
    >>> import warnings
    >>> with warnings.catch_warnings():
    ...     warnings.simplefilter("ignore")
    ...     halve_on_oom(run, 8, what="predict")
    (2, 2)
    """
    while True:
        failed = False
        try:
            return run(size), size
        except torch.OutOfMemoryError as exc:
            if size <= 1:
                raise torch.OutOfMemoryError(
                    f"The device ran out of memory in {what} with one image per "
                    "batch. Use a smaller image_size, precision='bf16' or "
                    f"'fp16', or device='cpu'. ({str(exc).splitlines()[0]})"
                ) from exc
            failed = True
        if failed:  # outside the except block: its frames' tensors are freed
            if torch.cuda.is_initialized():  # never initialise CUDA to free it
                torch.cuda.empty_cache()
            smaller = size // 2
            warnings.warn(
                f"The device ran out of memory in {what} with {size} images per "
                f"batch; retrying with {smaller}. Set batch_size={smaller} (or "
                "lower) to avoid the retries.",
                RuntimeWarning,
                stacklevel=4,
            )
            size = smaller


def in_chunks(
    fn: Callable[[torch.Tensor], torch.Tensor], batch: torch.Tensor, size: int
) -> torch.Tensor:
    """``fn`` of ``batch``, applied to chunks of at most ``size`` rows."""
    if len(batch) <= size:
        return fn(batch)
    return torch.cat([fn(batch[i : i + size]) for i in range(0, len(batch), size)])


def cpu_state(model: nn.Module) -> OrderedDict:
    """A copy of the state dict on the CPU, tensor by tensor, with its
    ``_metadata`` (MNASNet's loader needs it)."""
    state = model.state_dict()
    out = OrderedDict((k, v.detach().to("cpu", copy=True)) for k, v in state.items())
    out._metadata = getattr(state, "_metadata", None)  # type: ignore[attr-defined]
    return out
