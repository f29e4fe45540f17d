"""FineTuneClassifier's practitioner controls and its weighted,
calibrated and test-time-augmented paths, each tested without building more
than a TinyCNN; the pieces (_optim, _head, _targets) are tested directly."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
import torchvision
from scipy.special import softmax
from sklearn import config_context
from sklearn.ensemble import AdaBoostClassifier
from sklearn.exceptions import NotFittedError
from sklearn.pipeline import Pipeline
from tiny_cnn import colour_images, make_tiny_cnn
from torch import nn

from sklearn_cnn import FineTuneClassifier
from sklearn_cnn._base import cpu_state
from sklearn_cnn._head import (
    calibration,
    expected_calibration_error,
    fit_probe,
    fit_temperature,
)
from sklearn_cnn._optim import make_schedule, param_groups
from sklearn_cnn._targets import example_weights

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FAST = dict(epochs=2, batch_size=16, random_state=0, validation_fraction=0.33)
TINY = functools.partial(make_tiny_cnn, 0)


def make(**params) -> FineTuneClassifier:
    return FineTuneClassifier(TINY, **{**FAST, **params})


@pytest.fixture
def data():
    return colour_images(20)


def lrs(schedule: str, steps: int = 50, warmup: float = 0.2) -> list[float]:
    param = nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=1.0)
    scheduler = make_schedule(optimizer, schedule, steps, warmup)
    out = []
    for _ in range(steps):
        out.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return out


# --- schedule, warmup_fraction ----------------------------------------------


def test_schedule_warms_up_then_decays():
    values = lrs("cosine", steps=100, warmup=0.1)
    assert values[0] == pytest.approx(0.1) and values[9] == pytest.approx(1.0)
    assert all(a <= b for a, b in zip(values[:9], values[1:10], strict=True))
    assert all(a >= b for a, b in zip(values[9:-1], values[10:], strict=True))
    assert values[-1] < 0.001


def test_schedules_differ_after_the_warm_up():
    cosine, constant, onecycle = lrs("cosine"), lrs("constant"), lrs("onecycle")
    # the same linear warm-up (10 steps) for cosine and constant
    assert cosine[:10] == pytest.approx(constant[:10])
    assert cosine[0] == pytest.approx(0.1) and cosine[9] == pytest.approx(1.0)
    assert constant[10:] == pytest.approx([1.0] * 40)
    assert cosine[-1] < 0.01 and cosine[30] < 1.0
    assert max(onecycle) == pytest.approx(1.0, rel=1e-3) and onecycle[0] < 0.1
    assert int(np.argmax(onecycle)) in (9, 10)
    assert lrs("cosine", warmup=0.5)[20] < 1.0  # warmup_fraction is used


def test_schedule_reaches_the_optimizer(data):
    X, y = data
    seen = {}
    for schedule in ("constant", "cosine"):
        clf = make(schedule=schedule, epochs=1, validation_fraction=None)
        clf.fit(X, y)
        seen[schedule] = clf.predict_proba(X)
    assert not np.allclose(seen["constant"], seen["cosine"])


# --- layer_decay ------------------------------------------------------------


def test_layer_decay_scales_each_earlier_stage():
    model = make_tiny_cnn(0)
    stages = ["stem", "stage1", "stage2"]
    groups = param_groups(
        model, "fc", stages, lr=1.0, backbone_lr=0.1, layer_decay=0.5,
        weight_decay=0.0,
    )  # fmt: skip
    rate = {id(p): g["lr"] for g in groups for p in g["params"]}
    assert rate[id(model.fc.weight)] == 1.0
    assert rate[id(model.stage2[0].weight)] == pytest.approx(0.1)
    assert rate[id(model.stage1[0].weight)] == pytest.approx(0.05)
    assert rate[id(model.stem[0].weight)] == pytest.approx(0.025)
    plain = param_groups(
        model, "fc", stages, lr=1.0, backbone_lr=0.1, layer_decay=None,
        weight_decay=0.0,
    )  # fmt: skip
    assert {g["lr"] for g in plain} == {1.0, 0.1}


def test_layer_decay_changes_training(data):
    X, y = data
    a = make(layer_decay=0.1, head_init="random").fit(X, y)
    b = make(head_init="random").fit(X, y)
    assert not torch.equal(a.model_.stem[0].weight, b.model_.stem[0].weight)


# --- unfreeze_at --------------------------------------------------------------


def test_unfreeze_at_trains_the_frozen_part_from_that_epoch(data):
    X, y = data
    pretrained = make_tiny_cnn(0).stem[0].weight.detach().clone()
    frozen = make(freeze=1, epochs=3, validation_fraction=None).fit(X, y)
    assert torch.equal(frozen.model_.stem[0].weight, pretrained)
    assert frozen.frozen_ == ["stem"] and 0 < frozen.frozen_fraction_ < 0.1
    later = make(freeze=1, epochs=3, unfreeze_at=3, validation_fraction=None)
    later.fit(X, y)
    assert not torch.equal(later.model_.stem[0].weight, pretrained)
    # nothing unfreezes when the epoch is never reached
    never = make(freeze=1, epochs=2, unfreeze_at=5, validation_fraction=None)
    assert torch.equal(never.fit(X, y).model_.stem[0].weight, pretrained)


def test_unfreeze_at_counts_warm_started_epochs(data):
    X, y = data
    clf = make(freeze=1, epochs=2, unfreeze_at=2, validation_fraction=None)
    clf.fit(X, y)
    after = clf.model_.stem[0].weight.detach().clone()
    clf.set_params(warm_start=True, epochs=1).fit(X, y)  # past epoch 2: trains
    assert not torch.equal(clf.model_.stem[0].weight, after)


# --- calibrate ----------------------------------------------------------------


def test_temperature_minimises_the_validation_log_loss():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 300)
    z = rng.normal(size=(300, 3))
    z[np.arange(300), y] += 1.0
    z *= 6.0  # overconfident
    t = fit_temperature(z, y)
    assert t > 2.0

    def nll(temp):
        p = softmax(z / temp, axis=1)
        return -np.log(p[np.arange(300), y]).mean()

    assert nll(t) <= min(nll(t * 0.9), nll(t * 1.1), nll(1.0))
    t_, ece = calibration(z, y)
    assert t_ == pytest.approx(t) and ece["after"] < ece["before"]


def test_expected_calibration_error_of_perfect_and_wrong_confidence():
    y = np.array([0, 1, 0, 1])
    sure_right = np.eye(2)[y]
    sure_wrong = np.eye(2)[1 - y]
    assert expected_calibration_error(sure_right, y) == 0.0
    assert expected_calibration_error(sure_wrong, y) == pytest.approx(1.0)


def test_calibrate_changes_probabilities_never_predictions(data):
    X, y = data
    on = make(epochs=2).fit(X, y)
    off = make(epochs=2, calibrate=False).fit(X, y)
    assert off.temperature_ == 1.0 and np.isnan(off.calibration_["before"])
    assert on.temperature_ != 1.0 and on.temperature_ > 0
    assert on.calibration_["after"] <= on.calibration_["before"] + 1e-9
    np.testing.assert_array_equal(on.predict(X), off.predict(X))
    np.testing.assert_allclose(
        on.decision_function(X), off.decision_function(X) / on.temperature_
    )
    # no validation split: nothing to calibrate on
    assert make(validation_fraction=None).fit(X, y).temperature_ == 1.0


# --- tta ------------------------------------------------------------------------


def test_tta_flip_averages_the_logits_of_the_mirror_image(data):
    X, y = data
    clf = make(calibrate=False).fit(X, y)
    plain = clf.decision_function(X)
    mirrored = clf.decision_function(np.ascontiguousarray(X[:, :, ::-1]))
    clf.set_params(tta="flip")
    np.testing.assert_allclose(
        clf.decision_function(X), (plain + mirrored) / 2, rtol=1e-4, atol=1e-5
    )
    assert not np.allclose(plain, mirrored)
    assert clf.predict_proba(X).sum(axis=1) == pytest.approx(np.ones(len(X)))


# --- sample_weight -------------------------------------------------------------


def test_example_weights_multiply_class_and_sample_weights():
    y = np.array([0, 1, 1])
    np.testing.assert_allclose(
        example_weights(y, np.array([2.0, 3.0]), np.array([1.0, 0.5, 0.0])),
        [2.0, 1.5, 0.0],
    )
    assert example_weights(y, None, None) is None


def test_zero_sample_weight_is_the_same_as_dropping_the_images(data):
    X, y = data
    keep = np.arange(len(X)) % 4 != 0
    # one batch per epoch, a random head (the probe's CV folds would differ)
    params = dict(validation_fraction=None, augment=None, batch_size=64)
    params.update(head_init="random")
    dropped = make(**params).fit(X[keep], y[keep])
    weighted = make(**params).fit(X, y, sample_weight=keep.astype(float))
    # one batch per epoch: the zero-weight images change nothing
    np.testing.assert_allclose(
        dropped.predict_proba(X), weighted.predict_proba(X), atol=1e-5
    )


def test_sample_weight_changes_the_fit_and_is_validated(data):
    X, y = data
    w = np.where(y == "red", 10.0, 1.0)
    a = make(validation_fraction=None).fit(X, y, sample_weight=w)
    b = make(validation_fraction=None).fit(X, y)
    assert not np.allclose(a.predict_proba(X), b.predict_proba(X))
    with pytest.raises(ValueError, match="sample_weight"):
        make().fit(X, y, sample_weight=np.ones(3))
    with pytest.raises(ValueError, match="non-zero"):
        make().fit(X, y, sample_weight=np.zeros(len(X)))


def test_sample_weight_is_routed_by_metadata_routing(data):
    X, y = data
    with config_context(enable_metadata_routing=True):
        clf = make(epochs=1, validation_fraction=None).set_fit_request(
            sample_weight=True
        )
        pipe = Pipeline([("clf", clf)])
        pipe.fit(X, y, sample_weight=np.ones(len(X)))
        assert pipe.score(X, y) > 0.5


def test_adaboost_passes_sample_weight(data):
    X, y = data
    boost = AdaBoostClassifier(make(epochs=1, validation_fraction=None), n_estimators=2)
    assert boost.fit(X, y).score(X, y) > 0.5


# --- snapshots, torchvision families ------------------------------------------


def test_snapshots_keep_the_state_dict_metadata():
    model = torchvision.models.mnasnet0_5(weights=None)
    state = cpu_state(model)
    assert state._metadata is not None
    model.load_state_dict(state)  # MNASNet's loader needs the versions


@pytest.mark.slow  # real torchvision architectures
@pytest.mark.parametrize("name", ["mnasnet0_5", "googlenet", "inception_v3"])
def test_torchvision_families_fine_tune(name):
    X, y = colour_images(4)
    size = 80 if name == "inception_v3" else 64  # inception's least is 75
    clf = FineTuneClassifier(
        name, weights=None, image_size=size, freeze=0.5, epochs=1, batch_size=6,
        validation_fraction=None, random_state=0,
    )  # fmt: skip
    clf.fit(X, y)
    assert clf.predict_proba(X).shape == (12, 3)


def test_failed_warm_start_keeps_the_previous_weights(data):
    X, y = data

    class Boom:
        calls = 0

        def __call__(self, image):
            Boom.calls += 1
            if Boom.calls > 30:
                raise RuntimeError("boom")
            return image

    clf = make(validation_fraction=None).fit(X, y)
    before = {k: v.clone() for k, v in clf.model_.state_dict().items()}
    history = list(clf.history_)
    clf.set_params(warm_start=True, augment=Boom())
    with pytest.raises(RuntimeError, match="boom"):
        clf.fit(X, y)
    for k, v in clf.model_.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert clf.history_ == history and clf.n_iter_ == 2


def test_probe_scale_floor_bounds_the_weights_of_nearly_dead_features():
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1], 100)
    features = rng.normal(size=(200, 8)) + y[:, None]
    features[:, 0] = 0.0
    features[:3, 0] = 1e-3  # fires on three images
    weight, _ = fit_probe(features, y, 2, None, 0)
    assert np.abs(weight[:, 0]).max() < np.abs(weight[:, 1:]).max()


def test_probe_runs_blas_on_one_thread_for_small_problems(monkeypatch):
    """Many small BLAS calls: threads cost more than they give (see
    PROBE_ONE_THREAD); larger problems keep the configured threads."""
    import threadpoolctl
    from sklearn.linear_model import LogisticRegression

    import sklearn_cnn._head as head

    seen = []
    plain_fit = LogisticRegression.fit

    def fit(self, *args, **kwargs):
        blas = [i["num_threads"] for i in threadpoolctl.threadpool_info()
                if i["user_api"] == "blas"]  # fmt: skip
        seen.append(max(blas, default=None))
        return plain_fit(self, *args, **kwargs)

    monkeypatch.setattr(LogisticRegression, "fit", fit)
    rng = np.random.default_rng(0)
    features, y = rng.normal(size=(60, 8)), np.repeat([0, 1, 2], 20)
    with threadpoolctl.threadpool_limits(2, user_api="blas"):
        fit_probe(features, y, 3, None, 0)
        assert seen and set(seen) == {1}
        seen.clear()
        monkeypatch.setattr(head, "PROBE_ONE_THREAD", 0)
        fit_probe(features, y, 3, None, 0)
    assert set(seen) == {2}


# --- the frozen prefix, computed once -----------------------------------------


def counting_cnn():
    model = make_tiny_cnn(0)

    def count(_m, args):
        counting_cnn.seen += len(args[0])

    model.stem[0].register_forward_pre_hook(count)  # the stem's convolution
    return model


counting_cnn.seen = 0


@pytest.mark.parametrize("freeze", [1, 2])
def test_frozen_prefix_runs_once_per_image_and_changes_nothing(
    data, monkeypatch, freeze
):
    X, y = data
    params = dict(
        freeze=freeze, augment=None, epochs=3, precision="fp32", image_size=16,
        validation_fraction=0.33, early_stopping=False,
    )  # fmt: skip
    counting_cnn.seen = 0
    cached = FineTuneClassifier(counting_cnn, **{**FAST, **params}).fit(X, y)
    passes = counting_cnn.seen
    # the trace (1), one pass over every image (probe and prefix together),
    # the check on 4, and calibration on the 20 validation images
    assert passes == 1 + len(X) + 4 + 20
    monkeypatch.setattr("sklearn_cnn._sources.PREFIX_BYTES", 0)  # no caching
    counting_cnn.seen = 0
    plain = FineTuneClassifier(counting_cnn, **{**FAST, **params}).fit(X, y)
    assert counting_cnn.seen > 3 * len(X)  # every epoch runs the stem
    np.testing.assert_allclose(
        cached.predict_proba(X), plain.predict_proba(X), rtol=1e-4, atol=1e-6
    )
    assert [r["train_loss"] for r in cached.history_[1:]] == pytest.approx(
        [r["train_loss"] for r in plain.history_[1:]], rel=1e-4, abs=1e-5
    )


def test_prefix_not_replayed_with_augmentation(data):
    X, y = data
    counting_cnn.seen = 0
    FineTuneClassifier(
        counting_cnn, freeze=2, epochs=2, batch_size=16, random_state=0,
        validation_fraction=None,
    ).fit(X, y)  # fmt: skip
    assert counting_cnn.seen >= 3 * len(X)


class SkipFromStem(nn.Module):
    """Uses the stem's output again after stage1: replaying stage1 alone is
    not the network (the check must refuse it, here by an error)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.stage1 = nn.Conv2d(4, 4, 3, padding=1)
        self.stage2 = nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        s = self.stem(x)
        x = self.stage2(self.stage1(s) + s)
        return self.fc(x.mean((2, 3)))


