"""Python API: register two images with any packaged method in physical space; evaluate displacement fields.

What :func:`register` does (the same steps as ``regnet-zoo register``):

1. load the fixed and moving images (paths or ``MetaTensor`` ``(C, *S)`` with a RAS affine), check them;
2. normalise intensities as the bundle's transforms do (min-max by default) and bring the moving image onto
   the fixed grid through physical space (its own affine, linear interpolation, 0 outside), so inputs may
   differ in size, spacing and orientation;
3. resample both to the bundle's ``image_size`` if it has one, zero-pad to a multiple of its
   ``pad_multiple`` (16 when it sets none), run the network, optionally refine its transform parameters
   (``instance_opt`` Adam steps on the bundle's own loss), crop back (rescaling the field to the fixed grid);
4. warp the *original* moving image (and label) with one interpolation of the composed map
   ``fixed voxel x -> moving voxel A_m^-1 A_f (x + ddf(x))``; this is exactly what SimpleITK does with
   :attr:`RegistrationResult.ddf_itk` (``sitk.Resample(moving, fixed, DisplacementFieldTransform(ddf_itk))``:
   linear, border-clamped within half a voxel of the grid, 0 further out; nearest neighbour for labels);
5. compute the metrics (``regnet_zoo.core.metrics``) in mm on the fixed grid.

The DDF conventions (README "Conventions"): ``ddf_voxel`` ``(N, *S)`` on the fixed grid in fixed voxel units,
``warped(x) = moving_on_fixed_grid(x + ddf(x))``; ``ddf_itk`` the same field in mm along ITK's LPS axes.
Landmarks are physical points (mm, ITK LPS), one per row, corresponding between fixed and moving.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import resource
import time
import uuid
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F
from monai.data import MetaTensor
from torch import Tensor, nn

from regnet_zoo import METHODS
from regnet_zoo.core.losses import diffusion_loss, lncc_loss
from regnet_zoo.core.metrics import dice_per_label, hd95, jacobian_determinant, registration_metrics
from regnet_zoo.core.spatial import identity_grid, resize_ddf, sample_image
from regnet_zoo.data.io import (
    check_pair,
    file_suffix,
    load_image,
    load_label,
    load_landmarks,
    lps_to_voxel,
    save_image,
    voxel_to_lps,
)
from regnet_zoo.errors import RegistrationInputError

__all__ = [
    "OUTPUT_FILES",
    "DEFAULT_PAD_MULTIPLE",
    "DEFAULT_INSTANCE_OPT_LR",
    "RegistrationResult",
    "register",
    "load_method",
    "warp_physical",
    "ddf_to_itk",
    "ddf_from_itk",
    "load_ddf",
    "evaluate_ddf",
    "metrics_to_json",
]

#: files written by :meth:`RegistrationResult.save` (``warped_label`` only when there is a label)
OUTPUT_FILES = {
    "warped": "warped.nii.gz",
    "warped_label": "warped_label.nii.gz",
    "ddf_voxel": "ddf_voxel.nii.gz",
    "ddf_itk": "ddf_itk.nii.gz",
    "jacobian": "jacobian.nii.gz",
    "metrics": "metrics.json",
}
#: networks see images padded to a multiple of this (unless the bundle's config sets ``pad_multiple``)
DEFAULT_PAD_MULTIPLE = 16
#: Adam step size of instance optimisation (unless the bundle's train config sets ``instance_opt_lr``);
#: Adam moves each parameter by about this much per step (voxels for displacements / velocities)
DEFAULT_INSTANCE_OPT_LR = 0.05

# flips x and y: LPS <-> RAS (its own inverse)
_LPS_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])

ImageLike = str | os.PathLike | Tensor
PointsLike = str | os.PathLike | np.ndarray | Tensor


# ----------------------------------------------------------------------------------------------------------
# geometry helpers
# ----------------------------------------------------------------------------------------------------------
def _affine4(image: Tensor) -> np.ndarray:
    """4x4 RAS affine of a (Meta)Tensor ``(C, *S)`` (a 2D 3x3 affine is embedded; identity without one)."""
    affine = getattr(image, "affine", None)
    if affine is None:
        return np.eye(4)
    a = np.asarray(affine.detach().cpu() if isinstance(affine, Tensor) else affine, dtype=np.float64)
    if a.ndim == 3:  # a batched affine of one image
        a = a[0]
    if a.shape == (3, 3):
        out = np.eye(4)
        out[:2, :2], out[:2, 3] = a[:2, :2], a[:2, 2]
        return out
    if a.shape != (4, 4):
        raise RegistrationInputError(f"image affine must be 3x3 or 4x4, got shape {a.shape}")
    return a


def _voxel_map(affine: np.ndarray, spatial_dims: int) -> tuple[np.ndarray, np.ndarray]:
    """Linear part ``(N, N)`` and offset ``(N,)`` of a 4x4 map restricted to the first ``N`` axes."""
    return affine[:spatial_dims, :spatial_dims], affine[:spatial_dims, 3]


def _spacing(affine: np.ndarray, spatial_dims: int) -> list[float]:
    """Voxel size (mm) per array axis: column norms of the affine's linear part."""
    return [float(v) for v in np.linalg.norm(affine[:3, :spatial_dims], axis=0)]


