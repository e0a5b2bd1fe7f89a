"""Affine pre-alignment (core/affine.py) against transforms applied independently with SimpleITK.

World frames: SimpleITK works in LPS, the registration in RAS (as MONAI ``MetaTensor.affine``); the tests do
their own LPS <-> RAS conversion (``diag(-1, -1, 1)``) and their own voxel->world matrices from the SimpleITK
headers. The error measure is the mean distance, over the fixed grid's voxel centres, between the estimated
and the true mapped points, in voxels of the fixed grid.
"""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from regnet_zoo.core.affine import affine_register, affine_voxel_map, resample_affine
from regnet_zoo.errors import RegistrationInputError

TOLERANCE_VOXELS = 0.5
#: the synthetic transforms are large (up to 17 degrees, 7 mm, 10 % shear): twice the default step per level
LARGE_STEP = 0.2


def _flip(n: int) -> np.ndarray:
    """Homogeneous LPS <-> RAS: negate the first two world axes."""
    return np.diag([-1.0, -1.0] + [1.0] * (n - 2) + [1.0])


def _ras_affine(img: sitk.Image) -> np.ndarray:
    """Voxel->RAS matrix for the array ``GetArrayFromImage(img)`` (array axes = ITK index axes reversed)."""
    n = img.GetDimension()
    direction = np.array(img.GetDirection()).reshape(n, n)
    out = np.eye(n + 1)
    out[:n, :n] = direction @ np.diag(img.GetSpacing())[:, ::-1]
    out[:n, n] = img.GetOrigin()
    return _flip(n) @ out


def _sitk_matrix(transform) -> np.ndarray:
    """Homogeneous LPS matrix of a SimpleITK matrix-offset transform: ``A (x - c) + c + t``."""
    n = transform.GetDimension()
    a = np.array(transform.GetMatrix()).reshape(n, n)
    c, t = np.array(transform.GetCenter()), np.array(transform.GetTranslation())
    out = np.eye(n + 1)
    out[:n, :n], out[:n, n] = a, t + c - a @ c
    return out


def _blobs(n: int, size: int, spacing: float, seed: int = 0) -> sitk.Image:
    """A sum of 20 random anisotropic Gaussians on a centred grid."""
    rng = np.random.default_rng(seed)
    idx = np.meshgrid(*[np.arange(size)] * n, indexing="ij")
    arr = np.zeros([size] * n)
    for _ in range(20):
        c, s = rng.uniform(0.2, 0.8, n) * size, rng.uniform(0.04, 0.12, n) * size
        arr += rng.uniform(0.5, 1.0) * np.exp(-0.5 * sum(((idx[i] - c[i]) / s[i]) ** 2 for i in range(n)))
    img = sitk.GetImageFromArray(arr.astype(np.float32))
    img.SetSpacing([spacing] * n)
    img.SetOrigin([-(size - 1) * spacing / 2] * n)
    return img


def _known_transform(n: int, kind: str):
    if kind == "rigid":
        t = sitk.Euler3DTransform() if n == 3 else sitk.Euler2DTransform()
        if n == 3:
            t.SetRotation(0.15, -0.1, 0.2)
        else:
            t.SetAngle(0.3)
    else:
        t = sitk.AffineTransform(n)
        shear = np.array([[0.08, 0.1, -0.05], [-0.07, -0.05, 0.06], [0.04, 0.05, 0.1]])[:n, :n]
        t.SetMatrix((np.eye(n) + shear).ravel().tolist())
    t.SetCenter([3.0] * n)
    t.SetTranslation([6.0, -4.0, 3.0][:n])
    return t


def _fixed_from(moving: sitk.Image, transform, fraction: float = 0.75) -> sitk.Image:
    """``fixed(p) = moving(T p)`` on a centred grid ``fraction`` the size of the moving one (SimpleITK)."""
    size = [int(s * fraction) for s in moving.GetSize()]
    ref = sitk.Image(size, sitk.sitkFloat32)
    ref.SetSpacing(moving.GetSpacing())
    ref.SetDirection(moving.GetDirection())
    centre = moving.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2 for s in moving.GetSize()])
    corner = np.array(centre) - np.array(moving.GetDirection()).reshape(len(size), -1) @ (
        (np.array(size) - 1) / 2 * np.array(moving.GetSpacing())
    )
    ref.SetOrigin(corner.tolist())
    return sitk.Resample(moving, ref, transform, sitk.sitkLinear, 0.0)


def _tensor(img: sitk.Image) -> torch.Tensor:
    return torch.from_numpy(sitk.GetArrayFromImage(img).astype(np.float32))[None]


