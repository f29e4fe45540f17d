"""Reliability: parameters take effect at fit, failed fits change nothing,
CUDA out-of-memory retries, pickling without a device copy."""

from __future__ import annotations

import functools
import pickle
import warnings

import numpy as np
import pytest
import torch
from numpy.testing import assert_allclose, assert_array_equal
from sklearn.exceptions import NotFittedError
from tiny_cnn import make_tiny_cnn, tiny

import sklearn_cnn._base as base
import sklearn_cnn._network as network
import sklearn_cnn._runtime as runtime
from sklearn_cnn import CNNFeatureTransformer, FineTuneClassifier

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_classifier(**params) -> FineTuneClassifier:
    params = {
        "precision": "fp32",
        "epochs": 1,
        "augment": None,
        "validation_fraction": None,
        "random_state": 0,
        "device": "cpu",
        **params,
    }
    return FineTuneClassifier(functools.partial(make_tiny_cnn, 0), **params)


# ---------------------------------------------------------------------------
# Parameters take effect at fit
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "change",
    [
        {"layer": "stage1"},
        {"layer": ["stage2", "stem"]},
        {"pooling": "max"},
        {"image_size": 8},
        {"mean": (0.5, 0.5, 0.5)},
        {"std": [0.25, 0.25, 0.25]},
        {"precision": "bf16"},
        {"model": functools.partial(make_tiny_cnn, 1)},
        {"weights": None},
    ],
    ids=lambda change: next(iter(change)),
)
def test_changed_parameter_after_fit_is_refused(change, images):
    """Each of these changes the features: never the old setting's, silently."""
    est = tiny(layer="stage2", weights="DEFAULT").fit(images)
    before = est.transform(images)
    est.set_params(**change)
    (name,) = change
    with pytest.raises(NotFittedError, match=rf"{name}=.*fitted with.*call fit again"):
        est.transform(images)
    with pytest.raises(NotFittedError, match="call fit again"):
        est.get_feature_names_out()
    # Refitting applies it: the same as a transformer built with it.
    refitted = est.fit(images).transform(images)
    fresh = tiny(**{"layer": "stage2", "weights": "DEFAULT", **change})
    assert_array_equal(refitted, fresh.fit(images).transform(images))
    if name != "weights":  # None and "DEFAULT" both keep a callable's weights
        assert not np.array_equal(refitted, before)


def test_invalid_precision_after_fit_is_a_clear_error(images):
    """Today: a bare KeyError 'fp64' from the dtype table."""
    est = tiny().fit(images)
    est.set_params(precision="fp64")
    with pytest.raises(
        NotFittedError, match=r"precision='fp64' \(fitted with 'fp32'\)"
    ):
        est.transform(images)
    with pytest.raises(ValueError, match="precision"):
        est.fit(images)  # fit validates it


def test_parameter_set_back_works_again(images):
    est = tiny(layer="stage1", pooling="gem").fit(images)
    expected = est.transform(images)
    est.set_params(pooling="avg", layer="stem")
    with pytest.raises(NotFittedError, match="pooling='avg'.*layer='stem'|layer"):
        est.transform(images)
    est.set_params(pooling="gem", layer="stage1")
    assert_array_equal(est.transform(images), expected)


def test_layer_list_changed_in_place_is_noticed(images):
    layers = ["stage1", "stage2"]
    est = tiny(layer=layers).fit(images)
    layers.append("stem")
    with pytest.raises(NotFittedError, match="layer="):
        est.transform(images)


def test_equal_values_of_another_type_are_not_a_change(images):
    est = tiny(mean=(0.4, 0.5, 0.6), layer=("stage1",), image_size=(16, 16)).fit(images)
    expected = est.transform(images)
    est.set_params(
        mean=np.array([0.4, 0.5, 0.6]), layer=["stage1"], image_size=[16, 16]
    )
    assert_array_equal(est.transform(images), expected)


@pytest.mark.parametrize(
    "change", [{"batch_size": 3}, {"num_workers": 1}, {"verbose": 1}]
)
def test_runtime_parameters_take_effect_at_once(change, images, capsys):
    est = tiny(layer="stage1").fit(images)
    expected = est.transform(images)
    assert_allclose(
        est.set_params(**change).transform(images), expected, rtol=1e-5, atol=1e-6
    )
    if "verbose" in change:
        assert "transform" in capsys.readouterr().err


