"""Properties that hold for any input (hypothesis): batch and company
independence, probabilities, clone, save/load and pickle, parallel search."""

from __future__ import annotations

import functools
import pickle
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from numpy.testing import assert_allclose, assert_array_equal
from sklearn.base import clone
from sklearn.exceptions import NotFittedError
from sklearn.model_selection import GridSearchCV
from sklearn.utils.validation import check_is_fitted
from tiny_cnn import colour_images, make_tiny_cnn

from sklearn_cnn import CNNFeatureTransformer, FineTuneClassifier, load
from sklearn_cnn._base import _same

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FAST = settings(max_examples=12, deadline=None, database=None)
TRUSTED = ["tiny_cnn:make_tiny_cnn"]
BUILDER = functools.partial(make_tiny_cnn, 0)

RNG = np.random.default_rng(11)
X = RNG.integers(0, 256, (10, 16, 16, 3), dtype=np.uint8)
X_LABELLED, Y_LABELLED = colour_images(8, seed=3)  # 24 images, 3 classes

# Rows may differ by float rounding when oneDNN blocks a batch differently.
TOL = {"rtol": 1e-5, "atol": 1e-6}


@functools.cache
def fitted_transformer() -> tuple[CNNFeatureTransformer, np.ndarray]:
    est = CNNFeatureTransformer(
        BUILDER, layer=["stage1", "fc"], pooling="avgmax", precision="fp32"
    )
    est.set_params(batch_size=1).fit(X)
    return est, est.transform(X)


@functools.cache
def fitted_classifier() -> tuple[FineTuneClassifier, np.ndarray]:
    clf = FineTuneClassifier(
        BUILDER,
        epochs=1,
        augment=None,
        validation_fraction=None,
        precision="fp32",
        device="cpu",
        random_state=0,
    ).fit(X_LABELLED, Y_LABELLED)
    return clf, clf.set_params(batch_size=1).predict_proba(X_LABELLED)


subsets = st.lists(st.integers(0, 9), min_size=1, max_size=10)
batch_sizes = st.integers(1, 12)


# ---------------------------------------------------------------------------
# A row depends on its image only
# ---------------------------------------------------------------------------


@FAST
@given(index=subsets, company=subsets, batch_size=batch_sizes)
def test_features_depend_on_the_image_only(index, company, batch_size):
    """Not on the batch size, nor on which other images share the call."""
    est, reference = fitted_transformer()
    est.set_params(batch_size=batch_size)
    assert_allclose(est.transform(X[index]), reference[index], **TOL)
    together = est.transform(np.concatenate([X[index], X[company]]))
    assert_allclose(together[: len(index)], reference[index], **TOL)
    assert_allclose(together[len(index) :], reference[company], **TOL)


@FAST
@given(
    index=st.lists(st.integers(0, 23), min_size=1, max_size=24),
    batch_size=batch_sizes,
)
def test_probabilities_depend_on_the_image_only_and_sum_to_one(index, batch_size):
    clf, reference = fitted_classifier()
    proba = clf.set_params(batch_size=batch_size).predict_proba(X_LABELLED[index])
    assert proba.shape == (len(index), 3)
    assert (proba >= 0).all()
    assert_allclose(proba.sum(axis=1), 1.0, rtol=0, atol=1e-12)
    assert_allclose(proba, reference[index], **TOL)
    assert_array_equal(clf.predict(X_LABELLED[index]), clf.classes_[proba.argmax(1)])


# ---------------------------------------------------------------------------
# clone, save/load, pickle
# ---------------------------------------------------------------------------

params = st.fixed_dictionaries(
    {
        "layer": st.sampled_from([None, "stem", "stage2", ["stage2", "stage1.0"]]),
        "pooling": st.sampled_from(["avg", "max", "avgmax", "gem"]),
        "image_size": st.sampled_from([None, 12, (8, 20)]),
        "mean": st.sampled_from([None, (0.5, 0.5, 0.5)]),
        "batch_size": st.integers(1, 8),
    }
)


@FAST
@given(params=params)
def test_clone_is_an_unfitted_twin(params):
    est = CNNFeatureTransformer(BUILDER, precision="fp32", **params).fit(X[:3])
    twin = clone(est)
    assert twin.get_params().keys() == est.get_params().keys()
    for key, value in est.get_params().items():
        assert _same(twin.get_params()[key], value), key
    assert not [k for k in vars(twin) if k.endswith("_") or k.startswith("_")]
    with pytest.raises(NotFittedError):
        check_is_fitted(twin)
    with pytest.raises(NotFittedError):
        twin.transform(X[:2])
    assert_array_equal(twin.fit(X[:3]).transform(X), est.transform(X))


@pytest.mark.slow
@FAST
@given(params=params)
def test_save_load_and_pickle_round_trip_exactly(params):
    est = CNNFeatureTransformer(BUILDER, precision="fp32", **params).fit(X[:3])
    expected = est.transform(X)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "cnn.safetensors"
        est.save(path)
        loaded = load(path, trusted=TRUSTED)
    assert_array_equal(loaded.transform(X), expected)
    assert_array_equal(pickle.loads(pickle.dumps(est)).transform(X), expected)
    assert_array_equal(pickle.loads(pickle.dumps(loaded)).transform(X), expected)
    assert loaded.n_features_out_ == est.n_features_out_


def test_classifier_save_load_and_pickle_round_trip_exactly(tmp_path):
    clf, _ = fitted_classifier()
    clf.set_params(batch_size=8)
    expected = clf.predict_proba(X_LABELLED)
    clf.save(tmp_path / "clf.safetensors")
    for loaded in (
        pickle.loads(pickle.dumps(clf)),
        load(tmp_path / "clf.safetensors", trusted=TRUSTED),
    ):
        assert_array_equal(loaded.predict_proba(X_LABELLED), expected)
        assert repr(loaded.history_) == repr(clf.history_)  # NaN != NaN


# ---------------------------------------------------------------------------
# A parallel search finds what a serial one finds
# ---------------------------------------------------------------------------


def _search(n_jobs: int) -> GridSearchCV:
    clf = FineTuneClassifier(
        BUILDER,
        freeze="backbone",
        head_init="random",
        augment=None,
        validation_fraction=None,
        epochs=2,
        precision="fp32",
        device="cpu",
        random_state=0,
    )
    grid = {"lr": [1e-3, 1e-1]}
    return GridSearchCV(clf, grid, cv=2, n_jobs=n_jobs).fit(X_LABELLED, Y_LABELLED)


@pytest.mark.slow  # worker processes
def test_fine_tuning_search_in_parallel_equals_serial():
    serial, parallel = _search(1), _search(2)
    assert parallel.best_params_ == serial.best_params_
    for key in ("mean_test_score", "split0_test_score", "split1_test_score"):
        assert_array_equal(parallel.cv_results_[key], serial.cv_results_[key])
    assert_array_equal(
        parallel.predict_proba(X_LABELLED), serial.predict_proba(X_LABELLED)
    )
