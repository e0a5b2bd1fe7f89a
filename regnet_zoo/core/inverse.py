"""Inverse displacement fields and the inverse-consistency error.

DDFs are ``(B, N, *S)`` in voxel units of one grid (README "Conventions"): ``phi(x) = x + u(x)``. The inverse
``phi^-1(y) = y + v(y)`` is found on the same grid:

- for any DDF by the fixed-point iteration ``v_{k+1}(y) = -u(y + v_k(y))`` (Chen et al. 2008, "A simple
  fixed-point approach to invert a deformation field"; the same scheme as ITK's
  ``InvertDisplacementFieldImageFilter``). It converges where ``phi`` is a contraction away from the identity
  (``|grad u| < 1``), i.e. for smooth, non-folding fields;
- exactly for a stationary velocity field (SVF): ``phi^-1 = exp(-v)`` (:func:`regnet_zoo.core.integration.
  integrate_inverse`).

Sampling is linear with border padding (the displacement held constant outside the grid), as everywhere in
``core.spatial``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from regnet_zoo.core.integration import integrate_inverse
from regnet_zoo.core.spatial import compose_ddf, identity_grid, sample_image

__all__ = ["invert_ddf", "invert_svf", "inverse_residual", "inverse_consistency_error"]


def invert_ddf(
    ddf: Tensor, iterations: int = 100, tolerance: float = 1e-4, initial: Tensor | None = None
) -> Tensor:
    """Inverse of ``x -> x + ddf(x)`` by fixed-point iteration: ``(B, N, *S)`` -> ``(B, N, *S)`` (voxels).

    Starts from ``initial`` (default ``-ddf``; e.g. :func:`invert_svf` for an SVF, which the iteration then
    refines to the inverse of the *discrete* field). Stops after ``iterations`` or when no voxel's estimate
    moves by more than ``tolerance`` voxels in one step. Where ``phi`` folds the iteration does not converge;
    :func:`inverse_consistency_error` shows how far the result is from an inverse.
    """
    if ddf.ndim - 2 not in (2, 3) or ddf.shape[1] != ddf.ndim - 2:
        raise ValueError(f"ddf must be (B, N, *S) with N = len(S) in (2, 3), got shape {tuple(ddf.shape)}")
    if iterations < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations}")
    grid = identity_grid(ddf.shape[2:], device=ddf.device, dtype=ddf.dtype)
    inverse = -ddf if initial is None else initial.to(ddf.dtype)
    if inverse.shape != ddf.shape:
        raise ValueError(f"initial must have the ddf's shape {tuple(ddf.shape)}, got {tuple(inverse.shape)}")
    for _ in range(iterations):
        new = -sample_image(ddf, grid + inverse, "linear", "border")
        change = (new - inverse).abs().amax()
        inverse = new
        if change <= tolerance:
            break
    return inverse


def invert_svf(svf: Tensor, steps: int = 7) -> Tensor:
    """Exact inverse DDF ``(B, N, *S)`` of ``exp(svf)`` (scaling and squaring of ``-svf``).

    ``steps`` must be the forward integration's. Exact for the continuous flow and a diffeomorphism by
    construction; against the *discrete* forward field (linear interpolation in every squaring) it leaves a
    residual of a few hundredths of a voxel, which ``invert_ddf(ddf, initial=invert_svf(svf))`` removes.
    """
    return integrate_inverse(svf, steps)


def inverse_residual(ddf: Tensor, inverse: Tensor) -> Tensor:
    """``phi(phi^-1(y)) - y`` ``(B, N, *S)`` (voxels): ``inverse + ddf(y + inverse(y))``."""
    return compose_ddf(ddf, inverse)


def inverse_consistency_error(
    ddf: Tensor, inverse: Tensor, spacing: Sequence[float] | None = None, mask: Tensor | None = None
) -> dict[str, float]:
    """Mean and 95th percentile of ``|phi(phi^-1(y)) - y|`` in mm (voxels when ``spacing`` is None).

    ``ddf``, ``inverse``: ``(B, N, *S)`` voxel units; ``spacing``: voxel size per array axis (the grid's
    direction is orthonormal, so the length in mm needs only the spacing); ``mask``: ``(B, 1, *S)`` or
    ``(*S)`` voxels to include (default all). Returns ``{"inverse_consistency_mean_mm", "..._p95_mm"}``.
    """
    residual = inverse_residual(ddf, inverse).to(torch.float64)
    spatial_dims = residual.shape[1]
    if spacing is not None:
        if len(spacing) != spatial_dims:
            raise ValueError(f"spacing needs {spatial_dims} entries, got {list(spacing)}")
        scale = torch.as_tensor(list(spacing), dtype=torch.float64, device=residual.device)
        residual = residual * scale.view(1, -1, *([1] * spatial_dims))
    length = residual.norm(dim=1)  # (B, *S)
    if mask is not None:
        mask = mask.bool()
        mask = mask[:, 0] if mask.ndim == length.ndim + 1 else mask
        length = length[mask.expand_as(length)]
    if length.numel() == 0:
        raise ValueError("inverse_consistency_error: the mask selects no voxel")
    unit = "mm" if spacing is not None else "voxel"
    return {
        f"inverse_consistency_mean_{unit}": float(length.mean()),
        f"inverse_consistency_p95_{unit}": float(np.percentile(length.cpu().numpy(), 95)),
    }
