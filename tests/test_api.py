"""Python API (regnet_zoo.api): physical-space warping vs SimpleITK, DDF conventions, register() end to end.

Independent references: SimpleITK ``Resample`` / ``DisplacementFieldTransform`` / ``TranslationTransform``,
numpy finite differences for the Jacobian, brute-force Dice. The trained networks are tiny models trained
here through each packaged bundle's ``train.yaml`` (one iteration on a small phantom set).
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch
from monai.data import MetaTensor
from sitk_images import sitk_array, smooth_blobs, write_sitk
from torch import nn

import regnet_zoo
from regnet_zoo import METHODS
from regnet_zoo.api import (
    ddf_from_itk,
    ddf_to_itk,
    evaluate_ddf,
    load_ddf,
    load_method,
    pipeline,
    register,
    warp_physical,
)
from regnet_zoo.data.io import load_image, load_label
from regnet_zoo.data.preprocess import Preprocessing
from regnet_zoo.errors import RegistrationInputError

PACKAGED = [m for m in METHODS if (regnet_zoo.project_root() / "bundles" / m / "train.yaml").is_file()]


# ----------------------------------------------------------------------------------------------------------
# helpers: images with ITK geometry (array axis i = ITK index i)
# ----------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def phantom_dir(tmp_path_factory) -> Path:
    from regnet_zoo.data.phantom import make_phantom_dataset

    return make_phantom_dataset(tmp_path_factory.mktemp("phantom") / "ph", 2, n_subjects=4, size=32, n_val=2)


def train_tiny(method: str, dataset_dir: Path, out: Path) -> Path:
    """One epoch (one iteration) of the bundle's train.yaml, weights into ``out/models/model.pt``."""
    from regnet_zoo.bundle import run_bundle

    run_bundle(
        method,
        "train",
        dataset_dir=str(dataset_dir),
        epochs=1,
        spatial_dims=2,
        val_interval=1000,  # no validation run: one training iteration is all the tests need
        ckpt_dir=str(out / "models"),
        log_dir=str(out / "runs"),
        device="cpu",
    )
    path = out / "models" / "model.pt"
    assert path.is_file(), f"the {method} bundle did not write {path} (does it honour ckpt_dir?)"
    return path


@pytest.fixture(scope="module")
def trained(phantom_dir, tmp_path_factory) -> dict[str, Path]:
    """Weights of every packaged bundle: DDR-Net trained through its bundle (one iteration); the others
    freshly initialised from their bundle's ``network_def`` (saved as a state dict): keeps the tests fast."""
    from regnet_zoo.bundle import load_bundle_network

    assert "ddrnet" in PACKAGED, "bundles/ddrnet/train.yaml is missing"
    weights = {"ddrnet": train_tiny("ddrnet", phantom_dir, tmp_path_factory.mktemp("ddrnet"))}
    for method in PACKAGED:
        if method != "ddrnet":
            network = load_bundle_network(method, load_weights=False, spatial_dims=2)
            weights[method] = tmp_path_factory.mktemp(method) / "model.pt"
            torch.save(network.state_dict(), weights[method])
    return weights


