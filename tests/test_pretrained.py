"""The shipped weights (regnet_zoo/pretrained, or $REGNET_ZOO_PRETRAINED): every file loads, fits its
bundle, registers a pair, and is what register / the bundles / the label app use when there are no weights
of one's own. While none ship, the same checks run on a file made by the training command, so these tests
never all skip."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from regnet_zoo import METHODS
from regnet_zoo.pretrained import (
    PRETRAINED_DIR,
    PRETRAINED_ENV,
    default_weights,
    model_card,
    pretrained_dir,
    shipped_files,
    weights_file,
    weights_image_size,
)
from regnet_zoo.weights import read_weights

SHIPPED = shipped_files()  # the package's files, or those of $REGNET_ZOO_PRETRAINED
MB = 1e6


@pytest.fixture(scope="module")
def made_weights(tmp_path_factory):
    """A tiny 2D file made by the training command (2 iterations, 32x32): the files' checks run on it
    when nothing ships."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import train_zoo

    folder = tmp_path_factory.mktemp("pretrained")
    args = ["--methods", "discrete_corr", "--dims", "2", "--max-iterations", "2", "--grid2d", "32", "32"]
    assert train_zoo.main([*args, "--threads", "1", "--half", "--out", str(folder)]) == 0
    return folder / "discrete_corr_2d.pt"


@pytest.fixture()
def shipped(made_weights, monkeypatch):
    """The first shipped file; else the made one, with the lookup pointed at its folder."""
    if SHIPPED:
        return SHIPPED[0]
    monkeypatch.setenv(PRETRAINED_ENV, str(made_weights.parent))
    return made_weights


def _method_dims(path):
    method, dims = path.stem.rsplit("_", 1)
    return method, int(dims[0])


def _plain(value):
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    return value


def test_every_weights_file_in_the_folder_is_checked():
    """No file escapes the parametrised checks below by its name; each has its record and model card."""
    folder = pretrained_dir()
    assert sorted(folder.glob("*.pt")) == SHIPPED, "a .pt file not named <method>_<2d|3d>.pt"
    for path in SHIPPED:
        method, dims = _method_dims(path)
        assert method in METHODS and dims in (2, 3), path.name
        assert path.with_suffix(".json").is_file(), f"{path.name} has no JSON record"
        assert (folder / f"{method}.md").is_file(), f"{method} has no model card"
    sizes = {p.name: p.stat().st_size for p in SHIPPED}
    assert max(sizes.values(), default=0) <= 15 * MB, sizes
    assert sum(sizes.values()) <= 60 * MB, sizes


def test_weights_folder_from_the_environment(made_weights, monkeypatch):
    monkeypatch.delenv(PRETRAINED_ENV, raising=False)
    assert pretrained_dir() == PRETRAINED_DIR
    monkeypatch.setenv(PRETRAINED_ENV, str(made_weights.parent))
    assert pretrained_dir() == made_weights.parent.resolve()
    assert shipped_files() == [made_weights]
    assert weights_file("discrete_corr", 2) == made_weights


def check_file_matches_its_bundle(path):
    """The file loads (weights_only), describes itself, and its network is its bundle's network_def for
    its dims: the same class, the same arguments, the same parameter shapes; the JSON record agrees."""
    from regnet_zoo.bundle import bundle_parser

    method, dims = _method_dims(path)
    state, meta = read_weights(path)
    assert meta is not None and meta["method"] == method and meta["spatial_dims"] == dims
    trained = meta["trained_on"]
    assert trained["dataset"] == "synthmorph" and trained["iterations"] >= 1
    assert meta["preprocessing"]["image_size"] == trained["grid"] and len(trained["grid"]) == dims
    assert {"regnet_zoo", "monai", "torch"} <= set(meta["versions"])
    record = json.loads(path.with_suffix(".json").read_text())
    assert record["trained_on"] == json.loads(json.dumps(trained))
    assert record["network"] == json.loads(json.dumps(meta["network"]))
    parser = bundle_parser(method, "train", spatial_dims=dims)
    assert meta["network"]["target"] == parser.get("network_def")["_target_"]
    bundle_args = {k: _plain(parser.get_parsed_content(f"network_def#{k}")) for k in meta["network"]["args"]}
    assert {k: _plain(v) for k, v in meta["network"]["args"].items()} == bundle_args
    built = parser.get_parsed_content("network_def", instantiate=True)
    assert {k: v.shape for k, v in built.state_dict().items()} == {k: v.shape for k, v in state.items()}
    assert all(torch.isfinite(v.float()).all() for v in state.values())


