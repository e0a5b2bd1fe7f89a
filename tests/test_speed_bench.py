"""benchmarks/speed.py: the per-method sections run end to end at a tiny size (synthetic pair), merge into
an existing JSON without touching the core section, and record a failing method instead of stopping."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import speed  # noqa: E402


@pytest.mark.timeout(120)
def test_sections_merge_into_existing_json(tmp_path, monkeypatch):
    # no trained weights anywhere (an empty weights folder and bundle home): the networks are random init
    monkeypatch.setenv("REGNET_ZOO_PRETRAINED", str(tmp_path / "no_weights"))
    monkeypatch.setenv("REGNET_ZOO_HOME", str(tmp_path / "home"))
    out = tmp_path / "speed"
    keys = ("cpu", "torch", "torch_num_threads", "numba", "numba_threading_layer", "note", "memory")
    env = dict.fromkeys(keys, "x")
    core = {"env": {**env, "device": "cpu"}, "args": {"section": ["core"]}, "core": {"rows": []}}
    out.with_suffix(".json").write_text(json.dumps(core))
    speed.main([
        "--section", "methods", "instance", "--sizes", "32x32x32", "--methods", "bspline_unet",
        "--instance-methods", "bspline_unet", "--steps", "4", "--method-repeats", "1",
        "--data", str(tmp_path / "absent"), "--out", str(out),
    ])
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["core"] == core["core"] and report["env"] == core["env"]
    (row,) = report["methods"]["rows"]
    assert row["method"] == "bspline_unet" and row["seconds"] > 0 and 0 <= row["dice"] <= 1
    rate = row["gflop"] / row["seconds"]
    assert row["gflop"] > 0 and row["gflop_per_second"] == pytest.approx(rate, rel=0.01, abs=0.051)
    assert report["methods"]["reference_conv3d"]["gflop_per_second"] > 0
    assert "synthetic" in report["methods"]["pair"]["32x32x32"]
    (inst,) = report["instance"]["rows"]
    assert inst["coarse_to_fine_s"] > 0 and inst["full_resolution_s"] > 0
    assert report["instance"]["env"]["device"] == "cpu" and report["instance"]["args"]["steps"] == 4
    md = out.with_suffix(".md").read_text()
    assert "| 32x32x32 | bspline_unet | untrained (random init) |" in md
    figure = tmp_path / "speed_time.png"
    assert figure.stat().st_size > 5000 and "![registration time](speed_time.png)" in md


def test_forward_gflop_counts_a_convolution_analytically():
    class Pair(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv3d(2, 8, 3)

        def forward(self, fixed, moving):
            return self.conv(torch.cat([fixed, moving], 1))

    # 2 FLOP per multiply-add: 2 * C_in * C_out * 3^3 per output voxel of the valid 18x14x10 output
    expected = 2 * 2 * 8 * 27 * 18 * 14 * 10 / 1e9
    assert speed.forward_gflop(Pair(), (20, 16, 12)) == pytest.approx(expected, abs=0.0005)
    big = 2 * 2 * 8 * 27 * 98 * 98 * 98 / 1e9  # no data is allocated: the count runs on the meta device
    assert speed.forward_gflop(Pair(), (100, 100, 100)) == pytest.approx(big, abs=0.0005)


def test_a_failing_method_is_recorded_not_raised():
    def broken():
        raise ValueError("needs inputs of at least 54 voxels")

    row = speed._attempt({"method": "regnet"}, broken)
    assert row == {"method": "regnet", "error": "ValueError: needs inputs of at least 54 voxels"}


def test_synthetic_pair_is_labelled_and_shaped():
    pair = speed.load_pair((24, 20, 16), Path("/nonexistent"))
    assert pair["fixed"].shape == pair["fixed_label"].shape == (1, 1, 24, 20, 16)
    assert "synthetic" in pair["source"] and set(pair["evaluation"]) == {1, 2, 3}


def test_rerun_replaces_only_the_rows_it_measured():
    earlier = {"rows": [{"size": [64, 64, 64], "method": "pwc", "seconds": 1.0},
                        {"size": [32, 32, 32], "method": "pwc", "seconds": 0.5}]}
    new = {"rows": [{"size": [32, 32, 32], "method": "pwc", "seconds": 0.4}]}
    rows = speed._merge_rows(earlier, new)["rows"]
    assert sorted((r["size"][0], r["seconds"]) for r in rows) == [(32, 0.4), (64, 1.0)]


def test_merge_adds_other_runs_sections(tmp_path):
    other = tmp_path / "other.json"
    def row(edge):
        return {"size": [edge] * 3, "method": "sitk_bspline", "seconds": 2.0, "cpu_seconds": 3.0,
                "peak_mib": 1.0, "dice": 0.5}

    env = {k: "x" for k in ("device", "cpu", "cpu_count", "torch", "torch_num_threads", "memory")}
    other.write_text(json.dumps({"classic": {"env": env, "args": {}, "rows": [row(8)]}, "unrelated": 1}))
    out = tmp_path / "speed"
    out.with_suffix(".json").write_text(json.dumps({"classic": {"env": env, "args": {}, "rows": [row(4)]}}))
    speed.main(["--merge", str(other), "--out", str(out)])
    report = json.loads(out.with_suffix(".json").read_text())
    assert "unrelated" not in report and [r["size"][0] for r in report["classic"]["rows"]] == [4, 8]
    assert "| 8x8x8 | sitk_bspline |" in out.with_suffix(".md").read_text()
