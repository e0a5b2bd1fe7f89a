"""Seeded procedural head phantoms (2D and 3D) with labels, keypoints and exact ground-truth deformations.

A dataset seed fixes one *template* anatomy: a head (scalp) around a brain with a cortical band, white
matter, two ventricles, two deep nuclei, a brain stem and an irregular blob, each with its own intensity
(T1-like). Subject ``s`` is the template seen through a smooth invertible map
``phi_s(x) = x + u_s(x)`` (a random affine part plus a RegNet-style smooth random field), rendered
analytically at ``phi_s(x)`` (crisp labels, no interpolation), with per-subject tissue contrast, a smooth
multiplicative bias field, partial-volume blur and noise.

Because every subject is an exact function of the template, the ground truth between any two subjects is
known: for fixed ``f`` and moving ``m``, ``ddf(x) = phi_m^{-1}(phi_f(x)) - x`` (README convention,
``moving(x + ddf(x)) = fixed(x)``), and keypoint ``k`` of every subject is ``phi_s^{-1}(p_k)`` for template
landmark ``p_k``, so keypoints correspond across subjects.

:func:`make_phantom_dataset` writes the set in the Learn2Reg layout (``imagesTr``, ``labelsTr``,
``keypointsTr`` in physical LPS mm, ``ddfsTr`` for the validation pairs, ``dataset.json``);
:func:`default_dataset_dir` builds the project's built-in data once into a cache folder.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import uuid
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from regnet_zoo.core.spatial import identity_grid, sample_image
from regnet_zoo.data.io import voxel_to_lps
from regnet_zoo.data.learn2reg import write_learn2reg_dataset
from regnet_zoo.data.synthetic import make_generator, smooth_points_field, synthetic_dvf

__all__ = [
    "LABEL_NAMES",
    "PHANTOM_VERSION",
    "PhantomTemplate",
    "make_phantom_subject",
    "invert_map_points",
    "pair_ground_truth_ddf",
    "make_phantom_dataset",
    "default_dataset_dir",
]

PHANTOM_VERSION = 2
LABEL_NAMES = {
    0: "background",
    1: "scalp",
    2: "white_matter",
    3: "cortex",
    4: "left_ventricle",
    5: "right_ventricle",
    6: "left_nucleus",
    7: "right_nucleus",
    8: "brain_stem",
    9: "blob",
}
# T1-like mean intensities per label
_INTENSITY = {0: 0.0, 1: 0.85, 2: 0.75, 3: 0.5, 4: 0.12, 5: 0.12, 6: 0.6, 7: 0.6, 8: 0.68, 9: 0.32}
_DEFAULT_SIZE = {2: (96, 96), 3: (64, 64, 64)}
_DEFAULT_SPACING = {2: 2.0, 3: 3.0}  # mm: a ~19 cm field of view
_DEFAULT_DEFORMATION = {2: 0.7, 3: 0.6}  # mean Dice between subjects ~0.6


class PhantomTemplate:
    """The template anatomy of one dataset seed, evaluated analytically at continuous voxel coordinates.

    Coordinates are normalised as ``q = (y - centre) / half_size`` per axis, so the same template works for
    any grid ``shape`` (2D uses the first two axes of every structure).
    """

    def __init__(self, shape: Sequence[int], seed: int = 0):
        self.shape = tuple(int(s) for s in shape)
        self.spatial_dims = len(self.shape)
        rng = np.random.default_rng(seed)

        def jitter(values, amount=0.08):
            return np.asarray(values, float) * (1 + amount * rng.uniform(-1, 1, len(values)))

        n = self.spatial_dims
        head_r = jitter([0.80, 0.90, 0.86])
        brain_r = head_r * rng.uniform(0.84, 0.88)
        # (label, centre, radii, in-plane angle): painted in this order, later ones on top
        self.ellipsoids: list[tuple[int, np.ndarray, np.ndarray, float]] = [
            (1, np.zeros(3), head_r, 0.0),
            (3, np.zeros(3), brain_r, 0.0),
            (2, np.zeros(3), brain_r * rng.uniform(0.8, 0.86), 0.0),
        ]
        for side, (vent, nucleus) in zip((-1, 1), ((4, 6), (5, 7)), strict=True):
            self.ellipsoids.append(
                (
                    vent,
                    np.array([0.13 * side, -0.05, 0.05]),
                    jitter([0.08, 0.26, 0.16]),
                    side * rng.uniform(0.1, 0.3),
                )
            )
            self.ellipsoids.append(
                (
                    nucleus,
                    np.array([0.3 * side, 0.12, -0.05]) + rng.uniform(-0.03, 0.03, 3),
                    jitter([0.1, 0.13, 0.12]),
                    0.0,
                )
            )
        self.ellipsoids.append((8, np.array([0.0, 0.42, -0.3]), jitter([0.1, 0.13, 0.22]), 0.0))
        # an irregular blob: level set of three Gaussian bumps in the white matter
        blob_centre = np.array([rng.choice([-1, 1]) * rng.uniform(0.3, 0.4), rng.uniform(-0.45, -0.3), 0.15])
        self.blob = (9, blob_centre + rng.normal(0, 0.06, (3, 3)), rng.uniform(0.06, 0.09, 3))
        self.ellipsoids = [(lab, c[:n], r[:n], a) for lab, c, r, a in self.ellipsoids]
        self.blob = (9, self.blob[1][:, :n], self.blob[2])
        # landmarks (normalised): structure centres plus boundary points of head and brain
        marks = [c for lab, c, _, _ in self.ellipsoids if lab >= 4] + [self.blob[1].mean(0)]
        for axis in range(n):
            for sign in (-1, 1):
                for radii, scale in ((head_r, 0.97), (brain_r, 0.97), (brain_r, 0.5)):
                    p = np.zeros(n)
                    p[axis] = sign * radii[axis] * scale
                    marks.append(p)
        self.landmarks_normalised = np.stack(marks)

    def _normalise(self, coords: Tensor) -> Tensor:
        """``(N, *S)`` voxel coordinates -> normalised coordinates."""
        n = self.spatial_dims
        size = torch.tensor(self.shape, dtype=coords.dtype).view(n, *[1] * n)
        return (coords - (size - 1) / 2) / ((size - 1) / 2)

    def landmarks(self) -> np.ndarray:
        """Template landmarks ``(K, N)`` in voxel coordinates of the template grid."""
        size = np.asarray(self.shape, float)
        return self.landmarks_normalised * (size - 1) / 2 + (size - 1) / 2

    def labels_at(self, coords: Tensor) -> Tensor:
        """Integer labels ``(*S)`` of the template at voxel coordinates ``coords`` ``(N, *S)``."""
        q = self._normalise(coords.double())
        n = self.spatial_dims
        labels = torch.zeros(q.shape[1:], dtype=torch.int64)
        for lab, centre, radii, angle in self.ellipsoids:
            d = q - torch.as_tensor(centre).view(n, *[1] * n)
            c, s = math.cos(angle), math.sin(angle)
            d0, d1 = c * d[0] + s * d[1], -s * d[0] + c * d[1]
            r2 = (d0 / radii[0]) ** 2 + (d1 / radii[1]) ** 2
            if n == 3:
                r2 = r2 + (d[2] / radii[2]) ** 2
            labels[r2 <= 1] = lab
        lab, centres, widths = self.blob
        field = sum(
            torch.exp(-0.5 * ((q - torch.as_tensor(ci).view(n, *[1] * n)) ** 2).sum(0) / w**2)
            for ci, w in zip(centres, widths, strict=True)
        )
        labels[(field > 0.5) & (labels == 2)] = lab
        return labels


def _random_affine_field(shape: Sequence[int], rng: np.random.Generator, strength: float) -> Tensor:
    """Displacement ``(N, *S)`` of a random affine map about the grid centre (rotation, scaling, shift)."""
    n = len(shape)
    angle = np.deg2rad(rng.uniform(-8, 8)) * strength
    rot = np.eye(n)
    rot[:2, :2] = [[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]
    if n == 3:
        tilt = np.deg2rad(rng.uniform(-4, 4)) * strength
        t = np.eye(3)
        t[1:, 1:] = [[np.cos(tilt), -np.sin(tilt)], [np.sin(tilt), np.cos(tilt)]]
        rot = rot @ t
    matrix = rot @ np.diag(1 + strength * rng.uniform(-0.07, 0.07, n))
    shift = strength * rng.uniform(-0.03, 0.03, n) * np.asarray(shape)
    grid = identity_grid(shape, dtype=torch.float64)[0]
    centre = torch.tensor([(s - 1) / 2 for s in shape], dtype=torch.float64).view(n, *[1] * n)
    rel = grid - centre
    mapped = torch.einsum("ij,j...->i...", torch.as_tensor(matrix), rel) + torch.as_tensor(shift).view(
        n, *[1] * n
    )
    return (mapped - rel).float()


def invert_map_points(u: Tensor, y: Tensor, iterations: int = 100, tol: float = 1e-4) -> Tensor:
    """Solve ``z + u(z) = y`` for ``z`` by fixed-point iteration (converges for ``|grad u| < 1``).

    ``u`` ``(N, *S)``: displacement of the map, sampled linearly (border); ``y`` ``(N, *T)``: target voxel
    coordinates -> ``z`` ``(N, *T)``. Stops once no point moves by more than ``tol`` voxels.
    """
    u, y = u[None].float(), y[None].float()
    z = y.clone()
    for _ in range(iterations):
        z_next = y - sample_image(u, z, "linear", "border")
        done = (z_next - z).abs().max() < tol
        z = z_next
        if done:
            break
    return z[0]


def pair_ground_truth_ddf(u_fixed: Tensor, u_moving: Tensor) -> Tensor:
    """Exact fixed->moving DDF ``(N, *S)`` between two subjects ``x -> phi_m^{-1}(phi_f(x)) - x``."""
    grid = identity_grid(u_fixed.shape[1:])[0]
    return invert_map_points(u_moving, grid + u_fixed.float()) - grid


def make_phantom_subject(
    template: PhantomTemplate,
    seed: int,
    *,
    deformation: float = 1.0,
    noise_std: float = 0.03,
    bias_strength: float = 0.15,
) -> dict[str, Tensor | np.ndarray]:
    """One subject: ``image`` ``(1, *S)`` float32, ``label`` ``(1, *S)`` int64, ``u`` ``(N, *S)`` (the map to
    the template, ``phi(x) = x + u(x)``, voxel units) and ``keypoints`` ``(K, N)`` voxel coordinates."""
    from scipy.ndimage import gaussian_filter

    shape, n = template.shape, template.spatial_dims
    rng = np.random.default_rng(seed)
    gen = make_generator(int(rng.integers(2**62)))
    size = min(shape)
    u = _random_affine_field(shape, rng, deformation)
    u = u + synthetic_dvf(
        shape,
        1.0,
        sigma=0.12 * size,
        n_points=40 if n == 2 else 60,
        theta=0.07 * size * deformation,
        generator=gen,
    )
    coords = identity_grid(shape, dtype=torch.float64)[0] + u.double()
    label = template.labels_at(coords)
    contrast = {k: v + (rng.uniform(-0.04, 0.04) if k else 0.0) for k, v in _INTENSITY.items()}
    lut = torch.tensor([contrast[k] for k in sorted(contrast)], dtype=torch.float64)
    image = lut[label].numpy()
    image = gaussian_filter(image, 0.6)  # partial volume at tissue borders
    # smooth multiplicative bias field, low-frequency texture, noise
    pts = torch.as_tensor(rng.uniform(0, 1, (6, n)) * (np.asarray(shape) - 1))
    bias = smooth_points_field(shape, pts, torch.as_tensor(rng.normal(0, 1, (1, 6))), 0.35 * size)[0].numpy()
    bias = bias / max(np.abs(bias).max(), 1e-12)
    image = image * np.exp(bias_strength * bias)
    image = image + noise_std * rng.standard_normal(shape)
    image = np.clip(image, 0, None).astype(np.float32)
    keypoints = invert_map_points(
        u, torch.as_tensor(template.landmarks().T.copy()).view(n, -1, *[1] * (n - 1))
    )
    return {
        "image": torch.as_tensor(image)[None],
        "label": label[None],
        "u": u,
        "keypoints": keypoints.reshape(n, -1).T.numpy(),
    }


def _phantom_affine(spatial_dims: int, shape: Sequence[int], spacing: float) -> np.ndarray:
    """RAS affine with LPS-aligned axes (ITK identity direction), centred on the grid."""
    affine = np.diag([-spacing, -spacing, spacing, 1.0])
    centre = np.zeros(4)
    centre[:spatial_dims] = (np.asarray(shape, float) - 1) / 2
    centre[3] = 1
    affine[:3, 3] = -(affine @ centre)[:3]
    return affine


def make_phantom_dataset(
    root: str | os.PathLike,
    spatial_dims: int = 2,
    n_subjects: int = 16,
    size: Sequence[int] | int | None = None,
    seed: int = 0,
    *,
    n_val: int | None = None,
    spacing: float | None = None,
    deformation: float | None = None,
) -> Path:
    """Write a phantom dataset in the Learn2Reg layout into the new folder ``root``; return ``root``.

    Defaults: 2D 96x96 at 2 mm, 3D 64^3 at 3 mm; ``deformation`` scales the subjects' random maps (default
    0.7 in 2D, 0.6 in 3D: mean label Dice between subjects about 0.6). The last ``n_val`` (default
    ``max(2, n_subjects // 4)``) subjects are held out of ``training`` and paired consecutively (with
    wrap-around) in ``registration_val``, each pair with its exact ground-truth DDF. Keypoints (physical LPS
    mm) are the template landmarks that stay inside every subject's grid.
    """
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
    shape = _DEFAULT_SIZE[spatial_dims] if size is None else size
    shape = (int(shape),) * spatial_dims if np.isscalar(shape) else tuple(int(s) for s in shape)
    if len(shape) != spatial_dims:
        raise ValueError(f"size {shape} does not match spatial_dims={spatial_dims}")
    n_val = max(2, n_subjects // 4) if n_val is None else n_val
    if n_subjects - n_val < 2 or n_val < 2:
        raise ValueError(
            f"need >= 2 training and >= 2 validation subjects, got {n_subjects} with n_val={n_val}"
        )
    spacing = _DEFAULT_SPACING[spatial_dims] if spacing is None else float(spacing)
    deformation = _DEFAULT_DEFORMATION[spatial_dims] if deformation is None else float(deformation)
    affine = _phantom_affine(spatial_dims, shape, spacing)
    template = PhantomTemplate(shape, seed)
    seeds = np.random.default_rng([seed, 1]).integers(2**62, size=n_subjects)
    generated = [make_phantom_subject(template, int(s), deformation=deformation) for s in seeds]
    maps = [subj["u"] for subj in generated]
    # keep the landmarks that stay inside every subject's grid, so that all keypoint files correspond
    upper = np.asarray(shape) - 1
    inside = np.all([((g["keypoints"] >= 0) & (g["keypoints"] <= upper)).all(1) for g in generated], axis=0)
    subjects = [
        {
            "image": g["image"],
            "label": g["label"],
            "affine": affine,
            "keypoints": voxel_to_lps(g["keypoints"][inside], affine),
        }
        for g in generated
    ]
    val = list(range(n_subjects - n_val, n_subjects))
    val_pairs = [(val[i], val[(i + 1) % n_val]) for i in range(n_val)]
    ddfs = {(f, m): pair_ground_truth_ddf(maps[f], maps[m]) for f, m in val_pairs}
    root = Path(root)
    write_learn2reg_dataset(
        root,
        subjects,
        name=f"regnet_zoo phantom {spatial_dims}D",
        prefix=f"PHANTOM{spatial_dims}D",
        registration_val=val_pairs,
        training=range(n_subjects - n_val),
        pair_ddfs=ddfs,
        description=(
            "Procedural head phantoms (regnet_zoo.data.phantom): each subject is one template anatomy under "
            "a different smooth random deformation, with its own contrast, bias field and noise. Keypoints "
            "correspond across subjects; ddfsTr holds exact fixed->moving DDFs of the validation pairs."
        ),
        modality="MR",
        evaluation_labels=[k for k in LABEL_NAMES if k > 0],
        keypoint_units="mm",
        extra={
            "labels": {str(k): v for k, v in LABEL_NAMES.items()},
            "tensorImageShape": {"0": list(shape)},
            "generator": {
                "module": "regnet_zoo.data.phantom",
                "version": PHANTOM_VERSION,
                "seed": seed,
                "n_subjects": n_subjects,
                "spacing_mm": spacing,
                "deformation": deformation,
            },
        },
    )
    return root


def default_dataset_dir(spatial_dims: int = 2) -> Path:
    """The built-in phantom dataset, generated on first use into ``$REGNET_ZOO_DATA/phantom{2,3}d`` (default
    ``~/.cache/regnet_zoo/phantom{2,3}d``).

    Idempotent and safe for concurrent callers: the set is written into a private temporary folder that is
    renamed into place; a caller losing the race discards its copy and uses the winner's. A dataset made by
    an older generator version is replaced.
    """
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
    base = Path(os.environ.get("REGNET_ZOO_DATA", Path.home() / ".cache" / "regnet_zoo")).expanduser()
    target = base / f"phantom{spatial_dims}d"
    if _is_complete(target):
        return target
    base.mkdir(parents=True, exist_ok=True)
    tmp = base / f".phantom{spatial_dims}d.tmp-{uuid.uuid4().hex}"
    try:
        make_phantom_dataset(tmp, spatial_dims=spatial_dims)
        for _ in range(3):
            try:
                os.rename(tmp, target)  # atomic; fails if the target exists (another caller got there first)
                break
            except OSError:
                if _is_complete(target):
                    break
                # an incomplete leftover or an older generator version (callers in progress use .tmp-* names)
                shutil.rmtree(target, ignore_errors=True)
        else:
            raise OSError(f"could not move the generated phantom dataset into {target}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _is_complete(folder: Path) -> bool:
    try:
        info = json.loads((folder / "dataset.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return info.get("generator", {}).get("version") == PHANTOM_VERSION
