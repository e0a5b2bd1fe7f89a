"""Input handling shared by every method network."""

from __future__ import annotations

from torch import Tensor, nn

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


class DDFOutput(nn.Module):
    """A registration network as MONAI's one-tensor tools see it: ``(B, 2C, *S)`` pair -> ``(B, N, *S)`` DDF.

    ``verify_net_in_out``, ``ckpt_export`` and MONAI Label's bundle tasks call a network with one tensor and
    expect one tensor back; the wrapped ``net(pair)`` returns a dict whose ``ddf`` is kept. The state dict is
    the wrapped network's (no prefix), so the bundle's ``models/model.pt`` loads into either.
    """

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self._register_state_dict_hook(DDFOutput._drop_prefix)
        self._register_load_state_dict_pre_hook(self._add_prefix)

    def forward(self, pair: Tensor) -> Tensor:
        return self.net(pair)["ddf"]

    @staticmethod
    def _drop_prefix(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> dict:
        inner = prefix + "net."
        for key in [k for k in state_dict if k.startswith(inner)]:
            state_dict[prefix + key[len(inner) :]] = state_dict.pop(key)
        return state_dict

    def _add_prefix(self, state_dict: dict, prefix: str, *args) -> None:  # load_state_dict pre-hook
        for key in [k for k in state_dict if k.startswith(prefix) and not k.startswith(prefix + "net.")]:
            state_dict[prefix + "net." + key[len(prefix) :]] = state_dict.pop(key)
