"""Contrast-agnostic synthetic training pairs (the SynthMorph recipe, Hoffmann et al., IEEE TMI 2022).

Nothing is read from disk: every pair is drawn on the fly from a seed.

1. **Label map**: ``num_labels`` smooth random noise images (Gaussian noise on a coarse grid, upsampled), each
   warped by its own smooth random diffeomorphism; the label of a voxel is the channel with the largest value.
2. **Pair geometry**: the label map is the *moving* label map; a random transform ``x -> x + ddf(x)`` (an
   affine part about the centre plus a smooth diffeomorphic part, scaling and squaring of a random SVF) gives
   the *fixed* one, ``fixed_label(x) = moving_label(x + ddf(x))`` (nearest neighbour). ``ddf`` is therefore
   the ground-truth field in the README convention, which supervised methods (RegNet) can use.
3. **Images**: each image is rendered from its own label map with its **own** random intensity per label
   (fixed and moving never share a contrast), Gaussian blur, a smooth multiplicative bias field, Gaussian
   noise and a random gamma, then scaled to ``[0, 1]``.

Labels come with every pair, so label-supervised methods train on it as well as unsupervised ones.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from monai.networks.layers import GaussianFilter
from torch import Tensor
from torch.utils.data import Dataset

from regnet_zoo.core.geometry import affine_ddf
from regnet_zoo.core.integration import scaling_and_squaring
from regnet_zoo.core.spatial import compose_ddf, resize_ddf, warp_image, warp_labels
from regnet_zoo.data.synthetic import make_generator, random_svf

__all__ = ["SynthSettings", "synth_label_map", "synth_image", "synth_pair", "SynthPairDataset"]


@dataclass(frozen=True)
class SynthSettings:
    """Ranges of the generator (voxel units unless stated), chosen for the small grids this project trains
    on."""

    num_labels: int = 16
    noise_grid: tuple[int, int] = (4, 12)  # coarse noise grid size per axis (smaller: larger structures)
    label_warp: float = 3.0  # max velocity of each label channel's own deformation
    rotation_deg: float = 10.0
    scaling: float = 0.08  # relative
    shear: float = 0.04
    translation: float = 0.05  # fraction of the image size
    max_velocity: float = 3.0  # of the smooth part of the pair transform
    svf_sigma: float = 8.0
    blur_sigma: tuple[float, float] = (0.0, 1.0)
    bias_strength: float = 0.3  # std of the log bias field
    noise_std: tuple[float, float] = (0.0, 0.05)
    gamma_std: float = 0.25  # std of log gamma


def _uniform(gen: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand((), generator=gen))


def _smooth_noise(shape: Sequence[int], channels: int, grid: int, gen: torch.Generator) -> Tensor:
    """Gaussian noise on a ``grid``-per-axis lattice, upsampled (cubic-like, linear twice) to ``shape`` ->
    ``(1, channels, *shape)``."""
    coarse = torch.randn(1, channels, *[grid] * len(shape), generator=gen)
    mode = "bilinear" if len(shape) == 2 else "trilinear"
    return F.interpolate(coarse, size=tuple(shape), mode=mode, align_corners=True)


def synth_label_map(
    shape: Sequence[int],
    settings: SynthSettings = SynthSettings(),
    generator: int | torch.Generator | None = 0,
) -> Tensor:
    """Random label map ``(1, *shape)`` int64 with values in ``0 .. num_labels - 1``."""
    gen = make_generator(generator)
    shape = [int(s) for s in shape]
    grid = int(torch.randint(settings.noise_grid[0], settings.noise_grid[1] + 1, (1,), generator=gen))
    noise = _smooth_noise(shape, settings.num_labels, grid, gen)
    # each channel its own smooth deformation, so label boundaries are not just level sets of one field; the
    # fields are smooth, so they are drawn and integrated on a grid 4x coarser and resized (cheap in 3D)
    coarse = [max(4, s // 4) for s in shape]
    factor = max(s / c for s, c in zip(shape, coarse, strict=True))
    svf = torch.stack(
        [
            random_svf(coarse, sigma=8.0 / factor, max_velocity=settings.label_warp / factor, generator=gen)
            for _ in range(settings.num_labels)
        ]
    )
    ddf = resize_ddf(scaling_and_squaring(svf), shape)
    warped = warp_image(noise.transpose(0, 1), ddf).transpose(0, 1)
    return warped.argmax(dim=1)


def _random_affine(shape: Sequence[int], settings: SynthSettings, gen: torch.Generator) -> Tensor:
    """``(N+1, N+1)`` voxel-space affine about the grid centre."""
    n = len(shape)
    angles = [math.radians(_uniform(gen, -settings.rotation_deg, settings.rotation_deg)) for _ in range(3)]
    rot = torch.eye(n, dtype=torch.float64)
    planes = [(0, 1)] if n == 2 else [(0, 1), (0, 2), (1, 2)]
    for (i, j), angle in zip(planes, angles, strict=False):
        r = torch.eye(n, dtype=torch.float64)
        r[i, i] = r[j, j] = math.cos(angle)
        r[i, j], r[j, i] = -math.sin(angle), math.sin(angle)
        rot = r @ rot
    scale = torch.diag(
        torch.tensor([1 + _uniform(gen, -settings.scaling, settings.scaling) for _ in range(n)])
    )
    shear = torch.eye(n, dtype=torch.float64)
    for i in range(n):
        for j in range(n):
            if i != j:
                shear[i, j] = _uniform(gen, -settings.shear, settings.shear)
    linear = rot @ scale.double() @ shear
    centre = (torch.tensor(shape, dtype=torch.float64) - 1) / 2
    shift = torch.tensor([_uniform(gen, -settings.translation, settings.translation) * s for s in shape])
    matrix = torch.eye(n + 1, dtype=torch.float64)
    matrix[:n, :n] = linear
    matrix[:n, n] = centre - linear @ centre + shift.double()
    return matrix


def synth_image(
    labels: Tensor, settings: SynthSettings = SynthSettings(), generator: int | torch.Generator | None = 0
) -> Tensor:
    """Render ``labels`` ``(1, *S)`` as an image ``(1, *S)`` in ``[0, 1]``, a random contrast per label."""
    gen = make_generator(generator)
    n = labels.ndim - 1
    means = torch.rand(settings.num_labels, generator=gen)
    stds = torch.rand(settings.num_labels, generator=gen) * 0.05
    lab = labels.long().clamp(0, settings.num_labels - 1)
    image = means[lab] + stds[lab] * torch.randn(lab.shape, generator=gen)
    sigma = _uniform(gen, *settings.blur_sigma)
    if sigma > 0.05:
        image = GaussianFilter(n, sigma)(image[None].float())[0]
    log_bias = _smooth_noise(labels.shape[1:], 1, 4, gen)[0] * settings.bias_strength
    image = image * torch.exp(log_bias)
    image = image + _uniform(gen, *settings.noise_std) * torch.randn(image.shape, generator=gen)
    image = (image - image.min()) / (image.max() - image.min()).clamp_min(1e-6)
    gamma = math.exp(settings.gamma_std * float(torch.randn((), generator=gen)))
    return image.clamp(0, 1) ** gamma


def synth_pair(
    shape: Sequence[int],
    settings: SynthSettings = SynthSettings(),
    generator: int | torch.Generator | None = 0,
) -> dict[str, Tensor]:
    """One training pair: ``fixed``, ``moving`` ``(1, *S)`` float in [0, 1], ``fixed_label``, ``moving_label``
    ``(1, *S)`` int64, ``ddf`` ``(N, *S)`` voxel units with ``moving_label(x + ddf(x)) = fixed_label(x)``."""
    gen = make_generator(generator)
    shape = [int(s) for s in shape]
    if len(shape) not in (2, 3):
        raise ValueError(f"shape must have 2 or 3 entries, got {shape}")
    moving_label = synth_label_map(shape, settings, gen)
    affine = affine_ddf(_random_affine(shape, settings, gen), shape)
    svf = random_svf(shape, sigma=settings.svf_sigma, max_velocity=settings.max_velocity, generator=gen)
    # x -> A(phi(x)): the smooth part first, then the affine part
    ddf = compose_ddf(affine, scaling_and_squaring(svf[None]))
    fixed_label = warp_labels(moving_label[None], ddf, method="nearest", padding_mode="zeros")[0]
    return {
        "fixed": synth_image(fixed_label, settings, gen),
        "moving": synth_image(moving_label, settings, gen),
        "fixed_label": fixed_label,
        "moving_label": moving_label,
        "ddf": ddf[0],
    }


class SynthPairDataset(Dataset):
    """``length`` synthetic pairs of ``shape``, item ``i`` drawn from seed ``(seed, i)``: reproducible, made
    on the fly, the same in every epoch and on every worker."""

    def __init__(
        self,
        shape: Sequence[int],
        length: int = 1000,
        seed: int = 0,
        settings: SynthSettings = SynthSettings(),
    ):
        self.shape, self.length, self.seed, self.settings = (
            [int(s) for s in shape],
            int(length),
            seed,
            settings,
        )

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        if not 0 <= index < self.length:
            raise IndexError(index)
        return synth_pair(self.shape, self.settings, generator=self.seed * 1_000_003 + int(index))
