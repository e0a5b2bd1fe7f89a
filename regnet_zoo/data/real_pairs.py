"""The real development pairs of ``../shared/data`` (its README), defined once for the benchmarks
(``benchmarks/affine.py``, ``benchmarks/zoo_eval.py``), ``make demo`` and the tests; read in place.

- ``tiny_mr_pair`` (3D MR, 2 mm / 4 mm): anatomical <- reoriented_anat_moved, binary labels (Dice);
- ``oasis3d_pair`` (3D T1, two subjects): the ``registration_val`` pairs of its ``dataset.json`` (both
  directions), Dice over its 30 ``evaluation_labels`` only (:meth:`RealPair.inputs` sets the other
  FreeSurfer labels to 0);
- ``prostate_mr_us`` (3D, multi-modal): per case US (fixed) <- MR (moving); Dice on label channel 0 (the
  gland) only, TRE on the centroids of the landmark blobs (channels 1, 2, ... non-empty in both; 0 to 2);
- ``head2d`` (2D, T1 fixed <- PD-like moving): head masks (Dice);
- ``hands2d`` (2D X-ray): FAIR's 7 landmark pairs (TRE in pixels of the 128x128 image, spacing 1).

Each pair names the affine stage's similarity: ``"mi"`` across modalities or contrasts (prostate MR-US, head
T1-PD), ``"lncc"`` for same-contrast pairs. Without the folder, :func:`builtin_pairs` are phantom pairs.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor

from regnet_zoo.core.geometry import affine_of, voxel_to_lps
from regnet_zoo.data.io import load_image, load_label

__all__ = ["DATASETS", "RealPair", "shared_data_dir", "real_pairs", "builtin_pairs"]

#: the dataset folders of ``../shared/data`` that hold registration pairs, in evaluation order
DATASETS = ("tiny_mr_pair", "oasis3d_pair", "prostate_mr_us", "head2d", "hands2d")


@dataclass
class RealPair:
    """One pair: image / label paths or tensors, physical LPS landmarks ``(K, N)``, the affine similarity."""

    dataset: str
    name: str
    fixed: Any
    moving: Any
    fixed_label: Any = None
    moving_label: Any = None
    fixed_landmarks: np.ndarray | None = None
    moving_landmarks: np.ndarray | None = None
    similarity: str = "lncc"
    #: the labels Dice is averaged over (None: every label present)
    labels: list[int] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def inputs(self) -> dict[str, Any]:
        """The keyword arguments of ``regnet_zoo.api.pipeline.check_inputs`` / ``register``; label files are
        loaded here (not before), with every label outside :attr:`labels` set to background."""
        keys = ("fixed", "moving", "fixed_label", "moving_label", "fixed_landmarks", "moving_landmarks")
        out = {k: getattr(self, k) for k in keys}
        for key in ("fixed_label", "moving_label"):
            if isinstance(out[key], Path) and self.labels is not None:
                out[key] = _only_labels(out[key], self.labels)
        return out


def shared_data_dir() -> Path:
    """``$REGNET_ZOO_SHARED_DATA``, else ``../shared/data`` beside the source checkout (may not exist)."""
    from regnet_zoo import project_root

    env = os.environ.get("REGNET_ZOO_SHARED_DATA")
    return Path(env) if env else project_root().parent / "shared" / "data"


def _channel(image: MetaTensor, channel: int) -> MetaTensor:
    return MetaTensor((image[channel : channel + 1] > 0.5).long(), affine=image.affine)


def _only_labels(path: Path, labels: list[int]) -> MetaTensor:
    """A label map with every label outside ``labels`` set to background."""
    label = load_label(path)
    keep = torch.isin(label.as_tensor(), torch.as_tensor(labels, dtype=label.dtype))
    return MetaTensor(torch.where(keep, label.as_tensor(), 0), affine=label.affine)


def _blob_landmarks(fixed: MetaTensor, moving: MetaTensor) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Physical LPS centroids ``(K, N)`` of the landmark blobs (channels 1, 2, ... non-empty in both)."""
    f_arr, m_arr = np.asarray(fixed), np.asarray(moving)
    channels = [
        c for c in range(1, min(len(f_arr), len(m_arr))) if (f_arr[c] > 0.5).any() and (m_arr[c] > 0.5).any()
    ]
    if not channels:
        return None, None
    f_vox = np.stack([np.argwhere(f_arr[c] > 0.5).mean(axis=0) for c in channels])
    m_vox = np.stack([np.argwhere(m_arr[c] > 0.5).mean(axis=0) for c in channels])
    return voxel_to_lps(f_vox, affine_of(fixed)), voxel_to_lps(m_vox, affine_of(moving))


