"""scikit-learn's common estimator checks, adapted to image input.

Our estimators declare image input (``two_d_array=False``), so
``parametrize_with_checks`` skips almost every common check: a green run there
proves little. This module runs, for both estimators, the skipped checks that
make sense for images, each rewritten for N x H x W x C arrays (the sklearn
check it stands for is named in each test). docs/user_guide.rst lists which
checks apply and why the others do not.
"""

from __future__ import annotations

import copy
import functools
import pickle
import warnings

import joblib
import numpy as np
import pytest
import scipy.sparse as sp
from numpy.testing import assert_allclose, assert_array_equal
from sklearn.base import clone
from sklearn.exceptions import DataConversionWarning, NotFittedError
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import cross_val_score
from sklearn.pipeline import make_pipeline
from tiny_cnn import colour_images, in_threads, make_tiny_cnn

from sklearn_cnn import CNNFeatureTransformer, FineTuneClassifier

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def transformer() -> CNNFeatureTransformer:
    return CNNFeatureTransformer(
        functools.partial(make_tiny_cnn, 0), layer=["stage1", "pool"], precision="fp32"
    )


def classifier() -> FineTuneClassifier:
    return FineTuneClassifier(
        functools.partial(make_tiny_cnn, 0), epochs=1, batch_size=8, augment=None,
        validation_fraction=None, random_state=0, precision="fp32",
    )  # fmt: skip


ESTIMATORS = [transformer, classifier]
IDS = ["transformer", "classifier"]


@pytest.fixture(scope="module")
def data():
    X, y = colour_images(6)  # 18 images 16 x 16 of 3 classes
    return X, y


def outputs(est, X) -> np.ndarray:
    """What the estimator computes for X: features, or probabilities."""
    if isinstance(est, FineTuneClassifier):
        return est.predict_proba(X)
    return est.transform(X)


def fitted(make, X, y):
    est = make()
    return est.fit(X, y) if isinstance(est, FineTuneClassifier) else est.fit(X)


@pytest.fixture(scope="module")
def fitted_pair(data):
    X, y = data
    return {
        name: fitted(make, X, y) for make, name in zip(ESTIMATORS, IDS, strict=True)
    }


# -- fit ---------------------------------------------------------------------


