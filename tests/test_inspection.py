"""Class activation maps: sanity checks that can fail, exactness, layouts, errors.

The sanity checks run on synthetic images whose class is the colour of one
small patch at a random place: the evidence is in the patch and nowhere else.
Each check is a function that asserts, and each is shown to fail on a
deliberately wrong map.
"""

from __future__ import annotations

import copy
import functools

import matplotlib
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.stats import spearmanr
from sklearn.decomposition import PCA
from sklearn.exceptions import NotFittedError
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.model_selection import GridSearchCV
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import MinMaxScaler, StandardScaler
from tiny_cnn import make_tiny_cnn
from torch import nn
from torchvision.models import VisionTransformer
from torchvision.ops.misc import Permute

from sklearn_cnn import CNNFeatureTransformer, FineTuneClassifier
from sklearn_cnn.inspection import ActivationMapDisplay, activation_maps

matplotlib.use("Agg")
pytestmark = pytest.mark.usefixtures("one_torch_thread")

COLOURS = {"red": (230, 30, 30), "green": (30, 230, 30), "blue": (30, 30, 230)}
PATCH = 6
TINY = functools.partial(make_tiny_cnn, 0)
TINY_VIT = functools.partial(
    VisionTransformer,
    image_size=32, patch_size=8, num_layers=1, num_heads=2, hidden_dim=16, mlp_dim=16,
)  # fmt: skip


def patch_images(n: int, seed: int = 0, size: int = 32):
    """Grey noise with one coloured patch at a random place; the class is its
    colour. Returns images, labels and each patch's (top, left)."""
    rng = np.random.default_rng(seed)
    X = rng.integers(70, 150, (n, size, size, 1), dtype=np.uint8).repeat(3, -1)
    y = np.array(list(COLOURS))[np.arange(n) % 3]
    boxes = rng.integers(4, size - PATCH - 4, (n, 2))
    for image, label, (top, left) in zip(X, y, boxes, strict=True):
        image[top : top + PATCH, left : left + PATCH] = COLOURS[label]
    return X, y, boxes


def pointing_game(maps: np.ndarray, boxes: np.ndarray, tolerance: int = 2) -> float:
    """Fraction of maps whose peak falls on the patch (within ``tolerance``
    pixels, as the pointing game of Zhang et al. 2016 allows)."""
    hits = []
    for m, (top, left) in zip(maps, boxes, strict=True):
        i, j = np.unravel_index(np.argmax(m), m.shape)
        hits.append(
            top - tolerance <= i < top + PATCH + tolerance
            and left - tolerance <= j < left + PATCH + tolerance
        )
    return float(np.mean(hits))


def assert_points_at_patch(maps: np.ndarray, boxes: np.ndarray) -> None:
    score = pointing_game(maps, boxes)
    assert score >= 0.9, f"pointing game {score:.2f} < 0.9"


def rank_correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Mean over images of the Spearman correlation of two sets of maps."""
    rhos = [spearmanr(x.ravel(), z.ravel())[0] for x, z in zip(a, b, strict=True)]
    return float(np.nanmean(rhos))


def assert_depends_on_weights(trained: np.ndarray, randomised: np.ndarray) -> None:
    """Adebayo et al. 2018: a map that explains the model changes when the
    model's weights are randomised."""
    rho = rank_correlation(trained, randomised)
    assert rho < 0.5, f"rank correlation with randomised weights {rho:.2f} >= 0.5"


def randomised(clf: FineTuneClassifier, seed: int = 1) -> FineTuneClassifier:
    """A copy of ``clf`` with every layer re-initialised."""
    clf = copy.deepcopy(clf)
    torch.manual_seed(seed)
    for m in clf.model_.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
    return clf


@pytest.fixture(scope="module")
def data():
    return patch_images(150), patch_images(60, seed=1)


@pytest.fixture(scope="module")
def fine_tuned(data):
    (X, y, _), _ = data
    return FineTuneClassifier(
        TINY, weights=None, epochs=8, lr=3e-3, batch_size=16,
        validation_fraction=None, augment=None, random_state=0, precision="fp32",
    ).fit(X, y)  # fmt: skip


