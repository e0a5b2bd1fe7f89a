"""Ignite handlers for registration evaluators: per-pair NIfTI outputs and per-pair / aggregated metrics JSON.

Attach them to a :class:`~regnet_zoo.engines.workflows.RegistrationEvaluator` (``val_handlers`` in a bundle
config). Files written per pair ``<name>`` (``name`` from :func:`pair_names`), all NIfTI with the fixed
image's affine (Learn2Reg convention: fixed grid, voxel units, vector last on disk):

``<name>_warped.nii.gz``, ``<name>_warped_label.nii.gz`` (nearest neighbour, when the pair has labels),
``<name>_ddf.nii.gz`` (``(*S, N)``; 2D as ``(H, W, 1, 2)``), ``<name>_jacdet.nii.gz``.
"""

from __future__ import annotations

import logging
import math
import random
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from ignite.engine import Engine, Events
from monai.data import MetaTensor

from regnet_zoo.core.geometry import spacing_from_affine
from regnet_zoo.core.metrics import jacobian_determinant
from regnet_zoo.core.spatial import warp_labels
from regnet_zoo.engines.metrics import aggregate_metrics
from regnet_zoo.errors import NonFiniteError
from regnet_zoo.weights import check_finite

__all__ = [
    "pair_names",
    "fixed_affines",
    "spacings_of",
    "PairOutputWriter",
    "MetricsSaver",
    "format_metrics_table",
    "TrainingCheckpoint",
    "latest_checkpoint",
    "NonFiniteError",
    "save_weights_file",
    "rng_state",
    "set_rng_state",
    "ModelSaver",
    "WeightsLoader",
]

logger = logging.getLogger(__name__)

_SUFFIXES = re.compile(r"(\.nii\.gz|\.nii|\.nrrd|\.mha|\.mhd|\.npz|\.npy|\.png|\.jpg|\.gz)$", re.IGNORECASE)


def _stem(path: Any) -> str:
    return _SUFFIXES.sub("", Path(str(path)).name)


def _meta_list(value: Any, key: str, batch_size: int) -> list | None:
    """``value.meta[key]`` of a collated ``MetaTensor`` as a list of ``batch_size`` entries (or None)."""
    if not isinstance(value, MetaTensor) or key not in value.meta:
        return None
    entries = value.meta[key]
    if isinstance(entries, (str, Path)):
        entries = [entries] * batch_size
    entries = list(entries)
    return entries if len(entries) == batch_size else None


def pair_names(batchdata: Mapping[str, Any], batch_size: int, start: int = 0) -> list[str]:
    """Names of the pairs of a batch: ``batchdata["pair_name"]`` if present, else ``<fixed>_<moving>``
    file stems (``filename_or_obj`` metadata), else ``pair_<index>`` counting from ``start``."""
    if "pair_name" in batchdata:
        names = batchdata["pair_name"]
        return [str(n) for n in ([names] if isinstance(names, str) else names)]
    fixed = _meta_list(batchdata.get("fixed"), "filename_or_obj", batch_size)
    moving = _meta_list(batchdata.get("moving"), "filename_or_obj", batch_size)
    if fixed and moving and all(fixed) and all(moving):
        return [f"{_stem(f)}_{_stem(m)}" for f, m in zip(fixed, moving, strict=True)]
    return [f"pair_{start + i:04d}" for i in range(batch_size)]


def fixed_affines(batchdata: Mapping[str, Any], batch_size: int, spatial_dims: int) -> list[np.ndarray]:
    """The fixed image's affine of every pair (``MetaTensor.affine``; identity when absent)."""
    fixed = batchdata.get("fixed")
    if isinstance(fixed, MetaTensor):
        affine = fixed.affine.detach().cpu().numpy()
        affine = np.broadcast_to(affine, (batch_size, *affine.shape[-2:])) if affine.ndim == 2 else affine
        return [np.asarray(a, dtype=np.float64) for a in affine]
    return [np.eye(spatial_dims + 1) for _ in range(batch_size)]