def _itk_geometry(affine: np.ndarray, spatial_dims: int) -> tuple[list[float], list[float], list[float]]:
    """(origin, spacing, direction) in ITK's LPS convention of a 4x4 RAS voxel->world affine."""
    lps = _LPS_RAS @ affine
    linear = lps[:spatial_dims, :spatial_dims]
    spacing = np.linalg.norm(linear, axis=0)
    direction = linear / spacing
    origin = lps[:spatial_dims, 3]
    return origin.tolist(), spacing.tolist(), direction.ravel().tolist()


def _lps_linear(affine: np.ndarray, spatial_dims: int) -> np.ndarray:
    """Linear part of the voxel -> LPS map: ``(N, N)`` (voxel displacement -> mm displacement)."""
    return (_LPS_RAS @ affine)[:spatial_dims, :spatial_dims]


def _inside(coords: Tensor, shape: Sequence[int]) -> Tensor:
    """``(B, 1, *T)`` mask of coordinates within half a voxel of the grid (ITK's inside-buffer test)."""
    upper = torch.tensor([n - 0.5 for n in shape], dtype=coords.dtype, device=coords.device)
    upper = upper.view(1, -1, *([1] * (coords.ndim - 2)))
    return ((coords >= -0.5) & (coords <= upper)).all(dim=1, keepdim=True)


def _moving_coords(
    ddf: Tensor | None, fixed_affine: np.ndarray, fixed_shape: Sequence[int], moving_affine: np.ndarray
) -> Tensor:
    """Moving voxel coordinates ``(1, N, *S)`` (float64) of ``A_m^-1 A_f (x + ddf(x))`` on the fixed grid."""
    spatial_dims = len(fixed_shape)
    device = ddf.device if ddf is not None else "cpu"
    points = identity_grid(fixed_shape, device=device, dtype=torch.float64)
    if ddf is not None:
        points = points + ddf.reshape(1, spatial_dims, *fixed_shape).to(torch.float64)
    linear, offset = _voxel_map(np.linalg.inv(moving_affine) @ fixed_affine, spatial_dims)
    if np.allclose(linear, np.eye(spatial_dims), atol=1e-9) and np.allclose(offset, 0, atol=1e-9):
        return points  # same grid: no round-off from the identity map
    linear_t = torch.as_tensor(linear, device=device)
    offset_t = torch.as_tensor(offset, device=device).view(1, spatial_dims, *([1] * spatial_dims))
    return torch.einsum("ij,bj...->bi...", linear_t, points) + offset_t


def warp_physical(
    moving: Tensor,
    fixed_affine: np.ndarray | Tensor,
    fixed_shape: Sequence[int],
    ddf: Tensor | None = None,
    nearest: bool = False,
) -> Tensor:
    """Resample ``moving`` ``(C, *S_m)`` (``MetaTensor`` with its affine) onto the fixed grid -> ``(C, *S)``.

    Samples at ``A_m^-1 A_f (x + ddf(x))`` with ``ddf`` ``(N, *S)`` in fixed voxels (None = identity, i.e.
    a plain resampling through physical space). As ITK's ``ResampleImageFilter``: linear (border-clamped
    within half a voxel of the moving grid) or nearest neighbour, 0 further outside. Integer inputs sampled
    nearest keep their dtype.
    """
    spatial_dims = len(fixed_shape)
    fixed_aff = np.asarray(fixed_affine.cpu() if isinstance(fixed_affine, Tensor) else fixed_affine, float)
    coords = _moving_coords(ddf, fixed_aff, fixed_shape, _affine4(moving))
    data = moving.as_tensor() if isinstance(moving, MetaTensor) else moving
    if data.ndim != spatial_dims + 1:
        raise RegistrationInputError(
            f"expected a channel-first moving image with {spatial_dims} spatial dims, got {tuple(data.shape)}"
        )
    dtype = data.dtype if data.is_floating_point() else torch.float32
    # float64 coordinates for large grids would double memory: float32 is exact to ~1e-5 voxel here
    coords = coords.to(device=data.device, dtype=torch.float32 if dtype != torch.float64 else dtype)
    sampled = sample_image(
        data[None].to(dtype), coords, mode="nearest" if nearest else "linear", padding_mode="border"
    )
    sampled = sampled * _inside(coords, data.shape[1:]).to(sampled.dtype)
    if nearest and not data.is_floating_point():
        sampled = sampled.round().to(data.dtype)
    return sampled[0]


def ddf_to_itk(ddf: Tensor, fixed_affine: np.ndarray | Tensor) -> sitk.Image:
    """Voxel DDF ``(N, *S)`` on the fixed grid -> SimpleITK displacement field (mm, LPS, fixed geometry).

    The result (``sitkVectorFloat64``) works with ``sitk.DisplacementFieldTransform`` (which takes ownership:
    pass a copy, ``sitk.Image(field)``, to keep it) and is written by ``sitk.WriteImage``.
    """
    spatial_dims = ddf.shape[0]
    affine = np.asarray(fixed_affine.cpu() if isinstance(fixed_affine, Tensor) else fixed_affine, float)
    mm = np.einsum("ij,j...->i...", _lps_linear(affine, spatial_dims), ddf.detach().cpu().double().numpy())
    # SimpleITK arrays are indexed (z, y, x): reverse the array axes, vector last
    arr = np.ascontiguousarray(np.transpose(mm, tuple(range(spatial_dims, 0, -1)) + (0,)))
    image = sitk.GetImageFromArray(arr, isVector=True)
    origin, spacing, direction = _itk_geometry(affine, spatial_dims)
    image.SetOrigin(origin)
    image.SetSpacing(spacing)
    image.SetDirection(direction)
    return image


