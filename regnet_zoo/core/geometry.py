"""Image geometry: affines, RAS / LPS, voxel <-> physical maps for points and displacement fields.

The one place where the project converts between voxel and world coordinates (pure numpy / torch, no I/O).

Conventions: an image's ``affine`` is MONAI's voxel -> world matrix in **RAS** (``MetaTensor.affine``), 4x4;
a 2D image's 3x3 affine is embedded in a 4x4 with a unit third axis (:func:`as_4x4`). ITK uses **LPS**
(``LPS = diag(-1, -1, 1) @ RAS``, :data:`LPS_RAS`, its own inverse). Array axis ``i`` is ITK index ``i``.
Spacing has one meaning: the column norms of the linear part of the voxel -> world map restricted to the
``N`` array axes, ``norm(affine[:N, :N], axis=0)`` (:func:`spacing_from_affine`).

The functions on torch points / fields (:func:`voxel_to_physical`, :func:`ddf_voxel_to_physical`, ...)
are frame-agnostic: they apply whatever ``(N+1, N+1)`` matrix they are given.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "LPS_RAS",
    "as_4x4",
    "from_4x4",
    "affine_of",
    "voxel_map",
    "spacing_from_affine",
    "itk_geometry",
    "affine_from_itk",
    "lps_linear",
    "lps_to_voxel",
    "voxel_to_lps",
    "voxel_affine",
    "affine_ddf",
    "voxel_to_physical",
    "physical_to_voxel",
    "ddf_voxel_to_physical",
    "ddf_physical_to_voxel",
]

#: flips x and y: LPS <-> RAS (4x4, its own inverse)
LPS_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def as_4x4(affine: np.ndarray | Tensor | None) -> np.ndarray:
    """A 4x4 float64 copy of a 4x4 or 2D 3x3 homogeneous affine (batched ``(1, ., .)`` taken as its first;
    None -> identity). Raises ``ValueError`` for other shapes."""
    if affine is None:
        return np.eye(4)
    a = np.asarray(affine.detach().cpu() if isinstance(affine, Tensor) else affine, dtype=np.float64)
    if a.ndim == 3:  # a batched affine of one image
        a = a[0]
    if a.shape == (4, 4):
        return a.copy()
    if a.shape == (3, 3):  # 2D homogeneous affine -> embed with a unit third axis
        out = np.eye(4)
        out[:2, :2], out[:2, 3] = a[:2, :2], a[:2, 2]
        return out
    raise ValueError(f"affine must be 3x3 or 4x4, got shape {a.shape}")


def from_4x4(affine, spatial_dims: int) -> np.ndarray:
    """The ``(N+1, N+1)`` homogeneous affine of the first ``N`` axes of a 4x4 one (inverse of :func:`as_4x4`
    for 2D)."""
    a = as_4x4(affine)
    idx = [*range(spatial_dims), 3]
    return a[np.ix_(idx, idx)]


def affine_of(image) -> np.ndarray:
    """4x4 RAS affine of an image ``(C, *S)``: a ``MetaTensor``'s ``.affine``, identity for a plain tensor."""
    return as_4x4(getattr(image, "affine", None))


def _affine_arg(image_or_affine) -> np.ndarray:
    """A ``MetaTensor``'s affine, or the argument itself as an affine."""
    if hasattr(image_or_affine, "affine"):
        return as_4x4(image_or_affine.affine)
    return as_4x4(image_or_affine)


def voxel_map(affine: np.ndarray, spatial_dims: int) -> tuple[np.ndarray, np.ndarray]:
    """Linear part ``(N, N)`` and offset ``(N,)`` of a 4x4 map restricted to the first ``N`` axes."""
    a = as_4x4(affine)
    return a[:spatial_dims, :spatial_dims], a[:spatial_dims, 3]


def spacing_from_affine(affine, spatial_dims: int) -> list[float]:
    """Voxel size (mm) per array axis: column norms of the linear part ``affine[:N, :N]``."""
    return [float(v) for v in np.linalg.norm(as_4x4(affine)[:spatial_dims, :spatial_dims], axis=0)]


