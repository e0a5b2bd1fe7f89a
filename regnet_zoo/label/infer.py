"""MONAI Label infer task: register a datastore image pair with one bundle.

Request (``POST /infer/<model>?image=<fixed id>`` with form field ``params``)::

    {"moving": "<moving image id>", "result": "warped" | "warped_label" | "ddf", "instance_opt": 0,
     "device": "cpu", "affine": "affine" | "rigid" | "none"}

- ``warped`` (default): the moving image warped onto the fixed grid (linear), NIfTI;
- ``warped_label``: the moving image's datastore label (tag ``final``, else ``original``) warped with
  nearest neighbour, NIfTI (int32);
- ``ddf``: the displacement field in mm along ITK's LPS axes on the fixed grid, a MetaImage (``.mha``)
  vector image; ITK / SimpleITK / 3D Slicer read it as a displacement-field transform (fixed -> moving
  points, so it resamples the moving image onto the fixed one).

One registration per pair serves every result type: results are kept in a bounded LRU
(:class:`~regnet_zoo.label.cache.ResultCache`, ``cache_mb`` of the app config) keyed by model, pair and
options and invalidated when the fixed or moving image, the moving label or the weights file changes.
Responses name files by their base name only (never a server path).

``instance_opt``: Adam steps of test-time optimisation of the network's transform on this pair (bundle loss).
``affine``: the pre-alignment stage of :func:`regnet_zoo.api.register` (default ``"affine"``, ``"none"``:
off); the outputs hold the whole transform. Preprocessing is register's (``regnet_zoo.data.preprocess``).
Every output carries the fixed image's geometry. Bad requests raise ``fastapi.HTTPException`` with a 4xx
status (MONAI Label turns any other exception into a 500): 400 bad ``params``, 404 unknown image / label,
409 model without trained weights, 422 images that cannot be registered (2D/3D mismatch, unreadable file).
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import SimpleITK as sitk
import torch
from fastapi import HTTPException
from monailabel.interfaces.datastore import Datastore, DefaultLabelTag
from monailabel.interfaces.tasks.infer_v2 import InferTask, InferType

from regnet_zoo import bundle_dir
from regnet_zoo.errors import RegistrationInputError
from regnet_zoo.label.cache import ResultCache, file_stamp
from regnet_zoo.label.config import LabelAppConfig

__all__ = ["RESULT_TYPES", "RegistrationInferTask", "image_shape", "image_spatial_dims", "label_uri"]

logger = logging.getLogger(__name__)

#: ``params.result`` values and the file suffix of each
RESULT_TYPES = {"warped": ".nii.gz", "warped_label": ".nii.gz", "ddf": ".mha"}
#: upper bound of ``params.instance_opt`` (keeps one request from occupying the server for long)
MAX_INSTANCE_OPT = 500


def image_shape(path: str | os.PathLike) -> tuple[int, ...]:
    """Spatial shape of an image file from its header (NIfTI via nibabel, else SimpleITK), in array-axis
    order; a single-slice 3D file is 2D (as :func:`regnet_zoo.data.io.load_image` reads it). 422: unreadable.
    """
    path = Path(path)
    try:
        if path.name.lower().endswith((".nii", ".nii.gz")):
            import nibabel as nib

            shape = tuple(int(n) for n in nib.load(str(path)).shape[:3])
        else:
            reader = sitk.ImageFileReader()
            reader.SetFileName(str(path))
            reader.ReadImageInformation()
            shape = tuple(int(n) for n in reader.GetSize())
    except Exception as err:  # an unreadable header is a client error about that file
        raise HTTPException(status_code=422, detail=f"{path.name}: cannot read image header ({err})") from err
    return shape[:2] if len(shape) == 3 and shape[2] == 1 else shape


def image_spatial_dims(path: str | os.PathLike) -> int:
    """Spatial rank (2 or 3) of an image file, from its header."""
    return len(image_shape(path))


def label_uri(datastore: Datastore, image_id: str) -> str:
    """Path of the datastore label of ``image_id`` (tag ``final``, else ``original``); ``""`` if none."""
    for tag in (DefaultLabelTag.FINAL, DefaultLabelTag.ORIGINAL):
        tag = tag.value if hasattr(tag, "value") else str(tag)
        label_id = datastore.get_label_by_image_id(image_id, tag)
        if label_id:
            uri = datastore.get_label_uri(label_id, tag)
            if uri and os.path.isfile(uri):
                return uri
    return ""


class RegistrationInferTask(InferTask):
    """One bundle served as a registration model (see the module docstring for the request)."""

    def __init__(
        self,
        method: str,
        config: LabelAppConfig,
        datastore: Callable[[], Datastore],
        description: str = "",
    ):
        super().__init__(
            type=InferType.OTHERS,
            labels=None,
            dimension=3,  # what MONAI Label clients (3D Slicer) expect; 2D pairs are served as well
            description=description or f"{method}: deformable registration (regnet_zoo bundle)",
            config={"moving": "", "result": "warped", "instance_opt": 0, "device": config.device},
        )
        self.method = method
        self.app_config = config
        self._datastore = datastore
        self.cache = ResultCache(max_bytes=int(config.cache_mb * 2**20), max_entries=config.cache_entries)

    # MONAI Label lists a model in /info/ when its task is valid: here, when its bundle exists
    def is_valid(self) -> bool:
        try:
            return (bundle_dir(self.method) / "train.yaml").is_file()
        except (FileNotFoundError, ValueError):
            return False

    def info(self) -> dict[str, Any]:
        out = super().info()
        out["weights"] = self.app_config.weights_of(self.method).name  # no server paths to clients
        out["trained"] = self.app_config.weights_of(self.method).is_file()
        out["results"] = list(RESULT_TYPES)
        return out

    def get_path(self, validate: bool = True) -> str | None:
        path = self.app_config.weights_of(self.method)
        return str(path) if path.is_file() or not validate else None

    def _moving_paths(self, request: dict, need_label: bool) -> tuple[str, str, str | None]:
        """(moving id, moving image path, moving label path or None) from the request; 4xx when invalid."""
        moving_id = request.get("moving")
        if not moving_id or not isinstance(moving_id, str):
            raise HTTPException(
                status_code=400, detail="params.moving is required: the datastore id of the moving image"
            )
        datastore = self._datastore()
        moving_path = datastore.get_image_uri(moving_id)
        if not moving_path or not os.path.isfile(moving_path):
            raise HTTPException(
                status_code=404, detail=f"moving image {moving_id!r} not found in the datastore"
            )
        label_path = label_uri(datastore, moving_id) or None  # always: one registration serves all results
        if need_label:
            if not label_path:
                raise HTTPException(
                    status_code=404,
                    detail=f"moving image {moving_id!r} has no label in the datastore (for warped_label)",
                )
        return moving_id, moving_path, label_path

    def __call__(self, request: dict) -> tuple[str, dict]:
        from regnet_zoo.api import register

        result_type = request.get("result") or "warped"
        if result_type not in RESULT_TYPES:
            raise HTTPException(
                status_code=400,
                detail=f"params.result must be one of {', '.join(RESULT_TYPES)}, got {result_type!r}",
            )
        fixed_path = request.get("image")
        if not fixed_path or not os.path.isfile(str(fixed_path)):
            raise HTTPException(status_code=404, detail=f"fixed image {request.get('image')!r} not found")
        moving_id, moving_path, moving_label = self._moving_paths(request, result_type == "warped_label")
        fixed_dims, moving_dims = image_spatial_dims(fixed_path), image_spatial_dims(moving_path)
        if fixed_dims != moving_dims:
            raise HTTPException(
                status_code=422,
                detail=f"moving image {moving_id!r} is {moving_dims}D but the fixed image is {fixed_dims}D; "
                "fixed and moving must have the same dimensionality",
            )
        weights = self.app_config.weights_of(self.method, fixed_dims)
        if not weights.is_file():
            raise HTTPException(
                status_code=409,
                detail=f"model {self.method!r} has no trained weights ({weights.name} not found); train it "
                f"first (POST /train/{self.method} or `regnet-zoo train {self.method}`) or pass --weights",
            )
        instance_opt = request.get("instance_opt") or 0
        if (
            isinstance(instance_opt, bool)
            or not isinstance(instance_opt, int)
            or not 0 <= instance_opt <= MAX_INSTANCE_OPT
        ):
            raise HTTPException(
                status_code=400,
                detail=f"params.instance_opt must be an integer number of steps in 0..{MAX_INSTANCE_OPT}, "
                f"got {instance_opt!r}",
            )
        affine = request.get("affine") or "affine"
        if affine not in ("affine", "rigid", "none"):
            raise HTTPException(
                status_code=400, detail=f"params.affine must be 'affine', 'rigid' or 'none', got {affine!r}"
            )
        device = str(request.get("device") or self.app_config.device)
        if isinstance(request.get("device"), list | tuple) and request["device"]:  # clients may send a list
            device = str(request["device"][0])
        try:
            torch.device(device)
        except (RuntimeError, ValueError) as err:
            raise HTTPException(
                status_code=400, detail=f"params.device {device!r} is not a torch device"
            ) from err
        key = (str(fixed_path), moving_path, instance_opt, device, affine)
        try:
            stamp = tuple(file_stamp(p) for p in (fixed_path, moving_path, moving_label, weights))
            result = self.cache.get_or_compute(
                key,
                stamp,
                lambda: register(
                    str(fixed_path),
                    moving_path,
                    method=self.method,
                    moving_label=moving_label,
                    weights=weights,
                    device=device,
                    instance_opt=instance_opt,
                    affine=None if affine == "none" else affine,
                ),
            )
        except RegistrationInputError as err:
            raise HTTPException(status_code=422, detail=str(err)) from err
        except FileNotFoundError as err:
            if weights.is_file():  # a server-side problem (e.g. a bundle file): stays a 500
                raise
            raise HTTPException(status_code=409, detail=f"model {self.method!r}: weights not found") from err
        out = self._write(result, result_type)
        params = {
            "model": self.method,
            "moving": moving_id,
            "result": result_type,
            "weights": weights.name,
            "instance_opt": instance_opt,
            "affine": affine,
            "shape": list(result.ddf_voxel.shape[1:]),
            "metrics": _json_metrics(result.metrics),
        }
        logger.info(f"registered {moving_id} -> {fixed_path} with {self.method}: {out}")
        return out, params

    @staticmethod
    def _write(result: Any, result_type: str) -> str:
        """Write the requested output to a temporary file (MONAI Label deletes it once sent)."""
        from regnet_zoo.data.io import save_image

        fd, name = tempfile.mkstemp(prefix=f"regnet_zoo_{result_type}_", suffix=RESULT_TYPES[result_type])
        os.close(fd)
        os.unlink(name)  # the writers refuse to replace an existing file
        affine = result.warped.affine  # the fixed image's
        if result_type == "warped":
            save_image(result.warped, name, affine=affine)
        elif result_type == "warped_label":
            if result.warped_label is None:  # the label was removed since: nothing to warp
                raise HTTPException(status_code=404, detail="the moving image has no label (warped_label)")
            save_image(result.warped_label.as_tensor().to(torch.int32), name, affine=affine)
        else:
            sitk.WriteImage(result.ddf_itk, name)
        return name


def _json_metrics(metrics: dict) -> dict[str, float | None]:
    """Scalar metrics as strict-JSON numbers (``data.io.json_ready``); per-label dicts are dropped."""
    from regnet_zoo.data.io import json_ready

    out: dict[str, float | None] = {}
    for key, value in json_ready(metrics).items():
        if value is None or isinstance(value, int | float) and not isinstance(value, bool):
            out[key] = None if value is None else float(value)
    return out
