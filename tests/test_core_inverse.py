"""regnet_zoo.core.inverse: inverses of analytic fields, vs SimpleITK's InvertDisplacementField, SVFs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from regnet_zoo.core.integration import scaling_and_squaring
from regnet_zoo.core.inverse import inverse_consistency_error, invert_ddf, invert_svf
from regnet_zoo.core.spatial import identity_grid


def _centre(shape):
    return torch.tensor([(s - 1) / 2 for s in shape], dtype=torch.float64).view(1, -1, *([1] * len(shape)))


def _linear_map(n: int) -> np.ndarray:
    """A rotation (0.15 rad), anisotropic scaling and shear: far from a translation, invertible."""
    c, s = math.cos(0.15), math.sin(0.15)
    rot = np.eye(n)
    rot[:2, :2] = [[c, -s], [s, c]]
    return rot @ np.diag([1.08, 0.93, 1.04][:n]) + 0.04 * np.triu(np.ones((n, n)), 1)


def _sinusoid(shape, amplitude: float = 2.0):
    """Smooth field ``u_i(x) = a sin(2 pi x_{i+1} / L)``: max |grad u| = 2 pi a / L < 1 (invertible)."""
    grid = identity_grid(shape, dtype=torch.float64)
    n = len(shape)
    comps = [amplitude * torch.sin(2 * math.pi * grid[:, (i + 1) % n] / shape[(i + 1) % n]) for i in range(n)]
    return torch.stack(comps, dim=1)


@pytest.mark.parametrize("shape", [(40, 44), (22, 24, 20)])
def test_affine_field_inverse_matches_analytic(shape):
    n = len(shape)
    m = _linear_map(n)
    rel = identity_grid(shape, dtype=torch.float64) - _centre(shape)
    ddf = torch.einsum("ij,bj...->bi...", torch.from_numpy(m - np.eye(n)), rel)
    expected = torch.einsum("ij,bj...->bi...", torch.from_numpy(np.linalg.inv(m) - np.eye(n)), rel)
    inverse = invert_ddf(ddf, iterations=200, tolerance=1e-8)
    # inside a ball around the centre phi^-1 stays on the grid, where linear interpolation of a linear field
    # is exact: the fixed point is the analytic inverse
    interior = rel.norm(dim=1)[0] < 0.3 * min(shape)
    assert expected[0][:, interior].abs().max() > 1.0  # a real, non-trivial inverse
    assert (inverse - expected)[0][:, interior].abs().max() < 1e-5
    # -ddf (the first-order guess) is far from it: the iteration did the work
    assert (-ddf - expected)[0][:, interior].abs().max() > 0.03


@pytest.mark.parametrize("shape", [(48, 40), (24, 20, 22)])
def test_sinusoidal_field_is_inverse_consistent(shape):
    ddf = _sinusoid(shape, amplitude=0.1 * min(shape) / (2 * math.pi) * 5)  # max |grad u| = 0.5
    assert ddf.abs().max() > 1.5
    inverse = invert_ddf(ddf, iterations=200, tolerance=1e-7)
    spacing = [1.0, 2.5, 0.7][: len(shape)]
    err = inverse_consistency_error(ddf, inverse, spacing)
    assert err["inverse_consistency_p95_mm"] < 1e-3
    naive = inverse_consistency_error(ddf, -ddf, spacing)
    assert naive["inverse_consistency_mean_mm"] > 100 * err["inverse_consistency_mean_mm"]


def _to_sitk(ddf: torch.Tensor) -> sitk.Image:
    """Our ``(1, N, *S)`` voxel field -> ITK field on a unit, identity-direction grid (index = physical)."""
    n = ddf.shape[1]
    arr = ddf[0].permute(*range(n, 0, -1), 0).numpy()  # (z, y, x, N); components stay in index order
    return sitk.GetImageFromArray(np.ascontiguousarray(arr), isVector=True)


def _from_sitk(image: sitk.Image) -> torch.Tensor:
    arr = torch.from_numpy(sitk.GetArrayFromImage(image).astype(np.float64))
    n = image.GetDimension()
    return arr.permute(n, *range(n - 1, -1, -1))[None]


@pytest.mark.parametrize("shape", [(36, 30), (18, 20, 16)])
def test_matches_sitk_invert_displacement_field(shape):
    ddf = _sinusoid(shape, amplitude=1.5)
    ddf[:, 0] += 0.8  # plus a translation
    reference = sitk.InvertDisplacementField(
        _to_sitk(ddf),
        maximumNumberOfIterations=200,
        maxErrorToleranceThreshold=1e-6,
        meanErrorToleranceThreshold=1e-7,
        enforceBoundaryCondition=False,
    )
    ours = invert_ddf(ddf, iterations=200, tolerance=1e-7)
    ref = _from_sitk(reference)
    # away from the border (where ITK extrapolates differently) the two agree to interpolation accuracy
    inner = (slice(None), slice(None)) + tuple(slice(3, s - 3) for s in shape)
    assert ref[inner].abs().max() > 1.0
    torch.testing.assert_close(ours[inner], ref[inner], atol=0.02, rtol=0)


@pytest.mark.parametrize("shape", [(32, 36), (16, 18, 14)])
def test_svf_inverse_is_exact_and_agrees_with_fixed_point(shape):
    svf = _sinusoid(shape, amplitude=1.2) + 0.3
    ddf = scaling_and_squaring(svf, 7)
    exact = invert_svf(svf, 7)
    inner = (slice(None), slice(None)) + tuple(slice(3, s - 3) for s in shape)
    mask = torch.zeros(shape, dtype=torch.bool)
    mask[inner[2:]] = True
    # exp(-v) is the inverse of the flow; against the discrete exp(v) (interpolated squarings) it is off by
    # the integration's discretisation error only (~0.01 voxel for this field, more on the coarse 3D grid)
    err = inverse_consistency_error(ddf, exact, mask=mask)
    assert err["inverse_consistency_p95_voxel"] < (0.015 if len(shape) == 2 else 0.06)
    naive = inverse_consistency_error(ddf, -ddf, mask=mask)
    assert naive["inverse_consistency_p95_voxel"] > 5 * err["inverse_consistency_p95_voxel"]
    torch.testing.assert_close(exact[inner], invert_ddf(ddf, tolerance=1e-7)[inner], atol=0.05, rtol=0)
    # refining exp(-v) by the fixed-point iteration reaches the discrete inverse
    refined = invert_ddf(ddf, iterations=30, tolerance=1e-7, initial=exact)
    assert inverse_consistency_error(ddf, refined, mask=mask)["inverse_consistency_p95_voxel"] < 1e-4


def test_error_in_mm_uses_spacing_and_mask():
    shape = (10, 12, 8)
    shift = torch.tensor([1.0, 2.0, -1.0], dtype=torch.float64).view(1, 3, 1, 1, 1).expand(1, 3, *shape)
    zero = torch.zeros_like(shift)
    err = inverse_consistency_error(shift, zero, spacing=[2.0, 0.5, 3.0])  # residual = the shift itself
    assert err["inverse_consistency_mean_mm"] == pytest.approx(math.sqrt(4 + 1 + 9))
    assert err["inverse_consistency_p95_mm"] == pytest.approx(math.sqrt(14))
    mask = torch.zeros(shape, dtype=torch.bool)
    mask[2:4] = True
    shift2 = shift.clone()
    shift2[:, :, 2:4] = 0.0
    assert inverse_consistency_error(shift2, zero, mask=mask)["inverse_consistency_mean_voxel"] == 0.0
    with pytest.raises(ValueError):
        inverse_consistency_error(shift, zero, mask=torch.zeros(shape, dtype=torch.bool))


def test_folding_field_is_reported_inconsistent():
    shape = (40, 40)
    ddf = _sinusoid(shape, amplitude=12.0)  # max |grad u| ~ 1.9: folds
    err = inverse_consistency_error(ddf, invert_ddf(ddf, iterations=50))
    assert err["inverse_consistency_p95_voxel"] > 0.5
