"""RegNet's supervised training crops from single images (Sokooti et al., MICCAI 2017, Sect. 2.2 and 3.2).

A MONAI dictionary transform: one image -> a synthetically deformed ``fixed`` / ``moving`` crop with its
ground-truth field (see :mod:`regnet_zoo.data.synthetic` for the deformations).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from monai.transforms import MapTransform, Randomizable

from regnet_zoo.data.synthetic import REGNET_PRESETS, deform_pair, spacing_of
from regnet_zoo.networks.regnet import CONTEXT_BEFORE

__all__ = ["RegNetSyntheticCropd"]


class RegNetSyntheticCropd(Randomizable, MapTransform):
    """One image -> a supervised RegNet training crop (Sokooti et al. 2017, Sect. 2.2 and 3.2).

    Per call: with probability ``deform_moving_prob`` the image is first deformed by a low-frequency field
    (preset ``"moving"``: sigma 35 mm, P 100, theta 8 mm, noise ``moving_noise_std``): a new moving image;
    then a field of a random preset among ``presets`` (low / medium / high frequency) deforms the moving image
    into the fixed image (cubic B-spline, noise ``fixed_noise_std``); every axis is flipped with probability
    ``flip_prob`` (the flipped DDF component changes sign); Gaussian noise ``augment_noise_std`` is added to
    both images; finally a ``crop_size``^N crop is cut around a random centre (inside the mask
    ``data[mask_key]`` when the item has one); where the crop reaches past the image, the images are extended
    by edge replication (as :class:`~regnet_zoo.networks.regnet.RegNet` pads at inference) and nothing there
    is supervised.

    Output dict: ``fixed``, ``moving`` ``(C, *crop)``, ``ddf_gt`` ``(N, *crop)`` (voxel units, README
    convention), ``ddf_mask`` ``(1, *crop)``: the supervised voxels (inside the image and the mask, and at
    least ``margin`` voxels from the crop border, so that the network's context lies inside the crop).
    Noise levels are in image intensity units (the paper's 5 and 3 HU were on CT; here images are 0..1).
    ``dvf_overrides`` (``sigma``, ``n_points``, ``theta``) replace the preset values of the fixed-image field.
    """

    def __init__(
        self,
        image_key: str = "moving",
        mask_key: str | None = None,
        crop_size: int | Sequence[int] = 96,
        margin: int = CONTEXT_BEFORE,
        presets: Sequence[str] = ("low", "medium", "high"),
        deform_moving_prob: float = 0.5,
        fixed_noise_std: float = 0.005,
        moving_noise_std: float = 0.003,
        augment_noise_std: float = 0.005,
        flip_prob: float = 0.5,
        spacing: Sequence[float] | float | None = None,
        dvf_overrides: Mapping[str, float] | None = None,
    ) -> None:
        keys = [image_key] + ([mask_key] if mask_key else [])
        MapTransform.__init__(self, keys, allow_missing_keys=True)
        unknown = [p for p in presets if p not in REGNET_PRESETS]
        if unknown or not presets:
            raise ValueError(f"unknown presets {unknown}; choose among {sorted(REGNET_PRESETS)}")
        self.image_key, self.mask_key = image_key, mask_key
        self.crop_size, self.margin, self.presets = crop_size, margin, list(presets)
        self.deform_moving_prob, self.flip_prob = deform_moving_prob, flip_prob
        self.fixed_noise_std, self.moving_noise_std = fixed_noise_std, moving_noise_std
        self.augment_noise_std, self.spacing = augment_noise_std, spacing
        self.dvf_overrides = dict(dvf_overrides or {})

    def randomize(self, data=None) -> None:  # all draws happen in __call__ from self.R
        pass

    def _generator(self) -> torch.Generator:
        return torch.Generator().manual_seed(int(self.R.randint(0, 2**31 - 1)))

    def __call__(self, data: Mapping) -> dict[str, torch.Tensor]:
        image = data[self.image_key]
        n = image.ndim - 1
        if n not in (2, 3):
            raise ValueError(
                f"{self.image_key}: expected a channel-first 2D or 3D image, got {tuple(image.shape)}"
            )
        spacing = spacing_of(image, n, self.spacing).tolist()
        if self.R.rand() < self.deform_moving_prob:
            image = deform_pair(
                image,
                preset="moving",
                spacing=spacing,
                noise_std=self.moving_noise_std,
                generator=self._generator(),
            )["fixed"]
        pair = deform_pair(
            image,
            preset=self.presets[self.R.randint(len(self.presets))],
            spacing=spacing,
            noise_std=self.fixed_noise_std,
            generator=self._generator(),
            **self.dvf_overrides,
        )
        fixed, moving, ddf = pair["fixed"], pair["moving"], pair["ddf"]
        valid = torch.ones_like(fixed[:1])
        if self.mask_key is not None and data.get(self.mask_key) is not None:
            mask = torch.as_tensor(np.asarray(data[self.mask_key]))[:1] != 0
            if mask.shape[1:] != fixed.shape[1:] or not mask.any():
                raise ValueError(f"{self.mask_key}: the mask must match the image grid and select a voxel")
            valid = mask.to(fixed.dtype)
        for axis in range(n):
            if self.R.rand() < self.flip_prob:
                fixed, moving, ddf, valid = (t.flip(axis + 1) for t in (fixed, moving, ddf, valid))
                ddf[axis] = -ddf[axis]
        if self.augment_noise_std > 0:
            gen = self._generator()
            fixed = fixed + self.augment_noise_std * torch.randn(fixed.shape, generator=gen)
            moving = moving + self.augment_noise_std * torch.randn(moving.shape, generator=gen)
        return self._crop(fixed, moving, ddf, valid, n)

    def _crop(self, fixed, moving, ddf, valid, n: int) -> dict[str, torch.Tensor]:
        size = [int(self.crop_size)] * n if np.isscalar(self.crop_size) else [int(s) for s in self.crop_size]
        candidates = torch.nonzero(valid[0] > 0)
        centre = candidates[self.R.randint(len(candidates))].tolist()
        starts = [c - z // 2 for c, z in zip(centre, size, strict=True)]
        pad: list[int] = []
        for s, z, shape in reversed(list(zip(starts, size, fixed.shape[1:], strict=True))):
            pad += [max(0, -s), max(0, s + z - shape)]
        shifted = [s + max(0, -s) for s in starts]
        out = {}
        for key, value in (("fixed", fixed), ("moving", moving), ("ddf_gt", ddf), ("ddf_mask", valid)):
            window = (slice(None),) + tuple(slice(s, s + z) for s, z in zip(shifted, size, strict=True))
            # images beyond the image border: edge values, as dense inference pads them (RegNet.padding_mode)
            mode = "replicate" if key in ("fixed", "moving") and any(pad) else "constant"
            out[key] = F.pad(value, pad, mode=mode)[window].contiguous()
        inner = torch.zeros_like(out["ddf_mask"])
        inner[(slice(None),) + tuple(slice(self.margin, z - self.margin) for z in size)] = 1
        out["ddf_mask"] = out["ddf_mask"] * inner
        return out
