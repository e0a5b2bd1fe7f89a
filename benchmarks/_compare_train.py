"""Training under one budget for ``compare.py``: every deep method (bundles and MONAI VoxelMorph) is
trained by the shared :class:`~regnet_zoo.engines.workflows.RegistrationTrainer` for the same number of
iterations or the same wall time; trained weights are cached under ``<out>/models/`` keyed by method,
dataset and budget.

Each bundle contributes only what its ``train.yaml`` defines: ``network_def``, ``loss``, ``optimizer``, the
training data loader ``train#dataloader`` (RegNet: its own synthetic-DVF training transform) and, when the
bundle sets one, ``train#trainer#prepare_batch``. The bundle's handlers (checkpoints into ``bundles/``,
validation, learning-rate schedules) are not used: the benchmark runs the bare loop.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from _compare_eval import PeakMemory
from ignite.engine import Events
from torch import nn
from tqdm.auto import tqdm

from regnet_zoo.baselines import VoxelMorphLoss, VoxelMorphRegistration
from regnet_zoo.engines.workflows import RegistrationTrainer, prepare_registration_batch

__all__ = ["Budget", "TrainSpec", "bundle_train_spec", "voxelmorph_train_spec", "train_or_load", "cache_key"]


@dataclass(frozen=True)
class Budget:
    """Training budget: ``iterations`` optimiser steps or ``minutes`` of wall time (one of them)."""

    iterations: int | None = None
    minutes: float | None = None

    def __post_init__(self) -> None:
        if (self.iterations is None) == (self.minutes is None):
            raise ValueError("give exactly one of iterations or minutes")
        if (self.iterations is not None and self.iterations < 1) or (
            self.minutes is not None and self.minutes <= 0
        ):
            raise ValueError(f"budget must be positive, got {self}")

    @property
    def key(self) -> str:
        return f"it{self.iterations}" if self.iterations is not None else f"min{self.minutes:g}"

    def __str__(self) -> str:
        return f"{self.iterations} iterations" if self.iterations is not None else f"{self.minutes:g} min"


@dataclass
class TrainSpec:
    """Everything the loop needs for one method."""

    network: nn.Module
    loss: nn.Module
    optimizer: torch.optim.Optimizer
    loader: Iterable
    prepare_batch: Callable = prepare_registration_batch
    batch_size: int = 1


def bundle_train_spec(
    method: str,
    dataset_dir: str,
    spatial_dims: int,
    image_size: list[int] | None,
    device: str,
    batch_size: int | None = None,
    pre_align: str | None = None,
    spacing: float | None = None,
    pair_keys: list[str] | None = None,
    num_workers: int | None = None,
) -> TrainSpec:
    """The training parts of ``bundles/<method>/train.yaml`` (monai ``ConfigParser``) for this dataset
    (``pre_align``: the affine stage of its ``pair_transforms``; ``spacing``: resample to this voxel size;
    ``pair_keys``: the pair entries training reads, e.g. ``["fixed", "moving"]`` to keep labels out;
    ``num_workers``: loader processes, e.g. for RegNet's synthetic crops, drawn on the CPU)."""
    from regnet_zoo.bundle import bundle_parser

    overrides: dict[str, Any] = {
        "dataset_dir": str(dataset_dir),
        "spatial_dims": spatial_dims,
        "image_size": image_size,
        "device": device,
    }
    if batch_size is not None:
        overrides["batch_size"] = batch_size
    if pre_align is not None:
        overrides["transforms#pre_align"] = pre_align
    if spacing is not None:
        overrides["transforms#spacing"] = spacing
    if pair_keys is not None:
        overrides["pair_keys"] = list(pair_keys)
    if num_workers is not None:
        overrides["num_workers"] = num_workers
    parser = bundle_parser(method, "train", **overrides)
    network = parser.get_parsed_content("network")
    trainer_config = parser.get("train#trainer", {})
    prepare = (
        parser.get_parsed_content("train#trainer#prepare_batch")
        if "prepare_batch" in trainer_config
        else prepare_registration_batch
    )
    return TrainSpec(
        network=network,
        loss=parser.get_parsed_content("loss"),
        optimizer=parser.get_parsed_content("optimizer"),
        loader=parser.get_parsed_content("train#dataloader"),
        prepare_batch=prepare,
        batch_size=int(parser.get_parsed_content("batch_size")),
    )


def voxelmorph_train_spec(
    dataset_dir: str,
    spatial_dims: int,
    image_size: list[int] | None,
    device: str,
    batch_size: int | None = None,
    similarity: str = "lncc",
    learning_rate: float = 1e-3,
    seed: int = 0,
    pre_align: str | None = None,
    spacing: float | None = None,
    num_workers: int = 0,
) -> TrainSpec:
    """MONAI ``VoxelMorph`` with LNCC (or MSE) + diffusion on every ordered pair of training subjects.

    Same pairs and preprocessing as the bundles' ``train#dataloader`` (``pair_transforms`` without padding);
    batch size 4 unless given (the bundles' default).
    """
    from regnet_zoo.data.learn2reg import Learn2RegDataset
    from regnet_zoo.data.transforms import pair_dataloader, pair_transforms

    batch_size = 4 if batch_size is None else batch_size
    network = VoxelMorphRegistration(spatial_dims=spatial_dims).to(device)
    transforms = pair_transforms(
        spatial_size=image_size,
        spacing=spacing,
        pad_multiple=None,
        keys_present=["fixed", "moving"],
        spatial_dims=spatial_dims,
        pre_align=pre_align,
    )
    pairs = [
        {"fixed": p["fixed"], "moving": p["moving"]} for p in Learn2RegDataset(dataset_dir).pairs("train")
    ]
    loader = pair_dataloader(
        pairs, transforms, batch_size=batch_size, shuffle=True, num_workers=num_workers, cache=True, seed=seed
    )
    return TrainSpec(
        network=network,
        loss=VoxelMorphLoss(similarity=similarity),
        optimizer=torch.optim.Adam(network.parameters(), lr=learning_rate),
        loader=loader,
        batch_size=batch_size,
    )


def cache_key(method: str, dataset_dir: str | Path, budget: Budget, **settings: Any) -> str:
    """``<method>__<dataset name>-<hash of path and settings>__<budget>``: the cached-weights file stem."""
    path = Path(dataset_dir).resolve()
    digest = hashlib.sha1(json.dumps([str(path), settings], sort_keys=True, default=str).encode()).hexdigest()
    name = re.sub(r"[^A-Za-z0-9]+", "-", path.name).strip("-") or "data"
    return f"{method}__{name}-{digest[:8]}__{budget.key}"


def _run_loop(spec: TrainSpec, budget: Budget, device: str, desc: str) -> dict[str, Any]:
    """Train until the budget is spent; returns iterations, epochs, last loss, wall time."""
    epoch_length = len(spec.loader)  # type: ignore[arg-type]
    if budget.iterations is not None:
        max_epochs = max(1, math.ceil(budget.iterations / max(epoch_length, 1)))
        total = budget.iterations
    else:
        max_epochs = 10**6  # stopped by the clock
        total = None
    trainer = RegistrationTrainer(
        device=device,
        max_epochs=max_epochs,
        train_data_loader=spec.loader,
        network=spec.network,
        optimizer=spec.optimizer,
        loss_function=spec.loss,
        prepare_batch=spec.prepare_batch,
    )
    bar = tqdm(total=total, desc=f"train {desc}", unit="it", leave=False)
    start = time.perf_counter()
    last_loss: list[float] = []
    curve: list[list[float]] = []  # learning curve: [iteration, seconds, loss] of every iteration

    @trainer.on(Events.ITERATION_COMPLETED)
    def _step(engine) -> None:
        last_loss[:] = [float(engine.state.output["loss"])]
        curve.append([engine.state.iteration, round(time.perf_counter() - start, 3), last_loss[0]])
        bar.update(1)
        bar.set_postfix(loss=f"{last_loss[0]:.4g}")
        elapsed = time.perf_counter() - start
        if (budget.iterations is not None and engine.state.iteration >= budget.iterations) or (
            budget.minutes is not None and elapsed >= 60.0 * budget.minutes
        ):
            engine.terminate()

    try:
        trainer.run()
    finally:
        bar.close()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return {
        "train_time_s": time.perf_counter() - start,
        "train_iterations": int(trainer.state.iteration),
        "train_epochs": int(trainer.state.epoch),
        "final_loss": last_loss[0] if last_loss else float("nan"),
        "loss_curve": curve,
    }


def train_or_load(
    name: str,
    make_spec: Callable[[], TrainSpec],
    make_network: Callable[[], nn.Module],
    budget: Budget,
    cache_dir: Path,
    key: str,
    device: str,
    seed: int = 0,
    retrain: bool = False,
) -> tuple[nn.Module, dict[str, Any]]:
    """The trained network of ``name`` (eval mode) and its training record.

    Loads ``<cache_dir>/<key>.pt`` + ``.json`` into ``make_network()`` when present (record gets
    ``cached: True``), otherwise trains ``make_spec()`` (seeded) and writes both files.
    """
    from monai.utils import set_determinism

    weights, record_file = cache_dir / f"{key}.pt", cache_dir / f"{key}.json"
    set_determinism(seed=seed)
    if not retrain and weights.is_file() and record_file.is_file():
        network = make_network()
        network.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
        record = json.loads(record_file.read_text())
        record["cached"] = True
        return network.to(device).eval(), record
    with PeakMemory(device) as memory:
        spec = make_spec()
        record = _run_loop(spec, budget, device, name)
    record.update(
        {
            "train_peak_rss_mb": memory.peak_rss_mb,
            "train_peak_gpu_mb": memory.peak_gpu_mb,
            "batch_size": spec.batch_size,
            "budget": str(budget),
        }
    )
    cache_dir.mkdir(parents=True, exist_ok=True)
    torch.save(spec.network.state_dict(), weights)
    record_file.write_text(json.dumps(record, indent=2))
    record["cached"] = False
    set_determinism(seed=None)
    return spec.network.eval(), record
