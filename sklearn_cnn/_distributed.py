"""Fine-tuning on several devices with torch's DistributedDataParallel.

``fit_ddp`` starts one process per device; each runs the estimator's own
``fit`` on the same data with the same seed, so every process takes the same
decisions. ``_training.DATA_PARALLEL``, set only inside those processes, splits
every global batch among them (``_shard``) and wraps the training forward in
``DistributedDataParallel``; validation, the probe and calibration run
unwrapped on all the images. Rank 0's fitted estimator is sent back.
"""

from __future__ import annotations

import os
import pickle
import socket
import sys
import tempfile
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from sklearn.base import clone
from sklearn.utils import check_random_state

from ._runtime import available_cpus, batches, resolve_device
from ._training import DATA_PARALLEL

# -- Splitting batches among processes ----------------------------------------


def _shard(
    order: list[int], batch_size: int, rank: int, world: int, drop_last: bool
) -> list[list[int]]:
    """This process's part of each global batch of ``order`` (``batch_size``
    consecutive entries): every ``world``-th image from ``rank``. A batch with
    fewer images than processes is skipped by all (one would have no gradient).
    """
    out = []
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        if (drop_last and len(batch) < batch_size) or len(batch) < world:
            continue
        out.append(batch[rank::world])
    return out


class _DataParallel:
    """This process's part in the training loop (``_training.DataParallel``)."""

    def __init__(self, rank: int, world: int, device: torch.device) -> None:
        self.rank, self.world, self.device = rank, world, device

    def shard(self, order: list[int], batch_size: int) -> list[list[int]]:
        return _shard(order, batch_size, self.rank, self.world, False)

    def image_batches(self, dataset, batch_size, generator, drop_last,
                      loader) -> Iterator[Any]:  # fmt: skip
        # A shuffling DataLoader's draws (base seed, sampler): the global
        # batches of a fit on one device.
        torch.empty((), dtype=torch.int64).random_(generator=generator)
        sampler = torch.utils.data.RandomSampler(dataset, generator=generator)
        order = list(sampler)
        parts = _shard(order, batch_size, self.rank, self.world, drop_last)
        mine = [i for part in parts for i in part]
        sizes = [len(part) for part in parts]
        subset = torch.utils.data.Subset(dataset, mine)
        # Load the parts in order, regrouped by their sizes.
        stream = batches(subset, batch_size=max(sizes, default=1), **loader)
        return _regroup(stream, sizes)

    def wrap(self, module: torch.nn.Module) -> torch.nn.Module:
        if not any(p.requires_grad for p in module.parameters()):
            return module
        ids = [self.device.index] if self.device.type == "cuda" else None
        return torch.nn.parallel.DistributedDataParallel(module, device_ids=ids)


def _regroup(stream: Iterator[Any], sizes: list[int]) -> Iterator[Any]:
    """Batches of ``sizes`` images from a stream of larger, equal batches."""
    pending: list[tuple[torch.Tensor, ...]] = []
    held = 0
    for size in sizes:
        while held < size:
            batch = next(stream)
            pending.append(batch)
            held += len(batch[0])
        parts = tuple(torch.cat(p) for p in zip(*pending, strict=True))
        yield tuple(p[:size] for p in parts)
        rest = tuple(p[size:] for p in parts)
        pending, held = ([rest], len(rest[0])) if len(rest[0]) else ([], 0)


