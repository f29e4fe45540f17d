"""sklearn_cnn.dask on a LocalCluster bound to 127.0.0.1: 2 worker processes of
1 thread, tiny networks, small images."""

from __future__ import annotations

import functools
import importlib
import logging
import os
import signal
import time

import numpy as np
import pytest

pytest.importorskip("dask.array")
distributed = pytest.importorskip("distributed")

import dask  # noqa: E402
import dask.array as da  # noqa: E402
import joblib  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from sklearn.base import clone  # noqa: E402
from sklearn.linear_model import LogisticRegression  # noqa: E402
from sklearn.model_selection import GridSearchCV  # noqa: E402
from sklearn.pipeline import Pipeline  # noqa: E402
from tiny_cnn import TinyCNN, colour_images, make_tiny_cnn, tiny  # noqa: E402

import sklearn_cnn.dask as skdask  # noqa: E402
from sklearn_cnn import CNNFeatureTransformer  # noqa: E402
from sklearn_cnn.dask import featurize, local_cluster  # noqa: E402

# Features computed in other batches may differ in the last bits (the
# convolution algorithm depends on the batch size).
TOL = {"rtol": 1e-5, "atol": 1e-6}


# ---------------------------------------------------------------------------
# Networks that tell what happened on the workers (importable there: the
# workers are spawned with this process's sys.path)
# ---------------------------------------------------------------------------

_UNPICKLED = [0]


class CountingCNN(TinyCNN):
    """A TinyCNN that counts how often this process unpickles one."""

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        _UNPICKLED[0] += 1


def make_counting_cnn() -> CountingCNN:
    torch.manual_seed(0)
    return CountingCNN()


def unpickled() -> int:
    return _UNPICKLED[0]


class Slow(torch.nn.Module):
    """Sleeps in every forward pass, so that a computation can be caught in the
    middle (a worker killed, threads overlapping)."""

    def __init__(self, seconds: float) -> None:
        super().__init__()
        self.seconds = seconds

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        time.sleep(self.seconds)
        return x


def make_slow_cnn(seconds: float) -> torch.nn.Module:
    net = make_tiny_cnn(0)
    net.stem.insert(0, Slow(seconds))
    return net


# Integration: a local Dask cluster of worker processes.
pytestmark = pytest.mark.slow

tiny = functools.partial(tiny, weights=None, image_size=16, device="cpu")


@pytest.fixture(scope="module")
def client():
    cluster = local_cluster(
        2,
        threads_per_worker=1,
        host="127.0.0.1",
        # None would still serve the dashboard on port 8787 (or another one).
        dashboard_address="127.0.0.1:0",
        silence_logs=logging.ERROR,
    )
    # Not the default client: each test says which scheduler it uses.
    client = distributed.Client(cluster, set_as_default=False)
    client.run(importlib.import_module, "sklearn_cnn.dask")  # torch, once
    yield client
    client.close()
    cluster.close()


def compute(client, features: da.Array) -> np.ndarray:
    return client.compute(features).result()


# ---------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("fitted", [True, False])
def test_array_matches_transform(client, images, fitted):
    cnn = tiny(layer="stage1")
    expected = clone(cnn).fit_transform(images)
    if fitted:
        cnn.fit(images)
    features = featurize(images, cnn, client, chunk_size=5)
    assert features.shape == (12, 16)
    assert features.chunks[0] == (5, 5, 2)
    out = compute(client, features)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, expected, **TOL)
    # The rows of each block stay in order: reversed images, reversed rows.
    reverse = compute(client, featurize(images[::-1], cnn, client, chunk_size=5))
    np.testing.assert_allclose(reverse, expected[::-1], **TOL)


def test_unfitted_transformer_is_left_unfitted(client, images):
    cnn = tiny()
    before = cnn.get_params()
    compute(client, featurize(images, cnn, client, chunk_size=6))
    assert not hasattr(cnn, "model_")
    assert cnn.get_params() == before


