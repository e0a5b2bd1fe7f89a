"""Padding images and fields to a size the networks need (multiples of their total stride), and back."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["pad_to_multiple", "replicate_pad"]

_MODES = ("constant", "replicate", "reflect")


def pad_to_multiple(
    x: Tensor, multiple: int | Sequence[int], mode: str = "constant", centred: bool = False
) -> tuple[Tensor, tuple[slice, ...]]:
    """Pad the spatial axes of ``x`` ``(B, C, *S)`` to multiples of ``multiple`` (an int or one per axis).

    Args:
        mode: ``"constant"`` (zeros), ``"replicate"`` or ``"reflect"`` (``F.pad`` modes).
        centred: split the padding between both ends (the extra voxel at the end); otherwise pad at the end
            only, so that voxel ``i`` keeps index ``i`` (feature positions stay ``stride * index``).

    Returns:
        the padded tensor and the index ``(slice(None), slice(None), *spatial)``: ``padded[index]`` is ``x``.
    """
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
    sizes = tuple(x.shape[2:])
    multiples = [int(multiple)] * len(sizes) if isinstance(multiple, int) else [int(m) for m in multiple]
    if len(multiples) != len(sizes) or min(multiples) < 1:
        raise ValueError(f"multiple must be a positive int or one per spatial axis {sizes}, got {multiple}")
    before, after = [], []
    for size, m in zip(sizes, multiples, strict=True):
        total = (-size) % m
        before.append(total // 2 if centred else 0)
        after.append(total - before[-1])
    index = (slice(None), slice(None)) + tuple(slice(b, b + s) for b, s in zip(before, sizes, strict=True))
    # (traced sizes: always pad, possibly by 0, so that an export pads whatever size it is given)
    if not torch.jit.is_tracing() and not any(before) and not any(after):
        return x, index
    # F.pad lists the last axis first
    flat = [p for b, a in zip(reversed(before), reversed(after), strict=True) for p in (b, a)]
    return F.pad(x, flat, mode=mode), index


def replicate_pad(x: Tensor, dims: Sequence[int], pad: int) -> Tensor:
    """Repeat the first and last slice of ``x`` ``pad`` times along each of the tensor dimensions ``dims``.

    Any dimensions of any tensor (``F.pad`` replicates only the trailing 2 or 3 axes of 4D / 5D tensors):
    e.g. the displacement axes of a ``(B, *D, *S)`` cost volume.
    """
    if pad == 0:
        return x
    for dim in dims:
        repeat = [pad if d == dim else -1 for d in range(x.ndim)]
        first, last = x.narrow(dim, 0, 1).expand(*repeat), x.narrow(dim, x.shape[dim] - 1, 1).expand(*repeat)
        x = torch.cat([first, x, last], dim=dim)
    return x
