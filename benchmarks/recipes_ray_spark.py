"""The Ray Data and Spark recipes of ``docs/scaling.rst``, run once by hand.

Not part of CI (neither engine is a dependency). Writes ``--images`` PNG
files of 64 px (Animal-MNIST-like random shapes do not matter: random
pixels), fits a resnet18 transformer (random weights, seeded, fp32), then
computes the features three ways and checks they are the same rows:

* ``transform`` in this process, torch on 2 threads (the reference);
* Ray Data ``map_batches`` with a callable class, 2 actors of 1 CPU;
* a Spark pandas UDF over an iterator of batches, ``local[2]``.

Per-core efficiency = reference time / engine time on the same 2 cores; the
engines' start-up (Ray's actors, Spark's JVM and Python workers) is included,
as a user pays it on every run.

    pip install "ray[data]" pyspark   # and Java for Spark
    python benchmarks/recipes_ray_spark.py [--images 1000]
"""

# No ``from __future__ import annotations``: Spark reads the pandas UDF's
# type hints, which must be objects, not strings.
import argparse
import os
import sys
import tempfile
import time
from collections.abc import Iterator

import numpy as np
import torch
from PIL import Image

from sklearn_cnn import CNNFeatureTransformer


def make_files(n: int, folder: str) -> list[str]:
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        path = os.path.join(folder, f"{i:05d}.png")
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


class Featurizer:
    """Ray: one instance per actor, so the network is unpickled once per actor."""

    def __init__(self, transformer: CNNFeatureTransformer) -> None:
        torch.set_num_threads(1)  # one core per actor (num_cpus=1)
        self.cnn = transformer

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {
            "path": batch["path"],
            "features": self.cnn.transform(list(batch["path"])),
        }


def with_ray(cnn: CNNFeatureTransformer, paths: list[str]) -> np.ndarray:
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        ds = ray.data.from_items([{"path": p} for p in paths])
        out = ds.map_batches(
            Featurizer,
            fn_constructor_kwargs={"transformer": cnn},
            batch_size=256,
            compute=ray.data.ActorPoolStrategy(size=2),
            num_cpus=1,
            batch_format="numpy",
        ).take_all()
    finally:
        ray.shutdown()
    rows = {r["path"]: r["features"] for r in out}
    return np.stack([rows[p] for p in paths])


def with_spark(cnn: CNNFeatureTransformer, paths: list[str]) -> np.ndarray:
    import pandas as pd
    from pyspark.sql import SparkSession
    from pyspark.sql.functions import pandas_udf

    # The Python workers must run this environment's interpreter.
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    spark = (
        SparkSession.builder.master("local[2]")
        .config("spark.driver.host", "127.0.0.1")
        .config("spark.ui.enabled", "false")
        .config("spark.sql.execution.arrow.maxRecordsPerBatch", 256)
        .getOrCreate()
    )
    try:
        broadcast = spark.sparkContext.broadcast(cnn)

        @pandas_udf("array<float>")
        def cnn_features(batches: Iterator[pd.Series]) -> Iterator[pd.Series]:
            torch.set_num_threads(1)  # one core per Spark task
            transformer = broadcast.value
            for batch in batches:
                yield pd.Series(list(transformer.transform(batch.tolist())))

        df = spark.createDataFrame(pd.DataFrame({"path": paths}), "path string")
        rows = df.withColumn("features", cnn_features("path")).collect()
    finally:
        spark.stop()
    found = {r["path"]: np.asarray(r["features"], np.float32) for r in rows}
    return np.stack([found[p] for p in paths])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--engines", default="ray,spark")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        paths = make_files(args.images, folder)
        torch.manual_seed(0)
        cnn = CNNFeatureTransformer(
            "resnet18", weights=None, precision="fp32", random_state=0
        ).fit(paths[:1])
        torch.set_num_threads(2)
        cnn.transform(paths[:64])  # warm up
        tic = time.perf_counter()
        reference = cnn.transform(paths)
        base = time.perf_counter() - tic
        print(f"{args.images} PNG files of 64 px, resnet18 fp32, 2 cores")
        print(f"  transform in one process, 2 threads: {base:6.1f} s")
        for name in args.engines.split(","):
            run = {"ray": with_ray, "spark": with_spark}[name]
            tic = time.perf_counter()
            out = run(cnn, paths)
            took = time.perf_counter() - tic
            diff = float(np.abs(out - reference).max())
            print(
                f"  {name:>5}: {took:6.1f} s, per-core efficiency {base / took:.2f}, "
                f"max |difference| {diff:.2e}",
                flush=True,
            )


if __name__ == "__main__":
    main()
