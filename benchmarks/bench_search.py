"""A layer search with and without ``memory=``: wall time and backbone passes.

``GridSearchCV(Pipeline([cnn, StandardScaler(), LogisticRegression()]),
{"cnn__layer": 5 layers}, cv=5)`` on real images (Animal-MNIST silhouettes,
28 x 28, resized to 96 px by the transformer) for two networks:

- resnet18 with *random* weights (torchvision's cannot be downloaded here; the
  timings do not depend on the values, and every fit builds the same seeded
  weights, so the cache can tell they are the same);
- EfficientNet-Lite0 with its real ImageNet weights (pip package, offline).

Backbone passes are counted, not assumed: a forward pre-hook on the root
module adds up the images each forward receives. A ``fit`` also forwards
two single images (the probe that checks ``layer``) where it builds its
network; fits with ``memory=`` share one, so they probe it once. Every image
forwarded is counted. Printed, for each network:

- uncached search, cached search (cold) and the same search again (warm):
  wall time, images forwarded per image; the cv scores of all three compared;
- the linear models alone, fitted on features computed beforehand (what a
  search costs at best): the warm search against it;
- an early layer against the last one without the cache, against their share
  of the network's multiply-adds;
- hashing time per image (pixels, and the weights once per fit) against
  forward time per image, also for 224 px photos through resnet18.

    python benchmarks/bench_search.py [--images 1000] [--models resnet18 lite0]
        [--rounds 3]
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings

import numpy as np
import torch
import torchvision
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV, cross_val_score
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler

from sklearn_cnn import CNNFeatureTransformer, cache_size
from sklearn_cnn._cache import image_digests, module_digest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _offline import lite0, load_animal_mnist  # noqa: E402

LAYERS = {
    "resnet18": ["layer1", "layer2", "layer3", "layer4", None],
    "lite0": ["_blocks.4", "_blocks.7", "_blocks.10", "_blocks.15", None],
}
COUNT = {"images": 0}


def _count(_module: torch.nn.Module, args: tuple) -> None:
    COUNT["images"] += len(args[0])


def build(name: str) -> torch.nn.Module:
    """The network, with the pass counter; resnet18's random weights seeded."""
    if name == "resnet18":
        torch.manual_seed(0)
        model = torchvision.models.resnet18()
    else:
        model = lite0()["model"]()
    model.register_forward_pre_hook(_count)
    return model


def params(name: str, size: int) -> dict:
    model = functools.partial(build, name)
    if name == "resnet18":  # weights=None: keep the module's (seeded) weights
        # random_state says the random weights are reproducible, so that fits
        # share the network (as the user guide advises for weights=None).
        return {"model": model, "weights": None, "image_size": size, "random_state": 0}
    return {**lite0(), "model": model, "image_size": size}


def counted(fn):
    """``fn()``'s result, wall time and images forwarded."""
    COUNT["images"] = 0
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start, COUNT["images"]


def search(name: str, size: int, memory, cv: int) -> GridSearchCV:
    pipe = Pipeline(
        [
            ("cnn", CNNFeatureTransformer(**params(name, size), memory=memory)),
            ("scale", StandardScaler()),
            ("clf", LogisticRegression()),
        ]
    )
    return GridSearchCV(pipe, {"cnn__layer": LAYERS[name]}, cv=cv)


def multiply_adds(name: str, size: int, upto: str) -> tuple[int, int]:
    """Conv and linear multiply-adds of one image: up to ``upto``, and in all."""
    model = build(name).eval()
    total = [0]
    at = {}

    def hook(m, args, out):
        if isinstance(m, torch.nn.Conv2d):
            k = m.kernel_size[0] * m.kernel_size[1] * m.in_channels // m.groups
            total[0] += out.numel() * k
        elif isinstance(m, torch.nn.Linear):
            total[0] += out.numel() * m.in_features

    handles = [m.register_forward_hook(hook) for m in model.modules()]
    modules = dict(model.named_modules())

    def mark(*_args) -> None:  # returns None: the output stays as it is
        at.setdefault("x", total[0])

    handles.append(modules[upto].register_forward_hook(mark))
    with torch.inference_mode():
        model(torch.zeros(1, 3, size, size))
    for h in handles:
        h.remove()
    return at["x"], total[0]


