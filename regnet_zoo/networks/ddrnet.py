"""DDR-Net: Dividing and Downsampling mixed Registration Network (Joshi & Hong), 2D and 3D.

Three branches, each predicting the mean and log-variance of a stationary velocity field (SVF) as in
probabilistic VoxelMorph-diff (Dalca et al. 2018):

- global: the pair downsampled by 2 -> U-Net -> SVF at half resolution -> scaling and squaring;
- chunk (local): the full-resolution pair divided into ``chunks_per_axis**N`` overlapping chunks -> a second
  U-Net (shared by all chunks) -> one SVF per chunk -> scaling and squaring per chunk;
- original: the upsampled global SVF (values rescaled to full-resolution voxels) averaged with the chunk SVFs
  merged back to full size (linear blending in the overlaps, a partition of unity: no seams) -> scaling and
  squaring -> the final full-resolution DDF.

Any input size: the pair is zero-padded (centred) to the size the chunk layout needs and the result is cropped
back. Deviations from the paper are listed in ``bundles/ddrnet/README.md``.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from regnet_zoo.core.integration import scaling_and_squaring
from regnet_zoo.core.losses import kl_svf_loss, lncc_loss, mse_loss, warped_label_dice_loss
from regnet_zoo.core.padding import replicate_pad
from regnet_zoo.core.spatial import resize_ddf, warp_image
from regnet_zoo.core.tracing import as_size, ceil_div, size_max, size_tensor
from regnet_zoo.networks.pair import split_pair
from regnet_zoo.networks.unet import RegistrationUNet

__all__ = [
    "ChunkLayout",
    "chunk_layout",
    "split_chunks",
    "merge_chunks",
    "chunk_blend_weights",
    "downsample_image",
    "DDRNet",
    "DDRNetLoss",
]


# ----------------------------------------------------------------------------------------------------
# chunk geometry (pure functions)
# ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ChunkLayout:
    """How a grid of spatial ``size`` is padded, halved and divided into overlapping chunks.

    ``padded_size`` = ``n * chunk_size - (n - 1) * overlap`` per axis (even, >= ``size``), ``pad_before`` the
    zero padding in front (the rest goes behind), ``half_size = padded_size // 2`` the global branch's grid,
    ``starts[i]`` the chunk origins along axis ``i`` (stride ``chunk_size - overlap``).
    """

    size: tuple[int, ...]
    padded_size: tuple[int, ...]
    pad_before: tuple[int, ...]
    half_size: tuple[int, ...]
    chunk_size: tuple[int, ...]
    starts: tuple[tuple[int, ...], ...]
    overlap: int

    @property
    def num_chunks(self) -> int:
        return math.prod(len(s) for s in self.starts)

    def chunk_slices(self) -> list[tuple[slice, ...]]:
        """Spatial slices of every chunk in the padded grid, in the order of :func:`split_chunks`."""
        return [
            tuple(slice(o, o + c) for o, c in zip(origin, self.chunk_size, strict=True))
            for origin in itertools.product(*self.starts)
        ]


def chunk_layout(size: Sequence[int], chunks_per_axis: int = 2, overlap: int = 8) -> ChunkLayout:
    """Chunk layout for ``size``: ``chunks_per_axis`` chunks per axis, neighbours overlapping by ``overlap``.

    Each chunk is ``half_size + overlap / 2`` voxels per axis for two chunks per axis (the paper's chunks are
    the half-resolution size "with small overlaps").
    """
    if chunks_per_axis < 1:
        raise ValueError(f"chunks_per_axis must be >= 1, got {chunks_per_axis}")
    if overlap < 0 or overlap % 2:
        raise ValueError(f"overlap must be a non-negative even number of voxels, got {overlap}")
    n = chunks_per_axis
    padded, before, chunk, starts = [], [], [], []
    # traced sizes stay traced values (core.tracing), so a TorchScript export lays out any input size
    size = tuple(as_size(s) for s in size)
    for s in size:
        c = size_max(ceil_div(s + (n - 1) * overlap, n), 2 * overlap if n > 2 else overlap + 1)
        p = n * c - (n - 1) * overlap
        # p is odd only for odd n (overlap is even): one more voxel per chunk flips the parity (no branch)
        odd = p % 2
        c, p = c + odd, p + n * odd
        padded.append(p)
        before.append((p - s) // 2)
        chunk.append(c)
        starts.append(tuple(j * (c - overlap) for j in range(n)))
    return ChunkLayout(
        size=size,
        padded_size=tuple(padded),
        pad_before=tuple(before),
        half_size=tuple(p // 2 for p in padded),
        chunk_size=tuple(chunk),
        starts=tuple(starts),
        overlap=overlap,
    )


def pad_to_layout(x: Tensor, layout: ChunkLayout) -> Tensor:
    """Zero-pad ``x`` ``(B, C, *size)`` to ``(B, C, *padded_size)`` (``pad_before`` in front)."""
    pads = []
    for s, p, b in reversed(list(zip(layout.size, layout.padded_size, layout.pad_before, strict=True))):
        pads += [b, p - s - b]
    return F.pad(x, pads) if torch.jit.is_tracing() or any(pads) else x


def crop_from_layout(x: Tensor, layout: ChunkLayout) -> Tensor:
    """Inverse of :func:`pad_to_layout`: ``(B, C, *padded_size)`` -> ``(B, C, *size)``."""
    crop = tuple(slice(b, b + s) for s, b in zip(layout.size, layout.pad_before, strict=True))
    return x[(slice(None), slice(None), *crop)]


def split_chunks(x: Tensor, layout: ChunkLayout) -> Tensor:
    """Divide ``x`` ``(B, C, *padded_size)`` into chunks ``(B * k, C, *chunk_size)``, batch-major order."""
    chunks = [x[(slice(None), slice(None), *sl)] for sl in layout.chunk_slices()]
    return torch.stack(chunks, dim=1).flatten(0, 1)


def _axis_ramp(chunk: int, overlap: int, has_before: bool, has_after: bool) -> Tensor:
    """1D blending weight of one chunk: linear ramps over the overlaps with neighbours, 1 elsewhere."""
    w = torch.ones(chunk, dtype=torch.float64)
    ramp = (torch.arange(overlap, dtype=torch.float64) + 0.5) / max(overlap, 1)
    if overlap and has_before:
        w[:overlap] = ramp
    if overlap and has_after:
        w[chunk - overlap :] = ramp.flip(0)
    return w


def chunk_blend_weights(layout: ChunkLayout, device=None, dtype: torch.dtype = torch.float32) -> Tensor:
    """Blending weights ``(k, 1, *chunk_size)`` of every chunk; they sum to exactly 1 over the padded grid.

    Neighbouring chunks ramp linearly across their shared ``overlap`` voxels, ``(i + 0.5) / overlap`` up and
    its mirror down, so the merged field is a convex blend that changes smoothly from one chunk to the next.
    """
    weights = []
    for index in itertools.product(*(range(len(s)) for s in layout.starts)):
        w = None
        for axis, j in enumerate(index):
            n = len(layout.starts[axis])
            ramp = _axis_ramp(layout.chunk_size[axis], layout.overlap, j > 0, j < n - 1)
            shape = [1] * len(index)
            shape[axis] = -1
            ramp = ramp.reshape(shape)
            w = ramp if w is None else w * ramp
        weights.append(w)
    return torch.stack(weights).unsqueeze(1).to(device=device, dtype=dtype)


def merge_chunks(chunks: Tensor, layout: ChunkLayout, weights: Tensor | None = None) -> Tensor:
    """Blend chunk fields ``(B * k, C, *chunk_size)`` back to ``(B, C, *padded_size)``.

    ``weights`` ``(k, 1, *chunk_size)`` default to :func:`chunk_blend_weights`; the result is divided by the
    summed weights, so any positive weights give a weighted average where chunks overlap.
    """
    k = layout.num_chunks
    if chunks.shape[0] % k:
        raise ValueError(f"chunk batch {chunks.shape[0]} is not a multiple of the {k} chunks of the layout")
    if weights is None:
        weights = chunk_blend_weights(layout, chunks.device, chunks.dtype)
    batch = chunks.shape[0] // k
    chunks = chunks.reshape(batch, k, *chunks.shape[1:])
    merged = chunks.new_zeros(batch, chunks.shape[2], *layout.padded_size)
    total = chunks.new_zeros(1, 1, *layout.padded_size)
    for i, sl in enumerate(layout.chunk_slices()):
        index = (slice(None), slice(None), *sl)
        merged[index] += weights[i] * chunks[:, i]  # in-place on a fresh tensor: fine for autograd
        total[index] += weights[i]
    return merged / total


def downsample_image(x: Tensor, size: Sequence[int]) -> Tensor:
    """Anti-aliased resampling of ``x`` ``(B, C, *S)`` to ``size`` on the corner-aligned grid of resize_ddf.

    A [1, 2, 1] / 4 blur per axis, then (bi/tri)linear sampling with ``align_corners=True`` (voxel ``j`` of
    the result sits at ``j * (S - 1) / (size - 1)``), the geometry in which ``resize_ddf`` rescales fields.
    """
    spatial_dims = x.ndim - 2
    for dim in range(2, x.ndim):
        # three shifted views, not a depthwise convolution: oneDNN runs one-channel 3-tap kernels ~6x slower
        n, padded = x.shape[dim], replicate_pad(x, [dim], 1)
        blurred = padded.narrow(dim, 0, n) * 0.25
        x = blurred.add_(padded.narrow(dim, 2, n), alpha=0.25).add_(padded.narrow(dim, 1, n), alpha=0.5)
    mode = "bilinear" if spatial_dims == 2 else "trilinear"
    return F.interpolate(x, size=tuple(as_size(s) for s in size), mode=mode, align_corners=True)


# ----------------------------------------------------------------------------------------------------
# network
# ----------------------------------------------------------------------------------------------------
class VelocityHead(nn.Module):
    """Two 3x3(x3) convolutions from U-Net features to the SVF mean and log-variance ``(B, N, *S)`` each.

    Initialised as in VoxelMorph-diff: mean ~ N(0, 1e-5), log-variance ~ -10, i.e. starting near the identity.
    """

    def __init__(self, spatial_dims: int, in_channels: int) -> None:
        super().__init__()
        conv = (nn.Conv2d, nn.Conv3d)[spatial_dims - 2]
        self.mean = conv(in_channels, spatial_dims, 3, padding=1)
        self.log_var = conv(in_channels, spatial_dims, 3, padding=1)
        nn.init.normal_(self.mean.weight, std=1e-5)
        nn.init.zeros_(self.mean.bias)
        nn.init.normal_(self.log_var.weight, std=1e-10)
        nn.init.constant_(self.log_var.bias, -10.0)

    def forward(self, features: Tensor) -> tuple[Tensor, Tensor]:
        # one convolution with both heads' filters: a 3-channel output costs oneDNN nearly as much as 6
        weight = torch.cat([self.mean.weight, self.log_var.weight])
        bias = torch.cat([self.mean.bias, self.log_var.bias])
        conv = (F.conv2d, F.conv3d)[features.ndim - 4]
        return conv(features, weight, bias, padding=1).chunk(2, dim=1)


class DDRNet(nn.Module):
    """DDR-Net: ``forward(fixed, moving) -> dict`` (README "Conventions"), images ``(B, C, *S)``, any ``S``.

    Output keys (full resolution ``S`` unless noted; fields ``(B, N, *)`` in voxel units of their own grid):

    - ``ddf``, ``warped``, ``velocity`` (the SVF integrated), ``velocity_mean``, ``velocity_log_var``;
    - ``global_*``: the same at half resolution plus ``global_fixed`` (the downsampled fixed image);
    - ``chunk_*``: the same for the ``k`` chunks stacked along the batch axis (``B * k``, batch-major) plus
      ``chunk_fixed``.

    In training ``velocity`` is sampled with the reparameterisation trick; in eval mode it is the mean.
    ``forward(pair)`` with a single ``(B, 2C, *S)`` tensor (fixed and moving stacked along channels) is also
    accepted, for MONAI tools that feed one input (``ckpt_export``, ``verify_net_in_out``).

    Args:
        spatial_dims: 2 or 3.
        in_channels: channels of each image.
        encoder_channels, decoder_channels, extra_channels: U-Net widths (both branches; see
            :class:`~regnet_zoo.networks.unet.RegistrationUNet`). Defaults: VoxelMorph-diff's.
        chunks_per_axis: chunks along every axis (``k = chunks_per_axis**N``); 2 as in the paper.
        overlap: overlap of neighbouring chunks in full-resolution voxels (even).
        integration_steps: scaling-and-squaring steps.
        checkpoint_chunks: the paper's memory plan in training (default): the global branch, each chunk
            position (U-Net, head, integration, warp) and the original scale (merge, integration, warp) run
            under gradient checkpointing, one chunk at a time, so only one branch's activations are held at
            once (about 1.4x the compute); ``DDRNetLoss`` checkpoints its terms likewise. ``False``: the
            chunks are batched and every activation is stored.
    """

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 1,
        encoder_channels: Sequence[int] = (16, 32, 32, 32),
        decoder_channels: Sequence[int] = (32, 32, 32, 32),
        extra_channels: Sequence[int] = (16, 16),
        chunks_per_axis: int = 2,
        overlap: int = 8,
        integration_steps: int = 7,
        checkpoint_chunks: bool = True,
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        chunk_layout((64,) * spatial_dims, chunks_per_axis, overlap)  # validates the chunk arguments early
        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.chunks_per_axis = chunks_per_axis
        self.overlap = overlap
        self.integration_steps = integration_steps
        self.checkpoint_chunks = checkpoint_chunks
        widths = dict(
            encoder_channels=encoder_channels,
            decoder_channels=decoder_channels,
            extra_channels=extra_channels,
        )
        # no padding to a multiple of 16: chunks (n/2 + overlap/2) and the half-size grid are run as they are
        self.global_unet = RegistrationUNet(spatial_dims, 2 * in_channels, **widths, pad_input=False)
        self.chunk_unet = RegistrationUNet(spatial_dims, 2 * in_channels, **widths, pad_input=False)
        self.global_head = VelocityHead(spatial_dims, self.global_unet.out_channels)
        self.chunk_head = VelocityHead(spatial_dims, self.chunk_unet.out_channels)

    def layout(self, size: Sequence[int]) -> ChunkLayout:
        """The chunk layout used for inputs of spatial ``size``."""
        return chunk_layout(size, self.chunks_per_axis, self.overlap)

    def _sample(self, mean: Tensor, log_var: Tensor, noise: Tensor | None = None) -> Tensor:
        if not self.training:
            return mean
        noise = torch.randn_like(mean) if noise is None else noise
        return mean + torch.exp(0.5 * log_var) * noise

    def _checkpointed(self, function, *args: Tensor):
        """``function(*args)``, under gradient checkpointing in memory-saving training (activations are
        recomputed in the backward pass; the random state is replayed, so samples are identical)."""
        if self.checkpoint_chunks and torch.is_grad_enabled():
            return checkpoint(function, *args, use_reentrant=False)
        return function(*args)

    def _branch(
        self, unet: nn.Module, head: nn.Module, fixed: Tensor, moving: Tensor, noise: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """One branch on ``(B, C, *G)`` images: SVF mean, log-variance, sample, its DDF, the warped moving."""
        mean, log_var = head(unet(torch.cat([fixed, moving], dim=1)))
        svf = self._sample(mean, log_var, noise)
        ddf = scaling_and_squaring(svf, self.integration_steps)
        return mean, log_var, svf, ddf, warp_image(moving, ddf)

    def _global_branch(self, fixed_h: Tensor, moving_h: Tensor) -> tuple[Tensor, ...]:
        return self._branch(self.global_unet, self.global_head, fixed_h, moving_h, None)

    def _chunk_branch(self, fixed_c: Tensor, moving_c: Tensor, noise: Tensor | None) -> tuple[Tensor, ...]:
        return self._branch(self.chunk_unet, self.chunk_head, fixed_c, moving_c, noise)

    def _chunks(self, fixed_c: Tensor, moving_c: Tensor, batch: int) -> tuple[Tensor, ...]:
        """The chunk branch on ``(B * k, C, *chunk)`` chunks (batch-major): five ``(B * k, *, *chunk)``.

        In memory-saving training (``checkpoint_chunks``) and without autograd, one chunk position at a time
        (under checkpointing when training): only one chunk's activations are alive at once; results are
        identical to the batched run (the sampling noise is drawn for all chunks at once, as there).
        """
        noise = None
        if self.training:
            shape = (fixed_c.shape[0], self.spatial_dims, *fixed_c.shape[2:])
            noise = torch.randn(shape, device=fixed_c.device, dtype=fixed_c.dtype)
        if not (self.checkpoint_chunks or not torch.is_grad_enabled()):
            return self._chunk_branch(fixed_c, moving_c, noise)
        k = fixed_c.shape[0] // batch

        def position(x: Tensor | None, i: int) -> Tensor | None:
            return None if x is None else x.reshape(batch, k, *x.shape[1:])[:, i]

        outs = [
            self._checkpointed(self._chunk_branch, *(position(x, i) for x in (fixed_c, moving_c, noise)))
            for i in range(k)
        ]
        return tuple(torch.stack(list(field), dim=1).flatten(0, 1) for field in zip(*outs, strict=True))

    def _original(
        self,
        layout: ChunkLayout,
        moving: Tensor,
        svf_g: Tensor,
        svf_c: Tensor,
        mean_g: Tensor,
        mean_c: Tensor,
        log_var_g: Tensor,
        log_var_c: Tensor,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """Original scale: ``ddf``, ``warped``, ``velocity``, ``velocity_mean``, ``velocity_log_var`` on the
        input grid from the two branches' fields (average of the upsampled global and the merged chunks)."""
        weights = chunk_blend_weights(layout, moving.device, mean_c.dtype)

        def combine(global_field: Tensor, chunk_field: Tensor) -> Tensor:
            return 0.5 * (
                resize_ddf(global_field, layout.padded_size) + merge_chunks(chunk_field, layout, weights)
            )

        svf = combine(svf_g, svf_c)
        # in eval mode the sample is the mean: combine it once
        mean = combine(mean_g, mean_c) if self.training else svf
        # variance of the average of independent fields; resize_ddf scales values by ~2 (velocity units), so
        # a second factor gives the variance scale (~4); the chunk variances are blended with the same weights
        var_g = resize_ddf(log_var_g.exp(), layout.padded_size)
        scale = (size_tensor(layout.padded_size, dtype=var_g.dtype) - 1) / (
            size_tensor(layout.half_size, dtype=var_g.dtype) - 1
        )
        var_g = var_g * scale.to(var_g.device).reshape(1, -1, *([1] * self.spatial_dims))
        log_var = torch.log(0.25 * (var_g + merge_chunks(log_var_c.exp(), layout, weights)))
        velocity, mean, log_var = (crop_from_layout(f, layout) for f in (svf, mean, log_var))
        # integrated on the input grid (not the padded one): outputs_from_parameters(velocity) is then exact
        ddf = scaling_and_squaring(velocity, self.integration_steps)
        return ddf, warp_image(moving, ddf), velocity, mean, log_var

    def forward(self, fixed: Tensor, moving: Tensor | None = None) -> dict[str, Tensor]:
        fixed, moving = split_pair(fixed, moving, self.spatial_dims, self.in_channels)
        layout = self.layout(fixed.shape[2:])
        fixed_p, moving_p = pad_to_layout(fixed, layout), pad_to_layout(moving, layout)
        out: dict[str, Tensor] = {}

        # global branch: half resolution
        fixed_h = downsample_image(fixed_p, layout.half_size)
        moving_h = downsample_image(moving_p, layout.half_size)
        mean_g, log_var_g, svf_g, ddf_g, warped_g = self._checkpointed(self._global_branch, fixed_h, moving_h)
        out.update(global_ddf=ddf_g, global_warped=warped_g, global_fixed=fixed_h, global_velocity=svf_g)
        out.update(global_velocity_mean=mean_g, global_velocity_log_var=log_var_g)

        # chunk branch: full resolution, k overlapping chunks through one shared U-Net
        fixed_c, moving_c = split_chunks(fixed_p, layout), split_chunks(moving_p, layout)
        mean_c, log_var_c, svf_c, ddf_c, warped_c = self._chunks(fixed_c, moving_c, fixed.shape[0])
        out.update(chunk_ddf=ddf_c, chunk_warped=warped_c, chunk_fixed=fixed_c, chunk_velocity=svf_c)
        out.update(chunk_velocity_mean=mean_c, chunk_velocity_log_var=log_var_c)

        # original scale: average of the upsampled global SVF and the merged chunk SVFs
        branches = (svf_g, svf_c, mean_g, mean_c, log_var_g, log_var_c)
        fields = self._checkpointed(functools.partial(self._original, layout), moving, *branches)
        keys = ("ddf", "warped", "velocity", "velocity_mean", "velocity_log_var")
        out.update(zip(keys, fields, strict=True))
        return out

    def transform_parameters(self, outputs: dict[str, Tensor]) -> Tensor:
        """The full-resolution SVF mean ``(B, N, *S)`` (what test-time instance optimisation adjusts)."""
        return outputs["velocity_mean"]

    def outputs_from_parameters(self, params: Tensor, fixed: Tensor, moving: Tensor) -> dict[str, Tensor]:
        """``ddf``, ``warped``, ``velocity*`` from a full-resolution SVF ``params`` ``(B, N, *S)``.

        ``velocity_log_var`` is a constant (zeros, no gradient): the KL term then only regularises the mean
        (its variance part is a constant offset).
        """
        ddf = scaling_and_squaring(params, self.integration_steps)
        return {
            "ddf": ddf,
            "warped": warp_image(moving, ddf),
            "velocity": params,
            "velocity_mean": params,
            "velocity_log_var": torch.zeros_like(params).detach(),
        }


