"""The order of the gallery's examples: a course, not the alphabet.

From CNN codes to fine-tuning, then what the network sees. A module of its
own, imported by name from ``conf.py``, because Sphinx pickles its
configuration and a function defined in ``conf.py`` does not pickle.
"""

from __future__ import annotations

EXAMPLES = [
    "plot_transfer_learning.py",
    "plot_which_layer.py",
    "plot_freeze.py",
    "plot_four_regimes.py",
    "plot_finetune_vs_scratch.py",
    "plot_regression_counting.py",
    "plot_multilabel_mosaics.py",
    "plot_multiband.py",
    "plot_similar_images.py",
    "plot_column_transformer.py",
    "plot_feature_maps.py",
    "plot_any_input_size.py",
    "plot_class_visualisation.py",
    "plot_activation_maps.py",
]


class ExampleOrder:
    """Sort key for ``within_subsection_order``; unlisted files come last."""

    def __init__(self, src_dir: str) -> None:
        self.src_dir = src_dir

    def __call__(self, filename: str) -> tuple[int, str]:
        rank = EXAMPLES.index(filename) if filename in EXAMPLES else len(EXAMPLES)
        return rank, filename

    def __repr__(self) -> str:
        return "<ExampleOrder>"
