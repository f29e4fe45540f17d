"""Per-core efficiency of ``sklearn_cnn.dask.featurize`` on a local cluster.

The same images (random uint8, 64 px), the same fitted resnet18 (random
weights, fp32, batches of 64) and the same rows, three ways:

* ``transform`` in this process, torch on 1 thread, and on 2 threads;
* ``featurize`` on a LocalCluster of 1 worker x 1 thread, and of 2 workers x
  1 thread (127.0.0.1 only, no dashboard), made by ``local_cluster``.

Per-core efficiency with k workers = time of the single-process transform on k
threads / time of featurize on k workers of 1 thread: 1.0 means the cluster
costs nothing over one process using the same cores. Runs are interleaved and
repeated; ratios are taken round by round (these machines are shared and
noisy) and the medians are what to quote. The clusters are started and warmed
up (workers import torch) before timing. ``featurize`` persists a fitted
transformer on the cluster at its first call and later calls with it reuse
that copy: the "workers" rows measure those calls, and "first call" gives
``featurize`` a new transformer object each time (a shallow copy), so that
the network is pickled and sent anew, as on a user's first call.

``--naive`` adds the approach the module avoids: the fitted transformer
pickled into every task (``map_blocks(transformer.transform)``).
``--default-env`` adds a 2-worker cluster with Dask's default worker
environment (``MALLOC_TRIM_THRESHOLD_=65536``).

    python benchmarks/bench_dask.py [--images 2000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import platform
import resource
import statistics
import time

import dask
import dask.array as da
import numpy as np
import torch
import torchvision
from distributed import Client, LocalCluster

from sklearn_cnn import CNNFeatureTransformer
from sklearn_cnn.dask import featurize, local_cluster

LOCAL = {
    "host": "127.0.0.1",
    "dashboard_address": "127.0.0.1:0",
    "processes": True,
    "silence_logs": logging.ERROR,
}


def cpu_seconds() -> float:
    """User + system CPU time of the calling process."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def naive(X: np.ndarray, cnn: CNNFeatureTransformer, chunk_size: int) -> da.Array:
    """The model pickled into every task: what the module avoids."""
    blocks = da.from_array(X, chunks=(chunk_size, *X.shape[1:]))
    return blocks.map_blocks(
        cnn.transform,
        dtype=np.float32,
        chunks=(blocks.chunks[0], (cnn.n_features_out_,)),
        drop_axis=[2, 3],
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--chunk-size", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--naive", action="store_true")
    parser.add_argument("--default-env", action="store_true")
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    X = rng.integers(0, 256, (args.images, args.size, args.size, 3), dtype=np.uint8)
    torch.manual_seed(0)
    cnn = CNNFeatureTransformer(
        torchvision.models.resnet18(weights=None),
        weights=None,
        image_size=args.size,
        batch_size=64,
        precision="fp32",
        device="cpu",
    ).fit(X[:1])

    clusters = {1: local_cluster(1, **LOCAL), 2: local_cluster(2, **LOCAL)}
    if args.default_env:
        os.environ.pop("MALLOC_TRIM_THRESHOLD_", None)
        clusters["2 default-env"] = LocalCluster(2, threads_per_worker=1, **LOCAL)
    clients = {k: Client(c, set_as_default=False) for k, c in clusters.items()}

    def on_dask(key, naive_way: bool = False, fresh: bool = False):
        client = clients[key]

        def run(X: np.ndarray = X) -> np.ndarray:
            if naive_way:
                return client.compute(naive(X, cnn, args.chunk_size)).result()
            # fresh: another transformer object each call (a shallow copy), so
            # the network is pickled and sent anew, as on a first call.
            net = copy.copy(cnn) if fresh else cnn
            features = featurize(X, net, client, chunk_size=args.chunk_size)
            return client.compute(features).result()

        run.client = client
        return run

    def single(threads: int):
        def run(X: np.ndarray = X) -> np.ndarray:
            before = torch.get_num_threads()
            torch.set_num_threads(threads)
            try:
                return cnn.transform(X)
            finally:
                torch.set_num_threads(before)

        run.client = None
        return run

    candidates = {
        "transform, 1 thread": single(1),
        "featurize, 1 worker x 1 thread": on_dask(1),
        "transform, 2 threads": single(2),
        "featurize, 2 workers x 1 thread": on_dask(2),
        "featurize, 2 workers, first call": on_dask(2, fresh=True),
    }
    if args.naive:
        candidates["naive map_blocks, 2 workers"] = on_dask(2, naive_way=True)
    if args.default_env:
        candidates["featurize, 2 workers, Dask's default env"] = on_dask(
            "2 default-env"
        )

    print(
        f"{platform.platform()} | {os.cpu_count()} CPUs | torch {torch.__version__}"
        f" | dask {dask.__version__}\n{args.images} images of {args.size} px, "
        f"resnet18 fp32, chunk_size={args.chunk_size}, {args.rounds} rounds"
    )
    for fn in candidates.values():  # warm-up: the workers import torch
        fn(X[: 2 * args.chunk_size])

    # Wall time, and CPU time: this process's (client, scheduler, or the
    # single-process transform) plus the workers' (user + system).
    times: dict[str, list[float]] = {name: [] for name in candidates}
    cpus: dict[str, list[float]] = {name: [] for name in candidates}
    diffs: dict[str, float] = {name: 0.0 for name in candidates}
    expected = None
    for _ in range(args.rounds):
        for name, fn in candidates.items():
            client = fn.client
            workers = sum(client.run(cpu_seconds).values()) if client else 0.0
            cpu, start = time.process_time(), time.perf_counter()
            out = fn()
            times[name].append(time.perf_counter() - start)
            cpu = time.process_time() - cpu
            if client:
                cpu += sum(client.run(cpu_seconds).values()) - workers
            cpus[name].append(cpu)
            expected = out if expected is None else expected
            diffs[name] = max(diffs[name], float(np.abs(out - expected).max()))

    print("max |difference| from transform, 1 thread:")
    for name, diff in diffs.items():
        print(f"  {name}: {diff:.2g}")
    width = max(map(len, candidates))
    print(f"{'':<{width}}  wall time (median, rounds) | CPU time (median)")
    for name, t in times.items():
        rounds = ", ".join(f"{x:.2f}" for x in t)
        print(f"{name:<{width}}  {statistics.median(t):6.2f} s ({rounds}) | "
              f"{statistics.median(cpus[name]):6.2f} s")  # fmt: skip

    def ratio(table: dict, reference: str, name: str) -> str:
        r = [a / b for a, b in zip(table[reference], table[name], strict=True)]
        rounds = ", ".join(f"{x:.2f}" for x in r)
        return f"{statistics.median(r):.2f} (rounds: {rounds})"

    names = list(candidates)
    for label, table in (("wall", times), ("CPU", cpus)):
        print(f"per-core efficiency by {label} time (transform / featurize):")
        print(f"  1 worker : {ratio(table, names[0], names[1])}")
        print(f"  2 workers: {ratio(table, names[2], names[3])}")
        for extra in names[4:]:
            print(f"  {extra}: {ratio(table, names[2], extra)}")

    for client in clients.values():
        client.close()
    for cluster in clusters.values():
        cluster.close()


if __name__ == "__main__":
    main()
