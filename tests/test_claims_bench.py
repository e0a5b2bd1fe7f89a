"""The #14 benchmarks' plumbing: RegNet training crops independent of the loader's worker count, and the
B-spline U-Net Table-1 parts merged into one report (the x1 row shared by the three sweeps)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from monai.data import MetaTensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


def test_regnet_swap_axes_keeps_every_voxel_at_its_world_position():
    """``--swap-axes`` transposes a 2D image and swaps its affine's columns: voxel (i, j) of the original and
    voxel (j, i) of the swapped image hold the same value at the same world position."""
    from regnet_bench import swap_axes

    affine = torch.tensor([[0.9, 0.1, 0, 5.0], [0.0, 1.2, 0, -3.0], [0, 0, 1, 0], [0, 0, 0, 1]])
    image = MetaTensor(torch.rand(1, 6, 9), affine=affine)
    swapped = swap_axes(image)
    assert swapped.shape == (1, 9, 6)
    i, j = 4, 7
    assert swapped[0, j, i] == image[0, i, j]
    original = affine @ torch.tensor([float(i), float(j), 0.0, 1.0])
    moved = torch.as_tensor(swapped.affine).float() @ torch.tensor([float(j), float(i), 0.0, 1.0])
    torch.testing.assert_close(moved, original)


def test_regnet_training_crops_do_not_depend_on_the_worker_count():
    """Crop ``i`` is seeded by ``(seed, i)``: the same batches in the main process and in 2 workers; another
    seed gives other crops."""
    from regnet_bench import TrainingCrops, _one_thread, _stack

    from regnet_zoo.data.regnet_crop import RegNetSyntheticCropd

    gen = torch.Generator().manual_seed(0)
    images = [MetaTensor(torch.rand(1, 72, 70, generator=gen) + 0.1, affine=torch.eye(4)) for _ in range(3)]
    samples = [{"image": im, "mask": torch.ones_like(im)} for im in images]

    def batches(workers: int, seed: int = 0) -> list[dict]:
        crops = TrainingCrops(samples, RegNetSyntheticCropd("image", "mask", crop_size=56), seed, 4)
        loader = torch.utils.data.DataLoader(
            crops, batch_size=2, num_workers=workers, collate_fn=_stack, worker_init_fn=_one_thread
        )
        return list(loader)

    main, workers, other = batches(0), batches(2), batches(0, seed=1)
    assert len(main) == 2 and main[0]["fixed"].shape == (2, 1, 56, 56) and main[0]["ddf_gt"].shape[1] == 2
    for a, b in zip(main, workers, strict=True):
        for key in a:
            torch.testing.assert_close(a[key], b[key])
    assert (main[0]["ddf_gt"] - other[0]["ddf_gt"]).abs().max() > 0.1


def test_bspline_table1_parts_merge_in_sweep_order(tmp_path):
    """Parts run apart (one holds the shared x1 setting) merge into the three sweeps, each with its x1 row;
    parts of different protocols are refused."""
    import pytest
    from bspline_unet_bench import PAPER_WEIGHTS, merge

    def row(name: str, multiplier: float, dice: float) -> dict:
        weights = dict(PAPER_WEIGHTS)
        weights[name] *= multiplier
        return {"setting": f"{name} x{multiplier:g}", "dice_mean": dice, "folding_percent": 0.0, **weights}

    identity = {"setting": "identity", "dice_mean": 0.4, "folding_percent": 0.0}
    common = {"image_shape": [40, 56], "term_scales": [1.0, 1.0, 1.0]}
    parts = {
        "d.json": {**common, "args": {"multipliers": [0, 1]}, "rows": [identity, row("delta", 0, 0.45),
                                                                       row("delta", 1, 0.5)]},
        "a.json": {**common, "args": {"multipliers": [0]}, "rows": [identity, row("alpha", 0, 0.3)]},
    }
    for name, report in parts.items():
        (tmp_path / name).write_text(json.dumps(report))
    out = tmp_path / "merged.json"
    merged = merge([tmp_path / "d.json", tmp_path / "a.json"], out)
    settings = [(r["setting"], r["dice_mean"]) for r in merged["rows"]]
    assert settings == [
        ("identity", 0.4), ("delta x0", 0.45), ("delta x1", 0.5), ("alpha x0", 0.3), ("alpha x1", 0.5),
        ("beta x1", 0.5),
    ]
    assert json.loads(out.read_text())["rows"] == merged["rows"]
    (tmp_path / "a.json").write_text(json.dumps({**parts["a.json"], "image_shape": [80, 112]}))
    with pytest.raises(SystemExit, match="different protocols"):
        merge([tmp_path / "d.json", tmp_path / "a.json"], out)
