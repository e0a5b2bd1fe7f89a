"""Self-describing weights: a trained model file carries what it takes to rebuild and use the network.

``model.pt`` (``torch.save``) holds ``{"model": state_dict, "regnet_zoo": metadata}`` with metadata (plain
Python, loadable with ``weights_only=True``)::

    {"format": 1, "method": "ddrnet",
     "network": {"target": "regnet_zoo.networks.ddrnet.DDRNet", "args": {...resolved constructor args...}},
     "spatial_dims": 3, "in_channels": 1,
     "preprocessing": {"normalize": "minmax", "percentiles": [1, 99], "ct_window": [-1000, 1000],
                       "image_size": [48, 56, 64] | null, "pad_multiple": null, "pre_align": null},
     "trained_on": {"dataset": "OASIS", "dataset_dir": "...", "pairs": 20, "iterations": 300, "epochs": 15,
                    "grid": [160, 192, 224], "spacing": [1, 1, 1]},
     "versions": {"regnet_zoo": "0.1.0", "monai": "...", "torch": "..."}, "created": "2026-..."}

``trained_on.grid`` / ``spacing``: the first training image's native grid. MONAI's ``CheckpointLoader``
loads such a file like a checkpoint with a ``model`` entry, so bundle configs read it unchanged. A plain state
dict (older files) still loads, with a warning that the bundle's current config is assumed.
"""

from __future__ import annotations

import datetime
import importlib
import json
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from regnet_zoo.errors import NonFiniteError, RegistrationInputError

__all__ = [
    "META_KEY",
    "WEIGHTS_FORMAT",
    "read_weights",
    "save_weights",
    "build_network",
    "weights_metadata",
    "resolve_config",
    "check_weights_fit",
]

META_KEY = "regnet_zoo"
WEIGHTS_FORMAT = 1
#: a working grid this many times larger / smaller than the trained one along an axis gets a warning
GRID_RATIO_WARNING = 1.5


def _strip_prefix(state: dict[str, Any]) -> dict[str, Any]:
    # weights saved from a DistributedDataParallel / compiled network carry a prefix
    for prefix in ("module.", "_orig_mod."):
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    return state


