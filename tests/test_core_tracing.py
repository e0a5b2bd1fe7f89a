"""``regnet_zoo.core.tracing``: eagerly plain Python size arithmetic; traced, arithmetic on the shape."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from regnet_zoo.core.tracing import as_size, ceil_div, size_max, size_min, size_tensor


@pytest.mark.parametrize("n", [1, 2, 7, 16, 33])
@pytest.mark.parametrize("d", [1, 2, 3, 16])
def test_eager_values_are_the_python_ones(n, d):
    assert ceil_div(n, d) == math.ceil(n / d) and isinstance(ceil_div(n, d), int)
    assert size_max(n, d) == max(n, d) and size_min(n, d) == min(n, d)
    assert as_size(torch.tensor(n).item()) == n
    sizes = size_tensor((n, d), dtype=torch.float32)
    assert sizes.dtype == torch.float32 and sizes.tolist() == [n, d]


def _shape_arithmetic(x: torch.Tensor) -> torch.Tensor:
    """Everything the helpers offer, as a network uses it on the input's spatial shape."""
    h, w = x.shape[2:]
    grid = torch.arange(as_size(ceil_div(h, 4)), dtype=x.dtype)  # a coarse axis of ceil(h / 4) points
    scale = size_tensor((h, w), dtype=x.dtype)
    bounds = torch.stack([torch.as_tensor(size_max(h, 10)), torch.as_tensor(size_min(w, 10))]).to(x.dtype)
    return torch.cat([grid, scale, bounds])


def test_traced_sizes_follow_the_input():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's deprecation notice
        traced = torch.jit.trace(_shape_arithmetic, torch.zeros(1, 1, 8, 12))
    # another size, on the other side of each max/min threshold: nothing of the example's size is kept
    for shape in ((1, 1, 8, 12), (2, 1, 13, 5)):
        x = torch.zeros(shape)
        torch.testing.assert_close(traced(x), _shape_arithmetic(x), rtol=0, atol=0)
