"""Fast CPU kernels (core._fast) against the plain-torch reference (grid_sample) and MONAI's Warp / DVF2DDF.

The reference is the same public function with the fast path switched off (``_fast.disabled()``), i.e.
``torch.nn.functional.grid_sample(align_corners=True)`` on a normalised grid.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from regnet_zoo.core import _fast
from regnet_zoo.core.integration import scaling_and_squaring
from regnet_zoo.core.spatial import compose_ddf, identity_grid, sample_image, warp_image, warp_labels

needs_numba = pytest.mark.skipif(_fast.numba is None, reason="numba not installed")
SHAPES = [(40, 48), (20, 20, 20)]
MODES = ["linear", "nearest"]
PADDINGS = ["border", "zeros"]


def _smooth(shape, channels, scale, seed, dtype=torch.float32):
    """Smooth random field ``(1, channels, *shape)``: coarse noise upsampled (values of size ``scale``)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(1, channels, *[4] * len(shape), generator=g, dtype=torch.float64) * scale
    mode = "bilinear" if len(shape) == 2 else "trilinear"
    return F.interpolate(coarse, size=shape, mode=mode, align_corners=True).to(dtype)


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def _reference(fn, *args, **kwargs):
    with _fast.disabled():
        return fn(*args, **kwargs)


def _grads(fn, *inputs, seed=1):
    inputs = [x.detach().clone().requires_grad_(True) for x in inputs]
    out = fn(*inputs)
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(out.shape, generator=generator, dtype=out.dtype).to(out.device)
    (out * weight).sum().backward()
    return out.detach(), [x.grad for x in inputs]


@needs_numba
def test_fast_path_is_taken_on_cpu_float_only(monkeypatch):
    calls = []
    original = _fast._Call.forward
    monkeypatch.setattr(_fast._Call, "forward", lambda self, *a: calls.append(1) or original(self, *a))
    image, ddf = torch.rand(1, 1, 6, 7), torch.rand(1, 2, 6, 7)
    warp_image(image, ddf)
    assert len(calls) == 1
    warp_image(image, ddf, mode="cubic")  # cubic B-spline stays on the reference code
    warp_image(image.bfloat16(), ddf.bfloat16())  # unsupported dtype
    with _fast.disabled():
        warp_image(image, ddf)
    monkeypatch.setenv("REGNET_ZOO_FAST", "0")
    warp_image(image, ddf)
    assert len(calls) == 1


@needs_numba
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("padding", PADDINGS)
def test_warp_matches_reference_float32_and_float64(shape, mode, padding):
    n = len(shape)
    image = _smooth(shape, 2, 1.0, 0) + 3.0
    ddf = _smooth(shape, n, 4.0, 1)  # a few voxels, reaching beyond the border
    out = warp_image(image, ddf, mode, padding)
    ref = _reference(warp_image, image, ddf, mode, padding)
    if mode == "linear":
        assert _rel(out, ref) <= 1e-5
    else:  # float32 coordinate round-off of the reference's normalised grid can flip a rounding tie
        assert (out != ref).float().mean().item() < 1e-3
    # float64: the reference's normalisation round-off is ~1e-14
    out64 = warp_image(image.double(), ddf.double(), mode, padding)
    ref64 = _reference(warp_image, image.double(), ddf.double(), mode, padding)
    assert _rel(out64, ref64) <= 1e-12
    if padding == "zeros":
        assert (ref64 == 0).any()  # the test does reach outside the grid


@needs_numba
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("padding", PADDINGS)
def test_gradients_match_reference(shape, mode, padding):
    n = len(shape)
    image = _smooth(shape, 2, 1.0, 2, torch.float64)
    ddf = _smooth(shape, n, 4.0, 3, torch.float64)
    fn = lambda i, d: warp_image(i, d, mode, padding)  # noqa: E731
    out, (g_img, g_ddf) = _grads(fn, image, ddf)
    ref, (r_img, r_ddf) = _reference(_grads, fn, image, ddf)
    assert _rel(g_img, r_img) <= 1e-12
    if mode == "linear":
        assert _rel(g_ddf, r_ddf) <= 1e-10 and r_ddf.abs().max() > 0
    else:
        assert g_ddf.abs().max() == 0 and r_ddf.abs().max() == 0
    # float32: equal to 1e-5 of the largest gradient
    out32, (g_img32, g_ddf32) = _grads(fn, image.float(), ddf.float())
    ref32, (r_img32, r_ddf32) = _reference(_grads, fn, image.float(), ddf.float())
    assert _rel(g_img32, r_img32) <= 1e-5
    if mode == "linear":
        assert _rel(g_ddf32, r_ddf32) <= 1e-5


