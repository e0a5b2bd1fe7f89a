"""Learn2Reg-style evaluation metrics: Dice, HD95, TRE, Jacobian determinant, SDlogJ, folding, robustness.

Inputs may be numpy arrays or tensors; results are python floats, dicts of floats or numpy arrays
(per-point TRE). Label maps are ``S`` or ``(1, 1, *S)`` (a 4-D ``(1, D, H, W)`` array is read as a 3-D
volume); fields follow README "Conventions": ``(B, N, *S)`` in voxel units of the fixed grid,
``warped(x) = moving(x + ddf(x))``.
Labels absent from the fixed or the moving map give NaN (as in the Learn2Reg evaluation), never 0; a label
present in both but lost by the warp counts as the worst case (Dice 0, HD95 = the image diagonal).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import torch
from scipy import ndimage
from torch import Tensor

from regnet_zoo.errors import RegistrationInputError

__all__ = [
    "dice_per_label",
    "hd95",
    "tre",
    "jacobian_determinant",
    "sdlogj",
    "folding_fraction",
    "L2R_CROP",
    "L2R_CLIP",
    "robustness_quantile",
    "dsc30",
    "tre30",
    "sdlogj30",
    "registration_metrics",
]

ArrayLike = np.ndarray | Tensor


def _to_numpy(x: ArrayLike | Sequence) -> np.ndarray:
    if isinstance(x, Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _label_array(labels: ArrayLike, name: str) -> np.ndarray:
    """An integer label map as a numpy array of shape ``S`` (leading singleton batch/channel dims dropped)."""
    arr = _to_numpy(labels)
    if arr.ndim == 5 or (arr.ndim == 4 and arr.shape[:2] == (1, 1)):
        if arr.shape[:2] != (1, 1):
            raise RegistrationInputError(f"{name}: expected one label map (1, 1, *S), got shape {arr.shape}")
        arr = arr[0, 0]
    elif arr.ndim == 4:
        if arr.shape[0] != 1:
            raise RegistrationInputError(
                f"{name}: expected one label map (1, D, H, W), got shape {arr.shape}"
            )
        arr = arr[0]
    if arr.ndim not in (2, 3):
        raise RegistrationInputError(f"{name}: expected a 2-D or 3-D label map, got shape {arr.shape}")
    if np.issubdtype(arr.dtype, np.floating):
        if not np.all(np.isfinite(arr)) or not np.array_equal(arr, np.round(arr)):
            raise RegistrationInputError(f"{name}: label map has non-integer values")
        arr = np.round(arr)
    return arr.astype(np.int64)


def _label_pair(
    fixed_label: ArrayLike, warped_label: ArrayLike, moving_label: ArrayLike | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fixed, warped and (for absence checks) moving label maps; moving defaults to warped."""
    fixed = _label_array(fixed_label, "fixed_label")
    warped = _label_array(warped_label, "warped_label")
    if fixed.shape != warped.shape:
        raise RegistrationInputError(
            f"label maps differ in shape: fixed {fixed.shape} vs warped {warped.shape}"
        )
    moving = warped if moving_label is None else _label_array(moving_label, "moving_label")
    return fixed, warped, moving


def _labels_to_evaluate(fixed: np.ndarray, moving: np.ndarray, labels: Sequence[int] | None) -> list[int]:
    if labels is not None:
        return [int(v) for v in labels]
    return [int(v) for v in np.union1d(np.unique(fixed), np.unique(moving)) if v != 0]


def _spacing_array(spacing: float | Sequence[float] | ArrayLike | None, ndim: int) -> np.ndarray:
    if spacing is None:
        return np.ones(ndim)
    arr = np.broadcast_to(np.asarray(_to_numpy(spacing), dtype=np.float64).ravel(), (ndim,)).copy()
    if np.any(arr <= 0) or not np.all(np.isfinite(arr)):
        raise RegistrationInputError(f"spacing must be positive and finite, got {arr.tolist()}")
    return arr


