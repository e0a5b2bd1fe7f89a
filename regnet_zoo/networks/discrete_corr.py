"""Discrete correlation registration network (Heinrich & Blendowski, Learn2Reg tutorial 2019; PDD-Net).

Three building blocks (tutorial slide "Three building blocks of DL discrete registration"):

1. a trainable feature extractor applied to fixed and moving image at reduced resolution (stride 4) -- the
   only trained part;
2. a correlation layer without weights: SSD between fixed features at ``x`` and moving features at ``x + d``
   for every ``d`` of the dense displacement set ``L = {0, +-1, ..., +-r}^N`` (core.correlation);
3. regularisation without weights: an approximate min-convolution over the displacement dimensions
   (replicate padding, two average poolings, a min pooling) and mean-field smoothing over the spatial
   dimensions (repeated average pooling), then a softmax over displacements -> probabilities -> expected
   displacement, upsampled to a full-resolution DDF.

Training is weakly supervised (:class:`DiscreteCorrLoss`): PDD-Net's non-local label loss (moving one-hot
labels transferred through the displacement probabilities vs fixed labels) or Dice of warped labels, plus
diffusion smoothness of the coarse field; image similarity when no labels exist.

Grid bookkeeping: inputs are replicate-padded at their end to a multiple of ``stride``; feature voxel ``j``
sits at full-resolution voxel ``stride * j + origin`` (``origin = 0`` for the strided convolutions,
``(stride - 1) / 2`` for the average-pooled identity features), so a coarse offset ``d`` is exactly
``stride * d`` voxels. The non-local label loss pools the one-hot labels onto the same centres
(``core.pyramid.pool_to_grid`` with the features' origin).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.networks.blocks import Convolution
from torch import nn

from regnet_zoo.core.correlation import correlation_volume, displaced_sum, displacement_set
from regnet_zoo.core.filters import approximate_min_convolution, displacement_grid_side, mean_field_smoothing
from regnet_zoo.core.losses import (
    diffusion_loss,
    global_ncc,
    label_values,
    lncc_loss,
    mse_loss,
    one_hot_labels,
    soft_dice_loss,
    warped_label_dice_loss,
)
from regnet_zoo.core.padding import pad_to_multiple
from regnet_zoo.core.pyramid import pool_to_grid, upsample_coarse_ddf
from regnet_zoo.core.spatial import warp_image
from regnet_zoo.networks.pair import split_pair

__all__ = [
    "DiscreteFeatureExtractor",
    "IdentityFeatures",
    "approximate_min_convolution",
    "mean_field_smoothing",
    "expected_displacement",
    "upsample_coarse_ddf",
    "nonlocal_label_transfer",
    "DiscreteCorrNet",
    "DiscreteCorrLoss",
]


# ------------------------------------------------------------------------------------------------------------
# feature extractors
# ------------------------------------------------------------------------------------------------------------
def _check_stride(stride: int) -> int:
    levels = int(stride).bit_length() - 1
    if stride < 1 or 2**levels != stride:
        raise ValueError(f"stride must be a power of two >= 1, got {stride}")
    return levels


class DiscreteFeatureExtractor(nn.Module):
    """Trainable features at ``1 / stride`` resolution: ``(B, C_in, *S)`` -> ``(B, C_out, *S / stride)``.

    Per halving: a stride-2 convolution (kernel 5 on the first level, 3 after) and a 3x3(x3) convolution, each
    with batch normalisation and ReLU (the tutorial lists no exact net); a final 1x1(x1) convolution gives the
    ``out_channels`` features compared by SSD. Feature voxel ``j`` is centred on input voxel ``stride * j``.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int = 1,
        out_channels: int = 16,
        hidden_channels: Sequence[int] = (32, 64),
        stride: int = 4,
        norm: str = "batch",
    ) -> None:
        super().__init__()
        levels = _check_stride(stride)
        if len(hidden_channels) != max(levels, 1):
            raise ValueError(
                f"hidden_channels needs one entry per halving ({max(levels, 1)}), got {hidden_channels}"
            )
        self.stride, self.origin = stride, 0.0
        layers: list[nn.Module] = []
        channels = in_channels
        for level, hidden in enumerate(hidden_channels):
            down = 2 if level < levels else 1
            kernel = 5 if level == 0 else 3
            for conv_stride, k in ((down, kernel), (1, 3)):
                layers.append(
                    Convolution(
                        spatial_dims,
                        channels,
                        hidden,
                        strides=conv_stride,
                        kernel_size=k,
                        act="RELU",
                        norm=norm,
                    )
                )
                channels = hidden
        layers.append(Convolution(spatial_dims, channels, out_channels, kernel_size=1, conv_only=True))
        self.layers = nn.Sequential(*layers)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.layers(image)


