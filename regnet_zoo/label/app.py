"""The MONAI Label app: every regnet_zoo bundle as a registration model, plus a training task per bundle.

MONAI Label loads an app from a folder holding ``main.py`` with a ``MONAILabelApp`` subclass; that folder is
``regnet_zoo/label/`` (:data:`regnet_zoo.label.APP_DIR`), whose ``main.py`` imports :class:`RegNetZooApp`.
Start it with ``regnet-zoo serve --studies DIR`` (or ``monailabel start_server --app APP_DIR --studies DIR``).
``conf`` keys: see :mod:`regnet_zoo.label.config`.
"""

from __future__ import annotations

import logging

from monailabel.config import settings
from monailabel.datastore.local import LocalDatastore
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.datastore import Datastore

from regnet_zoo import __version__
from regnet_zoo.label.config import LabelAppConfig
from regnet_zoo.label.infer import RegistrationInferTask
from regnet_zoo.label.train import RegistrationTrainTask

__all__ = ["RegNetZooApp", "EXTRA_IMAGE_PATTERNS"]

logger = logging.getLogger(__name__)

#: file patterns the datastore accepts beyond MONAI Label's defaults (NIfTI, NRRD, PNG, JPEG, TIFF)
EXTRA_IMAGE_PATTERNS = ("*.mha",)


class RegNetZooApp(MONAILabelApp):
    """MONAI Label app serving the bundles named in ``conf["models"]`` (default: every packaged bundle)."""

    def __init__(self, app_dir: str, studies: str, conf: dict[str, str]):
        self.app_config = LabelAppConfig.from_conf(studies, conf)
        weights = {m: str(self.app_config.weights_of(m)) for m in self.app_config.models}
        logger.info(f"regnet_zoo models: {', '.join(self.app_config.models) or 'none'}; weights: {weights}")
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name="regnet_zoo",
            description="Deformable image registration with the regnet_zoo bundles "
            "(fixed = image, moving = params.moving)",
            version=__version__,
            labels=[],
        )

    def init_datastore(self) -> Datastore:
        if self.studies.startswith(("http://", "https://")):
            return super().init_datastore()
        patterns = list(dict.fromkeys([*settings.MONAI_LABEL_DATASTORE_FILE_EXT, *EXTRA_IMAGE_PATTERNS]))
        return LocalDatastore(
            self.studies,
            extensions=patterns,
            auto_reload=settings.MONAI_LABEL_DATASTORE_AUTO_RELOAD,
            read_only=settings.MONAI_LABEL_DATASTORE_READ_ONLY,
        )

    def init_infers(self) -> dict[str, RegistrationInferTask]:
        return {m: RegistrationInferTask(m, self.app_config, self.datastore) for m in self.app_config.models}

    def init_trainers(self) -> dict[str, RegistrationTrainTask]:
        return {m: RegistrationTrainTask(m, self.app_config) for m in self.app_config.models}

    def init_scoring_methods(self) -> dict:
        return {}  # MONAI Label's scoring methods score segmentations