@pytest.mark.parametrize("make", ESTIMATORS, ids=IDS)
def test_fit_idempotent(make, data):
    """check_fit_idempotent: a second fit gives the same outputs."""
    X, y = data
    est = fitted(make, X, y)
    first = outputs(est, X)
    fitted_again = est.fit(X, y) if isinstance(est, FineTuneClassifier) else est.fit(X)
    assert fitted_again is est  # check_estimators_fit_returns_self
    assert_allclose(outputs(est, X), first, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("make", ESTIMATORS, ids=IDS)
def test_fit_check_is_fitted_and_unfitted_errors(make, data):
    """check_fit_check_is_fitted, check_estimators_unfitted."""
    X, y = data
    est = make()
    with pytest.raises(NotFittedError):
        outputs(est, X)
    fitted_est = fitted(make, X, y)
    from sklearn.utils.validation import check_is_fitted

    check_is_fitted(fitted_est)


@pytest.mark.parametrize("make", ESTIMATORS, ids=IDS)
def test_fit_does_not_change_parameters_or_input(make, data):
    """check_estimators_overwrite_params, check_dont_overwrite_parameters,
    check_dict_unchanged (outputs leave __dict__ as it was)."""
    X, y = data
    est = make()
    params = copy.deepcopy(est.get_params())
    X_before, y_before = X.copy(), y.copy()
    fitted_est = est.fit(X, y) if isinstance(est, FineTuneClassifier) else est.fit(X)
    assert fitted_est.get_params().keys() == params.keys()
    for key, value in params.items():
        new = fitted_est.get_params()[key]
        assert joblib.hash(new) == joblib.hash(value), key
    public_new = [k for k in vars(est) if not k.startswith("_") and not k.endswith("_")]
    assert sorted(public_new) == sorted(params)  # only params and fitted_attrs_
    state = {k: joblib.hash(v) for k, v in vars(est).items() if k != "model_"}
    weights = {k: v.clone() for k, v in est.model_.state_dict().items()}
    outputs(est, X)
    assert {k: joblib.hash(v) for k, v in vars(est).items() if k != "model_"} == state
    assert all((weights[k] == v).all() for k, v in est.model_.state_dict().items())
    assert_array_equal(X, X_before)
    assert_array_equal(y, y_before)


def test_transformer_requires_no_y(data):
    """check_requires_y_none, check_fit_score_takes_y (y is accepted and ignored)."""
    X, y = data
    a = transformer().fit(X).transform(X)
    assert_array_equal(transformer().fit(X, y).transform(X), a)
    assert_array_equal(transformer().fit_transform(X, y), a)


# -- input variants ---------------------------------------------------------------


@pytest.mark.parametrize("make", ESTIMATORS, ids=IDS)
def test_dtypes_give_the_same_outputs(make, data, fitted_pair):
    """check_estimators_dtypes, check_transformer_preserve_dtypes (float32
    out whatever the input): uint8, wider ints, 16-bit, and floats in [0, 1]."""
    X, _ = data
    est = fitted_pair[make.__name__]
    reference = outputs(est, X)
    assert reference.dtype == np.float32 or isinstance(est, FineTuneClassifier)
    for variant in (
        X.astype(np.int64),
        X.astype(np.uint16) * 257,  # 16-bit: divided by 65535
        X.astype(np.float32) / 255,
        X.astype(np.float64) / 255,
    ):
        out = outputs(est, variant)
        assert out.dtype == reference.dtype
        assert_allclose(out, reference, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("make", ESTIMATORS, ids=IDS)
def test_memory_order_does_not_matter(make, data, fitted_pair):
    """check_f_contiguous_array_estimator, check_transformer_data_not_an_array,
    check_classifier_data_not_an_array: Fortran order, strided views, lists of
    images and lists of per-image arrays give the same outputs."""
    X, _ = data
    est = fitted_pair[make.__name__]
    reference = outputs(est, X)
    for variant in (
        np.asfortranarray(X),
        np.stack([X, X], axis=-1)[..., 0],  # strided in every axis
        np.repeat(X, 2, axis=0)[::2],  # every other image of a larger array
        list(X),
        [np.asfortranarray(image) for image in X],
    ):
        assert_allclose(outputs(est, variant), reference, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("make", ESTIMATORS, ids=IDS)
def test_subsets_and_order_of_samples(make, data, fitted_pair):
    """check_methods_subset_invariance, check_methods_sample_order_invariance."""
    X, _ = data
    est = fitted_pair[make.__name__]
    reference = outputs(est, X)
    for index in (np.arange(5), np.arange(len(X))[::-1], np.array([7])):
        assert_allclose(outputs(est, X[index]), reference[index], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("make", ESTIMATORS, ids=IDS)
def test_read_only_and_memmapped_input(make, data, tmp_path):
    """check_readonly_memmap_input, check_estimators_pickle(readonly_memmap=True)."""
    X, y = data
    reference = outputs(fitted(make, X, y), X)
    path = tmp_path / "X.npy"
    np.save(path, X)
    X_mm = np.load(path, mmap_mode="r")
    X_ro = X.copy()
    X_ro.setflags(write=False)
    for variant in (X_mm, X_ro):
        assert_allclose(
            outputs(fitted(make, variant, y), variant), reference, rtol=1e-6
        )
    # A fitted estimator loaded from a read-only memmap (joblib's mmap_mode).
    est = fitted(make, X, y)
    joblib.dump(est, tmp_path / "est.joblib")
    loaded = joblib.load(tmp_path / "est.joblib", mmap_mode="r")
    assert_allclose(outputs(loaded, X), reference, rtol=1e-6)


@pytest.mark.parametrize("make", ESTIMATORS, ids=IDS)
def test_empty_input_is_refused_clearly(make, data, fitted_pair):
    """check_estimators_empty_data_messages."""
    X, y = data
    with pytest.raises(ValueError, match="empty.*at least one image"):
        fitted(make, X[:0], y[:0])
    with pytest.raises(ValueError, match="empty.*at least one image"):
        outputs(fitted_pair[make.__name__], X[:0])


def test_one_sample(data, fitted_pair):
    """check_fit2d_1sample: one image fits a transformer; a classifier needs
    two classes and says so."""
    X, y = data
    one = transformer().fit(X[:1])
    assert_allclose(
        one.transform(X), fitted_pair["transformer"].transform(X), rtol=1e-6
    )
    assert fitted_pair["classifier"].predict_proba(X[:1]).shape == (1, 3)
    with pytest.raises(ValueError, match="single class.*at least 2 classes"):
        classifier().fit(X[:1], y[:1])


@pytest.mark.parametrize("make", ESTIMATORS, ids=IDS)
@pytest.mark.parametrize("kind", [sp.csr_matrix, sp.csr_array, sp.coo_matrix])
def test_sparse_input_is_refused(make, kind, data):
    """check_estimator_sparse_array, check_estimator_sparse_matrix."""
    X, y = data
    X_sparse = kind(X.reshape(len(X), -1))
    with pytest.raises(TypeError, match="sparse"):
        fitted(make, X_sparse, y)


@pytest.mark.parametrize("make", ESTIMATORS, ids=IDS)
@pytest.mark.parametrize(
    "bad, match",
    [
        (np.nan, "NaN or infinity"),
        (np.inf, "NaN or infinity"),
    ],
)
def test_nan_and_inf_are_refused(make, bad, match, data):
    """check_estimators_nan_inf."""
    X, y = data
    X_bad = X / 255.0
    X_bad[3, 2, 1, 0] = bad
    with pytest.raises(ValueError, match=match):
        fitted(make, X_bad, y)


@pytest.mark.parametrize("make", ESTIMATORS, ids=IDS)
@pytest.mark.parametrize("dtype", [complex, object])
def test_complex_and_object_data_are_refused(make, dtype, data):
    """check_complex_data, check_dtype_object (object arrays of numbers)."""
    X, y = data
    with pytest.raises((TypeError, ValueError), match="dtype"):
        fitted(make, X.astype(dtype), y)


# -- persistence, parallelism ---------------------------------------------------------


@pytest.mark.parametrize("make", ESTIMATORS, ids=IDS)
def test_pickle_gives_the_same_outputs(make, data, fitted_pair):
    """check_estimators_pickle, check_estimator_cloneable (clone is unfitted)."""
    X, _ = data
    est = fitted_pair[make.__name__]
    loaded = pickle.loads(pickle.dumps(est))
    assert_array_equal(outputs(loaded, X), outputs(est, X))
    with pytest.raises(NotFittedError):
        outputs(clone(est), X)


@pytest.mark.slow  # worker processes
def test_n_jobs_gives_the_same_scores(data):
    """The estimators in joblib's worker processes (n_jobs=2) compute what
    they compute in this one."""
    X, y = data
    pipe = make_pipeline(transformer(), LogisticRegression(max_iter=200))
    serial = cross_val_score(pipe, X, y, cv=2, n_jobs=1)
    parallel = cross_val_score(pipe, X, y, cv=2, n_jobs=2)
    assert_allclose(parallel, serial)


# -- classifier specifics ------------------------------------------------------------


def test_classes_keep_their_type(data):
    """check_classifiers_classes: string and integer labels come back as given."""
    X, y = data
    for labels in (y, np.unique(y, return_inverse=True)[1] + 10):
        clf = classifier().fit(X, labels)
        assert_array_equal(clf.classes_, np.unique(labels))
        assert clf.predict(X).dtype == np.asarray(labels).dtype
        assert set(clf.predict(X)) <= set(labels)


@pytest.mark.parametrize(
    "y_bad, match",
    [
        (np.linspace(0, 1, 18), "continuous"),
        (np.r_[np.nan, np.ones(17)], "missing label"),
        (np.zeros(18), "single class"),
    ],
    ids=["regression_target", "nan", "one_label"],
)
def test_bad_targets_are_refused(y_bad, match, data):
    """check_classifiers_regression_target, check_supervised_y_no_nan,
    check_classifiers_one_label."""
    X, _ = data
    with pytest.raises(ValueError, match=match):
        classifier().fit(X, y_bad)


def test_column_vector_y_warns(data):
    """check_supervised_y_2d: a column y works, with a DataConversionWarning."""
    X, y = data
    with pytest.warns(DataConversionWarning):
        clf = classifier().fit(X, y[:, None])
    assert clf.predict(X).shape == (18,)


def test_decision_function_and_probabilities_agree(data, fitted_pair):
    """check_decision_proba_consistency, check_classifiers_train (proba rows
    sum to 1, predict is the argmax)."""
    X, _ = data
    clf = fitted_pair["classifier"]
    proba = clf.predict_proba(X)
    scores = clf.decision_function(X)
    assert_allclose(proba.sum(1), 1, rtol=1e-6)
    assert_array_equal(proba.argmax(1), scores.argmax(1))
    assert_array_equal(clf.predict(X), clf.classes_[proba.argmax(1)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        assert_allclose(np.log(proba), clf.predict_log_proba(X), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("make", ESTIMATORS, ids=IDS)
def test_concurrent_calls_from_threads(make, data, fitted_pair):
    """Four threads released together by a barrier call transform or
    predict_proba on one fitted estimator: each gets its own rows."""
    X, _ = data
    est = pickle.loads(pickle.dumps(fitted_pair[make.__name__]))
    est.set_params(batch_size=2)  # several batches per call
    parts = [X[i::4] for i in range(4)]
    expected = [outputs(est, part) for part in parts]
    results = in_threads(lambda i: outputs(est, parts[i]), repeat=3)
    for got, want in zip(results, expected, strict=True):
        for out in got:
            assert_array_equal(out, want)
