"""FineTuneClassifier: head, freezing, learning rates, probe, training loop,
prediction, scikit-learn behaviour and bad input.

Everything runs a TinyCNN on 16 x 16 images for a few epochs; no timings."""

from __future__ import annotations

import copy
import functools
import io
import pickle
import warnings

import joblib
import numpy as np
import pytest
import torch
import torchvision
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.base import clone
from sklearn.exceptions import NotFittedError
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV, cross_val_score
from sklearn.pipeline import FunctionTransformer, Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils import estimator_checks
from tiny_cnn import TinyCNN, colour_images, make_tiny_cnn
from torch import nn

from sklearn_cnn import CNNFeatureTransformer, FineTuneClassifier
from sklearn_cnn._freezing import _frozen_modules, _stages, apply_freeze
from sklearn_cnn._layers import trace
from sklearn_cnn._optim import make_optimizer
from sklearn_cnn._targets import validation_split
from sklearn_cnn._training import Selection, light_augment

# Tiny networks: a second torch thread only waits on a busy machine.
pytestmark = pytest.mark.usefixtures("one_torch_thread")

# Small and fast: 2 epochs, 3 optimizer steps each, fixed seed; 20 of the 60
# images validate (the fewest that selection trusts).
FAST = dict(epochs=2, batch_size=16, random_state=0, validation_fraction=0.33)


def make(model, **params) -> FineTuneClassifier:
    return FineTuneClassifier(model, **{**FAST, **params})


def refreeze(clf: FineTuneClassifier) -> None:
    """Set ``requires_grad`` as ``freeze`` did during fit (fit ends with none)."""
    model, tr = clf.model_, clf.trace_
    apply_freeze(
        model, tr, _frozen_modules(model, tr, clf.head_, clf.stages_, clf.freeze)
    )


# --- models for particular structures (module level: they pickle) ------------


class NoLinearCNN(nn.Module):
    """A backbone without a classifier: its output is a feature map."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.bn(self.conv(x)))


class NestedHeadCNN(nn.Module):
    """torchvision's layout: features, pool, classifier=Sequential(Dropout, Linear)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(8, 5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


class BlockListCNN(nn.Module):
    """EfficientNet's layout: blocks in a ModuleList that is never called."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.blocks = nn.ModuleList([nn.Conv2d(4, 4, 3, padding=1) for _ in range(3)])
        self.act = nn.ReLU()  # one module called after every block
        self.fc = nn.Linear(4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.stem(x))
        for block in self.blocks:
            x = self.act(block(x))
        return self.fc(x.mean((2, 3)))


class DefinedBackwardsCNN(nn.Module):
    """Modules defined in another order than the forward calls them."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 10)
        self.late = nn.Conv2d(4, 4, 3, padding=1)
        self.early = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.late(self.early(x)).mean((2, 3)))


