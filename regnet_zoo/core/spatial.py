"""Spatial transforms on dense displacement fields (DDF): sampling, warping, composition, resizing, geometry.

Conventions (see README "Conventions"): images ``(B, C, *S)``, DDFs ``(B, N, *S)`` in voxel units of the
fixed grid, channel ``i`` = displacement along array axis ``i``, ``warped(x) = moving(x + ddf(x))``.
Voxel centres are the grid points ``0 .. n-1`` (``align_corners=True`` everywhere). All functions work for
``N = 2`` and ``N = 3`` and are differentiable (except nearest-neighbour sampling and label warping).

Interpolation modes:

- ``"linear"``: (bi/tri)linear, ``torch.nn.functional.grid_sample``;
- ``"nearest"``: ``grid_sample`` nearest (ties round half to even);
- linear and nearest on CPU float32/float64 tensors run numba kernels (``core._fast``) with the same numbers
  and gradients, without building a coordinate grid; ``REGNET_ZOO_FAST=0`` (or no numba) uses ``grid_sample``;
- ``"cubic"``: cubic **B-spline interpolation** in 2D and 3D alike (the same as ITK/SimpleITK ``sitkBSpline``
  of order 3): the image is first prefiltered to B-spline coefficients with the exact inverse of the sampled
  cubic B-spline under mirror boundary conditions, and the spline is then evaluated with ``2**N`` linear
  fetches (Sigg & Hadwiger, GPU Gems 2, ch. 20). It interpolates (passes through the samples) and is C2.
  Not ``grid_sample``'s ``bicubic``, which is 2D-only cubic convolution.

Padding: ``"border"`` clamps sampling coordinates to the grid ``[0, n-1]``; ``"zeros"`` returns 0 outside
(for ``"cubic"``: 0 wherever a coordinate lies outside ``[-0.5, n-0.5]``, ITK's inside-buffer test).

``monai.networks.blocks.Warp`` computes the same linear/nearest warp; it is not used directly because it warns
on every construction, caches its reference grid on the module and has no 3D cubic mode.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from regnet_zoo.core import _fast
from regnet_zoo.core.geometry import (  # noqa: F401  (re-exported: one definition, in core.geometry)
    ddf_physical_to_voxel,
    ddf_voxel_to_physical,
    physical_to_voxel,
    voxel_to_physical,
)
from regnet_zoo.core.tracing import as_size, size_max, size_tensor

__all__ = [
    "identity_grid",
    "sample_image",
    "warp_image",
    "warp_labels",
    "warp_points",
    "compose_ddf",
    "resize_ddf",
    "ddf_voxel_to_physical",
    "ddf_physical_to_voxel",
    "voxel_to_physical",
    "physical_to_voxel",
    "bspline_prefilter",
    "Warper",
]

_MODE_ALIASES = {
    "linear": "linear",
    "bilinear": "linear",
    "trilinear": "linear",
    "nearest": "nearest",
    "cubic": "cubic",
    "bicubic": "cubic",
    "tricubic": "cubic",
}
_PADDING_MODES = ("border", "zeros")


def _check_mode(mode: str) -> str:
    if mode not in _MODE_ALIASES:
        raise ValueError(f"unknown interpolation mode {mode!r}; expected 'linear', 'cubic' or 'nearest'")
    return _MODE_ALIASES[mode]


def _check_padding(padding_mode: str) -> str:
    if padding_mode not in _PADDING_MODES:
        raise ValueError(f"unknown padding_mode {padding_mode!r}; expected one of {_PADDING_MODES}")
    return padding_mode


def identity_grid(shape: Sequence[int], device=None, dtype: torch.dtype = torch.float32) -> Tensor:
    """Voxel coordinates of a grid of shape ``S``: ``(1, N, *S)``; channel ``i`` = index along axis ``i``

    ``shape`` is ``S`` (``(H, W)`` or ``(D, H, W)``).
    """
    # as_size: a traced size stays traced, so the grid follows the input's size in a TorchScript export
    axes = [torch.arange(as_size(n), device=device, dtype=dtype) for n in shape]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=0).unsqueeze(0)


def _broadcast_batch(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """Expand batch size 1 of ``a`` or ``b`` to the other's batch size."""
    if torch.jit.is_tracing():  # batch sizes are traced values: no Python branch, so an export broadcasts too
        batch = torch.maximum(torch.as_tensor(a.shape[0]), torch.as_tensor(b.shape[0]))
        return a.expand(batch, *a.shape[1:]), b.expand(batch, *b.shape[1:])
    if a.shape[0] == b.shape[0]:
        return a, b
    if a.shape[0] == 1:
        return a.expand(b.shape[0], *a.shape[1:]), b
    if b.shape[0] == 1:
        return a, b.expand(a.shape[0], *b.shape[1:])
    raise ValueError(f"batch sizes {a.shape[0]} and {b.shape[0]} do not match")


