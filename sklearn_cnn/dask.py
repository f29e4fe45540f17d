"""Feature extraction on a Dask cluster: :func:`featurize` and :func:`local_cluster`.

Needs the optional extra ``dask`` (``pip install "sklearn-cnn[dask]"``: dask's
arrays and ``distributed``).

How the work is laid out, and why:

* The fitted transformer is one node of the task graph (a literal, or the
  result of one fit task) that every feature task depends on: each worker
  receives and unpickles the network once, not inside every task, and the
  node is recomputed if every worker holding it dies. A later call with the
  same fitted transformer and client reuses it (it was persisted).
* File paths are opened on the workers; in-memory arrays travel chunk by chunk
  inside their tasks, so a task lost with its worker can run again elsewhere.
* Dask starts workers with ``MALLOC_TRIM_THRESHOLD_`` set, which makes every
  large tensor PyTorch allocates a fresh mmap (up to 1.7x the CPU time):
  :func:`local_cluster` starts workers without it, and :func:`featurize`
  warns when the workers of a cluster of your own have it.
"""

from __future__ import annotations

import copy
import os
import threading
import uuid
import warnings
import weakref
from collections import OrderedDict
from numbers import Integral
from typing import Any

import numpy as np
from sklearn.base import clone
from sklearn.utils.validation import check_is_fitted

try:
    import dask
    import dask.array as da
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "sklearn_cnn.dask needs dask and distributed: "
        'pip install "sklearn-cnn[dask]" (or dask[array] distributed).'
    ) from exc

from ._features import CNNFeatureTransformer
from ._images import check_images, check_shape

__all__ = ["featurize", "local_cluster", "WORKER_ENVIRON"]

#: The worker setting that slows PyTorch, and what ``local_cluster`` does with
#: it. For a cluster of your own, start the workers with these values (a value
#: of None means "not set"): with ``dask.config.set(WORKER_ENVIRON)`` around
#: the creation of the cluster and the variable absent from the environment of
#: the process that starts the workers (``dask worker`` / the nanny).
WORKER_ENVIRON: dict[str, Any] = {
    "distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None,
}
_TRIM = "MALLOC_TRIM_THRESHOLD_"


# -- The cluster --------------------------------------------------------------


def local_cluster(
    n_workers: int | None = None, threads_per_worker: int = 1, **kwargs: Any
) -> Any:
    """A ``distributed.LocalCluster`` whose workers run PyTorch at full speed.

    The same as ``LocalCluster(n_workers, threads_per_worker, **kwargs)``, but
    its worker processes start without ``MALLOC_TRIM_THRESHOLD_``, which Dask
    sets by default and which makes PyTorch up to 1.7x slower. One thread per
    worker (the default) runs one network per core, without contention.

    Parameters
    ----------
    n_workers : int or None, default=None
        Worker processes; None lets Dask choose (one per core group).
    threads_per_worker : int, default=1
        Threads of each worker; each thread runs its own copy of the network.
    **kwargs
        Passed to ``distributed.LocalCluster`` (``host``,
        ``dashboard_address``, ``memory_limit``, ...).

    Returns
    -------
    cluster : distributed.LocalCluster
        Use it with ``distributed.Client(cluster)``; close both when done.

    Examples
    --------
    >>> from distributed import Client
    >>> from sklearn_cnn.dask import local_cluster
    >>> cluster = local_cluster(1, host="127.0.0.1", dashboard_address="127.0.0.1:0")
    >>> client = Client(cluster)
    >>> import os
    >>> set(client.run(os.environ.get, "MALLOC_TRIM_THRESHOLD_").values())
    {None}
    >>> client.close(); cluster.close()
    """
    from distributed import LocalCluster

    # An earlier cluster's nannies left the variable in os.environ.
    saved = os.environ.pop(_TRIM, None)
    try:
        with dask.config.set(WORKER_ENVIRON):
            return LocalCluster(
                n_workers=n_workers, threads_per_worker=threads_per_worker, **kwargs
            )
    finally:
        if saved is not None:
            os.environ[_TRIM] = saved


def _default_client(client: Any) -> Any:
    """The client given, else the default distributed client, else None."""
    if client is not None:
        return client
    try:
        from distributed import default_client
    except ImportError:  # pragma: no cover - dask without distributed
        return None
    try:
        return default_client()
    except ValueError:  # no client: dask's local scheduler
        return None


#: Clients whose workers' environment was checked once (a warning, no data).
_CHECKED_CLIENTS: set[str] = set()


