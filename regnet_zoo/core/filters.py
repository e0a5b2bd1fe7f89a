"""Box (moving-average) filters of images and fields ``(B, C, *S)``, differentiable, 2D and 3D; the
weightless regularisers of a dense cost volume ``(B, L, *S)`` (discrete registration): a min-convolution over
its displacement grid and mean-field smoothing over space; and a network decoder's linear upsampling written
into a preallocated tensor."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from regnet_zoo.core import _fast
from regnet_zoo.core.padding import replicate_pad

__all__ = [
    "box_sum",
    "box_mean",
    "approximate_min_convolution",
    "mean_field_smoothing",
    "displacement_grid_side",
    "linear_upsample_into",
]


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


def displacement_grid_side(num_displacements: int, spatial_dims: int) -> int:
    """``K`` with ``K**spatial_dims == num_displacements`` (odd): the side of a dense displacement grid."""
    num_displacements = int(num_displacements)  # a tensor while tracing
    side = round(num_displacements ** (1.0 / spatial_dims))
    if side**spatial_dims != num_displacements or side % 2 == 0:
        raise ValueError(f"{num_displacements} displacements are not an odd cube/square in {spatial_dims}D")
    return side


def _box(x: Tensor, dims: Sequence[int], kernel: int, mode: str) -> Tensor:
    """Valid (unpadded) stride-1 box mean or max with a ``kernel``-wide window along each of ``dims``.

    Separable, by shifted slices: ``len(dims) * kernel`` operations per element on the tensor as laid out
    (no permutation of the ~1000-channel 3D cost volume), the same result as ``avg_pool``/``max_pool``.
    """
    if kernel == 1:
        return x
    for dim in dims:
        size = x.shape[dim] - kernel + 1
        out = x.narrow(dim, 0, size)
        for shift in range(1, kernel):
            window = x.narrow(dim, shift, size)
            out = out + window if mode == "mean" else torch.maximum(out, window)
        x = out / kernel if mode == "mean" else out
    return x


def approximate_min_convolution(cost: Tensor, avg_kernel: int = 5, min_kernel: int = 3) -> Tensor:
    """Approximate min-convolution over the displacement dimensions of ``cost`` ``(B, L, *S)`` (same shape).

    Per voxel the costs form an image over the displacement grid ``(K,)*N`` (``L = K**N``, offsets in
    ``displacement_set`` order); it is replicate-padded, smoothed by two ``avg_kernel`` box means and eroded
    by a ``min_kernel`` box minimum, as the tutorial's ``pad(5), avg(5), avg(5), max(3)`` on the negated cost:
    a cheap lower envelope that lets neighbouring displacements support each other (deeds' displacement
    compatibility).
    """
    if avg_kernel < 1 or min_kernel < 1 or min_kernel % 2 == 0:
        raise ValueError(
            f"min-convolution: avg_kernel >= 1 and an odd min_kernel, got {avg_kernel} / {min_kernel}"
        )
    b, num, *size = cost.shape  # b and size stay traced values in a TorchScript export
    spatial_dims = len(size)
    side = displacement_grid_side(num, spatial_dims)
    if _fast.applies_no_grad(cost):  # inference on CPU: voxel by voxel, no padded copy of the whole volume
        return _fast.min_convolution(cost, side, avg_kernel, min_kernel)
    pad = (avg_kernel - 1) + (min_kernel - 1) // 2
    displacement_dims = list(range(1, spatial_dims + 1))
    x = replicate_pad(cost.reshape(b, *([side] * spatial_dims), *size), displacement_dims, pad)
    x = _box(_box(x, displacement_dims, avg_kernel, "mean"), displacement_dims, avg_kernel, "mean")
    x = -_box(-x, displacement_dims, min_kernel, "max")
    return x.reshape(b, num, *size)


def mean_field_smoothing(cost: Tensor, kernel: int = 5, iterations: int = 3) -> Tensor:
    """Mean-field-like spatial smoothing: ``iterations`` box means (``kernel``, stride 1) of every
    displacement channel of ``cost`` ``(B, L, *S)`` after replicate padding (same shape)."""
    if kernel < 1 or kernel % 2 == 0:
        raise ValueError(f"mean-field smoothing: the kernel must be odd, got {kernel}")
    if _fast.applies_no_grad(cost):  # inference on CPU: channel by channel, no padded copy of the volume
        return _fast.mean_field(cost, kernel, iterations)
    spatial = list(range(2, cost.ndim))
    x = replicate_pad(cost, spatial, iterations * ((kernel - 1) // 2))
    for _ in range(iterations):
        x = _box(x, spatial, kernel, "mean")
    return x


def linear_upsample_into(x: Tensor, out: Tensor) -> None:
    """Write ``F.interpolate(x, out's size, mode="(bi/tri)linear", align_corners=False)`` of ``x`` ``(B, C,
    *s)`` into the first ``C`` channels of ``out`` ``(B, K >= C, *S)`` (contiguous, ``x``'s dtype, device).

    No autograd (inference). On CPU an exact doubling runs a numba kernel (~4x faster than torch's); other
    sizes and devices write with torch's kernel, sample by sample (each sample's channel block is contiguous).
    """
    if out.ndim != x.ndim or out.shape[0] != x.shape[0] or out.shape[1] < x.shape[1]:
        raise ValueError(f"out {tuple(out.shape)} cannot hold the upsampled {tuple(x.shape)}")
    if torch.is_grad_enabled() and x.requires_grad:
        raise RuntimeError("linear_upsample_into records no gradient: call it under torch.no_grad()")
    size = list(out.shape[2:])
    if _fast.applies_no_grad(x) and size == [2 * n for n in x.shape[2:]]:
        _fast.upsample_by_two(x, out)
        return
    upsample = torch.ops.aten.upsample_bilinear2d if x.ndim == 4 else torch.ops.aten.upsample_trilinear3d
    for b in range(x.shape[0]):
        upsample.out(x[b : b + 1], size, False, out=out[b : b + 1, : x.shape[1]])
