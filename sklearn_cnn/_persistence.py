"""Save and load fitted estimators without pickle: JSON and tensors, no code.

A file holds the parameters and fitted attributes as JSON and the network's
state dict as tensors: a safetensors file whose metadata carries the JSON, or
without safetensors a ``torch.save`` file read with ``weights_only=True``; a
SHA-256 digest of both is checked on load. The network is rebuilt from the
parameters: a callable is stored as its import path and imported on load only
when listed in ``trusted`` (as skops does).

This module knows the file, not the estimators: ``write`` and ``read`` take
and give plain values; the estimator classes ``register`` themselves, and
``_base.NetworkMixin`` saves and rebuilds them.
"""

from __future__ import annotations

import copy
import enum
import functools
import hashlib
import importlib
import io
import json
import os
import pathlib
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
import torchvision
from torch import nn
from torchvision.models import WeightsEnum
from torchvision.transforms import InterpolationMode

from ._images import Preprocessing
from ._layers import Tap
from ._version import __version__

FORMAT = "sklearn_cnn"
FORMAT_VERSION = 1
_META_KEY, _DIGEST_KEY = "sklearn_cnn", "sha256"
_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's format


def snapshot_value(value: Any) -> Any:
    """A copy of a container parameter, so that changing it in place shows."""
    if isinstance(value, (list, dict, np.ndarray)):
        return copy.copy(value)
    return value


class _Unsaveable(TypeError):
    pass


# -- Values <-> JSON, with tags for what JSON lacks ---------------------------


def _import_path(obj: Any) -> str:
    """``"module:qualname"`` of an importable function or class, else raise."""
    module = getattr(obj, "__module__", None)
    qualname = getattr(obj, "__qualname__", None)
    if not module or not qualname or "<" in qualname or module == "__main__":
        raise _Unsaveable(
            f"{obj!r} has no import path (a lambda, a local function or one "
            "defined in __main__)"
        )
    path = f"{module}:{qualname}"
    try:
        found = _resolve(path)
    except (ImportError, AttributeError):
        found = None
    if found is not obj and found != obj:  # a classmethod is bound anew each time
        raise _Unsaveable(f"{obj!r} cannot be imported back as {path!r}")
    return path


def _resolve(path: str) -> Any:
    module, _, qualname = path.partition(":")
    obj: Any = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def _encode(value: Any) -> Any:
    """A JSON-serialisable form of ``value``."""
    if value is None or isinstance(value, (bool, str, int, float)):
        return value
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, tuple):
        return {"__tuple__": [_encode(v) for v in value]}
    if isinstance(value, list):
        return [_encode(v) for v in value]
    if isinstance(value, (set, frozenset)):
        return {"__set__": [_encode(v) for v in sorted(value, key=repr)]}
    if isinstance(value, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in value):
            return {k: _encode(v) for k, v in value.items()}
        return {"__dict__": [[_encode(k), _encode(v)] for k, v in value.items()]}
    if isinstance(value, np.ndarray):
        if value.dtype.kind not in "biufUO":
            raise _Unsaveable(f"an array of dtype {value.dtype}")
        return {
            "__ndarray__": [_encode(v) for v in value.ravel().tolist()],
            "dtype": value.dtype.str if value.dtype.kind != "O" else "object",
            "shape": list(value.shape),
        }
    if isinstance(value, torch.device):
        return {"__device__": str(value)}
    if isinstance(value, os.PathLike):
        return {"__path__": os.fspath(value)}
    if isinstance(value, WeightsEnum):
        return {"__weights__": f"{type(value).__name__}.{value.name}"}
    if isinstance(value, Preprocessing):
        return {
            "__preprocessing__": {
                "resize": _encode(value.resize),
                "crop": _encode(value.crop),
                "mean": list(value.mean),
                "std": list(value.std),
                "interpolation": value.interpolation.value,
                "bands": value.bands,
                "unit_floats": value.unit_floats,
            }
        }
    if isinstance(value, Tap):
        return {"__tap__": [value.module, value.pre]}
    if isinstance(value, functools.partial):
        return {
            "__partial__": {
                "func": _encode(value.func),
                "args": [_encode(v) for v in value.args],
                "keywords": {k: _encode(v) for k, v in value.keywords.items()},
            }
        }
    if isinstance(value, nn.Module):
        raise _Unsaveable(
            "a torch.nn.Module instance, whose architecture is code. Pass the "
            "architecture as a torchvision name or as a callable that builds it "
            "(an importable function or class, or functools.partial of one), "
            "fit, and save that"
        )
    if callable(value) and not isinstance(value, enum.Enum):
        return {"__callable__": _import_path(value)}
    raise _Unsaveable(f"a {type(value).__name__}")


