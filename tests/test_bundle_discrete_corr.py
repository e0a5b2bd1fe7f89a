"""The discrete_corr bundle: one tiny training epoch through ``monai.bundle.run``, inference writes per-pair
outputs, evaluate writes metrics, the weights reload through ``network_def`` and export to TorchScript."""

from __future__ import annotations

import json
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
)
from regnet_zoo.networks.discrete_corr import DiscreteCorrLoss, DiscreteCorrNet
from regnet_zoo.weights import read_weights


@pytest.fixture(scope="module")
def phantom_dir(tmp_path_factory) -> Path:
    from regnet_zoo.data.phantom import make_phantom_dataset

    return make_phantom_dataset(tmp_path_factory.mktemp("phantom") / "ph", 2, n_subjects=4, size=40, n_val=2)


@pytest.fixture(scope="module")
def trained_root(phantom_dir, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("discrete_corr_bundle")
    run_bundle(
        "discrete_corr", "train", dataset_dir=str(phantom_dir), epochs=1, bundle_root=str(root), device="cpu"
    )
    return root


def test_bundle_layout_and_definitions():
    folder = bundle_dir("discrete_corr")
    parser = bundle_parser("discrete_corr", "train", device="cpu")
    network = parser.get_parsed_content("network_def")
    assert isinstance(network, DiscreteCorrNet) and network.stride == 4 and network.radius == 5
    assert isinstance(parser.get_parsed_content("loss"), DiscreteCorrLoss)
    metadata = json.loads((folder / "metadata.json").read_text())
    assert metadata["network_data_format"]["inputs"]["image"]["num_channels"] == 2


def test_train_writes_weights_that_reload(trained_root):
    weights = trained_root / "models" / "model.pt"
    assert weights.is_file()
    assert any((trained_root / "models" / "checkpoints").iterdir())
    network = load_bundle_network("discrete_corr", weights=weights)
    state, _ = read_weights(weights)  # self-describing: state dict + metadata
    torch.testing.assert_close(network.state_dict(), state)
    pair = torch.rand(1, 2, 40, 40)
    with torch.no_grad():
        out = network(pair)  # the single stacked-input form used by MONAI's export tools
    assert out["ddf"].shape == (1, 2, 40, 40) and torch.isfinite(out["ddf"]).all()
    # traced TorchScript export (fixed input shape) reproduces the network
    traced = torch.jit.load(
        str(export_bundle("discrete_corr", trained_root / "model.ts", (1, 2, 40, 40), ckpt_file=weights))
    )
    torch.testing.assert_close(traced(pair), out["ddf"])


def test_inference_and_evaluate_write_outputs(trained_root, phantom_dir):
    output_dir = trained_root / "outputs"
    run_bundle(
        "discrete_corr", "evaluate", dataset_dir=str(phantom_dir), bundle_root=str(trained_root), device="cpu"
    )
    ddfs = sorted(output_dir.glob("*_ddf.nii.gz"))
    assert len(ddfs) == 2  # both directions of the validation pair
    ddf = np.asarray(nib.load(ddfs[0]).dataobj)
    assert ddf.shape[:2] == (40, 40) and ddf.shape[-1] == 2 and np.isfinite(ddf).all()  # vector last
    assert len(list(output_dir.glob("*_warped_label.nii.gz"))) == 2
    summary = json.loads((output_dir / "metrics" / "metrics.json").read_text())
    text = json.dumps(summary)
    assert "dice_mean" in text and "sdlogj" in text