class PairOutputWriter:
    """Write the warped image, warped label, DDF and Jacobian determinant of every pair as NIfTI.

    Args:
        output_dir: folder (created); files ``<name>_{warped,warped_label,ddf,jacdet}.nii.gz``.
        overwrite: replace existing outputs (input files are never overwritten: ``data.io.save_image``).
        write_jacobian: also write the Jacobian determinant.
        extra_keys: further network outputs to write as ``<name>_<key>.nii.gz`` when present (e.g. PWC's
            per-level ``warped_level{l}`` images, resampled onto the fixed grid when on a coarser grid).
    """

    def __init__(
        self,
        output_dir: str | Path,
        overwrite: bool = True,
        write_jacobian: bool = True,
        extra_keys: Sequence[str] = (),
    ) -> None:
        self.output_dir = Path(output_dir)
        self.overwrite = overwrite
        self.write_jacobian = write_jacobian
        self.extra_keys = tuple(extra_keys)
        self.written: list[Path] = []
        self._count = 0

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def _reset(self, engine: Engine) -> None:
        self.written, self._count = [], 0

    def __call__(self, engine: Engine) -> None:
        from regnet_zoo.data.io import (
            save_image,
        )  # late: keeps the engines importable without the data package

        outputs, batchdata = engine.state.output["pred"], engine.state.batch
        ddf = outputs["ddf"].detach().float().cpu()
        warped = outputs["warped"].detach().float().cpu()
        batch_size, spatial_dims = ddf.shape[0], ddf.ndim - 2
        names = pair_names(batchdata, batch_size, self._count)
        affines = fixed_affines(batchdata, batch_size, spatial_dims)
        moving_label = batchdata.get("moving_label")
        protect = [
            p
            for key in ("fixed", "moving")
            for p in (_meta_list(batchdata.get(key), "filename_or_obj", batch_size) or [])
        ]
        self.output_dir.mkdir(parents=True, exist_ok=True)
        for i, (name, affine) in enumerate(zip(names, affines, strict=True)):
            files = {"warped": warped[i], "ddf": ddf[i]}
            if isinstance(moving_label, torch.Tensor):
                label = torch.as_tensor(moving_label[i : i + 1]).cpu()
                files["warped_label"] = warp_labels(label, ddf[i : i + 1], method="nearest")[0].to(
                    torch.int32
                )
            if self.write_jacobian:
                files["jacdet"] = jacobian_determinant(ddf[i : i + 1])[0][None].float()
            for key in self.extra_keys:
                if isinstance(outputs.get(key), torch.Tensor):
                    extra = outputs[key][i : i + 1].detach().float().cpu()
                    if extra.shape[2:] != ddf.shape[2:]:  # a coarser level: shown on the fixed grid
                        extra = F.interpolate(extra, size=ddf.shape[2:], mode="nearest")
                    files[key] = extra[0]
            for suffix, data in files.items():
                path = self.output_dir / f"{name}_{suffix}.nii.gz"
                save_image(data, path, affine=affine, overwrite=self.overwrite, protect=protect)
                self.written.append(path)
        self._count += batch_size


