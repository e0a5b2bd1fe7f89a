"""The method registry: packaged methods, their trained weights, and the networks loaded from them."""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from regnet_zoo import METHODS
from regnet_zoo.data.preprocess import Preprocessing
from regnet_zoo.errors import RegistrationInputError

__all__ = [
    "check_method",
    "packaged_methods",
    "weights_path",
    "resolve_device",
    "load_method",
    "load_network",
    "bundle_preprocessing",
]


def check_method(name: str) -> str:
    if name not in METHODS:
        raise RegistrationInputError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}")
    from regnet_zoo import bundle_dir

    try:
        bundle_dir(name)  # the packaged bundle, or the source checkout's
    except FileNotFoundError as err:
        raise RegistrationInputError(str(err)) from err
    return name


def packaged_methods() -> list[str]:
    from regnet_zoo import bundle_dir

    found = []
    for m in METHODS:
        try:
            bundle_dir(m)
        except FileNotFoundError:
            continue
        found.append(m)
    return found


def weights_path(name: str, weights: str | os.PathLike | None) -> Path:
    from regnet_zoo import bundle_home

    path = Path(weights) if weights is not None else bundle_home(name) / "models" / "model.pt"
    if not path.is_file():
        default = "" if weights is not None else " (the bundle's default)"
        raise FileNotFoundError(
            f"no trained {name} model at {path}{default}; train one with `regnet-zoo train {name} "
            f"--dataset-dir DIR` (or pass --weights PATH)"
        )
    return path


def resolve_device(device: str | torch.device) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RegistrationInputError("device 'cuda' requested but CUDA is not available; use --device cpu")
    return device


def load_network(
    name: str, weights: str | os.PathLike | None, device: torch.device, spatial_dims: int | None
) -> tuple[nn.Module, dict[str, Any] | None]:
    """(network in eval mode on ``device``, the weights' metadata or None): see
    :func:`regnet_zoo.bundle.load_bundle_weights`; ``spatial_dims`` of the images to check them against."""
    from regnet_zoo.bundle import load_bundle_weights

    check_method(name)
    path = weights_path(name, weights)
    return load_bundle_weights(name, path, device, spatial_dims=spatial_dims)


@functools.lru_cache(maxsize=4)
def cached_network(
    name: str, path: str, mtime_ns: int, device: str, spatial_dims: int
) -> tuple[nn.Module, dict[str, Any] | None]:
    """:func:`load_network` for :func:`register`, kept across calls (benchmarks register many pairs in one
    process); ``mtime_ns`` makes retrained weights load afresh."""
    return load_network(name, path, torch.device(device), spatial_dims)


def load_method(
    name: str, weights: str | os.PathLike | None = None, device: str | torch.device = "cpu"
) -> nn.Module:
    """The trained network of method ``name`` in eval mode on ``device``.

    ``weights`` default to ``bundles/<name>/models/model.pt``. Self-describing weights
    (:mod:`regnet_zoo.weights`) rebuild the network they were trained with (its recorded class and
    arguments; ``network.regnet_zoo_metadata`` holds the metadata); a plain state dict is loaded into the
    bundle's ``network_def`` (``spatial_dims`` from the kernels), with a warning. Raises
    ``RegistrationInputError`` for an unknown / unpackaged method or weights of another method, and
    ``FileNotFoundError`` (saying how to train one) when there are no weights.
    """
    network, meta = load_network(name, weights, resolve_device(device), None)
    network.regnet_zoo_metadata = meta
    return network


def _bundle_parser(name: str, spatial_dims: int, **overrides: Any):
    """The bundle's inference config (its train config when there is none yet)."""
    from regnet_zoo.bundle import bundle_parser

    try:
        return bundle_parser(name, "inference", spatial_dims=spatial_dims, **overrides)
    except FileNotFoundError:
        return bundle_parser(name, "train", spatial_dims=spatial_dims, **overrides)


def bundle_preprocessing(name: str, spatial_dims: int, **overrides: Any) -> Preprocessing:
    """The bundle's preprocessing (:class:`~regnet_zoo.data.preprocess.Preprocessing`).

    Read from the ``transforms`` (``pair_transforms`` arguments) of its inference config: ``normalize``,
    ``percentiles``, ``ct_window``, ``spatial_size`` (the working grid, ``image_size`` in the bundles; None =
    the fixed image's own grid), ``pre_align``; ``pad_multiple``: the top-level ``pad_multiple`` or
    ``transforms#pad_multiple`` (``null``: no padding, the network takes any size),
    :data:`~regnet_zoo.data.preprocess.DEFAULT_PAD_MULTIPLE` when neither is set. ``overrides``: config
    overrides (``image_size=[64, 64]``).
    """
    parser = _bundle_parser(name, spatial_dims, **overrides)
    raw = parser.get("transforms")
    transforms = raw if isinstance(raw, dict) else {}

    def parsed(key: str) -> Any:
        return parser.get_parsed_content(f"transforms#{key}")

    values = {k: parsed(k) for k in ("normalize", "percentiles", "ct_window", "pre_align") if k in transforms}
    if "pad_multiple" in parser.config:
        values["pad_multiple"] = parser.get_parsed_content("pad_multiple")
    elif "pad_multiple" in transforms:
        values["pad_multiple"] = parsed("pad_multiple")
    size = parsed("spatial_size") if "spatial_size" in transforms else None
    if size is not None:
        values["image_size"] = [size] * spatial_dims if isinstance(size, int) else size
    try:
        prep = Preprocessing(**values)
        prep.size_for(spatial_dims)
    except ValueError as err:
        raise RegistrationInputError(f"the {name} bundle's preprocessing: {err}") from None
    return prep