@needs_numba
@pytest.mark.parametrize("shape", [(5, 6), (4, 5, 3)])
@pytest.mark.parametrize("padding", PADDINGS)
def test_gradcheck(shape, padding):
    n = len(shape)
    image = torch.rand(2, 2, *shape, dtype=torch.float64, requires_grad=True)
    # offsets kept away from integers, where the linear interpolant has a kink
    ddf = (torch.rand(1, n, *shape, dtype=torch.float64) * 3 - 1.5 + 0.013).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda i, d: warp_image(i, d, "linear", padding), (image, ddf))
    assert torch.autograd.gradcheck(lambda d: compose_ddf(d, 0.5 * d), (ddf,))
    svf = (0.5 * ddf).detach().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda v: scaling_and_squaring(v, 3), (svf,))


@needs_numba
@pytest.mark.parametrize("shape", SHAPES)
def test_compose_and_scaling_and_squaring_match_reference(shape):
    n = len(shape)
    first, second = _smooth(shape, n, 3.0, 4), _smooth(shape, n, 3.0, 5)
    assert _rel(compose_ddf(first, second), _reference(compose_ddf, first, second)) <= 1e-5
    out, (g,) = _grads(lambda v: scaling_and_squaring(v, 7), first)
    ref, (r,) = _reference(_grads, lambda v: scaling_and_squaring(v, 7), first)
    assert _rel(out, ref) <= 1e-5 and _rel(g, r) <= 1e-5


@needs_numba
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("padding", PADDINGS)
def test_warp_labels_nearest_and_onehot_match_reference(shape, padding):
    n = len(shape)
    labels = (_smooth(shape, 1, 3.0, 6) * 2).round().long() + 4
    ddf = _smooth(shape, n, 4.0, 7, torch.float64)
    for method in ("nearest", "onehot"):
        out = warp_labels(labels, ddf, method=method, padding_mode=padding)
        assert torch.equal(out, _reference(warp_labels, labels, ddf, method=method, padding_mode=padding))


@needs_numba
def test_sample_image_broadcasting_other_grids_size_one_axes_and_ties():
    image = _smooth((9, 17), 3, 1.0, 8, torch.float64)
    coords = identity_grid((5, 4), dtype=torch.float64).repeat(2, 1, 1, 1) * 2.3 - 1.0  # (2, 2, 5, 4)
    for mode in MODES:
        for padding in PADDINGS:
            out = sample_image(image, coords, mode, padding)
            assert out.shape == (2, 3, 5, 4)
            assert _rel(out, _reference(sample_image, image, coords, mode, padding)) <= 1e-12
    # rounding ties: 2 / (17 - 1) and 2 / (9 - 1) are exact, so the reference sees the same .5 coordinates
    ties = torch.stack(torch.meshgrid(torch.arange(9.0) - 0.5, torch.arange(17.0) - 0.5, indexing="ij"))[None]
    for padding in PADDINGS:
        out = sample_image(image, ties.double(), "nearest", padding)
        assert torch.equal(out, _reference(sample_image, image, ties.double(), "nearest", padding))
    # an axis of size 1 (grid_sample maps every coordinate on it to index 0)
    flat = torch.rand(1, 1, 1, 12, dtype=torch.float64)
    ddf = torch.rand(1, 2, 1, 12, dtype=torch.float64) * 4 - 2
    for padding in PADDINGS:
        fn = lambda i, d, p=padding: warp_image(i, d, "linear", p)  # noqa: E731
        out, (gi, gd) = _grads(fn, flat, ddf)
        ref, (ri, rd) = _reference(_grads, fn, flat, ddf)
        assert _rel(out, ref) <= 1e-12 and _rel(gi, ri) <= 1e-12 and torch.allclose(gd, rd, atol=1e-12)


def test_fallback_without_numba_gives_reference_numbers(monkeypatch):
    shape = (12, 13, 14)
    image, ddf = _smooth(shape, 1, 1.0, 9, torch.float64), _smooth(shape, 3, 3.0, 10, torch.float64)
    expected = _reference(warp_image, image, ddf)
    monkeypatch.setattr(_fast, "numba", None)
    assert not _fast.available()
    assert torch.equal(warp_image(image, ddf), expected)
    monkeypatch.undo()
    monkeypatch.setenv("REGNET_ZOO_FAST", "0")
    assert not _fast.available()
    assert torch.equal(warp_image(image, ddf), expected)


