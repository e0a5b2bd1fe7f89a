"""Evaluation for ``compare.py``: the same preprocessed validation pairs for every method, registration
timing, peak memory, and the Learn2Reg metrics of ``regnet_zoo.core.metrics`` (through ``engines.metrics``).
"""

from __future__ import annotations

import gc
import os
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from regnet_zoo.core.spatial import warp_image
from regnet_zoo.engines.handlers import spacings_of
from regnet_zoo.engines.metrics import aggregate_metrics, pair_metrics

__all__ = [
    "METRIC_FIELDS",
    "PeakMemory",
    "load_eval_pairs",
    "deep_registrar",
    "classic_registrar",
    "evaluate_registrar",
    "instance_registrar",
    "combine_rows",
    "num_parameters",
]

#: the fields every result row carries (``None`` where a metric does not apply, e.g. TRE without keypoints)
METRIC_FIELDS = (
    "dice_mean",
    "dice_mean_30",
    "hd95_mm",
    "tre_mm",
    "sdlogj",
    "sdlogj_l2r",
    "folding_percent",
    "time_per_pair_s",
    "train_time_s",
    "peak_rss_mb",
    "peak_gpu_mb",
    "num_parameters",
)

EVAL_KEYS = ["fixed", "moving", "fixed_label", "moving_label", "fixed_keypoints", "moving_keypoints"]


