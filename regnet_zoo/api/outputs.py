"""What ``register`` writes besides images: the inverse, ITK transform files, the report picture.

- :func:`inverse_from_outputs`: the inverse voxel DDF on the fixed grid: exact for a method whose network
  returns a stationary velocity field (``outputs["velocity"]``, DDR-Net: ``exp(-v)``), by fixed-point
  iteration for the others (:mod:`regnet_zoo.core.inverse`); both end with the fixed-point iteration against
  the field actually used, so that the inverse-consistency error measures the written pair.
- :func:`transforms`: the forward transform (fixed -> moving points, ITK LPS; what
  ``sitk.Resample(moving, fixed, t)`` takes) and its inverse as ITK ``CompositeTransform`` objects
  (:mod:`regnet_zoo.data.transform_io`).
- :func:`fixed_on_moving_grid`: the fixed image warped onto the moving grid by the inverse.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import SimpleITK as sitk
import torch
from monai.data import MetaTensor
from torch import Tensor, nn

from regnet_zoo.api.fields import ddf_from_itk, ddf_to_itk, warp_physical
from regnet_zoo.core.geometry import affine_of
from regnet_zoo.core.inverse import invert_ddf, invert_svf
from regnet_zoo.core.spatial import resize_ddf
from regnet_zoo.data.transform_io import (
    compose,
    displacement_transform,
    reference_image,
    transform_to_displacement,
)

__all__ = ["inverse_from_outputs", "transforms", "fixed_on_moving_grid", "INVERSE_ITERATIONS"]

#: fixed-point iterations of the inverse (stops earlier at 1e-3 voxel)
INVERSE_ITERATIONS = 100


def inverse_from_outputs(
    network: nn.Module,
    outputs: dict[str, Tensor],
    crop: tuple[slice, ...],
    fixed_shape: Sequence[int],
    ddf: Tensor,
) -> tuple[Tensor, str]:
    """Inverse voxel DDF ``(N, *S)`` of ``ddf`` ``(N, *S)`` (fixed grid) and how it was found.

    ``outputs``: the network's outputs on its working grid, ``crop`` the slices that crop them back (as for
    ``outputs["ddf"]``). Returns ``(inverse, "svf" | "fixed_point")``.
    """
    initial, method = None, "fixed_point"
    velocity = outputs.get("velocity")
    if velocity is not None:  # an SVF method: phi^-1 = exp(-v), integrated as the forward field was
        steps = int(getattr(network, "integration_steps", 7))
        initial = invert_svf(velocity.detach().float(), steps)[crop]
        if tuple(initial.shape[2:]) != tuple(fixed_shape):
            initial = resize_ddf(initial, fixed_shape)
        initial, method = initial[0].to(ddf.device), "svf"
    inverse = invert_ddf(
        ddf[None], INVERSE_ITERATIONS, 1e-3, None if initial is None else initial[None]
    )[0]
    return inverse, method


def transforms(
    ddf: Tensor, inverse: Tensor | None, fixed_affine: np.ndarray, matrix: np.ndarray | None = None
) -> tuple[sitk.CompositeTransform, sitk.CompositeTransform | None]:
    """ITK composites of the registration (fixed -> moving points) and of its inverse (moving -> fixed).

    ``ddf``, ``inverse``: the deformable part and its inverse, voxel DDFs ``(N, *S)`` on the fixed grid;
    ``matrix``: the affine stage ``T`` (4x4 physical RAS, fixed -> moving point; None: none). The forward
    map is ``x -> T(x + d(x))`` (the deformable field first), the inverse ``y -> z + d^-1(z)``,
    ``z = T^-1 y``.
    """
    from regnet_zoo.api.pipeline import itk_affine_transform

    n = ddf.shape[0]
    affine = None if matrix is None else itk_affine_transform(matrix, n)
    forward = compose([displacement_transform(ddf_to_itk(ddf, fixed_affine)), affine])
    backward = None
    if inverse is not None:
        inverse_affine = None if matrix is None else itk_affine_transform(np.linalg.inv(matrix), n)
        backward = compose([inverse_affine, displacement_transform(ddf_to_itk(inverse, fixed_affine))])
    return forward, backward


def fixed_on_moving_grid(
    fixed: MetaTensor, moving: MetaTensor, inverse_transform: sitk.Transform, nearest: bool = False
) -> MetaTensor:
    """``fixed`` ``(C, *S)`` warped onto the moving grid by the inverse transform (moving -> fixed points)
    -> ``(C, *S_m)`` with the moving affine (linear, or nearest neighbour for labels)."""
    moving_affine = affine_of(moving)
    moving_shape = tuple(moving.shape[1:])
    field = transform_to_displacement(inverse_transform, reference_image(moving_affine, moving_shape))
    ddf = ddf_from_itk(field)  # voxels of the moving grid
    warped = warp_physical(fixed, moving_affine, moving_shape, ddf.to(torch.float32), nearest=nearest)
    return MetaTensor(warped, affine=torch.as_tensor(moving_affine))
