"""Bad input at every entry point: the CLI (register, warp, evaluate, train), the Python API (files and
tensors), bundle runs and label-server uploads. Each case must give one clear line (CLI: exit 2, one
``regnet-zoo: error:`` line on stderr, no traceback; API / bundle: ``RegistrationInputError``; server: HTTP
4xx with a ``detail``) that names the problem, and must leave every existing file untouched.

Decided behaviour, case by case (the ``CASES`` table below is the specification):

======================================  =========================================================
input                                   behaviour
======================================  =========================================================
missing / empty / truncated file        error naming the file (not found / cannot read)
4D image (time series, vector image)    error: "N channels (a 4D or vector image?)"
2D fixed with 3D moving                 error: same dimensionality needed
zero / negative / huge (>= 1e6 mm)      error: voxel spacing not usable (a flip belongs in the
voxel spacing                           direction matrix, not in a negative spacing)
flipped directions (negative axes in    valid: registers (exit 0), outputs on the fixed grid with
the affine / ITK direction matrix)      the fixed image's affine
float label map                         error: not integer-valued
label map with > 1000 labels            error: "N distinct labels ... is this an image?"
NaN landmarks / landmarks outside       error naming the CSV
dataset.json naming missing files       error naming the JSON and the missing file
an output that exists                   error unless --overwrite; the file is kept as it was
======================================  =========================================================
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch
from monai.data import MetaTensor

from regnet_zoo.cli import main
from regnet_zoo.errors import RegistrationInputError

SIZE = 24


def _blob(center) -> np.ndarray:
    grid = np.stack(np.meshgrid(np.arange(SIZE), np.arange(SIZE), indexing="ij"))
    return np.exp(-((grid - np.array(center)[:, None, None]) ** 2).sum(0) / 40).astype(np.float32)


def _nifti(path: Path, array: np.ndarray, affine=None) -> Path:
    nib.save(nib.Nifti1Image(array, np.eye(4) if affine is None else affine), str(path))
    return path


def _mha(path: Path, array: np.ndarray, spacing: str = "1 1", direction=(1.0, 0.0, 0.0, 1.0)) -> Path:
    """A MetaImage whose header spacing is written as given (SimpleITK refuses to write a zero spacing)."""
    image = sitk.GetImageFromArray(array)
    image.SetDirection(direction)
    sitk.WriteImage(image, str(path))
    path.write_bytes(
        path.read_bytes().replace(b"ElementSpacing = 1 1", f"ElementSpacing = {spacing}".encode())
    )
    return path


@pytest.fixture(scope="module")
def d(tmp_path_factory) -> Path:
    """Every input file of the table, and untrained 2D DDR-Net weights (the plumbing is what is tested)."""
    from regnet_zoo.bundle import load_bundle_network

    d = tmp_path_factory.mktemp("bad")
    torch.save(load_bundle_network("ddrnet", load_weights=False, spatial_dims=2).state_dict(), d / "w.pt")
    fixed = _nifti(d / "fixed.nii.gz", _blob((12, 11)))
    _nifti(d / "moving.nii.gz", _blob((10, 13)))
    _nifti(d / "label.nii.gz", (_blob((10, 13)) > 0.4).astype(np.int16))
    (d / "empty.nii.gz").write_bytes(b"")
    data = fixed.read_bytes()
    (d / "truncated.nii.gz").write_bytes(data[: len(data) // 2])
    _nifti(d / "4d.nii.gz", np.random.default_rng(0).random((SIZE, SIZE, 6, 3)).astype(np.float32))
    _nifti(d / "3d.nii.gz", np.random.default_rng(0).random((SIZE, SIZE, 6)).astype(np.float32))
    zero = nib.Nifti1Image(_blob((12, 11)), None)  # no qform/sform: the voxel size comes from pixdim
    zero.header["pixdim"][1] = 0
    zero.set_qform(None, code=0)
    zero.set_sform(None, code=0)
    nib.save(zero, str(d / "zero.nii.gz"))
    _mha(d / "zero.mha", _blob((12, 11)), "0 1")
    _mha(d / "negative.mha", _blob((12, 11)), "-1 1")
    _mha(d / "huge.mha", _blob((12, 11)), "1e30 1e30")
    _mha(d / "flipped.mha", _blob((12, 11)), "1 1.5", (-1.0, 0.0, 0.0, -1.0))
    _nifti(d / "flipped.nii.gz", _blob((12, 11)), np.diag([-1.2, 1.0, 1.0, 1.0]))
    _nifti(d / "float_label.nii.gz", _blob((10, 13)))
    _nifti(d / "many_labels.nii.gz", np.arange(100 * 100, dtype=np.int32).reshape(100, 100))
    (d / "nan.csv").write_text("-1,-2\nnan,-3\n")
    (d / "ok.csv").write_text("-1,-2\n-3,-4\n")
    (d / "outside.csv").write_text("-1,-2\n-500,-4\n")
    (d / "results").mkdir()
    (d / "results" / "warped.nii.gz").write_bytes(b"keep me")
    (d / "existing.nii.gz").write_bytes(b"keep me too")
    # a Learn2Reg folder whose dataset.json names a file that is not there
    (d / "l2r" / "imagesTr").mkdir(parents=True)
    shutil.copy(fixed, d / "l2r" / "imagesTr" / "a_0000.nii.gz")
    info = {
        "tensorImageSize": "2D",
        "training": [{"image": "./imagesTr/a_0000.nii.gz"}, {"image": "./imagesTr/b_0000.nii.gz"}],
        "registration_val": [{"fixed": "./imagesTr/a_0000.nii.gz", "moving": "./imagesTr/b_0000.nii.gz"}],
    }
    (d / "l2r" / "dataset.json").write_text(json.dumps(info))
    (d / "disp").mkdir()
    _nifti(d / "ddf.nii.gz", np.zeros((SIZE, SIZE, 1, 2), np.float32))  # Learn2Reg layout: a zero field
    return d


def _register(fixed="fixed.nii.gz", moving="moving.nii.gz", *extra: str) -> Callable[[Path], list[str]]:
    def argv(d: Path) -> list[str]:
        args = [str(d / a) if a.endswith((".gz", ".mha", ".csv")) or a == "results" else a for a in extra]
        out = [] if "--out" in extra else ["--out", str(d / "out")]
        return [
            "register",
            "--fixed",
            str(d / fixed),
            "--moving",
            str(d / moving),
            "--weights",
            str(d / "w.pt"),
            *out,
            *args,
        ]

    return argv


def _labels(moving_label: str) -> Callable[[Path], list[str]]:
    return _register(
        "fixed.nii.gz", "moving.nii.gz", "--fixed-label", "label.nii.gz", "--moving-label", moving_label
    )


def _landmarks(fixed_csv: str) -> Callable[[Path], list[str]]:
    return _register(
        "fixed.nii.gz", "moving.nii.gz", "--fixed-landmarks", fixed_csv, "--moving-landmarks", "ok.csv"
    )


@dataclass
class Case:
    name: str
    argv: Callable[[Path], list[str]]
    says: str  # a part of the one-line message (regular expression)


CLI_CASES = [
    Case("missing file", _register("nosuch.nii.gz"), r"nosuch.nii.gz: file not found"),
    Case("empty file", _register("empty.nii.gz"), r"empty.nii.gz: cannot read image"),
    Case(
        "truncated file",
        _register("fixed.nii.gz", "truncated.nii.gz"),
        r"truncated.nii.gz: cannot read image",
    ),
    Case(
        "4D image", _register("4d.nii.gz", "3d.nii.gz"), r"4d.nii.gz: 3 channels \(a 4D or vector image\?\)"
    ),
    Case(
        "2D vs 3D", _register("fixed.nii.gz", "3d.nii.gz"), r"moving image is 3D but the fixed image .* is 2D"
    ),
    Case("zero spacing (NIfTI)", _register("zero.nii.gz"), r"zero.nii.gz: voxel sizes \[0.0, 1.0\]"),
    Case(
        "zero spacing (MHA)", _register("zero.mha"), r"zero.mha: voxel spacing \[0.0, 1.0\] is not positive"
    ),
    Case("negative spacing", _register("negative.mha"), r"negative.mha: voxel spacing \[-1.0, 1.0\]"),
    Case(
        "huge spacing", _register("huge.mha"), r"huge.mha: voxel spacing \[1e\+30, 1e\+30\] mm is not usable"
    ),
    Case(
        "float label map",
        _labels("float_label.nii.gz"),
        r"float_label.nii.gz: label map is not integer-valued",
    ),
    Case(
        "10,000-label map", _labels("many_labels.nii.gz"), r"many_labels.nii.gz: label map has 9999 distinct"
    ),
    Case("NaN landmarks", _landmarks("nan.csv"), r"nan.csv: landmark coordinates hold NaN"),
    Case(
        "landmarks outside", _landmarks("outside.csv"), r"outside.csv: 1 landmark\(s\) lie outside the image"
    ),
    Case(
        "output exists",
        _register("fixed.nii.gz", "moving.nii.gz", "--out", "results"),
        r"results: output folder holds results",
    ),
    Case(
        "warp: truncated field",
        lambda d: [
            "warp",
            "--moving",
            str(d / "moving.nii.gz"),
            "--ddf",
            str(d / "truncated.nii.gz"),
            "--fixed",
            str(d / "fixed.nii.gz"),
            "--out",
            str(d / "warped_out.nii.gz"),
        ],
        r"truncated.nii.gz: cannot read displacement field",
    ),
    Case(
        "warp: output exists",
        lambda d: [
            "warp",
            "--moving",
            str(d / "moving.nii.gz"),
            "--ddf",
            str(d / "ddf.nii.gz"),
            "--fixed",
            str(d / "fixed.nii.gz"),
            "--out",
            str(d / "existing.nii.gz"),
        ],
        r"existing.nii.gz",
    ),
    Case(
        "evaluate: NaN landmarks",
        lambda d: [
            "evaluate",
            "--ddf",
            str(d / "ddf.nii.gz"),
            "--fixed",
            str(d / "fixed.nii.gz"),
            "--fixed-landmarks",
            str(d / "nan.csv"),
            "--moving-landmarks",
            str(d / "ok.csv"),
        ],
        r"nan.csv: landmark coordinates hold NaN",
    ),
    Case(
        "evaluate: dataset.json names a missing file",
        lambda d: ["evaluate", "--dataset", str(d / "l2r"), "--ddf", str(d / "disp")],
        r"dataset.json: (image|moving) file .*b_0000.nii.gz does not exist",
    ),
    Case(
        "train: dataset.json names a missing file",
        lambda d: ["train", "ddrnet", "--dataset-dir", str(d / "l2r"), "--epochs", "1"],
        r"dataset.json: image file .*b_0000.nii.gz does not exist",
    ),
    Case(
        "train: missing dataset folder",
        lambda d: ["train", "ddrnet", "--dataset-dir", str(d / "nosuchdir"), "--epochs", "1"],
        r"nosuchdir: dataset folder not found",
    ),
]


def _snapshot(folder: Path) -> dict[str, str]:
    return {str(p): hashlib.sha1(p.read_bytes()).hexdigest() for p in folder.rglob("*") if p.is_file()}


@pytest.mark.parametrize("case", CLI_CASES, ids=[c.name for c in CLI_CASES])
def test_cli_bad_input_is_one_line_and_exit_2(case: Case, d: Path, capsys):
    before = _snapshot(d)
    status = main(case.argv(d))
    err = capsys.readouterr().err.strip()
    assert status == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("regnet-zoo: error: "), err
    assert "Traceback" not in err
    import re

    assert re.search(case.says, err), err
    after = _snapshot(d)
    assert {k: v for k, v in after.items() if k in before} == before  # nothing overwritten
    assert not (d / "out").exists()


@pytest.mark.parametrize("fixed", ["flipped.mha", "flipped.nii.gz"])
def test_flipped_directions_are_valid_images(fixed: str, d: Path, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(_register(fixed, "moving.nii.gz", "--out", str(out))(d)) == 0, capsys.readouterr().err
    warped = sitk.ReadImage(str(out / "warped.nii.gz"))
    reference = sitk.ReadImage(str(d / fixed))
    np.testing.assert_allclose(warped.GetDirection(), reference.GetDirection(), atol=1e-6)
    np.testing.assert_allclose(warped.GetSpacing(), reference.GetSpacing(), atol=1e-6)
    np.testing.assert_allclose(warped.GetOrigin(), reference.GetOrigin(), atol=1e-5)
    assert reference.GetDirection()[0] == -1.0 or nib.load(str(d / fixed)).affine[0, 0] < 0


# ------------------------------------------------------------------------------------------------ API
def _image(array: np.ndarray, affine=None) -> MetaTensor:
    return MetaTensor(
        torch.as_tensor(array)[None], affine=torch.as_tensor(np.eye(4) if affine is None else affine)
    )


API_CASES = [
    ("missing file", lambda d: {"fixed": str(d / "nosuch.nii.gz")}, r"file not found"),
    ("empty file", lambda d: {"fixed": str(d / "empty.nii.gz")}, r"cannot read image"),
    ("4D tensor", lambda d: {"fixed": torch.rand(1, 2, SIZE, SIZE, 4)}, r"channel-first"),
    ("2D vs 3D tensors", lambda d: {"moving": torch.rand(1, SIZE, SIZE, 6)}, r"moving image is 3D"),
    ("two-channel tensor", lambda d: {"fixed": torch.rand(2, SIZE, SIZE)}, r"2 channels"),
    ("NaN tensor", lambda d: {"fixed": torch.full((1, SIZE, SIZE), float("nan"))}, r"non-finite"),
    (
        "zero spacing tensor",
        lambda d: {"fixed": _image(_blob((12, 11)), np.diag([0.0, 1, 1, 1]))},
        r"voxel spacing \[0.0, 1.0\] mm is not usable",
    ),
    (
        "huge spacing tensor",
        lambda d: {"fixed": _image(_blob((12, 11)), np.diag([1e9, 1, 1, 1]))},
        r"voxel spacing \[1000000000.0, 1.0\] mm is not usable",
    ),
    (
        "float label tensor",
        lambda d: {"fixed_label": torch.zeros(1, SIZE, SIZE), "moving_label": torch.rand(1, SIZE, SIZE)},
        r"not integer-valued",
    ),
    (
        "10,000-label tensor",
        lambda d: {
            "fixed_label": torch.zeros(1, SIZE, SIZE),
            "moving_label": torch.arange(10000.0).reshape(1, 100, 100),
        },
        r"distinct labels",
    ),
    (
        "NaN landmarks",
        lambda d: {"fixed_landmarks": np.array([[1.0, np.nan]]), "moving_landmarks": np.array([[1.0, 2.0]])},
        r"NaN",
    ),
]


@pytest.mark.parametrize("case", API_CASES, ids=[c[0] for c in API_CASES])
def test_api_bad_input_raises_registration_input_error(case, d: Path):
    from regnet_zoo.api import register

    _, make, says = case
    kwargs = {"fixed": _image(_blob((12, 11))), "moving": _image(_blob((10, 13))), **make(d)}
    with pytest.raises(RegistrationInputError, match=says) as info:
        register(kwargs.pop("fixed"), kwargs.pop("moving"), "ddrnet", weights=d / "w.pt", **kwargs)
    assert len(str(info.value).splitlines()) == 1


def test_bundle_run_with_missing_dataset_files(d: Path):
    from regnet_zoo.bundle import run_bundle

    with pytest.raises(
        RegistrationInputError, match=r"dataset.json: image file .*b_0000.nii.gz does not exist"
    ):
        run_bundle("ddrnet", "train", dataset_dir=str(d / "l2r"), bundle_root=str(d / "bundle_run"), epochs=1)
    assert not (d / "bundle_run" / "models" / "model.pt").exists()


# ------------------------------------------------------------------------------------------------ label
UPLOAD_CASES = [  # (uploaded moving file, its name on upload, expected status, part of the detail)
    ("empty.nii.gz", "empty.nii.gz", 422, r"cannot read image header"),
    ("truncated.nii.gz", "truncated.nii.gz", 422, r"cannot read"),
    ("4d.nii.gz", "4d.nii.gz", 422, r"is 3D but the fixed image is 2D"),
    ("3d.nii.gz", "3d.nii.gz", 422, r"is 3D but the fixed image is 2D"),
    ("zero.nii.gz", "zero.nii.gz", 422, r"voxel sizes \[0.0, 1.0\]"),
    ("negative.mha", "negative.mha", 422, r"voxel spacing \[-1.0, 1.0\]"),
    ("huge.mha", "huge.mha", 422, r"voxel spacing \[1e\+30, 1e\+30\] mm is not usable"),
]


@pytest.fixture(scope="module")
def label_client(d: Path):
    """The label app in-process (FastAPI test client) serving DDR-Net with untrained weights; MONAI Label's
    settings and the environment are restored afterwards."""
    pytest.importorskip("monailabel")
    import os

    from fastapi.testclient import TestClient
    from monailabel.config import settings
    from monailabel.interfaces.utils.app import clear_cache

    from regnet_zoo.label.config import LabelAppConfig
    from regnet_zoo.label.serve import build_app, configure_monailabel

    saved, environ = settings.model_dump(), dict(os.environ)
    config = LabelAppConfig(
        studies=d / "studies", models=["ddrnet"], weights={"ddrnet": d / "w.pt"}, work_dir=d / "work"
    )
    config.studies.mkdir()
    configure_monailabel(config, port=8000)
    settings.MONAI_LABEL_DATASTORE_AUTO_RELOAD = False
    clear_cache()
    client = TestClient(build_app(config), raise_server_exceptions=False)
    with open(d / "fixed.nii.gz", "rb") as f:
        assert (
            client.put("/datastore/image?image=fixed", files={"file": ("fixed.nii.gz", f)}).status_code == 200
        )
    yield client
    clear_cache()
    for key, value in saved.items():
        setattr(settings, key, value)
    os.environ.clear()
    os.environ.update(environ)


@pytest.mark.parametrize("case", UPLOAD_CASES, ids=[c[0] for c in UPLOAD_CASES])
def test_label_upload_bad_image_is_4xx(case, d: Path, label_client):
    import re

    source, name, status, says = case
    image_id = "bad_" + source.replace(".", "_")
    r = label_client.put(
        f"/datastore/image?image={image_id}", files={"file": (name, (d / source).read_bytes())}
    )
    assert r.status_code == 200, r.text  # stored as uploaded: the datastore does not read images
    r = label_client.post("/infer/ddrnet?image=fixed", data={"params": json.dumps({"moving": image_id})})
    assert r.status_code == status, r.text
    detail = r.json()["detail"]
    assert isinstance(detail, str) and len(detail.splitlines()) == 1 and re.search(says, detail), detail
    assert "Traceback" not in r.text and str(d) not in r.text
    good = label_client.post("/infer/ddrnet?image=fixed", data={"params": json.dumps({"moving": "fixed"})})
    assert good.status_code == 200  # still serving


def test_label_upload_float_or_huge_label_is_4xx(d: Path, label_client):
    with open(d / "moving.nii.gz", "rb") as f:
        label_client.put("/datastore/image?image=labelled", files={"file": ("labelled.nii.gz", f)})
    for label, says in (
        ("float_label.nii.gz", "not integer-valued"),
        ("many_labels.nii.gz", "distinct labels"),
    ):
        with open(d / label, "rb") as f:
            r = label_client.put("/datastore/label?image=labelled&tag=final", files={"label": (label, f)})
        assert r.status_code == 200, r.text
        params = {"moving": "labelled", "result": "warped_label"}
        r = label_client.post("/infer/ddrnet?image=fixed", data={"params": json.dumps(params)})
        assert r.status_code == 422 and says in r.json()["detail"], r.text
