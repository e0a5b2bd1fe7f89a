"""Fast CPU kernels (numba) for linear / nearest sampling, warping, composition and integration of fields;
and forward-only kernels for discrete registration's cost volume: correlation, the min-convolution over
the displacement grid, mean-field smoothing (used without autograd; training keeps the torch code).

Same semantics as ``torch.nn.functional.grid_sample(..., align_corners=True)`` at voxel coordinates (see
``core.spatial``): ``"border"`` clamps coordinates to ``[0, n-1]`` (zero gradient at and beyond the clamp),
``"zeros"`` drops out-of-grid corners, nearest rounds half to even, an axis of size 1 always samples index 0.
The kernels take a displacement in voxel units and add the identity on the fly (no normalised grid tensor is
built); all channels of a voxel share one set of weights; compositions ``second + first∘(id + second)`` are
one pass, and scaling and squaring is one autograd node (:func:`integrate`) that reuses its buffers.
Gradients: w.r.t. the coordinates / displacement a gather pass (vectorised like the forward), w.r.t. the
image a scatter pass; double backward is not supported.

Used for contiguous-or-not CPU float32 / float64 tensors when numba imports; anything else (no numba,
GPU tensors, other dtypes, tracing / compiling, ``REGNET_ZOO_FAST=0``) falls back to ``grid_sample``.
Scalar arithmetic is done in float64 and stored in the tensor's dtype (the backward's scatter adds in the
tensor's dtype). Threads: numba uses ``torch.get_num_threads()`` (capped by numba's own limit).

Backward without races: the output rows are split into two slabs per worker, and a cheap pre-pass over the
coordinates along the slowest axis finds the image rows each slab samples (its window). When the windows of
every other slab are disjoint (displacements smaller than a slab), the even slabs and then the odd ones
scatter the image gradient straight into it; otherwise each slab scatters into a private buffer spanning its
window, and a parallel pass over image rows adds the buffers up.
"""

from __future__ import annotations

import contextlib
import os
import threading

import numpy as np
import torch
from torch import Tensor

try:  # optional: without numba every call falls back to plain torch
    import numba
    from numba import njit, prange

    if "NUMBA_THREADING_LAYER" not in os.environ:
        # workqueue is fork-safe (data-loader workers may warp after the parent did); it is not safe for
        # concurrent launches from several threads, which _LOCK serialises
        numba.config.THREADING_LAYER = "workqueue"
except ImportError:  # pragma: no cover - exercised only where numba is absent
    numba = None

__all__ = [
    "available",
    "applies",
    "applies_no_grad",
    "sample",
    "integrate",
    "disabled",
    "box_sum",
    "min_convolution",
    "mean_field",
    "correlation",
    "upsample_by_two",
]

_ENV = "REGNET_ZOO_FAST"
_MAX_PARTS = 16  # workers per batch element in the backward's scatter (two slabs each)
_DTYPES = (torch.float32, torch.float64)
_LOCK = threading.Lock()  # numba's default (workqueue) threading layer is not safe for concurrent launches
_state = threading.local()


def available() -> bool:
    """True when the fast kernels can run at all (numba imported, not disabled by ``REGNET_ZOO_FAST=0``)."""
    return (
        numba is not None
        and os.environ.get(_ENV, "1").strip().lower() not in ("0", "false", "no", "off")
        and not getattr(_state, "off", False)
    )


@contextlib.contextmanager
def disabled():
    """Context manager: use the plain-torch path inside (this thread only)."""
    old = getattr(_state, "off", False)
    _state.off = True
    try:
        yield
    finally:
        _state.off = old


def applies(image: Tensor, points: Tensor) -> bool:
    """Whether :func:`sample` handles this ``image`` ``(B, C, *S)`` / ``points`` ``(B, N, *T)`` pair."""
    if not available() or image.device.type != "cpu" or points.device.type != "cpu":
        return False
    if image.dtype not in _DTYPES or points.dtype != image.dtype or image.ndim not in (4, 5):
        return False
    if torch.jit.is_tracing() or torch.jit.is_scripting() or torch.compiler.is_compiling():
        return False
    return image.layout == torch.strided and points.layout == torch.strided


def applies_no_grad(x: Tensor) -> bool:
    """Whether a forward-only kernel (:func:`box_sum`, :func:`min_convolution`, :func:`mean_field`,
    :func:`correlation`) may replace torch code on ``x``: :func:`applies`' conditions, and no gradient to be
    recorded for ``x``."""
    return applies(x, x) and not (torch.is_grad_enabled() and x.requires_grad)


