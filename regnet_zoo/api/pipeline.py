"""``register``: two images -> a displacement field, warped images and metrics, in a few named steps.

The steps (the same as ``regnet-zoo register``):

1. :func:`check_inputs`: load the fixed and moving images (paths or ``MetaTensor`` ``(C, *S)`` with a RAS
   affine), labels and landmarks, and check them before anything slow runs;
2. :func:`prepare_network`: the method's trained network and its preprocessing (from the weights' metadata,
   else the bundle's config);
3. :func:`affine_stage` (unless ``affine=None``): an affine / rigid map ``T`` in physical space with
   ``moving(T p) ~ fixed(p)`` (:func:`regnet_zoo.core.affine.affine_register`); the moving image is then
   seen through ``T`` (:func:`pre_aligned`: its affine becomes ``T^-1 A_m``);
4. :func:`predict_ddf`: the one preprocessing path (:mod:`regnet_zoo.data.preprocess`: normalisation on the
   native grids, the moving image brought onto the fixed grid through physical space, resampling to the
   working grid, padding), the network, the field cropped and rescaled back to the fixed grid, optional
   instance optimisation (``instance_opt`` Adam steps, coarse to fine: on the network's own parameters with
   the bundle's loss, or, when the network works on a resampled grid, on the field on the fixed grid);
5. :func:`total_ddf` composes affine then deformable into one field on the fixed grid,
   ``A_f^-1 T A_f (x + d(x)) - x``, and :func:`warp_and_evaluate` warps the *original* moving image (and
   label) with one interpolation of ``fixed voxel x -> moving voxel A_m^-1 A_f (x + ddf(x))`` (exactly what
   SimpleITK does with :attr:`RegistrationResult.ddf_itk`: linear, border-clamped within half a voxel of the
   grid, 0 further out; nearest neighbour for labels) and computes the metrics (``regnet_zoo.core.metrics``)
   in mm on the fixed grid.
"""

from __future__ import annotations

import os
import resource
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
import torch
from monai.data import MetaTensor
from torch import Tensor, nn

from regnet_zoo.api.evaluation import label_metrics
from regnet_zoo.api.fields import ddf_to_itk, warp_physical
from regnet_zoo.api.inputs import ImageLike, PointsLike, as_image, as_label, as_points
from regnet_zoo.api.instance import (
    DenseDisplacement,
    bundle_instance_loss,
    instance_optimise,
    refines_on_input_grid,
)
from regnet_zoo.api.methods import (
    bundle_preprocessing,
    cached_network,
    check_method,
    resolve_device,
    weights_path,
)
from regnet_zoo.core.geometry import (
    LPS_RAS,
    affine_ddf,
    affine_of,
    as_4x4,
    from_4x4,
    lps_to_voxel,
    spacing_from_affine,
)
from regnet_zoo.core.metrics import jacobian_determinant, registration_metrics, tre
from regnet_zoo.core.spatial import resize_ddf
from regnet_zoo.data.io import atomic_write, check_pair, metrics_to_json, save_image
from regnet_zoo.data.preprocess import (
    AFFINE_STAGE_DEFAULTS,
    Preprocessing,
    network_inputs,
    normalise_intensity,
)
from regnet_zoo.errors import RegistrationInputError
from regnet_zoo.weights import check_weights_fit

__all__ = [
    "OUTPUT_FILES",
    "IMAGE_FORMATS",
    "output_names",
    "RegistrationResult",
    "PairInputs",
    "register",
    "check_inputs",
    "prepare_network",
    "predict_ddf",
    "warp_and_evaluate",
    "affine_stage",
    "pre_aligned",
    "total_ddf",
    "initial_metrics",
    "itk_affine_transform",
    "AFFINE_TXT_HEADER",
]

#: files written by :meth:`RegistrationResult.save` (``warped_label`` only when there is a label;
#: ``inverse_transform`` and ``fixed_warped`` only with an inverse, ``report`` only when asked for)
OUTPUT_FILES = {
    "warped": "warped.nii.gz",
    "warped_label": "warped_label.nii.gz",
    "ddf_voxel": "ddf_voxel.nii.gz",
    "ddf_itk": "ddf_itk.nii.gz",
    "jacobian": "jacobian.nii.gz",
    "transform": "transform.h5",
    "inverse_transform": "inverse_transform.h5",
    "fixed_warped": "fixed_warped.nii.gz",
    "metrics": "metrics.json",
    "affine_txt": "affine.txt",
    "affine_tfm": "affine.tfm",
    "report": "report.png",
}
#: header of ``affine.txt``
AFFINE_TXT_HEADER = (
    "regnet_zoo affine pre-alignment T: 4x4 homogeneous, physical RAS mm (NIfTI world), maps a fixed point "
    "p to its moving point T @ p (moving(T p) ~ fixed(p)); 2D: the third axis is a unit placeholder"
)
#: image formats :meth:`RegistrationResult.save` writes (``image_format``); ``ddf_voxel`` stays NIfTI
#: (Learn2Reg's layout)
IMAGE_FORMATS = (".nii.gz", ".nii", ".mha", ".nrrd")


