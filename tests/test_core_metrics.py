"""Tests of regnet_zoo.core.metrics: analytic cases and independent references (MONAI, SimpleITK, numpy)."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
import torch

from regnet_zoo.core import metrics
from regnet_zoo.errors import RegistrationInputError


def _grid(shape: tuple[int, ...]) -> list[np.ndarray]:
    return list(np.meshgrid(*[np.arange(s, dtype=np.float64) for s in shape], indexing="ij"))


def _ball(shape: tuple[int, ...], centre: tuple[float, ...], radius: float) -> np.ndarray:
    coords = _grid(shape)
    return sum((c - m) ** 2 for c, m in zip(coords, centre, strict=True)) <= radius**2


def _affine_field(shape: tuple[int, ...], matrix: np.ndarray, offset: np.ndarray) -> torch.Tensor:
    """ddf(x) = matrix @ x + offset as a (1, N, *S) float64 tensor."""
    coords = _grid(shape)
    n = len(shape)
    field = [sum(matrix[i, j] * coords[j] for j in range(n)) + offset[i] for i in range(n)]
    return torch.as_tensor(np.stack(field))[None]


def _onehot(mask: np.ndarray) -> torch.Tensor:
    return torch.as_tensor(mask, dtype=torch.float32)[None, None]


# ------------------------------------------------------------------------------------------------------
# Dice
# ------------------------------------------------------------------------------------------------------
def test_dice_constructed_overlaps_and_absent_labels():
    fixed = np.zeros((20, 20), dtype=np.int64)
    warped = np.zeros_like(fixed)
    fixed[0:10, 0:10] = 1
    warped[5:15, 0:10] = 1  # overlap 50 of 100 + 100 -> 0.5
    fixed[12:20, 12:20] = 2
    warped[12:20, 12:20] = 2  # identical -> 1
    fixed[0:2, 18:20] = 3  # only in fixed -> NaN
    warped[18:20, 0:2] = 4  # only in warped -> NaN
    dice = metrics.dice_per_label(fixed, warped)
    assert sorted(dice) == [1, 2, 3, 4]
    assert dice[1] == pytest.approx(0.5) and dice[2] == pytest.approx(1.0)
    assert math.isnan(dice[3]) and math.isnan(dice[4])
    # explicit labels; a label in neither map is NaN too; torch (1, 1, *S) input accepted
    dice = metrics.dice_per_label(torch.as_tensor(fixed)[None, None], warped, labels=[1, 7])
    assert dice[1] == pytest.approx(0.5) and math.isnan(dice[7])


def test_dice_learn2reg_semantics_with_moving_label():
    fixed = np.zeros((10, 10), dtype=np.int64)
    moving = np.zeros_like(fixed)
    fixed[2:5, 2:5] = 1
    moving[6:9, 6:9] = 1
    warped = np.zeros_like(fixed)  # the registration lost label 1 entirely
    # Learn2Reg checks presence in fixed and (unwarped) moving: a lost label scores 0, not NaN
    assert metrics.dice_per_label(fixed, warped, labels=[1], moving_label=moving)[1] == 0.0
    assert math.isnan(metrics.dice_per_label(fixed, warped, labels=[1])[1])


def test_dice_matches_monai_on_random_maps():
    from monai.metrics import compute_dice

    rng = np.random.default_rng(0)
    fixed = rng.integers(0, 4, size=(12, 14, 10))
    warped = rng.integers(0, 4, size=(12, 14, 10))
    dice = metrics.dice_per_label(fixed, warped)
    for label in (1, 2, 3):
        reference = compute_dice(_onehot(warped == label), _onehot(fixed == label), include_background=True)
        assert dice[label] == pytest.approx(reference.item(), rel=1e-6)


# ------------------------------------------------------------------------------------------------------
# HD95
# ------------------------------------------------------------------------------------------------------
def test_hd95_concentric_discs_is_radius_difference():
    shape = (64, 64)
    fixed = _ball(shape, (32, 31), 10).astype(np.int64)
    warped = _ball(shape, (32, 31), 15).astype(np.int64)
    # every surface point of one disc is |15 - 10| from the other surface (up to the voxel grid)
    assert metrics.hd95(fixed, warped)[1] == pytest.approx(5.0, abs=1.0)


@pytest.mark.parametrize("spacing", [None, (2.0, 1.0, 0.5)])
def test_hd95_offset_spheres_matches_monai(spacing):
    from monai.metrics import compute_hausdorff_distance

    shape = (36, 40, 34)
    fixed = _ball(shape, (18, 20, 17), 10)
    warped = _ball(shape, (21, 18, 17), 7)
    labels_fixed = fixed.astype(np.int64) * 5
    labels_warped = warped.astype(np.int64) * 5
    ours = metrics.hd95(labels_fixed, labels_warped, spacing=spacing)[5]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = compute_hausdorff_distance(
            _onehot(warped), _onehot(fixed), include_background=True, percentile=95, spacing=spacing
        ).item()
    assert ours == pytest.approx(reference, rel=1e-5)
    assert ours > 2.0  # radius 10 vs 7 with a 3.6-voxel offset: clearly apart


def test_hd95_anisotropic_spacing_single_voxels_in_mm():
    fixed = np.zeros((8, 9, 10), dtype=np.int64)
    warped = np.zeros_like(fixed)
    fixed[2, 3, 4] = 1
    warped[5, 3, 7] = 1
    spacing = (2.5, 1.0, 0.7)
    expected = math.hypot(3 * 2.5, 3 * 0.7)
    assert metrics.hd95(fixed, warped, spacing=spacing)[1] == pytest.approx(expected, rel=1e-12)
    assert metrics.hd95(fixed, warped)[1] == pytest.approx(math.hypot(3, 3), rel=1e-12)
    # absent label -> NaN, never 0
    assert math.isnan(metrics.hd95(fixed, warped, labels=[2])[2])
    # a label the warp lost (present in fixed and moving, empty warped): the worst case, the image diagonal
    lost = metrics.hd95(fixed, np.zeros_like(fixed), spacing=spacing, moving_label=warped)[1]
    assert lost == pytest.approx(math.sqrt((8 * 2.5) ** 2 + 9**2 + (10 * 0.7) ** 2), rel=1e-12)


# ------------------------------------------------------------------------------------------------------
# TRE
# ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(20, 24), (12, 14, 16)])
def test_tre_with_known_affine_field(shape):
    n = len(shape)
    rng = np.random.default_rng(1)
    matrix = 0.05 * rng.standard_normal((n, n))
    offset = rng.uniform(-2, 2, n)
    ddf = _affine_field(shape, matrix, offset)
    fixed_points = rng.uniform(1, np.array(shape) - 2, size=(7, n))  # off-grid points inside
    error = rng.standard_normal((7, n))
    moving_points = fixed_points + fixed_points @ matrix.T + offset + error
    spacing = np.array([1.5, 0.8, 2.0][:n])
    expected = np.linalg.norm(error * spacing, axis=1)
    # linear interpolation reproduces an affine field exactly
    ours = metrics.tre(fixed_points, moving_points, ddf, spacing, interpolation="linear")
    np.testing.assert_allclose(ours, expected, rtol=1e-10)
    # translation only, torch inputs with a batch dimension
    translation = _affine_field(shape, np.zeros((n, n)), offset)
    points = torch.as_tensor(fixed_points)[None]
    np.testing.assert_allclose(
        metrics.tre(points, points + torch.as_tensor(offset), translation), 0, atol=1e-12
    )
    with pytest.raises(RegistrationInputError):
        metrics.tre(points, points, translation, interpolation="nearest")


def test_tre_samples_the_field_cubically_by_default():
    """Cubic (Learn2Reg) and linear sampling differ on a curved field; cubic is nearer the analytic value."""
    shape = (24, 26)
    x0, x1 = _grid(shape)
    ddf = torch.as_tensor(np.stack([0.02 * (x0 - 12) ** 2, np.sin(x1 / 3.0)]))[None]
    points = np.array([[10.5, 11.25], [13.3, 9.7], [11.8, 14.4]])
    exact = np.stack([0.02 * (points[:, 0] - 12) ** 2, np.sin(points[:, 1] / 3.0)], axis=1)
    moving = points + exact  # the analytic mapping: TRE 0 for exact sampling
    cubic = metrics.tre(points, moving, ddf)
    linear = metrics.tre(points, moving, ddf, interpolation="linear")
    assert cubic.max() < 2e-3 < linear.max()


# ------------------------------------------------------------------------------------------------------
# Jacobian, SDlogJ, folding
# ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(9, 11), (7, 8, 9)])
def test_jacobian_of_affine_field_is_det_identity_plus_matrix(shape):
    n = len(shape)
    matrix = np.random.default_rng(2).uniform(-0.4, 0.4, (n, n))
    jac = metrics.jacobian_determinant(_affine_field(shape, matrix, np.ones(n)))
    assert jac.shape == (1, *shape)
    np.testing.assert_allclose(jac.numpy(), np.linalg.det(np.eye(n) + matrix), rtol=1e-10)
    identity = metrics.jacobian_determinant(torch.zeros(2, n, *shape))
    assert torch.equal(identity, torch.ones(2, *shape))
    # differentiable: usable in a loss
    field = (0.1 * torch.randn(1, n, *shape)).requires_grad_(True)
    ((metrics.jacobian_determinant(field) - 1.0) ** 2).sum().backward()
    assert torch.isfinite(field.grad).all() and field.grad.abs().sum() > 0


@pytest.mark.parametrize("shape", [(16, 18), (10, 12, 14)])
def test_jacobian_matches_simpleitk_in_the_interior(shape):
    sitk = pytest.importorskip("SimpleITK")
    n = len(shape)
    coarse = torch.randn(1, n, *[4] * n, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    mode = "bilinear" if n == 2 else "trilinear"
    ddf = 2.0 * torch.nn.functional.interpolate(coarse, size=shape, mode=mode, align_corners=True)
    ours = metrics.jacobian_determinant(ddf)[0].numpy()
    # ITK vector components are in x, y(, z) order = reversed array axes
    itk_field = sitk.GetImageFromArray(np.moveaxis(ddf[0].numpy()[::-1], 0, -1), isVector=True)
    reference = sitk.GetArrayFromImage(sitk.DisplacementFieldJacobianDeterminant(itk_field))
    interior = tuple(slice(1, -1) for _ in range(n))
    np.testing.assert_allclose(ours[interior], reference[interior], rtol=1e-9, atol=1e-9)
    assert (ours < 0).any() and (ours > 0).any()  # a non-trivial field


@pytest.mark.parametrize("shape", [(20, 9), (20, 6, 5)])
def test_folding_fraction_of_a_known_folded_band(shape):
    n = len(shape)
    rows = np.arange(shape[0], dtype=np.float64)
    first, last = 6, 10
    # u_0 = -3 * clip(x_0, 6, 10): central differences give J = -2 inside the band, -0.5 on its edge rows
    profile = -3.0 * np.clip(rows, first, last)
    ddf = np.zeros((1, n, *shape))
    ddf[0, 0] = profile.reshape(-1, *([1] * (n - 1)))
    jac = metrics.jacobian_determinant(ddf)
    expected_rows = np.full(shape[0], 1.0)
    expected_rows[first + 1 : last] = -2.0
    expected_rows[[first, last]] = -0.5
    np.testing.assert_allclose(
        jac[0].numpy(), np.broadcast_to(expected_rows.reshape(-1, *[1] * (n - 1)), shape)
    )
    whole = 100.0 * (last - first + 1) / shape[0]
    assert metrics.folding_fraction(jac, crop=False) == pytest.approx(whole)
    # default: on the Learn2Reg interior (2 rows cropped at each end), the region SDlogJ uses
    assert metrics.folding_fraction(jac) == pytest.approx(100.0 * (last - first + 1) / (shape[0] - 4))
    assert metrics.folding_fraction(np.ones((1, *shape))) == 0.0
    # the corrected SDlogJ counts the folds as log(1e-9); the L2R form sees log(J + 3) = log 1 and log 2.5
    rows = expected_rows[2:-2]
    assert metrics.sdlogj(jac) == pytest.approx(np.log(np.clip(rows, 1e-9, None)).std(), rel=1e-10)
    assert metrics.sdlogj(jac) > 5.0
    assert metrics.sdlogj(jac, mode="l2r") == pytest.approx(np.log(rows + 3).std(), rel=1e-10)


def test_sdlogj_identity_and_known_patterns():
    identity_jac = metrics.jacobian_determinant(torch.zeros(1, 3, 8, 9, 10))
    assert metrics.sdlogj(identity_jac) == 0.0 and metrics.sdlogj(identity_jac, mode="l2r") == 0.0

    # a Jacobian with two equal halves (also in the 2-voxel-cropped interior): J = 2 and J = 0.5
    jac = np.full((1, 8, 12), 2.0)
    jac[:, :, 6:] = 0.5
    assert metrics.sdlogj(jac) == pytest.approx(math.log(2.0), rel=1e-12)
    assert metrics.sdlogj(jac, mode="l2r") == pytest.approx((math.log(5.0) - math.log(3.5)) / 2, rel=1e-12)
    # the L2R form crops 2 voxels: a disturbed border does not count
    jac_border = jac.copy()
    jac_border[:, :2] = 100.0
    assert metrics.sdlogj(jac_border, mode="l2r") == pytest.approx(metrics.sdlogj(jac, mode="l2r"))
    assert metrics.sdlogj(jac_border) == pytest.approx(metrics.sdlogj(jac))
    # one folded interior voxel counts (as log 1e-9), it is not dropped
    jac_folded = jac.copy()
    jac_folded[0, 3, 3] = -1.0
    assert metrics.sdlogj(jac_folded) > metrics.sdlogj(jac) + 0.5
    with pytest.raises(RegistrationInputError):
        metrics.sdlogj(np.ones((1, 4, 9)))  # nothing left after the 2-voxel crop


@pytest.mark.parametrize("shape", [(16, 14), (9, 10, 11)])
def test_sdlogj_of_quadratic_field(shape):
    """u_0 = a x_0^2 has exact central differences: J = 1 + 2 a x_0 inside, one-sided at the two end rows."""
    n = len(shape)
    a = 0.02
    x0 = np.arange(shape[0], dtype=np.float64)
    ddf = np.zeros((1, n, *shape))
    ddf[0, 0] = (a * x0**2).reshape(-1, *([1] * (n - 1)))
    jac_rows = 1 + 2 * a * x0
    jac_rows[0] = 1 + a  # forward difference (a * 1 - 0)
    jac_rows[-1] = 1 + a * (2 * x0[-1] - 1)  # backward difference
    expected_jac = np.broadcast_to(jac_rows.reshape(-1, *[1] * (n - 1)), shape)
    jac = metrics.jacobian_determinant(ddf)
    np.testing.assert_allclose(jac[0].numpy(), expected_jac, rtol=1e-12)
    interior = expected_jac[tuple(slice(2, -2) for _ in range(n))]
    assert metrics.sdlogj(jac) == pytest.approx(np.log(interior).std(), rel=1e-10)
    assert metrics.sdlogj(jac, mode="l2r") == pytest.approx(np.log(interior + 3).std(), rel=1e-10)


def test_robustness_quantiles():
    values = np.arange(11, dtype=np.float64)  # 0 .. 10
    assert metrics.dsc30(values) == pytest.approx(3.0)
    assert metrics.tre30(values) == pytest.approx(7.0)
    assert metrics.sdlogj30(torch.as_tensor(values)) == pytest.approx(7.0)
    assert metrics.dsc30([0.2, float("nan"), 0.6]) == pytest.approx(0.2 + 0.3 * 0.4)
    assert math.isnan(metrics.tre30([float("nan")]))


# ------------------------------------------------------------------------------------------------------
# registration_metrics
# ------------------------------------------------------------------------------------------------------
def test_registration_metrics_synthetic_translation():
    shape = (30, 32)
    shift = np.array([2.0, -3.0])
    fixed = np.zeros(shape, dtype=np.int64)
    fixed[_ball(shape, (12, 14), 6)] = 3
    fixed[_ball(shape, (20, 20), 4)] = 8
    # moving(x + shift) = fixed(x)  <=>  the ddf is the constant shift
    moving = np.roll(fixed, shift=tuple(shift.astype(int)), axis=(0, 1))
    ddf = torch.as_tensor(np.broadcast_to(shift.reshape(2, 1, 1), (2, *shape)).copy())[None]
    fixed_points = np.array([[5.0, 6.0], [10.5, 20.25], [25.0, 3.0]])
    spacing = (1.5, 0.5)
    result = metrics.registration_metrics(
        ddf, fixed, moving, fixed_points, fixed_points + shift, spacing=spacing
    )
    assert set(result) == {
        "dice",
        "dice_mean",
        "hd95_mm",
        "tre_mm",
        "tre_mm_initial",
        "sdlogj",
        "sdlogj_l2r",
        "folding_percent",
    }
    assert result["dice"] == {3: pytest.approx(1.0), 8: pytest.approx(1.0)}
    assert result["dice_mean"] == pytest.approx(1.0) and result["hd95_mm"] == pytest.approx(0.0)
    assert result["tre_mm"] == pytest.approx(0.0, abs=1e-12)
    assert result["tre_mm_initial"] == pytest.approx(math.hypot(2 * 1.5, 3 * 0.5))
    assert result["sdlogj"] == 0.0 and result["sdlogj_l2r"] == 0.0 and result["folding_percent"] == 0.0

    # no labels, no points: those metrics are absent, not 0; identity: initial Dice < 1
    only_field = metrics.registration_metrics(ddf[0])
    assert set(only_field) == {"sdlogj", "sdlogj_l2r", "folding_percent"}
    identity = metrics.registration_metrics(torch.zeros_like(ddf), fixed, moving)
    assert 0.0 < identity["dice_mean"] < 0.9 and identity["hd95_mm"] > 1.0
    with pytest.raises(RegistrationInputError):
        metrics.registration_metrics(ddf, fixed[:-1], moving[:-1])


def test_registration_metrics_on_real_oasis_labels(shared_data):
    nib = pytest.importorskip("nibabel")
    from monai.metrics import compute_dice

    folder = shared_data / "oasis3d_pair"
    evaluation_labels = json.loads((folder / "dataset.json").read_text())["evaluation_labels"]
    fixed, moving = (
        np.asarray(nib.load(folder / "labelsTr" / name).dataobj)[::2, ::2, ::2].astype(np.int64)
        for name in ("OASIS_0001_0000.nii.gz", "OASIS_0002_0000.nii.gz")
    )
    ddf = torch.zeros(1, 3, *fixed.shape)
    result = metrics.registration_metrics(
        ddf, fixed, moving, spacing=(2.0, 2.0, 2.0), labels=evaluation_labels
    )
    assert sorted(result["dice"]) == sorted(evaluation_labels)
    assert 0.35 < result["dice_mean"] < 0.7  # README: ~0.52 before registration
    for label in (4, 17, 53):  # lateral ventricle, hippocampi: independent MONAI references
        reference = compute_dice(_onehot(moving == label), _onehot(fixed == label), include_background=True)
        assert result["dice"][label] == pytest.approx(reference.item(), rel=1e-6)
    assert 1.0 < result["hd95_mm"] < 30.0
    assert result["folding_percent"] == 0.0 and result["sdlogj_l2r"] == pytest.approx(0.0, abs=1e-12)


def test_bad_inputs_raise():
    with pytest.raises(RegistrationInputError):
        metrics.dice_per_label(np.zeros((4, 4)), np.zeros((4, 5)))
    with pytest.raises(RegistrationInputError):
        metrics.dice_per_label(np.full((4, 4), 0.5), np.zeros((4, 4)))
    with pytest.raises(RegistrationInputError):
        metrics.jacobian_determinant(torch.zeros(1, 3, 8, 8))
    with pytest.raises(RegistrationInputError):
        metrics.sdlogj(np.ones((1, 8, 8)), mode="std")
    with pytest.raises(RegistrationInputError):
        metrics.tre(np.zeros((3, 2)), np.zeros((3, 3)), torch.zeros(1, 2, 8, 8))


# ------------------------------------------------------------------------------------------------------
# an independent implementation of the Learn2Reg evaluation's definitions (numpy / scipy only)
# ------------------------------------------------------------------------------------------------------
def _l2r_jacobian(disp: np.ndarray) -> np.ndarray:
    """det grad(identity + disp) of ``(N, *S)`` by central differences, cropped [2:-2] on each axis."""
    n = disp.shape[0]
    phi = np.stack(_grid(disp.shape[1:])) + disp
    rows = [np.gradient(phi[i]) for i in range(n)]  # rows[i][j] = d phi_i / d x_j
    matrices = np.stack([np.stack(r, axis=-1) for r in rows], axis=-2)  # (*S, N, N)
    return np.linalg.det(matrices)[tuple(slice(2, -2) for _ in range(n))]


def _l2r_reference(disp, fixed, moving, fixed_points, moving_points, spacing):
    from scipy import ndimage

    n = disp.shape[0]
    jac = _l2r_jacobian(disp)
    out = {
        "sdlogj_l2r": np.log(np.clip(jac + 3, 1e-9, 1e9)).std(),
        "sdlogj": np.log(np.clip(jac, 1e-9, 1e9)).std(),
        "folding_percent": 100.0 * (jac <= 0).mean(),
    }
    # nearest-neighbour warp of the moving labels: moving(x + disp(x))
    coords = np.stack(_grid(fixed.shape)) + disp
    warped = ndimage.map_coordinates(moving, coords, order=0, mode="nearest")
    dice, hd = [], []
    for label in np.unique(fixed[fixed > 0]):
        f, w = fixed == label, warped == label
        dice.append(2 * (f & w).sum() / (f.sum() + w.sum()))
        if not w.any():
            hd.append(np.linalg.norm(np.array(fixed.shape) * spacing))  # lost: the image diagonal
            continue
        surf_f, surf_w = f ^ ndimage.binary_erosion(f), w ^ ndimage.binary_erosion(w)
        to_w = ndimage.distance_transform_edt(~surf_w, sampling=spacing)[surf_f]
        to_f = ndimage.distance_transform_edt(~surf_f, sampling=spacing)[surf_w]
        hd.append(max(np.percentile(to_w, 95), np.percentile(to_f, 95)))
    out["dice_mean"], out["hd95_mm"] = np.mean(dice), np.mean(hd)
    sampled = np.stack([ndimage.map_coordinates(disp[i], fixed_points.T, order=3) for i in range(n)], axis=1)
    out["tre_mm"] = np.linalg.norm((fixed_points + sampled - moving_points) * spacing, axis=1).mean()
    return out


@pytest.mark.parametrize("shape", [(40, 44), (22, 24, 20)])
@pytest.mark.parametrize("field", ["affine", "folded"])
def test_registration_metrics_match_independent_learn2reg_definitions(shape, field):
    n = len(shape)
    rng = np.random.default_rng(7)
    spacing = np.array([1.2, 0.9, 1.5][:n])
    if field == "affine":  # known J = det(I + A) everywhere: both SDlogJ forms 0, no folding
        matrix = rng.uniform(-0.15, 0.15, (n, n))
        # offset >= 1.5: nothing maps onto the moving map's corner voxel, so label 3 is lost by the warp
        disp = _affine_field(shape, matrix, rng.uniform(1.5, 2.0, n))[0].numpy()
    else:  # a smooth random field large enough to fold in places
        coarse = torch.as_tensor(rng.standard_normal((1, n, *[5] * n)))
        mode = "bilinear" if n == 2 else "trilinear"
        disp = 10.0 * torch.nn.functional.interpolate(coarse, size=shape, mode=mode, align_corners=True)
        disp = disp[0].numpy()
    fixed = np.zeros(shape, dtype=np.int64)
    centre = [s // 2 for s in shape]
    fixed[_ball(shape, centre, min(shape) / 4)] = 1
    fixed[_ball(shape, [c + min(shape) // 4 for c in centre], min(shape) / 6)] = 2
    moving = np.roll(fixed, 2, axis=0)
    moving[(0,) * n] = 3  # label 3 in both maps, but the affine field loses it
    fixed[_ball(shape, [s - 4 for s in shape], 1.5)] = 3
    fixed_points = rng.uniform(4, np.array(shape) - 5, size=(9, n))
    moving_points = fixed_points + rng.normal(0, 2, size=(9, n))
    ours = metrics.registration_metrics(
        torch.as_tensor(disp), fixed, moving, fixed_points, moving_points, spacing=spacing
    )
    reference = _l2r_reference(disp, fixed, moving, fixed_points, moving_points, spacing)
    for key, value in reference.items():
        assert ours[key] == pytest.approx(value, rel=1e-6, abs=1e-9), key
    assert all(math.isfinite(ours[key]) for key in reference)
    if field == "affine":
        jac_value = np.linalg.det(np.eye(n) + matrix)
        np.testing.assert_allclose(_l2r_jacobian(disp), jac_value, rtol=1e-10)
        assert ours["sdlogj"] == pytest.approx(0.0, abs=1e-9) and ours["folding_percent"] == 0.0
        assert ours["dice"][3] == 0.0  # lost: worst Dice, and HD95 the diagonal (in the reference too)
    else:
        assert 0.0 < ours["folding_percent"] < 50.0
        # folds count: the corrected SDlogJ exceeds the challenge form's
        assert ours["sdlogj"] > ours["sdlogj_l2r"] > 0.0
