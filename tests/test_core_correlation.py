"""Correlation layer: equals a brute-force loop (2D/3D, both metrics, both paddings; the numba kernel used
without autograd on CPU and the chunked torch code), chunking, gradients."""

from __future__ import annotations

import itertools

import pytest
import torch

from regnet_zoo.core.correlation import (
    CorrelationVolume,
    correlation_volume,
    displaced_sum,
    displacement_set,
)


def _moving_at(moving: torch.Tensor, b: int, position: tuple[int, ...], padding_mode: str) -> torch.Tensor:
    """Feature vector of ``moving[b]`` at an integer position, outside the grid by the padding rule."""
    size = moving.shape[2:]
    inside = all(0 <= p < s for p, s in zip(position, size, strict=True))
    if not inside and padding_mode == "zeros":
        return torch.zeros(moving.shape[1], dtype=moving.dtype)
    clamped = tuple(min(max(p, 0), s - 1) for p, s in zip(position, size, strict=True))
    return moving[(b, slice(None), *clamped)]


def _brute_force_cost(fixed, moving, radius, metric, padding_mode, step=1):
    b, c, *size = fixed.shape
    offsets = list(itertools.product(range(-radius, radius + 1, step), repeat=len(size)))
    out = torch.zeros(b, len(offsets), *size, dtype=torch.float64)
    for bi in range(b):
        for li, d in enumerate(offsets):
            for x in itertools.product(*(range(s) for s in size)):
                f = fixed[(bi, slice(None), *x)].double()
                m = _moving_at(moving, bi, tuple(xi + di for xi, di in zip(x, d, strict=True)), padding_mode)
                m = m.double()
                out[(bi, li, *x)] = ((f - m) ** 2).sum() if metric == "ssd" else (f * m).sum() / c
    return out


def test_displacement_set_order_and_size():
    d = displacement_set(2, 2)
    assert d.shape == (25, 2) and d.dtype == torch.long
    # C order, axis 0 slowest: reshapes to a (5, 5) grid indexed by (d0, d1)
    grid = d.reshape(5, 5, 2)
    assert torch.equal(grid[:, 0, 0], torch.arange(-2, 3)) and torch.equal(grid[0, :, 1], torch.arange(-2, 3))
    assert torch.equal(d[12], torch.zeros(2, dtype=torch.long))
    d3 = displacement_set(4, 3, step=2)
    assert d3.shape == (125, 3) and set(d3.unique().tolist()) == {-4, -2, 0, 2, 4}
    with pytest.raises(ValueError):
        displacement_set(3, 2, step=2)