class TokenCNN(BlockListCNN):
    """A parameter of the root itself, used first (like a ViT's class token)."""

    def __init__(self) -> None:
        super().__init__()
        self.offset = nn.Parameter(torch.zeros(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x + self.offset)


def recording_cnn(log: list) -> TinyCNN:
    """A TinyCNN whose modules report (name, training, inference mode) per call."""
    model = make_tiny_cnn(0)
    for name, m in model.named_modules():

        def hook(m, args, name=name or "<root>"):
            log.append((name, m.training, torch.is_inference_mode_enabled()))

        m.register_forward_pre_hook(hook)
    return model


def counting_cnn(counts: dict) -> TinyCNN:
    """A TinyCNN that counts images through its stem and backward calls."""
    model = make_tiny_cnn(0)
    counts.update(images=0, stem_backward=0, stage2_backward=0)

    def forward_hook(m, args):
        counts["images"] += len(args[0])

    def backward(key):
        def hook(m, grad_in, grad_out):
            counts[key] += 1

        return hook

    model.stem.register_forward_pre_hook(forward_hook)
    model.stem.register_full_backward_hook(backward("stem_backward"))
    model.stage2.register_full_backward_hook(backward("stage2_backward"))
    return model


@pytest.fixture
def shuffled_labels(labelled_images):
    """The images with labels that colour does not predict: nothing is trivial."""
    X, y = labelled_images
    return X, np.random.default_rng(1).permutation(y)


def backbone_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {
        k: v.detach().clone()
        for k, v in model.state_dict().items()
        if not k.startswith("fc.")
    }


# =============================================================================
# 1. Head
# =============================================================================


def test_head_replaced_and_sized_to_classes(tiny_builder, labelled_images):
    X, y = labelled_images
    clf = make(tiny_builder).fit(X, y)
    assert isinstance(clf.model_.fc, nn.Linear)
    assert clf.model_.fc.out_features == 3 and clf.model_.fc.in_features == 32
    assert clf.classes_.tolist() == ["blue", "green", "red"]
    assert set(clf.predict(X)) <= set(clf.classes_)
    assert clf.score(X, y) == 1.0  # colour separates the classes


@pytest.mark.parametrize("labels", [[3, 7], [-1, 1], ["no", "yes"], [False, True]])
def test_binary_labels_of_any_type(tiny_builder, labelled_images, labels):
    X, y3 = labelled_images
    y = np.where(y3 == "red", labels[1], labels[0])
    clf = make(tiny_builder).fit(X, y)
    assert clf.model_.fc.out_features == 2
    scores = clf.decision_function(X)
    assert scores.shape == (len(X),)
    assert np.array_equal(clf.predict(X), clf.classes_[(scores > 0).astype(int)])
    assert clf.predict_proba(X).shape == (len(X), 2)
    assert clf.score(X, y) == 1.0


def test_multiclass_int_labels(tiny_builder, labelled_images):
    X, y = labelled_images
    y_int = np.unique(y, return_inverse=True)[1] * 10 + 5
    clf = make(tiny_builder).fit(X, y_int)
    assert clf.classes_.tolist() == [5, 15, 25]
    assert clf.decision_function(X).shape == (len(X), 3)
    assert clf.predict(X).dtype == y_int.dtype


def test_model_without_linear_gets_an_appended_head(labelled_images):
    X, y = labelled_images
    clf = make(NoLinearCNN, epochs=1).fit(X, y)
    assert isinstance(clf.model_.head, nn.Linear)
    assert clf.model_.head.in_features == 6 and clf.model_.head.out_features == 3
    assert clf.predict_proba(X).shape == (len(X), 3)
    assert clf.stages_ == ["conv", "bn"]
    loaded = pickle.loads(pickle.dumps(clf))  # the hook pickles with the module
    np.testing.assert_array_equal(loaded.predict_proba(X), clf.predict_proba(X))


def test_head_inside_a_container(labelled_images):
    X, y = labelled_images
    clf = make(NestedHeadCNN, freeze="backbone").fit(X, y)
    assert clf.model_.classifier[1].out_features == 3
    assert isinstance(clf.model_.classifier[0], nn.Dropout)  # kept
    assert clf.stages_ == ["features"]  # dropout holds nothing; the head is no stage


# =============================================================================
# 2. Freezing
# =============================================================================

# A list, not a dict: freeze=1 (one stage) and freeze=1.0 (all) are equal keys.
FROZEN_BY = [
    (0, []),
    (1, ["stem."]),
    (2, ["stem.", "stage1."]),
    (3, ["stem.", "stage1.", "stage2."]),
    ("stage1", ["stem.", "stage1."]),
    ("stage1.1", ["stem.", "stage1.0.", "stage1.1."]),
    # 6,088 params: stem and stage1 hold 1,416, stage2.0 4,608; 1,416 is the
    # prefix closest to half
    (0.5, ["stem.", "stage1."]),
    (1.0, ["stem.", "stage1.", "stage2."]),
    ("backbone", ["stem.", "stage1.", "stage2."]),
]


@pytest.mark.parametrize(
    "freeze, prefixes", FROZEN_BY, ids=[repr(f) for f, _ in FROZEN_BY]
)
def test_frozen_parameters_do_not_change(freeze, prefixes, shuffled_labels):
    X, y = shuffled_labels
    before = make_tiny_cnn(0).state_dict()
    clf = make(
        functools.partial(make_tiny_cnn, 0),
        freeze=freeze,
        lr=0.05,
        backbone_lr=0.05,
        head_init="random",
        batchnorm="train",
        validation_fraction=None,
    ).fit(X, y)
    after = clf.model_.state_dict()
    for key, value in before.items():
        if key.startswith("fc.") or key.endswith("num_batches_tracked"):
            continue
        frozen = any(key.startswith(p) for p in prefixes)
        changed = not torch.equal(value, after[key])
        assert changed != frozen, (key, frozen)


def test_freeze_fraction_covers_that_fraction(tiny_builder, images):
    clf = make(tiny_builder, freeze=0.5, epochs=0, validation_fraction=None)
    clf.fit(images, np.arange(12) % 2)
    backbone = [(n, p) for n, p in clf.model_.named_parameters() if "fc" not in n]
    total = sum(p.numel() for _, p in backbone)
    refreeze(clf)
    frozen = sum(p.numel() for _, p in backbone if not p.requires_grad)
    assert abs(frozen - 0.5 * total) <= 16 * 32 * 9 / 2  # within half a module
    assert clf.frozen_fraction_ == pytest.approx(frozen / total)


@settings(max_examples=25, deadline=None)
@given(st.floats(0, 1), st.floats(0, 1))
def test_freeze_fraction_is_minimal_and_monotone(f1, f2):
    model = make_tiny_cnn(0)
    tr = trace(model.eval(), torch.zeros(1, 3, 16, 16))
    stages = _stages(model, tr, "fc")
    sizes = {
        n: sum(p.numel() for p in m.parameters(recurse=False))
        for n, m in model.named_modules()
    }
    total = sum(v for n, v in sizes.items() if n and not n.startswith("fc"))

    def frozen_count(f: float) -> int:
        return sum(sizes[n] for n in _frozen_modules(model, tr, "fc", stages, f))

    lo, hi = sorted((f1, f2))
    assert frozen_count(lo) <= frozen_count(hi)
    # closest: within half of the largest module (4608) of the fraction
    assert abs(frozen_count(lo) - lo * total) <= 4608 / 2 or lo == 1.0


def test_stages_in_forward_order():
    model = BlockListCNN()
    tr = trace(model.eval(), torch.zeros(1, 3, 8, 8))
    assert _stages(model, tr, "fc") == ["stem", "blocks.0", "blocks.1", "blocks.2"]
    # forward order, not the order of definition
    clf = make(DefinedBackwardsCNN, freeze=1, epochs=0, validation_fraction=None)
    clf.fit(np.zeros((4, 8, 8, 3), np.uint8), [0, 1, 0, 1])
    assert clf.stages_ == ["early", "late"]
    refreeze(clf)
    assert not clf.model_.early.weight.requires_grad
    assert clf.model_.late.weight.requires_grad


@pytest.mark.parametrize("freeze, trains", [(0, True), (1, False), (0.2, False)])
def test_root_parameters_freeze_with_the_first_stage(freeze, trains, images):
    clf = make(TokenCNN, freeze=freeze, epochs=0, validation_fraction=None)
    clf.fit(images, np.arange(12) % 2)
    refreeze(clf)
    assert clf.model_.offset.requires_grad is trains
    assert clf.model_.blocks[2].weight.requires_grad  # the last block trains


def test_stages_of_torchvision_resnet():
    model = torchvision.models.resnet18(weights=None).eval()
    tr = trace(model, torch.zeros(1, 3, 32, 32))
    stages = _stages(model, tr, tr.head)
    assert stages == ["conv1", "bn1", "layer1", "layer2", "layer3", "layer4"]


def test_stages_of_efficientnet_lite0():
    lite = pytest.importorskip("efficientnet_lite_pytorch")
    model = lite.EfficientNet.from_name("efficientnet-lite0").eval()
    tr = trace(model, torch.zeros(1, 3, 32, 32))
    stages = _stages(model, tr, tr.head)
    blocks = [f"_blocks.{i}" for i in range(16)]
    assert stages == ["_conv_stem", "_bn0", *blocks, "_conv_head", "_bn1"]
    # _swish runs in the stem and in the head: ambiguous as a freeze point
    with pytest.raises(ValueError, match="runs 2 times"):
        _frozen_modules(model, tr, "_fc", stages, "_swish")
    with pytest.raises(ValueError, match="never called"):
        _frozen_modules(model, tr, "_fc", stages, "_blocks")
    frozen = _frozen_modules(model, tr, "_fc", stages, "_blocks.7")
    assert "_blocks.7._project_conv" in frozen and "_blocks.8" not in frozen
    assert "_swish" in frozen  # stateless, first called in the stem


def test_freeze_out_of_range_lists_the_stages(tiny_builder, labelled_images):
    X, y = labelled_images
    with pytest.raises(ValueError, match="has 3 stages: 'stem', 'stage1', 'stage2'"):
        make(tiny_builder, freeze=4).fit(X, y)


@pytest.mark.parametrize(
    "freeze, match",
    [
        ("stage3", "Close matches: 'stage2', 'stage1'"),
        ("fc", "names the classifier head"),
        ("nothing_like_it", "Valid names include"),
        (True, "pass a number of stages"),
        (1.5, "freeze"),
        (-1, "freeze"),
    ],
)
def test_bad_freeze_is_a_clear_error(tiny_builder, labelled_images, freeze, match):
    X, y = labelled_images
    clf = make(tiny_builder, freeze=freeze)
    with pytest.raises(ValueError, match=match):
        clf.fit(X, y)
    with pytest.raises(NotFittedError):  # not left half-fitted
        clf.predict(X)


@pytest.mark.parametrize("batchnorm", ["frozen", "train"])
def test_frozen_modules_and_batchnorm_stay_in_eval_mode(batchnorm, labelled_images):
    X, y = labelled_images
    log: list = []
    make(functools.partial(recording_cnn, log), freeze=1, batchnorm=batchnorm).fit(X, y)
    training = [(n, t) for n, t, inference in log if not inference]
    assert training and all(n != "<root>" or t for n, t in training)
    modes = {n: t for n, t in training}
    assert modes["stem.0"] is False and modes["stem.1"] is False  # frozen
    assert modes["stage1.0"] is True and modes["stage2.0"] is True
    bn_trains = batchnorm == "train"
    assert modes["stage1.1"] is bn_trains and modes["stage2.1"] is bn_trains


@pytest.mark.parametrize("batchnorm", ["frozen", "train"])
def test_batchnorm_statistics(batchnorm, shuffled_labels):
    X, y = shuffled_labels
    before = make_tiny_cnn(0).state_dict()
    clf = make(
        functools.partial(make_tiny_cnn, 0),
        freeze=1,
        batchnorm=batchnorm,
        lr=0.01,
        validation_fraction=None,  # no restoring of the start's weights
        # On shuffled labels the probe head overfits: every epoch's training
        # loss is far above its start, which would count as a wrecked network
        # and be undone. A random head has no start to compare with.
        head_init="random",
    ).fit(X, y)
    after = clf.model_.state_dict()
    assert torch.equal(before["stem.1.running_mean"], after["stem.1.running_mean"])
    moved = not torch.equal(
        before["stage1.1.running_mean"], after["stage1.1.running_mean"]
    )
    assert moved == (batchnorm == "train")
    # frozen statistics, but the affine parameters of trainable layers train
    assert not torch.equal(before["stage1.1.weight"], after["stage1.1.weight"])


# The hooks are the test's probes; torch notes that the stem has no input grads.
@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
@pytest.mark.parametrize(
    "freeze, stem, stage2",
    [(0, True, True), (2, False, True), ("backbone", False, False)],
)
def test_no_backward_pass_through_frozen_layers(freeze, stem, stage2, labelled_images):
    X, y = labelled_images
    counts: dict = {}
    make(functools.partial(counting_cnn, counts), freeze=freeze).fit(X, y)
    assert (counts["stem_backward"] > 0) == stem
    assert (counts["stage2_backward"] > 0) == stage2


def test_head_only_without_augmentation_runs_the_backbone_once(labelled_images):
    X, y = labelled_images
    counts: dict = {}
    clf = make(
        functools.partial(counting_cnn, counts),
        freeze="backbone",
        augment=None,
        epochs=5,
    ).fit(X, y)
    assert counts["images"] == 1 + len(X)  # the trace, then each image once
    assert clf.n_iter_ >= 1 and clf.n_trainable_params_ == 3 * 32 + 3
    counts["images"] = 0
    make(functools.partial(counting_cnn, counts), freeze="backbone", epochs=2).fit(X, y)
    assert counts["images"] > 2 * 0.9 * len(X)  # augmented: a pass per epoch


# =============================================================================
# 3. Learning rates, optimizer, schedule
# =============================================================================


@pytest.mark.parametrize(
    "head_init, backbone_lr, selection, expected",
    [
        # None: LP-FT's one rate from the probe head when selection can fall
        # back to it; lr / 10 otherwise.
        ("probe", None, {}, 0.01),
        ("probe", None, {"early_stopping": False}, 0.001),
        ("probe", None, {"validation_fraction": None}, 0.001),
        ("random", None, {}, 0.001),
        ("probe", 0.005, {}, 0.005),
        ("random", 0.005, {"early_stopping": False}, 0.005),
    ],
)
def test_parameter_groups(
    tiny_builder, labelled_images, head_init, backbone_lr, selection, expected
):
    X, y = labelled_images
    clf = make(
        tiny_builder, freeze=1, lr=0.01, backbone_lr=backbone_lr, weight_decay=0.1,
        head_init=head_init, **selection,
    ).fit(X, y)  # fmt: skip
    # The rate the fit started at; an epoch that wrecks the network (here lr=0.01
    # from the probe head) lowers backbone_lr_ afterwards.
    assert clf.history_[1]["backbone_lr"] == pytest.approx(expected)
    assert clf.backbone_lr_ <= expected
    refreeze(clf)
    groups = clf._param_groups()
    by_id = {id(p): g for g in groups for p in g["params"]}
    model = clf.model_
    assert all(id(p) not in by_id for p in model.stem.parameters())  # frozen
    for name, p in model.named_parameters():
        if name.startswith("stem."):
            continue
        group = by_id[id(p)]
        rate = 0.01 if name.startswith("fc.") else clf.backbone_lr_
        assert group["lr"] == pytest.approx(rate)
        assert group["weight_decay"] == (0.1 if p.ndim > 1 else 0.0)
    optimizer = make_optimizer("adamw", groups)
    assert isinstance(optimizer, torch.optim.AdamW)
    assert len(optimizer.param_groups) == 4
    sgd = make_optimizer("sgd", groups)
    assert isinstance(sgd, torch.optim.SGD)
    assert sgd.param_groups[0]["momentum"] == 0.9


def test_sgd_trains(tiny_builder, labelled_images):
    X, y = labelled_images
    clf = make(
        tiny_builder, optimizer="sgd", head_init="random", lr=0.3, epochs=4,
        validation_fraction=None,
    )  # fmt: skip
    assert clf.fit(X, y).score(X, y) > 0.9


# =============================================================================
# 4. Head warm-up: the linear probe
# =============================================================================


@pytest.mark.parametrize("n_classes", [2, 3])
@pytest.mark.parametrize("class_weight", [None, "balanced"])
def test_probe_head_is_the_logistic_regression(
    tiny_builder, shuffled_labels, n_classes, class_weight, monkeypatch
):
    monkeypatch.setattr("sklearn_cnn._head.PROBE_CS", (1.0,))  # C as below
    monkeypatch.setattr("sklearn_cnn._head.SCALE_FLOOR", 0.0)  # StandardScaler
    X, y = shuffled_labels
    if n_classes == 2:
        y = np.where(y == "red", "red", "other")
    clf = make(
        tiny_builder,
        epochs=0,
        validation_fraction=None,
        precision="fp32",
        class_weight=class_weight,
    ).fit(X, y)
    reference = make_pipeline(
        CNNFeatureTransformer(tiny_builder, precision="fp32"),
        FunctionTransformer(np.float64),  # the probe fits in float64
        StandardScaler(),
        LogisticRegression(max_iter=1000, class_weight=class_weight),
    ).fit(X, y)
    np.testing.assert_allclose(
        clf.predict_proba(X), reference.predict_proba(X), atol=1e-5
    )
    assert np.array_equal(clf.predict(X), reference.predict(X))


def test_probe_refitted_on_all_images_when_it_wins(
    tiny_builder, shuffled_labels, monkeypatch
):
    monkeypatch.setattr("sklearn_cnn._head.PROBE_CS", (1.0,))  # C as below
    monkeypatch.setattr("sklearn_cnn._head.SCALE_FLOOR", 0.0)  # StandardScaler
    X, y = shuffled_labels
    # epochs=0: the probe wins by default; the validation split was only
    # needed to tell, and the probe is refitted on every image.
    clf = make(tiny_builder, epochs=0, precision="fp32", calibrate=False).fit(X, y)
    assert clf.best_epoch_ == 0 and not np.isnan(clf.history_[0]["valid_accuracy"])
    reference = make_pipeline(
        CNNFeatureTransformer(tiny_builder, precision="fp32"),
        FunctionTransformer(np.float64),
        StandardScaler(),
        LogisticRegression(max_iter=1000),
    ).fit(X, y)
    np.testing.assert_allclose(
        clf.predict_proba(X), reference.predict_proba(X), atol=1e-5
    )


def test_probe_starts_from_the_probe_accuracy(tiny_builder, labelled_images):
    X, y = labelled_images
    probe = make(tiny_builder, epochs=0).fit(X, y)
    random = make(tiny_builder, epochs=0, head_init="random").fit(X, y)
    assert probe.history_[0]["valid_accuracy"] == 1.0
    assert random.history_[0]["valid_accuracy"] < 1.0
    assert probe.score(X, y) == 1.0 and random.score(X, y) < 0.9


# =============================================================================
# 5. Training loop
# =============================================================================


def test_training_learns(tiny_builder, labelled_images):
    X, y = labelled_images
    clf = make(
        tiny_builder, head_init="random", lr=0.05, epochs=4, validation_fraction=None
    ).fit(X, y)
    losses = [row["train_loss"] for row in clf.history_[1:]]
    assert losses[-1] < losses[0]
    assert clf.score(X, y) > 0.9


def test_random_state_fixes_everything(tiny_builder, shuffled_labels):
    X, y = shuffled_labels
    params = dict(head_init="random", lr=0.01, epochs=2)
    a = make(tiny_builder, **params).fit(X, y).predict_proba(X)
    b = make(tiny_builder, **params).fit(X, y).predict_proba(X)
    c = make(tiny_builder, **params, random_state=1).fit(X, y).predict_proba(X)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_fit_leaves_the_global_torch_generator_alone(tiny_builder, labelled_images):
    X, y = labelled_images
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    make(tiny_builder).fit(X, y)
    assert torch.equal(torch.rand(3), expected)


def test_fit_on_files_and_lists_is_fit_on_arrays(
    tiny_builder, labelled_images, tmp_path
):
    from PIL import Image

    X, y = labelled_images
    paths = []
    for i, image in enumerate(X):
        paths.append(str(tmp_path / f"{i}.png"))
        Image.fromarray(image).save(paths[-1])
    params = dict(precision="fp32", head_init="random", lr=0.01)
    expected = make(tiny_builder, **params).fit(X, y).predict_proba(X)
    for inputs in (paths, list(X)):
        clf = make(tiny_builder, **params).fit(inputs, y)
        np.testing.assert_allclose(clf.predict_proba(inputs), expected, atol=1e-5)


@pytest.mark.slow  # a DataLoader worker process
def test_worker_processes(tiny_builder, labelled_images):
    X, y = labelled_images
    params = dict(num_workers=1, head_init="random", lr=0.01)
    a = make(tiny_builder, **params).fit(X, y).predict_proba(X)
    b = make(tiny_builder, **params).fit(X, y).predict_proba(X)
    np.testing.assert_array_equal(a, b)  # augmentation seeded in the worker too


def test_light_augment_keeps_size_and_dtype():
    image = torch.randint(0, 256, (3, 20, 24), dtype=torch.uint8)
    torch.manual_seed(0)
    out = light_augment(image)
    assert out.shape == image.shape and out.dtype == torch.uint8
    torch.manual_seed(0)
    assert torch.equal(light_augment(image), out)
    flips = {bool(torch.equal(light_augment(image), image)) for _ in range(20)}
    assert False in flips


def test_callable_augment(tiny_builder, labelled_images):
    X, y = labelled_images
    seen: list = []

    def augment(image: torch.Tensor) -> torch.Tensor:
        seen.append((tuple(image.shape), image.dtype))
        return torch.flip(image, dims=[-1])

    clf = make(tiny_builder, augment=augment, validation_fraction=None).fit(X, y)
    assert len(seen) == 2 * len(X)  # every training image, every epoch
    assert set(seen) == {((3, 16, 16), torch.uint8)}
    assert clf.score(X, y) == 1.0


def test_augment_of_mixed_sizes_is_a_clear_error(tiny_builder, labelled_images):
    X, y = labelled_images
    sizes = iter([16, 12] * 100)

    def augment(image):
        s = next(sizes)
        return image[:, :s, :s]

    with pytest.raises(ValueError, match="augment returned images of different"):
        make(tiny_builder, augment=augment).fit(X, y)


def test_class_weight(tiny_builder, shuffled_labels):
    X, y = shuffled_labels
    params = dict(epochs=1, validation_fraction=None)
    plain = make(tiny_builder, **params).fit(X, y).predict(X)
    heavy = {"red": 100.0, "green": 1.0, "blue": 1.0}
    weights = copy.deepcopy(heavy)
    weighted = make(tiny_builder, class_weight=weights, **params).fit(X, y).predict(X)
    assert weights == heavy  # not modified
    assert (weighted == "red").sum() > (plain == "red").sum()
    make(tiny_builder, class_weight="balanced", **params).fit(X, y)
    with pytest.raises(ValueError, match="purple"):
        make(tiny_builder, class_weight={"purple": 2.0}, **params).fit(X, y)


def test_label_smoothing_raises_the_loss_floor(tiny_builder, labelled_images):
    X, y = labelled_images
    plain = make(tiny_builder).fit(X, y).history_
    smooth = make(tiny_builder, label_smoothing=0.3).fit(X, y).history_
    assert smooth[-1]["train_loss"] > plain[-1]["train_loss"] + 0.1


def test_history(tiny_builder, labelled_images):
    X, y = labelled_images
    clf = make(tiny_builder, epochs=3, early_stopping=False).fit(X, y)
    assert [row["epoch"] for row in clf.history_] == [0, 1, 2, 3]
    assert clf.n_iter_ == 3
    assert set(clf.history_[0]) == {
        "epoch",
        "train_loss",
        "valid_loss",
        "valid_accuracy",
        "time",
    }
    # Epoch 0's training loss is the probe head's, on the un-augmented images.
    assert 0 < clf.history_[0]["train_loss"] < np.log(3)
    for row in clf.history_[1:]:
        assert set(row) == set(clf.history_[0]) | {"backbone_lr"}
        assert row["backbone_lr"] == clf.backbone_lr_
        assert row["train_loss"] > 0 and row["time"] > 0
        assert 0 <= row["valid_accuracy"] <= 1 and row["valid_loss"] >= 0


def test_early_stopping_restores_the_best_weights(tiny_builder, labelled_images):
    X, y = labelled_images
    probe = make(tiny_builder, epochs=0).fit(X, y)
    # A learning rate that wrecks the network: no epoch beats the probe head.
    # (Two epochs: a wrecked epoch that is undone restarts the patience.)
    clf = make(tiny_builder, lr=1e4, backbone_lr=1e4, n_iter_no_change=1).fit(X, y)
    assert clf.best_epoch_ == 0 and clf.history_[-1]["valid_accuracy"] < 1.0
    np.testing.assert_array_equal(clf.predict_proba(X), probe.predict_proba(X))
    # without early stopping every epoch runs and the last weights stay
    last = make(tiny_builder, lr=1e3, epochs=3, early_stopping=False).fit(X, y)
    assert last.n_iter_ == 3 and not np.array_equal(
        last.predict_proba(X), probe.predict_proba(X)
    )


def test_patience_counts_from_the_best_trained_epoch():
    selection = Selection(0, 1.0, 0.1, nn.Linear(2, 2), has_val=True)
    for epoch, acc in enumerate([0.5, 0.6, 0.6, 0.55], start=1):
        selection.update(epoch, acc, 1.0)
    # epoch 1 is the first trained score, 2 beats it, 3 and 4 do not
    assert selection.stall == 2 and selection.epoch == 0


def test_early_stopping_stops_after_patience(tiny_builder, labelled_images):
    X, y = labelled_images
    clf = make(tiny_builder, epochs=8, n_iter_no_change=1, lr=1e-6).fit(X, y)
    # a learning rate too small to change anything: epoch 2 does not improve
    # on epoch 1, so patience 1 stops there
    assert clf.n_iter_ == 2 and clf.best_epoch_ == 0


def test_divergence_stops_and_keeps_the_best_weights(tiny_builder, labelled_images):
    X, y = labelled_images
    probe = make(tiny_builder, epochs=0).fit(X, y)
    with pytest.warns(UserWarning, match="diverged in epoch 1"):
        clf = make(tiny_builder, lr=1e5, backbone_lr=1e5, epochs=4).fit(X, y)
    assert clf.best_epoch_ == 0 and clf.n_iter_ == 1
    np.testing.assert_array_equal(clf.predict_proba(X), probe.predict_proba(X))


def test_no_validation_split(tiny_builder, labelled_images):
    X, y = labelled_images
    for fraction in (None, 0.0):
        clf = make(tiny_builder, validation_fraction=fraction, epochs=3).fit(X, y)
        assert clf.n_iter_ == 3 and clf.best_epoch_ == 3
        assert all(np.isnan(row["valid_accuracy"]) for row in clf.history_)


def test_validation_split_is_stratified(tiny_builder, labelled_images):
    X, y = labelled_images
    y_enc = np.unique(y, return_inverse=True)[1]
    train, val = validation_split(y_enc, 3, 0.5, seed=0)
    assert len(val) == 30 and len(train) == 30 and not set(train) & set(val)
    assert np.bincount(y_enc[val]).tolist() == [10, 10, 10]


def test_warm_start_continues(tiny_builder, labelled_images):
    X, y = labelled_images
    clf = make(tiny_builder, early_stopping=False).fit(X, y)
    model = clf.model_
    clf.set_params(warm_start=True, epochs=2, freeze=1).fit(X, y)
    assert clf.model_ is model  # continued, not rebuilt
    assert [row["epoch"] for row in clf.history_] == [0, 1, 2, 3, 4]
    assert clf.n_iter_ == 4
    with pytest.raises(ValueError, match="warm_start=True but y has the classes"):
        clf.fit(X, np.where(y == "red", "pink", y))
    clf.set_params(warm_start=False).fit(X, y)
    assert clf.model_ is not model and len(clf.history_) == 3


def test_verbose_reports_epochs(tiny_builder, labelled_images, capsys):
    X, y = labelled_images
    make(tiny_builder, verbose=1).fit(X, y)
    err = capsys.readouterr().err
    assert "epoch 1/2" in err and "valid accuracy" in err
    make(tiny_builder).fit(X, y)
    assert capsys.readouterr().err == ""


class Interrupt:
    """An augmentation that presses Ctrl-C at its n-th image."""

    def __init__(self, at: int) -> None:
        self.at, self.calls = at, 0

    def __call__(self, image):
        self.calls += 1
        if self.calls == self.at:
            raise KeyboardInterrupt
        return image


def test_ctrl_c_keeps_the_best_weights(tiny_builder, labelled_images):
    X, y = labelled_images
    # During epoch 2 (40 training images per epoch): epoch 1 completed.
    clf = make(tiny_builder, augment=Interrupt(60), epochs=5)
    with (
        pytest.warns(UserWarning, match="interrupted during epoch 2"),
        pytest.raises(KeyboardInterrupt),
    ):
        clf.fit(X, y)
    assert clf.n_iter_ == 1 and clf.best_epoch_ in (0, 1)
    assert len(clf.history_) == 2 and clf.score(X, y) == 1.0
    # During the first epoch: the start (the probe head) is what there is.
    clf = make(tiny_builder, augment=Interrupt(5), lr=1.0, epochs=5)
    with (
        pytest.warns(UserWarning, match="keeps the weights of epoch 0"),
        pytest.raises(KeyboardInterrupt),
    ):
        clf.fit(X, y)
    assert clf.n_iter_ == 0 and clf.best_epoch_ == 0
    pretrained = backbone_state(make_tiny_cnn(0))
    for key, value in backbone_state(clf.model_).items():  # restored
        assert torch.equal(value, pretrained[key]), key
    # Without a validation split: the last completed epoch.
    clf = make(tiny_builder, augment=Interrupt(70), validation_fraction=None)
    with (
        pytest.warns(UserWarning, match="weights of epoch 1, the last completed"),
        pytest.raises(KeyboardInterrupt),
    ):
        clf.fit(X, y)
    assert clf.predict(X).shape == (len(X),)


# =============================================================================
# 6. Prediction
# =============================================================================


def test_prediction_methods_agree(tiny_builder, shuffled_labels):
    X, y = shuffled_labels
    clf = make(tiny_builder, head_init="random", lr=0.01).fit(X, y)
    proba = clf.predict_proba(X)
    assert proba.dtype == np.float64
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, rtol=0, atol=1e-12)
    np.testing.assert_allclose(np.exp(clf.predict_log_proba(X)), proba, rtol=1e-10)
    assert np.array_equal(clf.predict(X), clf.classes_[proba.argmax(1)])
    assert np.array_equal(
        clf.classes_[clf.decision_function(X).argmax(1)], clf.predict(X)
    )
    assert clf.score(X, y) == pytest.approx(np.mean(clf.predict(X) == y))


