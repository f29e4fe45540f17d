"""save()/load(): parameters, fitted attributes and weights, no pickled code."""

from __future__ import annotations

import functools
import json
import pickle
import warnings

import numpy as np
import pytest
import torch
import torchvision
from numpy.testing import assert_array_equal
from sklearn.exceptions import NotFittedError
from tiny_cnn import TinyCNN, in_threads, make_tiny_cnn, tiny
from torchvision.models import WeightsEnum

import sklearn_cnn
import sklearn_cnn._persistence as persistence
from sklearn_cnn import CNNFeatureTransformer, load

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TRUSTED = ["tiny_cnn:make_tiny_cnn"]


tiny = functools.partial(tiny, device="cpu")


def fitted_attributes(est) -> list:
    """Everything fit set, but the module (compared tensor by tensor)."""
    skip = {"_network", *est.get_params()}
    network = [
        ("preprocessing_", repr(est.preprocessing_)),
        ("example_shape", est._network.example_shape),
    ]
    return network + sorted((k, repr(v)) for k, v in vars(est).items() if k not in skip)


def assert_same_estimator(loaded, est, images) -> None:
    assert type(loaded) is type(est)
    assert loaded.get_params().keys() == est.get_params().keys()
    for key, value in est.get_params().items():
        assert sklearn_cnn._base._same(loaded.get_params()[key], value), key
    assert fitted_attributes(loaded) == fitted_attributes(est)
    for (k, a), (k2, b) in zip(
        loaded.model_.state_dict().items(), est.model_.state_dict().items(), strict=True
    ):
        assert k == k2
        assert a.dtype == b.dtype
        assert_array_equal(a, b)
    assert_array_equal(loaded.transform(images), est.transform(images))


# ---------------------------------------------------------------------------
# Round trips
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["safetensors", "torch"])
def test_round_trip_is_exact(backend, images, tmp_path, monkeypatch):
    if backend == "torch":  # safetensors not installed: torch.save of tensors
        monkeypatch.setattr(persistence, "_safetensors", lambda: None)
    est = tiny(layer=["stage1", "fc"], pooling="gem", mean=(0.4, 0.5, 0.6))
    est.fit(images)
    path = tmp_path / "cnn.bin"
    est.save(path)
    head = path.read_bytes()[:4]
    assert (head == b"PK\x03\x04") == (backend == "torch")
    loaded = load(path, trusted=TRUSTED)
    assert_same_estimator(loaded, est, images)
    assert loaded.get_feature_names_out().tolist() == (
        est.get_feature_names_out().tolist()
    )
    # What fit resolved is what the loaded one uses: a change is still refused.
    loaded.set_params(pooling="avg")
    with pytest.raises(NotFittedError, match="pooling"):
        loaded.transform(images)


def test_round_trip_of_a_torchvision_model(images, tmp_path):
    torch.manual_seed(0)
    est = CNNFeatureTransformer(
        "mobilenet_v3_small", weights=None, image_size=32, precision="fp32"
    ).fit(images)
    est.save(tmp_path / "m.safetensors")
    loaded = load(tmp_path / "m.safetensors")  # a name needs no trust
    assert_same_estimator(loaded, est, images)


def test_round_trip_of_a_timm_model(images, tmp_path):
    pytest.importorskip("timm")
    torch.manual_seed(0)
    est = CNNFeatureTransformer(
        "timm/test_resnet", weights=None, image_size=32, precision="fp32"
    ).fit(images[:2])
    est.save(tmp_path / "t.safetensors")
    assert_same_estimator(load(tmp_path / "t.safetensors"), est, images[:2])


def test_round_trip_of_a_partial_of_a_class(images, tmp_path):
    est = tiny(model=functools.partial(TinyCNN, num_classes=3, width=4), layer=None)
    est.fit(images)
    est.save(tmp_path / "c.safetensors")
    loaded = load(tmp_path / "c.safetensors", trusted=["tiny_cnn:TinyCNN"])
    assert loaded.model.keywords == {"num_classes": 3, "width": 4}
    assert_same_estimator(loaded, est, images)


