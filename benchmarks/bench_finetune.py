"""FineTuneClassifier on real data, and its epoch time against a hand-written loop.

Two parts, both with ImageNet EfficientNet-Lite0 (offline weights, see
``benchmarks/_offline.py``) on Animal-MNIST silhouettes resized to 64 px:

``accuracy``
    3,000 images, a stratified third held out. ``FineTuneClassifier`` with its
    defaults but ``freeze=0.5, epochs=5`` against the linear probe
    ``Pipeline(CNNFeatureTransformer, StandardScaler, LogisticRegression)`` on
    the same split, for several ``random_state`` values (the split stays).
    Prints the test accuracies, the per-epoch curves and the times. The
    library's promise: fine-tuning by default is never worse than the probe.
    ``--ablation`` adds what the defaults avoid: a random head and/or BatchNorm
    layers that train.

``speed``
    Epoch time of ``FineTuneClassifier`` against what a PyTorch user writes by
    hand with the same model, weights, images, batch size and freezing
    (``freeze=0.5``, BatchNorm in eval mode, AdamW), without augmentation or a
    validation split: each batch is sliced from the uint8 array, resized and
    normalized in the loop (as a Dataset transform would), then forward,
    cross-entropy, backward, step, schedule step. One epoch of every candidate
    per round, rounds interleaved and repeated in one process, ratios taken
    round by round because these machines are noisy: the medians are what to
    quote. "same settings" means the reference uses what the classifier picks on
    this machine (channels_last, and bf16 autocast where the CPU has native
    bf16); the plain fp32 reference is shown for scale.

``freeze-search``
    ``GridSearchCV`` over ``freeze`` without and with ``memory=``, then again
    on the warm cache: wall time and whether the cv scores are identical.

``prefix``
    Epoch time when the frozen part is computed once per fit (the default
    without augmentation): ``freeze="backbone"`` (the epochs train the head on
    stored pooled features) and ``freeze=0.5`` (the epochs run the network
    after its frozen prefix, on stored outputs), against the image path.

    python benchmarks/bench_finetune.py
        [--part accuracy|speed|prefix|freeze-search|all]
        [--images 3000] [--seeds 0,1,2] [--ablation] [--speed-images 1024]
        [--rounds 8]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from torchvision.transforms.v2 import functional as TF

from sklearn_cnn import CNNFeatureTransformer, FineTuneClassifier
from sklearn_cnn._freezing import _frozen_modules, apply_freeze

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _offline import lite0, load_animal_mnist  # noqa: E402

SIZE = 64


def accuracy(n_images: int, seeds: list[int], ablation: bool) -> None:
    X, y = load_animal_mnist(n_images, random_state=0)
    X_train, X_test, y_train, y_test = train_test_split(
        X, y, test_size=1 / 3, stratify=y, random_state=0
    )
    print(
        f"Animal-MNIST: {len(X_train)} training and {len(X_test)} test images, "
        f"{SIZE} px, EfficientNet-Lite0 (ImageNet), {torch.get_num_threads()} "
        "threads\n"
    )

    start = time.perf_counter()
    probe = make_pipeline(
        CNNFeatureTransformer(**lite0(), image_size=SIZE),
        StandardScaler(),
        LogisticRegression(max_iter=1000),
    ).fit(X_train, y_train)
    probe_fit = time.perf_counter() - start
    probe_acc = probe.score(X_test, y_test)

    results = []
    for seed in seeds:
        start = time.perf_counter()
        clf = FineTuneClassifier(
            **lite0(), image_size=SIZE, freeze=0.5, epochs=5, random_state=seed
        ).fit(X_train, y_train)
        results.append(
            (seed, clf, clf.score(X_test, y_test), time.perf_counter() - start)
        )

    for seed, clf, _, _ in results:
        print(
            "FineTuneClassifier(freeze=0.5, epochs=5), otherwise the defaults; "
            f"random_state={seed}:"
        )
        header = ("epoch", "train loss", "valid loss", "valid acc", "s")
        print("{:>6} {:>11} {:>11} {:>10} {:>6}".format(*header))
        for row in clf.history_:
            print(
                f"{row['epoch']:>6} {row['train_loss']:11.4f} "
                f"{row['valid_loss']:11.4f} {row['valid_accuracy']:10.4f} "
                f"{row['time']:6.1f}"
            )
        print(f"best epoch {clf.best_epoch_}\n")
    clf = results[0][1]
    print(
        "(epoch 0: the probe head before fine-tuning, its time the setup; "
        f"{clf.n_trainable_params_:,} trainable parameters)\n"
    )
    print(f"{'':44} {'test accuracy':>13} {'fit time (s)':>13}")
    name = "linear probe (Lite0 features + LogReg)"
    print(f"{name:44} {probe_acc:13.4f} {probe_fit:13.1f}")
    for seed, _, acc, fit_time in results:
        name = f"FineTuneClassifier, random_state={seed}"
        print(f"{name:44} {acc:13.4f} {fit_time:13.1f}")
    if ablation:  # what the defaults avoid: a random head, BatchNorm training
        for params in (
            dict(head_init="random", batchnorm="train"),
            dict(head_init="random"),
            dict(batchnorm="train"),
        ):
            start = time.perf_counter()
            other = FineTuneClassifier(
                **lite0(), image_size=SIZE, freeze=0.5, epochs=5, random_state=0,
                **params,
            ).fit(X_train, y_train)  # fmt: skip
            name = ", ".join(f"{k}={v!r}" for k, v in params.items())
            curve = " ".join(f"{r['valid_accuracy']:.3f}" for r in other.history_)
            print(
                f"{name:44} {other.score(X_test, y_test):13.4f} "
                f"{time.perf_counter() - start:13.1f}   (valid: {curve})"
            )
    worst = min(acc for _, _, acc, _ in results)
    verdict = "matches or beats" if worst >= probe_acc else "is BELOW"
    print(f"\nFine-tuning {verdict} the probe (worst seed {worst - probe_acc:+.4f}).")


# --------------------------------------------------------------------------
# speed
# --------------------------------------------------------------------------


def hand_epoch(model, optimizer, schedule, X, y, batch_size, mean, std, cl, dtype, rng):
    """One epoch as written by hand: what FineTuneClassifier should cost."""
    model.train()
    for m in model.modules():  # frozen modules and every BatchNorm: eval mode
        if getattr(m, "frozen", False) or isinstance(m, torch.nn.BatchNorm2d):
            m.training = False
    order = rng.permutation(len(X))
    for start in range(0, len(X), batch_size):
        idx = order[start : start + batch_size]
        x = torch.from_numpy(X[idx]).unsqueeze(1).expand(-1, 3, -1, -1)
        x = TF.resize(x, [SIZE, SIZE], antialias=True).float().div_(255.0)
        x = (x - mean) / std
        if cl:
            x = x.contiguous(memory_format=torch.channels_last)
        target = torch.from_numpy(y[idx])
        with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=bool(dtype)):
            logits = model(x)
        loss = F.cross_entropy(logits.float(), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()


def speed(n_images: int, rounds: int, batch_size: int) -> None:
    X, y = load_animal_mnist(n_images, random_state=0)
    common = dict(
        **lite0(),
        image_size=SIZE,
        freeze=0.5,
        batch_size=batch_size,
        augment=None,
        validation_fraction=None,
        head_init="random",
        epochs=1,
        random_state=0,
        device="cpu",
    )
    ours = {
        p: FineTuneClassifier(**common, precision=p).fit(X, y) for p in ("fp32", "auto")
    }
    auto_dtype = ours["auto"]._network.dtype

    # The references: the classifier's own network (same weights, same frozen
    # modules), trained by hand.
    clf = ours["fp32"]
    modules = _frozen_modules(clf.model_, clf.trace_, clf.head_, clf.stages_, 0.5)
    apply_freeze(clf.model_, clf.trace_, modules)
    frozen = {n for n, p in clf.model_.named_parameters() if not p.requires_grad}
    mean = torch.tensor([0.5, 0.5, 0.5]).view(1, 3, 1, 1)
    std = torch.tensor([0.5, 0.5, 0.5]).view(1, 3, 1, 1)
    y64 = y.astype(np.int64)

    def reference(cl: bool, dtype):
        model = copy.deepcopy(clf.model_)
        if not cl:
            model = model.to(memory_format=torch.contiguous_format)
        for name, p in model.named_parameters():
            p.requires_grad_(name not in frozen)
        for name, m in model.named_modules():
            m.frozen = name in modules
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-4)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
        rng = np.random.default_rng(0)
        return lambda: hand_epoch(
            model, optimizer, schedule, X, y64, batch_size, mean, std, cl, dtype, rng
        )

    def ours_epoch(est: FineTuneClassifier):
        def run() -> float:
            est.set_params(warm_start=True).fit(X, y)
            return est.history_[-1]["time"]

        return run

    label = "bf16" if auto_dtype is not None else "fp32"
    candidates = {
        f"hand loop, same settings ({label}, channels_last)": reference(
            True, auto_dtype
        ),
        "FineTuneClassifier default (precision='auto')": ours_epoch(ours["auto"]),
        "hand loop, fp32, channels_last": reference(True, None),
        "FineTuneClassifier precision='fp32'": ours_epoch(ours["fp32"]),
        "hand loop, plain fp32 (contiguous)": reference(False, None),
    }
    names = list(candidates)
    for fn in candidates.values():  # warm-up
        fn()
    epoch: dict[str, list[float]] = {n: [] for n in names}
    wall: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        # Alternate the order, so that no candidate always follows the same one.
        for name in names if r % 2 == 0 else names[::-1]:
            start, cpu_start = time.perf_counter(), time.process_time()
            inner = candidates[name]()
            elapsed = time.perf_counter() - start
            cpu[name].append(time.process_time() - cpu_start)
            wall[name].append(elapsed)
            epoch[name].append(inner if inner is not None else elapsed)

    print(
        f"Lite0, {n_images} Animal-MNIST images at {SIZE} px, batch {batch_size}, "
        f"freeze=0.5 ({clf.n_trainable_params_:,} trainable parameters), "
        f"{torch.get_num_threads()} threads, {rounds} interleaved rounds"
    )
    print(
        f"{'':52} {'epoch s':>7} {'img/s':>5} {'ratio':>6} {'min':>6} "
        f"{'fit call':>8} {'cpu':>6}"
    )
    pairs = {names[1]: names[0], names[3]: names[2]}
    for name in names:
        med = statistics.median(epoch[name])
        cols = ["", "", "", ""]
        if name in pairs:
            ref = pairs[name]

            def median_ratio(ours: list[float], theirs: list[float]) -> str:
                r = [a / b for a, b in zip(ours, theirs, strict=True)]
                return f"{statistics.median(r):.3f}x"

            cols = [
                median_ratio(epoch[name], epoch[ref]),
                f"{min(epoch[name]) / min(epoch[ref]):.3f}x",
                median_ratio(wall[name], epoch[ref]),
                median_ratio(cpu[name], cpu[ref]),
            ]
        print(
            f"{name:52} {med:7.2f} {n_images / med:5.0f} {cols[0]:>6} {cols[1]:>6} "
            f"{cols[2]:>8} {cols[3]:>6}"
        )
    print(
        "ratio: epoch time (history_) over that of the reference just above it, "
        "median of the\nper-round ratios (1.000 = same speed); min: ratio of the "
        "fastest rounds; fit call:\nthe whole warm-start fit(epochs=1) call over "
        "the reference's epoch; cpu: the same in CPU\ntime of this process "
        "(less sensitive to other processes on a shared machine)."
    )


def identity(image: torch.Tensor) -> torch.Tensor:
    """An augmentation that changes nothing: forces the image path."""
    return image


def prefix(n_images: int, epochs: int) -> None:
    """Epoch time with what is frozen computed once (the default without
    augmentation) against running it every epoch (an identity ``augment``
    forces that path), for ``freeze="backbone"`` and ``freeze=0.5``."""
    X, y = load_animal_mnist(n_images, random_state=0)
    print(
        f"Frozen part computed once: {n_images} Animal-MNIST images at {SIZE} px, "
        f"Lite0, {epochs} epochs, no augmentation, no validation split\n"
    )
    print(f"{'freeze':>10} {'stored':>8} {'fit (s)':>8} {'epoch (s)':>10} {'ratio':>6}")
    for freeze in ("backbone", 0.5):
        times = {}
        for stored, augment in ((False, identity), (True, None)):
            tic = time.perf_counter()
            clf = FineTuneClassifier(
                **lite0(), image_size=SIZE, freeze=freeze, epochs=epochs,
                augment=augment, validation_fraction=None, random_state=0,
            ).fit(X, y)  # fmt: skip
            fit = time.perf_counter() - tic
            epoch = statistics.median(r["time"] for r in clf.history_[1:])
            times[stored] = epoch
            ratio = times[False] / epoch if stored else 1.0
            print(
                f"{freeze!r:>10} {stored!s:>8} {fit:8.1f} {epoch:10.2f} {ratio:6.1f}",
                flush=True,
            )


def freeze_search(n_images: int, epochs: int) -> None:
    """``GridSearchCV`` over ``freeze`` without and with ``memory=``: what each
    fit computes once per image (the probe's features, a frozen prefix) is
    read from the cache by the other folds and by candidates that share it."""
    from sklearn.model_selection import GridSearchCV

    X, y = load_animal_mnist(n_images, random_state=0)
    grid = {"freeze": ["backbone", 0.75, 0.5]}
    print(
        f"Search over freeze {grid['freeze']}, cv=3: {n_images} Animal-MNIST "
        f"images at {SIZE} px, Lite0, {epochs} epochs, no augmentation\n"
    )
    scores, times = {}, {}
    with tempfile.TemporaryDirectory() as memory:
        for label, mem in (("uncached", None), ("memory= (cold)", memory),
                           ("memory= (warm)", memory)):  # fmt: skip
            est = FineTuneClassifier(
                **lite0(), image_size=SIZE, epochs=epochs, augment=None,
                validation_fraction=None, random_state=0, memory=mem,
            )  # fmt: skip
            tic = time.perf_counter()
            search = GridSearchCV(est, grid, cv=3).fit(X, y)
            times[label] = time.perf_counter() - tic
            scores[label] = search.cv_results_["mean_test_score"]
            print(f"{label:>16}: {times[label]:7.1f} s, mean cv scores "
                  f"{np.round(scores[label], 3).tolist()}", flush=True)  # fmt: skip
    for label in ("memory= (cold)", "memory= (warm)"):
        same = np.array_equal(scores[label], scores["uncached"])
        print(f"RATIO uncached / {label}: {times['uncached'] / times[label]:.2f}x "
              f"(cv scores identical: {same})")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--part",
        choices=["accuracy", "speed", "prefix", "freeze-search", "all"],
        default="all",
    )
    parser.add_argument("--prefix-images", type=int, default=1000)
    parser.add_argument("--prefix-epochs", type=int, default=3)
    parser.add_argument("--images", type=int, default=3000)
    parser.add_argument("--seeds", default="0,1,2", help="random_state values")
    parser.add_argument(
        "--ablation",
        action="store_true",
        help="also fine-tune with a random head and/or BatchNorm training",
    )
    parser.add_argument("--speed-images", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=8)
    args = parser.parse_args()
    if args.part in ("accuracy", "all"):
        seeds = [int(s) for s in args.seeds.split(",")]
        accuracy(args.images, seeds, args.ablation)
    if args.part in ("speed", "all"):
        print()
        speed(args.speed_images, args.rounds, args.batch_size)
    if args.part in ("prefix", "all"):
        print()
        prefix(args.prefix_images, args.prefix_epochs)
    if args.part in ("freeze-search", "all"):
        print()
        freeze_search(args.prefix_images, args.prefix_epochs)


if __name__ == "__main__":
    main()