# ----------------------------------------------------------------------------------------------------------
# overlap and surface distance
# ----------------------------------------------------------------------------------------------------------
def dice_per_label(
    fixed_label: ArrayLike,
    warped_label: ArrayLike,
    labels: Sequence[int] | None = None,
    moving_label: ArrayLike | None = None,
) -> dict[int, float]:
    """Dice ``2|F_l & W_l| / (|F_l| + |W_l|)`` of each label ``l``.

    ``labels`` defaults to the non-zero values in the fixed or moving map. A label absent from the fixed map
    or from ``moving_label`` (the unwarped moving map, as Learn2Reg checks; the warped map when not given)
    gives NaN.
    """
    fixed, warped, moving = _label_pair(fixed_label, warped_label, moving_label)
    result: dict[int, float] = {}
    for label in _labels_to_evaluate(fixed, moving, labels):
        fixed_mask, warped_mask = fixed == label, warped == label
        if not fixed_mask.any() or not (moving == label).any():
            result[label] = float("nan")
            continue
        overlap = np.logical_and(fixed_mask, warped_mask).sum()
        result[label] = float(2.0 * overlap / (fixed_mask.sum() + warped_mask.sum()))
    return result


def _surface_voxels(mask: np.ndarray) -> np.ndarray:
    """Voxels of ``mask`` with a face-neighbour outside it (the image border counts as outside)."""
    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    return mask & ~ndimage.binary_erosion(mask, structure=structure, border_value=0)


def _hd95_binary(mask_a: np.ndarray, mask_b: np.ndarray, spacing: np.ndarray) -> float:
    """max of both directed 95th percentiles of surface-voxel to nearest surface-voxel distances."""
    union = mask_a | mask_b
    # crop to the bounding box of both masks (+1 voxel, padded with background where it leaves the image)
    box = tuple(slice(max(int(idx.min()) - 1, 0), int(idx.max()) + 2) for idx in np.nonzero(union))
    pad = [
        (1 if sl.start == 0 else 0, 1 if sl.stop > size else 0)
        for sl, size in zip(box, mask_a.shape, strict=True)
    ]
    surface_a = _surface_voxels(np.pad(mask_a[box], pad))
    surface_b = _surface_voxels(np.pad(mask_b[box], pad))
    dist_to_b = ndimage.distance_transform_edt(~surface_b, sampling=spacing)
    dist_to_a = ndimage.distance_transform_edt(~surface_a, sampling=spacing)
    directed_ab = np.percentile(dist_to_b[surface_a], 95)
    directed_ba = np.percentile(dist_to_a[surface_b], 95)
    return float(max(directed_ab, directed_ba))


def hd95(
    fixed_label: ArrayLike,
    warped_label: ArrayLike,
    labels: Sequence[int] | None = None,
    spacing: float | Sequence[float] | None = None,
    moving_label: ArrayLike | None = None,
) -> dict[int, float]:
    """95th-percentile symmetric Hausdorff distance of each label, in voxels or (with ``spacing``) mm.

    Surface = label voxels with a face-neighbour outside the label; for each direction the 95th percentile
    (linear interpolation) of distances from one surface's voxels to the nearest voxel of the other surface;
    the larger of the two is returned (as MONAI ``compute_hausdorff_distance(percentile=95)``).
    ``spacing`` is per array axis. Absent labels (see :func:`dice_per_label`) give NaN. A label present in
    the fixed and moving maps but empty after the warp gets the worst case, the image diagonal
    ``|shape * spacing|`` (larger than any distance inside the image), so it raises the mean instead of
    leaving it (the official script's ``inf`` would make every mean infinite).
    """
    fixed, warped, moving = _label_pair(fixed_label, warped_label, moving_label)
    spacing_arr = _spacing_array(spacing, fixed.ndim)
    worst = float(np.linalg.norm(np.asarray(fixed.shape) * spacing_arr))
    result: dict[int, float] = {}
    for label in _labels_to_evaluate(fixed, moving, labels):
        fixed_mask, warped_mask = fixed == label, warped == label
        if not fixed_mask.any() or not (moving == label).any():
            result[label] = float("nan")
        elif not warped_mask.any():
            result[label] = worst
        else:
            result[label] = _hd95_binary(fixed_mask, warped_mask, spacing_arr)
    return result


