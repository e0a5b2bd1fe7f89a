"""regnet_zoo.core.spatial vs independent references: SimpleITK resampling and geometry, analytic fields."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from regnet_zoo.core.spatial import (
    Warper,
    compose_ddf,
    ddf_physical_to_voxel,
    ddf_voxel_to_physical,
    identity_grid,
    physical_to_voxel,
    resize_ddf,
    sample_image,
    voxel_to_physical,
    warp_image,
    warp_labels,
    warp_points,
)

SITK_INTERPOLATORS = {
    "linear": sitk.sitkLinear,
    "nearest": sitk.sitkNearestNeighbor,
    "cubic": sitk.sitkBSpline,
}


# ---------------------------------------------------------------- helpers: fields, images, SimpleITK geometry
def _smooth_ddf(shape, amplitude: float, dtype=torch.float64, coarse: int = 4) -> torch.Tensor:
    """Random smooth DDF ``(1, N, *shape)`` with max |component| == amplitude (voxels)."""
    n = len(shape)
    noise = torch.randn(1, n, *([coarse] * n), dtype=dtype)
    field = F.interpolate(
        noise, size=tuple(shape), mode="bilinear" if n == 2 else "trilinear", align_corners=True
    )
    return field * (amplitude / field.abs().max())


def _smooth_image(shape, dtype=torch.float64) -> torch.Tensor:
    """Synthetic image ``(1, 1, *shape)``: sum of a few Gaussian blobs plus a gentle ramp."""
    grid = identity_grid(shape, dtype=dtype)[0]
    image = 0.01 * grid.sum(0)
    for _ in range(5):
        centre = torch.tensor([np.random.uniform(0.2, 0.8) * s for s in shape], dtype=dtype)
        width = 0.15 * min(shape)
        dist2 = ((grid - centre.view(-1, *([1] * len(shape)))) ** 2).sum(0)
        image = image + torch.exp(-dist2 / (2 * width**2))
    return image[None, None]


def _direction(n: int) -> np.ndarray:
    """A non-trivial direction cosine matrix (rotation, in 3D also an axis flip)."""
    if n == 2:
        a = 0.3
        return np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    a, b = 0.3, -0.2
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    return rz @ rx @ np.diag([1.0, -1.0, 1.0])


def _sitk_image(array: np.ndarray, spacing=None, origin=None, direction=None) -> sitk.Image:
    """SimpleITK image of ``array`` (array axes = reversed ITK index) with a non-trivial geometry."""
    n = array.ndim
    image = sitk.GetImageFromArray(array.astype(np.float64))
    image.SetSpacing(spacing or (0.7, 1.3, 2.1)[:n])
    image.SetOrigin(origin or (-12.5, 30.25, 4.0)[:n])
    image.SetDirection(tuple((direction if direction is not None else _direction(n)).ravel()))
    return image


def _array_affine(image: sitk.Image) -> np.ndarray:
    """(N+1)x(N+1) map from array-axis voxel coordinates to ITK physical (LPS) coordinates."""
    n = image.GetDimension()
    reverse = np.eye(n)[::-1]  # itk index (x, y, z) = reversed array axes
    affine = np.eye(n + 1)
    affine[:n, :n] = np.array(image.GetDirection()).reshape(n, n) @ np.diag(image.GetSpacing()) @ reverse
    affine[:n, n] = image.GetOrigin()
    return affine


def _sitk_warp(image: sitk.Image, ddf: torch.Tensor, mode: str) -> np.ndarray:
    """Resample ``image`` with a DisplacementFieldTransform built from the voxel DDF ``(1, N, *S)``."""
    n = image.GetDimension()
    linear = np.array(image.GetDirection()).reshape(n, n) @ np.diag(image.GetSpacing())
    # array-axis displacement -> ITK index displacement (reverse) -> physical (numpy, independent of the code)
    voxel_disp = np.moveaxis(ddf[0].numpy(), 0, -1)[..., ::-1]
    physical_disp = voxel_disp @ linear.T
    field = sitk.GetImageFromArray(np.ascontiguousarray(physical_disp), isVector=True)
    field.CopyInformation(image)
    transform = sitk.DisplacementFieldTransform(sitk.Cast(field, sitk.sitkVectorFloat64))
    out = sitk.Resample(image, image, transform, SITK_INTERPOLATORS[mode], 0.0, sitk.sitkFloat64)
    return sitk.GetArrayFromImage(out)


def _inside_mask(ddf: torch.Tensor, margin: float) -> np.ndarray:
    """Voxels whose mapped point x + ddf(x) stays ``margin`` voxels inside the grid, and x likewise."""
    shape = ddf.shape[2:]
    grid = identity_grid(shape, dtype=ddf.dtype)
    ok = torch.ones(shape, dtype=torch.bool)
    for coords in (grid[0], (grid + ddf)[0]):
        for i, n in enumerate(shape):
            ok &= (coords[i] >= margin) & (coords[i] <= n - 1 - margin)
    return ok.numpy()


def _check_against_sitk(array: np.ndarray, mode: str, amplitude: float = 2.5) -> None:
    image_sitk = _sitk_image(array)
    image = torch.from_numpy(array.astype(np.float64))[None, None]
    ddf = _smooth_ddf(array.shape, amplitude)
    ours = warp_image(image, ddf, mode=mode)[0, 0].numpy()
    reference = _sitk_warp(image_sitk, ddf, mode)
    mask = _inside_mask(ddf, margin=0.5 if mode != "cubic" else 2.0)
    assert mask.mean() > 0.3
    value_range = array.max() - array.min()
    diff = np.abs(ours - reference)[mask]
    if mode == "nearest":
        # identical lookups except (vanishingly rare) exact half-voxel ties
        assert (diff == 0).mean() > 0.999
    else:
        tol = 1e-9 if mode == "linear" else 1e-5  # cubic: same B-spline, prefilter solved differently
        assert diff.max() <= tol * value_range
    # and the warp actually moved things (the comparison is not trivially identity)
    assert np.abs(ours - array)[mask].max() > 0.05 * value_range


# ---------------------------------------------------------------- identity grid and basic warps
def test_identity_grid_values_and_shape():
    grid = identity_grid((3, 4, 5), dtype=torch.float64)
    assert grid.shape == (1, 3, 3, 4, 5)
    assert grid[0, 0, 2, 1, 3] == 2 and grid[0, 1, 2, 1, 3] == 1 and grid[0, 2, 2, 1, 3] == 3


@pytest.mark.parametrize("mode", ["linear", "nearest", "cubic"])
@pytest.mark.parametrize("shape", [(23, 19), (14, 17, 12)])
def test_integer_translation_is_a_shift(mode, shape):
    """A constant integer DDF shifts the image: warped[x] = image[x + t] (zeros outside)."""
    image = torch.rand(2, 3, *shape, dtype=torch.float64)
    shift = [2, -1, 3][: len(shape)]
    ddf = torch.tensor(shift, dtype=torch.float64).view(1, -1, *([1] * len(shape))).expand(2, -1, *shape)
    warped = warp_image(image, ddf, mode=mode, padding_mode="zeros")
    expected = torch.zeros_like(image)
    src = tuple(slice(max(s, 0), n + min(s, 0)) for s, n in zip(shift, shape, strict=True))
    dst = tuple(slice(max(-s, 0), n + min(-s, 0)) for s, n in zip(shift, shape, strict=True))
    expected[(..., *dst)] = image[(..., *src)]
    torch.testing.assert_close(warped, expected, atol=1e-10, rtol=0)


@pytest.mark.parametrize("mode", ["linear", "cubic"])
def test_border_padding_is_constant_outside(mode):
    image = torch.rand(1, 1, 9, 11, dtype=torch.float64)
    ddf = torch.zeros(1, 2, 9, 11, dtype=torch.float64)
    ddf[:, 1] = 30.0  # everything samples far beyond the last column
    warped = warp_image(image, ddf, mode=mode, padding_mode="border")
    expected = image[..., -1:].expand_as(image)
    torch.testing.assert_close(warped, expected, atol=1e-10, rtol=0)


@pytest.mark.parametrize("mode", ["linear", "nearest", "cubic"])
@pytest.mark.parametrize("shape", [(40, 33), (18, 21, 15)])
def test_warp_synthetic_matches_sitk(mode, shape):
    np.random.seed(1)
    _check_against_sitk(_smooth_image(shape)[0, 0].numpy(), mode)


@pytest.mark.parametrize("mode", ["linear", "nearest", "cubic"])
def test_warp_real_3d_mr_matches_sitk(shared_data, mode):
    array = sitk.GetArrayFromImage(sitk.ReadImage(str(shared_data / "tiny_mr_pair" / "anatomical.nii")))
    _check_against_sitk(array.astype(np.float64), mode)


@pytest.mark.parametrize("mode", ["linear", "nearest", "cubic"])
def test_warp_real_2d_slice_matches_sitk(shared_data, mode):
    array = sitk.GetArrayFromImage(
        sitk.ReadImage(str(shared_data / "oasis2d" / "slices" / "oasis2d_0000.nrrd"))
    )
    _check_against_sitk(array.astype(np.float64), mode, amplitude=4.0)


def test_cubic_interpolates_and_is_smoother_than_linear():
    """Cubic passes through the samples and reproduces a cubic polynomial in the interior."""
    grid = identity_grid((30, 30), dtype=torch.float64)
    poly = 0.01 * grid[:, :1] ** 3 - 0.2 * grid[:, 1:] ** 2 + grid[:, :1] * grid[:, 1:]
    torch.testing.assert_close(warp_image(poly, torch.zeros_like(grid), mode="cubic"), poly)
    ddf = torch.full_like(grid, 0.37)
    exact = (
        0.01 * (grid[:, :1] + 0.37) ** 3
        - 0.2 * (grid[:, 1:] + 0.37) ** 2
        + (grid[:, :1] + 0.37) * (grid[:, 1:] + 0.37)
    )
    # the mirror boundary condition breaks polynomials near the edges; its effect decays like 0.268**distance
    inner = (..., slice(12, -12), slice(12, -12))
    cubic_err = (warp_image(poly, ddf, mode="cubic") - exact)[inner].abs().max()
    linear_err = (warp_image(poly, ddf, mode="linear") - exact)[inner].abs().max()
    assert cubic_err < 1e-4 < 0.05 < linear_err


def test_warp_gradients_flow_and_match_finite_differences():
    image = torch.rand(1, 2, 6, 7, dtype=torch.float64, requires_grad=True)
    ddf = (torch.rand(1, 2, 6, 7, dtype=torch.float64) * 2 - 1).requires_grad_(True)
    for mode in ("linear", "cubic"):
        assert torch.autograd.gradcheck(lambda i, d, m=mode: warp_image(i, d, mode=m), (image, ddf))
    image3 = torch.rand(1, 1, 8, 8, 8, requires_grad=True)
    ddf3 = torch.randn(1, 3, 8, 8, 8, requires_grad=True)
    warp_image(image3, ddf3, mode="cubic").square().sum().backward()
    assert torch.isfinite(ddf3.grad).all() and ddf3.grad.abs().sum() > 0 and image3.grad.abs().sum() > 0


def test_warper_module_and_batch_broadcast():
    image = torch.rand(3, 2, 10, 12)
    ddf = _smooth_ddf((10, 12), 2.0, dtype=torch.float32)
    out = Warper(mode="cubic")(image, ddf)
    assert out.shape == image.shape
    torch.testing.assert_close(out[1:2], warp_image(image[1:2], ddf, mode="cubic"))


def test_bad_arguments_raise():
    image, ddf = torch.rand(1, 1, 8, 8), torch.zeros(1, 2, 8, 8)
    with pytest.raises(ValueError, match="mode"):
        warp_image(image, ddf, mode="quintic")
    with pytest.raises(ValueError, match="padding_mode"):
        warp_image(image, ddf, padding_mode="reflection")
    with pytest.raises(ValueError, match="shape"):
        warp_image(image, torch.zeros(1, 2, 8, 9))
    with pytest.raises(ValueError, match="integer"):
        warp_labels(torch.full((1, 1, 8, 8), 0.5), ddf)


# ---------------------------------------------------------------- labels
def _blocky_labels(shape, values) -> torch.Tensor:
    """Label map with large regions of the given (non-contiguous) values."""
    grid = identity_grid(shape)[0]
    region = ((grid[0] // 5) * 3 + grid[-1] // 7).long() % len(values)
    return torch.tensor(values)[region][None, None]


@pytest.mark.parametrize("method", ["nearest", "onehot"])
@pytest.mark.parametrize("shape", [(40, 36), (20, 18, 16)])
def test_label_warp_keeps_label_set(method, shape):
    values = [0, 3, 17, 1000]
    labels = _blocky_labels(shape, values)
    ddf = _smooth_ddf(shape, 3.0, dtype=torch.float32)
    warped = warp_labels(labels, ddf, method=method)
    assert warped.shape == labels.shape and warped.dtype == torch.int64
    assert set(warped.unique().tolist()) <= set(values)
    # a real deformation changed some labels, but most voxels keep a plausible label
    assert 0.0 < (warped != labels).float().mean() < 0.5
    # identity warp is exact
    assert torch.equal(warp_labels(labels, torch.zeros_like(ddf), method=method), labels)


def test_nearest_label_warp_matches_sitk_and_onehot_agrees(shared_data):
    nifti = sitk.ReadImage(str(shared_data / "oasis2d" / "atlas_label.nii.gz"))
    array = sitk.GetArrayFromImage(nifti).astype(np.int64)
    array = array.reshape(array.shape[-2:]) if array.ndim == 3 else array
    labels = torch.from_numpy(array)[None, None]
    ddf = _smooth_ddf(array.shape, 4.0)
    nearest = warp_labels(labels, ddf, method="nearest")
    reference = _sitk_warp(_sitk_image(array.astype(np.float64)), ddf, "nearest")
    mask = _inside_mask(ddf, 0.5)
    assert (nearest[0, 0].numpy() == reference)[mask].mean() > 0.999
    onehot = warp_labels(labels, ddf, method="onehot", chunk_size=5)
    assert set(onehot.unique().tolist()) <= set(labels.unique().tolist())
    assert (onehot == nearest).float().mean() > 0.95
    num_classes = int(array.max()) + 1
    torch.testing.assert_close(warp_labels(labels, ddf, "onehot", num_classes=num_classes), onehot)


# ---------------------------------------------------------------- points, composition, resizing
def _affine_ddf(shape, matrix: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """DDF of the voxel map x -> M x + t on a grid of ``shape``: ``(1, N, *shape)``."""
    grid = identity_grid(shape, dtype=torch.float64)
    mapped = torch.einsum("ij,bj...->bi...", matrix, grid) + offset.view(1, -1, *([1] * len(shape)))
    return mapped - grid


def _random_affine(n: int, scale: float = 0.08):
    return torch.eye(n, dtype=torch.float64) + scale * torch.randn(n, n, dtype=torch.float64), torch.randn(
        n, dtype=torch.float64
    )


@pytest.mark.parametrize("shape", [(30, 25), (16, 20, 18)])
def test_warp_points_matches_analytic_affine_field(shape):
    n = len(shape)
    matrix, offset = _random_affine(n)
    ddf = _affine_ddf(shape, matrix, offset).expand(2, -1, *shape)
    points = torch.rand(2, 17, n, dtype=torch.float64) * (torch.tensor(shape, dtype=torch.float64) - 1)
    expected = points @ matrix.T + offset
    torch.testing.assert_close(warp_points(points, ddf), expected, atol=1e-10, rtol=0)
    # float32 points broadcast against a single field too
    out32 = warp_points(points.float(), ddf[:1].float())
    torch.testing.assert_close(out32, expected.float(), atol=1e-4, rtol=0)


@pytest.mark.parametrize("shape", [(24, 20), (12, 14, 10)])
def test_compose_translations_is_sum(shape):
    n = len(shape)
    t1, t2 = torch.randn(n, dtype=torch.float64), torch.randn(n, dtype=torch.float64)
    eye = torch.eye(n, dtype=torch.float64)
    composed = compose_ddf(_affine_ddf(shape, eye, t1), _affine_ddf(shape, eye, t2))
    torch.testing.assert_close(composed, (t1 + t2).view(1, -1, *([1] * n)).expand_as(composed))


@pytest.mark.parametrize("shape", [(40, 36), (22, 20, 24)])
def test_compose_affines_is_product(shape):
    """Points: x -> phi_first(phi_second(x)) = M1 (M2 x + t2) + t1."""
    n = len(shape)
    m1, t1 = _random_affine(n)
    m2, t2 = _random_affine(n)
    composed = compose_ddf(_affine_ddf(shape, m1, t1), _affine_ddf(shape, m2, t2))
    expected = _affine_ddf(shape, m1 @ m2, m1 @ t2 + t1)
    # exact where phi_second(x) stays inside the grid (linear interpolation reproduces affine fields)
    mapped = identity_grid(shape, dtype=torch.float64) + _affine_ddf(shape, m2, t2)
    inside = torch.ones(shape, dtype=torch.bool)
    for i, s in enumerate(shape):
        inside &= (mapped[0, i] >= 0) & (mapped[0, i] <= s - 1)
    assert inside.float().mean() > 0.3
    torch.testing.assert_close(composed[0][:, inside], expected[0][:, inside], atol=1e-9, rtol=0)


def test_compose_matches_sequential_image_warps():
    shape = (48, 44)
    np.random.seed(2)
    image = _smooth_image(shape)
    first, second = _smooth_ddf(shape, 3.0), _smooth_ddf(shape, 3.0)
    twice = warp_image(warp_image(image, first, mode="cubic"), second, mode="cubic")
    once = warp_image(image, compose_ddf(first, second, mode="cubic"), mode="cubic")
    mask = _inside_mask(compose_ddf(first, second), 4.0) & _inside_mask(second, 4.0)
    assert np.abs((twice - once)[0, 0].numpy()[mask]).max() < 2e-3 * float(image.max() - image.min())
    assert np.abs((twice - image)[0, 0].numpy()[mask]).max() > 0.05


@pytest.mark.parametrize(("old", "new"), [((21, 31), (11, 46)), ((9, 13, 17), (17, 7, 33))])
def test_resize_ddf_keeps_the_physical_map(old, new):
    """Both grids cover [0, 1]^N; a linear physical map u -> A u + b gives linear voxel fields on both."""
    n = len(old)
    a, b = _random_affine(n, scale=0.1)
    b = 0.05 * b

    def field(shape):  # voxel-unit DDF of the physical map on a grid of ``shape`` spanning [0, 1]^N
        step = torch.tensor([1.0 / (s - 1) for s in shape], dtype=torch.float64)
        return _affine_ddf(shape, torch.diag(1 / step) @ a @ torch.diag(step), b / step)

    torch.testing.assert_close(resize_ddf(field(old), new), field(new), atol=1e-10, rtol=0)
    # cubic: same map up to the mirror-boundary effect of the spline near the edges
    cubic_err = (resize_ddf(field(old), new, mode="cubic") - field(new)).abs().max()
    assert cubic_err < 0.05 * field(new).abs().max()
    # round trip to a finer grid and back is exact for a linear field
    torch.testing.assert_close(resize_ddf(resize_ddf(field(old), new), old), field(old), atol=1e-10, rtol=0)


# ---------------------------------------------------------------- geometry
@pytest.mark.parametrize("n", [2, 3])
def test_voxel_physical_round_trip_matches_sitk(n):
    shape = (7, 9, 11)[:n]
    image = _sitk_image(np.zeros(shape))
    affine = torch.from_numpy(_array_affine(image))
    points = torch.rand(25, n, dtype=torch.float64) * 10 - 2  # continuous, partly outside the grid
    physical = voxel_to_physical(points, affine)
    reference = [image.TransformContinuousIndexToPhysicalPoint(p[::-1].tolist()) for p in points.numpy()]
    torch.testing.assert_close(physical, torch.tensor(reference, dtype=torch.float64), atol=1e-10, rtol=0)
    back = [image.TransformPhysicalPointToContinuousIndex(p) for p in reference]
    back = torch.tensor(back, dtype=torch.float64).flip(-1)  # ITK (x, y, z) index -> array axes
    torch.testing.assert_close(physical_to_voxel(physical, affine), back)
    torch.testing.assert_close(physical_to_voxel(physical, affine.numpy()), points)
    # batched affines act per batch element
    batched = torch.stack([affine, affine @ torch.diag(torch.tensor([2.0] * n + [1.0], dtype=torch.float64))])
    out = voxel_to_physical(points.expand(2, -1, -1), batched)
    torch.testing.assert_close(out[0], physical)
    torch.testing.assert_close(out[1], voxel_to_physical(2 * points, affine))


@pytest.mark.parametrize("n", [2, 3])
def test_ddf_physical_conversion_matches_point_differences(n):
    shape = (6, 8, 5)[:n]
    image = _sitk_image(np.zeros(shape))
    affine = torch.from_numpy(_array_affine(image)).float()
    ddf = torch.randn(2, n, *shape)
    physical = ddf_voxel_to_physical(ddf, affine)
    grid = identity_grid(shape).expand(2, -1, *shape)
    to_points = lambda f: f.movedim(1, -1)  # noqa: E731 (B, N, *S) -> (B, *S, N)
    expected = voxel_to_physical(to_points(grid + ddf), affine) - voxel_to_physical(to_points(grid), affine)
    torch.testing.assert_close(to_points(physical), expected, atol=1e-4, rtol=1e-4)
    # spacing scales lengths: the physical displacement of a unit voxel step along axis 0 has the axis spacing
    unit = torch.zeros(1, n, *shape)
    unit[:, 0] = 1.0
    norm = ddf_voxel_to_physical(unit, affine).norm(dim=1)
    torch.testing.assert_close(norm, torch.full_like(norm, image.GetSpacing()[::-1][0]))
    torch.testing.assert_close(ddf_physical_to_voxel(physical, affine), ddf, atol=1e-5, rtol=1e-5)


def test_sample_image_rejects_mismatched_coords():
    with pytest.raises(ValueError, match="coords"):
        sample_image(torch.rand(1, 1, 5, 5), torch.rand(1, 3, 5, 5))