def ddf_from_itk(image: sitk.Image, fixed_affine: np.ndarray | Tensor | None = None) -> Tensor:
    """SimpleITK displacement field (mm, LPS) -> voxel DDF ``(N, *S)`` float32 on the field's grid.

    With ``fixed_affine`` (4x4 RAS) the field's grid must be that one (else ``RegistrationInputError``).
    """
    spatial_dims = image.GetDimension()
    if image.GetNumberOfComponentsPerPixel() != spatial_dims:
        raise RegistrationInputError(
            f"an ITK displacement field has {spatial_dims} components per pixel, got "
            f"{image.GetNumberOfComponentsPerPixel()}"
        )
    from regnet_zoo.data.io import lps_affine_to_ras

    affine = lps_affine_to_ras(np.array(image.GetDirection()), image.GetSpacing(), image.GetOrigin())
    if fixed_affine is not None:
        fixed = np.asarray(fixed_affine.cpu() if isinstance(fixed_affine, Tensor) else fixed_affine, float)
        if not np.allclose(affine[:3, :spatial_dims], fixed[:3, :spatial_dims], atol=1e-3) or not np.allclose(
            affine[:3, 3], fixed[:3, 3], atol=1e-2
        ):
            raise RegistrationInputError(
                "the ITK displacement field's geometry (origin/spacing/direction) is not the fixed image's"
            )
    arr = sitk.GetArrayFromImage(image).astype(np.float64)  # (z, y, x, N)
    mm = np.transpose(arr, (spatial_dims, *range(spatial_dims - 1, -1, -1)))  # (N, x, y, z) = (N, *S)
    voxel = np.einsum("ij,j...->i...", np.linalg.inv(_lps_linear(affine, spatial_dims)), mm)
    return torch.as_tensor(np.ascontiguousarray(voxel), dtype=torch.float32)


def _is_itk_ddf(path: Path) -> bool:
    """Whether a DDF file is ITK's vector layout (5D NIfTI ``(*S, 1, N)`` or a vector MHA/NRRD)."""
    suffix = file_suffix(path)
    if suffix in (".nii", ".nii.gz"):
        import nibabel as nib

        header = nib.load(str(path)).header
        shape = header.get_data_shape()
        return len(shape) == 5 and shape[3] == 1 or int(header["intent_code"]) == 1006  # 1006: DISPVECT
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    return reader.GetNumberOfComponents() > 1


def load_ddf(path: str | os.PathLike, fixed: Tensor, kind: str = "auto") -> Tensor:
    """Read a DDF for the grid of ``fixed`` ``(C, *S)`` -> voxel DDF ``(N, *S)`` (float32).

    ``kind``: ``"voxel"`` (Learn2Reg: fixed grid, voxel units, vector last on disk), ``"itk"`` (a displacement
    field in mm, LPS, e.g. ``ddf_itk.nii.gz``) or ``"auto"`` (ITK when the file has ITK's vector layout).
    """
    path = Path(path)
    if not path.is_file():
        raise RegistrationInputError(f"{path}: displacement field file not found")
    if kind not in ("auto", "voxel", "itk"):
        raise RegistrationInputError(f"ddf kind must be 'auto', 'voxel' or 'itk', got {kind!r}")
    spatial_dims = fixed.ndim - 1
    try:
        itk = kind == "itk" or (kind == "auto" and _is_itk_ddf(path))
    except Exception as err:
        raise RegistrationInputError(f"{path}: cannot read displacement field ({err})") from err
    if itk:
        try:
            image = sitk.ReadImage(str(path), sitk.sitkVectorFloat64)
        except RuntimeError as err:
            raise RegistrationInputError(f"{path}: cannot read ITK displacement field ({err})") from err
        if image.GetDimension() != spatial_dims:
            raise RegistrationInputError(
                f"{path}: {image.GetDimension()}D displacement field for a {spatial_dims}D fixed image"
            )
        try:
            ddf = ddf_from_itk(image, _affine4(fixed))
        except RegistrationInputError as err:
            raise RegistrationInputError(f"{path}: {err}") from None
    else:
        ddf = load_image(path, expected_dims=spatial_dims).as_tensor()
    if ddf.shape[0] != spatial_dims or tuple(ddf.shape[1:]) != tuple(fixed.shape[1:]):
        raise RegistrationInputError(
            f"{path}: expected a displacement field with {spatial_dims} components on the fixed grid "
            f"{tuple(fixed.shape[1:])}, got {tuple(ddf.shape[1:])} with {ddf.shape[0]} components"
        )
    return ddf.float()


# ----------------------------------------------------------------------------------------------------------
# inputs
# ----------------------------------------------------------------------------------------------------------
def _as_image(image: ImageLike, name: str, expected_dims: int | None = None) -> MetaTensor:
    """Path or tensor -> float ``MetaTensor`` ``(C, *S)``, 4x4 RAS affine (identity for plain tensors)."""
    if isinstance(image, str | os.PathLike):
        return load_image(image, expected_dims)
    if not isinstance(image, Tensor):
        raise RegistrationInputError(f"{name}: expected a file path or a (C, *S) tensor, got {type(image)}")
    if image.ndim not in (3, 4):
        raise RegistrationInputError(
            f"{name}: expected a channel-first (C, H, W) or (C, D, H, W) tensor, got {tuple(image.shape)}"
        )
    if expected_dims is not None and image.ndim - 1 != expected_dims:
        raise RegistrationInputError(f"{name}: expected a {expected_dims}D image, got {image.ndim - 1}D")
    data = (image.as_tensor() if isinstance(image, MetaTensor) else image).detach().cpu()
    data = data.float() if not data.is_floating_point() else data
    if not torch.isfinite(data).all():
        raise RegistrationInputError(f"{name}: image holds non-finite intensities (NaN or inf)")
    meta = (
        {"filename_or_obj": image.meta.get("filename_or_obj", name)} if isinstance(image, MetaTensor) else {}
    )
    return MetaTensor(data, affine=torch.as_tensor(_affine4(image)), meta=meta)