@needs_numba
@pytest.mark.parametrize("shape", SHAPES)
def test_agrees_with_monai_warp_and_dvf2ddf(shape):
    """Same conventions: MONAI's ``ddf`` is ``(B, N, *S)`` in voxels, channel i = array axis i, corners
    aligned (``align_corners=True``).

    ``Warp(mode="bilinear"|"nearest", padding_mode=p)(image, ddf)`` = ``warp_image(image, ddf, mode, p)``;
    ``DVF2DDF(steps, "bilinear", "border")(svf)`` = ``scaling_and_squaring(svf, steps)`` (MONAI's default
    padding ``"zeros"`` differs from ours near the border).
    """
    monai_blocks = pytest.importorskip("monai.networks.blocks")
    n = len(shape)
    image = _smooth(shape, 1, 1.0, 11) + 2.0
    ddf = _smooth(shape, n, 4.0, 12)
    for mode, monai_mode in (("linear", "bilinear"), ("nearest", "nearest")):
        for padding in PADDINGS:
            ours = warp_image(image, ddf, mode, padding)
            theirs = monai_blocks.Warp(monai_mode, padding)(image, ddf)
            if mode == "linear":
                assert _rel(ours, theirs) <= 1e-5
            else:
                assert (ours != theirs).float().mean().item() < 1e-3
    svf = _smooth(shape, n, 3.0, 13)
    theirs = monai_blocks.DVF2DDF(7, "bilinear", "border")(svf)
    assert _rel(scaling_and_squaring(svf, 7), theirs) <= 1e-5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")
@pytest.mark.parametrize("shape", SHAPES)
def test_gpu_reference_path_matches_cpu(shape):
    n = len(shape)
    image, ddf = _smooth(shape, 1, 1.0, 14, torch.float64), _smooth(shape, n, 4.0, 15, torch.float64)
    for padding in PADDINGS:
        fn = lambda i, d, p=padding: warp_image(i, d, "linear", p)  # noqa: E731
        cpu, (gi, gd) = _grads(fn, image, ddf)
        gpu, (hi, hd) = _grads(fn, image.cuda(), ddf.cuda())
        assert _rel(gpu.cpu(), cpu) <= 1e-10 and _rel(hi.cpu(), gi) <= 1e-10 and _rel(hd.cpu(), gd) <= 1e-10
    out, (g,) = _grads(lambda v: scaling_and_squaring(v, 7), ddf)
    out_gpu, (h,) = _grads(lambda v: scaling_and_squaring(v, 7), ddf.cuda())
    assert _rel(out_gpu.cpu(), out) <= 1e-10 and _rel(h.cpu(), g) <= 1e-10


def _warp_sum(image, ddf, queue):
    queue.put(float(warp_image(image, ddf).sum()))


@needs_numba
def test_threads_and_forked_workers_after_use():
    """Concurrent calls from threads (serialised launches) and a forked worker (data loaders) both work."""
    import multiprocessing
    import threading

    image, ddf = _smooth((16, 16, 16), 1, 1.0, 16), _smooth((16, 16, 16), 3, 3.0, 17)
    expected = float(_reference(warp_image, image, ddf).sum())
    results = []

    def work():
        results.append(float(warp_image(image, ddf).sum()))

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == pytest.approx([expected] * 4, rel=1e-5)
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    worker = context.Process(target=_warp_sum, args=(image, ddf, queue))
    worker.start()
    worker.join(60)
    assert worker.exitcode == 0 and queue.get(timeout=5) == pytest.approx(expected, rel=1e-5)