def output_names(
    label: bool = True,
    inverse: bool = False,
    report: bool = False,
    image_format: str = ".nii.gz",
    affine: bool = False,
) -> dict[str, str]:
    """``{output: file name}`` that :meth:`RegistrationResult.save` writes with these options."""
    if image_format not in IMAGE_FORMATS:
        raise RegistrationInputError(
            f"image format must be one of {', '.join(IMAGE_FORMATS)}, got {image_format!r}"
        )
    skip = set()
    skip |= set() if label else {"warped_label"}
    skip |= set() if inverse else {"inverse_transform", "fixed_warped"}
    skip |= set() if report else {"report"}
    skip |= set() if affine else {"affine_txt", "affine_tfm"}
    names = {}
    for key, name in OUTPUT_FILES.items():
        if key in skip:
            continue
        if name.endswith(".nii.gz") and key != "ddf_voxel":
            name = name[: -len(".nii.gz")] + image_format
        names[key] = name
    return names


@dataclass
class RegistrationResult:
    """What :func:`register` returns; all on the fixed grid with the fixed affine.

    ``warped`` ``(C, *S)``, ``warped_label`` ``(1, *S)`` int64 or None, ``ddf_voxel`` ``(N, *S)`` (Learn2Reg:
    fixed voxel units), ``ddf_itk`` (SimpleITK vector image, mm, LPS; ``sitk.Resample(moving, fixed,
    sitk.DisplacementFieldTransform(sitk.Image(ddf_itk)))`` reproduces ``warped``), ``jacobian`` ``(*S)``
    (determinant of ``x -> x + ddf(x)``), ``metrics`` (see :func:`evaluate_ddf`, plus ``runtime_s``,
    ``peak_memory_mb``, ``stage_s``, ``*_initial`` and ``*_affine``), ``affine`` the pre-alignment ``T``
    (4x4 physical RAS, ``moving(T p) ~ fixed(p)``; None without the affine stage). The fields hold the whole
    transform, affine then deformable; ``ddf_deformable`` the deformable part alone (relative to
    the pre-aligned moving image; the same as ``ddf_voxel`` without the affine stage).
    ``peak_memory_mb``, and with an inverse ``inverse_consistency_mean_mm`` / ``_p95_mm``).
    With ``register(..., inverse=True)``: ``inverse_ddf`` ``(N, *S)`` (voxel DDF on the fixed grid of the
    inverse map, moving -> fixed points) and ``fixed_warped`` (the fixed image on the moving grid).
    ``inputs``: the checked inputs (for the report picture).
    """

    warped: MetaTensor
    warped_label: MetaTensor | None
    ddf_voxel: Tensor
    ddf_itk: sitk.Image
    jacobian: MetaTensor
    metrics: dict
    affine: np.ndarray | None = None
    source_files: tuple[str, ...] = field(default=(), repr=False)
    ddf_deformable: Tensor | None = field(default=None, repr=False)
    inverse_ddf: Tensor | None = field(default=None, repr=False)
    fixed_warped: MetaTensor | None = field(default=None, repr=False)
    inputs: PairInputs | None = field(default=None, repr=False)

    def save(
        self,
        out_dir: str | os.PathLike,
        overwrite: bool = False,
        *,
        report: bool = False,
        image_format: str = ".nii.gz",
    ) -> dict[str, Path]:
        """Write :func:`output_names` into ``out_dir``; return ``{name: path}``.

        Refuses (``RegistrationInputError``) a folder that already holds any of them unless ``overwrite``;
        each file is written to a temporary name and renamed, and input files are never replaced.
        ``ddf_itk`` is rebuilt from ``ddf_voxel`` (``ddf_itk`` may have been consumed by a transform).
        ``transform.h5`` (and ``inverse_transform.h5``) are ITK composite transforms (fixed -> moving
        points; the inverse moving -> fixed); ``report``: also ``report.png``; ``image_format``: the
        extension of the image outputs (:data:`IMAGE_FORMATS`).
        """
        from regnet_zoo.api.outputs import transforms
        from regnet_zoo.data.transform_io import write_transform

        out_dir = Path(out_dir)
        if out_dir.exists() and not out_dir.is_dir():
            raise RegistrationInputError(f"{out_dir}: output path exists and is not a folder")
        if report and self.inputs is None:
            raise RegistrationInputError("a report needs the result's inputs (RegistrationResult.inputs)")
        has_label, has_inverse = self.warped_label is not None, self.inverse_ddf is not None
        files = output_names(has_label, has_inverse, report, image_format, self.affine is not None)
        paths = {k: out_dir / name for k, name in files.items()}
        existing = [p.name for p in paths.values() if p.exists()]
        if existing and not overwrite:
            raise RegistrationInputError(
                f"{out_dir}: output folder holds results ({', '.join(existing)}); "
                "pass --overwrite to replace them"
            )
        sources = {Path(s).resolve() for s in self.source_files if s}
        clash = [str(p) for p in paths.values() if p.resolve() in sources]
        if clash:
            raise RegistrationInputError(
                f"{clash[0]}: refusing to overwrite an input file; choose another --out"
            )
        out_dir.mkdir(parents=True, exist_ok=True)
        affine = affine_of(self.warped)
        spatial_dims = self.ddf_voxel.shape[0]
        save_image(self.warped, paths["warped"], affine=affine, overwrite=overwrite)
        if self.warped_label is not None:
            label = self.warped_label.as_tensor().to(torch.int32)
            save_image(label, paths["warped_label"], affine=affine, overwrite=overwrite)
        save_image(self.ddf_voxel.float(), paths["ddf_voxel"], affine=affine, overwrite=overwrite)
        itk_field = ddf_to_itk(self.ddf_voxel, affine)
        atomic_write(paths["ddf_itk"], lambda tmp: sitk.WriteImage(itk_field, str(tmp)), overwrite)
        jac = self.jacobian.as_tensor().float().reshape(1, *self.ddf_voxel.shape[1 : spatial_dims + 1])
        save_image(jac, paths["jacobian"], affine=affine, overwrite=overwrite)
        deformable = self.ddf_voxel if self.ddf_deformable is None else self.ddf_deformable
        forward, backward = transforms(deformable, self.inverse_ddf, affine, self.affine)
        write_transform(forward, paths["transform"], overwrite)
        if backward is not None:
            write_transform(backward, paths["inverse_transform"], overwrite)
        if self.fixed_warped is not None:
            save_image(self.fixed_warped, paths["fixed_warped"], overwrite=overwrite)
        text = metrics_to_json(self.metrics) + "\n"
        atomic_write(paths["metrics"], lambda tmp: tmp.write_text(text), overwrite)
        if self.affine is not None:
            matrix = as_4x4(self.affine)
            atomic_write(
                paths["affine_txt"],
                lambda tmp: np.savetxt(tmp, matrix, fmt="%.10g", header=AFFINE_TXT_HEADER),
                overwrite,
            )
            transform = itk_affine_transform(matrix, spatial_dims)
            atomic_write(paths["affine_tfm"], lambda tmp: sitk.WriteTransform(transform, str(tmp)), overwrite)
        if report:
            self.write_report(paths["report"], overwrite)
        return paths

    def write_report(self, path: str | os.PathLike, overwrite: bool = False) -> Path:
        """The registration picture (:func:`regnet_zoo.report.write_report`) as a PNG at ``path``."""
        from regnet_zoo.report import write_report

        pair = self.inputs
        fixed_affine = affine_of(pair.fixed)
        shape = tuple(pair.fixed.shape[1:])
        moving_label = None
        if pair.moving_label is not None:
            moving_label = warp_physical(pair.moving_label, fixed_affine, shape, nearest=True)
        names = [Path(s).name for s in self.source_files[:2]]
        return write_report(
            path, pair.fixed, moving_on_fixed_grid(pair.fixed, pair.moving), self.warped, self.ddf_voxel,
            fixed_affine, fixed_label=pair.fixed_label, moving_label=moving_label,
            warped_label=self.warped_label, jacobian=self.jacobian,
            title=" <- ".join(names) if len(names) == 2 else "registration", overwrite=overwrite,
        )  # fmt: skip


