"""Input handling shared by every method network."""

from __future__ import annotations

from torch import Tensor

from regnet_zoo.errors import RegistrationInputError


def split_pair(
    fixed: Tensor, moving: Tensor | None, spatial_dims: int, in_channels: int
) -> tuple[Tensor, Tensor]:
    """The ``(fixed, moving)`` images of a network call, validated.

    ``moving=None`` means ``fixed`` holds both images stacked along channels, ``(B, 2C, *S)``: the
    single-input form that MONAI's tools (``ckpt_export``, ``verify_net_in_out``) call a network with.
    Raises ``RegistrationInputError`` unless both are ``(B, in_channels, *S)`` with ``spatial_dims`` axes.
    """
    if moving is None:
        if fixed.ndim != spatial_dims + 2 or fixed.shape[1] != 2 * in_channels:
            raise RegistrationInputError(
                f"a single input must stack fixed and moving along channels: (B, {2 * in_channels}, *S) with "
                f"{spatial_dims} spatial axes, got {tuple(fixed.shape)}"
            )
        fixed, moving = fixed[:, :in_channels], fixed[:, in_channels:]
    for name, image in (("fixed", fixed), ("moving", moving)):
        if image.ndim != spatial_dims + 2 or image.shape[1] != in_channels:
            raise RegistrationInputError(
                f"{name} image must be (B, {in_channels}, *S) with {spatial_dims} spatial axes, "
                f"got {tuple(image.shape)}"
            )
    if fixed.shape != moving.shape:
        raise RegistrationInputError(
            f"fixed {tuple(fixed.shape)} and moving {tuple(moving.shape)} images must have the same shape"
        )
    return fixed, moving