def linear_alone(features: dict, y: np.ndarray, cv: int) -> tuple[float, list]:
    """The search's linear models on precomputed features: time and scores."""
    start = time.perf_counter()
    scores = []
    for F in features.values():
        lin = make_pipeline(StandardScaler(), LogisticRegression())
        scores.append(cross_val_score(lin, F, y, cv=cv).mean())
    best = list(features.values())[int(np.argmax(scores))]
    make_pipeline(StandardScaler(), LogisticRegression()).fit(best, y)
    return time.perf_counter() - start, scores


def bench(
    name: str, X: np.ndarray, y: np.ndarray, size: int, cv: int, rounds: int = 1
) -> None:
    n = len(X)
    print(f"\n== {name}: {n} images, {size} px, layers {LAYERS[name]}, cv={cv}")
    _, _, probe = counted(
        lambda: CNNFeatureTransformer(**params(name, size)).fit(X[:2])
    )

    def per_image(images: int) -> str:
        # Every image forwarded counts, the fits' one-image probes included
        # (fits with memory= share a network, and so probe it once).
        return f"{images / n:.2f} ({images} images forwarded)"

    # Rounds of (uncached, cold) pairs, each cold one on an empty cache: the
    # shared machine's speed drifts by 10-30 % between minutes, so the ratio
    # is taken within each pair and the median reported.
    ratios = []
    for _ in range(rounds - 1):
        _, t_unc, _ = counted(lambda: search(name, size, None, cv).fit(X, y))
        with tempfile.TemporaryDirectory() as memory:
            _, t_cold, _ = counted(lambda: search(name, size, memory, cv).fit(X, y))
        ratios.append(t_unc / t_cold)
    uncached, t_unc, p_unc = counted(lambda: search(name, size, None, cv).fit(X, y))
    with tempfile.TemporaryDirectory() as memory:
        cold, t_cold, p_cold = counted(lambda: search(name, size, memory, cv).fit(X, y))
        ratios.append(t_unc / t_cold)
        warm, t_warm, p_warm = counted(lambda: search(name, size, memory, cv).fit(X, y))
        size_mb = cache_size(memory) / 2**20
        features = {
            str(layer): CNNFeatureTransformer(
                **params(name, size), layer=layer, memory=memory
            ).fit_transform(X)
            for layer in LAYERS[name]
        }
    t_lin, lin_scores = linear_alone(features, y, cv)

    scores = {
        "uncached": uncached.cv_results_["mean_test_score"],
        "cached": cold.cv_results_["mean_test_score"],
        "warm": warm.cv_results_["mean_test_score"],
    }
    print(f"{'search':<22}{'wall s':>9}{'  passes per image'}")
    for label, t, p in [
        ("uncached", t_unc, p_unc),
        ("memory= (cold)", t_cold, p_cold),
        ("memory= (warm)", t_warm, p_warm),
        ("linear models alone", t_lin, None),
    ]:
        print(f"{label:<22}{t:>9.1f}  {per_image(p) if p is not None else '-'}")
    print(f"cache size: {size_mb:.1f} MiB")
    print(f"mean cv scores, uncached: {np.round(scores['uncached'], 4).tolist()}")
    for label in ("cached", "warm"):
        same = np.array_equal(scores[label], scores["uncached"])
        diff = np.abs(scores[label] - scores["uncached"]).max()
        print(f"  {label} == uncached: {same} (max |diff| {diff:.2g})")
    print(f"  linear alone: {np.round(lin_scores, 4).tolist()}")
    print(f"  best layer: {uncached.best_params_} (cached: {cold.best_params_})")
    print(
        f"RATIO uncached / cached (cold): {statistics.median(ratios):.1f}x "
        f"(median of {rounds} rounds: {', '.join(f'{r:.1f}' for r in ratios)})"
    )
    print(f"RATIO warm / linear models alone: {t_warm / t_lin:.2f}x")
    print(f"RATIO images forwarded uncached / cached: {p_unc / p_cold:.1f}x "
          f"(a fit's probe: {probe} images)")  # fmt: skip

    # An early layer against the last one, without the cache.
    early = LAYERS[name][0]
    times = {}
    for layer in (early, None):
        est = CNNFeatureTransformer(**params(name, size), layer=layer).fit(X[:2])
        est.transform(X[:64])  # warm-up
        times[layer] = min(
            counted(lambda est=est: est.transform(X))[1] for _ in range(2)
        )
    head = "fc" if name == "resnet18" else "_fc"
    upto, total = multiply_adds(name, size, early)
    before_head, _ = multiply_adds(name, size, head)
    print(
        f"uncached transform {early}: {times[early]:.2f} s, last layer: "
        f"{times[None]:.2f} s -> time share {times[early] / times[None]:.2f}, "
        f"multiply-add share {upto / before_head:.2f}"
    )

    report_hashing(name, X, size, forward=times[None] / n)


