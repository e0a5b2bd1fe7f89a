"""Python API: register two images with any packaged method in physical space; evaluate displacement fields.

By concern: :mod:`~regnet_zoo.api.pipeline` (:func:`register` in named steps and its result),
:mod:`~regnet_zoo.api.fields` (physical-space warping, ITK displacement fields, reading DDFs),
:mod:`~regnet_zoo.api.inputs` (input checks), :mod:`~regnet_zoo.api.evaluation` (metrics of a field),
:mod:`~regnet_zoo.api.methods` (packaged methods, weights, networks), :mod:`~regnet_zoo.api.instance`
(instance optimisation). Geometry is :mod:`regnet_zoo.core.geometry`, preprocessing
:mod:`regnet_zoo.data.preprocess`.

The DDF conventions (README "Conventions"): ``ddf_voxel`` ``(N, *S)`` on the fixed grid in fixed voxel units,
``warped(x) = moving_on_fixed_grid(x + ddf(x))``; ``ddf_itk`` the same field in mm along ITK's LPS axes.
Landmarks are physical points (mm, ITK LPS), one per row, corresponding between fixed and moving.
"""

from __future__ import annotations

from regnet_zoo.api.evaluation import case_id, evaluate_ddf, label_metrics, metrics_to_json
from regnet_zoo.api.fields import ddf_from_itk, ddf_to_itk, load_ddf, warp_physical
from regnet_zoo.api.inputs import ImageLike, PointsLike, as_image, as_label, as_points, load_points
from regnet_zoo.api.instance import DEFAULT_INSTANCE_OPT_LR, instance_optimise, unsupervised_instance_loss
from regnet_zoo.api.methods import (
    bundle_preprocessing,
    check_method,
    load_method,
    packaged_methods,
    resolve_device,
    weights_path,
)
from regnet_zoo.api.pipeline import (
    IMAGE_FORMATS,
    OUTPUT_FILES,
    PairInputs,
    RegistrationResult,
    output_names,
    register,
)
from regnet_zoo.core.geometry import affine_of
from regnet_zoo.data.preprocess import DEFAULT_PAD_MULTIPLE
from regnet_zoo.data.transform_io import read_transform, transform_points, transform_points_file

__all__ = [
    "OUTPUT_FILES",
    "IMAGE_FORMATS",
    "output_names",
    "read_transform",
    "transform_points",
    "transform_points_file",
    "DEFAULT_PAD_MULTIPLE",
    "DEFAULT_INSTANCE_OPT_LR",
    "ImageLike",
    "PointsLike",
    "PairInputs",
    "RegistrationResult",
    "register",
    "load_method",
    "check_method",
    "packaged_methods",
    "weights_path",
    "resolve_device",
    "bundle_preprocessing",
    "warp_physical",
    "ddf_to_itk",
    "ddf_from_itk",
    "load_ddf",
    "evaluate_ddf",
    "label_metrics",
    "metrics_to_json",
    "case_id",
    "as_image",
    "as_label",
    "as_points",
    "load_points",
    "affine_of",
    "instance_optimise",
    "unsupervised_instance_loss",
]