class MetricsSaver:
    """Collect per-pair metrics of an evaluation run, write them as JSON and log a summary table.

    Writes ``<output_dir>/<name>.json`` per pair and ``<output_dir>/<summary_name>`` with
    ``{"pairs": {name: metrics}, "aggregate": aggregate_metrics(...)}`` (no files when ``output_dir`` is
    None). NaN (e.g. a label absent from one image) is written as ``null``. ``self.per_pair`` and
    ``self.summary`` keep the last run's results.
    """

    def __init__(
        self, output_dir: str | Path | None, summary_name: str = "metrics.json", print_table: bool = True
    ) -> None:
        self.output_dir = Path(output_dir) if output_dir is not None else None
        self.summary_name = summary_name
        self.print_table = print_table
        self.per_pair: dict[str, dict] = {}
        self.summary: dict[str, Any] = {}

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.COMPLETED, self._write)

    def _reset(self, engine: Engine) -> None:
        self.per_pair, self.summary = {}, {}

    def _collect(self, engine: Engine) -> None:
        metrics = engine.state.output["metrics"]
        names = pair_names(engine.state.batch, len(metrics), len(self.per_pair))
        for name, m in zip(names, metrics, strict=True):
            self.per_pair[name] = m

    def _write(self, engine: Engine) -> None:
        self.summary = aggregate_metrics(list(self.per_pair.values()))
        if self.output_dir is not None:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            from regnet_zoo.data.io import metrics_to_json

            for name, m in self.per_pair.items():
                (self.output_dir / f"{name}.json").write_text(metrics_to_json(m))
            report = {"pairs": self.per_pair, "aggregate": self.summary}
            (self.output_dir / self.summary_name).write_text(metrics_to_json(report))
        if self.print_table:
            print(format_metrics_table(self.per_pair, self.summary))


def format_metrics_table(per_pair: Mapping[str, Mapping[str, Any]], summary: Mapping[str, Any]) -> str:
    """A plain-text table: one row per pair and a final mean row, for the scalar metrics."""
    columns = [
        c
        for c in (
            "dice_mean_initial",
            "dice_mean",
            "hd95_mm",
            "tre_mm",
            "mse_initial",
            "mse",
            "sdlogj",
            "sdlogj_l2r",
            "folding_percent",
        )
        if c in summary
    ]
    width = max([len(n) for n in per_pair] + [4])
    lines = [f"{'pair':<{width}}  " + "  ".join(f"{c:>17}" for c in columns)]
    for name, m in per_pair.items():
        lines.append(f"{name:<{width}}  " + "  ".join(f"{float(m.get(c, math.nan)):>17.4f}" for c in columns))
    lines.append(f"{'mean':<{width}}  " + "  ".join(f"{summary[c]['mean']:>17.4f}" for c in columns))
    return "\n".join(lines)


def spacings_of(batchdata: Mapping[str, Any], batch_size: int, spatial_dims: int) -> Sequence[list[float]]:
    """Voxel size (mm) per pair from the fixed image's affine."""
    return [spacing_from_affine(a, spatial_dims) for a in fixed_affines(batchdata, batch_size, spatial_dims)]


def save_weights_file(obj: Any, path: str | Path) -> Path:
    """``torch.save(obj, path)`` atomically (:func:`regnet_zoo.data.io.atomic_write`), refusing
    (:class:`NonFiniteError`, nothing written) when any floating tensor in ``obj`` is NaN or inf."""
    from regnet_zoo.data.io import atomic_write

    check_finite(obj, Path(path).name)
    return atomic_write(path, lambda tmp: torch.save(obj, tmp), overwrite=True)