def _rss_bytes() -> int:
    """Resident set size of this process (``/proc/self/statm``; psutil elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, AttributeError):
        import psutil

        return int(psutil.Process().memory_info().rss)


class PeakMemory:
    """Context manager: peak RSS of this process (MB, sampled every ``interval`` s in a thread), its increase
    over the RSS at entry (the block's own working memory; garbage is collected first) and peak CUDA memory
    allocated by torch (MB; ``None`` off the GPU) while the block runs."""

    def __init__(self, device: str = "cpu", interval: float = 0.01) -> None:
        self.cuda = str(device).startswith("cuda") and torch.cuda.is_available()
        self.interval = interval
        self.peak_rss_mb: float = float("nan")
        self.peak_rss_increase_mb: float = float("nan")
        self.peak_gpu_mb: float | None = None
        self._peak = 0
        self._stop = threading.Event()

    def _poll(self) -> None:
        while not self._stop.is_set():
            self._peak = max(self._peak, _rss_bytes())
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakMemory:
        gc.collect()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        self._start = self._peak = _rss_bytes()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._peak = max(self._peak, _rss_bytes())
        self.peak_rss_mb = self._peak / 2**20
        self.peak_rss_increase_mb = (self._peak - self._start) / 2**20
        if self.cuda:
            torch.cuda.synchronize()
            self.peak_gpu_mb = torch.cuda.max_memory_allocated() / 2**20


def load_eval_pairs(
    dataset_dir: str,
    spatial_dims: int,
    image_size: list[int] | None,
    max_pairs: int | None = None,
    pre_align: str | None = None,
    spacing: float | None = None,
) -> tuple[list[dict], list[int] | None]:
    """The validation pairs (``registration_val``; the first two training pairs when there are none), each
    preprocessed once with the bundles' ``pair_transforms`` (with the affine stage ``pre_align``, if any)
    and collated to a batch of one; and the dataset's evaluation labels (``None``: all non-zero labels).
    ``spacing``: resample to this voxel size (mm) first (then fixed and moving are padded to one grid)."""
    from regnet_zoo.data.learn2reg import Learn2RegDataset
    from regnet_zoo.data.transforms import pair_collate, pair_transforms

    dataset = Learn2RegDataset(dataset_dir)
    pairs = dataset.pairs("val") or dataset.pairs("train")[:2]
    if max_pairs is not None:
        pairs = pairs[:max_pairs]
    transforms = pair_transforms(
        spatial_size=image_size,
        spacing=spacing,
        pad_multiple=None,
        keys_present=EVAL_KEYS,
        spatial_dims=spatial_dims,
        pre_align=pre_align,
    )
    batches = []
    for pair in pairs:
        item = transforms({k: v for k, v in pair.items() if k in EVAL_KEYS or k == "keypoint_units"})
        item.pop("pre_affine", None)
        batch = pair_collate([item])
        batch["name"] = f"{os.path.basename(pair['fixed'])} <- {os.path.basename(pair['moving'])}"
        batches.append(batch)
    return batches, dataset.evaluation_labels or None


def _plain(x: Tensor) -> Tensor:
    return x.as_tensor() if hasattr(x, "as_tensor") else x


def deep_registrar(network: nn.Module, device: str) -> Callable[[dict], Tensor]:
    """``batch -> ddf (1, N, *S)`` on the CPU, by the network's forward pass (no gradients)."""
    network = network.to(device).eval()

    def register(batch: dict) -> Tensor:
        with torch.no_grad():
            outputs = network(_plain(batch["fixed"]).to(device), _plain(batch["moving"]).to(device))
        if str(device).startswith("cuda"):
            torch.cuda.synchronize()
        return outputs["ddf"].float().cpu()

    return register


def classic_registrar(function: Callable[..., Tensor], **kwargs: Any) -> Callable[[dict], Tensor]:
    """``batch -> ddf (1, N, *S)`` by a :mod:`regnet_zoo.baselines` function (voxel size from the affine)."""

    def register(batch: dict) -> Tensor:
        fixed = _plain(batch["fixed"])
        spacing = spacings_of(batch, 1, fixed.ndim - 2)[0]
        return function(fixed[0, 0], _plain(batch["moving"])[0, 0], spacing=spacing, **kwargs)[None]

    return register


def instance_registrar(
    network: nn.Module, loss_fn: Callable, lr: float, steps: int, device: str
) -> Callable[[dict], Tensor]:
    """``batch -> ddf``: the network's prediction refined by ``steps`` of instance optimisation
    (:func:`regnet_zoo.api.instance.instance_optimise`, the method's own loss on the image pair only: labels
    of the evaluation pair are never used)."""
    from regnet_zoo.api.instance import instance_optimise

    network = network.to(device).eval()

    def register(batch: dict) -> Tensor:
        fixed, moving = _plain(batch["fixed"]).to(device), _plain(batch["moving"]).to(device)
        with torch.no_grad():
            outputs = network(fixed, moving)
        with torch.enable_grad():
            outputs = instance_optimise(network, loss_fn, outputs, fixed, moving, steps, lr)
        return outputs["ddf"].detach().float().cpu()

    return register


def num_parameters(network: nn.Module | None) -> int:
    return 0 if network is None else int(sum(p.numel() for p in network.parameters()))


def _mean_or_none(summary: dict, key: str) -> float | None:
    value = summary.get(key)
    if isinstance(value, dict):
        value = value.get("mean")
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return None
    return float(value)


def evaluate_registrar(
    name: str,
    register: Callable[[dict], Tensor],
    pairs: Sequence[dict],
    labels: Sequence[int] | None,
    device: str = "cpu",
    warmup: bool = False,
) -> dict[str, Any]:
    """Register every pair, time it, measure peak memory and compute the metrics.

    Returns the row fields of :data:`METRIC_FIELDS` that evaluation determines, plus ``per_pair`` (metrics
    per pair), ``per_label_dice`` (label -> Dice per pair), ``dice_mean_initial``, ``tre_mm_initial``,
    ``mse``, and ``example`` (fixed, moving, warped, ddf of the first pair, for the panels).
    ``warmup``: run the first pair once untimed (one-off costs of a network's first call).
    """
    if warmup and pairs:
        register(pairs[0])
    times, per_pair, example = [], [], None
    with PeakMemory(device) as memory:
        for batch in tqdm(pairs, desc=f"register {name}", unit="pair", leave=False):
            start = time.perf_counter()
            ddf = register(batch)
            times.append(time.perf_counter() - start)
            moving = _plain(batch["moving"]).float()
            warped = warp_image(moving, ddf)
            plain_batch = {k: _plain(v) for k, v in batch.items() if isinstance(v, Tensor)}
            spacing = spacings_of(batch, 1, ddf.ndim - 2)
            metrics = pair_metrics(
                {"ddf": ddf, "warped": warped}, plain_batch, labels=labels, spacing=spacing
            )[0]
            metrics["time_s"] = times[-1]
            metrics["pair"] = batch.get("name", str(len(per_pair)))
            per_pair.append(metrics)
            if example is None:
                example = {
                    "fixed": _plain(batch["fixed"])[0, 0].numpy(),
                    "moving": moving[0, 0].numpy(),
                    "warped": warped[0, 0].numpy(),
                    "ddf": ddf[0].numpy(),
                }
    per_label: dict[str, list[float]] = {}
    for m in per_pair:
        for label, value in m.get("dice", {}).items():
            per_label.setdefault(str(label), []).append(float(value))
    row = _summary_fields([{k: v for k, v in m.items() if k != "dice"} for m in per_pair])
    row.update(
        {
            "peak_rss_mb": memory.peak_rss_mb,
            "peak_rss_increase_mb": memory.peak_rss_increase_mb,
            "peak_gpu_mb": memory.peak_gpu_mb,
            "per_label_dice": per_label,
            "per_pair": [{k: v for k, v in m.items() if k != "dice"} for m in per_pair],
            "example": example,
        }
    )
    return row


#: metrics summarised over pairs (and seeds): mean in the field itself, spread in ``<field>_std``
_SUMMARY_KEYS = (
    "dice_mean",
    "hd95_mm",
    "tre_mm",
    "sdlogj",
    "sdlogj_l2r",
    "folding_percent",
    "dice_mean_initial",
    "tre_mm_initial",
    "mse",
)


def _summary_fields(per_pair: Sequence[dict]) -> dict[str, Any]:
    """Mean and standard deviation over ``per_pair`` (``engines.metrics.aggregate_metrics``), DSC30 and the
    mean registration time."""
    summary = aggregate_metrics(per_pair)
    row: dict[str, Any] = {}
    for key in _SUMMARY_KEYS:
        row[key] = _mean_or_none(summary, key)
        std = summary.get(key, {}).get("std") if isinstance(summary.get(key), dict) else None
        row[f"{key}_std"] = None if std is None or np.isnan(std) else float(std)
    row["dice_mean_30"] = _mean_or_none(summary, "dice_mean_30")
    times = [m["time_s"] for m in per_pair if "time_s" in m]
    row["time_per_pair_s"] = float(np.mean(times)) if times else None
    row["time_per_pair_s_std"] = float(np.std(times)) if times else None
    return row


def combine_rows(rows: Sequence[dict], seeds: Sequence[int]) -> dict[str, Any]:
    """One row from the rows of several training seeds: metrics over every (pair, seed), per-label Dice
    pooled, the example of the first seed, memory / training figures averaged."""
    first = dict(rows[0])
    per_pair = [{**m, "seed": seed} for row, seed in zip(rows, seeds, strict=True) for m in row["per_pair"]]
    first.update(_summary_fields(per_pair))
    first["per_pair"] = per_pair
    first["per_label_dice"] = {
        label: [v for row in rows for v in row["per_label_dice"].get(label, [])]
        for label in rows[0]["per_label_dice"]
    }
    for key in ("peak_rss_mb", "peak_rss_increase_mb", "train_time_s", "final_loss"):
        values = [row[key] for row in rows if row.get(key) is not None]
        first[key] = float(np.mean(values)) if values else None
    first["seeds"] = list(seeds)
    return first

