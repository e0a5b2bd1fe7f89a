"""ITK transform files: the registration as a transform SimpleITK, ANTs and 3D Slicer load; reading it.

ITK's conventions, which every function here keeps:

- physical space is **LPS** (mm); a transform maps a point of the **fixed** image to the **moving** image
  (what ``sitk.Resample(moving, fixed, transform)`` needs: it pulls moving intensities onto the fixed grid);
- in a ``CompositeTransform`` the transform added **last** is applied **first**. :func:`compose` takes its
  transforms in the order they are applied, so ``compose([displacement, affine])`` is
  ``x -> affine(x + d(x))``: the deformable field on the fixed grid, then the affine stage;
- a displacement field is a vector image in mm along LPS axes on its own grid (``DisplacementFieldTransform``:
  ``x -> x + d(x)``, linear interpolation, 0 outside the field's grid).

``.h5`` / ``.hdf5`` hold any transform (composite and displacement fields included); ``.tfm`` / ``.txt`` /
``.mat`` hold linear transforms only (ITK's text and ANTs' MATLAB formats).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from regnet_zoo.data.io import (
    NIFTI_SUFFIXES,
    SITK_SUFFIXES,
    atomic_write,
    file_suffix,
    load_landmarks,
    save_landmarks,
)
from regnet_zoo.errors import RegistrationInputError

__all__ = [
    "TRANSFORM_SUFFIXES",
    "LINEAR_TRANSFORM_SUFFIXES",
    "is_transform_file",
    "affine_transform",
    "displacement_transform",
    "compose",
    "write_transform",
    "read_transform",
    "transform_to_displacement",
    "reference_image",
    "transform_points",
    "inverse_transform_points",
    "transform_points_file",
]

LINEAR_TRANSFORM_SUFFIXES = (".tfm", ".txt", ".mat")
TRANSFORM_SUFFIXES = (".h5", ".hdf5") + LINEAR_TRANSFORM_SUFFIXES


def is_transform_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` names an ITK transform file (by its extension) rather than an image."""
    return file_suffix(path) in TRANSFORM_SUFFIXES


def affine_transform(matrix: np.ndarray) -> sitk.AffineTransform:
    """``sitk.AffineTransform`` of a homogeneous ``(N+1, N+1)`` matrix: fixed -> moving points (LPS)."""
    m = np.asarray(matrix, dtype=np.float64)
    n = m.shape[0] - 1
    if m.shape != (n + 1, n + 1) or n not in (2, 3) or not np.isfinite(m).all():
        raise RegistrationInputError(f"an affine must be a finite 3x3 (2D) or 4x4 (3D) matrix, got {m.shape}")
    if not np.allclose(m[n], np.eye(n + 1)[n]):
        raise RegistrationInputError(f"an affine's last row must be {np.eye(n + 1)[n].tolist()}, got {m[n]}")
    tx = sitk.AffineTransform(n)
    tx.SetMatrix(m[:n, :n].ravel().tolist())
    tx.SetTranslation(m[:n, n].tolist())
    return tx


def displacement_transform(field: sitk.Image) -> sitk.DisplacementFieldTransform:
    """``DisplacementFieldTransform`` of a vector image (mm, LPS, its own grid); ``field`` is left intact."""
    if field.GetNumberOfComponentsPerPixel() != field.GetDimension():
        raise RegistrationInputError(
            f"a displacement field needs {field.GetDimension()} components per pixel, got "
            f"{field.GetNumberOfComponentsPerPixel()}"
        )
    # the transform takes ownership of (and empties) the image it is given: hand it a float64 copy
    return sitk.DisplacementFieldTransform(sitk.Cast(field, sitk.sitkVectorFloat64))


def compose(transforms: Sequence[sitk.Transform]) -> sitk.CompositeTransform:
    """One ``CompositeTransform`` applying ``transforms`` in the given order (the first acts first).

    ITK's composite applies its last-added transform first, so they are added in reverse.
    """
    transforms = [t for t in transforms if t is not None]
    if not transforms:
        raise ValueError("compose needs at least one transform")
    dims = {t.GetDimension() for t in transforms}
    if len(dims) != 1:
        raise RegistrationInputError(f"cannot compose transforms of different dimensions {sorted(dims)}")
    composite = sitk.CompositeTransform(dims.pop())
    for t in reversed(transforms):
        composite.AddTransform(t)
    return composite


