"""The one preprocessing path from two images to the network's input, shared by training and inference.

Used by the bundles' :func:`~regnet_zoo.data.transforms.pair_transforms`, :func:`regnet_zoo.api.register`
(and so the MONAI Label app) and the benchmarks, so a network sees the same input when it is trained and
when it is used. In order:

1. **intensity normalisation** of each image on its own native grid (:func:`normalise_intensity`):
   ``"minmax"`` to [0, 1], ``"percentile"`` (``percentiles`` -> [0, 1], clipped), ``"ct"`` (Hounsfield
   ``ct_window`` -> [0, 1], clipped) or ``None``;
2. (optional) **pre-alignment**: the moving image is resampled through an affine found by
   :func:`regnet_zoo.core.affine.affine_register` (``pre_align`` ``"affine"`` / ``"rigid"``);
3. **resampling to the working grid** ``image_size`` (:func:`resize_image`): (bi/tri)linear with voxel
   centres corner-aligned (``align_corners=True``: voxel ``0`` and ``n - 1`` of both grids coincide), the
   convention of :func:`regnet_zoo.core.spatial.resize_ddf`, which brings a field predicted on the working
   grid back; axes that shrink are first Gaussian-smoothed (sigma ``(f - 1) / 2`` voxels for a factor ``f``:
   anti-aliasing). Labels are resampled with nearest neighbour on the same corner-aligned grid
   (:func:`resize_label`); the image's affine is updated to match (:func:`resized_affine`);
4. **zero padding** to a multiple of ``pad_multiple`` (:func:`pad_to_multiple`; symmetric, the extra voxel
   after), cropped off the predicted field afterwards.

:class:`Preprocessing` holds these settings; it is read from a bundle's config and stored in trained weights.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from regnet_zoo.core.padding import pad_to_multiple as core_pad_to_multiple
from regnet_zoo.core.spatial import identity_grid, sample_image

__all__ = [
    "AFFINE_STAGE_DEFAULTS",
    "NORMALISATIONS",
    "PRE_ALIGN",
    "DEFAULT_PAD_MULTIPLE",
    "Preprocessing",
    "normalise_intensity",
    "resize_image",
    "resize_label",
    "resized_affine",
    "pad_to_multiple",
    "network_inputs",
]

#: the affine stage's settings (``register`` and the bundles' ``pre_align``) beyond
#: :func:`regnet_zoo.core.affine.affine_register`'s defaults: a finest level of up to 2^17 fixed voxels. Its
#: default 8192 matches a 1 mm brain at about 8 mm, too coarse for pairs that are already roughly aligned: on
#: oasis3d_pair it lowered the evaluation-label Dice (0.522 -> 0.513) where SimpleITK's affine raises it
#: (0.527); at 2^17, 0.541 (benchmarks/results/affine.md).
AFFINE_STAGE_DEFAULTS: dict[str, Any] = {"max_voxels": 131072}

NORMALISATIONS = ("minmax", "percentile", "ct", None)
PRE_ALIGN = ("affine", "rigid", None)
#: networks see images padded to a multiple of this (unless the bundle's config sets ``pad_multiple``)
DEFAULT_PAD_MULTIPLE = 16


@dataclass(frozen=True)
class Preprocessing:
    """Preprocessing settings (module docstring); ``image_size`` None = the fixed image's own grid,
    ``pad_multiple`` None / 1 = no padding, ``pre_align`` None = no affine stage."""

    normalize: str | None = "minmax"
    percentiles: tuple[float, float] = (1.0, 99.0)
    ct_window: tuple[float, float] = (-1000.0, 1000.0)
    image_size: tuple[int, ...] | None = None
    pad_multiple: int | None = DEFAULT_PAD_MULTIPLE
    pre_align: str | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        normalize = None if self.normalize in (None, "none") else self.normalize
        if normalize not in NORMALISATIONS:
            raise ValueError(f"normalize must be 'minmax', 'percentile', 'ct' or None: {self.normalize!r}")
        pre_align = None if self.pre_align in (None, "none", False) else self.pre_align
        if pre_align not in PRE_ALIGN:
            raise ValueError(f"pre_align must be 'affine', 'rigid' or None, got {self.pre_align!r}")
        object.__setattr__(self, "normalize", normalize)
        object.__setattr__(self, "pre_align", pre_align)
        object.__setattr__(self, "percentiles", tuple(float(v) for v in self.percentiles))
        object.__setattr__(self, "ct_window", tuple(float(v) for v in self.ct_window))
        if self.image_size is not None:
            object.__setattr__(self, "image_size", tuple(int(v) for v in self.image_size))
        pad = int(self.pad_multiple) if self.pad_multiple else None
        object.__setattr__(self, "pad_multiple", pad if pad and pad > 1 else None)

    def size_for(self, spatial_dims: int) -> tuple[int, ...] | None:
        """``image_size`` as ``spatial_dims`` sizes (a single number is isotropic); None = native grid."""
        if self.image_size is None:
            return None
        size = self.image_size * spatial_dims if len(self.image_size) == 1 else self.image_size
        if len(size) != spatial_dims or min(size) < 1:
            raise ValueError(f"image_size {self.image_size} is not a {spatial_dims}D size")
        return tuple(size)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("extra")
        out["percentiles"], out["ct_window"] = list(self.percentiles), list(self.ct_window)
        out["image_size"] = list(self.image_size) if self.image_size is not None else None
        return out

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Preprocessing:
        known = {k: v for k, v in values.items() if k in cls.__dataclass_fields__ and k != "extra"}
        return cls(**known)


def normalise_intensity(
    image: Tensor,
    normalize: str | None = "minmax",
    percentiles: Sequence[float] = (1.0, 99.0),
    ct_window: Sequence[float] = (-1000.0, 1000.0),
) -> Tensor:
    """Intensities of ``image`` ``(C, *S)`` (all channels together) to [0, 1] -> float32 plain tensor.

    MONAI's ``ScaleIntensity`` / ``ScaleIntensityRangePercentiles`` / ``ScaleIntensityRange`` (see module
    docstring for the modes); a constant image maps to 0.
    """
    from monai.transforms import ScaleIntensity, ScaleIntensityRange, ScaleIntensityRangePercentiles

    data = image.as_tensor() if hasattr(image, "as_tensor") else torch.as_tensor(image)
    data = data.float()
    if normalize in (None, "none"):
        out = data
    elif normalize == "minmax":
        out = ScaleIntensity(minv=0.0, maxv=1.0)(data)
    elif normalize == "percentile":
        low, high = percentiles
        out = ScaleIntensityRangePercentiles(lower=low, upper=high, b_min=0.0, b_max=1.0, clip=True)(data)
    elif normalize == "ct":
        low, high = ct_window
        out = ScaleIntensityRange(a_min=low, a_max=high, b_min=0.0, b_max=1.0, clip=True)(data)
    else:
        raise ValueError(f"normalize must be 'minmax', 'percentile', 'ct' or None, got {normalize!r}")
    out = torch.as_tensor(out)
    return (out.as_tensor() if hasattr(out, "as_tensor") else out).float()


def _corner_coords(old: Sequence[int], new: Sequence[int], device, dtype) -> Tensor:
    """Voxel coordinates ``(1, N, *new)`` in the old grid of the new grid's voxels (corner-aligned)."""
    scale = [(o - 1) / (n - 1) if n > 1 else 0.0 for o, n in zip(old, new, strict=True)]
    coords = identity_grid(new, device=device, dtype=dtype)
    return coords * torch.tensor(scale, device=device, dtype=dtype).view(1, -1, *([1] * len(new)))


