"""The bundle convention (``bundles/README.md``), checked once for every method's bundle."""

from __future__ import annotations

import json
import os
import runpy
import shutil
import site
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import pytest
import torch
from monai.bundle.utils import DEPRECATED_ID_MAPPING

import regnet_zoo
from regnet_zoo import METHODS, bundle_dir, bundle_home
from regnet_zoo.bundle import (
    BUNDLE_FILES,
    bundle_parser,
    check_generated,
    load_bundle_network,
    verify_bundle_metadata,
)
from regnet_zoo.data.learn2reg import Learn2RegDataset
from regnet_zoo.data.phantom import default_dataset_dir

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


# ---- MONAI's own tools, called as a user calls them (``python -m monai.bundle ...``, argv parsed by fire)
SCHEMA = regnet_zoo.project_root().parent / "shared" / "reference" / "meta_schema_20240725.json"


def monai_bundle(*args: str) -> None:
    """``python -m monai.bundle ARGS`` in this process (the same entry point, without the start-up time)."""
    argv = sys.argv
    sys.argv = ["monai.bundle", *args]
    try:
        runpy.run_module("monai.bundle", run_name="__main__", alter_sys=True)
    finally:
        sys.argv = argv


def test_committed_bundle_files_are_what_the_sources_generate():
    bundles = regnet_zoo.project_root() / "bundles"
    assert check_generated(bundles) == []
    # a hand edit of a generated file is drift, and the check names the file
    path = bundles / "ddrnet" / "configs" / "train.yaml"
    original = path.read_text()
    try:
        path.write_text(original.replace("output['losses']", "output['loss']"))
        assert check_generated(bundles) == ["ddrnet/configs/train.yaml differs from its source"]
    finally:
        path.write_text(original)


@pytest.mark.parametrize("method", METHODS)
def test_top_level_configs_are_the_configs_folder(method):
    """``bundles/<m>/train.yaml`` (the documented command) and ``configs/train.yaml`` are one file."""
    folder = bundle_dir(method)
    for name in ("train.yaml", "inference.yaml", "evaluate.yaml", "multi_gpu_train.yaml", "metadata.json"):
        assert (folder / name).resolve() == (folder / "configs" / name).resolve()
    # the losses are logged the same way in every bundle (the drift issue 16 found)
    train = bundle_parser(method, "train")
    assert train["train"]["main_handlers"][1]["output_transform"] == "$lambda output: output['losses']"


@pytest.mark.parametrize("method", METHODS)
def test_metadata_validates_against_monai_official_schema(method):
    if not SCHEMA.is_file():
        pytest.skip(f"{SCHEMA} not present")
    pytest.importorskip("jsonschema")
    meta_file = str(bundle_dir(method) / "configs" / "metadata.json")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        monai_bundle("verify_metadata", "--meta_file", meta_file, "--filepath", str(SCHEMA))
    assert not [w for w in caught if "deprecated" in str(w.message).lower()]
    meta = json.loads(Path(meta_file).read_text())
    assert "regnet_zoo" in meta["required_packages_version"]
    assert not set(meta) & set(DEPRECATED_ID_MAPPING)
    assert len(meta["network_data_format"]["inputs"]["image"]["spatial_shape"]) == 2
    assert len(meta["network_3d_data_format"]["inputs"]["image"]["spatial_shape"]) == 3
    # eval_metrics are the committed benchmark's numbers for this method
    results = regnet_zoo.project_root() / "benchmarks" / "results" / "compare_builtin2d.json"
    rows = json.loads(results.read_text())["rows"]
    row = next(r for r in rows if r["method"] == method)
    assert meta["eval_metrics"]["dice_mean"] == pytest.approx(row["dice_mean"], abs=1e-4)
    assert 0 < meta["eval_metrics"]["dice_mean"] < 1
    # a metadata file missing a required field fails against the same schema
    broken = {k: v for k, v in meta.items() if k != "network_data_format"}
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "metadata.json").write_text(json.dumps(broken))
        with pytest.raises(ValueError, match="network_data_format"):
            monai_bundle("verify_metadata", "--meta_file", f"{tmp}/metadata.json", "--filepath", str(SCHEMA))


@pytest.mark.parametrize("method", METHODS)
def test_verify_net_in_out_2d_and_3d(method, tmp_path):
    folder = bundle_dir(method) / "configs"
    meta, config = str(folder / "metadata.json"), str(folder / "inference.yaml")
    monai_bundle("verify_net_in_out", "ddf_network", "--meta_file", meta, "--config_file", config,
                 "--device", "cpu")
    # 3D: the same network with spatial_dims 3, as network_3d_data_format describes it
    io3d = json.loads(Path(meta).read_text())["network_3d_data_format"]
    fmt = "_meta_#network_data_format"
    monai_bundle("verify_net_in_out", "ddf_network", "--meta_file", meta, "--config_file", config,
                 "--device", "cpu", "--spatial_dims", "3",
                 f"--{fmt}#inputs#image#spatial_shape", json.dumps(io3d["inputs"]["image"]["spatial_shape"]),
                 f"--{fmt}#outputs#pred#num_channels", str(io3d["outputs"]["pred"]["num_channels"]))
    # the check can fail: a wrong output channel count is reported
    with pytest.raises(ValueError, match="output channel number"):
        monai_bundle("verify_net_in_out", "ddf_network", "--meta_file", meta, "--config_file", config,
                     "--device", "cpu", "--_meta_#network_data_format#outputs#pred#num_channels", "3")