def test_prediction_is_batched_and_input_agnostic(tiny_builder, labelled_images):
    X, y = labelled_images
    clf = make(tiny_builder, precision="fp32").fit(X, y)
    scores = clf.decision_function(X)
    clf.set_params(batch_size=7)
    # float32 logits: the batch size changes the order of the sums, so the
    # tolerance is relative (the logits of this fit reach about 100).
    close = {"rtol": 1e-5, "atol": 1e-5}
    np.testing.assert_allclose(clf.decision_function(X), scores, **close)
    np.testing.assert_allclose(clf.decision_function(list(X)), scores, **close)
    np.testing.assert_allclose(
        clf.decision_function(X / 255.0), scores, rtol=1e-4, atol=1e-4
    )


def test_prediction_runs_in_inference_mode(labelled_images):
    X, y = labelled_images
    log: list = []
    clf = make(functools.partial(recording_cnn, log)).fit(X, y)
    log.clear()
    clf.predict(X)
    assert log and all(inference and not training for _, training, inference in log)
    assert all(not p.requires_grad for p in clf.model_.parameters())


# =============================================================================
# 7. scikit-learn behaviour
# =============================================================================

DATA_FREE_CHECKS = [
    "check_get_params_invariance",
    "check_set_params",
    "check_no_attributes_set_in_init",
    "check_do_not_raise_errors_in_init_or_set_params",
    "check_parameters_default_constructible",
    "check_estimator_repr",
    "check_mixin_order",
    "check_estimator_cloneable",
    "check_estimator_tags_renamed",
    "check_valid_tag_types",
]


