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
up (workers import torch) before timing; every ``featurize`` call in the
timing sends the network to the workers anew, as a user's call does.

``--naive`` adds the approach the module avoids: the fitted transformer
pickled into every task (``map_blocks(transformer.transform)``).
``--default-env`` adds a 2-worker cluster with Dask's default worker
environment (``MALLOC_TRIM_THRESHOLD_=65536``).

    python benchmarks/bench_dask.py [--images 2000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
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
    "dashboard_address": None,
    "processes": True,
    "silence_logs": logging.ERROR,
}


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

    def on_dask(key, naive_way: bool = False):
        client = clients[key]

        def run() -> np.ndarray:
            if naive_way:
                return client.compute(naive(X, cnn, args.chunk_size)).result()
            features = featurize(X, cnn, client, chunk_size=args.chunk_size)
            return client.compute(features).result()

        return run

    def single(threads: int):
        def run() -> np.ndarray:
            before = torch.get_num_threads()
            torch.set_num_threads(threads)
            try:
                return cnn.transform(X)
            finally:
                torch.set_num_threads(before)

        return run

    candidates = {
        "transform, 1 thread": single(1),
        "featurize, 1 worker x 1 thread": on_dask(1),
        "transform, 2 threads": single(2),
        "featurize, 2 workers x 1 thread": on_dask(2),
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
    expected = cnn.transform(X)
    for name, fn in candidates.items():  # warm-up: workers import torch
        out = fn()
        diff = float(np.abs(out - expected).max())
        print(f"  {name}: max |difference| from transform = {diff:.2g}")

    times: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(args.rounds):
        for name, fn in candidates.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)

    width = max(map(len, candidates))
    for name, t in times.items():
        print(f"{name:<{width}}  median {statistics.median(t):6.2f} s  "
              f"({', '.join(f'{x:.2f}' for x in t)})")  # fmt: skip

    def ratio(reference: str, name: str) -> str:
        r = [a / b for a, b in zip(times[reference], times[name], strict=True)]
        return (
            f"{statistics.median(r):.2f} (rounds: {', '.join(f'{x:.2f}' for x in r)})"
        )

    print("per-core efficiency (transform time / featurize time, same cores):")
    names = list(candidates)
    print(f"  1 worker : {ratio(names[0], names[1])}")
    print(f"  2 workers: {ratio(names[2], names[3])}")
    for extra in names[4:]:
        print(f"  {extra}: {ratio(names[2], extra)}")

    for client in clients.values():
        client.close()
    for cluster in clusters.values():
        cluster.close()


if __name__ == "__main__":
    main()
