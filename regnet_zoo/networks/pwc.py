"""PWC-style deformable registration pyramid (Gunnarsson, Sjölund & Schön, Learn2Reg 2020).

A shared CNN pyramid turns fixed and moving image into feature maps at ``L`` levels (1/2 ... 1/2^L of the
input); level 0 is the image itself. Coarsest first, each level

1. warps the moving features with the current estimate (upsampled from the coarser level, zero at the top),
2. estimates a global affine (global average pooling + one dense layer, ``N (N + 1)`` parameters),
3. builds a cost volume (local correlation, search radius ``d``) between the affinely warped moving features
   and the fixed features,
4. refines the displacement with a DenseNet of five CNN blocks plus an output convolution,
5. upsamples the field to the next level (upsampling + one convolution).

The finest field (level 0, input resolution) is the network's ``ddf``. Every field is a DDF in voxel units of
its own level's grid (README "Conventions"). One grid convention for every level (``core.pyramid``): level
``l`` voxel ``j`` sits at input voxel ``2^l j + (2^l - 1) / 2``, the centre of the block that average pooling
by ``2^l`` turns into it; the loss's level images are those block means, and fields move between levels on
these centres with their values scaled by 2 per level. (The stride-2 convolutions centre their features on
input voxel ``2^l j``; correlation and refinement are translation-equivariant, so this only places where the
network attributes a level's estimate, and training adapts it to the pooled-image grid of the loss.)
Paper: /work/shared/papers/pwc-pyramid-gunnarsson2020.txt;
deviations are listed in ``bundles/pwc/README.md``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from regnet_zoo.core.correlation import correlation_volume
from regnet_zoo.core.losses import diffusion_loss, global_ncc, lncc_loss, warped_label_dice_loss
from regnet_zoo.core.pyramid import pool_to_grid, upsample_coarse_ddf, upsample_ddf_from_level
from regnet_zoo.core.spatial import compose_ddf, warp_image
from regnet_zoo.core.tracing import size_max, size_tensor
from regnet_zoo.networks.pair import split_pair

__all__ = [
    "PWCRegistrationPyramid",
    "PWCLoss",
    "affine_ddf",
    "affine_ddf_squared_norm",
    "downsample_to",
    "level_warped_images",
]


def _conv(spatial_dims: int) -> type[nn.Module]:
    return nn.Conv3d if spatial_dims == 3 else nn.Conv2d


def _batch_norm(spatial_dims: int) -> type[nn.Module]:
    return nn.BatchNorm3d if spatial_dims == 3 else nn.BatchNorm2d


def normalized_grid(shape: Sequence[int], device=None, dtype=None) -> torch.Tensor:
    """Voxel centres in normalised coordinates ``(N, *shape)``: axis ``i`` runs -1 .. 1 (0 for size 1)."""
    if torch.jit.is_tracing():  # sizes are traced values: no branch on them, so an export runs at any size
        axes = [
            torch.arange(n, device=device, dtype=dtype) * (2.0 / size_max(n - 1, 1))
            - torch.as_tensor(n > 1, dtype=dtype, device=device)
            for n in shape
        ]
        return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=0)
    axes = [
        torch.linspace(-1.0, 1.0, n, device=device, dtype=dtype)
        if n > 1
        else torch.zeros(1, device=device, dtype=dtype)
        for n in shape
    ]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=0)


def _half_extent(shape: Sequence[int], device=None, dtype=None) -> torch.Tensor:
    """Voxels per normalised unit along each axis, ``(N,)`` (``(n - 1) / 2``; 1 for a size-1 axis)."""
    sizes = size_tensor(shape, device)  # float64: the same numbers as Python's float arithmetic
    return torch.where(sizes > 1, (sizes - 1) / 2.0, 1.0).to(dtype or torch.get_default_dtype())


def affine_ddf(theta: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Dense displacement of a global affine on a grid of ``shape``.

    ``theta`` ``(B, N, N + 1)`` is the deviation from the identity in normalised coordinates ``u`` in [-1, 1]:
    ``u -> u + theta[:, :, :N] u + theta[:, :, N]``. Returns the DDF ``(B, N, *shape)`` in voxel units.
    """
    spatial_dims = len(shape)
    if theta.shape[1:] != (spatial_dims, spatial_dims + 1):
        raise ValueError(f"theta must be (B, {spatial_dims}, {spatial_dims + 1}), got {tuple(theta.shape)}")
    grid = normalized_grid(shape, theta.device, theta.dtype)  # (N, *S)
    disp = torch.einsum("bij,j...->bi...", theta[:, :, :spatial_dims], grid)
    disp = disp + theta[:, :, spatial_dims].reshape(*theta.shape[:2], *([1] * spatial_dims))
    scale = _half_extent(shape, theta.device, theta.dtype).reshape(1, spatial_dims, *([1] * spatial_dims))
    return disp * scale


