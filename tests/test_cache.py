"""memory=: cached activations are exact, reused across folds and candidates,
and never shared where anything that decides them differs."""

from __future__ import annotations

import functools
import json
import multiprocessing
import os
import struct
import sys

import joblib
import numpy as np
import pytest
import torch
from numpy.testing import assert_allclose, assert_array_equal
from PIL import Image
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils._param_validation import InvalidParameterError
from tiny_cnn import colour_images, make_tiny_cnn

from sklearn_cnn import CNNFeatureTransformer, cache_size, clear_cache
from sklearn_cnn._cache import (
    CACHE_DIRNAME,
    ActivationCache,
    image_digests,
    key_of,
    module_digest,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(autouse=True)
def unshared(monkeypatch):
    """Fits with memory= share their network within a process (tested at the
    end); the counts below are of fits that each build their own."""
    monkeypatch.setattr("sklearn_cnn._network.SHARED.size", 0)


LAYERS = ["stem", "stage1", "stage1.0", "stage2", None]

# Images that reach the network's forward (a pre-hook on the root module).
SEEN: list[int] = []


def _count(_module: torch.nn.Module, args: tuple) -> None:
    SEEN.append(len(args[0]))


def counted_tiny_cnn(seed: int = 0) -> torch.nn.Module:
    """A TinyCNN that counts the images each forward pass receives."""
    model = make_tiny_cnn(seed)
    model.register_forward_pre_hook(_count)
    return model


def cnn(seed: int = 0, **params) -> CNNFeatureTransformer:
    params = {"precision": "fp32", **params}
    return CNNFeatureTransformer(functools.partial(counted_tiny_cnn, seed), **params)


def passes(fn) -> int:
    """Images forwarded while ``fn()`` runs (fit's one-image probes included)."""
    SEEN.clear()
    fn()
    return sum(SEEN)


@pytest.fixture(scope="module")
def probe() -> int:
    """Images one fit forwards (its probes), to subtract them from counts."""
    X = np.zeros((2, 16, 16, 3), dtype=np.uint8)
    return passes(lambda: cnn(layer="stage1").fit(X))


@pytest.fixture
def X(images):
    return images


# ---------------------------------------------------------------------------
# Exact: the same features with and without the cache
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("pooling", ["avg", "max", "gem", "flatten"])
@pytest.mark.parametrize("layer", ["stage1", None, ["stage2", "stem.0"]])
def test_same_features_as_without_memory(X, tmp_path, layer, pooling):
    expected = cnn(layer=layer, pooling=pooling).fit_transform(X)
    cold = cnn(layer=layer, pooling=pooling, memory=tmp_path).fit(X)
    # Equal up to float rounding: oneDNN's sums depend on the batch's size
    # (7 images, then 5, against 12), with or without the cache.
    assert_allclose(cold.transform(X[:7]), expected[:7], rtol=1e-6, atol=1e-7)
    computed = cold.transform(X)  # 7 read, 5 computed
    assert_allclose(computed, expected, rtol=1e-6, atol=1e-7)
    warm = cnn(layer=layer, pooling=pooling, memory=tmp_path).fit(X)
    assert passes(lambda: warm.transform(X)) == 0
    assert_array_equal(warm.transform(X), computed)  # stored bit for bit


def test_cached_features_match_a_hand_computation(X, tmp_path):
    est = cnn(layer="stage1", memory=tmp_path).fit(X)
    est.transform(X[:5])  # cached by a pass that also stores other layers
    got = cnn(layer="stage1", memory=tmp_path).fit(X).transform(X)
    model = make_tiny_cnn(0).eval()
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    x = (torch.from_numpy(X).permute(0, 3, 1, 2).float() / 255 - mean) / std
    with torch.inference_mode():
        by_hand = model.stage1(model.stem(x)).mean((2, 3)).numpy()
    assert_allclose(got, by_hand, rtol=1e-5, atol=1e-6)


def test_a_repeated_image_is_computed_once(X, tmp_path, probe):
    X3 = np.concatenate([X[:4], X[:4], X[:4]])
    est = cnn(layer="stage2", memory=tmp_path)
    n = passes(lambda: est.fit_transform(X3))
    assert n - probe == 4
    assert_array_equal(est.transform(X3), cnn(layer="stage2").fit_transform(X3))


# ---------------------------------------------------------------------------
# One pass per image across folds and candidates
# ---------------------------------------------------------------------------


def _search(memory, n_jobs=1) -> GridSearchCV:
    pipe = Pipeline(
        [
            ("cnn", cnn(memory=memory)),
            ("scale", StandardScaler()),
            ("clf", LogisticRegression(max_iter=200)),
        ]
    )
    return GridSearchCV(pipe, {"cnn__layer": LAYERS}, cv=3, n_jobs=n_jobs)


@pytest.mark.slow
def test_layer_search_runs_the_network_once_per_image(tmp_path, probe):
    X, y = colour_images(10)  # 30 images
    fits = len(LAYERS) * 3 + 1  # candidates x folds, and the refit

    uncached = _search(None)
    n_uncached = passes(lambda: uncached.fit(X, y))
    assert n_uncached - fits * probe > 3 * len(X)  # what the cache saves

    cached = _search(tmp_path)
    n_cached = passes(lambda: cached.fit(X, y))
    assert n_cached - fits * probe == len(X)  # each image exactly once
    assert_array_equal(
        cached.cv_results_["mean_test_score"], uncached.cv_results_["mean_test_score"]
    )
    for fold in range(3):
        key = f"split{fold}_test_score"
        assert_array_equal(cached.cv_results_[key], uncached.cv_results_[key])

    # A warm repeat runs no image at all, only fit's probes.
    again = _search(tmp_path)
    assert passes(lambda: again.fit(X, y)) == fits * probe
    assert again.best_params_ == uncached.best_params_


def test_deeper_layers_than_two_levels_are_filled_at_their_depth(X, tmp_path, probe):
    # Asking for a depth-3 name fills every layer down to depth 3.
    est = cnn(layer="stage1.0", memory=tmp_path)
    est.fit_transform(X)
    for layer in ["stem.0", "stage2.2", "stage2", None]:
        n = passes(
            lambda layer=layer: cnn(layer=layer, memory=tmp_path).fit_transform(X)
        )
        assert n == probe


def test_flatten_stores_only_the_layer_asked_for(X, tmp_path, probe):
    cnn(layer="stage2", pooling="flatten", memory=tmp_path).fit_transform(X)
    est = cnn(layer="stage1", pooling="flatten", memory=tmp_path)
    assert passes(lambda: est.fit_transform(X)) == probe + len(X)


# ---------------------------------------------------------------------------
# Safe keys: what decides the features decides the entry
# ---------------------------------------------------------------------------


def _cached_then(first: dict, then: dict, X, memory) -> tuple[np.ndarray, int]:
    """Cache ``first``'s features, then transform with ``then``: its features
    and the images it had to compute."""
    cnn(**first, memory=memory).fit_transform(X)
    est = cnn(**then, memory=memory).fit(X)
    n = passes(lambda: est.transform(X))
    return est.transform(X), n


@pytest.mark.parametrize(
    "change",
    [
        {"seed": 1},  # other weights, same architecture and file-free builder
        {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)},
        {"image_size": 12},
        {"pooling": "max"},
        {"precision": "bf16"},
    ],
    ids=["weights", "normalization", "image_size", "pooling", "precision"],
)
def test_a_change_that_changes_features_never_shares_entries(X, tmp_path, change):
    base = {"layer": "stage2"}
    got, n = _cached_then(base, {**base, **change}, X, tmp_path)
    assert n == len(X)  # nothing reused
    expected = cnn(**base, **change).fit_transform(X)
    assert_array_equal(got, expected)
    assert not np.allclose(expected, cnn(**base).fit_transform(X))


