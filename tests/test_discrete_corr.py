"""Discrete correlation network (Heinrich & Blendowski, Learn2Reg 2019 tutorial / PDD-Net): regularisation
against the tutorial's own layer sequence and brute force, capture range with identity features, loss terms,
parameters round trip, and a short weakly supervised training run on real labelled brain slices."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage
from torch import nn

from regnet_zoo.core import _fast
from regnet_zoo.core.correlation import displacement_set
from regnet_zoo.core.losses import one_hot_labels
from regnet_zoo.core.metrics import dice_per_label
from regnet_zoo.core.spatial import warp_labels
from regnet_zoo.errors import RegistrationInputError
from regnet_zoo.networks.discrete_corr import (
    DiscreteCorrLoss,
    DiscreteCorrNet,
    approximate_min_convolution,
    expected_displacement,
    mean_field_smoothing,
    nonlocal_label_transfer,
    upsample_coarse_ddf,
)


def _smooth_texture(size: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """Standardised blurred noise ``(1, 1, *size)``: a texture whose SSD has one clear minimum."""
    rng = np.random.default_rng(seed)
    image = ndimage.gaussian_filter(rng.random(size), 1.5)
    image = (image - image.mean()) / image.std()
    return torch.from_numpy(image).float()[None, None]


@pytest.mark.parametrize("spatial_dims, size", [(2, (30, 26)), (3, (17, 12, 14))])
def test_outputs_shapes_and_gradients(spatial_dims, size):
    net = DiscreteCorrNet(spatial_dims, radius=2, hidden_channels=(8, 8), feature_channels=4)
    fixed, moving = torch.rand(2, 1, *size), torch.rand(2, 1, *size)
    out = net(fixed, moving)
    coarse = tuple((s + 3) // 4 for s in size)
    assert out["ddf"].shape == (2, spatial_dims, *size)
    assert out["warped"].shape == (2, 1, *size)
    assert out["ddf_coarse"].shape == (2, spatial_dims, *coarse)
    assert out["probabilities"].shape == (2, 5**spatial_dims, *coarse)
    torch.testing.assert_close(out["probabilities"].sum(1), torch.ones(2, *coarse))
    # expected displacement lies inside the capture range (radius * stride image voxels)
    assert out["ddf_coarse"].abs().max() <= 2 * 4 + 1e-4
    labels = (torch.rand(2, 1, *size) * 3).long()
    terms = DiscreteCorrLoss()(
        out, {"fixed": fixed, "moving": moving, "fixed_label": labels, "moving_label": labels}
    )
    terms["loss"].backward()
    grads = [p.grad for p in net.parameters()]
    assert all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0


@pytest.mark.parametrize("path", ["fast", "torch"])
def test_min_convolution_matches_tutorial_layers_2d(path, kernel_path):
    """The tutorial's 2D layer sequence: ReplicationPad2d(5), AvgPool2d(5) x2, MaxPool2d(3) on -cost."""
    cost = torch.rand(1, 11 * 11, 6, 7)
    pad, avg, max_pool = nn.ReplicationPad2d(5), nn.AvgPool2d(5, stride=1), nn.MaxPool2d(3, stride=1)
    minconv = nn.Sequential(pad, avg, avg, max_pool)
    per_voxel = cost.permute(0, 2, 3, 1).reshape(1, -1, 11, 11)
    reference = -minconv(-per_voxel)
    reference = reference.permute(0, 2, 3, 1).reshape(1, 121, 6, 7)
    with kernel_path(path, "min_convolution"):
        torch.testing.assert_close(approximate_min_convolution(cost, 5, 3), reference)