def affine_ddf_squared_norm(ddf: torch.Tensor) -> torch.Tensor:
    """``||phi_a - id||^2``: mean over voxels and batch of the squared displacement in normalised units."""
    shape = ddf.shape[2:]
    scale = _half_extent(shape, ddf.device, ddf.dtype).reshape(1, len(shape), *([1] * len(shape)))
    return (ddf / scale).pow(2).sum(dim=1).mean()


def downsample_to(image: torch.Tensor, level: int) -> torch.Tensor:
    """The level image ``I^(l)``: ``(B, C, *S)`` -> ``(B, C, *ceil(S / 2^l))``, block means of ``2^l`` voxels
    (``core.pyramid.pool_to_grid``; the border voxel repeated where ``S`` is not a multiple)."""
    return image if level == 0 else pool_to_grid(image, 2**level)


class ConvBlock(nn.Sequential):
    """The paper's CNN block: conv (kernel 3) + LeakyReLU + batch norm.

    ``(B, C_in, *S) -> (B, C_out, *S')``."""

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        stride: int = 1,
        negative_slope: float = 0.2,
    ):
        super().__init__(
            _conv(spatial_dims)(in_channels, out_channels, kernel_size=3, stride=stride, padding=1),
            nn.LeakyReLU(negative_slope),
            _batch_norm(spatial_dims)(out_channels),
        )


class FeaturePyramid(nn.Module):
    """Shared feature pyramid: per level three CNN blocks, the first with stride 2.

    ``(B, C, *S) -> [level 1 (B, c_1, *S/2), ..., level L (B, c_L, *S/2^L)]`` (sizes rounded up).
    """

    def __init__(self, spatial_dims: int, in_channels: int = 1, channels: Sequence[int] = (16, 32, 32, 32)):
        super().__init__()
        blocks = []
        previous = in_channels
        for c in channels:
            blocks.append(
                nn.Sequential(
                    ConvBlock(spatial_dims, previous, c, stride=2),
                    ConvBlock(spatial_dims, c, c),
                    ConvBlock(spatial_dims, c, c),
                )
            )
            previous = c
        self.levels = nn.ModuleList(blocks)

    def forward(self, image: torch.Tensor) -> list[torch.Tensor]:
        features = []
        x = image
        for level in self.levels:
            x = level(x)
            features.append(x)
        return features


class AffineModule(nn.Module):
    """Global average pooling + one dense layer -> ``theta`` ``(B, N, N + 1)`` (deviation from identity).

    Pooled inputs: fixed features, warped moving features, the cost volume and the cost volume weighted by
    each normalised coordinate (its first moments: plain pooling is translation invariant and could not
    see where matches lie; with the moments a linear layer can express a least-squares affine fit).
    The dense layer starts at zero, i.e. at the identity.
    """

    def __init__(self, spatial_dims: int, feature_channels: int, cost_channels: int):
        super().__init__()
        self.spatial_dims = spatial_dims
        in_features = 2 * feature_channels + cost_channels * (spatial_dims + 1)
        self.dense = nn.Linear(in_features, spatial_dims * (spatial_dims + 1))
        nn.init.zeros_(self.dense.weight)
        nn.init.zeros_(self.dense.bias)

    def forward(
        self, fixed_feat: torch.Tensor, warped_feat: torch.Tensor, cost: torch.Tensor
    ) -> torch.Tensor:
        grid = normalized_grid(cost.shape[2:], cost.device, cost.dtype)  # (N, *S)
        moments = (cost.unsqueeze(2) * grid.unsqueeze(0).unsqueeze(0)).flatten(1, 2)  # (B, K * N, *S)
        pooled = torch.cat([fixed_feat, warped_feat, cost, moments], dim=1).flatten(2).mean(dim=2)
        return self.dense(pooled).reshape(-1, self.spatial_dims, self.spatial_dims + 1)


