"""Registration losses: image similarity, label overlap and deformation regularisers (2D and 3D).

Every function here is a *loss*: it returns a scalar tensor and **lower is better**. Similarity measures
are therefore negated where needed (``global_ncc`` = -NCC, optimum -1). Images are ``(B, C, *S)``,
displacement / velocity fields ``(B, N, *S)`` in voxel units (README "Conventions"); finite differences use
unit voxel spacing.
MONAI losses are reused where they match the definition; the ``nn.Module`` classes are thin wrappers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from monai.losses import (
    BendingEnergyLoss,
    DiceLoss,
    DiffusionLoss,
    GlobalMutualInformationLoss,
    LocalNormalizedCrossCorrelationLoss,
)
from torch import Tensor, nn

from regnet_zoo.core import _fast
from regnet_zoo.core.spatial import warp_image
from regnet_zoo.errors import RegistrationInputError

__all__ = [
    "one_hot_labels",
    "global_ncc",
    "lncc_loss",
    "ngf_loss",
    "mse_loss",
    "mutual_information_loss",
    "soft_dice_loss",
    "label_values",
    "warped_label_dice_loss",
    "diffusion_loss",
    "bending_energy",
    "curvature_loss",
    "kl_svf_loss",
    "affine_identity_loss",
    "inverse_consistency_loss",
    "GlobalNCCLoss",
    "LNCCLoss",
    "NGFLoss",
    "MSELoss",
    "MutualInformationLoss",
    "SoftDiceLoss",
    "DiffusionRegulariser",
    "BendingEnergyRegulariser",
    "CurvatureRegulariser",
    "KLSVFLoss",
    "AffineIdentityLoss",
    "InverseConsistencyLoss",
]


# ----------------------------------------------------------------------------------------------------
# input checks
# ----------------------------------------------------------------------------------------------------
def _check_pair(a: Tensor, b: Tensor, name: str) -> int:
    """Both ``(B, C, *S)`` with equal shapes and 1-3 spatial dims; returns the number of spatial dims."""
    if a.shape != b.shape:
        raise RegistrationInputError(f"{name}: shapes differ, {tuple(a.shape)} vs {tuple(b.shape)}")
    if a.ndim not in (4, 5):
        raise RegistrationInputError(
            f"{name}: expected (B, C, H, W) or (B, C, D, H, W), got {tuple(a.shape)}"
        )
    return a.ndim - 2


def _check_field(field: Tensor, name: str, min_size: int = 1) -> int:
    """A ``(B, N, *S)`` field with ``N = len(S)`` in {2, 3}; returns ``N``."""
    if field.ndim not in (4, 5) or field.shape[1] != field.ndim - 2:
        raise RegistrationInputError(
            f"{name}: expected a field (B, N, *S) with N = len(S), got {tuple(field.shape)}"
        )
    if min(field.shape[2:]) < min_size:
        raise RegistrationInputError(
            f"{name}: every spatial size must be >= {min_size}, got {tuple(field.shape[2:])}"
        )
    return field.ndim - 2


# ----------------------------------------------------------------------------------------------------
# labels
# ----------------------------------------------------------------------------------------------------
def one_hot_labels(labels: Tensor, label_values: Sequence[int] | Tensor | None = None) -> Tensor:
    """Integer label map ``(B, 1, *S)`` with arbitrary values -> float one-hot ``(B, L, *S)``.

    Channel ``l`` is ``labels == label_values[l]``; ``label_values`` defaults to the sorted unique values
    of ``labels`` (background 0 included when present). Pass the same ``label_values`` for fixed and moving
    maps so that their channels correspond; voxels whose value is not listed are zero in every channel.
    """
    if labels.ndim not in (4, 5) or labels.shape[1] != 1:
        raise RegistrationInputError(f"one_hot_labels: expected labels (B, 1, *S), got {tuple(labels.shape)}")
    if labels.is_floating_point() and not torch.equal(labels, labels.round()):
        raise RegistrationInputError("one_hot_labels: label map has non-integer values")
    if label_values is None:
        values = torch.unique(labels)
    else:
        values = torch.as_tensor(label_values, device=labels.device)
    values = values.to(labels.dtype).reshape(1, -1, *([1] * (labels.ndim - 2)))
    return (labels == values).float()


# ----------------------------------------------------------------------------------------------------
# image similarity (lower is better)
# ----------------------------------------------------------------------------------------------------
def global_ncc(a: Tensor, b: Tensor, eps: float = 1e-8) -> Tensor:
    """Negative global normalised cross-correlation, averaged over the batch. Lower is better; optimum -1.

    a, b: ``(B, C, *S)``; the correlation is taken over all channels and voxels of each batch element.
    """
    _check_pair(a, b, "global_ncc")
    a_flat = a.reshape(a.shape[0], -1)
    b_flat = b.reshape(b.shape[0], -1)
    a_centred = a_flat - a_flat.mean(dim=1, keepdim=True)
    b_centred = b_flat - b_flat.mean(dim=1, keepdim=True)
    cross = (a_centred * b_centred).sum(dim=1)
    norm = torch.sqrt((a_centred**2).sum(dim=1) * (b_centred**2).sum(dim=1) + eps)
    return -(cross / norm).mean()


def lncc_loss(a: Tensor, b: Tensor, kernel_size: int = 9) -> Tensor:
    """Negative local *squared* NCC as in VoxelMorph (MONAI ``LocalNormalizedCrossCorrelationLoss``).

    Lower is better; optimum -1. a, b: ``(B, C, *S)``; ``kernel_size`` (odd) is the rectangular window side.
    On CPU (numba) the window sums are running sums (a constant cost per voxel and axis, where a convolution
    costs ``kernel_size``) and the backward is in closed form (:class:`_LNCCFunction`): MONAI's value and
    gradients (``tests/test_core_filters.py``); elsewhere MONAI's loss runs.
    """
    spatial_dims = _check_pair(a, b, "lncc_loss")
    if kernel_size % 2 == 0:
        raise ValueError(f"lncc_loss: kernel_size must be odd, got {kernel_size}")
    if _fast.applies(a, b):  # CPU, one float dtype, numba importable
        return _LNCCFunction.apply(a, b, int(kernel_size), spatial_dims)
    loss = LocalNormalizedCrossCorrelationLoss(spatial_dims=spatial_dims, kernel_size=kernel_size)
    return loss(a, b)


class _LNCCFunction(torch.autograd.Function):
    """MONAI's LNCC (``pred`` = a, ``target`` = b; denominators clamped at 1e-5) with window sums from
    :func:`regnet_zoo.core._fast.box_sum` and its gradient in closed form: the box filter is symmetric, so the
    adjoint of each window sum is the same window sum of the per-voxel derivative."""

    DR = 1e-5  # MONAI's smooth_dr: the variances are clamped at this value

    @staticmethod
    def forward(ctx, a, b, kernel_size, dims):
        a, b = a.detach().contiguous(), b.detach().contiguous()
        sums = _fast.box_sum(torch.stack([a, b, a * a, b * b, a * b]), kernel_size, dims)
        s_a, s_b, s_aa, s_bb, s_ab = sums.unbind(0)
        vol = float(kernel_size**dims)
        cross = s_ab - s_a * s_b / vol
        var_a, var_b = s_aa - s_a * s_a / vol, s_bb - s_b * s_b / vol
        # where the clamp passes gradients
        free_a, free_b = var_a > _LNCCFunction.DR, var_b > _LNCCFunction.DR
        var_a, var_b = var_a.clamp_min(_LNCCFunction.DR), var_b.clamp_min(_LNCCFunction.DR)
        ncc = cross * cross / (var_a * var_b)
        ctx.save_for_backward(a, b, s_a, s_b, cross, var_a, var_b, free_a, free_b)
        ctx.dims, ctx.kernel_size, ctx.vol = dims, kernel_size, vol
        return -ncc.mean()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        a, b, s_a, s_b, cross, var_a, var_b, free_a, free_b = ctx.saved_tensors
        need_a, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        w = -grad_out / a.numel()  # d loss / d ncc at every voxel
        q = w * 2 * cross / (var_a * var_b)  # d loss / d s_ab
        r = w * cross * cross / (var_a * var_b)  # ncc * w: d loss / d var = -r / var
        grads = []
        for need, x, y, s_x, s_y, var_x, free_x in ((need_a, a, b, s_a, s_b, var_a, free_a),
                                                    (need_b, b, a, s_b, s_a, var_b, free_b)):  # fmt: skip
            if not need:
                grads.append(None)
                continue
            g_xx = torch.where(free_x, -r / var_x, 0.0)  # d loss / d s_xx
            g_x = -q * s_y / ctx.vol - 2 * g_xx * s_x / ctx.vol  # d loss / d s_x
            back = _fast.box_sum(torch.stack([g_x, g_xx, q]), ctx.kernel_size, ctx.dims)
            grads.append(back[0] + 2 * x * back[1] + y * back[2])
        return grads[0], grads[1], None, None


def _central_gradient(x: Tensor) -> Tensor:
    """Central differences (one-sided at the border) of ``(B, C, *S)`` -> ``(B, C, N, *S)``."""
    spatial_axes = tuple(range(2, x.ndim))
    return torch.stack(torch.gradient(x, dim=spatial_axes), dim=2)


def ngf_loss(a: Tensor, b: Tensor, eps: float = 0.1) -> Tensor:
    """Normalised gradient fields distance (Haber & Modersitzki 2006; Hering et al. 2019). Lower is better.

    ``0.5 * mean_x(1 - <grad a, grad b>_eps^2 / (|grad a|_eps^2 |grad b|_eps^2))`` with
    ``<f, g>_eps = f.g + eps^2`` and ``|f|_eps^2 = <f, f>_eps``; ``eps`` is the edge parameter (gradients
    smaller than ~eps count as noise), so it depends on the intensity scale (Hering et al.: eps = 0.1).
    The squared form (contrast-sign invariant up to the eps^2 term) follows Haber & Modersitzki; the
    extracted text of Hering et al. shows the unsquared ratio. Flat-vs-flat regions cost 0 (eps^2 / eps^2).
    a, b: ``(B, C, *S)``, averaged over batch, channels and voxels.
    """
    _check_pair(a, b, "ngf_loss")
    grad_a = _central_gradient(a)
    grad_b = _central_gradient(b)
    eps2 = eps * eps
    inner = (grad_a * grad_b).sum(dim=2) + eps2
    norm2_a = (grad_a * grad_a).sum(dim=2) + eps2
    norm2_b = (grad_b * grad_b).sum(dim=2) + eps2
    return 0.5 * (1.0 - inner * inner / (norm2_a * norm2_b)).mean()


def mse_loss(a: Tensor, b: Tensor) -> Tensor:
    """Mean squared intensity difference over batch, channels and voxels. Lower is better, optimum 0."""
    _check_pair(a, b, "mse_loss")
    return ((a - b) ** 2).mean()


def _min_max_normalise(x: Tensor) -> Tensor:
    """Scale each batch element to [0, 1] (min/max detached: they only set the histogram range)."""
    flat = x.reshape(x.shape[0], -1)
    lo = flat.min(dim=1).values.detach().reshape(-1, *([1] * (x.ndim - 1)))
    hi = flat.max(dim=1).values.detach().reshape(-1, *([1] * (x.ndim - 1)))
    return (x - lo) / (hi - lo).clamp_min(1e-8)


def mutual_information_loss(a: Tensor, b: Tensor, num_bins: int = 32) -> Tensor:
    """Negative global mutual information (Gaussian Parzen windows; MONAI ``GlobalMutualInformationLoss``).

    Lower is better; optimum -H(a) at a == b. Each image is min-max scaled to [0, 1] per batch element first
    (MONAI's Gaussian bins cover [0, 1]). Memory is ``B * C * prod(S) * num_bins`` floats.
    a, b: ``(B, C, *S)``.
    """
    _check_pair(a, b, "mutual_information_loss")
    loss = GlobalMutualInformationLoss(kernel_type="gaussian", num_bins=num_bins)
    return loss(_min_max_normalise(a), _min_max_normalise(b))


# ----------------------------------------------------------------------------------------------------
# label overlap
# ----------------------------------------------------------------------------------------------------
def soft_dice_loss(
    pred_onehot_or_probs: Tensor, target_onehot: Tensor, include_background: bool = True
) -> Tensor:
    """Multi-label soft Dice loss ``1 - mean_{b, l} Dice_l`` (MONAI ``DiceLoss``). Lower is better, 0 best.

    Both ``(B, L, *S)`` (e.g. warped one-hot moving labels and one-hot fixed labels from
    :func:`one_hot_labels` with the same ``label_values``). ``include_background=False`` drops channel 0.
    """
    _check_pair(pred_onehot_or_probs, target_onehot, "soft_dice_loss")
    return DiceLoss(include_background=include_background)(pred_onehot_or_probs, target_onehot)


def label_values(*labels: Tensor, include_background: bool = True) -> Tensor:
    """The sorted label values present in any of the label maps ``labels``; without 0 when
    ``include_background`` is false (so that the one-hot channels of every map correspond)."""
    values = torch.unique(torch.cat([label.flatten() for label in labels]))
    return values if include_background else values[values != 0]


def warped_label_dice_loss(
    ddf: Tensor, fixed_label: Tensor, moving_label: Tensor, include_background: bool = True
) -> Tensor | None:
    """The label term of weakly supervised training: soft Dice of the moving one-hot labels warped (linearly)
    by ``ddf`` against the fixed one-hot labels, over the values present in either map.

    ``ddf`` ``(B, N, *S)`` voxel units; label maps ``(B, 1, *S)``. ``include_background=False`` leaves the
    value 0 out (not the first channel, which is 0 only when a map has background). Returns ``None`` when no
    label value is left (e.g. background only): there is nothing to align, and the caller omits the term.
    """
    values = label_values(fixed_label, moving_label, include_background=include_background)
    if len(values) == 0:
        return None
    warped = warp_image(one_hot_labels(moving_label, values).to(ddf.dtype), ddf)
    return soft_dice_loss(warped, one_hot_labels(fixed_label, values).to(ddf.dtype))


# ----------------------------------------------------------------------------------------------------
# deformation regularisers (lower is smoother)
# ----------------------------------------------------------------------------------------------------
def diffusion_loss(ddf: Tensor) -> Tensor:
    """Mean squared first derivative ``mean_{b, c, x} sum_i (d u_c / d x_i)^2`` (MONAI ``DiffusionLoss``).

    Central differences on the interior; ddf ``(B, N, *S)`` with every size > 2. Lower is better, 0 for a
    translation. The backward is written out (:class:`_DiffusionFunction`, MONAI's value and gradient:
    ``tests/test_core_losses.py``): autograd's slice backward filled a whole-grid tensor per difference.
    """
    _check_field(ddf, "diffusion_loss", min_size=3)
    if ddf.layout != torch.strided or torch.jit.is_tracing() or torch.jit.is_scripting():
        return DiffusionLoss()(ddf)
    return _DiffusionFunction.apply(ddf)


def _difference_slices(ndim: int, axis: int) -> tuple[tuple[slice, ...], tuple[slice, ...]]:
    """Slices of ``x[i + 1]`` and ``x[i - 1]`` along ``axis`` over the interior of every spatial axis."""
    inner = [slice(None), slice(None)] + [slice(1, -1)] * (ndim - 2)
    plus, minus = list(inner), list(inner)
    plus[axis], minus[axis] = slice(2, None), slice(None, -2)
    return tuple(plus), tuple(minus)


class _DiffusionFunction(torch.autograd.Function):
    """MONAI's ``DiffusionLoss`` (mean reduction): ``sum_i mean((x[+1_i] - x[-1_i])^2 / 4)`` over the
    interior; the gradient of term ``i`` is ``+-g_i / count`` at the two shifted copies."""

    @staticmethod
    def forward(ctx, x):
        ctx.count = x.shape[0] * x.shape[1] * math.prod(n - 2 for n in x.shape[2:])  # interior values
        total = x.new_zeros(())
        for axis in range(2, x.ndim):
            plus, minus = _difference_slices(x.ndim, axis)
            g = (x[plus] - x[minus]) * 0.5
            total = total + (g * g).sum()
        ctx.save_for_backward(x)
        return total / ctx.count

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        (x,) = ctx.saved_tensors
        grad = torch.zeros_like(x)
        scale = grad_out / ctx.count
        for axis in range(2, x.ndim):
            plus, minus = _difference_slices(x.ndim, axis)
            g = (x[plus] - x[minus]) * (0.5 * scale)  # d(g^2)/dx[+1] = 2 g * 1/2
            grad[plus] += g
            grad[minus] -= g
        return grad


def bending_energy(ddf: Tensor) -> Tensor:
    """Bending energy ``mean_{b, c, x} sum_{i, j} (d^2 u_c / d x_i d x_j)^2`` (MONAI ``BendingEnergyLoss``).

    Compact central differences on the interior; ddf ``(B, N, *S)``, every size > 2. Lower is better, 0 for an
    affine field.
    """
    _check_field(ddf, "bending_energy", min_size=3)
    return BendingEnergyLoss()(ddf)


def curvature_loss(ddf: Tensor) -> Tensor:
    """Curvature regulariser: mean squared Laplacian ``mean_{b, c, x} (Laplace u_c)^2`` (interior voxels).

    Lower is better, 0 for an affine field. Hering et al.'s ``R = 1/2 int sum_j (Laplace y_j)^2`` equals
    ``(N / 2) * curvature_loss * |Omega|`` (the Laplacian of the identity part of y vanishes).
    ddf ``(B, N, *S)``, every spatial size > 2.
    """
    _check_field(ddf, "curvature_loss", min_size=3)
    interior = [slice(None), slice(None)] + [slice(1, -1)] * (ddf.ndim - 2)
    laplacian = -2 * (ddf.ndim - 2) * ddf[tuple(interior)]
    for axis in range(2, ddf.ndim):
        for side in (slice(2, None), slice(None, -2)):
            neighbour = list(interior)
            neighbour[axis] = side
            laplacian = laplacian + ddf[tuple(neighbour)]
    return (laplacian**2).mean()


def _neighbour_degree(shape: Sequence[int], device: torch.device, dtype: torch.dtype) -> Tensor:
    """Grid neighbours (4-/6-connectivity) of each voxel ``(*S)``: 2N inside, fewer at the border."""
    degree = torch.zeros(tuple(shape), device=device, dtype=dtype)
    for axis, size in enumerate(shape):
        per_axis = torch.full((size,), 2.0, device=device, dtype=dtype)
        per_axis[0] -= 1
        per_axis[-1] -= 1
        view = [1] * len(shape)
        view[axis] = size
        degree = degree + per_axis.reshape(view)
    return degree


def kl_svf_loss(mean: Tensor, log_var: Tensor, prior_lambda: float = 10.0) -> Tensor:
    """KL term of probabilistic VoxelMorph-diff (Dalca et al. MICCAI 2018, MedIA 2019), used by DDR-Net.

    q(v) = N(mean, diag(exp(log_var))) against the smoothness prior p(v) = N(0, Lambda^-1) with precision
    ``Lambda = prior_lambda * (D - A)`` (graph Laplacian of the voxel grid, D = neighbour-degree matrix), per
    component. Up to an additive constant::

        KL / |Omega| = 1/2 * sum_c [ mean_x(prior_lambda * D(x) * Sigma_c(x) - log Sigma_c(x))
                                     + prior_lambda / |Omega| * sum_{pairs x~y} (mu_c(x) - mu_c(y))^2 ]

    (pairs x~y: each pair of grid neighbours once), averaged over the batch. Lower is better; minimal at
    ``mean = 0`` and ``Sigma = 1 / (prior_lambda * D)``. ``prior_lambda = 10`` is the VoxelMorph-diff
    default. The VoxelMorph reference code averages the smoothness over components and axes and halves it;
    here it is the exact quadratic form, i.e. 2N times larger relative to the sigma term.
    mean, log_var: ``(B, N, *S)`` (log_var = log variance).
    """
    _check_field(mean, "kl_svf_loss(mean)")
    if log_var.shape != mean.shape:
        raise RegistrationInputError(
            f"kl_svf_loss: mean {tuple(mean.shape)} and log_var {tuple(log_var.shape)} differ in shape"
        )
    spatial_shape = mean.shape[2:]
    num_voxels = math.prod(spatial_shape)
    degree = _neighbour_degree(spatial_shape, mean.device, mean.dtype)
    sigma_term = (prior_lambda * degree * log_var.exp() - log_var).flatten(2).mean(dim=2).sum(dim=1)
    smoothness = mean.new_zeros(mean.shape[0])
    for axis in range(2, mean.ndim):
        diff = torch.diff(mean, dim=axis)
        smoothness = smoothness + (diff * diff).flatten(1).sum(dim=1)
    return (0.5 * (sigma_term + prior_lambda * smoothness / num_voxels)).mean()


def affine_identity_loss(theta: Tensor) -> Tensor:
    """Squared Frobenius distance of affine matrices from the identity, batch mean. Lower is better.

    theta: ``(B, N, N)``, ``(B, N, N + 1)`` (compared with ``[I | 0]``) or homogeneous ``(B, N + 1, N + 1)``.
    """
    if theta.ndim != 3 or theta.shape[2] not in (theta.shape[1], theta.shape[1] + 1):
        raise RegistrationInputError(
            "affine_identity_loss: expected (B, N, N), (B, N, N+1) or (B, N+1, N+1), "
            f"got {tuple(theta.shape)}"
        )
    identity = torch.eye(theta.shape[1], theta.shape[2], device=theta.device, dtype=theta.dtype)
    if theta.shape[1] == theta.shape[2]:
        identity = torch.eye(theta.shape[1], device=theta.device, dtype=theta.dtype)
    return ((theta - identity) ** 2).sum(dim=(1, 2)).mean()


def inverse_consistency_loss(ddf_fwd: Tensor, ddf_bwd: Tensor) -> Tensor:
    """Mean squared residual of both compositions of forward and backward field. Lower is better.

    ``ddf_fwd`` maps fixed-grid points into the moving image, ``ddf_bwd`` moving-grid points into the fixed
    one (both ``(B, N, *S)`` on grids of the same size). Residuals: ``fwd + bwd o (id + fwd)`` and
    ``bwd + fwd o (id + bwd)`` (interpolated by ``core.spatial.compose_ddf``); returns
    ``0.5 * (mean |r_1|^2 + mean |r_2|^2)``, ``|.|^2`` summed over components, mean over batch and voxels.
    """
    # imported here so that the other losses do not depend on core.spatial
    from regnet_zoo.core.spatial import compose_ddf

    _check_field(ddf_fwd, "inverse_consistency_loss(ddf_fwd)")
    if ddf_fwd.shape != ddf_bwd.shape:
        raise RegistrationInputError(
            f"inverse_consistency_loss: field shapes differ, {tuple(ddf_fwd.shape)} vs {tuple(ddf_bwd.shape)}"
        )
    # compose_ddf(first, second) = second + first o (id + second)
    residual_fixed = compose_ddf(ddf_bwd, ddf_fwd)
    residual_moving = compose_ddf(ddf_fwd, ddf_bwd)
    return 0.5 * ((residual_fixed**2).sum(dim=1).mean() + (residual_moving**2).sum(dim=1).mean())


# ----------------------------------------------------------------------------------------------------
# thin nn.Module wrappers
# ----------------------------------------------------------------------------------------------------
class GlobalNCCLoss(nn.Module):
    """:func:`global_ncc` as a module: ``forward(a, b) -> -NCC``."""

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        return global_ncc(a, b)


class LNCCLoss(nn.Module):
    """:func:`lncc_loss` as a module."""

    def __init__(self, kernel_size: int = 9) -> None:
        super().__init__()
        self.kernel_size = kernel_size

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        return lncc_loss(a, b, kernel_size=self.kernel_size)


class NGFLoss(nn.Module):
    """:func:`ngf_loss` as a module."""

    def __init__(self, eps: float = 0.1) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        return ngf_loss(a, b, eps=self.eps)


class MSELoss(nn.Module):
    """:func:`mse_loss` as a module."""

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        return mse_loss(a, b)


class MutualInformationLoss(nn.Module):
    """:func:`mutual_information_loss` as a module."""

    def __init__(self, num_bins: int = 32) -> None:
        super().__init__()
        self.num_bins = num_bins

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        return mutual_information_loss(a, b, num_bins=self.num_bins)


class SoftDiceLoss(nn.Module):
    """:func:`soft_dice_loss` as a module."""

    def __init__(self, include_background: bool = True) -> None:
        super().__init__()
        self.include_background = include_background

    def forward(self, pred_onehot_or_probs: Tensor, target_onehot: Tensor) -> Tensor:
        return soft_dice_loss(pred_onehot_or_probs, target_onehot, include_background=self.include_background)


class DiffusionRegulariser(nn.Module):
    """:func:`diffusion_loss` as a module: ``forward(ddf)``."""

    def forward(self, ddf: Tensor) -> Tensor:
        return diffusion_loss(ddf)


class BendingEnergyRegulariser(nn.Module):
    """:func:`bending_energy` as a module: ``forward(ddf)``."""

    def forward(self, ddf: Tensor) -> Tensor:
        return bending_energy(ddf)


class CurvatureRegulariser(nn.Module):
    """:func:`curvature_loss` as a module: ``forward(ddf)``."""

    def forward(self, ddf: Tensor) -> Tensor:
        return curvature_loss(ddf)


class KLSVFLoss(nn.Module):
    """:func:`kl_svf_loss` as a module: ``forward(mean, log_var)``."""

    def __init__(self, prior_lambda: float = 10.0) -> None:
        super().__init__()
        self.prior_lambda = prior_lambda

    def forward(self, mean: Tensor, log_var: Tensor) -> Tensor:
        return kl_svf_loss(mean, log_var, prior_lambda=self.prior_lambda)


class AffineIdentityLoss(nn.Module):
    """:func:`affine_identity_loss` as a module: ``forward(theta)``."""

    def forward(self, theta: Tensor) -> Tensor:
        return affine_identity_loss(theta)


class InverseConsistencyLoss(nn.Module):
    """:func:`inverse_consistency_loss` as a module: ``forward(ddf_fwd, ddf_bwd)``."""

    def forward(self, ddf_fwd: Tensor, ddf_bwd: Tensor) -> Tensor:
        return inverse_consistency_loss(ddf_fwd, ddf_bwd)