# --------------------------------------------------------------------------------------------- kernels
# One kernel set serves 2D and 3D: a 2D problem runs as 3D with a depth of 1 (the z axis then always samples
# index 0 with weight 1). Arrays are passed flat with explicit shapes; flat unsigned indices avoid numba's
# per-axis negative-index wraparound, which made multi-index gathers about 3x slower.
if numba is not None:
    from numba.extending import overload

    _pjit = njit(parallel=True, cache=True, fastmath=False, nogil=True)

    def _like(x, arr):
        """``x`` in ``arr``'s dtype (numba only)."""

    @overload(_like, inline="always")
    def _like_impl(x, arr):
        if arr.dtype == numba.float32:
            return lambda x, arr: np.float32(x)
        return lambda x, arr: np.float64(x)

    @njit(inline="always", cache=True, fastmath=False)
    def _axis(x, n, zeros, nearest):
        """One axis: ``(i0, i1, w0, w1, d0, d1)``: corner indices, weights, and d weight / d x.

        An out-of-grid corner gets weight 0 and the nearest in-grid index, so every index lies in
        ``[clip(floor(x)), clip(floor(x) + 1)]`` (what the backward's scatter windows rely on).
        Written with a single exit: early returns of tuples made the gather kernels about 3x slower.
        """
        g = 1.0
        if not zeros:  # border: clamp; the gradient is 0 at and beyond the border (as grid_sample)
            if x <= 0.0:
                x = 0.0
                g = 0.0
            elif x >= n - 1.0:
                x = n - 1.0
                g = 0.0
        if nearest:
            f = np.rint(x)  # half to even, as std::nearbyint
            t = 0.0
            g = 0.0
        else:
            f = np.floor(x)
            t = x - f
        if n == 1:  # grid_sample's align_corners unnormalisation maps any coordinate to index 0
            f = 0.0
            t = 0.0
            g = 0.0
        w0 = 1.0 - t
        w1 = t
        d0 = -g
        d1 = g
        i0 = n - 1
        i1 = n - 1
        if f >= 0.0 and f <= n - 1.0:
            i0 = int(f)
        else:
            w0 = 0.0
            d0 = 0.0
            if f < 0.0:
                i0 = 0
        if f >= -1.0 and f <= n - 2.0:
            i1 = int(f) + 1
        else:
            w1 = 0.0
            d1 = 0.0
            if f < -1.0:
                i1 = 0
        return i0, i1, w0, w1, d0, d1

    @njit(inline="always", cache=True, fastmath=False)
    def _coords(pts, p, vt, nd, k, j, i, relative):
        """Coordinates ``(z, y, x)`` of target voxel ``(k, j, i)`` at flat offset ``p`` (channel 0)."""
        if nd == 3:
            z = np.float64(pts[p])
            y = np.float64(pts[p + vt])
            x = np.float64(pts[p + 2 * vt])
        else:
            z = 0.0
            y = np.float64(pts[p])
            x = np.float64(pts[p + vt])
        if relative:
            z += k
            y += j
            x += i
        return z, y, x

    @njit(inline="always", cache=True, fastmath=False)
    def _lerp(img, ib, r00, r01, r10, r11, x0, x1, wz0, wz1, wy0, wy1, wx0, wx1, nearest):
        """Interpolated value from corner rows ``r..`` (flat offsets) of the channel starting at ``ib``."""
        if nearest:
            return wz0 * wy0 * wx0 * np.float64(img[np.uint64(ib + r00 + x0)])
        a00 = wx0 * img[np.uint64(ib + r00 + x0)] + wx1 * img[np.uint64(ib + r00 + x1)]
        a01 = wx0 * img[np.uint64(ib + r01 + x0)] + wx1 * img[np.uint64(ib + r01 + x1)]
        a10 = wx0 * img[np.uint64(ib + r10 + x0)] + wx1 * img[np.uint64(ib + r10 + x1)]
        a11 = wx0 * img[np.uint64(ib + r11 + x0)] + wx1 * img[np.uint64(ib + r11 + x1)]
        return wz0 * (wy0 * a00 + wy1 * a01) + wz1 * (wy0 * a10 + wy1 * a11)

    @njit(inline="always", cache=True, fastmath=False)
    def _corners(pts, p, vt, nd, k, j, i, shape, relative, zeros, nearest):
        """Corner rows / columns, weights and weight derivatives of target voxel ``(k, j, i)``."""
        _, _, sd, sh, sw = shape
        z, y, x = _coords(pts, p, vt, nd, k, j, i, relative)
        z0, z1, wz0, wz1, dz0, dz1 = _axis(z, sd, zeros, nearest)
        y0, y1, wy0, wy1, dy0, dy1 = _axis(y, sh, zeros, nearest)
        x0, x1, wx0, wx1, dx0, dx1 = _axis(x, sw, zeros, nearest)
        shw = sh * sw
        r00, r01 = z0 * shw + y0 * sw, z0 * shw + y1 * sw
        r10, r11 = z1 * shw + y0 * sw, z1 * shw + y1 * sw
        return r00, r01, r10, r11, x0, x1, wz0, wz1, wy0, wy1, wx0, wx1, dz0, dz1, dy0, dy1, dx0, dx1

    @njit(inline="always", cache=True, fastmath=False)
    def _row(row, td, th, bi_n, bp_n):
        """Batch ``b``, depth ``k`` and row ``j`` of output row ``row``; the image's and the points' batch
        index (a batch of one broadcasts)."""
        b = row // (td * th)
        return b, (row // th) % td, row % th, b if bi_n > 1 else 0, b if bp_n > 1 else 0

    # Channels come in chunks of up to 3 handled by straight-line code inside the voxel loop (shared weights):
    # a loop over channels there, or a run-time chunk size, stops LLVM from vectorising the voxel loop
    # (AVX-512 gathers): about 2x slower. The chunk size is the length of a tuple, fixed at compile time.
    @_pjit
    def _forward(img, pts, out, ishape, pshape, oshape, c0, chunk, relative, residual, zeros, nearest):
        """Channels ``c0 .. c0 + len(chunk) - 1`` of the sample (``chunk``: a tuple of length 1 to 3)."""
        m = len(chunk)  # a compile-time constant: the unused channel code is compiled out
        bi_n, nc, sd, sh, sw = ishape
        bp_n, nd = pshape[0], pshape[1]
        nb, _, td, th, tw = oshape
        vs, vt = sd * sh * sw, td * th * tw
        for row in prange(nb * td * th):
            b, k, j, bi, bp = _row(row, td, th, bi_n, bp_n)
            pbase = bp * nd * vt + (k * th + j) * tw
            ib = (bi * nc + c0) * vs
            ob = (b * nc + c0) * vt + (k * th + j) * tw
            rb = pbase + c0 * vt
            for i in range(tw):
                r00, r01, r10, r11, x0, x1, wz0, wz1, wy0, wy1, wx0, wx1, _a, _b, _c, _d, _e, _f = (
                    _corners(pts, pbase + i, vt, nd, k, j, i, ishape, relative, zeros, nearest)
                )
                v = _lerp(img, ib, r00, r01, r10, r11, x0, x1, wz0, wz1, wy0, wy1, wx0, wx1, nearest)
                if residual:
                    v += pts[np.uint64(rb + i)]
                out[np.uint64(ob + i)] = v
                if m > 1:
                    v = _lerp(img, ib + vs, r00, r01, r10, r11, x0, x1, wz0, wz1, wy0, wy1, wx0, wx1,
                              nearest)  # fmt: skip
                    if residual:
                        v += pts[np.uint64(rb + vt + i)]
                    out[np.uint64(ob + vt + i)] = v
                if m > 2:
                    v = _lerp(img, ib + 2 * vs, r00, r01, r10, r11, x0, x1, wz0, wz1, wy0, wy1, wx0, wx1,
                              nearest)  # fmt: skip
                    if residual:
                        v += pts[np.uint64(rb + 2 * vt + i)]
                    out[np.uint64(ob + 2 * vt + i)] = v

    @njit(inline="always", cache=True, fastmath=False)
    def _dcoords(img, ib, go, r00, r01, r10, r11, x0, x1, wz0, wz1, wy0, wy1, wx0, wx1, dz0, dz1, dy0, dy1,
                 dx0, dx1):  # fmt: skip
        """``go`` times the (z, y, x) derivative of the linear interpolant of one channel."""
        v000 = np.float64(img[np.uint64(ib + r00 + x0)])
        v001 = np.float64(img[np.uint64(ib + r00 + x1)])
        v010 = np.float64(img[np.uint64(ib + r01 + x0)])
        v011 = np.float64(img[np.uint64(ib + r01 + x1)])
        v100 = np.float64(img[np.uint64(ib + r10 + x0)])
        v101 = np.float64(img[np.uint64(ib + r10 + x1)])
        v110 = np.float64(img[np.uint64(ib + r11 + x0)])
        v111 = np.float64(img[np.uint64(ib + r11 + x1)])
        a00 = wx0 * v000 + wx1 * v001
        a01 = wx0 * v010 + wx1 * v011
        a10 = wx0 * v100 + wx1 * v101
        a11 = wx0 * v110 + wx1 * v111
        gz = go * (dz0 * (wy0 * a00 + wy1 * a01) + dz1 * (wy0 * a10 + wy1 * a11))
        gy = go * (wz0 * (dy0 * a00 + dy1 * a01) + wz1 * (dy0 * a10 + dy1 * a11))
        e00 = dx0 * v000 + dx1 * v001
        e01 = dx0 * v010 + dx1 * v011
        e10 = dx0 * v100 + dx1 * v101
        e11 = dx0 * v110 + dx1 * v111
        gx = go * (wz0 * (wy0 * e00 + wy1 * e01) + wz1 * (wy0 * e10 + wy1 * e11))
        return gz, gy, gx

    @_pjit
    def _backward_points(img, pts, gout, gpts, ishape, pshape, oshape, c0, chunk, relative, residual, zeros):
        """Gradient w.r.t. the (linear) sampling coordinates from channels ``c0 .. c0 + len(chunk) - 1``,
        written to ``gpts`` flat ``(B, N, *T)``: a gather (no races), vectorised like ``_forward`` (reading
        ``gpts`` back to sum chunks here stops that); ``residual`` adds ``gout`` (channel = coordinate)."""
        m = len(chunk)
        bi_n, nc, sd, sh, sw = ishape
        bp_n, nd = pshape[0], pshape[1]
        nb, _, td, th, tw = oshape
        vs, vt = sd * sh * sw, td * th * tw
        for row in prange(nb * td * th):
            b, k, j, bi, bp = _row(row, td, th, bi_n, bp_n)
            pbase = bp * nd * vt + (k * th + j) * tw
            gbase = b * nd * vt + (k * th + j) * tw
            obase = b * nc * vt + (k * th + j) * tw
            ib = (bi * nc + c0) * vs
            ob = obase + c0 * vt
            for i in range(tw):
                r00, r01, r10, r11, x0, x1, wz0, wz1, wy0, wy1, wx0, wx1, dz0, dz1, dy0, dy1, dx0, dx1 = (
                    _corners(pts, pbase + i, vt, nd, k, j, i, ishape, relative, zeros, False))  # fmt: skip
                gz, gy, gx = _dcoords(img, ib, np.float64(gout[np.uint64(ob + i)]), r00, r01, r10, r11,
                                      x0, x1, wz0, wz1, wy0, wy1, wx0, wx1, dz0, dz1, dy0, dy1, dx0, dx1)
                if m > 1:
                    hz, hy, hx = _dcoords(img, ib + vs, np.float64(gout[np.uint64(ob + vt + i)]), r00, r01,
                                          r10, r11, x0, x1, wz0, wz1, wy0, wy1, wx0, wx1, dz0, dz1, dy0,
                                          dy1, dx0, dx1)  # fmt: skip
                    gz += hz
                    gy += hy
                    gx += hx
                if m > 2:
                    hz, hy, hx = _dcoords(img, ib + 2 * vs, np.float64(gout[np.uint64(ob + 2 * vt + i)]),
                                          r00, r01, r10, r11, x0, x1, wz0, wz1, wy0, wy1, wx0, wx1, dz0,
                                          dz1, dy0, dy1, dx0, dx1)  # fmt: skip
                    gz += hz
                    gy += hy
                    gx += hx
                if residual:  # out = image(points) + points
                    if nd == 3:
                        gz += gout[np.uint64(obase + i)]
                    gy += gout[np.uint64(obase + (nd - 2) * vt + i)]
                    gx += gout[np.uint64(obase + (nd - 1) * vt + i)]
                if nd == 3:
                    gpts[np.uint64(gbase + i)] = gz
                gpts[np.uint64(gbase + (nd - 2) * vt + i)] = gy
                gpts[np.uint64(gbase + (nd - 1) * vt + i)] = gx

    @_pjit
    def _windows(pts, ishape, pshape, oshape, nparts, relative, lo, hi):
        """Per slab ``q = b * nparts + p``: the flat range ``[lo, hi)`` (within a channel) its corners touch.

        The range covers whole planes (3D) or rows (2D) of the image, from the clipped floor of the smallest
        to the clipped floor + 1 of the largest coordinate along the slowest image axis of size > 1.
        """
        _, _, sd, sh, sw = ishape
        bp_n, nd = pshape[0], pshape[1]
        nb, _, td, th, tw = oshape
        vt, rows = td * th * tw, td * th
        if sd > 1:
            n, unit, ch = sd, sh * sw, 0
        else:
            n, unit, ch = sh, sw, nd - 2
        for q in prange(nb * nparts):
            b, p = q // nparts, q % nparts
            bp = b if bp_n > 1 else 0
            smin, smax, bad = np.inf, -np.inf, False
            if sd == 1 and sh == 1:
                bad = True
            for r in range(p * rows // nparts, (p + 1) * rows // nparts):
                base = (bp * nd + ch) * vt + r * tw
                ident = r // th if sd > 1 else r % th
                for i in range(tw):
                    s = np.float64(pts[np.uint64(base + i)])
                    if relative:
                        s += ident
                    if not (s == s):
                        bad = True
                    smin = min(smin, s)
                    smax = max(smax, s)
            if bad:
                lo[q], hi[q] = 0, sd * sh * sw
            elif smin > smax:  # empty slab
                lo[q], hi[q] = 0, 0
            else:
                first = min(max(np.floor(smin), 0.0), n - 1.0)
                last = min(max(np.floor(smax) + 1.0, 0.0), n - 1.0)
                lo[q], hi[q] = int(first) * unit, (int(last) + 1) * unit

    @_pjit
    def _scatter(pts, gout, buf, base, stride, lo, sel, zero, ishape, pshape, oshape, nparts, relative, zeros,
                 nearest):  # fmt: skip
        """Gradient w.r.t. the image: scatter ``gout`` of the slabs ``q`` in ``sel`` (in parallel) into
        ``buf``, channel ``c`` of flat image offset ``o`` at ``base[q] + c * stride[q] + o``: a slab's private
        buffer (``zero``: cleared here first; ``base = offset - lo``, ``stride = hi - lo``) or, for slabs
        whose windows are disjoint, the gradient itself.
        No two slabs of one call write the same element, so there are no races. The adds are done in the
        buffer's dtype: float64 adds into a float32 buffer were ~15 % slower."""
        _, nc, _, _, _ = ishape
        bp_n, nd = pshape[0], pshape[1]
        nb, _, td, th, tw = oshape
        vt, rows = td * th * tw, td * th
        for s in prange(len(sel)):
            q = sel[s]
            b, p = q // nparts, q % nparts
            bp = b if bp_n > 1 else 0
            qb, qs = base[q], stride[q]
            if zero:  # a private buffer: the window [lo, lo + stride) of each channel
                buf[qb + lo[q] : qb + lo[q] + nc * qs] = 0.0
            for r in range(p * rows // nparts, (p + 1) * rows // nparts):
                k, j = r // th, r % th
                pbase = bp * nd * vt + r * tw
                obase = b * nc * vt + r * tw
                for i in range(tw):
                    r00, r01, r10, r11, x0, x1, wz0, wz1, wy0, wy1, wx0, wx1, _a, _b, _c, _d, _e, _f = (
                        _corners(pts, pbase + i, vt, nd, k, j, i, ishape, relative, zeros, nearest)
                    )
                    for c in range(nc):
                        go = np.float64(gout[np.uint64(obase + c * vt + i)])
                        gb = qb + c * qs
                        if nearest:
                            buf[np.uint64(gb + r00 + x0)] += _like(wz0 * wy0 * wx0 * go, buf)
                        else:
                            t = go * wz0 * wy0
                            buf[np.uint64(gb + r00 + x0)] += _like(t * wx0, buf)
                            buf[np.uint64(gb + r00 + x1)] += _like(t * wx1, buf)
                            t = go * wz0 * wy1
                            buf[np.uint64(gb + r01 + x0)] += _like(t * wx0, buf)
                            buf[np.uint64(gb + r01 + x1)] += _like(t * wx1, buf)
                            t = go * wz1 * wy0
                            buf[np.uint64(gb + r10 + x0)] += _like(t * wx0, buf)
                            buf[np.uint64(gb + r10 + x1)] += _like(t * wx1, buf)
                            t = go * wz1 * wy1
                            buf[np.uint64(gb + r11 + x0)] += _like(t * wx0, buf)
                            buf[np.uint64(gb + r11 + x1)] += _like(t * wx1, buf)

    @_pjit
    def _reduce(buf, off, lo, hi, gimg, ishape, nslabs, nparts, bi_n, unit, accumulate):
        """``gimg`` (flat ``(Bi, C, *S)``) ``=`` (or ``+=``) the sum of the slab buffers over each unit."""
        _, nc, sd, sh, sw = ishape
        vs = sd * sh * sw
        nunits = vs // unit
        for task in prange(bi_n * nc * nunits):
            bi = task // (nc * nunits)
            c = (task // nunits) % nc
            u0 = (task % nunits) * unit
            dst = (bi * nc + c) * vs + u0
            if not accumulate:
                gimg[dst : dst + unit] = 0.0
            for q in range(nslabs):
                if (bi_n > 1 and q // nparts != bi) or u0 < lo[q] or u0 >= hi[q]:
                    continue
                src = off[q] + c * (hi[q] - lo[q]) + u0 - lo[q]
                gimg[dst : dst + unit] += buf[src : src + unit]

    @_pjit
    def _box_strided(src, dst, outer, n, inner, r, block):
        """Zero-padded window sums of width ``2r + 1`` along the middle axis of flat ``(outer, n, inner)``
        arrays, ``inner > 1``: a running sum per column, float64 accumulators, ``block`` columns per task."""
        nblk = (inner + block - 1) // block
        for task in prange(outer * nblk):
            o, c0 = task // nblk, (task % nblk) * block
            w = min(block, inner - c0)
            acc = np.zeros(w, np.float64)
            base = o * n * inner + c0
            for i in range(min(r, n)):
                row = base + i * inner
                for c in range(w):
                    acc[c] += src[row + c]
            for i in range(n):
                if i + r < n:
                    row = base + (i + r) * inner
                    for c in range(w):
                        acc[c] += src[row + c]
                if i - r - 1 >= 0:
                    row = base + (i - r - 1) * inner
                    for c in range(w):
                        acc[c] -= src[row + c]
                row = base + i * inner
                for c in range(w):
                    dst[row + c] = acc[c]

    @_pjit
    def _box_last(src, dst, lines, n, r):
        """As ``_box_strided`` along the contiguous (last) axis of flat ``(lines, n)`` arrays."""
        for line in prange(lines):
            base = line * n
            acc = 0.0
            for i in range(min(r, n)):
                acc += src[base + i]
            for i in range(n):
                if i + r < n:
                    acc += src[base + i + r]
                if i - r - 1 >= 0:
                    acc -= src[base + i - r - 1]
                dst[base + i] = acc

    @_pjit
    def _min_convolution(src, dst, nb, nd, side, nvox, avg, mink, block):
        """Per voxel of flat ``(B, L, V)`` costs (``L = side**nd`` displacements): replicate pad, two valid
        ``avg``-wide box means and one ``mink``-wide box minimum over the displacement grid, as
        ``filters.approximate_min_convolution`` (same order of additions, in the array's dtype).
        ``block`` consecutive voxels share a task and sit innermost in its buffer (vectorised)."""
        pad = (avg - 1) + (mink - 1) // 2
        n = side + 2 * pad
        n0, s0 = (n, side) if nd == 3 else (1, 1)
        num = side**nd
        scale = _like(avg, src)
        nblk = (nvox + block - 1) // block
        for task in prange(nb * nblk):
            b, v0 = task // nblk, (task % nblk) * block
            w = min(block, nvox - v0)
            buf = np.empty((n0, n, n, block), src.dtype)
            for z in range(n0):
                zz = min(max(z - pad, 0), s0 - 1)
                for y in range(n):
                    yy = min(max(y - pad, 0), side - 1)
                    for x in range(n):
                        xx = min(max(x - pad, 0), side - 1)
                        base = (b * num + (zz * side + yy) * side + xx) * nvox + v0
                        for v in range(w):
                            buf[z, y, x, v] = src[base + v]
            ez, ey, ex = n0, n, n
            for rnd in range(3):  # two box means, then the box minimum; axes in the order z, y, x
                k = avg if rnd < 2 else mink
                for axis in range(3 - nd, 3):
                    dz, dy, dx = axis == 0, axis == 1, axis == 2
                    ez, ey, ex = ez - dz * (k - 1), ey - dy * (k - 1), ex - dx * (k - 1)
                    for z in range(ez):  # in place: output i reads inputs i .. i + k - 1, not yet overwritten
                        for y in range(ey):
                            for x in range(ex):
                                out = buf[z, y, x]  # the block's voxels: innermost loops vectorise
                                for t in range(1, k):
                                    src_t = buf[z + dz * t, y + dy * t, x + dx * t]
                                    if rnd < 2:
                                        for v in range(w):
                                            out[v] = out[v] + src_t[v]
                                    else:
                                        for v in range(w):
                                            out[v] = min(out[v], src_t[v])
                                if rnd < 2:
                                    for v in range(w):
                                        out[v] = out[v] / scale
            for z in range(ez):
                for y in range(ey):
                    for x in range(ex):
                        base = (b * num + (z * side + y) * side + x) * nvox + v0
                        for v in range(w):
                            dst[base + v] = buf[z, y, x, v]

    @_pjit
    def _mean_field(src, dst, lines, sd, sh, sw, kernel, iterations):
        """Per channel of flat ``(lines, sd, sh, sw)`` volumes: replicate pad by ``p = iterations * (kernel -
        1) // 2``, then ``iterations`` valid box means along z, y, x (``sd == 1``: y, x only), as
        ``filters.mean_field_smoothing`` (same order of additions, in the array's dtype), in one
        cache-sized buffer per channel instead of passes over the whole padded volume."""
        pad = iterations * ((kernel - 1) // 2)
        nz = sd + 2 * pad if sd > 1 else 1
        ny, nx = sh + 2 * pad, sw + 2 * pad
        scale = _like(kernel, src)
        for line in prange(lines):
            buf = np.empty((nz, ny, nx), src.dtype)
            for z in range(nz):
                zz = min(max(z - pad, 0), sd - 1) if sd > 1 else 0
                for y in range(ny):
                    row = ((line * sd + zz) * sh + min(max(y - pad, 0), sh - 1)) * sw
                    for x in range(nx):
                        buf[z, y, x] = src[row + min(max(x - pad, 0), sw - 1)]
            tmp = np.empty(nx, src.dtype)
            ez, ey, ex = nz, ny, nx
            for _ in range(iterations):
                for axis in range(0 if sd > 1 else 1, 3):
                    dz, dy, dx = axis == 0, axis == 1, axis == 2
                    ez, ey, ex = ez - dz * (kernel - 1), ey - dy * (kernel - 1), ex - dx * (kernel - 1)
                    for z in range(ez):  # rows vectorised; z, y in place (later rows are read, not written)
                        for y in range(ey):
                            row = buf[z, y]
                            if dx:
                                for x in range(ex):
                                    tmp[x] = row[x]
                                for t in range(1, kernel):
                                    for x in range(ex):
                                        tmp[x] = tmp[x] + row[x + t]
                                for x in range(ex):
                                    row[x] = tmp[x] / scale
                            else:
                                for t in range(1, kernel):
                                    other = buf[z + dz * t, y + dy * t]
                                    for x in range(ex):
                                        row[x] = row[x] + other[x]
                                for x in range(ex):
                                    row[x] = row[x] / scale
            for z in range(ez):
                for y in range(ey):
                    row = ((line * sd + z) * sh + y) * sw
                    for x in range(ex):
                        dst[row + x] = buf[z, y, x]

    @_pjit
    def _correlation(fix, pad, out, offs, nb, nc, sd, sh, sw, pd, ph, pw, rz, ry, rx, dot):
        """``out[b, l, z, y, x]``: the sum over channels of ``(fix[b, c, z, y, x] - pad[b, c, z + rz + dz_l,
        y + ry + dy_l, x + rx + dx_l])**2`` (``dot``: the mean of the products) for flat ``fix``
        ``(B, C, sd, sh, sw)`` and ``pad`` (moving, padded by ``(rz, ry, rx)``), offsets ``offs`` ``(L, 3)``;
        one output row at a time, vectorised along x."""
        nl = offs.shape[0]
        vs, ps = sd * sh * sw, pd * ph * pw
        inv = _like(1.0 / nc, fix)
        for task in prange(nb * nl * sd):
            b, l, z = task // (nl * sd), (task // sd) % nl, task % sd
            dz, dy, dx = offs[l, 0], offs[l, 1], offs[l, 2]
            for y in range(sh):
                ob = ((b * nl + l) * sd + z) * sh * sw + y * sw
                orow = out[ob : ob + sw]
                orow[:] = 0.0
                for c in range(nc):
                    fb = (b * nc + c) * vs + (z * sh + y) * sw
                    pb = (b * nc + c) * ps + ((z + rz + dz) * ph + y + ry + dy) * pw + rx + dx
                    frow = fix[fb : fb + sw]
                    prow = pad[pb : pb + sw]
                    if dot:
                        for x in range(sw):
                            orow[x] += frow[x] * prow[x]
                    else:
                        for x in range(sw):
                            d = frow[x] - prow[x]
                            orow[x] += d * d
                if dot:
                    for x in range(sw):
                        orow[x] *= inv

    @_pjit
    def _upsample_by_two(src, dst, nb, nc, nk, sd, sh, sw, od):
        """Linear upsampling by exactly 2 (``align_corners=False``) of flat ``(nb, nc, sd, sh, sw)`` into the
        first ``nc`` channels of flat ``(nb, nk, od, 2 sh, 2 sw)`` (``od = 2 sd``; 2D: ``sd = od = 1``).
        Output ``2m`` takes ``0.25 x[m - 1] + 0.75 x[m]``, ``2m + 1`` takes ``0.75 x[m] + 0.25 x[m + 1]``,
        indices clamped (torch's weights at scale 2); rows are blended along z and y, then widened along x."""
        oh, ow = 2 * sh, 2 * sw
        q, t = _like(0.25, src), _like(0.75, src)
        for task in prange(nb * nc * od):
            b, c, z = task // (nc * od), (task // od) % nc, task % od
            m = z // 2
            z0, z1 = (max(m - 1, 0), m) if z % 2 == 0 else (m, min(m + 1, sd - 1))
            wz0, wz1 = (q, t) if z % 2 == 0 else (t, q)
            if od == 1:  # 2D
                z0, z1, wz0, wz1 = 0, 0, _like(1.0, src), _like(0.0, src)
            base = (b * nc + c) * sd
            row = np.empty(sw, src.dtype)
            for y in range(oh):
                m = y // 2
                y0, y1 = (max(m - 1, 0), m) if y % 2 == 0 else (m, min(m + 1, sh - 1))
                wy0, wy1 = (q, t) if y % 2 == 0 else (t, q)
                r00 = ((base + z0) * sh + y0) * sw
                r01 = ((base + z0) * sh + y1) * sw
                r10 = ((base + z1) * sh + y0) * sw
                r11 = ((base + z1) * sh + y1) * sw
                for x in range(sw):
                    row[x] = wz0 * (wy0 * src[r00 + x] + wy1 * src[r01 + x]) + wz1 * (
                        wy0 * src[r10 + x] + wy1 * src[r11 + x]
                    )
                o = (((b * nk + c) * od + z) * oh + y) * ow
                dst[o] = row[0]
                for x in range(1, sw):
                    dst[o + 2 * x] = q * row[x - 1] + t * row[x]
                for x in range(sw - 1):
                    dst[o + 2 * x + 1] = t * row[x] + q * row[x + 1]
                dst[o + ow - 1] = row[sw - 1]


def _shape5(shape) -> tuple[int, int, int, int, int]:
    """``(B, C, D, H, W)`` of a 2D ``(B, C, H, W)`` (depth 1) or 3D shape."""
    return tuple(shape) if len(shape) == 5 else (shape[0], shape[1], 1, shape[2], shape[3])


def _threads() -> int:
    n = max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))
    numba.set_num_threads(n)
    return n


def _chunks(channels: int) -> list[tuple[int, tuple[int, ...]]]:
    """``(first channel, a tuple of the chunk's length)`` for chunks of at most 3 channels (``_forward``)."""
    return [(c0, (0,) * min(3, channels - c0)) for c0 in range(0, channels, 3)]


def _flat(t: Tensor) -> np.ndarray:
    return t.numpy().reshape(-1)


class _Call:
    """One sampling ``image`` ``(Bi, C, *S)`` at ``points`` ``(Bp, N, *T)`` with fixed flags: runs the
    forward, and the backward's three kernels (windows, scatter/gather, reduction) on reusable buffers."""

    def __init__(self, image, points, relative, residual, zeros, nearest):
        self.image, self.points = image.detach().contiguous(), points.detach().contiguous()
        self.flags = (bool(relative), bool(residual), bool(zeros), bool(nearest))
        self.nb = max(image.shape[0], points.shape[0])
        self.out_shape = (self.nb, image.shape[1], *points.shape[2:])

    def _shapes(self):
        return _shape5(self.image.shape), _shape5(self.points.shape), _shape5(self.out_shape)

    def forward(self, out: Tensor | None = None) -> Tensor:
        if out is None:
            out = torch.empty(self.out_shape, dtype=self.image.dtype)
        relative, residual, zeros, nearest = self.flags
        with _LOCK:
            _threads()
            for c0, chunk in _chunks(self.image.shape[1]):  # residual: C == N <= 3, one chunk
                _forward(_flat(self.image), _flat(self.points), _flat(out), *self._shapes(), c0, chunk,
                         relative, residual, zeros, nearest)  # fmt: skip
        return out

    def backward(self, grad_out: Tensor, need_img: bool, need_pts: bool, grad_pts: Tensor | None = None,
                 scatter_into_pts: bool = False) -> tuple[Tensor | None, Tensor | None]:  # fmt: skip
        """``(grad_image, grad_points)`` (``None`` where not needed); ``grad_points`` keeps the batch size of
        the output and is written into ``grad_pts`` when given. ``scatter_into_pts``: add the image gradient
        to ``grad_points`` instead (image and points are then one field, as in scaling and squaring)."""
        relative, residual, zeros, nearest = self.flags
        ishape, pshape, oshape = self._shapes()
        grad_out = grad_out.contiguous()
        grad_image = None
        with _LOCK:
            workers = min(_threads(), _MAX_PARTS)
            if need_pts:
                if grad_pts is None:
                    grad_pts = torch.empty((self.nb, *self.points.shape[1:]), dtype=self.image.dtype)
                if nearest:  # piecewise constant in the coordinates
                    grad_pts.copy_(grad_out) if residual else grad_pts.zero_()
                else:
                    for c0, chunk in _chunks(ishape[1]):  # summed over chunks
                        part = grad_pts if c0 == 0 else torch.empty_like(grad_pts)
                        _backward_points(_flat(self.image), _flat(self.points), _flat(grad_out), _flat(part),
                                         ishape, pshape, oshape, c0, chunk, relative, residual and c0 == 0,
                                         zeros)  # fmt: skip
                        if c0 > 0:
                            grad_pts += part
            if need_img:
                grad_image = self._scatter_image(grad_out, grad_pts if scatter_into_pts else None, workers)
                if scatter_into_pts:
                    grad_image = None
        return grad_image, grad_pts

    def _scatter_image(self, grad_out: Tensor, into: Tensor | None, workers: int) -> Tensor:
        """The image gradient (added into ``into`` when given). The output rows are cut into two slabs per
        worker; when the image windows of every other slab are disjoint (displacements smaller than a slab),
        the slabs scatter straight into the gradient in two rounds; else each into a private buffer, and a
        reduction adds the buffers up. Caller holds ``_LOCK``."""
        relative, _, zeros, nearest = self.flags
        ishape, pshape, oshape = self._shapes()
        bi_n, nc = ishape[0], ishape[1]
        vs = ishape[2] * ishape[3] * ishape[4]
        nparts = 2 * workers  # slabs per batch element
        nslabs = self.nb * nparts
        lo, hi = np.zeros(nslabs, np.int64), np.zeros(nslabs, np.int64)
        _windows(_flat(self.points), ishape, pshape, oshape, nparts, relative, lo, hi)
        rounds = _disjoint_rounds(lo, hi, nparts) if bi_n == self.nb else None
        args = (ishape, pshape, oshape, nparts, relative, zeros, nearest)
        if rounds is not None:
            target = torch.zeros_like(self.image) if into is None else into
            base = (np.arange(nslabs, dtype=np.int64) // nparts) * nc * vs
            stride = np.full(nslabs, vs, np.int64)
            for sel in rounds:
                _scatter(_flat(self.points), _flat(grad_out), _flat(target), base, stride, lo, sel, False,
                         *args)  # fmt: skip
            return target
        sizes = (hi - lo) * nc
        off = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
        buf = np.empty(int(sizes.sum()), self.image.numpy().dtype)
        sel = np.arange(nslabs, dtype=np.int64)
        _scatter(_flat(self.points), _flat(grad_out), buf, off - lo, hi - lo, lo, sel, True, *args)
        unit = ishape[3] * ishape[4] if ishape[2] > 1 else ishape[4]  # as in _windows
        target = torch.empty_like(self.image) if into is None else into
        _reduce(buf, off, lo, hi, _flat(target), ishape, nslabs, nparts, bi_n, unit, into is not None)
        return target


def _disjoint_rounds(lo: np.ndarray, hi: np.ndarray, nparts: int) -> list[np.ndarray] | None:
    """Slabs ``q = b * nparts + p`` in two rounds (even ``p``, odd ``p``) when, within each batch element and
    round, their image windows ``[lo, hi)`` do not overlap; else ``None``."""
    rounds = []
    for parity in (0, 1):
        sel = np.flatnonzero(np.arange(len(lo)) % nparts % 2 == parity)
        for b in range(len(lo) // nparts):
            mine = sel[(sel // nparts == b) & (hi[sel] > lo[sel])]
            order = mine[np.argsort(lo[mine], kind="stable")]
            if np.any(hi[order[:-1]] > lo[order[1:]]):
                return None
        rounds.append(sel.astype(np.int64))
    return rounds


class _SampleFunction(torch.autograd.Function):
    """``out = image(points [+ id]) [+ points]`` with the kernels above (see :func:`sample`)."""

    @staticmethod
    def forward(ctx, image, points, relative, residual, zeros, nearest):
        call = _Call(image, points, relative, residual, zeros, nearest)
        ctx.save_for_backward(call.image, call.points)
        ctx.flags = call.flags
        return call.forward()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        image, points = ctx.saved_tensors
        need_img, need_pts = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if not (need_img or need_pts):
            return None, None, None, None, None, None
        call = _Call(image, points, *ctx.flags)
        grad_image, grad_points = call.backward(grad_out, need_img, need_pts)
        if need_pts and points.shape[0] != call.nb:
            grad_points = grad_points.sum(0, keepdim=True)
        return grad_image, grad_points, None, None, None, None


def sample(
    image: Tensor,
    points: Tensor,
    mode: str,
    padding_mode: str,
    relative: bool = False,
    residual: bool = False,
) -> Tensor:
    """Sample ``image`` ``(Bi, C, *S)`` at ``points`` ``(Bp, N, *T)`` -> ``(max(Bi, Bp), C, *T)``.

    ``points`` are voxel coordinates, or with ``relative=True`` a displacement added to the identity of
    ``T`` (then ``T`` must equal ``S``). ``residual=True`` (needs ``C == N``) adds ``points`` to the result,
    i.e. the composition ``points + image∘(id + points)``. ``mode``: ``"linear"`` / ``"nearest"``;
    ``padding_mode``: ``"border"`` / ``"zeros"``. Batch size 1 broadcasts. Call only where :func:`applies`
    is true.
    """
    if mode not in ("linear", "nearest") or padding_mode not in ("border", "zeros"):
        raise ValueError(f"fast sampling: linear/nearest, border/zeros only; got {mode!r}, {padding_mode!r}")
    if residual and (image.shape[1] != points.shape[1] or image.shape[2:] != points.shape[2:]):
        raise ValueError("residual sampling needs image and points of the same shape")
    if image.shape[0] != points.shape[0] and 1 not in (image.shape[0], points.shape[0]):
        raise ValueError(f"batch sizes {image.shape[0]} and {points.shape[0]} do not match")
    return _SampleFunction.apply(
        image, points, bool(relative), bool(residual), padding_mode == "zeros", mode == "nearest"
    )


class _IntegrateFunction(torch.autograd.Function):
    """Scaling and squaring as one node: keeps the ``steps`` intermediate fields, and its backward runs one
    fused pass per step (scatter and gather into the same gradient buffer), ping-ponging two buffers."""

    @staticmethod
    def forward(ctx, svf, steps):
        fields = [(svf.detach() / 2**steps).contiguous()]
        for _ in range(steps):
            fields.append(_Call(fields[-1], fields[-1], True, True, False, False).forward())
        ctx.save_for_backward(*fields[:-1])
        ctx.steps = steps
        return fields[-1]

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        grad, spare = grad_out.contiguous(), None
        for field in reversed(ctx.saved_tensors):
            call = _Call(field, field, True, True, False, False)
            _, new = call.backward(grad, True, True, grad_pts=spare, scatter_into_pts=True)
            spare = grad if grad is not grad_out else None  # never write into autograd's grad_out
            grad = new
        return grad.mul_(1.0 / 2**ctx.steps), None


def integrate(svf: Tensor, steps: int) -> Tensor:
    """Scaling and squaring of ``svf`` ``(B, N, *S)`` with linear, border-padded compositions (``steps >= 1``;
    call only where :func:`applies` ``(svf, svf)`` is true). Without autograd two buffers are reused."""
    if torch.is_grad_enabled() and svf.requires_grad:
        return _IntegrateFunction.apply(svf, int(steps))
    field = (svf.detach() / 2**steps).contiguous()  # the kernels index flat, C-contiguous buffers
    spare = torch.empty_like(field, memory_format=torch.contiguous_format)
    for _ in range(steps):
        spare = _Call(field, field, True, True, False, False).forward(spare)
        field, spare = spare, field
    return field


def box_sum(x: Tensor, kernel_size: int, dims: int) -> Tensor:
    """Sums of ``x`` ``(..., *S)`` over a cube of side ``kernel_size`` (odd) around each voxel of the last
    ``dims`` axes, zeros outside (what ``monai.networks.layers.separable_filtering`` gives with a rectangular
    kernel): one running-sum pass per axis, float64 accumulators. No autograd (the LNCC loss's own backward
    uses it as the adjoint: the filter is symmetric). CPU float32 / float64 where :func:`available`."""
    r = kernel_size // 2
    src = x.detach().contiguous()
    shape, spare = src.shape, None
    with _LOCK:
        _threads()
        for axis in range(src.ndim - dims, src.ndim):
            dst = spare if spare is not None else torch.empty_like(src)
            n = shape[axis]
            inner = int(np.prod(shape[axis + 1 :], dtype=np.int64))
            outer = src.numel() // (n * inner)
            if inner == 1:
                _box_last(_flat(src), _flat(dst), outer, n, r)
            else:
                _box_strided(_flat(src), _flat(dst), outer, n, inner, r, min(inner, 1024))
            spare = src if axis > src.ndim - dims else None  # never write into the input
            src = dst
    return src


def min_convolution(cost: Tensor, side: int, avg_kernel: int, min_kernel: int, block: int = 128) -> Tensor:
    """Approximate min-convolution of ``cost`` ``(B, L, *S)`` over its ``L = side**N`` displacements
    (``filters.approximate_min_convolution``, the same arithmetic as its torch code) voxel by voxel, without
    that code's padded ``(B, *(side + 2 p,) * N, *S)`` copy of the volume. No autograd; call where
    :func:`applies_no_grad` is true."""
    src = cost.detach().contiguous()
    out = torch.empty_like(src)
    nvox = src[0, 0].numel()
    with _LOCK:
        _threads()
        _min_convolution(_flat(src), _flat(out), src.shape[0], src.ndim - 2, side, nvox, avg_kernel,
                         min_kernel, min(block, nvox))  # fmt: skip
    return out


def mean_field(cost: Tensor, kernel: int, iterations: int) -> Tensor:
    """``filters.mean_field_smoothing`` of ``cost`` ``(B, L, *S)`` (the same arithmetic as its torch code),
    channel by channel. No autograd; call where :func:`applies_no_grad` is true."""
    src = cost.detach().contiguous()
    out = torch.empty_like(src)
    sd, sh, sw = _shape5(src.shape)[2:]
    with _LOCK:
        _threads()
        _mean_field(_flat(src), _flat(out), src.shape[0] * src.shape[1], sd, sh, sw, kernel, iterations)
    return out


def correlation(fixed: Tensor, padded: Tensor, offsets: Tensor, radius: int, dot: bool) -> Tensor:
    """``correlation.correlation_volume`` of ``fixed`` ``(B, C, *S)`` against ``padded`` (moving padded by
    ``radius`` on every spatial side) at ``offsets`` ``(L, N)``: ``(B, L, *S)``, one output row at a time,
    without the chunks of shifted copies. No autograd; call where :func:`applies_no_grad` is true for both."""
    fix, pad = fixed.detach().contiguous(), padded.detach().contiguous()
    b, c, *size = fix.shape
    nd = len(size)
    sd, sh, sw = _shape5(fix.shape)[2:]
    pd, ph, pw = _shape5(pad.shape)[2:]
    offs = torch.zeros(offsets.shape[0], 3, dtype=torch.int64)
    offs[:, 3 - nd :] = offsets.to(torch.int64)
    out = torch.empty(b, offsets.shape[0], *size, dtype=fix.dtype)
    rz = radius if nd == 3 else 0
    with _LOCK:
        _threads()
        _correlation(_flat(fix), _flat(pad), _flat(out), offs.numpy(), b, c, sd, sh, sw, pd, ph, pw, rz,
                     radius, radius, bool(dot))  # fmt: skip
    return out


def upsample_by_two(x: Tensor, out: Tensor) -> None:
    """Write the linear (``align_corners=False``) upsampling by exactly 2 of ``x`` ``(B, C, *S)`` into the
    first ``C`` channels of ``out`` ``(B, K, *2S)`` (contiguous, ``K >= C``, ``x``'s dtype). No autograd; call
    where :func:`applies_no_grad` is true for ``x``."""
    src = x.detach().contiguous()
    b, c, sd, sh, sw = _shape5(src.shape)
    if not out.is_contiguous() or out.dtype != src.dtype or out.shape[0] != b or out.shape[1] < c:
        raise ValueError("out must be a contiguous (B, K >= C, *2S) tensor of x's dtype")
    if tuple(out.shape[2:]) != tuple(2 * n for n in src.shape[2:]):
        raise ValueError(f"out's spatial size {tuple(out.shape[2:])} is not twice {tuple(src.shape[2:])}")
    with _LOCK:
        _threads()
        _upsample_by_two(_flat(src), out.detach().numpy().reshape(-1), b, c, out.shape[1], sd, sh, sw,
                         2 * sd if src.ndim == 5 else 1)  # fmt: skip
