"""Instance optimisation: test-time refinement of a network's transform parameters on one pair."""

from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn

from regnet_zoo.core.losses import diffusion_loss, lncc_loss
from regnet_zoo.errors import RegistrationInputError

__all__ = [
    "DEFAULT_INSTANCE_OPT_LR",
    "unsupervised_instance_loss",
    "instance_optimise",
    "bundle_instance_loss",
]

#: Adam step size of instance optimisation (unless the bundle's train config sets ``instance_opt_lr``);
#: Adam moves each parameter by about this much per step (voxels for displacements / velocities)
DEFAULT_INSTANCE_OPT_LR = 0.05


def unsupervised_instance_loss(outputs: dict[str, Tensor], batch: dict[str, Tensor]) -> dict[str, Tensor]:
    """Fallback objective of instance optimisation for methods whose training loss needs supervision
    (RegNet's needs the ground-truth field): ``LNCC(warped, fixed) + 0.1 * diffusion(ddf)``."""
    similarity = lncc_loss(outputs["warped"], batch["fixed"])
    smoothness = diffusion_loss(outputs["ddf"])
    return {"loss": similarity + 0.1 * smoothness, "similarity": similarity, "smoothness": smoothness}


def instance_optimise(
    network: nn.Module,
    loss_fn,
    outputs: dict[str, Tensor],
    fixed: Tensor,
    moving: Tensor,
    steps: int,
    lr: float,
) -> dict[str, Tensor]:
    """Adam on ``network.transform_parameters(outputs)`` minimising the bundle's loss for this pair.

    A loss that cannot work on an unlabelled pair (raises ``ValueError`` / ``KeyError`` for a missing batch
    entry) is replaced by :func:`unsupervised_instance_loss`, with a warning.
    """
    params = network.transform_parameters(outputs).detach().clone().requires_grad_(True)
    optimizer = torch.optim.Adam([params], lr=lr)
    batch = {"fixed": fixed, "moving": moving}
    for p in network.parameters():
        p.requires_grad_(False)
    for step in range(steps):
        optimizer.zero_grad(set_to_none=True)
        new_outputs = network.outputs_from_parameters(params, fixed, moving)
        try:
            loss = loss_fn(new_outputs, batch)["loss"]
        except (ValueError, KeyError) as err:
            if step > 0 or loss_fn is unsupervised_instance_loss:
                raise
            warnings.warn(
                f"instance optimisation: the bundle loss needs more than an image pair ({err}); using "
                "LNCC + 0.1 * diffusion instead (set instance_opt_loss in the bundle's train.yaml)",
                stacklevel=3,
            )
            loss_fn = unsupervised_instance_loss
            loss = loss_fn(new_outputs, batch)["loss"]
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        return network.outputs_from_parameters(params.detach(), fixed, moving)




def bundle_instance_loss(method: str, spatial_dims: int, device: torch.device):
    """The instance-optimisation objective and Adam step size of a bundle: ``instance_opt_loss`` (else
    ``loss``) and ``instance_opt_lr`` (else :data:`DEFAULT_INSTANCE_OPT_LR`) of its ``train.yaml``."""
    from regnet_zoo.bundle import bundle_parser

    train_config = bundle_parser(method, "train", spatial_dims=spatial_dims)
    loss_key = "instance_opt_loss" if train_config.get("instance_opt_loss") is not None else "loss"
    if train_config.get(loss_key) is None:
        raise RegistrationInputError(f"the {method} bundle's train.yaml defines no 'loss'")
    loss_fn = train_config.get_parsed_content(loss_key)
    lr = train_config.get("instance_opt_lr")
    lr = float(lr) if lr is not None else DEFAULT_INSTANCE_OPT_LR
    return (loss_fn.to(device) if isinstance(loss_fn, nn.Module) else loss_fn), lr
