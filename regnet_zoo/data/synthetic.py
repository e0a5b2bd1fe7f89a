"""Synthetic deformations for self-supervised training (RegNet, Sokooti et al. 2017, Sect. 2.2).

RegNet's recipe for a synthetic displacement vector field (DVF) of an image:

1. a zero vector field the size of the image;
2. ``P`` randomly chosen voxels get displacement components drawn uniformly from ``[-theta, +theta]`` (mm);
3. the field is smoothed with a Gaussian of standard deviation ``sigma`` (mm).

Presets (paper): low ``sigma=35, P=80``, medium ``sigma=25, P=100``, high ``sigma=20, P=100``, all
``theta=8`` mm; the deformed *moving* images of the second step use ``sigma=35, P=100`` ("moving").

Completion: smoothing ``P`` spikes with a wide Gaussian shrinks them by orders of magnitude, and the paper
does not say how the amplitude is restored. As in the authors' public code (``SyntheticDeformation.py``),
each smoothed component is rescaled linearly, its positive part so that its maximum equals the largest
value sampled for that component in step 2, its negative part so that its minimum equals the smallest
(so every component stays within ``[-theta, theta]`` mm). Not reproduced from that code: its two
zero-displacement points and its border margin for the point positions.
The Gaussian is evaluated exactly (as a sum of separable Gaussians centred on the ``P`` points), which is
the zero-padded convolution of step 3 without kernel truncation.

Fields are returned in the README convention: ``(N, *S)`` voxel units, channel ``i`` along array axis ``i``,
``warped(x) = image(x + ddf(x))``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from regnet_zoo.core.geometry import spacing_from_affine
from regnet_zoo.core.integration import scaling_and_squaring
from regnet_zoo.core.spatial import warp_image, warp_labels

__all__ = [
    "REGNET_PRESETS",
    "make_generator",
    "spacing_of",
    "smooth_points_field",
    "synthetic_dvf",
    "random_svf",
    "deform_pair",
]

REGNET_PRESETS: dict[str, dict[str, float]] = {
    "low": {"sigma": 35.0, "n_points": 80, "theta": 8.0},
    "medium": {"sigma": 25.0, "n_points": 100, "theta": 8.0},
    "high": {"sigma": 20.0, "n_points": 100, "theta": 8.0},
    "moving": {"sigma": 35.0, "n_points": 100, "theta": 8.0},  # step 2: new moving images, low frequency only
}


def make_generator(seed: int | torch.Generator | None) -> torch.Generator:
    """A CPU ``torch.Generator``: passed through, seeded from an int, or freshly seeded from torch's RNG."""
    if isinstance(seed, torch.Generator):
        return seed
    gen = torch.Generator()
    gen.manual_seed(int(torch.randint(0, 2**62, (1,)).item()) if seed is None else int(seed))
    return gen


def spacing_of(
    image: Tensor | None, spatial_dims: int, spacing: Sequence[float] | float | None = None
) -> Tensor:
    """Voxel spacing (mm) per array axis: ``spacing`` if given, else from a ``MetaTensor`` affine, else 1."""
    if spacing is not None:
        values = [float(spacing)] * spatial_dims if np.isscalar(spacing) else [float(s) for s in spacing]
        if len(values) != spatial_dims:
            raise ValueError(f"spacing needs {spatial_dims} values, got {values}")
        return torch.tensor(values, dtype=torch.float64)
    if getattr(image, "affine", None) is not None:
        return torch.tensor(spacing_from_affine(image.affine, spatial_dims), dtype=torch.float64)
    return torch.ones(spatial_dims, dtype=torch.float64)


