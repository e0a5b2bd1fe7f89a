"""``register``: two images -> a displacement field, warped images and metrics, in a few named steps.

The steps (the same as ``regnet-zoo register``):

1. :func:`check_inputs`: load the fixed and moving images (paths or ``MetaTensor`` ``(C, *S)`` with a RAS
   affine), labels and landmarks, and check them before anything slow runs;
2. :func:`prepare_network`: the method's trained network and its preprocessing (from the weights' metadata,
   else the bundle's config);
3. :func:`predict_ddf`: the one preprocessing path (:mod:`regnet_zoo.data.preprocess`: normalisation on the
   native grids, the moving image brought onto the fixed grid through physical space, resampling to the
   working grid, padding), the network, optional instance optimisation (``instance_opt`` Adam steps on the
   bundle's own loss), the field cropped and rescaled back to the fixed grid;
4. :func:`warp_and_evaluate`: the *original* moving image (and label) warped with one interpolation of the
   composed map ``fixed voxel x -> moving voxel A_m^-1 A_f (x + ddf(x))`` (exactly what SimpleITK does with
   :attr:`RegistrationResult.ddf_itk`: linear, border-clamped within half a voxel of the grid, 0 further
   out; nearest neighbour for labels) and the metrics (``regnet_zoo.core.metrics``) in mm on the fixed grid.
"""

from __future__ import annotations

import os
import resource
import time
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
from regnet_zoo.api.instance import bundle_instance_loss, instance_optimise
from regnet_zoo.api.methods import (
    bundle_preprocessing,
    cached_network,
    check_method,
    resolve_device,
    weights_path,
)
from regnet_zoo.core.geometry import affine_of, lps_to_voxel, spacing_from_affine
from regnet_zoo.core.metrics import jacobian_determinant, registration_metrics
from regnet_zoo.core.spatial import resize_ddf
from regnet_zoo.data.io import atomic_write, check_pair, metrics_to_json, save_image
from regnet_zoo.data.preprocess import Preprocessing, network_inputs, normalise_intensity
from regnet_zoo.errors import RegistrationInputError

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
    "report": "report.png",
}
#: image formats :meth:`RegistrationResult.save` writes (``image_format``); ``ddf_voxel`` stays NIfTI
#: (Learn2Reg's layout)
IMAGE_FORMATS = (".nii.gz", ".nii", ".mha", ".nrrd")


def output_names(
    label: bool = True, inverse: bool = False, report: bool = False, image_format: str = ".nii.gz"
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
    source_files: tuple[str, ...] = field(default=(), repr=False)
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
        files = output_names(has_label, has_inverse, report, image_format)
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
        forward, backward = transforms(self.ddf_voxel, self.inverse_ddf, affine)
        write_transform(forward, paths["transform"], overwrite)
        if backward is not None:
            write_transform(backward, paths["inverse_transform"], overwrite)
        if self.fixed_warped is not None:
            save_image(self.fixed_warped, paths["fixed_warped"], overwrite=overwrite)
        text = metrics_to_json(self.metrics) + "\n"
        atomic_write(paths["metrics"], lambda tmp: tmp.write_text(text), overwrite)
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
    """The trained network (cached across calls) and its preprocessing, checked against the pair."""
    path = weights_path(method, weights).resolve()
    network = cached_network(method, str(path), path.stat().st_mtime_ns, str(device), pair.spatial_dims)
    in_channels = getattr(network, "in_channels", None)
    if in_channels is not None and pair.fixed.shape[0] != in_channels:
        raise RegistrationInputError(
            f"the {method} network takes {in_channels}-channel images, got {pair.fixed.shape[0]} channels"
        )
    return network, bundle_preprocessing(method, pair.spatial_dims)


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
) -> Tensor | tuple[Tensor, Tensor, str]:
    """The network's voxel DDF ``(N, *S)`` on the fixed grid for a (pre-aligned) pair; ``instance_loss``:
    ``(loss_fn, lr)`` for ``instance_opt`` > 0 steps. With ``inverse``: ``(ddf, inverse ddf, how)``
    (:func:`regnet_zoo.api.outputs.inverse_from_outputs`)."""
    fixed_shape = tuple(fixed.shape[1:])
    fixed_n = normalise_intensity(fixed, prep.normalize, prep.percentiles, prep.ct_window).to(device)
    moving_n = MetaTensor(
        normalise_intensity(moving, prep.normalize, prep.percentiles, prep.ct_window).to(device),
        affine=moving.affine,
    )
    fixed_p, moving_p, crop = network_inputs(fixed_n, moving_on_fixed_grid(fixed, moving_n), prep)
    with torch.no_grad():
        outputs = network(fixed_p, moving_p)
    if instance_opt:
        loss_fn, lr = instance_loss
        with torch.enable_grad():
            outputs = instance_optimise(network, loss_fn, outputs, fixed_p, moving_p, int(instance_opt), lr)
    ddf = outputs["ddf"][crop].detach().float()
    if tuple(ddf.shape[2:]) != fixed_shape:  # from the working grid (corner-aligned) to the fixed grid
        ddf = resize_ddf(ddf, fixed_shape)
    if inverse:
        from regnet_zoo.api.outputs import inverse_from_outputs

        return ddf[0], *inverse_from_outputs(network, outputs, crop, fixed_shape, ddf[0])
    return ddf[0]


