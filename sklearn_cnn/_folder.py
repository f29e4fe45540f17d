"""load_image_folder: an ImageNet-style folder tree as (paths, labels)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

#: File suffixes PIL can open, lower case ("".jpg", ".png", ...).
IMAGE_SUFFIXES = frozenset(
    ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN
)


def load_image_folder(path: str | os.PathLike) -> tuple[list[str], np.ndarray]:
    """Image paths and labels from a folder with one subfolder per class.

    The layout of torchvision's ``ImageFolder``: ``path/<class>/<image>``.
    Only the paths are listed, nothing is decoded: the estimators read the
    files batch by batch, and sklearn can split and index the lists.

    Parameters
    ----------
    path : str or path-like
        The root folder.

    Returns
    -------
    paths : list of str
        Image files, sorted by class and then by name.
    labels : ndarray of str
        The class (subfolder name) of each file.

    Examples
    --------
    >>> import tempfile, pathlib
    >>> from PIL import Image
    >>> root = pathlib.Path(tempfile.mkdtemp())
    >>> for cls in ["cat", "dog"]:
    ...     (root / cls).mkdir()
    ...     Image.new("RGB", (8, 8)).save(root / cls / "a.png")
    >>> paths, labels = load_image_folder(root)
    >>> labels.tolist()
    ['cat', 'dog']
    """
    root = Path(path)
    if not root.is_dir():
        raise ValueError(f"{os.fspath(path)!r} is not a folder.")
    paths: list[str] = []
    labels: list[str] = []
    for class_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        for file in sorted(class_dir.rglob("*")):
            if file.is_file() and file.suffix.lower() in IMAGE_SUFFIXES:
                paths.append(os.fspath(file))
                labels.append(class_dir.name)
    if not paths:
        raise ValueError(
            f"No image files found under {os.fspath(path)!r}: expected one "
            "subfolder per class holding images (path/<class>/<image>)."
        )
    return paths, np.asarray(labels)