def itk_affine_transform(matrix: np.ndarray, spatial_dims: int) -> sitk.AffineTransform:
    """A 4x4 physical RAS map ``T`` (fixed point -> moving point) as an ITK ``AffineTransform`` in LPS: what
    ``sitk.Resample(moving, fixed, transform)`` uses to resample the moving image onto the fixed grid."""
    from regnet_zoo.data.transform_io import affine_transform

    return affine_transform(from_4x4(LPS_RAS @ as_4x4(matrix) @ LPS_RAS, spatial_dims))




@dataclass
class PairInputs:
    """Checked inputs of :func:`register`: images ``(C, *S)``, labels ``(1, *S)`` int64, landmarks
    ``(K, N)`` LPS mm (None when not given), and the input file paths (never overwritten)."""

    fixed: MetaTensor
    moving: MetaTensor
    fixed_label: MetaTensor | None = None
    moving_label: MetaTensor | None = None
    fixed_points: np.ndarray | None = None
    moving_points: np.ndarray | None = None
    source_files: tuple[str, ...] = ()

    @property
    def spatial_dims(self) -> int:
        return self.fixed.ndim - 1


def check_inputs(
    fixed: ImageLike,
    moving: ImageLike,
    fixed_label: ImageLike | None = None,
    moving_label: ImageLike | None = None,
    fixed_landmarks: PointsLike | None = None,
    moving_landmarks: PointsLike | None = None,
) -> PairInputs:
    """Load and check every input of :func:`register` (``RegistrationInputError`` naming the bad one)."""
    fixed_img = as_image(fixed, "fixed image")
    moving_img = as_image(moving, "moving image")
    spatial_dims = check_pair(fixed_img, moving_img)
    if fixed_label is not None and moving_label is None:
        raise RegistrationInputError("a fixed label needs a moving label (Dice / HD95 compare the two)")
    fixed_lab = as_label(fixed_label, "fixed label", spatial_dims) if fixed_label is not None else None
    moving_lab = as_label(moving_label, "moving label", spatial_dims) if moving_label is not None else None
    if (fixed_landmarks is None) != (moving_landmarks is None):
        raise RegistrationInputError("landmarks need both --fixed-landmarks and --moving-landmarks")
    fixed_pts = moving_pts = None
    if fixed_landmarks is not None:
        fixed_pts = as_points(fixed_landmarks, fixed_img, "fixed landmarks")
        moving_pts = as_points(moving_landmarks, moving_img, "moving landmarks")
        if fixed_pts.shape != moving_pts.shape:
            raise RegistrationInputError(
                f"fixed and moving landmarks must correspond row by row, got {len(fixed_pts)} and "
                f"{len(moving_pts)} points"
            )
    sources = tuple(
        str(v) for v in (fixed, moving, fixed_label, moving_label) if isinstance(v, str | os.PathLike)
    )
    return PairInputs(fixed_img, moving_img, fixed_lab, moving_lab, fixed_pts, moving_pts, sources)


