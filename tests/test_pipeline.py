"""The registration pipeline: one preprocessing path, the affine stage composed with the network, stages.

Independent references: the bundles' own inference transforms (MONAI ``Compose`` from the config), SimpleITK
``ReadTransform`` / ``Resample`` / ``CompositeTransform`` for the written affine and the whole field.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from sitk_images import sitk_array, smooth_blobs, write_sitk
from torch import nn

import regnet_zoo
from regnet_zoo import METHODS
from regnet_zoo.api import pipeline, register
from regnet_zoo.api.methods import bundle_preprocessing
from regnet_zoo.bundle import bundle_parser
from regnet_zoo.cli import main
from regnet_zoo.data.preprocess import Preprocessing

PACKAGED = [m for m in METHODS if (regnet_zoo.project_root() / "bundles" / m / "train.yaml").is_file()]


@pytest.fixture(scope="module")
def phantom_dir(tmp_path_factory) -> Path:
    from regnet_zoo.data.phantom import make_phantom_dataset

    return make_phantom_dataset(tmp_path_factory.mktemp("phantom") / "ph", 2, n_subjects=4, size=32, n_val=2)


def case(phantom_dir: Path, n: int, folder: str = "imagesTr") -> Path:
    return phantom_dir / folder / f"PHANTOM2D_{n:04d}_0000.nii.gz"


class ConstantShift(nn.Module):
    """Test double for a trained network: one constant displacement (voxels of its input grid); records
    the inputs it is given."""

    in_channels = 1

    def __init__(self, shift=(0.0, 0.0)):
        super().__init__()
        self.shift = torch.tensor(shift)
        self.seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def forward(self, fixed, moving):
        self.seen.append((fixed.clone(), moving.clone()))
        ddf = self.shift.view(1, -1, *[1] * (fixed.ndim - 2)).expand(fixed.shape[0], -1, *fixed.shape[2:])
        return {"ddf": ddf.clone(), "warped": moving}


@pytest.mark.parametrize("method", PACKAGED)
@pytest.mark.parametrize("overrides", [{"image_size": [24, 40]}, {"transforms#pad_multiple": 16}])
def test_network_input_is_the_same_through_bundle_transforms_and_register(
    method, overrides, phantom_dir, tmp_path, monkeypatch
):
    fixed, moving = case(phantom_dir, 3), case(phantom_dir, 4)
    parser = bundle_parser(method, "inference", spatial_dims=2, **overrides)
    transforms = parser.get_parsed_content("transforms")
    expected = transforms({"fixed": str(fixed), "moving": str(moving)})
    network = ConstantShift()
    prep = bundle_preprocessing(method, 2, **overrides)
    monkeypatch.setattr(pipeline, "prepare_network", lambda *args: (network, prep))
    register(fixed, moving, method, affine=prep.pre_align)  # the bundle's own pre-alignment (RegNet: affine)
    (fixed_in, moving_in), = network.seen
    assert fixed_in.shape[2:] == expected["fixed"].shape[1:]
    if "image_size" in overrides:
        assert tuple(fixed_in.shape[2:]) == (24, 40)
    else:
        assert all(n % 16 == 0 for n in fixed_in.shape[2:])
    torch.testing.assert_close(fixed_in, expected["fixed"].as_tensor()[None], atol=1e-6, rtol=0)
    torch.testing.assert_close(moving_in, expected["moving"].as_tensor()[None], atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------------------------------------
# the affine stage composed with the network
# ----------------------------------------------------------------------------------------------------------
@pytest.fixture()
def oblique_pair(tmp_path):
    fixed = write_sitk(smooth_blobs((28, 24), 1), tmp_path / "f.nii.gz", (1.5, 1.0), (10.0, -3.0), 0.3)
    moving = write_sitk(smooth_blobs((30, 26), 2), tmp_path / "m.nii.gz", (1.2, 1.1), (6.0, -8.0), -0.2)
    c, s = math.cos(0.15), math.sin(0.15)
    matrix = np.eye(4)  # physical RAS, fixed point -> moving point
    matrix[:2, :2] = [[1.05 * c, -s], [s, 0.95 * c]]
    matrix[:2, 3] = [2.0, -1.5]
    return tmp_path / "f.nii.gz", tmp_path / "m.nii.gz", fixed, moving, matrix


@pytest.mark.parametrize("shift", [(0.0, 0.0), (1.5, -2.0)])
def test_affine_stage_whole_transform_and_itk_files(oblique_pair, shift, tmp_path, monkeypatch):
    """Fields hold affine then deformable: ddf_itk(p) == T(p + d_mm) - p (SimpleITK composite transform);
    affine.tfm resamples the moving image as the affine-only registration; affine.txt holds T."""
    fixed_path, moving_path, fixed_sitk, moving_sitk, matrix = oblique_pair
    network = ConstantShift(shift)
    monkeypatch.setattr(pipeline, "prepare_network", lambda *args: (network, Preprocessing()))
    monkeypatch.setattr(pipeline, "affine_stage", lambda *args, **kwargs: matrix)
    result = register(fixed_path, moving_path, "ddrnet")
    paths = result.save(tmp_path / "out")
    np.testing.assert_allclose(np.loadtxt(paths["affine_txt"]), matrix, atol=1e-9)
    affine_tfm = sitk.ReadTransform(str(paths["affine_tfm"]))
    # the network saw the moving image resampled through T: with d = 0 the result is the affine warp
    direction = np.array(fixed_sitk.GetDirection()).reshape(2, 2)
    d_mm = direction @ (np.array(fixed_sitk.GetSpacing()) * shift)
    composite = sitk.CompositeTransform([affine_tfm, sitk.TranslationTransform(2, d_mm.tolist())])
    field = sitk_array(result.ddf_itk)
    for index in [(0, 0), (5, 17), (27, 23), (13, 2)]:
        p = np.array(fixed_sitk.TransformIndexToPhysicalPoint(index))
        moved = np.array(composite.TransformPoint(p.tolist()))
        np.testing.assert_allclose(field[index], moved - p, atol=1e-5)
    expected = sitk.Resample(moving_sitk, fixed_sitk, composite)
    np.testing.assert_allclose(result.warped[0].numpy(), sitk_array(expected), atol=2e-4)
    if shift == (0.0, 0.0):
        affine_only = sitk.Resample(moving_sitk, fixed_sitk, affine_tfm)
        np.testing.assert_allclose(result.warped[0].numpy(), sitk_array(affine_only), atol=2e-4)


def test_affine_none_writes_no_affine_and_register_rejects_unknown_stage(oblique_pair, tmp_path, monkeypatch):
    fixed_path, moving_path, *_ = oblique_pair
    monkeypatch.setattr(pipeline, "prepare_network", lambda *args: (ConstantShift(), Preprocessing()))
    result = register(fixed_path, moving_path, "ddrnet", affine=None)
    assert result.affine is None
    paths = result.save(tmp_path / "out")
    assert "affine_txt" not in paths and not (tmp_path / "out" / "affine.tfm").exists()
    with pytest.raises(ValueError, match="affine"):
        register(fixed_path, moving_path, "ddrnet", affine="similarity")


def test_cli_reports_stages_unless_quiet_and_metrics_hold_initial_dice(
    phantom_dir, tmp_path, monkeypatch, capsys
):
    monkeypatch.setattr(pipeline, "prepare_network", lambda *args: (ConstantShift(), Preprocessing()))
    matrix = np.eye(4)
    matrix[:2, 3] = [1.0, 0.5]
    monkeypatch.setattr(pipeline, "affine_stage", lambda *args, **kwargs: matrix)
    args = [
        "register", "--fixed", case(phantom_dir, 3), "--moving", case(phantom_dir, 4),
        "--fixed-label", case(phantom_dir, 3, "labelsTr"), "--moving-label", case(phantom_dir, 4, "labelsTr"),
    ]  # fmt: skip
    assert main([str(a) for a in args + ["--out", tmp_path / "a"]]) == 0
    err = capsys.readouterr().err
    assert "affine pre-alignment" in err and "ddrnet network" in err and "warp and metrics" in err
    metrics = json.loads((tmp_path / "a" / "metrics.json").read_text())
    for key in ("dice_mean_initial", "hd95_mm_initial", "dice_mean_affine", "dice_mean", "stage_s"):
        assert metrics[key] is not None, key
    # the network moves nothing here: the final Dice is the affine stage's, not the initial one
    assert metrics["dice_mean"] == pytest.approx(metrics["dice_mean_affine"], abs=1e-9)
    assert metrics["dice_mean"] != pytest.approx(metrics["dice_mean_initial"], abs=1e-6)
    assert main([str(a) for a in args + ["--out", tmp_path / "b", "--quiet", "--affine", "none"]]) == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    metrics = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert metrics["dice_mean"] == pytest.approx(metrics["dice_mean_initial"], abs=1e-9)
    assert "dice_mean_affine" not in metrics


def test_register_cli_affine_stage_on_real_mr_pair_agrees_with_simpleitk(shared_data, tmp_path, capsys):
    """``regnet-zoo register`` on tiny_mr_pair (2 mm vs 4 mm, another field of view, a rigid motion): the
    written affine.tfm maps fixed points where SimpleITK's own rigid registration (Mattes MI) does, within
    1.5 fixed voxels (corners included), and raises the images' correlation. (3D DDR-Net freshly
    initialised, saved as self-describing weights: the affine stage and its outputs are under test.)"""
    from regnet_zoo.bundle import load_bundle_network
    from regnet_zoo.weights import save_weights, weights_metadata

    folder = shared_data / "tiny_mr_pair"
    fixed_path, moving_path = folder / "anatomical.nii", folder / "reoriented_anat_moved.nii"
    network = load_bundle_network("ddrnet", load_weights=False, spatial_dims=3)
    parser = bundle_parser("ddrnet", "train", spatial_dims=3)
    config = {k: parser.get_parsed_content(f"network_def#{k}") for k in parser.get("network_def")}
    meta = weights_metadata("ddrnet", config, Preprocessing(pad_multiple=None).to_dict())
    save_weights(tmp_path / "model.pt", network, meta)
    args = ["register", "--method", "ddrnet", "--fixed", fixed_path, "--moving", moving_path,
            "--fixed-label", folder / "anatomical_label.nii.gz",
            "--moving-label", folder / "reoriented_anat_moved_label.nii.gz",
            "--weights", tmp_path / "model.pt", "--affine", "rigid", "--out", tmp_path / "out"]  # fmt: skip
    assert main([str(a) for a in args]) == 0
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert {"dice_mean_initial", "hd95_mm_initial", "dice_mean_affine", "dice_mean"} <= set(metrics)
    ours = sitk.ReadTransform(str(tmp_path / "out" / "affine.tfm"))

    fixed = sitk.ReadImage(str(fixed_path), sitk.sitkFloat32)
    moving = sitk.ReadImage(str(moving_path), sitk.sitkFloat32)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    method = sitk.ImageRegistrationMethod()
    method.SetMetricAsMattesMutualInformation(32)
    method.SetOptimizerAsRegularStepGradientDescent(1.0, 1e-4, 150)
    method.SetOptimizerScalesFromPhysicalShift()
    initial = sitk.CenteredTransformInitializer(
        fixed, moving, sitk.Euler3DTransform(), sitk.CenteredTransformInitializerFilter.MOMENTS
    )
    method.SetInitialTransform(initial, inPlace=False)
    method.SetInterpolator(sitk.sitkLinear)
    method.SetShrinkFactorsPerLevel([2, 1])
    method.SetSmoothingSigmasPerLevel([1, 0])
    reference = method.Execute(fixed, moving)
    size = fixed.GetSize()
    corners = [(0, 0, 0), tuple(n - 1 for n in size), tuple(n // 2 for n in size)]
    for index in corners:
        p = fixed.TransformIndexToPhysicalPoint(index)
        distance = np.linalg.norm(np.subtract(ours.TransformPoint(p), reference.TransformPoint(p)))
        assert distance < 3.0, (index, distance)  # 1.5 fixed voxels (2 mm), corners included

    def correlation(transform) -> float:
        warped = sitk.GetArrayFromImage(sitk.Resample(moving, fixed, transform))
        inside = warped > 0
        return float(np.corrcoef(sitk.GetArrayFromImage(fixed)[inside], warped[inside])[0, 1])

    assert correlation(ours) > correlation(sitk.Transform(3, sitk.sitkIdentity)) + 0.1


def test_pre_aligned_network_input_is_the_same_through_bundle_transforms_and_register(
    phantom_dir, monkeypatch
):
    """With the affine stage on both paths (``transforms#pre_align`` / ``register(affine=...)``), the network
    still sees the same pair: the stage is one function of the normalised images on both."""
    fixed, moving = case(phantom_dir, 3), case(phantom_dir, 4)
    overrides = {"image_size": [24, 40], "transforms#pre_align": "affine"}
    parser = bundle_parser("ddrnet", "inference", spatial_dims=2, **overrides)
    expected = parser.get_parsed_content("transforms")({"fixed": str(fixed), "moving": str(moving)})
    network = ConstantShift()
    prep = bundle_preprocessing("ddrnet", 2, **overrides)
    assert prep.pre_align == "affine"
    monkeypatch.setattr(pipeline, "prepare_network", lambda *args: (network, prep))
    result = register(fixed, moving, "ddrnet", affine="affine")
    (fixed_in, moving_in), = network.seen
    np.testing.assert_allclose(result.affine, expected["pre_affine"].numpy(), atol=1e-6)
    assert not np.allclose(result.affine, np.eye(4), atol=1e-3)  # the stage did something
    torch.testing.assert_close(fixed_in, expected["fixed"].as_tensor()[None], atol=1e-6, rtol=0)
    torch.testing.assert_close(moving_in, expected["moving"].as_tensor()[None], atol=1e-5, rtol=0)


def test_working_grid_resize_is_antialiased_corner_aligned_linear():
    """``resize_image`` == scipy: Gaussian (sigma (f - 1) / 2 on shrinking axes, nearest border) then linear
    interpolation at the corner-aligned positions ``j (n - 1) / (m - 1)``."""
    from scipy import ndimage

    from regnet_zoo.data.preprocess import resize_image

    image = torch.rand(1, 1, 40, 17, 12, dtype=torch.float64)
    size = (19, 30, 12)
    smoothed = image[0, 0].numpy()
    for axis, (old, new) in enumerate(zip(image.shape[2:], size, strict=True)):
        sigma = ((old - 1) / (new - 1) - 1) / 2
        if sigma > 0.1:
            smoothed = ndimage.gaussian_filter1d(smoothed, sigma, axis=axis, mode="nearest", truncate=3.0)
    axes = [np.arange(m) * (n - 1) / (m - 1) for n, m in zip(image.shape[2:], size, strict=True)]
    coords = np.stack(np.meshgrid(*axes, indexing="ij"))
    expected = ndimage.map_coordinates(smoothed, coords, order=1, mode="nearest")
    np.testing.assert_allclose(resize_image(image, size)[0, 0].numpy(), expected, atol=1e-5)  # float32