def _warn_malloc_trim(client: Any) -> None:
    """Warn once per cluster whose workers start with MALLOC_TRIM_THRESHOLD_."""
    key = getattr(client.scheduler, "address", None) or str(id(client))
    if key in _CHECKED_CLIENTS:
        return
    _CHECKED_CLIENTS.add(key)
    try:
        values = client.run(os.environ.get, _TRIM)
    except Exception:  # a check must never break the computation
        return
    slow = {w: v for w, v in values.items() if v is not None}
    if slow:
        value = next(iter(slow.values()))
        warnings.warn(
            f"{len(slow)} of {len(values)} Dask workers run with {_TRIM}={value} "
            "(Dask's default), which makes PyTorch up to 1.7x slower. Start the "
            "workers without it: sklearn_cnn.dask.local_cluster() does, and for a "
            "cluster of your own create it inside "
            "dask.config.set(sklearn_cnn.dask.WORKER_ENVIRON) with the variable "
            "unset in the shell that starts the workers.",
            RuntimeWarning,
            stacklevel=3,
        )


# -- What runs on the workers -------------------------------------------------

#: Per process: token -> (the thread that owns the shared network, network).
#: Invalidation: the token names a fitted transformer's content; the ``_KEEP``
#: most recently used are kept.
_NETWORKS: OrderedDict[str, tuple[int, CNNFeatureTransformer]] = OrderedDict()
_LOCK = threading.Lock()
_LOCAL = threading.local()
#: Networks kept per process (and per extra thread): a few featurize calls.
_KEEP = 2


def _network(fitted: CNNFeatureTransformer, token: str) -> CNNFeatureTransformer:
    """This thread's network for ``token``, made once per process: the first
    thread to ask uses ``fitted``'s, other threads get their own deep copy."""
    thread = threading.get_ident()
    with _LOCK:
        entry = _NETWORKS.get(token)
        if entry is None:
            shared = copy.copy(fitted)  # the same network
            shared.num_workers = 0  # no DataLoader workers in a Dask worker
            entry = _NETWORKS[token] = (thread, shared)
            while len(_NETWORKS) > _KEEP:
                _NETWORKS.popitem(last=False)
        else:
            _NETWORKS.move_to_end(token)
    owner, net = entry
    if owner == thread:
        return net
    own = _LOCAL.__dict__.setdefault("networks", OrderedDict())
    if token not in own:
        own[token] = copy.deepcopy(net)
        while len(own) > _KEEP:
            own.popitem(last=False)
    return own[token]


def _features(images: Any, fitted: CNNFeatureTransformer, token: str) -> np.ndarray:
    """The features of one block of images (paths or an array)."""
    return _network(fitted, token).transform(images)


def _where() -> str:
    try:
        from distributed import get_worker

        return f" on the Dask worker {get_worker().address}"
    except (ImportError, ValueError):
        return ""


def _fit(transformer: CNNFeatureTransformer, example: Any) -> CNNFeatureTransformer:
    """Fit a copy of ``transformer`` on one image, where this task runs."""
    try:
        return clone(transformer).fit(example)
    except (ValueError, OSError, RuntimeError) as exc:
        raise type(exc)(
            f"Fitting the transformer{_where()} failed: {exc} Files named by "
            "weights= and by X are opened on the workers: every worker must see "
            "them at the same path (a shared file system, or a copy on each "
            "machine). Or fit the transformer before featurize(): the fitted "
            "network is then sent to the workers."
        ) from exc


def _width(fitted: CNNFeatureTransformer) -> int:
    return int(fitted.n_features_out_)


# -- featurize ----------------------------------------------------------------


def _is_fitted(transformer: CNNFeatureTransformer) -> bool:
    try:
        check_is_fitted(transformer)
    except Exception:
        return False
    return True


#: Fitted transformers persisted on a cluster, by transformer (weakly) and
#: client: (client, the network it was persisted with, its graph node, token).
#: Invalidation: dropped with the transformer (weak keys); an entry whose
#: network is no longer the transformer's is pruned when next looked up.
_PERSISTED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _on_cluster(client: Any, transformer: CNNFeatureTransformer, token: str) -> tuple:
    """The fitted transformer as a graph node, and the token of its network;
    with a client, persisted by the first call and reused by later calls with
    the same fitted network (``model_``), with the workers' unpickled copies."""
    node = dask.delayed(transformer, name=f"sklearn-cnn-network-{token}")
    if client is None:
        return node, token
    held = _PERSISTED.setdefault(transformer, [])
    for owner, network, persisted, known in held:
        mine = owner() is client and network() is transformer.model_
        if mine and client.status == "running":
            return persisted, known
    # Entries of closed or collected clients, and this client's stale one, go.
    held[:] = [h for h in held if h[0]() is not None and h[0]() is not client]
    persisted = client.persist(node)
    held.append(
        (weakref.ref(client), weakref.ref(transformer.model_), persisted, token)
    )
    return persisted, token