def test_classifier_refuses_changed_preprocessing(labelled_images):
    X, y = labelled_images
    clf = tiny_classifier(epochs=0).fit(X, y)
    expected = clf.predict_proba(X)
    clf.set_params(image_size=8)
    with pytest.raises(NotFittedError, match="image_size=8"):
        clf.predict(X)
    clf.set_params(image_size=None, lr=0.5, epochs=3)  # training parameters only
    assert_array_equal(clf.predict_proba(X), expected)


# ---------------------------------------------------------------------------
# A failed fit leaves the estimator as it was
# ---------------------------------------------------------------------------


def test_failed_fit_leaves_an_unfitted_estimator_unfitted(images):
    est = tiny(layer="no_such_layer")
    with pytest.raises(ValueError, match="Unknown layer 'no_such_layer'"):
        est.fit(images)
    assert [k for k in vars(est) if k.endswith("_") or k.startswith("_")] == []
    with pytest.raises(NotFittedError):
        est.transform(images)


def _bad_weights_file(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"conv.weight": torch.zeros(3)}, path)
    return str(path)


@pytest.mark.parametrize("failure", ["layer", "weights", "interrupt"])
def test_failed_fit_keeps_the_previous_fit(failure, images, tmp_path, monkeypatch):
    est = tiny(layer="stage1").fit(images)
    expected = est.transform(images)
    before = dict(vars(est))
    if failure == "layer":
        est.set_params(layer="stage9")
        error = ValueError
    elif failure == "weights":
        est.set_params(weights=_bad_weights_file(tmp_path))
        error = ValueError
    else:  # Ctrl-C while the new network is being set up

        def interrupted(*args, **kwargs):
            raise KeyboardInterrupt

        monkeypatch.setattr(network, "resolve_device", interrupted)
        est.set_params(pooling="max")
        error = KeyboardInterrupt
    with pytest.raises(error):
        est.fit(images)
    after = vars(est)
    params = est.get_params()
    assert after.keys() == before.keys()
    for key, value in before.items():
        if key not in params:
            assert after[key] is value, key  # the very same fitted objects
    monkeypatch.undo()
    est.set_params(layer="stage1", weights="DEFAULT", pooling="avg")
    assert_array_equal(est.transform(images), expected)


def test_restore_on_failure_restores_a_module_changed_in_place():
    module = make_tiny_cnn(0).eval()
    for p in module.parameters():
        p.requires_grad_(False)
    weights = {k: v.clone() for k, v in module.state_dict().items()}

    class Est:
        pass

    est = Est()
    est.model_, est.history_ = module, [{"epoch": 0}]
    with (
        pytest.raises(RuntimeError, match="mid-epoch"),
        base.restore_on_failure(est, mutated=("model_", "history_")),
    ):
        est.model_.train()
        for p in est.model_.parameters():
            p.requires_grad_(True)
        with torch.no_grad():
            est.model_.fc.weight.add_(1.0)
        est.history_.append({"epoch": 1})
        est.n_iter_ = 1
        raise RuntimeError("mid-epoch")
    assert est.model_ is module
    for key, value in module.state_dict().items():
        assert_array_equal(value, weights[key])
    assert not any(p.requires_grad for p in module.parameters())
    assert not any(m.training for m in module.modules())
    assert est.history_ == [{"epoch": 0}]
    assert not hasattr(est, "n_iter_")


# ---------------------------------------------------------------------------
# CUDA out of memory: halve the batch and retry
# ---------------------------------------------------------------------------


