"""Edge cases with a wrong or unhelpful result to avoid: the temperature of a
probe head that wins, warm starts after a network parameter changed, a
forward pass cut short at the last tap, one check of ``image_size``, and
weights files that hold something other than tensors."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from numpy.testing import assert_allclose
from scipy.special import softmax
from sklearn.utils import check_random_state
from tiny_cnn import colour_images, make_tiny_cnn
from torch import nn

from sklearn_cnn import CNNFeatureTransformer, FineTuneClassifier, list_layers
from sklearn_cnn._head import expected_calibration_error, fit_temperature
from sklearn_cnn._layers import Tap, Tapper
from sklearn_cnn._targets import validation_split
from sklearn_cnn._tasks import SingleLabel, cross_validated_logits

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FAST = dict(
    batch_size=16, random_state=0, validation_fraction=0.33, precision="fp32",
    device="cpu", augment=None,
)  # fmt: skip


@pytest.fixture
def noisy_labels():
    """60 colour images with a fifth of the labels swapped: no head is sure."""
    X, y = colour_images(20)
    rng = np.random.default_rng(1)
    swap = rng.choice(len(y), len(y) // 5, replace=False)
    y[swap] = rng.permutation(y[swap])
    return X, y


# --- calibrate: the temperature belongs to the head that predicts --------------


def test_a_winning_probe_head_is_refitted_and_its_temperature_cross_validated(
    tiny_builder, noisy_labels
):
    X, y = noisy_labels
    clf = FineTuneClassifier(tiny_builder, epochs=0, **FAST).fit(X, y)
    plain = FineTuneClassifier(tiny_builder, epochs=0, calibrate=False, **FAST)
    plain.fit(X, y)
    assert clf.best_epoch_ == 0 and clf.temperature_ != 1.0
    assert plain.temperature_ == 1.0 and np.isnan(plain.calibration_["after"])
    # The same head as the uncalibrated fit's, refitted on every image ...
    assert_allclose(
        clf.decision_function(X) * clf.temperature_,
        plain.decision_function(X),
        rtol=1e-5,
        atol=1e-5,
    )
    # ... and a temperature fitted on the logits of probes that did not see
    # the image: the probe's procedure on the fit's images, in 3 folds.
    classes, y_enc = np.unique(y, return_inverse=True)
    seed = int(check_random_state(0).randint(2**31 - 1))
    train, val = validation_split(y_enc, len(classes), 0.33, seed)
    rows = np.r_[train, val]
    features = CNNFeatureTransformer(
        tiny_builder, layer=None, precision="fp32", device="cpu"
    ).fit_transform(X[rows])
    task = SingleLabel(None, 0.0, classes)
    z = cross_validated_logits(task, features, y_enc[rows], None, seed)
    assert fit_temperature(z, y_enc[rows]) == pytest.approx(clf.temperature_, rel=1e-3)
    before = expected_calibration_error(softmax(z, axis=1), y_enc[rows])
    assert clf.calibration_["before"] == pytest.approx(before, abs=1e-3)


# --- warm_start after set_params ------------------------------------------------


def test_warm_start_refuses_a_changed_network_parameter(tiny_builder, noisy_labels):
    X, y = noisy_labels
    clf = FineTuneClassifier(tiny_builder, epochs=1, warm_start=True, **FAST)
    clf.fit(X, y)
    clf.set_params(image_size=20)
    with pytest.raises(ValueError, match=r"image_size=20 .*warm_start=False"):
        clf.fit(X, y)
    assert clf.n_iter_ == 1  # untouched
    clf.set_params(image_size=None).fit(X, y)  # set back: training goes on
    assert clf.n_iter_ == 2
    clf.set_params(image_size=20, warm_start=False).fit(X, y)  # or start over
    assert clf.n_iter_ == 1 and clf.predict(X).shape == (len(X),)


# --- a truncated forward leaves the module as a full forward would -------------


def test_tapper_in_training_mode_updates_every_batchnorm(images):
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    model = make_tiny_cnn().train()
    plain = copy.deepcopy(model)
    with Tapper(model, [Tap("stem")]) as tapper:
        (stem,) = tapper(x)
    plain(x)
    pairs = zip(model.state_dict().items(), plain.state_dict().values(), strict=True)
    for (name, a), b in pairs:
        assert torch.equal(a, b), name  # stage2's statistics too, not only stem's
    with torch.no_grad():
        assert torch.equal(stem, plain.stem(x))


class CountingBlock(nn.Module):
    """Counts its calls before and after its inner layer runs."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Conv2d(3, 4, 3)
        self.entered = self.left = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.entered += 1
        y = self.inner(x)
        self.left += 1
        return y


def test_tapper_in_eval_mode_ends_the_forward_at_the_last_tap(images):
    """The documented limit: in eval mode what follows the last tap does not
    run, inside a forward of one's own too."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    block = CountingBlock().eval()
    with torch.no_grad(), Tapper(block, [Tap("inner")]) as tapper:
        tapper(x)
    assert (block.entered, block.left) == (1, 0)
    block.train()
    with torch.no_grad(), Tapper(block, [Tap("inner")]) as tapper:
        tapper(x)
    assert (block.entered, block.left) == (2, 1)


# --- image_size: one check -----------------------------------------------------


@pytest.mark.parametrize("size", [(16,), [16], (16, 16, 16), (0, 16), (True, 16)])
def test_image_size_is_checked_alike_everywhere(tiny_builder, images, size):
    with pytest.raises(ValueError, match="image_size must be"):
        CNNFeatureTransformer(tiny_builder, image_size=size).fit(images)
    with pytest.raises(ValueError, match="image_size must be"):
        list_layers(make_tiny_cnn(), image_size=size)


def test_image_size_pairs_and_ints_are_accepted_alike(tiny_builder, images):
    for size in (16, (16, 16), [16, 16], np.int64(16)):
        assert list_layers(make_tiny_cnn(), image_size=size)[0].output_shape[1:] == (
            16,
            16,
        )
        CNNFeatureTransformer(tiny_builder, image_size=size).fit(images)


# --- weights file: a value that is no tensor -------------------------------------


def test_weights_file_with_a_non_tensor_value_names_the_key(
    tmp_path, tiny_builder, images
):
    state = make_tiny_cnn().state_dict()
    state["fc.bias"] = state["fc.bias"].tolist()
    path = tmp_path / "weights.pt"
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"'fc.bias' \(list\).*torch.save"):
        CNNFeatureTransformer(tiny_builder, weights=path).fit(images)