def warp_and_evaluate(
    pair: PairInputs, ddf: Tensor, moving_for_warp: MetaTensor | None = None
) -> tuple[Tensor, MetaTensor | None, dict[str, Any]]:
    """Warp the moving image (and label) by ``ddf`` ``(N, *S)`` with one interpolation; the metrics.

    ``moving_for_warp``: the moving image to warp (default ``pair.moving``; the pre-aligned one carries the
    affine stage in its affine). Returns ``(warped (C, *S), warped label or None, metrics)``.
    """
    fixed_affine = affine_of(pair.fixed)
    fixed_shape = tuple(pair.fixed.shape[1:])
    moving = pair.moving if moving_for_warp is None else moving_for_warp
    warped = warp_physical(moving.to(ddf.device), fixed_affine, fixed_shape, ddf)
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
    inverse: bool = False,
) -> RegistrationResult:
    """Register ``moving`` to ``fixed`` with a trained method; see the module docstring for the steps.

    Images: file paths or ``MetaTensor`` ``(C, *S)`` (plain tensors get an identity affine). Labels: integer
    label maps (paths or tensors ``(1, *S)``). Landmarks: CSV paths or ``(K, N)`` arrays, physical LPS mm,
    rows corresponding. ``weights``: default ``bundles/<method>/models/model.pt``. ``instance_opt``: number
    of Adam steps of test-time optimisation of the network's transform parameters with the bundle's loss.
    ``inverse``: also the inverse field, its inverse-consistency error in ``metrics`` and the fixed image
    warped onto the moving grid.
    """
    check_method(method)
    if int(instance_opt) < 0:
        raise RegistrationInputError(f"instance_opt must be >= 0 steps, got {instance_opt}")
    device = resolve_device(device)
    pair = check_inputs(fixed, moving, fixed_label, moving_label, fixed_landmarks, moving_landmarks)
    network, prep = prepare_network(method, weights, device, pair)
    instance_loss = bundle_instance_loss(method, pair.spatial_dims, device) if instance_opt else None

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    predicted = predict_ddf(
        network, prep, pair.fixed, pair.moving, device, int(instance_opt), instance_loss, inverse
    )
    ddf, inverse_ddf, inverse_method = predicted if inverse else (predicted, None, None)
    warped, warped_label, metrics = warp_and_evaluate(pair, ddf)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        peak_mb = torch.cuda.max_memory_allocated(device) / 2**20
    else:  # Linux reports the process's peak resident set in KiB
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    metrics["runtime_s"] = time.perf_counter() - start
    metrics["peak_memory_mb"] = peak_mb
    result = _result(pair, ddf.cpu(), warped, warped_label, metrics)
    if inverse_ddf is not None:
        _add_inverse(result, pair, inverse_ddf.cpu(), inverse_method)
    return result


def _add_inverse(result: RegistrationResult, pair: PairInputs, inverse_ddf: Tensor, how: str) -> None:
    """Inverse outputs: the consistency error (mm) in ``metrics``; the fixed image on the moving grid."""
    from regnet_zoo.api.outputs import fixed_on_moving_grid, transforms
    from regnet_zoo.core.inverse import inverse_consistency_error

    fixed_affine = affine_of(pair.fixed)
    spacing = spacing_from_affine(fixed_affine, pair.spatial_dims)
    result.metrics.update(inverse_consistency_error(result.ddf_voxel[None], inverse_ddf[None], spacing))
    result.metrics["inverse_method"] = how
    result.inverse_ddf = inverse_ddf
    _, backward = transforms(result.ddf_voxel, inverse_ddf, fixed_affine)
    result.fixed_warped = fixed_on_moving_grid(pair.fixed, pair.moving, backward)


def _result(
    pair: PairInputs, ddf: Tensor, warped: Tensor, warped_label: MetaTensor | None, metrics: dict
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
        source_files=pair.source_files,
        inputs=pair,
    )
