"""Throughput of CNNFeatureTransformer against a hand-written PyTorch loop.

resnet18 at 224 px, penultimate (pooled 512-d) features, the same uint8 images
and batch size. The reference is what a PyTorch user writes by hand: float32,
contiguous tensors, ``inference_mode``. Runs are interleaved and repeated in one
process, and the ratios are taken round by round, because these machines are
noisy; the medians are what to quote.

    python benchmarks/bench_transform.py [--images 256] [--rounds 5]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import numpy as np
import torch
import torchvision

from sklearn_cnn import CNNFeatureTransformer

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def hand_loop(model: torch.nn.Module, X: np.ndarray, batch_size: int) -> np.ndarray:
    """The reference: plain fp32, contiguous NCHW, no autocast."""
    out = []
    with torch.inference_mode():
        for start in range(0, len(X), batch_size):
            x = torch.from_numpy(X[start : start + batch_size]).permute(0, 3, 1, 2)
            x = (x.float() / 255.0 - MEAN) / STD
            out.append(model(x.contiguous()).numpy())
    return np.concatenate(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    X = rng.integers(0, 256, (args.images, 224, 224, 3), dtype=np.uint8)
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).eval()
    reference = copy.deepcopy(model)
    reference.fc = torch.nn.Identity()  # penultimate features, by hand

    def ours(precision: str) -> CNNFeatureTransformer:
        # The same weights as the reference; image_size=224 with 224 px input
        # makes preprocessing a no-op resize plus normalization, as by hand.
        return CNNFeatureTransformer(
            model,
            weights=None,
            image_size=224,
            batch_size=args.batch_size,
            precision=precision,
            device="cpu",
        ).fit(X[:1])

    candidates = {
        "hand-written loop (fp32, contiguous)": lambda X: hand_loop(
            reference, X, args.batch_size
        ),
        'CNNFeatureTransformer precision="fp32"': ours("fp32").transform,
        'CNNFeatureTransformer default (precision="auto")': ours("auto").transform,
    }
    names = list(candidates)
    outputs = {name: fn(X) for name, fn in candidates.items()}  # also warms up
    times: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(args.rounds):
        for name, fn in candidates.items():
            start = time.perf_counter()
            fn(X)
            times[name].append(time.perf_counter() - start)

    ref = outputs[names[0]]
    print(
        f"resnet18, {args.images} images at 224 px, batch {args.batch_size}, "
        f"{torch.get_num_threads()} threads, {args.rounds} interleaved rounds"
    )
    print(f"{'':52} {'images/s':>9} {'speed-up vs loop':>17} {'min cosine':>11}")
    for name in names:
        rate = args.images / statistics.median(times[name])
        ratios = [
            t_ref / t for t_ref, t in zip(times[names[0]], times[name], strict=True)
        ]
        out = outputs[name]
        cosine = (out * ref).sum(1) / (
            np.linalg.norm(out, axis=1) * np.linalg.norm(ref, axis=1)
        )
        speedup = statistics.median(ratios)
        print(f"{name:52} {rate:9.1f} {speedup:16.2f}x {cosine.min():11.6f}")


if __name__ == "__main__":
    main()