def _error_voxels(estimate: torch.Tensor, truth: np.ndarray, fixed: sitk.Image) -> float:
    """Mean |T_est p - T_true p| over the fixed voxel centres, in units of the fixed (smallest) spacing."""
    a = _ras_affine(fixed)
    n = fixed.GetDimension()
    shape = sitk.GetArrayFromImage(fixed).shape
    idx = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1).reshape(-1, n)
    points = idx @ a[:n, :n].T + a[:n, n]
    diff = estimate.cpu().numpy() - truth
    error = np.linalg.norm(points @ diff[:n, :n].T + diff[:n, n], axis=1).mean()
    return float(error / min(fixed.GetSpacing()))


def _register_known(moving: sitk.Image, transform, kind: str, similarity: str, invert: bool = False, **kw):
    fixed = _fixed_from(moving, transform)
    n = moving.GetDimension()
    truth = _flip(n) @ _sitk_matrix(transform) @ _flip(n)  # LPS -> RAS
    moving_t = _tensor(moving)
    if invert:
        moving_t = moving_t.max() - moving_t
    estimate = affine_register(
        _tensor(fixed), moving_t, _ras_affine(fixed), _ras_affine(moving), transform=kind,
        similarity=similarity, **kw,
    )
    return estimate, truth, fixed


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("kind", ["rigid", "affine"])
def test_recovers_sitk_transform_on_blobs(spatial_dims, kind):
    moving = _blobs(spatial_dims, 40 if spatial_dims == 3 else 96, 2.0 if spatial_dims == 3 else 1.0)
    transform = _known_transform(spatial_dims, kind)
    estimate, truth, fixed = _register_known(moving, transform, kind, "lncc", learning_rate=LARGE_STEP)
    assert estimate.dtype == torch.float64 and estimate.shape == (spatial_dims + 1,) * 2
    assert _error_voxels(estimate, truth, fixed) < TOLERANCE_VOXELS


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_multimodal_inverted_contrast_with_mi(spatial_dims):
    moving = _blobs(spatial_dims, 40 if spatial_dims == 3 else 96, 2.0 if spatial_dims == 3 else 1.0, seed=1)
    transform = _known_transform(spatial_dims, "affine")
    estimate, truth, fixed = _register_known(
        moving, transform, "affine", "mi", invert=True, learning_rate=LARGE_STEP
    )
    assert _error_voxels(estimate, truth, fixed) < TOLERANCE_VOXELS
    # the same pair is not aligned by the identity: the test can fail
    assert _error_voxels(torch.eye(spatial_dims + 1, dtype=torch.float64), truth, fixed) > 3


def test_recovers_rigid_transform_on_tiny_mr(shared_data):
    path = shared_data / "tiny_mr_pair" / "anatomical.nii"
    if not path.exists():
        pytest.skip("tiny_mr_pair absent")
    moving = sitk.Cast(sitk.ReadImage(str(path)), sitk.sitkFloat32)
    transform = sitk.Euler3DTransform()
    centre = [(s - 1) / 2 for s in moving.GetSize()]
    transform.SetCenter(moving.TransformContinuousIndexToPhysicalPoint(centre))
    transform.SetRotation(0.1, -0.08, 0.12)
    transform.SetTranslation([4.0, -3.0, 2.0])
    estimate, truth, fixed = _register_known(moving, transform, "rigid", "lncc")
    assert _error_voxels(estimate, truth, fixed) < TOLERANCE_VOXELS


def _analytic_blobs(points: np.ndarray, seed: int = 2) -> np.ndarray:
    """A smooth function of world points ``(..., 3)``: the same object whatever grid samples it."""
    rng = np.random.default_rng(seed)
    out = np.zeros(points.shape[:-1])
    for _ in range(20):
        c, s = rng.uniform(-25, 25, 3), rng.uniform(3, 9, 3)
        out += rng.uniform(0.5, 1.0) * np.exp(-0.5 * (((points - c) / s) ** 2).sum(-1))
    return out


def _sample_on(affine: np.ndarray, shape) -> torch.Tensor:
    idx = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1)
    points = idx @ affine[:3, :3].T + affine[:3, 3]
    return torch.from_numpy(_analytic_blobs(points).astype(np.float32))[None]


