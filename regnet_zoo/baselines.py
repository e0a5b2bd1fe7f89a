"""Classic registration baselines for the side-by-side benchmark, as library code.

Every classic baseline takes a fixed and a moving image (``(*S)``, ``(1, *S)`` or ``(1, 1, *S)``, one grid)
and the voxel size per array axis (mm) and returns a DDF ``(N, *S)`` in voxel units of the fixed grid (README
"Conventions": ``warped(x) = moving(x + ddf(x))``):

- :func:`identity_ddf`: no registration (the "before" row);
- :func:`sitk_affine`: SimpleITK affine, Mattes mutual information, three-level pyramid;
- :func:`sitk_bspline`: SimpleITK multi-resolution B-spline free-form deformation after the affine (an
  elastix-like setting: MI, pyramid, control-point grid refined per level);
- :func:`sitk_demons`: SimpleITK diffeomorphic demons after the affine (histogram matching, pyramid);
- :func:`ants_syn`: ANTsPy SyN (optional ``antspyx``; raises ``ImportError`` when it is not installed);
- :func:`elastix_bspline`: elastix (optional ``itk-elastix``) with its default affine then B-spline parameter
  maps (raises ``ImportError`` when it is not installed).

Images are handed to SimpleITK with the real voxel size but identity direction and zero origin, so that
physical displacements divided by the spacing are voxel displacements along the array axes (SimpleITK
orders vector components x, y, z = the array axes reversed).

:class:`VoxelMorphRegistration` wraps MONAI's ``VoxelMorph`` in the project's network interface and
:class:`VoxelMorphLoss` is its unsupervised loss (LNCC or MSE + diffusion), so that it trains with the
shared engine like the five methods.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from regnet_zoo.core.losses import diffusion_loss, lncc_loss, mse_loss
from regnet_zoo.core.spatial import warp_image
from regnet_zoo.errors import RegistrationInputError

__all__ = [
    "CLASSIC_BASELINES",
    "image_to_sitk",
    "transform_to_ddf",
    "displacement_image_to_ddf",
    "identity_ddf",
    "sitk_affine",
    "sitk_bspline",
    "sitk_demons",
    "ants_syn",
    "ants_available",
    "elastix_bspline",
    "elastix_available",
    "VoxelMorphRegistration",
    "VoxelMorphLoss",
]


#: cap on the metric's random samples (fraction ``sampling`` of the voxels, at most this many)
MAX_METRIC_SAMPLES = 20_000


# ----------------------------------------------------------------------------------------------------------
# tensors <-> SimpleITK
# ----------------------------------------------------------------------------------------------------------
def _image_array(image: Tensor | np.ndarray, name: str) -> np.ndarray:
    """``(*S)``, ``(1, *S)`` or ``(1, 1, *S)`` -> float32 numpy ``S`` (2D or 3D)."""
    arr = image.detach().cpu().numpy() if isinstance(image, Tensor) else np.asarray(image)
    while arr.ndim > 3 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim == 3 and arr.shape[0] == 1:  # (1, H, W): one 2D channel
        arr = arr[0]
    if arr.ndim not in (2, 3):
        raise RegistrationInputError(
            f"{name}: expected a 2D or 3D image (optionally (1, 1, *S)), got {arr.shape}"
        )
    if not np.all(np.isfinite(arr)):
        raise RegistrationInputError(f"{name}: image contains NaN or inf")
    return arr.astype(np.float32)


def _spacing(spacing: float | Sequence[float] | None, ndim: int) -> list[float]:
    values = (
        [1.0] * ndim if spacing is None else np.broadcast_to(np.asarray(spacing, float), (ndim,)).tolist()
    )
    if any(v <= 0 for v in values):
        raise RegistrationInputError(f"spacing must be positive, got {values}")
    return [float(v) for v in values]


def image_to_sitk(image: Tensor | np.ndarray, spacing: float | Sequence[float] | None = None) -> sitk.Image:
    """A 2D/3D image as ``sitk.Image`` (float32) with ``spacing`` per array axis, zero origin, identity
    direction; SimpleITK index ``(x, y, z)`` is array index ``(..., k, j, i)`` reversed."""
    arr = _image_array(image, "image")
    out = sitk.GetImageFromArray(arr)
    out.SetSpacing(_spacing(spacing, arr.ndim)[::-1])
    return out


def displacement_image_to_ddf(field: sitk.Image) -> Tensor:
    """A SimpleITK displacement field (physical units, x-y-z vectors) -> DDF ``(N, *S)`` in voxel units."""
    arr = sitk.GetArrayFromImage(field).astype(np.float64)  # (*S, N), components x, y, z
    spacing = np.asarray(field.GetSpacing(), float)  # x, y, z
    arr = arr / spacing  # voxel units along x, y, z
    ddf = np.moveaxis(arr[..., ::-1], -1, 0)  # channel i = array axis i
    return torch.from_numpy(np.ascontiguousarray(ddf)).float()


def transform_to_ddf(transform: sitk.Transform, reference: sitk.Image) -> Tensor:
    """DDF ``(N, *S)`` (voxel units) of a SimpleITK transform on the grid of ``reference``.

    SimpleITK transforms map fixed points to moving points, ``T(x) = x + ddf(x)``: the DDF convention.
    """
    field = sitk.TransformToDisplacementField(
        transform,
        sitk.sitkVectorFloat64,
        reference.GetSize(),
        reference.GetOrigin(),
        reference.GetSpacing(),
        reference.GetDirection(),
    )
    return displacement_image_to_ddf(field)


def _pyramid(method: sitk.ImageRegistrationMethod, levels: int) -> None:
    shrink = [2**i for i in reversed(range(levels))]
    method.SetShrinkFactorsPerLevel(shrink)
    method.SetSmoothingSigmasPerLevel([s / 2 if s > 1 else 0 for s in shrink])
    method.SmoothingSigmasAreSpecifiedInPhysicalUnitsOff()


def _mattes(method: sitk.ImageRegistrationMethod, sampling: float, seed: int, fixed: sitk.Image) -> None:
    method.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
    # at most MAX_METRIC_SAMPLES random samples at full resolution: large 3D volumes stay tractable
    sampling = min(sampling, MAX_METRIC_SAMPLES / fixed.GetNumberOfPixels())
    if sampling < 1.0:
        method.SetMetricSamplingStrategy(method.RANDOM)
        # SimpleITK reads seed 0 as 'seed from the wall clock': shift by one so every seed is reproducible
        method.SetMetricSamplingPercentage(sampling, int(seed) + 1)
    else:
        method.SetMetricSamplingStrategy(method.NONE)
    method.SetInterpolator(sitk.sitkLinear)


# ----------------------------------------------------------------------------------------------------------
# baselines
# ----------------------------------------------------------------------------------------------------------
def identity_ddf(
    fixed: Tensor | np.ndarray, moving: Tensor | np.ndarray | None = None, spacing=None
) -> Tensor:
    """The zero DDF ``(N, *S)`` on the fixed grid (no registration)."""
    shape = _image_array(fixed, "fixed").shape
    return torch.zeros(len(shape), *shape)


def _affine_transform(
    fixed: sitk.Image, moving: sitk.Image, iterations: int, levels: int, sampling: float, seed: int
) -> sitk.Transform:
    initial = sitk.CenteredTransformInitializer(
        fixed,
        moving,
        sitk.AffineTransform(fixed.GetDimension()),
        sitk.CenteredTransformInitializerFilter.MOMENTS,
    )
    method = sitk.ImageRegistrationMethod()
    _mattes(method, sampling, seed, fixed)
    method.SetOptimizerAsRegularStepGradientDescent(
        learningRate=1.0, minStep=1e-4, numberOfIterations=iterations, relaxationFactor=0.6
    )
    method.SetOptimizerScalesFromPhysicalShift()
    _pyramid(method, levels)
    method.SetInitialTransform(initial, inPlace=False)
    return method.Execute(fixed, moving)


def _pair_to_sitk(fixed, moving, spacing) -> tuple[sitk.Image, sitk.Image]:
    fixed_arr, moving_arr = _image_array(fixed, "fixed"), _image_array(moving, "moving")
    if fixed_arr.shape != moving_arr.shape:
        raise RegistrationInputError(
            f"fixed {fixed_arr.shape} and moving {moving_arr.shape} must share one grid"
        )
    spacing = _spacing(spacing, fixed_arr.ndim)
    return image_to_sitk(fixed_arr, spacing), image_to_sitk(moving_arr, spacing)


def sitk_affine(
    fixed: Tensor | np.ndarray,
    moving: Tensor | np.ndarray,
    spacing: float | Sequence[float] | None = None,
    iterations: int = 200,
    levels: int = 3,
    sampling: float = 0.25,
    seed: int = 0,
) -> Tensor:
    """Affine registration (SimpleITK): moments initialisation, Mattes MI (32 bins, ``sampling`` fraction of
    the voxels, at most :data:`MAX_METRIC_SAMPLES`, seeded), regular-step gradient descent,
    ``levels``-level pyramid -> DDF ``(N, *S)``."""
    fixed_img, moving_img = _pair_to_sitk(fixed, moving, spacing)
    transform = _affine_transform(fixed_img, moving_img, iterations, levels, sampling, seed)
    return transform_to_ddf(transform, fixed_img)


def sitk_bspline(
    fixed: Tensor | np.ndarray,
    moving: Tensor | np.ndarray,
    spacing: float | Sequence[float] | None = None,
    grid_spacing_voxels: float = 8.0,
    iterations: int = 100,
    affine_iterations: int = 200,
    levels: int = 3,
    sampling: float = 0.25,
    seed: int = 0,
) -> Tensor:
    """Multi-resolution B-spline FFD after :func:`sitk_affine` (SimpleITK; elastix-like) -> DDF ``(N, *S)``.

    Mattes MI with random sampling, gradient descent with line search (``iterations`` per level), a
    ``levels``-level image pyramid; the control-point mesh doubles per level to a final spacing of about
    ``grid_spacing_voxels``. ``affine_iterations=0``: no affine stage (for a pair that is already aligned;
    the affine's centre-of-mass start would undo that alignment across modalities).
    """
    fixed_img, moving_img = _pair_to_sitk(fixed, moving, spacing)
    if affine_iterations > 0:
        affine = _affine_transform(fixed_img, moving_img, affine_iterations, levels, sampling, seed)
    else:
        affine = sitk.AffineTransform(fixed_img.GetDimension())
    refinements = 2 ** (levels - 1)
    mesh = [max(1, round(size / (grid_spacing_voxels * refinements))) for size in fixed_img.GetSize()]
    bspline = sitk.BSplineTransformInitializer(fixed_img, mesh, order=3)
    method = sitk.ImageRegistrationMethod()
    _mattes(method, sampling, seed, fixed_img)
    method.SetOptimizerAsGradientDescentLineSearch(
        learningRate=5.0, numberOfIterations=iterations, convergenceMinimumValue=1e-4, convergenceWindowSize=5
    )
    _pyramid(method, levels)
    method.SetMovingInitialTransform(affine)
    method.SetInitialTransformAsBSpline(bspline, inPlace=True, scaleFactors=[2**i for i in range(levels)])
    method.Execute(fixed_img, moving_img)
    # the moving initial transform acts after the optimised one: x -> affine(bspline(x))
    return transform_to_ddf(sitk.CompositeTransform([affine, bspline]), fixed_img)


def sitk_demons(
    fixed: Tensor | np.ndarray,
    moving: Tensor | np.ndarray,
    spacing: float | Sequence[float] | None = None,
    iterations: Sequence[int] = (60, 40, 20),
    smoothing_sigma: float = 1.5,
    affine_iterations: int = 200,
    sampling: float = 0.25,
    seed: int = 0,
) -> Tensor:
    """Diffeomorphic demons (SimpleITK) after :func:`sitk_affine` -> DDF ``(N, *S)``.

    The moving image is histogram-matched to the fixed one; one pyramid level per entry of ``iterations``
    (coarse to fine, shrink 2 per level), the field is smoothed with ``smoothing_sigma`` voxels after every
    update and carried up the pyramid by linear resampling.
    """
    fixed_img, moving_img = _pair_to_sitk(fixed, moving, spacing)
    affine = _affine_transform(fixed_img, moving_img, affine_iterations, len(iterations), sampling, seed)
    moving_img = sitk.HistogramMatching(
        moving_img, fixed_img, numberOfHistogramLevels=256, numberOfMatchPoints=7
    )
    field = sitk.TransformToDisplacementField(
        affine,
        sitk.sitkVectorFloat64,
        fixed_img.GetSize(),
        fixed_img.GetOrigin(),
        fixed_img.GetSpacing(),
        fixed_img.GetDirection(),
    )
    demons = sitk.DiffeomorphicDemonsRegistrationFilter()
    demons.SetSmoothDisplacementField(True)
    demons.SetStandardDeviations(smoothing_sigma)
    levels = len(iterations)
    for level, n_iter in enumerate(iterations):
        shrink = 2 ** (levels - 1 - level)
        if shrink > 1:
            fixed_l = sitk.Shrink(
                sitk.SmoothingRecursiveGaussian(fixed_img, shrink / 2 * min(fixed_img.GetSpacing())),
                [shrink] * fixed_img.GetDimension(),
            )
            moving_l = sitk.Shrink(
                sitk.SmoothingRecursiveGaussian(moving_img, shrink / 2 * min(fixed_img.GetSpacing())),
                [shrink] * fixed_img.GetDimension(),
            )
        else:
            fixed_l, moving_l = fixed_img, moving_img
        # the current total field on this level's grid (physical displacements need no rescaling)
        field_l = sitk.Resample(
            field, fixed_l, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkVectorFloat64
        )
        demons.SetNumberOfIterations(int(n_iter))
        field = demons.Execute(fixed_l, moving_l, field_l)
    if field.GetSize() != fixed_img.GetSize():
        field = sitk.Resample(
            field, fixed_img, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkVectorFloat64
        )
    return displacement_image_to_ddf(field)


def ants_available() -> bool:
    """Whether ANTsPy (``antspyx``) can be imported."""
    try:
        import ants  # noqa: F401
    except ImportError:
        return False
    return True


def ants_syn(
    fixed: Tensor | np.ndarray,
    moving: Tensor | np.ndarray,
    spacing: float | Sequence[float] | None = None,
    transform_type: str = "SyN",
    **kwargs,
) -> Tensor:
    """ANTsPy SyN (affine + symmetric normalisation) -> DDF ``(N, *S)``.

    ``kwargs`` go to ``ants.registration`` (e.g. ``syn_metric="mattes"`` for multi-modal pairs: its default,
    cross-correlation, assumes one modality). Raises ``ImportError`` without the optional ``antspyx``.
    """
    import tempfile

    import ants

    fixed_arr, moving_arr = _image_array(fixed, "fixed"), _image_array(moving, "moving")
    spacing = tuple(_spacing(spacing, fixed_arr.ndim))
    # ANTsPy indexes numpy arrays as (x, y, z): vector component i is array axis i of what we pass in
    fixed_ants = ants.from_numpy(fixed_arr, spacing=spacing)
    moving_ants = ants.from_numpy(moving_arr, spacing=spacing)
    result = ants.registration(fixed_ants, moving_ants, type_of_transform=transform_type, **kwargs)
    with tempfile.TemporaryDirectory() as tmp:
        # compose the affine and the SyN warp into one displacement field file on the fixed grid
        composite = ants.apply_transforms(
            fixed_ants, moving_ants, result["fwdtransforms"], compose=f"{tmp}/composite_"
        )
        disp = ants.image_read(composite).numpy()  # (*S, N), physical units
    ddf = np.moveaxis(disp, -1, 0) / np.asarray(spacing).reshape(-1, *[1] * fixed_arr.ndim)
    return torch.from_numpy(np.ascontiguousarray(ddf)).float()


def elastix_available() -> bool:
    """Whether elastix (``itk-elastix``) can be imported."""
    try:
        import itk

        itk.ElastixRegistrationMethod  # noqa: B018 (lazy ITK modules: fail here, not inside a benchmark)
    except (ImportError, AttributeError):
        return False
    return True


def elastix_bspline(
    fixed: Tensor | np.ndarray,
    moving: Tensor | np.ndarray,
    spacing: float | Sequence[float] | None = None,
    maps: Sequence[str] = ("affine", "bspline"),
    iterations: int | None = None,
    threads: int | None = None,
    seed: int = 0,
) -> Tensor:
    """elastix (``itk-elastix``) with its default parameter maps ``maps`` in sequence (default: affine then
    B-spline, Mattes MI, adaptive stochastic gradient descent, 4 resolutions) -> DDF ``(N, *S)``.

    ``iterations``: override ``MaximumNumberOfIterations`` of every map (elastix default 256 per resolution).
    ``CheckNumberOfSamples`` is off (see the code) and the random seed fixed; the rest are elastix's defaults.
    The field comes from transformix on the fixed grid (fixed point -> moving point, the DDF convention).
    Raises ``ImportError`` without the optional ``itk-elastix``.
    """
    import itk

    fixed_arr, moving_arr = _image_array(fixed, "fixed"), _image_array(moving, "moving")
    spacing_list = _spacing(spacing, fixed_arr.ndim)

    def to_itk(arr: np.ndarray):
        image = itk.image_from_array(np.ascontiguousarray(arr, dtype=np.float32))
        image.SetSpacing(spacing_list[::-1])  # ITK orders x, y, z: the array axes reversed
        return image

    parameters = itk.ParameterObject.New()
    for name in maps:
        parameter_map = parameters.GetDefaultParameterMap(name)
        parameter_map["RandomSeed"] = [str(int(seed))]
        parameter_map["WriteResultImage"] = ["false"]
        # small or padded images: the coarse levels' random samples can fall outside the moving image; keep
        # going on the samples inside instead of stopping with an error (elastix's own switch)
        parameter_map["CheckNumberOfSamples"] = ["false"]
        if iterations is not None:
            parameter_map["MaximumNumberOfIterations"] = [str(int(iterations))]
        parameters.AddParameterMap(parameter_map)
    # threads through ITK's global default, never elastix's ``number_of_threads``: with more than one thread
    # that argument crashes the B-spline map (segfault, itk-elastix 0.25; ITKElastix issues #160 and #295)
    threader = itk.MultiThreaderBase
    previous = threader.GetGlobalDefaultNumberOfThreads()
    if threads:
        threader.SetGlobalDefaultNumberOfThreads(int(threads))
    try:
        _, result_parameters = itk.elastix_registration_method(
            to_itk(fixed_arr), to_itk(moving_arr), parameter_object=parameters, log_to_console=False
        )
    finally:
        threader.SetGlobalDefaultNumberOfThreads(previous)
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:  # transformix writes deformationField.nii into its folder
        field = itk.transformix_deformation_field(to_itk(moving_arr), result_parameters, output_directory=tmp)
    disp = np.asarray(itk.array_from_image(field), dtype=np.float64)  # (*S, N), physical, x-y-z
    ddf = np.moveaxis(disp[..., ::-1], -1, 0) / np.asarray(spacing_list).reshape(-1, *[1] * fixed_arr.ndim)
    return torch.from_numpy(np.ascontiguousarray(ddf)).float()


CLASSIC_BASELINES = {
    "identity": identity_ddf,
    "sitk_affine": sitk_affine,
    "sitk_bspline": sitk_bspline,
    "sitk_demons": sitk_demons,
    "ants_syn": ants_syn,
    "elastix": elastix_bspline,
}


# ----------------------------------------------------------------------------------------------------------
# MONAI VoxelMorph in the project's network interface
# ----------------------------------------------------------------------------------------------------------
class VoxelMorphRegistration(nn.Module):
    """MONAI ``VoxelMorph`` (diffeomorphic: scaling and squaring of the SVF) as a regnet_zoo network.

    ``forward(fixed, moving)`` -> ``{"ddf", "warped", "velocity"}``; inputs of any size are zero-padded to a
    multiple of ``2 ** depth`` (16 for the default U-Net) and the field is cropped back. ``warped`` is the
    moving image warped by ``ddf`` with the project's linear warp (border padding).
    """

    def __init__(self, spatial_dims: int = 3, integration_steps: int = 7, multiple: int = 16) -> None:
        super().__init__()
        from monai.networks.nets import VoxelMorph

        self.spatial_dims = spatial_dims
        self.multiple = multiple
        self.net = VoxelMorph(spatial_dims=spatial_dims, integration_steps=integration_steps, half_res=False)

    def _pad(self, x: Tensor) -> tuple[Tensor, list[slice]]:
        pads, crop = [], []
        for size in reversed(x.shape[2:]):
            total = -size % self.multiple
            pads += [total // 2, total - total // 2]
        for size in x.shape[2:]:
            total = -size % self.multiple
            crop.append(slice(total // 2, total // 2 + size))
        return F.pad(x, pads), crop

    def forward(self, fixed: Tensor, moving: Tensor) -> dict[str, Tensor]:
        fixed_p, crop = self._pad(fixed)
        moving_p, _ = self._pad(moving)
        x = self.net.backbone(torch.cat([moving_p, fixed_p], dim=1))
        velocity = x[(slice(None), slice(None), *crop)]
        ddf = self.net.dvf2ddf(x)[(slice(None), slice(None), *crop)] if self.net.diffeomorphic else velocity
        return {"ddf": ddf, "warped": warp_image(moving, ddf), "velocity": velocity}

    def transform_parameters(self, outputs: dict[str, Tensor]) -> Tensor:
        """The final DDF (instance optimisation adjusts it directly)."""
        return outputs["ddf"]

    def outputs_from_parameters(self, params: Tensor, fixed: Tensor, moving: Tensor) -> dict[str, Tensor]:
        return {"ddf": params, "warped": warp_image(moving, params)}


class VoxelMorphLoss(nn.Module):
    """VoxelMorph's unsupervised loss: ``similarity(warped, fixed) + weight * diffusion(ddf)``.

    ``similarity``: ``"lncc"`` (negative local squared NCC, window ``kernel_size``; VoxelMorph's CC setting,
    default weight 1) or ``"mse"`` (default weight 0.01, VoxelMorph's MSE setting). Returns ``loss``,
    ``similarity``, ``diffusion``.
    """

    def __init__(self, similarity: str = "lncc", weight: float | None = None, kernel_size: int = 9) -> None:
        super().__init__()
        if similarity not in ("lncc", "mse"):
            raise ValueError(f"similarity must be 'lncc' or 'mse', got {similarity!r}")
        self.similarity = similarity
        self.weight = (1.0 if similarity == "lncc" else 0.01) if weight is None else float(weight)
        self.kernel_size = kernel_size

    def forward(self, outputs: dict[str, Tensor], batch: dict[str, Tensor]) -> dict[str, Tensor]:
        warped, fixed = outputs["warped"], batch["fixed"]
        if self.similarity == "lncc":
            sim = lncc_loss(warped, fixed, kernel_size=self.kernel_size)
        else:
            sim = mse_loss(warped, fixed)
        reg = diffusion_loss(outputs["ddf"])
        return {"loss": sim + self.weight * reg, "similarity": sim, "diffusion": reg}
