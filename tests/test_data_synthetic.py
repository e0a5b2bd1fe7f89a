"""regnet_zoo.data.synthetic: RegNet DVFs (amplitude, smoothness, seeding), deform_pair against SimpleITK."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from scipy.ndimage import gaussian_filter

from regnet_zoo.data.synthetic import (
    REGNET_PRESETS,
    deform_pair,
    random_svf,
    smooth_points_field,
    synthetic_dvf,
)


def test_smooth_points_field_equals_gaussian_filter_of_spikes():
    """The separable sum of Gaussians is the zero-padded Gaussian smoothing of step 3 (scipy reference)."""
    shape, sigma = (20, 24, 18), np.array([3.0, 4.0, 2.5])
    points = torch.tensor([[3, 5, 7], [10, 20, 2], [15, 12, 9]], dtype=torch.float64)
    values = torch.tensor([[1.0, -2.0, 0.5], [0.3, 0.0, -1.0]])
    spikes = np.zeros((2, *shape))
    for p, (i, j, k) in enumerate(points.long().tolist()):
        spikes[:, i, j, k] = values[:, p].numpy()
    ref = np.stack([gaussian_filter(c, sigma, mode="constant", truncate=8.0) for c in spikes])
    ref *= (2 * np.pi) ** 1.5 * np.prod(sigma)  # scipy's kernel is normalised, ours peaks at 1
    out = smooth_points_field(shape, points, values, sigma).numpy()
    np.testing.assert_allclose(out, ref, atol=1e-3 * np.abs(ref).max())


@pytest.mark.parametrize("preset", ["low", "medium", "high"])
def test_dvf_amplitude_within_theta_mm(preset):
    spacing = np.array([1.0, 1.5, 2.5])
    ddf = synthetic_dvf((48, 40, 30), spacing, preset, generator=1)
    assert ddf.shape == (3, 48, 40, 30) and ddf.dtype == torch.float32
    ddf_mm = ddf.double().numpy() * spacing.reshape(3, 1, 1, 1)
    peak = np.abs(ddf_mm).reshape(3, -1).max(1)
    theta = REGNET_PRESETS[preset]["theta"]
    assert (peak <= theta + 1e-4).all()
    # normalised back to the sampled amplitude: with P >= 80 uniform draws the max is close to theta
    assert (peak > 0.8 * theta).all()


def test_dvf_smoothness_and_frequency_presets():
    def mean_gradient_mm(preset, seed):
        ddf = synthetic_dvf((64, 64), 1.0, preset, generator=seed).numpy()
        return np.mean([np.abs(np.gradient(c)).mean() for c in ddf])

    grads = {p: np.mean([mean_gradient_mm(p, s) for s in range(3)]) for p in ("low", "high")}
    assert grads["high"] > grads["low"]  # smaller sigma: higher spatial frequency
    ddf = synthetic_dvf((64, 64), 1.0, "high", generator=0).numpy()
    # a 1-voxel blur barely changes a field smoothed with sigma = 20 mm (white noise would change ~100%;
    # the separate scaling of positive and negative parts leaves slope kinks at zero crossings)
    blurred = np.stack([gaussian_filter(c, 1.0, mode="nearest") for c in ddf])
    assert np.abs(blurred - ddf)[:, 4:-4, 4:-4].max() < 0.03 * np.abs(ddf).max()
    assert np.abs(np.gradient(ddf, axis=(1, 2))).max() < 1.0  # |du/dx| < 1: no folding along an axis
    # the map x -> x + u(x) stays invertible (positive Jacobian determinant)
    jac = np.stack([np.stack(np.gradient(c)) for c in ddf]) + np.eye(2)[:, :, None, None]
    det = jac[0, 0] * jac[1, 1] - jac[0, 1] * jac[1, 0]
    assert det.min() > 0


def test_seeding():
    a = synthetic_dvf((32, 32), generator=5)
    assert torch.equal(a, synthetic_dvf((32, 32), generator=5))
    assert not torch.equal(a, synthetic_dvf((32, 32), generator=6))
    gen = torch.Generator().manual_seed(3)
    b = random_svf((32, 32, 16), generator=gen)
    assert torch.equal(b, random_svf((32, 32, 16), generator=torch.Generator().manual_seed(3)))
    assert torch.linalg.norm(b, dim=0).max() == pytest.approx(4.0, rel=1e-5)


def _sitk_from_axes(arr: np.ndarray, spacing) -> sitk.Image:
    """SimpleITK image whose index i runs along array axis i (our convention)."""
    img = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(arr)))
    img.SetSpacing([float(s) for s in spacing])
    return img


def test_deform_pair_matches_simpleitk_displacement_resampling():
    """fixed(x) = moving(x + ddf(x)): SimpleITK's DisplacementFieldTransform (physical mm) gives the same."""
    rng = np.random.default_rng(0)
    spacing = (1.5, 2.0)
    moving = gaussian_filter(rng.random((40, 36)), 2.0).astype(np.float32)
    label = (moving > np.median(moving)).astype(np.int64)
    out = deform_pair(
        torch.as_tensor(moving)[None],
        torch.as_tensor(label)[None],
        preset="high",
        spacing=spacing,
        mode="linear",
    )
    ddf = out["ddf"].numpy()
    field_mm = np.stack([ddf[i] * spacing[i] for i in range(2)], axis=-1).astype(np.float64)  # (H, W, 2)
    disp = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(field_mm, (1, 0, 2))), isVector=True)
    disp.SetSpacing(spacing)
    transform = sitk.DisplacementFieldTransform(disp)
    mov = _sitk_from_axes(moving, spacing)
    ref = np.transpose(sitk.GetArrayFromImage(sitk.Resample(mov, mov, transform, sitk.sitkLinear, 0.0)))
    inside = np.all([(np.indices(moving.shape)[i] + ddf[i] >= 0) for i in range(2)], axis=0) & np.all(
        [(np.indices(moving.shape)[i] + ddf[i] <= moving.shape[i] - 1) for i in range(2)], axis=0
    )
    assert inside.mean() > 0.7 and np.abs(ddf).max() > 1.0
    np.testing.assert_allclose(out["fixed"][0].numpy()[inside], ref[inside], atol=1e-4)
    lab = _sitk_from_axes(label.astype(np.float32), spacing)
    ref_lab = np.transpose(
        sitk.GetArrayFromImage(sitk.Resample(lab, lab, transform, sitk.sitkNearestNeighbor))
    )
    assert (out["fixed_label"][0].numpy()[inside] == ref_lab[inside]).mean() > 0.99
    assert torch.equal(out["moving"], torch.as_tensor(moving)[None])


def test_deform_pair_metatensor_spacing_and_noise():
    from monai.data import MetaTensor

    image = MetaTensor(torch.rand(1, 24, 20, 16), affine=torch.diag(torch.tensor([2.0, 2.0, 4.0, 1.0])))
    out = deform_pair(image, preset="low", noise_std=0.1, generator=0)
    assert out["fixed"].shape == image.shape and out["ddf"].shape == (3, 24, 20, 16)
    # the spacing comes from the affine: theta = 8 mm is 4 voxels along axes 0 and 1, 2 voxels along axis 2
    peak_vox = out["ddf"].abs().flatten(1).amax(1)
    assert (peak_vox[:2] <= 4.0 + 1e-5).all() and peak_vox[2] <= 2.0 + 1e-5
    diffeo = deform_pair(image, diffeomorphic=True, generator=0)
    assert torch.isfinite(diffeo["ddf"]).all()
