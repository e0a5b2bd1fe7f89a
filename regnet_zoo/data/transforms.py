"""MONAI dictionary transforms and data loaders for registration pairs.

A pair is a dict with ``fixed``, ``moving`` and optionally ``fixed_label``, ``moving_label``, ``fixed_mask``,
``moving_mask``, ``fixed_keypoints``, ``moving_keypoints`` (file paths, or already-loaded tensors), a
``keypoint_units`` string (``"mm"`` LPS or ``"voxel"``, see :mod:`regnet_zoo.data.learn2reg`) and ``ddf``
(a ground-truth fixed->moving displacement file). Missing optional keys are skipped everywhere.

:func:`pair_transforms` chains: load (NIfTI/MHA/NRRD/npz, channel-first) -> intensity normalisation (on the
native grids) -> optional resampling to a common ``spacing`` -> optional affine pre-alignment of the moving
image onto the fixed grid (``pre_align``) -> optional resizing to the working grid ``spatial_size``
(corner-aligned linear) -> symmetric padding of fixed and moving to a common shape -> padding to a multiple of
``pad_multiple`` -> keypoints to voxel coordinates ``(K, N)`` of the final grid -> dtypes (images float32,
labels int64). Labels and masks are always resampled with nearest neighbour. Keypoints stay physical points
until the end and are converted with the final affine, so every geometric step is accounted for.

Normalisation, resizing and padding are the functions of :mod:`regnet_zoo.data.preprocess`, the same that
:func:`regnet_zoo.api.register` uses, so a network sees the same input in training and in use.
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
    Spacing,
    SpatialPad,
)

from regnet_zoo.core.geometry import LPS_RAS, affine_of, as_4x4, from_4x4
from regnet_zoo.core.resample import warp_physical
from regnet_zoo.data.io import check_pair, load_image, load_label, load_landmarks, lps_to_voxel
from regnet_zoo.data.preprocess import (
    AFFINE_STAGE_DEFAULTS,
    PRE_ALIGN,
    Preprocessing,
    normalise_intensity,
    resize_image,
    resize_label,
    resized_affine,
)
from regnet_zoo.errors import RegistrationInputError

__all__ = [
    "IMAGE_KEYS",
    "LABEL_KEYS",
    "KEYPOINT_KEYS",
    "PAIR_KEYS",
    "LoadPaird",
    "ResampleToSpacingd",
    "NormaliseIntensityd",
    "ResizeToGridd",
    "PreAlignd",
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


class NormaliseIntensityd(MapTransform):
    """Intensities of fixed and moving to [0, 1] (:func:`regnet_zoo.data.preprocess.normalise_intensity`)."""

    def __init__(
        self,
        keys: KeysCollection = IMAGE_KEYS,
        normalize: str | None = "minmax",
        percentiles: Sequence[float] = (1.0, 99.0),
        ct_window: Sequence[float] = (-1000.0, 1000.0),
        allow_missing_keys: bool = True,
    ):
        super().__init__(keys, allow_missing_keys)
        if normalize not in ("minmax", "percentile", "ct", "none", None):
            raise ValueError(f"normalize must be 'minmax', 'percentile', 'ct' or None, got {normalize!r}")
        self.normalize, self.percentiles, self.ct_window = normalize, percentiles, ct_window

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            image = d[key]
            out = normalise_intensity(image, self.normalize, self.percentiles, self.ct_window)
            d[key] = MetaTensor(out).copy_meta_from(image) if isinstance(image, MetaTensor) else out
        return d


class ResizeToGridd(MapTransform):
    """Resample to the working grid ``spatial_size`` corner-aligned: images linearly
    (:func:`~regnet_zoo.data.preprocess.resize_image`), labels / masks nearest; the affine follows
    (:func:`~regnet_zoo.data.preprocess.resized_affine`) so keypoints stay right."""

    def __init__(
        self, keys: KeysCollection, spatial_size: Sequence[int] | int, allow_missing_keys: bool = True
    ):
        super().__init__(keys, allow_missing_keys)
        self.spatial_size = spatial_size

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            image = d[key]
            spatial_dims = image.ndim - 1
            size = self.spatial_size
            size = [int(size)] * spatial_dims if np.isscalar(size) else [int(v) for v in size]
            if len(size) != spatial_dims:
                raise ValueError(f"spatial_size {size} is not a {spatial_dims}D size")
            resize = resize_label if key in LABEL_KEYS else resize_image
            out = resize(torch.as_tensor(image)[None], size)[0]
            affine = resized_affine(affine_of(image), image.shape[1:], size)
            meta = dict(image.meta) if isinstance(image, MetaTensor) else {}
            meta.pop("affine", None)
            out = out.as_tensor() if isinstance(out, MetaTensor) else out
            d[key] = MetaTensor(out, affine=torch.as_tensor(affine), meta=meta)
        return d


class PreAlignd(MapTransform):
    """Affine pre-alignment: :func:`regnet_zoo.core.affine.affine_register` (``transform`` ``"affine"`` or
    ``"rigid"``) finds ``T`` (physical, RAS) with ``moving(T p) ~ fixed(p)``; the moving image, its label /
    mask (nearest) are resampled through ``T`` onto the fixed grid and its keypoints mapped by ``T^-1``.

    The 4x4 ``T`` is kept as ``pre_affine`` (float64). Needs intensities normalised (run after
    :class:`NormaliseIntensityd`). ``kwargs`` go to ``affine_register`` (e.g. ``similarity="mi"``), over
    :data:`AFFINE_STAGE_DEFAULTS` (the settings of ``register``'s affine stage).
    """

    def __init__(self, transform: str = "affine", **kwargs):
        super().__init__(IMAGE_KEYS, allow_missing_keys=False)
        if transform not in PRE_ALIGN or transform is None:
            raise ValueError(f"pre_align must be 'affine' or 'rigid', got {transform!r}")
        self.transform, self.kwargs = transform, {**AFFINE_STAGE_DEFAULTS, **kwargs}

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        from regnet_zoo.core.affine import affine_register

        d = dict(data)
        fixed, moving = d["fixed"], d["moving"]
        spatial_dims = fixed.ndim - 1
        fixed_affine, moving_affine = affine_of(fixed), affine_of(moving)
        matrix = affine_register(
            torch.as_tensor(fixed).float(),
            torch.as_tensor(moving).float(),
            torch.as_tensor(from_4x4(fixed_affine, spatial_dims)),
            torch.as_tensor(from_4x4(moving_affine, spatial_dims)),
            transform=self.transform,
            **self.kwargs,
        )
        d.update(pre_align_pair(d, as_4x4(np.asarray(matrix.detach().cpu(), dtype=np.float64))))
        return d


def pre_align_pair(d: Mapping[Hashable, object], matrix: np.ndarray) -> dict:
    """The moving entries of a pair resampled through the physical 4x4 RAS map ``matrix`` onto the fixed
    grid (images linear, labels / masks nearest, keypoints mapped by its inverse) and ``pre_affine``."""
    fixed = d["fixed"]
    fixed_affine, shape = affine_of(fixed), tuple(fixed.shape[1:])
    inverse = np.linalg.inv(matrix)
    out: dict = {"pre_affine": torch.as_tensor(matrix)}
    for key in ("moving", "moving_label", "moving_mask"):
        if key in d:
            value = d[key]
            aligned = MetaTensor(torch.as_tensor(value), affine=inverse @ affine_of(value))
            warped = warp_physical(aligned, fixed_affine, shape, nearest=key != "moving")
            meta = dict(value.meta) if isinstance(value, MetaTensor) else {}
            meta.pop("affine", None)
            out[key] = MetaTensor(warped, affine=torch.as_tensor(fixed_affine), meta=meta)
    if "moving_keypoints" in d:  # LPS points p -> T^-1 p
        pts = np.asarray(torch.as_tensor(d["moving_keypoints"]), dtype=np.float64)
        n = pts.shape[1]
        hom = np.zeros((len(pts), 4))
        hom[:, :n], hom[:, 3] = pts, 1.0
        out["moving_keypoints"] = torch.as_tensor((hom @ (LPS_RAS @ inverse @ LPS_RAS).T)[:, :n])
    return out


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
    pre_align: str | None = None,
    pre_align_kwargs: Mapping | None = None,
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
        pre_align: ``"affine"`` / ``"rigid"``: affine pre-alignment of the moving image onto the fixed grid
            (:class:`PreAlignd`, arguments ``pre_align_kwargs``); None: off.
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
    pre_align = None if pre_align in (None, "none", False) else pre_align
    if DDF_KEY in keys and pre_align is not None:
        raise ValueError("the 'ddf' key can only be used without pre_align (the ground truth would change)")
    chain: list = [
        LoadPaird(keys, spatial_dims=spatial_dims, keypoint_units=keypoint_units),
        NormaliseIntensityd(image_keys, normalize, percentiles, ct_window),
    ]
    if spacing is not None:
        chain.append(ResampleToSpacingd(image_keys + label_keys, spacing))
    if pre_align is not None:
        chain.append(PreAlignd(pre_align, **dict(pre_align_kwargs or {})))
    if spatial_size is not None:
        chain.append(ResizeToGridd(image_keys + label_keys, spatial_size))
    chain.append(PadToCommonShaped())
    if pad_multiple:
        pad_keys = image_keys + label_keys + ([DDF_KEY] if DDF_KEY in keys else [])
        chain.append(DivisiblePadd(pad_keys, k=pad_multiple, mode="constant", allow_missing_keys=True))
    chain.append(KeypointsToVoxeld())
    chain.append(CastPaird())
    compose = PairCompose(chain)
    # what the network sees, recorded in trained weights (regnet_zoo.weights)
    compose.preprocessing = Preprocessing(
        normalize=normalize,
        percentiles=percentiles,
        ct_window=ct_window,
        image_size=[spatial_size] if isinstance(spatial_size, int) else spatial_size,
        pad_multiple=pad_multiple,
        pre_align=pre_align,
    )
    return compose


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
