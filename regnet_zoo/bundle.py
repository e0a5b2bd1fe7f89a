"""Run, load, verify, export and generate the method bundles (``bundles/<method>/``, all five alike).

Each bundle has the MONAI model-zoo layout (``configs/``, ``docs/``, ``LICENSE``; ``bundles/README.md``); its
top-level ``train.yaml`` etc. are links to ``configs/``. Configs are layered as in the model zoo: ``evaluate``
runs ``inference.yaml`` + ``evaluate.yaml``, ``multi_gpu_train`` runs ``train.yaml`` +
``multi_gpu_train.yaml``. Overrides are MONAI config ids (``epochs=2``, ``network_def#overlap=4``); ``#`` may
be written ``__`` in Python keyword arguments (``network_def__overlap=4``).

The bundle files are generated from ``bundles/_common`` (shared by all) and ``bundles/_methods/<method>``:
``python -m regnet_zoo.bundle generate`` (``--check``: report drift). Offline metadata check against MONAI's
official schema file (MONAI downloads the schema named in ``metadata.json`` unless ``filepath`` exists)::

    python -m monai.bundle verify_metadata --meta_file bundles/ddrnet/configs/metadata.json \\
        --filepath meta_schema_20240725.json
"""

from __future__ import annotations

import difflib
import inspect
import json
import os
import pydoc
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from monai.bundle import ConfigParser
from torch import nn

from regnet_zoo import bundle_dir, bundle_home
from regnet_zoo.errors import RegistrationInputError

__all__ = [
    "BUNDLE_FILES",
    "CONFIG_LAYERS",
    "SCHEMA_PATH",
    "config_files",
    "bundle_parser",
    "bundle_metadata",
    "default_bundle_root",
    "run_bundle",
    "check_overrides",
    "load_bundle_network",
    "load_bundle_weights",
    "verify_bundle_metadata",
    "export_bundle",
    "generated_files",
    "check_generated",
    "write_generated",
]

#: the files every bundle has (MONAI model-zoo layout, ``bundles/README.md``)
BUNDLE_FILES = (
    "configs/train.yaml",
    "configs/inference.yaml",
    "configs/evaluate.yaml",
    "configs/multi_gpu_train.yaml",
    "configs/metadata.json",
    "configs/logging.conf",
    "docs/README.md",
    "docs/data_license.txt",
    "LICENSE",
)

#: the config files (in ``configs/``) that make up each runnable config, base first
CONFIG_LAYERS: dict[str, tuple[str, ...]] = {
    "train": ("train.yaml",),
    "inference": ("inference.yaml",),
    "evaluate": ("inference.yaml", "evaluate.yaml"),
    "multi_gpu_train": ("train.yaml", "multi_gpu_train.yaml"),
}

#: local copy of the MONAI bundle metadata schema (the fields regnet_zoo bundles use)
SCHEMA_PATH = Path(__file__).resolve().parent / "schema" / "meta_schema.json"


def default_bundle_root(name: str) -> Path:
    """The configs' default ``bundle_root``: where a run reads weights and writes its outputs.

    Run by MONAI's ``ConfigWorkflow`` (``python -m monai.bundle run --config_file F``): the folder of ``F``,
    or its parent when that folder is ``configs/``, so a copied bundle uses its copy from any working
    directory;
    except the installed package's own bundles, which use :func:`regnet_zoo.bundle_home` (user-writable).
    Otherwise (a bare ``ConfigParser``): :func:`regnet_zoo.bundle_home`. ``--bundle_root DIR`` overrides.
    """
    from monai.bundle.workflows import ConfigWorkflow

    frame = sys._getframe(1)
    while frame is not None:
        workflow = frame.f_locals.get("self")
        if isinstance(workflow, ConfigWorkflow):
            root = Path(workflow.config_root_path)
            root = (root.parent if root.name == "configs" else root).absolute()
            if root.resolve() == bundle_dir(name).resolve() and bundle_home(name) != bundle_dir(name):
                return bundle_home(name)
            return root
        frame = frame.f_back
    return bundle_home(name)


def _overrides(overrides: dict[str, Any]) -> dict[str, Any]:
    """Python keyword arguments to MONAI config ids (``a__b`` -> ``a#b``)."""
    return {key.replace("__", "#"): value for key, value in overrides.items()}


