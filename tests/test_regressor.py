"""FineTuneRegressor: targets of every shape in the user's units, the losses,
the ridge-probe start and its selection, sample weights, warm start, saving,
pickling, and its place in scikit-learn (meta-estimators, the common checks)."""

from __future__ import annotations

import functools
import pickle
import warnings

import numpy as np
import pytest
import torch
from numpy.testing import assert_allclose, assert_array_equal
from sklearn.base import clone, is_regressor
from sklearn.compose import TransformedTargetRegressor
from sklearn.linear_model import RidgeCV
from sklearn.metrics import r2_score
from sklearn.model_selection import cross_val_score
from sklearn.utils import estimator_checks
from sklearn.utils._param_validation import InvalidParameterError
from tiny_cnn import make_tiny_cnn

from sklearn_cnn import FineTuneRegressor, load
from sklearn_cnn._head import standardize
from sklearn_cnn._layers import Tap
from sklearn_cnn._tasks import RIDGE_ALPHAS, Regression, RegressionLoss

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FAST = dict(
    epochs=2, batch_size=8, augment=None, precision="fp32", random_state=0,
    validation_fraction=None,
)  # fmt: skip


def make(**params) -> FineTuneRegressor:
    return FineTuneRegressor(functools.partial(make_tiny_cnn, 0), **{**FAST, **params})


