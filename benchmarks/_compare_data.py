"""Real 3D datasets for ``compare.py``, laid out as Learn2Reg ``dataset.json`` files that point at the data
where it lies (``../shared/data`` or the user's Learn2Reg download); nothing is copied into the repository.

- ``prostate3d``: the 8 prostate MR / transrectal-ultrasound patients of ``prostate_mr_us/`` (Learn2Reg
  2019 tutorial ``weakly/``). Fixed = US, moving = MR of the same patient (multi-modal, intra-patient).
  The 4D label files (gland + 2 landmark blobs, one channel each) become one label map per image (1 gland,
  2 and 3 the landmarks, which lie inside the gland and take precedence) and two keypoints per image
  (landmark centroids, voxel indices, so TRE is measured too). These derived files are written beside the
  JSON (in the output folder); the images are read in place. The split is patient-disjoint:
  ``training_paired_images`` holds the training patients' pairs with their labels (used only by methods
  whose loss uses labels), ``registration_val`` the held-out patients' pairs.
- ``oasis3d``: the one OASIS pair of ``oasis3d_pair/`` (two subjects, both directions). There is no third
  subject, so deep methods train without labels on the evaluation pair itself (amortised instance
  optimisation, said so in the report).
- ``learn2reg``: any public Learn2Reg ``*_dataset.json`` (OASIS, NLST, AbdomenCTCT ...) as is; training pairs
  are sampled (seeded) when the training list would give too many ordered pairs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from regnet_zoo.data.learn2reg import Learn2RegDataset
from regnet_zoo.data.real_pairs import shared_data_dir
from regnet_zoo.errors import RegistrationInputError

__all__ = [
    "PROSTATE_LABELS",
    "FREESURFER_NAMES",
    "PreparedDataset",
    "prepare_dataset",
    "write_prostate3d",
    "write_learn2reg_subset",
    "label_names",
]

#: label map values of the prostate dataset
PROSTATE_LABELS = {1: "prostate gland", 2: "landmark 1 (per patient)", 3: "landmark 2 (per patient)"}
#: the held-out patients of the patient-disjoint prostate split (the other five train): chosen once, before
#: any result, as the patients with the most landmark annotations (2, 2, 1) so that TRE has points
PROSTATE_TEST_CASES = (0, 3, 7)

#: FreeSurfer aseg names of the 30 OASIS evaluation labels (FreeSurferColorLUT)
FREESURFER_NAMES = {
    2: "L cerebral WM",
    3: "L cerebral cortex",
    4: "L lateral ventricle",
    7: "L cerebellum WM",
    8: "L cerebellum cortex",
    10: "L thalamus",
    11: "L caudate",
    12: "L putamen",
    13: "L pallidum",
    14: "3rd ventricle",
    15: "4th ventricle",
    16: "brain stem",
    17: "L hippocampus",
    18: "L amygdala",
    24: "CSF",
    28: "L ventral DC",
    31: "L choroid plexus",
    41: "R cerebral WM",
    42: "R cerebral cortex",
    43: "R lateral ventricle",
    46: "R cerebellum WM",
    47: "R cerebellum cortex",
    49: "R thalamus",
    50: "R caudate",
    51: "R putamen",
    52: "R pallidum",
    53: "R hippocampus",
    54: "R amygdala",
    60: "R ventral DC",
    63: "R choroid plexus",
}


class PreparedDataset(dict):
    """``dir`` (Learn2Reg folder or JSON), ``spatial_dims``, ``spacing`` / ``image_size`` (working grid),
    ``train_keys`` (pair keys the training loaders read), ``label_names``, ``split`` (a sentence)."""


def _label_volume(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """A prostate label file (``(X, Y, Z)`` gland only, or ``(X, Y, Z, C)``: gland then ``C - 1`` landmarks)
    -> (label map int16: 1 gland, 2.. landmarks, affine)."""
    import nibabel as nib

    image = nib.load(str(path))
    channels = np.asarray(image.dataobj) > 0.5
    if channels.ndim == 3:
        channels = channels[..., None]
    if channels.ndim != 4 or not 1 <= channels.shape[-1] <= len(PROSTATE_LABELS):
        raise RegistrationInputError(f"{path}: gland (+ landmarks) labels expected, got {channels.shape}")
    label = np.zeros(channels.shape[:3], np.int16)
    for channel in range(channels.shape[-1]):  # landmarks after the gland: they lie inside it
        label[channels[..., channel]] = channel + 1
    return label, image.affine


def write_prostate3d(source: Path, root: Path, test_cases=PROSTATE_TEST_CASES) -> Path:
    """The Learn2Reg JSON of the prostate MR-US data (see module docstring) in ``root``; returns its path.

    Landmark keypoints (centroids) are given for the held-out patients that have landmarks (evaluation only:
    training never reads keypoints here). Rewritten every call (the derived files are small)."""
    import nibabel as nib

    cases = sorted(p.name for p in (source / "us_images").glob("case*.nii.gz"))
    if len(cases) < 4:
        raise RegistrationInputError(f"{source}: expected the prostate_mr_us layout (us_images/case*.nii.gz)")
    for folder in ("labelsTr", "keypointsTr"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    subjects, pairs_train, pairs_test = [], [], []
    for index, name in enumerate(cases):
        stem = name.removesuffix(".nii.gz")
        held_out = index in test_cases
        entry = {}
        for modality in ("us", "mr"):
            label, affine = _label_volume(source / f"{modality}_labels" / name)
            label_path = root / "labelsTr" / f"{modality}_{name}"
            nib.save(nib.Nifti1Image(label, affine), str(label_path))
            entry[modality] = {
                "image": str((source / f"{modality}_images" / name).resolve()),
                "label": str(label_path.resolve()),
            }
            landmarks = [v for v in range(2, int(label.max()) + 1) if (label == v).any()]
            if held_out and landmarks:  # landmark centroids, voxel indices (Learn2Reg keypoint convention)
                centroids = [np.argwhere(label == v).mean(0) for v in landmarks]
                points_path = root / "keypointsTr" / f"{modality}_{stem}.csv"
                points_path.write_text("\n".join(",".join(f"{x:.4f}" for x in c) for c in centroids) + "\n")
                entry[modality]["keypoints"] = str(points_path.resolve())
        subjects += [entry["us"], entry["mr"]]
        pair = {"fixed": entry["us"]["image"], "moving": entry["mr"]["image"]}
        (pairs_test if held_out else pairs_train).append(pair)
    info = {
        "name": "prostate MR-US (Learn2Reg 2019 tutorial data)",
        "description": "fixed: transrectal US, moving: T2 MR of the same patient; patient-disjoint split "
        f"(held-out cases {sorted(test_cases)})",
        "tensorImageSize": "3D",
        "modality": {"0": "US (fixed)", "1": "MR (moving)"},
        "labels": {str(k): v for k, v in PROSTATE_LABELS.items()},
        "evaluation_labels": sorted(PROSTATE_LABELS),
        "keypoint_units": "voxel",
        "numTraining": len(subjects),
        "training": subjects,
        "training_paired_images": pairs_train,
        "registration_val": pairs_test,
    }
    path = root / "dataset.json"
    path.write_text(json.dumps(info, indent=2))
    return path


def write_learn2reg_subset(json_path: Path, root: Path, max_train_pairs: int, seed: int = 0) -> Path:
    """A copy of a Learn2Reg JSON (absolute paths) whose ``training_paired_images`` are at most
    ``max_train_pairs`` pairs (seeded sample of the ordered subject pairs, or of the given training pairs)
    that touch no image of a ``registration_val`` pair; ``registration_val`` as in the original. Returns the
    new JSON's path in ``root``."""
    dataset = Learn2RegDataset(json_path)
    info = dict(dataset.info)
    if "training_paired_images" in info:
        pairs = [{"fixed": dataset.resolve(p["fixed"]), "moving": dataset.resolve(p["moving"])} for p in
                 info["training_paired_images"]]
    else:
        images = [s["image"] for s in dataset.subjects("train")]
        pairs = [{"fixed": f, "moving": m} for f in images for m in images if f != m]
    # held-out data disjoint from training: no training pair touches an image of a validation pair
    held_out = {dataset.resolve(p[k]) for p in info.get("registration_val", []) for k in ("fixed", "moving")}
    pairs = [p for p in pairs if p["fixed"] not in held_out and p["moving"] not in held_out]
    rng = np.random.default_rng(seed)
    if len(pairs) > max_train_pairs:
        pairs = [pairs[i] for i in sorted(rng.choice(len(pairs), max_train_pairs, replace=False))]
    info["training"] = dataset.subjects("train")
    info["training_paired_images"] = pairs
    info["registration_val"] = [
        {**p, "fixed": dataset.resolve(p["fixed"]), "moving": dataset.resolve(p["moving"])}
        for p in info.get("registration_val", [])
    ]
    # every other image with its label / keypoints files found beside the original (the new JSON lies
    # elsewhere, so its own folder lookup would not find them); subjects only, they train nothing
    known = {s["image"] for s in info["training"]}
    others = dataset.subjects("test") + [
        dataset._subject(p[k]) for p in info["registration_val"] for k in ("fixed", "moving")
    ]
    info["test"] = [s for s in others if s["image"] not in known and not known.add(s["image"])]
    root.mkdir(parents=True, exist_ok=True)
    path = root / "dataset.json"
    path.write_text(json.dumps(info, indent=2))
    return path


