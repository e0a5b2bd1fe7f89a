"""regnet_zoo.data.io: loaders checked against SimpleITK / nibabel geometry, input validation, safe saving."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from regnet_zoo.data.io import (
    check_pair,
    load_image,
    load_label,
    load_landmarks,
    lps_to_voxel,
    save_image,
    save_landmarks,
    voxel_to_lps,
)
from regnet_zoo.errors import RegistrationInputError


def _rotation(n: int, angle: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    r = np.eye(n)
    r[:2, :2] = [[c, -s], [s, c]]
    if n == 3:  # add a tilt about x as well
        t = np.eye(3)
        t[1:, 1:] = [[np.cos(0.3), -np.sin(0.3)], [np.sin(0.3), np.cos(0.3)]]
        r = r @ t
    return r


def _sitk_image(n: int) -> sitk.Image:
    """A non-trivial SimpleITK image: anisotropic spacing, rotated direction, shifted origin."""
    shape = (7, 9, 5)[:n]  # ITK index order (x, y, z)
    rng = np.random.default_rng(n)
    arr = rng.normal(size=shape[::-1]).astype(np.float32)  # numpy order (z, y, x)
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((0.7, 1.3, 2.1)[:n])
    img.SetOrigin((-12.0, 30.5, 4.0)[:n])
    img.SetDirection(_rotation(n, 0.4).ravel().tolist())
    return img


def _check_geometry(mt: torch.Tensor, img: sitk.Image) -> None:
    """Values and index->LPS mapping of the MetaTensor equal SimpleITK's."""
    n = img.GetDimension()
    assert mt.shape == (1, *img.GetSize())
    ref = np.transpose(sitk.GetArrayFromImage(img), tuple(reversed(range(n))))
    np.testing.assert_allclose(mt[0].numpy(), ref, rtol=1e-6)
    idx = np.array([[0, 0, 0], [3, 1, 4], [6, 8, 2]])[:, :n]
    expected = np.array([img.TransformIndexToPhysicalPoint([int(v) for v in i]) for i in idx])
    np.testing.assert_allclose(voxel_to_lps(idx, mt), expected, atol=1e-5)
    np.testing.assert_allclose(lps_to_voxel(expected, mt), idx, atol=1e-6)


@pytest.mark.parametrize("n", [2, 3])
@pytest.mark.parametrize("suffix", [".mha", ".nrrd", ".nii.gz"])
def test_loader_matches_simpleitk(tmp_path, n, suffix):
    img = _sitk_image(n)
    path = tmp_path / f"img{suffix}"
    sitk.WriteImage(img, str(path))
    mt = load_image(path)
    _check_geometry(mt, img)
    assert mt.meta["filename_or_obj"] == str(path)


def test_nifti_matches_nibabel(tmp_path):
    import nibabel as nib

    affine = np.array([[0.0, -1.5, 0.0, 10.0], [2.0, 0.0, 0.0, -5.0], [0.0, 0.0, 3.0, 7.0], [0, 0, 0, 1]])
    arr = np.random.default_rng(0).random((6, 5, 4)).astype(np.float32)
    nib.save(nib.Nifti1Image(arr, affine), str(tmp_path / "a.nii.gz"))
    mt = load_image(tmp_path / "a.nii.gz", expected_dims=3)
    np.testing.assert_allclose(mt.affine.numpy(), affine)
    np.testing.assert_allclose(mt[0].numpy(), arr)