@pytest.mark.parametrize("check", DATA_FREE_CHECKS)
def test_data_free_api_checks(check):
    getattr(estimator_checks, check)("FineTuneClassifier", FineTuneClassifier())


def test_tags():
    tags = FineTuneClassifier().__sklearn_tags__()
    assert tags.estimator_type == "classifier"
    assert not tags.input_tags.two_d_array and tags.input_tags.three_d_array


def test_clone_get_set_params(tiny_builder):
    clf = make(tiny_builder, freeze="backbone", lr=0.01)
    params = clf.get_params()
    assert params["freeze"] == "backbone" and params["backbone_lr"] is None
    twin = clone(clf)
    assert twin.get_params().keys() == params.keys()
    assert {k: v for k, v in twin.get_params().items() if k != "model"} == {
        k: v for k, v in params.items() if k != "model"
    }
    twin.set_params(freeze=2, lr=0.1)
    assert (twin.freeze, twin.lr, clf.freeze) == (2, 0.1, "backbone")


def test_unfitted_methods_raise(tiny_builder, images):
    clf = make(tiny_builder)
    for method in (
        "predict",
        "predict_proba",
        "decision_function",
        "predict_log_proba",
    ):
        with pytest.raises(NotFittedError):
            getattr(clf, method)(images)