def featurize(
    X: Any,
    transformer: CNNFeatureTransformer,
    client: Any = None,
    *,
    chunk_size: int = 256,
) -> da.Array:
    """The features of ``X`` as a lazy Dask array, computed on the workers.

    ``featurize(X, transformer).compute()`` equals ``transformer.transform(X)``
    (for an unfitted transformer, ``clone(transformer).fit_transform(X)``):
    same float32 values, same row order.

    Parameters
    ----------
    X : list of file paths, ndarray or dask array of images
        File paths are opened on the workers, never here: every worker must see
        them. An in-memory array is cut into blocks of ``chunk_size`` images
        that travel inside the tasks. A dask array (N x H x W [x C]) is used
        as it is, rechunked to ``chunk_size`` rows and whole images.
    transformer : CNNFeatureTransformer
        Fitted, its network is sent to each worker once and reused by all the
        tasks of that worker. Unfitted, a copy is fitted by one task on the
        first image (weight files are then read there) and that fitted copy is
        sent to the others; ``transformer`` itself is never modified. With
        ``memory=``, the cache must be a directory every worker can reach.
    client : distributed.Client or None, default=None
        The cluster to use; None uses the current default client (the last
        ``Client`` created), else Dask's local threaded scheduler. With an
        explicit client that is not the default, compute the result with
        ``client.compute(features)``.
    chunk_size : int, default=256
        Images per task: large enough for full batches (a multiple of the
        transformer's ``batch_size``), small enough to spread over the
        workers and to lose little work when a worker dies.

    Returns
    -------
    features : dask.array.Array of shape (n_samples, n_features), float32
        Lazy: nothing runs until ``.compute()``, ``.persist()`` or a store,
        except the one task that fits an unfitted transformer (to learn the
        number of features).

    See Also
    --------
    local_cluster : A local cluster whose workers run PyTorch at full speed.

    Notes
    -----
    Run one thread per worker process (``threads_per_worker=1``): each worker
    then runs one network on one core. Workers with several threads give each
    thread its own copy of the network. Tasks that die with their worker are
    run again on another one, so a lost worker loses no rows.

    Examples
    --------
    >>> import numpy as np
    >>> from sklearn_cnn import CNNFeatureTransformer
    >>> from sklearn_cnn.dask import featurize
    >>> X = np.random.default_rng(0).integers(0, 256, (10, 32, 32, 3), dtype=np.uint8)
    >>> cnn = CNNFeatureTransformer("resnet18", weights=None, layer="layer2")
    >>> features = featurize(X, cnn, chunk_size=4)
    >>> features.shape, features.chunks[0]
    ((10, 128), (4, 4, 2))
    >>> features.compute().dtype
    dtype('float32')
    """
    if not isinstance(transformer, CNNFeatureTransformer):
        raise TypeError(
            "transformer must be a CNNFeatureTransformer; got "
            f"{type(transformer).__name__}."
        )
    if (
        not isinstance(chunk_size, Integral)
        or isinstance(chunk_size, bool)
        or (chunk_size < 1)
    ):
        raise ValueError(f"chunk_size must be a positive int; got {chunk_size!r}.")
    chunk_size = int(chunk_size)
    client = _default_client(client)
    if client is not None:
        _warn_malloc_trim(client)

    fitted_stats = "fit" in (transformer.mean, transformer.std)
    if fitted_stats and not _is_fitted(transformer):
        # The unfitted path fits on one image: its statistics are not the data's.
        raise ValueError(
            "transformer has mean='fit' or std='fit', estimated from the images "
            "fit sees: fit it on the training images first, then featurize."
        )
    if isinstance(X, da.Array):
        check_shape(X.shape, X.dtype)  # what needs no compute
    else:
        X = check_images(
            X, unit_floats=transformer.mean is None and transformer.std is None
        )
    example = X[:1]

    # Each call's feature tasks have keys of their own; ``token`` names the
    # network, which later calls may share.
    token = call = uuid.uuid4().hex
    if _is_fitted(transformer):
        fitted, token = _on_cluster(client, transformer, token)
        width = int(transformer.n_features_out_)
    elif client is not None:
        # One task fits a copy on a worker; persisted, not scattered.
        fitted = client.persist(dask.delayed(_fit, pure=False)(transformer, example))
        width = client.compute(dask.delayed(_width)(fitted)).result()
    else:
        sample = example.compute() if isinstance(example, da.Array) else example
        local = _fit(transformer, sample)
        fitted = dask.delayed(local, name=f"sklearn-cnn-network-{token}")
        width = int(local.n_features_out_)

    if isinstance(X, da.Array):
        X = X.rechunk({0: chunk_size, **{axis: -1 for axis in range(1, X.ndim)}})
        return da.map_blocks(
            _features,
            X,
            fitted,
            token,
            dtype=np.float32,
            chunks=(X.chunks[0], (width,)),
            drop_axis=list(range(2, X.ndim)),
            name=f"sklearn-cnn-features-{call}",
            meta=np.empty((0, 0), dtype=np.float32),
        )
    blocks = [
        da.from_delayed(
            dask.delayed(_features, pure=True)(
                X[start : start + chunk_size],
                fitted,
                token,
                dask_key_name=(f"sklearn-cnn-features-{call}", i),
            ),
            shape=(min(chunk_size, len(X) - start), width),
            dtype=np.float32,
            meta=np.empty((0, 0), dtype=np.float32),
        )
        for i, start in enumerate(range(0, len(X), chunk_size))
    ]
    return da.concatenate(blocks, axis=0)