def _grid_sample(image: Tensor, coords: Tensor, mode: str, padding_mode: str) -> Tensor:
    """``grid_sample`` at voxel ``coords`` ``(B, N, *T)`` (array-axis order) -> ``(B, C, *T)``."""
    sizes = image.shape[2:]
    normalised = [coords[:, i] * (2.0 / size_max(n - 1, 1)) - 1.0 for i, n in enumerate(sizes)]
    # grid_sample wants the last dimension in (x, y[, z]) order, i.e. reversed array axes
    grid = torch.stack(normalised[::-1], dim=-1)
    return F.grid_sample(image, grid, mode=mode, padding_mode=padding_mode, align_corners=True)


@functools.lru_cache(maxsize=64)
def _bspline_prefilter_matrix(n: int) -> Tensor:
    """``(n, n)`` float64 matrix mapping samples to cubic B-spline coefficients (mirror boundaries)."""
    sampled = torch.zeros(n, n, dtype=torch.float64)
    if n == 1:
        return torch.ones(1, 1, dtype=torch.float64)
    idx = torch.arange(n)
    sampled[idx, idx] = 4.0 / 6.0
    sampled[idx[:-1], idx[:-1] + 1] = 1.0 / 6.0
    sampled[idx[1:], idx[1:] - 1] = 1.0 / 6.0
    # mirror extension c[-1] = c[1], c[n] = c[n-2] (whole-sample symmetric, as ITK)
    sampled[0, 1] = 2.0 / 6.0
    sampled[n - 1, n - 2] = 2.0 / 6.0
    return torch.linalg.inv(sampled)


def bspline_prefilter(image: Tensor) -> Tensor:
    """Cubic B-spline coefficients of ``image`` ``(B, C, *S)`` (mirror boundary), same shape.

    Exact: solves the (mirror-extended) interpolation system along each axis.
    """
    coeffs = image
    for axis in range(2, image.ndim):
        n = image.shape[axis]
        prefilter = _bspline_prefilter_matrix(n).to(device=image.device, dtype=image.dtype)
        coeffs = torch.movedim(torch.movedim(coeffs, axis, -1) @ prefilter.T, -1, axis)
    return coeffs


