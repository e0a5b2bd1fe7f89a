"""The contract every method network satisfies (README "Conventions"), written once as a Protocol."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from torch import Tensor

__all__ = ["REQUIRED_OUTPUT_KEYS", "RegistrationNetwork"]

#: keys every network's ``forward`` output holds
REQUIRED_OUTPUT_KEYS = ("ddf", "warped")


@runtime_checkable
class RegistrationNetwork(Protocol):
    """What the engines, the API and the bundles rely on in a method network (all five satisfy it).

    - ``forward(fixed, moving)``: images ``(B, in_channels, *S)`` with ``spatial_dims`` axes -> a dict holding
      at least ``"ddf"`` ``(B, spatial_dims, *S)`` (voxel units, channel ``i`` along array axis ``i``,
      ``warped(x) = moving(x + ddf(x))``) and ``"warped"`` ``(B, in_channels, *S)``; method-specific keys
      may follow. ``forward(pair)`` with one ``(B, 2 * in_channels, *S)`` tensor is accepted too
      (:func:`regnet_zoo.networks.pair.split_pair`).
    - ``transform_parameters(outputs)``: the tensor that parametrises the transform (a dense field, an SVF,
      control points, a coarse field): what instance optimisation adjusts.
    - ``outputs_from_parameters(params, fixed, moving)``: the outputs (at least ``"ddf"`` and ``"warped"``)
      of those parameters; ``outputs_from_parameters(transform_parameters(forward(f, m)), f, m)["ddf"]``
      is ``forward(f, m)["ddf"]`` in evaluation mode.

    ``isinstance(net, RegistrationNetwork)`` checks that the members exist (not their signatures).
    """

    spatial_dims: int
    in_channels: int

    def forward(self, fixed: Tensor, moving: Tensor | None = None) -> dict[str, Tensor]: ...

    def transform_parameters(self, outputs: dict[str, Tensor]) -> Tensor: ...

    def outputs_from_parameters(self, params: Tensor, fixed: Tensor, moving: Tensor) -> dict[str, Tensor]: ...
