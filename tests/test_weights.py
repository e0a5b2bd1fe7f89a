"""Self-describing weights: what a bundle-trained model.pt records, and how register / load_method / bundle
inference use it (rebuilding the trained network, its working grid, refusing weights that do not fit)."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from regnet_zoo import __version__
from regnet_zoo.api import load_method, pipeline, register
from regnet_zoo.bundle import load_bundle_network, run_bundle
from regnet_zoo.cli import main
from regnet_zoo.engines.handlers import WeightsLoader
from regnet_zoo.errors import RegistrationInputError
from regnet_zoo.weights import read_weights

SIZE = [24, 20]


@pytest.fixture(scope="module")
def phantom_dir(tmp_path_factory) -> Path:
    from regnet_zoo.data.phantom import make_phantom_dataset

    return make_phantom_dataset(tmp_path_factory.mktemp("phantom") / "ph", 2, n_subjects=4, size=32, n_val=2)


def train(dataset: Path, out: Path, **overrides) -> None:
    """One iteration of the DDR-Net bundle (narrow, on the image_size grid) into ``out/models``."""
    run_bundle(
        "ddrnet",
        "train",
        dataset_dir=str(dataset),
        epochs=1,
        spatial_dims=2,
        image_size=SIZE,
        batch_size=2,
        val_interval=1000,
        ckpt_dir=str(out / "models"),
        log_dir=str(out / "runs"),
        device="cpu",
        **{"network_def#encoder_channels": [4, 8, 8, 8], "network_def#decoder_channels": [8, 8, 8, 8]},
        **overrides,
    )


@pytest.fixture(scope="module")
def trained(phantom_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ddrnet")
    train(phantom_dir, out)
    return out / "models" / "model.pt"


def test_model_file_describes_itself(trained, phantom_dir):
    state, meta = read_weights(trained)
    assert meta["method"] == "ddrnet" and meta["spatial_dims"] == 2 and meta["in_channels"] == 1
    assert meta["network"]["target"] == "regnet_zoo.networks.ddrnet.DDRNet"
    assert meta["network"]["args"]["encoder_channels"] == [4, 8, 8, 8]  # the override, resolved
    assert meta["preprocessing"]["image_size"] == SIZE and meta["preprocessing"]["normalize"] == "minmax"
    assert meta["preprocessing"]["pre_align"] is None
    trained_on = meta["trained_on"]
    assert trained_on["dataset_dir"] == str(phantom_dir) and trained_on["pairs"] == 2 * 1  # 2 train subjects
    assert trained_on["iterations"] == 1 and trained_on["epochs"] == 1 and trained_on["grid"] == [32, 32]
    assert meta["versions"]["regnet_zoo"] == __version__ and meta["versions"]["torch"] == torch.__version__
    # rebuilt from the file alone: the bundle's own config (wider channels) is not used
    network = load_method("ddrnet", trained)
    assert network.regnet_zoo_metadata == meta
    loaded = network.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state.items())


def test_register_uses_the_trained_grid_and_refuses_other_dims(trained, phantom_dir, tmp_path):
    image = phantom_dir / "imagesTr" / "PHANTOM2D_0003_0000.nii.gz"
    path = trained.resolve()
    network, _ = pipeline.cached_network("ddrnet", str(path), path.stat().st_mtime_ns, "cpu", 2)
    seen = []
    handle = network.register_forward_pre_hook(lambda module, args: seen.append(tuple(args[0].shape[2:])))
    try:
        result = register(image, image, "ddrnet", weights=trained, affine=None)
    finally:
        handle.remove()
    assert seen == [tuple(SIZE)] and result.ddf_voxel.shape == (2, 32, 32)
    volume = MetaTensor(torch.rand(1, 8, 8, 8))
    with pytest.raises(RegistrationInputError, match="for 2D images but the images are 3D"):
        register(volume, volume, "ddrnet", weights=trained, affine=None)
    with pytest.raises(RegistrationInputError, match="for method 'ddrnet', not 'pwc'"):
        load_bundle_network("pwc", weights=trained, spatial_dims=2)


def test_bundle_inference_loader_checks_the_working_grid(trained):
    def loader(**kwargs) -> WeightsLoader:
        return WeightsLoader(trained, {"model": torch.nn.Linear(1, 1)}, "ddrnet", **kwargs)

    loader(spatial_dims=2, image_size=SIZE).check()
    with pytest.raises(RegistrationInputError, match="trained with image_size"):
        loader(spatial_dims=2, image_size=None).check()
    with pytest.raises(RegistrationInputError, match="3D"):
        loader(spatial_dims=3, image_size=SIZE).check()


def test_plain_state_dict_loads_with_a_warning(tmp_path):
    network = load_bundle_network("ddrnet", load_weights=False, spatial_dims=2)
    torch.save(network.state_dict(), tmp_path / "plain.pt")
    with pytest.warns(UserWarning, match="without regnet_zoo metadata"):
        loaded = load_method("ddrnet", tmp_path / "plain.pt")
    assert loaded.regnet_zoo_metadata is None


def test_grid_far_from_the_trained_one_warns(tmp_path):
    from regnet_zoo.weights import check_weights_fit

    meta = {"method": "ddrnet", "spatial_dims": 2, "preprocessing": {}, "trained_on": {"grid": [32, 32]}}
    with pytest.warns(UserWarning, match="trained on a"):
        check_weights_fit(meta, "w.pt", grid=(160, 192))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_weights_fit(meta, "w.pt", grid=(36, 30))  # close to the trained grid: no warning
    with pytest.raises(RegistrationInputError, match="1-channel"):
        check_weights_fit({**meta, "in_channels": 1}, "w.pt", in_channels=2)


def test_a_second_training_run_does_not_replace_the_first(trained, phantom_dir, capsys):
    before = trained.read_bytes()
    # run_bundle surfaces the handler's error from inside MONAI's wrapping
    with pytest.raises(RegistrationInputError, match="earlier training run"):
        train(phantom_dir, trained.parent.parent)
    assert trained.read_bytes() == before
    code = main(["train", "ddrnet", "--dataset-dir", str(phantom_dir), "--ckpt_dir", str(trained.parent)])
    err = capsys.readouterr().err
    assert code == 2 and "--overwrite" in err and "earlier training run" in err
    assert trained.read_bytes() == before
    train(phantom_dir, trained.parent.parent, overwrite=True)
    _, meta = read_weights(trained)
    assert trained.read_bytes() != before and meta["trained_on"]["iterations"] == 1
    assert np.isfinite(meta["trained_on"]["spacing"]).all()
