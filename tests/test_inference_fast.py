"""Inference-only fast paths give the outputs of the plain paths (3D, small networks)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage
from torch import nn

from regnet_zoo.core.filters import linear_upsample_into
from regnet_zoo.networks.ddrnet import DDRNet, downsample_image
from regnet_zoo.networks.inference import fold_batch_norm
from regnet_zoo.networks.pwc import DeformModule, PWCRegistrationPyramid
from regnet_zoo.networks.regnet import RegNet
from regnet_zoo.networks.unet import upsample_and_concatenate


def _randomise_batch_norm(network: nn.Module) -> None:
    """Running statistics and affine parameters away from their defaults, so that folding them matters."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in network.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                n = module.num_features
                module.running_mean.copy_(torch.randn(n, generator=generator) * 0.3)
                module.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
                module.weight.copy_(torch.rand(n, generator=generator) + 0.5)
                module.bias.copy_(torch.randn(n, generator=generator) * 0.1)


def test_folded_conv_batch_norm_matches_3d():
    torch.manual_seed(0)
    block = nn.Sequential(nn.Conv3d(3, 5, 3), nn.BatchNorm3d(5), nn.ReLU(), nn.Conv3d(5, 4, 1, bias=False),
                          nn.BatchNorm3d(4))
    _randomise_batch_norm(block)
    block.eval()
    folded = fold_batch_norm(block)
    assert sum(isinstance(m, nn.BatchNorm3d) for m in folded.modules()) == 0
    x = torch.randn(2, 3, 7, 6, 5)
    torch.testing.assert_close(folded(x), block(x), rtol=1e-5, atol=1e-5)


def test_folded_batch_norm_regnet_dense_matches():
    torch.manual_seed(0)
    network = RegNet(spatial_dims=2, stem_channels=4, high_res_channels=(5, 6), low_res_channels=(5,) * 6,
                     merged_channels=(6, 6, 6, 8), fc_channels=8)
    _randomise_batch_norm(network)
    with torch.no_grad():
        network.fully_connected[-1].weight.normal_(std=0.1)  # a visible output
    network.eval()
    fixed, moving = torch.rand(1, 1, 20, 17), torch.rand(1, 1, 20, 17)
    folded = fold_batch_norm(network)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in network.modules())  # the original is unchanged
    with torch.inference_mode():
        expected, got = network(fixed, moving)["ddf"], folded(fixed, moving)["ddf"]
    assert expected.abs().max() > 1e-3
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_densenet_buffer_matches_concatenation():
    torch.manual_seed(0)
    module = DeformModule(3, 7, channels=(6, 5, 4)).eval()
    nn.init.normal_(module.out.weight, std=0.1)
    x = torch.randn(2, 7, 6, 5, 4)
    expected = module(x)  # autograd on: the concatenating path
    assert expected.requires_grad
    with torch.inference_mode():
        got = module(x)
    torch.testing.assert_close(got, expected.detach(), rtol=1e-5, atol=1e-6)


def test_pwc_3d_inference_matches_the_autograd_path():
    torch.manual_seed(0)
    network = PWCRegistrationPyramid(spatial_dims=3).eval()
    for module in network.modules():
        if isinstance(module, DeformModule):
            nn.init.normal_(module.out.weight, std=1e-2)
    fixed, moving = torch.rand(1, 1, 16, 16, 16), torch.rand(1, 1, 16, 16, 16)
    expected = network(fixed, moving)["ddf"].detach()
    with torch.inference_mode():
        got = network(fixed, moving)["ddf"]
    assert expected.abs().max() > 1e-3
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)

