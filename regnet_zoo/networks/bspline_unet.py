"""B-spline U-Net (Hering, Kuckertz, Heldmann & Heinrich 2019): label-driven registration, NGF + curvature.

A U-Net whose first levels are two weight-sharing streams (fixed, moving), concatenated and encoded jointly;
the bottleneck and the two decoder levels emit cubic B-spline control-point grids (three resolutions).
Level ``l`` (0 = finest) is a deformation of the image pyramid level ``l`` (images area-downsampled by
``2**l``), with control spacing ``control_spacing`` level-``l`` voxels;
:func:`regnet_zoo.core.bspline.bspline_ddf` turns each grid into a dense DDF of that level. Training sums the
loss over the three levels; inference uses the finest (level 0, full resolution). 2D as in the paper and 3D.
Deviations from the paper: ``bundles/bspline_unet/README.md``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from regnet_zoo.core.bspline import bspline_ddf, control_grid_shape
from regnet_zoo.core.losses import curvature_loss, label_values, ngf_loss, one_hot_labels
from regnet_zoo.core.padding import pad_to_multiple
from regnet_zoo.core.spatial import identity_grid, sample_image, warp_image
from regnet_zoo.core.tracing import ceil_div
from regnet_zoo.networks.pair import split_pair

__all__ = [
    "level_shape",
    "downsample_to_level",
    "level_key",
    "BSplineUNet",
    "BSplineUNetLoss",
    "PAPER_TERM_SCALES",
]

NUM_LEVELS = 3
#: units of (NGF, curvature, label) in which the paper's weights (1, 1e3, 5e4) balance the terms (see
#: :class:`BSplineUNetLoss`): effective weights 1, 1.5 and 0.5 on the discretised terms
PAPER_TERM_SCALES = (1.0, 1.5e-3, 1e-5)


def level_shape(shape: Sequence[int], level: int) -> tuple[int, ...]:
    """Spatial size of pyramid level ``level`` of an image of ``shape``: ``ceil(S / 2**level)``."""
    return tuple(ceil_div(n, 2**level) for n in shape)  # traced sizes stay traced (TorchScript export)


def downsample_to_level(x: Tensor, level: int) -> Tensor:
    """Area-average ``x`` ``(B, C, *S)`` to pyramid level ``level`` -> ``(B, C, *level_shape(S, level))``.

    Level-``l`` voxel ``j`` averages the full-resolution voxels ``[j 2^l, (j+1) 2^l)`` (adaptive average
    pooling when ``S`` is not divisible by ``2^l``); one-hot label maps become soft (partial-volume) maps.
    """
    if level == 0:
        return x
    return F.interpolate(x, size=level_shape(x.shape[2:], level), mode="area")


def level_key(name: str, level: int) -> str:
    """Output key of ``name`` at pyramid level ``level``: ``"ddf"``, ``"ddf_level1"``, ``"ddf_level2"``."""
    return name if level == 0 else f"{name}_level{level}"


def _conv_block(
    spatial_dims: int, in_channels: int, out_channels: int, stride: int = 1, norm: bool = True
) -> nn.Sequential:
    """Two 3x3(x3) convolutions, each + instance norm (optional) + LeakyReLU(0.2); the first one strided."""
    conv = (nn.Conv2d, nn.Conv3d)[spatial_dims - 2]
    instance_norm = (nn.InstanceNorm2d, nn.InstanceNorm3d)[spatial_dims - 2]
    layers: list[nn.Module] = []
    for i, (c_in, c_out) in enumerate(((in_channels, out_channels), (out_channels, out_channels))):
        layers.append(conv(c_in, c_out, 3, stride=stride if i == 0 else 1, padding=1))
        if norm:
            layers.append(instance_norm(c_out, affine=True))
        layers.append(nn.LeakyReLU(0.2))
    return nn.Sequential(*layers)


def _upsample_by_two(x: Tensor) -> Tensor:
    """Linear upsampling ``(B, C, *S) -> (B, C, *2S)`` in stride-2 geometry: fine ``i`` = coarse ``i / 2``."""
    mode = "bilinear" if x.ndim == 4 else "trilinear"
    x = F.interpolate(x, size=[2 * n - 1 for n in x.shape[2:]], mode=mode, align_corners=True)
    return F.pad(x, [0, 1] * (x.ndim - 2), mode="replicate")


class BSplineUNet(nn.Module):
    """Siamese-stream U-Net predicting cubic B-spline control points at three pyramid levels.

    ``forward(fixed, moving)`` with images ``(B, C, *S)`` returns (fields in voxel units of their own grid):

    - ``ddf`` ``(B, N, *S)``, ``warped`` ``(B, C, *S)``, ``control_points`` ``(B, N, *C0)``: level 0 (used at
      inference), ``C0 = control_grid_shape(S, control_spacing)``;
    - ``ddf_level{l}`` ``(B, N, *S_l)`` and ``control_points_level{l}`` for ``l = 1, 2``, on the pyramid grid
      ``S_l = level_shape(S, l)`` (for the multi-level training loss).

    ``forward(pair)`` with one ``(B, 2C, *S)`` tensor (fixed, moving stacked) is accepted for MONAI tools.

    Architecture: the stream (shared weights) runs ``len(stream_channels)`` levels on each image (the first at
    full resolution, each further one halving it with a stride-2 convolution); the two streams' outputs are
    concatenated and encoded by ``len(encoder_channels)`` further stride-2 levels. The decoder goes back up
    ``len(decoder_channels)`` levels with skip connections. Control points of pyramid level ``l`` are read
    from the decoder output ``l`` levels coarser than the finest one (level 2 from the bottleneck), by a
    3x3 convolution (zero-initialised: identity at start) sampled linearly at the control points' positions.
    With the defaults the heads have strides 4, 8, 16 = control spacing 4 x 2**l full-resolution voxels.

    Args:
        spatial_dims: 2 or 3.
        in_channels: channels of each image.
        stream_channels: widths of the weight-sharing per-image levels (strides 1, 2, 4, ...).
        encoder_channels: widths of the joint encoder levels (each halves the resolution).
        decoder_channels: widths of the decoder levels (each doubles the resolution); must be 2 so that
            together with the bottleneck there are three output resolutions.
        control_spacing: B-spline control-point spacing in voxels of each pyramid level.
        norm: instance normalisation after every convolution (much faster training than without).
    """

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 1,
        stream_channels: Sequence[int] = (16, 32),
        encoder_channels: Sequence[int] = (64, 64, 64),
        decoder_channels: Sequence[int] = (64, 64),
        control_spacing: int = 4,
        norm: bool = True,
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        if len(decoder_channels) != NUM_LEVELS - 1:
            raise ValueError(f"decoder_channels needs {NUM_LEVELS - 1} entries (three output resolutions)")
        if len(encoder_channels) < len(decoder_channels) or not stream_channels:
            raise ValueError("need at least one stream level and as many encoder levels as decoder levels")
        if int(control_spacing) < 1:
            raise ValueError(f"control_spacing must be a positive integer, got {control_spacing}")
        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.control_spacing = int(control_spacing)
        self.stream = nn.ModuleList()
        channels = in_channels
        for i, out in enumerate(stream_channels):
            self.stream.append(_conv_block(spatial_dims, channels, out, 1 if i == 0 else 2, norm))
            channels = out
        channels *= 2  # fixed and moving streams concatenated
        self.encoder = nn.ModuleList()
        encoder_widths = [channels]
        for out in encoder_channels:
            self.encoder.append(_conv_block(spatial_dims, channels, out, 2, norm))
            channels = out
            encoder_widths.append(out)
        self.num_downsamplings = len(stream_channels) - 1 + len(encoder_channels)
        conv = (nn.Conv2d, nn.Conv3d)[spatial_dims - 2]
        self.decoder = nn.ModuleList()
        self.heads = nn.ModuleList([conv(channels, spatial_dims, 3, padding=1)])  # coarsest head first
        for i, out in enumerate(decoder_channels):
            skip = encoder_widths[-2 - i]
            self.decoder.append(_conv_block(spatial_dims, channels + skip, out, 1, norm))
            channels = out
            self.heads.append(conv(channels, spatial_dims, 3, padding=1))
        for head in self.heads:
            nn.init.zeros_(head.weight)
            nn.init.zeros_(head.bias)

    def head_stride(self, level: int) -> int:
        """Stride (in full-resolution voxels) of the decoder features that pyramid ``level`` is read from."""
        return 2 ** (self.num_downsamplings - (NUM_LEVELS - 1) + level)

    def _control_points(self, features: Tensor, head: nn.Module, level: int, shape: Sequence[int]) -> Tensor:
        """Sample ``head(features)`` at the full-resolution positions of level ``level``'s control points."""
        level_size = level_shape(shape, level)
        grid = control_grid_shape(level_size, self.control_spacing)
        scale = 2**level
        stride = self.head_stride(level)
        # control point k of level l sits at level voxel (k - 1) s, whose centre is at full-resolution
        # position ((k - 1) s + 0.5) 2^l - 0.5; stride-2 convolutions put feature j at position stride * j
        positions = identity_grid(grid, device=features.device, dtype=features.dtype)
        positions = ((positions - 1.0) * self.control_spacing + 0.5) * scale - 0.5
        return sample_image(head(features), positions / stride, mode="linear", padding_mode="border")

    def forward(self, fixed: Tensor, moving: Tensor | None = None) -> dict[str, Tensor]:
        fixed, moving = split_pair(fixed, moving, self.spatial_dims, self.in_channels)
        shape = tuple(fixed.shape[2:])
        # both streams in one pass (shared weights); zero-padded at the far end so that feature positions
        # stay stride * index
        pair, _ = pad_to_multiple(torch.cat([fixed, moving], dim=0), 2**self.num_downsamplings)
        for block in self.stream:
            pair = block(pair)
        x = torch.cat(torch.chunk(pair, 2, dim=0), dim=1)
        skips = [x]
        for block in self.encoder:
            x = block(x)
            skips.append(x)
        features = [x]
        for i, block in enumerate(self.decoder):
            skip = skips[-2 - i]
            x = block(torch.cat([_upsample_by_two(x), skip], dim=1))
            features.append(x)
        out: dict[str, Tensor] = {}
        for level in range(NUM_LEVELS):
            # heads are stored coarsest first; pyramid level 0 is the finest decoder output
            index = NUM_LEVELS - 1 - level
            coefficients = self._control_points(features[index], self.heads[index], level, shape)
            out[level_key("control_points", level)] = coefficients
            out[level_key("ddf", level)] = bspline_ddf(
                coefficients, level_shape(shape, level), self.control_spacing
            )
        out["warped"] = warp_image(moving, out["ddf"])
        return out

    def transform_parameters(self, outputs: dict[str, Tensor]) -> Tensor:
        """The finest control-point grid ``(B, N, *C0)`` (what test-time instance optimisation adjusts)."""
        return outputs["control_points"]

    def outputs_from_parameters(self, params: Tensor, fixed: Tensor, moving: Tensor) -> dict[str, Tensor]:
        """``ddf``, ``warped``, ``control_points`` (level 0 only) from control points ``(B, N, *C0)``."""
        ddf = bspline_ddf(params, fixed.shape[2:], self.control_spacing)
        return {"ddf": ddf, "warped": warp_image(moving, ddf), "control_points": params}


