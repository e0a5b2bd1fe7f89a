"""RegNet: multi-scale patch regressor of the displacement of the centre voxel (Sokooti et al., MICCAI 2017).

The patch network sees a 29^N patch at original resolution and a 54^N patch averaged down to 27^N, for the
fixed and the moving image (four inputs, late fusion), and regresses the N-vector displacement of the patch
centre. All layers are valid 3^N convolutions (batch norm, ReLU), one 2^N max pooling on the
original-resolution path, and the two fully connected layers are 1^N convolutions, so the same weights
run fully convolutionally: :meth:`RegNet.dense_valid` evaluates the patch network at every voxel of a tile
at once (shift-and-stitch over the 2^N pooling phases), exactly equal to :meth:`RegNet.forward_patches`
on the patches around each voxel.

Borders (dense inference): the image is extended by 27 / 26 voxels by edge replication (``padding_mode``
``"replicate"``), so the context of a border voxel holds real image values, never an artificial black frame;
voxels whose whole context lies inside the image do not depend on the padding at all.
``multi_scale=False`` is the paper's single-scale ablation ("RegNet 1Scale"): the 29^N patch path alone.

Geometry (per axis, patch centred at voxel ``c``): the original patch is ``c-14 .. c+14`` (its last voxel is
dropped by the floor of the max pooling, as in the paper's network), the context patch is ``c-27 .. c+26``
averaged in 2-voxel blocks; both feature maps then sit on the same half-voxel grid, so they align exactly.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from monai.networks.layers.factories import Act, Conv, Norm, Pool
from torch import nn

from regnet_zoo.core.spatial import warp_image
from regnet_zoo.core.tracing import ceil_div, size_min
from regnet_zoo.networks.pair import split_pair

__all__ = [
    "HIGH_RES_PATCH",
    "LOW_RES_PATCH",
    "CONTEXT_BEFORE",
    "CONTEXT_AFTER",
    "RegNet",
    "RegNetLoss",
    "extract_patches",
    "dvf_mae",
]

HIGH_RES_PATCH = 29  # original-resolution patch width (voxels)
LOW_RES_PATCH = 54  # context patch width before 2x downsampling (-> 27)
CONTEXT_BEFORE = LOW_RES_PATCH // 2  # voxels the prediction at c needs before c (27)
CONTEXT_AFTER = LOW_RES_PATCH - CONTEXT_BEFORE - 1  # ... and after c (26)
_STEM_LAYERS, _HIGH_LAYERS, _LOW_LAYERS, _MERGED_LAYERS = 3, 2, 6, 4


def _conv_stack(
    spatial_dims: int, in_channels: int, channels: Sequence[int], kernel_size: int = 3
) -> nn.Sequential:
    """Valid (unpadded) conv + batch norm + ReLU layers; each 3-conv trims one voxel per side."""
    conv, norm, act = Conv[Conv.CONV, spatial_dims], Norm[Norm.BATCH, spatial_dims], Act[Act.RELU]
    layers: list[nn.Module] = []
    for out_channels in channels:
        layers += [conv(in_channels, out_channels, kernel_size, padding=0), norm(out_channels), act()]
        in_channels = out_channels
    return nn.Sequential(*layers)


def _crop(x: torch.Tensor, starts: Sequence[int], sizes: Sequence[int] | None = None) -> torch.Tensor:
    """Crop the trailing ``len(starts)`` axes of ``x`` to ``[start, start + size)`` (or to the end)."""
    n = len(starts)
    index = [slice(None)] * (x.dim() - n)
    for i, start in enumerate(starts):
        stop = None if sizes is None else start + sizes[i]
        index.append(slice(start, stop))
    return x[tuple(index)]


class RegNet(nn.Module):
    """Multi-scale late-fusion RegNet, 2D or 3D, fully convolutional at inference.

    Args:
        spatial_dims: 2 or 3.
        in_channels: channels of each of fixed and moving (1 in the paper).
        stem_channels: width of the 3 per-input conv layers (16 in the authors' code).
        high_res_channels: widths of the 2 conv layers of the original-resolution path after fusion.
        low_res_channels: widths of the 6 conv layers of the downsampled path after fusion.
        merged_channels: widths of the 4 conv layers after the two paths are concatenated.
        fc_channels: width of the first fully connected layer (the second outputs the N-vector).
        multi_scale: ``False``: the paper's single-scale ablation (no 54^N context path; the 29^N patch only).
        output_init_std: ``None`` (default): PyTorch's default initialisation of the last layer; a number: the
            std of its initial weights (bias zero), so that training starts near the zero field. A tiny std
            (1e-5) left an output channel of the multi-scale network unlearnt in every benchmark run, and
            the default learns both (bundle README, "Claims").
        padding_mode: how images are extended beyond their border for dense inference (``F.pad`` mode;
            ``"replicate"``: edge values, so border contexts hold real intensities; ``"constant"``: zeros).
        dense_mode: ``"exact"`` evaluates every voxel (2^N pooling phases), ``"interpolate"`` evaluates the
            even voxels only and interpolates linearly in between (about 2^N times less merged-path work).
        tile_size: output tile size for dense inference (an int for every axis or one per axis, rounded up
            to even voxels); ``None``: the whole image at once.
        skip_crop_border: in training mode only, predict just the voxels whose whole context lies inside the
            input (``ddf`` is zero in the 27 / 26-voxel border): training crops then cost ``L^N`` rather
            than ``(L + 53)^N``; the loss must ignore that border (``ddf_mask`` of
            ``regnet_zoo.data.regnet_crop.RegNetSyntheticCropd`` does). Evaluation mode always predicts
            every voxel.
            Tiles overlap by the 53-voxel context, the result does not depend on the tiling in eval mode.
    """

    def __init__(
        self,
        spatial_dims: int = 3,
        in_channels: int = 1,
        stem_channels: int = 16,
        high_res_channels: Sequence[int] = (25, 30),
        low_res_channels: Sequence[int] = (25, 25, 25, 30, 30, 30),
        merged_channels: Sequence[int] = (60, 70, 75, 150),
        fc_channels: int = 150,
        padding_mode: str = "replicate",
        dense_mode: str = "exact",
        tile_size: int | Sequence[int] | None = None,
        skip_crop_border: bool = False,
        multi_scale: bool = True,
        output_init_std: float | None = None,
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        if len(high_res_channels) != _HIGH_LAYERS or len(low_res_channels) != _LOW_LAYERS:
            raise ValueError("the patch geometry fixes 2 high-resolution and 6 low-resolution conv layers")
        if len(merged_channels) != _MERGED_LAYERS:
            raise ValueError("the patch geometry fixes 4 conv layers after the fusion of both paths")
        if dense_mode not in ("exact", "interpolate"):
            raise ValueError(f"dense_mode must be 'exact' or 'interpolate', got {dense_mode!r}")
        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.padding_mode = padding_mode
        self.dense_mode = dense_mode
        self.tile_size = tile_size
        self.skip_crop_border = skip_crop_border
        self.multi_scale = multi_scale
        stem = [stem_channels] * _STEM_LAYERS
        self.fixed_stem = _conv_stack(spatial_dims, in_channels, stem)
        self.moving_stem = _conv_stack(spatial_dims, in_channels, stem)
        self.high_res_path = _conv_stack(spatial_dims, 2 * stem_channels, high_res_channels)
        merged_in = high_res_channels[-1]
        if multi_scale:
            self.fixed_stem_low = _conv_stack(spatial_dims, in_channels, stem)
            self.moving_stem_low = _conv_stack(spatial_dims, in_channels, stem)
            self.low_res_path = _conv_stack(spatial_dims, 2 * stem_channels, low_res_channels)
            merged_in += low_res_channels[-1]
        self.pool = Pool[Pool.MAX, spatial_dims](kernel_size=2, stride=2)
        self.merged = _conv_stack(spatial_dims, merged_in, merged_channels)
        # the two fully connected layers, as 1^N convolutions so that the network slides over whole images
        self.fully_connected = nn.Sequential(
            _conv_stack(spatial_dims, merged_channels[-1], [fc_channels], kernel_size=1),
            Conv[Conv.CONV, spatial_dims](fc_channels, spatial_dims, kernel_size=1),
        )
        if output_init_std is not None:  # start near the zero field (as VoxelMorph's flow layer)
            nn.init.normal_(self.fully_connected[-1].weight, std=output_init_std)
            nn.init.zeros_(self.fully_connected[-1].bias)

    # --- the paper's patch network ---
    def _high_res_features(self, fixed: torch.Tensor, moving: torch.Tensor) -> torch.Tensor:
        return self.high_res_path(torch.cat([self.fixed_stem(fixed), self.moving_stem(moving)], dim=1))

    def _low_res_features(self, fixed_low: torch.Tensor, moving_low: torch.Tensor) -> torch.Tensor:
        return self.low_res_path(
            torch.cat([self.fixed_stem_low(fixed_low), self.moving_stem_low(moving_low)], 1)
        )

    def _regress(self, pooled_high: torch.Tensor, low: torch.Tensor | None) -> torch.Tensor:
        merged_in = pooled_high if low is None else torch.cat([pooled_high, low], dim=1)
        return self.fully_connected(self.merged(merged_in))

    def _downsample(self, image: torch.Tensor) -> torch.Tensor:
        return F.avg_pool3d(image, 2) if self.spatial_dims == 3 else F.avg_pool2d(image, 2)

    def forward_patches(
        self,
        fixed_patch: torch.Tensor,
        moving_patch: torch.Tensor,
        fixed_context: torch.Tensor,
        moving_context: torch.Tensor,
    ) -> torch.Tensor:
        """The patch network: ``(B, C, 29^N)`` patches and ``(B, C, 54^N)`` context patches -> ``(B, N)``.

        See :func:`extract_patches` for where the patches lie around the centre voxel.
        """
        n = self.spatial_dims
        if fixed_patch.shape[2:] != (HIGH_RES_PATCH,) * n or fixed_context.shape[2:] != (LOW_RES_PATCH,) * n:
            raise ValueError(
                f"patches must be {HIGH_RES_PATCH}^{n} and {LOW_RES_PATCH}^{n}, "
                f"got {tuple(fixed_patch.shape[2:])} and {tuple(fixed_context.shape[2:])}"
            )
        pooled = self.pool(self._high_res_features(fixed_patch, moving_patch))
        if not self.multi_scale:  # single-scale ablation: the context patches are not used
            return self._regress(pooled, None).flatten(1)
        low = self._low_res_features(self._downsample(fixed_context), self._downsample(moving_context))
        return self._regress(pooled, low).flatten(1)

    # --- fully convolutional evaluation ---
    def _phase_output(
        self,
        high: torch.Tensor,
        fixed: torch.Tensor,
        moving: torch.Tensor,
        phase: Sequence[int],
        window_max: torch.Tensor | None = None,
    ):
        """Predictions at the valid-grid voxels ``q = offset + 2 k``, ``offset = 1 - phase`` per axis.

        ``high``: pre-pooling high-resolution features of the tile (index ``i`` <-> input voxel ``i + 5``).
        Derivation (per axis, predicted input voxel ``c`` of parity ``phase``): the pooling windows of its
        patch start at ``c - 9 ≡ phase + 1`` -> feature index ``≡ phase``; its 2-voxel averaging blocks
        start at ``c - 27 ≡ 1 - phase``; block ``k`` aligns with pooled window ``k + 7 - phase``.
        """
        offsets = [1 - p for p in phase]
        if window_max is None:
            pooled = self.pool(_crop(high, list(phase)))
        else:  # the max of every 2^N block of ``high``: this phase's pooling windows are every other one
            pooled = window_max[(Ellipsis, *[slice(p, None, 2) for p in phase])]
        pooled = _crop(pooled, [7 - p for p in phase])
        if not self.multi_scale:  # the output grid of the multi-scale network, so both variants align
            low_conv_layers = _STEM_LAYERS + _LOW_LAYERS
            sizes = [
                size_min(a, (s - o) // 2 - 2 * low_conv_layers)
                for a, s, o in zip(pooled.shape[2:], fixed.shape[2:], offsets, strict=True)
            ]
            return self._regress(_crop(pooled, [0] * len(sizes), sizes), None)
        low = self._low_res_features(
            self._downsample(_crop(fixed, offsets)), self._downsample(_crop(moving, offsets))
        )
        sizes = [size_min(a, b) for a, b in zip(pooled.shape[2:], low.shape[2:], strict=True)]
        return self._regress(_crop(pooled, [0] * len(sizes), sizes), _crop(low, [0] * len(sizes), sizes))

    def dense_valid(
        self, fixed: torch.Tensor, moving: torch.Tensor, stride_only: bool = False
    ) -> torch.Tensor:
        """Patch-network predictions for every voxel whose whole context lies inside the input.

        Args:
            fixed, moving: ``(B, C, *L)`` with every ``L_i >= 54``.
            stride_only: predict the even output voxels only (a ``(B, N, *ceil((L-53)/2))`` grid).

        Returns:
            ``(B, N, *(L - 53))``: entry ``q`` is the displacement of input voxel ``q + 27``.
        """
        sizes = [s - LOW_RES_PATCH + 1 for s in fixed.shape[2:]]
        if min(sizes) < 1:
            raise ValueError(
                f"dense_valid needs inputs of at least {LOW_RES_PATCH} voxels, got {tuple(fixed.shape)}"
            )
        high = self._high_res_features(fixed, moving)
        if stride_only:
            coarse = [ceil_div(s, 2) for s in sizes]
            return _crop(
                self._phase_output(high, fixed, moving, [1] * self.spatial_dims), [0] * len(sizes), coarse
            )
        out = high.new_zeros((fixed.shape[0], self.spatial_dims, *sizes))
        # without autograd, the 2^N phases' max poolings at once (the same values, ~8x less work); training
        # keeps max pooling, whose gradient picks one of tied maxima where an elementwise maximum splits it
        window_max = None if torch.is_grad_enabled() else _block_max(high)
        for phase in itertools.product((0, 1), repeat=self.spatial_dims):
            offsets = [1 - p for p in phase]
            counts = [ceil_div(s - o, 2) for s, o in zip(sizes, offsets, strict=True)]
            if min(counts) < 1:
                continue
            predicted = self._phase_output(high, fixed, moving, phase, window_max)
            predicted = _crop(predicted, [0] * len(counts), counts)
            index = (slice(None), slice(None)) + tuple(slice(o, None, 2) for o in offsets)
            out[index] = predicted
        return out

    def dense(self, fixed: torch.Tensor, moving: torch.Tensor) -> torch.Tensor:
        """DDF ``(B, N, *S)`` on the whole fixed grid: the patch network at every voxel (borders padded)."""
        shape = list(fixed.shape[2:])
        n = self.spatial_dims
        pad: list[int] = []
        for _ in range(n):  # F.pad lists the last axis first
            pad += [CONTEXT_BEFORE, CONTEXT_AFTER]
        fixed_pad = F.pad(fixed, pad, mode=self.padding_mode)
        moving_pad = F.pad(moving, pad, mode=self.padding_mode)
        if n == 3 and fixed.device.type == "cpu":  # oneDNN 3D convolutions: ~20 % less CPU time channels-last
            fixed_pad = fixed_pad.contiguous(memory_format=torch.channels_last_3d)
            moving_pad = moving_pad.contiguous(memory_format=torch.channels_last_3d)
        stride_only = self.dense_mode == "interpolate"
        if self.tile_size is None:
            # one tile, with no Python arithmetic on the sizes: a traced export follows the input's size
            tiling = [([0] * n, shape)]
        else:
            tiles = self.tile_size
            tiles = [int(tiles)] * n if np.isscalar(tiles) else [int(t) for t in tiles]
            tiles = [max(2, t + t % 2) for t in tiles]  # even: tiles start on the even (stride) grid
            tiling = [
                (starts, [min(tile, s - t) for s, t, tile in zip(shape, starts, tiles, strict=True)])
                for starts in itertools.product(*[range(0, s, t) for s, t in zip(shape, tiles, strict=True)])
            ]
        out_shape = [ceil_div(s, 2) for s in shape] if stride_only else shape
        out = fixed.new_zeros((fixed.shape[0], n, *out_shape))
        for starts, sizes in tiling:
            window = [z + LOW_RES_PATCH - 1 for z in sizes]
            part = self.dense_valid(
                _crop(fixed_pad, starts, window), _crop(moving_pad, starts, window), stride_only
            )
            if stride_only:
                starts = [t // 2 for t in starts]
            out[
                (slice(None), slice(None))
                + tuple(slice(t, t + z) for t, z in zip(starts, part.shape[2:], strict=True))
            ] = part
        if stride_only:
            out = _upsample_even_grid(out, shape)
        return out

    def forward(self, fixed: torch.Tensor, moving: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """``fixed``, ``moving``: ``(B, C, *S)`` -> ``{"ddf": (B, N, *S), "warped": (B, C, *S)}``.

        ``forward(pair)`` with one ``(B, 2C, *S)`` tensor (fixed and moving stacked along channels) is
        accepted too, for MONAI tools that feed a single input (``ckpt_export``, ``verify_net_in_out``).
        """
        fixed, moving = split_pair(fixed, moving, self.spatial_dims, self.in_channels)
        if self.training and self.skip_crop_border:
            pad: list[int] = []
            for _ in range(self.spatial_dims):
                pad += [CONTEXT_BEFORE, CONTEXT_AFTER]
            return self.outputs_from_parameters(F.pad(self.dense_valid(fixed, moving), pad), fixed, moving)
        return self.outputs_from_parameters(self.dense(fixed, moving), fixed, moving)

    def transform_parameters(self, outputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The dense displacement field (RegNet has no coarser parametrisation)."""
        return outputs["ddf"]

    def outputs_from_parameters(
        self, params: torch.Tensor, fixed: torch.Tensor, moving: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """``params``: ``(B, N, *S)`` DDF -> ``{"ddf", "warped"}``."""
        return {"ddf": params, "warped": warp_image(moving, params)}


def _block_max(x: torch.Tensor) -> torch.Tensor:
    """Max over the ``2^N`` block starting at every voxel of ``x`` ``(B, C, *S)`` -> ``(B, C, *(S - 1))``:
    a stride-1 max pooling of width 2, as one elementwise maximum per axis."""
    for dim in range(2, x.dim()):
        n = x.shape[dim] - 1
        x = torch.maximum(x.narrow(dim, 0, n), x.narrow(dim, 1, n))
    return x


def _upsample_even_grid(coarse: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Values at the even voxels ``0, 2, 4, ...`` -> linear interpolation at every voxel of ``shape``."""
    n = len(shape)
    covered = [2 * c - 1 for c in coarse.shape[2:]]  # even voxels span 0 .. 2 (c - 1)
    mode = "trilinear" if n == 3 else "bilinear"
    fine = F.interpolate(coarse, size=covered, mode=mode, align_corners=True)
    pad: list[int] = []
    for s, c in reversed(list(zip(shape, covered, strict=True))):
        pad += [0, s - c]  # an even-length axis ends on an odd voxel past the last even one: hold the value
    return F.pad(fine, pad, mode="replicate") if torch.jit.is_tracing() or any(pad) else fine


def extract_patches(
    fixed: torch.Tensor, moving: torch.Tensor, centres: torch.Tensor, padding_mode: str = "replicate"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Crop the paper's four patches around voxels (slow reference; dense inference never loops like this).

    Args:
        fixed, moving: ``(1, C, *S)``.
        centres: ``(P, N)`` integer voxel indices.
        padding_mode: padding outside the image (same as :class:`RegNet`).

    Returns:
        fixed and moving ``(P, C, 29^N)`` patches (``c-14 .. c+14``), fixed and moving ``(P, C, 54^N)``
        context patches (``c-27 .. c+26``).
    """
    n = centres.shape[1]
    pad: list[int] = []
    for _ in range(n):
        pad += [CONTEXT_BEFORE, CONTEXT_AFTER]
    fixed_pad, moving_pad = F.pad(fixed, pad, mode=padding_mode), F.pad(moving, pad, mode=padding_mode)
    half = HIGH_RES_PATCH // 2
    out: list[list[torch.Tensor]] = [[], [], [], []]
    for centre in centres.tolist():
        padded = [c + CONTEXT_BEFORE for c in centre]
        for k, (image, start_shift, width) in enumerate(
            [
                (fixed_pad, -half, HIGH_RES_PATCH),
                (moving_pad, -half, HIGH_RES_PATCH),
                (fixed_pad, -CONTEXT_BEFORE, LOW_RES_PATCH),
                (moving_pad, -CONTEXT_BEFORE, LOW_RES_PATCH),
            ]
        ):
            out[k].append(_crop(image, [c + start_shift for c in padded], [width] * n)[0])
    return tuple(torch.stack(patches) for patches in out)  # type: ignore[return-value]


def dvf_mae(
    ddf: torch.Tensor,
    ddf_true: torch.Tensor,
    mask: torch.Tensor | None = None,
    spacing: Sequence[float] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The paper's MAE: mean over voxels of ``sum_i |ddf_i - ddf_true_i|`` (mm when ``spacing`` is given).

    Args:
        ddf, ddf_true: ``(B, N, *S)``.
        mask: optional ``(B, 1, *S)`` voxels to average over (nonzero = included).
        spacing: voxel size per axis; ``None`` keeps voxel units.

    Returns:
        the total MAE (scalar) and the per-axis MAE ``(N,)`` (they sum to the total, as in the paper's table).
    """
    error = (ddf - ddf_true).abs()
    if spacing is not None:
        error = error * torch.as_tensor(spacing, dtype=error.dtype, device=error.device).view(
            1, -1, *[1] * (ddf.dim() - 2)
        )
    if mask is None:
        per_axis = error.transpose(0, 1).flatten(1).mean(1)
    else:
        weight = (mask != 0).to(error.dtype).expand_as(error[:, :1])
        count = weight.sum()
        if count == 0:
            raise ValueError("dvf_mae: the mask selects no voxel")
        per_axis = (error * weight).transpose(0, 1).flatten(1).sum(1) / count
    return per_axis.sum(), per_axis


class RegNetLoss(nn.Module):
    """Supervised DVF loss: the paper's MAE between ``outputs["ddf"]`` and ``batch["ddf_gt"]`` (voxel units).

    ``batch["ddf_mask"]`` (optional, ``(B, 1, *S)``) restricts the voxels (the patch centres: inside the body
    mask, away from crop borders whose context would be padding). ``margin`` additionally ignores that many
    voxels at every border of the crop. Returns ``loss`` (= ``mae``) and ``mae_axis{i}`` per axis.
    """

    def __init__(self, margin: int = 0) -> None:
        super().__init__()
        self.margin = margin

    def forward(
        self, outputs: Mapping[str, torch.Tensor], batch: Mapping[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        if "ddf_gt" not in batch:
            raise ValueError(
                "RegNetLoss needs the ground-truth field batch['ddf_gt'] (synthetic deformations)"
            )
        ddf, ddf_true = outputs["ddf"], batch["ddf_gt"].to(outputs["ddf"])
        if ddf.shape != ddf_true.shape:
            raise ValueError(f"ddf {tuple(ddf.shape)} and ddf_gt {tuple(ddf_true.shape)} differ in shape")
        mask = batch.get("ddf_mask")
        mask = torch.ones_like(ddf[:, :1]) if mask is None else (mask.to(ddf.device) != 0).to(ddf.dtype)
        if self.margin > 0:
            inner = torch.zeros_like(mask)
            m = self.margin
            inner[(slice(None), slice(None)) + tuple(slice(m, s - m) for s in mask.shape[2:])] = 1
            mask = mask * inner
        total, per_axis = dvf_mae(ddf, ddf_true, mask)
        terms = {"loss": total, "mae": total.detach()}
        terms.update({f"mae_axis{i}": v.detach() for i, v in enumerate(per_axis)})
        return terms