def smooth_points_field(
    shape: Sequence[int], points: Tensor, values: Tensor, sigma_voxels: Tensor | Sequence[float]
) -> Tensor:
    """Sum of Gaussians ``sum_p values[:, p] * exp(-|(x - points[p]) / sigma|^2 / 2)`` -> ``(C, *shape)``.

    ``points`` ``(P, N)`` voxel coordinates, ``values`` ``(C, P)``, ``sigma_voxels`` ``(N,)`` per axis.
    Separable: one 1D Gaussian per axis and point; the sum over points is one matrix product (exact, no
    kernel truncation).
    """
    n = len(shape)
    if n not in (2, 3):
        raise ValueError(f"shape must have 2 or 3 entries, got {list(shape)}")
    sigma = torch.as_tensor(sigma_voxels, dtype=torch.float64).expand(n)
    factors = []
    for axis in range(n):
        x = torch.arange(shape[axis], dtype=torch.float64)
        factors.append(torch.exp(-0.5 * ((x[None, :] - points[:, axis, None].double()) / sigma[axis]) ** 2))
    channels, count = values.shape
    first = (values.double()[:, :, None] * factors[0][None]).transpose(1, 2).reshape(-1, count)  # (C*S0, P)
    rest = factors[1] if n == 2 else (factors[1][:, :, None] * factors[2][:, None, :]).reshape(count, -1)
    return (first @ rest).reshape(channels, *[int(s) for s in shape])


def synthetic_dvf(
    shape: Sequence[int],
    spacing: Sequence[float] | float | None = None,
    preset: str = "medium",
    *,
    sigma: float | None = None,
    n_points: int | None = None,
    theta: float | None = None,
    generator: int | torch.Generator | None = None,
) -> Tensor:
    """RegNet synthetic DVF ``(N, *shape)`` in voxel units (float32).

    ``preset``: ``"low"`` / ``"medium"`` / ``"high"`` / ``"moving"``; ``sigma`` (mm), ``n_points`` (P) and
    ``theta`` (mm) override it. ``spacing`` (mm per array axis, default 1) converts mm to voxels.
    """
    if preset not in REGNET_PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(REGNET_PRESETS)}")
    params = dict(REGNET_PRESETS[preset])
    for name, value in (("sigma", sigma), ("n_points", n_points), ("theta", theta)):
        if value is not None:
            params[name] = value
    shape = [int(s) for s in shape]
    n = len(shape)
    if n not in (2, 3):
        raise ValueError(f"shape must have 2 or 3 entries, got {shape}")
    spacing_mm = spacing_of(None, n, spacing)
    gen = make_generator(generator)
    count = int(min(params["n_points"], int(np.prod(shape))))
    flat = torch.randperm(int(np.prod(shape)), generator=gen)[:count]
    # numpy's unravel_index: torch's imports sympy (seconds) on first use
    points = torch.as_tensor(np.stack(np.unravel_index(flat.numpy(), shape), axis=1), dtype=torch.float64)
    values_mm = (torch.rand(n, count, generator=gen, dtype=torch.float64) * 2 - 1) * params["theta"]
    field = smooth_points_field(shape, points, values_mm, params["sigma"] / spacing_mm)
    # restore the sampled amplitude per component and sign (see module docstring)
    view = (n, *[1] * n)
    top = values_mm.amax(dim=1).clamp_min(0) / field.flatten(1).amax(dim=1).clamp_min(1e-30)
    bottom = values_mm.amin(dim=1).clamp_max(0) / field.flatten(1).amin(dim=1).clamp_max(-1e-30)
    field = torch.where(field > 0, field * top.view(view), field * bottom.view(view))
    return (field / spacing_mm.view(n, *[1] * n)).float()


