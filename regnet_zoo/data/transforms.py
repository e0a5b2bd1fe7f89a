"""MONAI dictionary transforms and data loaders for registration pairs.

A pair is a dict with ``fixed``, ``moving`` and optionally ``fixed_label``, ``moving_label``, ``fixed_mask``,
``moving_mask``, ``fixed_keypoints``, ``moving_keypoints`` (file paths, or already-loaded tensors), a
``keypoint_units`` string (``"mm"`` LPS or ``"voxel"``, see :mod:`regnet_zoo.data.learn2reg`) and ``ddf``
(a ground-truth fixed->moving displacement file). Missing optional keys are skipped everywhere.

:func:`pair_transforms` chains: load (NIfTI/MHA/NRRD/npz, channel-first) -> optional resampling to a common
``spacing`` -> optional resizing to ``spatial_size`` -> intensity normalisation -> symmetric padding of
fixed and moving to a common shape -> padding to a multiple of ``pad_multiple`` -> keypoints to voxel
coordinates ``(K, N)`` of the final grid -> dtypes (images float32, labels int64). Labels and masks are
always resampled with nearest neighbour. Keypoints stay physical points until the end and are converted
with the final affine, so every geometric step is accounted for.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import DataLoader, MetaTensor
from monai.data.utils import list_data_collate
from monai.transforms import (
    Compose,
    DivisiblePadd,
    MapTransform,
    Resized,
    ScaleIntensityd,
    ScaleIntensityRanged,
    ScaleIntensityRangePercentilesd,
    Spacing,
    SpatialPad,
)

from regnet_zoo.data.io import check_pair, load_image, load_label, load_landmarks, lps_to_voxel
from regnet_zoo.errors import RegistrationInputError

__all__ = [
    "IMAGE_KEYS",
    "LABEL_KEYS",
    "KEYPOINT_KEYS",
    "PAIR_KEYS",
    "LoadPaird",
    "ResampleToSpacingd",
    "PadToCommonShaped",
    "KeypointsToVoxeld",
    "CastPaird",
    "PairCompose",
    "pair_transforms",
    "pair_collate",
    "pair_dataloader",
]

IMAGE_KEYS = ("fixed", "moving")
LABEL_KEYS = ("fixed_label", "moving_label", "fixed_mask", "moving_mask")
KEYPOINT_KEYS = ("fixed_keypoints", "moving_keypoints")
DDF_KEY = "ddf"
PAIR_KEYS = IMAGE_KEYS + LABEL_KEYS + KEYPOINT_KEYS + (DDF_KEY,)


def _role(key: str) -> str:
    """``"fixed"`` or ``"moving"``: the image a label / keypoint key belongs to."""
    return key.split("_")[0]


class LoadPaird(MapTransform):
    """Load the files of a pair: images (float32 ``(C, *S)``), labels/masks (int64 ``(C, *S)``), keypoints
    (physical LPS points ``(K, N)`` float64, checked to lie inside their image) and ``ddf`` (``(N, *S)``).

    Validates that fixed and moving have the same dimensionality (``spatial_dims`` if given) and that
    labels match their image's shape. Already-loaded tensors are passed through (keypoint tensors must be
    physical LPS points). Pair keys not in ``keys`` are dropped; ``keypoint_units`` is consumed.
    """

    def __init__(
        self,
        keys: KeysCollection = PAIR_KEYS,
        spatial_dims: int | None = None,
        keypoint_units: str = "mm",
        allow_missing_keys: bool = True,
    ):
        super().__init__(keys, allow_missing_keys)
        self.spatial_dims = spatial_dims
        self.keypoint_units = keypoint_units

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        # pair entries this chain does not handle (e.g. a ddf path when resampling) are dropped
        d = {k: v for k, v in data.items() if k not in PAIR_KEYS or k in self.keys}
        keys = list(self.key_iterator(d))
        for key in IMAGE_KEYS:
            if key in keys and not isinstance(d[key], torch.Tensor):
                d[key] = load_image(d[key], self.spatial_dims)
        for key in IMAGE_KEYS:
            if key not in d:
                raise RegistrationInputError(f"pair without a {key!r} image: {sorted(map(str, data))}")
        check_pair(d["fixed"], d["moving"])
        units = str(d.pop("keypoint_units", self.keypoint_units))
        for key in keys:
            if key in IMAGE_KEYS:
                continue
            value = d[key]
            if key in LABEL_KEYS:
                if not isinstance(value, torch.Tensor):
                    value = load_label(value, d["fixed"].ndim - 1)
                image = d[_role(key)]
                if tuple(value.shape[1:]) != tuple(image.shape[1:]):
                    raise RegistrationInputError(
                        f"{data[key]}: label shape {tuple(value.shape[1:])} differs from its image "
                        f"{_source(image)} {tuple(image.shape[1:])}"
                    )
            elif key in KEYPOINT_KEYS:
                if not isinstance(value, torch.Tensor):
                    value = torch.as_tensor(load_landmarks(value, d[_role(key)], units=units))
            elif key == DDF_KEY and not isinstance(value, torch.Tensor):
                value = load_image(value, d["fixed"].ndim - 1)
            d[key] = value
        return d


def _source(image: torch.Tensor) -> str:
    return str(image.meta.get("filename_or_obj", "")) if isinstance(image, MetaTensor) else ""


class ResampleToSpacingd(MapTransform):
    """Resample to a voxel ``spacing`` (mm): images linearly, labels/masks nearest (MONAI ``Spacing``).

    Not ``monai.transforms.Spacingd``: it treats every key starting with ``"<key>_"`` as a metadata dict,
    which breaks on this project's ``fixed_label`` / ``fixed_keypoints`` keys.
    """

    def __init__(
        self, keys: KeysCollection, spacing: Sequence[float] | float, allow_missing_keys: bool = True
    ):
        super().__init__(keys, allow_missing_keys)
        self.spacing = spacing

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            image = d[key]
            pixdim = [self.spacing] * (image.ndim - 1) if np.isscalar(self.spacing) else self.spacing
            mode = "nearest" if key in LABEL_KEYS else "bilinear"
            d[key] = Spacing(pixdim=pixdim, mode=mode, padding_mode="border")(image)
        return d


class PadToCommonShaped(MapTransform):
    """Symmetric zero padding of fixed and moving (and their labels) to their common (elementwise max) shape;
    the ``ddf`` (on the fixed grid) is padded with the fixed image."""

    def __init__(self, keys: KeysCollection = IMAGE_KEYS + LABEL_KEYS + (DDF_KEY,), allow_missing_keys=True):
        super().__init__(keys, allow_missing_keys)

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        shape = np.maximum(np.asarray(d["fixed"].shape[1:]), np.asarray(d["moving"].shape[1:]))
        pad = SpatialPad(spatial_size=[int(s) for s in shape], method="symmetric", mode="constant")
        for key in self.key_iterator(d):
            d[key] = pad(d[key])
        return d


class KeypointsToVoxeld(MapTransform):
    """Physical LPS keypoints ``(K, N)`` -> float32 voxel coordinates ``(K, N)`` of their image's grid."""

    def __init__(self, keys: KeysCollection = KEYPOINT_KEYS, allow_missing_keys: bool = True):
        super().__init__(keys, allow_missing_keys)

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            image = d[_role(key)]
            d[key] = torch.as_tensor(lps_to_voxel(d[key], image), dtype=torch.float32)
        return d


