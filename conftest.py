"""Doctests write into a temporary folder that is removed after each one.

The docstrings' examples call ``tempfile.mkdtemp()`` as a reader would; under
pytest those folders (a saved network weighs tens of megabytes) go into one
``TemporaryDirectory`` per doctest instead of piling up in the system's
temporary directory.
"""

from __future__ import annotations

import tempfile

import pytest
from _pytest.doctest import DoctestItem


@pytest.fixture(autouse=True)
def _doctest_temporary_folder(request, monkeypatch):
    if not isinstance(request.node, DoctestItem):
        yield
        return
    with tempfile.TemporaryDirectory(prefix="sklearn_cnn_doctest_") as folder:
        monkeypatch.setattr(tempfile, "tempdir", folder)
        yield
        monkeypatch.undo()  # before the folder goes


#: Doctests that start processes (DDP, a Dask cluster) or fine-tune a network:
#: marked ``slow`` like the tests of the same kind, so ``-m "not slow"`` leaves
#: them out.
SLOW_DOCTESTS = (
    "sklearn_cnn._distributed.fit_ddp",
    "sklearn_cnn.dask.",
    "sklearn_cnn._finetune.FineTuneClassifier",
    "sklearn_cnn._regressor.FineTuneRegressor",
)


@pytest.hookimpl(tryfirst=True)  # before ``-m`` deselects by marker
def pytest_collection_modifyitems(items):
    for item in items:
        if isinstance(item, DoctestItem) and item.name.startswith(SLOW_DOCTESTS):
            item.add_marker(pytest.mark.slow)