def test_prefix_that_is_not_a_cut_trains_on_images(data):
    X, y = data
    params = dict(augment=None, epochs=2, precision="fp32", early_stopping=False)
    params.update(image_size=16)
    torch.manual_seed(0)
    a = FineTuneClassifier(SkipFromStem(), freeze=2, **{**FAST, **params}).fit(X, y)
    torch.manual_seed(0)
    b = FineTuneClassifier(SkipFromStem(), freeze=2, **{**FAST, **params})
    b.set_params(augment=lambda im: im)  # forces the image path
    b.fit(X, y)
    np.testing.assert_allclose(a.predict_proba(X), b.predict_proba(X), atol=1e-5)


# --- memory=: what one fit stores once, reused by the next --------------------


def counting_cnn_of(seed: int, dropout: float = 0.0):
    model = make_tiny_cnn(seed)
    if dropout:
        model.stage2.append(nn.Dropout(dropout))

    def count(_m, args):
        counting_cnn.seen += len(args[0])

    model.stem[0].register_forward_pre_hook(count)
    return model


PREFIXED = dict(
    augment=None, precision="fp32", image_size=16, early_stopping=False,
    validation_fraction=0.33,
)  # fmt: skip


@pytest.mark.parametrize("freeze", [2, "backbone"])
def test_memory_reads_what_an_earlier_fit_stored(data, tmp_path, freeze):
    X, y = data
    params = {**FAST, **PREFIXED, "freeze": freeze}
    # Dropout in the part that trains: a fit that reads instead of running a
    # pass must still draw the same masks.
    model = functools.partial(counting_cnn_of, 0, dropout=0.5)
    plain = FineTuneClassifier(model, **params).fit(X, y)
    seen, fits = [], []
    for _ in range(2):
        counting_cnn.seen = 0
        fits.append(FineTuneClassifier(model, memory=str(tmp_path), **params).fit(X, y))
        seen.append(counting_cnn.seen)
    # The first fit fills the cache in its one pass; the second reads every
    # image's prefix and features from it instead.
    assert seen[1] == seen[0] - len(X)
    for clf in fits:
        np.testing.assert_allclose(
            clf.predict_proba(X), plain.predict_proba(X), rtol=1e-5, atol=1e-6
        )
        for got, want in zip(clf.history_, plain.history_, strict=True):
            for k in ("train_loss", "valid_loss", "valid_accuracy"):
                assert got[k] == pytest.approx(want[k], nan_ok=True, rel=1e-5)