class CastPaird(MapTransform):
    """Images and ``ddf`` to float32, labels/masks to int64 (rounded), as ``MetaTensor`` s."""

    def __init__(self, keys: KeysCollection = PAIR_KEYS, allow_missing_keys: bool = True):
        super().__init__(keys, allow_missing_keys)

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            if key in LABEL_KEYS:
                d[key] = torch.round(d[key]).to(torch.int64) if d[key].is_floating_point() else d[key].long()
            elif key in IMAGE_KEYS or key == DDF_KEY:
                d[key] = d[key].to(torch.float32)
        return d


class PairCompose(Compose):
    """``Compose`` that lets a ``RegistrationInputError`` through: MONAI wraps every exception raised inside
    a transform in ``RuntimeError("applying transform ...")``, which would hide the one-line user error."""

    def __call__(self, input_, *args, **kwargs):
        try:
            return super().__call__(input_, *args, **kwargs)
        except RuntimeError as err:
            cause = err.__cause__
            while cause is not None and not isinstance(cause, RegistrationInputError):
                cause = cause.__cause__
            if cause is not None:
                raise cause from None
            raise


def _normalisation(
    normalize: str | None, percentiles: tuple[float, float], ct_window: tuple[float, float]
) -> MapTransform | None:
    keys = list(IMAGE_KEYS)
    if normalize in (None, "none"):
        return None
    if normalize == "minmax":
        return ScaleIntensityd(keys, minv=0.0, maxv=1.0)
    if normalize == "percentile":
        low, high = percentiles
        return ScaleIntensityRangePercentilesd(keys, lower=low, upper=high, b_min=0.0, b_max=1.0, clip=True)
    if normalize == "ct":
        low, high = ct_window
        return ScaleIntensityRanged(keys, a_min=low, a_max=high, b_min=0.0, b_max=1.0, clip=True)
    raise ValueError(f"normalize must be 'minmax', 'percentile', 'ct' or None, got {normalize!r}")


