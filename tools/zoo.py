"""Run every torchvision classification model through sklearn_cnn.

For each of ``torchvision.models.list_models(module=torchvision.models)``
(random weights, nothing is downloaded) at the smallest input size the model
accepts among a few (the size its ``fit`` error names, if 32 px is refused):

- ``list_layers``: runs, and how many layers have an unknown layout;
- ``transform`` at ``layer=None``: the features equal the classifier's input
  captured by a forward pre-hook of our own;
- ``transform`` at a mid-network layer (the middle of ``list_layers`` among
  maps and tokens): the features equal that layer's output captured by our
  own hook and averaged by hand over every axis but the channel axis, which
  is found independently of the library: the one axis whose length does not
  change when the input size does (fixed-size ViTs and MaxViT are rebuilt
  for a second size), with the class token left out of ViT tokens;
- ``FineTuneClassifier(freeze=0.5, epochs=1, weights=None)`` fit and predict
  on 8 images of 2 classes (2 of them for validation).

Each model runs in its own process (memory, crashes). Prints a table in
reStructuredText (the one in docs/models.rst) and the totals::

    python tools/zoo.py [--models resnet18 vit_b_16 ...] [--threads 2]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import subprocess
import sys
import time
import traceback
import warnings

TOKENS_PREFIX = 1  # torchvision's ViTs: one class token first
# Run last: the largest models (minutes each on a small CPU machine).
HEAVY = (
    "vit_", "regnet_y_16", "regnet_y_32", "regnet_y_128", "regnet_x_32", "_large",
    "efficientnet_b7", "efficientnet_b6", "efficientnet_v2_l", "swin_v2_b", "swin_b",
    "vgg19", "maxvit",
)  # fmt: skip


# ---------------------------------------------------------------------------
# Reference computations, independent of the library (tests/test_zoo.py uses
# them too): hooks of our own, pooling by hand, the channel axis found from a
# second input size.
# ---------------------------------------------------------------------------


def build(name: str, size: int | None = None):
    """``name`` with seeded random weights, built for input ``size`` where the
    architecture fixes it (ViTs, MaxViT), in eval mode.

    BatchNorm statistics are made like trained ones, not the identity of a
    fresh init: transform folds BatchNorms into convolutions, and a wrong
    fold must show.
    """
    import torch
    import torchvision

    kwargs = {}
    if size is not None and name.startswith("vit_"):
        kwargs["image_size"] = size
    if size is not None and name.startswith("maxvit"):
        kwargs["input_size"] = (size, size)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # inception's init
        model = torchvision.models.get_model(name, weights=None, **kwargs).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.3, 2.0)
                m.weight.uniform_(0.25, 1.75)
                m.bias.uniform_(-0.2, 0.2)
    return model


def second_size(name: str, size: int) -> int:
    """Another input size the model accepts: two more ViT patches, twice the
    size for MaxViT (windows of 7 at every stage), else 32 px more."""
    if name.startswith("vit_"):
        return size + 2 * int(re.search(r"_(\d+)$", name).group(1))
    if name.startswith("maxvit"):
        return 2 * size
    return size + 32


def alt_model(name: str, model, size: int):
    """The model to run at ``second_size``, and that size: ``model`` itself,
    or the same architecture rebuilt where it fixes its input size."""
    size2 = second_size(name, size)
    if name.startswith(("vit_", "maxvit")):
        return build(name, size2), size2
    return model, size2


def hooked(model, name: str, x, pre: bool = False):
    """The output (the input with ``pre``) of ``model``'s module ``name`` for
    input ``x``, by a hook of our own, as float64."""
    import torch

    seen = []
    module = model.get_submodule(name)
    if pre:
        handle = module.register_forward_pre_hook(
            lambda m, a: seen.append(a[0].clone())
        )
    else:
        # A copy: an in-place op after the layer (ReLU(inplace=True)) would
        # change the tensor itself.
        handle = module.register_forward_hook(lambda m, a, o: seen.append(o.clone()))
    try:
        with torch.no_grad():
            model.eval()(x)
    finally:
        handle.remove()
    return seen[0].detach().double()


def atol(expected) -> float:
    """Random weights without pretrained statistics give activations up to
    1e7 (inception): a tolerance relative to the largest."""
    return 1e-4 * max(1.0, float(expected.abs().max()))


def normalized(X):
    """uint8 images (N, H, W, 3) as the network's input, ImageNet-normalized."""
    import torch

    mean = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
    std = torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    x = torch.from_numpy(X).permute(0, 3, 1, 2).float() / 255
    return ((x - mean) / std).contiguous()