def prepare_network(
    method: str, weights: str | os.PathLike | None, device: torch.device, pair: PairInputs
) -> tuple[nn.Module, Preprocessing]:
    """The trained network (cached across calls) and its preprocessing, checked against the pair.

    The preprocessing is the one recorded in self-describing weights (:mod:`regnet_zoo.weights`): the working
    grid, normalisation and padding the network was trained with; for plain state dicts, the bundle's config.
    """
    path = weights_path(method, weights, pair.spatial_dims).resolve()
    network, meta = cached_network(method, str(path), path.stat().st_mtime_ns, str(device), pair.spatial_dims)
    check_weights_fit(
        meta,
        str(path),
        method=method,
        spatial_dims=pair.spatial_dims,
        in_channels=pair.fixed.shape[0],
        grid=tuple(pair.fixed.shape[1:]),
    )
    in_channels = getattr(network, "in_channels", None)
    if in_channels is not None and pair.fixed.shape[0] != in_channels:
        raise RegistrationInputError(
            f"the {method} network takes {in_channels}-channel images, got {pair.fixed.shape[0]} channels"
        )
    if meta is not None and isinstance(meta.get("preprocessing"), dict):
        return network, Preprocessing.from_dict(meta["preprocessing"])
    return network, bundle_preprocessing(method, pair.spatial_dims)


def _warn_if_shipped(method: str, spatial_dims: int) -> None:
    """The shipped weights are small-budget CPU weights: without instance optimisation most of them do worse
    than the affine stage alone on real brains (``benchmarks/results/zoo_eval_3d.md``); say so."""
    from regnet_zoo.pretrained import pretrained_dir

    path = weights_path(method, None, spatial_dims).resolve()
    if path.parent != pretrained_dir().resolve():
        return
    warnings.warn(
        f"{method} uses the shipped weights {path.name}, trained for minutes on synthetic pairs only; alone "
        "they often do worse than the affine stage (e.g. on brain MRI): add instance optimisation "
        f"(instance_opt=20, `--instance-opt 20`) or train on your data (model card: "
        f"{path.with_name(method)}.md)",
        stacklevel=3,
    )