# ----------------------------------------------------------------------------------------------------
# loss
# ----------------------------------------------------------------------------------------------------
class DDRNetLoss(nn.Module):
    """DDR-Net loss: image similarity at the three scales + KL of every SVF (+ optional Dice with labels).

    ``forward(outputs, batch) -> {"loss", "similarity", "kl", "global_similarity", "global_kl",
    "chunk_similarity", "chunk_kl"[, "dice"]}``; levels absent from ``outputs`` are skipped.

    ``loss = sum_level w_level * (similarity_weight * sim_level + kl_weight * kl_level)
    + dice_weight * dice``. With the defaults (MSE, ``similarity_weight = 1 / (2 * 0.02**2)``,
    ``prior_lambda = 10``) every level is the negative ELBO of VoxelMorph-diff (image noise sigma 0.02).

    Args:
        similarity: ``"mse"`` (the paper) or ``"lncc"``.
        similarity_weight: weight of the similarity terms; default ``1 / (2 * 0.02**2)`` for MSE, 1 for LNCC.
        kl_weight: weight of the KL terms.
        prior_lambda: precision of the Laplacian smoothness prior (``core.losses.kl_svf_loss``).
        level_weights: weights of the (original, global, chunk) levels.
        dice_weight: weight of the soft Dice of the one-hot moving labels warped linearly by ``ddf``
            (used only when the batch has ``fixed_label`` and ``moving_label``).
        lncc_kernel_size: window of LNCC.
    """

    levels = ("", "global_", "chunk_")

    def __init__(
        self,
        similarity: str = "mse",
        similarity_weight: float | None = None,
        kl_weight: float = 1.0,
        prior_lambda: float = 10.0,
        level_weights: Sequence[float] = (1.0, 1.0, 1.0),
        dice_weight: float = 0.0,
        lncc_kernel_size: int = 9,
    ) -> None:
        super().__init__()
        if similarity not in ("mse", "lncc"):
            raise ValueError(f"similarity must be 'mse' or 'lncc', got {similarity!r}")
        if len(level_weights) != 3:
            raise ValueError("level_weights needs one weight per level (original, global, chunk)")
        self.similarity = similarity
        self.similarity_weight = (
            similarity_weight
            if similarity_weight is not None
            else (1 / (2 * 0.02**2) if similarity == "mse" else 1)
        )
        self.kl_weight = kl_weight
        self.prior_lambda = prior_lambda
        self.level_weights = tuple(float(w) for w in level_weights)
        self.dice_weight = dice_weight
        self.lncc_kernel_size = lncc_kernel_size

    def _similarity(self, warped: Tensor, fixed: Tensor) -> Tensor:
        if self.similarity == "mse":
            return mse_loss(warped, fixed)
        return lncc_loss(warped, fixed, kernel_size=self.lncc_kernel_size)

    def _level_terms(
        self, warped: Tensor, target: Tensor, mean: Tensor | None = None, log_var: Tensor | None = None
    ) -> tuple[Tensor, ...]:
        """Similarity (and KL when ``mean`` / ``log_var`` are given) of one level."""
        sim = self._similarity(warped, target)
        if mean is None:
            return (sim,)
        return sim, kl_svf_loss(mean, log_var, self.prior_lambda)

    def forward(self, outputs: dict[str, Tensor], batch: dict[str, Tensor]) -> dict[str, Tensor]:
        terms: dict[str, Tensor] = {}
        total = outputs["warped"].new_zeros(())
        for prefix, weight in zip(self.levels, self.level_weights, strict=True):
            if f"{prefix}warped" not in outputs or weight == 0:
                continue
            target = outputs.get(f"{prefix}fixed", batch["fixed"]) if prefix else batch["fixed"]
            mean = outputs.get(f"{prefix}velocity_mean")
            log_var = outputs.get(f"{prefix}velocity_log_var")
            with_kl = mean is not None and log_var is not None
            args = (outputs[f"{prefix}warped"], target, *((mean, log_var) if with_kl else ()))
            if torch.is_grad_enabled() and any(a.requires_grad for a in args):
                # the terms' full-size intermediates are recomputed in the backward pass, not stored
                sim, *kl = checkpoint(self._level_terms, *args, use_reentrant=False)
            else:
                sim, *kl = self._level_terms(*args)
            terms[f"{prefix}similarity"] = sim
            level = self.similarity_weight * sim
            if with_kl:
                terms[f"{prefix}kl"] = kl[0]
                level = level + self.kl_weight * kl[0]
            total = total + weight * level
        if (
            self.dice_weight
            and batch.get("fixed_label") is not None
            and batch.get("moving_label") is not None
        ):
            fixed_label, moving_label = batch["fixed_label"], batch["moving_label"]
            terms["dice"] = warped_label_dice_loss(outputs["ddf"], fixed_label, moving_label)
            total = total + self.dice_weight * terms["dice"]
        return {"loss": total, **terms}