@pytest.mark.parametrize("path", ["fast", "torch"])
def test_min_convolution_brute_force_3d(path, kernel_path):
    cost = torch.rand(2, 5**3, 3, 2, 2, dtype=torch.float64)
    with kernel_path(path, "min_convolution"):
        out = approximate_min_convolution(cost, avg_kernel=3, min_kernel=3)
    grid = cost.numpy().reshape(2, 5, 5, 5, 3, 2, 2)
    pad = 2 + 1
    ref = np.empty_like(grid)
    for b, x, y, z in np.ndindex(2, 3, 2, 2):
        g = np.pad(grid[b, :, :, :, x, y, z], pad, mode="edge")  # (11, 11, 11)
        for _ in range(2):  # two valid 3x3x3 box means
            n = g.shape[0] - 2
            g = np.array(
                [
                    [[g[i : i + 3, j : j + 3, k : k + 3].mean() for k in range(n)] for j in range(n)]
                    for i in range(n)
                ]
            )
        n = g.shape[0] - 2
        g = np.array(
            [
                [[g[i : i + 3, j : j + 3, k : k + 3].min() for k in range(n)] for j in range(n)]
                for i in range(n)
            ]
        )
        ref[b, :, :, :, x, y, z] = g
    torch.testing.assert_close(out, torch.from_numpy(ref.reshape(2, 125, 3, 2, 2)))


@pytest.mark.parametrize("path", ["fast", "torch"])
def test_mean_field_matches_scipy_uniform_filter_interior(path, kernel_path):
    cost = torch.rand(1, 4, 20, 21)
    with kernel_path(path, "mean_field"):
        out = mean_field_smoothing(cost, kernel=5, iterations=3)
    ref = cost.numpy()
    for _ in range(3):
        ref = ndimage.uniform_filter(ref, size=(1, 1, 5, 5), mode="nearest")
    # identical wherever the single up-front border padding and scipy's per-pass padding agree
    torch.testing.assert_close(out[..., 6:-6, 6:-6], torch.from_numpy(ref)[..., 6:-6, 6:-6])
    torch.testing.assert_close(
        mean_field_smoothing(torch.full((1, 3, 5, 4, 6), 2.0)), torch.full((1, 3, 5, 4, 6), 2.0)
    )


def test_expected_displacement_and_upsampling_analytic():
    offsets = displacement_set(2, 3)
    probabilities = torch.zeros(1, 125, 2, 3, 2)
    probabilities[0, 7] = 1.0
    torch.testing.assert_close(expected_displacement(probabilities, 2)[0, :, 1, 2, 0], offsets[7].float())
    torch.testing.assert_close(
        expected_displacement(torch.full((1, 125, 2, 2, 2), 1 / 125), 2), torch.zeros(1, 3, 2, 2, 2)
    )
    # a field linear in the position of its coarse voxels (stride * j + origin) upsamples to that linear field
    stride, origin = 4, 1.5
    j = torch.arange(8.0)
    coarse = torch.stack(
        torch.meshgrid(0.3 * (stride * j + origin), -0.2 * (stride * j[:6] + origin), indexing="ij")
    )
    full = upsample_coarse_ddf(coarse[None], (32, 24), stride, origin)[0]
    x = torch.stack(torch.meshgrid(0.3 * torch.arange(32.0), -0.2 * torch.arange(24.0), indexing="ij"))
    torch.testing.assert_close(full[:, 2:-3, 2:-3], x[:, 2:-3, 2:-3])


@pytest.mark.parametrize("stride, radius", [(1, 4), (4, 3)])
def test_identity_features_recover_translation_of_radius(stride, radius):
    """Untrained (no weights at all): a translation of exactly r feature voxels (r * stride image voxels) is
    recovered -- the capture range is set by the displacement set, not by a receptive field."""
    fixed = _smooth_texture((96, 96))
    shift = (radius * stride, -radius * stride)
    moving = torch.roll(fixed, shifts=shift, dims=(2, 3))  # moving(x + shift) = fixed(x)
    net = DiscreteCorrNet(2, radius=radius, stride=stride, features="identity", softmax_scale=100.0)
    assert sum(p.numel() for p in net.parameters()) == 0
    out = net(fixed, moving)
    interior = (slice(None), slice(28, 68), slice(28, 68))
    error = (out["ddf"][0][interior] - torch.tensor(shift, dtype=torch.float32).view(2, 1, 1)).norm(dim=0)
    assert error.mean() < 0.5, error.mean()
    residual = (out["warped"] - fixed)[0, 0, 28:68, 28:68].abs().mean()
    assert residual < 0.25 * (moving - fixed)[0, 0, 28:68, 28:68].abs().mean()


