"""scikit-learn's estimator contract: parameters, cloning, pipelines, searches,
pickling, feature names, set_output, tags and the data-free common checks."""

from __future__ import annotations

import copy
import pickle
import warnings

import joblib
import numpy as np
import pytest
import torch
from numpy.testing import assert_array_equal
from sklearn.base import clone
from sklearn.exceptions import NotFittedError
from sklearn.frozen import FrozenEstimator
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV, train_test_split
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils import estimator_checks
from sklearn.utils._param_validation import InvalidParameterError
from tiny_cnn import colour_images, make_tiny_cnn, tiny

from sklearn_cnn import CNNFeatureTransformer

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PARAMS = [
    "model",
    "weights",
    "layer",
    "pooling",
    "layout",
    "image_size",
    "mean",
    "std",
    "bands",
    "stem",
    "batch_size",
    "device",
    "precision",
    "num_workers",
    "memory",
    "compile",
    "random_state",
    "verbose",
]


# ---------------------------------------------------------------------------
# Parameters and cloning
# ---------------------------------------------------------------------------


def test_init_stores_parameters_unchanged(tmp_path):
    module = make_tiny_cnn(0)
    values = {
        "model": module,
        "weights": tmp_path / "w.pt",  # need not exist before fit
        "layer": ["stage1", "stage2"],
        "pooling": "max",
        "layout": {"stage1": "NCHW"},
        "image_size": (24, 32),
        "mean": np.array([0.5, 0.5, 0.5]),
        "std": [0.2, 0.2, 0.2],
        "batch_size": 3,
        "device": torch.device("cpu"),
        "precision": "bf16",
        "num_workers": 1,
        "random_state": np.random.RandomState(0),
        "verbose": 2,
    }
    est = CNNFeatureTransformer(**values)
    for name, value in values.items():
        assert getattr(est, name) is value
    assert sorted(est.get_params()) == sorted(PARAMS)
    assert not [k for k in vars(est) if k.endswith("_")]


def test_defaults():
    est = CNNFeatureTransformer()
    assert est.get_params() == {
        "model": "resnet18",
        "weights": "DEFAULT",
        "layer": None,
        "pooling": "avg",
        "layout": None,
        "image_size": None,
        "mean": None,
        "std": None,
        "bands": "auto",
        "stem": "repeat",
        "batch_size": "auto",
        "device": "auto",
        "precision": "auto",
        "num_workers": 0,
        "memory": None,
        "compile": False,
        "random_state": None,
        "verbose": 0,
    }


def test_set_params_and_clone(images):
    est = tiny()
    assert est.set_params(layer="stage1", pooling="max") is est
    assert (est.layer, est.pooling) == ("stage1", "max")
    est.fit(images)
    cloned = clone(est)
    params, cloned_params = est.get_params(), cloned.get_params()
    builder, cloned_builder = params.pop("model"), cloned_params.pop("model")
    assert cloned_params == params
    # A partial is deep-copied: a new object that builds the same network.
    assert (cloned_builder.func, cloned_builder.args) == (builder.func, builder.args)
    assert not hasattr(cloned, "model_")
    with pytest.raises(ValueError, match="Invalid parameter 'colour'"):
        est.set_params(colour="red")


def test_clone_copies_a_module_parameter(images):
    module = make_tiny_cnn(0)
    est = tiny(model=module)
    cloned = clone(est)
    assert cloned.model is not module
    assert isinstance(cloned.model, type(module))
    assert_array_equal(cloned.fit_transform(images), est.fit_transform(images))


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
        # These pass tabular X, which fails before or after the check's point:
        # parameter validation comes before X, NotFittedError before X, and a
        # 1-D X must raise a ValueError.
        estimator_checks.check_param_validation,
        estimator_checks.check_transformers_unfitted,
        estimator_checks.check_get_feature_names_out_error,
        estimator_checks.check_fit1d,
    ],
    ids=lambda check: check.__name__,
)
def test_sklearn_common_checks(check):
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        check("CNNFeatureTransformer", tiny())


def test_tags_declare_image_input():
    tags = tiny().__sklearn_tags__()
    assert tags.input_tags.two_d_array is False
    assert tags.input_tags.three_d_array is True
    assert tags.input_tags.string is True
    assert tags.input_tags.sparse is False
    assert tags.requires_fit is True
    assert tags.target_tags.required is False
    assert tags.transformer_tags is not None
    assert tags.transformer_tags.preserves_dtype == []