def cam_pipeline(X, y, layer="stage1", final=None, model=TINY):
    steps = [
        CNNFeatureTransformer(model, weights=None, layer=layer, precision="fp32"),
        StandardScaler(),
        final if final is not None else LogisticRegression(max_iter=1000),
    ]
    return make_pipeline(*steps).fit(X, y)


# -- sanity checks -------------------------------------------------------------


def test_grad_cam_points_at_the_evidence(fine_tuned, data):
    _, (X, y, boxes) = data
    assert fine_tuned.score(X, y) >= 0.95
    maps = activation_maps(fine_tuned, X)
    assert maps.shape == (len(X), 32, 32) and maps.dtype == np.float32
    assert (maps >= 0).all()
    assert_points_at_patch(maps, boxes)
    # The check can fail: the same maps, mirrored, point elsewhere.
    with pytest.raises(AssertionError, match="pointing game"):
        assert_points_at_patch(maps[:, ::-1, ::-1], boxes)


def test_pipeline_cam_points_at_the_evidence(data):
    (X, y, _), (Xt, yt, boxes) = data
    pipe = cam_pipeline(X, y)
    assert pipe.score(Xt, yt) >= 0.95
    maps = activation_maps(pipe, Xt)
    assert maps.shape == (len(Xt), 32, 32)
    assert_points_at_patch(maps, boxes)
    with pytest.raises(AssertionError, match="pointing game"):
        assert_points_at_patch(np.roll(maps, 16, axis=(1, 2)), boxes)


def test_maps_change_when_the_weights_are_randomised(fine_tuned, data):
    _, (X, y, _) = data
    trained = activation_maps(fine_tuned, X, target=y)
    random = activation_maps(randomised(fine_tuned), X, target=y)
    assert_depends_on_weights(trained, random)
    # The check can fail: a "saliency map" that only reads the image (its
    # brightness, an edge detector in Adebayo et al.) ignores the weights.
    brightness = X.astype(float).mean(-1)
    with pytest.raises(AssertionError, match="rank correlation"):
        assert_depends_on_weights(brightness, brightness)


def test_pipeline_cam_changes_with_the_linear_model(data):
    """Randomising the top layer (the linear model) changes the CAM."""
    (X, y, _), (Xt, yt, _) = data
    pipe = cam_pipeline(X, y)
    trained = activation_maps(pipe, Xt, target=yt)
    rng = np.random.default_rng(0)
    final = pipe[-1]
    final.coef_ = rng.standard_normal(final.coef_.shape)
    assert_depends_on_weights(trained, activation_maps(pipe, Xt, target=yt))


# -- exactness -------------------------------------------------------------------


