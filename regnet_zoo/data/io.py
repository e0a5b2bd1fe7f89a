"""Image, label and landmark I/O with validation.

Every loaded image is a channel-first ``MetaTensor`` ``(C, *S)`` whose ``affine`` is MONAI's 4x4
voxel-to-world matrix in **RAS** (for 2D images the third axis is a unit placeholder). NIfTI goes through
MONAI's ``NibabelReader`` (the reader ``LoadImage`` uses); MHA/MHD/NRRD/PNG/JPEG/TIFF are read with SimpleITK
and their ITK (LPS) geometry is converted to RAS. (MONAI's ``ITKReader`` gives the same geometry but needs
``itk``, whose lazy loading costs seconds per process.) Array axis ``i`` is always ITK/NIfTI index ``i``.

Landmarks are physical points in ITK's **LPS** convention (what ``TransformIndexToPhysicalPoint`` gives);
:func:`lps_to_voxel` / :func:`voxel_to_lps` convert between them and voxel coordinates of an image.
Bad input raises :class:`~regnet_zoo.errors.RegistrationInputError` naming the file.
"""

from __future__ import annotations

import json
import math
import os
import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor

from regnet_zoo.core.geometry import affine_from_itk as lps_affine_to_ras
from regnet_zoo.core.geometry import as_4x4 as _as_4x4
from regnet_zoo.core.geometry import itk_geometry, lps_to_voxel, voxel_to_lps
from regnet_zoo.errors import RegistrationInputError

__all__ = [
    "check_spacing",
    "check_label_count",
    "MAX_LABELS",
    "NIFTI_SUFFIXES",
    "SITK_SUFFIXES",
    "NUMPY_SUFFIXES",
    "IMAGE_SUFFIXES",
    "WRITE_SUFFIXES",
    "file_suffix",
    "load_image",
    "load_label",
    "check_pair",
    "spatial_dims_of",
    "load_landmarks",
    "save_landmarks",
    "lps_to_voxel",
    "voxel_to_lps",
    "lps_affine_to_ras",
    "save_image",
    "atomic_write",
    "json_ready",
    "metrics_to_json",
]

