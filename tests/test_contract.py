"""The network contract (``networks.contract.RegistrationNetwork``) holds for all five methods, 2D and 3D."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.ndimage import map_coordinates

from regnet_zoo.networks.bspline_unet import BSplineUNet
from regnet_zoo.networks.contract import REQUIRED_OUTPUT_KEYS, RegistrationNetwork
from regnet_zoo.networks.ddrnet import DDRNet
from regnet_zoo.networks.discrete_corr import DiscreteCorrNet
from regnet_zoo.networks.pwc import PWCRegistrationPyramid
from regnet_zoo.networks.regnet import RegNet

# small widths: the same architectures, little compute
NETWORKS = {
    "pwc": lambda dims: PWCRegistrationPyramid(
        spatial_dims=dims, pyramid_channels=(4, 4, 4, 4), deform_channels=(8, 8, 4, 4, 4)
    ),
    "regnet": lambda dims: RegNet(
        dims,
        stem_channels=2,
        high_res_channels=(2, 2),
        low_res_channels=(2,) * 6,
        merged_channels=(2,) * 4,
        fc_channels=2,
    ),
    "ddrnet": lambda dims: DDRNet(
        spatial_dims=dims, overlap=4, encoder_channels=(4, 4), decoder_channels=(4, 4), extra_channels=(4,)
    ),
    "bspline_unet": lambda dims: BSplineUNet(
        dims, stream_channels=(4,), encoder_channels=(4, 4, 4), decoder_channels=(4, 4)
    ),
    "discrete_corr": lambda dims: DiscreteCorrNet(
        dims, radius=2, stride=2, hidden_channels=(4,), feature_channels=4
    ),
}
SHAPES = {2: (20, 23), 3: (10, 12, 11)}  # odd sizes: padding to multiples is exercised


def _smooth_image(shape, generator) -> torch.Tensor:
    """``(2, 1, *shape)`` images: blurred noise, so that linear interpolation is well conditioned."""
    x = torch.rand(2, 1, *shape, generator=generator)
    pool = torch.nn.functional.avg_pool2d if len(shape) == 2 else torch.nn.functional.avg_pool3d
    return pool(x, 3, stride=1, padding=1, count_include_pad=False)


def _scipy_warp(moving: torch.Tensor, ddf: torch.Tensor) -> np.ndarray:
    """Reference warp ``moving(x + ddf(x))`` with voxel-unit ``ddf`` (linear, edge values held outside)."""
    out = []
    for image, field in zip(moving.double().numpy(), ddf.double().numpy(), strict=True):
        coords = np.indices(image.shape[1:], dtype=np.float64) + field
        out.append([map_coordinates(channel, coords, order=1, mode="nearest") for channel in image])
    return np.asarray(out)


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("method", sorted(NETWORKS))
def test_network_satisfies_contract(method, spatial_dims):
    torch.manual_seed(0)
    net = NETWORKS[method](spatial_dims)
    assert isinstance(net, RegistrationNetwork)
    assert net.spatial_dims == spatial_dims and net.in_channels == 1
    # untrained networks start at (or near) the identity: perturb every weight so that the field is not zero
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=gen))
    net.eval()
    shape = SHAPES[spatial_dims]
    fixed, moving = _smooth_image(shape, gen), _smooth_image(shape, gen)
    with torch.no_grad():
        out = net(fixed, moving)
    assert set(REQUIRED_OUTPUT_KEYS) <= set(out)
    assert out["ddf"].shape == (2, spatial_dims, *shape)
    assert out["warped"].shape == moving.shape
    assert out["ddf"].abs().max() > 1e-3, "the perturbed network should predict a non-zero field"
    # voxel units, README convention: warped(x) = moving(x + ddf(x)), against an independent warp
    np.testing.assert_allclose(out["warped"].double().numpy(), _scipy_warp(moving, out["ddf"]), atol=1e-4)
    # the stacked single-input form gives the same field
    with torch.no_grad():
        stacked = net(torch.cat([fixed, moving], dim=1))
    torch.testing.assert_close(stacked["ddf"], out["ddf"])
    # the parametrisation reproduces the field
    params = net.transform_parameters(out)
    with torch.no_grad():
        rebuilt = net.outputs_from_parameters(params, fixed, moving)
    assert set(REQUIRED_OUTPUT_KEYS) <= set(rebuilt)
    torch.testing.assert_close(rebuilt["ddf"], out["ddf"], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(rebuilt["warped"], out["warped"], atol=1e-5, rtol=1e-4)


def test_protocol_rejects_a_network_missing_the_contract():
    class Partial(torch.nn.Module):
        spatial_dims, in_channels = 2, 1

        def forward(self, fixed, moving=None):
            return {}

    assert not isinstance(Partial(), RegistrationNetwork)