class _OutOfMemoryAbove:
    """Forward pre-hook that fails like CUDA does for batches above ``limit``."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.sizes: list[int] = []

    def __call__(self, _module, args):
        n = len(args[0])
        self.sizes.append(n)
        if n > self.limit:
            raise torch.OutOfMemoryError(
                "CUDA out of memory. Tried to allocate 2.00 GiB"
            )


def test_transform_halves_the_batch_on_out_of_memory(images):
    est = tiny(layer=["stage1", "fc"], batch_size=8).fit(images)
    expected = est.set_params(batch_size=1).transform(images)
    est.set_params(batch_size=8)
    oom = _OutOfMemoryAbove(2)
    handle = est.model_.register_forward_pre_hook(oom)
    try:
        with pytest.warns(RuntimeWarning, match="out of memory") as record:
            out = est.transform(images)
    finally:
        handle.remove()
    assert_allclose(out, expected, rtol=1e-5, atol=1e-6)
    messages = [str(w.message) for w in record if "out of memory" in str(w.message)]
    # 8 -> 4 -> 2 once; the second batch (4 images) starts at 2.
    assert len(messages) == 2
    assert "retrying with 4" in messages[0] and "batch_size=2" in messages[1]
    assert oom.sizes == [8, 4, 2, 2, 2, 2, 2, 2]


def test_predict_proba_halves_the_batch_on_out_of_memory(labelled_images):
    X, y = labelled_images
    clf = tiny_classifier(epochs=0, batch_size=16).fit(X, y)
    expected = clf.predict_proba(X)
    handle = clf.model_.register_forward_pre_hook(_OutOfMemoryAbove(5))
    try:
        with pytest.warns(RuntimeWarning, match="out of memory") as record:
            proba = clf.predict_proba(X)
    finally:
        handle.remove()
    assert_allclose(proba, expected, rtol=1e-5, atol=1e-6)
    messages = " ".join(str(w.message) for w in record)
    assert "retrying with 8" in messages and "retrying with 4" in messages


@pytest.mark.parametrize("freeze", [0, 0.5, "backbone"])
def test_fit_halves_the_batch_on_out_of_memory(labelled_images, freeze):
    """Each path of a fit (images, a stored prefix, stored pooled features)
    accumulates the batch's gradient over halved chunks: the same weights."""
    X, y = labelled_images
    w = np.random.default_rng(0).uniform(0.5, 2.0, len(y))
    params = dict(freeze=freeze, epochs=2, batch_size=16, class_weight="balanced")
    expected = tiny_classifier(**params).fit(X, y, sample_weight=w)
    oom = _OutOfMemoryAbove(5)
    handle = torch.nn.modules.module.register_module_forward_pre_hook(
        lambda module, args: (
            oom(module, args) if isinstance(module, torch.nn.Linear) else None
        )  # fmt: skip
    )
    try:
        with pytest.warns(RuntimeWarning, match="out of memory") as record:
            clf = tiny_classifier(**params).fit(X, y, sample_weight=w)
    finally:
        handle.remove()
    assert max(oom.sizes) == 16 and sorted(set(oom.sizes) - {16, 8})[-1] <= 5
    messages = [str(r.message) for r in record if "in fit" in str(r.message)]
    # 16 -> 8 -> 4 once: the next batches start at 4.
    assert [m.split("; ")[1][:15] for m in messages] == ["retrying with 8"] + [
        "retrying with 4"
    ]
    assert_allclose(
        clf.predict_proba(X), expected.predict_proba(X), rtol=1e-4, atol=1e-6
    )
    for name, value in expected.model_.state_dict().items():
        assert_allclose(clf.model_.state_dict()[name], value, rtol=1e-4, atol=1e-6)


def test_out_of_memory_with_one_image_says_what_to_change(images):
    est = tiny(batch_size=2).fit(images)
    handle = est.model_.register_forward_pre_hook(_OutOfMemoryAbove(0))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            with pytest.raises(
                torch.OutOfMemoryError, match="one image per batch.*image_size"
            ):
                est.transform(images)
    finally:
        handle.remove()


def test_halve_on_oom_does_not_touch_cuda_on_the_cpu(monkeypatch):
    """Freeing the cache must not initialise CUDA on a CPU-only run."""
    calls = []
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: calls.append(1))
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)

    def run(k):
        if k > 3:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return k * 10

    with pytest.warns(RuntimeWarning, match="retrying with 3"):
        assert runtime.halve_on_oom(run, 7, what="fit") == (30, 3)
    assert calls == []
    # Other errors are not retried.
    with pytest.raises(ValueError):
        runtime.halve_on_oom(
            lambda k: (_ for _ in ()).throw(ValueError("bad")), 4, what="fit"
        )


# ---------------------------------------------------------------------------
# Pickling a network on a device: no second copy of it on that device
# ---------------------------------------------------------------------------


