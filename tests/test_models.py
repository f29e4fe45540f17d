"""Which network runs: torchvision names, modules, builders, weights; and how
images are preprocessed for it."""

from __future__ import annotations

import functools
import pathlib
import urllib.error

import numpy as np
import pytest
import torch
import torchvision
from numpy.testing import assert_allclose, assert_array_equal
from sklearn.base import clone
from sklearn.utils._param_validation import InvalidParameterError
from tiny_cnn import TinyCNN, make_tiny_cnn, tiny
from torch import nn
from torchvision.models import ResNet18_Weights, ResNet50_Weights, WeightsEnum
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from sklearn_cnn import CNNFeatureTransformer, list_layers
from sklearn_cnn._images import Preprocessing

pytestmark = pytest.mark.usefixtures("one_torch_thread")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RESNET_PREPROCESSING = Preprocessing(
    resize=256,
    crop=(224, 224),
    mean=IMAGENET_MEAN,
    std=IMAGENET_STD,
    interpolation=InterpolationMode.BILINEAR,
)


def state_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture
def no_download(monkeypatch):
    """Any attempt to fetch torchvision weights fails the test."""

    def get_state_dict(self, *args, **kwargs):
        raise AssertionError(f"tried to download {self}")

    monkeypatch.setattr(WeightsEnum, "get_state_dict", get_state_dict)


@pytest.fixture
def fake_download(monkeypatch):
    """torchvision "downloads" a random resnet18 state dict (no network)."""
    torch.manual_seed(0)
    state = torchvision.models.resnet18().state_dict()
    requested = []

    def get_state_dict(self, *args, **kwargs):
        requested.append(self)
        return state

    monkeypatch.setattr(WeightsEnum, "get_state_dict", get_state_dict)
    return state, requested


# ---------------------------------------------------------------------------
# torchvision names and weights enums
# ---------------------------------------------------------------------------


def test_torchvision_name_without_weights(images, no_download):
    est = CNNFeatureTransformer("resnet18", weights=None, image_size=32).fit(images)
    assert isinstance(est.model_, torchvision.models.ResNet)
    assert not est.model_.training
    assert est.transform(images).shape == (12, 512)


@pytest.mark.parametrize(
    "weights",
    [
        "DEFAULT",
        "IMAGENET1K_V1",
        "ResNet18_Weights.IMAGENET1K_V1",
        "ResNet18_Weights.DEFAULT",
        ResNet18_Weights.IMAGENET1K_V1,
        ResNet18_Weights.DEFAULT,
    ],
)
def test_weights_enum_and_names(weights, fake_download, images):
    state, requested = fake_download
    est = CNNFeatureTransformer("resnet18", weights, precision="fp32")
    assert requested == []  # nothing downloads before fit
    est.fit(images[:2])
    assert requested == [ResNet18_Weights.IMAGENET1K_V1]
    assert state_equal(est.model_.state_dict(), state)
    # Preprocessing comes from the weights' metadata: 256 -> crop 224, ImageNet.
    assert est.preprocessing_ == RESNET_PREPROCESSING


@pytest.mark.slow
def test_weights_metadata_preprocessing_matches_torchvision(fake_download, images):
    state, _ = fake_download
    X = images[:2]
    est = CNNFeatureTransformer("resnet18", "DEFAULT", precision="fp32").fit(X)
    # What torchvision's own recipe does: weights.transforms(), then the net.
    x = torch.from_numpy(X).permute(0, 3, 1, 2)
    ours = est.preprocessing_(x)
    theirs = ResNet18_Weights.DEFAULT.transforms()(x)
    assert ours.shape == theirs.shape == (2, 3, 224, 224)
    # Their uint8 resize goes through float and rounds; ours runs torch's
    # uint8 kernel: at most one grey level apart.
    one_level = 1 / 255 / min(IMAGENET_STD)
    assert (ours - theirs).abs().max() <= 1.01 * one_level
    assert (ours - theirs).abs().mean() <= 0.3 * one_level
    net = torchvision.models.resnet18()
    net.load_state_dict(state)
    net.fc = torch.nn.Identity()
    with torch.no_grad():
        expected = net.eval()(ours).numpy()
        reference = net(theirs).numpy()
    got = est.transform(X)
    assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
    cos = (got * reference).sum(1) / np.linalg.norm(got, axis=1)
    assert (cos / np.linalg.norm(reference, axis=1)).min() > 0.999