@pytest.mark.parametrize(
    "params, match",
    [
        ({"batch_size": 0}, "'batch_size' parameter"),
        ({"batch_size": 2.5}, "'batch_size' parameter"),
        ({"num_workers": -1}, "'num_workers' parameter"),
        ({"precision": "fp64"}, "'precision' parameter"),
        ({"pooling": "median"}, "'pooling' parameter"),
        ({"weights": 3}, "'weights' parameter"),
        ({"device": 0}, "'device' parameter"),
        ({"verbose": "loud"}, "'verbose' parameter"),
    ],
)
def test_invalid_parameters(params, match, images):
    with pytest.raises(InvalidParameterError, match=match):
        tiny(**params).fit(images)


# ---------------------------------------------------------------------------
# What the skipped common checks would have covered
# ---------------------------------------------------------------------------


def test_fit_returns_self_and_refit_is_identical(images):
    est = tiny(layer=["stem", "stage2"], pooling="avgmax")
    assert est.fit(images) is est
    first = est.transform(images)
    model = est.model_
    assert est.fit(images) is est
    assert est.model_ is not model  # rebuilt
    assert_array_equal(est.transform(images), first)
    assert est.n_features_out_ == first.shape[1] == 8 + 32


def test_not_fitted_errors(images):
    est = tiny()
    with pytest.raises(NotFittedError):
        est.transform(images)
    with pytest.raises(NotFittedError):
        est.get_feature_names_out()
    assert est.fit_transform(images).shape == (12, 32)


def test_read_only_memmap_input(images, tmp_path):
    path = tmp_path / "images.npy"
    np.save(path, images)
    mapped = np.load(path, mmap_mode="r")
    assert not mapped.flags.writeable
    est = tiny().fit(mapped)
    assert_array_equal(est.transform(mapped), tiny().fit_transform(images))


def test_input_not_mutated(images, labelled_images):
    X, y = labelled_images
    X_before, y_before = X.copy(), y.copy()
    tiny().fit(X, y).transform(X)
    assert_array_equal(X, X_before)
    assert_array_equal(y, y_before)


def test_feature_names(images):
    est = tiny().fit(images)
    names = est.get_feature_names_out()
    assert names.dtype == object
    assert names.tolist() == [f"penultimate_{i}" for i in range(32)]
    est = tiny(layer=["stage1", "stem"]).fit(images)
    names = est.get_feature_names_out().tolist()
    assert names == [f"stage1_{i}" for i in range(16)] + [f"stem_{i}" for i in range(8)]
    assert len(names) == est.n_features_out_ == est.transform(images).shape[1]


def test_set_output_pandas(images):
    pd = pytest.importorskip("pandas")
    est = tiny(layer="stage1").set_output(transform="pandas")
    frame = est.fit_transform(images)
    assert isinstance(frame, pd.DataFrame)
    assert frame.columns.tolist() == [f"stage1_{i}" for i in range(16)]
    assert frame.shape == (12, 16)
    assert_array_equal(frame.to_numpy(), tiny(layer="stage1").fit_transform(images))
    assert isinstance(est.transform(images[:3]), pd.DataFrame)


# ---------------------------------------------------------------------------
# Pipelines and searches
# ---------------------------------------------------------------------------


def test_pipeline_with_logistic_regression(labelled_images):
    X, y = labelled_images
    X_train, X_test, y_train, y_test = train_test_split(
        X, y, test_size=0.5, stratify=y, random_state=0
    )
    pipe = make_pipeline(tiny(), StandardScaler(), LogisticRegression(max_iter=500))
    pipe.fit(X_train, y_train)
    assert set(pipe.classes_) == {"red", "green", "blue"}
    assert pipe.score(X_test, y_test) > 0.8  # chance: 1/3
    assert pipe.predict(X_test[:4]).dtype.kind == "U"


def test_frozen_transformer_in_a_pipeline(labelled_images):
    X, y = labelled_images
    cnn = tiny().fit(X[:1])
    model = cnn.model_
    pipe = make_pipeline(FrozenEstimator(cnn), LogisticRegression(max_iter=500))
    pipe.fit(X, y)
    assert cnn.model_ is model  # not refitted
    assert pipe.score(X, y) > 0.8