def test_weights_are_keyed_by_content_not_file_name(X, tmp_path):
    memory = tmp_path / "cache"
    path_a, path_b = tmp_path / "a.pt", tmp_path / "b.pt"
    torch.save(make_tiny_cnn(0).state_dict(), path_a)
    torch.save(make_tiny_cnn(0).state_dict(), path_b)
    cnn(layer="stage2", weights=path_a, memory=memory).fit_transform(X)
    # Same values in another file: reused.
    est = cnn(layer="stage2", weights=path_b, memory=memory).fit(X)
    assert passes(lambda: est.transform(X)) == 0
    # New values under the same name: recomputed, never the stale rows.
    torch.save(make_tiny_cnn(3).state_dict(), path_a)
    est = cnn(layer="stage2", weights=path_a, memory=memory).fit(X)
    assert passes(lambda: est.transform(X)) == len(X)
    assert_array_equal(est.transform(X), cnn(seed=3, layer="stage2").fit_transform(X))


def test_array_files_and_order_share_entries(X, tmp_path):
    memory = tmp_path / "cache"
    paths = []
    for i, image in enumerate(X):
        paths.append(str(tmp_path / f"{i}.png"))
        Image.fromarray(image).save(paths[-1])
    expected = cnn(layer="stage1").fit_transform(paths)
    cnn(layer="stage1", memory=memory).fit_transform(X)
    est = cnn(layer="stage1", memory=memory).fit(paths)
    assert passes(lambda: est.transform(paths)) == 0
    assert_array_equal(est.transform(paths), expected)
    order = np.random.default_rng(0).permutation(len(X))
    assert passes(lambda: est.transform(X[order])) == 0
    assert_array_equal(est.transform(X[order]), expected[order])
    pil = [Image.fromarray(image) for image in X]
    assert passes(lambda: est.transform(pil)) == 0


