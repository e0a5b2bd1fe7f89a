"""Evaluation of displacement fields: label overlap, surface distance, landmark error, field regularity."""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from torch import Tensor

from regnet_zoo.api.fields import warp_physical
from regnet_zoo.api.inputs import ImageLike, PointsLike, as_image, as_label, load_points
from regnet_zoo.core.geometry import affine_of, lps_to_voxel, spacing_from_affine
from regnet_zoo.core.metrics import _nanmean, dice_per_label, hd95, registration_metrics
from regnet_zoo.data.io import metrics_to_json
from regnet_zoo.errors import RegistrationInputError

__all__ = ["evaluate_ddf", "label_metrics", "metrics_to_json", "case_id"]


def evaluate_ddf(
    ddf: Tensor,
    fixed: ImageLike,
    *,
    fixed_label: ImageLike | None = None,
    moving_label: ImageLike | None = None,
    fixed_landmarks: PointsLike | None = None,
    moving_landmarks: PointsLike | None = None,
    moving: ImageLike | None = None,
    labels: Sequence[int] | None = None,
    landmark_units: str = "mm",
) -> dict[str, Any]:
    """Metrics of a voxel DDF ``(N, *S)`` on the grid of ``fixed`` (Learn2Reg convention).

    Keys (absent when they do not apply): ``dice`` (per label), ``dice_mean``, ``hd95_mm`` (fixed label vs
    the moving label warped nearest-neighbour through physical space, so the moving label may lie on another
    grid), ``tre_mm``, ``tre_mm_initial`` (landmarks in LPS mm; ``landmark_units="voxel"`` for voxel-index
    CSVs, converted with the fixed / moving image), ``sdlogj``, ``sdlogj_l2r``, ``folding_percent``.
    ``moving`` (optional) is used to check that moving landmarks lie inside it. ``labels``: the label values
    to evaluate (default: every non-zero value).
    """
    fixed_img = as_image(fixed, "fixed image")
    spatial_dims = fixed_img.ndim - 1
    ddf = ddf.detach().cpu().float()
    if ddf.shape[0] != spatial_dims or tuple(ddf.shape[1:]) != tuple(fixed_img.shape[1:]):
        raise RegistrationInputError(
            f"displacement field {tuple(ddf.shape)} does not fit the fixed grid {tuple(fixed_img.shape[1:])}"
        )
    fixed_affine = affine_of(fixed_img)
    spacing = spacing_from_affine(fixed_affine, spatial_dims)
    moving_img = as_image(moving, "moving image", spatial_dims) if moving is not None else None
    points: dict[str, np.ndarray] = {}
    if (fixed_landmarks is None) != (moving_landmarks is None):
        raise RegistrationInputError("TRE needs both fixed and moving landmarks")
    if fixed_landmarks is not None:
        fixed_pts = load_points(fixed_landmarks, fixed_img, "fixed landmarks", landmark_units)
        moving_pts = load_points(moving_landmarks, moving_img, "moving landmarks", landmark_units)
        if fixed_pts.shape != moving_pts.shape:
            raise RegistrationInputError(
                f"fixed and moving landmarks must correspond row by row, got {len(fixed_pts)} and "
                f"{len(moving_pts)} points"
            )
        # both sets in fixed voxel coordinates: TRE = |x_f + ddf(x_f) - x_m| * spacing (mm)
        points = {
            "fixed": lps_to_voxel(fixed_pts, fixed_affine),
            "moving": lps_to_voxel(moving_pts, fixed_affine),
        }
    metrics = registration_metrics(
        ddf, fixed_points=points.get("fixed"), moving_points=points.get("moving"), spacing=spacing
    )
    if (fixed_label is None) != (moving_label is None):
        raise RegistrationInputError("label metrics need both a fixed and a moving label")
    if fixed_label is not None:
        by_label = label_metrics(ddf, fixed_img, fixed_label, moving_label, labels, spacing)[0]
        metrics = {**by_label, **metrics}
    return metrics


def label_metrics(
    ddf: Tensor,
    fixed_img: MetaTensor,
    fixed_label: ImageLike,
    moving_label: ImageLike,
    labels: Sequence[int] | None,
    spacing: Sequence[float],
) -> tuple[dict[str, Any], MetaTensor]:
    """Dice / HD95 of the fixed label vs the moving label warped (nearest) by ``ddf``; the warped label."""
    spatial_dims = fixed_img.ndim - 1
    fixed_affine = affine_of(fixed_img)
    fixed_lab = as_label(fixed_label, "fixed label", spatial_dims)
    moving_lab = as_label(moving_label, "moving label", spatial_dims)
    if tuple(fixed_lab.shape[1:]) != tuple(fixed_img.shape[1:]) or not np.allclose(
        affine_of(fixed_lab), fixed_affine, atol=1e-4
    ):  # a fixed label on its own grid: bring it onto the fixed image's grid first
        fixed_lab = warp_physical(fixed_lab, fixed_affine, fixed_img.shape[1:], nearest=True)
    warped = warp_physical(moving_lab, fixed_affine, fixed_img.shape[1:], ddf, nearest=True)
    fixed_np, warped_np = np.asarray(fixed_lab[0]), warped[0].numpy()
    moving_np = np.asarray(moving_lab[0])
    dice = dice_per_label(fixed_np, warped_np, labels=labels, moving_label=moving_np)
    hd = hd95(fixed_np, warped_np, labels=labels, spacing=spacing, moving_label=moving_np)
    metrics = {
        "dice": dice,
        "dice_mean": _nanmean(list(dice.values())),
        "hd95_mm": _nanmean(list(hd.values())),
    }
    return metrics, MetaTensor(warped, affine=torch.as_tensor(fixed_affine))


def case_id(path: str | os.PathLike) -> str:
    """Learn2Reg case number of an image file name (``OASIS_0395_0000.nii.gz`` -> ``"0395"``)."""
    match = re.search(r"_(\d+)_\d{4}\.nii(\.gz)?$", Path(path).name) or re.search(
        r"(\d+)\D*$", Path(path).name
    )
    if match is None:
        raise RegistrationInputError(f"{path}: cannot tell the case number from the file name")
    return match.group(1)
