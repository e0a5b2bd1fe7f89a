"""Images written in the format their extension names, geometry kept: read back with SimpleITK."""

from __future__ import annotations

import math

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from regnet_zoo.data.io import load_image, save_image
from regnet_zoo.errors import RegistrationInputError

FORMATS = [".nii.gz", ".nii", ".mha", ".nrrd"]


def _affine(n: int) -> np.ndarray:
    """A RAS affine with rotation, anisotropic spacing and an offset (2D embedded in 4x4)."""
    a = np.eye(4)
    c, s = math.cos(0.3), math.sin(0.3)
    rot = np.eye(n)
    rot[:2, :2] = [[c, -s], [s, c]]
    if n == 3:
        c2, s2 = math.cos(-0.2), math.sin(-0.2)
        rot = rot @ np.array([[1, 0, 0], [0, c2, -s2], [0, s2, c2]])
    a[:n, :n] = rot @ np.diag([0.8, 1.7, 2.5][:n])
    a[:n, 3] = [12.0, -7.5, 3.25][:n]
    return a


def _expected_itk(affine: np.ndarray, n: int):
    """What ITK must report, by hand: LPS = diag(-1, -1, 1) RAS."""
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine
    spacing = np.linalg.norm(lps[:n, :n], axis=0)
    return lps[:n, 3], spacing, (lps[:n, :n] / spacing).ravel()


@pytest.mark.parametrize("suffix", FORMATS)
@pytest.mark.parametrize("shape", [(1, 9, 7), (1, 6, 5, 4), (3, 6, 5, 4), (2, 9, 7)])
def test_round_trip_through_simpleitk(tmp_path, suffix, shape):
    n = len(shape) - 1
    data = torch.rand(shape)
    affine = _affine(n)
    path = save_image(data, tmp_path / f"img{suffix}", affine=affine)
    image = sitk.ReadImage(str(path))
    origin, spacing, direction = _expected_itk(affine, n)
    d = image.GetDimension()
    # multi-channel NIfTI keeps the Learn2Reg layout (channels as a trailing axis): ITK sees d > n axes
    assert d == n or (suffix.startswith(".nii") and shape[0] > 1)
    np.testing.assert_allclose(image.GetOrigin()[:n], origin, atol=1e-4)
    np.testing.assert_allclose(image.GetSpacing()[:n], spacing, atol=1e-5)
    np.testing.assert_allclose(np.reshape(image.GetDirection(), (d, d))[:n, :n].ravel(), direction, atol=1e-5)
    if d == n:
        assert image.GetNumberOfComponentsPerPixel() == shape[0]
        arr = sitk.GetArrayFromImage(image)  # (z, y, x[, C])
        ours = data.numpy()
        ours = np.transpose(ours, (*range(n, 0, -1), 0)) if shape[0] > 1 else np.transpose(ours[0])
        np.testing.assert_allclose(arr, ours, atol=1e-6)
    # and our own reader gives back the data and the affine
    back = load_image(path, expected_dims=n)
    np.testing.assert_allclose(back.affine.numpy(), affine, atol=1e-4)
    np.testing.assert_allclose(back.numpy(), data.numpy(), atol=1e-6)


@pytest.mark.parametrize("suffix", [".mha", ".nrrd"])
def test_label_dtype_kept(tmp_path, suffix):
    labels = torch.randint(0, 40, (1, 8, 6, 5), dtype=torch.int64)
    path = save_image(labels, tmp_path / f"lab{suffix}", affine=_affine(3))
    image = sitk.ReadImage(str(path))
    assert image.GetPixelID() == sitk.sitkInt32
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), np.transpose(labels[0].numpy()))


def test_unknown_extension_refused(tmp_path):
    with pytest.raises(RegistrationInputError, match=r"\.png"):
        save_image(torch.zeros(1, 4, 4), tmp_path / "a.png")
    with pytest.raises(RegistrationInputError, match="without extension"):
        save_image(torch.zeros(1, 4, 4), tmp_path / "a")