# ----------------------------------------------------------------------------------------------------------
# geometry: no network
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_warp_physical_matches_simpleitk_resample(tmp_path, spatial_dims):
    """Different grids, rotated directions, anisotropic spacing: one interpolation equals SimpleITK's."""
    fixed_shape = (21, 17, 11)[:spatial_dims]
    moving_shape = (18, 23, 9)[:spatial_dims]
    fixed_sitk = write_sitk(
        smooth_blobs(fixed_shape, 0),
        tmp_path / "f.nii.gz",
        (1.5, 0.9, 2.5)[:spatial_dims],
        (3.0, -4.0, 5.0)[:spatial_dims],
        0.35,
    )
    moving_sitk = write_sitk(
        smooth_blobs(moving_shape, 1),
        tmp_path / "m.mha",
        (1.2, 1.1, 3.0)[:spatial_dims],
        (1.0, -2.0, 2.0)[:spatial_dims],
        -0.2,
    )
    labels = (smooth_blobs(moving_shape, 2) * 4).astype(np.int16)
    label_sitk = write_sitk(
        labels, tmp_path / "ml.mha", moving_sitk.GetSpacing(), moving_sitk.GetOrigin(), -0.2
    )
    fixed, moving = load_image(tmp_path / "f.nii.gz"), load_image(tmp_path / "m.mha")
    moving_label = load_label(tmp_path / "ml.mha")
    ddf = torch.randn(spatial_dims, *fixed_shape, generator=torch.Generator().manual_seed(0)) * 1.5
    field = ddf_to_itk(ddf, fixed.affine)
    sitk.WriteImage(field, str(tmp_path / "d.nii.gz"))

    def transform() -> sitk.Transform:
        return sitk.DisplacementFieldTransform(
            sitk.ReadImage(str(tmp_path / "d.nii.gz"), sitk.sitkVectorFloat64)
        )

    expected = sitk_array(sitk.Resample(moving_sitk, fixed_sitk, transform(), sitk.sitkLinear, 0.0))
    warped = warp_physical(moving, fixed.affine, fixed_shape, ddf)
    assert (expected > 0.1).mean() > 0.3  # the grids overlap: a real comparison
    np.testing.assert_allclose(warped[0].numpy(), expected, atol=2e-4)
    expected_label = sitk_array(
        sitk.Resample(label_sitk, fixed_sitk, transform(), sitk.sitkNearestNeighbor, 0.0)
    )
    warped_label = warp_physical(moving_label, fixed.affine, fixed_shape, ddf, nearest=True)
    assert warped_label.dtype == torch.int64
    assert (warped_label[0].numpy() != expected_label).mean() < 1e-3  # ties at exact half voxels aside
    # identity: plain resampling through physical space
    identity = sitk_array(sitk.Resample(moving_sitk, fixed_sitk, sitk.Transform(), sitk.sitkLinear, 0.0))
    np.testing.assert_allclose(
        warp_physical(moving, fixed.affine, fixed_shape)[0].numpy(), identity, atol=2e-4
    )


def test_ddf_itk_round_trip_and_file_layouts(tmp_path):
    fixed_sitk = write_sitk(
        smooth_blobs((9, 8, 7), 3), tmp_path / "f.nii.gz", (0.7, 1.3, 2.0), (1, 2, 3), 0.5
    )
    fixed = load_image(tmp_path / "f.nii.gz")
    ddf = torch.randn(3, 9, 8, 7)
    field = ddf_to_itk(ddf, fixed.affine)
    assert field.GetPixelID() == sitk.sitkVectorFloat64
    np.testing.assert_allclose(field.GetSpacing(), fixed_sitk.GetSpacing(), rtol=1e-6)
    np.testing.assert_allclose(field.GetDirection(), fixed_sitk.GetDirection(), atol=1e-6)
    torch.testing.assert_close(ddf_from_itk(field, fixed.affine), ddf, atol=1e-5, rtol=0)
    # mm vector = direction @ diag(spacing) @ voxel vector (ITK's own index -> physical map)
    index = (4, 3, 2)
    start = np.array(fixed_sitk.TransformContinuousIndexToPhysicalPoint([float(i) for i in index]))
    moved = np.array(
        fixed_sitk.TransformContinuousIndexToPhysicalPoint(
            [i + float(ddf[(k, *index)]) for k, i in enumerate(index)]
        )
    )
    np.testing.assert_allclose(np.array(field[index]), moved - start, atol=1e-5)
    # files: the ITK layout is recognised automatically, the Learn2Reg layout too
    sitk.WriteImage(field, str(tmp_path / "itk.nii.gz"))
    from regnet_zoo.data.io import save_image

    save_image(ddf, tmp_path / "voxel.nii.gz", affine=fixed.affine)
    assert nib.load(str(tmp_path / "voxel.nii.gz")).shape == (9, 8, 7, 3)  # Learn2Reg: vector last
    for name in ("itk.nii.gz", "voxel.nii.gz"):
        torch.testing.assert_close(load_ddf(tmp_path / name, fixed), ddf, atol=1e-5, rtol=0)
    with pytest.raises(RegistrationInputError, match="fixed grid"):
        load_ddf(tmp_path / "voxel.nii.gz", fixed[:, :5])


class ConstantShift(nn.Module):
    """Test double for a trained network: predicts one constant displacement (voxels) everywhere."""

    def __init__(self, shift: tuple[float, ...]):
        super().__init__()
        self.register_buffer("shift", torch.tensor(shift))
        self.in_channels = 1

    def forward(self, fixed, moving):
        ddf = self.shift.view(1, -1, *[1] * (fixed.ndim - 2)).expand(fixed.shape[0], -1, *fixed.shape[2:])
        return {"ddf": ddf.clone(), "warped": moving}