@pytest.mark.slow
def test_round_trip_of_a_partial_of_a_classmethod(images, tmp_path):
    """The README's EfficientNet-Lite0: ``partial(EfficientNet.from_name, ...)``."""
    lite = pytest.importorskip("efficientnet_lite_pytorch")
    model = functools.partial(lite.EfficientNet.from_name, "efficientnet-lite0")
    est = tiny(model=model, image_size=32).fit(images[:2])
    est.save(tmp_path / "lite0.safetensors")
    path = "efficientnet_lite_pytorch.model:EfficientNet.from_name"
    with pytest.raises(ValueError, match=path):
        load(tmp_path / "lite0.safetensors")
    loaded = load(tmp_path / "lite0.safetensors", trusted=[path])
    assert_same_estimator(loaded, est, images[:2])


def test_set_output_and_weights_path_survive(images, tmp_path):
    weights = tmp_path / "w.pt"
    torch.save(make_tiny_cnn(3).state_dict(), weights)
    est = tiny(weights=weights, layer="stage2").set_output(transform="pandas")
    est.fit(images)
    est.save(tmp_path / "e.safetensors")
    weights.unlink()  # the weights travel in the saved file
    loaded = load(tmp_path / "e.safetensors", trusted=TRUSTED)
    out = loaded.transform(images)
    assert list(out.columns) == list(est.get_feature_names_out())
    assert_array_equal(out.to_numpy(), est.transform(images).to_numpy())


@pytest.mark.slow
def test_architecture_that_depends_on_the_weights_is_rebuilt_offline(
    images, tmp_path, monkeypatch
):
    """googlenet with weights normalises its input itself (transform_input):
    built with weights=None it would be another network. No download happens:
    fit's "pretrained" weights are faked, and load must not ask for them."""
    downloads = []

    def fake_download(self, *args, **kwargs):
        downloads.append(self)
        import sys

        model = sys._getframe(1).f_locals["model"]
        torch.manual_seed(1)
        return {k: torch.randn_like(v) if v.is_floating_point() else v
                for k, v in model.state_dict().items()}  # fmt: skip

    monkeypatch.setattr(WeightsEnum, "get_state_dict", fake_download)
    X = np.repeat(np.repeat(images[:3], 4, axis=1), 4, axis=2)  # 64 px
    est = CNNFeatureTransformer(
        "googlenet", weights="DEFAULT", image_size=64, precision="fp32"
    ).fit(X)
    assert est.model_.transform_input and len(downloads) == 1
    est.save(tmp_path / "g.safetensors")

    def no_download(self, *args, **kwargs):
        raise AssertionError("load() downloaded weights")

    monkeypatch.setattr(WeightsEnum, "get_state_dict", no_download)
    loaded = load(tmp_path / "g.safetensors")
    assert loaded.model_.transform_input
    assert loaded.weights == "DEFAULT"
    assert_same_estimator(loaded, est, X)
    # The temporary replacement is gone.
    assert "get_state_dict" not in vars(torchvision.models.GoogLeNet_Weights.DEFAULT)


@pytest.mark.slow
def test_threads_loading_named_weights_never_download(images, tmp_path, monkeypatch):
    def fake_download(self, *args, **kwargs):
        import sys

        return sys._getframe(1).f_locals["model"].state_dict()

    monkeypatch.setattr(WeightsEnum, "get_state_dict", fake_download)
    est = CNNFeatureTransformer(
        "resnet18", weights="IMAGENET1K_V1", image_size=32, precision="fp32"
    ).fit(images[:2])
    est.save(tmp_path / "r.safetensors")
    downloads = []
    monkeypatch.setattr(
        WeightsEnum, "get_state_dict", lambda self, *a, **k: downloads.append(self)
    )
    results = in_threads(
        lambda i: load(tmp_path / "r.safetensors").transform(images[:2])
    )
    assert downloads == []
    for (out,) in results:
        assert_array_equal(out, est.transform(images[:2]))


