"""regnet_zoo.data.transforms: pair preprocessing shapes/keys/dtypes, keypoint geometry, loaders."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from regnet_zoo.data.io import save_image
from regnet_zoo.data.learn2reg import Learn2RegDataset
from regnet_zoo.data.phantom import make_phantom_dataset
from regnet_zoo.data.transforms import pair_collate, pair_dataloader, pair_transforms
from regnet_zoo.errors import RegistrationInputError


@pytest.fixture(scope="module")
def phantom_pairs(tmp_path_factory) -> list[dict]:
    root = make_phantom_dataset(tmp_path_factory.mktemp("ph") / "ph", 2, n_subjects=6, size=(40, 36), seed=2)
    return Learn2RegDataset(root).pairs("val")


def test_default_chain_shapes_keys_dtypes(phantom_pairs):
    raw = pair_transforms(normalize=None, pad_multiple=None)(phantom_pairs[0])
    out = pair_transforms()(phantom_pairs[0])
    assert set(out) == {
        "fixed",
        "moving",
        "fixed_label",
        "moving_label",
        "fixed_keypoints",
        "moving_keypoints",
        "ddf",
    }
    for key in ("fixed", "moving", "fixed_label", "moving_label"):
        assert out[key].shape == (1, 48, 48)
    assert out["ddf"].shape == (2, 48, 48)
    assert out["fixed"].dtype == torch.float32 and out["fixed_label"].dtype == torch.int64
    assert out["fixed"].min() >= 0 and out["fixed"].max() <= 1 and out["fixed"].max() > 0.99
    # symmetric padding 40x36 -> 48x48 shifts the grid by (4, 6): labels and keypoints move with it
    assert torch.equal(out["fixed_label"][0, 4:44, 6:42], raw["fixed_label"][0])
    assert out["fixed_label"][0, :4].abs().sum() == 0
    shift = torch.tensor([4.0, 6.0])
    torch.testing.assert_close(out["fixed_keypoints"], raw["fixed_keypoints"] + shift)
    assert (
        out["fixed_keypoints"].shape == out["moving_keypoints"].shape and out["fixed_keypoints"].shape[1] == 2
    )


def test_resize_and_spacing_keep_labels_and_keypoints_consistent(phantom_pairs):
    raw = pair_transforms(normalize=None, pad_multiple=None)(phantom_pairs[0])
    # upsampling (from 2 mm): the working-grid resize is corner-aligned (voxel 0 and n-1 of both grids
    # coincide: scale (new - 1) / (old - 1)), Spacing keeps voxel 0 in place with the 1 mm step (79x71 grid);
    # both then pad symmetrically to 80x80
    old = torch.tensor(raw["fixed"].shape[1:], dtype=torch.float32)
    corner_scale = (torch.tensor([80.0, 72.0]) - 1) / (old - 1)
    configs = (({"spatial_size": (80, 72)}, corner_scale, (0.0, 4.0)), ({"spacing": 1.0}, 2.0, (0.0, 4.0)))
    for kwargs, scale, pad in configs:
        out = pair_transforms(**kwargs)(phantom_pairs[0])
        assert "ddf" not in out  # a voxel-unit ddf cannot follow resampling
        assert out["fixed"].shape == (1, 80, 80) and out["moving_label"].shape == (1, 80, 80)
        assert set(out["fixed_label"].unique().tolist()) <= set(raw["fixed_label"].unique().tolist())
        expected = raw["fixed_keypoints"] * scale + torch.tensor(pad)
        torch.testing.assert_close(out["fixed_keypoints"], expected, atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="ddf"):
        pair_transforms(spacing=1.0, keys_present=("fixed", "moving", "ddf"))


def test_keypoints_follow_resampling_of_real_geometry(tmp_path):
    """A blob at a known physical point stays at its keypoint through resampling of an oblique MHA volume."""
    shape_xyz, spacing = (30, 26, 18), (1.2, 1.6, 2.5)
    idx = np.indices(shape_xyz).astype(float)
    centre = np.array([14.3, 11.7, 8.2])
    blob = np.exp(
        -0.5 * (((idx - centre.reshape(3, 1, 1, 1)) * np.reshape(spacing, (3, 1, 1, 1))) ** 2).sum(0) / 16
    )
    img = sitk.GetImageFromArray(np.transpose(blob).astype(np.float32))
    img.SetSpacing(spacing)
    img.SetOrigin((5.0, -20.0, 33.0))
    c, s = np.cos(0.3), np.sin(0.3)
    img.SetDirection([c, -s, 0, s, c, 0, 0, 0, 1])
    sitk.WriteImage(img, str(tmp_path / "fixed.mha"))
    sitk.WriteImage(img, str(tmp_path / "moving.nrrd"))
    point = img.TransformContinuousIndexToPhysicalPoint(centre.tolist())
    (tmp_path / "fixed.csv").write_text("x,y,z\n" + ",".join(map(str, point)) + "\n")
    pair = {
        "fixed": str(tmp_path / "fixed.mha"),
        "moving": str(tmp_path / "moving.nrrd"),
        "fixed_keypoints": str(tmp_path / "fixed.csv"),
    }
    for kwargs in ({"spacing": (2.0, 2.0, 2.0)}, {"spatial_size": (40, 20, 24)}):
        out = pair_transforms(normalize=None, pad_multiple=8, **kwargs)(pair)
        assert set(out) == {"fixed", "moving", "fixed_keypoints"}
        assert all(s % 8 == 0 for s in out["fixed"].shape[1:])
        vol = out["fixed"][0].clamp_min(0).numpy() ** 4  # sharpen: centroid of the peak
        centroid = (np.indices(vol.shape) * vol).reshape(3, -1).sum(1) / vol.sum()
        np.testing.assert_allclose(out["fixed_keypoints"][0].numpy(), centroid, atol=0.3)


def test_missing_optional_keys_and_normalisations(tmp_path):
    arr = np.linspace(-1500, 2500, 20 * 24, dtype=np.float32).reshape(20, 24)
    save_image(torch.as_tensor(arr)[None], tmp_path / "f.nii.gz")
    np.savez(tmp_path / "m.npz", image=arr[:18, :20])
    pair = {"fixed": str(tmp_path / "f.nii.gz"), "moving": str(tmp_path / "m.npz")}
    out = pair_transforms(normalize="ct", ct_window=(-1000, 1000), pad_multiple=16)(pair)
    assert set(out) == {"fixed", "moving"} and out["fixed"].shape == out["moving"].shape == (1, 32, 32)
    fixed = out["fixed"][0, 6:26, 4:28]  # undo the symmetric padding
    np.testing.assert_allclose(fixed.numpy(), np.clip((arr + 1000) / 2000, 0, 1), atol=1e-6)
    pct = pair_transforms(normalize="percentile", percentiles=(10, 90), pad_multiple=None)(pair)["fixed"][0]
    lo, hi = np.percentile(arr, [10, 90])
    np.testing.assert_allclose(pct.numpy(), np.clip((arr - lo) / (hi - lo), 0, 1), atol=1e-5)
    with pytest.raises(ValueError, match="normalize"):
        pair_transforms(normalize="zscore-ish")


def test_bad_pairs_raise(tmp_path, phantom_pairs):
    save_image(torch.rand(1, 8, 8, 8), tmp_path / "vol.nii.gz")
    bad = dict(phantom_pairs[0], moving=str(tmp_path / "vol.nii.gz"))
    with pytest.raises(RegistrationInputError, match="vol.nii.gz"):
        pair_transforms()(bad)
    save_image(torch.zeros(1, 12, 12, dtype=torch.int64), tmp_path / "lab.nii.gz")
    bad = dict(phantom_pairs[0], fixed_label=str(tmp_path / "lab.nii.gz"))
    with pytest.raises(RegistrationInputError, match="lab.nii.gz"):
        pair_transforms()(bad)


def test_dataloader_batches_and_ragged_keypoints(phantom_pairs):
    loader = pair_dataloader(phantom_pairs, pair_transforms(), batch_size=2, shuffle=True, seed=0)
    batch = next(iter(loader))
    assert batch["fixed"].shape == (2, 1, 48, 48) and batch["fixed_label"].shape == (2, 1, 48, 48)
    assert batch["ddf"].shape == (2, 2, 48, 48)
    k = batch["fixed_keypoints"].shape[1]
    assert batch["fixed_keypoints"].shape == (2, k, 2) and torch.isfinite(batch["fixed_keypoints"]).all()
    items = [{"fixed_keypoints": torch.zeros(3, 2)}, {"fixed_keypoints": torch.ones(5, 2)}]
    ragged = pair_collate(items)["fixed_keypoints"]
    assert ragged.shape == (2, 5, 2) and torch.isnan(ragged[0, 3:]).all() and not torch.isnan(ragged[1]).any()
