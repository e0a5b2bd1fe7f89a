"""Configuration of the MONAI Label app: which bundles are served, where their weights are, the device.

MONAI Label hands an app its configuration as a flat ``{str: str}`` dict (``--conf key value`` of
``monailabel start_server``; ``regnet-zoo serve`` fills it from its options). Keys:

- ``models``: comma-separated bundle names, or ``all`` (default): every method whose bundle folder exists;
- ``weights``: comma-separated ``name=path`` pairs of trained weight files (state dict or trainer checkpoint);
- ``device``: torch device for inference and training (default ``cpu``);
- ``work_dir``: folder for training runs, trained weights and logs (default ``<studies>/.regnet_zoo``);
- ``cache_mb`` / ``cache_entries``: bound of each model's cache of registration results (default 512 MiB, 32).

The server's access settings (token, CORS origins, address) are options of ``regnet-zoo serve``, not ``conf``.

This module does not import MONAI Label, so the CLI can validate options without it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from regnet_zoo import METHODS, bundle_dir, bundle_home

__all__ = ["WORK_DIR_NAME", "LabelAppConfig", "available_methods", "parse_models", "parse_weights"]

#: default working folder of the app, inside the studies folder (MONAI Label scans only the top level)
WORK_DIR_NAME = ".regnet_zoo"


def available_methods() -> list[str]:
    """Methods whose bundle folder (with ``train.yaml``) exists, in :data:`regnet_zoo.METHODS` order."""
    out = []
    for name in METHODS:
        try:
            root = bundle_dir(name)
        except FileNotFoundError:
            continue
        if (root / "train.yaml").is_file():
            out.append(name)
    return out


def parse_models(text: str | None) -> list[str]:
    """``"ddrnet,pwc"`` -> ``["ddrnet", "pwc"]``; ``None``/``""``/``"all"`` -> every available method.

    Raises ``ValueError`` for an unknown name or a method whose bundle does not exist.
    """
    available = available_methods()
    if not text or text.strip().lower() == "all":
        return available
    names = [n.strip() for n in text.split(",") if n.strip()]
    for name in names:
        if name not in METHODS:
            raise ValueError(f"unknown model {name!r}; choose from {', '.join(METHODS)}")
        if name not in available:
            raise ValueError(f"model {name!r} has no bundle yet (bundles/{name}/train.yaml not found)")
    return list(dict.fromkeys(names))


def parse_weights(text: str | None) -> dict[str, Path]:
    """``"ddrnet=/w/a.pt,pwc=/w/b.pt"`` -> ``{"ddrnet": Path("/w/a.pt"), ...}``; ``ValueError`` if bad."""
    out: dict[str, Path] = {}
    for item in (text or "").split(","):
        if not item.strip():
            continue
        name, sep, path = item.partition("=")
        name = name.strip()
        if not sep or not path.strip():
            raise ValueError(f"weights entry {item!r} is not of the form name=path")
        if name not in METHODS:
            raise ValueError(f"weights entry {item!r}: unknown model; choose from {', '.join(METHODS)}")
        out[name] = Path(path.strip()).expanduser().resolve()
    return out


@dataclass
class LabelAppConfig:
    """The app's parsed configuration (see the module docstring for the ``conf`` keys)."""

    studies: Path
    models: list[str]
    weights: dict[str, Path] = field(default_factory=dict)
    device: str = "cpu"
    work_dir: Path | None = None
    cache_mb: float = 512.0
    cache_entries: int = 32

    def __post_init__(self) -> None:
        self.studies = Path(self.studies)
        if self.work_dir is None:
            self.work_dir = self.studies / WORK_DIR_NAME
        self.work_dir = Path(self.work_dir)

    @classmethod
    def from_conf(cls, studies: str | os.PathLike, conf: Mapping[str, str] | None) -> LabelAppConfig:
        conf = dict(conf or {})
        work_dir = conf.get("work_dir")
        return cls(
            studies=Path(studies),
            models=parse_models(conf.get("models")),
            weights=parse_weights(conf.get("weights")),
            device=str(conf.get("device") or "cpu"),
            work_dir=Path(work_dir).expanduser().resolve() if work_dir else None,
            cache_mb=float(conf.get("cache_mb") or 512.0),
            cache_entries=int(conf.get("cache_entries") or 32),
        )

    def to_conf(self) -> dict[str, str]:
        """The MONAI Label ``conf`` dict that :meth:`from_conf` reads back."""
        return {
            "models": ",".join(self.models),
            "weights": ",".join(f"{k}={v}" for k, v in self.weights.items()),
            "device": self.device,
            "work_dir": str(self.work_dir),
            "cache_mb": str(self.cache_mb),
            "cache_entries": str(self.cache_entries),
        }

    def trained_weights(self, name: str) -> Path:
        """Where the app's training task writes the weights of ``name``: ``work_dir/<name>`` is its
        ``bundle_root``, so ``work_dir/<name>/models/model.pt``."""
        return Path(self.work_dir) / name / "models" / "model.pt"

    def weights_of(self, name: str) -> Path:
        """The weight file used for ``name`` (it may not exist): the ``weights`` entry, else weights trained
        by this app (``work_dir/<name>/models/model.pt``) when present, else the bundle's
        ``models/model.pt``."""
        if name in self.weights:
            return self.weights[name]
        trained = self.trained_weights(name)
        if trained.is_file():
            return trained
        return bundle_home(name) / "models" / "model.pt"