# -- The processes ------------------------------------------------------------


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _process(
    rank: int, world: int, port: int, backend: str, devices: list[str],
    threads: int, estimator: Any, X: Any, y: Any, fit_params: dict, out: str,
) -> None:  # fmt: skip
    """One process of ``fit_ddp``: join the group, fit, rank 0 writes the result."""
    device = devices[rank]
    if sys.platform.startswith("linux"):
        # Gloo talks over the loopback interface only: the processes are local.
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(threads)
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))
    dist.init_process_group(
        backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        DATA_PARALLEL.set(_DataParallel(rank, world, torch.device(device)))
        estimator.set_params(device=device)
        if rank != 0:
            estimator.set_params(verbose=0)
        with warnings.catch_warnings():
            if rank != 0:  # one process reports
                warnings.simplefilter("ignore")
            estimator.fit(X, y, **fit_params)
        if rank == 0:
            with open(out, "wb") as f:
                pickle.dump(estimator, f)
    finally:
        dist.destroy_process_group()


def fit_ddp(
    estimator: Any,
    X: Any,
    y: Any,
    *,
    n_devices: int = 2,
    sample_weight: Any = None,
) -> Any:
    """Fit ``estimator`` with DistributedDataParallel on ``n_devices`` devices.

    The same as ``estimator.fit(X, y)`` (same seed, validation split, probe,
    schedule and early stopping), but each optimizer step's batch of
    ``batch_size`` images is split among ``n_devices`` processes, and
    torch's ``DistributedDataParallel`` averages their gradients. The
    processes are started with ``torch.multiprocessing`` on this machine:
    one per GPU (NCCL) when ``device`` resolves to CUDA, else CPU processes
    that share the cores (gloo, over 127.0.0.1 only).

    Parameters
    ----------
    estimator : FineTuneClassifier
        Fitted in place, as ``fit`` would; left as it was if training fails.
    X : array-like of images or list of paths / PIL images
        Training images; sent to every process (pass file paths, or a
        memory-mapped array, when they are large).
    y : array-like of shape (n_samples,)
        Class labels.
    n_devices : int, default=2
        Processes, one per device. ``batch_size`` stays the global batch:
        each process handles about ``batch_size / n_devices`` images a step.
    sample_weight : array-like of shape (n_samples,), default=None
        As for ``fit``.

    Returns
    -------
    estimator : FineTuneClassifier
        The estimator, fitted (rank 0's copy; all processes end with the
        same weights).

    Notes
    -----
    What changes against one device:

    * BatchNorm with ``batchnorm="train"`` normalizes each process's part of
      the batch by that part's statistics; the running statistics are rank
      0's (``"frozen"``, the default, keeps the pretrained ones everywhere).
    * A step's loss is averaged per process, then over processes: exactly
      the one-device loss when the parts carry equal weights, close otherwise.
    * Augmentation draws from each process's torch generator, seeded alike.
    * The probe, validation and calibration run in every process on all the
      images; ``random_state=None`` draws one seed, shared by the processes.

    The script that calls it must guard its entry point with
    ``if __name__ == "__main__":`` (the processes import it), and ``model``
    must be picklable (a torchvision name or a ``functools.partial``).

    Examples
    --------
    >>> import numpy as np
    >>> from sklearn_cnn import FineTuneClassifier
    >>> from sklearn_cnn.distributed import fit_ddp
    >>> rng = np.random.default_rng(0)
    >>> X = rng.integers(0, 256, (16, 32, 32, 3), dtype=np.uint8)
    >>> y = np.repeat([0, 1], 8)
    >>> clf = FineTuneClassifier("resnet18", weights=None, epochs=1, batch_size=8,
    ...                          validation_fraction=None, device="cpu")
    >>> fit_ddp(clf, X, y, n_devices=2).predict(X[:2]).shape
    (2,)
    """
    if not isinstance(n_devices, (int, np.integer)) or n_devices < 1:
        raise ValueError(f"n_devices must be a positive int; got {n_devices!r}.")
    n_devices = int(n_devices)
    params = estimator.get_params(deep=False)
    if "batch_size" not in params or not hasattr(estimator, "fit"):
        raise TypeError(
            f"fit_ddp fine-tunes a FineTuneClassifier; got {type(estimator).__name__}."
        )
    warm = getattr(estimator, "warm_start", False)  # goes on from the fitted network
    work = pickle.loads(pickle.dumps(estimator)) if warm else clone(estimator)
    work._validate_params()
    if params["batch_size"] < n_devices:
        raise ValueError(
            f"batch_size={params['batch_size']} is smaller than n_devices="
            f"{n_devices}: each device needs at least one image of every batch."
        )
    # One seed for every process; the caller's RandomState advances as one
    # fit would advance it.
    random_state = params["random_state"]
    if random_state is None:
        seed = check_random_state(None).randint(2**31 - 1)
        work.set_params(random_state=int(seed))
    elif isinstance(random_state, np.random.RandomState):
        work.set_params(random_state=pickle.loads(pickle.dumps(random_state)))
        random_state.randint(2**31 - 1)

    device = resolve_device(params["device"])
    if device.type == "cuda":
        if torch.cuda.device_count() < n_devices:
            raise ValueError(
                f"n_devices={n_devices} but {torch.cuda.device_count()} CUDA "
                "device(s) are visible."
            )
        backend, devices = "nccl", [f"cuda:{i}" for i in range(n_devices)]
    else:
        backend, devices = "gloo", ["cpu"] * n_devices
    threads = max(1, available_cpus() // n_devices) if device.type == "cpu" else 1
    fit_params = {} if sample_weight is None else {"sample_weight": sample_weight}

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rank0.pkl")
        group = (n_devices, _free_port(), backend, devices, threads)
        torch.multiprocessing.start_processes(
            _process,
            args=(*group, work, X, y, fit_params, out),
            nprocs=n_devices,
            join=True,
            start_method="spawn",
        )
        with open(out, "rb") as f:  # written by rank 0 of this call
            fitted = pickle.load(f)
    # Rank 0's fitted attributes, with the caller's parameters (and device).
    state = fitted.__getstate__()
    state.update(params)
    for name in [k for k in vars(estimator) if k.endswith("_")]:
        delattr(estimator, name)
    estimator.__setstate__(state)
    return estimator
