"""MONAI Label entry point: MONAI Label imports ``main.py`` of the app folder and runs its app class."""

from regnet_zoo.label.app import RegNetZooApp

__all__ = ["RegNetZooApp"]
