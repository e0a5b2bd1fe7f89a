"""Displacement fields in physical space: warping through the images' affines, ITK fields, reading DDFs.

Conventions (README "Conventions"): a voxel DDF ``(N, *S)`` lies on the fixed grid in fixed voxel units,
``warped(x) = moving(A_m^-1 A_f (x + ddf(x)))``; an ITK field holds the same displacements in mm along LPS.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
from torch import Tensor

from regnet_zoo.core.geometry import affine_from_itk, affine_of, as_4x4, itk_geometry, lps_linear
from regnet_zoo.core.resample import warp_physical
from regnet_zoo.data.io import file_suffix, load_image
from regnet_zoo.errors import RegistrationInputError

__all__ = ["warp_physical", "ddf_to_itk", "ddf_from_itk", "load_ddf"]


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


