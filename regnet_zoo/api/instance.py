"""Instance optimisation: test-time refinement of a network's transform parameters on one pair."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from regnet_zoo.core.filters import box_mean
from regnet_zoo.core.losses import diffusion_loss, lncc_loss, mutual_information_loss, ngf_loss
from regnet_zoo.core.pyramid import downsample_ddf_to_level, pool_to_grid, upsample_ddf_from_level
from regnet_zoo.core.spatial import warp_image
from regnet_zoo.errors import RegistrationInputError

__all__ = [
    "DEFAULT_INSTANCE_OPT_LR",
    "INSTANCE_SIMILARITIES",
    "image_instance_loss",
    "unsupervised_instance_loss",
    "instance_optimise",
    "instance_schedule",
    "bundle_instance_loss",
    "INSTANCE_GRIDS",
    "DenseDisplacement",
    "refines_on_input_grid",
]

#: Adam step size of instance optimisation (unless the bundle's train config sets ``instance_opt_lr``);
#: Adam moves each parameter by about this much per step (voxels for displacements / velocities)
DEFAULT_INSTANCE_OPT_LR = 0.05


#: image similarities for instance optimisation on the pair alone. LNCC is squared local correlation, so it
#: holds across a contrast inversion (tests/test_instance.py: an inverted phantom pair, where DDR-Net's
#: MSE-based bundle loss fails); MI (global, Parzen) and NGF (edges, eps 0.1) are offered but did not help
#: on that pair
INSTANCE_SIMILARITIES = {"lncc": lncc_loss, "mi": mutual_information_loss, "ngf": ngf_loss}


def image_instance_loss(similarity: str = "lncc", smoothness: float = 0.1):
    """The objective ``similarity(warped, fixed) + smoothness * diffusion(ddf)`` on an image pair alone, with
    ``similarity`` one of :data:`INSTANCE_SIMILARITIES`: ``loss_fn(outputs, batch) -> dict``."""
    if similarity not in INSTANCE_SIMILARITIES:
        raise RegistrationInputError(
            f"instance similarity must be one of {sorted(INSTANCE_SIMILARITIES)}, got {similarity!r}"
        )
    measure = INSTANCE_SIMILARITIES[similarity]

    def loss_fn(outputs: dict[str, Tensor], batch: dict[str, Tensor]) -> dict[str, Tensor]:
        sim = measure(outputs["warped"], batch["fixed"])
        smooth = diffusion_loss(outputs["ddf"])
        return {"loss": sim + smoothness * smooth, "similarity": sim, "smoothness": smooth}

    loss_fn.__name__ = f"{similarity}_instance_loss"
    return loss_fn


#: fallback objective of instance optimisation for methods whose training loss needs supervision (RegNet's
#: needs the ground-truth field): ``LNCC(warped, fixed) + 0.1 * diffusion(ddf)``
unsupervised_instance_loss = image_instance_loss("lncc")


#: where ``register`` runs instance optimisation: ``"input"`` (default) on the fixed image's own grid when the
#: network works on a resampled grid (weights trained at a fixed ``image_size``: the shipped 3D ones work at
#: 48^3), else on the network's transform parameters; ``"network"`` always on the network's parameters
INSTANCE_GRIDS = ("input", "network")


def refines_on_input_grid(image_size: Sequence[int] | None, input_shape: Sequence[int], grid: str) -> bool:
    """Whether instance optimisation runs on the input grid: ``grid == "input"`` and the network's working
    grid ``image_size`` (None: the input's own) differs from ``input_shape``."""
    if grid not in INSTANCE_GRIDS:
        raise RegistrationInputError(f"instance grid must be one of {INSTANCE_GRIDS}, got {grid!r}")
    return grid == "input" and image_size is not None and tuple(image_size) != tuple(input_shape)


class _SmoothGradient(torch.autograd.Function):
    """Identity forward; the backward box-filters the gradient (:func:`box_mean`, side ``k``, ``passes``)."""

    @staticmethod
    def forward(ctx, x, k, passes):
        ctx.k, ctx.passes = k, passes
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        for _ in range(ctx.passes):
            grad = box_mean(grad, ctx.k)
        return grad, None, None


class DenseDisplacement(nn.Module):
    """Transform parameters that are a voxel DDF ``(B, N, *S)`` on any grid: what :func:`instance_optimise`
    refines when a network's own parameters live on a coarser grid than the images'. Its gradient is
    box-filtered (side ``smoothing``, ``passes`` times) so that Adam's per-voxel steps move neighbours
    together instead of folding the field; the start (e.g. the network's resized field) is kept exactly.
    ``outputs``: ``{"ddf", "warped"}``.
    """

    def __init__(self, smoothing: int = 5, passes: int = 2):
        super().__init__()
        self.smoothing, self.passes = int(smoothing), int(passes)

    def transform_parameters(self, outputs: dict[str, Tensor]) -> Tensor:
        return outputs["ddf"]

    def outputs_from_parameters(self, params: Tensor, fixed: Tensor, moving: Tensor) -> dict[str, Tensor]:
        ddf = params
        if params.requires_grad and self.smoothing > 1 and self.passes > 0:
            ddf = _SmoothGradient.apply(params, self.smoothing, self.passes)
        return {"ddf": ddf, "warped": warp_image(moving, ddf)}


def instance_optimise(
    network: nn.Module,
    loss_fn,
    outputs: dict[str, Tensor],
    fixed: Tensor,
    moving: Tensor,
    steps: int,
    lr: float,
    coarse_to_fine: bool = True,
) -> dict[str, Tensor]:
    """Adam on ``network.transform_parameters(outputs)`` minimising the bundle's loss for this pair.

    Coarse to fine (default) for dense parameters (a DDF or SVF ``(B, N, *S)`` on the image grid: PWC,
    RegNet, DDR-Net): most steps on images block-averaged by 4 (then 2), a fifth at full resolution
    (:func:`instance_schedule`); the parameters are pooled to each level (values in level voxels) and the
    level's update is upsampled and added. Parameters on a coarse grid already (B-spline control points,
    discrete-correlation displacements) are optimised at full resolution: there the pooled levels measured
    no faster and no more accurate (``benchmarks/speed_methods.py``; :func:`_level_outputs` still supports
    them). ``coarse_to_fine=False`` runs every step at full resolution.

    A loss that cannot work on an unlabelled pair (raises ``ValueError`` / ``KeyError`` for a missing batch
    entry) is replaced by :func:`unsupervised_instance_loss`, with a warning.
    """
    params = network.transform_parameters(outputs).detach().clone()
    shape = tuple(fixed.shape[2:])
    dense = tuple(params.shape[2:]) == shape
    schedule = instance_schedule(shape, steps) if coarse_to_fine and dense else [(1, steps)]
    for p in network.parameters():
        p.requires_grad_(False)
    state = {"loss_fn": loss_fn, "first": True}
    for factor, level_steps in schedule:
        if level_steps <= 0:
            continue
        fixed_l, moving_l = (pool_to_grid(image, factor) for image in (fixed, moving))
        start = downsample_ddf_to_level(params, factor) if dense and factor > 1 else params
        level_params = start.clone().requires_grad_(True)
        optimizer = torch.optim.Adam([level_params], lr=lr)
        batch = {"fixed": fixed_l, "moving": moving_l}
        for _ in range(level_steps):
            optimizer.zero_grad(set_to_none=True)
            new_outputs = _level_outputs(network, level_params, fixed_l, moving_l, shape, factor, dense)
            _loss(state, new_outputs, batch).backward()
            optimizer.step()
        level_params = level_params.detach()
        if dense and factor > 1:
            params = params + upsample_ddf_from_level(level_params - start, shape, factor)
        else:
            params = level_params
    with torch.no_grad():
        return network.outputs_from_parameters(params, fixed, moving)


def _loss(state: dict, outputs: dict[str, Tensor], batch: dict[str, Tensor]) -> Tensor:
    """The loss of one step; on the first step a bundle loss that needs labels falls back (with a warning)."""
    try:
        loss = state["loss_fn"](outputs, batch)["loss"]
    except (ValueError, KeyError) as err:
        if not state["first"] or state["loss_fn"] is unsupervised_instance_loss:
            raise
        warnings.warn(
            f"instance optimisation: the bundle loss needs more than an image pair ({err}); using "
            "LNCC + 0.1 * diffusion instead (set instance_opt_loss in the bundle's train.yaml)",
            stacklevel=4,
        )
        state["loss_fn"] = unsupervised_instance_loss
        loss = unsupervised_instance_loss(outputs, batch)["loss"]
    state["first"] = False
    return loss


def instance_schedule(shape: Sequence[int], steps: int, min_size: int = 16) -> list[tuple[int, int]]:
    """``[(factor, steps), ...]`` of the coarse-to-fine schedule, coarsest first, steps summing to ``steps``.

    The coarsest factor is 4 (2 where a grid pooled by 4 would have an axis under ``min_size`` voxels, 1
    where even 2 would); a fifth of the steps (at least one) run at full resolution, a quarter at factor 2
    when the coarsest is 4, the rest at the coarsest level. Under 4 steps: all at full resolution.
    The full-resolution steps set the time (8x a factor-2 step, 64x a factor-4 one); with a tenth of them
    PWC's Dice at 64^3 fell below the full-resolution loop's in a trial run, so a fifth stays (times and
    Dice against that loop: ``benchmarks/speed.py --section instance``).
    """
    factor = 1
    while factor < 4 and min(math.ceil(s / (2 * factor)) for s in shape) >= min_size:
        factor *= 2
    if factor == 1 or steps < 4:
        return [(1, steps)]
    full = max(1, steps // 5)
    if factor == 2:
        return [(2, steps - full), (1, full)]
    half = max(1, steps // 4)
    return [(4, steps - half - full), (2, half), (1, full)]


def _level_outputs(
    network: nn.Module,
    params: Tensor,
    fixed: Tensor,
    moving: Tensor,
    shape: tuple[int, ...],
    factor: int,
    dense: bool,
) -> dict[str, Tensor]:
    """The network's outputs for ``params`` against ``fixed`` / ``moving`` pooled by ``factor``.

    Dense parameters are on the pooled grid already. Coarser ones give their full-resolution (``shape``)
    field, pooled to the level; only ``ddf`` and ``warped`` are replaced, the other outputs are kept.
    """
    if dense or factor == 1:
        return network.outputs_from_parameters(params, fixed, moving)
    stub = fixed.new_zeros(fixed.shape[0], 1, *shape)  # only its shape is read: a one-channel warp of zeros
    outputs = dict(network.outputs_from_parameters(params, stub, stub))
    ddf = downsample_ddf_to_level(outputs["ddf"], factor)
    outputs.update(ddf=ddf, warped=warp_image(moving, ddf))
    return outputs


def bundle_instance_loss(method: str, spatial_dims: int, device: torch.device, similarity: str | None = None):
    """The instance-optimisation objective and Adam step size of a bundle: ``instance_opt_loss`` (else
    ``loss``) and ``instance_opt_lr`` (else :data:`DEFAULT_INSTANCE_OPT_LR`) of its ``train.yaml``; with
    ``similarity`` (:data:`INSTANCE_SIMILARITIES`) :func:`image_instance_loss` replaces the bundle's loss
    (e.g. ``"lncc"`` for a multi-modal pair, where a bundle's MSE-based loss misleads)."""
    from regnet_zoo.bundle import bundle_parser

    train_config = bundle_parser(method, "train", spatial_dims=spatial_dims)
    if similarity is not None:
        lr = train_config.get("instance_opt_lr")
        return image_instance_loss(similarity), float(lr) if lr is not None else DEFAULT_INSTANCE_OPT_LR
    loss_key = "instance_opt_loss" if train_config.get("instance_opt_loss") is not None else "loss"
    if train_config.get(loss_key) is None:
        raise RegistrationInputError(f"the {method} bundle's train.yaml defines no 'loss'")
    loss_fn = train_config.get_parsed_content(loss_key)
    lr = train_config.get("instance_opt_lr")
    lr = float(lr) if lr is not None else DEFAULT_INSTANCE_OPT_LR
    return (loss_fn.to(device) if isinstance(loss_fn, nn.Module) else loss_fn), lr
