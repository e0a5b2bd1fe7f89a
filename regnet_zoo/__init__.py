"""regnet_zoo: five deep image-registration methods as comparable MONAI bundles sharing one core."""

from __future__ import annotations

from pathlib import Path

__version__ = "0.1.0"

METHODS = ("pwc", "regnet", "ddrnet", "bspline_unet", "discrete_corr")


def project_root() -> Path:
    """The folder holding ``bundles/`` (the source checkout)."""
    return Path(__file__).resolve().parent.parent


def bundle_dir(name: str) -> Path:
    """Path of the bundle folder for method ``name`` (used as ``bundle_root`` in the bundle configs)."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}")
    path = project_root() / "bundles" / name
    if not path.is_dir():
        raise FileNotFoundError(
            f"bundle folder {path} not found (is regnet_zoo installed from its source checkout?)"
        )
    return path


def __getattr__(name: str):
    # the Python API is imported lazily so that `import regnet_zoo` stays light
    if name in ("register", "load_method", "RegistrationResult"):
        from regnet_zoo import api

        return getattr(api, name)
    raise AttributeError(f"module 'regnet_zoo' has no attribute {name!r}")