def _antialias(image: Tensor, size: Sequence[int]) -> Tensor:
    """Gaussian smoothing of ``image`` ``(B, C, *S)`` along the axes that shrink to ``size``: sigma
    ``(f - 1) / 2`` voxels for a shrink factor ``f`` (as scikit-image's ``resize(anti_aliasing=True)``),
    replicated border."""
    out = image
    for axis, (old, new) in enumerate(zip(image.shape[2:], size, strict=True)):
        factor = (old - 1) / (new - 1) if new > 1 else float(old)
        sigma = (factor - 1) / 2
        if sigma <= 0.1:
            continue
        radius = int(math.ceil(3 * sigma))
        x = torch.arange(-radius, radius + 1, dtype=out.dtype, device=out.device)
        kernel = torch.exp(-0.5 * (x / sigma) ** 2)
        kernel = kernel / kernel.sum()
        moved = torch.movedim(out, axis + 2, -1)
        shape = moved.shape
        flat = F.pad(moved.reshape(-1, 1, shape[-1]), (radius, radius), mode="replicate")
        out = torch.movedim(F.conv1d(flat, kernel.view(1, 1, -1)).reshape(shape), -1, axis + 2)
    return out


def resize_image(image: Tensor, size: Sequence[int]) -> Tensor:
    """Linear resampling of ``image`` ``(B, C, *S)`` to ``size``, corner-aligned (``align_corners=True``);
    axes that shrink are Gaussian-smoothed first (anti-aliasing, :func:`_antialias`)."""
    size = tuple(int(s) for s in size)
    if tuple(image.shape[2:]) == size:
        return image
    mode = "bilinear" if image.ndim == 4 else "trilinear"
    smoothed = _antialias(image.float(), size)
    return F.interpolate(smoothed, size=size, mode=mode, align_corners=True)