def test_file_written_for_cuda_loads_on_the_cpu(images, tmp_path):
    est = tiny(layer="stage1").fit(images)
    expected = est.transform(images)
    est.set_params(device="cuda")  # as if saved on a GPU machine
    est.save(tmp_path / "gpu.safetensors")
    if not torch.cuda.is_available():
        with pytest.warns(RuntimeWarning, match="CUDA is not available"):
            loaded = load(tmp_path / "gpu.safetensors", trusted=TRUSTED)
        assert loaded.device_ == torch.device("cpu")
        assert_array_equal(loaded.transform(images), expected)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cpu = load(tmp_path / "gpu.safetensors", trusted=TRUSTED, device="cpu")
    assert cpu.device_ == torch.device("cpu") and cpu.device == "cpu"
    assert_array_equal(cpu.transform(images), expected)


def test_saved_tensors_are_on_the_cpu_and_contiguous(images, tmp_path):
    import safetensors.torch

    est = tiny().fit(images)
    assert not next(est.model_.stem.parameters()).is_contiguous()  # channels_last
    est.save(tmp_path / "a.safetensors")
    tensors = safetensors.torch.load_file(tmp_path / "a.safetensors")
    assert tensors.keys() == est.model_.state_dict().keys()
    assert all(t.device.type == "cpu" for t in tensors.values())


def test_pickle_and_save_agree(images, tmp_path):
    est = tiny(layer="stage2", pooling="max").fit(images)
    est.save(tmp_path / "s.safetensors")
    from_file = load(tmp_path / "s.safetensors", trusted=TRUSTED)
    from_pickle = pickle.loads(pickle.dumps(est))
    assert_array_equal(from_file.transform(images), from_pickle.transform(images))
    # A loaded estimator pickles and saves again.
    again = pickle.loads(pickle.dumps(from_file))
    again.save(tmp_path / "t.safetensors")
    assert_array_equal(
        load(tmp_path / "t.safetensors", trusted=TRUSTED).transform(images),
        est.transform(images),
    )


# ---------------------------------------------------------------------------
# What cannot be saved
# ---------------------------------------------------------------------------


