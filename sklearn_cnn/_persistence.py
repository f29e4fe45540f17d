"""Save and load fitted estimators without pickle: JSON and tensors, no code.

A file holds the estimator's parameters and fitted attributes as JSON, and the
network's state dict as tensors: a safetensors file (the ``persist`` extra)
whose metadata carries the JSON, or, without safetensors, a ``torch.save``
file of plain strings and tensors, read back with ``weights_only=True``. A
SHA-256 digest of the JSON and of every tensor's bytes is checked on load, so
a truncated or modified file is refused instead of giving wrong results.

Loading runs no code from the file. The network is rebuilt from the
parameters: a torchvision name needs nothing else; a callable is stored as its
import path (``"package.module:function"``, or a ``functools.partial`` of one
with JSON arguments) and is imported and called on load only when the caller
lists it in ``trusted``, as skops does for types it does not know.
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
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
import torchvision
from sklearn.utils.validation import check_is_fitted
from torch import nn
from torchvision.models import WeightsEnum
from torchvision.transforms import InterpolationMode

from ._bands import adapt_stem
from ._images import Preprocessing
from ._inspect import probe_network
from ._layers import Tap
from ._models import (
    TIMM_PREFIX,
    _build_timm,
    _is_weights_file,
    _resolve_torchvision_weights,
    offline_builder_kwargs,
)
from ._network import Network
from ._runtime import place, resolve_device
from ._version import __version__

FORMAT = "sklearn_cnn"
FORMAT_VERSION = 1
_META_KEY, _DIGEST_KEY = "sklearn_cnn", "sha256"
_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's format

#: Attributes not stored: rebuilt on load with the network, or recomputed when
#: needed (compiled code, the activation cache key).
_REBUILT = frozenset(
    {
        "_network",
        "_taps",
        "_fitted_params",
        "_compiled",
        "_cache_parts",
    }
)


def snapshot_value(value: Any) -> Any:
    """A copy of a container parameter, so that changing it in place shows."""
    if isinstance(value, (list, dict, np.ndarray)):
        return copy.copy(value)
    return value


class _Unsaveable(TypeError):
    pass


# ---------------------------------------------------------------------------
# Values <-> JSON, with tags for what JSON lacks
# ---------------------------------------------------------------------------


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


def _encode(value: Any, where: str) -> Any:
    """A JSON-serialisable form of ``value``; ``where`` names it in errors."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, (int, float)):
        return value
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, tuple):
        return {"__tuple__": [_encode(v, where) for v in value]}
    if isinstance(value, list):
        return [_encode(v, where) for v in value]
    if isinstance(value, (set, frozenset)):
        return {"__set__": [_encode(v, where) for v in sorted(value, key=repr)]}
    if isinstance(value, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in value):
            return {k: _encode(v, where) for k, v in value.items()}
        return {
            "__dict__": [
                [_encode(k, where), _encode(v, where)] for k, v in value.items()
            ]
        }
    if isinstance(value, np.ndarray):
        if value.dtype.kind not in "biufUO":
            raise _Unsaveable(f"an array of dtype {value.dtype}")
        return {
            "__ndarray__": [_encode(v, where) for v in value.ravel().tolist()],
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
                "resize": _encode(value.resize, where),
                "crop": _encode(value.crop, where),
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
                "func": _encode(value.func, where),
                "args": [_encode(v, where) for v in value.args],
                "keywords": {k: _encode(v, where) for k, v in value.keywords.items()},
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
            import pathlib

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


# ---------------------------------------------------------------------------
# Tensors and the digest
# ---------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------
# save
# ---------------------------------------------------------------------------


#: The estimator classes that save() stores and load() rebuilds, by name;
#: each registers itself where it is defined (``register``).
_ESTIMATORS: dict[str, type] = {}


def register(cls: type) -> type:
    """Class decorator: ``cls`` can be saved and loaded."""
    _ESTIMATORS[cls.__name__] = cls
    return cls


def _estimator_classes() -> dict[str, type]:
    return dict(_ESTIMATORS)


#: What save() stores of the fitted network besides its tensors: what
#: ``_rebuild`` needs to build it again.
_NETWORK_FIELDS = ("preprocessing_", "_example_shape")


def _umask() -> int:
    """The process's umask (reading it means setting it: set it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def save(estimator: Any, path: str | os.PathLike) -> None:
    """Write a fitted estimator to ``path``; see :func:`sklearn_cnn.load`."""
    name = type(estimator).__name__
    if _estimator_classes().get(name) is not type(estimator):
        raise TypeError(
            f"save() stores {' and '.join(sorted(_ESTIMATORS))}, not "
            f"{name} (a subclass would be loaded as its base class)."
        )
    check_is_fitted(estimator)
    if not hasattr(estimator, "_rebuild_for_load"):
        raise NotImplementedError(f"{name} cannot be saved by save() yet.")
    estimator._check_params_unchanged()

    def encode_all(items: dict, refusal: str) -> dict:
        out = {}
        for key, value in items.items():
            try:
                out[key] = _encode(value, key)
            except _Unsaveable as exc:
                raise ValueError(
                    refusal.format(key=key, value=value, why=exc)
                ) from None
        return out

    params = estimator.get_params(deep=False)
    encoded_params = encode_all(
        params,
        f"Cannot save {name} with {{key}}={{value!r}}: it is {{why}}. save() "
        "stores no code.",
    )
    network = estimator._network
    fitted = encode_all(
        {
            **{
                k: v
                for k, v in estimator.__dict__.items()
                if k not in params and k not in _REBUILT
            },
            "preprocessing_": network.preprocessing,
            "_example_shape": network.example_shape,
        },
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
    tensors = _state_tensors(estimator.model_)
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
        # safetensors creates its file readable by the owner only; a saved
        # model gets the permissions of any other new file (the umask's).
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)  # never a half-written file at ``path``
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


# ---------------------------------------------------------------------------
# load
# ---------------------------------------------------------------------------


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
    path = os.fspath(path)
    header, digest, tensors = _read(path)
    if _digest(header, tensors) != digest:
        raise _corrupt(path, "its checksum does not match its content")
    try:
        info = json.loads(header)
        classes = _estimator_classes()
        cls = classes[info["estimator"]]
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
    network_fields = {k: fitted.pop(k, None) for k in _NETWORK_FIELDS}
    odd = [k for k in fitted if k.startswith("__") or hasattr(cls, k)]
    if unknown or odd or None in network_fields.values():
        raise _corrupt(
            path,
            f"parameters {sorted(unknown)} unknown to this version of {cls.__name__}"
            if unknown
            else f"attributes {odd} that would replace methods"
            if odd
            else "no input shape",
        )
    estimator = cls(**{k: _decode(v, trusted) for k, v in params.items()})
    if device is not None:
        estimator.set_params(device=device)
    for key, value in fitted.items():
        setattr(estimator, key, _decode(value, trusted))
    _rebuild(
        estimator,
        _decode(network_fields["preprocessing_"], trusted),
        tuple(_decode(network_fields["_example_shape"], trusted)),
        tensors,
        path,
    )
    return estimator


# ---------------------------------------------------------------------------
# Rebuilding the network
# ---------------------------------------------------------------------------


def _architecture(model: Any, weights: Any) -> nn.Module:
    """The network ``model`` names, with any weights: the file's come next.

    torchvision builds some architectures differently when given weights
    (inception's ``transform_input``, vit_h_14's image size): the builder gets
    the arguments those weights imply (``offline_builder_kwargs``) instead of
    the weights, so nothing is downloaded.
    """
    if isinstance(model, str) and model.startswith(TIMM_PREFIX):
        return _build_timm(model[len(TIMM_PREFIX) :], None)
    if isinstance(model, str):
        kwargs = {}
        if not (weights is None or _is_weights_file(weights)):
            enum_member = _resolve_torchvision_weights(model, weights)
            if enum_member is not None:
                kwargs = offline_builder_kwargs(model, enum_member)
        return torchvision.models.get_model(model, weights=None, **kwargs)
    module = model()
    if not isinstance(module, nn.Module):
        raise TypeError(
            f"model is a callable that returned {type(module).__name__}; it "
            "must return a torch.nn.Module."
        )
    return module


def _rebuild(
    estimator: Any,
    preprocessing: Preprocessing,
    example_shape: tuple[int, ...],
    tensors: dict[str, torch.Tensor],
    path: str,
) -> None:
    """Rebuild the network and what fit derived from it, then load the tensors.

    The network is built from the parameters and traced on a blank image of
    the size fit saw; then the estimator's ``_rebuild_for_load(example)``
    hook redoes its own structural steps (taps, a classifier head), before
    the saved tensors are loaded strictly.
    """
    estimator._fitted_params = {
        name: snapshot_value(getattr(estimator, name))
        for name in estimator._inference_params
    }
    device = resolve_device(estimator.device)
    module = _architecture(estimator.model, estimator.weights).eval()
    stem = None
    if example_shape[0] != 3:  # a first convolution fit adapted to the bands
        rgb = torch.zeros((1, 3, *example_shape[1:]))
        # Its shape only (no random draw): the saved tensors fill it.
        stem = adapt_stem(module, example_shape[0], "mean", rgb)
        stem["rule"] = estimator.stem
    module = place(module, device)
    example = torch.zeros((1, *example_shape), device=device)
    # As fit probes it: a network that needs contiguous tensors goes back to
    # the contiguous format here too.
    trace = probe_network(module, example)
    estimator._network = Network(
        module, preprocessing, device, estimator.precision, trace, example_shape, stem
    )
    estimator._rebuild_for_load(example)
    module = estimator._network.module
    expected = module.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    shapes = [
        k for k in expected if k in tensors and tensors[k].shape != expected[k].shape
    ]
    if missing or unexpected or shapes:
        raise ValueError(
            f"The tensors in {path!r} do not fit the network rebuilt from its "
            f"parameters (missing {missing[:3]}, unexpected {unexpected[:3]}, "
            f"other shapes {shapes[:3]}): the model's code changed since it was "
            "saved."
        )
    with torch.no_grad():
        module.load_state_dict(tensors, strict=True)
    place(module.eval(), device)