def resize_label(label: Tensor, size: Sequence[int]) -> Tensor:
    """Nearest-neighbour resampling of ``label`` ``(B, C, *S)`` to ``size`` on the corner-aligned grid of
    :func:`resize_image`; keeps the dtype."""
    size = tuple(int(s) for s in size)
    if tuple(label.shape[2:]) == size:
        return label
    coords = _corner_coords(label.shape[2:], size, label.device, torch.float32)
    out = sample_image(label.float(), coords.expand(label.shape[0], *coords.shape[1:]), mode="nearest")
    return out.round().to(label.dtype)


def resized_affine(affine: np.ndarray | Tensor, old: Sequence[int], new: Sequence[int]) -> np.ndarray:
    """The voxel -> world affine of the corner-aligned resized grid: ``affine @ diag(scale, 1)`` with
    ``scale_i = (old_i - 1) / (new_i - 1)`` (the physical extent between the corner voxels is kept)."""
    a = np.asarray(affine.detach().cpu() if isinstance(affine, Tensor) else affine, dtype=np.float64).copy()
    for i, (o, n) in enumerate(zip(old, new, strict=True)):
        a[:, i] *= (o - 1) / (n - 1) if n > 1 else 1.0
    return a


def pad_to_multiple(x: Tensor, multiple: int | None) -> tuple[Tensor, tuple[slice, ...]]:
    """Zero-pad ``(B, C, *S)`` symmetrically (the odd voxel after) to a multiple of ``multiple`` (as MONAI's
    ``DivisiblePad``; ``None``: none); the slices that crop back (``core.padding.pad_to_multiple``)."""
    return core_pad_to_multiple(x, int(multiple) if multiple and multiple > 1 else 1, centred=True)


def network_inputs(
    fixed: Tensor, moving: Tensor, prep: Preprocessing
) -> tuple[Tensor, Tensor, tuple[slice, ...]]:
    """Normalised fixed / moving ``(C, *S)`` on one grid -> padded network inputs ``(1, C, *P)`` on the
    working grid, and the crop that takes a field on the padded grid back to the working grid."""
    spatial_dims = fixed.ndim - 1
    size = prep.size_for(spatial_dims)
    fixed_in, moving_in = fixed[None].float(), moving[None].float()
    if size is not None:
        fixed_in, moving_in = resize_image(fixed_in, size), resize_image(moving_in, size)
    fixed_p, crop = pad_to_multiple(fixed_in, prep.pad_multiple)
    moving_p, _ = pad_to_multiple(moving_in, prep.pad_multiple)
    return fixed_p, moving_p, crop
