"""A small configurable registration U-Net (VoxelMorph-style), 2D or 3D, for any input size.

The encoder halves the resolution ``len(encoder_channels)`` times with stride-2 convolutions; the decoder
upsamples back with skip connections and ends with ``extra_channels`` full-resolution convolutions. Inputs
whose size is not a multiple of ``2**len(encoder_channels)`` are zero-padded internally and the output is
cropped back (or, with ``pad_input=False``, processed as they are: odd sizes round up at each stride-2
level and the decoder interpolates to each skip's size), so the output always has the input's spatial size.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from regnet_zoo.core.filters import linear_upsample_into
from regnet_zoo.core.padding import pad_to_multiple


def conv_block(spatial_dims: int, in_channels: int, out_channels: int, stride: int = 1) -> nn.Sequential:
    """3x3(x3) convolution + LeakyReLU(0.2), the VoxelMorph building block."""
    conv = (nn.Conv2d, nn.Conv3d)[spatial_dims - 2]
    return nn.Sequential(conv(in_channels, out_channels, 3, stride=stride, padding=1), nn.LeakyReLU(0.2))


def upsample_and_concatenate(x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
    """``cat([interpolate(x, skip's size), skip], dim=1)``: ``(B, C, *s), (B, K, *S) -> (B, C + K, *S)``.

    (Bi/tri)linear, ``align_corners=False``. Without autograd on CPU the interpolation writes straight into
    the concatenated tensor (``core.filters.linear_upsample_into``): no upsampled copy to allocate and copy
    again. Traced, compiled, differentiable, GPU or mixed-dtype calls take ``torch.cat``.
    """
    recorded = torch.is_grad_enabled() and (x.requires_grad or skip.requires_grad)
    tracing = torch.jit.is_tracing() or torch.jit.is_scripting() or torch.compiler.is_compiling()
    if recorded or tracing or x.device.type != "cpu" or x.dtype != skip.dtype:
        mode = "bilinear" if x.ndim == 4 else "trilinear"
        return torch.cat([F.interpolate(x, size=skip.shape[2:], mode=mode, align_corners=False), skip], dim=1)
    out = x.new_empty(x.shape[0], x.shape[1] + skip.shape[1], *skip.shape[2:])
    linear_upsample_into(x, out)
    out[:, x.shape[1] :] = skip
    return out


class RegistrationUNet(nn.Module):
    """U-Net feature extractor for registration.

    ``forward(x)``: x (B, in_channels, *S) -> (B, out_channels, *S), where ``out_channels`` is the last entry
    of ``extra_channels`` (or of ``decoder_channels`` when there are none).

    Args:
        spatial_dims: 2 or 3.
        in_channels: input channels (2 for a stacked fixed/moving pair of single-channel images).
        encoder_channels: channels of each stride-2 encoder level (its length = number of downsamplings).
        decoder_channels: channels of each decoder level, finest last; same length as ``encoder_channels``.
        extra_channels: channels of the extra full-resolution convolutions after the decoder.
        pad_input: zero-pad the input to a multiple of ``2**len(encoder_channels)`` (exact halving at
            every level); ``False`` runs on the input's own size (no padded voxels to compute).
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int = 2,
        encoder_channels: Sequence[int] = (16, 32, 32, 32),
        decoder_channels: Sequence[int] = (32, 32, 32, 32),
        extra_channels: Sequence[int] = (16, 16),
        pad_input: bool = True,
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        if len(decoder_channels) != len(encoder_channels):
            raise ValueError("decoder_channels must have one entry per encoder level")
        self.spatial_dims = spatial_dims
        self.levels = len(encoder_channels)
        self.pad_input = pad_input
        self.encoder = nn.ModuleList()
        skips = [in_channels]  # channels available at each resolution, finest first
        channels = in_channels
        for out in encoder_channels:
            self.encoder.append(conv_block(spatial_dims, channels, out, stride=2))
            channels = out
            skips.append(out)
        # decoder level i works at the resolution of encoder level (levels - 1 - i) and adds that skip
        self.decoder = nn.ModuleList()
        for i, out in enumerate(decoder_channels):
            self.decoder.append(conv_block(spatial_dims, channels, out))
            channels = out + skips[self.levels - 1 - i]
        self.extra = nn.ModuleList()
        for out in extra_channels:
            self.extra.append(conv_block(spatial_dims, channels, out))
            channels = out
        self.out_channels = channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, crop = pad_to_multiple(x, 2**self.levels if self.pad_input else 1)
        features = [x]
        for block in self.encoder:
            features.append(block(features[-1]))
        y = features[-1]
        for i, block in enumerate(self.decoder):
            y = block(y)
            y = upsample_and_concatenate(y, features[self.levels - 1 - i])
        for block in self.extra:
            y = block(y)
        return y[crop]