def itk_geometry(affine, spatial_dims: int) -> tuple[list[float], list[float], list[float]]:
    """(origin, spacing, direction row-major) in ITK's LPS convention of a RAS voxel -> world affine."""
    lps = LPS_RAS @ as_4x4(affine)
    linear = lps[:spatial_dims, :spatial_dims]
    spacing = np.linalg.norm(linear, axis=0)
    direction = linear / spacing
    return lps[:spatial_dims, 3].tolist(), spacing.tolist(), direction.ravel().tolist()


def affine_from_itk(direction, spacing: Sequence[float], origin: Sequence[float]) -> np.ndarray:
    """4x4 RAS voxel -> world affine from ITK geometry (LPS direction ``(N, N)`` or flat, spacing, origin)."""
    n = len(spacing)
    lps = np.eye(4)
    lps[:n, :n] = np.asarray(direction, dtype=np.float64).reshape(n, n) @ np.diag(np.asarray(spacing, float))
    lps[:n, 3] = np.asarray(origin, dtype=np.float64)
    return LPS_RAS @ lps


def lps_linear(affine, spatial_dims: int) -> np.ndarray:
    """Linear part ``(N, N)`` of the voxel -> LPS map (a voxel displacement -> an mm displacement)."""
    return (LPS_RAS @ as_4x4(affine))[:spatial_dims, :spatial_dims]


def lps_to_voxel(points, image_or_affine) -> np.ndarray:
    """Physical LPS points ``(K, N)`` (mm) -> voxels ``(K, N)`` of a ``MetaTensor`` / RAS affine."""
    pts = np.asarray(points.detach().cpu() if isinstance(points, Tensor) else points, dtype=np.float64)
    k, n = pts.shape
    hom = np.zeros((k, 4))
    hom[:, :n], hom[:, 3] = pts, 1.0
    vox = hom @ (np.linalg.inv(_affine_arg(image_or_affine)) @ LPS_RAS).T
    return vox[:, :n]


def voxel_to_lps(voxels, image_or_affine) -> np.ndarray:
    """Voxel coordinates ``(K, N)`` -> physical LPS points ``(K, N)`` (mm), inverse of ``lps_to_voxel``."""
    vox = np.asarray(voxels.detach().cpu() if isinstance(voxels, Tensor) else voxels, dtype=np.float64)
    k, n = vox.shape
    hom = np.zeros((k, 4))
    hom[:, :n], hom[:, 3] = vox, 1.0
    return (hom @ (LPS_RAS @ _affine_arg(image_or_affine)).T)[:, :n]


def voxel_affine(physical: np.ndarray | Tensor, fixed_affine, moving_affine, spatial_dims: int) -> np.ndarray:
    """A physical (world-frame) map ``T`` ``(N+1, N+1)`` as the voxel map ``A_m^-1 T A_f`` ``(N+1, N+1)``.

    ``fixed_affine`` / ``moving_affine``: the images' voxel -> world affines in the frame of ``T``.
    """
    t = np.asarray(physical.detach().cpu() if isinstance(physical, Tensor) else physical, dtype=np.float64)
    t4 = np.eye(4)
    n = spatial_dims
    t4[:n, :n], t4[:n, 3] = t[:n, :n], t[:n, n]
    v = np.linalg.inv(as_4x4(moving_affine)) @ t4 @ as_4x4(fixed_affine)
    out = np.eye(n + 1)
    out[:n, :n], out[:n, n] = v[:n, :n], v[:n, 3]
    return out


def affine_ddf(
    matrix: np.ndarray | Tensor, shape: Sequence[int], dtype: torch.dtype = torch.float32, device=None
) -> Tensor:
    """DDF ``(1, N, *S)`` of a voxel-space affine map ``x -> M x`` (``M`` ``(N+1, N+1)``): ``M x - x``."""
    n = len(shape)
    m = torch.as_tensor(np.asarray(matrix.detach().cpu() if isinstance(matrix, Tensor) else matrix))
    m = m.to(torch.float64)
    if m.shape != (n + 1, n + 1):
        raise ValueError(f"expected an ({n + 1}, {n + 1}) matrix for a {n}D grid, got {tuple(m.shape)}")
    m = m.to(device)
    axes = [torch.arange(int(s), device=device, dtype=torch.float64) for s in shape]
    grid = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=0)  # (N, *S)
    moved = torch.einsum("ij,j...->i...", m[:n, :n], grid) + m[:n, n].view(n, *([1] * n))
    return (moved - grid)[None].to(dtype)


