"""Shipped weights: every method trained on synthetic pairs (``regnet_zoo.data.synthmorph``) by
``benchmarks/train_zoo.py``, in 2D and 3D, at a small working grid (:data:`WORKING_GRIDS`).

Whether a method's weights beat the affine stage on real pairs is measured by ``benchmarks/zoo_eval.py`` and
stated in its model card (``--cards``).

The folder is :data:`PRETRAINED_DIR` unless ``$REGNET_ZOO_PRETRAINED`` names another one (e.g. weights you
trained with ``benchmarks/train_zoo.py --out DIR``): :func:`pretrained_dir`.

Files (package data): ``<method>_<2d|3d>.pt`` (``{"model": state_dict, "regnet_zoo": metadata}``, the
self-describing format of the pipeline's weights; the state dict may be half precision), the same metadata as
``<method>_<2d|3d>.json`` and the model card ``<method>.md``.

Which weights a method uses when none are given (:func:`default_weights`):

1. the bundle's own trained model, ``<bundle_home>/models/model.pt`` (``regnet-zoo train`` / ``monai.bundle
   run`` write it: a model you trained yourself wins);
2. else the shipped ``<method>_<dims>d.pt`` for the images' dimensionality.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "PRETRAINED_DIR",
    "PRETRAINED_ENV",
    "WORKING_GRIDS",
    "pretrained_dir",
    "shipped_files",
    "weights_file",
    "shipped_weights",
    "default_weights",
    "weights_image_size",
    "zoo_metadata",
    "model_card",
]

PRETRAINED_DIR = Path(__file__).resolve().parent
#: environment variable naming another folder of ``<method>_<dims>d.pt`` files to use instead
PRETRAINED_ENV = "REGNET_ZOO_PRETRAINED"
#: the working grid of the shipped weights (small enough for CPU training); images are resampled to it
WORKING_GRIDS: dict[int, tuple[int, ...]] = {2: (128, 128), 3: (48, 48, 48)}


def pretrained_dir() -> Path:
    """The shipped-weights folder: ``$REGNET_ZOO_PRETRAINED`` when set, else :data:`PRETRAINED_DIR`."""
    env = os.environ.get(PRETRAINED_ENV)
    return Path(env).expanduser().resolve() if env else PRETRAINED_DIR


def shipped_files(folder: str | Path | None = None) -> list[Path]:
    """Every ``<method>_<2d|3d>.pt`` in ``folder`` (default :func:`pretrained_dir`), sorted."""
    return sorted(Path(folder if folder is not None else pretrained_dir()).glob("*_[23]d.pt"))


def weights_file(method: str, spatial_dims: int, folder: str | Path | None = None) -> Path:
    """``<folder>/<method>_<2d|3d>.pt`` (default folder: :func:`pretrained_dir`; the file need not exist)."""
    return Path(folder if folder is not None else pretrained_dir()) / f"{method}_{int(spatial_dims)}d.pt"


def shipped_weights(method: str, spatial_dims: int) -> Path | None:
    """The shipped weights of ``method`` for ``spatial_dims``-D images, None when there are none."""
    path = weights_file(method, spatial_dims)
    return path if path.is_file() else None


def default_weights(method: str, spatial_dims: int | None, bundle_root: str | Path | None = None) -> Path:
    """The weights ``method`` uses when none are given: ``<bundle_root>/models/model.pt`` (default root:
    :func:`regnet_zoo.bundle_home`) when it exists, else the shipped file for ``spatial_dims`` (3D first when
    ``spatial_dims`` is None). When neither exists: the bundle's path (its loader says how to train)."""
    from regnet_zoo import bundle_home

    own = Path(bundle_root if bundle_root is not None else bundle_home(method)) / "models" / "model.pt"
    if own.is_file():
        return own
    for dims in (spatial_dims,) if spatial_dims else (3, 2):
        shipped = shipped_weights(method, int(dims))
        if shipped is not None:
            return shipped
    return own


def weights_image_size(path: str | Path, default: Sequence[int] | None = None) -> list[int] | None:
    """The working grid recorded in self-describing weights (``preprocessing.image_size``), else ``default``:
    bundle inference resamples to the grid the weights were trained at."""
    import torch

    path = Path(path)
    if not path.is_file():
        return list(default) if default is not None else None
    saved = torch.load(path, map_location="cpu", weights_only=True)
    meta = saved.get("regnet_zoo") if isinstance(saved, dict) else None
    size = ((meta or {}).get("preprocessing") or {}).get("image_size")
    if size:
        return [int(s) for s in size]
    return list(default) if default is not None else None