class BSplineUNetLoss(nn.Module):
    """Hering et al. loss ``delta NGF(F, M(y)) + alpha R(y) + beta B(b_F, b_M(y))`` summed over the levels.

    ``forward(outputs, batch) -> {"loss", "ngf", "curvature", "label", "ngf_level1", ...}`` (unweighted
    terms; ``label*`` only when ``batch`` has ``fixed_label`` and ``moving_label``). Levels whose ``ddf*``
    is absent from ``outputs`` are skipped;
    ``loss = sum_l level_weights[l] * (delta s_D D_l + alpha s_R R_l + beta s_B B_l)`` with the term units
    ``term_scales = (s_D, s_R, s_B)``.

    Discretisation (how the paper's weights are read): integrals over Omega are means over voxels
    (|Omega| = 1, a common factor), and derivatives are taken in physical units where a full-resolution
    voxel has size ``voxel_size`` (default 1: voxel units) and a level-``l`` voxel
    ``h_l = voxel_size * 2**l``. Then

    - ``D = 1/2 mean(1 - <grad M(y), grad F>_eps^2 / (|grad M(y)|_eps^2 |grad F|_eps^2))`` =
      ``core.losses.ngf_loss`` with ``eps_voxel = eps * h_l`` (intensities in [0, 1] as in the paper);
    - ``R = 1/2 mean sum_j (Laplace y_j)^2 = N/2 * core.losses.curvature_loss(u) / h_l**2`` (u in voxels);
    - ``B = 1/2 mean sum_labels (b_M(y) - b_F)^2`` on one-hot maps (area-downsampled at coarse levels, moving
      one-hot warped linearly), independent of ``h``.

    Changing ``voxel_size`` by a factor ``k`` is the same as multiplying ``alpha`` by ``1 / k**2`` and ``eps``
    by ``k``; e.g. a domain Omega = [0, 1]^d over ``n`` voxels is ``voxel_size = 1 / n``.

    Term units (calibration, :data:`PAPER_TERM_SCALES`): read literally, with every integral a mean, the
    paper's weights make the label term pull ~1e5 times harder than NGF (on OASIS slices, at the identity, the
    mean absolute gradients w.r.t. the field are 3e-6 for D and 8e-6 for B per unit weight) and curvature
    (alpha = 1e3) stops NGF alone from moving at all, so NGF does nothing: not the paper's Table 1, where
    removing any term changes Dice. The paper's discretisation is not given, so the units are calibrated:
    ``s_B = 1e-5`` makes the label pull comparable with NGF's at the paper's weights (effective 0.5 vs 1, the
    label gradient being ~3 times larger), and ``s_R = 1.5e-3`` makes curvature cost about what NGF gains for
    a one-voxel displacement of wavelength ~4 control spacings (``R ~ 6e-3`` for a unit sine of 16 voxels).
    ``term_scales = (1, 1, 1)`` is the literal reading.

    Args:
        ngf_weight: delta (paper 1).
        curvature_weight: alpha (paper 1e3).
        label_weight: beta (paper 5e4).
        ngf_eps: edge parameter eps (paper 0.1), in intensity per ``voxel_size``.
        level_weights: weights of pyramid levels 0 (finest), 1, 2 (the paper does not give them).
        voxel_size: physical size of a full-resolution voxel in the units the weights refer to.
        term_scales: units ``(s_D, s_R, s_B)`` of the three terms (default: :data:`PAPER_TERM_SCALES`).
    """

    def __init__(
        self,
        ngf_weight: float = 1.0,
        curvature_weight: float = 1e3,
        label_weight: float = 5e4,
        ngf_eps: float = 0.1,
        level_weights: Sequence[float] = (1.0, 0.5, 0.25),
        voxel_size: float = 1.0,
        term_scales: Sequence[float] = PAPER_TERM_SCALES,
    ) -> None:
        super().__init__()
        if len(level_weights) != NUM_LEVELS:
            raise ValueError(f"level_weights needs {NUM_LEVELS} entries (levels 0, 1, 2)")
        if voxel_size <= 0 or ngf_eps <= 0:
            raise ValueError("voxel_size and ngf_eps must be positive")
        self.ngf_weight = float(ngf_weight)
        self.curvature_weight = float(curvature_weight)
        self.label_weight = float(label_weight)
        self.ngf_eps = float(ngf_eps)
        self.level_weights = tuple(float(w) for w in level_weights)
        self.voxel_size = float(voxel_size)
        if len(term_scales) != 3 or min(term_scales) <= 0:
            raise ValueError(f"term_scales needs 3 positive units (NGF, curvature, label), got {term_scales}")
        self.term_scales = tuple(float(v) for v in term_scales)

    def forward(self, outputs: dict[str, Tensor], batch: dict[str, Tensor]) -> dict[str, Tensor]:
        fixed, moving = batch["fixed"], batch["moving"]
        fixed_label, moving_label = batch.get("fixed_label"), batch.get("moving_label")
        use_labels = self.label_weight != 0 and fixed_label is not None and moving_label is not None
        if use_labels:
            values = label_values(fixed_label, moving_label)
            fixed_onehot = one_hot_labels(fixed_label, values).to(fixed.dtype)
            moving_onehot = one_hot_labels(moving_label, values).to(fixed.dtype)
        total = fixed.new_zeros(())
        terms: dict[str, Tensor] = {}
        delta = self.ngf_weight * self.term_scales[0]
        alpha = self.curvature_weight * self.term_scales[1]
        beta = self.label_weight * self.term_scales[2]
        for level, weight in enumerate(self.level_weights):
            ddf = outputs.get(level_key("ddf", level))
            if ddf is None or weight == 0:
                continue
            h = self.voxel_size * 2**level
            fixed_l = downsample_to_level(fixed, level)
            if level == 0 and "warped" in outputs:
                warped = outputs["warped"]
            else:
                warped = warp_image(downsample_to_level(moving, level), ddf)
            ngf = ngf_loss(warped, fixed_l, eps=self.ngf_eps * h)
            curvature = 0.5 * ddf.shape[1] * curvature_loss(ddf) / h**2
            level_loss = delta * ngf + alpha * curvature
            terms[level_key("ngf", level)] = ngf
            terms[level_key("curvature", level)] = curvature
            if use_labels:
                warped_onehot = warp_image(downsample_to_level(moving_onehot, level), ddf)
                label = 0.5 * ((warped_onehot - downsample_to_level(fixed_onehot, level)) ** 2).sum(1).mean()
                level_loss = level_loss + beta * label
                terms[level_key("label", level)] = label
            total = total + weight * level_loss
        if not terms:
            raise ValueError("outputs hold no displacement field ('ddf', 'ddf_level1', 'ddf_level2')")
        return {"loss": total, **terms}
