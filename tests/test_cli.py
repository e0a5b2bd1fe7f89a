"""Command line (regnet_zoo.cli): train / register / warp / evaluate end to end, checked with SimpleITK, and
one-line errors with exit status 2 for bad input.

Runs ``main()`` in-process (a fresh interpreter per call would cost seconds of imports). The DDR-Net model is
trained here through ``regnet-zoo train`` (its bundle's train.yaml, one iteration on a small phantom set).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

import regnet_zoo
from regnet_zoo import METHODS
from regnet_zoo.cli import main, parse_overrides
from regnet_zoo.data.io import lps_to_voxel, save_image, save_landmarks

PACKAGED = [m for m in METHODS if (regnet_zoo.project_root() / "bundles" / m / "train.yaml").is_file()]
OUTPUTS = ("warped", "warped_label", "ddf_voxel", "ddf_itk", "jacobian")
METRIC_KEYS = (
    "dice", "dice_mean", "hd95_mm", "tre_mm", "tre_mm_initial", "sdlogj", "sdlogj_l2r", "folding_percent",
    "runtime_s", "peak_memory_mb",
)  # fmt: skip


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_input_error(code: int, err: str, match: str) -> None:
    """Exit status 2, exactly one ``regnet-zoo: error:`` line naming the problem, no traceback."""
    assert code == 2, err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and match in errors[0], err
    assert "Traceback" not in err


def sitk_array(image: sitk.Image) -> np.ndarray:
    arr = sitk.GetArrayFromImage(image)
    n = image.GetDimension()
    return np.transpose(arr, tuple(range(n - 1, -1, -1)) + ((n,) if arr.ndim > n else ()))


def rotated(arr: np.ndarray, path: Path, spacing, origin, angle: float) -> sitk.Image:
    """Write a 2D array (axis i = ITK index i) with a rotated direction and the given spacing/origin."""
    image = sitk.GetImageFromArray(np.ascontiguousarray(arr.T))
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    c, s = math.cos(angle), math.sin(angle)
    image.SetDirection([c, -s, s, c])
    sitk.WriteImage(image, str(path))
    return image


# ----------------------------------------------------------------------------------------------------------
# fixtures: data, a model trained through `regnet-zoo train`, one registration
# ----------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def phantom_dir(tmp_path_factory) -> Path:
    from regnet_zoo.data.phantom import make_phantom_dataset

    return make_phantom_dataset(tmp_path_factory.mktemp("phantom") / "ph", 2, n_subjects=4, size=32, n_val=2)


@pytest.fixture(scope="module")
def weights(phantom_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ddrnet_train")
    code = main(
        ["train", "ddrnet", "--dataset-dir", str(phantom_dir), "--epochs", "1",
         "--device", "cpu", "val_interval=1000", f"ckpt_dir={out / 'models'}", f"--log_dir={out / 'runs'}"]
    )  # fmt: skip
    assert code == 0
    assert (out / "models" / "model.pt").is_file()
    return out / "models" / "model.pt"


@pytest.fixture(scope="module")
def pair(phantom_dir, tmp_path_factory) -> dict[str, Path]:
    """Phantom subjects 3 (fixed) and 4 (moving) rewritten on rotated, anisotropic, different grids, with
    labels and landmarks (LPS mm of the new geometry)."""
    root = tmp_path_factory.mktemp("pair")
    files: dict[str, Path] = {}
    geometry = {"fixed": ((1.4, 0.8), (20.0, -10.0), 0.5), "moving": ((1.1, 1.25), (15.0, -20.0), -0.15)}
    for role, case in (("fixed", 3), ("moving", 4)):
        stem = f"PHANTOM2D_{case:04d}_0000"
        image = nib.load(str(phantom_dir / "imagesTr" / f"{stem}.nii.gz"))
        label = np.asarray(nib.load(str(phantom_dir / "labelsTr" / f"{stem}.nii.gz")).dataobj)
        spacing, origin, angle = geometry[role]
        arr = np.asarray(image.dataobj, dtype=np.float32).reshape(32, 32)
        written = rotated(arr, root / f"{role}.nii.gz", spacing, origin, angle)
        rotated(label.reshape(32, 32).astype(np.int16), root / f"{role}_label.nii.gz", spacing, origin, angle)
        # the phantom's keypoints (LPS mm of its own grid) -> voxels -> LPS mm of the new grid
        points = np.loadtxt(phantom_dir / "keypointsTr" / f"{stem}.csv", delimiter=",", skiprows=1)
        voxels = lps_to_voxel(points, image.affine)
        moved = [written.TransformContinuousIndexToPhysicalPoint(v.tolist()) for v in voxels]
        save_landmarks(np.array(moved), root / f"{role}_landmarks.csv")
        files.update({role: root / f"{role}.nii.gz", f"{role}_label": root / f"{role}_label.nii.gz"})
        files[f"{role}_landmarks"] = root / f"{role}_landmarks.csv"
    return files


def register_args(pair: dict[str, Path], weights: Path, out: Path, *extra) -> list:
    return [
        "register", "--method", "ddrnet", "--fixed", pair["fixed"], "--moving", pair["moving"],
        "--fixed-label", pair["fixed_label"], "--moving-label", pair["moving_label"],
        "--fixed-landmarks", pair["fixed_landmarks"], "--moving-landmarks", pair["moving_landmarks"],
        "--weights", weights, "--out", out, *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def registered(pair, weights, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("registered") / "out"
    assert main([str(a) for a in register_args(pair, weights, out)]) == 0
    return out


# ----------------------------------------------------------------------------------------------------------
# register / warp / evaluate
# ----------------------------------------------------------------------------------------------------------
def test_register_writes_outputs_that_simpleitk_reproduces(registered, pair):
    for name in OUTPUTS:
        assert (registered / f"{name}.nii.gz").is_file()
    assert not list(registered.glob(".*tmp*"))  # no temporary files left behind
    metrics = json.loads((registered / "metrics.json").read_text())
    assert set(METRIC_KEYS) <= set(metrics)
    assert all(v is not None for k, v in metrics.items() if k != "dice")
    assert metrics["tre_mm_initial"] > 0 and metrics["runtime_s"] > 0
    # the round trip: SimpleITK resampling of the moving image with ddf_itk.nii.gz == warped.nii.gz
    fixed, moving = sitk.ReadImage(str(pair["fixed"])), sitk.ReadImage(str(pair["moving"]))
    field = sitk.ReadImage(str(registered / "ddf_itk.nii.gz"), sitk.sitkVectorFloat64)
    np.testing.assert_allclose(field.GetDirection(), fixed.GetDirection(), atol=1e-6)
    np.testing.assert_allclose(field.GetSpacing(), fixed.GetSpacing(), rtol=1e-6)
    transform = sitk.DisplacementFieldTransform(sitk.Image(field))  # the transform takes the pixels
    expected = sitk_array(sitk.Resample(moving, fixed, transform, sitk.sitkLinear, 0.0))
    warped = sitk_array(sitk.ReadImage(str(registered / "warped.nii.gz")))
    assert np.abs(expected).max() > 0.5  # an actual image, not an empty overlap
    np.testing.assert_allclose(warped, expected, atol=1e-4)
    expected_label = sitk_array(
        sitk.Resample(sitk.ReadImage(str(pair["moving_label"])), fixed, transform, sitk.sitkNearestNeighbor)
    )
    warped_label = sitk_array(sitk.ReadImage(str(registered / "warped_label.nii.gz")))
    assert (warped_label != expected_label).mean() < 1e-3
    # Learn2Reg convention on disk: fixed grid, voxel units, vector last; mm = direction @ spacing @ voxels
    voxel = nib.load(str(registered / "ddf_voxel.nii.gz")).get_fdata()[:, :, 0, :]
    assert voxel.shape == (32, 32, 2)
    linear = np.array(fixed.GetDirection()).reshape(2, 2) @ np.diag(fixed.GetSpacing())
    np.testing.assert_allclose(voxel @ linear.T, sitk_array(field), atol=1e-4)


def test_register_refuses_a_folder_with_results_unless_overwrite(registered, pair, weights, capsys):
    before = (registered / "metrics.json").read_text()
    code, _, err = run(capsys, *register_args(pair, weights, registered))
    assert_input_error(code, err, "holds results")
    assert (registered / "metrics.json").read_text() == before
    code, out, _ = run(
        capsys, *register_args(pair, weights, registered, "--overwrite", "--instance-opt", "2")
    )
    assert code == 0 and json.loads(out)["dice_mean"] is not None
    code, out, _ = run(
        capsys,
        *register_args(
            pair, weights, registered, "--overwrite", "--instance-opt", "2", "--instance-similarity", "lncc"
        ),
    )
    assert code == 0 and json.loads(out)["dice_mean"] is not None


def test_interrupted_register_leaves_no_half_written_file(pair, weights, tmp_path, capsys, monkeypatch):
    def write_then_die(image, path):
        Path(path).write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(sitk, "WriteImage", write_then_die)
    code, _, _ = run(capsys, *register_args(pair, weights, tmp_path / "out"))
    assert code == 130
    assert not (tmp_path / "out" / "ddf_itk.nii.gz").exists()
    assert not [p for p in (tmp_path / "out").iterdir() if "tmp" in p.name]


@pytest.mark.parametrize("ddf_name", ["ddf_voxel.nii.gz", "ddf_itk.nii.gz"])
def test_warp_command_reproduces_register_outputs(registered, pair, ddf_name, tmp_path, capsys):
    ddf = registered / ddf_name
    code, _, err = run(capsys, "warp", "--moving", pair["moving"], "--ddf", ddf, "--fixed", pair["fixed"],
                       "--out", tmp_path / "w.nii.gz")  # fmt: skip
    assert code == 0, err
    warped = nib.load(str(registered / "warped.nii.gz")).get_fdata()
    np.testing.assert_allclose(nib.load(str(tmp_path / "w.nii.gz")).get_fdata(), warped, atol=1e-4)
    np.testing.assert_allclose(
        nib.load(str(tmp_path / "w.nii.gz")).affine, nib.load(str(pair["fixed"])).affine
    )
    label_args = ["--moving", pair["moving_label"], "--ddf", ddf, "--fixed", pair["fixed"], "--nearest"]
    code, _, err = run(capsys, "warp", *label_args, "--out", tmp_path / "l.nii.gz")
    assert code == 0, err
    label = nib.load(str(tmp_path / "l.nii.gz"))
    assert np.issubdtype(label.get_data_dtype(), np.integer)
    expected = np.asarray(nib.load(str(registered / "warped_label.nii.gz")).dataobj)
    assert (np.asarray(label.dataobj) != expected).mean() < 1e-3
    code, _, err = run(capsys, "warp", "--moving", pair["moving"], "--ddf", ddf, "--fixed", pair["fixed"],
                       "--out", tmp_path / "w.nii.gz")  # fmt: skip
    assert_input_error(code, err, "exists")


def test_evaluate_command_matches_register_metrics(registered, pair, capsys):
    code, out, err = run(
        capsys, "evaluate", "--ddf", registered / "ddf_voxel.nii.gz", "--fixed", pair["fixed"],
        "--fixed-label", pair["fixed_label"], "--moving-label", pair["moving_label"],
        "--fixed-landmarks", pair["fixed_landmarks"], "--moving-landmarks", pair["moving_landmarks"],
    )  # fmt: skip
    assert code == 0, err
    evaluated = json.loads(out)
    saved = json.loads((registered / "metrics.json").read_text())
    for key in (
        "dice_mean",
        "hd95_mm",
        "tre_mm",
        "tre_mm_initial",
        "sdlogj",
        "sdlogj_l2r",
        "folding_percent",
    ):
        assert evaluated[key] == pytest.approx(saved[key], abs=1e-4), key
    assert evaluated["dice"] == pytest.approx(saved["dice"], abs=1e-4)
    assert "runtime_s" not in evaluated
    # without labels / landmarks those metrics are absent (never 0)
    code, out, _ = run(capsys, "evaluate", "--ddf", registered / "ddf_itk.nii.gz", "--fixed", pair["fixed"])
    assert code == 0
    assert not {"dice", "dice_mean", "hd95_mm", "tre_mm"} & set(json.loads(out))


def test_evaluate_learn2reg_submission(phantom_dir, tmp_path, capsys):
    """The phantom's exact ground-truth DDFs (ddfsTr/disp_FFFF_MMMM) as a submission beat a zero field."""
    code, out, err = run(capsys, "evaluate", "--dataset", phantom_dir, "--ddf", phantom_dir / "ddfsTr")
    assert code == 0, err
    truth = json.loads(out)
    assert sorted(truth["pairs"]) == ["disp_0003_0004", "disp_0004_0003"]
    zeros = tmp_path / "zeros"
    for name in truth["pairs"]:
        save_image(np.zeros((2, 32, 32), np.float32), zeros / f"{name}.nii.gz")
    code, out, _ = run(capsys, "evaluate", "--dataset", phantom_dir, "--ddf", zeros)
    zero = json.loads(out)
    assert truth["summary"]["tre_mm"]["mean"] < 0.1 < zero["summary"]["tre_mm"]["mean"]
    assert zero["summary"]["tre_mm"]["mean"] == pytest.approx(zero["summary"]["tre_mm_initial"]["mean"])
    assert truth["summary"]["dice_mean"]["mean"] > zero["summary"]["dice_mean"]["mean"] + 0.1
    assert truth["summary"]["num_pairs"] == 2
    (zeros / "disp_0004_0003.nii.gz").unlink()
    code, _, err = run(capsys, "evaluate", "--dataset", phantom_dir, "--ddf", zeros)
    assert_input_error(code, err, "missing displacement files")


