"""The shipped weights (regnet_zoo/pretrained): every file loads, fits its bundle, registers a pair, and is
what register / the bundles / the label app use when there are no weights of one's own."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from regnet_zoo import METHODS
from regnet_zoo.pretrained import PRETRAINED_DIR, default_weights, weights_file, weights_image_size
from regnet_zoo.weights import read_weights

SHIPPED = sorted(PRETRAINED_DIR.glob("*.pt"))  # none ship yet (regnet_zoo/pretrained docstring)
MB = 1e6


@pytest.fixture()
def shipped(tmp_path_factory, monkeypatch):
    """A shipped-weights folder holding one tiny file made by the training command (2 iterations): the real
    files when the package has them."""
    if SHIPPED:
        return SHIPPED[0]
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import train_zoo

    folder = tmp_path_factory.mktemp("pretrained")
    args = ["--methods", "discrete_corr", "--dims", "2", "--max-iterations", "2", "--grid2d", "32", "32"]
    assert train_zoo.main([*args, "--threads", "1", "--out", str(folder)]) == 0
    monkeypatch.setattr("regnet_zoo.pretrained.PRETRAINED_DIR", folder)
    return folder / "discrete_corr_2d.pt"


def _method_dims(path):
    method, dims = path.stem.rsplit("_", 1)
    return method, int(dims[0])


def _plain(value):
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    return value


@pytest.mark.skipif(not SHIPPED, reason="no weights ship yet (regnet_zoo/pretrained docstring)")
def test_shipped_files_are_small_and_named_for_a_method():
    sizes = {p.name: p.stat().st_size for p in SHIPPED}
    assert max(sizes.values()) <= 15 * MB, sizes
    assert sum(sizes.values()) <= 60 * MB, sizes
    for path in SHIPPED:
        method, dims = _method_dims(path)
        assert method in METHODS and dims in (2, 3), path.name
        assert (PRETRAINED_DIR / f"{method}.md").is_file(), f"{method} has no model card"


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_shipped_weights_describe_themselves_and_match_their_bundle(path):
    from regnet_zoo.bundle import bundle_parser

    method, dims = _method_dims(path)
    state, meta = read_weights(path)  # weights_only loading: plain Python metadata
    assert meta is not None and meta["method"] == method and meta["spatial_dims"] == dims
    trained = meta["trained_on"]
    assert trained["dataset"] == "synthmorph" and trained["iterations"] >= 1
    assert meta["preprocessing"]["image_size"] == trained["grid"] and len(trained["grid"]) == dims
    assert {"regnet_zoo", "monai", "torch"} <= set(meta["versions"])
    record = json.loads(path.with_suffix(".json").read_text())
    assert record["trained_on"]["iterations"] == trained["iterations"]
    # the recorded network is the bundle's network_def for these dims, argument by argument
    parser = bundle_parser(method, "train", spatial_dims=dims)
    bundle_args = {k: _plain(parser.get_parsed_content(f"network_def#{k}")) for k in meta["network"]["args"]}
    assert {k: _plain(v) for k, v in meta["network"]["args"].items()} == bundle_args
    built = parser.get_parsed_content("network_def", instantiate=True)
    assert {k: v.shape for k, v in built.state_dict().items()} == {k: v.shape for k, v in state.items()}


def _phantom_pair_2d():
    from regnet_zoo.data.phantom import PhantomTemplate, make_phantom_subject

    template = PhantomTemplate((96, 96), 0)
    a, b = (make_phantom_subject(template, s) for s in (1, 2))
    affine = np.diag([-1.0, -1.0, 1.0, 1.0])
    return [MetaTensor(torch.as_tensor(s[k]), affine=affine) for s in (a, b) for k in ("image", "label")]


def _pair(dims):
    from conftest import SHARED_DATA

    if dims == 2:
        fixed, fixed_label, moving, moving_label = _phantom_pair_2d()
        return fixed, moving, fixed_label, moving_label
    folder = SHARED_DATA / "tiny_mr_pair"
    if folder.is_dir():
        return (
            folder / "anatomical.nii",
            folder / "reoriented_anat_moved.nii",
            folder / "anatomical_label.nii.gz",
            folder / "reoriented_anat_moved_label.nii.gz",
        )
    from regnet_zoo.data.phantom import PhantomTemplate, make_phantom_subject

    template = PhantomTemplate((40, 40, 40), 0)
    a, b = (make_phantom_subject(template, s) for s in (1, 2))
    affine = np.diag([-1.0, -1.0, 1.0, 1.0])
    return tuple(MetaTensor(torch.as_tensor(s[k]), affine=affine) for k in ("image", "label") for s in (a, b))


def _slow(path):
    # in 3D RegNet runs its patch network at every voxel of the 64^3 working grid: about 35 s on one free CPU
    # core (2 minutes on a busy one), over the suite's per-test budget; REGNET_ZOO_SLOW_TESTS=1 runs it
    method, dims = _method_dims(path)
    marks = []
    if dims == 3 and method == "regnet":
        slow = not os.environ.get("REGNET_ZOO_SLOW_TESTS")
        marks.append(pytest.mark.skipif(slow, reason="set REGNET_ZOO_SLOW_TESTS=1"))
    return pytest.param(path, id=path.stem, marks=marks)


@pytest.mark.parametrize("path", [_slow(p) for p in SHIPPED])
def test_shipped_weights_register_a_pair_by_default(path, tmp_path, monkeypatch):
    """No own model (an empty REGNET_ZOO_HOME): register takes the shipped file for the images' dims and
    resamples to its working grid; the field is finite, on the fixed grid, and the network changes it."""
    from regnet_zoo.api import register
    from regnet_zoo.api.methods import weights_path

    method, dims = _method_dims(path)
    monkeypatch.setenv("REGNET_ZOO_HOME", str(tmp_path))
    assert weights_path(method, None, dims) == path
    fixed, moving, fixed_label, moving_label = _pair(dims)
    result = register(
        fixed, moving, method, fixed_label=fixed_label, moving_label=moving_label, affine=None
    )
    ddf = result.ddf_voxel
    assert ddf.shape[0] == dims and torch.isfinite(ddf).all()
    assert float(ddf.abs().max()) > 1e-3  # the network moved something
    assert 0.0 <= result.metrics["dice_mean"] <= 1.0


def test_own_model_wins_over_shipped_weights(shipped, tmp_path, monkeypatch):
    """Precedence: the bundle's own models/model.pt, else the shipped file for the dims (3D first when the
    dims are unknown)."""
    monkeypatch.setenv("REGNET_ZOO_HOME", str(tmp_path))
    method, dims = _method_dims(shipped)
    assert default_weights(method, dims) == weights_file(method, dims) == shipped
    own = tmp_path / method / "models" / "model.pt"
    own.parent.mkdir(parents=True)
    own.write_bytes(b"")
    assert default_weights(method, dims) == own
    assert default_weights(method, None) == own


def test_bundle_inference_and_label_app_default_to_shipped_weights(shipped, tmp_path, monkeypatch):
    from regnet_zoo.bundle import bundle_parser
    from regnet_zoo.label.config import LabelAppConfig

    monkeypatch.setenv("REGNET_ZOO_HOME", str(tmp_path))
    path = shipped
    method, dims = _method_dims(path)
    parser = bundle_parser(method, "inference", spatial_dims=dims)
    assert parser.get_parsed_content("ckpt_path") == str(path)
    # the inference transforms resample to the grid the weights were trained at
    assert parser.get_parsed_content("image_size") == weights_image_size(path)
    config = LabelAppConfig.from_conf(tmp_path, {"models": method, "work_dir": str(tmp_path / "work")})
    assert config.weights_of(method, dims) == path