def check_file_registers_a_pair(path, home):
    """No own model (an empty REGNET_ZOO_HOME): register takes this file for the images' dims, resamples to
    its working grid; the field is finite, on the fixed grid, and the network changes it."""
    from regnet_zoo.api import register
    from regnet_zoo.api.methods import weights_path

    method, dims = _method_dims(path)
    assert weights_path(method, None, dims) == path
    fixed, moving, fixed_label, moving_label = _pair(dims)
    result = register(fixed, moving, method, fixed_label=fixed_label, moving_label=moving_label, affine=None)
    ddf = result.ddf_voxel
    assert ddf.shape[0] == dims and tuple(ddf.shape[1:]) == tuple(torch.as_tensor(result.warped).shape[1:])
    assert torch.isfinite(ddf).all()
    assert float(ddf.abs().max()) > 1e-3  # the network moved something
    assert 0.0 <= result.metrics["dice_mean"] <= 1.0


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_shipped_file_matches_its_bundle(path):
    check_file_matches_its_bundle(path)


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_shipped_file_registers_a_pair(path, tmp_path, monkeypatch):
    monkeypatch.setenv("REGNET_ZOO_HOME", str(tmp_path))
    check_file_registers_a_pair(path, tmp_path)


def test_file_checks_run_on_weights_made_by_the_training_command(shipped, tmp_path, monkeypatch):
    """The checks above, on a file that exists whether or not weights ship (the first shipped one, else a
    file the training command makes): they cannot all be skipped."""
    monkeypatch.setenv("REGNET_ZOO_HOME", str(tmp_path))
    check_file_matches_its_bundle(shipped)
    check_file_registers_a_pair(shipped, tmp_path)


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
    # and the bundle's inference runs with them as it is (built-in phantom pairs), writing fields
    from regnet_zoo.bundle import run_bundle

    run_bundle(method, "inference", bundle_root=str(tmp_path), spatial_dims=dims, device="cpu")
    ddfs = sorted((tmp_path / "outputs").glob("*_ddf.nii.gz"))
    assert ddfs, sorted((tmp_path / "outputs").iterdir())


def _zoo_eval():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import zoo_eval

    return zoo_eval


def test_zoo_eval_summary_and_card_say_where_a_method_loses():
    """The evaluation's verdicts (beats the affine stage; reaches SimpleITK B-spline at <= 1/10 of its time)
    and the model card's honest statement where a method does not."""
    zoo_eval = _zoo_eval()
    base = {"dataset": "prostate_mr_us", "pair": "p", "dims": 3, "status": "ok", "dice_initial": 0.3}
    base.update(dice_affine=0.6, tre_initial=6.0, tre_affine=3.0, affine_s=1.0, affine_similarity="mi")
    rows = [
        {**base, "method": "pwc", "instance_opt": 0, "dice": 0.65, "tre": 2.5, "network_s": 1.0},
        {**base, "method": "pwc", "instance_opt": 20, "dice": 0.70, "tre": 2.0, "network_s": 2.0},
        {**base, "method": "ddrnet", "instance_opt": 0, "dice": 0.55, "tre": 2.5, "network_s": 0.5},
        {**base, "method": "sitk_bspline", "instance_opt": 0, "dice": 0.70, "tre": 2.05, "network_s": 40.0},
    ]
    for row in rows:
        row["beats_affine"] = zoo_eval._beats(row)
    summary = {(s["method"], s["instance_opt"]): s for s in zoo_eval.summarise(rows)}
    assert summary["pwc", 0]["beats_affine"] and summary["pwc", 0]["vs_bspline"] is False
    assert summary["pwc", 20]["vs_bspline"] and summary["pwc", 20]["time_ratio"] == pytest.approx(0.05)
    assert summary["pwc", 20]["bspline_goal"] and not summary["pwc", 0]["bspline_goal"]
    assert summary["ddrnet", 0]["beats_affine"] is False  # Dice down although TRE is better
    card = model_card("ddrnet", PRETRAINED_DIR, {"rows": list(summary.values())})
    assert "does not beat the affine stage on: prostate_mr_us" in card
    assert "Does not reach SimpleITK B-spline's accuracy" in card
    card = model_card("pwc", PRETRAINED_DIR, {"rows": list(summary.values())})
    assert "beats the affine stage on: prostate_mr_us" in card and "prostate_mr_us (20 steps)" in card