def expected_penultimate(model, head: str | None, x):
    """The classifier's input (the network's output without a Linear head,
    as squeezenet's convolutional classifier), flattened."""
    import torch

    if head is None:
        with torch.no_grad():
            return model.eval()(x).double()
    return hooked(model, head, x, pre=True).flatten(1)


def expected_mid(name: str, model, layer: str, x, size: int):
    """``layer``'s output averaged by hand over every axis but the channel
    axis: the one axis whose length does not change at ``second_size`` (ViT
    tokens without their class token)."""
    import torch

    t = hooked(model, layer, x)
    other, size2 = alt_model(name, model, size)
    t2 = hooked(other, layer, torch.zeros(1, 3, size2, size2))
    same = [i for i in range(1, t.ndim) if t.shape[i] == t2.shape[i]]
    if name.startswith("maxvit") and len(same) == 2:
        # (N, windows, tokens per window, C): 7 x 7 tokens at any size.
        same = [i for i in same if t.shape[i] != model.partition_size**2]
    if len(same) != 1:
        raise AssertionError(f"channel axis not unique: {t.shape} vs {t2.shape}")
    axis = same[0]
    if name.startswith("vit_") and t.ndim == 3:  # tokens: class token out
        t = t.narrow(3 - axis, TOKENS_PREFIX, t.shape[3 - axis] - TOKENS_PREFIX)
    return t.mean(tuple(i for i in range(1, t.ndim) if i != axis))


def _all_layers(name: str, module, layers, size: int) -> str:
    """Of the layers whose output scales with the input, how many pool to the
    length of the axis that does not (the channel or embedding axis)."""
    from sklearn_cnn import list_layers
    from sklearn_cnn._layers import pooled_width

    alt, size2 = alt_model(name, module, size)
    other = {la.name: la for la in list_layers(alt, image_size=size2)}
    window = getattr(module, "partition_size", 0) ** 2
    good = checked = 0
    for layer in layers:
        a = layer.output_shape
        b = other[layer.name].output_shape if layer.name in other else a
        if len(a) < 2 or a == b:  # vectors; tables that do not scale
            continue
        same = [i for i in range(len(a)) if a[i] == b[i]]
        if len(same) == 2 and window:  # MaxViT windows: 7 x 7 tokens each
            same = [i for i in same if a[i] != window]
        checked += 1
        if len(same) == 1 and pooled_width(a, "avg", layer.layout) == a[same[0]]:
            good += 1
    return f"{good}/{checked}"


def _size_for(module, X_of) -> int:
    """32 px, or the size that fit's error names."""
    from sklearn_cnn import CNNFeatureTransformer

    size = 32
    for _ in range(3):
        try:
            CNNFeatureTransformer(module, image_size=size).fit(X_of(size)[:1])
            return size
        except ValueError as exc:
            found = re.search(r"image_size=(\d+)", str(exc))
            if not found:
                raise
            size = int(found.group(1))
    return size


