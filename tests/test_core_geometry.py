"""core.geometry against SimpleITK's own index <-> physical point maps (the independent reference)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from regnet_zoo.core.geometry import (
    affine_ddf,
    affine_from_itk,
    as_4x4,
    itk_geometry,
    lps_to_voxel,
    spacing_from_affine,
    voxel_affine,
    voxel_to_lps,
)


def sitk_image(spatial_dims: int) -> sitk.Image:
    image = sitk.Image([7, 5, 4][:spatial_dims], sitk.sitkFloat32)
    c, s = math.cos(0.3), math.sin(0.3)
    direction = [c, -s, s, c] if spatial_dims == 2 else [c, 0, s, 0, 1, 0, -s, 0, c]
    image.SetDirection(direction)
    image.SetSpacing([0.7, 1.3, 2.1][:spatial_dims])
    image.SetOrigin([4.0, -2.5, 9.0][:spatial_dims])
    return image


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_points_and_geometry_match_simpleitk(spatial_dims):
    image = sitk_image(spatial_dims)
    affine = affine_from_itk(image.GetDirection(), image.GetSpacing(), image.GetOrigin())
    rng = np.random.default_rng(0)
    voxels = rng.uniform(-1, 6, size=(9, spatial_dims))
    expected = np.array([image.TransformContinuousIndexToPhysicalPoint(v.tolist()) for v in voxels])
    np.testing.assert_allclose(voxel_to_lps(voxels, affine), expected, atol=1e-9)
    np.testing.assert_allclose(lps_to_voxel(expected, affine), voxels, atol=1e-9)
    origin, spacing, direction = itk_geometry(affine, spatial_dims)
    np.testing.assert_allclose(origin, image.GetOrigin(), atol=1e-12)
    np.testing.assert_allclose(spacing, image.GetSpacing(), atol=1e-12)
    np.testing.assert_allclose(direction, image.GetDirection(), atol=1e-12)
    np.testing.assert_allclose(spacing_from_affine(affine, spatial_dims), image.GetSpacing(), atol=1e-12)


def test_2d_affine_embedding_and_spacing_use_the_array_axes_only():
    a3 = np.array([[0.0, 2.0, 5.0], [3.0, 0.0, -1.0], [0.0, 0.0, 1.0]])
    a4 = as_4x4(a3)
    assert a4.shape == (4, 4) and a4[2, 2] == 1.0 and a4[0, 3] == 5.0 and a4[1, 3] == -1.0
    a4[2, :2] = [7.0, 7.0]  # a third row entry must not leak into the 2D spacing
    assert spacing_from_affine(a4, 2) == [3.0, 2.0]
    with pytest.raises(ValueError, match="3x3 or 4x4"):
        as_4x4(np.eye(5))


def test_affine_ddf_and_voxel_affine():
    m = np.array([[1.1, 0.2, 3.0], [-0.1, 0.9, -2.0], [0.0, 0.0, 1.0]])
    ddf = affine_ddf(m, (4, 6), dtype=torch.float64)[0]
    i, j = 2, 5
    expected = m[:2, :2] @ np.array([i, j]) + m[:2, 2] - np.array([i, j])
    np.testing.assert_allclose(ddf[:, i, j].numpy(), expected, atol=1e-12)
    # a physical map between two grids, as a voxel map: A_m^-1 T A_f
    fixed = affine_from_itk(np.eye(2), (2.0, 1.0), (1.0, 1.0))
    moving = affine_from_itk(np.eye(2), (1.0, 0.5), (0.0, 0.0))
    translation = np.eye(3)
    translation[:2, 2] = [1.0, -1.0]  # RAS mm
    v = voxel_affine(translation, fixed, moving, 2)
    p_fixed = np.array([3.0, 2.0, 1.0])
    world = np.eye(3)
    world[:2, :2], world[:2, 2] = as_4x4(fixed)[:2, :2], as_4x4(fixed)[:2, 3]
    moved_world = translation @ world @ p_fixed
    m4 = as_4x4(moving)
    expected_voxel = np.linalg.solve(m4[:2, :2], moved_world[:2] - m4[:2, 3])
    np.testing.assert_allclose((v @ p_fixed)[:2], expected_voxel, atol=1e-12)
