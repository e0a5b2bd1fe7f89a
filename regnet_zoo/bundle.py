"""Helpers to run, load, verify and export the method bundles in ``bundles/<method>/`` (all five alike).

Bundle layout and config keys: ``bundles/README.md``. Configs are layered as in the MONAI model zoo:
``evaluate`` runs ``inference.yaml`` + ``evaluate.yaml``, ``multi_gpu_train`` runs ``train.yaml`` +
``multi_gpu_train.yaml``. Overrides are MONAI config ids (``epochs=2``, ``network_def#overlap=4``); ``#`` may
be written ``__`` in Python keyword arguments (``network_def__overlap=4``).

Offline metadata check (MONAI's ``verify_metadata`` downloads the schema named in ``metadata.json`` unless
the file given as ``filepath`` exists; :data:`SCHEMA_PATH` is shipped with the package)::

    python -m monai.bundle verify_metadata --meta_file bundles/ddrnet/metadata.json \\
        --filepath regnet_zoo/schema/meta_schema.json
"""

from __future__ import annotations

import difflib
import inspect
import json
import os
import pydoc
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from monai.bundle import ConfigParser
from torch import nn

from regnet_zoo import bundle_dir
from regnet_zoo.errors import RegistrationInputError

__all__ = [
    "BUNDLE_FILES",
    "CONFIG_LAYERS",
    "SCHEMA_PATH",
    "config_files",
    "bundle_parser",
    "bundle_metadata",
    "run_bundle",
    "check_overrides",
    "load_bundle_network",
    "load_bundle_weights",
    "verify_bundle_metadata",
    "export_bundle",
]

#: the files every bundle has (the convention in ``bundles/README.md``)
BUNDLE_FILES = (
    "train.yaml",
    "inference.yaml",
    "evaluate.yaml",
    "multi_gpu_train.yaml",
    "metadata.json",
    "README.md",
    "logging.conf",
)

#: the config files (in ``bundles/<method>/``) that make up each runnable config, base first
CONFIG_LAYERS: dict[str, tuple[str, ...]] = {
    "train": ("train.yaml",),
    "inference": ("inference.yaml",),
    "evaluate": ("inference.yaml", "evaluate.yaml"),
    "multi_gpu_train": ("train.yaml", "multi_gpu_train.yaml"),
}

#: local copy of the MONAI bundle metadata schema (the fields regnet_zoo bundles use)
SCHEMA_PATH = Path(__file__).resolve().parent / "schema" / "meta_schema.json"


def _overrides(overrides: dict[str, Any]) -> dict[str, Any]:
    """Python keyword arguments to MONAI config ids (``a__b`` -> ``a#b``)."""
    return {key.replace("__", "#"): value for key, value in overrides.items()}


def config_files(name: str, config: str = "train") -> list[str]:
    """Absolute paths of the config files of bundle ``name`` for ``config`` (see :data:`CONFIG_LAYERS`)."""
    if config not in CONFIG_LAYERS:
        raise ValueError(f"unknown bundle config {config!r}; choose one of {', '.join(CONFIG_LAYERS)}")
    root = bundle_dir(name)
    files = [root / f for f in CONFIG_LAYERS[config]]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"bundle {name!r} lacks config file(s) {', '.join(missing)}")
    return [str(f) for f in files]


def bundle_metadata(name: str) -> dict[str, Any]:
    """The bundle's ``metadata.json`` as a dict."""
    return json.loads((bundle_dir(name) / "metadata.json").read_text())


def bundle_parser(name: str, config: str = "train", **overrides: Any) -> ConfigParser:
    """A ``ConfigParser`` holding the bundle's ``config`` (layered), its metadata and ``overrides``.

    ``bundle_root`` defaults to the bundle folder (whatever the working directory).
    """
    parser = ConfigParser()
    parser.read_config(config_files(name, config))
    parser.read_meta(str(bundle_dir(name) / "metadata.json"))
    parser.update({"bundle_root": str(bundle_dir(name)), **_overrides(overrides)})
    return parser


#: keyword arguments of ``monai.bundle.run`` that are not config overrides
_RUN_ARGUMENTS = frozenset({"run_id", "init_id", "final_id", "tracking", "args_file"})
#: keys MONAI reads in any component dict
_RESERVED_KEYS = frozenset({"_target_", "_disabled_", "_requires_", "_desc_", "_mode_"})


def _target_parameters(target: Any) -> set[str] | None:
    """Keyword names the component ``target`` (a ``_target_`` string) accepts; ``None``: any or unknown."""
    if not isinstance(target, str) or target.startswith(("$", "@", "%")):
        return None
    component = pydoc.locate(target)
    if component is None:  # a short MONAI name (``Compose``): MONAI's own lookup
        from monai.bundle.config_item import ComponentLocator

        module = ComponentLocator().get_component_module_name(target)
        component = pydoc.locate(f"{module}.{target}") if isinstance(module, str) else None
    try:
        parameters = inspect.signature(component).parameters.values()  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return None
    return {p.name for p in parameters if p.kind is not inspect.Parameter.VAR_POSITIONAL}