def write_transform(
    transform: sitk.Transform,
    path: str | os.PathLike,
    overwrite: bool = False,
    protect: Iterable[str | os.PathLike] = (),
) -> Path:
    """Write ``transform`` to ``path`` (``.h5`` any transform; ``.tfm``/``.txt``/``.mat`` linear only).

    Written to a temporary name and renamed; an existing file is replaced only with ``overwrite``.
    """
    path = Path(path)
    suffix = file_suffix(path)
    if suffix not in TRANSFORM_SUFFIXES:
        raise RegistrationInputError(
            f"{path}: a transform file needs one of the extensions {', '.join(TRANSFORM_SUFFIXES)}"
        )
    if suffix in LINEAR_TRANSFORM_SUFFIXES and not _is_linear(transform):
        raise RegistrationInputError(f"{path}: {suffix} holds linear transforms only; write a .h5 file")
    return atomic_write(path, lambda tmp: sitk.WriteTransform(transform, str(tmp)), overwrite, protect)


def _is_linear(transform: sitk.Transform) -> bool:
    transform = _downcast(transform)
    if isinstance(transform, sitk.CompositeTransform):
        return all(_is_linear(transform.GetNthTransform(i)) for i in range(transform.GetNumberOfTransforms()))
    return bool(transform.IsLinear())


def _downcast(transform: sitk.Transform) -> sitk.Transform:
    return transform.Downcast() if type(transform) is sitk.Transform else transform


def read_transform(path: str | os.PathLike) -> sitk.Transform:
    """An ITK transform file (``.h5``, ``.tfm``, ...) or a displacement-field image (mm, LPS: ``ddf_itk``)."""
    path = Path(path)
    if not path.is_file():
        raise RegistrationInputError(f"{path}: transform file not found")
    suffix = file_suffix(path)
    try:
        if suffix in TRANSFORM_SUFFIXES:
            return _downcast(sitk.ReadTransform(str(path)))
        if suffix in NIFTI_SUFFIXES + SITK_SUFFIXES:
            field = sitk.ReadImage(str(path), sitk.sitkVectorFloat64)
        else:
            raise RegistrationInputError(
                f"{path}: not a transform: expected {', '.join(TRANSFORM_SUFFIXES)} or a displacement-field "
                "image (.nii.gz, .mha, .nrrd)"
            )
    except RuntimeError as err:
        message = str(err).strip().splitlines()
        reason = next((line for line in message if "Description" in line), message[-1] if message else "")
        raise RegistrationInputError(f"{path}: cannot read transform ({reason.strip()})") from None
    try:
        return displacement_transform(field)
    except RegistrationInputError as err:
        raise RegistrationInputError(f"{path}: {err}") from None


def reference_image(affine: np.ndarray, shape) -> sitk.Image:
    """An (empty) SimpleITK image with the grid of a RAS ``affine`` and spatial ``shape`` (ITK geometry)."""
    from regnet_zoo.core.geometry import itk_geometry

    image = sitk.Image([int(n) for n in shape], sitk.sitkUInt8)
    origin, spacing, direction = itk_geometry(affine, len(shape))
    image.SetOrigin(origin)
    image.SetSpacing(spacing)
    image.SetDirection(direction)
    return image


def transform_to_displacement(transform: sitk.Transform, reference: sitk.Image) -> sitk.Image:
    """Dense displacement field ``T(x) - x`` (``sitkVectorFloat64``, mm, LPS) on the grid of ``reference``."""
    if transform.GetDimension() != reference.GetDimension():
        raise RegistrationInputError(
            f"a {transform.GetDimension()}D transform for a {reference.GetDimension()}D image"
        )
    converter = sitk.TransformToDisplacementFieldFilter()
    converter.SetReferenceImage(reference)
    converter.SetOutputPixelType(sitk.sitkVectorFloat64)
    return converter.Execute(transform)