#: ``ckpt_export`` example size (B, 2, *S) and a second size per spatial_dims: another batch size and spatial
#: sizes that are neither the example's nor multiples of any network's stride (so padding paths differ)
EXPORT_SHAPES = {2: ((1, 2, 32, 32), (2, 2, 45, 38)), 3: ((1, 2, 12, 12, 12), (2, 2, 13, 15, 11))}
#: the B-spline U-Net's instance norms need more than one voxel at its coarsest level (eager too)
EXPORT_SHAPES_3D_BSPLINE = ((1, 2, 32, 32, 32), (2, 2, 35, 33, 38))


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("method", METHODS)
def test_ckpt_export_runs_at_two_sizes_and_equals_eager(method, spatial_dims, tmp_path):
    """MONAI's ``ckpt_export`` as on the command line (bundles/README.md), then the TorchScript file at the
    export size and at another size, against the eager network with the same (randomised) weights."""
    from regnet_zoo.networks.pair import DDFOutput

    folder = bundle_dir(method) / "configs"
    net = bundle_parser(method, "inference", spatial_dims=spatial_dims).get_parsed_content("network_def")
    net.eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # away from the zero-initialised output layers: every path contributes to the DDF
        for param in net.parameters():
            param.add_(0.02 * torch.randn(param.shape, generator=generator))
    torch.save({"model": net.state_dict()}, tmp_path / "model.pt")  # models/model.pt keeps it under "model"
    shapes = EXPORT_SHAPES[spatial_dims]
    if method == "bspline_unet" and spatial_dims == 3:
        shapes = EXPORT_SHAPES_3D_BSPLINE
    # the command of bundles/README.md ("Commands"), with this bundle's files
    monai_bundle("ckpt_export", "ddf_network", "--filepath", str(tmp_path / "model.ts"),
                 "--ckpt_file", str(tmp_path / "model.pt"), "--key_in_ckpt", "model",
                 "--meta_file", str(folder / "metadata.json"),
                 "--config_file", str(folder / "inference.yaml"),
                 "--use_trace", "True", "--input_shape", json.dumps(list(shapes[0])),
                 "--converter_kwargs", "{'check_trace': False}", "--spatial_dims", str(spatial_dims))
    exported = torch.jit.load(str(tmp_path / "model.ts"))
    eager = DDFOutput(net)
    for shape in shapes:
        pair = torch.rand(shape, generator=generator)
        with torch.no_grad():
            expected = eager(pair)
            got = exported(pair)
        assert expected.shape == (shape[0], spatial_dims, *shape[2:])
        # a non-trivial field for every pair, not a near-zero one that a wrong trace would match in tolerance
        assert expected.abs().amax(dim=tuple(range(1, expected.ndim))).min() > 1e-2
        assert got.shape == expected.shape
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


# ---- the wheel: bundles ship inside the package; outputs go to a user-writable place
IGNORED = {".git", ".venv", "models", "runs", "outputs", "eval", "build", "dist", "__pycache__", "results"}


@pytest.mark.slow
def test_wheel_installs_and_trains_and_registers_from_any_folder(tmp_path):
    """``pip wheel`` + ``pip install --no-deps`` into a fresh venv that sees the test venv's packages
    (nothing is downloaded), then ``regnet-zoo train`` / ``register`` from an unrelated folder: the packaged
    bundle runs and its outputs go to ``~/.regnet_zoo/<method>``, never into site-packages."""
    src, dist, venv = tmp_path / "src", tmp_path / "dist", tmp_path / "venv"
    shutil.copytree(
        regnet_zoo.project_root(), src, symlinks=True, ignore=lambda d, names: IGNORED & set(names)
    )
    build = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(dist)]
    subprocess.run([*build, str(src)], check=True, capture_output=True, timeout=300)
    wheel = next(dist.glob("regnet_zoo-*.whl"))
    make_venv = [sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)]
    subprocess.run(make_venv, check=True)
    python = str(venv / "bin" / "python")

    def py(code: str, **kwargs) -> str:
        out = subprocess.run([python, "-c", code], check=True, capture_output=True, text=True, **kwargs)
        return out.stdout

    own_site = py("import site; print(site.getsitepackages()[0])").strip()
    # the test venv's packages (torch, MONAI, ...) behind the new venv's own (a venv made from a venv sees
    # only the base interpreter's); its editable regnet_zoo is not picked up (no .pth processing there)
    Path(own_site, "_test_venv.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "REGNET_ZOO_HOME")}
    env.update(HOME=str(tmp_path / "home"), OMP_NUM_THREADS="1")
    install = [python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)]
    subprocess.run(install, check=True, env=env, capture_output=True, timeout=300)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    phantom_dir = default_dataset_dir(2)  # the built-in phantoms (cached)

    def run(*args: str) -> None:
        result = subprocess.run(
            [str(venv / "bin" / "regnet-zoo"), *args], cwd=elsewhere, env=env, capture_output=True, text=True,
            timeout=600,
        )
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]

    where = py("import regnet_zoo; print(regnet_zoo.bundle_dir('ddrnet'))", cwd=elsewhere, env=env)
    where = Path(where.strip())
    assert where.is_relative_to(own_site) and (where / "configs" / "train.yaml").is_file()
    size = "image_size=[32, 32]"
    run("train", "ddrnet", "--dataset-dir", str(phantom_dir), "--epochs", "1", size, "batch_size=16")
    assert (tmp_path / "home" / ".regnet_zoo" / "ddrnet" / "models" / "model.pt").is_file()
    assert not (where / "models").exists()  # nothing written into site-packages
    pair = Learn2RegDataset(phantom_dir).pairs("val")[0]
    run("register", "--method", "ddrnet", "--fixed", pair["fixed"], "--moving", pair["moving"], "--out=out")
    assert (elsewhere / "out" / "ddf_voxel.nii.gz").is_file()
