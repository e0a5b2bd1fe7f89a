"""core.padding.pad_to_multiple against numpy.pad."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from regnet_zoo.core.padding import pad_to_multiple, replicate_pad

NUMPY_MODE = {"constant": "constant", "replicate": "edge", "reflect": "reflect"}


@pytest.mark.parametrize("mode", sorted(NUMPY_MODE))
@pytest.mark.parametrize("centred", [False, True])
@pytest.mark.parametrize("shape,multiple", [((7, 10), 4), ((5, 6, 9), (2, 4, 8))])
def test_pad_to_multiple_matches_numpy(shape, multiple, centred, mode):
    x = torch.rand(2, 3, *shape, dtype=torch.float64)
    padded, index = pad_to_multiple(x, multiple, mode=mode, centred=centred)
    multiples = [multiple] * len(shape) if isinstance(multiple, int) else multiple
    widths = []
    for s, m in zip(shape, multiples, strict=True):
        total = (-s) % m
        before = total // 2 if centred else 0
        widths.append((before, total - before))
    expected = np.pad(x.numpy(), [(0, 0), (0, 0), *widths], mode=NUMPY_MODE[mode])
    np.testing.assert_array_equal(padded.numpy(), expected)
    assert all(p % m == 0 for p, m in zip(padded.shape[2:], multiples, strict=True))
    assert torch.equal(padded[index], x)


def test_pad_to_multiple_keeps_fitting_sizes_and_checks_arguments():
    x = torch.rand(1, 1, 8, 12)
    padded, index = pad_to_multiple(x, 4, centred=True)
    assert padded is x and torch.equal(x[index], x)
    with pytest.raises(ValueError, match="mode"):
        pad_to_multiple(x, 4, mode="circular-ish")
    with pytest.raises(ValueError, match="multiple"):
        pad_to_multiple(x, (4, 4, 4))


def test_replicate_pad_of_any_dimensions_matches_numpy_edge():
    x = torch.rand(2, 3, 4, 5, 6, dtype=torch.float64)  # e.g. (B, D, D, H, W): a 2D cost volume
    for dims, pad in (((1, 2), 2), ((3,), 1), ((1, 2, 3, 4), 3)):
        widths = [(pad, pad) if d in dims else (0, 0) for d in range(x.ndim)]
        np.testing.assert_array_equal(replicate_pad(x, dims, pad).numpy(), np.pad(x.numpy(), widths, "edge"))
    assert replicate_pad(x, (1,), 0) is x
