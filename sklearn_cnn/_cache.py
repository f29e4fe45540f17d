"""A disk cache of per-image activations: what ``memory=`` stores.

Layout: ``<location>/sklearn_cnn/<key>/<random name>.shard``. A *key* names
everything but the image and the layer that decides an activation (network
code and weights, preprocessing, pooling, precision, device); an *entry* is
one image's array for one layer, found by a digest of its pixels. A shard
holds one batch of images with every layer filled for them.

Safety: a shard is written to a temporary file and moved into place with
``os.replace`` (atomic), so readers never see part of one and processes may
write at once; every part of it carries a BLAKE2b checksum, verified on every
read (a shard that fails is deleted with a warning, its images computed
again); and it records its key, which a reader checks.

:class:`ActivationCache` is the storage, for any per-image arrays; the rest
of this module is what :class:`~sklearn_cnn.CNNFeatureTransformer` keys and
stores with it, and the key of what fine-tuning stores (see ``_sources``).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import inspect
import itertools
import json
import os
import shutil
import struct
import tempfile
import uuid
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from blake3 import blake3
from torch import nn

from ._image_array import ImageArray
from ._images import (
    ArrayLikeImages,
    array_batches,
    fitted_preprocessing,
    image_to_tensor,
)
from ._layers import Tap, Trace
from ._network import Network
from ._version import __version__

#: The directory inside ``memory``'s location that this library owns.
CACHE_DIRNAME = "sklearn_cnn"
#: Bumped whenever what an entry holds for a key changes meaning.
FORMAT = 3
#: A shard holds at most this many bytes of arrays; more images make more shards.
MAX_SHARD_BYTES = 256 * 2**20

_MAGIC = b"SKCNNSH1"
_DIGEST = 16  # bytes of an image digest
_CHECK = 32  # bytes of a block checksum
_SUFFIX = ".shard"
_TMP_PREFIX = ".tmp-"


# -- where the cache lives -------------------------------------------------------


def cache_directory(memory: Any) -> str | None:
    """The directory this library caches in for ``memory``, or None.

    ``memory`` is what ``memory=`` accepts: None, a directory path, or a
    ``joblib.Memory`` (its ``location``; a Memory without one caches nothing).
    """
    if memory is None:
        return None
    if isinstance(memory, (str, os.PathLike)):
        location = memory
    elif hasattr(memory, "cache"):  # joblib.Memory, as sklearn's check_memory
        location = getattr(memory, "location", None)
        if location is None:
            return None
    else:
        raise TypeError(
            f"memory must be None, a directory path or a joblib.Memory; got "
            f"{type(memory).__name__}."
        )
    return os.path.join(os.path.expanduser(os.fspath(location)), CACHE_DIRNAME)


def cache_size(memory: str | os.PathLike | Any) -> int:
    """Bytes on disk taken by the activations cached in ``memory``.

    Parameters
    ----------
    memory : str, path or joblib.Memory
        What was passed as ``memory=`` to :class:`CNNFeatureTransformer`.

    Returns
    -------
    size : int
        Total size in bytes of the files under ``<location>/sklearn_cnn``; 0
        when nothing is cached there. Delete that directory, or call
        :func:`clear_cache`, to free the space.

    Examples
    --------
    >>> import tempfile
    >>> from sklearn_cnn import cache_size
    >>> cache_size(tempfile.mkdtemp())
    0
    """
    directory = cache_directory(memory)
    total = 0
    if directory is None:
        return 0
    for root, _dirs, files in os.walk(directory):
        for name in files:
            # A file deleted meanwhile by another process counts for nothing.
            with contextlib.suppress(FileNotFoundError):
                total += os.stat(os.path.join(root, name)).st_size
    return total


def clear_cache(memory: str | os.PathLike | Any) -> None:
    """Delete every activation cached in ``memory``.

    Only ``<location>/sklearn_cnn`` is removed: joblib's own cache in the same
    location (``Pipeline(memory=)``) is left alone. Safe to call while nothing
    is fitting; a transform running meanwhile computes what it cannot read.

    Parameters
    ----------
    memory : str, path or joblib.Memory
        What was passed as ``memory=``.

    Examples
    --------
    >>> import tempfile
    >>> from sklearn_cnn import cache_size, clear_cache
    >>> location = tempfile.mkdtemp()
    >>> clear_cache(location)
    >>> cache_size(location)
    0
    """
    directory = cache_directory(memory)
    if directory is not None and os.path.isdir(directory):
        shutil.rmtree(directory, ignore_errors=True)


# -- keys and digests ------------------------------------------------------------


def _tensor_bytes(t: torch.Tensor) -> np.ndarray:
    """The values of ``t`` in logical order, on the CPU (the memory format does
    not change the digest); NumPy copies, as torch's small ops wait for threads."""
    t = t.detach().cpu()
    if t.is_quantized:
        t = t.dequantize()
    try:
        a = t.numpy()
    except TypeError:  # bfloat16 and other types NumPy lacks: their bits
        a = t.contiguous().reshape(-1).view(torch.uint8).numpy()
    return np.ascontiguousarray(a)