@pytest.mark.slow
def test_memory_never_shares_between_different_networks(data, tmp_path):
    X, y = data
    params = {**FAST, **PREFIXED, "freeze": 2, "memory": str(tmp_path)}
    FineTuneClassifier(counting_cnn, **params).fit(X, y)
    other = functools.partial(counting_cnn_of, 1)
    counting_cnn.seen = 0
    cached = FineTuneClassifier(other, **params).fit(X, y)
    assert counting_cnn.seen > len(X)  # computed, not read
    plain = FineTuneClassifier(other, **{**params, "memory": None}).fit(X, y)
    np.testing.assert_allclose(
        cached.predict_proba(X), plain.predict_proba(X), rtol=1e-5, atol=1e-6
    )
    # Nor between the images' contents: another set is computed too.
    counting_cnn.seen = 0
    FineTuneClassifier(other, **params).fit(255 - X, y)
    assert counting_cnn.seen > len(X)


@pytest.mark.slow
def test_freeze_search_with_memory_scores_as_without(data, tmp_path):
    from sklearn.model_selection import GridSearchCV

    X, y = data
    grid = {"freeze": [1, 2, "backbone"]}
    params = {**FAST, **PREFIXED, "validation_fraction": None}
    plain = GridSearchCV(FineTuneClassifier(TINY, **params), grid, cv=2).fit(X, y)
    est = FineTuneClassifier(TINY, memory=str(tmp_path), **params)
    cached = GridSearchCV(est, grid, cv=2).fit(X, y)
    np.testing.assert_allclose(
        cached.cv_results_["mean_test_score"], plain.cv_results_["mean_test_score"]
    )