def _cubic_bspline_sample(image: Tensor, coords: Tensor, padding_mode: str) -> Tensor:
    """Cubic B-spline interpolation of ``image`` ``(B, C, *S)`` at voxel ``coords`` ``(B, N, *T)``."""
    sizes = image.shape[2:]
    spatial_dims = len(sizes)
    coeffs = bspline_prefilter(image)
    # mirror-pad by 2 so that the spline's support near the edges sees the mirrored coefficients
    pad_mode = "reflect" if min(sizes) > 2 else "replicate"
    coeffs = F.pad(coeffs, [2] * (2 * spatial_dims), mode=pad_mode)
    upper = torch.tensor([n - 1 for n in sizes], device=coords.device, dtype=coords.dtype)
    upper = upper.view(1, spatial_dims, *([1] * (coords.ndim - 2)))
    if padding_mode == "border":
        inside = None
        coords = torch.minimum(torch.clamp(coords, min=0.0), upper)
    else:
        inside = ((coords >= -0.5) & (coords <= upper + 0.5)).all(dim=1, keepdim=True)
    # per axis: two linear fetches at h0, h1 with weights g0, g1 reproduce the 4-tap cubic B-spline
    weights, positions = [], []
    for i in range(spatial_dims):
        x = coords[:, i : i + 1]
        base = torch.floor(x).detach()
        t = x - base
        w0 = (1.0 - t) ** 3 / 6.0
        w1 = (3.0 * t**3 - 6.0 * t**2 + 4.0) / 6.0
        w2 = (-3.0 * t**3 + 3.0 * t**2 + 3.0 * t + 1.0) / 6.0
        w3 = t**3 / 6.0
        g0, g1 = w0 + w1, w2 + w3
        weights.append((g0, g1))
        positions.append((base - 1.0 + w1 / g0 + 2.0, base + 1.0 + w3 / g1 + 2.0))  # +2: padding offset
    out = None
    for corner in itertools.product((0, 1), repeat=spatial_dims):
        fetch_at = torch.cat([positions[i][c] for i, c in enumerate(corner)], dim=1)
        weight = functools.reduce(torch.mul, [weights[i][c] for i, c in enumerate(corner)])
        term = weight * _grid_sample(coeffs, fetch_at, "bilinear", "border")
        out = term if out is None else out + term
    if inside is not None:
        out = out * inside.to(out.dtype)
    return out


def sample_image(image: Tensor, coords: Tensor, mode: str = "linear", padding_mode: str = "border") -> Tensor:
    """Interpolate ``image`` ``(B, C, *S)`` at voxel coordinates ``coords`` ``(B, N, *T)`` -> ``(B, C, *T)``.

    ``coords[:, i]`` is the (continuous) index along array axis ``i`` of ``image``; ``T`` is any grid with
    ``len(T) == N``. A batch size of 1 in either argument broadcasts. Integer images are sampled in float and,
    for ``mode="nearest"``, cast back to their dtype.
    """
    return _sample(image, coords, mode, padding_mode)


def _sample(image: Tensor, coords: Tensor, mode: str, padding_mode: str, relative: bool = False) -> Tensor:
    """:func:`sample_image`; with ``relative=True`` ``coords`` is a displacement from the identity of ``S``.

    Linear / nearest on CPU float tensors run the fast kernels of ``core._fast`` (no coordinate grid is
    built); everything else, and the fallback, is ``grid_sample`` / the cubic B-spline code.
    """
    mode, padding_mode = _check_mode(mode), _check_padding(padding_mode)
    spatial_dims = image.ndim - 2
    if spatial_dims not in (2, 3):
        raise ValueError(f"image must be (B, C, H, W) or (B, C, D, H, W), got shape {tuple(image.shape)}")
    if coords.ndim != image.ndim or coords.shape[1] != spatial_dims:
        raise ValueError(
            f"coords must be (B, {spatial_dims}, *T) with {spatial_dims} spatial dims for a {spatial_dims}D "
            f"image, got shape {tuple(coords.shape)}"
        )
    input_dtype = image.dtype
    if not image.is_floating_point():
        image = image.to(coords.dtype if coords.is_floating_point() else torch.float32)
    coords = coords.to(image.dtype)
    if mode != "cubic" and _fast.applies(image, coords):
        out = _fast.sample(image, coords, mode, padding_mode, relative=relative)
    else:
        if relative:
            coords = identity_grid(coords.shape[2:], device=coords.device, dtype=coords.dtype) + coords
        image, coords = _broadcast_batch(image, coords)
        if mode == "cubic":
            out = _cubic_bspline_sample(image, coords, padding_mode)
        else:
            out = _grid_sample(image, coords, "bilinear" if mode == "linear" else "nearest", padding_mode)
    if mode == "nearest" and not input_dtype.is_floating_point:
        out = torch.round(out).to(input_dtype)
    return out