class DeformModule(nn.Module):
    """DenseNet of CNN blocks (each block sees all previous outputs) + a conv to the displacement.

    ``(B, C_in, *S) -> (B, N, *S)``; the output conv starts at zero, so the refinement starts at zero.
    """

    def __init__(self, spatial_dims: int, in_channels: int, channels: Sequence[int] = (64, 64, 32, 18, 8)):
        super().__init__()
        blocks = []
        total = in_channels
        for c in channels:
            blocks.append(ConvBlock(spatial_dims, total, c))
            total += c
        self.blocks = nn.ModuleList(blocks)
        self.out = _conv(spatial_dims)(total, spatial_dims, kernel_size=3, padding=1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            for block in self.blocks:
                x = torch.cat([block(x), x], dim=1)
            return self.out(x)
        # without autograd: one preallocated buffer, each block's output written in front of its input
        # (the same channel order as the concatenations, without copying the earlier channels again)
        buffer = x.new_empty(x.shape[0], self.out.in_channels, *x.shape[2:])
        start = buffer.shape[1] - x.shape[1]
        buffer[:, start:] = x
        for block in self.blocks:
            y = block(buffer[:, start:])
            buffer[:, start - y.shape[1] : start] = y
            start -= y.shape[1]
        return self.out(buffer)


class UpsampleModule(nn.Module):
    """Upsampling by 2 (linear, on the level grids' centres, displacements doubled) + one conv (identity at
    init). ``(B, N, *S_{l+1}) -> (B, N, *shape)`` with ``S_{l+1} = ceil(shape / 2)``."""

    def __init__(self, spatial_dims: int):
        super().__init__()
        self.conv = _conv(spatial_dims)(spatial_dims, spatial_dims, kernel_size=3, padding=1)
        with torch.no_grad():
            # identity start: the upsampled estimate passes through unchanged until training adapts it
            self.conv.weight.zero_()
            centre = (slice(None), slice(None)) + (1,) * spatial_dims
            self.conv.weight[centre] = torch.eye(spatial_dims)
            self.conv.bias.zero_()

    def forward(self, ddf: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
        # coarse voxel j sits at fine voxel 2 j + 1/2 (both grids are block-mean grids of the input)
        return self.conv(upsample_coarse_ddf(2.0 * ddf, tuple(shape), stride=2, origin=0.5))


class PWCRegistrationPyramid(nn.Module):
    """Coarse-to-fine registration pyramid with warp, affine, cost volume and DenseNet deform modules.

    Args:
        spatial_dims: 2 or 3.
        in_channels: image channels (1 for the paper).
        pyramid_channels: filters per pyramid level; its length is ``L`` (paper: 16, 32, 32, 32).
        deform_channels: filters of the five DenseNet blocks (paper as printed: 64, 64, 32, 18, 8).
        search_radius: cost volume search range ``d`` in voxels of each level (paper: 2).
        correlation_metric: ``metric`` of ``regnet_zoo.core.correlation.correlation_volume`` on the learned
            features (``"dot"``: PWC-Net's correlation).
        image_correlation_metric: metric at level 0, where the "features" are the raw intensities (``"ssd"``:
            a product of two single intensities is no similarity).
        use_affine: estimate the per-level affine (paper: yes).
        use_deform: estimate the per-level deformable refinement (paper: yes; ``False``: affine-only
            ablation).
        level_warps: also return ``warped_level{l}``, the moving image warped by every level's field
            (upsampled to the input grid; the paper's Table 2 view, see :func:`level_warped_images`).

    ``forward(fixed, moving)`` with images ``(B, C, *S)`` returns
        ``ddf`` ``(B, N, *S)`` (= ``ddf_level0``), ``warped`` ``(B, C, *S)``,
        ``ddf_level{l}`` ``(B, N, *S_l)``: the deformable field ``phi_d^(l)`` of level ``l = 0..L`` (voxels
        of that level),
        ``affine_ddf_level{l}`` and ``affine_level{l}`` ``(B, N, N + 1)``: the affine ``phi_a^(l)`` per level
        (when ``use_affine``), ``warped_level{l}`` ``(B, C, *S)`` (when ``level_warps``).
    ``forward(pair)`` with fixed and moving stacked along channels is accepted too (MONAI export tools).
    """

    def __init__(
        self,
        spatial_dims: int = 3,
        in_channels: int = 1,
        pyramid_channels: Sequence[int] = (16, 32, 32, 32),
        deform_channels: Sequence[int] = (64, 64, 32, 18, 8),
        search_radius: int = 2,
        correlation_metric: str = "dot",
        image_correlation_metric: str = "ssd",
        use_affine: bool = True,
        use_deform: bool = True,
        level_warps: bool = False,
    ):
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        if not (use_affine or use_deform):
            raise ValueError("at least one of use_affine / use_deform must be enabled")
        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.num_levels = len(pyramid_channels)
        self.search_radius = search_radius
        self.correlation_metric = correlation_metric
        self.image_correlation_metric = image_correlation_metric
        self.use_affine = use_affine
        self.use_deform = use_deform
        self.level_warps = level_warps
        self.pyramid = FeaturePyramid(spatial_dims, in_channels, pyramid_channels)
        level_channels = [in_channels, *pyramid_channels]  # level 0 = the images themselves
        cost_channels = (2 * search_radius + 1) ** spatial_dims
        self.affine = nn.ModuleList(
            [AffineModule(spatial_dims, c, cost_channels) for c in level_channels] if use_affine else []
        )
        self.deform = nn.ModuleList(
            [
                DeformModule(spatial_dims, cost_channels + c + spatial_dims, deform_channels)
                for c in level_channels
            ]
            if use_deform
            else []
        )
        self.upsample = nn.ModuleList([UpsampleModule(spatial_dims) for _ in range(self.num_levels)])

    def _cost(self, level: int, fixed_feat: torch.Tensor, warped_feat: torch.Tensor) -> torch.Tensor:
        metric = self.image_correlation_metric if level == 0 else self.correlation_metric
        return correlation_volume(fixed_feat, warped_feat, self.search_radius, metric)

    def forward(self, fixed: torch.Tensor, moving: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        fixed, moving = split_pair(fixed, moving, self.spatial_dims, self.in_channels)
        fixed_levels = [fixed, *self.pyramid(fixed)]
        moving_levels = [moving, *self.pyramid(moving)]
        outputs: dict[str, torch.Tensor] = {}
        ddf: torch.Tensor | None = None
        for level in range(self.num_levels, -1, -1):
            fixed_feat, moving_feat = fixed_levels[level], moving_levels[level]
            shape = fixed_feat.shape[2:]
            if ddf is None:
                ddf = fixed_feat.new_zeros(fixed_feat.shape[0], self.spatial_dims, *shape)
            else:
                ddf = self.upsample[level](ddf, shape)
            warped_feat = warp_image(moving_feat, ddf)
            if self.use_affine:
                theta = self.affine[level](
                    fixed_feat, warped_feat, self._cost(level, fixed_feat, warped_feat)
                )
                affine_field = affine_ddf(theta, shape)
                # the affine acts on the already warped features: moving(x + a(x) + ddf(x + a(x)))
                ddf = compose_ddf(ddf, affine_field)
                warped_feat = warp_image(moving_feat, ddf)
                outputs[f"affine_level{level}"] = theta
                outputs[f"affine_ddf_level{level}"] = affine_field
            if self.use_deform:
                cost = self._cost(level, fixed_feat, warped_feat)
                ddf = ddf + self.deform[level](torch.cat([cost, fixed_feat, ddf], dim=1))
            outputs[f"ddf_level{level}"] = ddf
        outputs["ddf"] = ddf
        outputs["warped"] = warp_image(moving, ddf)
        if self.level_warps:
            outputs.update(level_warped_images(outputs, moving))
        return outputs

    def transform_parameters(self, outputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """The finest displacement ``(B, N, *S)`` (what instance optimisation adjusts)."""
        return outputs["ddf"]

    def outputs_from_parameters(
        self, params: torch.Tensor, fixed: torch.Tensor, moving: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """``ddf``, ``ddf_level0`` and ``warped`` from a finest displacement ``(B, N, *S)``."""
        return {"ddf": params, "ddf_level0": params, "warped": warp_image(moving, params)}


def level_warped_images(outputs: dict[str, torch.Tensor], moving: torch.Tensor) -> dict[str, torch.Tensor]:
    """The paper's Table 2 view: ``moving`` ``(B, C, *S)`` warped by each level's (upsampled) ``phi_d^(l)``.

    Returns ``{"warped_level{l}": (B, C, *S)}`` for every ``ddf_level{l}`` in ``outputs`` (level fields
    upsampled with ``core.pyramid.upsample_ddf_from_level``).
    """
    shape = tuple(moving.shape[2:])
    return {
        f"warped_level{level}": warp_image(moving, upsample_ddf_from_level(ddf, shape, 2**level))
        for level, ddf in _level_keys(outputs, "ddf_level").items()
    }


def _level_keys(outputs: dict[str, torch.Tensor], prefix: str) -> dict[int, torch.Tensor]:
    found = {
        int(k[len(prefix) :]): v
        for k, v in outputs.items()
        if k.startswith(prefix) and k[len(prefix) :].isdigit()
    }
    return dict(sorted(found.items()))


class PWCLoss(nn.Module):
    """Paper eq. (1)-(2): ``lambda (1 - Dice) + sum_l (L_sim^(l) + L_smooth^(l))``.

    ``L_sim^(l) = -gamma_l NCC(I_f^(l), I_m^(l) o phi_d^(l))``,
    ``L_smooth^(l) = alpha_l ||phi_a^(l) - id||^2 + beta_l ||grad phi_d^(l)||^2``.


    ``gamma_l = gamma / 2^l``, ``alpha_l = alpha * 2^l``, ``beta_l = beta / 2^l`` (paper: lambda 5, gamma 5,
    alpha 1, beta 1). ``I^(l)`` are the images' ``2^l`` block means (:func:`downsample_to`); NCC is global
    (``ncc_window=None``, the paper's NCC [Pratt]) or local with that window. The Dice term uses the
    foreground labels warped by ``phi_d^(0)`` (one-hot, linear) and is skipped without labels. Levels absent
    from ``outputs`` are skipped; ``ddf`` stands in for level 0 when ``ddf_level0`` is missing.

    Returns ``loss``, ``similarity``, ``affine``, ``smoothness``, ``segmentation`` (each the weighted sum).
    """

    def __init__(
        self,
        lambda_dice: float = 5.0,
        gamma: float = 5.0,
        alpha: float = 1.0,
        beta: float = 1.0,
        ncc_window: int | None = None,
    ):
        super().__init__()
        self.lambda_dice = lambda_dice
        self.gamma = gamma
        self.alpha = alpha
        self.beta = beta
        self.ncc_window = ncc_window

    def _negative_ncc(self, fixed: torch.Tensor, warped: torch.Tensor) -> torch.Tensor:
        if self.ncc_window is None:
            return global_ncc(fixed, warped)
        return lncc_loss(fixed, warped, self.ncc_window)

    def forward(
        self, outputs: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        fixed, moving = batch["fixed"], batch["moving"]
        deform = _level_keys(outputs, "ddf_level")
        if 0 not in deform:
            deform[0] = outputs["ddf"]
        zero = fixed.new_zeros(())
        similarity, smoothness, affine = zero, zero, zero
        for level, ddf in deform.items():
            shape = ddf.shape[2:]
            warped = warp_image(downsample_to(moving, level), ddf)
            similarity = similarity + self.gamma / 2**level * self._negative_ncc(
                downsample_to(fixed, level), warped
            )
            if min(shape) >= 3:  # finite differences need three voxels per axis
                smoothness = smoothness + self.beta / 2**level * diffusion_loss(ddf)
        for level, field in _level_keys(outputs, "affine_ddf_level").items():
            affine = affine + self.alpha * 2**level * affine_ddf_squared_norm(field)
        terms = {"similarity": similarity, "affine": affine, "smoothness": smoothness}
        if (
            self.lambda_dice > 0
            and batch.get("fixed_label") is not None
            and batch.get("moving_label") is not None
        ):
            dice_loss = warped_label_dice_loss(  # foreground structures only
                deform[0], batch["fixed_label"], batch["moving_label"], include_background=False
            )
            if dice_loss is not None:
                terms["segmentation"] = self.lambda_dice * dice_loss
        terms["loss"] = sum(terms.values())
        return terms