def test_zoo_eval_merge_keeps_only_the_pairs_not_rerun():
    """``--merge``: after retraining one method, its new rows replace its old ones dataset by dataset; the
    other methods' and the SimpleITK references' rows of the earlier run stay (and are recorded)."""
    zoo_eval = _zoo_eval()
    old = [{"dataset": d, "method": m, "dice": 0.1} for d in ("head2d", "hands2d")
           for m in ("regnet", "pwc", "sitk_bspline")]  # fmt: skip
    earlier = {"command": "python zoo_eval.py", "date": "2026-11-26", "device": "CPU", "rows": old}
    new = [{"dataset": "head2d", "method": "regnet", "dice": 0.9}]
    rows, record = zoo_eval.merge_rows(earlier, new)
    assert new[0] in rows and len(rows) == 6
    regnet = {(r["dataset"], r["dice"]) for r in rows if r["method"] == "regnet"}
    assert regnet == {("head2d", 0.9), ("hands2d", 0.1)}
    assert record["methods"] == ["pwc", "regnet", "sitk_bspline"] and record["date"] == "2026-11-26"


def test_zoo_eval_demo_uses_the_weights_folder_and_writes_cards(made_weights, tmp_path, monkeypatch):
    """`make demo`'s command on the weights of $REGNET_ZOO_PRETRAINED (no training): a real 2D pair (or a
    built-in one without ../shared/data), rows for the method, and --cards writes its card there."""
    zoo_eval = _zoo_eval()
    monkeypatch.setenv(PRETRAINED_ENV, str(made_weights.parent))
    monkeypatch.setenv("REGNET_ZOO_HOME", str(tmp_path / "home"))
    out = tmp_path / "zoo_eval_2d"
    args = ["--demo", "--pairs", "head2d", "--methods", "discrete_corr", "--out", str(out), "--cards"]
    assert zoo_eval.main([*args, "--instance-opt", "0", "2"]) == 0
    result = json.loads(out.with_suffix(".json").read_text())
    rows = [r for r in result["rows"] if r["method"] == "discrete_corr" and r["dims"] == 2]
    assert rows and all(r["status"] == "ok" and 0 <= r["dice"] <= 1 for r in rows)
    # instance optimisation uses the pair's own similarity: MI for the T1 <- PD head, LNCC otherwise
    tuned = [r for r in rows if r["instance_opt"] == 2]
    expected = {r["dataset"]: "mi" if r["dataset"] == "head2d" else "lncc" for r in tuned}
    assert tuned and all(r["instance_similarity"] == expected[r["dataset"]] for r in tuned)
    assert rows[0]["weights"].endswith("discrete_corr_2d.pt")
    card = (made_weights.parent / "discrete_corr.md").read_text()
    assert "## Real pairs" in card and rows[0]["dataset"] in card


def test_register_warns_when_the_small_budget_shipped_weights_run_alone(shipped, tmp_path, monkeypatch):
    """The shipped weights alone often do worse than the affine stage: register says so, and how to do
    better (instance optimisation); not with instance optimisation, nor with weights one passes."""
    import warnings

    from regnet_zoo.api import register

    monkeypatch.setenv("REGNET_ZOO_HOME", str(tmp_path))
    method, dims = _method_dims(shipped)
    fixed, moving, _, _ = _pair(dims)
    with pytest.warns(UserWarning, match=r"shipped weights .*--instance-opt 20"):
        register(fixed, moving, method, affine=None)
    for kwargs in ({"instance_opt": 2}, {"weights": shipped}):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            register(fixed, moving, method, affine=None, **kwargs)
        assert not [w for w in caught if "shipped weights" in str(w.message)], kwargs
