"""regnet_zoo.data: image I/O, Learn2Reg datasets, pair transforms, synthetic deformations, phantoms.

The public names below are imported lazily (on first attribute access) so that ``import regnet_zoo.data``
does not pull in MONAI's transform stack.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "io": (
        "load_image",
        "load_label",
        "check_pair",
        "load_landmarks",
        "save_landmarks",
        "lps_to_voxel",
        "voxel_to_lps",
        "save_image",
    ),
    "learn2reg": ("Learn2RegDataset", "find_dataset_json", "write_learn2reg_dataset"),
    "transforms": ("PAIR_KEYS", "LoadPaird", "pair_transforms", "pair_collate", "pair_dataloader"),
    "synthetic": ("REGNET_PRESETS", "synthetic_dvf", "random_svf", "deform_pair"),
    "regnet_crop": ("RegNetSyntheticCropd",),
    "phantom": ("make_phantom_dataset", "default_dataset_dir", "PhantomTemplate", "make_phantom_subject"),
    "download": ("LEARN2REG_TASKS", "download_learn2reg", "download_file", "extract_archive"),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted(_MODULE_OF)


def __getattr__(name: str):
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module 'regnet_zoo.data' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"regnet_zoo.data.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