def test_different_grids_recover_identity():
    fixed_affine = np.diag([1.5, 1.5, 1.5, 1.0])
    fixed_affine[:3, 3] = -29.25
    # moving: other spacing (2.0 x 2.5 x 1.8 mm), axes permuted and flipped (other orientation), other origin
    rot = np.array([[0.0, -1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
    moving_affine = np.eye(4)
    moving_affine[:3, :3] = rot @ np.diag([2.0, 2.5, 1.8])
    moving_shape = (38, 31, 42)
    # centred on the world point (1, -2, 1.5): the two grids cover different (overlapping) regions
    half = (np.array(moving_shape) - 1) / 2
    moving_affine[:3, 3] = np.array([1.0, -2.0, 1.5]) - moving_affine[:3, :3] @ half
    estimate = affine_register(
        _sample_on(fixed_affine, (40, 40, 40)), _sample_on(moving_affine, moving_shape), fixed_affine,
        moving_affine, transform="affine",
    )
    idx = np.stack(np.meshgrid(*[np.arange(40)] * 3, indexing="ij"), -1).reshape(-1, 3)
    points = idx @ fixed_affine[:3, :3].T + fixed_affine[:3, 3]
    diff = estimate.numpy() - np.eye(4)
    error = np.linalg.norm(points @ diff[:3, :3].T + diff[:3, 3], axis=1).mean() / 1.5
    assert error < TOLERANCE_VOXELS


def test_resample_affine_matches_sitk_resample():
    moving = _blobs(3, 24, 2.0, seed=3)
    transform = _known_transform(3, "affine")
    fixed = _fixed_from(moving, transform)
    truth = _flip(3) @ _sitk_matrix(transform) @ _flip(3)
    ours = resample_affine(
        _tensor(moving), torch.from_numpy(truth), _ras_affine(fixed), _ras_affine(moving),
        sitk.GetArrayFromImage(fixed).shape,
    )
    reference = _tensor(fixed)
    vox = affine_voxel_map(torch.from_numpy(truth), _ras_affine(fixed), _ras_affine(moving))
    assert vox.shape == (4, 4) and vox.dtype == torch.float64
    # compare where the mapped point lies well inside the moving grid (the border rules of the two differ)
    shape = reference.shape[1:]
    axes = [torch.arange(s, dtype=torch.float64) for s in shape]
    idx = torch.stack(torch.meshgrid(*axes, indexing="ij"), -1)
    mapped = idx @ vox[:3, :3].T + vox[:3, 3]
    inside = ((mapped >= 0.5) & (mapped <= torch.tensor(moving.GetSize()[::-1]) - 1.5)).all(-1)
    assert inside.float().mean() > 0.5
    assert torch.allclose(ours[0][inside], reference[0][inside], atol=1e-4)


def test_deterministic_and_mask_and_batch_dim():
    moving = _blobs(2, 64, 1.0, seed=4)
    transform = _known_transform(2, "rigid")
    fixed = _fixed_from(moving, transform)
    f, m = _tensor(fixed), _tensor(moving)
    fa, ma = _ras_affine(fixed), _ras_affine(moving)
    first = affine_register(f, m, fa, ma, transform="rigid", learning_rate=LARGE_STEP)
    fa_t, ma_t = torch.from_numpy(fa), torch.from_numpy(ma)
    second = affine_register(f[None], m[None], fa_t, ma_t, transform="rigid", learning_rate=LARGE_STEP)
    assert torch.equal(first, second)
    mask = torch.zeros_like(f)
    mask[..., 8:40, 8:40] = 1
    masked = affine_register(f, m, fa, ma, transform="rigid", learning_rate=LARGE_STEP, fixed_mask=mask)
    assert not torch.equal(first, masked)
    truth = _flip(2) @ _sitk_matrix(transform) @ _flip(2)
    assert _error_voxels(first, truth, fixed) < TOLERANCE_VOXELS
    assert _error_voxels(masked, truth, fixed) < 1.0
    # the 4x4 embedding of a 2D affine (as regnet_zoo.data.io loads 2D images) gives the same 3x3 result
    embed = np.eye(4)
    embed[np.ix_([0, 1, 3], [0, 1, 3])] = fa
    embed_m = np.eye(4)
    embed_m[np.ix_([0, 1, 3], [0, 1, 3])] = ma
    embedded = affine_register(f, m, embed, embed_m, transform="rigid", learning_rate=LARGE_STEP)
    assert torch.equal(embedded, first)


def test_bad_input_is_a_one_line_error():
    f = torch.rand(1, 16, 16)
    with pytest.raises(RegistrationInputError, match="similarity"):
        affine_register(f, f, np.eye(3), np.eye(3), similarity="cc")
    with pytest.raises(RegistrationInputError, match="voxel->world"):
        affine_register(f, f, np.eye(3), np.eye(4))
    with pytest.raises(RegistrationInputError, match="NaN"):
        affine_register(f, f * float("nan"), np.eye(3), np.eye(3))
    with pytest.raises(RegistrationInputError, match="iterations"):
        affine_register(f, f, np.eye(3), np.eye(3), levels=2, iterations=(1, 2, 3))