def run_one(name: str) -> dict:
    import numpy as np
    from numpy.testing import assert_allclose

    from sklearn_cnn import CNNFeatureTransformer, FineTuneClassifier, list_layers

    warnings.simplefilter("ignore")
    rng = np.random.default_rng(0)

    def X_of(size: int, n: int = 2):
        return rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)

    row: dict = {"model": name}
    start = time.perf_counter()
    # Built once (seeded); the estimators copy it. Only the penultimate run
    # builds from the name, as a user would.
    module = build(name)
    try:
        size = _size_for(module, X_of)
    except Exception as exc:  # noqa: BLE001 - reported in the table
        row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
        return row
    row["size"] = size
    X = X_of(size)
    x = normalized(X)

    # list_layers
    try:
        layers = list_layers(module, image_size=size)
        row["layers"] = len(layers)
        row["unknown"] = sum(layer.layout is None for layer in layers)
        row["list_layers"] = True
    except Exception as exc:  # noqa: BLE001
        row["list_layers"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:100]}"
        layers = []

    # penultimate
    try:
        est = CNNFeatureTransformer(
            name, weights=None, image_size=size, precision="fp32", random_state=0
        ).fit(X)
        out = est.transform(X)
        expected = expected_penultimate(est.model_, est.trace_.head, x)
        assert_allclose(out, expected.numpy(), rtol=1e-3, atol=atol(expected))
        row["penultimate"] = out.shape[1]
    except Exception as exc:  # noqa: BLE001
        row["penultimate"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:100]}"
    est = None  # free its copy of the network (vit_h_14: 2.5 GB each)
    gc.collect()

    # mid layer, with an independent channel axis
    try:
        maps = [la for la in layers if len(la.output_shape) >= 2]
        mid = maps[len(maps) // 2]
        row["mid"] = mid.name
        row["layout"] = mid.layout
        est = CNNFeatureTransformer(
            module, image_size=size, layer=mid.name, precision="fp32"
        ).fit(X)
        out = est.transform(X)
        expected = expected_mid(name, est.model_, mid.name, x, size)
        assert out.shape == expected.shape, (out.shape, expected.shape)
        assert_allclose(out, expected.numpy(), rtol=1e-3, atol=atol(expected))
        row["mid_width"] = out.shape[1]
    except Exception as exc:  # noqa: BLE001
        row["mid_width"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:100]}"

    # Transformers' and ConvNeXt's every layer: pooled width = channel axis.
    if name.startswith(("vit_", "swin", "convnext", "maxvit")):
        try:
            row["all_layers"] = _all_layers(name, module, layers, size)
        except Exception as exc:  # noqa: BLE001
            row["all_layers"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:80]}"

    est = expected = None
    gc.collect()

    # fine-tuning
    try:
        Xf = X_of(size, 8)
        y = np.repeat([0, 1], 4)
        clf = FineTuneClassifier(
            module, freeze=0.5, epochs=1, image_size=size, batch_size=4,
            validation_fraction=0.25, random_state=0, precision="fp32",
        ).fit(Xf, y)  # fmt: skip
        pred = clf.predict(Xf[:4])
        assert pred.shape == (4,)
        row["finetune"] = True
    except Exception as exc:  # noqa: BLE001
        tb = traceback.extract_tb(exc.__traceback__)[-1]
        where = f" ({tb.filename.rsplit('/', 1)[-1]}:{tb.lineno})"
        row["finetune"] = (
            f"{type(exc).__name__}: {str(exc).splitlines()[0][:100]}{where}"
        )
    row["seconds"] = round(time.perf_counter() - start, 1)
    return row


def _cell(value) -> str:
    if value is True:
        return "ok"
    if isinstance(value, str) and ":" in value:
        return "FAIL " + value.replace("|", "/")
    return str(value)


