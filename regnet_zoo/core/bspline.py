"""Cubic B-spline free-form deformations: control-point grid -> dense DDF.

Layout (per spatial axis ``i``, control spacing ``s_i`` voxels, image size ``S_i``):
control point ``k`` (``k = 0 .. C_i - 1``) sits at voxel coordinate ``(k - 1) * s_i``, with
``C_i = ceil((S_i - 1) / s_i) + 3``, so that every voxel ``0 .. S_i - 1`` has its full 4x4(x4) support.
The dense field is ``u(x) = sum_k c_k prod_i B3(x_i / s_i - k_i + 1)`` with the uniform cubic B-spline ``B3``.
Coefficients are displacements in voxel units with channel ``i`` = axis ``i`` (README conventions).

This equals SimpleITK's ``BSplineTransform`` (order 3) with, per ITK axis ``j = N - 1 - i`` (ITK lists the
last array axis first): ``TransformDomainOrigin = 0``, ``TransformDomainMeshSize = C_i - 3``,
``TransformDomainPhysicalDimensions = (C_i - 3) * s_i`` (unit voxel spacing), identity direction, and
coefficient image ``j`` = channel ``i`` (ITK's coefficient grid origin is ``origin - s``, i.e. our ``k = 0``).
Evaluation is separable: one ``(S_i, C_i)`` basis matrix per axis, applied by ``tensordot``
(exact, differentiable).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from regnet_zoo.core.tracing import as_size, ceil_div

__all__ = ["bspline_ddf", "control_grid_shape", "bspline_basis_matrix", "cubic_bspline", "BSplineTransformer"]


def _per_axis(value: int | Sequence[int], ndim: int, name: str) -> tuple[int, ...]:
    values = (value,) * ndim if isinstance(value, int) else tuple(int(v) for v in value)
    if len(values) != ndim or any(v < 1 for v in values):
        raise ValueError(f"{name} must be a positive integer or {ndim} positive integers, got {value}")
    return values


def cubic_bspline(t: Tensor) -> Tensor:
    """Uniform cubic B-spline ``B3(t)`` (support ``|t| < 2``, partition of unity), elementwise."""
    a = t.abs()
    inner = 2.0 / 3.0 - a**2 + 0.5 * a**3
    outer = (2.0 - a) ** 3 / 6.0
    return torch.where(a < 1, inner, torch.where(a < 2, outer, torch.zeros_like(a)))


def control_grid_shape(shape: Sequence[int], control_spacing: int | Sequence[int]) -> tuple[int, ...]:
    """Control-point grid size ``C_i = ceil((S_i - 1) / s_i) + 3`` covering an image of ``shape``."""
    spacing = _per_axis(control_spacing, len(shape), "control_spacing")
    return tuple(ceil_div(as_size(n) - 1, s) + 3 for n, s in zip(shape, spacing, strict=True))


def bspline_basis_matrix(
    size: int, num_control: int, control_spacing: int, dtype: torch.dtype = torch.float32, device=None
) -> Tensor:
    """``(size, num_control)`` matrix ``B[x, k] = B3(x / s - k + 1)`` evaluating one axis of the spline."""
    x = torch.arange(size, dtype=torch.float64, device=device)[:, None]
    k = torch.arange(num_control, dtype=torch.float64, device=device)[None, :]
    return cubic_bspline(x / control_spacing - k + 1.0).to(dtype)


def bspline_ddf(control_points: Tensor, shape: Sequence[int], control_spacing: int | Sequence[int]) -> Tensor:
    """Dense displacement ``(B, N, *shape)`` from control-point coefficients ``(B, N, *C)``.

    ``C`` must be ``control_grid_shape(shape, control_spacing)``; any number of channels is accepted (the
    spline is applied channel-wise), voxel units in and out.
    """
    ndim = len(shape)
    if control_points.dim() != ndim + 2:
        raise ValueError(
            f"control_points must be (B, N, *C) with {ndim} spatial dims, got {control_points.shape}"
        )
    spacing = _per_axis(control_spacing, ndim, "control_spacing")
    expected = control_grid_shape(shape, spacing)
    if tuple(control_points.shape[2:]) != expected:
        raise ValueError(
            f"control grid {tuple(control_points.shape[2:])} does not match shape {tuple(shape)} "
            f"with control spacing {spacing}: expected {expected}"
        )
    out = control_points
    for axis in range(ndim):
        basis = bspline_basis_matrix(
            as_size(shape[axis]), expected[axis], spacing[axis], control_points.dtype, control_points.device
        )
        # contract spatial dim (2 + axis) with the basis, then put the new axis back in place
        out = torch.movedim(torch.tensordot(out, basis, dims=([2 + axis], [1])), -1, 2 + axis)
    return out


class BSplineTransformer(nn.Module):
    """``nn.Module`` over :func:`bspline_ddf` for a fixed image ``shape`` and ``control_spacing``.

    ``forward(control_points (B, N, *C)) -> ddf (B, N, *shape)``; ``grid_shape`` is the expected ``C``.
    """

    def __init__(self, shape: Sequence[int], control_spacing: int | Sequence[int]) -> None:
        super().__init__()
        self.shape = tuple(int(n) for n in shape)
        self.control_spacing = _per_axis(control_spacing, len(self.shape), "control_spacing")
        self.grid_shape = control_grid_shape(self.shape, self.control_spacing)

    def forward(self, control_points: Tensor) -> Tensor:
        return bspline_ddf(control_points, self.shape, self.control_spacing)