def test_pickling_copies_tensors_to_the_cpu_one_by_one(images, monkeypatch):
    """``copy.deepcopy(model).cpu()`` duplicates the model on its device first.

    No GPU here: the device check is faked, and deep copies of the network's
    own tensors (which would be allocated on its device) are counted.
    """
    est = tiny(layer=["stage1", "fc"]).fit(images)
    expected = est.transform(images)
    live = {id(t): t for t in [*est.model_.parameters(), *est.model_.buffers()]}
    copied_on_device = []
    for cls in (torch.Tensor, torch.nn.Parameter):
        original = cls.__deepcopy__

        def spy(self, memo, _original=original):
            if id(self) in live:
                copied_on_device.append(self)
            return _original(self, memo)

        monkeypatch.setattr(cls, "__deepcopy__", spy)
    monkeypatch.setattr(network, "_off_cpu", lambda module: True)

    state = est._network.__getstate__()
    assert copied_on_device == []
    copy_ = state["module"]
    assert copy_ is not est.model_
    for (name, a), b in zip(
        copy_.state_dict().items(), est.model_.state_dict().values(), strict=True
    ):
        assert a.device.type == "cpu"
        assert a.data_ptr() != b.data_ptr(), name  # a copy, not the live tensor
        assert_array_equal(a, b)
    assert {n for n, p in copy_.named_parameters() if p.requires_grad} == {
        n for n, p in est.model_.named_parameters() if p.requires_grad
    }
    monkeypatch.undo()
    loaded = pickle.loads(pickle.dumps(est))
    assert_array_equal(loaded.transform(images), expected)
    assert_array_equal(est.transform(images), expected)


def test_cpu_copy_keeps_tied_weights_tied():
    module = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    module[1].weight = module[0].weight
    copy_ = network.cpu_copy(module)
    assert copy_[1].weight is copy_[0].weight
    assert copy_[0].weight is not module[0].weight


def test_failed_classifier_refit_keeps_what_the_previous_fit_resolved(
    labelled_images, monkeypatch
):
    """Private fit state (what fit resolved from the parameters) comes back
    too: a failed refit with another image_size must not let predict use the
    old network under the new setting."""
    X, y = labelled_images
    clf = tiny_classifier(epochs=0).fit(X, y)
    expected = clf.predict_proba(X)

    def broken(*args, **kwargs):
        raise RuntimeError("broken stage discovery")

    monkeypatch.setattr("sklearn_cnn._finetune._stages", broken)
    clf.set_params(image_size=8)
    with pytest.raises(RuntimeError, match="broken stage discovery"):
        clf.fit(X, y)
    monkeypatch.undo()
    with pytest.raises(NotFittedError, match="image_size=8"):
        clf.predict(X)
    clf.set_params(image_size=None)
    assert_array_equal(clf.predict_proba(X), expected)


class _PicklesDuringForward(torch.nn.Module):
    """Pickles ``target`` while a transform of it is in flight (what a Dask
    worker does when it sends the transformer on while computing with it)."""

    target = None
    pickled: list = []

    def forward(self, x):
        if _PicklesDuringForward.target is not None:
            _PicklesDuringForward.pickled.append(
                pickle.dumps(_PicklesDuringForward.target)
            )
        return x


def _net_with_spy():
    model = make_tiny_cnn(0)
    model.stem.append(_PicklesDuringForward())
    return model


def test_pickling_while_a_transform_is_in_flight(images):
    est = CNNFeatureTransformer(_net_with_spy, layer="stage2", precision="fp32")
    expected = est.fit(images).transform(images)
    _PicklesDuringForward.target = est
    try:
        est.transform(images[:2])
    finally:
        _PicklesDuringForward.target = None
    restored = pickle.loads(_PicklesDuringForward.pickled[-1])
    np.testing.assert_allclose(restored.transform(images), expected, atol=1e-6)
    hooks = [h for m in est.model_.modules() for h in m._forward_hooks.values()]
    assert hooks == []  # the live module is left as it was


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_missing_cuda_is_said_once_per_fit(labelled_images):
    X, y = labelled_images
    with pytest.warns(RuntimeWarning, match="CUDA is not available") as record:
        tiny_classifier(device="cuda", epochs=0).fit(X, y)
    assert sum("CUDA is not available" in str(r.message) for r in record) == 1


def test_inference_leaves_torch_global_generator_alone(labelled_images):
    X, y = labelled_images
    clf = tiny_classifier(epochs=0).fit(X, y)
    est = CNNFeatureTransformer(functools.partial(make_tiny_cnn, 0)).fit(X)
    state = torch.random.get_rng_state()
    clf.predict_proba(X)
    est.transform(X)
    assert torch.equal(torch.random.get_rng_state(), state)