def test_fit_returns_self_and_refit_is_identical(tiny_builder, labelled_images):
    X, y = labelled_images
    clf = make(tiny_builder, head_init="random", lr=0.01)
    assert clf.fit(X, y) is clf
    first = clf.predict_proba(X)
    np.testing.assert_array_equal(clf.fit(X, y).predict_proba(X), first)


def test_read_only_input_and_nothing_mutated(labelled_images):
    X, y = labelled_images
    X, y = X.copy(), y.copy()
    X.setflags(write=False)
    module = make_tiny_cnn(0)
    state = copy.deepcopy(module.state_dict())
    mean = [0.5, 0.5, 0.5]
    clf = make(module, mean=mean, augment="light").fit(X, y)
    clf.predict(X)
    np.testing.assert_array_equal(X, labelled_images[0])
    np.testing.assert_array_equal(y, labelled_images[1])
    assert mean == [0.5, 0.5, 0.5]
    for key, value in module.state_dict().items():  # the user's module
        assert torch.equal(value, state[key])
    assert module.fc.out_features == 10 and clf.get_params()["model"] is module


def test_pipeline(tiny_builder, labelled_images):
    X, y = labelled_images
    pipe = Pipeline(
        [("invert", FunctionTransformer(np.invert)), ("clf", make(tiny_builder))]
    )
    assert pipe.fit(X, y).score(X, y) == 1.0
    assert pipe.predict_proba(X[:5]).shape == (5, 3)