def rng_state() -> dict[str, Any]:
    """The global RNG states of torch (CPU and CUDA), numpy and Python, as tensors / plain values
    (loadable with ``torch.load(..., weights_only=True)``)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), int(pos), int(has_gauss), float(cached)))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


_CHECKPOINT_NAME = re.compile(r"checkpoint_(epoch|iteration)=(\d+)\.pt$")


def latest_checkpoint(folder: str | Path) -> Path | None:
    """The newest checkpoint in ``folder``: of ``checkpoint_epoch=N.pt`` / ``checkpoint_iteration=N.pt``
    the highest ``N`` of each kind, the more recently written of the two kinds; None if there is none."""
    best: dict[str, tuple[int, Path]] = {}
    for path in Path(folder).glob("*.pt"):
        match = _CHECKPOINT_NAME.search(path.name) or re.search(r"()=(\d+)\.pt$", path.name)
        if match:
            candidate = (int(match.group(2)), path)
            best[match.group(1)] = max(best.get(match.group(1), candidate), candidate)
    if not best:
        return None
    return max((p for _, p in best.values()), key=lambda p: p.stat().st_mtime_ns)


class TrainingCheckpoint:
    """Resumable training checkpoints: network, optimizer, trainer state (epoch, iteration) and RNG states.

    Saves ``<save_dir>/checkpoint_epoch=N.pt`` every ``interval`` epochs and, when ``iteration_interval`` > 0,
    ``checkpoint_iteration=N.pt`` every ``iteration_interval`` iterations (keeping the ``n_saved`` newest of
    each kind). Every write is atomic and refuses non-finite weights (:func:`save_weights_file`).
    When ``resume_from`` is a checkpoint file or ``"latest"`` (the newest in ``save_dir``, if any), all of it
    is restored before training starts. A run resumed mid-epoch continues as the uninterrupted run would:
    the torch / numpy / Python RNG states at the start of the epoch are restored, the data loader is
    re-created (same shuffling order) and the batches already trained on are skipped, then the RNG states of
    the checkpoint's moment are restored (exact for ``num_workers=0``; MONAI transforms with their own
    ``RandomState`` are not covered). ``save=False`` only resumes (non-main processes of a distributed run).
    Attaching to the trainer itself (rather than listing it in a config's ``save_dict``) avoids a circular
    reference in bundle configs.
    """

    def __init__(
        self,
        save_dir: str | Path,
        network: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        interval: int = 1,
        n_saved: int = 1,
        resume_from: str | Path | None = None,
        lr_scheduler: Any = None,
        save: bool = True,
        iteration_interval: int = 0,
    ) -> None:
        self.save_dir = Path(save_dir)
        self.save = save
        self.network, self.optimizer, self.lr_scheduler = network, optimizer, lr_scheduler
        self.interval, self.iteration_interval, self.n_saved = interval, iteration_interval, n_saved
        self.resume_from = resume_from
        self._epoch_rng: dict | None = None  # RNG states at the start of the current epoch
        self._pending_rng: dict | None = None  # RNG states of the checkpoint being resumed

    def resume_path(self) -> Path | None:
        """The checkpoint that will be restored (None: start from scratch)."""
        if self.resume_from in (None, "", False):
            return None
        if str(self.resume_from) == "latest":
            return latest_checkpoint(self.save_dir)
        path = Path(self.resume_from)
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint to resume from not found: {path}")
        return path

    def attach(self, engine: Engine) -> None:
        path = self.resume_path()
        if path is not None:
            engine.add_event_handler(Events.STARTED, self._resume, path)
        engine.add_event_handler(Events.EPOCH_STARTED, self._epoch_started)
        if self.save and self.interval > 0:
            engine.add_event_handler(Events.EPOCH_COMPLETED(every=self.interval), self._save, "epoch")
        if self.save and self.iteration_interval > 0:
            engine.add_event_handler(
                Events.ITERATION_COMPLETED(every=self.iteration_interval), self._save, "iteration"
            )

    def _resume(self, engine: Engine, path: Path) -> None:
        logger.info(f"resuming training from {path}")
        state = torch.load(path, map_location="cpu", weights_only=True)
        self.network.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.lr_scheduler is not None and "lr_scheduler" in state:
            self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        max_epochs = engine.state.max_epochs
        engine.load_state_dict(state["trainer"])
        if engine.state.epoch > max_epochs:
            raise ValueError(f"{path.name} is at epoch {engine.state.epoch}, past max_epochs={max_epochs}")
        engine.state.max_epochs = max_epochs  # a resumed run may train for more epochs than the saved one
        self._pending_rng = state.get("rng")

    def _epoch_started(self, engine: Engine) -> None:
        rng, self._pending_rng = self._pending_rng, None
        done = engine.state.iteration % engine.state.epoch_length if engine.state.epoch_length else 0
        epoch_rng = rng.get("epoch_start") if rng is not None else None
        if done and epoch_rng is not None and engine.state.dataloader is not None:
            # mid-epoch resume: the epoch's loader order again, minus the batches already trained on
            # (ignite would restart the loader from its first batch); uses ignite's loader-iterator slots
            set_rng_state(epoch_rng)
            self._epoch_rng = epoch_rng
            iterator = iter(engine.state.dataloader)
            for _ in range(done):
                next(iterator)
            engine._dataloader_iter, engine._init_iter = iterator, done
            set_rng_state(rng["now"])
            return
        if rng is not None:
            set_rng_state(rng["now"])
        self._epoch_rng = rng_state()

    def _save(self, engine: Engine, kind: str) -> None:
        state = {
            "model": self.network.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "trainer": engine.state_dict(),
            "rng": {"now": rng_state(), "epoch_start": self._epoch_rng},
        }
        if self.lr_scheduler is not None:
            state["lr_scheduler"] = self.lr_scheduler.state_dict()
        number = engine.state.epoch if kind == "epoch" else engine.state.iteration
        save_weights_file(state, self.save_dir / f"checkpoint_{kind}={number}.pt")
        older = sorted(
            (int(m.group(2)), p)
            for p in self.save_dir.glob(f"checkpoint_{kind}=*.pt")
            if (m := _CHECKPOINT_NAME.search(p.name))
        )
        for _, old in older[: -self.n_saved] if self.n_saved > 0 else []:
            old.unlink(missing_ok=True)


class ModelSaver:
    """Save the trained network as self-describing weights (:mod:`regnet_zoo.weights`) when training ends.

    The file records the network's class and its resolved arguments (``network_config``: in the bundles,
    ``{arg: '@network_def#arg'}`` so overrides are included), the preprocessing (``transforms``: a
    :func:`~regnet_zoo.data.transforms.pair_transforms` chain, its ``preprocessing``), what it was trained on
    (``dataset``: a :class:`~regnet_zoo.data.learn2reg.Learn2RegDataset`; iterations, epochs from the
    trainer) and versions. When training starts, the recorded arguments are checked to rebuild the trained
    network (same parameter names and shapes), so a file that could not be used is never written.

    No run silently replaces another run's weights: when ``path`` exists the trainer stops before its first
    iteration with a ``RegistrationInputError``, unless ``overwrite`` (``regnet-zoo train --overwrite``,
    bundle key ``overwrite``) or the run resumes (``resume``: it continues the run that wrote them).
    """

    def __init__(
        self,
        path: str | Path,
        network: torch.nn.Module,
        method: str,
        network_config: Mapping[str, Any],
        transforms: Any = None,
        dataset: Any = None,
        overwrite: bool = False,
        resume: bool = False,
    ) -> None:
        self.path = Path(path)
        self.network, self.method = network, method
        self.network_config, self.transforms = dict(network_config), transforms
        self.dataset, self.overwrite, self.resume = dataset, bool(overwrite), bool(resume)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self.check)
        engine.add_event_handler(Events.COMPLETED, self.save)

    def check(self, engine: Engine | None = None) -> None:
        """Refuse to train over existing weights; check that the recorded arguments rebuild the network."""
        from regnet_zoo.errors import RegistrationInputError
        from regnet_zoo.weights import build_network

        if self.path.exists() and not (self.overwrite or self.resume):
            raise RegistrationInputError(
                f"{self.path}: weights of an earlier training run exist; pass --overwrite (bundle key "
                "overwrite=True) to replace them, or train into another ckpt_dir"
            )
        live = self._module().state_dict()
        rebuilt = build_network(self.metadata(None, with_data=False)).state_dict()
        if {k: tuple(v.shape) for k, v in rebuilt.items()} != {k: tuple(v.shape) for k, v in live.items()}:
            raise RegistrationInputError(
                "ModelSaver: the recorded network_config does not rebuild the trained network (list every "
                "network_def argument in the ModelSaver's network_config)"
            )

    def _module(self) -> torch.nn.Module:
        return self.network.module if hasattr(self.network, "module") else self.network

    def metadata(self, engine: Engine | None = None, with_data: bool = True) -> dict[str, Any]:
        from regnet_zoo.data.preprocess import Preprocessing
        from regnet_zoo.weights import weights_metadata

        cls = type(self._module())
        config = {"_target_": f"{cls.__module__}.{cls.__qualname__}", **self.network_config}
        prep = getattr(self.transforms, "preprocessing", None) or Preprocessing()
        trained_on = self._trained_on(engine) if with_data else {}
        return weights_metadata(self.method, config, prep.to_dict(), trained_on)

    def _trained_on(self, engine: Engine | None) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if engine is not None:
            out.update(iterations=int(engine.state.iteration), epochs=int(engine.state.epoch))
        dataset = self.dataset
        if dataset is not None and hasattr(dataset, "pairs"):
            pairs = dataset.pairs("train")
            out["dataset"] = str(getattr(dataset, "name", ""))
            out["dataset_dir"] = str(getattr(dataset, "root", ""))
            out["pairs"] = len(pairs)
            if pairs:
                from regnet_zoo.core.geometry import spacing_from_affine
                from regnet_zoo.data.io import load_image

                first = load_image(pairs[0]["fixed"])
                out["grid"] = [int(n) for n in first.shape[1:]]
                out["spacing"] = spacing_from_affine(first.affine, first.ndim - 1)
        return out

    def save(self, engine: Engine | None = None) -> Path:
        from regnet_zoo.weights import save_weights

        path = save_weights(self.path, self._module(), self.metadata(engine), overwrite=True)
        logger.info(f"saved self-describing weights to {path}")
        return path


class WeightsLoader:
    """``monai.handlers.CheckpointLoader`` for bundle inference that first checks self-describing weights
    against the config: method, ``spatial_dims`` and the working grid ``image_size`` must be the trained ones
    (``RegistrationInputError`` otherwise); weights without metadata load with a warning."""

    def __init__(
        self,
        load_path: str | Path,
        load_dict: dict,
        method: str | None = None,
        spatial_dims: int | None = None,
        image_size: Sequence[int] | int | None = None,
        map_location: Any = None,
        strict: bool = True,
    ) -> None:
        from monai.handlers import CheckpointLoader

        self.load_path, self.method, self.spatial_dims = Path(load_path), method, spatial_dims
        self.image_size = image_size
        self.loader = CheckpointLoader(
            load_path=str(load_path), load_dict=load_dict, map_location=map_location, strict=strict
        )

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self)

    def check(self) -> None:
        from regnet_zoo.errors import RegistrationInputError
        from regnet_zoo.weights import check_weights_fit, read_weights

        _, meta = read_weights(self.load_path)
        if meta is None:
            logger.warning(
                f"{self.load_path}: weights without regnet_zoo metadata (a plain state dict): the bundle "
                "config's network and preprocessing are assumed to be the trained ones"
            )
            return
        check_weights_fit(meta, str(self.load_path), method=self.method, spatial_dims=self.spatial_dims)
        trained = (meta.get("preprocessing") or {}).get("image_size")
        size = self.image_size
        if size is not None and self.spatial_dims and isinstance(size, int):
            size = [size] * int(self.spatial_dims)
        if trained and len(trained) == 1 and self.spatial_dims:
            trained = list(trained) * int(self.spatial_dims)
        if (list(trained) if trained else None) != (list(size) if size is not None else None):
            raise RegistrationInputError(
                f"{self.load_path}: the network was trained with image_size {trained} but the config sets "
                f"{size}; set image_size={trained}"
            )

    def __call__(self, engine: Engine) -> None:
        self.check()
        self.loader(engine)
