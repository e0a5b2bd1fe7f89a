"""regnet_zoo.data.phantom and learn2reg: reproducible phantoms, exact ground truth, dataset.json reader."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest
import torch

from regnet_zoo.core.spatial import identity_grid, sample_image, warp_labels, warp_points
from regnet_zoo.data.io import load_image, load_label, load_landmarks, lps_to_voxel
from regnet_zoo.data.learn2reg import Learn2RegDataset, write_learn2reg_dataset
from regnet_zoo.data.phantom import (
    LABEL_NAMES,
    PhantomTemplate,
    default_dataset_dir,
    make_phantom_dataset,
    make_phantom_subject,
    pair_ground_truth_ddf,
)
from regnet_zoo.errors import RegistrationInputError


def _mean_dice(a: torch.Tensor, b: torch.Tensor) -> float:
    scores = []
    for k in range(1, len(LABEL_NAMES)):
        x, y = a == k, b == k
        if x.any() or y.any():
            scores.append(2 * (x & y).sum().item() / (x.sum() + y.sum()).item())
    return float(np.mean(scores))


@pytest.mark.parametrize("shape", [(64, 64), (32, 32, 32)])
def test_subjects_reproducible_integer_labels_and_exact_ground_truth(shape):
    template = PhantomTemplate(shape, seed=3)
    a, b = (
        make_phantom_subject(template, 1, deformation=0.7),
        make_phantom_subject(template, 2, deformation=0.7),
    )
    again = make_phantom_subject(PhantomTemplate(shape, seed=3), 1, deformation=0.7)
    assert torch.equal(a["image"], again["image"]) and torch.equal(a["label"], again["label"])
    assert not torch.equal(a["image"], b["image"])
    assert a["label"].dtype == torch.int64 and set(a["label"].unique().tolist()) == set(LABEL_NAMES)
    assert torch.isfinite(a["image"]).all() and a["image"].shape == (1, *shape)
    before = _mean_dice(a["label"], b["label"])
    assert 0.3 < before < 0.85  # different subjects...
    ddf = pair_ground_truth_ddf(a["u"], b["u"])
    # exact: the template seen through phi_m(x + ddf(x)) is the fixed subject's anatomy
    x_plus_ddf = identity_grid(shape)[0] + ddf
    phi_m = x_plus_ddf + sample_image(b["u"][None], x_plus_ddf[None], "linear", "border")[0]
    assert (template.labels_at(phi_m) == a["label"][0]).float().mean() > 0.99
    # ... and warping the moving labels with it aligns them (up to nearest-neighbour discretisation)
    after = _mean_dice(a["label"], warp_labels(b["label"][None], ddf[None])[0])
    assert after > before + 0.15
    # corresponding keypoints: fixed point + ddf(fixed point) lands on the moving point
    kf, km = (torch.as_tensor(s["keypoints"], dtype=torch.float32) for s in (a, b))
    mapped = warp_points(kf[None], ddf[None])[0]
    assert (mapped - km).norm(dim=1).max() < 0.1 < (kf - km).norm(dim=1).mean()


def test_phantom_dataset_layout_and_reader(tmp_path):
    root = make_phantom_dataset(tmp_path / "ph", spatial_dims=2, n_subjects=6, size=48, seed=1)
    info = json.loads((root / "dataset.json").read_text())
    assert info["tensorImageSize"] == "2D" and info["numTraining"] == 4 and len(info["registration_val"]) == 2
    ds = Learn2RegDataset(root)
    assert ds.spatial_dims == 2 and ds.keypoint_units == "mm" and ds.evaluation_labels == list(range(1, 10))
    val = ds.pairs("val")
    assert [set(p) for p in val] == [
        {"fixed", "moving", "fixed_label", "moving_label", "fixed_keypoints", "moving_keypoints"}
        | {"keypoint_units", "ddf"}
    ] * 2
    fixed, moving = load_image(val[0]["fixed"], 2), load_image(val[0]["moving"], 2)
    assert fixed.shape == (1, 48, 48) and not torch.equal(fixed, moving)
    fl, ml = load_label(val[0]["fixed_label"]), load_label(val[0]["moving_label"])
    ddf = load_image(val[0]["ddf"], expected_dims=2)
    assert ddf.shape == (2, 48, 48)
    assert _mean_dice(fl, warp_labels(ml[None], ddf.as_tensor()[None])[0]) > _mean_dice(fl, ml) + 0.1
    # keypoints on disk are LPS mm inside the image and correspond through the ground truth
    kf = torch.as_tensor(lps_to_voxel(load_landmarks(val[0]["fixed_keypoints"], fixed), fixed)).float()
    km = torch.as_tensor(lps_to_voxel(load_landmarks(val[0]["moving_keypoints"], moving), moving)).float()
    assert (warp_points(kf[None], ddf.as_tensor()[None])[0] - km).norm(dim=1).max() < 0.1
    # training split: validation subjects held out
    train_images = {s["image"] for s in ds.subjects("train")}
    assert len(train_images) == 4 and not {p["fixed"] for p in val} & train_images
    assert len(ds.pairs("train")) == 4 * 3
    rand = ds.random_pairs(5, seed=0)
    assert rand == ds.random_pairs(5, seed=0) and all(p["fixed"] != p["moving"] for p in rand)
    assert all(p["fixed"] in train_images and p["moving"] in train_images for p in rand)
    atlas = ds.atlas_pairs(0)
    assert len(atlas) == 3 and all(p["fixed"] == ds.subjects()[0]["image"] for p in atlas)
    assert all("fixed_label" in p and "moving_keypoints" in p for p in atlas)
    # same seed -> same files; writing into an existing dataset is refused
    again = make_phantom_dataset(tmp_path / "ph2", spatial_dims=2, n_subjects=6, size=48, seed=1)
    assert torch.equal(
        load_image(again / "imagesTr" / "PHANTOM2D_0003_0000.nii.gz"), load_image(ds.subjects()[2]["image"])
    )
    with pytest.raises(RegistrationInputError, match="exists"):
        make_phantom_dataset(root, spatial_dims=2, n_subjects=6, size=48)


def test_learn2reg_reader_on_real_oasis(shared_data):
    ds = Learn2RegDataset(shared_data / "oasis3d_pair")
    assert ds.spatial_dims == 3 and len(ds.evaluation_labels) == 30 and 2 in ds.evaluation_labels
    val = ds.pairs("val")
    assert len(val) == 2 and val[0]["fixed"] == val[1]["moving"]
    for pair in val:
        assert set(pair) == {"fixed", "moving", "fixed_label", "moving_label"}
        assert (
            pair["fixed_label"].endswith(pair["fixed"].split("/")[-1]) and "labelsTr" in pair["fixed_label"]
        )
    assert ds.pairs("test") == []
    assert len(ds.atlas_pairs(1)) == 1


def test_learn2reg_reader_paired_training_and_voxel_keypoints(tmp_path):
    """An intra-patient (NLST-like) layout: training_paired_images, voxel keypoints found by folder name."""
    image = torch.rand(1, 10, 12, 8)
    subjects = [{"image": image, "affine": np.diag([2.0, 2.0, 3.0, 1.0])} for _ in range(4)]
    write_learn2reg_dataset(
        tmp_path,
        subjects,
        name="pairs",
        prefix="NLST",
        registration_val=[(2, 3)],
        keypoint_units="voxel",
        extra={
            "training_paired_images": [
                {"fixed": "./imagesTr/NLST_0001_0000.nii.gz", "moving": "./imagesTr/NLST_0002_0000.nii.gz"}
            ]
        },
    )
    (tmp_path / "dataset.json").rename(tmp_path / "NLST_dataset.json")
    (tmp_path / "keypointsTr").mkdir()
    (tmp_path / "keypointsTr" / "NLST_0001_0000.csv").write_text("1,2,3\n9,11,7\n")
    ds = Learn2RegDataset(tmp_path)
    (pair,) = ds.pairs("train")
    assert pair["fixed"].endswith("NLST_0001_0000.nii.gz") and pair["fixed_keypoints"].endswith(
        "0001_0000.csv"
    )
    assert pair["keypoint_units"] == "voxel" and "moving_keypoints" not in pair
    assert len(ds.pairs("val")) == 1
    with pytest.raises(RegistrationInputError, match="dataset folder not found"):
        Learn2RegDataset(tmp_path / "missing")


def test_default_dataset_dir_is_idempotent_and_concurrency_safe(tmp_path, monkeypatch):
    monkeypatch.setenv("REGNET_ZOO_DATA", str(tmp_path))
    results: list = []
    threads = [threading.Thread(target=lambda: results.append(default_dataset_dir(2))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 2 and results[0] == results[1] == tmp_path / "phantom2d"
    assert [p.name for p in tmp_path.iterdir()] == ["phantom2d"]  # no temporary folders left
    stamp = (tmp_path / "phantom2d" / "dataset.json").stat().st_mtime_ns
    assert default_dataset_dir(2) == tmp_path / "phantom2d"
    assert (tmp_path / "phantom2d" / "dataset.json").stat().st_mtime_ns == stamp
    ds = Learn2RegDataset(results[0])
    assert len(ds.subjects()) == 12 and len(ds.pairs("val")) == 4
    assert load_image(ds.subjects()[0]["image"]).shape == (1, 96, 96)
