"""The bundle convention (``bundles/README.md``), checked once for every method's bundle."""

from __future__ import annotations

import pytest

from regnet_zoo import METHODS, bundle_dir, bundle_home
from regnet_zoo.bundle import BUNDLE_FILES, bundle_parser, load_bundle_network, verify_bundle_metadata

TOP_LEVEL_KEYS = ("dataset_dir", "epochs", "device", "bundle_root", "spatial_dims", "network_def", "loss")


@pytest.mark.parametrize("method", METHODS)
def test_bundle_files_keys_and_metadata(method):
    folder = bundle_dir(method)
    for name in BUNDLE_FILES:
        assert (folder / name).is_file(), f"{method}: {name}"
    train = bundle_parser(method, "train")
    for key in TOP_LEVEL_KEYS:
        assert key in train, f"{method}: {key}"
    assert train["bundle_root"] == str(bundle_home(method))
    verify_bundle_metadata(method)  # offline, against the packaged schema


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_train_and_inference_build_the_same_network(method, spatial_dims):
    """Weights trained with train.yaml must load into inference.yaml's network, in 2D and 3D."""
    train, inference = (
        bundle_parser(method, config, spatial_dims=spatial_dims).get_parsed_content("network_def")
        for config in ("train", "inference")
    )
    shapes = {k: v.shape for k, v in train.state_dict().items()}
    assert shapes == {k: v.shape for k, v in inference.state_dict().items()}
    network = load_bundle_network(method, load_weights=False, spatial_dims=spatial_dims)
    assert network.spatial_dims == spatial_dims


@pytest.mark.parametrize("method", METHODS)
def test_missing_weights_say_how_to_train(method):
    with pytest.raises(FileNotFoundError, match="train first"):
        load_bundle_network(method, weights="/nonexistent/model.pt")