class IdentityFeatures(nn.Module):
    """No learning: the image itself, average-pooled by ``stride`` (feature ``j`` centred at
    ``stride * j + (stride - 1) / 2``). ``(B, C, *S)`` -> ``(B, C, *S / stride)``."""

    def __init__(self, spatial_dims: int, stride: int = 1) -> None:
        super().__init__()
        _check_stride(stride)
        self.spatial_dims, self.stride, self.origin = spatial_dims, stride, (stride - 1) / 2

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        if self.stride == 1:
            return image
        pool = (F.avg_pool2d, F.avg_pool3d)[self.spatial_dims - 2]
        return pool(image, self.stride)


# ------------------------------------------------------------------------------------------------------------
# regularisation of the cost volume (no weights)
# ------------------------------------------------------------------------------------------------------------
def expected_displacement(probabilities: torch.Tensor, radius: int) -> torch.Tensor:
    """``sum_l p_l(x) d_l``: probabilities ``(B, L, *S)`` over ``displacement_set(radius, N)`` ->
    ``(B, N, *S)`` in voxels of the same grid."""
    offsets = displacement_set(radius, probabilities.ndim - 2, device=probabilities.device)
    return torch.einsum("bl...,ln->bn...", probabilities, offsets.to(probabilities.dtype))


def nonlocal_label_transfer(
    probabilities: torch.Tensor, moving_onehot: torch.Tensor, radius: int, chunk_size: int | None = None
) -> torch.Tensor:
    """PDD-Net's non-local label transfer: ``sum_l p_l(x) moving_onehot(x + d_l)`` on the coarse grid.

    probabilities ``(B, L, *S_c)``; moving_onehot ``(B, K, *S_c)`` (one-hot labels area-downsampled to the
    coarse grid) -> expected moving label distribution ``(B, K, *S_c)`` (border padding).
    """
    return displaced_sum(probabilities, moving_onehot, radius, chunk_size=chunk_size, padding_mode="border")


