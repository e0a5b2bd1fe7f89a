"""Inference-only rewrites of a trained network: batch norm folded into the convolution before it.

``fold_batch_norm(network)`` returns an eval-mode copy whose ``Conv -> BatchNorm`` pairs (adjacent in an
``nn.Sequential``) are replaced by one convolution with ``w' = w * g / sqrt(v + eps)`` and
``b' = (b - m) * g / sqrt(v + eps) + beta`` (``m``, ``v`` the running statistics): the same function in
eval mode with one pass over the feature map fewer. The original network is left untouched (it can still
be trained).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

__all__ = ["fold_conv_batch_norm", "fold_batch_norm"]

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


@torch.no_grad()
def fold_conv_batch_norm(conv: nn.Module, norm: nn.Module) -> nn.Module:
    """One convolution equal to ``norm(conv(x))`` in eval mode (running statistics)."""
    fused = copy.deepcopy(conv)
    scale = norm.weight / torch.sqrt(norm.running_var + norm.eps) if norm.affine else (
        1 / torch.sqrt(norm.running_var + norm.eps)
    )
    shift = norm.bias if norm.affine else torch.zeros_like(scale)
    fused.weight.copy_(conv.weight * scale.reshape(-1, *([1] * (conv.weight.ndim - 1))))
    bias = conv.bias if conv.bias is not None else torch.zeros_like(norm.running_mean)
    fused.bias = nn.Parameter((bias - norm.running_mean) * scale + shift)
    return fused


def _foldable(conv: nn.Module, norm: nn.Module) -> bool:
    return (
        isinstance(conv, _CONVS)
        and isinstance(norm, _NORMS)
        and norm.track_running_stats
        and norm.running_mean is not None
        and norm.num_features == conv.out_channels
    )


def fold_batch_norm(network: nn.Module) -> nn.Module:
    """Eval-mode copy of ``network`` with every ``Conv -> BatchNorm`` pair of an ``nn.Sequential`` folded
    into one convolution (the norm becomes ``nn.Identity``); ``network`` itself is not changed."""
    folded = copy.deepcopy(network).eval()
    for module in folded.modules():
        if not isinstance(module, nn.Sequential):
            continue
        names = list(module._modules)
        for first, second in zip(names, names[1:], strict=False):
            conv, norm = module._modules[first], module._modules[second]
            if _foldable(conv, norm):
                module._modules[first] = fold_conv_batch_norm(conv, norm)
                module._modules[second] = nn.Identity()
    return folded
