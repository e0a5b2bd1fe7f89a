"""What register writes for other tools: transform.h5 (SimpleITK / ANTs / Slicer), the inverse, the report,
image formats; and the commands that read them back (warp --ddf transform.h5, transform-points).

The network is a test double (a smooth field, or a stationary velocity field integrated as DDR-Net does) so
that the outputs' conventions, not a model's quality, are tested. References: SimpleITK ``ReadTransform``,
``Resample`` and ``TransformPoint`` as a user calls them.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from sitk_images import sitk_array, smooth_blobs, write_sitk
from torch import nn

from regnet_zoo.api import pipeline
from regnet_zoo.cli import main
from regnet_zoo.core.integration import scaling_and_squaring
from regnet_zoo.data.preprocess import Preprocessing


def _smooth(shape, amplitude: float) -> torch.Tensor:
    grid = torch.stack(torch.meshgrid(*[torch.arange(s, dtype=torch.float32) for s in shape], indexing="ij"))
    n = len(shape)
    return torch.stack(
        [amplitude * torch.sin(2 * math.pi * grid[(i + 1) % n] / shape[(i + 1) % n] + i) for i in range(n)]
    )[None]


class SmoothField(nn.Module):
    """Test double: a smooth displacement (voxels of its input grid); with ``svf`` it returns a velocity
    and the DDF integrated from it, as DDR-Net does."""

    in_channels = 1
    integration_steps = 7

    def __init__(self, svf: bool = False, amplitude: float = 1.2):
        super().__init__()
        self.svf, self.amplitude = svf, amplitude

    def forward(self, fixed, moving):
        field = _smooth(fixed.shape[2:], self.amplitude).expand(fixed.shape[0], -1, *fixed.shape[2:])
        if not self.svf:
            return {"ddf": field.clone(), "warped": moving}
        return {"ddf": scaling_and_squaring(field, 7), "velocity": field.clone(), "warped": moving}


@pytest.fixture()
def pair(tmp_path):
    """Oblique, anisotropic 2D fixed and moving grids (different), with labels; an affine stage T."""
    f, m = smooth_blobs((30, 26), 1), smooth_blobs((32, 28), 2)
    files = {
        "fixed": tmp_path / "f.nii.gz", "moving": tmp_path / "m.nii.gz",
        "fixed_label": tmp_path / "fl.nii.gz", "moving_label": tmp_path / "ml.nii.gz",
    }  # fmt: skip
    write_sitk(f, files["fixed"], (1.5, 1.0), (10.0, -3.0), 0.3)
    write_sitk(m, files["moving"], (1.2, 1.1), (6.0, -8.0), -0.2)
    write_sitk((f > 0.6).astype(np.int16), files["fixed_label"], (1.5, 1.0), (10.0, -3.0), 0.3, label=True)
    write_sitk((m > 0.6).astype(np.int16), files["moving_label"], (1.2, 1.1), (6.0, -8.0), -0.2, label=True)
    c, s = math.cos(0.1), math.sin(0.1)
    matrix = np.eye(4)  # physical RAS, fixed point -> moving point
    matrix[:2, :2] = [[1.04 * c, -s], [s, 0.97 * c]]
    matrix[:2, 3] = [1.5, -1.0]
    return files, matrix


def _patch(monkeypatch, network, matrix):
    monkeypatch.setattr(pipeline, "prepare_network", lambda *args: (network, Preprocessing()))
    monkeypatch.setattr(pipeline, "affine_stage", lambda *args, **kwargs: matrix)


def _run(capsys, *argv) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


@pytest.mark.parametrize("with_affine", [True, False])
def test_transform_h5_reproduces_warped_and_reads_back(pair, with_affine, tmp_path, monkeypatch, capsys):
    files, matrix = pair
    _patch(monkeypatch, SmoothField(), matrix)
    out = tmp_path / "out"
    args = ["register", "--fixed", files["fixed"], "--moving", files["moving"], "--out", out, "--quiet"]
    code, err = _run(capsys, *args, *([] if with_affine else ["--affine", "none"]))
    assert code == 0, err
    assert (out / "affine.tfm").exists() == with_affine
    transform = sitk.ReadTransform(str(out / "transform.h5"))
    fixed = sitk.ReadImage(str(files["fixed"]))
    moving = sitk.ReadImage(str(files["moving"]), sitk.sitkFloat64)
    resampled = sitk_array(sitk.Resample(moving, fixed, transform, sitk.sitkLinear, 0.0))
    warped = sitk_array(sitk.ReadImage(str(out / "warped.nii.gz")))
    assert np.abs(warped).max() > 0.5
    np.testing.assert_allclose(resampled, warped, atol=2e-4)
    # the whole transform is in ddf_itk too; the composite keeps the affine stage apart (ANTs / Slicer)
    field = sitk.ReadImage(str(out / "ddf_itk.nii.gz"), sitk.sitkVectorFloat64)
    whole = sitk.DisplacementFieldTransform(field)
    for index in [(0, 0), (7, 19), (29, 25), (15, 3)]:
        p = fixed.TransformIndexToPhysicalPoint(index)
        np.testing.assert_allclose(transform.TransformPoint(p), whole.TransformPoint(p), atol=1e-5)
    # warp --ddf transform.h5 gives register's warped image
    code, err = _run(capsys, "warp", "--moving", files["moving"], "--fixed", files["fixed"],
                     "--ddf", out / "transform.h5", "--out", tmp_path / "w.mha")  # fmt: skip
    assert code == 0, err
    np.testing.assert_allclose(sitk_array(sitk.ReadImage(str(tmp_path / "w.mha"))), warped, atol=2e-4)


def test_transform_points_command_matches_sitk(pair, tmp_path, monkeypatch, capsys):
    files, matrix = pair
    _patch(monkeypatch, SmoothField(), matrix)
    out = tmp_path / "out"
    code, err = _run(capsys, "register", "--fixed", files["fixed"], "--moving", files["moving"], "--out", out)
    assert code == 0, err
    fixed = sitk.ReadImage(str(files["fixed"]))
    indices = [(3.5, 4), (12, 20), (25, 9)]
    points = np.array([fixed.TransformContinuousIndexToPhysicalPoint(i) for i in indices])
    (tmp_path / "p.csv").write_text("x,y\n" + "".join(f"{a},{b}\n" for a, b in points))
    code, err = _run(capsys, "transform-points", "--transform", out / "transform.h5", "--points",
                     tmp_path / "p.csv", "--out", tmp_path / "moved.csv")  # fmt: skip
    assert code == 0, err
    moved = np.loadtxt(tmp_path / "moved.csv", delimiter=",", skiprows=1)
    transform = sitk.ReadTransform(str(out / "transform.h5"))
    np.testing.assert_allclose(moved, [transform.TransformPoint(p.tolist()) for p in points], atol=1e-5)
    assert np.abs(moved - points).max() > 1.0
    code, err = _run(capsys, "transform-points", "--transform", out / "transform.h5", "--points",
                     tmp_path / "moved.csv", "--out", tmp_path / "back.csv", "--inverse")  # fmt: skip
    assert code == 0, err
    back = np.loadtxt(tmp_path / "back.csv", delimiter=",", skiprows=1)
    np.testing.assert_allclose(back, points, atol=1e-4)


@pytest.mark.parametrize("svf", [True, False])
def test_register_inverse(pair, svf, tmp_path, monkeypatch, capsys):
    files, matrix = pair
    _patch(monkeypatch, SmoothField(svf=svf), matrix)
    out = tmp_path / "out"
    code, err = _run(capsys, "register", "--fixed", files["fixed"], "--moving", files["moving"], "--out", out,
                     "--inverse", "--quiet")  # fmt: skip
    assert code == 0, err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["inverse_method"] == ("svf" if svf else "fixed_point")
    assert 0 <= metrics["inverse_consistency_mean_mm"] <= metrics["inverse_consistency_p95_mm"] < 0.05
    forward = sitk.ReadTransform(str(out / "transform.h5"))
    inverse = sitk.ReadTransform(str(out / "inverse_transform.h5"))
    fixed = sitk.ReadImage(str(files["fixed"]))
    moving = sitk.ReadImage(str(files["moving"]), sitk.sitkFloat64)
    for index in [(8, 9), (15, 13), (20, 6)]:  # inside the grid, away from its border
        p = fixed.TransformIndexToPhysicalPoint(index)
        np.testing.assert_allclose(inverse.TransformPoint(forward.TransformPoint(p)), p, atol=0.02)
    # the fixed image on the moving grid is SimpleITK's resampling through the inverse transform
    fixed_warped = sitk.ReadImage(str(out / "fixed_warped.nii.gz"))
    assert fixed_warped.GetSize() == moving.GetSize()
    np.testing.assert_allclose(fixed_warped.GetOrigin(), moving.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(fixed_warped.GetDirection(), moving.GetDirection(), atol=1e-6)
    expected = sitk.Resample(sitk.Cast(fixed, sitk.sitkFloat64), moving, inverse, sitk.sitkLinear, 0.0)
    np.testing.assert_allclose(sitk_array(fixed_warped), sitk_array(expected), atol=2e-4)
    assert np.abs(sitk_array(fixed_warped)).max() > 0.5


def test_register_report_and_format(pair, tmp_path, monkeypatch, capsys):
    import matplotlib.image

    files, matrix = pair
    _patch(monkeypatch, SmoothField(), matrix)
    out = tmp_path / "out"
    code, err = _run(capsys, "register", "--fixed", files["fixed"], "--moving", files["moving"],
                     "--fixed-label", files["fixed_label"], "--moving-label", files["moving_label"],
                     "--out", out, "--report", "--format", ".mha", "--quiet")  # fmt: skip
    assert code == 0, err
    pixels = matplotlib.image.imread(str(out / "report.png"))
    assert pixels.shape[0] > 250 and pixels.shape[1] > 1000 and pixels[..., :3].std() > 0.1
    fixed = sitk.ReadImage(str(files["fixed"]))
    for name in ("warped.mha", "warped_label.mha", "jacobian.mha", "ddf_itk.mha"):
        image = sitk.ReadImage(str(out / name))
        np.testing.assert_allclose(image.GetOrigin(), fixed.GetOrigin(), atol=1e-4)
        np.testing.assert_allclose(image.GetSpacing(), fixed.GetSpacing(), atol=1e-5)
        np.testing.assert_allclose(image.GetDirection(), fixed.GetDirection(), atol=1e-6)
    assert (out / "ddf_voxel.nii.gz").exists() and not (out / "warped.nii.gz").exists()
    assert sitk.ReadImage(str(out / "ddf_itk.mha")).GetNumberOfComponentsPerPixel() == 2
    # an existing report is not replaced unasked
    code, err = _run(capsys, "register", "--fixed", files["fixed"], "--moving", files["moving"],
                     "--out", out, "--report", "--format", ".mha")  # fmt: skip
    assert code == 2 and "report.png" in err


def _one_line_error(code: int, err: str, match: str) -> None:
    assert code == 2, err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1 and match in lines[0], err
    assert "Traceback" not in err


def test_bad_input_to_new_commands(pair, tmp_path, capsys):
    files, _ = pair
    (tmp_path / "p.csv").write_text("x,y\n1,2\n")
    (tmp_path / "p3.csv").write_text("1,2,3\n")
    (tmp_path / "bad.h5").write_text("not a transform")
    tfm = tmp_path / "a.tfm"
    sitk.WriteTransform(sitk.AffineTransform(2), str(tfm))
    tp = ["transform-points", "--out", tmp_path / "o.csv"]
    _one_line_error(*_run(capsys, *tp, "--transform", tmp_path / "none.h5", "--points", tmp_path / "p.csv"),
                    "not found")  # fmt: skip
    _one_line_error(*_run(capsys, *tp, "--transform", tmp_path / "bad.h5", "--points", tmp_path / "p.csv"),
                    "cannot read transform")  # fmt: skip
    _one_line_error(*_run(capsys, *tp, "--transform", tfm, "--points", tmp_path / "p3.csv"), "2D")
    _one_line_error(*_run(capsys, *tp, "--transform", tfm, "--points", tmp_path / "none.csv"), "not found")
    _one_line_error(*_run(capsys, *tp, "--transform", files["fixed"], "--points", tmp_path / "p.csv"),
                    "components")  # fmt: skip
    _one_line_error(*_run(capsys, "transform-points", "--transform", tfm, "--points", tmp_path / "p.csv",
                          "--out", tmp_path / "o.txt"), ".csv")  # fmt: skip
    (tmp_path / "o.csv").write_text("keep")
    _one_line_error(*_run(capsys, *tp, "--transform", tfm, "--points", tmp_path / "p.csv"), "exists")
    assert (tmp_path / "o.csv").read_text() == "keep"
    warp = ["warp", "--moving", files["moving"], "--fixed", files["fixed"]]
    _one_line_error(*_run(capsys, *warp, "--ddf", tmp_path / "bad.h5", "--out", tmp_path / "w.mha"),
                    "cannot read transform")  # fmt: skip
    _one_line_error(*_run(capsys, *warp, "--ddf", tfm, "--out", tmp_path / "w.png"), "--out must be")
    code, err = _run(capsys, "register", "--fixed", files["fixed"], "--moving", files["moving"],
                     "--out", tmp_path / "r", "--format", ".png")  # fmt: skip
    assert code == 2 and "invalid choice" in err and "Traceback" not in err


def test_3d_tiny_mr_pair_transform_and_inverse(shared_data, tmp_path, monkeypatch, capsys):
    """3D, real geometry (different grids and orientations): transform.h5 and inverse_transform.h5 resample
    as register warped; the SVF inverse is consistent."""
    folder = shared_data / "tiny_mr_pair"
    fixed_path, moving_path = folder / "anatomical.nii", folder / "reoriented_anat_moved.nii"
    matrix = np.eye(4)
    matrix[:3, 3] = [2.0, -3.0, 1.0]
    _patch(monkeypatch, SmoothField(svf=True, amplitude=1.0), matrix)
    out = tmp_path / "out"
    code, err = _run(capsys, "register", "--fixed", fixed_path, "--moving", moving_path, "--out", out,
                     "--inverse", "--quiet", "--format", ".nrrd")  # fmt: skip
    assert code == 0, err
    fixed = sitk.ReadImage(str(fixed_path), sitk.sitkFloat64)
    moving = sitk.ReadImage(str(moving_path), sitk.sitkFloat64)
    forward = sitk.ReadTransform(str(out / "transform.h5"))
    warped = sitk_array(sitk.ReadImage(str(out / "warped.nrrd")))
    resampled = sitk_array(sitk.Resample(moving, fixed, forward, sitk.sitkLinear, 0.0))
    scale = float(np.abs(warped).max())
    np.testing.assert_allclose(resampled / scale, warped / scale, atol=1e-4)
    inverse = sitk.ReadTransform(str(out / "inverse_transform.h5"))
    fixed_warped = sitk_array(sitk.ReadImage(str(out / "fixed_warped.nrrd")))
    expected = sitk_array(sitk.Resample(fixed, moving, inverse, sitk.sitkLinear, 0.0))
    np.testing.assert_allclose(fixed_warped / scale, expected / scale, atol=1e-4)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["inverse_method"] == "svf" and metrics["inverse_consistency_p95_mm"] < 0.05