def moving_on_fixed_grid(fixed: MetaTensor, moving: MetaTensor) -> Tensor:
    """``moving`` ``(C, *S_m)`` resampled onto the fixed grid through physical space (linear, 0 outside);
    returned as is when it already lies on that grid."""
    fixed_affine, shape = affine_of(fixed), tuple(fixed.shape[1:])
    if tuple(moving.shape[1:]) == shape and np.allclose(affine_of(moving), fixed_affine, atol=1e-9):
        return moving.as_tensor() if isinstance(moving, MetaTensor) else moving
    return warp_physical(moving, fixed_affine, shape)


def predict_ddf(
    network: nn.Module,
    prep: Preprocessing,
    fixed: MetaTensor,
    moving: MetaTensor,
    device: torch.device,
    instance_opt: int = 0,
    instance_loss=None,
    inverse: bool = False,
    instance_grid: str = "input",
    refine_loss=None,
) -> Tensor | tuple[Tensor, Tensor, str]:
    """The network's voxel DDF ``(N, *S)`` on the fixed grid for a (pre-aligned) pair.

    ``instance_loss``: ``(loss_fn, lr)`` for ``instance_opt`` > 0 steps on the network's parameters on its
    working grid; where ``instance_grid`` says so (:func:`regnet_zoo.api.instance.refines_on_input_grid`)
    as many steps follow on the fixed grid, refining the resized field as a smoothed DDF
    (:class:`~regnet_zoo.api.instance.DenseDisplacement`) with ``refine_loss`` (default ``instance_loss``;
    it must need only ``ddf`` / ``warped``: an image similarity). With ``inverse``: ``(ddf, inverse ddf,
    how)`` (:func:`regnet_zoo.api.outputs.inverse_from_outputs`)."""
    fixed_shape = tuple(fixed.shape[1:])
    on_input = bool(instance_opt) and refines_on_input_grid(prep.size_for(len(fixed_shape)), fixed_shape,
                                                             instance_grid)  # fmt: skip
    fixed_n = normalise_intensity(fixed, prep.normalize, prep.percentiles, prep.ct_window).to(device)
    moving_n = MetaTensor(
        normalise_intensity(moving, prep.normalize, prep.percentiles, prep.ct_window).to(device),
        affine=moving.affine,
    )
    moving_f = moving_on_fixed_grid(fixed, moving_n)
    fixed_p, moving_p, crop = network_inputs(fixed_n, moving_f, prep)
    with torch.inference_mode():  # no autograd bookkeeping (instance optimisation clones what it adjusts)
        outputs = network(fixed_p, moving_p)
    if instance_opt:
        loss_fn, lr = instance_loss
        with torch.enable_grad():
            outputs = instance_optimise(network, loss_fn, outputs, fixed_p, moving_p, int(instance_opt), lr)
    ddf = outputs["ddf"][crop].detach().float()
    if tuple(ddf.shape[2:]) != fixed_shape:  # from the working grid (corner-aligned) to the fixed grid
        ddf = resize_ddf(ddf, fixed_shape)
    if on_input:  # the working grid cannot hold finer detail: refine the field itself on the fixed grid
        loss_fn, lr = refine_loss or instance_loss
        with torch.enable_grad():
            ddf = instance_optimise(DenseDisplacement(), loss_fn, {"ddf": ddf}, fixed_n[None].float(),
                                    moving_f[None].float(), int(instance_opt), lr)["ddf"]  # fmt: skip
    if inverse:
        from regnet_zoo.api.outputs import inverse_from_outputs

        return ddf[0], *inverse_from_outputs(network, outputs, crop, fixed_shape, ddf[0])
    return ddf[0]


