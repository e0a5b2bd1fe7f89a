"""The DDR-Net bundle end to end on the built-in 2D phantoms (resized to 48x48 to stay fast):
CLI training from another working directory, resume, inference/evaluation outputs, TorchScript export,
offline metadata validation and 2-process (gloo) distributed training."""

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
from regnet_zoo.bundle import (
    bundle_parser,
    export_bundle,
    load_bundle_network,
    run_bundle,
    verify_bundle_metadata,
)
from regnet_zoo.data.learn2reg import Learn2RegDataset
from regnet_zoo.data.phantom import default_dataset_dir
from regnet_zoo.weights import read_weights

BUNDLE = bundle_dir("ddrnet")
SIZE = [48, 48]
FAST = {"image_size": SIZE, "batch_size": 8, "learning_rate": 0.003}


def _cli_args(overrides: dict) -> list[str]:
    return [
        a for k, v in overrides.items() for a in (f"--{k}", json.dumps(v) if not isinstance(v, str) else v)
    ]


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """Train 4 epochs with the documented CLI command, run from an unrelated working directory."""
    default_dataset_dir(2)  # generate the phantoms once (cached)
    root = tmp_path_factory.mktemp("ddrnet_bundle")
    cwd = tmp_path_factory.mktemp("elsewhere")
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(BUNDLE / "train.yaml")]
    cmd += _cli_args({"bundle_root": str(root), "epochs": 4, **FAST})
    result = subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return root


def _val_batch(root: Path) -> dict:
    parser = bundle_parser("ddrnet", "train", bundle_root=str(root), **FAST)
    loader = parser.get_parsed_content("validate#dataloader")
    batches = list(loader)
    return {k: torch.cat([b[k].as_tensor() for b in batches]) for k in ("fixed", "moving")}


def test_training_lowers_loss_and_raises_dice(trained):
    assert (trained / "models" / "model.pt").is_file()
    assert list((trained / "models" / "checkpoints").glob("checkpoint_epoch=4.pt"))
    assert list((trained / "runs").glob("events.out.tfevents.*"))  # TensorBoard
    # the held-back (registration_val) pairs: the trained network's loss is below the untrained one's
    batch = _val_batch(trained)
    loss_fn = bundle_parser("ddrnet", "train").get_parsed_content("loss")
    losses = []
    for load in (False, True):
        torch.manual_seed(0)
        net = load_bundle_network("ddrnet", weights=trained / "models" / "model.pt", load_weights=load)
        with torch.no_grad():
            losses.append(float(loss_fn(net(batch["fixed"], batch["moving"]), batch)["loss"]))
    assert losses[1] < 0.9 * losses[0]
    # evaluate.yaml: Learn2Reg metrics per pair and aggregated; Dice above the identity's
    out = trained / "outputs"
    run_bundle("ddrnet", "evaluate", bundle_root=str(trained), **{"image_size": SIZE})
    report = json.loads((out / "metrics" / "metrics.json").read_text())
    agg = report["aggregate"]
    assert agg["num_pairs"] == 4
    assert agg["dice_mean"]["mean"] > agg["dice_mean_initial"]["mean"] + 0.02
    assert agg["folding_percent"]["mean"] < 1.0
    names = sorted(report["pairs"])
    assert len(list((out / "metrics").glob("PHANTOM2D_*.json"))) == 4
    # per-pair NIfTI outputs on the fixed grid with the fixed image's affine
    fixed_affine = None
    for suffix, shape in (
        ("warped", (48, 48)),
        ("warped_label", (48, 48)),
        ("ddf", (48, 48, 1, 2)),
        ("jacdet", (48, 48)),
    ):
        img = nib.load(out / f"{names[0]}_{suffix}.nii.gz")
        assert img.shape == shape
        fixed_affine = img.affine if fixed_affine is None else fixed_affine
        np.testing.assert_allclose(img.affine, fixed_affine)
    assert nib.load(out / f"{names[0]}_jacdet.nii.gz").get_fdata().min() > 0


def test_resume_continues_from_the_last_epoch(trained):
    run_bundle(
        "ddrnet", "train", bundle_root=str(trained), epochs=5, resume_from="latest", val_interval=10, **FAST
    )
    ckpt = trained / "models" / "checkpoints" / "checkpoint_epoch=5.pt"
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    first, meta = read_weights(trained / "models" / "model.pt")
    num_pairs = len(Learn2RegDataset(default_dataset_dir(2)).pairs("train"))
    assert state["trainer"]["iteration"] == 5 * -(-num_pairs // FAST["batch_size"])
    assert set(first) == set(state["model"])  # the final weights: the network's state dict + metadata
    assert meta["trained_on"]["epochs"] == 5 and meta["preprocessing"]["image_size"] == SIZE


def test_export_traced_matches_eager(trained, tmp_path):
    ts_path = export_bundle(
        "ddrnet",
        filepath=tmp_path / "model.ts",
        input_shape=[1, 2, *SIZE],
        ckpt_file=trained / "models" / "model.pt",
    )
    traced = torch.jit.load(str(ts_path))
    eager = load_bundle_network("ddrnet", weights=trained / "models" / "model.pt")
    batch = _val_batch(trained)
    pair = torch.cat([batch["fixed"][:1], batch["moving"][:1]], dim=1)
    with torch.no_grad():
        expected = eager(batch["fixed"][:1], batch["moving"][:1])["ddf"]
        got = traced(pair)  # ddf_network: the DDF tensor
    assert expected.abs().max() > 0.1  # a non-trivial field
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_metadata_validates_offline(monkeypatch, tmp_path):
    pytest.importorskip("jsonschema")  # MONAI's verify_metadata needs it
    import monai.apps.utils

    def no_download(*args, **kwargs):
        raise AssertionError("verify_metadata tried to download the schema")

    monkeypatch.setattr(monai.apps.utils, "urlretrieve", no_download)
    verify_bundle_metadata("ddrnet")
    # a metadata file missing a required field fails against the same local schema
    from monai.bundle import verify_metadata

    from regnet_zoo.bundle import SCHEMA_PATH

    broken = json.loads((BUNDLE / "metadata.json").read_text())
    del broken["network_data_format"]
    (tmp_path / "metadata.json").write_text(json.dumps(broken))
    with pytest.raises(ValueError, match="network_data_format"):
        verify_metadata(meta_file=str(tmp_path / "metadata.json"), filepath=str(SCHEMA_PATH))


def test_multi_gpu_train_with_two_cpu_processes(tmp_path):
    default_dataset_dir(2)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m"]
    configs = [str(BUNDLE / "train.yaml"), str(BUNDLE / "multi_gpu_train.yaml")]
    cmd += ["monai.bundle", "run", "--config_file", json.dumps(configs)]
    overrides = {"bundle_root": str(tmp_path), "epochs": 1, "val_interval": 5, **FAST}
    cmd += _cli_args(overrides) + ["--train#dataset#data", "$@dataset.pairs('train')[:16]"]
    result = subprocess.run(cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert (tmp_path / "models" / "model.pt").is_file()
    state = torch.load(tmp_path / "models" / "checkpoints" / "checkpoint_epoch=1.pt", weights_only=False)
    # 16 pairs split over 2 processes, batches of 8: one iteration each (two on a single process)
    assert state["trainer"]["iteration"] == 1
    assert not any(k.startswith("module.") for k in state["model"])
