"""Reader and writer for the Learn2Reg ``dataset.json`` layout.

A Learn2Reg dataset folder holds ``imagesTr/``, optional ``labelsTr/``, ``masksTr/``, ``keypointsTr/`` and a
JSON description (``dataset.json`` or ``<TASK>_dataset.json``) with

- ``training``: subjects ``{"image", "label"?, "mask"?, "keypoints"?}`` (paths relative to the folder),
- ``test``: unlabelled subjects,
- ``registration_val`` / ``registration_test``: ``{"fixed", "moving"}`` image-path pairs,
- ``training_paired_images`` (intra-patient tasks): ``{"fixed", "moving"}`` training pairs,
- ``evaluation_labels``, ``tensorImageSize``, ``modality``, ...

Learn2Reg keypoint CSVs hold voxel indices; the built-in phantom data (and any JSON with
``"keypoint_units": "mm"``) holds physical LPS millimetres, the project's landmark convention.
Pairs come out as dictionaries of file paths with the keys the transforms expect.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from itertools import permutations
from pathlib import Path

import numpy as np
import torch

from regnet_zoo.data.io import save_image, save_landmarks
from regnet_zoo.errors import RegistrationInputError

__all__ = ["Learn2RegDataset", "find_dataset_json", "write_learn2reg_dataset"]

_SUBJECT_FILE_KEYS = {"label": "labelsTr", "mask": "masksTr", "keypoints": "keypointsTr"}


def find_dataset_json(root: str | os.PathLike) -> Path:
    """The JSON of a Learn2Reg folder (``dataset.json`` or a single ``*_dataset.json``); a JSON path as is."""
    root = Path(root)
    if root.is_file():
        return root
    if not root.is_dir():
        raise RegistrationInputError(f"{root}: dataset folder not found")
    if (root / "dataset.json").is_file():
        return root / "dataset.json"
    candidates = sorted(root.glob("*dataset*.json"))
    if len(candidates) != 1:
        raise RegistrationInputError(
            f"{root}: expected one dataset.json (or <TASK>_dataset.json), found "
            f"{[c.name for c in candidates]}"
        )
    return candidates[0]


class Learn2RegDataset:
    """Index of a Learn2Reg-layout folder; every returned path is absolute.

    Args:
        root: the dataset folder (or its JSON file).
    """

    def __init__(self, root: str | os.PathLike):
        self.json_path = find_dataset_json(root)
        self.root = self.json_path.parent
        try:
            self.info: dict = json.loads(self.json_path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise RegistrationInputError(
                f"{self.json_path}: cannot read dataset description ({err})"
            ) from err
        if not isinstance(self.info.get("training", []), list):
            raise RegistrationInputError(f"{self.json_path}: 'training' must be a list")
        self._subject_of = {s["image"]: s for s in self.subjects("train") + self.subjects("test")}

    # ------------------------------------------------------------------ description
    @property
    def name(self) -> str:
        return str(self.info.get("name", self.root.name))

    @property
    def spatial_dims(self) -> int:
        """2 or 3, from ``tensorImageSize`` (Learn2Reg writes ``"3D"``)."""
        return 2 if str(self.info.get("tensorImageSize", "3D")).upper().startswith("2") else 3

    @property
    def evaluation_labels(self) -> list[int]:
        return [int(v) for v in self.info.get("evaluation_labels", [])]

    @property
    def keypoint_units(self) -> str:
        """``"voxel"`` (Learn2Reg) unless the JSON says ``"keypoint_units": "mm"``."""
        return str(self.info.get("keypoint_units", "voxel"))

    def resolve(self, relative: str) -> str:
        """Absolute path of a JSON entry (``./imagesTr/x.nii.gz``)."""
        path = Path(relative)
        return str(path if path.is_absolute() else (self.root / path).resolve())

    # ------------------------------------------------------------------ subjects
    def _subject(self, entry: dict | str) -> dict:
        entry = {"image": entry} if isinstance(entry, str) else entry
        if "image" not in entry:
            raise RegistrationInputError(f"{self.json_path}: subject entry without 'image': {entry}")
        out = {k: self.resolve(v) for k, v in entry.items() if isinstance(v, str)}
        # Learn2Reg folders do not always list labels / masks / keypoints in the JSON: look for them by name
        image = Path(out["image"])
        for key, folder in _SUBJECT_FILE_KEYS.items():
            if key not in out and (self.root / folder).is_dir():
                name = image.name.replace(".nii.gz", ".csv") if key == "keypoints" else image.name
                candidate = self.root / folder / name
                if candidate.is_file():
                    out[key] = str(candidate)
        return out

    def subjects(self, split: str = "train") -> list[dict]:
        """Subjects of the ``training`` (``"train"``) or ``test`` list: dicts with ``image`` and optional
        ``label``, ``mask``, ``keypoints`` (absolute paths)."""
        key = {"train": "training", "test": "test"}.get(split)
        if key is None:
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        return self._existing([self._subject(e) for e in self.info.get(key, [])])

    def _existing(self, entries: list[dict]) -> list[dict]:
        """``entries`` after checking that every file they name exists (one clear error, not a failure
        deep inside a data loader)."""
        for entry in entries:
            for key, value in entry.items():
                if key != "keypoint_units" and isinstance(value, str) and not os.path.isfile(value):
                    raise RegistrationInputError(f"{self.json_path}: {key} file {value} does not exist")
        return entries

    # ------------------------------------------------------------------ pairs
    def _pair(self, fixed: dict | str, moving: dict | str, extra: dict | None = None) -> dict:
        pair: dict = {}
        for role, entry in (("fixed", fixed), ("moving", moving)):
            if isinstance(entry, str):
                entry = self._subject_of.get(self.resolve(entry)) or self._subject(entry)
            pair[role] = entry["image"]
            for key in ("label", "mask", "keypoints"):
                if key in entry:
                    pair[f"{role}_{key}"] = entry[key]
        if "fixed_keypoints" in pair or "moving_keypoints" in pair:
            pair["keypoint_units"] = self.keypoint_units
        for key, value in (extra or {}).items():  # e.g. a ground-truth displacement file of the pair
            if key not in ("fixed", "moving") and isinstance(value, str):
                pair[key] = self.resolve(value)
        return pair

    def pairs(self, split: str = "val") -> list[dict]:
        """Registration pairs: ``"val"`` / ``"test"`` from ``registration_val`` / ``registration_test``;
        ``"train"`` from ``training_paired_images`` when present, else every ordered pair of distinct training
        subjects (use :meth:`random_pairs` to sample instead).

        Each pair: ``fixed``, ``moving`` and, where available, ``fixed_label``, ``moving_label``,
        ``fixed_mask``, ``moving_mask``, ``fixed_keypoints``, ``moving_keypoints`` (+ ``keypoint_units``).
        """
        if split in ("val", "test"):
            entries = self.info.get(f"registration_{split}", [])
        elif split == "train":
            if "training_paired_images" in self.info:
                entries = self.info["training_paired_images"]
            else:
                subjects = self.subjects("train")
                return self._existing([self._pair(f, m) for f, m in permutations(subjects, 2)])
        else:
            raise ValueError(f"split must be 'train', 'val' or 'test', got {split!r}")
        for e in entries:
            if "fixed" not in e or "moving" not in e:
                raise RegistrationInputError(f"{self.json_path}: pair entry without fixed/moving: {e}")
        return self._existing([self._pair(e["fixed"], e["moving"], e) for e in entries])

    def random_pairs(self, n: int, seed: int = 0) -> list[dict]:
        """``n`` random inter-subject pairs (fixed != moving) drawn from the training list."""
        subjects = self.subjects("train")
        if len(subjects) < 2:
            raise RegistrationInputError(
                f"{self.json_path}: need at least 2 training subjects for random pairs"
            )
        rng = np.random.default_rng(seed)
        out = []
        for _ in range(n):
            i, j = rng.choice(len(subjects), size=2, replace=False)
            out.append(self._pair(subjects[i], subjects[j]))
        return out

    def atlas_pairs(self, atlas: int | str | dict, atlas_is_fixed: bool = True) -> list[dict]:
        """Every training subject paired with an atlas: an index into the training list, an image path or a
        subject dict (``image``, optional ``label`` / ``keypoints``). The atlas itself is skipped."""
        subjects = self.subjects("train")
        if isinstance(atlas, int):
            atlas_entry = subjects[atlas]
        elif isinstance(atlas, str | os.PathLike):
            atlas_entry = self._subject_of.get(self.resolve(str(atlas))) or self._subject(str(atlas))
        else:
            atlas_entry = {k: self.resolve(v) for k, v in atlas.items()}
        others = [s for s in subjects if s["image"] != atlas_entry["image"]]
        if atlas_is_fixed:
            return [self._pair(atlas_entry, s) for s in others]
        return [self._pair(s, atlas_entry) for s in others]

    def __repr__(self) -> str:
        return (
            f"Learn2RegDataset({str(self.root)!r}, training={len(self.info.get('training', []))}, "
            f"val_pairs={len(self.info.get('registration_val', []))})"
        )


def write_learn2reg_dataset(
    root: str | os.PathLike,
    subjects: Sequence[dict],
    *,
    name: str,
    prefix: str,
    registration_val: Sequence[tuple[int, int]] = (),
    registration_test: Sequence[tuple[int, int]] = (),
    training: Sequence[int] | None = None,
    pair_ddfs: dict[tuple[int, int], torch.Tensor] | None = None,
    description: str = "",
    modality: str = "MR",
    evaluation_labels: Sequence[int] | None = None,
    keypoint_units: str = "mm",
    extra: dict | None = None,
) -> Path:
    """Write images, labels, keypoints in the Learn2Reg layout and its ``dataset.json``; return the JSON path.

    Args:
        subjects: per subject ``{"image": (C, *S), "affine"?: 4x4 RAS, "label"?: (1, *S) int,
            "keypoints"?: (K, N) physical LPS mm}``; ``image`` may be a ``MetaTensor`` carrying the affine.
        registration_val / registration_test: ``(fixed_index, moving_index)`` pairs (0-based subject indices).
        training: subject indices listed under ``training`` (default: all).
        pair_ddfs: optional ground-truth fixed->moving DDFs ``(N, *S)`` (voxel units) keyed by a val/test
            pair; written vector-last under ``ddfsTr/`` and referenced as ``"ddf"`` in the pair entry.
    Files are named ``{prefix}_{case:04d}_0000`` with 1-based case numbers, as in Learn2Reg.
    """
    root = Path(root)
    if (root / "dataset.json").exists():
        raise RegistrationInputError(
            f"{root / 'dataset.json'}: dataset exists already; write into a new folder"
        )
    spatial_dims = None
    rel_images = []
    for i, subj in enumerate(subjects):
        stem = f"{prefix}_{i + 1:04d}_0000"
        image = subj["image"]
        affine = subj.get("affine", getattr(image, "affine", None))
        spatial_dims = image.ndim - 1
        save_image(image, root / "imagesTr" / f"{stem}.nii.gz", affine=affine)
        entry = {"image": f"./imagesTr/{stem}.nii.gz"}
        if subj.get("label") is not None:
            save_image(subj["label"], root / "labelsTr" / f"{stem}.nii.gz", affine=affine)
            entry["label"] = f"./labelsTr/{stem}.nii.gz"
        if subj.get("keypoints") is not None:
            save_landmarks(subj["keypoints"], root / "keypointsTr" / f"{stem}.csv")
            entry["keypoints"] = f"./keypointsTr/{stem}.csv"
        rel_images.append(entry)

    def pair_entries(pairs: Sequence[tuple[int, int]]) -> list[dict]:
        out = []
        for f, m in pairs:
            entry = {"fixed": rel_images[f]["image"], "moving": rel_images[m]["image"]}
            if pair_ddfs is not None and (f, m) in pair_ddfs:
                ddf_name = f"disp_{f + 1:04d}_{m + 1:04d}.nii.gz"
                affine = subjects[f].get("affine", getattr(subjects[f]["image"], "affine", None))
                save_image(pair_ddfs[(f, m)], root / "ddfsTr" / ddf_name, affine=affine)
                entry["ddf"] = f"./ddfsTr/{ddf_name}"
            out.append(entry)
        return out

    training = list(range(len(subjects))) if training is None else list(training)
    info = {
        "name": name,
        "description": description,
        "tensorImageSize": f"{spatial_dims}D",
        "modality": {"0": modality},
        "keypoint_units": keypoint_units,
        "ddf_convention": "fixed grid, voxel units, vector last on disk; warped(x) = moving(x + ddf(x))",
        "evaluation_labels": [int(v) for v in (evaluation_labels or [])],
        "numTraining": len(training),
        "training": [rel_images[i] for i in training],
        "registration_val": pair_entries(registration_val),
    }
    if registration_test:
        info["registration_test"] = pair_entries(registration_test)
    info.update(extra or {})
    path = root / "dataset.json"
    tmp = root / f".dataset.json.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(info, indent=2))
    os.replace(tmp, path)
    return path
