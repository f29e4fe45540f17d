"""ImageArray: folds are views of one read-only copy, each image hashed once,
and every estimator gives what it gives on the NumPy array."""

from __future__ import annotations

import functools
import pickle

import numpy as np
import pytest
from numpy.testing import assert_array_equal
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from tiny_cnn import colour_images, make_tiny_cnn, tiny

from sklearn_cnn import FineTuneClassifier, ImageArray
from sklearn_cnn._cache import image_digests

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def data():
    return colour_images(8)  # 24 images of three colours


def test_indexing_gives_views_that_share_the_images(data):
    X, _ = data
    A = ImageArray(X)
    assert A.shape == X.shape and A.dtype == X.dtype and len(A) == len(X)
    for key in ([3, 1, 3], np.array([5, 0]), slice(2, 9, 3), X[:, 0, 0, 0] > 99):
        view = A[key]
        assert isinstance(view, ImageArray) and view.images is A.images
        assert_array_equal(np.asarray(view), X[key])
    assert_array_equal(A[[4, 7]][1], X[7])  # a view of a view
    assert_array_equal(A[-1], X[-1])
    assert_array_equal(A[np.array([2, 6]), ...], X[[2, 6]])  # scikit-learn's form
    with pytest.raises(IndexError, match="along its images only"):
        A[0, 1]
    with pytest.raises(IndexError):
        A[[len(X)]]


def test_it_owns_a_read_only_copy(data):
    X, _ = data
    X = X.copy()
    A = ImageArray(X)
    X[0] = 255 - X[0]  # the caller's array changes later: A does not
    assert not np.array_equal(A[0], X[0])
    with pytest.raises(ValueError, match="read-only"):
        A[0][0, 0, 0] = 1
    with pytest.raises(ValueError, match=r"n_images, height, width.*\(4, 4\)"):
        ImageArray(np.zeros((4, 4), np.uint8))


def test_digests_are_the_arrays_and_computed_once(data):
    X, _ = data
    A = ImageArray(X)
    assert image_digests(A[[5, 2, 5]]) == image_digests(X[[5, 2, 5]])
    assert [len(t) for t in A._memo.values()] == [2]  # 5 and 2, once each
    assert image_digests(A) == image_digests(X)
    assert [len(t) for t in A._memo.values()] == [len(X)]


def _search(memory):
    pipe = Pipeline(
        [
            ("cnn", tiny(functools.partial(make_tiny_cnn, 0), memory=memory)),
            ("scale", StandardScaler()),
            ("clf", LogisticRegression()),
        ]
    )
    return GridSearchCV(pipe, {"cnn__layer": ["stage1", None]}, cv=3)


def test_a_cached_search_scores_as_on_the_array_and_hashes_each_image_once(
    data, tmp_path
):
    X, y = data
    on_array = _search(tmp_path / "array").fit(X, y)
    A = ImageArray(X)
    on_view = _search(tmp_path / "view").fit(A, y)
    for key in ("mean_test_score", "split0_test_score", "split2_test_score"):
        assert_array_equal(on_view.cv_results_[key], on_array.cv_results_[key])
    ((_, table),) = A._memo.items()
    assert sorted(table) == list(range(len(X)))  # 13 fits and 12 scores later
    assert_array_equal(on_view.predict(A), on_array.predict(X))


def test_fine_tuning_and_pickling(data):
    X, y = data
    params = dict(
        epochs=1, batch_size=8, precision="fp32", random_state=0,
        validation_fraction=None,
    )  # fmt: skip
    build = functools.partial(make_tiny_cnn, 0)
    on_array = FineTuneClassifier(build, **params).fit(X, y)
    on_view = FineTuneClassifier(build, **params).fit(ImageArray(X), y)
    assert_array_equal(on_view.predict_proba(X), on_array.predict_proba(X))
    A = ImageArray(X)[[1, 2]]
    image_digests(A)
    again = pickle.loads(pickle.dumps(A))
    assert_array_equal(np.asarray(again), X[[1, 2]])
    assert again._memo == A._memo and not again.images.flags.writeable