def test_paths_are_read_on_the_workers(client, tmp_path, monkeypatch):
    rng = np.random.default_rng(1)
    paths = []
    for i in range(7):
        path = tmp_path / f"im{i}.png"
        Image.fromarray(rng.integers(0, 256, (16 + i, 20, 3), dtype=np.uint8)).save(
            path
        )
        paths.append(str(path))
    cnn = tiny().fit(paths)
    expected = cnn.transform(paths)

    def no_reading_here(path):
        raise AssertionError(f"{path} was opened in the client process")

    monkeypatch.setattr("sklearn_cnn._images._load_file", no_reading_here)
    out = compute(client, featurize(paths, cnn, client, chunk_size=3))
    np.testing.assert_allclose(out, expected, **TOL)


def test_dask_array_input(client, images):
    grey = images[..., 0]  # N x H x W
    cnn = tiny(layer="stage2")
    expected = clone(cnn).fit_transform(grey)
    # Chunks that cut images apart and rows that do not fit chunk_size.
    X = da.from_array(grey, chunks=(5, 8, 16))
    features = featurize(X, cnn, client, chunk_size=4)
    assert features.chunks == ((4, 4, 4), (32,))
    np.testing.assert_allclose(compute(client, features), expected, **TOL)


def test_network_is_sent_once_and_unpickled_once_per_worker(client, images):
    cnn = tiny(make_counting_cnn).fit(images)
    before = client.run(unpickled)
    features = featurize(images, cnn, client, chunk_size=2)  # 6 tasks
    # The transformer is one node that every task refers to, persisted on the
    # cluster: the graph itself carries no copy of it.
    graph = dict(features.__dask_graph__())
    assert not [k for k, v in graph.items() if _holds(v, CNNFeatureTransformer)]
    np.testing.assert_allclose(compute(client, features), cnn.transform(images), **TOL)
    after = client.run(unpickled)
    # Not once per task (6): once per worker, and again only where Dask
    # released it from a worker's memory and fetched it back (seen under load).
    assert sum(after[w] - before[w] for w in after) < 6, (before, after)
    # The same fitted transformer again: nothing is sent, and the workers'
    # copies serve again (one refetch allowed, as above; without the reuse
    # both workers unpickle it anew).
    again = compute(client, featurize(images, cnn, client, chunk_size=2))
    np.testing.assert_allclose(again, cnn.transform(images), **TOL)
    final = client.run(unpickled)
    assert sum(final[w] - after[w] for w in final) <= 1, (after, final)
    # Calls that share the network never share results: other images, other
    # rows, even computed together.
    a, b = client.compute(
        [
            featurize(images, cnn, client, chunk_size=2),
            featurize(images[::-1], cnn, client, chunk_size=2),
        ]  # fmt: skip
    )
    np.testing.assert_allclose(b.result(), a.result()[::-1], **TOL)
    # A refit is a new network: its features, not the old ones.
    cnn.set_params(layer="stem").fit(images)
    refit = compute(client, featurize(images, cnn, client, chunk_size=2))
    np.testing.assert_allclose(refit, cnn.transform(images), **TOL)


def _holds(node, cls) -> bool:
    """Whether a graph node carries an instance of ``cls`` as a value."""
    value = getattr(node, "value", None)  # a literal (DataNode)
    if isinstance(node, cls) or isinstance(value, cls):
        return True
    args = getattr(node, "args", ()) or ()
    return any(_holds(a, cls) for a in args)


def test_local_scheduler_with_threads(images):
    # No client: dask's threaded scheduler, several tasks at once in one
    # process; each thread needs its own network (forward hooks are per module).
    cnn = tiny(functools.partial(make_slow_cnn, 0.05)).fit(images)
    with dask.config.set(scheduler="threads", num_workers=3):
        out = featurize(images, cnn, chunk_size=1).compute()
    np.testing.assert_allclose(out, cnn.transform(images), **TOL)


def test_workers_start_without_malloc_trim_threshold(client):
    assert set(client.run(os.environ.get, "MALLOC_TRIM_THRESHOLD_").values()) == {None}


def test_warns_about_malloc_trim_threshold():
    class FakeClient:
        class scheduler:
            address = "tcp://127.0.0.1:1"

        def run(self, fn, *args):
            return {"tcp://127.0.0.1:2": "65536", "tcp://127.0.0.1:3": "65536"}

    with pytest.warns(RuntimeWarning, match="MALLOC_TRIM_THRESHOLD_=65536"):
        skdask._warn_malloc_trim(FakeClient())