# ----------------------------------------------------------------------------------------------------------
# landmarks
# ----------------------------------------------------------------------------------------------------------
def _single_ddf(ddf: ArrayLike) -> np.ndarray:
    """One field ``(N, *S)`` as float64 numpy from ``(N, *S)`` or ``(1, N, *S)``."""
    arr = _to_numpy(ddf).astype(np.float64)
    if arr.ndim >= 4 and arr.shape[0] == 1 and arr.shape[1] == arr.ndim - 2:
        arr = arr[0]
    if arr.ndim not in (3, 4) or arr.shape[0] != arr.ndim - 1:
        raise RegistrationInputError(
            f"expected one displacement field (1, N, *S) or (N, *S), got {arr.shape}"
        )
    return arr


def _points_array(points: ArrayLike, ndim: int, name: str) -> np.ndarray:
    arr = _to_numpy(points).astype(np.float64)
    if arr.ndim == 3 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 2 or arr.shape[1] != ndim:
        raise RegistrationInputError(
            f"{name}: expected points (K, {ndim}) or (1, K, {ndim}), got {arr.shape}"
        )
    if not np.all(np.isfinite(arr)):
        raise RegistrationInputError(f"{name}: points contain NaN or inf")
    return arr


def tre(
    fixed_points: ArrayLike,
    moving_points: ArrayLike,
    ddf: ArrayLike,
    spacing: float | Sequence[float] | None = None,
    interpolation: str = "cubic",
) -> np.ndarray:
    """Target registration error per landmark, mm: ``|(p_f + ddf(p_f) - p_m) * spacing|`` -> ``(K,)``.

    Points ``(K, N)`` (or ``(1, K, N)``) in voxel coordinates (array-axis order) of the fixed / moving grid;
    the field ``(1, N, *S)`` or ``(N, *S)`` is sampled at the fixed points. ``interpolation="cubic"``
    (default) samples it as the Learn2Reg evaluation does: ``scipy.ndimage.map_coordinates`` with its
    defaults (cubic B-spline with prefilter, displacement 0 outside the grid); ``"linear"``: linear, nearest
    border value outside. ``spacing`` (per axis, mm; None = 1) of the moving grid, as in Learn2Reg.
    """
    if interpolation not in ("cubic", "linear"):
        raise RegistrationInputError(f'tre: interpolation must be "cubic" or "linear", got "{interpolation}"')
    field = _single_ddf(ddf)
    ndim = field.shape[0]
    fixed_pts = _points_array(fixed_points, ndim, "fixed_points")
    moving_pts = _points_array(moving_points, ndim, "moving_points")
    if fixed_pts.shape != moving_pts.shape:
        raise RegistrationInputError(f"fixed {fixed_pts.shape} and moving {moving_pts.shape} points differ")
    sample = (
        {"order": 3, "mode": "constant", "cval": 0.0, "prefilter": True}
        if interpolation == "cubic"
        else {"order": 1, "mode": "nearest"}
    )
    displacement = np.stack(
        [ndimage.map_coordinates(field[i], fixed_pts.T, **sample) for i in range(ndim)], axis=1
    )
    residual = (fixed_pts + displacement - moving_pts) * _spacing_array(spacing, ndim)
    return np.linalg.norm(residual, axis=1)


# ----------------------------------------------------------------------------------------------------------
# deformation quality
# ----------------------------------------------------------------------------------------------------------
def jacobian_determinant(ddf: ArrayLike) -> Tensor:
    """Jacobian determinant of ``x -> x + ddf(x)``: ``(B, N, *S)`` -> ``(B, *S)`` (differentiable).

    ``det(I + grad ddf)`` with ``d ddf_i / d x_j`` by central differences inside and one-sided differences at
    the border (``np.gradient`` / ``torch.gradient``, unit voxel spacing).
    """
    field = ddf if isinstance(ddf, Tensor) else torch.as_tensor(np.asarray(ddf, dtype=np.float64))
    if field.ndim not in (4, 5) or field.shape[1] != field.ndim - 2:
        raise RegistrationInputError(
            f"jacobian_determinant: expected a field (B, N, *S), got {tuple(field.shape)}"
        )
    if min(field.shape[2:]) < 2:
        raise RegistrationInputError(
            f"jacobian_determinant: spatial sizes must be >= 2, got {field.shape[2:]}"
        )
    ndim = field.shape[1]
    grads = torch.gradient(field, dim=tuple(range(2, field.ndim)))  # grads[j][:, i] = d ddf_i / d x_j
    # explicit 2x2 / 3x3 determinants: no (B, *S, N, N) copy of the field's Jacobian matrices
    j = [[grads[col][:, row] + (1.0 if row == col else 0.0) for col in range(ndim)] for row in range(ndim)]
    if ndim == 2:
        return j[0][0] * j[1][1] - j[0][1] * j[1][0]
    return (
        j[0][0] * (j[1][1] * j[2][2] - j[1][2] * j[2][1])
        - j[0][1] * (j[1][0] * j[2][2] - j[1][2] * j[2][0])
        + j[0][2] * (j[1][0] * j[2][1] - j[1][1] * j[2][0])
    )


