"""load_image_folder: an ImageNet-style folder tree as (paths, labels)."""

from __future__ import annotations

import os
import stat
import sys
import warnings
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image, ImageFile
from torchvision.datasets.folder import make_dataset

from ._images import image_to_tensor
from ._runtime import available_cpus

#: Photo formats that PIL reads only with a plugin (pillow-heif, rawpy...):
#: skipping them is worth a warning.
PLUGIN_PHOTO_SUFFIXES = frozenset(
    {".heic", ".heif", ".avif", ".jxl", ".dng", ".cr2", ".cr3", ".nef", ".arw"}
    | {".orf", ".raf", ".rw2"}
)


def image_suffixes() -> frozenset[str]:
    """File suffixes PIL can decode, lower case, read at each call (a plugin
    registered later counts); stub formats and MPEG decode no pixels."""

    def decodes(fmt: str) -> bool:
        factory = Image.OPEN[fmt][0]
        stub = isinstance(factory, type) and issubclass(
            factory, ImageFile.StubImageFile
        )
        return not stub and fmt != "MPEG"

    return frozenset(
        ext
        for ext, fmt in Image.registered_extensions().items()
        if fmt in Image.OPEN and decodes(fmt)
    )


#: Folders that tools leave next to the images: macOS archives (``__MACOSX``,
#: holding ``._*`` AppleDouble files), Python, Synology and Windows. Hidden
#: entries (``.ipynb_checkpoints``, ``.DS_Store``, ``._*``) are skipped anyway.
JUNK_FOLDERS = frozenset(
    {"__MACOSX", "__pycache__", "@eaDir", "$RECYCLE.BIN", "System Volume Information"}
)

#: How many skipped entries of each kind ``verbose=1`` names.
_SHOWN = 5


def _junk(name: str) -> str | None:
    """Why a file or folder name is skipped, or None."""
    if name.startswith("."):
        return "hidden"
    if name in JUNK_FOLDERS:
        return "junk folder"
    return None


class _Skipped:
    """The entries left out, by reason, for ``verbose``."""

    def __init__(self, root: str) -> None:
        self.root = root
        self.by_reason: dict[str, list[str]] = defaultdict(list)

    def add(self, reason: str, path: str) -> None:
        self.by_reason[reason].append(os.path.relpath(path, self.root))

    def report(self, n_images: int, n_classes: int, verbose: int) -> None:
        total = sum(len(v) for v in self.by_reason.values())
        lines = [
            f"load_image_folder: {n_images} images in {n_classes} classes under "
            f"{self.root!r}; skipped {total} entries."
        ]
        for reason, paths in sorted(self.by_reason.items()):
            shown = paths if verbose > 1 else paths[:_SHOWN]
            more = (
                f", ... ({len(paths) - len(shown)} more)"
                if len(shown) < len(paths)
                else ""
            )
            lines.append(f"  {reason} ({len(paths)}): {', '.join(shown)}{more}")
        print("\n".join(lines), file=sys.stderr, flush=True)


def _unreadable(paths: list[str], root: str) -> dict[str, str]:
    """The files among ``paths`` that do not decode as the estimators decode
    them, with the reason (on a few threads: PIL releases the GIL)."""

    def problem(path: str) -> str | None:
        try:
            image_to_tensor(path, 0)
        except ValueError as exc:
            return str(exc).replace(f"X[0] ({path!r})", os.path.relpath(path, root))
        return None

    with ThreadPoolExecutor(max_workers=min(8, available_cpus())) as pool:
        problems = list(pool.map(problem, paths))
    return {p: why for p, why in zip(paths, problems, strict=True) if why}


