"""A picture of one registration for a person to look at: ``regnet-zoo register --report`` (PNG).

One row per slice plane (axial, coronal, sagittal through the centre of the fixed label, else of the image; a
2D image has one row), six panels per row: fixed, moving (brought onto the fixed grid, before registration),
warped, a checkerboard of fixed and warped, the Jacobian determinant with folding marked, and the deformed
grid. Label boundaries are drawn on the fixed (yellow), moving and warped (red) images.

Slices are shown in **radiological** orientation, whatever the voxel order on disk: the image is brought to
the nearest RAS voxel order (``nibabel.orientations``), then the patient's right is on the viewer's left,
anterior / superior at the top, and sagittal slices have anterior on the left; letters on the panel edges say
so. Pixels are drawn with their physical aspect ratio. Drawn with matplotlib's Agg canvas (no display needed).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from torch import Tensor

__all__ = ["PLANES", "canonical", "slice_panel", "report_slices", "write_report"]

#: (name, through-plane axis, row axis, column axis) of the canonical (RAS) voxel array
PLANES = (("axial", 2, 1, 0), ("coronal", 1, 2, 0), ("sagittal", 0, 2, 1))
# letters on the (left, right, top, bottom) edges of each plane's panel in radiological orientation
_EDGE_LETTERS = {"axial": "RLAP", "coronal": "RLSI", "sagittal": "APSI"}


def _array(image: Tensor | np.ndarray) -> np.ndarray:
    arr = image.detach().cpu().numpy() if isinstance(image, Tensor) else np.asarray(image)
    return arr.astype(np.float64)


def _affine(image, affine) -> np.ndarray:
    if affine is None:
        affine = getattr(image, "affine", None)
    a = np.eye(4) if affine is None else _array(affine)
    if a.shape == (3, 3):
        out = np.eye(4)
        out[:2, :2], out[:2, 3] = a[:2, :2], a[:2, 2]
        a = out
    return a


def canonical(
    arr: np.ndarray, affine: np.ndarray, spatial_dims: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``arr`` ``(*S)`` or ``(*S, K)`` (``spatial_dims`` 2 or 3, RAS ``affine``) -> nearest RAS voxel order.

    Returns the reordered array (3D; a 2D image gets a unit third axis), the voxel size per new axis, and the
    ornt (``nibabel`` orientation of each source axis: target axis and flip).
    """
    from nibabel.orientations import apply_orientation, io_orientation

    if spatial_dims == 2:
        arr = arr[:, :, None]
    ornt = io_orientation(affine)
    out = apply_orientation(arr, ornt)
    spacing = np.empty(3)
    spacing[ornt[:, 0].astype(int)] = np.linalg.norm(affine[:3, :3], axis=0)
    return out, spacing, ornt


def slice_panel(volume: np.ndarray, plane: str, index: int) -> np.ndarray:
    """The 2D display array (rows, cols) of ``plane`` at ``index`` of a canonical (RAS) ``volume``
    ``(X, Y, Z[, K])``, in radiological orientation: row 0 is anterior (axial) or superior, column 0 is the
    patient's right (anterior for sagittal)."""
    _, through, row, col = next(p for p in PLANES if p[0] == plane)
    sl = np.take(volume, index, axis=through)  # remaining axes keep their order
    axes = [a for a in range(3) if a != through]
    sl = np.moveaxis(sl, [axes.index(row), axes.index(col)], [0, 1])
    return sl[::-1, ::-1]