@needs_numba
@pytest.mark.parametrize("shape", [(11, 13), (7, 9, 10)])
def test_gradients_broadcast_many_channels_and_far_outside_match_reference(shape):
    """Batch broadcasting both ways, more than 3 channels (chunked kernels) and coordinates far outside the
    grid (the backward's scatter windows are clipped), float64, against ``grid_sample``."""
    n = len(shape)
    for padding in PADDINGS:
        for bi, bp in ((1, 2), (2, 1), (2, 2)):
            image = torch.cat([_smooth(shape, 5, 1.0, 20 + b, torch.float64) for b in range(bi)])
            ddf = torch.cat([_smooth(shape, n, 9.0, 30 + b, torch.float64) for b in range(bp)])
            fn = lambda i, d, p=padding: warp_image(i, d, "linear", p)  # noqa: E731
            out, (gi, gd) = _grads(fn, image, ddf)
            ref, (ri, rd) = _reference(_grads, fn, image, ddf)
            assert out.shape == (2, 5, *shape)
            assert _rel(out, ref) <= 1e-12 and _rel(gi, ri) <= 1e-12 and _rel(gd, rd) <= 1e-10
        near = lambda i, d, p=padding: warp_image(i, d, "nearest", p)  # noqa: E731
        out, (gi, gd) = _grads(near, image, ddf)
        ref, (ri, rd) = _reference(_grads, near, image, ddf)
        assert _rel(gi, ri) <= 1e-12 and gd.abs().max() == 0


@needs_numba
@pytest.mark.parametrize("shape", SHAPES)
def test_integration_node_matches_reference_float64_batched(shape):
    """Scaling and squaring as one autograd node (and its buffer-reusing no-grad path) against the chain of
    plain-torch compositions: values and gradients, two different fields in a batch."""
    n = len(shape)
    svf = torch.cat([_smooth(shape, n, 6.0, 40, torch.float64), _smooth(shape, n, 2.0, 41, torch.float64)])
    fn = lambda v: scaling_and_squaring(v, 5)  # noqa: E731
    out, (g,) = _grads(fn, svf)
    ref, (r,) = _reference(_grads, fn, svf)
    assert _rel(out, ref) <= 1e-12 and _rel(g, r) <= 1e-10
    strided = svf.transpose(-1, -2).contiguous().transpose(-1, -2)  # same values, not C-contiguous
    with torch.no_grad():
        assert torch.equal(scaling_and_squaring(svf, 5), out)
        assert torch.equal(scaling_and_squaring(strided, 5), out)
    first, second = _smooth(shape, n, 3.0, 42, torch.float64), _smooth(shape, n, 3.0, 43, torch.float64)
    out, grads = _grads(compose_ddf, first, second)
    ref, refs = _reference(_grads, compose_ddf, first, second)
    assert _rel(out, ref) <= 1e-12 and all(_rel(a, b) <= 1e-10 for a, b in zip(grads, refs, strict=True))


@needs_numba
@pytest.mark.parametrize("threads", [1, 2])
def test_image_gradient_direct_and_buffered_scatter_agree_with_reference(monkeypatch, threads):
    """The image gradient is scattered straight into the result when the slabs' windows allow it (small
    displacements), else through private buffers and a reduction (large ones with several workers, or one
    image broadcast over a batch of fields): both against ``grid_sample`` in float64, for warping,
    composition and scaling and squaring."""
    paths = []
    real = _fast._reduce
    monkeypatch.setattr(_fast, "_reduce", lambda *a: paths.append("buffered") or real(*a))
    torch.set_num_threads(threads)  # restored by conftest's autouse fixture
    for shape in [(64, 40), (32, 20, 18)]:
        n = len(shape)
        for bi, bp, scale in ((2, 2, 0.6), (2, 1, 0.6), (1, 2, 0.6), (2, 2, 12.0)):
            image = torch.cat([_smooth(shape, 2, 1.0, 50 + b, torch.float64) for b in range(bi)])
            ddf = torch.cat([_smooth(shape, n, scale, 52 + b, torch.float64) for b in range(bp)])
            cases = [(lambda i, d: warp_image(i, d, "linear", "zeros"), (image, ddf)),
                     (lambda i, d: warp_image(i, d, "nearest", "border"), (image, ddf))]  # fmt: skip
            if bi == 2:
                cases += [(compose_ddf, (ddf, 0.5 * ddf)), (lambda v: scaling_and_squaring(v, 4), (ddf,))]
            for fn, inputs in cases:
                before = len(paths)
                out, grads = _grads(fn, *inputs)
                if bi == bp == 2 and scale < 1:
                    assert len(paths) == before  # direct
                ref, refs = _reference(_grads, fn, *inputs)
                assert _rel(out, ref) <= 1e-12
                assert all(_rel(g, r) <= 1e-10 for g, r in zip(grads, refs, strict=True))
    # the broadcast image's 4 warps always take the buffers; with two workers (four slabs, two a round) the
    # large displacements do too; with one (two slabs, one a round) they never need them
    assert (len(paths) == 4) if threads == 1 else (len(paths) > 4)
