"""Correlation layer without weights: matching cost over a dense discrete displacement set (2D and 3D).

``cost[b, l, x] = metric(fixed[b, :, x], moving[b, :, x + d_l])`` for every offset ``d_l`` of
:func:`displacement_set` (the unfold formulation of Heinrich & Blendowski's Learn2Reg 2019 tutorial and the
FlowNetC / PWC-Net cost volume). Offsets are integer voxels of the feature grid, channel ``i`` of an
offset is the shift along spatial axis ``i`` (README "Conventions"). Moving features are shifted by slicing a
padded copy, chunked over displacements, so that a 3D search never materialises ``(B, L, C, *S)`` at once.

Padding (positions ``x + d`` outside the grid): ``"zeros"`` (moving features are 0 there, as ``F.unfold`` in
the tutorial and PWC-Net) or ``"border"`` (nearest edge value, as ``padding_mode="border"`` in PDD-Net).
"""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from regnet_zoo.core import _fast

__all__ = [
    "displacement_set",
    "correlation_volume",
    "displaced_sum",
    "CorrelationVolume",
]

# default chunk budget: elements of one (B, chunk, C, *S) block of shifted moving features (~64 MB float32)
_CHUNK_ELEMENTS = 2**24
_METRICS = ("ssd", "dot")
_PADDINGS = ("zeros", "border")


def displacement_set(
    radius: int, spatial_dims: int, step: int = 1, device: torch.device | str | None = None
) -> torch.Tensor:
    """Integer offsets ``{-radius, -radius + step, ..., radius}^spatial_dims`` as ``(L, N)`` (long).

    ``L = (2 * radius / step + 1) ** N``. Row order is C order over the axes (axis 0 slowest), so the
    cost ``(B, L, *S)`` reshapes to ``(B, K, ..., K, *S)`` (``K = 2 * radius / step + 1``) indexed by offset.
    ``radius`` is in voxels and must be a multiple of ``step``.
    """
    if spatial_dims not in (1, 2, 3):
        raise ValueError(f"spatial_dims must be 1, 2 or 3, got {spatial_dims}")
    if radius < 0 or step < 1 or radius % step != 0:
        raise ValueError(f"radius ({radius}) must be >= 0 and a multiple of step ({step} >= 1)")
    values = range(-radius, radius + 1, step)
    offsets = list(itertools.product(values, repeat=spatial_dims))
    return torch.tensor(offsets, dtype=torch.long, device=device).reshape(-1, spatial_dims)


def _check_pair(fixed_feat: torch.Tensor, moving_feat: torch.Tensor) -> int:
    if fixed_feat.shape != moving_feat.shape:
        raise ValueError(
            f"fixed and moving features differ: {tuple(fixed_feat.shape)} vs {tuple(moving_feat.shape)}"
        )
    spatial_dims = fixed_feat.ndim - 2
    if spatial_dims not in (1, 2, 3):
        raise ValueError(f"features must be (B, C, *S) with 1-3 spatial dims, got {tuple(fixed_feat.shape)}")
    return spatial_dims


def _pad(moving: torch.Tensor, radius: int, padding_mode: str) -> torch.Tensor:
    """Pad every spatial side by ``radius`` (zeros or replicated border)."""
    if padding_mode not in _PADDINGS:
        raise ValueError(f"padding_mode must be one of {_PADDINGS}, got {padding_mode!r}")
    if radius == 0:
        return moving
    pad = [radius] * (2 * (moving.ndim - 2))
    if padding_mode == "zeros":
        return F.pad(moving, pad)
    return F.pad(moving, pad, mode="replicate")


def _shifted(padded: torch.Tensor, offsets: list[tuple[int, ...]], radius: int, size) -> torch.Tensor:
    """``(B, k, C, *S)``: ``padded`` read at ``x + d`` for each of the ``k`` offsets (stacked slices)."""
    views = []
    for d in offsets:
        index = tuple(slice(radius + di, radius + di + si) for di, si in zip(d, size, strict=True))
        views.append(padded[(Ellipsis, *index)])
    return torch.stack(views, dim=1)


def _auto_chunk(chunk_size: int | None, n_offsets: int, elements_per_offset: int) -> int:
    if chunk_size is None:
        chunk_size = max(1, _CHUNK_ELEMENTS // max(1, elements_per_offset))
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    return min(chunk_size, n_offsets)


def _cost_chunk(
    fixed: torch.Tensor, padded: torch.Tensor, offsets: list, radius: int, metric: str
) -> torch.Tensor:
    shifted = _shifted(padded, offsets, radius, fixed.shape[2:])
    if metric == "ssd":
        return (fixed.unsqueeze(1) - shifted).pow(2).sum(2)
    return (fixed.unsqueeze(1) * shifted).mean(2)


def _run_chunks(fn, n_offsets: int, chunk: int, inputs: tuple[torch.Tensor, ...], offsets: list, *args):
    """Apply ``fn(*inputs, offsets_chunk, *args)`` per chunk; checkpointed when there are several chunks and
    gradients are needed, so that backward keeps only the inputs, not every chunk's shifted block."""
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in inputs)
    out = []
    for start in range(0, n_offsets, chunk):
        part = offsets[start : start + chunk]
        if needs_grad and chunk < n_offsets:
            out.append(checkpoint(fn, *inputs, part, *args, use_reentrant=False))
        else:
            out.append(fn(*inputs, part, *args))
    return out


