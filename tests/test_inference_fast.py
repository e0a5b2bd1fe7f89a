"""Inference-only fast paths give the outputs of the plain paths (3D, small networks)."""

from __future__ import annotations

import torch
from torch import nn

from regnet_zoo.networks.inference import fold_batch_norm
from regnet_zoo.networks.pwc import DeformModule, PWCRegistrationPyramid
from regnet_zoo.networks.regnet import RegNet


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
