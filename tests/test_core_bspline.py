"""Cubic B-spline FFD core: equality with SimpleITK's BSplineTransform, polynomial reproduction, gradients."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from regnet_zoo.core.bspline import BSplineTransformer, bspline_ddf, control_grid_shape, cubic_bspline


def sitk_bspline_ddf(
    coefficients: np.ndarray, shape: tuple[int, ...], spacing: tuple[int, ...]
) -> np.ndarray:
    """Dense DDF ``(N, *shape)`` of an ITK BSplineTransform set up as documented in ``core/bspline.py``.

    ITK axis ``j`` is array axis ``N - 1 - j``; ITK parameters are the coefficient images concatenated
    component by component, each in ITK buffer order (x fastest = numpy C order of the ``(*C)`` array).
    """
    nd = len(shape)
    grid = coefficients.shape[1:]
    tx = sitk.BSplineTransform(nd, 3)
    tx.SetTransformDomainOrigin([0.0] * nd)
    tx.SetTransformDomainDirection(np.eye(nd).ravel().tolist())
    tx.SetTransformDomainMeshSize([grid[i] - 3 for i in reversed(range(nd))])
    tx.SetTransformDomainPhysicalDimensions([float((grid[i] - 3) * spacing[i]) for i in reversed(range(nd))])
    tx.SetParameters(np.concatenate([coefficients[i].ravel() for i in reversed(range(nd))]).tolist())
    size = [shape[i] for i in reversed(range(nd))]
    field = sitk.TransformToDisplacementField(
        tx, sitk.sitkVectorFloat64, size, [0.0] * nd, [1.0] * nd, np.eye(nd).ravel().tolist()
    )
    vectors = sitk.GetArrayFromImage(field)  # (*shape, N), components in ITK axis order
    return np.moveaxis(vectors[..., ::-1], -1, 0)


@pytest.mark.parametrize(
    "shape, spacing",
    [
        ((13, 17), (4, 3)),  # (S - 1) divisible by s on one axis: last voxel on the domain edge
        ((20, 11), (5, 5)),
        ((9, 10, 11), (2, 3, 5)),
        ((8, 8, 8), (3, 3, 3)),
    ],
)
def test_equals_simpleitk_bspline_transform(shape, spacing):
    rng = np.random.default_rng(sum(shape))
    grid = control_grid_shape(shape, spacing)
    coefficients = rng.normal(size=(len(shape), *grid)) * 3.0
    expected = sitk_bspline_ddf(coefficients, shape, spacing)
    ours = bspline_ddf(torch.from_numpy(coefficients)[None], shape, spacing)[0].numpy()
    assert ours.shape == expected.shape == (len(shape), *shape)
    assert np.abs(expected).max() > 0.5  # a non-trivial field
    np.testing.assert_allclose(ours, expected, atol=1e-10, rtol=0)


def test_equals_simpleitk_coefficient_image_constructor():
    """Same field when ITK is built from coefficient images (origin ``-s``, spacing ``s``)."""
    shape, spacing = (15, 12), (4, 3)
    grid = control_grid_shape(shape, spacing)
    coefficients = np.random.default_rng(1).normal(size=(2, *grid))
    images = []
    for i in reversed(range(2)):
        image = sitk.GetImageFromArray(coefficients[i])
        image.SetSpacing([float(s) for s in reversed(spacing)])
        image.SetOrigin([-float(s) for s in reversed(spacing)])
        images.append(image)
    tx = sitk.BSplineTransform(images, 3)
    field = sitk.TransformToDisplacementField(
        tx, sitk.sitkVectorFloat64, list(reversed(shape)), [0.0, 0.0], [1.0, 1.0], [1.0, 0.0, 0.0, 1.0]
    )
    expected = np.moveaxis(sitk.GetArrayFromImage(field)[..., ::-1], -1, 0)
    ours = bspline_ddf(torch.from_numpy(coefficients)[None], shape, spacing)[0].numpy()
    np.testing.assert_allclose(ours, expected, atol=1e-10, rtol=0)


def test_reproduces_affine_fields():
    """Cubic B-splines reproduce linear polynomials: c_k = A p_k + b gives u(x) = A x + b exactly."""
    shape, spacing = (11, 14, 9), (3, 4, 2)
    grid = control_grid_shape(shape, spacing)
    matrix = torch.randn(3, 3, dtype=torch.float64)
    offset = torch.randn(3, dtype=torch.float64)
    control_axes = [
        (torch.arange(c, dtype=torch.float64) - 1) * s for c, s in zip(grid, spacing, strict=True)
    ]
    control_pos = torch.stack(torch.meshgrid(*control_axes, indexing="ij"))
    voxel_axes = [torch.arange(n, dtype=torch.float64) for n in shape]
    voxel_pos = torch.stack(torch.meshgrid(*voxel_axes, indexing="ij"))
    coefficients = torch.einsum("ij,j...->i...", matrix, control_pos) + offset.view(3, 1, 1, 1)
    expected = torch.einsum("ij,j...->i...", matrix, voxel_pos) + offset.view(3, 1, 1, 1)
    ours = bspline_ddf(coefficients[None], shape, spacing)[0]
    torch.testing.assert_close(ours, expected, atol=1e-10, rtol=0)


def test_basis_function_values():
    t = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, -1.0, 3.0])
    expected = torch.tensor([2 / 3, 23 / 48, 1 / 6, 1 / 48, 0.0, 1 / 6, 0.0])
    torch.testing.assert_close(cubic_bspline(t), expected)


def test_gradients_and_module():
    shape, spacing = (10, 9), 3
    module = BSplineTransformer(shape, spacing)
    assert module.grid_shape == control_grid_shape(shape, spacing) == (6, 6)
    coefficients = torch.randn(2, 2, *module.grid_shape, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(module, (coefficients,))
    ddf = module(coefficients.float())
    assert ddf.shape == (2, 2, *shape)


def test_rejects_wrong_grid():
    with pytest.raises(ValueError, match="expected"):
        bspline_ddf(torch.zeros(1, 2, 5, 5), (10, 9), 3)
    with pytest.raises(ValueError, match="control_spacing"):
        control_grid_shape((10, 9), 0)