def hand_cam(pipe, X, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The CAM of class ``k`` written out in plain torch: a forward hook on the
    tapped layer, the coefficients over the scaler's scale. Returns the maps
    (clipped, upsampled) and the class score from the unclipped map."""
    cnn, scaler, model = pipe[0], pipe[1], pipe[2]
    pre = cnn.preprocessing_
    x = torch.tensor(X, dtype=torch.float32).permute(0, 3, 1, 2) / 255
    x = (x - torch.tensor(pre.mean).view(1, 3, 1, 1)) / torch.tensor(pre.std).view(
        1, 3, 1, 1
    )
    seen = {}
    net = cnn.model_
    handle = net.get_submodule(cnn.layer).register_forward_hook(
        lambda m, a, out: seen.setdefault("a", out.detach().clone())
    )
    with torch.no_grad():
        net(x)
    handle.remove()
    a = seen["a"].double()
    w = torch.tensor(model.coef_[k] / scaler.scale_)
    raw = (w.view(1, -1, 1, 1) * a).sum(1)
    shift = (model.coef_[k] * scaler.mean_ / scaler.scale_).sum()
    constant = model.intercept_[k] - shift
    score = raw.mean((1, 2)).numpy() + constant
    maps = F.interpolate(
        raw.clamp(min=0)[:, None], size=X.shape[1:3], mode="bilinear",
        align_corners=False,
    )[:, 0]  # fmt: skip
    return maps.numpy(), score


@pytest.mark.parametrize("k", [0, 2])
def test_pipeline_cam_equals_hand_computation(data, k):
    (X, y, _), (Xt, _, _) = data
    pipe = cam_pipeline(X, y)
    label = pipe.classes_[k]
    maps = activation_maps(pipe, Xt[:8], target=label)
    expected, score = hand_cam(pipe, Xt[:8], k)
    np.testing.assert_allclose(maps, expected, rtol=1e-4, atol=1e-5 * expected.max())
    # The unclipped map's mean plus the documented constant is the score.
    np.testing.assert_allclose(
        score, pipe.decision_function(Xt[:8])[:, k], rtol=1e-4, atol=1e-4
    )
    # Against the wrong class's hand computation, it fails.
    wrong, _ = hand_cam(pipe, Xt[:8], 1)
    assert not np.allclose(maps, wrong, rtol=1e-4, atol=1e-5 * expected.max())


def test_binary_and_regression_pipelines(data):
    (X, y, _), (Xt, _, boxes) = data
    binary = y != "blue"
    pipe = cam_pipeline(X[binary], y[binary])
    assert pipe[-1].coef_.shape[0] == 1
    red = activation_maps(pipe, Xt[:6], target="red", upsample=False)
    green = activation_maps(pipe, Xt[:6], target="green", upsample=False)
    # Two classes share one coefficient vector: each is the other's negation.
    raw = red - green  # relu(M) - relu(-M) = M
    np.testing.assert_allclose(np.maximum(raw, 0), red, atol=1e-6)
    np.testing.assert_allclose(np.maximum(-raw, 0), green, atol=1e-6)
    # A regressor with two outputs: one map per output index.
    targets = np.c_[y == "red", y == "green"].astype(float)
    reg = cam_pipeline(X, targets, final=Ridge())
    assert activation_maps(reg, Xt[:4], target=1).shape == (4, 32, 32)
    with pytest.raises(ValueError, match="target=<output index>"):
        activation_maps(reg, Xt[:4])


def test_scalers_and_search_are_unwrapped(data):
    (X, y, _), (Xt, yt, boxes) = data
    steps = [
        CNNFeatureTransformer(TINY, weights=None, layer="stage1", precision="fp32"),
        MinMaxScaler(),
        "passthrough",
        LogisticRegression(max_iter=1000),
    ]
    pipe = make_pipeline(*steps).fit(X, y)
    assert_points_at_patch(activation_maps(pipe, Xt), boxes)
    search = GridSearchCV(
        make_pipeline(*steps), {"logisticregression__C": [0.1, 1.0]}, cv=2
    ).fit(X, y)
    np.testing.assert_array_equal(
        activation_maps(search, Xt[:4]),
        activation_maps(search.best_estimator_, Xt[:4]),
    )


# -- networks and layouts --------------------------------------------------------


def test_vit_tokens(data):
    (X, y, _), (Xt, _, _) = data
    clf = FineTuneClassifier(
        TINY_VIT, weights=None, epochs=1, validation_fraction=None,
        random_state=0, precision="fp32",
    ).fit(X[:30], y[:30])  # fmt: skip
    maps = activation_maps(clf, Xt[:5])
    assert maps.shape == (5, 32, 32) and (maps >= 0).all()
    # The default layer is before the last attention: patch gradients are not zero.
    assert maps.max() > 0
    grid = activation_maps(clf, Xt[:5], upsample=False)
    assert grid.shape == (5, 4, 4)  # 16 patch tokens, the class token dropped
    # After the last attention, the patches reach the head only through the
    # class token: an explicit layer there gives zero maps.
    with pytest.warns(UserWarning, match="gradients at layer 'encoder.ln' are zero"):
        late = activation_maps(clf, Xt[:5], layer="encoder.ln")
    assert np.abs(late).max() == 0

    pipe = make_pipeline(
        CNNFeatureTransformer(
            TINY_VIT, weights=None, layer="encoder.layers.encoder_layer_0",
            random_state=0, precision="fp32",
        ),
        LogisticRegression(max_iter=1000),
    ).fit(X[:30], y[:30])  # fmt: skip
    assert activation_maps(pipe, Xt[:5]).shape == (5, 32, 32)
    # layer=None reads the class token: not an average of a map.
    cls_pipe = make_pipeline(
        CNNFeatureTransformer(TINY_VIT, weights=None, random_state=0),
        LogisticRegression(max_iter=1000),
    ).fit(X[:30], y[:30])
    with pytest.raises(ValueError, match="not the average of the map"):
        activation_maps(cls_pipe, Xt[:5])


class ChannelsLast(nn.Module):
    """A conv net with a channels-last stage (as Swin and ConvNeXt have)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.to_last = Permute([0, 2, 3, 1])
        self.norm = nn.LayerNorm(8)
        self.mix = nn.Linear(8, 8)
        self.to_first = Permute([0, 3, 1, 2])
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.to_first(self.mix(self.norm(self.to_last(self.conv(x)))))
        return self.fc(self.pool(x).flatten(1))


def test_channels_last_map_is_the_permuted_channels_first_one(data):
    (X, y, _), (Xt, _, _) = data
    last = cam_pipeline(X, y, layer="mix", model=ChannelsLast)  # (N, H, W, C)
    # The same values, permuted to (N, C, H, W):
    first = cam_pipeline(X, y, layer="to_first", model=ChannelsLast)
    assert last[0].layouts_ == ["NHWC"] and first[0].layouts_ == ["NCHW"]
    np.testing.assert_allclose(
        activation_maps(last, Xt[:4]), activation_maps(first, Xt[:4]), rtol=1e-4,
        atol=1e-6,
    )  # fmt: skip


def test_efficientnet_lite0_penultimate_is_its_pooled_head():
    """Lite0's layer=None vector is the average of its head's map (the input
    of ``_avg_pooling``): the CAM reads that map."""
    lite = pytest.importorskip("efficientnet_lite_pytorch")
    model = functools.partial(lite.EfficientNet.from_name, "efficientnet-lite0")
    X, y, _ = patch_images(12, size=64)
    pipe = make_pipeline(
        CNNFeatureTransformer(model, weights=None, random_state=0, precision="fp32"),
        LogisticRegression(max_iter=200),
    ).fit(X, y)
    maps = activation_maps(pipe, X[:3], upsample=False)
    assert maps.shape == (3, 2, 2)  # 64 px / 32
    assert activation_maps(pipe, X[:3]).shape == (3, 64, 64)


# -- errors ----------------------------------------------------------------------


def test_unfitted_estimators_are_refused(data):
    _, (X, _, _) = data
    with pytest.raises(NotFittedError):
        activation_maps(FineTuneClassifier(TINY, weights=None), X)
    with pytest.raises(NotFittedError):
        activation_maps(
            make_pipeline(CNNFeatureTransformer(TINY), LogisticRegression()), X
        )


def test_unsupported_pipelines_are_refused(data):
    (X, y, _), (Xt, _, _) = data
    cnn = CNNFeatureTransformer(TINY, weights=None, layer="stage1").fit(X)
    with pytest.raises(TypeError, match="Pipeline with a linear model"):
        activation_maps(cnn, Xt)
    with pytest.raises(TypeError, match="activation_maps takes"):
        activation_maps(LogisticRegression(), Xt)
    with pytest.raises(TypeError, match="not a linear model"):
        activation_maps(cam_pipeline(X, y, final=KNeighborsClassifier()), Xt)
    pca = make_pipeline(
        CNNFeatureTransformer(TINY, weights=None, layer="stage1"),
        PCA(4),
        LogisticRegression(),
    ).fit(X, y)
    with pytest.raises(TypeError, match="StandardScaler"):
        activation_maps(pca, Xt)
    maxpool = make_pipeline(
        CNNFeatureTransformer(TINY, weights=None, layer="stage1", pooling="max"),
        LogisticRegression(),
    ).fit(X, y)
    with pytest.raises(ValueError, match="pooling='avg'"):
        activation_maps(maxpool, Xt)
    pipe = cam_pipeline(X, y)
    with pytest.raises(ValueError, match="reads the layer its transformer pools"):
        activation_maps(pipe, Xt, layer="stage2")
    with pytest.raises(ValueError, match="not one of the classes"):
        activation_maps(pipe, Xt, target="purple")
    with pytest.raises(ValueError, match="2 entries for 60 images"):
        activation_maps(pipe, Xt, target=["red", "green"])


class Squashed(LogisticRegression):
    """Has coef_ but scores that are not linear in the features."""

    def decision_function(self, X):
        return np.tanh(super().decision_function(X))


def test_nonlinear_scores_are_refused_not_explained(data):
    (X, y, _), (Xt, _, _) = data
    with pytest.raises(TypeError, match="not coef_ @ features"):
        activation_maps(cam_pipeline(X, y, final=Squashed(max_iter=500)), Xt[:4])


def test_bad_layers_are_refused(fine_tuned, data):
    _, (X, _, _) = data
    with pytest.raises(ValueError, match="Unknown layer 'stage'. Close matches"):
        activation_maps(fine_tuned, X, layer="stage")
    with pytest.raises(ValueError, match="one position per image"):
        activation_maps(fine_tuned, X, layer="pool")
    with pytest.raises(ValueError, match="not one of the classes"):
        activation_maps(fine_tuned, X, target="purple")


def test_changed_parameters_are_refused(data):
    (X, y, _), (Xt, _, _) = data
    pipe = cam_pipeline(X, y)
    pipe[0].set_params(layer="stage2")
    with pytest.raises(NotFittedError, match="changed after fit"):
        activation_maps(pipe, Xt)


# -- display ---------------------------------------------------------------------


def test_display_from_estimator(fine_tuned, data):
    import matplotlib.pyplot as plt

    _, (X, y, _) = data
    disp = ActivationMapDisplay.from_estimator(fine_tuned, X[:5], alpha=0.4)
    assert disp.ax_.shape == (5,)
    assert disp.figure_ is disp.ax_[0].figure
    assert len(disp.overlays_) == 5
    assert disp.maps.shape == (5, 32, 32)
    assert disp.images.shape == (5, 32, 32, 3)
    assert disp.images.min() >= 0 and disp.images.max() <= 1
    # The images shown are the inputs as the network saw them.
    np.testing.assert_allclose(disp.images, X[:5] / 255, atol=1e-5)
    assert [a.get_title() for a in disp.ax_] == list(fine_tuned.predict(X[:5]))
    fig, axes = plt.subplots(1, 2)
    disp = ActivationMapDisplay.from_estimator(fine_tuned, X[:2], ax=axes, target="red")
    assert disp.figure_ is fig and [a.get_title() for a in disp.ax_] == ["red"] * 2
    with pytest.raises(ValueError, match="2 axes"):
        ActivationMapDisplay.from_estimator(fine_tuned, X[:3], ax=axes)
    plt.close("all")


def test_scaler_flags_are_read_not_its_attributes(data):
    """StandardScaler(with_mean=False) computes mean_ but does not subtract it."""
    (X, y, _), (Xt, _, boxes) = data
    pipe = make_pipeline(
        CNNFeatureTransformer(TINY, weights=None, layer="stage1", precision="fp32"),
        StandardScaler(with_mean=False),
        LogisticRegression(max_iter=1000),
    ).fit(X, y)
    assert pipe[1].mean_ is not None
    assert_points_at_patch(activation_maps(pipe, Xt), boxes)


def test_images_of_several_sizes(fine_tuned, data):
    _, (X, _, _) = data
    images = [X[0], np.pad(X[1], ((4, 4), (4, 4), (0, 0)))]
    with pytest.raises(ValueError, match="differ in size after preprocessing"):
        activation_maps(fine_tuned, images, batch_size=1)


def test_grad_cam_beside_predictions_in_other_threads(data):
    """Grad-CAM's hook acts only in its own thread: predictions made at the
    same time on the same network (a ViT has no BatchNorm to fold, so
    prediction runs on the fitted module itself) are unchanged, and so are
    the maps."""
    from tiny_cnn import in_threads

    (X, y, _), (Xt, _, _) = data
    clf = FineTuneClassifier(
        TINY_VIT, weights=None, epochs=1, validation_fraction=None,
        random_state=0, precision="fp32",
    ).fit(X[:30], y[:30])  # fmt: skip
    maps = activation_maps(clf, Xt[:16])
    proba = clf.predict_proba(Xt[:16])

    def work(i):
        if i % 2:
            return activation_maps(clf, Xt[:16], batch_size=2)
        return clf.predict_proba(Xt[:16])

    for i, results in enumerate(in_threads(work, n=4, repeat=4)):
        for r in results:
            np.testing.assert_allclose(r, maps if i % 2 else proba, rtol=1e-5)


def test_display_of_a_pipeline_on_one_axes(data):
    import matplotlib.pyplot as plt

    (X, y, _), (Xt, yt, _) = data
    pipe = cam_pipeline(X, y)
    fig, ax = plt.subplots()
    disp = ActivationMapDisplay.from_estimator(pipe, Xt[:1], ax=ax, cmap="magma")
    assert disp.ax_[0] is ax and disp.figure_ is fig
    assert disp.ax_[0].get_title() == pipe.predict(Xt[:1])[0]
    np.testing.assert_allclose(disp.maps, activation_maps(pipe, Xt[:1]))
    with pytest.raises(ValueError, match="must be"):
        ActivationMapDisplay(disp.maps, disp.images[:, :8]).plot()
    plt.close("all")


def test_images_of_other_than_three_channels_are_shown_grey():
    from types import SimpleNamespace

    from sklearn_cnn._cam import Network, unnormalize

    pre = SimpleNamespace(mean=(0.5,) * 5, std=(0.25,) * 5)
    net = Network(None, pre, torch.device("cpu"), None)
    batch = torch.randn(2, 5, 4, 6)
    shown = unnormalize(net, batch)
    assert shown.shape == (2, 4, 6, 3)
    assert shown.min() == 0 and shown.max() == 1  # stretched per image
    np.testing.assert_array_equal(shown[..., 0], shown[..., 2])
    rgb = SimpleNamespace(mean=(0.5,) * 3, std=(0.25,) * 3)
    x = torch.zeros(1, 3, 2, 2)
    np.testing.assert_allclose(unnormalize(Network(None, rgb, None, None), x), 0.5)


def test_timm_vit_with_register_tokens(data):
    """timm's attention has sublayers of its own (``attn.proj``) that end
    before it: the default layer is the last block's input norm, and the
    class and register tokens are dropped from the grid."""
    vision_transformer = pytest.importorskip("timm.models.vision_transformer")
    model = functools.partial(
        vision_transformer.VisionTransformer,
        img_size=32, patch_size=8, embed_dim=16, depth=2, num_heads=2,
        num_classes=3, reg_tokens=2,
    )  # fmt: skip
    (X, y, _), (Xt, _, _) = data
    clf = FineTuneClassifier(
        model, weights=None, epochs=1, validation_fraction=None,
        random_state=0, precision="fp32",
    ).fit(X[:30], y[:30])  # fmt: skip
    assert clf.trace_.prefix_tokens == 3
    maps = activation_maps(clf, Xt[:4], upsample=False)
    assert maps.shape == (4, 4, 4) and maps.max() > 0
    with pytest.warns(UserWarning, match="are zero at every position"):
        activation_maps(clf, Xt[:4], layer="blocks.1.attn.proj")


def test_frozen_transformer_step(data):
    from sklearn.frozen import FrozenEstimator

    (X, y, _), (Xt, _, _) = data
    cnn = CNNFeatureTransformer(TINY, weights=None, layer="stage1", precision="fp32")
    frozen = make_pipeline(
        FrozenEstimator(cnn.fit(X)), StandardScaler(), LogisticRegression()
    ).fit(X, y)
    plain = make_pipeline(cnn, frozen[1], frozen[2])
    np.testing.assert_allclose(
        activation_maps(frozen, Xt[:4]), activation_maps(plain, Xt[:4]), rtol=1e-6
    )