def _centre(fixed_label: np.ndarray | None, shape: Sequence[int]) -> list[int]:
    if fixed_label is not None and (fixed_label > 0).any():
        idx = np.argwhere(fixed_label > 0).mean(axis=0)
        return [int(round(v)) for v in idx]
    return [n // 2 for n in shape]


def _normalise(arr: np.ndarray) -> np.ndarray:
    low, high = np.percentile(arr, [1, 99]) if arr.size else (0.0, 1.0)
    if high <= low:
        high = low + 1.0
    return np.clip((arr - low) / (high - low), 0.0, 1.0)


def _boundaries(label: np.ndarray) -> np.ndarray:
    """Boolean mask of label boundaries (a voxel whose right or lower neighbour differs), 2D."""
    edge = np.zeros(label.shape, dtype=bool)
    edge[:-1] |= label[:-1] != label[1:]
    edge[:, :-1] |= label[:, :-1] != label[:, 1:]
    return edge & ((label > 0) | np.roll(label > 0, -1, 0) | np.roll(label > 0, -1, 1))


def report_slices(
    fixed: Tensor,
    moving: Tensor,
    warped: Tensor,
    ddf: Tensor,
    affine: np.ndarray | Tensor | None = None,
    *,
    fixed_label: Tensor | None = None,
    moving_label: Tensor | None = None,
    warped_label: Tensor | None = None,
    jacobian: Tensor | None = None,
) -> dict[str, dict[str, np.ndarray]]:
    """The 2D arrays the report draws, per plane: ``{plane: {"fixed", "moving", "warped", "jacobian",
    "ddf_rows", "ddf_cols"[, "fixed_label", ...], "aspect"}}``.

    All inputs on the fixed grid (``moving`` already resampled there): images ``(C, *S)`` (first channel
    shown), labels ``(1, *S)``, ``ddf`` ``(N, *S)`` in voxels, ``jacobian`` ``(*S)`` (computed from ``ddf``
    when None); ``affine``: the fixed 4x4 RAS affine (default: ``fixed.affine``). ``ddf_rows``/``ddf_cols``
    are the in-plane displacement in display pixels (down / right).
    """
    from regnet_zoo.core.metrics import jacobian_determinant

    aff = _affine(fixed, affine)
    spatial_dims = ddf.shape[0]
    if jacobian is None:
        jacobian = jacobian_determinant(ddf[None].double())[0]
    volumes = {
        "fixed": _array(fixed)[0],
        "moving": _array(moving)[0],
        "warped": _array(warped)[0],
        "jacobian": _array(jacobian).reshape(ddf.shape[1:]),
    }
    labels = {"fixed_label": fixed_label, "moving_label": moving_label, "warped_label": warped_label}
    volumes.update({name: _array(lab)[0] for name, lab in labels.items() if lab is not None})
    # displacement in mm along RAS, then in voxels of the canonical grid (whose axis i is RAS axis i)
    linear = aff[:3, :spatial_dims]
    ddf_ras = np.einsum("ij,j...->...i", linear, _array(ddf))  # (*S, 3)
    canon = {k: canonical(v, aff, spatial_dims)[0] for k, v in volumes.items()}
    ddf_can, spacing, _ = canonical(ddf_ras, aff, spatial_dims)
    ddf_can = ddf_can / spacing  # (X, Y, Z, 3) in canonical voxels
    shape = canon["fixed"].shape
    centre = _centre(canon.get("fixed_label"), shape)
    planes = PLANES if spatial_dims == 3 else PLANES[:1]
    out: dict[str, dict[str, np.ndarray]] = {}
    for plane, through, row, col in planes:
        index = centre[through] if spatial_dims == 3 else 0
        panels = {k: slice_panel(v, plane, index) for k, v in canon.items()}
        # the display flips both axes, so in-plane displacements change sign
        panels["ddf_rows"] = -slice_panel(ddf_can[..., row], plane, index)
        panels["ddf_cols"] = -slice_panel(ddf_can[..., col], plane, index)
        panels["aspect"] = np.asarray(spacing[row] / spacing[col])
        out[plane] = panels
    return out


def _draw_grid(ax, rows: np.ndarray, cols: np.ndarray, step: int) -> None:
    h, w = rows.shape
    r, c = np.mgrid[0:h, 0:w].astype(np.float64)
    rr, cc = r + rows, c + cols
    for i in range(0, h, step):
        ax.plot(cc[i], rr[i], color="#00e5ff", linewidth=0.6)
    for j in range(0, w, step):
        ax.plot(cc[:, j], rr[:, j], color="#00e5ff", linewidth=0.6)


def _letters(ax, plane: str) -> None:
    left, right, top, bottom = _EDGE_LETTERS[plane]
    style = {"color": "orange", "fontsize": 9, "fontweight": "bold", "transform": ax.transAxes}
    ax.text(0.02, 0.5, left, ha="left", va="center", **style)
    ax.text(0.98, 0.5, right, ha="right", va="center", **style)
    ax.text(0.5, 0.98, top, ha="center", va="top", **style)
    ax.text(0.5, 0.02, bottom, ha="center", va="bottom", **style)


def write_report(
    path: str | os.PathLike,
    fixed: Tensor,
    moving: Tensor,
    warped: Tensor,
    ddf: Tensor,
    affine: np.ndarray | Tensor | None = None,
    *,
    fixed_label: Tensor | None = None,
    moving_label: Tensor | None = None,
    warped_label: Tensor | None = None,
    jacobian: Tensor | None = None,
    title: str = "",
    overwrite: bool = False,
) -> Path:
    """Draw :func:`report_slices` into a PNG at ``path`` (temporary name, then renamed); return the path."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import ListedColormap
    from matplotlib.figure import Figure

    from regnet_zoo.data.io import atomic_write, file_suffix
    from regnet_zoo.errors import RegistrationInputError

    path = Path(path)
    if file_suffix(path) != ".png":
        raise RegistrationInputError(f"{path}: the report is a PNG file (.png)")
    slices = report_slices(
        fixed, moving, warped, ddf, affine, fixed_label=fixed_label, moving_label=moving_label,
        warped_label=warped_label, jacobian=jacobian,
    )  # fmt: skip
    columns = [
        "fixed",
        "moving (before)",
        "warped",
        "checkerboard fixed / warped",
        "Jacobian determinant",
        "deformed grid",
    ]
    fig = Figure(figsize=(2.9 * len(columns) + 0.8, 2.9 * len(slices) + 0.7), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(slices), len(columns), squeeze=False)
    yellow = ListedColormap(["yellow"])
    red = ListedColormap(["red"])
    lime = ListedColormap(["lime"])
    jac_image = None
    # the Jacobian's colour range: symmetric about 1, wide enough for the largest change (0..2 at most)
    spread = max(float(np.abs(p["jacobian"] - 1).max()) for p in slices.values())
    spread = min(max(spread, 0.05), 1.0)
    for r, (plane, p) in enumerate(slices.items()):
        aspect = float(p["aspect"])
        f, m, w = _normalise(p["fixed"]), _normalise(p["moving"]), _normalise(p["warped"])
        gray = {"cmap": "gray", "vmin": 0.0, "vmax": 1.0, "aspect": aspect, "interpolation": "nearest"}
        overlay = {"aspect": aspect, "interpolation": "nearest", "vmin": 0, "vmax": 1}
        axes[r, 0].imshow(f, **gray)
        if "fixed_label" in p:
            axes[r, 0].imshow(np.ma.masked_where(~_boundaries(p["fixed_label"]), f), cmap=yellow, **overlay)
        axes[r, 1].imshow(m, **gray)
        if "moving_label" in p:
            axes[r, 1].imshow(np.ma.masked_where(~_boundaries(p["moving_label"]), m), cmap=red, **overlay)
        axes[r, 2].imshow(w, **gray)
        if "fixed_label" in p:
            axes[r, 2].imshow(np.ma.masked_where(~_boundaries(p["fixed_label"]), w), cmap=yellow, **overlay)
        if "warped_label" in p:
            axes[r, 2].imshow(np.ma.masked_where(~_boundaries(p["warped_label"]), w), cmap=red, **overlay)
        tile = max(2, min(f.shape) // 6)
        rr, cc = np.indices(f.shape)
        axes[r, 3].imshow(np.where(((rr // tile) + (cc // tile)) % 2 == 0, f, w), **gray)
        jac = p["jacobian"]
        jac_image = axes[r, 4].imshow(
            jac, cmap="RdBu_r", vmin=1 - spread, vmax=1 + spread, aspect=aspect, interpolation="nearest"
        )
        folding = jac <= 0
        if folding.any():
            axes[r, 4].imshow(np.ma.masked_where(~folding, folding.astype(float)), cmap=lime, **overlay)
        axes[r, 4].set_xlabel(
            f"det J {jac.min():.2f} .. {jac.max():.2f}; folding (green): {int(folding.sum())} px", fontsize=8
        )
        axes[r, 5].imshow(f, **{**gray, "vmax": 2.0})  # the fixed image, dimmed
        _draw_grid(axes[r, 5], p["ddf_rows"], p["ddf_cols"], step=max(2, min(f.shape) // 16))
        axes[r, 5].set_xlim(-0.5, f.shape[1] - 0.5)
        axes[r, 5].set_ylim(f.shape[0] - 0.5, -0.5)
        axes[r, 0].set_ylabel(plane, fontsize=11)
        for c in range(len(columns)):
            axes[r, c].set_xticks([])
            axes[r, c].set_yticks([])
            _letters(axes[r, c], plane)
            if r == 0:
                axes[r, c].set_title(columns[c], fontsize=10)
    bar = fig.colorbar(jac_image, ax=axes[:, 4].tolist(), location="right", shrink=0.6, pad=0.01)
    bar.set_label("det J  (<1 shrinks, >1 grows)", fontsize=8)
    labels = "  yellow: fixed label, red: moving / warped label" if fixed_label is not None else ""
    fig.suptitle(f"{title}  (radiological view: patient's right on the left){labels}", fontsize=11)
    return atomic_write(path, lambda tmp: fig.savefig(str(tmp), format="png"), overwrite)
