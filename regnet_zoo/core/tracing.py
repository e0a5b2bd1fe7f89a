"""Shape arithmetic that stays dynamic under ``torch.jit.trace``, so a traced export runs at any input size.

While tracing, ``x.shape[i]`` is a 0-d tensor whose arithmetic is recorded; ``int()``, ``torch.tensor([...])``
of sizes and Python branches on sizes are frozen into the trace at the example's size instead. Eagerly these
helpers compute exactly what the plain Python expressions compute.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["as_size", "ceil_div", "size_max", "size_min", "size_tensor"]


def size_tensor(shape: Sequence[int | Tensor], device=None, dtype: torch.dtype = torch.float64) -> Tensor:
    """The sizes ``shape`` as a 1-D tensor ``(len(shape),)``; traced sizes stay traced values."""
    if torch.jit.is_tracing():
        return torch.stack([torch.as_tensor(n) for n in shape]).to(device=device, dtype=dtype)
    return torch.tensor([int(n) for n in shape], device=device, dtype=dtype)


def as_size(n: int | Tensor) -> int | Tensor:
    """``int(n)``, except that a traced size stays a traced value."""
    return n if isinstance(n, Tensor) else int(n)


def ceil_div(n: int | Tensor, d: int) -> int | Tensor:
    """``ceil(n / d)`` for a size ``n`` and a positive int ``d``: exact integer arithmetic, traced or not."""
    return -(-as_size(n) // d)


def size_max(n: int | Tensor, m: int | Tensor) -> int | Tensor:
    """``max(n, m)`` of sizes; with a traced size, a traced maximum (no branch frozen at trace time)."""
    if isinstance(n, Tensor) or isinstance(m, Tensor):
        return torch.maximum(torch.as_tensor(n), torch.as_tensor(m))
    return max(n, m)


def size_min(n: int | Tensor, m: int | Tensor) -> int | Tensor:
    """``min(n, m)`` of sizes; with a traced size, a traced minimum (no branch frozen at trace time)."""
    if isinstance(n, Tensor) or isinstance(m, Tensor):
        return torch.minimum(torch.as_tensor(n), torch.as_tensor(m))
    return min(n, m)