def pair_transforms(
    spatial_size: Sequence[int] | int | None = None,
    spacing: Sequence[float] | float | None = None,
    normalize: str | None = "minmax",
    pad_multiple: int | None = 16,
    keys_present: Sequence[str] | None = None,
    *,
    spatial_dims: int | None = None,
    percentiles: tuple[float, float] = (1.0, 99.0),
    ct_window: tuple[float, float] = (-1000.0, 1000.0),
    keypoint_units: str = "mm",
) -> PairCompose:
    """The pair preprocessing chain (see module docstring) as a ``monai.transforms.Compose``.

    Args:
        spatial_size: resize fixed and moving (and labels, nearest) to this shape.
        spacing: resample to this voxel spacing (mm) first; a scalar means isotropic (needs ``spatial_dims``
            or is applied to every spatial axis).
        normalize: ``"minmax"`` (to [0, 1]), ``"percentile"`` (``percentiles`` -> [0, 1], clipped), ``"ct"``
            (Hounsfield ``ct_window`` -> [0, 1], clipped) or ``None``.
        pad_multiple: pad (symmetrically, zeros) so every spatial size is a multiple of this (``None``: off).
        keys_present: the pair keys to handle (default: all of :data:`PAIR_KEYS`, ``ddf`` only without
            resampling); absent ones are skipped, other pair keys are dropped.
        spatial_dims: insist on 2D or 3D inputs.
        keypoint_units: units of keypoint files when the pair has no ``keypoint_units`` entry.
    """
    resampling = spacing is not None or spatial_size is not None
    if keys_present is None:  # everything; a ground-truth ddf only when the grid is not resampled
        keys_present = [k for k in PAIR_KEYS if not (k == DDF_KEY and resampling)]
    keys = tuple(keys_present)
    unknown = set(keys) - set(PAIR_KEYS)
    if unknown:
        raise ValueError(f"unknown pair keys {sorted(unknown)}; known: {PAIR_KEYS}")
    image_keys = [k for k in IMAGE_KEYS if k in keys]
    label_keys = [k for k in LABEL_KEYS if k in keys]
    if DDF_KEY in keys and resampling:
        # a voxel-unit displacement would need rescaling with the grid; only padding keeps it valid
        raise ValueError("the 'ddf' key can only be used without spacing / spatial_size resampling")
    chain: list = [LoadPaird(keys, spatial_dims=spatial_dims, keypoint_units=keypoint_units)]
    if spacing is not None:
        chain.append(ResampleToSpacingd(image_keys + label_keys, spacing))
    if spatial_size is not None:
        mode = "area" if spacing is None else "bilinear"  # area: anti-aliased downsampling
        chain.append(Resized(image_keys, spatial_size=spatial_size, mode=mode))
        if label_keys:
            chain.append(
                Resized(label_keys, spatial_size=spatial_size, mode="nearest", allow_missing_keys=True)
            )
    norm = _normalisation(normalize, percentiles, ct_window)
    if norm is not None:
        chain.append(norm)
    chain.append(PadToCommonShaped())
    if pad_multiple:
        pad_keys = image_keys + label_keys + ([DDF_KEY] if DDF_KEY in keys else [])
        chain.append(DivisiblePadd(pad_keys, k=pad_multiple, mode="constant", allow_missing_keys=True))
    chain.append(KeypointsToVoxeld())
    chain.append(CastPaird())
    return PairCompose(chain)


def pair_collate(batch: Sequence[Mapping]) -> dict:
    """Collate pairs into a batch (MONAI ``list_data_collate``); keypoint sets of different sizes ``K`` are
    padded with NaN rows to ``(B, K_max, N)`` so that they stack (losses/metrics must ignore NaN rows)."""
    batch = [dict(item) for item in batch]
    for key in KEYPOINT_KEYS:
        present = [item[key] for item in batch if key in item]
        if present and len({p.shape[0] for p in present}) > 1:
            k_max = max(p.shape[0] for p in present)
            for item in batch:
                if key in item:
                    points = torch.as_tensor(item[key])
                    pad = points.new_full((k_max - points.shape[0], points.shape[1]), float("nan"))
                    item[key] = torch.cat([points, pad])
    return list_data_collate(batch)


def pair_dataloader(
    pairs: Sequence[Mapping],
    transforms: Compose | None = None,
    batch_size: int = 1,
    shuffle: bool = False,
    num_workers: int = 0,
    *,
    cache: bool = False,
    seed: int | None = None,
) -> DataLoader:
    """A MONAI ``DataLoader`` over pair dicts (:meth:`Learn2RegDataset.pairs`) with :func:`pair_collate`.

    ``transforms`` defaults to :func:`pair_transforms` ``()``; ``cache=True`` keeps the preprocessed pairs in
    memory (``CacheDataset``); ``seed`` makes the shuffling order reproducible.
    """
    from monai.data import CacheDataset, Dataset

    transforms = pair_transforms() if transforms is None else transforms
    data = [dict(p) for p in pairs]
    dataset = (
        CacheDataset(data, transforms, progress=False, num_workers=0) if cache else Dataset(data, transforms)
    )
    generator = None
    if seed is not None:
        generator = torch.Generator()
        generator.manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=num_workers,
        collate_fn=pair_collate,
        generator=generator,
    )