def test_nonlocal_transfer_with_certain_probabilities_shifts_labels():
    labels = (torch.rand(1, 1, 9, 8) * 3).long()
    onehot = one_hot_labels(labels, [0, 1, 2])
    probabilities = torch.zeros(1, 25, 9, 8)
    offsets = displacement_set(2, 2)
    index = int(((offsets == torch.tensor([1, -2])).all(1)).nonzero())
    probabilities[:, index] = 1.0
    moved = nonlocal_label_transfer(probabilities, onehot, 2)
    torch.testing.assert_close(moved[..., :8, 2:], onehot[..., 1:, :6])


def test_loss_terms_and_fallbacks():
    net = DiscreteCorrNet(2, radius=2, hidden_channels=(8, 8), feature_channels=4)
    fixed, moving = torch.rand(1, 1, 32, 32), torch.rand(1, 1, 32, 32)
    out = net(fixed, moving)
    labels = {
        "fixed_label": (torch.rand(1, 1, 32, 32) * 3).long(),
        "moving_label": (torch.rand(1, 1, 32, 32) * 3).long(),
    }
    with_labels = DiscreteCorrLoss(label_loss="nonlocal")(out, {"fixed": fixed, "moving": moving, **labels})
    assert set(with_labels) == {"loss", "label", "smoothness"}
    torch.testing.assert_close(with_labels["loss"], with_labels["label"] + with_labels["smoothness"])
    without = DiscreteCorrLoss(image_loss="mse", image_weight=2.0)(out, {"fixed": fixed, "moving": moving})
    assert set(without) == {"loss", "image", "smoothness"}
    torch.testing.assert_close(without["image"], 2.0 * ((out["warped"] - fixed) ** 2).mean())
    # no probabilities (instance optimisation of ddf_coarse): the label term falls back to warped-label Dice
    rebuilt = net.outputs_from_parameters(out["ddf_coarse"].detach(), fixed, moving)
    dice_only = DiscreteCorrLoss(label_loss="dice")(out, {"fixed": fixed, "moving": moving, **labels})
    fallback = DiscreteCorrLoss(label_loss="nonlocal")(rebuilt, {"fixed": fixed, "moving": moving, **labels})
    torch.testing.assert_close(fallback["label"], dice_only["label"])
    assert 0 < float(fallback["label"]) < 1