def _jacobian_cases(jac: ArrayLike) -> np.ndarray:
    arr = _to_numpy(jac).astype(np.float64)
    if arr.ndim not in (3, 4):
        raise RegistrationInputError(f"expected a Jacobian determinant (B, *S), got shape {arr.shape}")
    return arr


L2R_CROP = 2
"""Voxels cropped at every side before SDlogJ and folding, as the Learn2Reg evaluation crops its Jacobian."""
L2R_CLIP = (1e-9, 1e9)
"""Bounds the Learn2Reg evaluation clips the Jacobian determinant to before the log."""


def _interior(case: np.ndarray, name: str) -> np.ndarray:
    """``case[2:-2, ..., 2:-2]``: the Learn2Reg interior crop of one ``S`` Jacobian map."""
    interior = case[tuple(slice(L2R_CROP, -L2R_CROP) for _ in range(case.ndim))]
    if interior.size == 0:
        raise RegistrationInputError(f"{name}: field {case.shape} too small for the {L2R_CROP}-voxel crop")
    return interior


def sdlogj(jac: ArrayLike, mode: str = "clip") -> float:
    """Standard deviation of the log Jacobian determinant on the Learn2Reg interior; ``jac`` ``(B, *S)``.

    Both forms crop 2 voxels at every side (as the Learn2Reg evaluation does) and average over the batch.
    ``mode="clip"`` (the corrected form, key ``sdlogj``): ``std(log(clip(J, 1e-9, 1e9)))`` -- a folded voxel
    (``J <= 0``) counts as ``log 1e-9``, so folding raises the value. ``mode="l2r"`` (the Learn2Reg challenge
    form, key ``sdlogj_l2r``): ``std(log(clip(J + 3, 1e-9, 1e9)))``, whose ``+ 3`` shrinks every deviation.
    """
    if mode not in ("clip", "l2r"):
        raise RegistrationInputError(f'sdlogj: mode must be "clip" or "l2r", got "{mode}"')
    offset = 3.0 if mode == "l2r" else 0.0
    values = [
        np.log(np.clip(_interior(case, "sdlogj") + offset, *L2R_CLIP)).std() for case in _jacobian_cases(jac)
    ]
    return float(np.mean(values))


def folding_fraction(jac: ArrayLike, crop: bool = True) -> float:
    """Percentage (0-100) of voxels with ``J <= 0`` in a ``(B, *S)`` Jacobian map.

    ``crop=True``: on the Learn2Reg interior (2 voxels cropped at every side), the region SDlogJ uses;
    ``crop=False``: over the whole grid.
    """
    cases = _jacobian_cases(jac)
    if crop:
        cases = np.stack([_interior(case, "folding_fraction") for case in cases])
    return float(100.0 * np.count_nonzero(cases <= 0) / cases.size)


# ----------------------------------------------------------------------------------------------------------
# robustness over cases (Learn2Reg 2021)
# ----------------------------------------------------------------------------------------------------------
def robustness_quantile(values: ArrayLike | Sequence[float], q: float) -> float:
    """``q``-quantile (linear interpolation) of per-case values, NaN cases ignored (NaN if none left)."""
    arr = _to_numpy(values).astype(np.float64).ravel()
    arr = arr[~np.isnan(arr)]
    return float(np.quantile(arr, q)) if arr.size else float("nan")


def dsc30(per_case_mean_dice: ArrayLike | Sequence[float]) -> float:
    """DSC30: 0.3-quantile of per-case mean Dice (the worst 30 % of cases; higher is better)."""
    return robustness_quantile(per_case_mean_dice, 0.3)


def tre30(per_case_tre: ArrayLike | Sequence[float]) -> float:
    """TRE30: 0.7-quantile of per-case mean TRE (the worst 30 % of cases; lower is better)."""
    return robustness_quantile(per_case_tre, 0.7)