def _as_label(label: ImageLike, name: str, expected_dims: int) -> MetaTensor:
    """Path or tensor -> int64 ``MetaTensor`` ``(1, *S)``."""
    if isinstance(label, str | os.PathLike):
        out = load_label(label, expected_dims)
    else:
        out = _as_image(label, name, expected_dims)
        if not torch.equal(out, out.round()):
            raise RegistrationInputError(f"{name}: label map is not integer-valued")
        meta = {"filename_or_obj": _source(out, name)}
        out = MetaTensor(out.as_tensor().round().long(), affine=out.affine, meta=meta)
    if out.shape[0] != 1:
        raise RegistrationInputError(f"{_source(out, name)}: a label map has one channel, got {out.shape[0]}")
    return out


def _source(image: Tensor, fallback: str) -> str:
    return str(image.meta.get("filename_or_obj") or fallback) if isinstance(image, MetaTensor) else fallback


def _load_points(points: PointsLike, image: MetaTensor | None, name: str, units: str = "mm") -> np.ndarray:
    """Landmarks -> ``(K, N)`` LPS mm; checked against ``image`` when given (needed for voxel units)."""
    if units not in ("mm", "voxel"):
        raise RegistrationInputError(f"landmark units must be 'mm' or 'voxel', got {units!r}")
    if image is None:
        if units == "voxel":
            raise RegistrationInputError(f"{name}: voxel-unit landmarks need their image to convert them")
        if isinstance(points, str | os.PathLike):
            return load_landmarks(points)
        pts = np.asarray(points.detach().cpu() if isinstance(points, Tensor) else points, dtype=np.float64)
        if pts.ndim != 2 or not np.isfinite(pts).all():
            raise RegistrationInputError(f"{name}: expected finite points (K, N), got shape {pts.shape}")
        return pts
    if isinstance(points, str | os.PathLike):
        return load_landmarks(points, image, units=units)
    if units == "voxel":
        points = voxel_to_lps(np.asarray(points, dtype=np.float64), _affine4(image))
    return _as_points(points, image, name)


def _as_points(points: PointsLike, image: MetaTensor, name: str) -> np.ndarray:
    """Landmarks (CSV path or ``(K, N)`` LPS mm) -> ``(K, N)`` LPS mm, checked to lie inside ``image``."""
    if isinstance(points, str | os.PathLike):
        return load_landmarks(points, image)
    pts = np.asarray(points.detach().cpu() if isinstance(points, Tensor) else points, dtype=np.float64)
    spatial_dims = image.ndim - 1
    if pts.ndim != 2 or pts.shape[1] != spatial_dims:
        raise RegistrationInputError(f"{name}: expected points (K, {spatial_dims}) in mm, got {pts.shape}")
    if not np.isfinite(pts).all():
        raise RegistrationInputError(f"{name}: landmark coordinates hold NaN/inf")
    vox = lps_to_voxel(pts, _affine4(image))
    size = np.asarray(image.shape[1:], dtype=np.float64)
    if ((vox < -1.0) | (vox > size)).any():  # as load_landmarks: half a voxel + 0.5 voxel tolerance
        raise RegistrationInputError(f"{name}: landmark(s) lie outside the image (are they in LPS mm?)")
    return pts