@pytest.mark.parametrize("n", [2, 3])
def test_save_then_load_roundtrip_and_simpleitk_reads_same_geometry(tmp_path, n):
    src = tmp_path / "src.mha"
    img = _sitk_image(n)
    sitk.WriteImage(img, str(src))
    mt = load_image(src)
    out = save_image(mt, tmp_path / "out.nii.gz")
    _check_geometry(load_image(out), img)
    # an independent reader (SimpleITK's NIfTI IO) sees the same physical geometry
    back = sitk.ReadImage(str(out))
    np.testing.assert_allclose(back.GetSpacing(), img.GetSpacing(), rtol=1e-5)
    np.testing.assert_allclose(back.GetOrigin(), img.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(back.GetDirection(), img.GetDirection(), atol=1e-5)
    # multi-channel: stored vector-last, read back channel-first
    field = torch.randn(n, *mt.shape[1:])
    save_image(field, tmp_path / "ddf.nii.gz", affine=mt.affine)
    back_field = load_image(tmp_path / "ddf.nii.gz", expected_dims=n)
    np.testing.assert_allclose(back_field.numpy(), field.numpy(), rtol=1e-6)


def test_npz_roundtrip_with_affine(tmp_path):
    affine = np.diag([2.0, 3.0, 4.0, 1.0])
    affine[:3, 3] = [1, 2, 3]
    vol = np.random.default_rng(1).random((4, 5, 6)).astype(np.float32)
    seg = np.random.default_rng(1).integers(0, 4, (4, 5, 6))
    np.savez(tmp_path / "scan.npz", vol=vol, seg=seg, affine=affine)
    mt = load_image(tmp_path / "scan.npz")
    np.testing.assert_allclose(mt[0].numpy(), vol)
    np.testing.assert_allclose(mt.affine.numpy(), affine)
    lab = load_label(tmp_path / "scan.npz")
    assert lab.dtype == torch.int64 and torch.equal(lab[0], torch.as_tensor(seg))
    np.save(tmp_path / "img2d.npy", vol[0])
    assert load_image(tmp_path / "img2d.npy").shape == (1, 5, 6)


def _raises_naming(path, fn, *args, match: str, **kwargs):
    with pytest.raises(RegistrationInputError, match=match) as info:
        fn(*args, **kwargs)
    assert str(path) in str(info.value)


def test_bad_inputs_raise_naming_the_file(tmp_path):
    _raises_naming(tmp_path / "nope.nii.gz", load_image, tmp_path / "nope.nii.gz", match="not found")
    junk = tmp_path / "junk.nii.gz"
    junk.write_bytes(b"this is not a nifti file")
    _raises_naming(junk, load_image, junk, match="cannot read")
    bad_suffix = tmp_path / "x.txt"
    bad_suffix.write_text("1")
    _raises_naming(bad_suffix, load_image, bad_suffix, match="unsupported")

    arr = np.zeros((5, 6, 7), np.float32)
    np.savez(tmp_path / "vol.npz", image=arr[0])
    _raises_naming(
        tmp_path / "vol.npz", load_image, tmp_path / "vol.npz", expected_dims=3, match="expected a 3D"
    )
    sitk.WriteImage(sitk.GetImageFromArray(arr), str(tmp_path / "vol.nrrd"))
    _raises_naming(
        tmp_path / "vol.nrrd", load_image, tmp_path / "vol.nrrd", expected_dims=2, match="expected a 2D"
    )
    np.save(tmp_path / "one.npy", np.zeros(5, np.float32))
    _raises_naming(tmp_path / "one.npy", load_image, tmp_path / "one.npy", match="2D or 3D")

    arr[1, 2, 3] = np.nan
    arr[0, 0, 0] = np.inf
    sitk.WriteImage(sitk.GetImageFromArray(arr), str(tmp_path / "nan.mha"))
    _raises_naming(tmp_path / "nan.mha", load_image, tmp_path / "nan.mha", match="1 NaN, 1 inf")

    soft = np.full((4, 4, 4), 0.5, np.float32)
    sitk.WriteImage(sitk.GetImageFromArray(soft), str(tmp_path / "soft_label.nrrd"))
    _raises_naming(
        tmp_path / "soft_label.nrrd", load_label, tmp_path / "soft_label.nrrd", match="not integer"
    )

    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((4, 4), np.float32)), str(tmp_path / "f2d.mha"))
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((3, 4, 4), np.float32)), str(tmp_path / "m3d.mha"))
    f, m = load_image(tmp_path / "f2d.mha"), load_image(tmp_path / "m3d.mha")
    _raises_naming(tmp_path / "m3d.mha", check_pair, f, m, match="same dimensionality")
    assert check_pair(m, m) == 3