def sdlogj30(per_case_sdlogj: ArrayLike | Sequence[float]) -> float:
    """SDlogJ30: 0.7-quantile of per-case SDlogJ (the worst 30 % of cases; lower is better)."""
    return robustness_quantile(per_case_sdlogj, 0.7)


# ----------------------------------------------------------------------------------------------------------
# all of it for one registered pair
# ----------------------------------------------------------------------------------------------------------
def _nanmean(values: Sequence[float]) -> float:
    arr = np.asarray(list(values), dtype=np.float64)
    return float(arr[~np.isnan(arr)].mean()) if np.any(~np.isnan(arr)) else float("nan")


def registration_metrics(
    ddf: ArrayLike,
    fixed_label: ArrayLike | None = None,
    moving_label: ArrayLike | None = None,
    fixed_points: ArrayLike | None = None,
    moving_points: ArrayLike | None = None,
    spacing: float | Sequence[float] | None = None,
    labels: Sequence[int] | None = None,
    tre_interpolation: str = "cubic",
) -> dict:
    """Learn2Reg metrics of one registration ``ddf`` ``(1, N, *S)`` or ``(N, *S)`` on the fixed grid.

    Keys: ``dice`` (dict label -> Dice), ``dice_mean``, ``hd95_mm`` (mean over labels) when both label maps
    are given (moving labels warped nearest-neighbour by ``ddf``); ``tre_mm``, ``tre_mm_initial`` (means over
    landmarks; field sampled as ``tre_interpolation``, cubic as Learn2Reg) when both point sets are given;
    ``sdlogj`` (corrected: std log clip(J, 1e-9, 1e9)), ``sdlogj_l2r`` (Learn2Reg challenge form,
    std log(J + 3)) and ``folding_percent`` (% J <= 0), all on the Learn2Reg interior (2-voxel crop), when
    the field is larger than 4 voxels on every axis. Metrics that do not apply are absent. ``spacing``:
    fixed-grid voxel size per axis in mm (None = 1 mm); ``labels``: label values to evaluate (default: all
    non-zero).
    """
    from regnet_zoo.core.spatial import warp_labels  # late: the metrics above do not need torch warping

    field = torch.as_tensor(_single_ddf(ddf))[None]  # (1, N, *S) float64
    metrics: dict = {}
    if (fixed_label is None) != (moving_label is None):
        warnings.warn(
            "registration_metrics: label metrics need both fixed_label and moving_label", stacklevel=2
        )
    if fixed_label is not None and moving_label is not None:
        fixed = _label_array(fixed_label, "fixed_label")
        moving = _label_array(moving_label, "moving_label")
        if fixed.shape != moving.shape or fixed.shape != tuple(field.shape[2:]):
            raise RegistrationInputError(
                f"label maps fixed {fixed.shape}, moving {moving.shape} and field {tuple(field.shape[2:])} "
                "must share one grid"
            )
        warped = warp_labels(torch.as_tensor(moving)[None, None], field, method="nearest")[0, 0].numpy()
        dice = dice_per_label(fixed, warped, labels=labels, moving_label=moving)
        metrics["dice"] = dice
        metrics["dice_mean"] = _nanmean(dice.values())
        hd = hd95(fixed, warped, labels=labels, spacing=spacing, moving_label=moving)
        metrics["hd95_mm"] = _nanmean(hd.values())
    if (fixed_points is None) != (moving_points is None):
        warnings.warn("registration_metrics: TRE needs both fixed_points and moving_points", stacklevel=2)
    if fixed_points is not None and moving_points is not None:
        metrics["tre_mm"] = float(tre(fixed_points, moving_points, field, spacing, tre_interpolation).mean())
        identity = torch.zeros_like(field)
        metrics["tre_mm_initial"] = float(tre(fixed_points, moving_points, identity, spacing).mean())
    if min(field.shape[2:]) > 2 * L2R_CROP:  # the field metrics need an interior after the crop
        jac = jacobian_determinant(field)
        metrics["sdlogj"] = sdlogj(jac, mode="clip")
        metrics["sdlogj_l2r"] = sdlogj(jac, mode="l2r")
        metrics["folding_percent"] = folding_fraction(jac)
    return metrics