def _box_pool_rows(onehot: np.ndarray, stride: int) -> np.ndarray:
    """Independent reference: mean over image rows [stride j - stride/2, stride j + stride/2] (voxels as unit
    boxes, the two end voxels half inside), border rows repeated; ``onehot`` ``(K, H, W)``, W pooled alike."""
    weights = np.r_[0.5, np.ones(stride - 1), 0.5] / stride
    out = onehot
    for axis in (1, 2):
        padded = np.pad(out, [(0, 0)] * axis + [(stride // 2, stride)] + [(0, 0)] * (2 - axis), mode="edge")
        count = -(-onehot.shape[axis] // stride)
        rows = [np.tensordot(np.take(padded, range(stride * j, stride * j + stride + 1), axis=axis), weights,
                             axes=([axis], [0])) for j in range(count)]
        out = np.stack(rows, axis=axis)
    return out


@pytest.mark.parametrize("size", [(32, 28), (30, 25)])
def test_nonlocal_label_term_pools_labels_onto_the_feature_grid(size):
    """Learned feature j is centred on image voxel 4 j: with certain zero displacements the non-local term is
    the weighted squared error of the labels pooled on those centres (independent numpy reference)."""
    rng = np.random.default_rng(3)
    fixed_label = torch.from_numpy(rng.integers(0, 3, size))[None, None]
    moving_label = torch.from_numpy(rng.integers(0, 3, size))[None, None]
    grid = tuple(-(-s // 4) for s in size)
    probabilities = torch.zeros(1, 9, *grid, dtype=torch.float64)
    probabilities[:, 4] = 1.0  # displacement (0, 0) of displacement_set(1, 2)
    outputs = {"probabilities": probabilities, "ddf": torch.zeros(1, 2, *size, dtype=torch.float64)}
    batch = {"fixed": torch.zeros(1, 1, *size), "fixed_label": fixed_label, "moving_label": moving_label}
    loss = DiscreteCorrLoss(label_loss="nonlocal", smooth_weight=0.0)(outputs, batch)["label"]

    fixed_ref = _box_pool_rows(one_hot_labels(fixed_label, [0, 1, 2])[0].double().numpy(), 4)
    moving_ref = _box_pool_rows(one_hot_labels(moving_label, [0, 1, 2])[0].double().numpy(), 4)
    weight = 1 / np.sqrt(fixed_ref.mean(axis=(1, 2)) + 1e-4)
    weight = weight / weight.mean()
    expected = (weight[:, None, None] * (moving_ref - fixed_ref) ** 2).mean()
    assert float(loss) == pytest.approx(expected, rel=1e-6)
    # block-mean features (identity features, origin (stride - 1) / 2) pool on plain 4x4 blocks instead
    block = DiscreteCorrLoss(label_loss="nonlocal", smooth_weight=0.0, feature_origin="block")(outputs, batch)
    assert float(block["label"]) != pytest.approx(expected, rel=1e-3)


def test_parameters_round_trip_and_bad_input():
    net = DiscreteCorrNet(3, radius=1, stride=2, hidden_channels=(4,), feature_channels=4).eval()
    fixed, moving = torch.rand(1, 1, 10, 12, 8), torch.rand(1, 1, 10, 12, 8)
    with torch.no_grad():
        out = net(fixed, moving)
        rebuilt = net.outputs_from_parameters(net.transform_parameters(out), fixed, moving)
    for key in ("ddf", "warped", "ddf_coarse"):
        torch.testing.assert_close(rebuilt[key], out[key])
    with pytest.raises(RegistrationInputError):
        net(fixed, moving[..., :7])
    with pytest.raises(RegistrationInputError):
        net(fixed[0], moving[0])


def _oasis_slices(shared_data, indices, downsample: int = 2):
    """Slices of the two OASIS subjects at the same index: images and labels, each (P, 2, 1, H, W)."""
    nib = pytest.importorskip("nibabel")
    root = shared_data / "oasis3d_pair"
    volumes, labels = [], []
    for case in ("OASIS_0001_0000", "OASIS_0002_0000"):
        volumes.append(
            torch.from_numpy(np.asarray(nib.load(root / "imagesTr" / f"{case}.nii.gz").dataobj, np.float32))
        )
        labels.append(
            torch.from_numpy(
                np.asarray(nib.load(root / "labelsTr" / f"{case}.nii.gz").dataobj).astype(np.int64)
            )
        )
    images = torch.stack([torch.stack([v[:, :, i] for v in volumes]) for i in indices]).unsqueeze(2)
    label_maps = torch.stack([torch.stack([lab[:, :, i] for lab in labels]) for i in indices]).unsqueeze(2)
    images = F.avg_pool2d(images.flatten(0, 1), downsample).unflatten(0, (len(indices), 2))
    return images, label_maps[..., ::downsample, ::downsample]


def _mean_dice(net, images, labels, evaluation_labels) -> float:
    scores = []
    with torch.no_grad():
        for pair_images, pair_labels in zip(images, labels, strict=True):
            for f, m in ((0, 1), (1, 0)):
                ddf = net(pair_images[f : f + 1], pair_images[m : m + 1])["ddf"]
                warped = warp_labels(pair_labels[m : m + 1], ddf)
                per_label = dice_per_label(
                    pair_labels[f, 0], warped[0, 0], evaluation_labels, pair_labels[m, 0]
                )
                scores.append(np.nanmean(list(per_label.values())))
    return float(np.mean(scores))


@pytest.mark.slow
def test_short_training_on_labelled_brain_slices_beats_identity(shared_data):
    """Weakly supervised (labels only) training of the feature extractor raises Dice on held-out slices.

    Only two labelled subjects exist: the held-out slices lie outside the training range, at least 12 slices
    (12 mm) from every training slice."""
    evaluation_labels = json.loads((shared_data / "oasis3d_pair" / "dataset.json").read_text())[
        "evaluation_labels"
    ]
    train_images, train_labels = _oasis_slices(shared_data, range(60, 100, 3))
    held_images, held_labels = _oasis_slices(shared_data, [111, 118, 125, 132])
    identity = float(
        np.mean(
            [
                np.nanmean(list(dice_per_label(lab[0, 0], lab[1, 0], evaluation_labels).values()))
                for lab in held_labels
            ]
        )
    )
    net = DiscreteCorrNet(2, radius=3, stride=2, hidden_channels=(32,), softmax_scale=10.0)
    loss_fn = DiscreteCorrLoss(label_loss="dice", smooth_weight=0.01)
    optimiser = torch.optim.Adam(net.parameters(), lr=5e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(45):
        pairs = torch.randint(len(train_images), (2,), generator=generator)
        f = int(torch.randint(2, (1,), generator=generator))
        batch = {
            "fixed": train_images[pairs, f],
            "moving": train_images[pairs, 1 - f],
            "fixed_label": train_labels[pairs, f],
            "moving_label": train_labels[pairs, 1 - f],
        }
        terms = loss_fn(net(batch["fixed"], batch["moving"]), batch)
        optimiser.zero_grad()
        terms["loss"].backward()
        optimiser.step()
    trained = _mean_dice(net.eval(), held_images, held_labels, evaluation_labels)
    assert trained > identity + 0.02, (identity, trained)


@pytest.mark.skipif(_fast.numba is None, reason="numba not installed")
def test_inference_kernels_equal_the_training_code_3d():
    """Without autograd on CPU the cost volume, min-convolution and mean-field smoothing run as numba kernels;
    they give the torch code's numbers (the two regularisers bit for bit: the same additions in the same
    order), and the network's output is the same either way."""
    cost = torch.rand(2, 7**3, 6, 5, 7)
    for fn in (lambda c: approximate_min_convolution(c, 3, 3), lambda c: mean_field_smoothing(c, 3, 2)):
        with _fast.disabled():
            reference = fn(cost)
        assert torch.equal(fn(cost), reference)
    net = DiscreteCorrNet(spatial_dims=3, in_channels=1, radius=2, stride=2, hidden_channels=[8]).eval()
    fixed, moving = torch.rand(1, 1, 12, 10, 14), torch.rand(1, 1, 12, 10, 14)
    with torch.no_grad():
        out = net(fixed, moving)
        with _fast.disabled():
            ref = net(fixed, moving)
    torch.testing.assert_close(out["ddf"], ref["ddf"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["probabilities"], ref["probabilities"], rtol=1e-5, atol=1e-6)


def test_regularisers_refuse_even_windows():
    cost = torch.rand(1, 5**3, 4, 4, 4)
    for bad in (lambda: approximate_min_convolution(cost, 3, 2), lambda: mean_field_smoothing(cost, 4)):
        with pytest.raises(ValueError, match="odd"):  # an even window would change the output's shape
            bad()
