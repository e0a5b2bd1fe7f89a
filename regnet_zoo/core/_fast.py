"""Fast CPU kernels (numba) for linear / nearest sampling, warping and composition of fields.

Same semantics as ``torch.nn.functional.grid_sample(..., align_corners=True)`` at voxel coordinates (see
``core.spatial``): ``"border"`` clamps coordinates to ``[0, n-1]`` (zero gradient at and beyond the clamp),
``"zeros"`` drops out-of-grid corners, nearest rounds half to even, an axis of size 1 always samples index 0.
The kernels take a displacement in voxel units and add the identity on the fly (no normalised grid tensor is
built), and compositions ``second + first∘(id + second)`` are one pass. Gradients (w.r.t. image and
coordinates / displacement) come from a matching backward kernel; double backward is not supported.

Used for contiguous-or-not CPU float32 / float64 tensors when numba imports; anything else (no numba,
GPU tensors, other dtypes, tracing / compiling, ``REGNET_ZOO_FAST=0``) falls back to ``grid_sample``.
Scalar arithmetic is done in float64 and stored in the tensor's dtype. Threads: numba uses
``torch.get_num_threads()`` (capped by numba's own limit). The backward pass scatters image gradients into one
private buffer per worker (at most ``_MAX_BUFFERS``), summed afterwards.
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

__all__ = ["available", "applies", "sample", "disabled"]

_ENV = "REGNET_ZOO_FAST"
_MAX_BUFFERS = 8
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


# --------------------------------------------------------------------------------------------- kernels
# One kernel pair serves 2D and 3D: a 2D problem runs as 3D with a depth of 1 (the z axis then always samples
# index 0 with weight 1). Arrays are passed flat with explicit shapes; flat unsigned indices avoid numba's
# per-axis negative-index wraparound, which made multi-index gathers about 3x slower.
if numba is not None:
    _pjit = njit(parallel=True, cache=True, fastmath=False, nogil=True)

    @njit(inline="always", cache=True, fastmath=False)
    def _axis(x, n, zeros, nearest):
        """One axis: ``(i0, i1, w0, w1, d0, d1)``: corner indices, weights, and d weight / d x.

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
        i0 = 0
        i1 = 0
        if f >= 0.0 and f <= n - 1.0:  # out-of-grid corners get weight 0 (and a safe index)
            i0 = int(f)
        else:
            w0 = 0.0
            d0 = 0.0
        if f >= -1.0 and f <= n - 2.0:
            i1 = int(f) + 1
        else:
            w1 = 0.0
            d1 = 0.0
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

    @_pjit
    def _forward(img, pts, out, ishape, pshape, oshape, relative, residual, zeros, nearest):
        bi_n, nc, sd, sh, sw = ishape
        bp_n, nd = pshape[0], pshape[1]
        nb, _, td, th, tw = oshape
        vs, vt, shw = sd * sh * sw, td * th * tw, sh * sw
        for row in prange(nb * td * th):
            b = row // (td * th)
            k = (row // th) % td
            j = row % th
            bi = b if bi_n > 1 else 0
            bp = b if bp_n > 1 else 0
            pbase = bp * nd * vt + (k * th + j) * tw
            # channels outside the voxel loop (weights recomputed per channel): a channel loop inside the
            # voxel loop made the whole kernel ~3x slower, even for one channel
            for c in range(nc):
                ib = (bi * nc + c) * vs
                obase = (b * nc + c) * vt + (k * th + j) * tw
                for i in range(tw):
                    z, y, x = _coords(pts, pbase + i, vt, nd, k, j, i, relative)
                    z0, z1, wz0, wz1, _a, _b = _axis(z, sd, zeros, nearest)
                    y0, y1, wy0, wy1, _c, _d = _axis(y, sh, zeros, nearest)
                    x0, x1, wx0, wx1, _e, _f = _axis(x, sw, zeros, nearest)
                    r00, r01 = z0 * shw + y0 * sw, z0 * shw + y1 * sw
                    r10, r11 = z1 * shw + y0 * sw, z1 * shw + y1 * sw
                    v = _lerp(img, ib, r00, r01, r10, r11, x0, x1, wz0, wz1, wy0, wy1, wx0, wx1, nearest)
                    if residual:
                        v += pts[np.uint64(pbase + c * vt + i)]
                    out[np.uint64(obase + i)] = v

    @njit(inline="always", cache=True, fastmath=False)
    def _backward_channel(img, g, ib, go, r00, r01, r10, r11, x0, x1, wz0, wz1, wy0, wy1, wx0, wx1, dz0, dz1,
                          dy0, dy1, dx0, dx1, nearest, need_img, need_pts):  # fmt: skip
        """One channel of one voxel: scatter ``go`` into ``g``; return its (z, y, x) coordinate gradient."""
        gz = 0.0
        gy = 0.0
        gx = 0.0
        if need_img:
            if nearest:
                g[np.uint64(ib + r00 + x0)] += wz0 * wy0 * wx0 * go
            else:
                q = go * wz0 * wy0
                g[np.uint64(ib + r00 + x0)] += q * wx0
                g[np.uint64(ib + r00 + x1)] += q * wx1
                q = go * wz0 * wy1
                g[np.uint64(ib + r01 + x0)] += q * wx0
                g[np.uint64(ib + r01 + x1)] += q * wx1
                q = go * wz1 * wy0
                g[np.uint64(ib + r10 + x0)] += q * wx0
                g[np.uint64(ib + r10 + x1)] += q * wx1
                q = go * wz1 * wy1
                g[np.uint64(ib + r11 + x0)] += q * wx0
                g[np.uint64(ib + r11 + x1)] += q * wx1
        if need_pts and not nearest:
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
    def _backward(img, pts, gout, gimg, gpts, ishape, pshape, oshape, relative, zeros, nearest, need_img,
                  need_pts):  # fmt: skip
        """``gimg``: ``(K, Bi*C*Vs)`` per-worker buffers (added to); ``gpts``: flat ``(B, N, *T)``."""
        bi_n, nc, sd, sh, sw = ishape
        bp_n, nd = pshape[0], pshape[1]
        nb, _, td, th, tw = oshape
        vs, vt, shw = sd * sh * sw, td * th * tw, sh * sw
        nrows = nb * td * th
        nbuf = gimg.shape[0]
        for part in prange(nbuf):
            g = gimg[part]
            for row in range(part * nrows // nbuf, (part + 1) * nrows // nbuf):
                b = row // (td * th)
                k = (row // th) % td
                j = row % th
                bi = b if bi_n > 1 else 0
                bp = b if bp_n > 1 else 0
                pbase = bp * nd * vt + (k * th + j) * tw
                gbase = b * nd * vt + (k * th + j) * tw
                for c in range(nc):  # channels outside the voxel loop, as in _forward
                    ib = (bi * nc + c) * vs
                    obase = (b * nc + c) * vt + (k * th + j) * tw
                    for i in range(tw):
                        z, y, x = _coords(pts, pbase + i, vt, nd, k, j, i, relative)
                        z0, z1, wz0, wz1, dz0, dz1 = _axis(z, sd, zeros, nearest)
                        y0, y1, wy0, wy1, dy0, dy1 = _axis(y, sh, zeros, nearest)
                        x0, x1, wx0, wx1, dx0, dx1 = _axis(x, sw, zeros, nearest)
                        r00, r01 = z0 * shw + y0 * sw, z0 * shw + y1 * sw
                        r10, r11 = z1 * shw + y0 * sw, z1 * shw + y1 * sw
                        go = np.float64(gout[np.uint64(obase + i)])
                        gz, gy, gx = _backward_channel(
                            img, g, ib, go, r00, r01, r10, r11, x0, x1, wz0, wz1, wy0, wy1, wx0, wx1,
                            dz0, dz1, dy0, dy1, dx0, dx1, nearest, need_img, need_pts,
                        )  # fmt: skip
                        if need_pts:
                            if c > 0:  # sum over channels (written by channel 0)
                                if nd == 3:
                                    gz += gpts[np.uint64(gbase + i)]
                                    gy += gpts[np.uint64(gbase + vt + i)]
                                    gx += gpts[np.uint64(gbase + 2 * vt + i)]
                                else:
                                    gy += gpts[np.uint64(gbase + i)]
                                    gx += gpts[np.uint64(gbase + vt + i)]
                            if nd == 3:
                                gpts[np.uint64(gbase + i)] = gz
                                gpts[np.uint64(gbase + vt + i)] = gy
                                gpts[np.uint64(gbase + 2 * vt + i)] = gx
                            else:
                                gpts[np.uint64(gbase + i)] = gy
                                gpts[np.uint64(gbase + vt + i)] = gx


def _shape5(t: Tensor) -> tuple[int, int, int, int, int]:
    """``(B, C, D, H, W)`` of a 2D ``(B, C, H, W)`` (depth 1) or 3D tensor."""
    return tuple(t.shape) if t.ndim == 5 else (t.shape[0], t.shape[1], 1, t.shape[2], t.shape[3])


def _threads() -> int:
    n = max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))
    numba.set_num_threads(n)
    return n


def _run_forward(image, points, relative, residual, zeros, nearest):
    nb = max(image.shape[0], points.shape[0])
    channels = image.shape[1]
    out = torch.empty((nb, channels, *points.shape[2:]), dtype=image.dtype)
    with _LOCK:
        _threads()
        _forward(
            image.numpy().ravel(), points.numpy().ravel(), out.numpy().ravel(),
            _shape5(image), _shape5(points), _shape5(out), relative, residual, zeros, nearest,
        )  # fmt: skip
    return out


class _SampleFunction(torch.autograd.Function):
    """``out = image(points [+ id]) [+ points]`` with the kernels above (see :func:`sample`)."""

    @staticmethod
    def forward(ctx, image, points, relative, residual, zeros, nearest):
        image, points = image.detach().contiguous(), points.detach().contiguous()
        ctx.save_for_backward(image, points)
        ctx.flags = (relative, residual, zeros, nearest)
        return _run_forward(image, points, relative, residual, zeros, nearest)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        image, points = ctx.saved_tensors
        relative, residual, zeros, nearest = ctx.flags
        need_img, need_pts = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if not (need_img or need_pts):
            return None, None, None, None, None, None
        grad_out = grad_out.contiguous()
        nb = grad_out.shape[0]
        with _LOCK:
            nbuf = min(_threads(), _MAX_BUFFERS) if need_img else 1
            # one private scatter buffer per worker (no atomics needed); summed below
            gimg = torch.zeros((nbuf, image.numel()) if need_img else (1, 1), dtype=image.dtype)
            gpts = torch.empty((nb, *points.shape[1:]) if need_pts else (1,), dtype=image.dtype)
            _backward(
                image.numpy().ravel(), points.numpy().ravel(), grad_out.numpy().ravel(), gimg.numpy(),
                gpts.numpy().ravel(), _shape5(image), _shape5(points), _shape5(grad_out),
                relative, zeros, nearest, need_img, need_pts,
            )  # fmt: skip
        grad_image = (gimg[0] if nbuf == 1 else gimg.sum(0)).view(image.shape) if need_img else None
        grad_points = None
        if need_pts:
            if nearest:
                gpts.zero_()
            if residual:
                gpts += grad_out
            grad_points = gpts if points.shape[0] == nb else gpts.sum(0, keepdim=True)
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
