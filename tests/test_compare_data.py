"""The real-3D datasets of benchmarks/compare.py (benchmarks/_compare_data.py): the prostate MR-US layout with
its patient-disjoint split, and the recipe for public Learn2Reg JSONs. References: the original label files
read with nibabel / numpy, and a hand-written JSON in the official Learn2Reg form."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from regnet_zoo import project_root

sys.path.insert(0, str(project_root() / "benchmarks"))


def test_prostate3d_is_patient_disjoint_with_labels_from_the_channels(shared_data, tmp_path):
    from _compare_data import PROSTATE_TEST_CASES, write_prostate3d

    from regnet_zoo.data.learn2reg import Learn2RegDataset

    source = shared_data / "prostate_mr_us"
    if not source.is_dir():
        pytest.skip("prostate_mr_us not in the development data")
    path = write_prostate3d(source, tmp_path / "prostate")
    dataset = Learn2RegDataset(path)
    train, val = dataset.pairs("train"), dataset.pairs("val")
    assert len(train) + len(val) == 8 and len(val) == len(PROSTATE_TEST_CASES)

    def case(p):
        return Path(p).name

    train_cases = {case(p[k]) for p in train for k in ("fixed", "moving")}
    val_cases = {case(p[k]) for p in val for k in ("fixed", "moving")}
    assert not train_cases & val_cases  # no patient on both sides
    for pair in train + val:
        # intra-patient, multi-modal: US fixed, MR moving; images read where they lie
        assert case(pair["fixed"]) == case(pair["moving"])
        assert "us_images" in pair["fixed"] and "mr_images" in pair["moving"]
        assert Path(pair["fixed"]).parent.parent == source.resolve()
        assert "fixed_label" in pair and "moving_label" in pair
    assert not any("fixed_keypoints" in p for p in train)  # landmarks: evaluation only
    # the label map against the original channels (numpy): gland -> 1, first landmark -> 2 where present
    pair = val[0]
    original = np.asarray(nib.load(str(source / "us_labels" / case(pair["fixed"]))).dataobj) > 0.5
    label = np.asarray(nib.load(pair["fixed_label"]).dataobj)
    assert np.array_equal(label > 0, original[..., 0] | original[..., 1:].any(-1))
    assert np.array_equal(label == 2, original[..., 1] & ~original[..., 2:].any(-1))
    # keypoints: the landmark centroids in voxel indices
    points = np.loadtxt(pair["fixed_keypoints"], delimiter=",", ndmin=2)
    np.testing.assert_allclose(points[0], np.argwhere(label == 2).mean(0), atol=1e-3)
    assert dataset.keypoint_units == "voxel"


def _official_style_dataset(root: Path) -> Path:
    """A tiny folder in the public Learn2Reg form (OASIS / AbdomenCTCT style): ``<TASK>_dataset.json`` with
    ``training`` subjects, ``registration_val`` pairs, a ``labels`` dict, no label paths for val pairs."""
    rng = np.random.default_rng(0)
    for folder in ("imagesTr", "labelsTr"):
        (root / folder).mkdir(parents=True)
    entries = []
    for i in range(1, 6):
        name = f"TASK_{i:04d}_0000.nii.gz"
        image = rng.random((12, 10, 8)).astype(np.float32)
        nib.save(nib.Nifti1Image(image, np.eye(4)), str(root / "imagesTr" / name))
        label = rng.integers(0, 3, (12, 10, 8)).astype(np.int16)
        nib.save(nib.Nifti1Image(label, np.eye(4)), str(root / "labelsTr" / name))
        entries.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
    info = {
        "name": "TASK",
        "tensorImageSize": {"0": "3D"},
        "labels": {"0": {"0": "background", "1": "liver", "2": "spleen"}},
        "evaluation_labels": [1, 2],
        "numTraining": 4,
        "training": entries,  # the validation subject is listed too (held out by the recipe)
        "registration_val": [
            {"fixed": "./imagesTr/TASK_0004_0000.nii.gz", "moving": "./imagesTr/TASK_0005_0000.nii.gz"}
        ],
    }
    path = root / "TASK_dataset.json"
    path.write_text(json.dumps(info))
    return path


def test_learn2reg_recipe_reads_an_official_json_in_place(tmp_path):
    from _compare_data import label_names, write_learn2reg_subset

    from regnet_zoo.data.learn2reg import Learn2RegDataset

    original = _official_style_dataset(tmp_path / "TASK")
    path = write_learn2reg_subset(original, tmp_path / "out", max_train_pairs=4, seed=1)
    dataset = Learn2RegDataset(path)
    train, val = dataset.pairs("train"), dataset.pairs("val")
    assert len(train) == 4  # 6 ordered pairs of the 3 subjects outside validation pairs, 4 sampled
    assert all(p["fixed"] != p["moving"] for p in train)
    assert all(str(tmp_path / "TASK") in p["fixed"] for p in train + val)  # files stay where they are
    # the val pair's labels found beside the original images (labelsTr), not in the output folder
    assert val[0]["fixed_label"] == str((tmp_path / "TASK" / "labelsTr" / "TASK_0004_0000.nii.gz").resolve())
    assert dataset.spatial_dims == 3 and dataset.evaluation_labels == [1, 2]
    used = {Path(p[k]).name for p in train for k in ("fixed", "moving")}
    assert "TASK_0004_0000.nii.gz" not in used and len(used) == 3  # disjoint from the validation subject
    assert label_names(dataset) == {"1": "liver", "2": "spleen"}  # the official nested "labels" form


def test_oasis_label_names_are_freesurfer_names(shared_data):
    from _compare_data import label_names

    from regnet_zoo.data.learn2reg import Learn2RegDataset

    path = shared_data / "oasis3d_pair" / "dataset.json"
    if not path.is_file():
        pytest.skip("oasis3d_pair not in the development data")
    names = label_names(Learn2RegDataset(path))
    assert len(names) == 30 and names["17"] == "L hippocampus" and names["53"] == "R hippocampus"