def _unknown_override(content: Any, key: str) -> str | None:
    """Why the config ``content`` has no place for the override id ``key`` (``None``: it has one)."""
    parts = key.replace("::", "#").split("#")
    node = content
    for depth, part in enumerate(parts):
        here = "#".join(parts[:depth])
        if isinstance(node, Mapping):
            if part in node or part in _RESERVED_KEYS:
                node = node.get(part)
                continue
            accepted = _target_parameters(node["_target_"]) if "_target_" in node else set()
            if accepted is None or (part in accepted and depth == len(parts) - 1):
                return None  # a constructor argument the config leaves at its default
            candidates = [str(k) for k in node if k not in _RESERVED_KEYS] + sorted(accepted - set(node))
        elif isinstance(node, list):
            if part.lstrip("-").isdigit() and -len(node) <= int(part) < len(node):
                node = node[int(part)]
                continue
            return f"{here} is a list of {len(node)} items, it has no item {part!r}"
        elif isinstance(node, str) and node.startswith(("$", "@", "%")):
            return None  # an expression or a reference: what it holds is only known when it runs
        else:
            return f"{here} is a value ({node!r}), it has no key {part!r}"
        matches = difflib.get_close_matches(part, candidates, n=3, cutoff=0.6)
        where = f"{here} has no key {part!r}" if here else f"the config has no key {part!r}"
        full = [f"{here}#{m}" if here else m for m in matches]
        return where + (f"; did you mean {' or '.join(full)}?" if full else "")
    return None


def check_overrides(name: str, config: str, overrides: Mapping[str, Any]) -> None:
    """Raise ``RegistrationInputError`` (one line, with the closest keys) for the first override id that the
    bundle's ``config`` does not have: a misspelt ``lerning_rate`` would otherwise be ignored silently.

    Nested ids (``network_def#overlap``) are checked level by level; an argument that a component's
    ``_target_`` accepts but the config leaves at its default is allowed, and so is anything below an
    expression or a reference.
    """
    parser = ConfigParser()
    parser.read_config(config_files(name, config))  # the configs alone: no metadata needed here
    content = parser.get()
    for key in _overrides(dict(overrides)):
        if key in _RUN_ARGUMENTS or key == "bundle_root":
            continue
        problem = _unknown_override(content, key)
        if problem is not None:
            raise RegistrationInputError(f"unknown override {key!r} for bundle {name} ({config}): {problem}")


def run_bundle(name: str, config: str = "train", **overrides: Any) -> None:
    """Run a bundle config with ``monai.bundle.run`` (the same as ``python -m monai.bundle run``).

    Example: ``run_bundle("ddrnet", "train", epochs=2, dataset_dir="../shared/data/oasis3d_pair",
    spatial_dims=3)``. An override the config does not have raises ``RegistrationInputError``
    (:func:`check_overrides`).
    """
    check_overrides(name, config, overrides)
    from monai.bundle import run

    from regnet_zoo.errors import user_error

    root = bundle_dir(name)
    logging_file = root / "logging.conf"
    try:
        run(
            config_file=config_files(name, config),
            meta_file=str(root / "metadata.json"),
            logging_file=str(logging_file) if logging_file.is_file() else None,
            **{"bundle_root": str(root), **_overrides(overrides)},
        )
    except Exception as err:  # MONAI's parser wraps errors of the config's expressions: surface bad input
        inner = user_error(err)
        if inner is None or inner is err:
            raise
        raise inner from None


def _plain(value: Any) -> Any:
    """Tuples as lists (recorded config values are JSON-like)."""
    return [_plain(v) for v in value] if isinstance(value, list | tuple) else value


def _kernel_dims(state: dict[str, torch.Tensor]) -> int | None:
    """2 or 3 from the rank of the convolution kernels of a state dict (None if unclear)."""
    ranks = {v.ndim for v in state.values()}
    return 3 if 5 in ranks else 2 if 4 in ranks else None


