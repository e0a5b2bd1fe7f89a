"""regnet_zoo: five deep image-registration methods as comparable MONAI bundles sharing one core."""

from __future__ import annotations

import os
from pathlib import Path

__version__ = "0.1.0"

METHODS = ("pwc", "regnet", "ddrnet", "bspline_unet", "discrete_corr")


def project_root() -> Path:
    """The folder holding ``bundles/`` in a source checkout (the parent of the package folder)."""
    return Path(__file__).resolve().parent.parent


def _packaged_bundles() -> Path:
    """Where an installed (non-editable) package keeps its bundles (``regnet_zoo/bundles/``)."""
    return Path(__file__).resolve().parent / "bundles"


def _check_name(name: str) -> None:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}")


def bundle_dir(name: str) -> Path:
    """The folder of method ``name``'s bundle (its ``configs/``): packaged with the installed package, else
    ``bundles/<name>`` of the source checkout. Read it; outputs go to :func:`bundle_home`."""
    _check_name(name)
    for path in (_packaged_bundles() / name, project_root() / "bundles" / name):
        if (path / "configs").is_dir():
            return path
    raise FileNotFoundError(
        f"bundle {name!r} not found in {_packaged_bundles()} or {project_root() / 'bundles'} "
        "(a broken installation: reinstall regnet_zoo)"
    )


def bundle_home(name: str) -> Path:
    """The user-writable folder for bundle ``name``'s outputs (``models/``, ``runs/``, ``outputs/``).

    ``$REGNET_ZOO_HOME/<name>`` when ``REGNET_ZOO_HOME`` is set; else the bundle folder itself in a source
    checkout; else (installed package) ``~/.regnet_zoo/<name>``, never the installed package's folder.
    """
    _check_name(name)
    home = os.environ.get("REGNET_ZOO_HOME")
    if home:
        return Path(home).expanduser().resolve() / name
    folder = bundle_dir(name)
    if folder.resolve().parent != _packaged_bundles().resolve():
        return folder
    return Path.home() / ".regnet_zoo" / name


def __getattr__(name: str):
    # the Python API is imported lazily so that `import regnet_zoo` stays light
    if name in ("register", "load_method", "RegistrationResult"):
        from regnet_zoo import api

        return getattr(api, name)
    raise AttributeError(f"module 'regnet_zoo' has no attribute {name!r}")
