"""Build the network a user asked for and work out how to preprocess for it.

``model`` is a torchvision model name, ``"timm/<name>"`` (the optional timm
extra), a ``torch.nn.Module`` or a zero-argument callable that returns one.
``weights`` is None, "DEFAULT", a torchvision weights enum or its name, or the
path of a state-dict file.
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import math
import os
import socket
from collections.abc import Iterator
from numbers import Integral
from typing import Any

import torch
import torchvision
from sklearn.utils import check_random_state
from torch import nn
from torchvision.models import WeightsEnum
from torchvision.transforms import InterpolationMode

from ._images import Preprocessing

# The convention of torchvision's and timm's ImageNet checkpoints: the fallback
# for a user's own module when neither the weights nor the user say otherwise.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


#: Environment variable: seconds a weight download waits for the server to
#: answer (each connection attempt and each read), ``0`` for no limit.
DOWNLOAD_TIMEOUT_ENV = "SKLEARN_CNN_DOWNLOAD_TIMEOUT"
#: Without the variable: a silent connection (a stalled proxy) fails, not hangs.
DEFAULT_DOWNLOAD_TIMEOUT = 30.0


def download_timeout() -> float | None:
    """Seconds a download may wait for an answer (None: no limit), from
    ``SKLEARN_CNN_DOWNLOAD_TIMEOUT``, else ``DEFAULT_DOWNLOAD_TIMEOUT``."""
    value = os.environ.get(DOWNLOAD_TIMEOUT_ENV, "").strip()
    if not value:
        return DEFAULT_DOWNLOAD_TIMEOUT
    try:
        seconds = float(value)
    except ValueError:
        raise ValueError(
            f"{DOWNLOAD_TIMEOUT_ENV}={value!r} is not a number of seconds (use "
            "e.g. 120, or 0 to wait without limit)."
        ) from None
    return seconds if seconds > 0 else None


@contextlib.contextmanager
def bounded_downloads() -> Iterator[float | None]:
    """Give sockets opened inside the block (torch.hub's downloads have none) a
    timeout of ``download_timeout()``, unless the program set a default of its
    own; yields the timeout that applies."""
    previous = socket.getdefaulttimeout()
    timeout = download_timeout() if previous is None else previous
    if previous is not None or timeout is None:
        yield timeout
        return
    socket.setdefaulttimeout(timeout)
    try:
        yield timeout
    finally:
        socket.setdefaulttimeout(previous)


def _timed_out(exc: BaseException) -> bool:
    """Whether a download failed on a timeout (urllib wraps it in URLError)."""
    reason = getattr(exc, "reason", None)
    return (
        isinstance(exc, TimeoutError)
        or isinstance(reason, TimeoutError)
        or type(exc).__name__.endswith("Timeout")  # httpx's ReadTimeout, ...
    )


def _download_failure(what: str, url: str, exc: BaseException, timeout) -> str:
    """The message of a failed weight download: the URL, why, and what to do."""
    text = str(exc).splitlines()[0] if str(exc) else ""
    why = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    if _timed_out(exc) and timeout is not None:
        why = (
            f"no answer within {timeout:g} s; set {DOWNLOAD_TIMEOUT_ENV} to wait longer"
        )
    return (
        f"Could not download {what} from {url} ({why}). Without internet access, "
        "download the file on another machine and pass its path as weights= "
        "(a state-dict file, loaded offline)."
    )


def _close(name: str, options: list[str], n: int = 5) -> str:
    matches = difflib.get_close_matches(name, options, n=n, cutoff=0.5)
    return f" Did you mean {', '.join(map(repr, matches))}?" if matches else ""


def _torchvision_weights_enum(name: str) -> type[WeightsEnum] | None:
    try:
        return torchvision.models.get_model_weights(name)
    except (ValueError, KeyError):
        return None


def _resolve_torchvision_weights(name: str, weights: Any) -> WeightsEnum | None:
    """A torchvision enum member for ``weights``, or None if it is not one."""
    if isinstance(weights, WeightsEnum):
        return weights
    if not isinstance(weights, str):
        return None
    enum = _torchvision_weights_enum(name)
    if enum is None:
        return None
    prefix, _, key = weights.rpartition(".")  # "ResNet18_Weights.IMAGENET1K_V1" too
    if prefix and prefix != enum.__name__:  # another model's weights
        return None
    if key == "DEFAULT":
        return enum.DEFAULT
    return enum.__members__.get(key)


def _is_weights_file(weights: Any) -> bool:
    return isinstance(weights, os.PathLike) or (
        isinstance(weights, str) and os.path.isfile(weights)
    )


def load_state_dict_file(module: nn.Module, path: str | os.PathLike) -> None:
    """Load a state-dict file into ``module`` strictly, with a clear error."""
    path = os.fspath(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ValueError(f"Weights file not found: {path!r}.") from None
    except Exception as exc:  # torch raises many types for a bad file
        raise ValueError(
            f"Cannot read weights file {path!r} as a state dict: "
            f"{type(exc).__name__}: {str(exc).splitlines()[0]}. It must be a file "
            "written by torch.save(model.state_dict(), path)."
        ) from None
    # Training checkpoints often wrap the state dict.
    for key in ("state_dict", "model_state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict):
        raise ValueError(
            f"Weights file {path!r} holds a {type(state).__name__}, not a state "
            "dict. Save it with torch.save(model.state_dict(), path)."
        )
    expected = module.state_dict()
    # A list or number where a tensor belongs would reach load_state_dict's
    # RuntimeError; extra state that is no tensor in the model may be anything.
    not_tensors = [
        f"{k!r} ({type(state[k]).__name__})"
        for k, v in expected.items()
        if isinstance(v, torch.Tensor)
        and k in state
        and not isinstance(state[k], torch.Tensor)
    ]
    if not_tensors:
        more = f" (+{len(not_tensors) - 3} more)" if len(not_tensors) > 3 else ""
        raise ValueError(
            f"Weights file {path!r} holds no tensor at {', '.join(not_tensors[:3])}"
            f"{more}, where the model {type(module).__name__} has one. Save the "
            "file with torch.save(model.state_dict(), path), or convert those "
            "values with torch.as_tensor before saving."
        )
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state
        and hasattr(state[k], "shape")
        and tuple(state[k].shape) != tuple(v.shape)
    ]
    if missing or unexpected or mismatched:
        parts = []
        for label, keys in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("shape mismatches", mismatched),
        ):
            if keys:
                more = f" (+{len(keys) - 3} more)" if len(keys) > 3 else ""
                parts.append(f"{label}: {', '.join(keys[:3])}{more}")
        raise ValueError(
            f"Weights file {path!r} does not fit the model {type(module).__name__}"
            f" ({'; '.join(parts)}). Pass the architecture the file was saved "
            "from, or the matching weights file."
        )
    module.load_state_dict(state, strict=True)


def offline_builder_kwargs(name: str, weights: WeightsEnum) -> dict[str, Any]:
    """The arguments torchvision's builder ``name`` derives from ``weights``
    (classes, inception's input transform, ViTs' image size), so that
    ``get_model(name, weights=None, **kwargs)`` builds the same architecture
    without downloading (torchvision 0.19 to 0.29)."""
    meta = weights.meta
    kwargs: dict[str, Any] = {}
    if meta.get("categories"):
        kwargs["num_classes"] = len(meta["categories"])
    if name in ("googlenet", "inception_v3"):
        kwargs.update(transform_input=True, aux_logits=False, init_weights=False)
    elif name.startswith("vit_"):
        kwargs["image_size"] = meta["min_size"][0]
    elif name.startswith("maxvit_"):
        kwargs["input_size"] = meta["min_size"]
    return kwargs


def _build_torchvision(name: str, weights: Any) -> tuple[nn.Module, WeightsEnum | None]:
    available = torchvision.models.list_models()
    if name not in available:
        raise ValueError(
            f"Unknown model {name!r}: not a torchvision model name."
            f"{_close(name, available)}"
            " Pass a torchvision name (see torchvision.models.list_models()), a "
            "torch.nn.Module, or a callable that builds one."
        )
    enum_member = _resolve_torchvision_weights(name, weights)
    if weights is None or _is_weights_file(weights):
        module = torchvision.models.get_model(name, weights=None)
        if weights is not None:
            load_state_dict_file(module, weights)
        return module, None
    if enum_member is None:
        enum = _torchvision_weights_enum(name)
        valid = ["DEFAULT", *enum.__members__] if enum is not None else []
        valid = list(dict.fromkeys(valid))  # __members__ lists DEFAULT too
        raise ValueError(
            f"weights={weights!r} is neither a weights name of {name!r} "
            f"(valid: {', '.join(valid) or 'none'}) nor an existing file."
        )
    try:
        with bounded_downloads() as timeout:
            module = torchvision.models.get_model(name, weights=enum_member)
    except (OSError, RuntimeError) as exc:  # URLError and timeouts are OSErrors
        raise RuntimeError(
            _download_failure(
                f"the weights {enum_member} for {name!r}", enum_member.url, exc, timeout
            )
        ) from None
    return module, enum_member


TIMM_PREFIX = "timm/"


def _build_timm(name: str, weights: Any) -> nn.Module:
    """``timm.create_model(name)``: random weights, a state-dict file, or
    timm's own pretrained weights (downloaded from the Hugging Face Hub)."""
    try:
        import timm
    except ImportError:
        raise ImportError(
            f"model={TIMM_PREFIX + name!r} needs timm: pip install "
            "'sklearn-cnn[timm]' (or pip install timm)."
        ) from None
    if not timm.is_model(name):
        raise ValueError(
            f"Unknown timm model {name!r}.{_close(name, timm.list_models())} "
            "timm.list_models() lists the names."
        )
    if weights is not None and not _is_weights_file(weights) and weights != "DEFAULT":
        raise ValueError(
            f"weights={weights!r} for a timm model: use None (random weights), "
            "'DEFAULT' (timm's pretrained weights, downloaded from the Hugging "
            "Face Hub) or the path of a state-dict file."
            + (" (No such file exists.)" if isinstance(weights, str) else "")
        )
    pretrained = isinstance(weights, str) and weights == "DEFAULT"
    with bounded_downloads() as timeout:
        if pretrained:
            _check_hub_answers(name, timeout)
        try:
            module = timm.create_model(name, pretrained=pretrained)
        except (OSError, RuntimeError) as exc:  # no network, no such checkpoint
            raise RuntimeError(_timm_failure(name, exc, timeout)) from None
    if _is_weights_file(weights):
        load_state_dict_file(module, weights)
    return module


def _timm_url(name: str) -> str:
    """Where timm fetches the pretrained weights of ``name`` (best effort)."""
    try:
        from timm.models import get_pretrained_cfg

        cfg = get_pretrained_cfg(name)
    except Exception:  # an unknown tag, an older timm
        cfg = None
    if cfg is not None and getattr(cfg, "hf_hub_id", None):
        return f"https://huggingface.co/{cfg.hf_hub_id}"
    if cfg is not None and getattr(cfg, "url", None):
        return cfg.url
    return f"the Hugging Face Hub (timm/{name})"


def _check_hub_answers(name: str, timeout: float | None) -> None:
    """Fail within ``timeout`` when timm's weights must come from a Hugging Face
    Hub that does not answer (huggingface_hub retries for minutes); nothing is
    asked for cached weights, ``HF_HUB_OFFLINE`` or a URL checkpoint."""
    if timeout is None:
        return
    try:
        from huggingface_hub import constants, try_to_load_from_cache
        from huggingface_hub.utils import get_session
        from timm.models import get_pretrained_cfg

        repo = getattr(get_pretrained_cfg(name), "hf_hub_id", None)
    except Exception:  # an older huggingface_hub or timm: their own timeouts
        return
    if not repo or constants.HF_HUB_OFFLINE:
        return
    repo_id, _, revision = repo.partition("@")
    for filename in ("model.safetensors", "pytorch_model.bin"):
        if isinstance(try_to_load_from_cache(repo_id, filename, revision or None), str):
            return
    try:
        get_session().head(constants.ENDPOINT, timeout=timeout)
    except Exception as exc:  # httpx's errors are not OSErrors
        raise RuntimeError(_timm_failure(name, exc, timeout)) from None


def _timm_failure(name: str, exc: BaseException, timeout: float | None) -> str:
    what = f"timm's pretrained weights for {name!r}"
    return (
        _download_failure(what, _timm_url(name), exc, timeout)
        + " Or use weights=None (random weights)."
    )


def build_architecture(model: Any, weights: Any) -> nn.Module:
    """The network ``model`` names, without its weights (a save file's come
    next), built offline (``offline_builder_kwargs``)."""
    if isinstance(model, str) and model.startswith(TIMM_PREFIX):
        return _build_timm(model[len(TIMM_PREFIX) :], None)
    if isinstance(model, str):
        kwargs = {}
        if not (weights is None or _is_weights_file(weights)):
            enum_member = _resolve_torchvision_weights(model, weights)
            if enum_member is not None:
                kwargs = offline_builder_kwargs(model, enum_member)
        return torchvision.models.get_model(model, weights=None, **kwargs)
    return _call_builder(model)


def _call_builder(model: Any) -> nn.Module:
    module = model()
    if not isinstance(module, nn.Module):
        raise TypeError(
            f"model is a callable that returned {type(module).__name__}; it "
            "must return a torch.nn.Module."
        )
    return module


@contextlib.contextmanager
def seeded(random_state: Any) -> Iterator[None]:
    """Seed torch's CPU generator inside the block (random initialisation),
    leaving the global state as it was; nothing for ``random_state=None``.
    CUDA's generators are left alone, so that nothing initialises CUDA."""
    if random_state is None:
        yield
        return
    seed = int(check_random_state(random_state).randint(2**31 - 1))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def build_model(model: Any, weights: Any) -> tuple[nn.Module, WeightsEnum | None]:
    """The module with its weights loaded, and the torchvision enum if any (a
    module of the user's own is copied, never changed)."""
    if isinstance(model, str) and model.startswith(TIMM_PREFIX):
        return _build_timm(model[len(TIMM_PREFIX) :], weights), None
    if isinstance(model, str):
        return _build_torchvision(model, weights)
    if isinstance(model, nn.Module):
        module = copy.deepcopy(model)
    elif callable(model):
        module = _call_builder(model)
    else:
        raise TypeError(
            f"model must be a torchvision model name, a torch.nn.Module or a "
            f"callable that returns one; got {type(model).__name__}."
        )
    # For a module of the user's own, "DEFAULT" and None keep the weights it has.
    if weights is None or (isinstance(weights, str) and weights == "DEFAULT"):
        return module, None
    if _is_weights_file(weights):
        load_state_dict_file(module, weights)
        return module, None
    raise ValueError(
        f"weights={weights!r} cannot be used with a module of your own: pass the "
        "path of a state-dict file, or None/'DEFAULT' to keep the module's weights."
        + ("" if not isinstance(weights, str) else " (No such file exists.)")
    )


def check_image_size(value: Any) -> None:
    """The one check of a user's ``image_size``: None, "native", a positive
    int or a (height, width) pair of them."""

    def side(v: Any) -> bool:
        return isinstance(v, Integral) and not isinstance(v, bool) and v > 0

    if value is None or (isinstance(value, str) and value == "native") or side(value):
        return
    if isinstance(value, (tuple, list)) and len(value) == 2 and all(map(side, value)):
        return
    raise ValueError(
        f"image_size must be an int, (height, width) or 'native'; got {value!r}."
    )


def _as_hw(size: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    if isinstance(size, Integral):  # np.int64 too, as the constraints allow
        return (int(size), int(size))
    if len(size) == 1:
        return (int(size[0]), int(size[0]))
    return (int(size[0]), int(size[1]))


class _TimmMeta:
    """timm's ``pretrained_cfg`` in the shape of torchvision's transforms:
    resize the shorter side to ``size / crop_pct``, then centre crop."""

    _MODES = {
        "bicubic": InterpolationMode.BICUBIC,
        "bilinear": InterpolationMode.BILINEAR,
        "nearest": InterpolationMode.NEAREST,
    }

    def __init__(self, cfg: dict) -> None:
        _, h, w = cfg.get("input_size", (3, 224, 224))
        crop_pct = cfg.get("crop_pct") or 1.0
        self.crop_size = [int(h), int(w)]
        self.resize_size = [int(math.floor(min(h, w) / crop_pct))]
        self.interpolation = self._MODES.get(
            cfg.get("interpolation"), InterpolationMode.BILINEAR
        )
        self.mean = tuple(cfg.get("mean", IMAGENET_MEAN))
        self.std = tuple(cfg.get("std", IMAGENET_STD))


def _torchvision_meta(model: str, module: nn.Module | None) -> Any:
    """The transforms of a torchvision architecture's default weights (a static
    table, nothing downloads), or of its weights for the size it was built
    for (the ViTs' ``image_size``)."""
    enum = _torchvision_weights_enum(model)
    if enum is None:
        return None
    size = getattr(module, "image_size", None)
    if isinstance(size, int):
        for member in enum:
            meta = member.transforms()
            if list(getattr(meta, "crop_size", [])) == [size]:
                return meta
    return enum.DEFAULT.transforms()


def resolve_preprocessing(
    model: Any,
    weights_enum: WeightsEnum | None,
    image_size: Any,
    mean: Any,
    std: Any,
    module: nn.Module | None = None,
) -> Preprocessing:
    """Preprocessing from the user's parameters, else the weights' metadata
    (a timm model's ``pretrained_cfg``; for a state-dict file, the default
    weights' of the torchvision architecture)."""
    check_image_size(image_size)
    meta = None
    cfg = getattr(module, "pretrained_cfg", None)
    if weights_enum is not None:
        meta = weights_enum.transforms()
    elif isinstance(cfg, dict) and "input_size" in cfg:
        meta = _TimmMeta(cfg)
    elif isinstance(model, str):
        meta = _torchvision_meta(model, module)

    interpolation = getattr(meta, "interpolation", InterpolationMode.BILINEAR)
    if image_size is None:
        if meta is not None and hasattr(meta, "crop_size"):
            resize, crop = int(meta.resize_size[0]), _as_hw(meta.crop_size)
        else:
            resize, crop = None, None
    elif image_size == "native":
        resize, crop = None, None
    else:
        resize, crop = _as_hw(image_size), None
    if mean is None:
        mean = tuple(getattr(meta, "mean", IMAGENET_MEAN))
    if std is None:
        std = tuple(getattr(meta, "std", IMAGENET_STD))
    return Preprocessing(
        resize=resize,
        crop=crop,
        mean=tuple(float(m) for m in mean),
        std=tuple(float(s) for s in std),
        interpolation=interpolation,
    )
