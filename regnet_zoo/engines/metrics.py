"""Per-pair registration metrics for the evaluator, their aggregation, and an ignite metric averaging them.

All numbers come from ``regnet_zoo.core.metrics`` (Learn2Reg definitions: Dice of nearest-neighbour-warped
labels, HD95, TRE, SDlogJ, folding) plus the image MSE before/after registration.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from ignite.metrics import Metric

from regnet_zoo.core.metrics import _nanmean, dice_per_label, dsc30, registration_metrics, sdlogj30, tre30

__all__ = ["pair_metrics", "aggregate_metrics", "MeanPairMetric"]


def pair_metrics(
    outputs: Mapping[str, torch.Tensor],
    batch: Mapping[str, torch.Tensor],
    labels: Sequence[int] | None = None,
    spacing: Sequence[Sequence[float] | None] | None = None,
) -> list[dict[str, Any]]:
    """Metrics of every pair of a batch: a list of ``B`` dicts.

    ``outputs``: network outputs with ``ddf`` ``(B, N, *S)`` and ``warped``; ``batch``: ``fixed``, ``moving``
    and optionally ``fixed_label``/``moving_label`` ``(B, 1, *S)``, ``fixed_keypoints``/``moving_keypoints``
    ``(B, K, N)``. ``labels``: label values to evaluate (default: all non-zero); ``spacing``: per pair voxel
    size in mm (None = 1 mm). Keys: ``mse``, ``mse_initial``, ``sdlogj``, ``sdlogj_l2r``, ``folding_percent``
    and, with labels, ``dice`` (per label), ``dice_mean``, ``dice_mean_initial``, ``hd95_mm``; with keypoints,
    ``tre_mm``, ``tre_mm_initial``.
    """
    ddf = outputs["ddf"].detach().float().cpu()
    fixed = batch["fixed"].detach().float().cpu()
    moving = batch["moving"].detach().float().cpu()
    warped = outputs["warped"].detach().float().cpu()
    has_labels = batch.get("fixed_label") is not None and batch.get("moving_label") is not None
    has_points = batch.get("fixed_keypoints") is not None and batch.get("moving_keypoints") is not None
    results = []
    for i in range(ddf.shape[0]):
        kwargs: dict[str, Any] = {"labels": labels, "spacing": spacing[i] if spacing is not None else None}
        if has_labels:
            kwargs["fixed_label"] = batch["fixed_label"][i, 0].detach().cpu().numpy()
            kwargs["moving_label"] = batch["moving_label"][i, 0].detach().cpu().numpy()
        if has_points:
            kwargs["fixed_points"] = batch["fixed_keypoints"][i].detach().cpu().numpy()
            kwargs["moving_points"] = batch["moving_keypoints"][i].detach().cpu().numpy()
        metrics = registration_metrics(ddf[i : i + 1].double(), **kwargs)
        if has_labels:
            initial = dice_per_label(kwargs["fixed_label"], kwargs["moving_label"], labels=labels)
            metrics["dice_mean_initial"] = _nanmean(list(initial.values()))
        metrics["mse"] = float(((warped[i] - fixed[i]) ** 2).mean())
        metrics["mse_initial"] = float(((moving[i] - fixed[i]) ** 2).mean())
        results.append(metrics)
    return results


def aggregate_metrics(per_pair: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Mean, standard deviation and count of every scalar metric over pairs (NaN ignored) + robustness.

    Robustness (Learn2Reg 2021): ``dice_mean_30`` (DSC30), ``sdlogj_30``, ``sdlogj_l2r_30``,
    ``tre_mm_30`` when present.
    """
    keys = sorted({k for m in per_pair for k, v in m.items() if isinstance(v, (int, float))})
    summary: dict[str, Any] = {"num_pairs": len(per_pair)}
    for key in keys:
        values = np.asarray([float(m[key]) for m in per_pair if key in m], dtype=np.float64)
        finite = values[~np.isnan(values)]
        summary[key] = {
            "mean": float(finite.mean()) if finite.size else float("nan"),
            "std": float(finite.std()) if finite.size else float("nan"),
            "count": int(finite.size),
        }
    robust: dict[str, Callable] = {
        "dice_mean": dsc30,
        "sdlogj": sdlogj30,
        "sdlogj_l2r": sdlogj30,
        "tre_mm": tre30,
    }
    for key, fn in robust.items():
        if key in summary:
            summary[f"{key}_30"] = fn([float(m[key]) for m in per_pair if key in m])
    return summary


def _metrics_of(output: Mapping[str, Any]) -> list[dict[str, Any]]:
    return output["metrics"]


class MeanPairMetric(Metric):
    """Ignite metric: mean of per-pair ``key`` (e.g. ``"dice_mean"``) over an evaluation run, NaNs skipped.

    Reads the evaluator output's ``"metrics"`` list (see
    :class:`~regnet_zoo.engines.workflows.RegistrationEvaluator`). ``higher_is_better`` is informational
    (MONAI's ``metric_cmp_fn`` decides what "best" means). Returns NaN when no pair had the metric.
    """

    def __init__(
        self, key: str = "dice_mean", output_transform: Callable = _metrics_of, device="cpu"
    ) -> None:
        self.key = key
        super().__init__(output_transform=output_transform, device=device)

    def reset(self) -> None:
        self._sum = 0.0
        self._count = 0

    def update(self, output: Sequence[Mapping[str, Any]]) -> None:
        for metrics in output:
            value = metrics.get(self.key)
            if value is not None and not math.isnan(float(value)):
                self._sum += float(value)
                self._count += 1

    def compute(self) -> float:
        return self._sum / self._count if self._count else float("nan")