NIFTI_SUFFIXES = (".nii", ".nii.gz")
SITK_SUFFIXES = (".mha", ".mhd", ".nrrd", ".nhdr", ".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
NUMPY_SUFFIXES = (".npz", ".npy")
IMAGE_SUFFIXES = NIFTI_SUFFIXES + SITK_SUFFIXES + NUMPY_SUFFIXES
#: formats :func:`save_image` writes (geometry kept)
WRITE_SUFFIXES = NIFTI_SUFFIXES + (".mha", ".mhd", ".nrrd", ".nhdr")

# npz keys tried in order when no key is given
_IMAGE_KEYS = ("image", "img", "vol", "data", "arr_0")
_LABEL_KEYS = ("label", "labels", "seg", "mask", "arr_0")

def file_suffix(path: str | os.PathLike) -> str:
    """Lower-case suffix, with ``.nii.gz`` kept whole."""
    name = Path(path).name.lower()
    if name.endswith(".nii.gz"):
        return ".nii.gz"
    return Path(name).suffix


def _fail(path: str | os.PathLike, problem: str) -> RegistrationInputError:
    return RegistrationInputError(f"{path}: {problem}")


def _read_nifti(path: Path, dtype) -> tuple[np.ndarray, np.ndarray, int]:
    """-> (array ``(*S, C)``, 4x4 RAS affine, spatial rank) through MONAI's nibabel reader.

    The reader is called directly rather than through ``LoadImage``, which on failure retries every
    installed reader (slow, and a page-long error) instead of reporting nibabel's reason.
    """
    import nibabel as nib
    from monai.data import NibabelReader

    try:  # the raw header: nibabel's loader silently turns a zero voxel size into 1
        with nib.openers.ImageOpener(str(path)) as f:
            header = nib.Nifti1Header.from_fileobj(f, check=False)
        zooms = np.asarray(header["pixdim"][1 : 1 + min(3, int(header["dim"][0]))], dtype=np.float64)
        unusable = not (np.isfinite(zooms) & (zooms > 0)).all() and int(header["sform_code"]) == 0
    except Exception:  # NIfTI-2, or a file the reader below reports on
        unusable = False
    if unusable:
        raise _fail(path, f"voxel sizes {zooms.tolist()} in the header are not positive")
    reader = NibabelReader()
    arr, meta = reader.get_data(reader.read(str(path)))
    arr = np.asarray(arr) if dtype is None else np.asarray(arr, dtype=dtype)
    rank = min(len(np.atleast_1d(meta.get("spatial_shape", arr.shape[:3]))), arr.ndim)
    arr = arr.reshape(arr.shape[:rank] + (-1,))  # any trailing (time / vector) dims become channels
    return arr, np.asarray(meta["affine"], dtype=np.float64), rank


def _read_sitk(path: Path) -> tuple[np.ndarray, np.ndarray, int]:
    """-> (array ``(*S, C)`` in ITK index order, 4x4 RAS affine, spatial rank) via SimpleITK."""
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()  # ITK rejects a zero spacing only with a page of C++ context
    if not all(math.isfinite(s) and s > 0 for s in reader.GetSpacing()):
        raise _fail(path, f"voxel spacing {list(reader.GetSpacing())} is not positive and finite")
    img = reader.Execute()
    rank = img.GetDimension()
    arr = sitk.GetArrayFromImage(img)  # (z, y, x[, comp]) -> index order (x, y, z[, comp])
    if img.GetNumberOfComponentsPerPixel() == 1:
        arr = arr[..., None]
    arr = np.transpose(arr, tuple(reversed(range(rank))) + (rank,))
    affine = lps_affine_to_ras(np.array(img.GetDirection()), img.GetSpacing(), img.GetOrigin())
    return arr, affine, rank


def _read_numpy(path: Path, keys: Sequence[str], key: str | None, expected_dims: int | None):
    """-> (array ``(*S, C)``, affine, rank) from ``.npy`` / ``.npz`` (``affine`` entry, else identity)."""
    if file_suffix(path) == ".npy":
        arr, affine = np.load(path, allow_pickle=False), None
    else:
        with np.load(path, allow_pickle=False) as data:
            names = list(data.keys())
            if key is None:
                key = next((k for k in keys if k in names), None)
                if key is None:
                    arrays = [k for k in names if k != "affine"]
                    if len(arrays) != 1:
                        raise _fail(path, f"cannot tell which array is the image among {names}; pass key=")
                    key = arrays[0]
            if key not in names:
                raise _fail(path, f"no array named {key!r} (has {names})")
            arr = np.asarray(data[key])
            affine = np.asarray(data["affine"]) if "affine" in names else None
    if expected_dims is not None and arr.ndim == expected_dims + 1:
        arr = np.moveaxis(arr, 0, -1)  # channel-first array
        rank = expected_dims
    else:
        arr, rank = arr[..., None], arr.ndim
    return arr, _as_4x4(affine), rank


def _read_any(
    path: str | os.PathLike, dtype, keys: Sequence[str], key: str | None, expected_dims: int | None
):
    path = Path(path)
    if not path.exists():
        raise _fail(path, "file not found")
    if not path.is_file():
        raise _fail(path, "not a file")
    suffix = file_suffix(path)
    if suffix not in IMAGE_SUFFIXES:
        raise _fail(path, f"unsupported file type {suffix!r} (supported: {', '.join(IMAGE_SUFFIXES)})")
    try:
        if suffix in NIFTI_SUFFIXES:
            arr, affine, rank = _read_nifti(path, dtype)
        elif suffix in SITK_SUFFIXES:
            arr, affine, rank = _read_sitk(path)
        else:
            arr, affine, rank = _read_numpy(path, keys, key, expected_dims)
    except RegistrationInputError:
        raise
    except Exception as err:  # any reader failure is an unreadable / corrupt file for the user
        raise _fail(path, f"cannot read image ({type(err).__name__}: {err})") from err
    # a 3D file holding a single slice is a 2D image (unless 3D is explicitly expected)
    if rank == 3 and arr.shape[2] == 1 and expected_dims != 3:
        arr, rank = arr[:, :, 0], 2
        affine = affine.copy()
    if rank not in (2, 3):
        raise _fail(
            path, f"expected a 2D or 3D image, got {rank} spatial dimensions (shape {arr.shape[:-1]})"
        )
    if expected_dims is not None and rank != expected_dims:
        raise _fail(path, f"expected a {expected_dims}D image, got {rank}D (shape {tuple(arr.shape[:-1])})")
    check_spacing(affine, rank, path)
    return np.moveaxis(arr, -1, 0), affine, rank  # (C, *S)


#: voxel sizes outside (MIN_SPACING, MAX_SPACING) mm are rejected: no scanner makes them, and a header that
#: says so is broken (a flip belongs in the direction matrix, not in a negative spacing)
MIN_SPACING, MAX_SPACING = 1e-6, 1e6
#: a "label map" with more distinct labels than this is an image stored as integers
MAX_LABELS = 1000


def check_spacing(affine: np.ndarray | torch.Tensor, spatial_dims: int, name: Any) -> None:
    """``RegistrationInputError`` unless every voxel size (column norm of ``affine``) is finite and in
    (``MIN_SPACING``, ``MAX_SPACING``) mm."""
    matrix = np.asarray(affine, dtype=np.float64)[:spatial_dims, :spatial_dims]
    spacing = np.linalg.norm(matrix, axis=0)
    if not np.isfinite(matrix).all() or not ((spacing > MIN_SPACING) & (spacing < MAX_SPACING)).all():
        shown = [float(f"{s:.4g}") for s in spacing]
        raise _fail(name, f"voxel spacing {shown} mm is not usable (finite, positive, below {MAX_SPACING:g})")
    if abs(np.linalg.det(matrix)) < 1e-12 * float(np.prod(spacing)):
        raise _fail(name, "the image's axes are degenerate (singular direction matrix)")


def check_label_count(label: np.ndarray | torch.Tensor, name: Any) -> None:
    """``RegistrationInputError`` when ``label`` holds more than ``MAX_LABELS`` distinct non-zero values."""
    arr = (label.detach().cpu().numpy() if isinstance(label, torch.Tensor) else np.asarray(label)).ravel()
    if arr.size == 0:
        return
    if np.issubdtype(arr.dtype, np.integer) and arr.min() >= 0 and arr.max() < 10**7:
        count = int(np.count_nonzero(np.bincount(arr.astype(np.int64))[1:]))  # faster than sorting
    else:
        count = int(np.count_nonzero(np.unique(arr)))
    if count > MAX_LABELS:
        raise _fail(name, f"label map has {count} distinct labels (over {MAX_LABELS}); is this an image?")


def _check_finite(path, arr: np.ndarray) -> None:
    if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
        n_nan, n_inf = int(np.isnan(arr).sum()), int(np.isinf(arr).sum())
        raise _fail(path, f"image holds non-finite intensities ({n_nan} NaN, {n_inf} inf)")


def _meta_tensor(arr: np.ndarray, affine: np.ndarray, path, dtype: torch.dtype) -> MetaTensor:
    data = torch.as_tensor(np.ascontiguousarray(arr)).to(dtype)
    meta = {"filename_or_obj": str(path), "space": "RAS", "original_affine": affine.copy()}
    return MetaTensor(data, affine=torch.as_tensor(affine, dtype=torch.float64), meta=meta)


def load_image(
    path: str | os.PathLike,
    expected_dims: int | None = None,
    *,
    key: str | None = None,
    dtype: torch.dtype = torch.float32,
) -> MetaTensor:
    """Load an image as a channel-first ``MetaTensor`` ``(C, *S)`` with its 4x4 RAS affine.

    ``expected_dims``: 2 or 3 to insist on a dimensionality. ``key``: array name inside an ``.npz``.
    Raises ``RegistrationInputError`` for a missing/unreadable file, wrong dimensionality or NaN/inf values.
    """
    arr, affine, _ = _read_any(path, np.float32, _IMAGE_KEYS, key, expected_dims)
    arr = arr.astype(np.float32) if not np.issubdtype(arr.dtype, np.floating) else arr
    _check_finite(path, arr)
    return _meta_tensor(arr, affine, path, dtype)


def load_label(
    path: str | os.PathLike, expected_dims: int | None = None, *, key: str | None = None
) -> MetaTensor:
    """Load an integer label map as an int64 ``MetaTensor`` ``(C, *S)`` (C = 1 for an ordinary label map).

    Raises ``RegistrationInputError`` as :func:`load_image`, and when the values are not integers.
    """
    arr, affine, _ = _read_any(path, None, _LABEL_KEYS, key, expected_dims)
    if arr.dtype == bool:
        arr = arr.astype(np.uint8)
    if np.issubdtype(arr.dtype, np.floating):
        _check_finite(path, arr)
        off = np.abs(arr - np.round(arr))
        if (off > 1e-3).any():
            bad = arr.flat[int(np.argmax(off))]
            raise _fail(
                path,
                f"label map is not integer-valued (e.g. value {bad:g}); is this an image, not a label map?",
            )
        arr = np.round(arr)
    elif not np.issubdtype(arr.dtype, np.integer):
        raise _fail(path, f"label map has non-numeric type {arr.dtype}")
    check_label_count(arr, path)
    return _meta_tensor(arr.astype(np.int64), affine, path, torch.int64)


def spatial_dims_of(image: torch.Tensor) -> int:
    """Spatial rank of a channel-first ``(C, *S)`` image."""
    return image.ndim - 1


def _name_of(image: torch.Tensor, fallback: str) -> str:
    if isinstance(image, MetaTensor):
        name = image.meta.get("filename_or_obj")
        if name:
            return str(name)
    return fallback


def check_pair(
    fixed: torch.Tensor,
    moving: torch.Tensor,
    fixed_name: str | None = None,
    moving_name: str | None = None,
    single_channel: bool = True,
) -> int:
    """Check that channel-first ``fixed`` ``(C, *S)`` and ``moving`` have the same spatial rank (and, with
    ``single_channel``, one channel each: a 4D file is read with its 4th axis as channels); return it."""
    fixed_name = fixed_name or _name_of(fixed, "fixed image")
    moving_name = moving_name or _name_of(moving, "moving image")
    nf, nm = spatial_dims_of(fixed), spatial_dims_of(moving)
    for name, n in ((fixed_name, nf), (moving_name, nm)):
        if n not in (2, 3):
            raise RegistrationInputError(f"{name}: expected a 2D or 3D image, got {n} spatial dimensions")
    if nf != nm:
        raise RegistrationInputError(
            f"{moving_name}: moving image is {nm}D but the fixed image {fixed_name} is {nf}D; "
            "fixed and moving must have the same dimensionality"
        )
    for name, image in ((fixed_name, fixed), (moving_name, moving)) if single_channel else ():
        if image.shape[0] != 1:
            raise RegistrationInputError(
                f"{name}: {image.shape[0]} channels (a 4D or vector image?); registration takes "
                "single-channel 2D or 3D images"
            )
    return nf


def _parse_rows(path: Path) -> list[list[float]]:
    rows: list[list[float]] = []
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise _fail(path, f"cannot read landmark file ({err})") from err
    first = True
    for lineno, line in enumerate(lines, 1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        fields = [f for f in text.replace(";", ",").replace("\t", ",").replace(" ", ",").split(",") if f]
        try:
            rows.append([float(f) for f in fields])
        except ValueError:
            if first:  # header row
                first = False
                continue
            raise _fail(path, f"line {lineno}: not a row of numbers: {text!r}") from None
        first = False
    return rows


def load_landmarks(
    path: str | os.PathLike, image: torch.Tensor | None = None, *, units: str = "mm", tolerance: float = 0.5
) -> np.ndarray:
    """Read a landmark CSV (a point per row, ``x,y[,z]``, optional header) -> LPS points ``(K, N)`` in mm.

    ``units="voxel"`` reads voxel indices (the Learn2Reg ``keypoints*`` convention) and converts them with
    the ``image`` affine. With ``image`` (a loaded ``MetaTensor``), points outside the image (beyond half a
    voxel plus ``tolerance`` voxels) and a dimensionality mismatch raise ``RegistrationInputError``.
    """
    path = Path(path)
    if not path.is_file():
        raise _fail(path, "landmark file not found")
    if units not in ("mm", "voxel"):
        raise ValueError(f"units must be 'mm' or 'voxel', got {units!r}")
    rows = _parse_rows(path)
    if not rows:
        raise _fail(path, "landmark file holds no points")
    widths = {len(r) for r in rows}
    if len(widths) != 1 or next(iter(widths)) not in (2, 3):
        raise _fail(
            path, f"each row must hold 2 or 3 coordinates (x,y[,z]); found row lengths {sorted(widths)}"
        )
    pts = np.asarray(rows, dtype=np.float64)
    if not np.isfinite(pts).all():
        raise _fail(path, "landmark coordinates hold NaN/inf")
    if image is None:
        if units == "voxel":
            raise ValueError("units='voxel' needs the image to convert voxel indices to physical points")
        return pts
    n = spatial_dims_of(image)
    if pts.shape[1] != n:
        raise _fail(path, f"landmarks have {pts.shape[1]} coordinates but the image is {n}D")
    vox = pts if units == "voxel" else lps_to_voxel(pts, image)
    size = np.asarray(image.shape[1:], dtype=np.float64)
    outside = ((vox < -0.5 - tolerance) | (vox > size - 0.5 + tolerance)).any(axis=1)
    if outside.any():
        i = int(np.argmax(outside))
        raise _fail(
            path,
            f"{int(outside.sum())} landmark(s) lie outside the image {_name_of(image, '')} "
            f"(row {i + 1}: {pts[i].tolist()} -> voxel {np.round(vox[i], 2).tolist()}, image size "
            f"{size.astype(int).tolist()}); are they in LPS mm (ITK physical space)?",
        )
    return voxel_to_lps(vox, image) if units == "voxel" else pts


def save_landmarks(
    points: np.ndarray | torch.Tensor, path: str | os.PathLike, overwrite: bool = False
) -> Path:
    """Write points ``(K, N)`` as a CSV with an ``x,y[,z]`` header (via a temporary name, then renamed)."""
    pts = np.asarray(points, dtype=np.float64)
    header = ",".join("xyz"[: pts.shape[1]])
    text = header + "\n" + "".join(",".join(f"{v:.6f}" for v in row) + "\n" for row in pts)
    return atomic_write(Path(path), lambda tmp: tmp.write_text(text), overwrite)


_EXISTS = "output file exists; pass --overwrite (overwrite=True) to replace it"


def atomic_write(
    path: str | os.PathLike, write, overwrite: bool = False, protected: Iterable[str | os.PathLike] = ()
) -> Path:
    """Write through ``write(tmp_path)`` into a temporary file beside ``path``, then rename onto ``path``.

    Refuses (``RegistrationInputError``) an existing ``path`` unless ``overwrite``, and always one of
    ``protected`` (input files).
    """
    path = Path(path)
    target = path.resolve()
    for p in protected:
        if isinstance(p, str | os.PathLike) and str(p) and Path(p).resolve() == target:
            raise _fail(path, "refusing to overwrite an input file; choose another output path")
    if path.exists() and not overwrite:
        raise _fail(path, _EXISTS)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = file_suffix(path)
    tmp = path.with_name(
        f".{path.name[: -len(suffix)] if suffix else path.name}.{uuid.uuid4().hex}.tmp{suffix}"
    )
    try:
        write(tmp)
        if overwrite:
            os.replace(tmp, path)
        else:
            try:  # link refuses to replace: no race with a concurrent writer
                os.link(tmp, path)
            except FileExistsError:
                raise _fail(path, _EXISTS) from None
            except OSError:  # file system without hard links
                os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _write_sitk(arr: np.ndarray, affine: np.ndarray, vector: bool, path: Path) -> None:
    """Array ``(*S)`` or ``(*S, C)`` (``vector``), index order -> an ITK file (MHA, NRRD) via SimpleITK."""
    import SimpleITK as sitk

    rank = arr.ndim - 1 if vector else arr.ndim
    # SimpleITK arrays are indexed (z, y, x): reverse the spatial axes, components last
    order = tuple(range(rank - 1, -1, -1)) + ((rank,) if vector else ())
    image = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(arr, order)), isVector=vector)
    origin, spacing, direction = itk_geometry(affine, rank)
    image.SetOrigin(origin)
    image.SetSpacing(spacing)
    image.SetDirection(direction)
    sitk.WriteImage(image, str(path), useCompression=True)