def zoo_metadata(
    method: str, network_config: Mapping[str, Any], grid: Sequence[int], trained_on: Mapping[str, Any]
) -> dict[str, Any]:
    """Self-describing metadata (:func:`regnet_zoo.weights.weights_metadata`) of synthetic-data weights:
    ``network_config`` is the resolved ``network_def`` (with ``_target_``), ``grid`` the working grid."""
    from regnet_zoo.data.preprocess import Preprocessing
    from regnet_zoo.weights import weights_metadata

    # training images are on the working grid in [0, 1]; real images get the bundle's min-max normalisation
    # and are resampled to the grid. No pre-alignment in training (the synthetic pairs include a random
    # affine); `register` runs its affine stage before the network.
    prep = Preprocessing(image_size=tuple(grid), pad_multiple=None, pre_align=None).to_dict()
    return weights_metadata(method, network_config, prep, trained_on)


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _row(name: str, value: Any) -> str:
    return f"| {name} | {value} |"


#: what trial runs showed beyond a card's numbers (``benchmarks/train_zoo.py`` variants, 2D, 2026-11-26)
TRAINING_NOTES: dict[str, str] = {
    "ddrnet": "The budget may not be the only cause. In 2D the held-out Dice stayed at the identity's within "
    "the recorded iterations, with predicted fields under a voxel. Short trial runs (not committed) with a "
    "larger `dice_weight`, with the KL term off and with a larger learning rate did not change that, while "
    "Adam on the velocity itself, through this network's integration and warp and the same Dice, does lower "
    "the Dice loss: the stall is in the network, not in the loss path. A lead to test: a larger initial "
    "scale of the velocity head's mean than VoxelMorph-diff's std 1e-5.",
    "pwc": "Its Dice-only synthetic loss stayed flat (about 2.7) over the 232 2D iterations: the budget "
    "is far below what this network needs.",
}


def _training_section(method: str, dims: int, folder: Path) -> list[str]:
    record, weights = folder / f"{method}_{dims}d.json", folder / f"{method}_{dims}d.pt"
    if not record.is_file():
        return [f"## {dims}D", "", "Not trained yet.", ""]
    meta = json.loads(record.read_text())
    t, size = meta["trained_on"], weights.stat().st_size / 1e6 if weights.is_file() else 0.0
    val = t.get("validation", {})
    dice = f"{_fmt(val.get('val_dice_initial'))} -> {_fmt(val.get('val_dice'))}"
    return [
        f"## {dims}D (`{method}_{dims}d.pt`, {size:.2f} MB)",
        "",
        "| | |",
        "|---|---|",
        _row("data", f"{t.get('dataset')} (`{t.get('generator')}`, seed {t.get('seed')})"),
        _row("working grid", f"{t.get('grid')} (images are resampled to it; min-max normalisation)"),
        _row("iterations x batch", f"{t.get('iterations')} x {t.get('batch_size')} = {t.get('pairs')} pairs"),
        _row("wall time", f"{_fmt(t.get('wall_time_s'), 0)} s, {t.get('device')}, {t.get('threads')} thread"),
        _row("config changes for synthetic data", f"`{t.get('loss_overrides')}`"),
        _row("final training loss (mean of the last 20 iterations)", _fmt(t.get("final_loss"), 4)),
        _row(f"held-out Dice before -> after ({val.get('pairs')} pairs, seed {val.get('seed')})", dice),
        _row("folding % / SDlogJ", f"{_fmt(val.get('val_folding_percent'))} / {_fmt(val.get('val_sdlogj'))}"),
        _row("versions", meta.get("versions")),
        "",
        f"Reproduce: `{t.get('command')}`",
        "",
    ] + _no_progress(val, t)


def _no_progress(val: Mapping[str, Any], trained: Mapping[str, Any]) -> list[str]:
    """A stated warning when the held-out synthetic Dice did not rise above no registration."""
    before, after = val.get("val_dice_initial"), val.get("val_dice")
    if before is None or after is None or after > before:
        return []
    return [
        f"**Not (yet) better than no registration on held-out synthetic pairs ({before:.3f} -> "
        f"{after:.3f}):** {trained.get('iterations')} iterations in {trained.get('wall_time_s')} s "
        f"({trained.get('device')}, {trained.get('threads')} thread(s)) are far too few for this network to "
        "learn; treat these weights as a working starting point for fine-tuning or instance optimisation, "
        "not as a trained model.",
        "",
    ]


