"""Coarse grids of a fine grid: area pooling onto them and linear upsampling from them, one convention.

A coarse grid of ``stride`` ``s`` and ``origin`` ``o`` has its voxel ``j`` at fine voxel ``s j + o`` along
every axis and ``ceil(S / s)`` voxels for a fine size ``S``. Pyramid level ``l`` of an image is the grid with
``s = 2^l``, ``o = (2^l - 1) / 2``: voxel ``j`` is the mean of fine voxels ``[2^l j, 2^l (j + 1))``, which is
what average pooling by ``2^l`` gives. Fields move between grids with the same centres, their values
scaled by the stride (a displacement of ``d`` coarse voxels is ``s d`` fine voxels).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from regnet_zoo.core.spatial import identity_grid, sample_image

__all__ = [
    "level_origin",
    "pool_to_grid",
    "upsample_coarse_ddf",
    "downsample_ddf_to_level",
    "upsample_ddf_from_level",
]


def level_origin(stride: int) -> float:
    """Fine-voxel position of coarse voxel 0 when the coarse voxels are block means: ``(stride - 1) / 2``."""
    return (stride - 1) / 2.0


def _box_taps(stride: int, origin: float) -> tuple[int, list[float]]:
    """Offset of the first tap (relative to ``stride * j``) and the weights of a width-``stride`` box.

    Fine voxel ``k`` covers ``[k - 1/2, k + 1/2]``; its weight is its overlap with the box
    ``[stride j + origin - stride/2, stride j + origin + stride/2]``, divided by ``stride``.
    """
    low, high = origin - stride / 2.0, origin + stride / 2.0
    first, last = math.floor(low + 0.5), math.ceil(high - 0.5)
    weights = [max(0.0, min(high, k + 0.5) - max(low, k - 0.5)) / stride for k in range(first, last + 1)]
    return first, weights


def pool_to_grid(x: Tensor, stride: int, origin: float | None = None) -> Tensor:
    """Area average of ``x`` ``(B, C, *S)`` over width-``stride`` boxes centred on the coarse grid.

    -> ``(B, C, *ceil(S / stride))``: coarse voxel ``j`` = mean of ``x`` over
    ``[stride j + origin - stride/2, stride j + origin + stride/2]`` (fine voxels as unit boxes), so it sits
    exactly at ``stride j + origin`` (default origin ``(stride - 1) / 2``: plain block means). Beyond the
    image the border voxel is repeated. One-hot label maps become soft (partial-volume) maps.
    """
    if x.ndim not in (4, 5):
        raise ValueError(f"x must be (B, C, H, W) or (B, C, D, H, W), got shape {tuple(x.shape)}")
    stride = int(stride)
    if stride < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    origin = level_origin(stride) if origin is None else float(origin)
    if stride == 1 and origin == 0.0:
        return x
    first, weights = _box_taps(stride, origin)
    spatial_dims = x.ndim - 2
    channels = x.shape[1]
    conv = (F.conv2d, F.conv3d)[spatial_dims - 2]
    out = x if x.is_floating_point() else x.float()
    for axis in range(spatial_dims):
        size = out.shape[2 + axis]
        count = math.ceil(x.shape[2 + axis] / stride)
        # taps of coarse voxel j: fine stride*j + first .. stride*j + first + len(weights) - 1
        before = max(0, -first)
        after = max(0, stride * (count - 1) + first + len(weights) - size)
        pad = [0, 0] * spatial_dims
        pad[2 * (spatial_dims - 1 - axis)] = before
        pad[2 * (spatial_dims - 1 - axis) + 1] = after
        if before or after:
            out = F.pad(out, pad, mode="replicate")
        kernel_shape = [1] * spatial_dims
        kernel_shape[axis] = len(weights)
        kernel = torch.tensor(weights, dtype=out.dtype, device=out.device).reshape(1, 1, *kernel_shape)
        strides = [1] * spatial_dims
        strides[axis] = stride
        start = first + before  # index in the padded axis of coarse voxel 0's first tap
        index = [slice(None)] * out.ndim
        index[2 + axis] = slice(start, None)
        kernel = kernel.expand(channels, 1, *kernel_shape)
        out = conv(out[tuple(index)], kernel, stride=strides, groups=channels)
        index[2 + axis] = slice(0, count)
        out = out[tuple(index)]
    return out


def upsample_coarse_ddf(ddf_coarse: Tensor, size: Sequence[int], stride: int, origin: float = 0.0) -> Tensor:
    """Linear interpolation of a coarse field ``(B, N, *S_c)`` (already in fine voxel units) whose voxel ``j``
    sits at fine voxel ``stride * j + origin`` -> ``(B, N, *size)`` (border clamped)."""
    coords = (identity_grid(size, device=ddf_coarse.device, dtype=ddf_coarse.dtype) - origin) / stride
    return sample_image(ddf_coarse, coords, mode="linear", padding_mode="border")


def downsample_ddf_to_level(ddf: Tensor, factor: int) -> Tensor:
    """A field ``(B, N, *S)`` in fine voxels -> the level ``factor = 2^l`` field in level voxels.

    Block means (the grid of :func:`pool_to_grid` with its default origin) divided by ``factor``:
    ``(B, N, *ceil(S / factor))``.
    """
    return pool_to_grid(ddf, factor) / factor


def upsample_ddf_from_level(ddf: Tensor, size: Sequence[int], factor: int) -> Tensor:
    """The inverse direction: a level field ``(B, N, *S_l)`` in level voxels, level voxel ``j`` at fine voxel
    ``factor j + (factor - 1) / 2`` -> ``(B, N, *size)`` in fine voxels (linear, border clamped)."""
    size = tuple(int(s) for s in size)
    expected = tuple(math.ceil(s / factor) for s in size)
    if tuple(ddf.shape[2:]) != expected:
        raise ValueError(f"a level-{factor} field of {size} has shape {expected}, got {tuple(ddf.shape[2:])}")
    return upsample_coarse_ddf(ddf * factor, size, factor, level_origin(factor))