# --- reliability of the training loop -------------------------------------------


def test_cpu_fit_forks_no_cuda_generator(data, monkeypatch):
    seen = []
    fork = torch.random.fork_rng

    def spy(devices=None, **kwargs):
        seen.append(devices)
        return fork(devices=devices, **kwargs)

    monkeypatch.setattr(torch.random, "fork_rng", spy)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)  # a GPU machine
    X, y = data
    make(device="cpu", epochs=1, validation_fraction=None).fit(X, y)
    assert seen == [[]]


def test_validation_metrics_use_the_training_weights():
    from sklearn_cnn._training import Loss, validation_metrics

    logits = torch.tensor([[2.0, 0.0], [2.0, 0.0], [0.0, 2.0]])
    y = torch.tensor([0, 1, 1])
    plain = validation_metrics(logits, y, torch.ones(3), Loss(None, 0.0, "cpu"))
    weighted = validation_metrics(
        logits, y, torch.ones(3), Loss(np.array([1.0, 4.0]), 0.0, "cpu")
    )
    assert plain[1] == pytest.approx(2 / 3)
    # class 1 weighs 4: one right and one wrong of weight 4, one right of 1
    assert weighted[1] == pytest.approx(5 / 9) and weighted[0] > plain[0]
    sample = validation_metrics(
        logits, y, torch.tensor([1.0, 0.0, 1.0]), Loss(None, 0.0, "cpu")
    )
    assert sample[1] == 1.0


