"""Tests of regnet_zoo.core.losses against analytic values and brute-force numpy references."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from regnet_zoo.core import losses
from regnet_zoo.errors import RegistrationInputError


def _smooth_image(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """A textured, smooth random image (1, 1, *S) in [0, 1]."""
    gen = torch.Generator().manual_seed(seed)
    coarse = torch.rand((1, 1, *[max(s // 4, 2) for s in shape]), generator=gen)
    mode = "bilinear" if len(shape) == 2 else "trilinear"
    image = torch.nn.functional.interpolate(coarse, size=shape, mode=mode, align_corners=True)
    return (image - image.min()) / (image.max() - image.min())


def _grid(shape: tuple[int, ...]) -> list[torch.Tensor]:
    return list(torch.meshgrid(*[torch.arange(s, dtype=torch.float64) for s in shape], indexing="ij"))


@pytest.fixture
def real_slice(shared_data) -> torch.Tensor:
    sitk = pytest.importorskip("SimpleITK")
    array = sitk.GetArrayFromImage(
        sitk.ReadImage(str(shared_data / "oasis2d" / "slices" / "oasis2d_0003.nrrd"))
    )
    return torch.as_tensor(array, dtype=torch.float32)[None, None]


# ------------------------------------------------------------------------------------------------------
# image similarity
# ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(20, 24), (10, 12, 14)])
def test_global_ncc_known_values(shape):
    a = _smooth_image(shape, 1)
    b = _smooth_image(shape, 2)
    assert losses.global_ncc(a, a).item() == pytest.approx(-1.0, abs=1e-5)
    assert losses.global_ncc(a, 3.0 * a + 2.0).item() == pytest.approx(-1.0, abs=1e-5)
    assert losses.global_ncc(a, -a).item() == pytest.approx(1.0, abs=1e-5)
    reference = np.corrcoef(a.numpy().ravel(), b.numpy().ravel())[0, 1]
    assert losses.global_ncc(a, b).item() == pytest.approx(-reference, abs=1e-5)


def _lncc_brute_force(a: np.ndarray, b: np.ndarray, k: int) -> float:
    """-mean of squared local correlation over k x k windows (zero padded), per MONAI/VoxelMorph formula."""
    r = k // 2
    pa, pb = np.pad(a, r), np.pad(b, r)
    values = []
    for i in range(a.shape[0]):
        for j in range(a.shape[1]):
            wa, wb = pa[i : i + k, j : j + k].ravel(), pb[i : i + k, j : j + k].ravel()
            n = wa.size
            cross = (wa * wb).sum() - wa.sum() * wb.sum() / n
            var_a = max((wa * wa).sum() - wa.sum() ** 2 / n, 1e-5)
            var_b = max((wb * wb).sum() - wb.sum() ** 2 / n, 1e-5)
            values.append(cross * cross / (var_a * var_b))
    return -float(np.mean(values))


def test_lncc_matches_brute_force_and_optimum():
    a = _smooth_image((12, 10), 3).double()
    b = _smooth_image((12, 10), 4).double()
    expected = _lncc_brute_force(a[0, 0].numpy(), b[0, 0].numpy(), k=5)
    assert losses.lncc_loss(a, b, kernel_size=5).item() == pytest.approx(expected, rel=1e-6)
    assert losses.lncc_loss(a, a, kernel_size=5).item() == pytest.approx(-1.0, abs=1e-4)


def _ngf_brute_force(a: np.ndarray, b: np.ndarray, eps: float) -> float:
    grad_a = np.stack(np.gradient(a))
    grad_b = np.stack(np.gradient(b))
    inner = (grad_a * grad_b).sum(0) + eps**2
    norm_a = (grad_a**2).sum(0) + eps**2
    norm_b = (grad_b**2).sum(0) + eps**2
    return float(0.5 * np.mean(1 - inner**2 / (norm_a * norm_b)))


@pytest.mark.parametrize("shape", [(16, 20), (8, 10, 12)])
def test_ngf_optimum_contrast_invariance_and_reference(shape):
    a = _smooth_image(shape, 5).double()
    b = _smooth_image(shape, 6).double()
    assert losses.ngf_loss(a, a).item() == pytest.approx(0.0, abs=1e-12)
    # squared (Haber & Modersitzki) form: an inverted contrast is as aligned (up to the eps^2 term)
    assert losses.ngf_loss(a, 1.0 - a, eps=1e-4).item() < 1e-4
    assert losses.ngf_loss(a, 1.0 - a, eps=0.1).item() > 0.1  # gradients here are ~eps: not invariant
    shifted = torch.roll(a, shifts=3, dims=2)
    assert losses.ngf_loss(a, shifted).item() > 0.02
    expected = _ngf_brute_force(a[0, 0].numpy(), b[0, 0].numpy(), eps=0.05)
    assert losses.ngf_loss(a, b, eps=0.05).item() == pytest.approx(expected, rel=1e-10)


def test_similarities_on_a_real_slice(real_slice):
    shifted = torch.roll(real_slice, shifts=(4, -3), dims=(2, 3))
    assert losses.ngf_loss(real_slice, real_slice).item() == pytest.approx(0.0, abs=1e-6)
    assert losses.ngf_loss(real_slice, shifted).item() > 0.05
    assert losses.global_ncc(real_slice, real_slice).item() == pytest.approx(-1.0, abs=1e-5)
    assert losses.global_ncc(real_slice, shifted).item() > -0.9
    assert (
        losses.lncc_loss(real_slice, shifted).item() > losses.lncc_loss(real_slice, real_slice).item() + 0.2
    )
    mi_self = losses.mutual_information_loss(real_slice, real_slice).item()
    assert losses.mutual_information_loss(real_slice, shifted).item() > mi_self + 0.1


def test_mse_and_mutual_information():
    a = _smooth_image((24, 24), 7)
    b = _smooth_image((24, 24), 8)
    assert losses.mse_loss(a, b).item() == pytest.approx(((a - b) ** 2).mean().item())
    mi_self = losses.mutual_information_loss(a, a).item()
    # min-max scaling makes MI invariant to an increasing affine intensity map
    assert losses.mutual_information_loss(a, 5.0 * a - 1.0).item() == pytest.approx(mi_self, abs=1e-5)
    shuffled = a.flatten()[torch.randperm(a.numel())].reshape(a.shape)
    assert losses.mutual_information_loss(a, shuffled).item() > mi_self + 0.5
    assert mi_self < -1.0  # -MI(a, a) = -H(a): a continuous image spans several bins


# ------------------------------------------------------------------------------------------------------
# labels
# ------------------------------------------------------------------------------------------------------
def test_one_hot_labels_arbitrary_values():
    labels = torch.tensor([0, 3, 42, 3, 0, 42, 7, 3], dtype=torch.int64).reshape(1, 1, 2, 4)
    onehot = losses.one_hot_labels(labels)
    assert onehot.shape == (1, 4, 2, 4)
    assert torch.equal(onehot.sum(dim=1), torch.ones(1, 2, 4))
    assert torch.equal(onehot[0, 2], (labels[0, 0] == 7).float())  # sorted values 0, 3, 7, 42
    explicit = losses.one_hot_labels(labels.float(), label_values=[42, 5])
    assert explicit.shape == (1, 2, 2, 4)
    assert torch.equal(explicit[0, 0], (labels[0, 0] == 42).float())
    assert explicit[0, 1].sum() == 0
    with pytest.raises(RegistrationInputError):
        losses.one_hot_labels(labels.float() + 0.5)


def test_soft_dice_known_overlap():
    fixed = torch.zeros(1, 1, 20, 20, dtype=torch.int64)
    moving = torch.zeros_like(fixed)
    fixed[..., 0:10, :] = 1
    moving[..., 5:15, :] = 1
    onehot_fixed = losses.one_hot_labels(fixed, [0, 1])
    onehot_moving = losses.one_hot_labels(moving, [0, 1])
    # foreground Dice = 2 * 100 / (200 + 200) = 0.5
    loss = losses.soft_dice_loss(onehot_moving, onehot_fixed, include_background=False)
    assert loss.item() == pytest.approx(0.5, abs=1e-6)
    # background Dice = 2 * 100 / (200 + 200) too
    assert losses.soft_dice_loss(onehot_moving, onehot_fixed).item() == pytest.approx(0.5, abs=1e-6)
    assert losses.soft_dice_loss(onehot_fixed, onehot_fixed).item() == pytest.approx(0.0, abs=1e-6)


# ------------------------------------------------------------------------------------------------------
# regularisers
# ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(9, 11), (6, 7, 8)])
def test_regularisers_of_linear_and_quadratic_fields(shape):
    n = len(shape)
    coords = _grid(shape)
    matrix = torch.arange(1.0, 1.0 + n * n, dtype=torch.float64).reshape(n, n) / 10
    linear = torch.stack([sum(matrix[i, j] * coords[j] for j in range(n)) + 0.3 for i in range(n)])[None]
    assert losses.diffusion_loss(linear).item() == pytest.approx((matrix**2).sum().item() / n, rel=1e-10)
    assert losses.bending_energy(linear).item() == pytest.approx(0.0, abs=1e-12)
    assert losses.curvature_loss(linear).item() == pytest.approx(0.0, abs=1e-12)
    assert losses.diffusion_loss(torch.full_like(linear, 2.5)).item() == pytest.approx(0.0, abs=1e-12)

    a, b, c = 0.2, -0.05, 0.1
    quadratic = torch.zeros_like(linear)
    quadratic[0, 0] = a * coords[0] ** 2 + b * coords[1] ** 2
    quadratic[0, 1] = c * coords[0] * coords[1]
    # Laplacians: 2a + 2b and 0; bending: d00 = 2a, d11 = 2b, mixed 0 (component 0); mixed c (component 1)
    assert losses.curvature_loss(quadratic).item() == pytest.approx((2 * a + 2 * b) ** 2 / n, rel=1e-10)
    expected_bending = ((2 * a) ** 2 + (2 * b) ** 2 + 2 * c**2) / n
    assert losses.bending_energy(quadratic).item() == pytest.approx(expected_bending, rel=1e-10)


def _kl_dense_reference(mean: np.ndarray, log_var: np.ndarray, prior_lambda: float) -> float:
    """1/2 [sum_c (lambda D Sigma - log Sigma) + lambda mu_c^T (D - A) mu_c] / |Omega|, explicit matrices."""
    shape = mean.shape[1:]
    count = int(np.prod(shape))
    index = np.arange(count).reshape(shape)
    adjacency = np.zeros((count, count))
    for axis in range(len(shape)):
        first = np.take(index, np.arange(shape[axis] - 1), axis=axis).ravel()
        second = np.take(index, np.arange(1, shape[axis]), axis=axis).ravel()
        adjacency[first, second] = adjacency[second, first] = 1
    degree = adjacency.sum(1)
    laplacian = np.diag(degree) - adjacency
    total = 0.0
    for c in range(mean.shape[0]):
        sigma = np.exp(log_var[c].ravel())
        mu = mean[c].ravel()
        total += (prior_lambda * degree * sigma - np.log(sigma)).sum() + prior_lambda * mu @ laplacian @ mu
    return 0.5 * total / count


@pytest.mark.parametrize("shape", [(4, 5), (3, 4, 3)])
def test_kl_svf_matches_dense_formula_and_is_minimal_at_prior(shape):
    n = len(shape)
    mean = torch.randn(1, n, *shape, dtype=torch.float64)
    log_var = torch.randn(1, n, *shape, dtype=torch.float64)
    expected = _kl_dense_reference(mean[0].numpy(), log_var[0].numpy(), prior_lambda=7.0)
    assert losses.kl_svf_loss(mean, log_var, prior_lambda=7.0).item() == pytest.approx(expected, rel=1e-10)

    # optimum: mean 0, Sigma = 1 / (lambda * degree); degree from the dense adjacency above
    degree = np.zeros(shape)
    for axis, size in enumerate(shape):
        per_axis = np.full(size, 2.0)
        per_axis[[0, -1]] -= 1
        degree = degree + per_axis.reshape([size if a == axis else 1 for a in range(n)])
    optimum_log_var = torch.as_tensor(-np.log(7.0 * degree)).expand(1, n, *shape).clone().requires_grad_(True)
    optimum_mean = torch.zeros(1, n, *shape, dtype=torch.float64, requires_grad=True)
    best = losses.kl_svf_loss(optimum_mean, optimum_log_var, prior_lambda=7.0)
    best.backward()
    assert optimum_mean.grad.abs().max() < 1e-12 and optimum_log_var.grad.abs().max() < 1e-12
    for _ in range(5):
        worse = losses.kl_svf_loss(
            optimum_mean.detach() + 0.1 * torch.randn_like(mean),
            optimum_log_var.detach() + 0.1 * torch.randn_like(log_var),
            prior_lambda=7.0,
        )
        assert worse.item() > best.item()


def test_affine_identity_loss():
    identity_2d = torch.eye(2, 3).expand(4, 2, 3)
    assert losses.affine_identity_loss(identity_2d).item() == 0.0
    theta = torch.eye(3, 4).repeat(2, 1, 1)
    theta[0, 0, 3] = 2.0  # translation
    theta[1, 1, 2] = 0.5  # shear
    assert losses.affine_identity_loss(theta).item() == pytest.approx((4.0 + 0.25) / 2)
    homogeneous = torch.eye(4)[None].clone()
    homogeneous[0, 2, 2] = 1.5
    assert losses.affine_identity_loss(homogeneous).item() == pytest.approx(0.25)
    with pytest.raises(RegistrationInputError):
        losses.affine_identity_loss(torch.eye(3, 5)[None])


@pytest.mark.parametrize("shape", [(12, 10), (6, 7, 8)])
def test_inverse_consistency_of_translations(shape):
    n = len(shape)
    shift = torch.tensor([0.7, -1.2, 0.4][:n], dtype=torch.float64).reshape(1, n, *([1] * n))
    forward = shift.expand(1, n, *shape).clone()
    assert losses.inverse_consistency_loss(forward, -forward).item() == pytest.approx(0.0, abs=1e-12)
    # same direction twice: both residuals are 2 * shift
    expected = 4.0 * (shift**2).sum().item()
    assert losses.inverse_consistency_loss(forward, forward).item() == pytest.approx(expected, rel=1e-10)


# ------------------------------------------------------------------------------------------------------
# gradients and errors
# ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_every_loss_backpropagates(spatial_dims):
    shape = (10, 12) if spatial_dims == 2 else (6, 7, 8)
    fixed = _smooth_image(shape, 11)
    labels_fixed = (fixed * 3).round().long()
    image_pair_losses = [
        losses.global_ncc,
        losses.lncc_loss,
        losses.ngf_loss,
        losses.mse_loss,
        losses.mutual_information_loss,
        losses.GlobalNCCLoss(),
        losses.LNCCLoss(kernel_size=3),
        losses.NGFLoss(eps=0.05),
        losses.MSELoss(),
        losses.MutualInformationLoss(num_bins=16),
    ]
    for loss_fn in image_pair_losses:
        moving = (_smooth_image(shape, 12) * 0.8 + 0.1).requires_grad_(True)
        loss_fn(moving, fixed).backward()
        assert torch.isfinite(moving.grad).all() and moving.grad.abs().sum() > 0, loss_fn

    probs = torch.rand(1, 4, *shape).softmax(dim=1).requires_grad_(True)
    target = losses.one_hot_labels(labels_fixed, [0, 1, 2, 3])
    for dice_fn in (losses.soft_dice_loss, losses.SoftDiceLoss(include_background=False)):
        probs.grad = None
        dice_fn(probs, target).backward()
        assert torch.isfinite(probs.grad).all() and probs.grad.abs().sum() > 0

    field_losses = [
        losses.diffusion_loss,
        losses.bending_energy,
        losses.curvature_loss,
        losses.DiffusionRegulariser(),
        losses.BendingEnergyRegulariser(),
        losses.CurvatureRegulariser(),
    ]
    for loss_fn in field_losses:
        field = torch.randn(1, spatial_dims, *shape, requires_grad=True)
        loss_fn(field).backward()
        assert torch.isfinite(field.grad).all() and field.grad.abs().sum() > 0, loss_fn

    mean = torch.randn(1, spatial_dims, *shape, requires_grad=True)
    log_var = torch.randn(1, spatial_dims, *shape, requires_grad=True)
    losses.KLSVFLoss(prior_lambda=10.0)(mean, log_var).backward()
    for tensor in (mean, log_var):
        assert torch.isfinite(tensor.grad).all() and tensor.grad.abs().sum() > 0

    theta = torch.eye(spatial_dims, spatial_dims + 1) + 0.1 * torch.randn(2, spatial_dims, spatial_dims + 1)
    theta.requires_grad_(True)
    losses.AffineIdentityLoss()(theta).backward()
    assert torch.isfinite(theta.grad).all() and theta.grad.abs().sum() > 0

    forward = (0.5 * torch.randn(1, spatial_dims, *shape)).requires_grad_(True)
    backward = (0.5 * torch.randn(1, spatial_dims, *shape)).requires_grad_(True)
    losses.InverseConsistencyLoss()(forward, backward).backward()
    for tensor in (forward, backward):
        assert torch.isfinite(tensor.grad).all() and tensor.grad.abs().sum() > 0


def test_bad_inputs_raise():
    with pytest.raises(RegistrationInputError):
        losses.mse_loss(torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 4, 5))
    with pytest.raises(RegistrationInputError):
        losses.diffusion_loss(torch.zeros(1, 3, 8, 8))
    with pytest.raises(RegistrationInputError):
        losses.kl_svf_loss(torch.zeros(1, 2, 8, 8), torch.zeros(1, 2, 8, 9))


def _numpy_dice_loss(pred: np.ndarray, target: np.ndarray, values) -> float:
    """``1 - mean over batch and labels of 2 |A n B| / (|A| + |B|)`` on integer maps ``(B, 1, *S)``; a label
    absent from both maps of an element scores 1 (MONAI's smoothed ratio)."""
    scores = [
        2 * np.sum((p == v) & (t == v)) / max(np.sum(p == v) + np.sum(t == v), 1e-30)
        if np.any(p == v) or np.any(t == v)
        else 1.0
        for p, t in zip(pred, target, strict=True)
        for v in values
    ]
    return 1.0 - float(np.mean(scores))


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_warped_label_dice_loss_of_a_voxel_shift(spatial_dims):
    """A whole-voxel translation warps the one-hot maps exactly: the loss is the Dice of the shifted maps."""
    gen = torch.Generator().manual_seed(0)
    shape = (12, 14) if spatial_dims == 2 else (8, 9, 10)
    fixed = torch.randint(0, 3, (2, 1, *shape), generator=gen) * 2  # values 0, 2, 4
    moving = torch.randint(0, 3, (2, 1, *shape), generator=gen) * 2
    moving[0][moving[0] == 4] = 5  # a value only one map holds
    ddf = torch.zeros(2, spatial_dims, *shape)
    ddf[:, 0] = 1.0  # warped(x) = moving(x + e_0)
    shifted = np.concatenate([moving.numpy()[:, :, 1:], moving.numpy()[:, :, -1:]], axis=2)  # border held
    for include_background, values in ((True, [0, 2, 4, 5]), (False, [2, 4, 5])):
        loss = losses.warped_label_dice_loss(ddf, fixed, moving, include_background=include_background)
        expected = _numpy_dice_loss(shifted, fixed.numpy(), values)
        assert loss.item() == pytest.approx(expected, abs=1e-4)
    assert losses.label_values(fixed, moving).tolist() == [0, 2, 4, 5]
    # background only: no term (rather than a Dice of empty sets)
    zeros = torch.zeros(1, 1, *shape, dtype=torch.long)
    assert losses.warped_label_dice_loss(ddf[:1], zeros, zeros, include_background=False) is None
    assert losses.warped_label_dice_loss(ddf[:1], zeros, zeros).item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("shape", [(2, 3, 7, 8, 9), (1, 2, 12, 5)])
def test_diffusion_loss_equals_monai_value_and_gradient(shape):
    from monai.losses import DiffusionLoss

    from regnet_zoo.core.losses import diffusion_loss

    x = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    ours, ref = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    loss, expected = diffusion_loss(ours), DiffusionLoss()(ref)
    (3.0 * loss).backward()
    (3.0 * expected).backward()
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(ours.grad, ref.grad, rtol=1e-10, atol=1e-14)
    assert torch.autograd.gradcheck(diffusion_loss, (x[:1, :, :5, :6].clone().requires_grad_(True),))
