"""FineTuneClassifier on a binary indicator matrix: sigmoid outputs trained with
BCEWithLogitsLoss, one-vs-rest logistic probes, selection by the validation
mean average precision, a temperature and an optional threshold per label,
and the label sets of MultiLabelBinarizer."""

from __future__ import annotations

import functools
import pickle
import warnings

import numpy as np
import pytest
import torch
from numpy.testing import assert_allclose, assert_array_equal
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, average_precision_score
from sklearn.model_selection import GridSearchCV, StratifiedKFold, cross_val_score
from sklearn.preprocessing import MultiLabelBinarizer
from tiny_cnn import make_tiny_cnn

from sklearn_cnn import FineTuneClassifier, load
from sklearn_cnn._head import standardize
from sklearn_cnn._layers import Tap
from sklearn_cnn._tasks import MultiLabel, MultiLabelLoss, mean_average_precision

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FAST = dict(
    epochs=2, batch_size=8, augment=None, precision="fp32", random_state=0,
    validation_fraction=None, calibrate=False,
)  # fmt: skip


def make(**params) -> FineTuneClassifier:
    return FineTuneClassifier(functools.partial(make_tiny_cnn, 0), **{**FAST, **params})


def channel_images(n: int = 80, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """16 x 16 noisy images; label j (of 3) is present when colour channel j
    is bright, so an image has any number of labels, none included."""
    rng = np.random.default_rng(seed)
    Y = (rng.random((n, 3)) < 0.4).astype(np.int64)
    X = rng.integers(0, 90, (n, 16, 16, 3)) + 140 * Y[:, None, None, :]
    return X.astype(np.uint8), Y


@pytest.fixture(scope="module")
def data():
    return channel_images()


@pytest.fixture(scope="module")
def fitted(data):
    X, Y = data
    return make().fit(X, Y)


# -- outputs -------------------------------------------------------------------


def test_outputs_are_per_label(data, fitted):
    X, Y = data
    proba = fitted.predict_proba(X)
    assert proba.shape == Y.shape and proba.dtype == np.float64
    assert ((proba >= 0) & (proba <= 1)).all()
    assert not np.allclose(proba.sum(1), 1)  # not a softmax
    assert_allclose(np.exp(fitted.predict_log_proba(X)), proba, rtol=1e-10)
    assert fitted.decision_function(X).shape == Y.shape
    pred = fitted.predict(X)
    assert pred.shape == Y.shape
    assert set(np.unique(pred)) <= {0, 1}
    assert_array_equal(pred, (proba >= 0.5).astype(int))
    assert_array_equal(fitted.classes_, [0, 1, 2])
    assert_array_equal(fitted.thresholds_, [0.5, 0.5, 0.5])
    # score: subset accuracy, as scikit-learn's classifiers give it.
    assert fitted.score(X, Y) == pytest.approx(accuracy_score(Y, pred))
    assert average_precision_score(Y, proba) > 0.95


def test_tags_and_single_label_threshold_tuning(data):
    X, Y = data
    tags = make().__sklearn_tags__()
    assert tags.classifier_tags.multi_label and tags.target_tags.multi_output
    with pytest.raises(ValueError, match="TunedThresholdClassifierCV"):
        make(tune_thresholds=True).fit(X, Y[:, 0])


def test_two_labels_are_not_collapsed_into_one_score(data):
    X, Y = data
    clf = make(epochs=0).fit(X, Y[:, :2])
    assert clf.decision_function(X).shape == (len(X), 2)
    assert clf.predict(X).shape == (len(X), 2)


def test_images_without_any_label_and_constant_labels(data):
    X, Y = data
    Y = Y.copy()
    Y[:, 2] = 0  # a label no image has
    clf = make().fit(X, Y)
    assert (clf.predict_proba(X)[:, 2] < 0.5).all()
    assert (clf.predict(X).sum(1) == 0).any()


def test_label_sets_through_multilabel_binarizer(data):
    """Labels as sets of strings (or ints): MultiLabelBinarizer's indicator
    matrix in, its inverse_transform on the predictions out."""
    X, Y = data
    names = np.array(["red", "green", "blue"])
    sets = [set(names[row.astype(bool)]) for row in Y]
    mlb = MultiLabelBinarizer()
    clf = make().fit(X, mlb.fit_transform(sets))
    predicted = mlb.inverse_transform(clf.predict(X))
    assert np.mean([set(p) == s for p, s in zip(predicted, sets, strict=True)]) > 0.9
    ints = MultiLabelBinarizer().fit_transform(
        [{int(j) for j in np.flatnonzero(r)} for r in Y]
    )
    assert make(epochs=0).fit(X, ints).predict(X).shape == Y.shape


@pytest.mark.parametrize(
    "bad, match",
    [
        (lambda Y: [list(np.flatnonzero(r)) for r in Y], "MultiLabelBinarizer"),
        (lambda Y: Y * 2, "binary indicator|only 0 and 1"),
        (lambda Y: np.where(Y == 1, "a", "b"), "indicator"),
        (lambda Y: np.zeros_like(Y), "nothing to learn"),
    ],
    ids=["label lists", "not 0/1", "strings", "constant"],
)
def test_other_label_layouts_are_refused(data, bad, match):
    X, Y = data
    with pytest.raises(ValueError, match=match):
        make().fit(X, bad(Y))


# -- the probe, selection, the loss ---------------------------------------------


def logistic_reference(
    Z: np.ndarray, y: np.ndarray, seed: int, scalings=("standardised", "raw")
) -> np.ndarray:
    """A binary logistic probe's logits on ``Z``, by hand: C by stratified
    3-fold CV (log-loss) on the standardised or the raw features, whichever
    scores better."""
    inputs = {"standardised": standardize(Z)[1], "raw": Z.astype(np.float64)}
    best = None
    for name in scalings:
        search = GridSearchCV(
            LogisticRegression(max_iter=1000),
            {"C": [1e-3, 1e-2, 1e-1, 1.0, 10.0]},
            cv=StratifiedKFold(3, shuffle=True, random_state=seed),
            scoring="neg_log_loss",
        ).fit(inputs[name], y)
        if best is None or search.best_score_ > best[0]:
            best = search.best_score_, search.decision_function(inputs[name])
    return best[1]


def test_the_start_is_one_vs_rest_logistic_probes(data):
    """epochs=0: each label's logit is a logistic regression on that column
    of the frozen network's pooled features."""
    X, Y = data
    clf = make(epochs=0).fit(X, Y)
    Z = clf._run(X, [Tap(clf.head_, pre=True)], lambda o: o[0].float(), 32, "f")
    seed = int(np.random.RandomState(0).randint(2**31 - 1))  # random_state=0
    multi = clf.decision_function(X)
    for j in range(Y.shape[1]):
        reference = logistic_reference(Z, Y[:, j], seed)
        assert_allclose(multi[:, j], reference, rtol=1e-4, atol=1e-4)


def test_the_probe_may_take_the_raw_features():
    """On features with many nearly dead units the raw features win the CV,
    and the probe's logits are then those of the raw-feature regression."""
    rng = np.random.default_rng(0)
    n = 90
    x = rng.normal(size=n)
    F = np.c_[x, np.zeros((n, 30))].astype(np.float32)
    for j in range(1, 31):  # each fires, weakly, on two images
        F[rng.choice(n, 2, replace=False), j] = 1e-3
    Y = np.c_[x + 0.5 * rng.normal(size=n) > 0, x > 0.5].astype(np.int64)
    weight, bias = MultiLabel(None, 0.0, np.arange(2)).probe(F, Y, None, 0)
    for j in range(2):
        raw = logistic_reference(F, Y[:, j], 0, scalings=("raw",))
        assert_allclose(F @ weight[j] + bias[j], raw, atol=1e-6)


@pytest.mark.slow
def test_selection_by_validation_mean_average_precision(data):
    X, Y = data
    clf = make(epochs=3, validation_fraction=0.3, early_stopping=True).fit(X, Y)
    scores = [row["valid_average_precision"] for row in clf.history_]
    assert "valid_accuracy" not in clf.history_[0]
    assert scores[clf.best_epoch_] == max(scores)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        wrecked = make(
            epochs=2, validation_fraction=0.3, lr=80.0, backbone_lr=80.0
        ).fit(X, Y)
    assert wrecked.best_epoch_ == 0
    assert any("validation mAP" in str(w.message) for w in caught)


def test_class_weight_weighs_each_labels_positives():
    Y = np.array([[1, 0], [1, 0], [0, 0], [1, 1]], dtype=np.float32)
    task = MultiLabel("balanced", 0.0, np.arange(2))
    pos, sw = task.weights(Y, np.arange(4), None)
    assert_allclose(pos, [1 / 3, 3.0])
    assert sw is None
    pos, _ = MultiLabel({1: 5.0}, 0.0, np.arange(2)).weights(Y, np.arange(4), None)
    assert_allclose(pos, [1.0, 5.0])
    with pytest.raises(ValueError, match="column indices"):
        MultiLabel({"cat": 2.0}, 0.0, np.arange(2)).weights(Y, np.arange(4), None)
    # The positive weight reaches BCEWithLogitsLoss.
    z, t, w = torch.zeros(1, 2), torch.tensor([[1.0, 1.0]]), torch.ones(1)
    plain, _ = MultiLabelLoss(None, 0.0, torch.device("cpu"))(z, t, w)
    weighted, _ = MultiLabelLoss(np.array([1.0, 3.0]), 0.0, torch.device("cpu"))(
        z, t, w
    )
    assert float(weighted) == pytest.approx(float(plain) * 2)


def test_mean_average_precision_skips_labels_without_both_kinds():
    y = np.array([[1, 0, 1], [0, 0, 1], [1, 0, 1]])
    z = np.array([[0.9, 0.1, 0.2], [0.2, 0.3, 0.1], [0.8, 0.2, 0.5]])
    assert mean_average_precision(z, y) == pytest.approx(1.0)
    assert np.isnan(mean_average_precision(z, np.ones_like(y)))


# -- calibration and thresholds ---------------------------------------------------


def test_calibration_fits_a_temperature_per_label(data):
    X, Y = data
    clf = make(calibrate=True, validation_fraction=0.3).fit(X, Y)
    assert clf.temperature_.shape == (3,)
    assert clf.calibration_["after"] <= clf.calibration_["before"] + 1e-9
    raw = clf._outputs_of(X)
    assert_allclose(clf.decision_function(X), raw / clf.temperature_)


def test_thresholds_are_tuned_for_f1_only_when_asked(data):
    X, Y = data
    tuned = make(validation_fraction=0.3, tune_thresholds=True).fit(X, Y)
    assert tuned.thresholds_.shape == (3,)
    assert ((tuned.thresholds_ > 0) & (tuned.thresholds_ < 1)).all()
    assert_array_equal(
        tuned.predict(X), (tuned.predict_proba(X) >= tuned.thresholds_).astype(int)
    )
    proba = np.array([[0.1], [0.3], [0.35], [0.9]])
    y = np.array([[0], [1], [1], [1]])
    assert_allclose(MultiLabel.tune_thresholds(proba, y), [0.2])


# -- weights, warm start, persistence, scikit-learn -------------------------------


@pytest.mark.slow
def test_sample_weight_and_warm_start(data):
    X, Y = data
    w = np.r_[np.ones(40), np.full(40, 3.0)]
    a = make().fit(X, Y, sample_weight=w).decision_function(X)
    b = make().fit(X, Y).decision_function(X)
    assert not np.allclose(a, b)
    with pytest.raises(ValueError, match="[Nn]egative"):
        make().fit(X, Y, sample_weight=-w)
    clf = make(warm_start=True).fit(X, Y)
    clf.fit(X, Y)
    assert clf.n_iter_ == 4
    with pytest.raises(ValueError, match="2 labels"):
        clf.fit(X, Y[:, :2])


def test_save_load_and_pickle_round_trip(data, fitted, tmp_path):
    X, _ = data
    proba = fitted.predict_proba(X)
    path = tmp_path / "multilabel.pt"
    fitted.save(path)
    loaded = load(path, trusted=["tiny_cnn:make_tiny_cnn"])
    assert_allclose(loaded.predict_proba(X), proba, rtol=1e-6)
    assert_array_equal(loaded.predict(X), fitted.predict(X))
    assert_allclose(pickle.loads(pickle.dumps(fitted)).predict_proba(X), proba)


def test_refit_on_single_labels_is_single_label_again(data, fitted):
    X, Y = data
    clf = make(epochs=0).fit(X, Y)
    clf.fit(X, Y[:, 0])
    assert clf.predict_proba(X).shape == (len(X), 2)
    assert clf.predict(X).shape == (len(X),)


@pytest.mark.slow
def test_cross_validation(data):
    X, Y = data
    subset = cross_val_score(make(epochs=1), X, Y, cv=3)
    ap = cross_val_score(make(epochs=1), X, Y, cv=3, scoring="average_precision")
    assert np.isfinite(subset).all() and (ap > 0.8).all()