class OneByOne(nn.Module):
    """Pools to 1 x 1 before a BatchNorm: training mode needs two images."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(torch.flatten(self.bn(self.pool(self.conv(x))), 1))


def test_one_value_per_channel_names_batchnorm(data):
    X, y = data
    clf = FineTuneClassifier(
        OneByOne(), batchnorm="train", batch_size=1, epochs=1,
        validation_fraction=None, head_init="random", random_state=0,
    )  # fmt: skip
    with pytest.raises(ValueError, match="batchnorm='frozen'"):
        clf.fit(X[:4], np.array([0, 1, 0, 1]))
    with pytest.raises(NotFittedError):
        clf.predict(X[:2])


class TutorialNet(nn.Module):
    """The PyTorch tutorial's Net: ``x.view`` needs contiguous tensors."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc1 = nn.Linear(4 * 14 * 14, 8)
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x):
        x = torch.relu(self.conv(x))
        return self.fc2(torch.relu(self.fc1(x.view(-1, 4 * 14 * 14))))


@pytest.mark.parametrize("augment", [None, "light"])
def test_a_network_written_with_view_fine_tunes(data, augment):
    X, y = data
    clf = FineTuneClassifier(
        TutorialNet(), augment=augment, freeze=1, epochs=1, batch_size=16,
        random_state=0, validation_fraction=None,
    )  # fmt: skip
    assert clf.fit(X, y).predict_proba(X).shape == (60, 3)
