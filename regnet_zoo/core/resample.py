"""Resampling through physical space: an image on one grid warped onto another by a field and the grids'
affines, as ITK's ``ResampleImageFilter`` does (pure tensor code).

A voxel DDF ``(N, *S)`` lies on the fixed grid in fixed voxel units; the moving image is sampled at
``A_m^-1 A_f (x + ddf(x))`` (``A``: voxel -> world affines, :mod:`regnet_zoo.core.geometry`). A physical
pre-alignment ``T`` (moving(T p) ~ fixed(p)) is applied by giving the moving image the affine ``T^-1 A_m``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from regnet_zoo.core.geometry import affine_of, as_4x4, voxel_map
from regnet_zoo.core.spatial import identity_grid, sample_image
from regnet_zoo.errors import RegistrationInputError

__all__ = ["warp_physical"]


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
    data = moving.as_tensor() if hasattr(moving, "as_tensor") else moving
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