def table(rows: list[dict]) -> str:
    header = [
        "model", "size", "layers", "unknown layout", "penultimate", "mid layer",
        "layout", "mid width", "all layers", "fine-tune (freeze=0.5)", "s",
    ]  # fmt: skip
    body = []
    for r in sorted(rows, key=lambda r: r["model"]):
        body.append(
            [
                r["model"],
                r.get("size", ""),
                r.get("layers", ""),
                r.get("unknown", ""),
                _cell(r.get("penultimate", r.get("error", ""))),
                r.get("mid", ""),
                r.get("layout", ""),
                _cell(r.get("mid_width", "")),
                _cell(r.get("all_layers", "")),
                _cell(r.get("finetune", "")),
                r.get("seconds", ""),
            ]  # fmt: skip
        )
    cells = [header, *[[str(c) for c in b] for b in body]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    line = " ".join("=" * w for w in widths)

    def fmt(row: list[str]) -> str:
        return " ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()

    return "\n".join([line, fmt(header), line, *[fmt(c) for c in cells[1:]], line])


def totals(rows: list[dict]) -> str:
    n = len(rows)

    def ok(key: str) -> int:
        return sum(1 for r in rows if r.get(key) is True or isinstance(r.get(key), int))

    unknown = sum(1 for r in rows if r.get("unknown"))
    fractions = [
        r["all_layers"].split("/")
        for r in rows
        if "/" in str(r.get("all_layers", "")) and ":" not in r["all_layers"]
    ]
    good = sum(int(g) for g, _ in fractions)
    checked = sum(int(c) for _, c in fractions)
    return (
        f"list_layers {ok('list_layers')}/{n}, transform penultimate "
        f"{ok('penultimate')}/{n}, mid layer {ok('mid_width')}/{n}, fine-tune "
        f"{ok('finetune')}/{n}; models with a layer of unknown layout: {unknown}; "
        f"ViT/Swin/ConvNeXt/MaxViT layers pooled to their channel axis: "
        f"{good}/{checked}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*")
    parser.add_argument("--one")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", help="append each row to this file")
    parser.add_argument("--timeout", type=int, default=1800)
    parser.add_argument("--resume", action="store_true", help="skip rows in --json")
    parser.add_argument("--reverse", action="store_true", help="last model first")
    parser.add_argument("--claim-dir", help="a folder where workers claim models")
    parser.add_argument("--table", action="store_true", help="print --json's table")
    args = parser.parse_args()
    if args.one:
        import torch

        torch.set_num_threads(args.threads)
        print(json.dumps(run_one(args.one)))
        return
    import torchvision

    if args.table:
        with open(args.json) as f:
            rows = [json.loads(line) for line in f if line.strip()]
        rows = list({r["model"]: r for r in rows}.values())  # the last run of each
        print(table(rows))
        print()
        print(totals(rows))
        return
    rows, done = [], set()
    if args.json and args.resume:
        with open(args.json) as f:
            rows = [json.loads(line) for line in f if line.strip()]
        done = {r["model"] for r in rows}
    names = args.models or sorted(
        torchvision.models.list_models(module=torchvision.models),
        key=lambda n: (any(h in n for h in HEAVY), n),
    )
    if args.reverse:
        names = names[::-1]
    for name in [n for n in names if n not in done]:
        if args.claim_dir:  # several workers share the list
            try:
                os.makedirs(args.claim_dir, exist_ok=True)
                os.close(
                    os.open(os.path.join(args.claim_dir, name), os.O_CREAT | os.O_EXCL)
                )
            except FileExistsError:
                continue
        cmd = [sys.executable, __file__, "--one", name, "--threads", str(args.threads)]
        try:
            done = subprocess.run(
                cmd, capture_output=True, text=True, timeout=args.timeout
            )
            last = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""
            row = json.loads(last) if last.startswith("{") else {
                "model": name, "error": f"Crash: {done.stderr.strip()[-200:]}"
            }  # fmt: skip
        except subprocess.TimeoutExpired:
            row = {"model": name, "error": f"Timeout: over {args.timeout} s"}
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps(row) + "\n")
    print(table(rows))
    print()
    print(totals(rows))


if __name__ == "__main__":
    main()