def test_unfitted_or_changed_estimator_is_not_saved(images, tmp_path):
    with pytest.raises(NotFittedError):
        tiny().save(tmp_path / "x")
    est = tiny().fit(images).set_params(layer="stage1")
    with pytest.raises(NotFittedError, match="call fit again"):
        est.save(tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_module_instance_says_how_to_rebuild_it(images, tmp_path):
    est = CNNFeatureTransformer(make_tiny_cnn(0), precision="fp32").fit(images)
    with pytest.raises(ValueError, match="torchvision name or as a callable"):
        est.save(tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_lambda_or_local_function_is_refused(images, tmp_path):
    def local():
        return make_tiny_cnn(0)

    for model in (lambda: make_tiny_cnn(0), local):
        est = tiny(model=model).fit(images)
        with pytest.raises(ValueError, match="no import path"):
            est.save(tmp_path / "x")


class WithExtraState(TinyCNN):
    """A module whose state dict holds a non-tensor (get_extra_state)."""

    def get_extra_state(self):
        return {"vocabulary": ["a", "b"]}

    def set_extra_state(self, state):
        self.vocabulary = state["vocabulary"]


def test_non_tensor_in_the_state_dict_is_a_clear_error(images, tmp_path):
    est = tiny(model=WithExtraState).fit(images)
    with pytest.raises(
        ValueError, match="holds a dict at '_extra_state'.*tensors only"
    ):
        est.save(tmp_path / "x")


def test_non_tensor_in_a_torch_file_is_refused(images, tmp_path, monkeypatch):
    monkeypatch.setattr(persistence, "_safetensors", lambda: None)
    est = tiny().fit(images)
    est.save(tmp_path / "a.pt")
    obj = torch.load(tmp_path / "a.pt", weights_only=True)
    obj["tensors"]["stem.0.weight"] = 3
    torch.save(obj, tmp_path / "b.pt")
    with pytest.raises(ValueError, match="holds a int at 'stem.0.weight'"):
        load(tmp_path / "b.pt", trusted=TRUSTED)


def test_pickled_code_in_a_torch_file_is_refused(tmp_path):
    torch.save({"sklearn_cnn": make_tiny_cnn(0)}, tmp_path / "code.pt")
    with pytest.raises(ValueError, match="not a complete sklearn_cnn save file"):
        load(tmp_path / "code.pt")


# ---------------------------------------------------------------------------
# Damaged, modified or hostile files
# ---------------------------------------------------------------------------


@pytest.fixture
def saved(images, tmp_path):
    est = tiny(layer="stage1").fit(images)
    path = tmp_path / "cnn.safetensors"
    est.save(path)
    return path


@pytest.mark.parametrize(
    ("backend", "where"),
    [
        *[
            ("safetensors", w)
            for w in ("first weight", "last byte", "truncated", "empty")
        ],
        # The end of a zip file is its directory, not content: not here.
        *[("torch", w) for w in ("first weight", "truncated", "empty")],
    ],
)
def test_damaged_file_is_refused(backend, where, images, tmp_path, monkeypatch):
    if backend == "torch":
        monkeypatch.setattr(persistence, "_safetensors", lambda: None)
    path = tmp_path / "cnn.bin"
    tiny(layer="stage1").fit(images).save(path)
    data = bytearray(path.read_bytes())
    if backend == "torch":
        monkeypatch.undo()
    if where == "first weight":  # one bit of a weight, the file otherwise intact
        if backend == "torch":
            stored = torch.load(path, weights_only=True)["tensors"]["stem.0.weight"]
            i = bytes(data).index(stored.view(torch.uint8).numpy().tobytes()[:16])
        else:
            i = 8 + int.from_bytes(data[:8], "little")  # the first tensor's data
        data[i] ^= 0x01
    elif where == "last byte":
        data[-1] ^= 0x01
    elif where == "truncated":
        data = data[: len(data) // 2]
    else:
        data = bytearray()
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="not a complete sklearn_cnn save file"):
        load(path, trusted=TRUSTED)


def test_modified_parameters_are_refused(saved):
    """Editing the JSON (here: another layer) breaks the checksum."""
    data = saved.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = data[8 : 8 + n].replace(b'\\"stage1\\"', b'\\"stage2\\"')
    assert header != data[8 : 8 + n]
    saved.write_bytes(data[:8] + header + data[8 + n :])
    with pytest.raises(ValueError, match="checksum does not match"):
        load(saved, trusted=TRUSTED)


def _rewrite(path, edit) -> None:
    """Apply ``edit`` to the saved header and write it back, checksum included
    (as a forger would)."""
    import safetensors.torch

    tensors = safetensors.torch.load_file(path)
    with safetensors.safe_open(path, "pt") as f:
        header = json.loads(f.metadata()["sklearn_cnn"])
    edit(header)
    text = json.dumps(header)
    meta = {"sklearn_cnn": text, "sha256": persistence._digest(text, tensors)}
    safetensors.torch.save_file(tensors, path, meta)


def test_callables_are_imported_only_when_trusted(saved):
    with pytest.raises(ValueError, match=r"tiny_cnn:make_tiny_cnn.*trusted="):
        load(saved)
    # A hostile file (with a valid checksum) naming os.system is refused too.
    evil = {
        "__partial__": {
            "func": {"__callable__": "os:system"},
            "args": ["echo owned"],
            "keywords": {},
        }
    }
    _rewrite(saved, lambda h: h["params"].update(model=evil))
    with pytest.raises(ValueError, match=r"\['os:system'\]"):
        load(saved, trusted=TRUSTED)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda h: h["params"].update(colour="red"), r"parameters \['colour'\]"),
        (lambda h: h["fitted"].update(transform=1), r"\['transform'\] that would"),
        (lambda h: h["fitted"].update(__class__=1), r"\['__class__'\] that would"),
        (lambda h: h["fitted"].pop("_example_shape"), "no input shape"),
        (lambda h: h.update(estimator="Pipeline"), "unexpected header"),
    ],
)
def test_forged_header_is_refused(edit, message, saved):
    _rewrite(saved, edit)
    with pytest.raises(ValueError, match=message):
        load(saved, trusted=TRUSTED)