def warp_and_evaluate(pair: PairInputs, ddf: Tensor) -> tuple[Tensor, MetaTensor | None, dict[str, Any]]:
    """Warp the moving image (and label) by the whole-transform ``ddf`` ``(N, *S)`` with one interpolation;
    the metrics. Returns ``(warped (C, *S), warped label or None, metrics)``."""
    fixed_affine = affine_of(pair.fixed)
    fixed_shape = tuple(pair.fixed.shape[1:])
    warped = warp_physical(pair.moving.to(ddf.device), fixed_affine, fixed_shape, ddf)
    ddf = ddf.cpu()
    spacing = spacing_from_affine(fixed_affine, pair.spatial_dims)
    metrics: dict[str, Any] = {}
    warped_label = None
    if pair.fixed_label is not None and pair.moving_label is not None:
        metrics, warped_label = label_metrics(
            ddf, pair.fixed, pair.fixed_label, pair.moving_label, None, spacing
        )
    elif pair.moving_label is not None:
        warped_label = MetaTensor(
            warp_physical(pair.moving_label, fixed_affine, fixed_shape, ddf, nearest=True),
            affine=torch.as_tensor(fixed_affine),
        )
    points = {}
    if pair.fixed_points is not None:
        points = {
            "fixed_points": lps_to_voxel(pair.fixed_points, fixed_affine),
            "moving_points": lps_to_voxel(pair.moving_points, fixed_affine),
        }
    metrics.update(registration_metrics(ddf, spacing=spacing, **points))
    return warped, warped_label, metrics



def affine_stage(
    pair: PairInputs, prep: Preprocessing, transform: str, device: torch.device, **options: Any
) -> np.ndarray:
    """Pre-alignment: the 4x4 physical (RAS) map ``T`` with ``moving(T p) ~ fixed(p)`` found by
    :func:`regnet_zoo.core.affine.affine_register` (``transform`` ``"affine"`` / ``"rigid"``, ``options``
    e.g. ``similarity``: LNCC by default, ``"mi"`` across modalities) on the intensity-normalised images,
    with :data:`AFFINE_STAGE_DEFAULTS` unless ``options`` override them."""
    from regnet_zoo.core.affine import affine_register

    options = {**AFFINE_STAGE_DEFAULTS, **options}

    if transform not in ("affine", "rigid"):
        raise RegistrationInputError(f"affine must be 'affine', 'rigid' or None, got {transform!r}")
    n = pair.spatial_dims
    fixed_n = normalise_intensity(pair.fixed, prep.normalize, prep.percentiles, prep.ct_window)
    moving_n = normalise_intensity(pair.moving, prep.normalize, prep.percentiles, prep.ct_window)
    matrix = affine_register(
        fixed_n.to(device),
        moving_n.to(device),
        torch.as_tensor(from_4x4(affine_of(pair.fixed), n)),
        torch.as_tensor(from_4x4(affine_of(pair.moving), n)),
        transform=transform,
        **options,
    )
    return as_4x4(np.asarray(matrix.detach().cpu(), dtype=np.float64))


def pre_aligned(image: MetaTensor, matrix: np.ndarray | None) -> MetaTensor:
    """``image`` resampled through ``matrix`` ``T`` lazily: the same data with the affine ``T^-1 A``."""
    if matrix is None:
        return image
    data = image.as_tensor() if isinstance(image, MetaTensor) else image
    return MetaTensor(data, affine=torch.as_tensor(np.linalg.inv(matrix) @ affine_of(image)))


def total_ddf(ddf: Tensor, matrix: np.ndarray | None, fixed_affine: np.ndarray) -> Tensor:
    """The whole transform, affine then deformable, as one voxel DDF ``(N, *S)`` on the fixed grid:
    ``A_f^-1 T A_f (x + d(x)) - x`` (``d``: the network's field relative to the pre-aligned moving image)."""
    if matrix is None:
        return ddf
    n = ddf.shape[0]
    voxel = from_4x4(np.linalg.inv(fixed_affine) @ matrix @ fixed_affine, n)
    linear = torch.as_tensor(voxel[:n, :n], device=ddf.device, dtype=torch.float64)
    moved = torch.einsum("ij,j...->i...", linear, ddf.to(torch.float64))
    out = affine_ddf(voxel, ddf.shape[1:], dtype=torch.float64, device=ddf.device)[0] + moved
    return out.to(ddf.dtype)