def _hands_landmarks(folder: Path, image_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """FAIR's hand landmarks (world units on [0, 20] x [0, 25], cell-centred 128x128 grid, image rows
    flipped: ``x2`` counts upwards) -> physical LPS points of the loaded images (fixed R, moving T).

    The convention was checked against the images: an affine fitted to the landmark pairs maps T onto R with
    intensity correlation 0.90 (0.23 to 0.63 for the other axis orders and flips)."""
    table = np.loadtxt(folder / "hands_landmarks.csv", delimiter=",", skiprows=2)
    h = np.array([20 / 128, 25 / 128])

    def voxels(world: np.ndarray) -> np.ndarray:
        return np.stack([world[:, 0] / h[0] - 0.5, 128 - world[:, 1] / h[1] - 0.5], axis=1)

    affine = affine_of(load_image(image_path))
    return voxel_to_lps(voxels(table[:, 2:4]), affine), voxel_to_lps(voxels(table[:, 0:2]), affine)


def _tiny(folder: Path) -> list[RealPair]:
    return [
        RealPair(
            "tiny_mr_pair",
            "tiny_mr_pair",
            folder / "anatomical.nii",
            folder / "reoriented_anat_moved.nii",
            folder / "anatomical_label.nii.gz",
            folder / "reoriented_anat_moved_label.nii.gz",
            labels=[1],
        )
    ]


def _oasis(folder: Path) -> list[RealPair]:
    spec = json.loads((folder / "dataset.json").read_text())
    labels = [int(v) for v in spec["evaluation_labels"]]
    pairs = []
    for entry in spec["registration_val"]:
        fixed, moving = (folder / entry["fixed"]).resolve(), (folder / entry["moving"]).resolve()
        f_id, m_id = (p.name.split("_0000")[0].split("_")[-1] for p in (fixed, moving))
        pairs.append(
            RealPair(
                "oasis3d_pair",
                f"oasis3d_{f_id}<-{m_id}",
                fixed,
                moving,
                folder / "labelsTr" / fixed.name,
                folder / "labelsTr" / moving.name,
                labels=labels,
            )
        )
    return pairs


def _prostate(folder: Path, cases: int | None) -> list[RealPair]:
    pairs = []
    for case in sorted((folder / "us_images").glob("case*.nii.gz"))[:cases]:
        us_lab = load_image(folder / "us_labels" / case.name)
        mr_lab = load_image(folder / "mr_labels" / case.name)
        fixed_pts, moving_pts = _blob_landmarks(us_lab, mr_lab)
        pairs.append(
            RealPair(
                "prostate_mr_us",
                f"prostate_{case.name.split('.')[0]}",
                case,
                folder / "mr_images" / case.name,
                _channel(us_lab, 0),
                _channel(mr_lab, 0),
                fixed_pts,
                moving_pts,
                similarity="mi",  # MR -> US: different modalities
                labels=[1],
            )
        )
    return pairs


def _head(folder: Path) -> list[RealPair]:
    return [
        RealPair(
            "head2d",
            "head2d_T1<-PD",
            folder / "MR_2D_head_fixed.mha",
            folder / "MR_2D_head_moving.mha",
            folder / "MR_2D_head_fixed_mask.mha",
            folder / "MR_2D_head_moving_mask.mha",
            similarity="mi",  # T1 <- PD: different contrasts
            labels=[1],
        )
    ]


def _hands(folder: Path) -> list[RealPair]:
    fixed_pts, moving_pts = _hands_landmarks(folder, folder / "hands-R.jpg")
    return [
        RealPair(
            "hands2d",
            "hands2d_R<-T",
            folder / "hands-R.jpg",
            folder / "hands-T.jpg",
            fixed_landmarks=fixed_pts,
            moving_landmarks=moving_pts,
        )
    ]


def real_pairs(
    data: str | os.PathLike | None = None,
    datasets: list[str] | tuple[str, ...] | None = None,
    prostate_cases: int | None = None,
) -> tuple[list[RealPair], list[str]]:
    """The pairs of ``datasets`` (default: all of :data:`DATASETS`) under ``data`` (default:
    :func:`shared_data_dir`), and the dataset folders that were missing. ``prostate_cases``: the first K."""
    data = Path(data) if data is not None else shared_data_dir()
    makers = {
        "tiny_mr_pair": _tiny,
        "oasis3d_pair": _oasis,
        "prostate_mr_us": lambda folder: _prostate(folder, prostate_cases),
        "head2d": _head,
        "hands2d": _hands,
    }
    pairs, missing = [], []
    for name in datasets or DATASETS:
        if name not in makers:
            raise ValueError(f"unknown dataset {name!r}; one of {', '.join(DATASETS)}")
        folder = data / name
        if folder.is_dir():
            pairs += makers[name](folder)
        else:
            missing.append(name)
    return pairs, missing


def builtin_pairs() -> list[RealPair]:
    """Built-in phantom pairs (2D 96x96 and 3D 48^3, labels) for machines without ``../shared/data``."""
    from regnet_zoo.data.phantom import PhantomTemplate, make_phantom_subject

    def image(subject: dict, key: str) -> MetaTensor:
        return MetaTensor(torch.as_tensor(subject[key]), affine=np.diag([-1.0, -1.0, 1.0, 1.0]))

    pairs = []
    for shape in ((96, 96), (48, 48, 48)):
        template = PhantomTemplate(shape, 0)
        a, b = (make_phantom_subject(template, s) for s in (1, 2))
        pairs.append(
            RealPair(
                f"phantom{len(shape)}d",
                f"phantom{len(shape)}d_1<-2",
                image(a, "image"),
                image(b, "image"),
                image(a, "label"),
                image(b, "label"),
            )
        )
    return pairs