def test_safetensors_file_without_safetensors_says_what_to_install(saved, monkeypatch):
    monkeypatch.setattr(persistence, "_safetensors", lambda: None)
    with pytest.raises(ImportError, match=r"sklearn-cnn\[persist\]"):
        load(saved, trusted=TRUSTED)


def test_other_estimators_are_not_saved(tmp_path):
    class Mine(CNNFeatureTransformer):
        pass

    with pytest.raises(TypeError, match="not Mine"):
        Mine().save(tmp_path / "x")


# ---------------------------------------------------------------------------
# FineTuneClassifier
# ---------------------------------------------------------------------------


class NoLinear(torch.nn.Module):
    """Conv layers only: the classifier appends its head on the pooled output."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = torch.nn.Sequential(
            torch.nn.Conv2d(3, 6, 3, padding=1), torch.nn.ReLU()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


@pytest.mark.parametrize("model", ["tiny", "no linear"])
def test_classifier_round_trip_is_exact(model, labelled_images, tmp_path):
    X, y = labelled_images
    builder = functools.partial(make_tiny_cnn, 0) if model == "tiny" else NoLinear
    clf = sklearn_cnn.FineTuneClassifier(
        builder,
        epochs=2,
        augment=None,
        validation_fraction=0.5,
        class_weight={"red": 2.0, "green": 1.0, "blue": 1.0},
        precision="fp32",
        device="cpu",
        random_state=0,
    ).fit(X, y)
    clf.save(tmp_path / "clf.safetensors")
    trusted = ["tiny_cnn:make_tiny_cnn", "test_persistence:NoLinear"]
    loaded = load(tmp_path / "clf.safetensors", trusted=trusted)
    assert type(loaded) is sklearn_cnn.FineTuneClassifier
    assert_array_equal(loaded.classes_, clf.classes_)
    assert loaded.classes_.dtype == clf.classes_.dtype
    assert repr(loaded.history_) == repr(clf.history_)  # NaN rows included
    for name in ("best_epoch_", "n_iter_", "head_", "stages_", "temperature_"):
        assert getattr(loaded, name) == getattr(clf, name), name
    assert loaded.class_weight == clf.class_weight
    assert not any(p.requires_grad for p in loaded.model_.parameters())
    assert_array_equal(loaded.predict_proba(X), clf.predict_proba(X))
    assert_array_equal(loaded.predict(X), clf.predict(X))
    # And it trains on: a warm start from the loaded weights.
    loaded.set_params(warm_start=True, epochs=1).fit(X, y)
    assert loaded.n_iter_ == clf.n_iter_ + 1


def test_classifier_with_integer_labels_round_trips(labelled_images, tmp_path):
    X, y = labelled_images
    labels = np.unique(y, return_inverse=True)[1].astype(np.int16) * 7
    clf = sklearn_cnn.FineTuneClassifier(
        functools.partial(make_tiny_cnn, 0),
        epochs=0,
        validation_fraction=None,
        precision="fp32",
        device="cpu",
    ).fit(X, labels)
    clf.save(tmp_path / "c.safetensors")
    loaded = load(tmp_path / "c.safetensors", trusted=TRUSTED)
    assert loaded.classes_.dtype == np.int16
    assert_array_equal(loaded.predict(X), clf.predict(X))
