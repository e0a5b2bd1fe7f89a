"""Affine (and rigid) pre-alignment in physical space, in torch (CPU and GPU, 2D and 3D).

:func:`affine_register` returns a ``(N+1, N+1)`` float64 matrix ``T`` in physical (world) coordinates: for a
fixed physical point ``p``, ``T @ p`` is the corresponding moving physical point, so that
``warped(p) = moving(T p) ~ fixed(p)``. The world frame is whatever the voxel->world matrices map into
(RAS for NIfTI / MONAI ``MetaTensor.affine``); ``T`` is in the same frame.

Method (one pass per pyramid level, coarse to fine):

- intensities are rescaled robustly to [0, 1] (0.5 / 99.5 percentiles, clipped);
- the pyramid is built in *physical* space: level ``l`` has a target spacing ``t0 * 2**l``, each image is
  block-averaged by an integer factor per axis towards it (so anisotropic voxels and grids of different sizes
  meet at a common resolution); ``t0`` is the fixed image's finest spacing, coarsened where needed so that a
  level holds at most ``max_voxels`` voxels;
- ``T(p) = M (p - c) + c + t`` with ``c`` the fixed image's centre (of mass for ``init="moments"``), ``t``
  initialised from the centres of both images, ``M = R(theta) diag(exp(s)) (I + U)`` (``U`` strictly upper
  triangular shears): 12 / 6 degrees of freedom for "affine", 6 / 3 for "rigid" (rotation and translation);
- every parameter is expressed in mm at the fixed image's RMS radius (rotation angle, log-scale and shear are
  divided by the radius), so that one optimiser step moves points by comparable distances whatever the
  parameter; the step size of each level is a fraction of the level's spacing;
- the moving image is sampled with ``F.grid_sample`` on the fixed level grid through one composed matrix
  (``F.affine_grid``); the similarity is weighted by the optional fixed mask and by the overlap (samples that
  fall outside the moving image do not count);
- Adam (default) or L-BFGS. There is no random sampling, so results are deterministic for a given device.

Similarities (all "lower is better" internally): ``"lncc"`` (local squared NCC, box window), ``"ncc"``
(global NCC), ``"mi"`` (mutual information with Gaussian Parzen windows, for multi-modal pairs) and ``"mse"``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from regnet_zoo.core.spatial import identity_grid, sample_image
from regnet_zoo.errors import RegistrationInputError

__all__ = ["affine_register", "affine_voxel_map", "resample_affine", "SIMILARITIES", "TRANSFORMS"]

SIMILARITIES = ("lncc", "ncc", "mi", "mse")
TRANSFORMS = ("rigid", "affine")
INITIALISATIONS = ("moments", "geometry", "identity")


# ----------------------------------------------------------------------------------------------------------
# input checks and small geometry helpers (private: the generic geometry lives in core/geometry.py)
# ----------------------------------------------------------------------------------------------------------
def _as_image(image: Tensor, spatial_dims: int, name: str) -> Tensor:
    """``(C, *S)`` or ``(1, C, *S)`` (``len(S) = spatial_dims``) -> plain float32 ``(1, C, *S)``."""
    if not isinstance(image, Tensor):
        image = torch.as_tensor(np.asarray(image))
    image = image.as_subclass(Tensor).detach()
    if image.ndim == spatial_dims + 1:
        image = image.unsqueeze(0)
    if image.ndim != spatial_dims + 2 or image.shape[0] != 1:
        raise RegistrationInputError(
            f"{name}: expected (C, *S) or (1, C, *S) with {spatial_dims} spatial dims (from the affine), "
            f"got {tuple(image.shape)}"
        )
    image = image.float()
    if not torch.isfinite(image.sum(dtype=torch.float64)):  # any NaN / inf makes the sum non-finite
        raise RegistrationInputError(f"{name}: image contains NaN or inf")
    return image


def _as_matrix(affine, spatial_dims: int, name: str, device) -> Tensor:
    matrix = affine.as_subclass(Tensor) if isinstance(affine, Tensor) else torch.as_tensor(np.asarray(affine))
    matrix = matrix.detach().to(device=device, dtype=torch.float64)
    if matrix.shape != (spatial_dims + 1, spatial_dims + 1):
        raise RegistrationInputError(
            f"{name}: expected a ({spatial_dims + 1}, {spatial_dims + 1}) voxel->world matrix, "
            f"got {tuple(matrix.shape)}"
        )
    linear = matrix[:spatial_dims, :spatial_dims]
    if not torch.isfinite(matrix).all() or abs(float(torch.linalg.det(linear))) < 1e-12:
        raise RegistrationInputError(f"{name}: the voxel->world matrix is singular or not finite")
    return matrix


def _unembed(affine) -> Tensor:
    """A 2D voxel->world matrix embedded in 4x4 (unit third axis) -> 3x3; anything else is returned as is."""
    m = affine.as_subclass(Tensor) if isinstance(affine, Tensor) else torch.as_tensor(np.asarray(affine))
    if m.shape != (4, 4):
        return m
    m = m.to(torch.float64)
    keep = [0, 1, 3]
    return m[keep][:, keep]


def _spacing(matrix: Tensor) -> Tensor:
    """Voxel size per array axis: column norms of the linear part."""
    n = matrix.shape[0] - 1
    return torch.linalg.norm(matrix[:n, :n], dim=0)


def _homogeneous(linear: Tensor, offset: Tensor) -> Tensor:
    n = linear.shape[0]
    out = torch.eye(n + 1, dtype=linear.dtype, device=linear.device)
    out = torch.cat([torch.cat([linear, offset.reshape(n, 1)], dim=1), out[n:]], dim=0)
    return out


def _robust_range(image: Tensor) -> tuple[Tensor, Tensor]:
    """0.5 / 99.5 percentiles per channel (of at most ~200k voxels), each ``(1, C, 1, ...)``."""
    flat = image.reshape(image.shape[1], -1)
    sample = flat[:, :: max(1, flat.shape[1] // 200_000)]
    lo = torch.quantile(sample, 0.005, dim=1).reshape(1, -1, *([1] * (image.ndim - 2)))
    hi = torch.quantile(sample, 0.995, dim=1).reshape(lo.shape)
    return lo, hi


def _rescale(image: Tensor, lo: Tensor, hi: Tensor) -> Tensor:
    return ((image - lo) / (hi - lo).clamp_min(1e-8)).clamp(0.0, 1.0)


# ----------------------------------------------------------------------------------------------------------
# physical pyramid
# ----------------------------------------------------------------------------------------------------------
def _pool(image: Tensor, matrix: Tensor, factors: Sequence[int]) -> tuple[Tensor, Tensor]:
    """Block-average by integer ``factors`` per axis; the voxel->world matrix of the pooled grid."""
    if all(f == 1 for f in factors):
        return image, matrix
    pool = F.avg_pool3d if image.ndim == 5 else F.avg_pool2d
    pooled = pool(image, kernel_size=tuple(factors), stride=tuple(factors))
    f = torch.tensor(factors, dtype=torch.float64, device=matrix.device)
    # pooled voxel j covers voxels j*f .. j*f+f-1: its centre is at j*f + (f-1)/2
    return pooled, matrix @ _homogeneous(torch.diag(f), (f - 1) / 2)


def _factors(spacing: Tensor, shape: Sequence[int], target: float, min_size: int) -> list[int]:
    factors = []
    for s, n in zip(spacing.tolist(), shape, strict=True):
        f = max(1, int(round(target / s)))
        f = min(f, max(1, n // min_size))  # keep at least ``min_size`` voxels per axis
        factors.append(f)
    return factors


# ----------------------------------------------------------------------------------------------------------
# similarities (weighted; lower is better)
# ----------------------------------------------------------------------------------------------------------
def _wmean(x: Tensor, weight: Tensor) -> Tensor:
    return (x * weight).sum() / (weight.sum() * x.shape[1]).clamp_min(1e-8)


def _box(x: Tensor, kernel_size: int) -> Tensor:
    """Separable box mean over ``kernel_size`` voxels per axis (windows cut at the border), by running sums
    (cumsum): a few times faster than ``avg_pool`` with stride 1 on the CPU, forward and backward."""
    half = kernel_size // 2
    for axis in range(2, x.ndim):
        n = x.shape[axis]
        pad = [0, 0] * (x.ndim - 1 - axis) + [half + 1, half]
        c = torch.cumsum(F.pad(x, pad), dim=axis)
        total = c.narrow(axis, kernel_size, n) - c.narrow(axis, 0, n)
        idx = torch.arange(n, device=x.device)
        count = (torch.clamp(idx + half, max=n - 1) - torch.clamp(idx - half, min=0) + 1).to(x.dtype)
        x = total / count.reshape(-1, *([1] * (x.ndim - 1 - axis)))
    return x


def _fixed_stats(fixed: Tensor, weight: Tensor, kernel_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """Local mean and variance of the fixed image and the LNCC voxel weight (computed once per level).

    The weight ``var_f / (var_f + mean var_f)`` keeps LNCC where the *fixed* image has local structure: flat
    background then cannot reward moving structure into it, which otherwise biases the affine towards
    magnifying the moving image.
    """
    mean = _box(fixed, kernel_size)
    var = (_box(fixed * fixed, kernel_size) - mean * mean).clamp_min(0.0)
    structure = var.mean(1, keepdim=True)
    structure = structure / (structure + _wmean(structure, weight)).clamp_min(1e-12)
    return mean, var, structure


def _lncc(fixed: Tensor, warped: Tensor, weight: Tensor, kernel_size: int, stats) -> Tensor:
    """Negative local squared NCC (as VoxelMorph / ANTs CC) averaged with the fixed-structure weight."""
    mean_f, var_f, structure = stats
    c = fixed.shape[1]
    local = _box(torch.cat([warped, warped * warped, fixed * warped], dim=1), kernel_size)
    mean_w, sq_w, cross = local[:, :c], local[:, c : 2 * c], local[:, 2 * c :]
    cross = cross - mean_f * mean_w
    var_w = (sq_w - mean_w * mean_w).clamp_min(0.0)
    cc = cross * cross / (var_f * var_w + 1e-10)
    return -_wmean(cc, weight * structure)


def _ncc(fixed: Tensor, warped: Tensor, weight: Tensor) -> Tensor:
    total = weight.sum().clamp_min(1e-8)
    dims = tuple(range(2, fixed.ndim))
    mf = (fixed * weight).sum(dims, keepdim=True) / total
    mw = (warped * weight).sum(dims, keepdim=True) / total
    df, dw = fixed - mf, warped - mw
    cross = (df * dw * weight).sum(dims)
    norm = torch.sqrt((df * df * weight).sum(dims) * (dw * dw * weight).sum(dims) + 1e-10)
    return -(cross / norm).mean()


def _mi(fixed: Tensor, warped: Tensor, weight: Tensor, bins: int) -> Tensor:
    """Negative mutual information from a Parzen joint histogram as Mattes et al. (ITK's Mattes MI): the fixed
    intensity in [0, 1] falls in one of ``bins`` bins, the warped intensity spreads over 4 neighbouring bins
    with cubic B-spline weights (smooth in the transform parameters); sparse, ``O(K)`` per channel."""
    loss = fixed.new_zeros(())
    w = weight.reshape(-1)
    total = w.sum().clamp_min(1e-8)
    cols = bins + 3  # moving bins -1 .. bins + 1
    for c in range(fixed.shape[1]):
        bin_f = (fixed[0, c].reshape(-1) * bins).long().clamp(0, bins - 1)
        u = warped[0, c].reshape(-1).clamp(0.0, 1.0) * (bins - 1)
        base = torch.floor(u).detach()
        t = u - base
        spline = (
            (1 - t) ** 3 / 6,
            (3 * t**3 - 6 * t**2 + 4) / 6,
            (-3 * t**3 + 3 * t**2 + 3 * t + 1) / 6,
            t**3 / 6,
        )
        flat = bin_f * cols + base.long()  # column of bin ``base - 1`` after the +1 offset
        index = torch.cat([flat + k for k in range(4)])
        values = torch.cat([s * w for s in spline])
        joint = fixed.new_zeros(bins * cols).index_add(0, index, values).reshape(bins, cols) / total
        marg_f, marg_w = joint.sum(1, keepdim=True), joint.sum(0, keepdim=True)
        mi = (joint * (torch.log(joint + 1e-10) - torch.log(marg_f @ marg_w + 1e-10))).sum()
        loss = loss - mi
    return loss / fixed.shape[1]


def _similarity(name: str, fixed: Tensor, warped: Tensor, weight: Tensor, kernel_size: int, bins: int, stats):
    if name == "lncc":
        return _lncc(fixed, warped, weight, kernel_size, stats)
    if name == "ncc":
        return _ncc(fixed, warped, weight)
    if name == "mi":
        return _mi(fixed, warped, weight, bins)
    return _wmean((fixed - warped) ** 2, weight)


# ----------------------------------------------------------------------------------------------------------
# parameterisation
# ----------------------------------------------------------------------------------------------------------
def _rotation(angles: Tensor, spatial_dims: int) -> Tensor:
    """Rotation matrix from an angle (2D) or a rotation vector (3D, Rodrigues' formula)."""
    if spatial_dims == 2:
        c, s = torch.cos(angles[0]), torch.sin(angles[0])
        return torch.stack([torch.stack([c, -s]), torch.stack([s, c])])
    theta2 = (angles * angles).sum()
    zero = angles.new_zeros(())
    x, y, z = angles
    skew = torch.stack([torch.stack([zero, -z, y]), torch.stack([z, zero, -x]), torch.stack([-y, x, zero])])
    # sin(t)/t and (1 - cos(t))/t^2 by their Taylor series near 0 (stable, differentiable at the identity)
    if float(theta2.detach()) < 1e-8:
        a, b = 1.0 - theta2 / 6.0, 0.5 - theta2 / 24.0
    else:
        theta = torch.sqrt(theta2)
        a, b = torch.sin(theta) / theta, (1.0 - torch.cos(theta)) / theta2
    return torch.eye(3, dtype=angles.dtype, device=angles.device) + a * skew + b * (skew @ skew)


def _n_params(transform: str, spatial_dims: int) -> int:
    rot = 1 if spatial_dims == 2 else 3
    if transform == "rigid":
        return rot + spatial_dims
    return rot + spatial_dims + spatial_dims * (spatial_dims - 1) // 2 + spatial_dims


def _matrix(params: Tensor, transform: str, spatial_dims: int, radius: float, centre: Tensor) -> Tensor:
    """Homogeneous ``T(p) = M (p - c) + c + t`` from the scaled parameters (all in mm at ``radius``)."""
    n = spatial_dims
    rot = 1 if n == 2 else 3
    linear = _rotation(params[:rot] / radius, n)
    t = params[rot : rot + n]
    if transform == "affine":
        n_shear = n * (n - 1) // 2
        shear = params[rot + n : rot + n + n_shear] / radius
        log_scale = params[rot + n + n_shear :] / radius
        upper = torch.triu_indices(n, n, offset=1)
        shear_matrix = torch.eye(n, dtype=params.dtype, device=params.device).index_put(
            (upper[0], upper[1]), shear
        )
        linear = linear @ torch.diag(torch.exp(log_scale)) @ shear_matrix
    return _homogeneous(linear, centre + t - linear @ centre)


def _centre(image: Tensor, matrix: Tensor, mode: str) -> Tensor:
    """Physical centre: intensity centre of mass (``"moments"``) or the grid's geometric centre."""
    shape = image.shape[2:]
    n = len(shape)
    if mode == "moments":
        mass = image.sum(1)[0].double()
        total = mass.sum()
        if total > 0:
            idx = []
            for axis in range(n):
                other = tuple(a for a in range(n) if a != axis)
                profile = mass.sum(other) if other else mass
                coords = torch.arange(shape[axis], dtype=torch.float64, device=image.device)
                idx.append((profile * coords).sum() / total)
            voxel = torch.stack(idx)
            return matrix[:n, :n] @ voxel + matrix[:n, n]
    voxel = torch.tensor([(s - 1) / 2 for s in shape], dtype=torch.float64, device=image.device)
    return matrix[:n, :n] @ voxel + matrix[:n, n]


def _grid_to_normalised(shape: Sequence[int], device) -> tuple[Tensor, Tensor]:
    """Homogeneous matrices voxel index (array order) <-> ``grid_sample`` coordinates (reversed order)."""
    n = len(shape)
    half = torch.tensor([max(s - 1, 1) / 2 for s in shape], dtype=torch.float64, device=device)
    reverse = torch.eye(n, dtype=torch.float64, device=device).flip(0)
    # normalised u (x, y[, z]) -> index: idx = half * (reverse u + 1)
    to_index = _homogeneous(torch.diag(half) @ reverse, half)
    return to_index, torch.linalg.inv(to_index)


# ----------------------------------------------------------------------------------------------------------
# registration
# ----------------------------------------------------------------------------------------------------------
def _per_level(value, levels: int, name: str, kind=int) -> list:
    values = [kind(value)] * levels if isinstance(value, int | float) else [kind(v) for v in value]
    if len(values) != levels or any(v < 0 for v in values):
        raise RegistrationInputError(
            f"{name}: expected {levels} non-negative values (coarse to fine), got {value}"
        )
    return values


def affine_register(
    fixed: Tensor,
    moving: Tensor,
    fixed_affine,
    moving_affine,
    *,
    transform: str = "affine",
    similarity: str = "lncc",
    levels: int = 3,
    iterations: int | Sequence[int] = (30, 15, 8),
    learning_rate: float | Sequence[float] = 0.1,
    optimizer: str = "adam",
    init: str = "moments",
    fixed_mask: Tensor | None = None,
    max_voxels: int | None = 8192,
    kernel_size: int = 5,
    bins: int = 32,
    min_size: int = 8,
) -> Tensor:
    """Affine or rigid registration of ``moving`` to ``fixed`` in physical space -> ``(N+1, N+1)`` float64.

    fixed, moving: ``(C, *S)`` or ``(1, C, *S)``, any intensity range, their own grids.
    fixed_affine, moving_affine: ``(N+1, N+1)`` voxel->world matrices (e.g. ``MetaTensor.affine``, RAS); a
    2D ``(C, H, W)`` image may come with the 4x4 embedding of ``regnet_zoo.data.io`` (T is then 3x3).
    transform: "rigid" or "affine". similarity: "lncc", "ncc", "mi" (multi-modal) or "mse".
    levels / iterations: pyramid levels and optimiser steps per level (coarse to fine; an int for all).
    learning_rate: step size as a fraction of each level's spacing (Adam; L-BFGS uses it as its ``lr`` / 10).
    init: "moments" (centres of mass), "geometry" (grid centres) or "identity".
    fixed_mask: optional ``(1, *S)`` / ``(*S)`` / ``(1, 1, *S)`` weights on the fixed grid.
    max_voxels: cap on the voxels of a level's fixed grid (finest level coarsened beyond it; None: off).
    Returns ``T`` (on the fixed image's device) with ``warped(p) = moving(T p)`` for world points ``p``.
    """
    if transform not in TRANSFORMS:
        raise RegistrationInputError(f"transform must be one of {TRANSFORMS}, got {transform!r}")
    if similarity not in SIMILARITIES:
        raise RegistrationInputError(f"similarity must be one of {SIMILARITIES}, got {similarity!r}")
    if init not in INITIALISATIONS:
        raise RegistrationInputError(f"init must be one of {INITIALISATIONS}, got {init!r}")
    if optimizer not in ("adam", "lbfgs"):
        raise RegistrationInputError(f"optimizer must be 'adam' or 'lbfgs', got {optimizer!r}")
    if levels < 1:
        raise RegistrationInputError(f"levels must be >= 1, got {levels}")
    iterations = _per_level(iterations, levels, "iterations")
    steps = _per_level(learning_rate, levels, "learning_rate", float)

    n = int(np.shape(fixed_affine)[-1]) - 1
    if n not in (2, 3):
        raise RegistrationInputError(f"fixed_affine: expected a 3x3 (2D) or 4x4 (3D) matrix, got {n + 1}")
    if n == 3 and np.ndim(fixed) == 3:  # a 2D (C, H, W) image with the 4x4 embedding of the project's loaders
        n = 2
        fixed_affine, moving_affine = _unembed(fixed_affine), _unembed(moving_affine)
    fixed_img = _as_image(fixed, n, "fixed")
    device = fixed_img.device
    moving_img = _as_image(moving, n, "moving").to(device)
    if moving_img.shape[1] != fixed_img.shape[1]:
        raise RegistrationInputError(
            f"fixed {tuple(fixed_img.shape)} and moving {tuple(moving_img.shape)} need the same channels"
        )
    a_fixed = _as_matrix(fixed_affine, n, "fixed_affine", device)
    a_moving = _as_matrix(moving_affine, n, "moving_affine", device)
    weight_full = None
    if fixed_mask is not None:
        mask = torch.as_tensor(fixed_mask).as_subclass(Tensor).to(device=device, dtype=torch.float32)
        mask = mask.reshape(1, 1, *mask.shape[-n:])
        if mask.shape[2:] != fixed_img.shape[2:]:
            raise RegistrationInputError(
                f"fixed_mask {tuple(mask.shape[2:])} must be on the fixed grid {tuple(fixed_img.shape[2:])}"
            )
        weight_full = (mask > 0).float()

    spacing_f = _spacing(a_fixed)
    finest = float(spacing_f.min())
    if max_voxels:
        extent = float(torch.prod(spacing_f * torch.tensor(fixed_img.shape[2:], device=device)))
        finest = max(finest, (extent / max_voxels) ** (1.0 / n))

    # the pyramid on the raw intensities, finest level first, each level block-averaged from the one below
    pyramid = []
    f_img, f_mat, m_img, m_mat, weight = fixed_img, a_fixed, moving_img, a_moving, weight_full
    for level in range(levels):
        target = finest * 2**level
        f_factors = _factors(_spacing(f_mat), f_img.shape[2:], target, min_size)
        weight = None if weight is None else _pool(weight, f_mat, f_factors)[0]
        f_img, f_mat = _pool(f_img, f_mat, f_factors)
        m_img, m_mat = _pool(m_img, m_mat, _factors(_spacing(m_mat), m_img.shape[2:], target, min_size))
        ones = torch.ones_like(f_img[:, :1])
        pyramid.append([f_img, f_mat, m_img, m_mat, ones if weight is None else weight])
    # intensities mapped to [0, 1] with the finest level's robust range, the same map for every level
    f_range, m_range = _robust_range(pyramid[0][0]), _robust_range(pyramid[0][2])
    for entry in pyramid:
        entry[0], entry[2] = _rescale(entry[0], *f_range), _rescale(entry[2], *m_range)

    f_img, f_mat, m_img, m_mat, weight = pyramid[0]
    centre = _centre(f_img * weight, f_mat, init if init != "identity" else "geometry")
    offset = torch.zeros(n, dtype=torch.float64, device=device)
    if init != "identity":
        offset = _centre(m_img, m_mat, init) - _centre(f_img * weight, f_mat, init)
    params = torch.zeros(_n_params(transform, n), dtype=torch.float64, device=device)
    rot = 1 if n == 2 else 3
    params[rot : rot + n] = offset
    # RMS distance of the finest level's fixed grid from the centre: turns angles / log-scales into mm
    grid = identity_grid(f_img.shape[2:], device=device, dtype=torch.float64)[0].reshape(n, -1)
    points = f_mat[:n, :n] @ grid + f_mat[:n, n : n + 1]
    radius = float(torch.sqrt(((points - centre[:, None]) ** 2).sum(0).mean()).clamp_min(1e-3))
    for level in reversed(range(levels)):
        f_img, f_mat, m_img, m_mat, weight = pyramid[level]
        if iterations[level] == 0:
            continue
        f_to_index, _ = _grid_to_normalised(f_img.shape[2:], device)
        _, m_from_index = _grid_to_normalised(m_img.shape[2:], device)
        left = m_from_index @ torch.linalg.inv(m_mat)
        right = f_mat @ f_to_index
        size = (1, m_img.shape[1], *f_img.shape[2:])
        level_spacing = float(_spacing(f_mat).max())
        stats = _fixed_stats(f_img, weight, kernel_size) if similarity == "lncc" else None

        def loss_fn(p: Tensor, f_img=f_img, m_img=m_img, weight=weight, left=left, right=right, size=size,
                    stats=stats):
            theta = (left @ _matrix(p, transform, n, radius, centre) @ right)[:n].float()
            grid = F.affine_grid(theta[None], list(size), align_corners=True)
            warped = F.grid_sample(m_img, grid, mode="bilinear", padding_mode="border", align_corners=True)
            inside = (grid.detach().abs() <= 1.0).all(dim=-1)[:, None].float()
            return _similarity(similarity, f_img, warped, weight * inside, kernel_size, bins, stats)

        params = _optimise(loss_fn, params, optimizer, iterations[level], steps[level] * level_spacing)
    return _matrix(params.detach(), transform, n, radius, centre)


def _optimise(loss_fn, params: Tensor, optimizer: str, iterations: int, step: float) -> Tensor:
    params = params.detach().clone().requires_grad_(True)
    if optimizer == "lbfgs":
        opt = torch.optim.LBFGS([params], lr=1.0, max_iter=iterations, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = loss_fn(params)
            loss.backward()
            return loss

        opt.step(closure)
        return params.detach()
    # Adam written out: ``torch.optim`` imports torch._dynamo on first use (seconds), more than a whole run
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    m1, m2 = torch.zeros_like(params), torch.zeros_like(params)
    for i in range(iterations):
        loss = loss_fn(params)
        (grad,) = torch.autograd.grad(loss, params)
        m1.mul_(beta1).add_(grad, alpha=1 - beta1)
        m2.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        # cosine decay to 10 % of the step: coarse moves first, then settle
        lr = step * (0.1 + 0.45 * (1 + math.cos(math.pi * i / max(iterations, 1))))
        m1_hat, m2_hat = m1 / (1 - beta1 ** (i + 1)), m2 / (1 - beta2 ** (i + 1))
        with torch.no_grad():
            params -= lr * m1_hat / (m2_hat.sqrt() + eps)
    return params.detach()


# ----------------------------------------------------------------------------------------------------------
# using the result
# ----------------------------------------------------------------------------------------------------------
def affine_voxel_map(transform: Tensor, fixed_affine, moving_affine) -> Tensor:
    """``(N+1, N+1)`` float64 map from fixed voxel indices to moving voxel indices: ``A_m^-1 T A_f``."""
    t = torch.as_tensor(transform).as_subclass(Tensor).to(torch.float64)
    n = t.shape[0] - 1
    a_f = _as_matrix(fixed_affine, n, "fixed_affine", t.device)
    a_m = _as_matrix(moving_affine, n, "moving_affine", t.device)
    return torch.linalg.inv(a_m) @ t @ a_f


def resample_affine(
    moving: Tensor,
    transform: Tensor,
    fixed_affine,
    moving_affine,
    fixed_shape: Sequence[int],
    mode: str = "linear",
    padding_mode: str = "zeros",
) -> Tensor:
    """Moving image ``(C, *S_m)`` resampled with ``T`` onto the fixed grid ``fixed_shape`` -> ``(C, *S_f)``.

    ``mode`` / ``padding_mode`` as :func:`regnet_zoo.core.spatial.sample_image` ("nearest" for label maps).
    """
    image = moving.as_subclass(Tensor) if isinstance(moving, Tensor) else torch.as_tensor(moving)
    n = len(fixed_shape)
    vox = affine_voxel_map(transform, fixed_affine, moving_affine).to(image.device)
    grid = identity_grid(fixed_shape, device=image.device, dtype=torch.float64)
    coords = torch.einsum("ij,bj...->bi...", vox[:n, :n], grid) + vox[:n, n].reshape(1, n, *([1] * n))
    dtype = torch.float32 if not image.is_floating_point() else image.dtype
    out = sample_image(image[None], coords.to(dtype), mode=mode, padding_mode=padding_mode)
    return out[0]
