"""regnet_zoo.core.integration: scaling and squaring vs analytic flows (scipy expm), inverse, gradients."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch

from regnet_zoo.core.integration import ScalingAndSquaring, integrate_inverse, scaling_and_squaring
from regnet_zoo.core.spatial import compose_ddf, identity_grid


def _rotation_svf(shape, skew: np.ndarray):
    """SVF v(x) = W (x - c) with W skew-symmetric about the grid centre c, and the analytic DDF of exp(v)."""
    grid = identity_grid(shape, dtype=torch.float64)
    centre = torch.tensor([(s - 1) / 2 for s in shape], dtype=torch.float64).view(1, -1, *([1] * len(shape)))
    w = torch.from_numpy(skew)
    rel = grid - centre
    svf = torch.einsum("ij,bj...->bi...", w, rel)
    rotation = torch.from_numpy(scipy.linalg.expm(skew))
    expected = torch.einsum("ij,bj...->bi...", rotation, rel) - rel  # phi(x) - x = R (x - c) + c - x
    radius = rel.norm(dim=1)[0]
    return svf, expected, radius


def _skew(n: int, angle: float) -> np.ndarray:
    if n == 2:
        return np.array([[0.0, -angle], [angle, 0.0]])
    axis = np.array([0.3, -0.5, 0.8])
    a = angle * axis / np.linalg.norm(axis)
    return np.array([[0.0, -a[2], a[1]], [a[2], 0.0, -a[0]], [-a[1], a[0], 0.0]])


@pytest.mark.parametrize("shape", [(64, 60), (28, 30, 26)])
def test_rotation_svf_matches_matrix_exponential(shape):
    n = len(shape)
    svf, expected, radius = _rotation_svf(shape, _skew(n, 0.5))
    # rotations keep |x - c|: points in this ball never leave the grid during the squarings
    interior = radius < 0.45 * (min(shape) - 1)
    errors = {}
    for steps in (3, 8):
        ddf = scaling_and_squaring(svf, steps=steps)
        errors[steps] = (ddf - expected)[0][:, interior].abs().max().item()
    # linear interpolation is exact for linear fields, so only the truncation of
    # (I + W / 2**k)**(2**k) ~ expm(W) (I - W**2 / 2**(k+1)) remains: |error| <~ |W|**2 / 2**(k+1) * radius
    bound = 0.5**2 / 2**9 * radius[interior].max().item()
    assert errors[8] < 1.5 * bound
    assert errors[3] > 4 * errors[8]  # and it converges with more steps
    assert expected[0][:, interior].abs().max() > 3.0  # a large, non-trivial rotation


@pytest.mark.parametrize("shape", [(20, 24), (10, 12, 14)])
def test_constant_svf_is_a_translation(shape):
    n = len(shape)
    shift = torch.tensor([2.5, -1.25, 0.75][:n], dtype=torch.float64).view(1, -1, *([1] * n))
    svf = shift.expand(2, -1, *shape).clone()
    torch.testing.assert_close(scaling_and_squaring(svf), svf, atol=1e-12, rtol=0)
    torch.testing.assert_close(integrate_inverse(svf), -svf, atol=1e-12, rtol=0)


def _smooth_svf(shape, amplitude: float) -> torch.Tensor:
    """Smooth random SVF ``(1, N, *shape)``: per component a sum of plane waves, max |v| == amplitude."""
    n = len(shape)
    grid = identity_grid(shape, dtype=torch.float64)[0]
    svf = torch.zeros(1, n, *shape, dtype=torch.float64)
    for i in range(n):
        for _ in range(3):
            direction = torch.randn(n, dtype=torch.float64)
            wave = direction / direction.norm() * (2 * np.pi / (1.5 * max(shape)))  # wavelength 1.5 x grid
            svf[0, i] += torch.sin(
                torch.einsum("j,j...->...", wave, grid) + 2 * np.pi * torch.rand(()).item()
            )
    return svf * (amplitude / svf.abs().max())


@pytest.mark.parametrize(("shape", "amplitude"), [((48, 40), 3.0), ((20, 22, 18), 2.0)])
def test_inverse_composes_to_identity(shape, amplitude):
    svf = _smooth_svf(shape, amplitude)
    forward, inverse = scaling_and_squaring(svf), integrate_inverse(svf)
    assert forward.abs().max() > 0.8 * amplitude
    inner = (..., *[slice(4, -4)] * len(shape))  # away from the border, where the flow leaves the grid
    for composed in (compose_ddf(forward, inverse), compose_ddf(inverse, forward)):
        assert composed[inner].abs().max() < 0.03 * amplitude


def _min_jacobian_determinant(ddf: torch.Tensor) -> float:
    """Smallest det(d phi / dx) of the 2D map x + ddf(x) (central differences, border excluded)."""
    phi = (identity_grid(ddf.shape[2:], dtype=ddf.dtype) + ddf)[0].numpy()
    jac = [np.gradient(phi[i], axis=(0, 1)) for i in range(2)]
    det = jac[0][0] * jac[1][1] - jac[0][1] * jac[1][0]
    return float(det[4:-4, 4:-4].min())


def test_large_svf_integrates_without_folding():
    """Scaled up until the SVF read as a plain DDF folds, its exponential still does not fold."""
    unit = _smooth_svf((64, 64), 1.0)
    amplitude = next(a for a in range(5, 100, 5) if _min_jacobian_determinant(a * unit) < -0.2)
    assert _min_jacobian_determinant(scaling_and_squaring(amplitude * unit)) > 0


def test_gradients_flow_and_module_matches_function():
    svf = (_smooth_svf((12, 10, 8), 2.0)).float().expand(2, -1, -1, -1, -1).clone().requires_grad_(True)
    module = ScalingAndSquaring(steps=5)
    ddf = module(svf)
    torch.testing.assert_close(ddf, scaling_and_squaring(svf, 5))
    torch.testing.assert_close(module.inverse(svf), integrate_inverse(svf, 5))
    (ddf**2).mean().backward()
    assert torch.isfinite(svf.grad).all() and svf.grad.abs().sum() > 0
    svf64 = torch.randn(1, 2, 5, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v: scaling_and_squaring(v, steps=2), (svf64,))


def test_bad_arguments_raise():
    assert torch.equal(scaling_and_squaring(torch.ones(1, 2, 4, 4), steps=0), torch.ones(1, 2, 4, 4))
    with pytest.raises(ValueError, match="steps"):
        ScalingAndSquaring(steps=-1)
    with pytest.raises(ValueError, match="svf"):
        scaling_and_squaring(torch.zeros(1, 3, 4, 4))
