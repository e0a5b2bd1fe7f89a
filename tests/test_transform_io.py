"""ITK transform files (regnet_zoo.data.transform_io): SimpleITK reads what we write and resamples as we do.

The reference for "what the transform means" is computed here independently with numpy/scipy from the
geometry (voxel -> LPS), never with the code under test.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.ndimage
import SimpleITK as sitk
import torch
from monai.data import MetaTensor

from regnet_zoo.api import affine_of, ddf_from_itk, ddf_to_itk, warp_physical
from regnet_zoo.data.io import load_image, save_image
from regnet_zoo.data.transform_io import (
    affine_transform,
    compose,
    displacement_transform,
    read_transform,
    transform_points,
    transform_points_file,
    transform_to_displacement,
    write_transform,
)
from regnet_zoo.errors import RegistrationInputError

FLIP = np.diag([-1.0, -1.0, 1.0, 1.0])


def _rotation(n: int, angles) -> np.ndarray:
    r = np.eye(n)
    for k, a in enumerate(angles[: 1 if n == 2 else 3]):
        i, j = [(0, 1), (1, 2), (0, 2)][k]
        g = np.eye(n)
        g[[i, i, j, j], [i, j, i, j]] = [math.cos(a), -math.sin(a), math.sin(a), math.cos(a)]
        r = r @ g
    return r


def _ras_affine(n: int, spacing, angles, origin) -> np.ndarray:
    """4x4 RAS affine (a 2D one embedded) with a rotated, anisotropic grid."""
    a = np.eye(4)
    a[:n, :n] = _rotation(n, angles) @ np.diag(spacing)
    a[:n, 3] = origin
    return a


def _lps(affine: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    lps = FLIP @ affine
    return lps[:n, :n], lps[:n, 3]


def _smooth_ddf(shape, amplitude=1.5) -> torch.Tensor:
    grid = torch.stack(torch.meshgrid(*[torch.arange(s, dtype=torch.float64) for s in shape], indexing="ij"))
    n = len(shape)
    return torch.stack(
        [amplitude * torch.sin(2 * math.pi * grid[(i + 1) % n] / shape[(i + 1) % n] + i) for i in range(n)]
    ).float()


def _scene(tmp_path, n: int):
    """Fixed and moving images on different rotated anisotropic grids (written as NIfTI), a smooth voxel
    DDF on the fixed grid and an affine (LPS, fixed -> moving)."""
    rng = np.random.default_rng(0)
    if n == 3:
        fshape, mshape = (22, 18, 16), (26, 20, 18)
        fa = _ras_affine(3, [1.5, 1.2, 2.0], [0.2, -0.1, 0.15], [-10.0, 5.0, 3.0])
        ma = _ras_affine(3, [1.3, 1.6, 1.8], [-0.1, 0.2, 0.05], [-14.0, 2.0, 1.0])
    else:
        fshape, mshape = (40, 34), (44, 38)
        fa = _ras_affine(2, [1.2, 0.9], [0.3], [-8.0, 4.0])
        ma = _ras_affine(2, [1.0, 1.1], [-0.2], [-12.0, 2.0])
    moving = scipy.ndimage.gaussian_filter(rng.random(mshape), 2.0).astype(np.float32)
    moving = (moving - moving.min()) / (moving.max() - moving.min())
    save_image(torch.from_numpy(moving)[None], tmp_path / "moving.nii.gz", affine=ma)
    save_image(torch.zeros(1, *fshape), tmp_path / "fixed.nii.gz", affine=fa)
    ddf = _smooth_ddf(fshape)
    centre_vox = np.array([(s - 1) / 2 for s in fshape])
    lin, off = _lps(fa, n)
    centre = lin @ centre_vox + off
    m = np.eye(n + 1)
    m[:n, :n] = _rotation(n, [0.08, -0.05, 0.04]) @ np.diag([1.05, 0.97, 1.02][:n])
    m[:n, n] = centre - m[:n, :n] @ centre + np.array([1.5, -2.0, 1.0][:n])
    return moving, ma, fa, fshape, ddf, m


def _reference_map(fa, fshape, ddf, m, n):
    """Fixed voxel centres -> moving LPS points through x -> M(x + d(x)), by hand: ``(*S, N)``."""
    lin, off = _lps(fa, n)
    vox = np.stack(np.meshgrid(*[np.arange(s) for s in fshape], indexing="ij"), axis=-1).astype(np.float64)
    p = vox @ lin.T + off + np.moveaxis(ddf.double().numpy(), 0, -1) @ lin.T  # + d(x) in mm
    return p @ m[:n, :n].T + m[:n, n]


def _reference_resample(moving, ma, points, n):
    """Linear interpolation of ``moving`` at LPS ``points`` ``(*S, N)`` (0 outside), and the inside mask."""
    lin, off = _lps(ma, n)
    vox = (points - off) @ np.linalg.inv(lin).T
    coords = np.moveaxis(vox, -1, 0)
    values = scipy.ndimage.map_coordinates(moving.astype(np.float64), coords, order=1, mode="nearest")
    inside = np.all([(coords[i] >= 0) & (coords[i] <= moving.shape[i] - 1) for i in range(n)], axis=0)
    return values, inside


def _sitk_array(image: sitk.Image) -> np.ndarray:
    """SimpleITK image -> array in our index order ``(*S)``."""
    arr = sitk.GetArrayFromImage(image)
    return np.transpose(arr, tuple(range(arr.ndim - 1, -1, -1)))


@pytest.mark.parametrize("n", [2, 3])
def test_composite_h5_resamples_like_the_geometry_says(tmp_path, n):
    moving, ma, fa, fshape, ddf, m = _scene(tmp_path, n)
    tx = compose([displacement_transform(ddf_to_itk(ddf, fa)), affine_transform(m)])
    path = write_transform(tx, tmp_path / "transform.h5")
    read = sitk.ReadTransform(str(path))  # SimpleITK as a user calls it
    fixed_itk = sitk.ReadImage(str(tmp_path / "fixed.nii.gz"))
    moving_itk = sitk.ReadImage(str(tmp_path / "moving.nii.gz"), sitk.sitkFloat64)
    resampled = _sitk_array(sitk.Resample(moving_itk, fixed_itk, read, sitk.sitkLinear, 0.0))
    expected, inside = _reference_resample(moving, ma, _reference_map(fa, fshape, ddf, m, n), n)
    assert inside.mean() > 0.5 and expected[inside].std() > 0.05
    np.testing.assert_allclose(resampled[inside], expected[inside], atol=1e-4)
    # and our own physical warp, given the transform read back as a dense field, agrees with SimpleITK
    total = ddf_from_itk(transform_to_displacement(read_transform(path), fixed_itk), fa)
    ours = warp_physical(load_image(tmp_path / "moving.nii.gz"), fa, fshape, total)[0].numpy()
    np.testing.assert_allclose(ours, resampled, atol=1e-4)


@pytest.mark.parametrize("n", [2, 3])
def test_points_forward_and_inverse(tmp_path, n):
    moving, ma, fa, fshape, ddf, m = _scene(tmp_path, n)
    field = ddf_to_itk(ddf, fa)
    tx = compose([displacement_transform(field), affine_transform(m)])
    mapped = _reference_map(fa, fshape, ddf, m, n)
    lin, off = _lps(fa, n)
    idx = np.array([[3, 4, 5][:n], [10, 7, 6][:n], [15, 12, 9][:n]])
    points = idx @ lin.T + off  # fixed voxel centres in LPS
    np.testing.assert_allclose(transform_points(points, tx), mapped[tuple(idx.T)], atol=1e-6)
    back = transform_points(mapped[tuple(idx.T)], tx, inverse=True)
    np.testing.assert_allclose(back, points, atol=1e-4)
    # independent inverse: ITK's own fixed-point inversion of the field, composed with the inverse affine
    inv_field = sitk.InvertDisplacementField(
        field, maximumNumberOfIterations=200, maxErrorToleranceThreshold=1e-4, enforceBoundaryCondition=False
    )
    itk_inverse = compose([affine_transform(np.linalg.inv(m)), displacement_transform(inv_field)])
    targets = mapped[tuple(idx.T)]
    itk_back = np.array([itk_inverse.TransformPoint(p.tolist()) for p in targets])
    # ITK's inverse is a field on the voxel grid, interpolated linearly between voxels: ~0.1 voxel apart
    np.testing.assert_allclose(back, itk_back, atol=0.15)
    assert np.abs(back - targets).max() > 1.0  # the map is far from the identity


def test_affine_tfm_round_trip_and_linear_only(tmp_path):
    m = np.eye(4)
    m[:3, :3] = _rotation(3, [0.1, 0.2, -0.3]) * 1.1
    m[:3, 3] = [1.0, -2.0, 3.0]
    path = write_transform(affine_transform(m), tmp_path / "affine.tfm")
    read = sitk.ReadTransform(str(path))
    np.testing.assert_allclose(np.array(read.GetParameters()[:9]).reshape(3, 3), m[:3, :3], atol=1e-12)
    p = np.array([[4.0, 5.0, -6.0]])
    np.testing.assert_allclose(transform_points(p, read_transform(path)), p @ m[:3, :3].T + m[:3, 3])
    with pytest.raises(RegistrationInputError, match="exists"):
        write_transform(affine_transform(m), path)
    field = ddf_to_itk(torch.zeros(3, 4, 5, 6), np.eye(4))
    with pytest.raises(RegistrationInputError, match="linear transforms only"):
        write_transform(displacement_transform(field), tmp_path / "d.tfm")
    with pytest.raises(RegistrationInputError, match="extensions"):
        write_transform(affine_transform(m), tmp_path / "d.json")


def test_transform_points_file(tmp_path):
    m = np.eye(3)
    m[:2, :2] = _rotation(2, [0.4])
    m[:2, 2] = [3.0, -1.0]
    write_transform(affine_transform(m), tmp_path / "a.tfm")
    (tmp_path / "in.csv").write_text("x,y\n1,2\n-3.5,4\n")
    out = transform_points_file(tmp_path / "a.tfm", tmp_path / "in.csv", tmp_path / "out.csv")
    pts = np.array([[1.0, 2.0], [-3.5, 4.0]])
    np.testing.assert_allclose(out, pts @ m[:2, :2].T + m[:2, 2])
    written = np.loadtxt(tmp_path / "out.csv", delimiter=",", skiprows=1)
    np.testing.assert_allclose(written, out, atol=1e-6)
    back = transform_points_file(tmp_path / "a.tfm", tmp_path / "out.csv", tmp_path / "b.csv", inverse=True)
    np.testing.assert_allclose(back, pts, atol=1e-5)
    with pytest.raises(RegistrationInputError, match="exists"):
        transform_points_file(tmp_path / "a.tfm", tmp_path / "in.csv", tmp_path / "out.csv")
    (tmp_path / "p3.csv").write_text("1,2,3\n")
    with pytest.raises(RegistrationInputError, match="2D"):
        transform_points_file(tmp_path / "a.tfm", tmp_path / "p3.csv", tmp_path / "o3.csv")


def test_read_transform_errors(tmp_path):
    with pytest.raises(RegistrationInputError, match="not found"):
        read_transform(tmp_path / "none.h5")
    bad = tmp_path / "bad.h5"
    bad.write_text("not hdf5")
    with pytest.raises(RegistrationInputError, match="cannot read transform"):
        read_transform(bad)
    save_image(torch.zeros(1, 5, 6, 7), tmp_path / "scalar.nii.gz")
    with pytest.raises(RegistrationInputError, match="components"):
        read_transform(tmp_path / "scalar.nii.gz")


def test_ddf_itk_image_reads_as_a_transform(tmp_path):
    _, _, fa, fshape, ddf, _ = _scene(tmp_path, 3)
    field = ddf_to_itk(ddf, fa)
    sitk.WriteImage(field, str(tmp_path / "ddf_itk.nii.gz"))
    tx = read_transform(tmp_path / "ddf_itk.nii.gz")
    assert isinstance(tx, sitk.DisplacementFieldTransform)
    lin, off = _lps(fa, 3)
    point = lin @ np.array([5.0, 6.0, 7.0]) + off
    np.testing.assert_allclose(
        transform_points(point[None], tx)[0], point + lin @ ddf[:, 5, 6, 7].double().numpy(), atol=1e-5
    )


def test_tiny_mr_pair_composite_resample(tmp_path, shared_data):
    folder = shared_data / "tiny_mr_pair"
    fixed, moving = load_image(folder / "anatomical.nii"), load_image(folder / "reoriented_anat_moved.nii")
    fa = affine_of(fixed)
    fshape = tuple(fixed.shape[1:])
    ddf = _smooth_ddf(fshape, amplitude=1.0)
    m = np.eye(4)
    m[:3, :3] = _rotation(3, [0.05, 0.02, -0.03])
    m[:3, 3] = [2.0, -1.0, 3.0]
    tx = compose([displacement_transform(ddf_to_itk(ddf, fa)), affine_transform(m)])
    write_transform(tx, tmp_path / "t.h5")
    fixed_itk = sitk.ReadImage(str(folder / "anatomical.nii"))
    moving_itk = sitk.ReadImage(str(folder / "reoriented_anat_moved.nii"), sitk.sitkFloat64)
    resampled = _sitk_array(
        sitk.Resample(moving_itk, fixed_itk, sitk.ReadTransform(str(tmp_path / "t.h5")), sitk.sitkLinear, 0.0)
    )
    arr = moving.as_tensor()[0].numpy()
    expected, inside = _reference_resample(arr, affine_of(moving), _reference_map(fa, fshape, ddf, m, 3), 3)
    assert inside.mean() > 0.3
    scale = float(np.abs(expected[inside]).max())
    np.testing.assert_allclose(resampled[inside] / scale, expected[inside] / scale, atol=1e-4)


def test_ants_apply_transforms_reads_our_composite(tmp_path):
    ants = pytest.importorskip("ants")
    moving, ma, fa, fshape, ddf, m = _scene(tmp_path, 3)
    tx = compose([displacement_transform(ddf_to_itk(ddf, fa)), affine_transform(m)])
    write_transform(tx, tmp_path / "transform.h5")
    out = ants.apply_transforms(
        ants.image_read(str(tmp_path / "fixed.nii.gz")),
        ants.image_read(str(tmp_path / "moving.nii.gz")),
        [str(tmp_path / "transform.h5")],
        interpolator="linear",
    ).numpy()
    expected, inside = _reference_resample(moving, ma, _reference_map(fa, fshape, ddf, m, 3), 3)
    np.testing.assert_allclose(out[inside], expected[inside], atol=1e-3)


def test_warp_physical_matches_reference_on_fixed_grid(tmp_path):
    """Sanity of the test's own reference: with M = I, our DDF warp equals the by-hand resampling."""
    moving, ma, fa, fshape, ddf, _ = _scene(tmp_path, 3)
    expected, inside = _reference_resample(moving, ma, _reference_map(fa, fshape, ddf, np.eye(4), 3), 3)
    moving_t = MetaTensor(torch.from_numpy(moving)[None], affine=torch.as_tensor(ma))
    ours = warp_physical(moving_t, fa, fshape, ddf)
    np.testing.assert_allclose(ours[0].numpy()[inside], expected[inside], atol=1e-4)