# ----------------------------------------------------------------------------------------------------------
# metrics
# ----------------------------------------------------------------------------------------------------------
def _nanmean(values: Sequence[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return float(np.mean(finite)) if finite else float("nan")


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
    fixed_img = _as_image(fixed, "fixed image")
    spatial_dims = fixed_img.ndim - 1
    ddf = ddf.detach().cpu().float()
    if ddf.shape[0] != spatial_dims or tuple(ddf.shape[1:]) != tuple(fixed_img.shape[1:]):
        raise RegistrationInputError(
            f"displacement field {tuple(ddf.shape)} does not fit the fixed grid {tuple(fixed_img.shape[1:])}"
        )
    fixed_affine = _affine4(fixed_img)
    spacing = _spacing(fixed_affine, spatial_dims)
    moving_img = _as_image(moving, "moving image", spatial_dims) if moving is not None else None
    points: dict[str, np.ndarray] = {}
    if (fixed_landmarks is None) != (moving_landmarks is None):
        raise RegistrationInputError("TRE needs both fixed and moving landmarks")
    if fixed_landmarks is not None:
        fixed_pts = _load_points(fixed_landmarks, fixed_img, "fixed landmarks", landmark_units)
        moving_pts = _load_points(moving_landmarks, moving_img, "moving landmarks", landmark_units)
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
        label_metrics = _label_metrics(ddf, fixed_img, fixed_label, moving_label, labels, spacing)[0]
        metrics = {**label_metrics, **metrics}
    return metrics


def _label_metrics(
    ddf: Tensor,
    fixed_img: MetaTensor,
    fixed_label: ImageLike,
    moving_label: ImageLike,
    labels: Sequence[int] | None,
    spacing: Sequence[float],
) -> tuple[dict[str, Any], MetaTensor]:
    """Dice / HD95 of the fixed label vs the moving label warped (nearest) by ``ddf``; the warped label."""
    spatial_dims = fixed_img.ndim - 1
    fixed_affine = _affine4(fixed_img)
    fixed_lab = _as_label(fixed_label, "fixed label", spatial_dims)
    moving_lab = _as_label(moving_label, "moving label", spatial_dims)
    if tuple(fixed_lab.shape[1:]) != tuple(fixed_img.shape[1:]) or not np.allclose(
        _affine4(fixed_lab), fixed_affine, atol=1e-4
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


def metrics_to_json(metrics: dict[str, Any]) -> str:
    """Metrics as strict JSON: keys as strings, NaN/inf as null, numpy / torch scalars as numbers."""

    def ready(value: Any) -> Any:
        if isinstance(value, dict):
            return {str(k): ready(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [ready(v) for v in value]
        if isinstance(value, Tensor | np.generic):
            value = value.item()
        if isinstance(value, float) and not math.isfinite(value):
            return None
        return value

    return json.dumps(ready(metrics), indent=2)


# ----------------------------------------------------------------------------------------------------------
# methods
# ----------------------------------------------------------------------------------------------------------
def _check_method(name: str) -> str:
    if name not in METHODS:
        raise RegistrationInputError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}")
    from regnet_zoo import bundle_dir

    try:
        bundle_dir(name)  # the packaged bundle, or the source checkout's
    except FileNotFoundError as err:
        raise RegistrationInputError(str(err)) from err
    return name


def _weights_path(name: str, weights: str | os.PathLike | None) -> Path:
    from regnet_zoo import bundle_home

    path = Path(weights) if weights is not None else bundle_home(name) / "models" / "model.pt"
    if not path.is_file():
        default = "" if weights is not None else " (the bundle's default)"
        raise FileNotFoundError(
            f"no trained {name} model at {path}{default}; train one with `regnet-zoo train {name} "
            f"--dataset-dir DIR` (or pass --weights PATH)"
        )
    return path


def _spatial_dims_of_weights(path: Path) -> int | None:
    """2 or 3 from the rank of the convolution kernels in a state dict / checkpoint (None if unclear)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise RegistrationInputError(f"{path}: cannot read weights ({type(err).__name__}: {err})") from err
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    ranks = {v.ndim for v in state.values() if isinstance(v, Tensor)} if isinstance(state, dict) else set()
    return 3 if 5 in ranks else 2 if 4 in ranks else None


def _resolve_device(device: str | torch.device) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RegistrationInputError("device 'cuda' requested but CUDA is not available; use --device cpu")
    return device


def _load_network(
    name: str, weights: str | os.PathLike | None, device: torch.device, spatial_dims: int | None
) -> nn.Module:
    from regnet_zoo.bundle import load_bundle_network

    _check_method(name)
    path = _weights_path(name, weights)
    weights_dims = _spatial_dims_of_weights(path)
    if spatial_dims is not None and weights_dims is not None and weights_dims != spatial_dims:
        raise RegistrationInputError(
            f"{path}: the weights are for {weights_dims}D images but the images are {spatial_dims}D"
        )
    dims = spatial_dims or weights_dims
    overrides = {"spatial_dims": dims} if dims is not None else {}
    try:
        return load_bundle_network(name, weights=path, device=device, **overrides)
    except RuntimeError as err:  # state dict does not fit the configured network
        raise RegistrationInputError(
            f"{path}: weights do not fit the {name} bundle's network ({str(err).splitlines()[0]})"
        ) from err


@functools.lru_cache(maxsize=4)
def _cached_network(name: str, path: str, mtime_ns: int, device: str, spatial_dims: int) -> nn.Module:
    """Networks for :func:`register`, kept across calls (benchmarks register many pairs in one process);
    ``mtime_ns`` makes retrained weights load afresh."""
    return _load_network(name, path, torch.device(device), spatial_dims)


def load_method(
    name: str, weights: str | os.PathLike | None = None, device: str | torch.device = "cpu"
) -> nn.Module:
    """The trained network of method ``name`` (its bundle's ``network_def``) in eval mode on ``device``.

    ``weights`` default to ``bundles/<name>/models/model.pt``; the network's ``spatial_dims`` is taken from
    the weights. Raises ``RegistrationInputError`` for an unknown / unpackaged method and
    ``FileNotFoundError`` (saying how to train one) when there are no weights.
    """
    return _load_network(name, weights, _resolve_device(device), None)


def _bundle_parser(name: str, spatial_dims: int):
    """The bundle's inference config (its train config when there is none yet)."""
    from regnet_zoo.bundle import bundle_parser

    try:
        return bundle_parser(name, "inference", spatial_dims=spatial_dims)
    except FileNotFoundError:
        return bundle_parser(name, "train", spatial_dims=spatial_dims)


def _preprocessing(name: str, spatial_dims: int) -> tuple[dict[str, Any], int, tuple[int, ...] | None]:
    """The bundle's preprocessing: intensity normalisation arguments, padding multiple, network grid size.

    Read from the ``transforms`` (``pair_transforms`` arguments) of its inference config. ``pad_multiple``:
    the top-level ``pad_multiple`` or ``transforms#pad_multiple`` (``null``: no padding, the network takes
    any size), :data:`DEFAULT_PAD_MULTIPLE` when neither is set. The size: ``transforms#spatial_size``
    (``image_size`` in the bundles; None = the fixed image's own grid).
    """
    parser = _bundle_parser(name, spatial_dims)
    raw = parser.get("transforms")
    transforms = raw if isinstance(raw, dict) else {}

    def parsed(key: str) -> Any:
        return parser.get_parsed_content(f"transforms#{key}")

    norm = {k: parsed(k) for k in ("normalize", "percentiles", "ct_window") if k in transforms}
    if "pad_multiple" in parser.config:
        pad = parser.get_parsed_content("pad_multiple")
    elif "pad_multiple" in transforms:
        pad = parsed("pad_multiple")
    else:
        pad = DEFAULT_PAD_MULTIPLE
    size = parsed("spatial_size") if "spatial_size" in transforms else None
    if size is not None:
        size = tuple(int(v) for v in ([size] * spatial_dims if isinstance(size, int) else size))
        if len(size) != spatial_dims or min(size) < 1:
            raise RegistrationInputError(
                f"the {name} bundle's image_size {size} is not a {spatial_dims}D size"
            )
    return norm, int(pad) if pad else 1, size


def _normalise(
    image: Tensor, normalize: str | None = "minmax", percentiles=(1.0, 99.0), ct_window=None
) -> Tensor:
    """Intensities to [0, 1] as the bundles' transforms (``regnet_zoo.data.transforms.pair_transforms``)."""
    from monai.transforms import ScaleIntensity, ScaleIntensityRange, ScaleIntensityRangePercentiles

    if normalize in (None, "none"):
        out = image
    elif normalize == "minmax":
        out = ScaleIntensity(minv=0.0, maxv=1.0)(image)
    elif normalize == "percentile":
        low, high = percentiles
        out = ScaleIntensityRangePercentiles(lower=low, upper=high, b_min=0.0, b_max=1.0, clip=True)(image)
    elif normalize == "ct":
        low, high = ct_window or (-1000.0, 1000.0)
        out = ScaleIntensityRange(a_min=low, a_max=high, b_min=0.0, b_max=1.0, clip=True)(image)
    else:
        raise RegistrationInputError(f"unknown intensity normalisation {normalize!r} in the bundle config")
    out = torch.as_tensor(out)
    return (out.as_tensor() if isinstance(out, MetaTensor) else out).float()


def _pad_to_multiple(x: Tensor, multiple: int) -> tuple[Tensor, tuple[slice, ...]]:
    """Zero-pad ``(B, C, *S)`` symmetrically to a multiple of ``multiple``; the slices that crop back."""
    sizes = x.shape[2:]
    pads, crop = [], [slice(None), slice(None)]
    for n in sizes:
        total = (-n) % multiple
        before = total // 2
        pads.append((before, total - before))
        crop.append(slice(before, before + n))
    flat = [p for pair in reversed(pads) for p in pair]  # F.pad wants the last axis first
    return F.pad(x, flat), tuple(crop)


def unsupervised_instance_loss(outputs: dict[str, Tensor], batch: dict[str, Tensor]) -> dict[str, Tensor]:
    """Fallback objective of instance optimisation for methods whose training loss needs supervision
    (RegNet's needs the ground-truth field): ``LNCC(warped, fixed) + 0.1 * diffusion(ddf)``."""
    similarity = lncc_loss(outputs["warped"], batch["fixed"])
    smoothness = diffusion_loss(outputs["ddf"])
    return {"loss": similarity + 0.1 * smoothness, "similarity": similarity, "smoothness": smoothness}


def _instance_optimise(
    network: nn.Module,
    loss_fn,
    outputs: dict[str, Tensor],
    fixed: Tensor,
    moving: Tensor,
    steps: int,
    lr: float,
) -> dict[str, Tensor]:
    """Adam on ``network.transform_parameters(outputs)`` minimising the bundle's loss for this pair.

    A loss that cannot work on an unlabelled pair (raises ``ValueError`` / ``KeyError`` for a missing batch
    entry) is replaced by :func:`unsupervised_instance_loss`, with a warning.
    """
    params = network.transform_parameters(outputs).detach().clone().requires_grad_(True)
    optimizer = torch.optim.Adam([params], lr=lr)
    batch = {"fixed": fixed, "moving": moving}
    for p in network.parameters():
        p.requires_grad_(False)
    for step in range(steps):
        optimizer.zero_grad(set_to_none=True)
        new_outputs = network.outputs_from_parameters(params, fixed, moving)
        try:
            loss = loss_fn(new_outputs, batch)["loss"]
        except (ValueError, KeyError) as err:
            if step > 0 or loss_fn is unsupervised_instance_loss:
                raise
            warnings.warn(
                f"instance optimisation: the bundle loss needs more than an image pair ({err}); using "
                "LNCC + 0.1 * diffusion instead (set instance_opt_loss in the bundle's train.yaml)",
                stacklevel=3,
            )
            loss_fn = unsupervised_instance_loss
            loss = loss_fn(new_outputs, batch)["loss"]
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        return network.outputs_from_parameters(params.detach(), fixed, moving)


# ----------------------------------------------------------------------------------------------------------
# the result and register()
# ----------------------------------------------------------------------------------------------------------
def _atomic_write(path: Path, overwrite: bool, write) -> None:
    """``write(tmp)`` into a hidden temporary file beside ``path``, then rename it onto ``path``."""
    if path.exists() and not overwrite:
        raise RegistrationInputError(f"{path}: output file exists; pass --overwrite to replace it")
    suffix = file_suffix(path)
    tmp = path.with_name(f".{path.name[: -len(suffix)]}.{uuid.uuid4().hex}.tmp{suffix}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@dataclass
class RegistrationResult:
    """What :func:`register` returns; all on the fixed grid with the fixed affine.

    ``warped`` ``(C, *S)``, ``warped_label`` ``(1, *S)`` int64 or None, ``ddf_voxel`` ``(N, *S)`` (Learn2Reg:
    fixed voxel units), ``ddf_itk`` (SimpleITK vector image, mm, LPS; ``sitk.Resample(moving, fixed,
    sitk.DisplacementFieldTransform(sitk.Image(ddf_itk)))`` reproduces ``warped``), ``jacobian`` ``(*S)``
    (determinant of ``x -> x + ddf(x)``), ``metrics`` (see :func:`evaluate_ddf`, plus ``runtime_s``,
    ``peak_memory_mb``).
    """

    warped: MetaTensor
    warped_label: MetaTensor | None
    ddf_voxel: Tensor
    ddf_itk: sitk.Image
    jacobian: MetaTensor
    metrics: dict
    source_files: tuple[str, ...] = field(default=(), repr=False)

    def save(self, out_dir: str | os.PathLike, overwrite: bool = False) -> dict[str, Path]:
        """Write :data:`OUTPUT_FILES` into ``out_dir``; return ``{name: path}``.

        Refuses (``RegistrationInputError``) a folder that already holds any of them unless ``overwrite``;
        each file is written to a temporary name and renamed, and input files are never replaced.
        ``ddf_itk.nii.gz`` is rebuilt from ``ddf_voxel`` (``ddf_itk`` may have been consumed by a transform).
        """
        out_dir = Path(out_dir)
        if out_dir.exists() and not out_dir.is_dir():
            raise RegistrationInputError(f"{out_dir}: output path exists and is not a folder")
        names = [k for k in OUTPUT_FILES if k != "warped_label" or self.warped_label is not None]
        paths = {k: out_dir / OUTPUT_FILES[k] for k in names}
        existing = [p.name for p in paths.values() if p.exists()]
        if existing and not overwrite:
            raise RegistrationInputError(
                f"{out_dir}: output folder holds results ({', '.join(existing)}); "
                "pass --overwrite to replace them"
            )
        sources = {Path(s).resolve() for s in self.source_files if s}
        clash = [str(p) for p in paths.values() if p.resolve() in sources]
        if clash:
            raise RegistrationInputError(
                f"{clash[0]}: refusing to overwrite an input file; choose another --out"
            )
        out_dir.mkdir(parents=True, exist_ok=True)
        affine = _affine4(self.warped)
        spatial_dims = self.ddf_voxel.shape[0]
        save_image(self.warped, paths["warped"], affine=affine, overwrite=overwrite)
        if self.warped_label is not None:
            label = self.warped_label.as_tensor().to(torch.int32)
            save_image(label, paths["warped_label"], affine=affine, overwrite=overwrite)
        save_image(self.ddf_voxel.float(), paths["ddf_voxel"], affine=affine, overwrite=overwrite)
        itk_field = ddf_to_itk(self.ddf_voxel, affine)
        _atomic_write(paths["ddf_itk"], overwrite, lambda tmp: sitk.WriteImage(itk_field, str(tmp)))
        jac = self.jacobian.as_tensor().float().reshape(1, *self.ddf_voxel.shape[1 : spatial_dims + 1])
        save_image(jac, paths["jacobian"], affine=affine, overwrite=overwrite)
        text = metrics_to_json(self.metrics) + "\n"
        _atomic_write(paths["metrics"], overwrite, lambda tmp: tmp.write_text(text))
        return paths


def register(
    fixed: ImageLike,
    moving: ImageLike,
    method: str = "ddrnet",
    *,
    fixed_label: ImageLike | None = None,
    moving_label: ImageLike | None = None,
    fixed_landmarks: PointsLike | None = None,
    moving_landmarks: PointsLike | None = None,
    weights: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    instance_opt: int = 0,
) -> RegistrationResult:
    """Register ``moving`` to ``fixed`` with a trained method; see the module docstring for the steps.

    Images: file paths or ``MetaTensor`` ``(C, *S)`` (plain tensors get an identity affine). Labels: integer
    label maps (paths or tensors ``(1, *S)``). Landmarks: CSV paths or ``(K, N)`` arrays, physical LPS mm,
    rows corresponding. ``weights``: default ``bundles/<method>/models/model.pt``. ``instance_opt``: number
    of Adam steps of test-time optimisation of the network's transform parameters with the bundle's loss.
    """
    _check_method(method)
    if int(instance_opt) < 0:
        raise RegistrationInputError(f"instance_opt must be >= 0 steps, got {instance_opt}")
    device = _resolve_device(device)
    fixed_img = _as_image(fixed, "fixed image")
    moving_img = _as_image(moving, "moving image")
    spatial_dims = check_pair(fixed_img, moving_img)
    fixed_affine = _affine4(fixed_img)
    fixed_shape = tuple(fixed_img.shape[1:])
    # validate every input before the (slow) network runs
    if fixed_label is not None and moving_label is None:
        raise RegistrationInputError("a fixed label needs a moving label (Dice / HD95 compare the two)")
    fixed_lab = _as_label(fixed_label, "fixed label", spatial_dims) if fixed_label is not None else None
    moving_lab = _as_label(moving_label, "moving label", spatial_dims) if moving_label is not None else None
    if (fixed_landmarks is None) != (moving_landmarks is None):
        raise RegistrationInputError("landmarks need both --fixed-landmarks and --moving-landmarks")
    fixed_pts = moving_pts = None
    if fixed_landmarks is not None:
        fixed_pts = _as_points(fixed_landmarks, fixed_img, "fixed landmarks")
        moving_pts = _as_points(moving_landmarks, moving_img, "moving landmarks")
        if fixed_pts.shape != moving_pts.shape:
            raise RegistrationInputError(
                f"fixed and moving landmarks must correspond row by row, got {len(fixed_pts)} and "
                f"{len(moving_pts)} points"
            )
    weights_path = _weights_path(method, weights).resolve()
    network = _cached_network(
        method, str(weights_path), weights_path.stat().st_mtime_ns, str(device), spatial_dims
    )
    in_channels = getattr(network, "in_channels", None)
    if in_channels is not None and fixed_img.shape[0] != in_channels:
        raise RegistrationInputError(
            f"the {method} network takes {in_channels}-channel images, got {fixed_img.shape[0]} channels"
        )
    normalisation, pad_multiple, network_size = _preprocessing(method, spatial_dims)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    fixed_in = _normalise(fixed_img.as_tensor(), **normalisation).to(device)
    moving_norm = MetaTensor(
        _normalise(moving_img.as_tensor(), **normalisation).to(device), affine=moving_img.affine
    )
    moving_in = warp_physical(moving_norm, fixed_affine, fixed_shape)
    fixed_in, moving_in = fixed_in[None], moving_in[None]
    if network_size is not None and network_size != fixed_shape:
        # the bundle's network works on a fixed grid size (image_size): resample there (corner-aligned, as
        # core.spatial.resize_ddf, which brings the field back)
        mode = "bilinear" if spatial_dims == 2 else "trilinear"
        fixed_in = F.interpolate(fixed_in, size=network_size, mode=mode, align_corners=True)
        moving_in = F.interpolate(moving_in, size=network_size, mode=mode, align_corners=True)
    fixed_p, crop = _pad_to_multiple(fixed_in, pad_multiple)
    moving_p, _ = _pad_to_multiple(moving_in, pad_multiple)
    with torch.no_grad():
        outputs = network(fixed_p, moving_p)
    if instance_opt:
        from regnet_zoo.bundle import bundle_parser

        train_config = bundle_parser(method, "train", spatial_dims=spatial_dims)
        loss_key = "instance_opt_loss" if train_config.get("instance_opt_loss") is not None else "loss"
        if train_config.get(loss_key) is None:
            raise RegistrationInputError(f"the {method} bundle's train.yaml defines no 'loss'")
        loss_fn = train_config.get_parsed_content(loss_key)
        lr = train_config.get("instance_opt_lr")
        lr = float(lr) if lr is not None else DEFAULT_INSTANCE_OPT_LR
        with torch.enable_grad():
            outputs = _instance_optimise(
                network,
                loss_fn.to(device) if isinstance(loss_fn, nn.Module) else loss_fn,
                outputs,
                fixed_p,
                moving_p,
                int(instance_opt),
                lr,
            )
    ddf = outputs["ddf"][crop].detach().float()
    if tuple(ddf.shape[2:]) != fixed_shape:
        ddf = resize_ddf(ddf, fixed_shape)
    ddf = ddf[0]
    warped = warp_physical(moving_img.to(device), fixed_affine, fixed_shape, ddf)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        peak_mb = torch.cuda.max_memory_allocated(device) / 2**20
    else:  # Linux reports the process's peak resident set in KiB
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    runtime = time.perf_counter() - start

    ddf = ddf.cpu()
    affine_t = torch.as_tensor(fixed_affine)
    spacing = _spacing(fixed_affine, spatial_dims)
    metrics: dict[str, Any] = {}
    warped_label = None
    if fixed_lab is not None and moving_lab is not None:
        metrics, warped_label = _label_metrics(ddf, fixed_img, fixed_lab, moving_lab, None, spacing)
    elif moving_lab is not None:
        warped_label = MetaTensor(
            warp_physical(moving_lab, fixed_affine, fixed_shape, ddf, nearest=True), affine=affine_t
        )
    points = {}
    if fixed_pts is not None:
        points = {
            "fixed_points": lps_to_voxel(fixed_pts, fixed_affine),
            "moving_points": lps_to_voxel(moving_pts, fixed_affine),
        }
    metrics.update(registration_metrics(ddf, spacing=spacing, **points))
    metrics["runtime_s"] = runtime
    metrics["peak_memory_mb"] = peak_mb
    jac = jacobian_determinant(ddf[None].double())[0].float()
    sources = tuple(
        str(v) for v in (fixed, moving, fixed_label, moving_label) if isinstance(v, str | os.PathLike)
    )
    return RegistrationResult(
        warped=MetaTensor(warped.cpu(), affine=affine_t),
        warped_label=warped_label,
        ddf_voxel=ddf,
        ddf_itk=ddf_to_itk(ddf, fixed_affine),
        jacobian=MetaTensor(jac, affine=affine_t),
        metrics=metrics,
        source_files=sources,
    )


def case_id(path: str | os.PathLike) -> str:
    """Learn2Reg case number of an image file name (``OASIS_0395_0000.nii.gz`` -> ``"0395"``)."""
    match = re.search(r"_(\d+)_\d{4}\.nii(\.gz)?$", Path(path).name) or re.search(
        r"(\d+)\D*$", Path(path).name
    )
    if match is None:
        raise RegistrationInputError(f"{path}: cannot tell the case number from the file name")
    return match.group(1)