def _decode(value: Any, trusted: frozenset[str]) -> Any:
    if isinstance(value, list):
        return [_decode(v, trusted) for v in value]
    if not isinstance(value, dict):
        return value
    if len(value) == 1:
        ((tag, body),) = value.items()
        if tag == "__tuple__":
            return tuple(_decode(v, trusted) for v in body)
        if tag == "__set__":
            return {_decode(v, trusted) for v in body}
        if tag == "__dict__":
            return {_decode(k, trusted): _decode(v, trusted) for k, v in body}
        if tag == "__device__":
            return torch.device(body)
        if tag == "__path__":
            return pathlib.Path(body)
        if tag == "__weights__":
            return torchvision.models.get_weight(body)
        if tag == "__preprocessing__":
            return Preprocessing(
                resize=_decode(body["resize"], trusted),
                crop=_decode(body["crop"], trusted),
                mean=tuple(body["mean"]),
                std=tuple(body["std"]),
                interpolation=InterpolationMode(body["interpolation"]),
                bands=bool(body.get("bands", False)),
                unit_floats=bool(body.get("unit_floats", True)),
            )
        if tag == "__tap__":
            return Tap(body[0], bool(body[1]))
        if tag == "__partial__":
            return functools.partial(
                _decode(body["func"], trusted),
                *[_decode(v, trusted) for v in body["args"]],
                **{k: _decode(v, trusted) for k, v in body["keywords"].items()},
            )
        if tag == "__callable__":
            if body not in trusted:  # _check_trusted ran first; belt and braces
                raise ValueError(f"{body!r} is not trusted.")
            return _resolve(body)
    if "__ndarray__" in value:
        flat = [_decode(v, trusted) for v in value["__ndarray__"]]
        if value["dtype"] == "object":
            arr = np.empty(len(flat), dtype=object)
            arr[:] = flat
        else:
            arr = np.array(flat, dtype=np.dtype(value["dtype"]))
        return arr.reshape(value["shape"])
    return {k: _decode(v, trusted) for k, v in value.items()}


def _callables(value: Any) -> Iterable[str]:
    """The import paths that decoding ``value`` would import."""
    if isinstance(value, list):
        for v in value:
            yield from _callables(v)
    elif isinstance(value, dict):
        if set(value) == {"__callable__"}:
            yield value["__callable__"]
        else:
            for v in value.values():
                yield from _callables(v)


# -- Tensors and the digest ---------------------------------------------------