def load_image_folder(
    path: str | os.PathLike, *, verify: bool = False, verbose: int = 0
) -> tuple[list[str], np.ndarray]:
    """Image paths and labels from a folder with one subfolder per class.

    The layout of torchvision's ``ImageFolder``: ``path/<class>/<image>``,
    images possibly in nested folders below their class folder. Only the paths
    are listed, nothing is decoded.

    What archives, notebooks and file managers leave behind is skipped: hidden
    files and folders (``.DS_Store``, ``.ipynb_checkpoints``, ``._*``),
    ``__MACOSX`` and similar junk folders, files whose suffix is not an image
    format PIL reads, anything that is not a regular file and files lying
    directly in ``path``. A class folder with no image left is dropped with a
    warning. A corrupt file fails the batch that reads it, possibly hours into
    a run, unless ``verify=True`` finds it first.

    Parameters
    ----------
    path : str or path-like
        The root folder.
    verify : bool, default=False
        Decode every image and leave out the unreadable ones (truncated,
        corrupt, not an image despite the suffix, too large to decode safely).
        Costs one full decode per file.
    verbose : int, default=0
        ``1``: print (to stderr) how many entries were skipped and why, naming
        a few of each kind; ``2``: name all of them.

    Returns
    -------
    paths : list of str
        Image files, sorted by class and then by folder and name.
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
    >>> (root / "cat" / "notes.txt").write_text("not an image")
    12
    >>> (root / ".ipynb_checkpoints").mkdir()
    >>> paths, labels = load_image_folder(root)
    >>> labels.tolist()
    ['cat', 'dog']

    A broken file is found before any training with ``verify=True``:

    >>> (root / "dog" / "b.jpg").write_bytes(b"not a JPEG")
    10
    >>> import warnings
    >>> with warnings.catch_warnings(record=True) as caught:
    ...     warnings.simplefilter("always")
    ...     paths, labels = load_image_folder(root, verify=True)
    >>> len(paths), "dog/b.jpg" in str(caught[0].message)
    (2, True)
    """
    root = os.fspath(path)
    if not os.path.isdir(root):
        raise ValueError(f"{root!r} is not a folder.")
    skipped = _Skipped(root)
    suffixes = image_suffixes()
    classes = []
    with os.scandir(root) as entries:
        for entry in entries:
            reason = _junk(entry.name)
            if reason is None and not entry.is_dir():
                reason = "not in a class folder"
            if reason is None:
                classes.append(entry.name)
            else:
                skipped.add(reason, entry.path)
    classes.sort()

    def is_image(file: str) -> bool:
        parts = os.path.relpath(file, root).split(os.sep)
        reason = next(filter(None, map(_junk, parts)), None)
        if reason is None and os.path.splitext(file)[1].lower() not in suffixes:
            reason = "not an image"
        if reason is None:
            try:
                regular = stat.S_ISREG(os.stat(file).st_mode)
            except OSError:  # a broken link
                regular = False
            reason = None if regular else "not a regular file"
        if reason is not None:
            skipped.add(reason, file)
        return reason is None

    samples = (
        make_dataset(
            root,
            {c: i for i, c in enumerate(classes)},
            is_valid_file=is_image,
            allow_empty=True,
        )
        if classes
        else []
    )
    if verify and samples:
        bad = _unreadable([file for file, _ in samples], root)
        for file in bad:
            skipped.add("unreadable", file)
        if bad:
            shown = list(bad.values())[:3]
            more = (
                f"\n  ... and {len(bad) - 3} more (verbose=2 lists them all)"
                if len(bad) > 3
                else ""
            )
            warnings.warn(
                f"{len(bad)} of {len(samples)} image files under {root!r} do not "
                "decode and are left out:\n  " + "\n  ".join(shown) + more,
                UserWarning,
                stacklevel=2,
            )
        samples = [(file, i) for file, i in samples if file not in bad]
    found = {classes[i] for _, i in samples}
    empty = [c for c in classes if c not in found]
    for cls in empty:
        skipped.add("class folder with no image", os.path.join(root, cls))
    if not samples:
        if skipped.by_reason.get("unreadable"):
            raise ValueError(
                f"None of the image files under {root!r} decode (see the warning "
                "above): they are truncated, corrupt or not images."
            )
        raise ValueError(
            f"No image files found under {root!r}: expected one subfolder per "
            "class holding images (path/<class>/<image>)."
        )
    if empty:
        warnings.warn(
            f"The class folders {empty} under {root!r} hold no image files and "
            "are left out; pass verbose=1 to see what was skipped.",
            UserWarning,
            stacklevel=2,
        )
    unread = sorted(
        {
            os.path.splitext(f)[1].lower()
            for f in skipped.by_reason.get("not an image", [])
        }
        & PLUGIN_PHOTO_SUFFIXES
    )
    if unread:
        warnings.warn(
            f"Photos in formats PIL cannot read here ({', '.join(unread)}) under "
            f"{root!r} are left out: install and register the PIL plugin for "
            "them (pillow-heif for HEIC) or convert them to JPEG or PNG.",
            UserWarning,
            stacklevel=2,
        )
    if verbose:
        skipped.report(len(samples), len(found), verbose)
    paths = [file for file, _ in samples]
    labels = np.asarray([classes[i] for _, i in samples])
    return paths, labels