def test_activation_cache_shared_by_the_workers(client, images, tmp_path):
    if "memory" not in CNNFeatureTransformer().get_params():
        pytest.skip("CNNFeatureTransformer has no memory= yet")
    from sklearn_cnn import cache_size

    cnn = tiny(layer="stage1", memory=str(tmp_path)).fit(images)
    expected = tiny(layer="stage1").fit(images).transform(images)
    first = compute(client, featurize(images, cnn, client, chunk_size=4))
    np.testing.assert_allclose(first, expected, **TOL)
    assert cache_size(str(tmp_path)) > 0  # the workers wrote it
    # A search's next candidate: another layer, read from what was stored.
    other = clone(cnn).set_params(layer="stage2").fit(images)
    second = compute(client, featurize(images, other, client, chunk_size=4))
    np.testing.assert_allclose(
        second, tiny(layer="stage2").fit(images).transform(images), **TOL
    )


# ---------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------


def test_bad_arguments(images):
    with pytest.raises(TypeError, match="CNNFeatureTransformer"):
        featurize(images, LogisticRegression())
    with pytest.raises(ValueError, match="chunk_size"):
        featurize(images, tiny(), chunk_size=0)
    with pytest.raises(ValueError, match="N x H x W"):
        featurize(da.zeros((4, 16), chunks=2), tiny())
    with pytest.raises(ValueError, match="channels"):
        featurize(images.transpose(0, 3, 1, 2), tiny())


def test_weights_file_missing_on_the_worker(client, images, tmp_path):
    cnn = tiny(weights=str(tmp_path / "not-here.pt"))
    with pytest.raises(ValueError, match="on the Dask worker.*every worker must"):
        featurize(images, cnn, client)


# ---------------------------------------------------------------------------
# Searches on the cluster
# ---------------------------------------------------------------------------


def test_grid_search_on_dask_matches_one_process(client):
    X, y = colour_images(8)
    pipe = Pipeline([("cnn", tiny()), ("clf", LogisticRegression(max_iter=200))])
    grid = {"cnn__layer": ["stage1", "stage2"], "clf__C": [0.1, 1.0]}
    local = GridSearchCV(pipe, grid, cv=3, n_jobs=1).fit(X, y)
    with (
        distributed.get_task_stream(client) as stream,
        joblib.parallel_config(backend="dask", client=client),
    ):
        remote = GridSearchCV(pipe, grid, cv=3).fit(X, y)
    # The fits ran on the workers (joblib sends them in batches).
    assert any("fit_and_score" in str(task["key"]) for task in stream.data)
    for key in [f"split{i}_test_score" for i in range(3)] + ["mean_test_score"]:
        np.testing.assert_allclose(remote.cv_results_[key], local.cv_results_[key])
    assert remote.best_params_ == local.best_params_


# ---------------------------------------------------------------------------
# Faults (last: the cluster restarts a worker)
# ---------------------------------------------------------------------------


def test_killed_worker_loses_no_rows(client):
    rng = np.random.default_rng(2)
    X = rng.integers(0, 256, (40, 16, 16, 3), dtype=np.uint8)
    cnn = tiny(functools.partial(make_slow_cnn, 0.1)).fit(X[:1])
    expected = cnn.transform(X)
    features = client.persist(featurize(X, cnn, client, chunk_size=2))  # 20 tasks
    futures = distributed.futures_of(features)
    pids = client.run(os.getpid)
    deadline = time.monotonic() + 30
    victim = None
    while victim is None and time.monotonic() < deadline:
        time.sleep(0.05)
        done = [f for f in futures if f.done()]
        if len(done) == len(futures):
            break
        # A worker that holds finished blocks: they are lost with it.
        holders = {w for ws in client.who_has(done).values() for w in ws}
        victim = next(iter(holders), None)
    assert victim is not None, "the computation was not caught in the middle"
    os.kill(pids[victim], signal.SIGKILL)
    out = compute(client, features)
    np.testing.assert_allclose(out, expected, **TOL)
    assert victim not in client.scheduler_info()["workers"]  # it died indeed