def _check_ddf(ddf: Tensor, spatial_shape: Sequence[int] | None = None) -> None:
    spatial_dims = ddf.ndim - 2
    if spatial_dims not in (2, 3) or ddf.shape[1] != spatial_dims:
        raise ValueError(f"ddf must be (B, N, *S) with N = len(S) in (2, 3), got shape {tuple(ddf.shape)}")
    if spatial_shape is not None and tuple(ddf.shape[2:]) != tuple(spatial_shape):
        raise ValueError(
            f"ddf spatial shape {tuple(ddf.shape[2:])} does not match the image's {tuple(spatial_shape)}"
        )


def warp_image(image: Tensor, ddf: Tensor, mode: str = "linear", padding_mode: str = "border") -> Tensor:
    """``warped(x) = image(x + ddf(x))``: ``image`` ``(B, C, *S)``, ``ddf`` ``(B, N, *S)`` -> ``(B, C, *S)``.

    ``mode``: ``"linear"``, ``"cubic"`` (cubic B-spline, 2D and 3D) or ``"nearest"``;
    ``padding_mode``: ``"border"`` or ``"zeros"`` (see module docstring).
    """
    _check_ddf(ddf, image.shape[2:])
    return _sample(image, ddf, mode, padding_mode, relative=True)


def warp_labels(
    labels: Tensor,
    ddf: Tensor,
    method: str = "nearest",
    num_classes: int | None = None,
    padding_mode: str = "border",
    chunk_size: int = 8,
) -> Tensor:
    """Warp an integer label map ``labels`` ``(B, 1, *S)`` by ``ddf`` ``(B, N, *S)`` -> int64 ``(B, 1, *S)``.

    ``method="nearest"``: nearest-neighbour lookup. ``method="onehot"``: each label's indicator is warped
    linearly and the label with the largest interpolated value wins (smoother boundaries). The one-hot classes
    are the values present in ``labels`` (any integers, not necessarily contiguous), or ``0 .. num_classes-1``
    when ``num_classes`` is given. Classes are processed ``chunk_size`` at a time to bound memory.
    With the default ``padding_mode="border"`` no value absent from ``labels`` can appear.
    """
    if labels.ndim != ddf.ndim or labels.shape[1] != 1:
        raise ValueError(
            f"labels must be (B, 1, *S) matching ddf {tuple(ddf.shape)}, got {tuple(labels.shape)}"
        )
    _check_ddf(ddf, labels.shape[2:])
    if labels.is_floating_point():
        if not torch.equal(labels, torch.round(labels)):
            raise ValueError("labels must be integer-valued")
        labels = labels.round()
    labels = labels.long()
    dtype = ddf.dtype if ddf.is_floating_point() else torch.float32
    ddf = ddf.to(dtype)
    if method == "nearest":
        # float32 represents integers exactly up to 2**24, enough for any label map
        return _sample(labels.to(dtype), ddf, "nearest", padding_mode, relative=True).round().long()
    if method != "onehot":
        raise ValueError(f"unknown label warping method {method!r}; expected 'nearest' or 'onehot'")
    if num_classes is None:
        values, index = torch.unique(labels, return_inverse=True)
    else:
        if labels.min() < 0 or labels.max() >= num_classes:
            raise ValueError(f"labels must lie in 0 .. {num_classes - 1} when num_classes={num_classes}")
        values, index = torch.arange(num_classes, device=labels.device), labels
    best_score, best_index = None, None
    for start in range(0, len(values), chunk_size):
        classes = torch.arange(start, min(start + chunk_size, len(values)), device=labels.device)
        onehot = (index == classes.view(1, -1, *([1] * (labels.ndim - 2)))).to(dtype)
        score, arg = _sample(onehot, ddf, "linear", padding_mode, relative=True).max(dim=1, keepdim=True)
        arg = arg + start
        if best_score is None:
            best_score, best_index = score, arg
        else:
            better = score > best_score
            best_score = torch.where(better, score, best_score)
            best_index = torch.where(better, arg, best_index)
    return values[best_index]


