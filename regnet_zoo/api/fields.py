"""Displacement fields in physical space: warping through the images' affines, ITK fields, reading DDFs.

Conventions (README "Conventions"): a voxel DDF ``(N, *S)`` lies on the fixed grid in fixed voxel units,
``warped(x) = moving(A_m^-1 A_f (x + ddf(x)))``; an ITK field holds the same displacements in mm along LPS.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
from monai.data import MetaTensor
from torch import Tensor

from regnet_zoo.core.geometry import affine_from_itk, affine_of, as_4x4, itk_geometry, lps_linear, voxel_map
from regnet_zoo.core.spatial import identity_grid, sample_image
from regnet_zoo.data.io import file_suffix, load_image
from regnet_zoo.errors import RegistrationInputError

__all__ = ["warp_physical", "ddf_to_itk", "ddf_from_itk", "load_ddf"]


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
    linear, offset = voxel_map(np.linalg.inv(moving_affine) @ fixed_affine, spatial_dims)
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
    fixed_aff = as_4x4(fixed_affine)
    coords = _moving_coords(ddf, fixed_aff, fixed_shape, affine_of(moving))
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
    affine = as_4x4(fixed_affine)
    mm = np.einsum("ij,j...->i...", lps_linear(affine, spatial_dims), ddf.detach().cpu().double().numpy())
    # SimpleITK arrays are indexed (z, y, x): reverse the array axes, vector last
    arr = np.ascontiguousarray(np.transpose(mm, tuple(range(spatial_dims, 0, -1)) + (0,)))
    image = sitk.GetImageFromArray(arr, isVector=True)
    origin, spacing, direction = itk_geometry(affine, spatial_dims)
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
    affine = affine_from_itk(np.array(image.GetDirection()), image.GetSpacing(), image.GetOrigin())
    if fixed_affine is not None:
        fixed = as_4x4(fixed_affine)
        if not np.allclose(affine[:3, :spatial_dims], fixed[:3, :spatial_dims], atol=1e-3) or not np.allclose(
            affine[:3, 3], fixed[:3, 3], atol=1e-2
        ):
            raise RegistrationInputError(
                "the ITK displacement field's geometry (origin/spacing/direction) is not the fixed image's"
            )
    arr = sitk.GetArrayFromImage(image).astype(np.float64)  # (z, y, x, N)
    mm = np.transpose(arr, (spatial_dims, *range(spatial_dims - 1, -1, -1)))  # (N, x, y, z) = (N, *S)
    voxel = np.einsum("ij,j...->i...", np.linalg.inv(lps_linear(affine, spatial_dims)), mm)
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
    An ITK transform file (``transform.h5``, ``affine.tfm``; any ``kind``) is sampled at the fixed voxels.
    """
    from regnet_zoo.data.transform_io import (
        is_transform_file,
        read_transform,
        reference_image,
        transform_to_displacement,
    )

    path = Path(path)
    if not path.is_file():
        raise RegistrationInputError(f"{path}: displacement field file not found")
    if is_transform_file(path):
        grid = reference_image(affine_of(fixed), fixed.shape[1:])
        transform = read_transform(path)  # its errors name the file
        try:
            return ddf_from_itk(transform_to_displacement(transform, grid)).float()
        except RegistrationInputError as err:
            raise RegistrationInputError(f"{path}: {err}") from None
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
            ddf = ddf_from_itk(image, affine_of(fixed))
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