# ------------------------------------------------------------------------------------------------------------
# network
# ------------------------------------------------------------------------------------------------------------
class DiscreteCorrNet(nn.Module):
    """Discrete correlation registration network, 2D or 3D.

    ``forward(fixed, moving)`` with images ``(B, in_channels, *S)`` (or ``forward(pair)``, both stacked
    along channels) returns

    - ``ddf`` ``(B, N, *S)``: full-resolution displacement (voxels), ``warped`` ``(B, C, *S)``;
    - ``ddf_coarse`` ``(B, N, *S_c)``: expected displacement on the feature grid, in full-resolution voxels;
    - ``probabilities`` ``(B, L, *S_c)``: softmax over the ``L = (2r+1)**N`` displacements of the regularised
      cost (``displacement_set(radius, N)`` order, offsets in feature voxels = ``stride`` image voxels).

    Args:
        spatial_dims: 2 or 3.
        in_channels: image channels.
        radius: search radius ``r`` in feature voxels (capture range ``r * stride`` image voxels).
        stride: feature grid spacing in image voxels (power of two).
        features: ``"learned"`` (:class:`DiscreteFeatureExtractor`) or ``"identity"``
            (:class:`IdentityFeatures`, nothing trained).
        feature_channels, hidden_channels, norm: learned feature extractor.
        metric: ``"ssd"`` (tutorial) or ``"dot"`` (negated, so that lower cost is better).
        softmax_scale: ``alpha`` of ``softmax(-alpha * cost)``; the learned features also scale the cost.
        minconv_avg_kernel, minconv_min_kernel: approximate min-convolution (tutorial: 5, 3; PDD-Net: 3, 3).
        meanfield_kernel, meanfield_iterations: mean-field smoothing (tutorial: 5, 3).
        padding_mode: correlation padding outside the grid (``"zeros"`` as the tutorial's unfold, or
            ``"border"``).
        chunk_size: displacements per correlation chunk (``None``: automatic, memory-bounded).
    """

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 1,
        radius: int = 5,
        stride: int = 4,
        features: str = "learned",
        feature_channels: int = 16,
        hidden_channels: Sequence[int] = (32, 64),
        norm: str = "batch",
        metric: str = "ssd",
        softmax_scale: float = 1.0,
        minconv_avg_kernel: int = 3,
        minconv_min_kernel: int = 3,
        meanfield_kernel: int = 5,
        meanfield_iterations: int = 3,
        padding_mode: str = "zeros",
        chunk_size: int | None = None,
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        if metric not in ("ssd", "dot"):
            raise ValueError(f"metric must be 'ssd' or 'dot', got {metric!r}")
        if radius < 1:
            raise ValueError(f"radius must be >= 1, got {radius}")
        self.spatial_dims, self.in_channels, self.radius, self.stride = (
            spatial_dims,
            in_channels,
            radius,
            stride,
        )
        if features == "learned":
            self.features: nn.Module = DiscreteFeatureExtractor(
                spatial_dims, in_channels, feature_channels, hidden_channels, stride, norm
            )
        elif features == "identity":
            self.features = IdentityFeatures(spatial_dims, stride)
        else:
            raise ValueError(f"features must be 'learned' or 'identity', got {features!r}")
        self.metric, self.softmax_scale = metric, softmax_scale
        self.minconv_avg_kernel, self.minconv_min_kernel = minconv_avg_kernel, minconv_min_kernel
        self.meanfield_kernel, self.meanfield_iterations = meanfield_kernel, meanfield_iterations
        self.padding_mode, self.chunk_size = padding_mode, chunk_size

    def regularised_cost(self, fixed_feat: torch.Tensor, moving_feat: torch.Tensor) -> torch.Tensor:
        """Correlation cost ``(B, L, *S_c)`` after min-convolution and mean-field smoothing (lower=better)."""
        cost = correlation_volume(
            fixed_feat, moving_feat, self.radius, self.metric, self.chunk_size, self.padding_mode
        )
        if self.metric == "dot":
            cost = -cost
        cost = approximate_min_convolution(cost, self.minconv_avg_kernel, self.minconv_min_kernel)
        return mean_field_smoothing(cost, self.meanfield_kernel, self.meanfield_iterations)

    def forward(self, fixed: torch.Tensor, moving: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        fixed, moving = split_pair(fixed, moving, self.spatial_dims, self.in_channels)
        batch = fixed.shape[0]
        # one pass over both images so that batch normalisation sees the pair together
        both, _ = pad_to_multiple(torch.cat([fixed, moving], dim=0), self.stride, mode="replicate")
        feats = self.features(both)
        cost = self.regularised_cost(feats[:batch], feats[batch:])
        probabilities = torch.softmax(-self.softmax_scale * cost, dim=1)
        ddf_coarse = expected_displacement(probabilities, self.radius) * self.stride
        outputs = self.outputs_from_parameters(ddf_coarse, fixed, moving)
        outputs["probabilities"] = probabilities
        return outputs

    def transform_parameters(self, outputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """The coarse displacement ``ddf_coarse`` ``(B, N, *S_c)`` (full-resolution voxel units)."""
        return outputs["ddf_coarse"]

    def outputs_from_parameters(
        self, params: torch.Tensor, fixed: torch.Tensor, moving: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """``ddf``, ``warped`` and ``ddf_coarse`` from a coarse displacement ``(B, N, *S_c)``."""
        ddf = upsample_coarse_ddf(params, fixed.shape[2:], self.stride, self.features.origin)
        return {"ddf": ddf, "warped": warp_image(moving, ddf), "ddf_coarse": params}


# ------------------------------------------------------------------------------------------------------------
# loss
# ------------------------------------------------------------------------------------------------------------
def _grid_stride(size: Sequence[int], grid: Sequence[int]) -> int:
    """The power-of-two stride ``s`` with ``ceil(size / s) == grid`` on every axis."""
    for levels in range(16):
        stride = 2**levels
        if all(-(-int(n) // stride) == int(g) for n, g in zip(size, grid, strict=True)):
            return stride
    raise ValueError(f"no power-of-two stride maps the image grid {tuple(size)} onto {tuple(grid)}")


class DiscreteCorrLoss(nn.Module):
    """Weakly supervised loss: ``label_weight * label + smooth_weight * diffusion(ddf_coarse)`` (+ image).

    label term (with ``fixed_label`` and ``moving_label`` in the batch):

    - ``"nonlocal"`` (PDD-Net): one-hot labels area-averaged onto the feature grid (width-``stride`` boxes
      centred on the feature voxels ``stride * j + feature_origin``, ``core.pyramid.pool_to_grid``; the
      stride follows from the image and probability grids; ``feature_origin`` 0 for the learned features,
      ``"block"`` for the identity features); the moving ones
      transferred through ``probabilities`` (:func:`nonlocal_label_transfer`) and compared with the fixed
      ones by squared error weighted per class by inverse square-root frequency (mean 1). Falls back to
      ``"dice"`` when the outputs carry no ``probabilities`` (e.g. instance optimisation of ``ddf_coarse``);
    - ``"dice"``: soft Dice of the linearly warped one-hot moving labels vs the fixed ones (full resolution).

    ``image`` term: ``image_loss`` (``"mse"``, ``"ncc"`` global, ``"lncc"``) of warped vs fixed, used when
    the batch has no labels, or always when ``image_with_labels``. Smoothness: diffusion of ``ddf_coarse``
    (``ddf`` when absent), in full-resolution voxels per coarse voxel.
    Returns ``loss`` and the weighted terms ``label``, ``image``, ``smoothness`` that were computed.
    """

    def __init__(
        self,
        label_loss: str = "nonlocal",
        label_weight: float = 1.0,
        smooth_weight: float = 0.1,
        image_loss: str = "mse",
        image_weight: float = 1.0,
        image_with_labels: bool = False,
        include_background: bool = True,
        nonlocal_metric: str = "mse",
        feature_origin: float | str = 0.0,
    ) -> None:
        super().__init__()
        # where feature voxel 0 sits in image voxels (the network's ``features.origin``): 0 for the learned
        # strided-conv features; "block" = (stride - 1) / 2 for the average-pooled identity features
        if isinstance(feature_origin, str) and feature_origin != "block":
            raise ValueError(f"feature_origin must be a number or 'block', got {feature_origin!r}")
        self.feature_origin = feature_origin
        if label_loss not in ("nonlocal", "dice"):
            raise ValueError(f"label_loss must be 'nonlocal' or 'dice', got {label_loss!r}")
        if image_loss not in ("mse", "ncc", "lncc"):
            raise ValueError(f"image_loss must be 'mse', 'ncc' or 'lncc', got {image_loss!r}")
        self.label_loss, self.label_weight, self.smooth_weight = label_loss, label_weight, smooth_weight
        self.image_loss, self.image_weight, self.image_with_labels = (
            image_loss,
            image_weight,
            image_with_labels,
        )
        self.include_background = include_background
        if nonlocal_metric not in ("mse", "dice"):
            raise ValueError(f"nonlocal_metric must be 'mse' or 'dice', got {nonlocal_metric!r}")
        self.nonlocal_metric = nonlocal_metric

    def _image_term(self, warped: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        if self.image_loss == "mse":
            return mse_loss(warped, fixed)
        if self.image_loss == "ncc":
            return global_ncc(warped, fixed)
        return lncc_loss(warped, fixed)

    def _nonlocal_term(self, probabilities: torch.Tensor, fixed_onehot, moving_onehot) -> torch.Tensor:
        spatial_dims = probabilities.ndim - 2
        radius = (displacement_grid_side(probabilities.shape[1], spatial_dims) - 1) // 2
        grid = probabilities.shape[2:]
        stride = _grid_stride(fixed_onehot.shape[2:], grid)
        origin = (stride - 1) / 2 if self.feature_origin == "block" else float(self.feature_origin)
        fixed_coarse = pool_to_grid(fixed_onehot, stride, origin)
        moving_coarse = pool_to_grid(moving_onehot, stride, origin)
        transferred = nonlocal_label_transfer(probabilities, moving_coarse, radius)
        if not self.include_background:
            transferred, fixed_coarse = transferred[:, 1:], fixed_coarse[:, 1:]
        if self.nonlocal_metric == "dice":
            return soft_dice_loss(transferred, fixed_coarse)
        frequency = fixed_coarse.mean(dim=tuple(i for i in range(fixed_coarse.ndim) if i != 1))
        weight = 1.0 / torch.sqrt(frequency + 1e-4)
        weight = (weight / weight.mean()).view(1, -1, *([1] * spatial_dims))
        return (weight * (transferred - fixed_coarse) ** 2).mean()

    def forward(
        self, outputs: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        fixed = batch["fixed"]
        terms: dict[str, torch.Tensor] = {}
        fixed_label, moving_label = batch.get("fixed_label"), batch.get("moving_label")
        has_labels = fixed_label is not None and moving_label is not None
        if has_labels and self.label_weight > 0:
            if self.label_loss == "nonlocal" and "probabilities" in outputs:
                values = label_values(fixed_label, moving_label)
                fixed_onehot = one_hot_labels(fixed_label, values)
                moving_onehot = one_hot_labels(moving_label, values)
                label = self._nonlocal_term(outputs["probabilities"], fixed_onehot, moving_onehot)
            else:
                label = warped_label_dice_loss(
                    outputs["ddf"], fixed_label, moving_label, include_background=self.include_background
                )
            if label is not None:
                terms["label"] = self.label_weight * label
        if self.image_weight > 0 and (not has_labels or self.image_with_labels):
            terms["image"] = self.image_weight * self._image_term(outputs["warped"], fixed)
        field = outputs.get("ddf_coarse", outputs["ddf"])
        if self.smooth_weight > 0 and min(field.shape[2:]) >= 3:
            terms["smoothness"] = self.smooth_weight * diffusion_loss(field)
        terms["loss"] = sum(terms.values()) if terms else fixed.new_zeros(())
        return terms