@functools.lru_cache(maxsize=512)
def _class_source(cls: type) -> bytes:
    """A digest of a module class's code: editing a ``forward`` changes the key.

    The whole defining file is hashed (cheaper than ``inspect.getsource``
    parsing it), or the class's source where it has no file (a notebook cell).
    """
    try:
        path = inspect.getsourcefile(cls)
        if path and os.path.isfile(path):
            with open(path, "rb") as f:
                return hashlib.blake2b(f.read()).digest()
        return hashlib.blake2b(inspect.getsource(cls).encode()).digest()
    except (OSError, TypeError):  # built in, or defined where no file exists
        return b""


def module_digest(module: nn.Module, skip: str | None = None) -> str:
    """A digest of a network: its classes' code, its structure (``repr``) and
    every parameter and buffer (but those of the submodule ``skip``)."""
    h = hashlib.blake2b(digest_size=16)
    classes: dict[type, None] = {}
    for name, m in module.named_modules():
        cls = type(m)
        classes[cls] = None
        h.update(f"{name}:{cls.__module__}.{cls.__qualname__}\n".encode())
    for cls in classes:
        h.update(_class_source(cls))
    h.update(repr(module).encode())
    tensors = itertools.chain(module.named_parameters(), module.named_buffers())
    for name, t in tensors:
        if skip is not None and name.startswith(skip + "."):
            continue
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(_tensor_bytes(t))
    return h.hexdigest()


def key_of(parts: dict[str, Any]) -> str:
    """A key (32 hex digits) for a JSON-able description of a configuration."""
    text = json.dumps(parts, sort_keys=True, default=repr)
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


#: Values compared at a time by ``_is_grey``: whole pixels, in the CPU's cache.
_GREY_CHUNK = 3 * 2**14


@functools.lru_cache(maxsize=4)
def _grey_mask(n: int) -> np.ndarray:
    """``mask[j]``: whether RGB values ``j`` and ``j + 1`` share a pixel."""
    mask = np.ones(n, dtype=bool)
    mask[2::3] = False
    mask.flags.writeable = False
    return mask


def _is_grey(rgb: np.ndarray) -> bool:
    """Whether every pixel of a C-contiguous (H, W, 3) image has R == G == B,
    bit for bit: each value against the next, a chunk at a time (contiguous
    reads, and a colour image is told in its first chunk)."""
    flat = rgb.reshape(-1)
    if flat.dtype.itemsize != 1:  # float32: compare the bits (-0.0 vs 0.0)
        flat = flat.view(f"u{flat.dtype.itemsize}")
    n = len(flat)
    if n == 0:
        return True
    mask = _grey_mask(min(n, _GREY_CHUNK) - 1)
    differ = np.empty(len(mask), dtype=bool)
    for start in range(0, n, _GREY_CHUNK):
        stop = min(start + _GREY_CHUNK, n)
        m = stop - start - 1  # the last value of a chunk ends a pixel
        np.not_equal(flat[start : stop - 1], flat[start + 1 : stop], out=differ[:m])
        np.logical_and(differ[:m], mask[:m], out=differ[:m])
        if differ[:m].any():
            return False
    return True