def random_svf(
    shape: Sequence[int],
    spacing: Sequence[float] | float | None = None,
    *,
    sigma: float = 12.0,
    n_points: int = 64,
    max_velocity: float = 4.0,
    generator: int | torch.Generator | None = None,
) -> Tensor:
    """Smooth random stationary velocity field ``(N, *shape)``, voxel units (float32).

    Random vectors at ``n_points`` random voxels, smoothed with a Gaussian of ``sigma`` mm, scaled so that the
    largest vector has length ``max_velocity`` mm. Integrate with
    ``regnet_zoo.core.integration.scaling_and_squaring`` for a diffeomorphic DDF.
    """
    shape = [int(s) for s in shape]
    n = len(shape)
    spacing_mm = spacing_of(None, n, spacing)
    gen = make_generator(generator)
    points = torch.rand(n_points, n, generator=gen, dtype=torch.float64) * (torch.tensor(shape) - 1)
    values = torch.randn(n, n_points, generator=gen, dtype=torch.float64)
    field_mm = smooth_points_field(shape, points, values, sigma / spacing_mm)
    # the largest vector length (a plain sum of squares: torch.linalg.norm over dim 0 is slow on CPU)
    field_mm = field_mm * (max_velocity / field_mm.square().sum(0).max().sqrt().clamp_min(1e-30))
    return (field_mm / spacing_mm.view(n, *[1] * n)).float()


def _plain(x) -> Tensor:
    """A plain ``torch.Tensor`` (MONAI ``MetaTensor`` metadata dropped)."""
    return x.as_tensor() if hasattr(x, "as_tensor") else torch.as_tensor(x)


def deform_pair(
    image: Tensor,
    label: Tensor | None = None,
    *,
    ddf: Tensor | None = None,
    preset: str = "medium",
    spacing: Sequence[float] | float | None = None,
    diffeomorphic: bool = False,
    mode: str = "cubic",
    noise_std: float = 0.0,
    generator: int | torch.Generator | None = None,
    **dvf_kwargs,
) -> dict[str, Tensor]:
    """Make a training pair with a known deformation from one channel-first image ``(C, *S)``.

    The deformed image is the **fixed** image, as in RegNet: ``fixed(x) = image(x + ddf(x))`` (cubic B-spline
    interpolation by default, as in the paper), plus Gaussian noise of ``noise_std`` (the paper: 5 HU).
    So ``ddf`` is the ground-truth fixed->moving displacement in the README convention, ``moving = image``.

    ``ddf``: a given field ``(N, *S)``; otherwise :func:`synthetic_dvf` with ``preset`` / ``dvf_kwargs``,
    or, with ``diffeomorphic=True``, ``scaling_and_squaring`` of :func:`random_svf`. Spacing (mm) defaults
    to the ``MetaTensor``'s. Returns plain tensors ``fixed``, ``moving`` ``(C, *S)``, ``ddf`` ``(N, *S)``
    and, with ``label`` ``(1, *S)``, ``fixed_label`` (nearest-neighbour warped) and ``moving_label``.
    """
    n = image.ndim - 1
    if n not in (2, 3):
        raise ValueError(
            f"image must be channel-first (C, *S) with 2 or 3 spatial dims, got {tuple(image.shape)}"
        )
    shape = tuple(image.shape[1:])
    gen = make_generator(generator)
    spacing_mm = spacing_of(image, n, spacing)
    if ddf is None:
        if diffeomorphic:
            svf = random_svf(shape, spacing_mm.tolist(), generator=gen, **dvf_kwargs)
            ddf = scaling_and_squaring(svf[None])[0]
        else:
            ddf = synthetic_dvf(shape, spacing_mm.tolist(), preset, generator=gen, **dvf_kwargs)
    if tuple(ddf.shape) != (n, *shape):
        raise ValueError(f"ddf must be {(n, *shape)}, got {tuple(ddf.shape)}")
    moving = _plain(image).float()
    ddf = _plain(ddf).to(moving.dtype)
    fixed = warp_image(moving[None], ddf[None], mode=mode)[0]
    if noise_std > 0:
        fixed = fixed + noise_std * torch.randn(fixed.shape, generator=gen)
    out = {"fixed": fixed, "moving": moving, "ddf": ddf}
    if label is not None:
        lab = _plain(label)
        out["fixed_label"] = warp_labels(lab.long()[None], ddf[None], method="nearest")[0]
        out["moving_label"] = lab.long()
    return out