def read_weights(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """(state dict, metadata or None) of a weights file: a self-describing file, a trainer checkpoint with a
    ``model`` entry or a plain state dict. ``RegistrationInputError`` when it cannot be read."""
    path = Path(path)
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise RegistrationInputError(f"{path}: cannot read weights ({type(err).__name__}: {err})") from err
    meta = None
    if isinstance(saved, dict) and isinstance(saved.get("model"), dict):
        meta = saved.get(META_KEY) if isinstance(saved.get(META_KEY), dict) else None
        saved = saved["model"]
    if not isinstance(saved, dict) or not all(isinstance(v, torch.Tensor) for v in saved.values()):
        raise RegistrationInputError(f"{path}: not a state dict or a checkpoint with a 'model' entry")
    return _strip_prefix(saved), meta


def save_weights(
    path: str | os.PathLike, network: nn.Module, metadata: Mapping[str, Any], overwrite: bool = False
) -> Path:
    """Write ``{"model": network.state_dict(), "regnet_zoo": metadata}`` to ``path`` (via a temporary file);
    an existing file is replaced only with ``overwrite`` (``RegistrationInputError`` otherwise)."""
    from regnet_zoo.data.io import atomic_write

    module = network.module if hasattr(network, "module") else network  # DistributedDataParallel
    state = {k: v.detach().cpu() for k, v in module.state_dict().items()}
    check_finite(state, Path(path).name)
    payload = {"model": state, META_KEY: dict(metadata)}
    return atomic_write(Path(path), lambda tmp: torch.save(payload, tmp), overwrite)


def _non_finite_keys(obj: Any, prefix: str = "") -> list[str]:
    """Keys (dotted paths) of the floating tensors in a nested state dict that hold NaN or inf."""
    if isinstance(obj, torch.Tensor):
        return [prefix or "tensor"] if obj.is_floating_point() and not torch.isfinite(obj).all() else []
    if isinstance(obj, Mapping):
        return [k for key, v in obj.items() for k in _non_finite_keys(v, f"{prefix}.{key}".lstrip("."))]
    if isinstance(obj, list | tuple):
        return [k for i, v in enumerate(obj) for k in _non_finite_keys(v, f"{prefix}[{i}]")]
    return []


def check_finite(obj: Any, name: str) -> None:
    """:class:`~regnet_zoo.errors.NonFiniteError` when a floating tensor in ``obj`` (nested dicts / lists)
    holds NaN or inf: weights like that are never written."""
    bad = _non_finite_keys(obj)
    if bad:
        raise NonFiniteError(f"not writing {name}: non-finite values in {', '.join(bad[:3])}")


def resolve_config(value: Any, references: Mapping[str, Any]) -> Any:
    """A raw config value (e.g. ``%network_def`` of a bundle) with ``"@name"`` strings replaced by
    ``references[name]``; other values are kept (``RegistrationInputError`` for an unresolved reference)."""
    if isinstance(value, Mapping):
        return {str(k): resolve_config(v, references) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [resolve_config(v, references) for v in value]
    if isinstance(value, str) and value.startswith("@"):
        name = value[1:]
        if name not in references:
            raise RegistrationInputError(f"cannot record the config reference {value!r} (not in references)")
        return resolve_config(references[name], references)
    if isinstance(value, str) and value.startswith("$"):
        raise RegistrationInputError(f"cannot record the config expression {value!r} in the weights")
    return value


def _versions() -> dict[str, str]:
    import monai

    from regnet_zoo import __version__

    # str(): torch.__version__ is a str subclass that weights_only loading refuses
    return {"regnet_zoo": str(__version__), "monai": str(monai.__version__), "torch": str(torch.__version__)}


def weights_metadata(
    method: str,
    network_config: Mapping[str, Any],
    preprocessing: Mapping[str, Any],
    trained_on: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The metadata dict (module docstring) from a resolved ``network_def`` config (with ``_target_``) and
    :meth:`regnet_zoo.data.preprocess.Preprocessing.to_dict`."""
    config = dict(network_config)
    target = config.pop("_target_", None)
    if not isinstance(target, str):
        raise RegistrationInputError("network_def has no _target_ to record")
    args = {k: v for k, v in config.items() if not k.startswith("_")}
    meta = {
        "format": WEIGHTS_FORMAT,
        "method": method,
        "network": {"target": target, "args": args},
        "spatial_dims": int(args.get("spatial_dims", 0)) or None,
        "in_channels": int(args.get("in_channels", 1)),
        "preprocessing": dict(preprocessing),
        "trained_on": dict(trained_on or {}),
        "versions": _versions(),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    from regnet_zoo.data.io import json_ready

    meta = json_ready(meta)  # plain Python only: the file loads with weights_only=True
    try:
        json.dumps(meta, allow_nan=False)
    except (TypeError, ValueError) as err:
        raise RegistrationInputError(f"cannot record the network / preprocessing settings ({err})") from err
    return meta


def _locate(target: str):
    module_name, _, name = target.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError) as err:
        raise RegistrationInputError(f"the weights' network {target!r} cannot be imported ({err})") from err


def build_network(metadata: Mapping[str, Any], state: Mapping[str, torch.Tensor] | None = None) -> nn.Module:
    """The network described by ``metadata`` (its recorded class and arguments), with ``state`` loaded."""
    network = _locate(metadata["network"]["target"])(**metadata["network"]["args"])
    if state is not None:
        try:
            network.load_state_dict(state)
        except RuntimeError as err:
            raise RegistrationInputError(
                f"the weights do not fit their recorded network ({str(err).splitlines()[0]})"
            ) from err
    return network


def check_weights_fit(
    metadata: Mapping[str, Any] | None,
    source: str,
    *,
    method: str | None = None,
    spatial_dims: int | None = None,
    in_channels: int | None = None,
    grid: Sequence[int] | None = None,
) -> None:
    """Clear errors for weights used on data they do not fit (another method, 2D vs 3D, channels) and a
    warning when weights trained on the data's native grid (no ``preprocessing.image_size``) run on a grid
    more than :data:`GRID_RATIO_WARNING` times larger or smaller along an axis than ``trained_on.grid``."""
    if metadata is None:
        return
    if method is not None and metadata.get("method") not in (None, method):
        raise RegistrationInputError(
            f"{source}: the weights are for method {metadata['method']!r}, not {method!r}"
        )
    dims = metadata.get("spatial_dims")
    if spatial_dims is not None and dims is not None and int(dims) != int(spatial_dims):
        raise RegistrationInputError(
            f"{source}: the weights are for {dims}D images but the images are {spatial_dims}D"
        )
    channels = metadata.get("in_channels")
    if in_channels is not None and channels is not None and int(channels) != int(in_channels):
        raise RegistrationInputError(
            f"{source}: the weights take {channels}-channel images, got {in_channels} channels"
        )
    if (metadata.get("preprocessing") or {}).get("image_size"):
        return  # the images are resampled to the trained working grid
    trained = (metadata.get("trained_on") or {}).get("grid")
    if trained and grid and len(trained) == len(grid):
        ratios = [max(a / b, b / a) for a, b in zip(grid, trained, strict=True) if a > 0 and b > 0]
        if ratios and max(ratios) > GRID_RATIO_WARNING:
            warnings.warn(
                f"{source}: the network was trained on a {tuple(trained)} grid but runs on {tuple(grid)}; "
                "its capture range and features may not carry over (set image_size when training)",
                stacklevel=3,
            )