def config_files(name: str, config: str = "train") -> list[str]:
    """Absolute paths of the config files of bundle ``name`` for ``config`` (see :data:`CONFIG_LAYERS`)."""
    if config not in CONFIG_LAYERS:
        raise ValueError(f"unknown bundle config {config!r}; choose one of {', '.join(CONFIG_LAYERS)}")
    root = bundle_dir(name) / "configs"
    files = [root / f for f in CONFIG_LAYERS[config]]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"bundle {name!r} lacks config file(s) {', '.join(missing)}")
    return [str(f) for f in files]


def bundle_metadata(name: str) -> dict[str, Any]:
    """The bundle's ``configs/metadata.json`` as a dict."""
    return json.loads((bundle_dir(name) / "configs" / "metadata.json").read_text())


def bundle_parser(name: str, config: str = "train", **overrides: Any) -> ConfigParser:
    """A ``ConfigParser`` holding the bundle's ``config`` (layered), its metadata and ``overrides``.

    ``bundle_root`` defaults to :func:`regnet_zoo.bundle_home` (whatever the working directory).
    """
    parser = ConfigParser()
    parser.read_config(config_files(name, config))
    parser.read_meta(str(bundle_dir(name) / "configs" / "metadata.json"))
    parser.update({"bundle_root": str(bundle_home(name)), **_overrides(overrides)})
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

    configs = bundle_dir(name) / "configs"
    try:
        run(
            config_file=config_files(name, config),
            meta_file=str(configs / "metadata.json"),
            logging_file=str(configs / "logging.conf"),
            **{"bundle_root": str(bundle_home(name)), **_overrides(overrides)},
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
    """(trained network in eval mode, its metadata or None) from a weights file (default: the bundle's own
    ``<bundle_home>/models/model.pt``, else the shipped weights:
    :func:`regnet_zoo.pretrained.default_weights`).

    Self-describing weights (:mod:`regnet_zoo.weights`) rebuild the recorded network (class and arguments)
    and are checked against ``name`` and ``spatial_dims`` (``RegistrationInputError``); ``network_def#...``
    overrides must match the recorded arguments (others do not concern the network and are ignored). A plain
    state dict or a trainer checkpoint is loaded into the bundle's ``network_def`` (``train.yaml`` with
    ``overrides``; ``spatial_dims`` from the kernels when not given), with a warning that the config is
    assumed to be the trained one.
    """
    import warnings

    from regnet_zoo.errors import RegistrationInputError
    from regnet_zoo.pretrained import default_weights
    from regnet_zoo.weights import build_network, check_weights_fit, read_weights

    path = Path(weights) if weights is not None else default_weights(name, spatial_dims)
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
    default ``<bundle_home>/models/model.pt`` (see :func:`load_bundle_weights`). ``load_weights=False``
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
    """Validate the bundle's ``configs/metadata.json`` against ``schema``, offline (raises ``ValueError``)."""
    from monai.bundle import verify_metadata

    schema = Path(schema)
    if not schema.is_file():  # never let MONAI fall back to downloading
        raise FileNotFoundError(f"metadata schema {schema} not found")
    verify_metadata(meta_file=str(bundle_dir(name) / "configs" / "metadata.json"), filepath=str(schema))


def export_bundle(
    name: str,
    filepath: str | os.PathLike | None = None,
    input_shape: Sequence[int] | None = None,
    ckpt_file: str | os.PathLike | None = None,
    **overrides: Any,
) -> Path:
    """Export the trained ``ddf_network`` to TorchScript by tracing (MONAI's ``ckpt_export``, as on the
    command line in ``bundles/README.md``).

    The exported module maps one ``(B, 2C, *S)`` tensor (fixed and moving stacked along channels) to the
    ``(B, N, *S)`` DDF, at any batch and spatial size (``bundles/README.md``, "Export"). ``input_shape``:
    the tracing example (default: from ``metadata.json``). Default ``filepath``:
    ``<bundle_home>/models/model.ts``; weights: ``<bundle_home>/models/model.pt``.
    """
    from monai.bundle import ckpt_export

    from regnet_zoo.weights import read_weights

    home, configs = bundle_home(name), bundle_dir(name) / "configs"
    filepath = Path(filepath) if filepath is not None else home / "models" / "model.ts"
    ckpt = Path(ckpt_file) if ckpt_file is not None else home / "models" / "model.pt"
    # self-describing weights keep the state dict under "model" (regnet_zoo.weights)
    key_in_ckpt = "model" if read_weights(ckpt)[1] is not None else ""
    ckpt_export(
        key_in_ckpt=key_in_ckpt,
        net_id="ddf_network",
        filepath=str(filepath),
        ckpt_file=str(ckpt),
        meta_file=str(configs / "metadata.json"),
        config_file=config_files(name, "inference"),
        use_trace=True,
        input_shape=list(input_shape) if input_shape is not None else None,
        converter_kwargs={"check_trace": False},  # the README's command; equality with eager is tested
        **{"bundle_root": str(home), **_overrides(overrides)},
    )
    return filepath


# ----------------------------------------------------------------------------------------------------------
# generating the bundle files from bundles/_common (shared) and bundles/_methods/<method> (per method)
# ----------------------------------------------------------------------------------------------------------
#: the files MONAI's tools read at the top of a bundle folder: links into configs/, so that
#: ``monai.bundle run --config_file bundles/<m>/train.yaml`` and ``configs/train.yaml`` are one file
TOP_LEVEL_LINKS = (
    "train.yaml",
    "inference.yaml",
    "evaluate.yaml",
    "multi_gpu_train.yaml",
    "metadata.json",
    "logging.conf",
)
#: metric fields of ``benchmarks/results/compare_builtin2d.json`` copied into ``eval_metrics``
EVAL_FIELDS = ("dice_mean", "dice_mean_30", "hd95_mm", "tre_mm", "sdlogj", "folding_percent")
EVAL_RESULTS = Path("benchmarks") / "results" / "compare_builtin2d.json"


def _template(text: str, method: str, title: str) -> str:
    from regnet_zoo import __version__

    return text.replace("{{method}}", method).replace("{{title}}", title).replace("{{version}}", __version__)


def _split_header(text: str) -> tuple[str, str]:
    """A method config's leading comment block (the file's usage header) and the rest."""
    lines = text.splitlines(keepends=True)
    n = next((i for i, line in enumerate(lines) if not line.startswith("#")), len(lines))
    return "".join(lines[:n]), "".join(lines[n:]).lstrip("\n")


def _eval_metrics(repo: Path, method: str) -> dict[str, Any]:
    results = json.loads((repo / EVAL_RESULTS).read_text())
    row = next((r for r in results["rows"] if r.get("method") == method and r.get("status") == "ok"), None)
    if row is None:
        raise ValueError(f"{EVAL_RESULTS} has no result for {method!r}")
    data = results["dataset"]
    metrics: dict[str, Any] = {k: round(float(row[k]), 4) for k in EVAL_FIELDS}
    metrics["benchmark"] = (
        f"{EVAL_RESULTS.as_posix()}: {data['name']}, {data['num_eval_pairs']} {data['eval_split']} pairs, "
        f"grid {data['grid']}, training budget {results['budget']} on CPU ({row.get('note', '')}); "
        f"command: {results['command']}"
    )
    return metrics


def _io_format(spatial_dims: int, multiple: int) -> dict[str, Any]:
    """``network_data_format`` of the ``DDFOutput`` network (MONAI's ``image`` in, ``pred`` out)."""
    shape = [f"{multiple}*n"] * spatial_dims
    axes = {str(i): f"displacement along array axis {i} (voxels)" for i in range(spatial_dims)}
    return {
        "inputs": {
            "image": {
                "type": "image",
                "format": "magnitude",
                "modality": "MR",
                "num_channels": 2,
                "spatial_shape": shape,
                "dtype": "float32",
                "value_range": [0, 1],
                "is_patch_data": False,
                "channel_def": {"0": "fixed image", "1": "moving image"},
            }
        },
        "outputs": {
            "pred": {
                "type": "image",
                "format": "displacement",
                "num_channels": spatial_dims,
                "spatial_shape": shape,
                "dtype": "float32",
                "value_range": [],
                "is_patch_data": False,
                "channel_def": axes,
            }
        },
    }


def generated_files(bundles: Path) -> dict[Path, str]:
    """Every generated file below ``bundles`` (the source checkout's ``bundles/``) and its content."""
    from regnet_zoo import METHODS

    common, methods = bundles / "_common", bundles / "_methods"
    license_text = (bundles.parent / "LICENSE").read_text()
    banner = "# generated by `python -m regnet_zoo.bundle generate` (bundles/_common, bundles/_methods)\n"
    out: dict[Path, str] = {}
    for method in METHODS:
        src = methods / method
        meta_src = json.loads((src / "metadata.json").read_text())
        title = meta_src["name"]
        multiple = int(meta_src.pop("input_multiple"))
        network = (src / "network.yaml").read_text()
        root, configs = bundles / method, bundles / method / "configs"
        for name in ("train.yaml", "inference.yaml"):
            header, body = _split_header((src / name).read_text())
            shared = _template((common / name).read_text(), method, title)
            out[configs / name] = header + banner + "\n" + shared + "\n" + network + "\n" + body
        for name in ("evaluate.yaml", "multi_gpu_train.yaml", "logging.conf"):
            out[configs / name] = _template((common / name).read_text(), method, title)
        meta = json.loads(_template((common / "metadata.json").read_text(), method, title))
        meta.update(meta_src)
        meta["eval_metrics"] = _eval_metrics(bundles.parent, method)
        meta["network_data_format"] = _io_format(2, multiple)
        meta["network_3d_data_format"] = _io_format(3, multiple)  # the same network with spatial_dims 3
        out[configs / "metadata.json"] = json.dumps(meta, indent=2, ensure_ascii=False) + "\n"
        out[root / "docs" / "data_license.txt"] = (common / "data_license.txt").read_text()
        out[root / "LICENSE"] = license_text
    return out


def _duplicate_keys(text: str) -> list[str]:
    """Top-level keys defined twice in a YAML text (YAML would keep the last silently)."""
    import yaml

    keys = [node.value for node, _ in yaml.compose(text).value] if text.strip() else []
    return sorted({k for k in keys if keys.count(k) > 1})


def check_generated(bundles: Path) -> list[str]:
    """What differs between the committed bundle files and what the sources produce (empty: all equal)."""
    problems = []
    for path, text in generated_files(bundles).items():
        if not path.is_file() or path.read_text() != text:
            problems.append(f"{path.relative_to(bundles)} differs from its source")
        if path.suffix == ".yaml" and (dup := _duplicate_keys(text)):
            problems.append(f"{path.relative_to(bundles)} defines {', '.join(dup)} twice")
    from regnet_zoo import METHODS

    for method in METHODS:
        for name in TOP_LEVEL_LINKS:
            link = bundles / method / name
            if not (link.is_symlink() and os.readlink(link) == f"configs/{name}"):
                problems.append(f"{method}/{name} is not a link to configs/{name}")
    return problems


def write_generated(bundles: Path) -> list[Path]:
    """Write the generated bundle files and the top-level links; returns the files that changed."""
    from regnet_zoo import METHODS

    changed = []
    for path, text in generated_files(bundles).items():
        if not path.is_file() or path.read_text() != text:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            changed.append(path)
    for method in METHODS:
        for name in TOP_LEVEL_LINKS:
            link = bundles / method / name
            if not (link.is_symlink() and os.readlink(link) == f"configs/{name}"):
                if link.exists() or link.is_symlink():
                    link.unlink()
                link.symlink_to(f"configs/{name}")
                changed.append(link)
    return changed


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m regnet_zoo.bundle generate [--check]`` (from the source checkout)."""
    import argparse

    from regnet_zoo import project_root

    parser = argparse.ArgumentParser(prog="python -m regnet_zoo.bundle")
    parser.add_argument("command", choices=["generate"])
    parser.add_argument("--check", action="store_true", help="only report files that differ (exit 1)")
    args = parser.parse_args(argv)
    bundles = project_root() / "bundles"
    if not (bundles / "_common").is_dir():
        print(f"{bundles / '_common'} not found: generate runs in the source checkout", file=sys.stderr)
        return 2
    if args.check:
        problems = check_generated(bundles)
        print("\n".join(problems) or "bundle files are up to date")
        return 1 if problems else 0
    for path in write_generated(bundles):
        print(f"wrote {path.relative_to(bundles.parent)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