def report_hashing(name: str, X: np.ndarray, size: int, forward: float) -> None:
    """Hashing the images and the weights, against ``forward`` s per image."""
    t_hash = min(counted(lambda: image_digests(X))[1] for _ in range(3)) / len(X)
    print(
        f"{name}: hash per image ({X.shape[1:]} {X.dtype}): {t_hash * 1e6:.1f} us; "
        f"forward per image (last layer, {size} px): {forward * 1e3:.2f} ms "
        f"-> RATIO forward / hash {forward / t_hash:.0f}x"
    )
    model = build(name)
    t_build = min(counted(lambda: build(name))[1] for _ in range(3))
    t_weights = min(counted(lambda: module_digest(model))[1] for _ in range(3))
    mb = sum(t.numel() * t.element_size() for t in model.state_dict().values()) / 2**20
    print(
        f"  weights digest ({mb:.0f} MiB): {t_weights * 1e3:.0f} ms per fit "
        f"(building the network: {t_build * 1e3:.0f} ms)"
    )


def hashing(name: str, X: np.ndarray, size: int) -> None:
    """Hashing against the forward pass alone (``--hashing-only``)."""
    est = CNNFeatureTransformer(**params(name, size)).fit(X[:2])
    est.transform(X[:32])  # warm-up
    sample = X[:256]
    forward = min(counted(lambda: est.transform(sample))[1] for _ in range(2))
    report_hashing(name, X, size, forward=forward / len(sample))


def photos_224() -> None:
    """Hashing against resnet18's forward pass for 224 px RGB photos."""
    X = np.random.default_rng(0).integers(0, 256, (128, 224, 224, 3), dtype=np.uint8)
    est = CNNFeatureTransformer(**params("resnet18", 224)).fit(X[:2])
    est.transform(X[:16])
    forward = min(counted(lambda: est.transform(X))[1] for _ in range(2)) / len(X)
    t_hash = min(counted(lambda: image_digests(X))[1] for _ in range(3)) / len(X)
    print(
        f"\n224 px RGB photos: hash {t_hash * 1e6:.0f} us per image, resnet18 "
        f"forward {forward * 1e3:.1f} ms per image -> RATIO forward / hash "
        f"{forward / t_hash:.0f}x"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--cv", type=int, default=5)
    parser.add_argument(
        "--rounds", type=int, default=1, help="(uncached, cold) pairs; median ratio"
    )
    parser.add_argument("--models", nargs="+", default=["resnet18", "lite0"])
    parser.add_argument("--no-photos", action="store_true", help="skip 224 px")
    parser.add_argument(
        "--hashing-only", action="store_true", help="only hashing against forward"
    )
    args = parser.parse_args()
    sys.stdout.reconfigure(line_buffering=True)  # progress shows in a log file
    # The search uses LogisticRegression(): its default 100 iterations
    # do not always converge on these features; that is the same for all runs.
    warnings.simplefilter("ignore", ConvergenceWarning)
    print(
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    X, y = load_animal_mnist(args.images, random_state=0)
    for name in args.models:
        if args.hashing_only:
            hashing(name, X, args.size)
        else:
            bench(name, X, y, args.size, args.cv, args.rounds)
    if not args.no_photos:
        photos_224()


if __name__ == "__main__":
    main()
