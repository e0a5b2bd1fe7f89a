"""Input checks of the API: images, label maps and landmarks from paths or tensors, validated."""

from __future__ import annotations

import os

import numpy as np
import torch
from monai.data import MetaTensor
from torch import Tensor

from regnet_zoo.core.geometry import affine_of, lps_to_voxel, voxel_to_lps
from regnet_zoo.data.io import load_image, load_label, load_landmarks
from regnet_zoo.errors import RegistrationInputError

__all__ = ["ImageLike", "PointsLike", "as_image", "as_label", "as_points", "load_points"]

ImageLike = str | os.PathLike | Tensor
PointsLike = str | os.PathLike | np.ndarray | Tensor


def as_image(image: ImageLike, name: str, expected_dims: int | None = None) -> MetaTensor:
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
    return MetaTensor(data, affine=torch.as_tensor(affine_of(image)), meta=meta)


def as_label(label: ImageLike, name: str, expected_dims: int) -> MetaTensor:
    """Path or tensor -> int64 ``MetaTensor`` ``(1, *S)``."""
    if isinstance(label, str | os.PathLike):
        out = load_label(label, expected_dims)
    else:
        out = as_image(label, name, expected_dims)
        if not torch.equal(out, out.round()):
            raise RegistrationInputError(f"{name}: label map is not integer-valued")
        meta = {"filename_or_obj": _source(out, name)}
        out = MetaTensor(out.as_tensor().round().long(), affine=out.affine, meta=meta)
    if out.shape[0] != 1:
        raise RegistrationInputError(f"{_source(out, name)}: a label map has one channel, got {out.shape[0]}")
    return out


def _source(image: Tensor, fallback: str) -> str:
    return str(image.meta.get("filename_or_obj") or fallback) if isinstance(image, MetaTensor) else fallback


def load_points(points: PointsLike, image: MetaTensor | None, name: str, units: str = "mm") -> np.ndarray:
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
        points = voxel_to_lps(np.asarray(points, dtype=np.float64), affine_of(image))
    return as_points(points, image, name)


def as_points(points: PointsLike, image: MetaTensor, name: str) -> np.ndarray:
    """Landmarks (CSV path or ``(K, N)`` LPS mm) -> ``(K, N)`` LPS mm, checked to lie inside ``image``."""
    if isinstance(points, str | os.PathLike):
        return load_landmarks(points, image)
    pts = np.asarray(points.detach().cpu() if isinstance(points, Tensor) else points, dtype=np.float64)
    spatial_dims = image.ndim - 1
    if pts.ndim != 2 or pts.shape[1] != spatial_dims:
        raise RegistrationInputError(f"{name}: expected points (K, {spatial_dims}) in mm, got {pts.shape}")
    if not np.isfinite(pts).all():
        raise RegistrationInputError(f"{name}: landmark coordinates hold NaN/inf")
    vox = lps_to_voxel(pts, affine_of(image))
    size = np.asarray(image.shape[1:], dtype=np.float64)
    if ((vox < -1.0) | (vox > size)).any():  # as load_landmarks: half a voxel + 0.5 voxel tolerance
        raise RegistrationInputError(f"{name}: landmark(s) lie outside the image (are they in LPS mm?)")
    return pts