def test_register_known_translation_gives_expected_ddfs(tmp_path, monkeypatch):
    """A constant voxel shift d on a rotated, anisotropic fixed grid: ddf_voxel == d everywhere, ddf_itk ==
    direction @ spacing @ d (mm), and warped == SimpleITK's resampling with that translation."""
    shape = (24, 20)
    spacing, angle = (1.5, 0.75), 0.4
    fixed_sitk = write_sitk(smooth_blobs(shape, 4), tmp_path / "f.nii.gz", spacing, (10.0, -3.0), angle)
    moving_sitk = write_sitk(smooth_blobs((26, 19), 5), tmp_path / "m.nii.gz", (1.2, 1.0), (8.0, -5.0), -0.1)
    shift = (2.0, -1.5)
    monkeypatch.setattr(pipeline, "prepare_network", lambda *args: (ConstantShift(shift), Preprocessing()))
    result = register(tmp_path / "f.nii.gz", tmp_path / "m.nii.gz", "ddrnet", affine=None)
    expected_voxel = torch.tensor(shift).view(2, 1, 1).expand(2, *shape)
    torch.testing.assert_close(result.ddf_voxel, expected_voxel, atol=1e-6, rtol=0)
    translation_mm = np.array(fixed_sitk.GetDirection()).reshape(2, 2) @ (np.array(spacing) * shift)
    field = sitk_array(result.ddf_itk)
    np.testing.assert_allclose(field, np.broadcast_to(translation_mm, (*shape, 2)), atol=1e-6)
    expected = sitk.Resample(moving_sitk, fixed_sitk, sitk.TranslationTransform(2, translation_mm.tolist()))
    np.testing.assert_allclose(result.warped[0].numpy(), sitk_array(expected), atol=2e-4)
    assert result.metrics["folding_percent"] == 0.0
    np.testing.assert_allclose(result.jacobian.numpy(), 1.0, atol=1e-6)
    # the saved files carry the same fields
    paths = result.save(tmp_path / "out")
    on_disk = nib.load(str(paths["ddf_voxel"])).get_fdata()
    np.testing.assert_allclose(on_disk[:, :, 0, :], np.moveaxis(expected_voxel.numpy(), 0, -1), atol=1e-6)
    read_back = sitk.ReadImage(str(paths["ddf_itk"]))
    np.testing.assert_allclose(sitk_array(read_back), field, atol=1e-5)
    np.testing.assert_allclose(read_back.GetDirection(), fixed_sitk.GetDirection(), atol=1e-6)