@pytest.mark.parametrize("path", ["fast", "torch"])
@pytest.mark.parametrize("metric", ["ssd", "dot"])
@pytest.mark.parametrize("padding_mode", ["zeros", "border"])
def test_matches_brute_force_2d(metric, padding_mode, path, kernel_path):
    fixed, moving = torch.randn(2, 3, 6, 7), torch.randn(2, 3, 6, 7)
    with kernel_path(path, "correlation"):
        cost = correlation_volume(fixed, moving, 2, metric=metric, padding_mode=padding_mode)
    assert cost.shape == (2, 25, 6, 7)
    ref = _brute_force_cost(fixed, moving, 2, metric, padding_mode)
    torch.testing.assert_close(cost.double(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("path", ["fast", "torch"])
@pytest.mark.parametrize("metric", ["ssd", "dot"])
def test_matches_brute_force_3d_and_dilated(metric, path, kernel_path):
    with kernel_path(path, "correlation"):
        _check_3d_and_dilated(metric)


def _check_3d_and_dilated(metric):
    fixed, moving = torch.randn(1, 2, 4, 5, 3), torch.randn(1, 2, 4, 5, 3)
    cost = correlation_volume(fixed, moving, 1, metric=metric, padding_mode="border", chunk_size=4)
    ref = _brute_force_cost(fixed, moving, 1, metric, "border")
    torch.testing.assert_close(cost.double(), ref, rtol=1e-5, atol=1e-5)
    dilated = correlation_volume(fixed, moving, 2, metric=metric, step=2)
    ref = _brute_force_cost(fixed, moving, 2, metric, "zeros", step=2)
    torch.testing.assert_close(dilated.double(), ref, rtol=1e-5, atol=1e-5)


def test_chunked_equals_unchunked_and_module():
    fixed, moving = torch.randn(1, 4, 6, 5, 7), torch.randn(1, 4, 6, 5, 7)
    whole = correlation_volume(fixed, moving, 2, chunk_size=125)
    for chunk in (1, 7, None):
        torch.testing.assert_close(correlation_volume(fixed, moving, 2, chunk_size=chunk), whole)
    torch.testing.assert_close(CorrelationVolume(2)(fixed, moving), whole)


def test_translation_minimum_at_true_offset():
    """A moving image that is the fixed one shifted by d has zero SSD exactly at offset d (interior)."""
    fixed = torch.randn(1, 2, 16, 16)
    shift = (2, -1)
    moving = torch.roll(fixed, shifts=shift, dims=(2, 3))  # moving(x + shift) = fixed(x)
    cost = correlation_volume(fixed, moving, 3)
    best = cost[0, :, 5:11, 5:11].argmin(0)
    offsets = displacement_set(3, 2)
    assert (offsets[best.flatten()] == torch.tensor(shift)).all()


@pytest.mark.parametrize("chunk", [None, 3])
def test_gradients_flow_and_match(chunk):
    fixed = torch.randn(1, 2, 5, 6, requires_grad=True)
    moving = torch.randn(1, 2, 5, 6, requires_grad=True)
    weights = torch.randn(1, 9, 5, 6)
    (correlation_volume(fixed, moving, 1, chunk_size=chunk) * weights).sum().backward()
    g_fixed, g_moving = fixed.grad.clone(), moving.grad.clone()
    fixed.grad = moving.grad = None
    (_brute_like(fixed, moving) * weights).sum().backward()  # autograd through an explicit roll version
    torch.testing.assert_close(g_fixed, fixed.grad)
    torch.testing.assert_close(g_moving, moving.grad)
    assert g_moving.abs().sum() > 0


def _brute_like(fixed, moving):
    """Radius-1 zero-padded SSD written with explicit padding/slicing per offset (independent path)."""
    padded = torch.nn.functional.pad(moving, (1, 1, 1, 1))
    h, w = fixed.shape[2:]
    out = [
        ((fixed - padded[..., 1 + a : 1 + a + h, 1 + b : 1 + b + w]) ** 2).sum(1)
        for a in (-1, 0, 1)
        for b in (-1, 0, 1)
    ]
    return torch.stack(out, 1)


@pytest.mark.parametrize("chunk", [None, 2])
def test_displaced_sum_brute_force(chunk):
    weights = torch.rand(2, 9, 4, 5, requires_grad=True)
    moving = torch.randn(2, 3, 4, 5)
    out = displaced_sum(weights, moving, 1, chunk_size=chunk)
    offsets = list(itertools.product(range(-1, 2), repeat=2))
    ref = torch.zeros(2, 3, 4, 5, dtype=torch.float64)
    for b in range(2):
        for i, j in itertools.product(range(4), range(5)):
            for li, (a, c) in enumerate(offsets):
                m = _moving_at(moving, b, (i + a, j + c), "border")
                ref[b, :, i, j] += weights[b, li, i, j].double() * m
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    out.sum().backward()
    assert weights.grad is not None and weights.grad.abs().sum() > 0


def test_bad_inputs():
    with pytest.raises(ValueError):
        correlation_volume(torch.randn(1, 2, 4, 4), torch.randn(1, 2, 4, 5), 1)
    with pytest.raises(ValueError):
        correlation_volume(torch.randn(1, 2, 4, 4), torch.randn(1, 2, 4, 4), 1, metric="ncc")
    with pytest.raises(ValueError):
        displaced_sum(torch.randn(1, 8, 4, 4), torch.randn(1, 2, 4, 4), 1)