def save_image(
    data: np.ndarray | torch.Tensor,
    path: str | os.PathLike,
    affine: np.ndarray | torch.Tensor | None = None,
    overwrite: bool = False,
    *,
    channel_first: bool = True,
    protect: Iterable[str | os.PathLike] = (),
) -> Path:
    """Write a channel-first ``(C, *S)`` image (or ``(*S)`` with ``channel_first=False``) in the format its
    extension names (:data:`WRITE_SUFFIXES`): NIfTI through nibabel, MHA/MHD/NRRD through ITK's writers.

    ``affine``: 4x4 (or 2D 3x3) RAS affine; defaults to the ``MetaTensor``'s own, else identity; ITK formats
    get the same geometry in LPS. Several channels are stored last in NIfTI (``(*S, C)``; 2D as
    ``(H, W, 1, C)``) as in Learn2Reg displacement files, and as a vector image in ITK formats. The file is
    written to a temporary name and renamed; an existing file is replaced only with ``overwrite=True``, and
    never when it is the data's own source file or one of ``protect``.
    """
    path = Path(path)
    suffix = file_suffix(path)
    if suffix not in WRITE_SUFFIXES:
        raise _fail(path, f"cannot write {suffix or 'a file without extension'}; use one of "
                    f"{', '.join(WRITE_SUFFIXES)}")
    protected = list(protect)
    if isinstance(data, MetaTensor):
        source = data.meta.get("filename_or_obj", "")
        protected.extend(source if isinstance(source, list | tuple) else [source])  # batched: a list
        if affine is None:
            affine = data.affine
    aff = _as_4x4(affine)
    arr = data.detach().cpu().numpy() if isinstance(data, torch.Tensor) else np.asarray(data)
    rank = None
    if channel_first:
        if arr.ndim not in (3, 4):
            raise ValueError(
                f"expected a channel-first (C, *S) array with 2 or 3 spatial dims, got shape {arr.shape}"
            )
        rank = arr.ndim - 1
        if arr.shape[0] == 1:
            arr = arr[0]
        else:
            arr = np.moveaxis(arr, 0, -1)
            if rank == 2:
                arr = arr[:, :, None, :]
    if arr.dtype == bool:
        arr = arr.astype(np.uint8)
    elif arr.dtype == np.float64:
        arr = arr.astype(np.float32)
    elif arr.dtype == np.int64 and arr.size and np.abs(arr).max() < 2**31:
        arr = arr.astype(np.int32)

    def write(tmp: Path) -> None:
        import nibabel as nib

        img = nib.Nifti1Image(np.ascontiguousarray(arr), aff)
        img.set_qform(aff, code=1)
        img.set_sform(aff, code=1)
        nib.save(img, str(tmp))

    if suffix not in NIFTI_SUFFIXES:
        vector = channel_first and rank is not None and arr.ndim > rank
        if vector and rank == 2:
            arr = arr[:, :, 0, :]  # NIfTI's placeholder axis
        return atomic_write(path, lambda tmp: _write_sitk(arr, aff, vector, tmp), overwrite, protected)

    return atomic_write(path, write, overwrite, protected)


def json_ready(value):
    """``value`` as strict-JSON-ready Python: mapping keys as strings, tuples and arrays as lists, numpy /
    torch scalars as numbers, non-finite floats as None (JSON has no NaN); other objects are kept."""
    if isinstance(value, dict):
        return {str(k): json_ready(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_ready(v) for v in value]
    if isinstance(value, np.ndarray):
        return json_ready(value.tolist())
    if isinstance(value, str):
        return str(value)  # plain str (e.g. torch.__version__ is a subclass)
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def metrics_to_json(metrics: dict) -> str:
    """Metrics as strict JSON text (:func:`json_ready`), indented."""
    return json.dumps(json_ready(metrics), indent=2, allow_nan=False)
