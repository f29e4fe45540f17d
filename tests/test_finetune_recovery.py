"""FineTuneClassifier: an epoch that wrecks the pretrained network is undone
within the fit, and the fit goes on at a lower backbone rate; what happened is
in ``history_`` and ``backbone_lr_``; epoch 0 and the verbose log hold no NaN.

A TinyCNN on 16 x 16 images of three colours: a backbone rate of 0.3 wrecks
it in one epoch (training loss in the tens of thousands), a hundredth of it
does not."""

from __future__ import annotations

import functools
import math
import re
import warnings

import numpy as np
import pytest
from tiny_cnn import colour_images, make_tiny_cnn

from sklearn_cnn import FineTuneClassifier
from sklearn_cnn._training import MAX_RECOVERIES, Guard

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FAST = dict(epochs=4, batch_size=16, random_state=0, augment=None)


def make(**params) -> FineTuneClassifier:
    return FineTuneClassifier(functools.partial(make_tiny_cnn, 0), **{**FAST, **params})


def fit_quietly(clf: FineTuneClassifier, X, y) -> tuple[FineTuneClassifier, list]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        clf.fit(X, y)
    return clf, [str(w.message) for w in caught]


@pytest.fixture(scope="module")
def data():
    return colour_images(20), colour_images(20, seed=1)


def test_guard_tells_a_wreck_from_a_dip():
    # Two classes, the larger one 68.6 % of the validation images, the probe
    # head at 0.857: a first epoch at 0.794 is a dip, at 0.314 a wreck.
    guard = Guard(chance_loss=0.62, start_loss=0.30, chance_accuracy=0.686)
    assert guard.wrecked(0.35, 0.794, 0.857) == ""
    assert "validation accuracy 0.314" in guard.wrecked(0.35, 0.314, 0.857)
    # Training loss back at what learning nothing gives: a wreck, with or
    # without validation images.
    assert "training loss 0.625" in guard.wrecked(0.625, math.nan, math.nan)
    assert guard.wrecked(0.44, math.nan, math.nan) == ""
    # No known start (a random head): only validation can tell.
    assert Guard(0.62, None, 0.686).wrecked(5.0, 0.85, 0.857) == ""
    # Once the recoveries are spent, nothing is a wreck any more.
    assert Guard(0.62, 0.30, 0.686, left=0).wrecked(5.0, 0.1, 0.857) == ""


@pytest.mark.parametrize("validation_fraction", [0.33, None])
def test_a_wrecked_fit_recovers_and_ends_as_good_as_the_probe(
    data, validation_fraction
):
    (X, y), (X_test, y_test) = data
    probe = make(epochs=0, validation_fraction=validation_fraction).fit(X, y)
    clf, caught = fit_quietly(
        make(backbone_lr=0.3, validation_fraction=validation_fraction), X, y
    )
    history = clf.history_
    # Epoch 1 wrecked the network; the fit went on at a tenth of the rate
    # (and at a hundredth where epoch 2 wrecked it too).
    assert history[1]["train_loss"] > 1e3 and history[1]["backbone_lr"] == 0.3
    rates = [row["backbone_lr"] for row in history[1:]]
    assert rates[:2] == pytest.approx([0.3, 0.03]) and clf.n_iter_ == 4
    assert rates == sorted(rates, reverse=True) and rates[-1] <= 0.03
    assert clf.backbone_lr_ == rates[-1]
    assert (
        sum("wrecked the pretrained network" in m for m in caught)
        == len(set(rates)) - 1
    )
    assert any("Set a lower backbone_lr" in m for m in caught)
    # The epochs at the lower rate train (the loss falls below the probe's start), and
    # the weights kept come from them, as good as the probe on new images.
    assert history[-1]["train_loss"] < np.log(3) / 2
    assert clf.best_epoch_ >= 3
    assert clf.score(X_test, y_test) >= probe.score(X_test, y_test)
    if validation_fraction:
        assert (
            history[clf.best_epoch_]["valid_accuracy"] >= history[0]["valid_accuracy"]
        )


def test_a_wrecked_last_epoch_is_undone(data):
    # Without a validation split the last epoch is kept, unless it wrecked
    # the network: then the weights before it are.
    (X, y), _ = data
    probe = make(epochs=0, validation_fraction=None).fit(X, y)
    clf, caught = fit_quietly(
        make(backbone_lr=1.0, epochs=1, validation_fraction=None), X, y
    )
    assert clf.n_iter_ == 1 and clf.best_epoch_ == 0 and clf.backbone_lr_ == 0.1
    np.testing.assert_allclose(clf.predict_proba(X), probe.predict_proba(X))


def test_recoveries_are_bounded(data):
    # A rate that still wrecks after MAX_RECOVERIES tenfold cuts: the fit
    # stops cutting (selection still keeps the best epoch).
    (X, y), _ = data
    clf, caught = fit_quietly(
        make(backbone_lr=1e4, epochs=5, validation_fraction=None), X, y
    )
    assert clf.backbone_lr_ == pytest.approx(1e4 / 10**MAX_RECOVERIES)
    assert sum("wrecked" in m for m in caught) == MAX_RECOVERIES
    rates = [row["backbone_lr"] for row in clf.history_[1:]]
    assert rates == pytest.approx([1e4, 1e3] + [1e2] * 3)


def test_a_sound_fit_keeps_its_rate(data):
    # The defaults on data the network learns: no recovery, no warning.
    (X, y), _ = data
    clf, caught = fit_quietly(make(validation_fraction=0.33), X, y)
    assert not [m for m in caught if "wrecked" in m]
    assert clf.backbone_lr_ == clf.lr
    assert {row["backbone_lr"] for row in clf.history_[1:]} == {clf.lr}


def test_the_default_rate_recovers_without_a_warning(data):
    # backbone_lr=None: lowering the rate is part of what None chooses.
    (X, y), _ = data
    clf, caught = fit_quietly(make(lr=3.0, validation_fraction=0.33), X, y)
    assert clf.backbone_lr_ < 3.0
    assert not [m for m in caught if "wrecked" in m]


@pytest.mark.parametrize("validation_fraction", [0.33, None])
def test_history_and_log_have_no_nan(data, capsys, validation_fraction):
    (X, y), _ = data
    clf, _ = fit_quietly(
        make(
            epochs=2,
            verbose=1,
            backbone_lr=0.3,
            validation_fraction=validation_fraction,
        ),  # fmt: skip
        X,
        y,
    )
    err = capsys.readouterr().err
    lines = [line for line in re.split(r"[\r\n]", err) if line.startswith("epoch ")]
    epochs = [line for line in lines if re.match(r"epoch \d+:", line)]
    assert len(epochs) == 3 and not [line for line in epochs if "nan" in line]
    assert "wrecked the pretrained network" in err
    assert ("valid accuracy" in epochs[0]) == bool(validation_fraction)
    assert math.isfinite(clf.history_[0]["train_loss"])
    if validation_fraction:
        assert all(math.isfinite(v) for v in clf.history_[0].values())


def test_a_random_head_has_no_start_loss(data):
    # Without a probe the start's training loss is unknown: epoch 0 has no
    # training loss rather than a NaN.
    (X, y), _ = data
    clf = make(head_init="random", epochs=1, validation_fraction=0.33).fit(X, y)
    assert "train_loss" not in clf.history_[0]
    assert all(math.isfinite(v) for v in clf.history_[0].values())