def initial_metrics(pair: PairInputs, matrix: np.ndarray | None = None) -> dict[str, Any]:
    """Dice / HD95 / TRE before registration (identity in physical space: ``*_initial``) and, with a
    pre-alignment ``matrix``, after the affine stage alone (``*_affine``)."""
    out: dict[str, Any] = {}
    fixed_affine = affine_of(pair.fixed)
    spacing = spacing_from_affine(fixed_affine, pair.spatial_dims)
    zero = torch.zeros(pair.spatial_dims, *pair.fixed.shape[1:])
    stages = [("initial", None)] + ([("affine", matrix)] if matrix is not None else [])
    for suffix, stage in stages:
        ddf = total_ddf(zero, stage, fixed_affine)
        if pair.fixed_label is not None and pair.moving_label is not None:
            labels = label_metrics(ddf, pair.fixed, pair.fixed_label, pair.moving_label, None, spacing)[0]
            out[f"dice_mean_{suffix}"], out[f"hd95_mm_{suffix}"] = labels["dice_mean"], labels["hd95_mm"]
        if pair.fixed_points is not None and stage is not None:
            fixed_vox = lps_to_voxel(pair.fixed_points, fixed_affine)
            moving_vox = lps_to_voxel(pair.moving_points, fixed_affine)
            out[f"tre_mm_{suffix}"] = float(np.mean(tre(fixed_vox, moving_vox, ddf.numpy(), spacing)))
    return out


class _Stages:
    """Times the named steps of :func:`register` and reports each through ``progress``."""

    def __init__(self, progress: Callable[[str], None] | None):
        self.progress, self.times, self._last = progress, {}, time.perf_counter()

    def done(self, name: str) -> None:
        now = time.perf_counter()
        self.times[name] = now - self._last
        self._last = now
        if self.progress is not None:
            self.progress(f"{name}: {self.times[name]:.2f} s")


def register(
    fixed: ImageLike,
    moving: ImageLike,
    method: str = "ddrnet",
    *,
    fixed_label: ImageLike | None = None,
    moving_label: ImageLike | None = None,
    fixed_landmarks: PointsLike | None = None,
    moving_landmarks: PointsLike | None = None,
    weights: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    instance_opt: int = 0,
    affine: str | None = "affine",
    affine_options: dict[str, Any] | None = None,
    progress: Callable[[str], None] | None = None,
    inverse: bool = False,
    instance_similarity: str | None = None,
    instance_grid: str = "input",
) -> RegistrationResult:
    """Register ``moving`` to ``fixed`` with a trained method; see the module docstring for the steps.

    Images: file paths or ``MetaTensor`` ``(C, *S)`` (plain tensors get an identity affine). Labels: integer
    label maps (paths or tensors ``(1, *S)``). Landmarks: CSV paths or ``(K, N)`` arrays, physical LPS mm,
    rows corresponding. ``weights``: default ``bundles/<method>/models/model.pt``. ``instance_opt``: number
    of Adam steps of test-time optimisation of the network's transform parameters with the bundle's loss.
    ``affine``: the pre-alignment stage, ``"affine"`` (default), ``"rigid"`` or None (off);
    ``affine_options`` go to :func:`regnet_zoo.core.affine.affine_register` (e.g. ``{"similarity": "mi"}``,
    which multi-modal pairs such as MR-US need; the default LNCC assumes one contrast).
    The result's fields hold the whole transform (affine then deformable). ``progress``: called with one
    line per finished step (name and seconds), e.g. ``print`` to stderr.
    ``inverse``: also the inverse field, its inverse-consistency error in ``metrics`` and the fixed image
    warped onto the moving grid. ``instance_similarity``: ``"lncc"``, ``"mi"`` or ``"ngf"`` (+ 0.1 diffusion)
    instead of the bundle's loss in instance optimisation (``"lncc"`` where the bundle's loss compares
    intensities directly and the pair has two contrasts). ``instance_grid``: ``"input"`` (default): when the
    network works on a resampled grid (weights trained at a fixed ``image_size``, such as the shipped 3D ones
    at 48^3), the ``instance_opt`` steps on its parameters there are followed by as many on the fixed image's
    own grid, refining the resized field as a smoothed DDF with ``instance_similarity`` (default LNCC) + 0.1
    diffusion; ``"network"``: the network's parameters only (faster, coarser).
    """
    check_method(method)
    if int(instance_opt) < 0:
        raise RegistrationInputError(f"instance_opt must be >= 0 steps, got {instance_opt}")
    affine = None if affine in (None, "none", False) else affine
    if affine not in (None, "affine", "rigid"):
        raise RegistrationInputError(f"affine must be 'affine', 'rigid' or None, got {affine!r}")
    device = resolve_device(device)
    stages = _Stages(progress)
    pair = check_inputs(fixed, moving, fixed_label, moving_label, fixed_landmarks, moving_landmarks)
    stages.done("load inputs")
    network, prep = prepare_network(method, weights, device, pair)
    if weights is None and not instance_opt:
        _warn_if_shipped(method, pair.spatial_dims)
    if prep.pre_align is not None and affine is None:
        warnings.warn(
            f"the {method} network was trained on pre-aligned pairs (pre_align={prep.pre_align!r}) but the "
            "affine stage is off: its inputs differ from its training data",
            stacklevel=2,
        )
    on_input = refines_on_input_grid(prep.size_for(pair.spatial_dims), pair.fixed.shape[1:], instance_grid)
    instance_loss = refine_loss = None
    if instance_opt:
        instance_loss = bundle_instance_loss(method, pair.spatial_dims, device, instance_similarity)
        if on_input:  # a plain DDF there: the bundle's loss may need the network's own outputs
            similarity = instance_similarity or "lncc"
            refine_loss = bundle_instance_loss(method, pair.spatial_dims, device, similarity)
    stages.done(f"load {method} network")

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    matrix = None
    if affine is not None:
        matrix = affine_stage(pair, prep, affine, device, **dict(affine_options or {}))
        stages.done(f"{affine} pre-alignment")
    moving = pre_aligned(pair.moving, matrix)
    predicted = predict_ddf(
        network, prep, pair.fixed, moving, device, int(instance_opt), instance_loss, inverse, instance_grid,
        refine_loss,
    )
    deformable, inverse_ddf, inverse_method = predicted if inverse else (predicted, None, None)
    where = f" + {instance_opt} on the input grid" if on_input else ""
    extra = f" + {instance_opt} instance-optimisation steps{where}" if instance_opt else ""
    stages.done(f"{method} network{extra}")
    ddf = total_ddf(deformable, matrix, affine_of(pair.fixed))
    warped, warped_label, metrics = warp_and_evaluate(pair, ddf)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        peak_mb = torch.cuda.max_memory_allocated(device) / 2**20
    else:  # Linux reports the process's peak resident set in KiB
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    metrics["runtime_s"] = time.perf_counter() - start
    metrics["peak_memory_mb"] = peak_mb
    stages.done("warp and metrics")
    metrics.update(initial_metrics(pair, matrix))
    result = _result(pair, ddf.cpu(), warped, warped_label, metrics, matrix)
    result.ddf_deformable = deformable.cpu()
    if inverse_ddf is not None:
        _add_inverse(result, pair, inverse_ddf.cpu(), inverse_method)
        stages.done("inverse")
    metrics["stage_s"] = dict(stages.times)
    return result