def label_names(dataset: Learn2RegDataset) -> dict[str, str]:
    """Label value -> name: the JSON's ``labels`` (Learn2Reg), else FreeSurfer names for OASIS-like labels."""
    labels = dataset.info.get("labels") or {}
    if labels and all(isinstance(v, dict) for v in labels.values()):  # Learn2Reg 2022+: {"0": {value: name}}
        labels = next(iter(labels.values()))
    names = {str(k): str(v) for k, v in labels.items() if str(k) != "0"}
    if not names and set(dataset.evaluation_labels) <= set(FREESURFER_NAMES) and dataset.evaluation_labels:
        names = {str(k): FREESURFER_NAMES[k] for k in dataset.evaluation_labels}
    return names


def prepare_dataset(name: str, out: Path, l2r_json: Path | None = None, seed: int = 0) -> PreparedDataset:
    """The dataset ``name`` (``prostate3d``, ``oasis3d``, ``learn2reg``) ready for ``compare.py``."""
    shared = shared_data_dir()
    settings: dict[str, Any]
    if name == "prostate3d":
        source = shared / "prostate_mr_us"
        if not source.is_dir():
            raise RegistrationInputError(f"{source}: prostate data not found (set REGNET_ZOO_SHARED_DATA)")
        path = write_prostate3d(source, out / "dataset_prostate3d")
        settings = {
            "multimodal": True,
            "spacing": 0.8,  # both modalities to 0.8 mm, padded (centred) to one grid: ~32^3
            "image_size": None,
            "train_keys": None,  # labels and keypoints available to the losses that use them
            "split": "patient-disjoint: 5 training patients (their US-MR pairs, labels for the losses that "
            f"use them), held-out cases {list(PROSTATE_TEST_CASES)} evaluated",
        }
    elif name == "oasis3d":
        path = shared / "oasis3d_pair" / "dataset.json"
        if not path.is_file():
            raise RegistrationInputError(f"{path}: OASIS pair not found (set REGNET_ZOO_SHARED_DATA)")
        settings = {
            "spacing": None,
            "image_size": [80, 96, 112],  # 2 mm
            "train_keys": ["fixed", "moving"],  # never the evaluation labels: the pair is all there is
            "split": "one inter-subject pair (both directions); deep methods train without labels on the "
            "evaluation pair itself (amortised instance optimisation): no held-out subject exists",
        }
    elif name == "learn2reg":
        if l2r_json is None:
            raise RegistrationInputError("--dataset learn2reg needs --l2r-json PATH/TO/<TASK>_dataset.json")
        path = write_learn2reg_subset(Path(l2r_json), out / "dataset_learn2reg", 500, seed=seed)
        settings = {
            "spacing": None,
            "image_size": None,
            "train_keys": None,
            "split": "Learn2Reg training subjects / paired images (<= 500 sampled pairs) vs registration_val",
        }
    else:
        raise RegistrationInputError(f"unknown dataset {name!r}")
    dataset = Learn2RegDataset(path)
    return PreparedDataset(
        dir=path, spatial_dims=dataset.spatial_dims, label_names=label_names(dataset), **settings
    )