def test_register_on_the_bundles_network_grid_rescales_the_field(tmp_path, monkeypatch):
    """A bundle with a fixed ``image_size``: the network sees that grid and the field is rescaled back."""
    write_sitk(smooth_blobs((24, 20), 6), tmp_path / "f.nii.gz", (1.0, 2.0), (0.0, 0.0), 0.0)
    seen = []

    class Recording(ConstantShift):
        def forward(self, fixed, moving):
            seen.append(tuple(fixed.shape[2:]))
            return super().forward(fixed, moving)

    prep = Preprocessing(normalize="minmax", pad_multiple=8, image_size=(16, 12))
    monkeypatch.setattr(pipeline, "prepare_network", lambda *args: (Recording((1.5, -3.0)), prep))
    result = register(tmp_path / "f.nii.gz", tmp_path / "f.nii.gz", "ddrnet", affine=None)
    assert seen == [(16, 16)]  # image_size, then padded to the multiple 8
    expected = torch.tensor([1.5 * 23 / 15, -3.0 * 19 / 11]).view(2, 1, 1).expand(2, 24, 20)
    torch.testing.assert_close(result.ddf_voxel, expected, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------------------------------------
# register() with trained bundles
# ----------------------------------------------------------------------------------------------------------
def phantom_case(phantom_dir: Path, case: int) -> dict[str, Path]:
    stem = f"PHANTOM2D_{case:04d}_0000"
    return {
        "image": phantom_dir / "imagesTr" / f"{stem}.nii.gz",
        "label": phantom_dir / "labelsTr" / f"{stem}.nii.gz",
        "keypoints": phantom_dir / "keypointsTr" / f"{stem}.csv",
    }


@pytest.mark.parametrize("method", PACKAGED)
def test_register_with_trained_bundle(method, trained, phantom_dir, tmp_path):
    fixed, moving = phantom_case(phantom_dir, 3), phantom_case(phantom_dir, 4)
    result = register(
        fixed["image"],
        moving["image"],
        method,
        fixed_label=fixed["label"],
        moving_label=moving["label"],
        fixed_landmarks=fixed["keypoints"],
        moving_landmarks=moving["keypoints"],
        weights=trained[method],
    )
    shape = load_image(fixed["image"]).shape[1:]
    assert result.warped.shape == (1, *shape) and result.ddf_voxel.shape == (2, *shape)
    assert result.warped_label.shape == (1, *shape) and result.jacobian.shape == shape
    for key in ("dice", "dice_mean", "hd95_mm", "tre_mm", "tre_mm_initial", "sdlogj", "sdlogj_l2r"):
        assert key in result.metrics and result.metrics[key] is not None
    assert result.metrics["runtime_s"] > 0 and result.metrics["peak_memory_mb"] > 0
    assert 0 <= result.metrics["folding_percent"] <= 100
    # Jacobian: numpy central differences of x + ddf(x)
    grads = [np.gradient(result.ddf_voxel[i].double().numpy()) for i in range(2)]
    det = (1 + grads[0][0]) * (1 + grads[1][1]) - grads[0][1] * grads[1][0]
    np.testing.assert_allclose(result.jacobian.numpy(), det, atol=1e-4)
    # Dice by brute force from SimpleITK's nearest-neighbour resampling with ddf_itk
    fixed_label = sitk.ReadImage(str(fixed["label"]))
    transform = sitk.DisplacementFieldTransform(sitk.Image(result.ddf_itk))
    warped_label = sitk_array(
        sitk.Resample(sitk.ReadImage(str(moving["label"])), fixed_label, transform, sitk.sitkNearestNeighbor)
    )
    fixed_arr = sitk_array(fixed_label)
    for label, dice in result.metrics["dice"].items():
        a, b = fixed_arr == label, warped_label == label
        assert dice == pytest.approx(2 * (a & b).sum() / (a.sum() + b.sum()), abs=0.02)
    # TRE in mm: fixed landmarks through SimpleITK's transform vs the moving landmarks
    fixed_pts = np.loadtxt(fixed["keypoints"], delimiter=",", skiprows=1)
    moving_pts = np.loadtxt(moving["keypoints"], delimiter=",", skiprows=1)
    mapped = np.array([transform.TransformPoint(p.tolist()) for p in fixed_pts])
    assert result.metrics["tre_mm"] == pytest.approx(
        np.linalg.norm(mapped - moving_pts, axis=1).mean(), rel=1e-3
    )
    initial = np.linalg.norm(fixed_pts - moving_pts, axis=1).mean()
    assert result.metrics["tre_mm_initial"] == pytest.approx(initial, rel=1e-6)
    # evaluate_ddf on the saved Learn2Reg field reproduces the registration's metrics
    paths = result.save(tmp_path / "out")
    again = evaluate_ddf(
        load_ddf(paths["ddf_voxel"], load_image(fixed["image"])),
        fixed["image"],
        fixed_label=fixed["label"],
        moving_label=moving["label"],
        fixed_landmarks=fixed["keypoints"],
        moving_landmarks=moving["keypoints"],
    )
    for key in ("dice_mean", "hd95_mm", "tre_mm", "sdlogj", "folding_percent"):
        assert again[key] == pytest.approx(result.metrics[key], abs=1e-4)
    saved = json.loads(paths["metrics"].read_text())
    assert saved["dice_mean"] == pytest.approx(result.metrics["dice_mean"])


def test_register_metrics_absent_without_labels_or_landmarks(trained, phantom_dir):
    fixed, moving = phantom_case(phantom_dir, 1), phantom_case(phantom_dir, 2)
    fixed_img, moving_img = load_image(fixed["image"]), load_image(moving["image"])
    result = register(fixed_img, moving_img, "ddrnet", weights=trained["ddrnet"])  # MetaTensor inputs
    assert result.warped_label is None
    for key in ("dice", "dice_mean", "hd95_mm", "tre_mm", "tre_mm_initial"):
        assert key not in result.metrics
    assert {"sdlogj", "sdlogj_l2r", "folding_percent", "runtime_s", "peak_memory_mb"} <= set(result.metrics)


def test_instance_optimisation_lowers_the_image_mismatch(trained, phantom_dir):
    fixed, moving = phantom_case(phantom_dir, 1), phantom_case(phantom_dir, 2)
    fixed_img = load_image(fixed["image"])[0].numpy()

    def mismatch(steps: int) -> float:
        result = register(
            fixed["image"], moving["image"], "ddrnet", weights=trained["ddrnet"], instance_opt=steps
        )
        return float(((result.warped[0].numpy() - fixed_img) ** 2).mean())

    before, after = mismatch(0), mismatch(25)
    assert after < 0.9 * before


@pytest.mark.parametrize("method", PACKAGED)
def test_instance_optimisation_runs_for_every_method(method, trained, phantom_dir):
    fixed, moving = phantom_case(phantom_dir, 1), phantom_case(phantom_dir, 2)
    plain = register(fixed["image"], moving["image"], method, weights=trained[method])
    tuned = register(fixed["image"], moving["image"], method, weights=trained[method], instance_opt=3)
    assert torch.isfinite(tuned.ddf_voxel).all()
    assert (tuned.ddf_voxel - plain.ddf_voxel).abs().max() > 1e-3


def test_load_method(trained):
    network = load_method("ddrnet", weights=trained["ddrnet"])
    assert isinstance(network, nn.Module) and not network.training
    assert network.spatial_dims == 2  # taken from the weights
    out = network(torch.rand(1, 1, 32, 32), torch.rand(1, 1, 32, 32))
    assert out["ddf"].shape == (1, 2, 32, 32)
    with pytest.raises(RegistrationInputError, match="unknown method"):
        load_method("voxelmorph")
    with pytest.raises(FileNotFoundError, match="regnet-zoo train ddrnet"):
        load_method("ddrnet", weights="/nonexistent/model.pt")
    assert regnet_zoo.load_method is load_method and regnet_zoo.register is register


def test_register_rejects_bad_input(phantom_dir, tmp_path):
    case = phantom_case(phantom_dir, 1)
    image = load_image(case["image"])
    with pytest.raises(RegistrationInputError, match="same dimensionality"):
        register(image, MetaTensor(torch.rand(1, 8, 8, 8)), "ddrnet")
    bad = image.clone()
    bad[0, 3, 3] = float("nan")
    with pytest.raises(RegistrationInputError, match="non-finite"):
        register(bad, image, "ddrnet")
    with pytest.raises(RegistrationInputError, match="not integer-valued"):
        register(image, image, "ddrnet", fixed_label=image * 0.5, moving_label=image * 0.5)
    with pytest.raises(RegistrationInputError, match="outside the image"):
        register(
            image, image, "ddrnet", fixed_landmarks=np.array([[1e4, 0.0]]), moving_landmarks=np.zeros((1, 2))
        )


def test_register_real_3d_pair_on_different_grids_matches_simpleitk(shared_data, tmp_path):
    """Real MR pair (2 mm vs 4 mm, flipped axis, different sizes): the registration's warped image and label
    equal SimpleITK's resampling with ddf_itk (3D DDR-Net freshly initialised: the geometry is under test)."""
    from regnet_zoo.bundle import load_bundle_network

    folder = shared_data / "tiny_mr_pair"
    weights = tmp_path / "model.pt"
    torch.save(load_bundle_network("ddrnet", load_weights=False, spatial_dims=3).state_dict(), weights)
    files = {
        "fixed": folder / "anatomical.nii",
        "moving": folder / "reoriented_anat_moved.nii",
        "fixed_label": folder / "anatomical_label.nii.gz",
        "moving_label": folder / "reoriented_anat_moved_label.nii.gz",
    }
    result = register(
        files["fixed"], files["moving"], "ddrnet", fixed_label=files["fixed_label"],
        moving_label=files["moving_label"], weights=weights,
    )  # fmt: skip
    assert result.ddf_voxel.shape == (3, 33, 41, 25)
    fixed, moving = (
        sitk.ReadImage(str(files["fixed"])),
        sitk.ReadImage(str(files["moving"]), sitk.sitkFloat32),
    )
    transform = sitk.DisplacementFieldTransform(sitk.Image(result.ddf_itk))
    expected = sitk_array(sitk.Resample(moving, fixed, transform, sitk.sitkLinear, 0.0, sitk.sitkFloat32))
    assert (expected > 100).mean() > 0.2
    # float32 sampling coordinates: ~1e-5 voxel, i.e. ~1e-4 of the intensity range on steep edges
    np.testing.assert_allclose(result.warped[0].numpy(), expected, atol=1e-4 * expected.max())
    label = sitk.ReadImage(str(files["moving_label"]))
    expected_label = sitk_array(sitk.Resample(label, fixed, transform, sitk.sitkNearestNeighbor))
    assert (result.warped_label[0].numpy() != expected_label).mean() < 1e-3
    fixed_label = sitk_array(sitk.ReadImage(str(files["fixed_label"]))) == 1
    brute = (
        2 * (fixed_label & (expected_label == 1)).sum() / (fixed_label.sum() + (expected_label == 1).sum())
    )
    assert result.metrics["dice"][1] == pytest.approx(brute, abs=0.01)
