"""MONAI Label train task: run a bundle's ``train.yaml`` on the datastore's images.

``POST /train/<model>`` with a JSON body of optional params::

    {"epochs": 10, "device": "cpu", "spatial_dims": 3, "overrides": {"network_def#overlap": 4}}

The datastore images of one dimensionality (``spatial_dims``, default: that of most images) become a
Learn2Reg-layout dataset (``dataset.json`` referencing the datastore files by absolute path, with their
``final`` labels when every image has one; every ordered pair of distinct images trains, the first pair
validates; images of different shapes are resized to the most common one unless ``image_size`` is given).
The bundle runs with ``bundle_root = <work_dir>/<model>``, so the weights land in
``<work_dir>/<model>/models/model.pt``, which the app's infer task then uses (unless ``weights`` names a
file for that model). MONAI Label runs training in a background process; ``GET /train/`` shows its status.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import Counter
from pathlib import Path
from typing import Any

from fastapi import HTTPException
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.train import TrainTask

from regnet_zoo.label.config import LabelAppConfig
from regnet_zoo.label.infer import image_shape, label_uri

__all__ = ["RegistrationTrainTask", "write_datastore_dataset"]

logger = logging.getLogger(__name__)


def write_datastore_dataset(
    datastore: Datastore, folder: str | os.PathLike, spatial_dims: int | None = None
) -> tuple[Path, int, list[tuple[int, ...]]]:
    """Write ``folder/dataset.json`` (Learn2Reg layout) listing the datastore's images of one dimensionality.

    Returns (JSON path, spatial_dims, the images' spatial shapes). ``ValueError`` with fewer than two images.
    """
    images = []
    for image_id in datastore.list_images():
        path = datastore.get_image_uri(image_id)
        if path and os.path.isfile(path):
            images.append((image_id, path, image_shape(path)))
    if spatial_dims is None and images:
        spatial_dims = Counter(len(s) for _, _, s in images).most_common(1)[0][0]
    chosen = [(i, p, s) for i, p, s in images if len(s) == spatial_dims]
    if len(chosen) < 2:
        raise ValueError(
            f"training needs at least two {spatial_dims or ''}D images in the datastore, found {len(chosen)}"
        )
    training = []
    for image_id, path, _ in sorted(chosen):
        entry = {"image": path}
        label = label_uri(datastore, image_id)
        if label:
            entry["label"] = label
        training.append(entry)
    # labels only where every subject has one: a batch mixing labelled and unlabelled pairs cannot collate
    if not all("label" in e for e in training):
        training = [{"image": e["image"]} for e in training]
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    info = {
        "name": "monailabel_datastore",
        "description": "images of a MONAI Label datastore (written by regnet_zoo.label)",
        "tensorImageSize": f"{spatial_dims}D",
        "training": training,
        "registration_val": [{"fixed": training[0]["image"], "moving": training[1]["image"]}],
    }
    path = folder / "dataset.json"
    path.write_text(json.dumps(info, indent=2))
    return path, int(spatial_dims), [s for _, _, s in sorted(chosen)]


class RegistrationTrainTask(TrainTask):
    """Trains one bundle on the datastore (see the module docstring for the request)."""

    def __init__(self, method: str, config: LabelAppConfig, description: str = ""):
        super().__init__(description or f"train {method} (bundle train.yaml) on the datastore images")
        self.method = method
        self.app_config = config

    def config(self) -> dict[str, Any]:
        return {"epochs": None, "device": self.app_config.device, "spatial_dims": None, "overrides": {}}

    def stats(self) -> dict[str, Any]:
        weights = self.app_config.trained_weights(self.method)
        if not weights.is_file():
            return {}
        return {"weights": weights.name, "modified": int(weights.stat().st_mtime)}

    def __call__(self, request: dict, datastore: Datastore) -> dict[str, Any]:
        from regnet_zoo.bundle import run_bundle

        bundle_root = self.app_config.trained_weights(self.method).parent.parent
        dims = request.get("spatial_dims")
        try:
            dataset_json, spatial_dims, shapes = write_datastore_dataset(
                datastore, bundle_root / "dataset", int(dims) if dims else None
            )
        except ValueError as err:  # too few images: a client error when training runs synchronously
            raise HTTPException(status_code=422, detail=str(err)) from err
        count = len(shapes)
        overrides: dict[str, Any] = dict(request.get("overrides") or {})
        if len(set(shapes)) > 1 and "image_size" not in overrides:
            # pairs of different grids cannot share a batch: resize all to the most common shape
            overrides["image_size"] = list(Counter(shapes).most_common(1)[0][0])
        overrides.update(
            dataset_dir=str(dataset_json.parent),
            spatial_dims=spatial_dims,
            bundle_root=str(bundle_root),
            device=str(request.get("device") or self.app_config.device),
        )
        if request.get("epochs"):
            overrides["epochs"] = int(request["epochs"])
        # a new training request replaces the app's model, but never silently: the previous weights are kept
        # beside it as model_<mtime>.pt and named in the response
        weights = self.app_config.trained_weights(self.method)
        previous = None
        if weights.is_file():
            previous = weights.with_name(f"model_{weights.stat().st_mtime_ns}.pt")
            os.replace(weights, previous)
            logger.info(f"kept the previous {self.method} weights as {previous}")
        logger.info(f"training {self.method} on {count} datastore images: {overrides}")
        start = time.perf_counter()
        try:
            run_bundle(self.method, "train", **overrides)
        except BaseException:
            if previous is not None and not weights.exists():
                os.replace(previous, weights)  # a failed run leaves the old model in place
            raise
        if not weights.is_file():
            raise RuntimeError(f"training {self.method} finished without writing {weights}")
        return {
            "model": self.method,
            "images": count,
            "spatial_dims": spatial_dims,
            "weights": str(weights.relative_to(self.app_config.work_dir)),  # no server paths to clients
            "previous_weights": previous.name if previous is not None else None,
            "seconds": round(time.perf_counter() - start, 1),
        }