def brightness_images(n: int = 60, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """16 x 16 images of random flat colours plus noise, and two numbers read
    off them (far from 0 and 1 in scale): the red and the blue level."""
    rng = np.random.default_rng(seed)
    colour = rng.uniform(20, 235, (n, 1, 1, 3))
    noise = rng.normal(0, 12, (n, 16, 16, 3))
    X = np.clip(colour + noise, 0, 255).astype(np.uint8)
    y = np.c_[1000 + 4 * colour[:, 0, 0, 0], -0.01 * colour[:, 0, 0, 2]]
    return X, y


@pytest.fixture(scope="module")
def data():
    return brightness_images()


@pytest.fixture(scope="module")
def fitted(data):
    X, y = data
    return make().fit(X, y[:, 0])


# -- targets -----------------------------------------------------------------


def test_one_target_is_predicted_in_the_users_units(data, fitted):
    X, y = data
    pred = fitted.predict(X)
    assert pred.shape == (len(X),) and pred.dtype == np.float64
    assert fitted.n_outputs_ == 1
    assert fitted.y_mean_[0] == pytest.approx(y[:, 0].mean())
    assert abs(pred.mean() - y[:, 0].mean()) < 0.1 * y[:, 0].std()
    assert fitted.score(X, y[:, 0]) == pytest.approx(r2_score(y[:, 0], pred))
    assert fitted.score(X, y[:, 0]) > 0.8


@pytest.mark.parametrize("columns", [[0], [0, 1]], ids=["(n, 1)", "(n, 2)"])
def test_target_columns_keep_their_shape(data, columns):
    X, y = data
    Y = y[:, columns]
    reg = make().fit(X, Y)
    pred = reg.predict(X)
    assert pred.shape == Y.shape
    assert reg.n_outputs_ == len(columns)
    # R² of each output, averaged: each output scaled on its own.
    assert reg.score(X, Y) == pytest.approx(r2_score(Y, pred))
    assert r2_score(Y, pred, multioutput="raw_values").min() > 0.7


def test_integer_and_list_targets(data):
    X, y = data
    as_int = np.round(y[:, 0]).astype(int)
    reg = make(epochs=0).fit(X, as_int.tolist())
    assert reg.predict(X).dtype == np.float64
    assert reg.score(X, as_int) > 0.8


def test_a_constant_output_is_predicted_exactly(data):
    X, y = data
    Y = np.c_[y[:, 0], np.full(len(y), 7.5)]
    pred = make().fit(X, Y).predict(X)
    assert_allclose(pred[:, 1], 7.5, atol=1e-3)


@pytest.mark.parametrize(
    "bad, match",
    [
        (None, "needs targets"),
        (np.ones((59,)), "60 images but y has 59"),
        (np.ones((60, 2, 2)), "y has shape"),
        (np.r_[np.nan, np.ones(59)], "NaN"),
        (np.array(["a"] * 60), "could not convert|convert"),
    ],
)
def test_bad_targets_are_refused(data, bad, match):
    X, _ = data
    with pytest.raises(ValueError, match=match):
        make().fit(X, bad)


# -- the losses and the probe start ---------------------------------------------


@pytest.mark.parametrize("loss", ["squared_error", "huber", "absolute_error"])
def test_each_loss_trains(data, loss):
    X, y = data
    reg = make(loss=loss).fit(X, y[:, 0])
    assert all(np.isfinite(row["train_loss"]) for row in reg.history_)
    assert reg.score(X, y[:, 0]) > 0.85


def test_regression_losses_are_the_usual_ones():
    z = torch.tensor([[0.0], [3.0]])
    t = torch.tensor([[1.0], [0.0]])
    w = torch.tensor([1.0, 3.0])
    for kind, each in [
        ("squared_error", [1.0, 9.0]),
        ("huber", [0.5, 2.5]),
        ("absolute_error", [1.0, 3.0]),
    ]:
        total, weight = RegressionLoss(kind)(z, t, w)
        assert float(total) == pytest.approx(each[0] + 3 * each[1])
        assert float(weight) == 4.0


def test_r2_score_matches_scikit_learn():
    rng = np.random.default_rng(0)
    t = rng.normal(size=(30, 2))
    z = t + rng.normal(scale=0.5, size=(30, 2))
    w = rng.uniform(0.1, 2, 30)
    got = RegressionLoss("squared_error").score(
        torch.from_numpy(z), torch.from_numpy(t), torch.from_numpy(w)
    )
    assert got == pytest.approx(r2_score(t, z, sample_weight=w))


def ridge_reference(Z: np.ndarray, y: np.ndarray) -> np.ndarray:
    """The ridge probe's predictions on ``Z``, by hand: RidgeCV (alpha by
    leave-one-out) on the standardised or the raw features, whichever leaves
    one out better."""
    scaler, Zs = standardize(Z)
    scaled = RidgeCV(alphas=RIDGE_ALPHAS).fit(Zs, y)
    raw = RidgeCV(alphas=RIDGE_ALPHAS).fit(Z.astype(np.float64), y)
    if scaled.best_score_ >= raw.best_score_:
        return scaled.predict(Zs)
    return raw.predict(Z.astype(np.float64))


def test_the_start_is_the_ridge_probe(data):
    """epochs=0 keeps the head the probe fitted: a RidgeCV on the pooled
    features of the frozen network, predicting the standardised targets."""
    X, y = data
    reg = make(epochs=0).fit(X, y)
    # The head's input (32 pooled features), through the inference loop.
    Z = reg._run(X, [Tap(reg.head_, pre=True)], lambda o: o[0].float(), 32, "f")
    ys = (y - y.mean(0)) / y.std(0)
    standardised = (reg.predict(X) - y.mean(0)) / y.std(0)
    assert_allclose(standardised, ridge_reference(Z, ys), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("scaled_wins", [True, False])
def test_the_probe_standardises_only_where_it_leaves_one_out_better(scaled_wins):
    """Standardising wins when the signal is in a feature of tiny scale; the
    raw features win when standardising blows up nearly dead ones."""
    rng = np.random.default_rng(0)
    n = 60
    x = rng.normal(size=n)
    if scaled_wins:
        F = np.c_[1e-3 * x, rng.normal(size=(n, 5))]
        y = x + 0.1 * rng.normal(size=n)
    else:
        F = np.c_[x, np.zeros((n, 20))]
        for j in range(1, 21):  # each fires, weakly, on two images
            F[rng.choice(n, 2, replace=False), j] = 1e-3
        y = x + 0.3 * rng.normal(size=n)
    F = F.astype(np.float32)
    scaler, Zs = standardize(F)
    scaled = RidgeCV(alphas=RIDGE_ALPHAS).fit(Zs, y).best_score_
    raw = RidgeCV(alphas=RIDGE_ALPHAS).fit(F.astype(np.float64), y).best_score_
    assert (scaled > raw) == scaled_wins
    weight, bias = Regression("squared_error").probe(F, y, None, 0)
    assert_allclose(F @ weight.T + bias, ridge_reference(F, y)[:, None], atol=1e-6)


def test_selection_keeps_the_probe_unless_an_epoch_beats_it(data):
    X, y = data
    reg = make(epochs=4, validation_fraction=0.4, early_stopping=True).fit(X, y)
    r2 = [row["valid_r2"] for row in reg.history_]
    assert {"epoch", "train_loss", "valid_loss", "valid_r2", "time"} <= set(
        reg.history_[0]
    )
    assert reg.best_epoch_ == int(np.argmax(r2))
    # A rate that wrecks the network: the probe start is kept, and the guard
    # judges by the validation R².
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        wrecked = make(
            epochs=3, validation_fraction=0.4, lr=50.0, backbone_lr=50.0
        ).fit(X, y)
    assert wrecked.best_epoch_ == 0
    messages = [str(w.message) for w in caught]
    assert any("wrecked" in m and "validation R²" in m for m in messages)
    assert wrecked.score(X, y) > 0.7


# -- sample weights, warm start, tta ---------------------------------------------


def test_sample_weight_silences_corrupted_targets(data):
    X, y = data
    rng = np.random.default_rng(1)
    bad = rng.choice(len(y), 15, replace=False)
    corrupted = y[:, 0].copy()
    corrupted[bad] = rng.uniform(0, 3000, len(bad))
    weight = np.ones(len(y))
    weight[bad] = 0
    clean = np.setdiff1d(np.arange(len(y)), bad)
    weighted = make().fit(X, corrupted, sample_weight=weight)
    unweighted = make().fit(X, corrupted)
    assert (
        weighted.score(X[clean], y[clean, 0])
        > unweighted.score(X[clean], y[clean, 0]) + 0.1
    )
    with pytest.raises(ValueError, match="[Nn]egative"):
        make().fit(X, y[:, 0], sample_weight=-weight)


def test_warm_start_continues_in_the_fitted_units(data):
    X, y = data
    reg = make(warm_start=True).fit(X, y[:, 0])
    mean, n = reg.y_mean_.copy(), reg.n_iter_
    reg.fit(X, y[:, 0] + 5)
    assert reg.n_iter_ == n + 2
    assert_array_equal(reg.y_mean_, mean)
    with pytest.raises(ValueError, match="2 output"):
        reg.fit(X, y)


def test_tta_flip_averages_an_image_and_its_mirror(data, fitted):
    X, _ = data
    plain = fitted.predict(X)
    mirrored = fitted.predict(X[:, :, ::-1])
    flip = clone(fitted).set_params(tta="flip")
    flip.__dict__.update(
        {k: v for k, v in fitted.__dict__.items() if k.endswith("_") or k[0] == "_"}
    )
    assert_allclose(flip.predict(X), (plain + mirrored) / 2, rtol=1e-5, atol=1e-3)


# -- persistence --------------------------------------------------------------


@pytest.mark.parametrize("columns", [0, [0, 1]], ids=["(n,)", "(n, 2)"])
def test_save_load_and_pickle_round_trip(data, tmp_path, columns):
    X, y = data
    reg = make().fit(X, y[:, columns])
    pred = reg.predict(X)
    path = tmp_path / "reg.pt"
    reg.save(path)
    loaded = load(path, trusted=["tiny_cnn:make_tiny_cnn"])
    assert type(loaded) is FineTuneRegressor
    assert_allclose(loaded.predict(X), pred, rtol=1e-6)
    assert loaded.predict(X).shape == pred.shape
    assert_allclose(pickle.loads(pickle.dumps(reg)).predict(X), pred, rtol=1e-6)


# -- scikit-learn -------------------------------------------------------------


def test_is_a_multi_output_regressor():
    reg = make()
    assert is_regressor(reg)
    assert reg.__sklearn_tags__().target_tags.multi_output
    assert reg.__sklearn_tags__().input_tags.two_d_array is False


def test_in_transformed_target_regressor_and_cross_validation(data):
    X, y = data
    ttr = TransformedTargetRegressor(make(), func=np.log, inverse_func=np.exp)
    ttr.fit(X, y[:, 0])
    assert ttr.predict(X).shape == (len(X),)
    assert ttr.score(X, y[:, 0]) > 0.7
    scores = cross_val_score(make(epochs=1), X, y, cv=3)
    assert scores.shape == (3,) and np.isfinite(scores).all()


def test_in_bagging_through_a_reshaping_pipeline(data):
    # BaggingRegressor takes 2-D X only: images go in as rows and a
    # FunctionTransformer gives them their shape back.
    from sklearn.ensemble import BaggingRegressor
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import FunctionTransformer

    X, y = data
    rows = X.reshape(len(X), -1)
    bag = BaggingRegressor(
        make_pipeline(
            FunctionTransformer(lambda r: r.reshape(-1, *X.shape[1:])),
            make(epochs=1),
        ),
        n_estimators=2,
        random_state=0,
    ).fit(rows, y[:, 0])
    assert len(bag.estimators_) == 2
    members = [est.predict(rows) for est in bag.estimators_]
    assert not np.allclose(members[0], members[1])  # different bootstrap draws
    assert_allclose(bag.predict(rows), np.mean(members, axis=0), rtol=1e-5)
    assert bag.score(rows, y[:, 0]) > 0.5


@pytest.mark.parametrize(
    "check",
    [
        estimator_checks.check_get_params_invariance,
        estimator_checks.check_set_params,
        estimator_checks.check_no_attributes_set_in_init,
        estimator_checks.check_do_not_raise_errors_in_init_or_set_params,
        estimator_checks.check_parameters_default_constructible,
        estimator_checks.check_estimator_repr,
        estimator_checks.check_mixin_order,
        estimator_checks.check_estimator_cloneable,
        estimator_checks.check_estimator_tags_renamed,
        estimator_checks.check_valid_tag_types,
        # Tabular X fails after this check's point: a 1-D X must raise a
        # ValueError. (check_param_validation refuses ``freeze``'s constraint,
        # shared with FineTuneClassifier: an int counts stages, a float in
        # [0, 1] a fraction, so its intervals mix Integral and Real on purpose.)
        estimator_checks.check_fit1d,
    ],
    ids=lambda check: check.__name__,
)
def test_sklearn_common_checks(check):
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        check("FineTuneRegressor", make())


def test_invalid_loss_is_refused(data):
    X, y = data
    with pytest.raises(InvalidParameterError, match="'loss' parameter"):
        make(loss="l2").fit(X, y[:, 0])
    for name in ("class_weight", "label_smoothing", "calibrate"):
        assert name not in make().get_params()


def test_fit_is_repeatable_and_leaves_its_input_alone(data):
    X, y = data
    X0, y0 = X.copy(), y.copy()
    reg = make()
    first = reg.fit(X, y).predict(X)
    assert reg.fit(X, y) is reg
    assert_allclose(reg.predict(X), first, rtol=1e-6)
    assert_array_equal(X, X0)
    assert_array_equal(y, y0)
