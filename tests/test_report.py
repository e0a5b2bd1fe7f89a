"""register --report picture (regnet_zoo.report): right planes, radiological orientation, a valid PNG."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from regnet_zoo.errors import RegistrationInputError
from regnet_zoo.report import report_slices, write_report

SHAPE = (20, 24, 16)  # x (R), y (A), z (S) in the RAS-ordered reference volume


def _marker_volume() -> np.ndarray:
    """Zeros with a marker near the patient's right-anterior-superior corner: x, y, z all high."""
    vol = np.zeros(SHAPE, np.float32)
    vol[14:17, 17:20, 11:13] = 1.0
    vol[8:12, 8:12, 6:10] = 0.3  # something at the centre so every slice is not empty
    return vol


def _as_stored(vol: np.ndarray, layout: str) -> tuple[np.ndarray, np.ndarray]:
    """The same physical volume stored RAS-ordered, LPS-ordered (x, y flipped) or with permuted axes."""
    spacing = np.array([1.0, 1.5, 2.0])
    if layout == "ras":
        return vol, np.diag([*spacing, 1.0])
    if layout == "lps":  # index i runs right -> left, j anterior -> posterior
        a = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])
        a[:2, 3] = [(SHAPE[0] - 1) * spacing[0], (SHAPE[1] - 1) * spacing[1]]
        return vol[::-1, ::-1].copy(), a
    # axes stored as (z, x, y): array axis 0 is S, 1 is R, 2 is A
    a = np.zeros((4, 4))
    a[2, 0], a[0, 1], a[1, 2], a[3, 3] = spacing[2], spacing[0], spacing[1], 1.0
    return np.transpose(vol, (2, 0, 1)).copy(), a


def _slices(arr: np.ndarray, affine: np.ndarray) -> dict:
    img = torch.from_numpy(arr)[None]
    return report_slices(img, img, img, torch.zeros(3, *arr.shape), affine)


@pytest.mark.parametrize("layout", ["ras", "lps", "permuted"])
def test_marker_lands_in_radiological_quadrants(layout):
    arr, affine = _as_stored(_marker_volume(), layout)
    # slice through the marker: the report cuts through the label centre, so give the marker as the label
    label = torch.from_numpy((arr == 1.0).astype(np.int64))[None]
    img = torch.from_numpy(arr)[None]
    slices = report_slices(img, img, img, torch.zeros(3, *arr.shape), affine, fixed_label=label)
    for plane in ("axial", "coronal", "sagittal"):
        panel = slices[plane]["fixed"]
        rows, cols = np.nonzero(panel == 1.0)
        assert len(rows), plane
        # top (anterior / superior) and left (patient's right; anterior in sagittal) quarter of the panel
        assert rows.max() < panel.shape[0] / 3, plane
        assert cols.max() < panel.shape[1] / 3, plane
    # panel shapes: axial (A-P rows, R-L cols), coronal (S-I, R-L), sagittal (S-I, A-P)
    assert slices["axial"]["fixed"].shape == (SHAPE[1], SHAPE[0])
    assert slices["coronal"]["fixed"].shape == (SHAPE[2], SHAPE[0])
    assert slices["sagittal"]["fixed"].shape == (SHAPE[2], SHAPE[1])
    assert float(slices["coronal"]["aspect"]) == pytest.approx(2.0 / 1.0)


def test_same_physical_volume_gives_same_panels():
    reference = _slices(*_as_stored(_marker_volume(), "ras"))
    for layout in ("lps", "permuted"):
        other = _slices(*_as_stored(_marker_volume(), layout))
        for plane in reference:
            np.testing.assert_array_equal(other[plane]["fixed"], reference[plane]["fixed"])


def test_displacement_drawn_in_display_directions():
    """A shift towards the patient's right (RAS +x) moves grid points left on screen (radiological)."""
    arr, affine = _as_stored(_marker_volume(), "lps")
    ddf = torch.zeros(3, *arr.shape)
    ddf[0] = -2.0  # LPS storage: array axis 0 points to the patient's left, so -2 voxels = 2 mm to the right
    img = torch.from_numpy(arr)[None]
    axial = report_slices(img, img, img, ddf, affine)["axial"]
    np.testing.assert_allclose(axial["ddf_cols"], -2.0)
    np.testing.assert_allclose(axial["ddf_rows"], 0.0)


def test_write_report_png(tmp_path):
    import matplotlib.image

    arr, affine = _as_stored(_marker_volume(), "permuted")
    img = MetaTensor(torch.from_numpy(arr)[None], affine=torch.as_tensor(affine))
    ddf = torch.zeros(3, *arr.shape)
    ddf[1, 5:8] = 3.0  # a folding band in the Jacobian
    label = torch.from_numpy((arr > 0).astype(np.int64))[None]
    out = write_report(
        tmp_path / "report.png", img, img, img, ddf, fixed_label=label, warped_label=label, title="pair"
    )
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pixels = matplotlib.image.imread(str(out))
    assert pixels.shape[0] > 500 and pixels.shape[1] > 1200
    assert pixels[..., :3].std() > 0.1  # not a blank page
    with pytest.raises(RegistrationInputError, match="exists"):
        write_report(out, img, img, img, ddf)
    with pytest.raises(RegistrationInputError, match="PNG"):
        write_report(tmp_path / "r.jpg", img, img, img, ddf)


def test_2d_report_has_one_row(tmp_path):
    import matplotlib.image

    img = MetaTensor(torch.rand(1, 30, 40), affine=torch.eye(4))
    slices = report_slices(img, img, img, torch.zeros(2, 30, 40))
    assert list(slices) == ["axial"] and slices["axial"]["fixed"].shape == (40, 30)
    out = write_report(tmp_path / "r.png", img, img, img, torch.zeros(2, 30, 40))
    pixels = matplotlib.image.imread(str(out))
    assert pixels.shape[1] > 2 * pixels.shape[0]  # one row of six panels
