"""sklearn_cnn.distributed.fit_ddp: DistributedDataParallel on 2 CPU processes
(gloo over 127.0.0.1)."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from tiny_cnn import make_tiny_cnn
from torch import nn

from sklearn_cnn import FineTuneClassifier
from sklearn_cnn._distributed import _regroup, _shard
from sklearn_cnn.distributed import fit_ddp

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available(), reason="torch.distributed is not built"
)


def test_shard_splits_each_global_batch():
    order = list(np.random.default_rng(0).permutation(23))
    parts = [_shard(order, 8, rank, 2, drop_last=False) for rank in range(2)]
    # The global batches of one device: 8, 8 and 7 images.
    for i, start in enumerate(range(0, 23, 8)):
        batch = order[start : start + 8]
        both = parts[0][i] + parts[1][i]
        assert sorted(both) == sorted(batch)  # each image once, in its batch
        assert not set(parts[0][i]) & set(parts[1][i])
    assert [len(p) for p in parts[0]] == [4, 4, 4]
    assert [len(p) for p in parts[1]] == [4, 4, 3]
    # drop_last drops the short global batch; one smaller than the world is
    # skipped by every process.
    assert len(_shard(order, 8, 0, 2, drop_last=True)) == 2
    assert _shard([5, 6, 7], 2, 1, 2, drop_last=False) == [[6]]
    assert _shard([5, 6, 7], 2, 0, 2, drop_last=False) == [[5]]


def test_regroup_keeps_order_and_sizes():
    x = torch.arange(10)
    stream = iter([(x[0:4], -x[0:4]), (x[4:8], -x[4:8]), (x[8:10], -x[8:10])])
    out = list(_regroup(stream, [4, 3, 3]))
    assert [len(a) for a, _ in out] == [4, 3, 3]
    assert torch.equal(torch.cat([a for a, _ in out]), x)
    assert torch.equal(torch.cat([b for _, b in out]), -x)


def digits(n_train: int, n_test: int):
    """sklearn's 8 x 8 digits upscaled to 16 x 16 uint8 images."""
    data = load_digits()
    images = (data.images * (255 / 16)).astype(np.uint8)
    images = images.repeat(2, axis=1).repeat(2, axis=2)
    y = data.target
    return (
        images[:n_train],
        y[:n_train],
        images[n_train : n_train + n_test],
        y[n_train : n_train + n_test],
    )


@pytest.mark.slow  # two processes
def test_ddp_on_two_processes_trains_like_one(one_torch_thread):
    # 256 training and 64 validation digits, global batches of 32: each
    # process gets 16 images of each step, and the averaged gradient is the
    # one-device gradient, so both fits end with the same network.
    X, y, X_test, y_test = digits(320, 200)
    params = dict(
        model=functools.partial(make_tiny_cnn, 0),
        weights=None,
        image_size=16,
        epochs=3,
        batch_size=32,
        lr=3e-3,
        augment=None,
        validation_fraction=0.2,
        device="cpu",
        precision="fp32",
        random_state=0,
    )
    one = FineTuneClassifier(**params).fit(X, y)
    clf = FineTuneClassifier(**params)
    assert fit_ddp(clf, X, y, n_devices=2) is clf
    np.testing.assert_allclose(
        clf.predict_proba(X_test), one.predict_proba(X_test), atol=1e-4
    )
    accuracy = clf.score(X_test, y_test)
    assert accuracy == pytest.approx(one.score(X_test, y_test), abs=0.01)
    # It learned (chance is 0.1).
    assert accuracy > 0.4
    assert clf.get_params() == FineTuneClassifier(**params).get_params()
    assert [h["epoch"] for h in clf.history_] == [h["epoch"] for h in one.history_]
    # batchnorm="frozen": the pretrained statistics did not move.
    fresh = make_tiny_cnn(0)
    for name, module in clf.model_.named_modules():
        if isinstance(module, nn.BatchNorm2d):
            ref = fresh.get_submodule(name)
            assert torch.equal(module.running_mean, ref.running_mean), name
            assert torch.equal(module.running_var, ref.running_var), name


def test_bad_arguments():
    clf = FineTuneClassifier(weights=None, batch_size=1)
    X = np.zeros((4, 16, 16, 3), np.uint8)
    y = [0, 1, 0, 1]
    with pytest.raises(ValueError, match="n_devices"):
        fit_ddp(clf, X, y, n_devices=0)
    with pytest.raises(ValueError, match="batch_size=1 is smaller than n_devices"):
        fit_ddp(clf, X, y, n_devices=2)
    with pytest.raises(TypeError, match="FineTuneClassifier"):
        fit_ddp(LogisticRegression(), X, y)
    assert not hasattr(clf, "model_")