def model_card(method: str, folder: str | Path | None = None, evaluation: Mapping | None = None) -> str:
    """The model card (Markdown) of ``method``'s weights in ``folder``, from their JSON records and, when
    given, the real-data evaluation of ``benchmarks/zoo_eval.py`` (its JSON, ``rows``)."""
    folder = Path(folder) if folder is not None else pretrained_dir()
    lines = [
        f"# {method}: shipped weights (synthetic training)",
        "",
        "Trained by `benchmarks/train_zoo.py` on SynthMorph-style synthetic pairs only "
        "(`regnet_zoo.data.synthmorph`: random label maps, an independent random contrast per label for "
        "fixed and moving, blur, bias, noise, gamma; random affine + diffeomorphic pair transform), via the "
        "bundle's own training config (network, loss, optimiser). No real image was seen in training. Used "
        "by default when the bundle has no `models/model.pt` of its own "
        "(`regnet_zoo/pretrained/__init__.py`).",
        "",
    ]
    for dims in (2, 3):
        lines += _training_section(method, dims, folder)
    if method in TRAINING_NOTES:
        lines += ["## Training trials", "", TRAINING_NOTES[method], ""]
    rows = [r for r in (evaluation or {}).get("rows", []) if r.get("method") == method]
    if rows:
        lines += _evaluation_section(method, rows, folder)
    return "\n".join(lines)


def _record(folder: Path, method: str, dims: int) -> dict[str, Any]:
    path = folder / f"{method}_{dims}d.json"
    return json.loads(path.read_text()).get("trained_on", {}) if path.is_file() else {}


def _evaluation_section(method: str, rows: list[Mapping[str, Any]], folder: Path) -> list[str]:
    """The card's real-data section: ``benchmarks/zoo_eval.py`` summary rows of ``method``, and in words
    where it does not beat the affine stage or does not reach SimpleITK B-spline at a tenth of its time."""
    lines = [
        "## Real pairs (`benchmarks/zoo_eval.py`, `benchmarks/results/zoo_eval_{2d,3d}.json`)",
        "",
        "`register`'s affine stage, then the network (optionally with instance optimisation), against "
        "the affine stage alone and SimpleITK's B-spline on the same pre-aligned pair, in the same run. "
        "Means over the pairs of a dataset; Dice over the anatomical labels, TRE in mm (hands2d: pixels); "
        "seconds of the deformable stage alone.",
        "",
        "| pair | instance-opt steps | Dice affine | Dice after | TRE affine | TRE after | beats affine "
        "| reaches B-spline | time / B-spline |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['pair']} ({r.get('dims')}D) | {r.get('instance_opt', 0)} | {_fmt(r.get('dice_affine'))} | "
            f"{_fmt(r.get('dice'))} | {_fmt(r.get('tre_affine'), 2)} | {_fmt(r.get('tre'), 2)} | "
            f"{r.get('beats_affine')} ({r.get('wins', '-')}) | {_fmt(r.get('vs_bspline'))} | "
            f"{_fmt(r.get('time_ratio'))} |"
        )
    lines.append("")
    plain = [r for r in rows if not r.get("instance_opt")]
    losing = sorted({r["pair"] for r in plain if r.get("beats_affine") is False})
    winning = sorted({r["pair"] for r in plain if r.get("beats_affine")})
    if winning:
        lines += [f"The network alone beats the affine stage on: {', '.join(winning)}.", ""]
    if losing:
        dims = sorted({int(r["dims"]) for r in plain if r["pair"] in losing})
        trained = "; ".join(
            f"{d}D: {t.get('iterations')} iterations x {t.get('batch_size')} pairs on {t.get('device')}, "
            f"grid {t.get('grid')}"
            for d in dims
            if (t := _record(folder, method, d))
        )
        lines += [
            f"**The network alone does not beat the affine stage on: {', '.join(losing)}.** Why, as far as "
            f"this evaluation shows: the weights saw only synthetic pairs ({trained or 'no record'}), far "
            "fewer than SynthMorph's hundreds of thousands of iterations, and every image is resampled to "
            "that small working grid, so the predicted field is coarse at the images' own resolution. For "
            "such pairs add instance optimisation (`register --instance-opt 20`, its row above where "
            "measured) or train the bundle on your own data (`regnet-zoo train`).",
            "",
        ]
    with_ref = [r for r in rows if r.get("vs_bspline") is not None]
    if with_ref:
        goal = [r for r in with_ref if r.get("bspline_goal")]
        met = sorted({f"{r['pair']} ({r.get('instance_opt', 0)} steps)" for r in goal})
        missed = sorted({r["pair"] for r in with_ref} - {r["pair"] for r in goal})
        if met:
            lines += [f"Reaches SimpleITK B-spline's accuracy in <= 1/10 of its time on: {', '.join(met)}."]
            lines.append("")
        if missed:
            lines += [
                f"**Does not reach SimpleITK B-spline's accuracy in <= 1/10 of its time on: "
                f"{', '.join(missed)}** (see the table: accuracy, time or both).",
                "",
            ]
        weak = sorted({r["pair"] for r in with_ref if r.get("bspline_beats_affine") is False})
        if weak:
            lines += [
                f"On {', '.join(weak)} SimpleITK's B-spline does not beat the affine stage itself, so "
                "reaching its accuracy there says little.",
                "",
            ]
    return lines