def _add_inverse(result: RegistrationResult, pair: PairInputs, inverse_ddf: Tensor, how: str) -> None:
    """Inverse outputs: the consistency error in ``metrics``; the fixed image on the moving grid.

    ``inverse_ddf`` inverts the deformable part; the affine stage is inverted exactly. The error
    ``|phi(phi^-1(y)) - y|`` of the whole transform is the deformable residual mapped by the affine's
    linear part (mm, on the fixed grid's points moved by the affine stage).
    """
    from regnet_zoo.api.outputs import fixed_on_moving_grid, transforms
    from regnet_zoo.core.inverse import inverse_residual

    fixed_affine = affine_of(pair.fixed)
    n = pair.spatial_dims
    residual = inverse_residual(result.ddf_deformable[None].double(), inverse_ddf[None].double())[0]
    linear = as_4x4(result.affine if result.affine is not None else np.eye(4))[:3, :3] @ fixed_affine[:3, :n]
    mm = np.linalg.norm(np.einsum("ij,j...->i...", linear, residual.numpy()), axis=0)
    result.metrics["inverse_consistency_mean_mm"] = float(mm.mean())
    result.metrics["inverse_consistency_p95_mm"] = float(np.percentile(mm, 95))
    result.metrics["inverse_method"] = how
    result.inverse_ddf = inverse_ddf
    _, backward = transforms(result.ddf_deformable, inverse_ddf, fixed_affine, result.affine)
    result.fixed_warped = fixed_on_moving_grid(pair.fixed, pair.moving, backward)


def _result(
    pair: PairInputs,
    ddf: Tensor,
    warped: Tensor,
    warped_label: MetaTensor | None,
    metrics: dict,
    matrix: np.ndarray | None = None,
) -> RegistrationResult:
    fixed_affine = affine_of(pair.fixed)
    affine_t = torch.as_tensor(fixed_affine)
    jac = jacobian_determinant(ddf[None].double())[0].float()
    return RegistrationResult(
        warped=MetaTensor(warped.cpu(), affine=affine_t),
        warped_label=warped_label,
        ddf_voxel=ddf,
        ddf_itk=ddf_to_itk(ddf, fixed_affine),
        jacobian=MetaTensor(jac, affine=affine_t),
        metrics=metrics,
        affine=matrix,
        source_files=pair.source_files,
        inputs=pair,
    )