@pytest.mark.parametrize("n_jobs", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_grid_search_over_freeze_and_lr(tiny_builder, labelled_images, n_jobs):
    X, y = labelled_images
    search = GridSearchCV(
        make(tiny_builder, epochs=1, validation_fraction=None),
        {"freeze": [0, "backbone"], "lr": [1e-3, 1e-2]},
        cv=2,
        n_jobs=n_jobs,
    ).fit(X, y)
    assert np.isfinite(search.cv_results_["mean_test_score"]).all()
    assert search.best_params_["freeze"] in (0, "backbone")
    assert search.score(X, y) == 1.0


def test_cross_val_score(tiny_builder, shuffled_labels):
    X, y = shuffled_labels
    scores = cross_val_score(make(tiny_builder, epochs=1), X, y, cv=3)
    assert scores.shape == (3,) and ((scores >= 0) & (scores <= 1)).all()


def test_pickle_and_joblib_round_trips(tiny_builder, labelled_images, tmp_path):
    X, y = labelled_images
    clf = make(tiny_builder).fit(X, y)
    expected = clf.predict_proba(X)
    loaded = pickle.loads(pickle.dumps(clf))
    np.testing.assert_array_equal(loaded.predict_proba(X), expected)
    joblib.dump(clf, tmp_path / "clf.joblib")
    np.testing.assert_array_equal(
        joblib.load(tmp_path / "clf.joblib").predict_proba(X), expected
    )
    assert str(loaded.history_) == str(clf.history_)
    # a loaded estimator trains on (warm start)
    loaded.set_params(warm_start=True, epochs=1).fit(X, y)
    assert loaded.n_iter_ == clf.n_iter_ + 1


def test_fitted_for_cuda_loads_without_it(tiny_builder, labelled_images):
    X, y = labelled_images
    clf = make(tiny_builder).fit(X, y)
    expected = clf.predict_proba(X)
    clf.set_params(device="cuda")  # as if fitted on a GPU
    buffer = io.BytesIO()
    pickle.dump(clf, buffer)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = pickle.loads(buffer.getvalue())
    if not torch.cuda.is_available():
        assert any("CUDA is not available" in str(w.message) for w in caught)
        assert loaded.device_.type == "cpu"
    np.testing.assert_allclose(loaded.predict_proba(X), expected, atol=1e-3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fit_on_cuda_then_load_on_cpu(tiny_builder, labelled_images):
    X, y = labelled_images
    clf = make(tiny_builder, device="cuda").fit(X, y)
    assert next(clf.model_.parameters()).is_cuda
    loaded = pickle.loads(pickle.dumps(clf))  # the module travels on the CPU
    assert next(loaded.model_.parameters()).is_cuda  # and goes back to the GPU
    loaded.set_params(device="cpu")
    cpu = pickle.loads(pickle.dumps(loaded))
    assert not next(cpu.model_.parameters()).is_cuda
    np.testing.assert_allclose(cpu.predict_proba(X), clf.predict_proba(X), atol=2e-2)


# =============================================================================
# 8. Bad input
# =============================================================================


@pytest.mark.parametrize(
    "y, match",
    [
        (np.array(["a"] * 60), "single class"),
        (np.array(["a", "b"] * 29), "X has 60 images but y has 58 labels"),
        (np.r_[np.nan, np.arange(59) % 3.0], "missing label"),
        (np.array([None] + ["a", "b"] * 29 + ["a"], dtype=object), "missing label"),
        (np.linspace(0, 1, 60), "Unknown label type"),
        (np.zeros((60, 2)), "multi-label y is constant"),
        (None, "needs labels"),
    ],
    ids=["one-class", "length", "nan", "none", "continuous", "2d", "no-y"],
)
def test_bad_labels(tiny_builder, labelled_images, y, match):
    X = labelled_images[0]
    y_before = copy.deepcopy(y)
    clf = make(tiny_builder)
    with pytest.raises(ValueError, match=match):
        clf.fit(X, y)
    if y is not None:
        np.testing.assert_array_equal(y, y_before)
    assert not hasattr(clf, "model_")


@pytest.mark.parametrize(
    "n, fraction, n_val",
    [(9, 0.1, 0), (60, 0.97, 0), (30, 0.1, 0), (60, 0.34, 21), (200, 0.01, 0)],
    ids=["too-few-for-validation", "too-few-for-training", "below-minimum", "ok",
         "one-percent"],
)  # fmt: skip
def test_validation_split_too_small_trains_on_everything(n, fraction, n_val):
    y = np.arange(n) % 3
    if n_val:
        train, val = validation_split(y, 3, fraction, seed=0)
    else:
        with pytest.warns(UserWarning, match="Training on all the images"):
            train, val = validation_split(y, 3, fraction, seed=0)
    assert len(val) == n_val and len(train) == n - n_val


def test_ten_classes_of_nine_images_fit_with_defaults(tiny_builder):
    # Small data works with the default validation_fraction.
    X, y = colour_images(30)
    y = np.repeat(np.arange(10), 9)
    with pytest.warns(UserWarning, match="validation_fraction=0.1 leaves 10"):
        clf = FineTuneClassifier(tiny_builder, epochs=1, random_state=0).fit(X[:90], y)
    assert clf.best_epoch_ == 1 and np.isnan(clf.history_[-1]["valid_accuracy"])


def test_class_with_one_image_trains_without_validation(tiny_builder, labelled_images):
    X, y = labelled_images
    y = y.copy()
    y[0] = "purple"
    with pytest.warns(UserWarning, match="the smallest with 1 image"):
        clf = make(tiny_builder).fit(X, y)
    assert clf.best_epoch_ == 2 and len(clf.classes_) == 4


@pytest.mark.parametrize(
    "params",
    [
        {"lr": 0},
        {"epochs": -1},
        {"head_init": "zeros"},
        {"batchnorm": "freeze"},
        {"optimizer": "adam"},
        {"augment": "heavy"},
        {"validation_fraction": 1.0},
        {"label_smoothing": 1.0},
        {"class_weight": "equal"},
    ],
    ids=lambda p: next(iter(p)),
)
def test_invalid_parameters(tiny_builder, labelled_images, params):
    X, y = labelled_images
    with pytest.raises(ValueError, match=f"'{next(iter(params))}' parameter"):
        make(tiny_builder, **params).fit(X, y)