def test_image_digests_tell_content_dtype_and_size_apart(X):
    digests = image_digests(X)
    assert len(set(digests)) == len(X)
    changed = X.copy()
    changed[3, 0, 0, 0] ^= 1  # one bit of one pixel
    assert image_digests(changed)[3] != digests[3]
    assert image_digests(changed)[4] == digests[4]
    assert image_digests(X / 255.0)[0] != digests[0]  # float input
    assert image_digests(X[:, :8])[0] != digests[0]
    grey = X[..., 0]
    assert image_digests(grey) == image_digests(np.repeat(grey[..., None], 3, -1))
    assert image_digests(list(X)) == digests  # a list of per-image arrays
    rgba = np.concatenate([X, np.full_like(X[..., :1], 7)], axis=-1)
    assert image_digests(rgba) == digests  # alpha is dropped, as for the network


def test_files_and_pil_images_digest_as_their_pixels(X, tmp_path):
    grey = X[:3, ..., 0]
    paths = [str(tmp_path / f"{i}.png") for i in range(3)]
    for image, path in zip(grey, paths, strict=True):
        Image.fromarray(image).save(path)  # a grey PNG (mode "L")
    assert image_digests(paths) == image_digests(grey)
    pil = [Image.fromarray(image) for image in X[:3]]
    assert image_digests(pil) == image_digests(X[:3])


# ---------------------------------------------------------------------------
# Corruption and concurrency
# ---------------------------------------------------------------------------


def _shards(memory) -> list[str]:
    root = os.path.join(memory, CACHE_DIRNAME)
    return [
        os.path.join(dirpath, f)
        for dirpath, _, files in os.walk(root)
        for f in files
        if f.endswith(".shard")
    ]


