"""The ``bundles/pwc`` MONAI bundle on the built-in 2D phantoms (4 training pairs at 40x40 to stay fast):
files and keys, a tiny training run, resume, inference/evaluation outputs, TorchScript export, metadata."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from regnet_zoo.bundle import (
    SCHEMA_PATH,
    bundle_metadata,
    bundle_parser,
    export_bundle,
    load_bundle_network,
    run_bundle,
)
from regnet_zoo.networks.pwc import PWCLoss, PWCRegistrationPyramid
from regnet_zoo.weights import read_weights

SIZE = [40, 40]
TINY = {"image_size": SIZE, "batch_size": 2, "train__dataset__data": "$@dataset.pairs('train')[:4]"}


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """One tiny epoch (2 iterations) with validation, checkpoint and final weights in a temporary root."""
    root = tmp_path_factory.mktemp("pwc_bundle")
    run_bundle("pwc", "train", bundle_root=str(root), epochs=1, **TINY)
    return root


def test_bundle_uses_the_paper_settings():
    train = bundle_parser("pwc", "train")
    network = train.get_parsed_content("network_def")
    loss = train.get_parsed_content("loss")
    assert isinstance(network, PWCRegistrationPyramid) and isinstance(loss, PWCLoss)
    assert (network.num_levels, network.search_radius) == (4, 2)
    assert (loss.lambda_dice, loss.gamma, loss.alpha, loss.beta) == (5.0, 5.0, 1.0, 1.0)


def test_metadata_matches_the_local_schema():
    jsonschema = pytest.importorskip("jsonschema")
    meta = bundle_metadata("pwc")
    schema = json.loads(Path(SCHEMA_PATH).read_text())
    schema.pop("$id", None)  # validate offline against the file itself
    jsonschema.validate(meta, schema)
    assert meta["network_data_format"]["inputs"]["image"]["num_channels"] == 2
    assert "Gunnarsson" in meta["references"][0]


def test_bundle_level_warps_and_3d():
    network = bundle_parser("pwc", "inference", network_def__level_warps=True).get_parsed_content(
        "network_def"
    )
    fixed, moving = torch.rand(1, 1, 32, 32), torch.rand(1, 1, 32, 32)
    with torch.no_grad():
        out = network.eval()(torch.cat([fixed, moving], dim=1))  # the stacked single-tensor form
    assert {f"warped_level{level}" for level in range(5)} <= set(out)
    torch.testing.assert_close(out["warped_level0"], out["warped"])
    network3d = bundle_parser("pwc", "inference", spatial_dims=3).get_parsed_content("network_def")
    with torch.no_grad():
        out = network3d.eval()(torch.rand(1, 1, 16, 16, 16), torch.rand(1, 1, 16, 16, 16))
    assert out["ddf"].shape == (1, 3, 16, 16, 16)


def test_training_writes_weights_and_evaluation_writes_outputs(trained):
    assert (trained / "models" / "model.pt").is_file()
    assert list((trained / "models" / "checkpoints").glob("checkpoint_epoch=1.pt"))
    assert list((trained / "runs").glob("events.out.tfevents.*"))
    network = load_bundle_network("pwc", weights=trained / "models" / "model.pt")
    assert isinstance(network, PWCRegistrationPyramid) and not network.training

    run_bundle("pwc", "evaluate", bundle_root=str(trained), image_size=SIZE)
    out = trained / "outputs"
    report = json.loads((out / "metrics" / "metrics.json").read_text())
    names = sorted(report["pairs"])
    assert report["aggregate"]["num_pairs"] == len(names) == 4
    assert np.isfinite(report["aggregate"]["dice_mean"]["mean"])
    fixed_affine = None
    for suffix, shape in (
        ("warped", (40, 40)),
        ("warped_label", (40, 40)),
        ("ddf", (40, 40, 1, 2)),
        ("jacdet", (40, 40)),
    ):
        img = nib.load(out / f"{names[0]}_{suffix}.nii.gz")
        assert img.shape == shape, suffix
        fixed_affine = img.affine if fixed_affine is None else fixed_affine
        np.testing.assert_allclose(img.affine, fixed_affine)
    assert np.isfinite(nib.load(out / f"{names[0]}_ddf.nii.gz").get_fdata()).all()


def test_resume_continues_from_the_last_epoch(trained):
    run_bundle(
        "pwc", "train", bundle_root=str(trained), epochs=2, resume_from="latest", val_interval=10, **TINY
    )
    state = torch.load(
        trained / "models" / "checkpoints" / "checkpoint_epoch=2.pt", map_location="cpu", weights_only=False
    )
    assert state["trainer"]["iteration"] == 2 * 2  # 4 pairs, batches of 2, two epochs
    final, _ = read_weights(trained / "models" / "model.pt")  # self-describing: state dict + metadata
    assert set(final) == set(state["model"])


def test_export_traced_matches_eager(trained, tmp_path):
    weights = trained / "models" / "model.pt"
    ts_path = export_bundle(
        "pwc", filepath=tmp_path / "model.ts", input_shape=[1, 2, *SIZE], ckpt_file=weights
    )
    traced = torch.jit.load(str(ts_path))
    eager = load_bundle_network("pwc", weights=weights)
    generator = torch.Generator().manual_seed(0)
    fixed, moving = torch.rand(1, 1, *SIZE, generator=generator), torch.rand(1, 1, *SIZE, generator=generator)
    with torch.no_grad():
        expected = eager(fixed, moving)["ddf"]
        got = traced(torch.cat([fixed, moving], dim=1))  # the DDF tensor
    assert expected.abs().max() > 0  # the trained network is no longer the identity
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_inference_writes_per_level_warps(trained, tmp_path):
    """``network_def#level_warps``: the paper's Table 2 view, one warped image per level on the fixed grid."""
    out = tmp_path / "levels"
    run_bundle(
        "pwc",
        "inference",
        bundle_root=str(trained),
        image_size=SIZE,
        output_dir=str(out),
        network_def__level_warps=True,
    )
    name = sorted(p.name[: -len("_warped.nii.gz")] for p in out.glob("*_warped.nii.gz"))[0]
    final = nib.load(out / f"{name}_warped.nii.gz").get_fdata()
    for level in range(5):
        img = nib.load(out / f"{name}_warped_level{level}.nii.gz")
        assert img.shape == (40, 40), level
    # level 0 is the finest field, i.e. the final output
    np.testing.assert_allclose(nib.load(out / f"{name}_warped_level0.nii.gz").get_fdata(), final, atol=1e-5)
