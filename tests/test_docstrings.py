"""The public methods' docstrings describe images, not a table.

Methods inherited from scikit-learn describe ``X`` as an array of shape
(n_samples, n_features) and refer to pages of scikit-learn's own gallery; the
estimators restate the ones whose text would mislead.
"""

from __future__ import annotations

import inspect

from sklearn_cnn import CNNFeatureTransformer, FineTuneClassifier

TABLE = "(n_samples, n_features)"


def _public_methods(cls: type) -> dict[str, str]:
    return {
        name: inspect.getdoc(member) or ""
        for name, member in inspect.getmembers(cls, callable)
        if not name.startswith("_") and not inspect.isclass(member)
    }


def test_feature_transformer_docstrings_speak_of_images():
    for name, doc in _public_methods(CNNFeatureTransformer).items():
        parameters = doc.split("Returns")[0]
        assert TABLE not in parameters, f"{name}: X described as a table"
        assert "sphx_glr" not in doc, f"{name}: refers to scikit-learn's gallery"


def test_finetune_classifier_score_speaks_of_images():
    doc = inspect.getdoc(FineTuneClassifier.score) or ""
    assert TABLE not in doc.split("Returns")[0]