# ----------------------------------------------------------------------------------------------------------
# bad input: one line, exit status 2
# ----------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bad_files(pair, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bad")
    fixed = nib.load(str(pair["fixed"]))
    data = np.asarray(fixed.dataobj, dtype=np.float32)
    nib.save(
        nib.Nifti1Image(np.random.rand(8, 9, 10).astype(np.float32), np.eye(4)), str(root / "vol3d.nii.gz")
    )
    nan = data.copy()
    nan[3, 4] = np.nan
    nib.save(nib.Nifti1Image(nan, fixed.affine), str(root / "nan.nii.gz"))
    nib.save(nib.Nifti1Image(data * 0.37, fixed.affine), str(root / "float_label.nii.gz"))
    (root / "outside.csv").write_text("x,y\n1e4,2e4\n")
    return {
        "vol3d": root / "vol3d.nii.gz", "nan": root / "nan.nii.gz",
        "float_label": root / "float_label.nii.gz", "outside": root / "outside.csv",
    }  # fmt: skip


BAD_INPUTS = {
    "unknown method": (["--method", "voxelmorph"], "unknown method 'voxelmorph'"),
    "missing file": (["--moving", "/nonexistent/moving.nii.gz"], "file not found"),
    "2D vs 3D": (["--moving", "@vol3d"], "same dimensionality"),
    "NaN image": (["--moving", "@nan"], "non-finite"),
    "non-integer label": (["--moving-label", "@float_label"], "not integer-valued"),
    "landmarks outside": (["--fixed-landmarks", "@outside"], "outside the image"),
    "missing model": (["--weights", "/nonexistent/model.pt"], "regnet-zoo train ddrnet"),
    "negative instance-opt": (["--instance-opt", "-3"], "instance_opt"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_register_bad_input_is_one_line_and_exit_2(case, pair, bad_files, tmp_path, capsys):
    change, message = BAD_INPUTS[case]
    args = {
        "--method": "ddrnet", "--fixed": pair["fixed"], "--moving": pair["moving"],
        "--fixed-label": pair["fixed_label"], "--moving-label": pair["moving_label"],
        "--fixed-landmarks": pair["fixed_landmarks"], "--moving-landmarks": pair["moving_landmarks"],
        "--weights": "/nonexistent/weights-not-reached.pt", "--out": tmp_path / "out",
    }  # fmt: skip
    for key, value in zip(change[::2], change[1::2], strict=True):
        args[key] = bad_files[value[1:]] if str(value).startswith("@") else value
    code, _, err = run(capsys, "register", *[str(x) for kv in args.items() for x in kv])
    assert_input_error(code, err, message)
    assert not (tmp_path / "out").exists()  # nothing written


def test_other_bad_input(pair, bad_files, tmp_path, capsys):
    code, _, err = run(capsys, "register", "--fixed", pair["fixed"])  # usage error
    assert_input_error(code, err, "required")
    code, _, err = run(capsys, "evaluate", "--ddf", bad_files["nan"], "--fixed", pair["fixed"])
    assert_input_error(code, err, "non-finite")
    code, _, err = run(capsys, "evaluate", "--ddf", pair["fixed"], "--fixed", pair["fixed"])
    assert_input_error(code, err, "displacement field")
    code, _, err = run(capsys, "train", "ddrnet", "--dataset-dir", tmp_path / "missing")
    assert_input_error(code, err, "dataset folder not found")
    code, _, err = run(capsys, "train", "ddrnet", "orphan")
    assert_input_error(code, err, "KEY=VALUE")


def test_help_documents_landmark_convention(capsys):
    for argv in (["--help"], ["register", "--help"], ["evaluate", "--help"]):
        code, out, _ = run(capsys, *argv)
        assert code == 0
        text = " ".join(out.split())
        assert "LPS" in text and "TransformIndexToPhysicalPoint" in text and "header row" in text


def test_parse_overrides():
    tokens = ["epochs=3", "--network_def#overlap", "4", "--lr=1e-3", "name=abc", "x=[1, 2]", "flag=true"]
    expected = {"epochs": 3, "network_def#overlap": 4, "lr": 1e-3, "name": "abc", "x": [1, 2], "flag": True}
    assert parse_overrides(tokens) == expected


# ----------------------------------------------------------------------------------------------------------
# command-line habits: label maps in warp, unknown overrides, one spelling per flag
# ----------------------------------------------------------------------------------------------------------
@pytest.fixture()
def shift_files(tmp_path) -> dict[str, Path]:
    """A 2D fixed image, a DDF moving every voxel by +2 along axis 0, and one label map stored as int16 and
    as float64 (as ../shared/data/prostate_mr_us stores its labels)."""
    rng = np.random.default_rng(0)
    shape = (12, 10)
    files = {"fixed": tmp_path / "fixed.nii.gz", "ddf": tmp_path / "ddf.nii.gz"}
    nib.save(nib.Nifti1Image(rng.random(shape).astype(np.float32), np.eye(4)), files["fixed"])
    ddf = np.zeros((2, *shape), np.float32)
    ddf[0] = 2.0  # warped(x) = moving(x + 2 e_0)
    save_image(ddf, files["ddf"], affine=np.eye(4))
    label = rng.integers(0, 4, shape) * 3
    for dtype in ("int16", "float64"):
        files[dtype] = tmp_path / f"label_{dtype}.nii.gz"
        nib.save(nib.Nifti1Image(label.astype(dtype), np.eye(4)), files[dtype])
    return files


@pytest.mark.parametrize("stored", ["int16", "float64"])
def test_warp_label_map_needs_nearest_and_stays_integer(shift_files, stored, tmp_path, capsys):
    files, out = shift_files, tmp_path / "out.nii.gz"
    common = ["warp", "--moving", files[stored], "--ddf", files["ddf"], "--fixed", files["fixed"]]
    common += ["--out", out]
    code, _, err = run(capsys, *common)
    assert_input_error(code, err, "--nearest")
    assert len(err.strip().splitlines()) == 1
    assert not out.exists()
    code, _, err = run(capsys, *common, "--nearest")
    assert code == 0, err
    written = nib.load(str(out))
    assert np.issubdtype(written.get_data_dtype(), np.integer)
    label = np.asarray(nib.load(str(files[stored])).dataobj)
    expected = np.zeros_like(label)
    expected[:-2] = label[2:]  # 0 beyond the moving grid (more than half a voxel outside)
    np.testing.assert_array_equal(np.asarray(written.dataobj), expected)
    code, _, err = run(capsys, *common, "--nearest", "--linear", "--overwrite")
    assert_input_error(code, err, "not allowed with")


def test_warp_linear_interpolates_integer_intensities(shift_files, tmp_path, capsys):
    out = tmp_path / "out.nii.gz"
    code, _, err = run(capsys, "warp", "--moving", shift_files["int16"], "--ddf", shift_files["ddf"],
                       "--fixed", shift_files["fixed"], "--linear", "--out", out)  # fmt: skip
    assert code == 0, err
    assert np.issubdtype(nib.load(str(out)).get_data_dtype(), np.floating)


@pytest.mark.parametrize(
    ("override", "suggestion"),
    [
        (["--lerning_rate", "0.1"], "learning_rate"),
        (["--lerning-rate", "0.1"], "learning_rate"),
        (["network_def#overlapp=4"], "network_def#overlap"),
        (["--epochs", "1", "optimizer#lrr=0.1"], "optimizer#lr"),
    ],
)
def test_train_rejects_an_unknown_override_with_close_matches(override, suggestion, capsys):
    code, _, err = run(capsys, "train", "ddrnet", *override)
    assert_input_error(code, err, f"did you mean {suggestion}?")
    assert len(err.strip().splitlines()) == 1


def test_run_bundle_rejects_an_unknown_override():
    from regnet_zoo.bundle import check_overrides, run_bundle
    from regnet_zoo.errors import RegistrationInputError

    with pytest.raises(RegistrationInputError, match="did you mean learning_rate"):
        run_bundle("ddrnet", "train", lerning_rate=0.1)
    with pytest.raises(RegistrationInputError, match="did you mean network_def#overlap"):
        run_bundle("ddrnet", "train", network_def__overlapp=4)
    with pytest.raises(RegistrationInputError, match="epochs is a value"):
        check_overrides("ddrnet", "train", {"epochs#max": 1})
    # present keys, and constructor arguments that the config leaves at their defaults, are accepted
    check_overrides("ddrnet", "train", {"learning_rate": 0.1, "network_def#integration_steps": 5})
    check_overrides("pwc", "evaluate", {"image_size": [40, 40], "network_def__level_warps": True})


def test_hyphenated_override_flags_are_config_ids():
    assert parse_overrides(["--image-size", "[8, 8]", "--batch-size=2", "a_b-c=1"]) == {
        "image_size": [8, 8],
        "batch_size": 2,
        "a_b-c": 1,  # KEY=VALUE keeps the config id as written
    }


def test_one_spelling_per_flag_in_help_and_readme(capsys):
    """Every option in ``--help`` and every flag of a ``regnet-zoo`` command in README.md uses hyphens; the
    old underscore spelling of ``train --spatial-dims`` is a hidden alias that keeps the flag's check."""
    import re

    flags = set()
    for argv in (["--help"], *[[c, "--help"] for c in ("register", "warp", "evaluate", "train", "serve")]):
        code, out, _ = run(capsys, *argv)
        assert code == 0
        flags |= set(re.findall(r"(?<![\w-])--[A-Za-z][\w-]*", out))
    assert "--spatial-dims" in flags and "--nearest" in flags
    assert not [f for f in flags if "_" in f]
    readme = (regnet_zoo.project_root() / "README.md").read_text()
    commands = [line for line in readme.splitlines() if "regnet-zoo " in line and " --" in line]
    used = set(re.findall(r"(?<![\w-])--[A-Za-z][\w#-]*", "\n".join(commands)))
    assert "--spatial-dims" in used and not [f for f in used if "_" in f]
    code, _, err = run(capsys, "train", "ddrnet", "--spatial_dims", "4")
    assert_input_error(code, err, "invalid choice")