@pytest.mark.parametrize("path", ["fast", "torch"])
@pytest.mark.parametrize("shape", [(2, 3, 5, 6, 7), (1, 4, 1, 3, 2), (2, 3, 7, 9), (1, 2, 1, 5)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_linear_upsample_into_matches_interpolate(kernel_path, path, shape, dtype):
    x = torch.randn(shape, dtype=dtype, generator=torch.Generator().manual_seed(0))
    size = [2 * n for n in shape[2:]]
    reference = F.interpolate(
        x, size=size, mode="bilinear" if x.ndim == 4 else "trilinear", align_corners=False
    )
    out = torch.full((shape[0], shape[1] + 2, *size), 7.0, dtype=dtype)
    with kernel_path(path, "upsample_by_two"):
        linear_upsample_into(x, out)
    tolerance = 1e-6 if dtype == torch.float32 else 1e-14
    torch.testing.assert_close(out[:, : shape[1]], reference, rtol=tolerance, atol=tolerance)
    assert bool((out[:, shape[1] :] == 7.0).all())  # the other channels are left alone


def test_linear_upsample_into_other_sizes_and_bad_out():
    x = torch.randn(2, 3, 4, 5, 6)
    out = torch.zeros(2, 5, 7, 9, 11)  # not a doubling: torch's kernel, sample by sample
    linear_upsample_into(x, out)
    torch.testing.assert_close(
        out[:, :3], F.interpolate(x, size=(7, 9, 11), mode="trilinear"), rtol=0, atol=0
    )
    with pytest.raises(ValueError, match="cannot hold"):
        linear_upsample_into(x, torch.zeros(2, 2, 8, 10, 12))
    with pytest.raises(RuntimeError, match="no gradient"):
        linear_upsample_into(x.requires_grad_(), out)


def test_upsample_and_concatenate_without_autograd_equals_cat():
    x, skip = torch.randn(2, 4, 5, 6, 7, requires_grad=True), torch.randn(2, 3, 10, 12, 13)
    with_grad = upsample_and_concatenate(x, skip)  # torch.cat of interpolate: differentiable
    assert with_grad.requires_grad
    with torch.no_grad():
        without = upsample_and_concatenate(x, skip)
    torch.testing.assert_close(without, with_grad.detach(), rtol=1e-6, atol=1e-6)


def test_ddrnet_inference_equals_the_autograd_path():
    """The inference shortcuts (upsampling into the concatenation, one fused head convolution, the eval mean
    combined once) give the training path's numbers; the blur before the global branch is the paper's
    [1, 2, 1] / 4 kernel with edge replication (scipy's ``correlate1d``, mode "nearest")."""
    torch.manual_seed(0)
    net = DDRNet(
        spatial_dims=3, overlap=4, encoder_channels=(8, 8), decoder_channels=(8, 8), extra_channels=(8,)
    )
    with torch.no_grad():  # heads away from their near-zero start, so the outputs carry the network
        for head in (net.global_head, net.chunk_head):
            for conv in (head.mean, head.log_var):
                conv.weight.normal_(0, 0.1)
    net.eval()
    fixed, moving = torch.rand(2, 1, 20, 22, 18), torch.rand(2, 1, 20, 22, 18)
    autograd = net(fixed, moving)  # parameters require grad: the differentiable code throughout
    assert autograd["ddf"].requires_grad
    with torch.inference_mode():
        fast = net(fixed, moving)
    for key in ("ddf", "velocity", "velocity_mean", "velocity_log_var", "global_ddf", "chunk_ddf"):
        torch.testing.assert_close(fast[key], autograd[key].detach(), rtol=1e-5, atol=1e-5)
    features = torch.randn(2, 8, 6, 5, 4)
    mean, log_var = net.chunk_head(features)
    torch.testing.assert_close(mean, net.chunk_head.mean(features), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(log_var, net.chunk_head.log_var(features), rtol=1e-5, atol=1e-6)
    x = np.random.default_rng(0).random((1, 2, 9, 8, 7))
    blurred = x
    for axis in (2, 3, 4):
        blurred = ndimage.correlate1d(blurred, [0.25, 0.5, 0.25], axis=axis, mode="nearest")
    expected = F.interpolate(torch.from_numpy(blurred), size=(5, 4, 4), mode="trilinear", align_corners=True)
    torch.testing.assert_close(
        downsample_image(torch.from_numpy(x), (5, 4, 4)), expected, rtol=1e-12, atol=1e-12
    )