def correlation_volume(
    fixed_feat: torch.Tensor,
    moving_feat: torch.Tensor,
    radius: int,
    metric: str = "ssd",
    chunk_size: int | None = None,
    padding_mode: str = "zeros",
    step: int = 1,
) -> torch.Tensor:
    """Matching cost of fixed at ``x`` with moving at ``x + d`` for every ``d`` in ``displacement_set``.

    Args:
        fixed_feat, moving_feat: ``(B, C, *S)`` features on the same grid.
        radius: largest offset in voxels per axis (multiple of ``step``).
        metric: ``"ssd"`` = sum over channels of squared differences (the tutorial's cost, lower is better);
            ``"dot"`` = mean over channels of the product (PWC-Net's correlation, higher is better).
        chunk_size: offsets per chunk; ``None`` picks one so a chunk holds ~2**24 elements.
        padding_mode: ``"zeros"`` or ``"border"`` for moving positions outside the grid.
        step: spacing of the offsets (a dilated search).

    Returns:
        ``(B, L, *S)`` with ``L = (2 * radius / step + 1) ** N``, offsets in :func:`displacement_set` order.
    """
    spatial_dims = _check_pair(fixed_feat, moving_feat)
    if metric not in _METRICS:
        raise ValueError(f"metric must be one of {_METRICS}, got {metric!r}")
    offsets = displacement_set(radius, spatial_dims, step).tolist()
    b, c, *size = fixed_feat.shape
    padded = _pad(moving_feat, radius, padding_mode)
    fast = _fast.applies_no_grad(fixed_feat) and _fast.applies_no_grad(padded)
    if spatial_dims > 1 and fast and fixed_feat.dtype == padded.dtype:
        # inference on CPU: one output row at a time, no (B, chunk, C, *S) blocks of shifted copies
        return _fast.correlation(fixed_feat, padded, torch.tensor(offsets), radius, metric == "dot")
    chunk = _auto_chunk(chunk_size, len(offsets), b * c * math.prod(size))
    parts = _run_chunks(_cost_chunk, len(offsets), chunk, (fixed_feat, padded), offsets, radius, metric)
    return torch.cat(parts, dim=1)


def _sum_chunk(weights: torch.Tensor, padded: torch.Tensor, offsets: list, radius: int) -> torch.Tensor:
    shifted = _shifted(padded, offsets, radius, weights.shape[2:])  # (B, k, C, *S)
    return (weights.unsqueeze(2) * shifted).sum(1)


def displaced_sum(
    weights: torch.Tensor,
    moving: torch.Tensor,
    radius: int,
    chunk_size: int | None = None,
    padding_mode: str = "border",
    step: int = 1,
) -> torch.Tensor:
    """``out[b, :, x] = sum_l weights[b, l, x] * moving[b, :, x + d_l]`` (``(B, C, *S)``).

    With ``weights`` the softmax over displacements this is PDD-Net's non-local label transfer (expected
    moving label under the displacement distribution). ``weights``: ``(B, L, *S)``; ``moving``:
    ``(B, C, *S)``.
    Border padding by default (labels continue outward), as in PDD-Net.
    """
    spatial_dims = moving.ndim - 2
    offsets = displacement_set(radius, spatial_dims, step).tolist()
    if weights.shape[0] != moving.shape[0] or weights.shape[2:] != moving.shape[2:]:
        raise ValueError(f"weights {tuple(weights.shape)} and moving {tuple(moving.shape)} differ in B/grid")
    if weights.shape[1] != len(offsets):
        raise ValueError(f"weights has {weights.shape[1]} displacement channels, the set has {len(offsets)}")
    b, c, *size = moving.shape
    chunk = _auto_chunk(chunk_size, len(offsets), b * c * math.prod(size))
    padded = _pad(moving, radius, padding_mode)
    # accumulate chunk by chunk (checkpointed under grad): no (B, L, C, *S) block is kept
    out = None
    needs_grad = torch.is_grad_enabled() and (weights.requires_grad or moving.requires_grad)
    for start in range(0, len(offsets), chunk):
        part = offsets[start : start + chunk]
        w = weights[:, start : start + chunk]
        if needs_grad and chunk < len(offsets):
            term = checkpoint(_sum_chunk, w, padded, part, radius, use_reentrant=False)
        else:
            term = _sum_chunk(w, padded, part, radius)
        out = term if out is None else out + term
    return out


class CorrelationVolume(nn.Module):
    """Module wrapper of :func:`correlation_volume`: ``forward(fixed_feat, moving_feat) -> (B, L, *S)``."""

    def __init__(
        self,
        radius: int,
        metric: str = "ssd",
        chunk_size: int | None = None,
        padding_mode: str = "zeros",
        step: int = 1,
    ) -> None:
        super().__init__()
        if metric not in _METRICS:
            raise ValueError(f"metric must be one of {_METRICS}, got {metric!r}")
        self.radius, self.metric, self.step = radius, metric, step
        self.chunk_size, self.padding_mode = chunk_size, padding_mode

    def forward(self, fixed_feat: torch.Tensor, moving_feat: torch.Tensor) -> torch.Tensor:
        return correlation_volume(
            fixed_feat, moving_feat, self.radius, self.metric, self.chunk_size, self.padding_mode, self.step
        )

    def extra_repr(self) -> str:
        return (
            f"radius={self.radius}, metric={self.metric!r}, padding={self.padding_mode!r}, step={self.step}"
        )
