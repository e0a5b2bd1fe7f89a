"""DDR-Net network and loss: chunk geometry (brute force), shapes, sampling, losses, integration, training."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from regnet_zoo.core.losses import kl_svf_loss, lncc_loss, mse_loss
from regnet_zoo.core.metrics import folding_fraction, jacobian_determinant
from regnet_zoo.core.spatial import warp_image
from regnet_zoo.networks.ddrnet import (
    DDRNet,
    DDRNetLoss,
    chunk_blend_weights,
    chunk_layout,
    crop_from_layout,
    merge_chunks,
    pad_to_layout,
    split_chunks,
)
from regnet_zoo.networks.unet import RegistrationUNet

SMALL = dict(encoder_channels=(8, 8), decoder_channels=(8, 8), extra_channels=(8,))


@pytest.mark.parametrize("size", [(64, 64), (37, 50), (24, 19, 30)])
@pytest.mark.parametrize("chunks_per_axis", [2, 3])
def test_chunk_layout_covers_grid_with_overlap(size, chunks_per_axis):
    layout = chunk_layout(size, chunks_per_axis=chunks_per_axis, overlap=6)
    for s, p, c, starts in zip(
        layout.size, layout.padded_size, layout.chunk_size, layout.starts, strict=True
    ):
        assert p >= s and p % 2 == 0
        assert starts[0] == 0 and starts[-1] + c == p  # chunks tile the padded axis exactly
        assert all(b - a == c - 6 for a, b in itertools.pairwise(starts))  # neighbours overlap by 6
    if chunks_per_axis == 2:  # the paper's chunks: half-resolution size plus the overlap margin
        assert all(c == h + 3 for c, h in zip(layout.chunk_size, layout.half_size, strict=True))
    # brute force: every voxel of the padded grid is covered; blend weights sum to 1 everywhere
    coverage = torch.zeros(layout.padded_size, dtype=torch.float64)
    weights = chunk_blend_weights(layout, dtype=torch.float64)
    for w, sl in zip(weights, layout.chunk_slices(), strict=True):
        coverage[sl] += w[0]
    torch.testing.assert_close(coverage, torch.ones_like(coverage), rtol=0, atol=1e-12)


def test_chunk_layout_rejects_odd_overlap():
    with pytest.raises(ValueError, match="even"):
        chunk_layout((32, 32), overlap=3)


@pytest.mark.parametrize("size", [(40, 36), (20, 18, 22)])
def test_split_merge_round_trip_and_pad_crop(size):
    layout = chunk_layout(size, overlap=8)
    x = torch.randn(2, 3, *size, dtype=torch.float64)
    padded = pad_to_layout(x, layout)
    assert tuple(padded.shape[2:]) == layout.padded_size
    torch.testing.assert_close(crop_from_layout(padded, layout), x)
    chunks = split_chunks(padded, layout)
    assert chunks.shape == (2 * layout.num_chunks, 3, *layout.chunk_size)
    # brute force: chunk j of pair b is the slice of the padded image at the j-th origin
    for b, (j, sl) in itertools.product(range(2), enumerate(layout.chunk_slices())):
        torch.testing.assert_close(chunks[b * layout.num_chunks + j], padded[(b, slice(None), *sl)])
    torch.testing.assert_close(merge_chunks(chunks, layout), padded)


def test_merge_has_no_seams():
    """Chunks holding different constants blend linearly across the overlap: no jump at chunk borders."""
    layout = chunk_layout((48, 48), overlap=8)
    values = torch.tensor([0.0, 4.0, -4.0, 8.0], dtype=torch.float64)
    chunks = values.reshape(4, 1, 1, 1).expand(4, 1, *layout.chunk_size).clone()
    merged = merge_chunks(chunks, layout)[0, 0]
    max_jump = max(merged.diff(dim=0).abs().max(), merged.diff(dim=1).abs().max())
    # neighbouring chunks differ by up to 12 (-4 vs 8): a linear ramp over 8 voxels changes 12 / 8 per voxel
    assert max_jump <= 12 / 8 + 1e-9
    # without blending (plain overwrite) the jump is the full difference, so the test can fail
    naive = torch.zeros(layout.padded_size, dtype=torch.float64)
    for v, sl in zip(values, layout.chunk_slices(), strict=True):
        naive[sl] = v
    assert max(naive.diff(dim=0).abs().max(), naive.diff(dim=1).abs().max()) == 12.0
    # inside each chunk's exclusive region the merged value is the chunk's own
    assert merged[0, 0] == 0.0 and merged[-1, -1] == 8.0 and merged[0, -1] == 4.0


@pytest.mark.parametrize("size", [(32, 32), (21, 30)])
def test_unet_any_size(size):
    net = RegistrationUNet(2, 2, **SMALL)
    out = net(torch.randn(2, 2, *size))
    assert out.shape == (2, net.out_channels, *size)


@pytest.mark.parametrize("spatial_dims,size", [(2, (40, 44)), (2, (33, 27)), (3, (20, 16, 18))])
def test_ddrnet_outputs(spatial_dims, size):
    net = DDRNet(spatial_dims=spatial_dims, overlap=4, **SMALL)
    fixed, moving = torch.rand(2, 1, *size), torch.rand(2, 1, *size)
    net.eval()
    with torch.no_grad():
        out = net(fixed, moving)
    layout = net.layout(size)
    k = layout.num_chunks
    assert k == 2**spatial_dims
    assert out["ddf"].shape == (2, spatial_dims, *size)
    assert out["warped"].shape == fixed.shape
    assert out["global_ddf"].shape == (2, spatial_dims, *layout.half_size)
    assert out["chunk_ddf"].shape == (2 * k, spatial_dims, *layout.chunk_size)
    assert out["chunk_fixed"].shape == (2 * k, 1, *layout.chunk_size)
    # warped is the moving image warped by ddf; at eval the velocity is the mean
    torch.testing.assert_close(out["warped"], warp_image(moving, out["ddf"]))
    torch.testing.assert_close(out["velocity"], out["velocity_mean"])
    torch.testing.assert_close(net.transform_parameters(out), out["velocity_mean"])
    # the final velocity is the average of the upsampled global and the merged chunk velocities
    expected = 0.5 * (
        F.interpolate(
            out["global_velocity"],
            size=layout.padded_size,
            mode="bilinear" if spatial_dims == 2 else "trilinear",
            align_corners=True,
        )
        * torch.tensor(
            [(p - 1) / (h - 1) for p, h in zip(layout.padded_size, layout.half_size, strict=True)]
        ).reshape(1, -1, *[1] * spatial_dims)
        + merge_chunks(out["chunk_velocity"], layout)
    )
    torch.testing.assert_close(out["velocity"], crop_from_layout(expected, layout), rtol=1e-4, atol=1e-6)
    # a stacked (B, 2C, *S) pair gives the same result (single-input form for MONAI export tools)
    with torch.no_grad():
        stacked = net(torch.cat([fixed, moving], dim=1))
    torch.testing.assert_close(stacked["ddf"], out["ddf"])
    # rebuilding from the parameters reproduces ddf and warped
    rebuilt = net.outputs_from_parameters(out["velocity_mean"], fixed, moving)
    torch.testing.assert_close(rebuilt["ddf"], out["ddf"], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(rebuilt["warped"], out["warped"], rtol=1e-4, atol=1e-6)


def test_ddrnet_sampling_and_chunk_checkpointing_match():
    torch.manual_seed(1)
    net = DDRNet(spatial_dims=2, overlap=4, **SMALL)
    with torch.no_grad():  # a visible velocity, so that sampling noise and both branches matter
        for head in (net.global_head, net.chunk_head):
            head.mean.weight.normal_(std=0.05)
            head.log_var.bias.fill_(-4.0)
    fixed, moving = torch.rand(1, 1, 32, 32), torch.rand(1, 1, 32, 32)
    net.train()
    a, b = net(fixed, moving), net(fixed, moving)
    assert not torch.allclose(a["velocity"], b["velocity"])  # reparameterised samples differ
    torch.testing.assert_close(a["velocity_mean"], b["velocity_mean"])
    # gradient checkpointing over chunk positions gives the same values and gradients as the batched run
    loss_fn = DDRNetLoss()
    batch = {"fixed": fixed, "moving": moving}
    grads = []
    for checkpointing in (False, True):
        net.checkpoint_chunks = checkpointing
        net.zero_grad()
        torch.manual_seed(5)
        loss_fn(net(fixed, moving), batch)["loss"].backward()
        grads.append(torch.cat([p.grad.flatten() for p in net.parameters()]))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)
    assert grads[0].abs().sum() > 0
    # both U-Nets receive gradient
    assert net.global_unet.encoder[0][0].weight.grad.abs().sum() > 0
    assert net.chunk_unet.encoder[0][0].weight.grad.abs().sum() > 0


def test_loss_terms_match_core_functions():
    net = DDRNet(spatial_dims=2, overlap=4, **SMALL)
    fixed, moving = torch.rand(2, 1, 24, 28), torch.rand(2, 1, 24, 28)
    out = net(fixed, moving)
    losses = DDRNetLoss(prior_lambda=5.0)(out, {"fixed": fixed, "moving": moving})
    assert set(losses) == {
        "loss",
        "similarity",
        "kl",
        "global_similarity",
        "global_kl",
        "chunk_similarity",
        "chunk_kl",
    }
    torch.testing.assert_close(losses["similarity"], mse_loss(out["warped"], fixed))
    torch.testing.assert_close(
        losses["global_similarity"], mse_loss(out["global_warped"], out["global_fixed"])
    )
    torch.testing.assert_close(
        losses["chunk_kl"], kl_svf_loss(out["chunk_velocity_mean"], out["chunk_velocity_log_var"], 5.0)
    )
    weight = 1 / (2 * 0.02**2)
    expected = sum(weight * losses[f"{p}similarity"] + losses[f"{p}kl"] for p in ("", "global_", "chunk_"))
    torch.testing.assert_close(losses["loss"], expected)
    # LNCC alternative and the optional Dice term with labels
    labels = {"fixed_label": (fixed > 0.5).long() * 3, "moving_label": (moving > 0.5).long() * 3}
    lncc = DDRNetLoss(similarity="lncc", dice_weight=1.0)(out, {"fixed": fixed, "moving": moving, **labels})
    torch.testing.assert_close(lncc["similarity"], lncc_loss(out["warped"], fixed))
    assert 0.0 < float(lncc["dice"]) < 1.0
    # levels missing from the outputs are skipped (e.g. outputs rebuilt from parameters)
    rebuilt = net.outputs_from_parameters(out["velocity_mean"], fixed, moving)
    assert set(DDRNetLoss()(rebuilt, {"fixed": fixed, "moving": moving})) == {"loss", "similarity", "kl"}


def _smooth_random_svf(size, magnitude, seed=0):
    gen = torch.Generator().manual_seed(seed)
    v = torch.randn(1, len(size), *size, generator=gen, dtype=torch.float64)
    # gaussian smoothing (sigma 4 voxels) by FFT, then scaled to a large maximum displacement
    freqs = torch.meshgrid(*[torch.fft.fftfreq(n, dtype=torch.float64) for n in size], indexing="ij")
    kernel = torch.exp(-2 * math.pi**2 * 16 * sum(f**2 for f in freqs))
    v = torch.fft.ifftn(torch.fft.fftn(v, dim=(2, 3)) * kernel, dim=(2, 3)).real
    return v / v.abs().max() * magnitude


def test_integrated_field_has_no_folding_for_large_velocities():
    net = DDRNet(spatial_dims=2, **SMALL).double()
    size = (64, 64)
    svf = _smooth_random_svf(size, magnitude=12.0)
    fixed = moving = torch.zeros(1, 1, *size, dtype=torch.float64)
    ddf = net.outputs_from_parameters(svf, fixed, moving)["ddf"]
    assert ddf.abs().max() > 5.0  # a large deformation
    assert folding_fraction(jacobian_determinant(ddf)) == 0.0
    # the same velocity used directly as a displacement folds: the test can fail
    assert folding_fraction(jacobian_determinant(svf)) > 0.0


def _load_slices(shared_data, indices):
    from regnet_zoo.data.io import load_image

    files = sorted((shared_data / "oasis2d" / "slices").glob("*.nrrd"))
    return torch.stack([load_image(files[i]).as_tensor() for i in indices])


def test_short_training_on_brain_slices_beats_identity(shared_data):
    """Atlas-based training on real 2D OASIS slices (48x48, 60 iterations) lowers the loss on the training
    pairs and the image MSE of held-back moving slices below the identity's."""
    torch.manual_seed(0)
    slices = F.interpolate(_load_slices(shared_data, list(range(0, 13)) + list(range(90, 94))), size=(48, 48))
    atlas, train, held = slices[:1], slices[1:13], slices[13:]
    net = DDRNet(
        spatial_dims=2, encoder_channels=(16, 16, 16), decoder_channels=(16, 16, 16), extra_channels=(16,)
    )
    loss_fn = DDRNetLoss()
    optimizer = torch.optim.Adam(net.parameters(), lr=3e-3)

    def eval_loss(moving):
        net.eval()
        with torch.no_grad():
            fixed = atlas.expand_as(moving)
            return float(loss_fn(net(fixed, moving), {"fixed": fixed, "moving": moving})["loss"])

    before = eval_loss(train)
    gen = np.random.default_rng(0)
    net.train()
    for _ in range(60):
        moving = train[gen.choice(len(train), size=4)]
        batch = {"fixed": atlas.expand_as(moving), "moving": moving}
        losses = loss_fn(net(batch["fixed"], batch["moving"]), batch)
        optimizer.zero_grad()
        losses["loss"].backward()
        optimizer.step()
    assert eval_loss(train) < 0.8 * before
    net.eval()
    fixed = atlas.expand_as(held)
    with torch.no_grad():
        out = net(fixed, held)
    mse_before = float(((held - fixed) ** 2).mean())
    mse_after = float(((out["warped"] - fixed) ** 2).mean())
    assert mse_after < 0.85 * mse_before
    assert folding_fraction(jacobian_determinant(out["ddf"])) < 0.5