@functools.lru_cache(maxsize=64)
def _header(kind: str, dtype: np.dtype, height: int, width: int) -> bytes:
    return f"{kind}|{dtype}|{height}x{width}|".encode()


def _digest(image: np.ndarray, bands: bool = False) -> bytes:
    """One image's digest (as ``_canonical`` gives it): of what the network
    receives. As colour, a grey (or equal-channel, or broadcast) image is its
    one channel, tagged "grey", else its three (alpha dropped); 2 or 5+
    channels, or ``bands``, are every channel, tagged with their number."""
    height, width = image.shape[:2]
    channels = image.shape[2] if image.ndim == 3 else 1
    if bands or channels not in (1, 3, 4):
        return _hash(_header(f"bands{channels}", image.dtype, height, width), image)
    if image.ndim == 3:
        if channels == 1 or image.strides[2] == 0:  # grey, or broadcast
            image = image[..., 0]
        else:
            rgb = np.ascontiguousarray(image[..., :3])
            if not _is_grey(rgb):
                return _hash(_header("rgb", rgb.dtype, height, width), rgb)
            image = rgb[..., 0]
    return _hash(_header("grey", image.dtype, height, width), image)


def _hash(header: bytes, values: np.ndarray) -> bytes:
    """BLAKE3 of ``header`` and the bytes of ``values`` in C order."""
    h = blake3(header)
    h.update(np.ascontiguousarray(values).reshape(-1).view(np.uint8))
    return h.digest(_DIGEST)


def _digests(images: np.ndarray, bands: bool = False) -> list[bytes]:
    """The digest of each image of a batch (N, H, W[, C]) from ``_canonical``."""
    return [_digest(image, bands) for image in images]


def _canonical(a: np.ndarray) -> np.ndarray:
    """An array as ``array_to_tensor`` reads its values: uint8, uint16 (read
    as 16-bit) or float32; other integers as uint8. No copy where none is
    needed (channels are left to ``_digest``)."""
    if a.dtype == np.uint16:
        return a
    return np.asarray(a, dtype=np.uint8 if a.dtype.kind in "iu" else np.float32)


def image_digests(
    X: np.ndarray | ArrayLikeImages | list, preprocessing: Any = None
) -> list[bytes]:
    """A 16-byte BLAKE3 digest of each image of ``X`` (as ``check_images``
    returns it) as the network's preprocessing receives it (uint8, uint16 or
    float32 pixels, RGB or bands, files decoded and upright): one digest
    however an image is given, another for any change of pixel, band, size or
    dtype. ``preprocessing`` (None: colour, floats in [0, 1]) decides
    ``bands`` and ``unit_floats``. Nothing is remembered between calls (an
    array may change in place) but an :class:`~sklearn_cnn.ImageArray`'s
    digests (its images cannot)."""
    preprocessing = fitted_preprocessing(preprocessing)
    bands = bool(getattr(preprocessing, "bands", False))
    unit_floats = bool(getattr(preprocessing, "unit_floats", True))
    shared = X if isinstance(X, ImageArray) else getattr(X, "data", None)
    if isinstance(shared, ImageArray):
        images = ArrayLikeImages(shared.images)
        return shared.memoized(
            ("digest", bands, unit_floats),
            lambda rows: _digests(_canonical(images.read(rows, unit_floats)), bands),
        )
    if isinstance(X, (np.ndarray, ArrayLikeImages)):
        batches = array_batches(X, 256, unit_floats)
        return [d for batch in batches for d in _digests(_canonical(batch), bands)]
    digests = []
    for i, item in enumerate(X):
        # The same checks and decoding as the network's input.
        t = image_to_tensor(item, i, unit_floats, bands)
        if isinstance(item, np.ndarray):
            digests.append(_digest(_canonical(item), bands))
        else:  # a file or PIL image: the decoded pixels
            digests.append(_digest(t.permute(1, 2, 0).numpy(), bands))
    return digests


