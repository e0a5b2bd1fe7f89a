"""The RegNet bundle end to end on the built-in 2D phantoms (narrow layers to stay fast): CLI training from
another working directory (synthetic crops, learning-rate decay), inference / evaluation outputs that equal
the network's dense prediction, TorchScript export and the metadata."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from regnet_zoo import bundle_dir
from regnet_zoo.bundle import bundle_parser, export_bundle, load_bundle_network, run_bundle
from regnet_zoo.data.phantom import default_dataset_dir

BUNDLE = bundle_dir("regnet")
EPOCHS = 2
# the paper's layer counts and patch geometry, narrow widths (CPU test)
NARROW = {
    "network_def#stem_channels": 4,
    "network_def#high_res_channels": [4, 6],
    "network_def#low_res_channels": [4, 4, 4, 6, 6, 6],
    "network_def#merged_channels": [8, 8, 8, 12],
    "network_def#fc_channels": 12,
}
FAST = {"crop_size": 64, "crops_per_image": 2, "batch_size": 8, **NARROW}


def _py(overrides: dict) -> dict:
    return {k.replace("#", "__"): v for k, v in overrides.items()}


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """Train with the documented CLI command, run from an unrelated working directory."""
    default_dataset_dir(2)  # generate the phantoms once (cached)
    root = tmp_path_factory.mktemp("regnet_bundle")
    cwd = tmp_path_factory.mktemp("elsewhere")
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(BUNDLE / "train.yaml")]
    for key, value in {"bundle_root": str(root), "epochs": EPOCHS, **FAST}.items():
        cmd += [f"--{key}", value if isinstance(value, str) else json.dumps(value)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return root


def test_training_outputs_and_learning_rate_decay(trained):
    assert (trained / "models" / "model.pt").is_file()
    ckpt = trained / "models" / "checkpoints" / f"checkpoint_epoch={EPOCHS}.pt"
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    # Adam from 1e-3, divided by 1.25 after every epoch (paper)
    np.testing.assert_allclose(state["optimizer"]["param_groups"][0]["lr"], 1e-3 / 1.25**EPOCHS, rtol=1e-6)
    assert "lr_scheduler" in state
    assert list((trained / "runs").glob("events.out.tfevents.*"))


def test_training_items_are_supervised_crops():
    parser = bundle_parser("regnet", "train", **_py(FAST))
    dataset = parser.get_parsed_content("train#dataset")
    item = dataset[0]
    assert set(item) >= {"fixed", "moving", "ddf_gt", "ddf_mask"}
    assert item["fixed"].shape == (1, 64, 64) and item["ddf_gt"].shape == (2, 64, 64)
    assert item["ddf_gt"].abs().max() > 0.5  # a synthetic deformation (theta 8 mm at 2 mm voxels)
    inner = item["ddf_mask"][0, 27:-27, 27:-27]
    assert item["ddf_mask"].sum() == inner.sum() > 0  # only centres with their context inside the crop
    batch = parser.get_parsed_content("train#trainer").prepare_batch(
        parser.get_parsed_content("train#dataloader").collate_fn([item, dataset[1]]), "cpu", False
    )
    assert batch["ddf_gt"].shape == (2, 2, 64, 64) and "ddf_mask" in batch


def test_evaluate_writes_the_dense_prediction(trained):
    run_bundle("regnet", "evaluate", bundle_root=str(trained), **_py(NARROW))
    out = trained / "outputs"
    report = json.loads((out / "metrics" / "metrics.json").read_text())
    agg = report["aggregate"]
    assert agg["num_pairs"] == 4
    assert np.isfinite(agg["dice_mean"]["mean"]) and np.isfinite(agg["mse"]["mean"])
    names = sorted(report["pairs"])
    ddf_file = nib.load(out / f"{names[0]}_ddf.nii.gz")
    assert ddf_file.shape == (96, 96, 1, 2)  # fixed grid, vector last
    # the written field is the network's fully convolutional prediction for that pair
    net = load_bundle_network("regnet", weights=trained / "models" / "model.pt", **_py(NARROW))
    parser = bundle_parser("regnet", "inference", bundle_root=str(trained), **_py(NARROW))
    pair = next(iter(parser.get_parsed_content("dataloader")))
    with torch.no_grad():
        ddf = net(pair["fixed"].as_tensor(), pair["moving"].as_tensor())["ddf"][0]
    written = torch.as_tensor(np.asarray(ddf_file.dataobj), dtype=torch.float32)[:, :, 0].permute(2, 0, 1)
    assert ddf.abs().max() > 0
    torch.testing.assert_close(written, ddf, atol=1e-4, rtol=1e-4)


def test_export_traced_matches_eager(trained, tmp_path):
    ts_path = export_bundle(
        "regnet",
        filepath=tmp_path / "model.ts",
        input_shape=[1, 2, 40, 36],
        ckpt_file=trained / "models" / "model.pt",
        **_py(NARROW),
    )
    traced = torch.jit.load(str(ts_path))
    eager = load_bundle_network("regnet", weights=trained / "models" / "model.pt", **_py(NARROW))
    pair = torch.rand(1, 2, 40, 36)
    with torch.no_grad():
        torch.testing.assert_close(traced(pair), eager(pair)["ddf"], rtol=1e-4, atol=1e-5)


def test_metadata_names_the_paper():
    meta = json.loads((BUNDLE / "metadata.json").read_text())
    assert "Sokooti" in " ".join(meta["references"])