def test_landmarks_physical_lps_and_validation(tmp_path):
    img = _sitk_image(3)
    sitk.WriteImage(img, str(tmp_path / "img.mha"))
    mt = load_image(tmp_path / "img.mha")
    idx = [(1, 2, 3), (6, 0, 4), (0, 8, 0)]
    pts = np.array([img.TransformIndexToPhysicalPoint(i) for i in idx])
    csv = tmp_path / "lm.csv"
    csv.write_text("x,y,z\n" + "".join(",".join(map(str, p)) + "\n" for p in pts))
    loaded = load_landmarks(csv, mt)
    np.testing.assert_allclose(loaded, pts)
    np.testing.assert_allclose(lps_to_voxel(loaded, mt), idx, atol=1e-6)
    # voxel-unit keypoint files (Learn2Reg) give the same physical points
    kp = tmp_path / "kp.csv"
    kp.write_text("".join(f"{a},{b},{c}\n" for a, b, c in idx))
    np.testing.assert_allclose(load_landmarks(kp, mt, units="voxel"), pts, atol=1e-6)
    save_landmarks(pts, tmp_path / "saved.csv")
    np.testing.assert_allclose(load_landmarks(tmp_path / "saved.csv"), pts, atol=1e-5)

    far = tmp_path / "outside.csv"
    far.write_text(f"{pts[0][0]},{pts[0][1]},{pts[0][2]}\n{pts[0][0] + 100},{pts[0][1]},{pts[0][2]}\n")
    _raises_naming(far, load_landmarks, far, mt, match="outside the image")
    ras = tmp_path / "ras.csv"  # RAS coordinates (x, y negated) are a typical mistake and fall outside
    ras.write_text("".join(f"{-p[0]},{-p[1]},{p[2]}\n" for p in pts))
    _raises_naming(ras, load_landmarks, ras, mt, match="outside")
    two = tmp_path / "two.csv"
    two.write_text("1,2\n3,4\n")
    _raises_naming(two, load_landmarks, two, mt, match="3D")
    _raises_naming(tmp_path / "none.csv", load_landmarks, tmp_path / "none.csv", match="not found")


def test_save_image_refuses_to_overwrite(tmp_path):
    arr = torch.rand(1, 4, 5)
    out = save_image(arr, tmp_path / "a.nii.gz")
    before = out.read_bytes()
    _raises_naming(out, save_image, torch.zeros(1, 4, 5), out, match="exists")
    assert out.read_bytes() == before
    save_image(torch.zeros(1, 4, 5), out, overwrite=True)
    assert load_image(out).abs().max() == 0
    # never over the image's own source, even with overwrite=True
    src = load_image(out)
    _raises_naming(out, save_image, src, out, overwrite=True, match="input file")
    _raises_naming(out, save_image, arr, out, overwrite=True, protect=[out], match="input file")
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]  # no temporary leftovers
    with pytest.raises(RegistrationInputError, match="cannot write .png"):
        save_image(arr, tmp_path / "a.png")


def test_real_shared_files(shared_data):
    """The development files load with the expected shapes (2D NRRD, 2D MHA, 3D NIfTI + labels)."""
    nrrd = load_image(shared_data / "oasis2d" / "slices" / "oasis2d_0000.nrrd")
    assert nrrd.shape == (1, 128, 128)
    head = load_image(shared_data / "head2d" / "MR_2D_head_fixed.mha", expected_dims=2)
    assert head.shape == (1, 256, 256)
    lab = load_label(shared_data / "tiny_mr_pair" / "anatomical_label.nii.gz", expected_dims=3)
    img = load_image(shared_data / "tiny_mr_pair" / "anatomical.nii", expected_dims=3)
    assert lab.shape == img.shape and lab.dtype == torch.int64 and set(lab.unique().tolist()) <= {0, 1}