def _as_affine(affine, spatial_dims: int, like: Tensor) -> Tensor:
    affine = torch.as_tensor(np.asarray(affine) if not isinstance(affine, Tensor) else affine)
    if affine.shape[-2:] != (spatial_dims + 1, spatial_dims + 1) or affine.ndim not in (2, 3):
        raise ValueError(
            f"affine must be ({spatial_dims + 1}, {spatial_dims + 1}) or (B, {spatial_dims + 1}, "
            f"{spatial_dims + 1}), got shape {tuple(affine.shape)}"
        )
    return affine.to(device=like.device, dtype=torch.float64)


def voxel_to_physical(points: Tensor, affine) -> Tensor:
    """Voxel coordinates ``(..., N)`` (array-axis order) -> world coordinates ``(..., N)``: ``A @ p + t``.

    ``affine``: ``(N+1, N+1)`` voxel->world matrix for the array axes of the tensor (or ``(B, N+1, N+1)``
    with ``points`` ``(B, ..., N)``). The functions are agnostic of the world frame: a NIfTI / MONAI
    ``affine`` maps into RAS, an ITK one into LPS (``LPS = diag(-1, -1, 1) @ RAS``). For a SimpleITK image
    read as ``arr = GetArrayFromImage(img)`` (axes reversed to ITK's ``x, y, z`` index), the matrix is
    ``A = Direction @ diag(Spacing) @ P``, ``t = Origin`` with ``P`` the axis-reversal permutation.
    Computed in float64, returned in ``points``' dtype.
    """
    spatial_dims = points.shape[-1]
    matrix = _as_affine(affine, spatial_dims, points)
    linear, offset = matrix[..., :spatial_dims, :spatial_dims], matrix[..., :spatial_dims, spatial_dims]
    p = points.to(torch.float64)
    if matrix.ndim == 2:
        out = p @ linear.T + offset
    else:
        out = torch.einsum("bij,b...j->b...i", linear, p) + offset.view(
            offset.shape[0], *([1] * (p.ndim - 2)), spatial_dims
        )
    return out.to(points.dtype)


def physical_to_voxel(points: Tensor, affine) -> Tensor:
    """World coordinates ``(..., N)`` -> voxel coordinates ``(..., N)``; inverse of ``voxel_to_physical``."""
    spatial_dims = points.shape[-1]
    inverse = torch.linalg.inv(_as_affine(affine, spatial_dims, points))
    return voxel_to_physical(points, inverse)


def _apply_linear_to_ddf(ddf: Tensor, linear: Tensor) -> Tensor:
    out = ddf.to(torch.float64)
    if linear.ndim == 2:
        out = torch.einsum("ij,bj...->bi...", linear, out)
    else:
        out = torch.einsum("bij,bj...->bi...", linear, out)
    return out.to(ddf.dtype)


def _check_field(ddf: Tensor) -> None:
    spatial_dims = ddf.ndim - 2
    if spatial_dims not in (2, 3) or ddf.shape[1] != spatial_dims:
        raise ValueError(f"ddf must be (B, N, *S) with N = len(S) in (2, 3), got shape {tuple(ddf.shape)}")


def ddf_voxel_to_physical(ddf: Tensor, affine) -> Tensor:
    """Voxel-unit DDF ``(B, N, *S)`` -> world-unit (mm) DDF ``(B, N, *S)``, channel ``i`` = world axis ``i``.

    Uses the linear part ``A`` of the voxel->world ``affine`` (see ``voxel_to_physical``): ``d_mm = A @ d``.
    """
    _check_field(ddf)
    spatial_dims = ddf.shape[1]
    matrix = _as_affine(affine, spatial_dims, ddf)
    return _apply_linear_to_ddf(ddf, matrix[..., :spatial_dims, :spatial_dims])


def ddf_physical_to_voxel(ddf: Tensor, affine) -> Tensor:
    """World-unit DDF ``(B, N, *S)`` -> voxel-unit DDF; inverse of :func:`ddf_voxel_to_physical`."""
    _check_field(ddf)
    spatial_dims = ddf.shape[1]
    matrix = _as_affine(affine, spatial_dims, ddf)
    return _apply_linear_to_ddf(ddf, torch.linalg.inv(matrix[..., :spatial_dims, :spatial_dims]))