def load_bundle_weights(
    name: str,
    weights: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    spatial_dims: int | None = None,
    **overrides: Any,
) -> tuple[nn.Module, dict[str, Any] | None]:
    """(trained network in eval mode, its metadata or None) from a weights file (default
    ``bundles/<name>/models/model.pt``).

    Self-describing weights (:mod:`regnet_zoo.weights`) rebuild the recorded network (class and arguments)
    and are checked against ``name`` and ``spatial_dims`` (``RegistrationInputError``); ``network_def#...``
    overrides must match the recorded arguments (others do not concern the network and are ignored). A plain
    state dict or a trainer checkpoint is loaded into the bundle's ``network_def`` (``train.yaml`` with
    ``overrides``; ``spatial_dims`` from the kernels when not given), with a warning that the config is
    assumed to be the trained one.
    """
    import warnings

    from regnet_zoo.errors import RegistrationInputError
    from regnet_zoo.weights import build_network, check_weights_fit, read_weights

    path = Path(weights) if weights is not None else bundle_dir(name) / "models" / "model.pt"
    if not path.is_file():
        raise FileNotFoundError(
            f"weights {path} not found; train first: regnet-zoo train {name} (or python -m monai.bundle run "
            f"--config_file {bundle_dir(name) / 'train.yaml'})"
        )
    state, meta = read_weights(path)
    if meta is not None:
        check_weights_fit(meta, str(path), method=name, spatial_dims=spatial_dims)
        recorded = meta["network"]["args"]
        for key, value in _overrides(overrides).items():
            arg = key.split("#", 1)[1] if key.startswith("network_def#") else None
            if arg is not None and _plain(recorded.get(arg)) != _plain(value):
                raise RegistrationInputError(
                    f"{path}: the network was trained with {key}={recorded.get(arg)!r}, not {value!r}"
                )
        network = build_network(meta, state)
    else:
        warnings.warn(
            f"{path}: weights without regnet_zoo metadata (a plain state dict): the {name} bundle's current "
            "network_def and preprocessing are assumed to be the trained ones",
            stacklevel=2,
        )
        dims = _kernel_dims(state)
        if spatial_dims is not None and dims is not None and dims != spatial_dims:
            raise RegistrationInputError(
                f"{path}: the weights are for {dims}D images but the images are {spatial_dims}D"
            )
        dims = spatial_dims or dims
        parser = bundle_parser(name, "train", **({"spatial_dims": dims} if dims else {}), **overrides)
        network = parser.get_parsed_content("network_def", instantiate=True)
        try:
            network.load_state_dict(state)
        except RuntimeError as err:  # state dict does not fit the configured network
            raise RegistrationInputError(
                f"{path}: weights do not fit the {name} bundle's network ({str(err).splitlines()[0]})"
            ) from err
    return network.to(device).eval(), meta


def load_bundle_network(
    name: str,
    weights: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    load_weights: bool = True,
    **overrides: Any,
) -> nn.Module:
    """The bundle's ``network_def`` (``train.yaml`` with ``overrides``) with trained weights, in eval mode.

    ``weights``: self-describing weights, a state dict file or a resumable checkpoint (its ``model`` entry);
    default ``bundles/<name>/models/model.pt`` (see :func:`load_bundle_weights`). ``load_weights=False``
    returns the freshly initialised network. Raises ``FileNotFoundError`` with a hint when the weights do not
    exist.
    """
    if not load_weights:
        parser = bundle_parser(name, "train", **overrides)
        network: nn.Module = parser.get_parsed_content("network_def", instantiate=True)
        return network.to(device).eval()
    spatial_dims = overrides.pop("spatial_dims", None)
    return load_bundle_weights(name, weights, device, spatial_dims=spatial_dims, **overrides)[0]


def verify_bundle_metadata(name: str, schema: str | os.PathLike = SCHEMA_PATH) -> None:
    """Validate ``bundles/<name>/metadata.json`` against the local schema, offline (raises ``ValueError``)."""
    from monai.bundle import verify_metadata

    schema = Path(schema)
    if not schema.is_file():  # never let MONAI fall back to downloading
        raise FileNotFoundError(f"metadata schema {schema} not found")
    verify_metadata(meta_file=str(bundle_dir(name) / "metadata.json"), filepath=str(schema))


def export_bundle(
    name: str,
    filepath: str | os.PathLike | None = None,
    input_shape: Sequence[int] | None = None,
    ckpt_file: str | os.PathLike | None = None,
    **overrides: Any,
) -> Path:
    """Export the trained network to TorchScript by tracing (``monai.bundle.ckpt_export --use_trace True``).

    The traced module takes one ``(1, 2C, *S)`` tensor (fixed and moving stacked along channels) of the fixed
    ``input_shape`` (default: from ``metadata.json``) and returns the network's output dict. Default
    ``filepath``: ``bundles/<name>/models/model.ts``.
    """
    from monai.bundle import ckpt_export

    from regnet_zoo.weights import read_weights

    root = bundle_dir(name)
    filepath = Path(filepath) if filepath is not None else root / "models" / "model.ts"
    ckpt = Path(ckpt_file) if ckpt_file is not None else root / "models" / "model.pt"
    # self-describing weights keep the state dict under "model" (regnet_zoo.weights)
    key_in_ckpt = "model" if read_weights(ckpt)[1] is not None else ""
    ckpt_export(
        key_in_ckpt=key_in_ckpt,
        net_id="network_def",
        filepath=str(filepath),
        ckpt_file=str(ckpt),
        meta_file=str(root / "metadata.json"),
        config_file=config_files(name, "train"),
        use_trace=True,
        input_shape=list(input_shape) if input_shape is not None else None,
        # the outputs are a dict of tensors: trace in non-strict mode
        converter_kwargs={"strict": False},
        **{"bundle_root": str(root), **_overrides(overrides)},
    )
    return filepath
