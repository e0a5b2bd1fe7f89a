"""benchmarks/train_zoo.py at a tiny budget: the command that makes the shipped weights writes loadable,
self-describing half-precision weights, a JSON record and a model card, and never replaces them unasked."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


def test_train_zoo_writes_self_describing_weights(tmp_path):
    import train_zoo

    from regnet_zoo.bundle import load_bundle_weights
    from regnet_zoo.weights import read_weights

    args = ["--methods", "discrete_corr", "--dims", "2", "--max-iterations", "2", "--grid2d", "32", "32"]
    args += ["--half", "--threads", "1", "--out", str(tmp_path)]
    assert train_zoo.main(args) == 0
    path = tmp_path / "discrete_corr_2d.pt"
    state, meta = read_weights(path)
    assert all(v.dtype == torch.float16 for v in state.values() if v.is_floating_point())
    trained = meta["trained_on"]
    assert trained["dataset"] == "synthmorph" and trained["iterations"] == 2 and trained["grid"] == [32, 32]
    assert meta["preprocessing"]["image_size"] == [32, 32] and meta["spatial_dims"] == 2
    assert 0.0 <= trained["validation"]["val_dice"] <= 1.0  # held-out synthetic pairs (another seed)
    assert trained["validation"]["seed"] != trained["seed"]
    assert json.loads((tmp_path / "discrete_corr_2d.json").read_text())["trained_on"]["iterations"] == 2
    assert "train_zoo.py" in (tmp_path / "discrete_corr.md").read_text()
    network, _ = load_bundle_weights("discrete_corr", path, spatial_dims=2)  # half -> float32 network
    with torch.no_grad():
        out = network(torch.rand(1, 1, 32, 32), torch.rand(1, 1, 32, 32))
    assert out["ddf"].shape == (1, 2, 32, 32) and torch.isfinite(out["ddf"]).all()
    with pytest.raises(SystemExit, match="--overwrite"):
        train_zoo.main(args)


def test_per_method_minutes_replace_the_common_budget(tmp_path, capsys):
    """``--minutes METHOD=MIN``: a zero budget stops after the first iteration although the common budget
    and the iteration limit allow more; malformed or unknown items are refused."""
    import train_zoo

    args = ["--methods", "discrete_corr", "--dims", "2", "--grid2d", "32", "32", "--max-iterations", "50"]
    args += ["--minutes-per-method", "5", "--minutes", "discrete_corr=0", "--threads", "1"]
    args += ["--out", str(tmp_path)]
    assert train_zoo.main(args) == 0
    assert json.loads((tmp_path / "discrete_corr_2d.json").read_text())["trained_on"]["iterations"] == 1
    for bad in ("discrete_corr", "nosuchmethod=3"):
        with pytest.raises(SystemExit):
            train_zoo.main([*args[:-2], "--minutes", bad, "--out", str(tmp_path / "bad")])
    assert not (tmp_path / "bad").exists()


def test_set_overrides_the_bundle_config_and_is_recorded(tmp_path):
    """``--set KEY=VALUE`` (JSON values) goes on top of the synthetic overrides: RegNet's near-zero last layer
    (``network_def#output_init_std``, 1e-5 by default for synthetic training) is switched back to PyTorch's
    default, and the weights record says so."""
    import train_zoo

    assert train_zoo.SYNTH_OVERRIDES["regnet"]["network_def#output_init_std"] == 1e-5
    args = ["--methods", "regnet", "--dims", "2", "--max-iterations", "1", "--grid2d", "64", "64"]
    args += ["--threads", "1", "--set", "network_def#output_init_std=null", "--out", str(tmp_path)]
    assert train_zoo.main(args) == 0
    record = json.loads((tmp_path / "regnet_2d.json").read_text())
    assert record["trained_on"]["loss_overrides"]["network_def#output_init_std"] is None
    assert record["network"]["args"]["output_init_std"] is None
    with pytest.raises(SystemExit):
        train_zoo.main([*args[:-4], "--set", "no_equals_sign", "--out", str(tmp_path / "bad")])
