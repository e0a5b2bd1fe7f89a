"""Integration of stationary velocity fields (SVF) into diffeomorphic displacement fields.

SVFs and DDFs are ``(B, N, *S)`` in voxel units (README "Conventions"). Scaling and squaring:
``phi = exp(v)`` is approximated by ``(id + v / 2**steps)`` composed with itself ``steps`` times.

Written here rather than using ``monai.networks.blocks.DVF2DDF``: that layer does the same recursion
(``ddf + warp(ddf, ddf)``) but pads with zeros, which makes the field collapse to 0 where a composition
samples beyond the grid; we sample with border padding instead (displacement held constant outside).
On CPU float tensors the whole recursion runs as one autograd node on the fused kernels of ``core._fast``
(same numbers and gradients as the chain of :func:`~regnet_zoo.core.spatial.compose_ddf` calls).
"""

from __future__ import annotations

from torch import Tensor, nn

from regnet_zoo.core import _fast
from regnet_zoo.core.spatial import compose_ddf

__all__ = ["scaling_and_squaring", "integrate_inverse", "ScalingAndSquaring"]


def scaling_and_squaring(svf: Tensor, steps: int = 7) -> Tensor:
    """DDF ``(B, N, *S)`` of ``exp(svf)``: ``svf / 2**steps``, then ``steps`` self-compositions.

    Compositions sample linearly with border padding. ``steps = 0`` returns ``svf`` itself
    (first-order approximation). Differentiable w.r.t. ``svf``.
    """
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    if svf.ndim - 2 not in (2, 3) or svf.shape[1] != svf.ndim - 2:
        raise ValueError(f"svf must be (B, N, *S) with N = len(S) in (2, 3), got shape {tuple(svf.shape)}")
    if steps > 0 and _fast.applies(svf, svf):
        return _fast.integrate(svf, steps)  # one autograd node, fused passes, reused buffers
    ddf = svf / (2**steps)
    for _ in range(steps):
        ddf = compose_ddf(ddf, ddf)
    return ddf


def integrate_inverse(svf: Tensor, steps: int = 7) -> Tensor:
    """DDF of the inverse transform ``exp(-svf)``, ``(B, N, *S)``: ``compose_ddf(fwd, inv) ≈ 0``."""
    return scaling_and_squaring(-svf, steps)


class ScalingAndSquaring(nn.Module):
    """``nn.Module`` around :func:`scaling_and_squaring`: ``forward(svf (B, N, *S)) -> ddf (B, N, *S)``."""

    def __init__(self, steps: int = 7) -> None:
        super().__init__()
        if steps < 0:
            raise ValueError(f"steps must be >= 0, got {steps}")
        self.steps = steps

    def forward(self, svf: Tensor) -> Tensor:
        return scaling_and_squaring(svf, self.steps)

    def inverse(self, svf: Tensor) -> Tensor:
        """DDF of ``exp(-svf)``."""
        return integrate_inverse(svf, self.steps)

    def extra_repr(self) -> str:
        return f"steps={self.steps}"