def _as_points(points, dims: int) -> np.ndarray:
    pts = np.asarray(points, dtype=np.float64)
    if pts.ndim != 2 or pts.shape[1] != dims:
        raise RegistrationInputError(
            f"points must be a (K, {dims}) array for a {dims}D transform, got shape {pts.shape}"
        )
    if not np.isfinite(pts).all():
        raise RegistrationInputError("points hold NaN/inf")
    return pts


def transform_points(
    points, transform: sitk.Transform, inverse: bool = False, **inverse_options
) -> np.ndarray:
    """Map physical points ``(K, N)`` (LPS mm) fixed -> moving (``inverse``: moving -> fixed) -> ``(K, N)``.

    The inverse inverts linear parts exactly and displacement fields point by point
    (:func:`inverse_transform_points`).
    """
    if inverse:
        return inverse_transform_points(points, transform, **inverse_options)
    pts = _as_points(points, transform.GetDimension())
    return np.array([transform.TransformPoint(p.tolist()) for p in pts], dtype=np.float64).reshape(pts.shape)


def _parts(transform: sitk.Transform) -> list[sitk.Transform]:
    """The transforms of a (possibly nested) composite in the order they are applied."""
    transform = _downcast(transform)
    if not isinstance(transform, sitk.CompositeTransform):
        return [transform]
    out: list[sitk.Transform] = []
    for i in reversed(range(transform.GetNumberOfTransforms())):
        out.extend(_parts(transform.GetNthTransform(i)))
    return out


def inverse_transform_points(
    points, transform: sitk.Transform, iterations: int = 200, tolerance: float = 1e-6
) -> np.ndarray:
    """``T^-1(points)`` ``(K, N)`` (LPS mm): composite parts undone last-applied first; linear parts by their
    exact inverse, others (displacement fields) by the fixed-point iteration ``x <- y - d(x)``.

    Warns where a point's iteration does not reach ``tolerance`` mm (a folding field has no inverse there).
    """
    pts = _as_points(points, transform.GetDimension())
    out = pts.copy()
    for part in reversed(_parts(transform)):
        if part.IsLinear():
            inv = part.GetInverse()
            out = np.array([inv.TransformPoint(p.tolist()) for p in out]).reshape(pts.shape)
            continue
        y = out
        x = y.copy()
        for _ in range(iterations):
            mapped = np.array([part.TransformPoint(p.tolist()) for p in x]).reshape(pts.shape)
            residual = mapped - y
            x = x - residual
            if np.abs(residual).max(initial=0.0) <= tolerance:
                break
        else:
            worst = float(np.abs(residual).max())
            warnings.warn(
                f"inverting a {part.GetName()}: {int((np.abs(residual) > tolerance).any(axis=1).sum())} "
                f"point(s) did not converge (residual up to {worst:.3g} mm)",
                stacklevel=2,
            )
        out = x
    return out


def transform_points_file(
    transform: str | os.PathLike | sitk.Transform,
    points: str | os.PathLike,
    out: str | os.PathLike,
    inverse: bool = False,
    overwrite: bool = False,
) -> np.ndarray:
    """Map a CSV of physical points (LPS mm, ``x,y[,z]`` per row) through a transform file; write ``out``.

    ``transform``: ``.h5`` / ``.tfm`` / a displacement-field image (or a loaded transform). Fixed -> moving,
    or moving -> fixed with ``inverse``. Returns the mapped points ``(K, N)``.
    """
    tx = transform if isinstance(transform, sitk.Transform) else read_transform(transform)
    pts = load_landmarks(points)
    if pts.shape[1] != tx.GetDimension():
        raise RegistrationInputError(
            f"{points}: points have {pts.shape[1]} coordinates but the transform is {tx.GetDimension()}D"
        )
    if Path(out).exists() and not overwrite:
        raise RegistrationInputError(f"{out}: output file exists; pass --overwrite to replace it")
    mapped = transform_points(pts, tx, inverse=inverse)
    protect = [points] + ([transform] if not isinstance(transform, sitk.Transform) else [])
    atomic_write(Path(out), lambda tmp: save_landmarks(mapped, tmp, overwrite=True), overwrite, protect)
    return mapped