@pytest.fixture(scope="module")
def layer_search_serial():
    X, y = colour_images(8)
    return X, y, _layer_search(X, y, n_jobs=1)


def _layer_search(X, y, n_jobs):
    pipe = Pipeline(
        [("cnn", tiny(batch_size=8)), ("clf", LogisticRegression(max_iter=300))]
    )
    grid = {"cnn__layer": ["stem", "stage1", None], "cnn__pooling": ["avg", "max"]}
    return GridSearchCV(pipe, grid, cv=2, n_jobs=n_jobs).fit(X, y)


def test_grid_search_over_layers(layer_search_serial):
    X, y, search = layer_search_serial
    results = search.cv_results_
    assert len(results["params"]) == 6
    assert search.best_params_["cnn__layer"] in ("stem", "stage1", None)
    assert search.best_score_ > 0.6
    best_cnn = search.best_estimator_.named_steps["cnn"]
    assert best_cnn.layer == search.best_params_["cnn__layer"]
    assert set(search.predict(X)) <= {"red", "green", "blue"}


@pytest.mark.slow  # worker processes
def test_grid_search_in_parallel_matches_serial(layer_search_serial):
    X, y, serial = layer_search_serial
    parallel = _layer_search(X, y, n_jobs=2)
    assert parallel.best_params_ == serial.best_params_
    for key in ("mean_test_score", "split0_test_score", "split1_test_score"):
        assert_array_equal(parallel.cv_results_[key], serial.cv_results_[key])


# ---------------------------------------------------------------------------
# Pickling
# ---------------------------------------------------------------------------


def test_pickle_round_trip(images):
    est = tiny(layer=["stage1", "stage2"], pooling="gem").fit(images)
    expected = est.transform(images)
    loaded = pickle.loads(pickle.dumps(est))
    assert_array_equal(loaded.transform(images), expected)
    assert loaded.get_params().keys() == est.get_params().keys()
    assert loaded.get_feature_names_out().tolist() == (
        est.get_feature_names_out().tolist()
    )
    # Regression: pickling deleted device_ from the live estimator.
    assert est.device_ == torch.device("cpu")
    assert_array_equal(est.transform(images), expected)


def test_joblib_round_trip(images, tmp_path):
    est = tiny(layer="stage2", pooling="avgmax").fit(images)
    expected = est.transform(images)
    joblib.dump(est, tmp_path / "cnn.joblib")
    loaded = joblib.load(tmp_path / "cnn.joblib")
    assert_array_equal(loaded.transform(images), expected)
    assert_array_equal(est.transform(images), expected)


def test_deepcopy_and_unfitted_pickle(images):
    est = tiny()
    assert pickle.loads(pickle.dumps(est)).get_params().keys() == set(PARAMS)
    est.fit(images)
    assert_array_equal(copy.deepcopy(est).transform(images), est.transform(images))


def test_pickle_moves_the_module_to_the_cpu(images, monkeypatch):
    """An estimator whose network sits on another device pickles CPU copies.

    No GPU here: the check for tensors off the CPU is faked, so that pickling
    takes the path a CUDA network takes (see also tests/test_reliability.py).
    """
    est = tiny().fit(images)
    expected = est.transform(images)
    monkeypatch.setattr("sklearn_cnn._network._off_cpu", lambda module: True)

    state = est._network.__getstate__()
    assert state["module"] is not est.model_
    tensors = state["module"].state_dict().values()
    assert all(t.device.type == "cpu" for t in tensors)
    # The live estimator is left alone.
    assert est.device_ == torch.device("cpu")

    loaded = pickle.loads(pickle.dumps(est))
    assert next(loaded.model_.parameters()).device.type == "cpu"
    assert_array_equal(loaded.transform(images), expected)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a CPU-only machine")
def test_unpickle_cuda_estimator_on_cpu_machine(images):
    est = tiny().fit(images)
    expected = est.transform(images)
    # As if fitted on a GPU machine: the device parameter says CUDA.
    est.set_params(device="cuda")
    data = pickle.dumps(est)
    with pytest.warns(RuntimeWarning, match="CUDA is not available"):
        loaded = pickle.loads(data)
    assert loaded.device_ == torch.device("cpu")
    assert loaded.device == "cuda"
    assert_array_equal(loaded.transform(images), expected)
