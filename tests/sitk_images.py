"""Test images with ITK geometry, shared by the test modules (array axis i = ITK index i)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import SimpleITK as sitk


def rotation(spatial_dims: int, angle: float) -> list[float]:
    """Row-major ITK direction: a rotation by ``angle`` (2D), about ITK's y axis (3D)."""
    c, s = math.cos(angle), math.sin(angle)
    if spatial_dims == 2:
        return [c, -s, s, c]
    return [c, 0.0, s, 0.0, 1.0, 0.0, -s, 0.0, c]


def write_sitk(arr: np.ndarray, path: Path, spacing, origin, angle: float, label: bool = False) -> sitk.Image:
    """Write ``arr`` with the given LPS geometry (int16 when ``label``); return the SimpleITK image."""
    image = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(arr)))
    if label:
        image = sitk.Cast(image, sitk.sitkInt16)
    image.SetSpacing([float(v) for v in spacing])
    image.SetOrigin([float(v) for v in origin])
    image.SetDirection(rotation(arr.ndim, angle))
    sitk.WriteImage(image, str(path))
    return image


def sitk_array(image: sitk.Image) -> np.ndarray:
    """SimpleITK image -> numpy in ITK index order (scalar) or ``(*S, N)`` (vector)."""
    arr = sitk.GetArrayFromImage(image)
    n = image.GetDimension()
    axes = tuple(range(n - 1, -1, -1)) + ((n,) if image.GetNumberOfComponentsPerPixel() > 1 else ())
    return np.transpose(arr, axes)


def smooth_blobs(shape, seed: int) -> np.ndarray:
    """Five Gaussian blobs on a non-zero background (it shows where two grids overlap), float32."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"))
    out = np.full(shape, 0.2)
    for _ in range(5):
        centre = rng.uniform(-0.6, 0.6, len(shape)).reshape(-1, *[1] * len(shape))
        out += rng.uniform(0.5, 1.0) * np.exp(-((grid - centre) ** 2).sum(0) / 0.1)
    return out.astype(np.float32)