def warp_points(points: Tensor, ddf: Tensor) -> Tensor:
    """Map points through the DDF: ``points + ddf(points)``; ``points`` ``(B, K, N)`` voxel coordinates of
    the ddf's (fixed) grid, ``ddf`` ``(B, N, *S)`` sampled linearly (border-clamped) -> ``(B, K, N)``.

    With ``ddf`` from registering fixed to moving, this maps fixed landmarks into the moving image.
    """
    _check_ddf(ddf)
    spatial_dims = ddf.ndim - 2
    if points.ndim != 3 or points.shape[-1] != spatial_dims:
        raise ValueError(f"points must be (B, K, {spatial_dims}), got shape {tuple(points.shape)}")
    points, ddf = _broadcast_batch(points.to(ddf.dtype), ddf)
    coords = points.transpose(1, 2).reshape(*points.shape[:1], spatial_dims, -1, *([1] * (spatial_dims - 1)))
    displacement = sample_image(ddf, coords, "linear", "border")
    return points + displacement.reshape(points.shape[0], spatial_dims, -1).transpose(1, 2)


def compose_ddf(first: Tensor, second: Tensor, mode: str = "linear") -> Tensor:
    """DDF of "warp by ``first``, then warp the result by ``second``": ``second + first∘(id + second)``.

    ``warp_image(warp_image(m, first), second) ≈ warp_image(m, compose_ddf(first, second))``;
    as point maps ``x -> x + result(x)`` equals ``phi_first(phi_second(x))``. Shapes ``(B, N, *S)``.
    ``first`` is sampled with ``mode`` and border padding.
    """
    _check_ddf(first)
    _check_ddf(second, first.shape[2:])
    mode = _check_mode(mode)
    if mode != "cubic" and first.dtype == second.dtype and _fast.applies(first, second):
        return _fast.sample(first, second, mode, "border", relative=True, residual=True)  # one fused pass
    return second + _sample(first, second, mode, "border", relative=True)


def resize_ddf(ddf: Tensor, size: Sequence[int], mode: str = "linear") -> Tensor:
    """Resample ``ddf`` ``(B, N, *S)`` to spatial ``size`` and rescale it -> ``(B, N, *size)``.

    Both grids span the same physical extent with corner voxels aligned (``align_corners=True``), so new
    index ``j`` sits at old index ``j * (old-1)/(new-1)`` and the displacement along axis ``i`` is multiplied
    by ``(new_i-1)/(old_i-1)`` (1 where either size is 1). The physical map is unchanged (exactly, for
    fields that are linear and ``mode="linear"``).
    """
    _check_ddf(ddf)
    size = tuple(as_size(s) for s in size)  # traced sizes stay traced (TorchScript export at any size)
    old = ddf.shape[2:]
    if len(size) != len(old):
        raise ValueError(f"size {size} must have {len(old)} entries")
    axes = [
        torch.arange(n, device=ddf.device, dtype=ddf.dtype) * ((o - 1) / (n - 1) if n > 1 else 0.0)
        for n, o in zip(size, old, strict=True)
    ]
    coords = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=0).unsqueeze(0)
    resampled = sample_image(ddf, coords, mode=mode, padding_mode="border")
    # float64 sizes: the same numbers as Python's float division, traced or not
    new_sizes, old_sizes = size_tensor(size, ddf.device), size_tensor(old, ddf.device)
    scale = torch.where((new_sizes > 1) & (old_sizes > 1), (new_sizes - 1) / (old_sizes - 1), 1.0)
    return resampled * scale.to(ddf.dtype).view(1, -1, *([1] * len(size)))


class Warper(nn.Module):
    """``nn.Module`` around ``warp_image``: ``forward(image (B, C, *S), ddf (B, N, *S)) -> (B, C, *S)``."""

    def __init__(self, mode: str = "linear", padding_mode: str = "border") -> None:
        super().__init__()
        self.mode = _check_mode(mode)
        self.padding_mode = _check_padding(padding_mode)

    def forward(self, image: Tensor, ddf: Tensor) -> Tensor:
        return warp_image(image, ddf, mode=self.mode, padding_mode=self.padding_mode)

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, padding_mode={self.padding_mode!r}"