# -- storage -----------------------------------------------------------------------


class _Corrupt(Exception):
    def __init__(self, path: str, why: str) -> None:
        super().__init__(path, why)
        self.path, self.why = path, why


def _checksum(data: Any) -> str:
    return hashlib.blake2b(data, digest_size=_CHECK).hexdigest()


class _Shard:
    """A shard's verified header: its digests and where each block lies."""

    def __init__(self, path: str, key: str) -> None:
        self.path = path
        try:
            with open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                head = f.read(16)
                if len(head) < 16 or head[:8] != _MAGIC:
                    raise _Corrupt(path, "not a shard, or truncated")
                (length,) = struct.unpack("<Q", head[8:])
                if length > min(size, 2**26):
                    raise _Corrupt(path, "bad header length")
                raw = f.read(length + _CHECK)
                if len(raw) != length + _CHECK:
                    raise _Corrupt(path, "truncated header")
                if _checksum(raw[:length]) != raw[length:].hex():
                    raise _Corrupt(path, "header checksum mismatch")
                header = json.loads(raw[:length])
                self.data_start = 16 + length + _CHECK
                if header.get("format") != FORMAT or header.get("key") != key:
                    raise _Corrupt(path, "written for another key or format")
                if size != self.data_start + header["data_bytes"]:
                    raise _Corrupt(path, "truncated or extended after writing")
                raw = f.read(header["n"] * _DIGEST)
                if _checksum(raw) != header["digests"]:
                    raise _Corrupt(path, "digest block checksum mismatch")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            if isinstance(exc, FileNotFoundError):
                raise
            raise _Corrupt(path, f"unreadable ({type(exc).__name__})") from None
        self.digests = [raw[i : i + _DIGEST] for i in range(0, len(raw), _DIGEST)]
        self.blocks: dict[str, dict] = header["blocks"]

    def read(self, name: str) -> np.ndarray:
        """Block ``name`` (all rows), verified."""
        spec = self.blocks[name]
        try:
            with open(self.path, "rb") as f:
                f.seek(self.data_start + spec["offset"])
                data = f.read(spec["nbytes"])
        except FileNotFoundError:
            raise
        except OSError as exc:
            raise _Corrupt(self.path, f"unreadable ({exc})") from None
        if len(data) != spec["nbytes"] or _checksum(data) != spec["checksum"]:
            raise _Corrupt(self.path, f"block {name!r} checksum mismatch")
        return np.frombuffer(data, dtype=np.dtype(spec["dtype"])).reshape(spec["shape"])