@pytest.mark.parametrize("damage", ["flip", "truncate", "garbage"])
def test_a_corrupt_shard_is_recomputed_not_returned(X, tmp_path, damage):
    expected = cnn(layer="stage2").fit_transform(X)
    cnn(layer="stage2", memory=tmp_path).fit_transform(X)
    (shard,) = _shards(tmp_path)
    with open(shard, "rb") as f:
        data = bytearray(f.read())
    if damage == "flip":  # one bit of one value of the block read back
        (length,) = struct.unpack("<Q", data[8:16])
        block = json.loads(data[16 : 16 + length])["blocks"]["stage2"]
        data[16 + length + 32 + block["offset"] + 5] ^= 0x40
    elif damage == "truncate":
        data = data[: len(data) // 2]
    else:
        data = bytearray(b"\0" * len(data))
    with open(shard, "wb") as f:
        f.write(data)
    est = cnn(layer="stage2", memory=tmp_path).fit(X)
    with pytest.warns(RuntimeWarning, match="Corrupt activation-cache shard"):
        n = passes(lambda: est.transform(X))
    assert n == len(X)
    assert_array_equal(est.transform(X), expected)
    assert shard not in _shards(tmp_path)  # replaced by a sound one


def _write_shards(directory: str, key: str, start: int, count: int) -> None:
    """A writer process: ``count`` shards of 50 rows that encode their digest."""
    cache = ActivationCache(directory)
    for s in range(start, start + count):
        ids = np.arange(s * 50, s * 50 + 50)
        digests = [int(i).to_bytes(16, "little") for i in ids]
        rows = np.repeat(ids[:, None].astype(np.float32), 300, axis=1)
        cache.store(key, digests, {"layer": rows})


def test_two_processes_writing_at_once_leave_a_sound_cache(tmp_path):
    key = key_of({"test": "concurrent"})
    methods = multiprocessing.get_all_start_methods()
    ctx = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    writers = [
        ctx.Process(target=_write_shards, args=(str(tmp_path), key, s, 20))
        for s in (0, 20)
    ]
    for w in writers:
        w.start()
    cache = ActivationCache(str(tmp_path))
    digests = [int(i).to_bytes(16, "little") for i in range(40 * 50)]
    # Read while they write: whatever is found is whole and right.
    while any(w.is_alive() for w in writers):
        found, rows = cache.fetch(key, digests, ["layer"])
        if found.any():
            ids = np.flatnonzero(found).astype(np.float32)
            assert_array_equal(rows["layer"], np.repeat(ids[:, None], 300, axis=1))
    for w in writers:
        w.join()
        assert w.exitcode == 0
    found, rows = cache.fetch(key, digests, ["layer"])
    assert found.all()
    assert_array_equal(rows["layer"][:, 0], np.arange(len(digests)))
    assert not [f for f in os.listdir(tmp_path / key) if not f.endswith(".shard")]


def test_activation_cache_keeps_keys_and_names_apart(tmp_path):
    cache = ActivationCache(tmp_path)
    d = [bytes([i]) * 16 for i in range(3)]
    cache.store("k1", d, {"a": np.ones((3, 2)), "b": np.zeros((3, 4, 4))})
    found, rows = cache.fetch("k2", d, ["a"])
    assert not found.any() and rows == {}
    found, rows = cache.fetch("k1", d[::-1], ["a", "b"])
    assert found.all() and rows["b"].shape == (3, 4, 4)
    found, _ = cache.fetch("k1", d, ["a", "c"])
    assert not found.any()
    # A shard moved into another key's directory is refused.
    os.makedirs(tmp_path / "k3")
    (shard,) = os.listdir(tmp_path / "k1")
    os.rename(tmp_path / "k1" / shard, tmp_path / "k3" / shard)
    with pytest.warns(RuntimeWarning, match="another key"):
        found, _ = cache.fetch("k3", d, ["a"])
    assert not found.any()


# ---------------------------------------------------------------------------
# memory= forms, size, clearing
# ---------------------------------------------------------------------------


def test_cache_size_and_clear(X, tmp_path):
    assert cache_size(tmp_path) == 0
    cnn(layer="stage1", memory=tmp_path).fit_transform(X)
    files = _shards(tmp_path)
    assert cache_size(tmp_path) == sum(os.path.getsize(f) for f in files) > 0
    assert cache_size(joblib.Memory(tmp_path, verbose=0)) == cache_size(tmp_path)
    clear_cache(tmp_path)
    assert cache_size(tmp_path) == 0
    assert os.path.isdir(tmp_path)  # only the library's own directory goes


def test_joblib_memory_is_accepted(X, tmp_path):
    memory = joblib.Memory(tmp_path, verbose=0)
    cnn(layer="stage1", memory=memory).fit_transform(X)
    est = cnn(layer="stage1", memory=str(tmp_path)).fit(X)
    assert passes(lambda: est.transform(X)) == 0  # the same location
    no_location = cnn(layer="stage1", memory=joblib.Memory(None)).fit(X)
    assert passes(lambda: no_location.transform(X)) == len(X)
    assert cache_size(joblib.Memory(None)) == 0


def test_memory_of_the_wrong_type_is_refused(X):
    with pytest.raises(InvalidParameterError, match="memory"):
        cnn(memory=3).fit(X)


def test_memory_set_after_fit_takes_effect_at_once(X, tmp_path):
    est = cnn(layer="stage1").fit(X)
    est.set_params(memory=tmp_path)
    assert_array_equal(est.transform(X), cnn(layer="stage1").fit_transform(X))
    assert cache_size(tmp_path) > 0


def test_verbose_reports_the_filling_pass(X, tmp_path, capsys):
    cnn(layer="stage1", memory=tmp_path, verbose=1).fit_transform(X)
    assert "filling the cache" in capsys.readouterr().err


def test_threads_filling_at_once_get_their_own_features(X, tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    expected = cnn(layer="stage2").fit_transform(X)
    est = cnn(layer="stage2", memory=tmp_path, batch_size=3).fit(X)
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(est.transform, [X, X[::-1], X, X[::-1]]))
    for i, got in enumerate(results):
        assert_allclose(got if i % 2 == 0 else got[::-1], expected, rtol=1e-6)


@pytest.mark.slow
def test_fits_with_memory_share_the_network_within_a_process(tmp_path, monkeypatch):
    monkeypatch.setattr("sklearn_cnn._network.SHARED.size", 2)
    X = np.random.default_rng(0).integers(0, 256, (6, 16, 16, 3), dtype=np.uint8)

    def fit(**params):
        params = {"weights": None, "random_state": 0, **params}
        return CNNFeatureTransformer("resnet18", **params).fit(X)

    a, b = fit(memory=tmp_path), fit(memory=tmp_path, layer="layer2")
    assert a.model_ is b.model_  # built and probed once
    np.testing.assert_array_equal(b.transform(X), fit(layer="layer2").transform(X))
    assert fit(memory=tmp_path, random_state=1).model_ is not a.model_
    assert fit(memory=tmp_path, image_size=32).model_ is not a.model_
    assert fit().model_ is not fit().model_  # without memory: never shared
    unseeded = [fit(memory=tmp_path, random_state=None) for _ in range(2)]
    assert unseeded[0].model_ is not unseeded[1].model_


def _builder_a():
    return make_tiny_cnn(0)


def test_a_builder_function_is_shared_by_identity(tmp_path, monkeypatch):
    """A module-level function builds a shared network; a function redefined
    under the same name (a notebook cell run again) is another object and
    builds its own."""
    from collections import OrderedDict

    monkeypatch.setattr("sklearn_cnn._network.SHARED.size", 2)
    monkeypatch.setattr("sklearn_cnn._network.SHARED._entries", OrderedDict())
    X = np.random.default_rng(0).integers(0, 256, (4, 16, 16, 3), dtype=np.uint8)
    params = {"weights": None, "random_state": 0, "memory": tmp_path}
    a = CNNFeatureTransformer(_builder_a, **params).fit(X)
    b = CNNFeatureTransformer(_builder_a, layer="stage1", **params).fit(X)
    assert b.model_ is a.model_

    namespace = {"__name__": __name__, "make_tiny_cnn": make_tiny_cnn}
    exec("def _builder_a():\n    return make_tiny_cnn(1)\n", namespace)  # noqa: S102
    redefined = namespace["_builder_a"]
    assert redefined.__qualname__ == _builder_a.__qualname__
    c = CNNFeatureTransformer(redefined, **params).fit(X)
    assert c.model_ is not a.model_
    assert not np.allclose(c.transform(X), a.transform(X))


def test_a_shared_network_is_not_run_to_measure_widths(tmp_path, monkeypatch):
    """Feature widths come from the traced shapes (pooled on the meta device):
    a fit that shares the network runs no image through it, for any layer
    and pooling, and the widths are those a forward pass gives."""
    from collections import OrderedDict

    monkeypatch.setattr("sklearn_cnn._network.SHARED.size", 2)
    # Ours alone:
    monkeypatch.setattr("sklearn_cnn._network.SHARED._entries", OrderedDict())
    X = np.random.default_rng(0).integers(0, 256, (6, 16, 16, 3), dtype=np.uint8)
    params = {"weights": None, "random_state": 0, "memory": tmp_path}
    first = CNNFeatureTransformer("resnet18", layer="layer2", **params).fit(X)
    seen = []
    first.model_.register_forward_pre_hook(lambda m, args: seen.append(len(args[0])))
    for layer in ("layer2", "layer3", None):
        for pooling in ("avg", "avgmax", "flatten"):
            est = CNNFeatureTransformer(
                "resnet18", layer=layer, pooling=pooling, **params
            ).fit(X)
            assert est.model_ is first.model_ and seen == []  # no pass in fit
            probed = est._probed_widths(est._example(X))
            assert est._widths == probed, (layer, pooling)
            seen.clear()
    assert first.n_features_out_ == 128
    est = CNNFeatureTransformer("resnet18", layer="layer2", pooling="flatten", **params)
    assert est.fit(X).n_features_out_ == 128 * 28 * 28 and seen == []  # at 224 px


def test_a_shared_network_is_hashed_once(tmp_path, monkeypatch):
    import sklearn_cnn._cache as cache

    monkeypatch.setattr("sklearn_cnn._network.SHARED.size", 2)
    hashed = []
    digest = cache.module_digest
    monkeypatch.setattr(
        cache, "module_digest", lambda m, *a: hashed.append(m) or digest(m, *a)
    )
    X = np.random.default_rng(0).integers(0, 256, (6, 16, 16, 3), dtype=np.uint8)
    params = {"weights": None, "random_state": 0, "memory": tmp_path}
    a = CNNFeatureTransformer("resnet18", **params).fit(X)
    b = CNNFeatureTransformer("resnet18", layer="layer2", **params).fit(X)
    assert a.model_ is b.model_ and hashed == [a.model_]
    # A network that is not shared is hashed at each fit.
    c = CNNFeatureTransformer("resnet18", **{**params, "random_state": None}).fit(X)
    d = CNNFeatureTransformer("resnet18", **{**params, "random_state": None}).fit(X)
    assert hashed[1:] == [c.model_, d.model_]


def test_a_forward_edited_in_its_file_changes_the_network_digest(tmp_path, monkeypatch):
    """Same module and class names, structure and weights; ``forward`` differs."""
    import importlib.util

    source = (
        "import torch\n"
        "class Net(torch.nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.fc = torch.nn.Linear(2, 2)\n"
        "    def forward(self, x):\n"
        "        return self.fc(x) {}\n"
    )
    digests = []
    for folder, tail in [("a", ""), ("b", "* 2"), ("c", "")]:
        path = tmp_path / folder / "edited_net.py"
        path.parent.mkdir()
        path.write_text(source.format(tail))
        spec = importlib.util.spec_from_file_location("edited_net", path)
        module = importlib.util.module_from_spec(spec)
        monkeypatch.setitem(sys.modules, "edited_net", module)  # as import does
        spec.loader.exec_module(module)
        torch.manual_seed(0)
        digests.append(module_digest(module.Net()))
    assert digests[0] != digests[1]
    assert digests[0] == digests[2]


@pytest.mark.slow
def test_a_shared_network_edited_in_place_is_noticed(tmp_path, monkeypatch):
    """Weights written by hand after fit change the cache key (no stale rows)
    and the network is no longer handed to the next fit."""
    from collections import OrderedDict

    monkeypatch.setattr("sklearn_cnn._network.SHARED.size", 2)
    monkeypatch.setattr("sklearn_cnn._network.SHARED._entries", OrderedDict())
    X = np.random.default_rng(0).integers(0, 256, (6, 16, 16, 3), dtype=np.uint8)
    params = {"weights": None, "random_state": 0, "layer": "layer2"}
    est = CNNFeatureTransformer("resnet18", memory=tmp_path, **params).fit(X)
    before = est.transform(X)
    with torch.no_grad():
        est.model_.layer2[0].conv1.weight.mul_(-1.0)
    after = est.transform(X)
    uncached = est.set_params(memory=None).transform(X)
    assert np.abs(after - before).max() > 1e-3  # not the stale rows
    np.testing.assert_allclose(after, uncached, rtol=1e-5, atol=1e-6)
    again = CNNFeatureTransformer("resnet18", memory=tmp_path, **params).fit(X)
    assert again.model_ is not est.model_
    np.testing.assert_allclose(again.transform(X), before, rtol=1e-5, atol=1e-6)