def test_failed_download_says_what_to_do(monkeypatch, images):
    def offline(self, *args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(WeightsEnum, "get_state_dict", offline)
    with pytest.raises(RuntimeError, match=r"Could not download.*path as weights="):
        CNNFeatureTransformer("resnet18").fit(images)


def test_nothing_loads_before_fit(no_download):
    est = CNNFeatureTransformer("resnet18")
    est.get_params()
    clone(est)
    repr(est)
    list_layers("resnet18", image_size=32)  # weights=None by default


def test_unknown_torchvision_name_suggests_close_matches(images):
    with pytest.raises(ValueError, match=r"Unknown model 'resnet181'.*'resnet18'"):
        CNNFeatureTransformer("resnet181", weights=None).fit(images)
    with pytest.raises(ValueError, match=r"Did you mean.*'mobilenet_v3_small'"):
        CNNFeatureTransformer("mobilenetv3_small", weights=None).fit(images)


def test_unknown_weights_name(images, no_download):
    with pytest.raises(
        ValueError,
        match=r"neither a weights name of 'resnet18' \(valid: DEFAULT, "
        r"IMAGENET1K_V1\) nor an existing file",
    ):
        CNNFeatureTransformer("resnet18", "IMAGENET1K_V9").fit(images)


def test_other_models_weights_name_is_refused(images, no_download):
    # Regression: "ResNet50_Weights.IMAGENET1K_V1" silently loaded resnet18's
    # IMAGENET1K_V1 weights.
    with pytest.raises(ValueError, match="neither a weights name"):
        CNNFeatureTransformer("resnet18", "ResNet50_Weights.IMAGENET1K_V1").fit(images)
    with pytest.raises(TypeError, match="expected ResNet18_Weights"):
        CNNFeatureTransformer("resnet18", ResNet50_Weights.IMAGENET1K_V1).fit(images)


def test_enum_weights_refused_for_own_module(images, no_download):
    with pytest.raises(ValueError, match="cannot be used with a module of your own"):
        tiny(weights=ResNet18_Weights.DEFAULT).fit(images)
    with pytest.raises(ValueError, match="No such file exists"):
        tiny(weights="IMAGENET1K_V1").fit(images)


# ---------------------------------------------------------------------------
# Modules and builders
# ---------------------------------------------------------------------------


def test_module_is_copied_and_never_modified(images):
    module = make_tiny_cnn(0)  # in training mode, contiguous memory format
    before = {k: v.clone() for k, v in module.state_dict().items()}
    est = tiny(module).fit(images)
    est.transform(images)
    assert est.model_ is not module
    assert est.model is module  # the parameter itself is kept as given
    assert state_equal(module.state_dict(), before)
    assert module.training
    conv = module.stem[0].weight
    assert conv.is_contiguous()
    assert not conv.is_contiguous(memory_format=torch.channels_last)
    # The fitted copy is in eval mode and on channels_last, as placed for speed.
    assert not est.model_.training
    assert est.model_.stem[0].weight.is_contiguous(memory_format=torch.channels_last)


def test_module_and_builder_give_the_same_features(images, tiny_builder):
    a = tiny(make_tiny_cnn(0)).fit_transform(images)
    b = tiny(tiny_builder).fit_transform(images)
    assert_array_equal(a, b)


def test_builder_is_called_in_fit_only(images):
    calls = []

    def build():
        calls.append(1)
        return make_tiny_cnn(0)

    est = tiny(build)
    est.get_params()
    clone(est)
    assert calls == []
    est.fit(images)
    assert calls == [1]
    est.transform(images)
    assert calls == [1]


def test_builder_must_return_a_module(images):
    with pytest.raises(TypeError, match="callable that returned dict"):
        tiny(dict).fit(images)


def test_model_of_wrong_type(images):
    with pytest.raises(InvalidParameterError, match="'model' parameter"):
        tiny(42).fit(images)


def test_default_and_none_keep_own_weights(images):
    a = tiny(weights=None).fit_transform(images)
    b = tiny(weights="DEFAULT").fit_transform(images)
    assert_array_equal(a, b)


# ---------------------------------------------------------------------------
# State-dict files
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("as_str", [True, False])
@pytest.mark.parametrize("wrap", [None, "state_dict", "model_state_dict", "model"])
def test_state_dict_file(images, tmp_path, as_str, wrap):
    state = make_tiny_cnn(1).state_dict()
    path = tmp_path / "weights.pt"
    torch.save(state if wrap is None else {wrap: state, "epoch": 3}, path)
    weights = str(path) if as_str else path
    est = tiny(weights=weights).fit(images)  # builder of seed 0, file of seed 1
    assert state_equal(est.model_.state_dict(), state)
    expected = tiny(functools.partial(make_tiny_cnn, 1)).fit_transform(images)
    assert_array_equal(est.transform(images), expected)
    assert not np.array_equal(expected, tiny().fit_transform(images))


@pytest.mark.slow
def test_state_dict_file_for_torchvision_name(images, tmp_path, no_download):
    torch.manual_seed(1)
    module = torchvision.models.resnet18()
    path = tmp_path / "resnet18.pth"
    torch.save(module.state_dict(), path)
    est = CNNFeatureTransformer("resnet18", path, image_size=32, precision="fp32")
    got = est.fit_transform(images)
    assert state_equal(est.model_.state_dict(), module.state_dict())
    # The file's architecture keeps its default weights' preprocessing recipe.
    assert est.preprocessing_.mean == IMAGENET_MEAN
    expected = tiny(module, image_size=32).fit_transform(images)
    assert_array_equal(got, expected)
    pre = CNNFeatureTransformer("resnet18", str(path)).fit(images[:1]).preprocessing_
    assert pre == RESNET_PREPROCESSING


def test_weights_file_that_does_not_fit(images, tmp_path):
    good = make_tiny_cnn(0).state_dict()
    missing = {k: v for k, v in good.items() if not k.startswith("fc.")}
    unexpected = {**good, "extra.weight": torch.zeros(1)}
    wrong_shape = TinyCNN(width=4).state_dict()
    cases = {
        "missing.pt": (missing, r"does not fit the model TinyCNN.*missing keys: fc"),
        "unexpected.pt": (unexpected, r"unexpected keys: extra\.weight"),
        "shape.pt": (wrong_shape, r"shape mismatches: stem\.0\.weight: file"),
    }
    for name, (state, match) in cases.items():
        torch.save(state, tmp_path / name)
        with pytest.raises(ValueError, match=match):
            tiny(weights=tmp_path / name).fit(images)


def test_weights_file_mismatch_for_torchvision_name(images, tmp_path):
    torch.save(make_tiny_cnn(0).state_dict(), tmp_path / "tiny.pt")
    with pytest.raises(ValueError, match=r"does not fit the model ResNet"):
        CNNFeatureTransformer("resnet18", tmp_path / "tiny.pt").fit(images)


def test_weights_file_that_is_not_a_state_dict(images, tmp_path):
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(ValueError, match="holds a list, not a state dict"):
        tiny(weights=tmp_path / "list.pt").fit(images)
    # A whole pickled module is refused by weights_only loading.
    torch.save(make_tiny_cnn(0), tmp_path / "module.pt")
    with pytest.raises(ValueError, match="Cannot read weights file.*state_dict"):
        tiny(weights=tmp_path / "module.pt").fit(images)
    (tmp_path / "garbage.pt").write_bytes(b"garbage" * 100)
    with pytest.raises(ValueError, match="Cannot read weights file"):
        tiny(weights=str(tmp_path / "garbage.pt")).fit(images)


def test_weights_file_not_found(images, tmp_path):
    with pytest.raises(ValueError, match="Weights file not found"):
        tiny(weights=tmp_path / "absent.pt").fit(images)
    with pytest.raises(ValueError, match="neither a weights name.*existing file"):
        CNNFeatureTransformer("resnet18", str(tmp_path / "absent.pt")).fit(images)


# ---------------------------------------------------------------------------
# Preprocessing from parameters
# ---------------------------------------------------------------------------


def test_metadata_preprocessing_without_weights(images, no_download):
    est = CNNFeatureTransformer("resnet18", weights=None).fit(images[:1])
    assert est.preprocessing_ == RESNET_PREPROCESSING


@pytest.mark.parametrize(
    "image_size, resize, crop",
    [
        (32, (32, 32), None),
        (np.int64(32), (32, 32), None),  # regression: np integers failed
        ((24, 40), (24, 40), None),
        ([24, 40], (24, 40), None),
        ("native", None, None),
        (None, 256, (224, 224)),
    ],
)
def test_image_size_overrides_metadata(image_size, resize, crop, images):
    est = CNNFeatureTransformer(
        "resnet18", None, image_size=image_size, mean=(0.5, 0.5, 0.5)
    )
    est.fit(images[:1])
    pre = est.preprocessing_
    assert (pre.resize, pre.crop) == (resize, crop)
    assert pre.mean == (0.5, 0.5, 0.5)  # given
    assert pre.std == IMAGENET_STD  # from the metadata


def test_own_module_defaults_to_native_size_and_imagenet_stats(images):
    pre = tiny().fit(images).preprocessing_
    assert (pre.resize, pre.crop) == (None, None)
    assert (pre.mean, pre.std) == (IMAGENET_MEAN, IMAGENET_STD)


def test_preprocessing_values_against_manual_computation(images):
    mean, std = (0.1, 0.2, 0.3), (0.5, 0.25, 2.0)
    est = tiny(layer="stem.0", pooling="flatten", image_size=(12, 10))
    got = est.set_params(mean=mean, std=std).fit_transform(images)
    x = torch.from_numpy(images).permute(0, 3, 1, 2)
    x = TF.resize(x, [12, 10], antialias=True).float() / 255
    x = (x - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
    with torch.no_grad():
        expected = make_tiny_cnn(0).stem[0](x).flatten(1).numpy()
    assert got.shape == (12, 8 * 12 * 10)
    assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "params, match",
    [
        ({"mean": (0.5, 0.5)}, r"mean has 2 value\(s\) but the images have 3"),
        ({"mean": (0.5, np.nan, 0.5)}, r"mean must hold one finite number per"),
        ({"std": (0.5, 0.5, 0.5, 0.5)}, r"std has 4 value\(s\) but the images"),
        ({"std": (0.5, 0.0, 0.5)}, r"std must be positive"),
        ({"image_size": (0, 3)}, r"image_size must be an int, \(height, width\)"),
        ({"image_size": (8, 8, 8)}, r"image_size must be an int"),
        ({"image_size": (8.5, 8)}, r"image_size must be an int"),
    ],
)
def test_bad_preprocessing_parameters(params, match, images):
    with pytest.raises(ValueError, match=match):
        tiny(**params).fit(images)


@pytest.mark.parametrize(
    "params",
    [{"image_size": 0}, {"image_size": "big"}, {"image_size": -3}],
)
def test_bad_image_size_type(params, images):
    with pytest.raises(InvalidParameterError, match="image_size"):
        tiny(**params).fit(images)


def test_weights_path_as_pathlib_in_list_layers(tmp_path):
    torch.save(make_tiny_cnn(1).state_dict(), tmp_path / "w.pt")
    layers = list_layers(
        functools.partial(make_tiny_cnn, 0), pathlib.Path(tmp_path / "w.pt")
    )
    assert [layer.name for layer in layers][-1] == "fc"


# ---------------------------------------------------------------------------
# random_state, input sizes a model needs, preprocessing of fixed-size models
# ---------------------------------------------------------------------------


def random_cnn():
    """A builder that initialises at random: what random_state must seed."""
    return TinyCNN()


@pytest.mark.slow
@pytest.mark.parametrize("model", ["resnet18", random_cnn], ids=["name", "builder"])
def test_random_state_seeds_random_weights(model, images, no_download):
    def features(**params):
        est = CNNFeatureTransformer(
            model, weights=None, layer="layer1" if model == "resnet18" else "stage1",
            image_size=16, precision="fp32", **params,
        )  # fmt: skip
        return est.fit_transform(images)

    a, b = features(random_state=0), features(random_state=0)
    assert_array_equal(a, b)
    assert not np.array_equal(a, features(random_state=1))
    assert not np.array_equal(features(), features())  # None: fresh each fit


def test_random_state_does_not_change_given_weights(images):
    a = tiny(random_state=0).fit_transform(images)
    assert_array_equal(a, tiny(random_state=1).fit_transform(images))


def test_vit_h_14_without_weights_preprocesses_for_224(no_download):
    # Its default weights are for 518 px; the model built without them is 224.
    from sklearn_cnn._models import resolve_preprocessing

    with torch.device("meta"):  # the architecture only: instant
        module = torchvision.models.vit_h_14()
    assert module.image_size == 224
    pre = resolve_preprocessing("vit_h_14", None, None, None, None, module=module)
    assert pre.crop == (224, 224)
    # With its 518 px weights the model is built for 518, and so is the input.
    weights = torchvision.models.ViT_H_14_Weights.IMAGENET1K_SWAG_E2E_V1
    pre = resolve_preprocessing("vit_h_14", weights, None, None, None)
    assert pre.crop == (518, 518)


class NeedsSize(nn.Module):
    """Pools to a fixed grid only after two stride-4 convolutions."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 5, stride=4)
        self.b = nn.Conv2d(4, 4, 5, stride=4)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(self.b(self.a(x)).mean((2, 3)))


@pytest.mark.slow
@pytest.mark.parametrize(
    "model, image_size, match",
    [
        (NeedsSize(), 16, r"failed on a 16x16 input.*runs on 32x32.*image_size=32"),
        ("vit_b_16", 64, r"failed on a 64x64 input.*built for 224x224.*image_size=224"),
        ("alexnet", 32, r"failed on a 32x32 input.*image_size=\d+"),
    ],
    ids=["own", "vit", "alexnet"],
)
def test_too_small_images_name_the_size_to_set(model, image_size, match, images):
    est = CNNFeatureTransformer(model, weights=None, image_size=image_size)
    with pytest.raises(ValueError, match=match):
        est.fit(images[:1])
    with pytest.raises(ValueError, match=match):
        list_layers(model, image_size=image_size)