class ActivationCache:
    """Per-image arrays on disk, by key (:func:`key_of`), image digest
    (:func:`image_digests`) and name (a layer); rows of any shape and numeric
    dtype. Safe for concurrent processes and threads (see the module).

    Parameters
    ----------
    directory : str or path
        Where the shards go (created on first store).

    Examples
    --------
    >>> import tempfile
    >>> import numpy as np
    >>> cache = ActivationCache(tempfile.mkdtemp())
    >>> key = key_of({"model": "demo", "layer_pooling": "avg"})
    >>> digests = [b"a" * 16, b"b" * 16]
    >>> cache.store(key, digests, {"layer1": np.eye(2, dtype=np.float32)})
    >>> found, rows = cache.fetch(key, [b"b" * 16, b"c" * 16], ["layer1"])
    >>> found
    array([ True, False])
    >>> rows["layer1"]
    array([[0., 1.]], dtype=float32)
    """

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = os.fspath(directory)

    def _key_dir(self, key: str) -> str:
        if not key.isalnum():
            raise ValueError(f"A cache key is alphanumeric (key_of); got {key!r}.")
        return os.path.join(self.directory, key)

    def _shards(self, key: str) -> list[_Shard]:
        try:
            names = sorted(
                e.name
                for e in os.scandir(self._key_dir(key))
                if e.name.endswith(_SUFFIX) and not e.name.startswith(_TMP_PREFIX)
            )
        except FileNotFoundError:
            return []
        shards = []
        for name in names:
            try:
                shards.append(_Shard(os.path.join(self._key_dir(key), name), key))
            except FileNotFoundError:  # cleared meanwhile
                continue
        return shards

    def fetch(
        self, key: str, digests: Sequence[bytes], names: Sequence[str]
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """The cached rows of ``names`` for the images ``digests``: a bool per
        image, whether every name is cached for it, and each name's rows of
        the found images in ``digests`` order. A corrupt shard is deleted with
        a warning; its images count as not found."""
        while True:
            try:
                return self._fetch(key, list(digests), list(names))
            except _Corrupt as bad:
                _discard(bad)
            except FileNotFoundError:  # a shard deleted meanwhile: look again
                continue

    def _fetch(
        self, key: str, digests: list[bytes], names: list[str]
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        found = np.zeros(len(digests), dtype=bool)
        if not digests or not names:
            return found, {}
        wanted = set(digests)
        where: dict[str, dict[bytes, tuple[_Shard, int]]] = {n: {} for n in names}
        for shard in self._shards(key):
            held = [n for n in names if n in shard.blocks]
            for row, d in enumerate(shard.digests if held else ()):
                if d in wanted:
                    for n in held:
                        where[n].setdefault(d, (shard, row))
        for i, d in enumerate(digests):
            found[i] = all(d in where[n] for n in names)
        if not found.any():
            return found, {}
        hits = [d for d, f in zip(digests, found, strict=True) if f]
        rows = {}
        for n in names:
            by_shard: dict[str, tuple[_Shard, list[int], list[int]]] = {}
            for k, d in enumerate(hits):
                shard, row = where[n][d]
                by_shard.setdefault(shard.path, (shard, [], []))
                by_shard[shard.path][1].append(k)
                by_shard[shard.path][2].append(row)
            out = None
            for shard, ks, shard_rows in by_shard.values():
                block = shard.read(n)
                if out is None:
                    out = np.empty((len(hits), *block.shape[1:]), dtype=block.dtype)
                if block.shape[1:] != out.shape[1:] or block.dtype != out.dtype:
                    raise ValueError(
                        f"Cached rows of {n!r} differ in shape or dtype between "
                        f"shards ({block.shape[1:]} vs {out.shape[1:]}): the images "
                        "differ in size, so their arrays cannot be stacked."
                    )
                out[ks] = block[shard_rows]
            rows[n] = out
        return found, rows

    def store(
        self,
        key: str,
        digests: Sequence[bytes],
        arrays: dict[str, np.ndarray],
        about: dict[str, Any] | None = None,
    ) -> None:
        """Store ``arrays[name][i]`` for the image ``digests[i]``, in shards
        of at most ``MAX_SHARD_BYTES``; a failed write warns, never raises.
        ``about`` (JSON-able) is kept in each shard's header, for readers."""
        digests = list(digests)
        arrays = {name: np.ascontiguousarray(a) for name, a in arrays.items()}
        for name, a in arrays.items():
            if len(a) != len(digests) or a.dtype.hasobject:
                raise ValueError(
                    f"arrays[{name!r}] must hold one numeric row per digest; got "
                    f"shape {a.shape}, dtype {a.dtype} for {len(digests)} digests."
                )
            if any(len(d) != _DIGEST for d in digests):
                raise ValueError(f"Image digests are {_DIGEST} bytes long.")
        if not digests or not arrays:
            return
        row_bytes = max(1, sum(a[0].nbytes for a in arrays.values()))
        step = max(1, MAX_SHARD_BYTES // row_bytes)
        for start in range(0, len(digests), step):
            part = {n: a[start : start + step] for n, a in arrays.items()}
            self._write(key, digests[start : start + step], part, about)

    def _write(
        self,
        key: str,
        digests: list[bytes],
        arrays: dict[str, np.ndarray],
        about: dict[str, Any] | None,
    ) -> None:
        digest_block = b"".join(digests)
        blocks, offset = {}, len(digest_block)
        for name, a in arrays.items():
            blocks[name] = {
                "dtype": a.dtype.str,
                "shape": list(a.shape),
                "offset": offset,
                "nbytes": a.nbytes,
                "checksum": _checksum(a),
            }
            offset += a.nbytes
        header = {
            "format": FORMAT,
            "key": key,
            "n": len(digests),
            "digests": _checksum(digest_block),
            "blocks": blocks,
            "data_bytes": offset,
            "about": about or {},
        }
        head = json.dumps(header, sort_keys=True, default=repr).encode()
        directory = self._key_dir(key)
        tmp = None
        try:
            os.makedirs(directory, exist_ok=True)
            fd, tmp = tempfile.mkstemp(
                prefix=_TMP_PREFIX, suffix=".part", dir=directory
            )
            with os.fdopen(fd, "wb") as f:
                f.write(_MAGIC + struct.pack("<Q", len(head)) + head)
                f.write(hashlib.blake2b(head, digest_size=_CHECK).digest())
                f.write(digest_block)
                for a in arrays.values():
                    f.write(memoryview(a).cast("B"))
            # Atomic: a reader sees the whole shard or none of it.
            os.replace(tmp, os.path.join(directory, uuid.uuid4().hex + _SUFFIX))
            tmp = None
        except OSError as exc:
            warnings.warn(
                f"Could not write to the activation cache {directory!r} ({exc}); "
                "the results are right but are not cached.",
                RuntimeWarning,
                stacklevel=4,
            )
        finally:
            if tmp is not None:
                with contextlib.suppress(OSError):
                    os.remove(tmp)


def _discard(bad: _Corrupt) -> None:
    warnings.warn(
        f"Corrupt activation-cache shard {bad.path!r} ({bad.why}): deleted; its "
        "images are computed again.",
        RuntimeWarning,
        stacklevel=4,
    )
    with contextlib.suppress(OSError):
        os.remove(bad.path)


# -- CNNFeatureTransformer's cached transform ---------------------------------------


def entry_name(tap: Tap) -> str:
    """The name a tap's rows are stored under."""
    if not tap.module:
        return "<output>"
    return f"{tap.module}<input>" if tap.pre else tap.module


def fill_taps(trace: Trace, taps: Sequence[Tap], pooling: str) -> list[Tap]:
    """What a pass that misses the cache stores: the taps asked for, every
    layer down to the deepest one's depth (at least stages and blocks) and the
    classifier's input (or the output), so that the next candidate of a layer
    search finds its layer cached. Flattened maps are too large: only the taps.
    """
    taps = list(taps)
    if pooling == "flatten":
        return taps
    depth = max([2] + [t.module.count(".") + 1 for t in taps if t.module])
    extra = [Tap(layer.name) for layer in trace.layers if layer.name.count(".") < depth]
    extra.append(Tap(trace.head, pre=True) if trace.head else Tap(""))
    return list(dict.fromkeys([*taps, *extra]))


def _runtime_parts(network: Network) -> dict[str, Any]:
    """What decides the numbers besides the network: where and how it runs."""
    device = network.device
    parts = {
        "device": device.type,
        "autocast": str(network.dtype),
        "matmul_precision": torch.get_float32_matmul_precision(),
    }
    if device.type == "cuda":
        parts["device_name"] = torch.cuda.get_device_name(device)
        parts["tf32"] = (
            torch.backends.cuda.matmul.allow_tf32,
            torch.backends.cudnn.allow_tf32,
        )
    return parts


def _about(net: Network, **parts: Any) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "sklearn_cnn": __version__,
        "torch": torch.__version__,
        "preprocessing": repr(net.preprocessing),
        **parts,
    }


def network_key_parts(network: Network, pooling: str, layout: Any) -> dict[str, Any]:
    """The part of a transformer's key that fit decides: the network (hashed
    once while its weights are unchanged, ``Network.memo``), preprocessing,
    pooling and layout."""
    memo = network.memo()
    if "digest" not in memo:
        memo["digest"] = module_digest(network.module)
    return _about(network, network=memo["digest"], pooling=pooling, layout=repr(layout))


def fine_tune_key(network: Network, head: str) -> tuple[str, dict[str, Any]]:
    """The key of what a fine-tuner stores: the inputs of its trainable part
    (a frozen prefix's outputs, the head's input), which the network computes
    as it is now, its head aside (their values do not depend on it)."""
    about = {
        **_about(
            network, use="fine-tune", network=module_digest(network.module, skip=head)
        ),
        **_runtime_parts(network),
    }
    return key_of(about), about


def cached_transform(
    directory: str,
    network: Network,
    parts: dict[str, Any],
    X: Any,
    taps: list[Tap],
    n_columns: int,
    pool_fn: Callable[[Tap, Any], torch.Tensor],
    check_widths: Callable[[list[int]], None],
    pooling: str,
    **stream: Any,
) -> np.ndarray:
    """A transformer's features of ``X`` through the cache in ``directory``
    (``parts``: :func:`network_key_parts`): cached images are read, each other
    one (once) goes through a pass that stores what :func:`fill_taps` names."""
    cache = ActivationCache(directory)
    about = {**parts, **_runtime_parts(network)}
    key = key_of(about)
    digests = image_digests(X, network.preprocessing)
    taps = list(taps) or [Tap("")]
    names = [entry_name(t) for t in taps]
    out = np.empty((len(digests), n_columns), dtype=np.float32)
    found, rows = cache.fetch(key, digests, names)
    if found.any():
        check_widths([rows[n].shape[1] for n in names])
        out[found] = np.concatenate([rows[n] for n in names], axis=1)
    missing = np.flatnonzero(~found)
    if len(missing):
        first: dict[bytes, int] = {}
        for i in missing:
            first.setdefault(digests[i], int(i))
        fill = fill_taps(network.trace, taps, pooling)
        computed = _fill(network, X, list(first.values()), list(first), taps, fill,
                         pool_fn, check_widths, cache, key, about, stream)  # fmt: skip
        where = {d: k for k, d in enumerate(first)}
        out[missing] = computed[[where[digests[i]] for i in missing]]
    return out


def _fill(
    network: Network,
    X: Any,
    index: list[int],
    digests: list[bytes],
    taps: list[Tap],
    fill: list[Tap],
    pool_fn: Callable[[Tap, Any], torch.Tensor],
    check_widths: Callable[[list[int]], None],
    cache: ActivationCache,
    key: str,
    about: dict[str, Any],
    stream: dict[str, Any],
) -> np.ndarray:
    """One pass over the images ``index`` (at least one; pooling in the hooks):
    their features, and every ``fill`` layer stored in shards as they come."""
    pending: dict[Tap, list[np.ndarray]] = {t: [] for t in fill}
    parts_out: list[np.ndarray] = []
    stored = done = pending_bytes = 0

    def flush() -> None:
        nonlocal stored, pending_bytes
        arrays = {
            entry_name(t): np.concatenate(parts)
            for t, parts in pending.items()
            if parts and sum(len(p) for p in parts) == done - stored
        }
        cache.store(key, digests[stored:done], arrays, about)
        for parts in pending.values():
            parts.clear()
        stored, pending_bytes = done, 0

    for pooled in network.stream(
        X, fill, _same_rows, label="transform (filling the cache)",
        index=np.asarray(index), pool=pool_fn, **stream,
    ):  # fmt: skip
        absent = [t.module or "<output>" for t in taps if t not in pooled]
        if absent:
            raise RuntimeError(f"Layers {absent} did not run in the forward pass.")
        parts = [pooled[t] for t in taps]
        check_widths([p.shape[1] for p in parts])
        parts_out.append(torch.cat(parts, dim=1).float().cpu().numpy())
        n = len(parts[0])
        for t, rows in pooled.items():
            pending[t].append(rows.float().cpu().numpy())
            pending_bytes += rows.numel() * 4
        done += n
        if pending_bytes >= MAX_SHARD_BYTES:
            flush()
    if done > stored:
        flush()
    return np.concatenate(parts_out)


def _same_rows(rows: dict[Tap, torch.Tensor]) -> dict[Tap, torch.Tensor]:
    return rows