def _digest(header: str, tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256(header.encode())
    for key in sorted(tensors):
        t = tensors[key]
        h.update(f"\0{key}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        raw = t.detach().reshape(-1).contiguous().view(torch.uint8)
        h.update(memoryview(raw.numpy()))
    return h.hexdigest()


def _state_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """The module's state dict as contiguous CPU tensors, checked."""
    out = {}
    for key, value in module.state_dict().items():
        if not isinstance(value, torch.Tensor):
            raise ValueError(
                f"The network's state dict holds a {type(value).__name__} at "
                f"{key!r}, not a tensor (a module's get_extra_state()). save() "
                "stores tensors only; pickle the estimator instead (only load "
                "pickles you trust)."
            )
        out[key] = value.detach().to(
            "cpu", memory_format=torch.contiguous_format, copy=True
        )
    return out


def _safetensors():
    """The safetensors.torch module, or None when it is not installed."""
    try:
        import safetensors.torch
    except ImportError:
        return None
    return safetensors.torch


# -- save ---------------------------------------------------------------------


#: The estimator classes that save() stores and load() rebuilds, by name;
#: each registers itself where it is defined (``register``).
_ESTIMATORS: dict[str, type] = {}


def register(cls: type) -> type:
    """Class decorator: ``cls`` can be saved and loaded."""
    _ESTIMATORS[cls.__name__] = cls
    return cls


def check_registered(cls: type) -> None:
    """Refuse a class that load() would not rebuild as itself."""
    if _ESTIMATORS.get(cls.__name__) is not cls:
        raise TypeError(
            f"save() stores {' and '.join(sorted(_ESTIMATORS))}, not "
            f"{cls.__name__} (a subclass would be loaded as its base class)."
        )


#: What a save file holds of the fitted network besides its tensors: what
#: rebuilding it needs (``NetworkMixin._from_saved``).
NETWORK = ("preprocessing_", "_example_shape")


def _umask() -> int:
    """The process's umask (reading it means setting it: set it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write(
    path: str | os.PathLike, cls: type, params: dict, fitted: dict, module: nn.Module
) -> None:
    """Write an estimator of class ``cls`` to ``path``: its parameters and
    fitted attributes (plain values, encoded as JSON) and ``module``'s tensors.
    See :func:`sklearn_cnn.load`."""
    check_registered(cls)
    name = cls.__name__

    def encode_all(items: dict, refusal: str) -> dict:
        out = {}
        for key, value in items.items():
            try:
                out[key] = _encode(value)
            except _Unsaveable as exc:
                raise ValueError(
                    refusal.format(key=key, value=value, why=exc)
                ) from None
        return out

    encoded_params = encode_all(
        params,
        f"Cannot save {name} with {{key}}={{value!r}}: it is {{why}}. save() "
        "stores no code.",
    )
    fitted = encode_all(
        fitted,
        f"Cannot save {name}: its attribute {{key!r}} is {{why}}, which save() "
        "cannot store.",
    )
    header = json.dumps(
        {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "sklearn_cnn_version": __version__,
            "estimator": name,
            "params": encoded_params,
            "fitted": fitted,
        }  # insertion order kept: history_ rows keep their column order
    )
    tensors = _state_tensors(module)
    digest = _digest(header, tensors)
    path = os.fspath(path)
    tmp = f"{path}.tmp-{os.getpid()}"
    st = _safetensors()
    if st is None and path.lower().endswith(".safetensors"):
        # Without safetensors the file is a torch zip: under this suffix, other
        # safetensors readers would fail on it with an obscure message.
        raise ImportError(
            f"Cannot save to {path!r}: the .safetensors format needs the "
            "safetensors package (pip install safetensors, or the 'persist' "
            "extra). Install it, or save under another suffix (such as .pt) to "
            "write torch's format, which sklearn_cnn.load reads as well."
        )
    try:
        if st is not None:
            st.save_file(
                tensors, tmp, metadata={_META_KEY: header, _DIGEST_KEY: digest}
            )
        else:
            torch.save(
                {_META_KEY: header, _DIGEST_KEY: digest, "tensors": tensors}, tmp
            )
        # safetensors makes it owner-only: the umask's, as any new file.
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)  # never a half-written file at ``path``
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


# -- load ---------------------------------------------------------------------


def _corrupt(path: str, why: str) -> ValueError:
    return ValueError(
        f"{path!r} is not a complete sklearn_cnn save file ({why}). It may be "
        "truncated or modified, or was not written by est.save(path)."
    )


def _read(path: str) -> tuple[str, str, dict[str, torch.Tensor]]:
    """The JSON header, the stored digest and the tensors of a save file."""
    with open(path, "rb") as f:
        data = f.read()
    if data[:4] == _ZIP_MAGIC:
        try:
            obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises many types for a bad file
            raise _corrupt(
                path, f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
            ) from None
        if not (
            isinstance(obj, dict)
            and isinstance(obj.get(_META_KEY), str)
            and isinstance(obj.get(_DIGEST_KEY), str)
            and isinstance(obj.get("tensors"), dict)
        ):
            raise _corrupt(path, "it lacks the sklearn_cnn header")
        tensors = obj["tensors"]
        for key, value in tensors.items():
            if not isinstance(value, torch.Tensor):
                raise ValueError(
                    f"{path!r} holds a {type(value).__name__} at {key!r} where the "
                    "network's state dict needs a tensor; refusing to load it."
                )
        return obj[_META_KEY], obj[_DIGEST_KEY], tensors
    # safetensors: an 8-byte header length, a JSON header, then the tensor data.
    if len(data) < 8:
        raise _corrupt(path, f"{len(data)} bytes")
    n = int.from_bytes(data[:8], "little")
    try:
        meta = json.loads(data[8 : 8 + n])["__metadata__"]
        header, digest = meta[_META_KEY], meta[_DIGEST_KEY]
    except Exception:
        raise _corrupt(path, "no readable sklearn_cnn header") from None
    st = _safetensors()
    if st is None:
        raise ImportError(
            f"{path!r} is a safetensors file: install safetensors "
            "(pip install 'sklearn-cnn[persist]') to load it."
        )
    try:
        tensors = st.load(data)
    except Exception as exc:
        raise _corrupt(path, f"{type(exc).__name__}: {exc}") from None
    return header, digest, tensors


def read(
    path: str | os.PathLike, trusted: Iterable[str] = ()
) -> tuple[type, dict, dict, dict[str, torch.Tensor]]:
    """The class, parameters, fitted attributes and tensors of a save file,
    checked and decoded (callables only from ``trusted``)."""
    path = os.fspath(path)
    header, digest, tensors = _read(path)
    if _digest(header, tensors) != digest:
        raise _corrupt(path, "its checksum does not match its content")
    try:
        info = json.loads(header)
        cls = _ESTIMATORS[info["estimator"]]
        if info["format"] != FORMAT or info["format_version"] > FORMAT_VERSION:
            raise ValueError(
                f"{path!r} was written by a newer sklearn_cnn "
                f"({info.get('sklearn_cnn_version')}): upgrade to load it."
            )
        params, fitted = info["params"], info["fitted"]
    except (KeyError, TypeError, json.JSONDecodeError):
        raise _corrupt(path, "an unexpected header") from None
    trusted = frozenset(trusted)
    needed = sorted(set(_callables(params)) | set(_callables(fitted)))
    untrusted = [p for p in needed if p not in trusted]
    if untrusted:
        raise ValueError(
            f"{path!r} rebuilds its estimator by importing and calling "
            f"{untrusted}. Loading runs them: if you trust them, pass "
            f"trusted={needed!r}."
        )
    unknown = set(params) - set(cls().get_params())
    odd = [  # the network's fields are properties of the class
        k
        for k in fitted
        if k.startswith("__") or (hasattr(cls, k) and k not in NETWORK)
    ]
    if unknown or odd or any(fitted.get(k) is None for k in NETWORK):
        raise _corrupt(
            path,
            f"parameters {sorted(unknown)} unknown to this version of {cls.__name__}"
            if unknown
            else f"attributes {odd} that would replace methods"
            if odd
            else "no input shape",
        )
    params = {k: _decode(v, trusted) for k, v in params.items()}
    fitted = {k: _decode(v, trusted) for k, v in fitted.items()}
    return cls, params, fitted, tensors


def load(
    path: str | os.PathLike,
    *,
    trusted: Iterable[str] = (),
    device: Any = None,
) -> Any:
    """Load an estimator written by ``est.save(path)``.

    Nothing in the file is executed: it holds JSON and tensors, checked
    against a SHA-256 digest, and the network is rebuilt from the saved
    parameters. Unlike unpickling, loading a file from an untrusted source
    is safe, as long as you do not list its callables in ``trusted``.

    Parameters
    ----------
    path : str or path-like
        A file written by :meth:`CNNFeatureTransformer.save` or
        :meth:`FineTuneClassifier.save`.
    trusted : iterable of str, default=()
        Import paths (``"package.module:function"``) of the callables the
        file names, such as a ``model`` built by a function of your own, that
        may be imported and called to rebuild the estimator. An error lists
        the paths the file needs; torchvision model names need none.
    device : "auto", str, torch.device or None, default=None
        Where the network runs after loading (sets the ``device`` parameter);
        None keeps the saved ``device``. A file written on a GPU machine loads
        on a machine without one: a CUDA ``device`` falls back to the CPU with
        a warning.

    Returns
    -------
    estimator : CNNFeatureTransformer or FineTuneClassifier
        The fitted estimator, giving the same results as the one saved.

    Examples
    --------
    >>> import os, tempfile
    >>> import numpy as np
    >>> from sklearn_cnn import CNNFeatureTransformer, load
    >>> X = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    >>> cnn = CNNFeatureTransformer("resnet18", weights=None, layer="layer2",
    ...                             device="cpu").fit(X)
    >>> path = os.path.join(tempfile.mkdtemp(), "cnn.safetensors")
    >>> cnn.save(path)
    >>> bool((load(path).transform(X) == cnn.transform(X)).all())
    True
    """
    cls, params, fitted, tensors = read(path, trusted)
    # The registered class rebuilds itself (``NetworkMixin._from_saved``).
    return cls._from_saved(params, fitted, tensors, os.fspath(path), device)
