"""Box (moving-average) filters of images and fields ``(B, C, *S)``, differentiable, 2D and 3D."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from regnet_zoo.core import _fast

__all__ = ["box_sum", "box_mean"]


class _BoxSum(torch.autograd.Function):
    """Zero-padded window sums; the filter is symmetric, so its adjoint (the backward) is itself."""

    @staticmethod
    def forward(ctx, x, kernel_size, dims):
        ctx.kernel_size, ctx.dims = kernel_size, dims
        return _fast.box_sum(x, kernel_size, dims)

    @staticmethod
    def backward(ctx, grad_out):
        return _fast.box_sum(grad_out, ctx.kernel_size, ctx.dims), None, None


def box_sum(x: Tensor, kernel_size: int) -> Tensor:
    """Sum of ``x`` ``(B, C, *S)`` over the cube of side ``kernel_size`` (odd) around each voxel, zeros
    outside the grid (MONAI's ``separable_filtering`` with a rectangular kernel): running sums on CPU (numba),
    MONAI's separable convolution elsewhere."""
    if kernel_size % 2 == 0:
        raise ValueError(f"box filter: kernel_size must be odd, got {kernel_size}")
    dims = x.ndim - 2
    if _fast.applies(x, x):
        return _BoxSum.apply(x, int(kernel_size), dims)
    from monai.networks.layers import separable_filtering

    return separable_filtering(x, [torch.ones(kernel_size, dtype=x.dtype, device=x.device)] * dims)


def box_mean(x: Tensor, kernel_size: int) -> Tensor:
    """Mean of ``x`` ``(B, C, *S)`` over the cube of side ``kernel_size`` (odd) around each voxel, the grid
    extended by its border values (a constant field stays constant)."""
    r = kernel_size // 2
    padded = F.pad(x, (r, r) * (x.ndim - 2), mode="replicate")
    crop = (slice(None), slice(None)) + tuple(slice(r, r + n) for n in x.shape[2:])
    return box_sum(padded, kernel_size)[crop] / float(kernel_size ** (x.ndim - 2))
