"""Box filters and the LNCC loss on them against MONAI's own (``separable_filtering``,
``LocalNormalizedCrossCorrelationLoss``) called as a user calls them."""

from __future__ import annotations

import pytest
import torch
from monai.losses import LocalNormalizedCrossCorrelationLoss
from monai.networks.layers import separable_filtering

from regnet_zoo.core import _fast
from regnet_zoo.core.filters import box_mean, box_sum
from regnet_zoo.core.losses import lncc_loss

pytestmark = pytest.mark.skipif(not _fast.available(), reason="numba not importable: MONAI's filter runs")


@pytest.mark.parametrize("shape,k", [((2, 3, 9, 11, 13), 5), ((1, 2, 17, 6), 9), ((1, 1, 4, 30), 3)])
def test_box_sum_equals_monai_separable_filtering(shape, k):
    x = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    before = x.clone()
    ours = box_sum(x, k)
    ref = separable_filtering(x, [torch.ones(k, dtype=torch.float64)] * (len(shape) - 2))
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    assert torch.equal(x, before)  # the ping-pong buffers never alias the input


def test_box_filters_gradients_and_constants():
    x = torch.randn(1, 2, 6, 7, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: box_sum(t, 3), (x,))
    assert torch.autograd.gradcheck(lambda t: box_mean(t, 5), (x,))
    const = torch.full((1, 3, 8, 9, 10), 2.5)
    torch.testing.assert_close(box_mean(const, 5), const)  # border values extend the grid: no shrinking
    with pytest.raises(ValueError, match="odd"):
        box_sum(const, 4)


@pytest.mark.parametrize("shape,k", [((2, 1, 14, 12, 10), 5), ((1, 2, 30, 25), 9), ((1, 1, 12, 13, 11), 3)])
def test_lncc_equals_monai_value_and_gradients(shape, k):
    g = torch.Generator().manual_seed(1)
    a = torch.rand(shape, dtype=torch.float64, generator=g)
    b = 0.5 * a + 0.3 * torch.rand(shape, dtype=torch.float64, generator=g)
    a[..., :4] = 0.25  # a flat band: the variance clamp (MONAI's smooth_dr) is active there
    ours = [a.clone().requires_grad_(True), b.clone().requires_grad_(True)]
    ref = [a.clone().requires_grad_(True), b.clone().requires_grad_(True)]
    loss = lncc_loss(*ours, kernel_size=k)
    expected = LocalNormalizedCrossCorrelationLoss(spatial_dims=len(shape) - 2, kernel_size=k)(*ref)
    (2.0 * loss).backward()
    (2.0 * expected).backward()
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)
    for mine, theirs in zip(ours, ref, strict=True):
        torch.testing.assert_close(mine.grad, theirs.grad, rtol=1e-9, atol=1e-12)


def test_lncc_float32_and_one_sided_gradient():
    g = torch.Generator().manual_seed(2)
    a, b = torch.rand(1, 1, 16, 15, 14, generator=g), torch.rand(1, 1, 16, 15, 14, generator=g)
    warped = a.clone().requires_grad_(True)
    loss = lncc_loss(warped, b)
    loss.backward()
    with _fast.disabled():  # MONAI's loss
        ref_in = a.clone().requires_grad_(True)
        expected = lncc_loss(ref_in, b)
        expected.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(warped.grad, ref_in.grad, rtol=1e-4, atol=1e-8)
    with pytest.raises(ValueError, match="odd"):
        lncc_loss(a, b, kernel_size=4)
