"""MONAI Label deployment: every regnet_zoo bundle served as a registration model (``regnet-zoo serve``).

- :mod:`regnet_zoo.label.app`: the ``MONAILabelApp`` (app folder :data:`APP_DIR`, entry ``main.py``);
- :mod:`regnet_zoo.label.infer` / :mod:`regnet_zoo.label.train`: the infer and train tasks;
- :mod:`regnet_zoo.label.serve`: the ``serve`` subcommand (runs the MONAI Label server);
- :mod:`regnet_zoo.label.config`: the app's ``conf`` keys.

MONAI Label itself is optional (the ``label`` extra): nothing here imports it at package import time.
"""

from pathlib import Path

#: the MONAI Label app folder (holds ``main.py``)
APP_DIR = Path(__file__).resolve().parent

__all__ = ["APP_DIR"]
