"""MONAI Label deployment (regnet_zoo.label): the app in-process (FastAPI test client) and the real server.

References are independent of the app: nibabel / SimpleITK headers of the fixed image for the output
geometry, ``sitk.Resample`` with the returned ITK displacement field for the warped image and label.
Data: real OASIS 2D slices (re-written with non-trivial affines) and the tiny 3D MR volume (``shared_data``).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch

pytest.importorskip("monailabel")

from regnet_zoo.label.config import LabelAppConfig, available_methods, parse_models, parse_weights  # noqa: E402

MODELS = available_methods()
pytestmark = pytest.mark.skipif("ddrnet" not in MODELS, reason="the ddrnet bundle is not packaged yet")


# ------------------------------------------------------------------------------------------------ data
def _affine_2d(spacing: float, origin: tuple[float, float], angle: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    affine = np.eye(4)
    affine[:2, :2] = np.array([[c, -s], [s, c]]) * spacing
    affine[:2, 3] = origin
    return affine


def _write_inputs(shared_data: Path, folder: Path) -> dict[str, Path]:
    """Three real 2D slices with different geometries (rotation, spacing, origin), a label map of the
    moving one (intensity classes) and a real 3D volume, as NIfTI files in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    slices = shared_data / "oasis2d" / "slices"
    arrays = [
        sitk.GetArrayFromImage(sitk.ReadImage(str(slices / f"oasis2d_{i:04d}.nrrd"))).T for i in range(3)
    ]
    geometry = {
        "fixed": (1.5, (-90.0, -100.0), 0.1),
        "moving": (1.2, (-70.0, -80.0), -0.05),
        "other": (1.0, (0, 0), 0),
    }
    out = {}
    for (name, (spacing, origin, angle)), array in zip(geometry.items(), arrays, strict=True):
        out[name] = folder / f"{name}.nii.gz"
        nib.save(
            nib.Nifti1Image(array.astype(np.float32), _affine_2d(spacing, origin, angle)), str(out[name])
        )
    moving = arrays[1].astype(np.float32)
    label = np.digitize(moving, [np.quantile(moving, 0.5), np.quantile(moving, 0.8)]).astype(np.int16)
    out["moving_label"] = folder / "moving_label.nii.gz"
    nib.save(nib.Nifti1Image(label, _affine_2d(*geometry["moving"])), str(out["moving_label"]))
    out["volume"] = folder / "volume.nii"
    shutil.copy(shared_data / "tiny_mr_pair" / "anatomical.nii", out["volume"])
    return out


def _init_weights(name: str, path: Path) -> Path:
    """Freshly initialised 2D weights of bundle ``name`` (serving plumbing only; DDR-Net gets trained)."""
    from regnet_zoo.bundle import load_bundle_network

    network = load_bundle_network(name, load_weights=False, spatial_dims=2)
    torch.save(network.state_dict(), path)
    return path


# ------------------------------------------------------------------------------------------------ app
class LabelEnv:
    """The app served in-process on a temporary datastore; MONAI Label settings restored afterwards."""

    def __init__(self, root: Path):
        self.root = root
        self.inputs: dict[str, Path] = {}
        self.client = None
        self.trained: Path | None = None  # DDR-Net weights from the app's training task
        self.ddrnet_weights = root / "weights" / "ddrnet.pt"  # served from here (absent until trained)
        self._saved_settings: dict = {}
        self.base_environ: dict = {}

    def start(self, shared_data: Path) -> None:
        if self.client is not None:
            return
        from monailabel.config import settings

        self._saved_settings = settings.model_dump()
        self.base_environ = dict(os.environ)
        self.inputs = _write_inputs(shared_data, self.root / "inputs")
        (self.root / "weights").mkdir()
        weights = {m: _init_weights(m, self.root / "weights" / f"{m}.pt") for m in MODELS if m != "ddrnet"}
        weights["ddrnet"] = self.ddrnet_weights
        config = LabelAppConfig(
            studies=self.root / "studies", models=MODELS, weights=weights, work_dir=self.root / "work"
        )
        config.studies.mkdir()
        from regnet_zoo.label.serve import configure_monailabel

        configure_monailabel(config, port=8000)
        settings.MONAI_LABEL_DATASTORE_AUTO_RELOAD = False  # no file-watcher threads in the test process
        from fastapi.testclient import TestClient
        from monailabel.interfaces.utils.app import clear_cache

        from regnet_zoo.label.serve import build_app

        clear_cache()
        self.config = config
        self.client = TestClient(build_app(config), raise_server_exceptions=False)

    def stop(self) -> None:
        if self.client is None:
            return
        from monailabel.config import settings
        from monailabel.interfaces.utils.app import clear_cache

        clear_cache()
        for key, value in self._saved_settings.items():
            setattr(settings, key, value)
        os.environ.clear()
        os.environ.update(self.base_environ)

    def upload(self, image_id: str, path: Path) -> None:
        with open(path, "rb") as f:
            r = self.client.put(f"/datastore/image?image={image_id}", files={"file": (path.name, f)})
        assert r.status_code == 200, r.text

    def infer(self, model: str, fixed: str, params: dict, output: str = "image"):
        return self.client.post(
            f"/infer/{model}?image={fixed}&output={output}", data={"params": json.dumps(params)}
        )

    def train_ddrnet(self) -> Path:
        """Train DDR-Net for one epoch with the app's training task (on the uploaded 2D images)."""
        if self.trained is None:
            r = self.client.post("/train/ddrnet?run_sync=true", json={"epochs": 1})
            assert r.status_code == 200, r.text
            self.trained = self.root / "work" / r.json()["weights"]  # relative: no server paths in replies
            assert r.json()["spatial_dims"] == 2 and r.json()["images"] == 3
        if not self.ddrnet_weights.is_file():
            shutil.copy(self.trained, self.ddrnet_weights)
        return self.ddrnet_weights


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    state = LabelEnv(tmp_path_factory.mktemp("label"))
    yield state
    state.stop()


@pytest.fixture
def app_env(env, shared_data) -> LabelEnv:
    env.start(shared_data)
    if "fixed" not in env.client.get("/datastore/?output=all").json().get("objects", {}):
        for image_id in ("fixed", "moving", "other", "volume"):
            env.upload(image_id, env.inputs[image_id])
        with open(env.inputs["moving_label"], "rb") as f:
            r = env.client.put(
                "/datastore/label?image=moving&tag=final", files={"label": ("moving.nii.gz", f)}
            )
        assert r.status_code == 200, r.text
    return env


def _save_response(response, path: Path) -> Path:
    assert response.status_code == 200, response.text
    path.write_bytes(response.content)
    return path


# ------------------------------------------------------------------------------------------------ tests
def test_config_parsing(tmp_path):
    assert parse_models("all") == MODELS == parse_models(None)
    assert parse_models("ddrnet,ddrnet") == ["ddrnet"]
    with pytest.raises(ValueError, match="unknown model"):
        parse_models("ddrnet,voxelmorph")
    assert parse_weights(f"ddrnet={tmp_path / 'a.pt'}") == {"ddrnet": tmp_path / "a.pt"}
    with pytest.raises(ValueError, match="name=path"):
        parse_weights("ddrnet")
    config = LabelAppConfig(studies=tmp_path, models=["ddrnet"])
    assert config.work_dir == tmp_path / ".regnet_zoo"
    assert LabelAppConfig.from_conf(tmp_path, config.to_conf()) == config
    # trained-by-the-app weights are used when present and no weights file is given
    assert config.weights_of("ddrnet") != config.trained_weights("ddrnet")
    config.trained_weights("ddrnet").parent.mkdir(parents=True)
    config.trained_weights("ddrnet").write_bytes(b"")
    assert config.weights_of("ddrnet") == config.trained_weights("ddrnet")


def test_serve_rejects_bad_options(tmp_path, capsys):
    import argparse

    from regnet_zoo.label.serve import add_serve_parser, serve

    parser = argparse.ArgumentParser()
    add_serve_parser(parser.add_subparsers())
    args = parser.parse_args(["serve", "--studies", str(tmp_path), "--models", "ddrnet", "--port", "9"])
    assert (args.host, args.port, args.models, args.func.__name__) == ("127.0.0.1", 9, "ddrnet", "serve_main")
    assert serve(tmp_path, models="nosuchmodel") == 2
    assert serve(tmp_path, weights=[f"ddrnet={tmp_path / 'missing.pt'}"]) == 2
    assert "unknown model" in capsys.readouterr().err


def test_untrained_model_is_409_then_training_task_trains(app_env):
    info = app_env.client.get("/info/").json()
    assert set(info["models"]) == set(MODELS) and set(info["trainers"]) == set(MODELS)
    assert info["models"]["ddrnet"]["trained"] is False
    r = app_env.infer("ddrnet", "fixed", {"moving": "moving"})
    assert r.status_code == 409 and "no trained weights" in r.json()["detail"]
    weights = app_env.train_ddrnet()
    assert app_env.trained.is_file() and app_env.trained.is_relative_to(app_env.root / "work")
    assert app_env.client.get("/info/").json()["models"]["ddrnet"]["weights"] == weights.name


def test_every_model_outputs_on_the_fixed_grid(app_env, tmp_path):
    app_env.train_ddrnet()
    fixed_nib = nib.load(str(app_env.inputs["fixed"]))
    fixed_itk = sitk.ReadImage(str(app_env.inputs["fixed"]))
    for model in MODELS:
        out = _save_response(
            app_env.infer(model, "fixed", {"moving": "moving"}), tmp_path / f"{model}.nii.gz"
        )
        warped = nib.load(str(out))
        assert warped.shape == fixed_nib.shape, model
        np.testing.assert_allclose(warped.affine, fixed_nib.affine, atol=1e-5, err_msg=model)

    # DDR-Net: warped image, displacement field and warped label, checked against SimpleITK resampling;
    # test-time optimisation (deterministic) makes the one-epoch model's field large enough to matter
    params = {"moving": "moving", "instance_opt": 20}
    warped_path = _save_response(app_env.infer("ddrnet", "fixed", params), tmp_path / "warped.nii.gz")
    r = app_env.infer("ddrnet", "fixed", {**params, "result": "ddf"})
    ddf = sitk.ReadImage(str(_save_response(r, tmp_path / "ddf.mha")))
    assert ddf.GetSize() == fixed_itk.GetSize() and ddf.GetNumberOfComponentsPerPixel() == 2
    np.testing.assert_allclose(ddf.GetOrigin(), fixed_itk.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(ddf.GetSpacing(), fixed_itk.GetSpacing(), atol=1e-5)
    np.testing.assert_allclose(ddf.GetDirection(), fixed_itk.GetDirection(), atol=1e-5)
    assert 1.0 < np.abs(sitk.GetArrayFromImage(ddf)).max() < 50  # mm: a real, plausible field

    transform = sitk.DisplacementFieldTransform(sitk.Cast(ddf, sitk.sitkVectorFloat64))
    moving_itk = sitk.ReadImage(str(app_env.inputs["moving"]), sitk.sitkFloat64)
    reference = sitk.GetArrayFromImage(sitk.Resample(moving_itk, fixed_itk, transform, sitk.sitkLinear, 0.0))
    warped = sitk.GetArrayFromImage(sitk.ReadImage(str(warped_path), sitk.sitkFloat64))
    assert np.abs(warped - reference).max() < 1e-4 * np.abs(reference).max()

    r = app_env.infer("ddrnet", "fixed", {**params, "result": "warped_label"})
    label = nib.load(str(_save_response(r, tmp_path / "label.nii.gz")))
    assert label.shape == fixed_nib.shape
    np.testing.assert_allclose(label.affine, fixed_nib.affine, atol=1e-5)
    moving_label = sitk.ReadImage(str(app_env.inputs["moving_label"]))
    reference = sitk.GetArrayFromImage(
        sitk.Resample(moving_label, fixed_itk, transform, sitk.sitkNearestNeighbor)
    )
    ours = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "label.nii.gz")))
    assert set(np.unique(ours)) <= {0, 1, 2} and len(np.unique(ours)) == 3
    assert (ours == reference).mean() > 0.99  # nearest-neighbour ties may round differently

    r = app_env.infer("ddrnet", "fixed", params, output="json")  # the result's JSON only (strict JSON)
    assert r.status_code == 200, r.text
    reply = r.json()
    assert (reply["model"], reply["moving"], reply["instance_opt"]) == ("ddrnet", "moving", 20)
    assert reply["shape"] == list(fixed_nib.shape) and reply["metrics"]["runtime_s"] > 0


def test_bad_requests_are_4xx_and_the_app_keeps_serving(app_env):
    app_env.train_ddrnet()
    bad = {
        400: [
            {},
            {"moving": "moving", "result": "jacobian"},
            {"moving": "moving", "instance_opt": -1},
            {"moving": "moving", "device": "nosuchdevice"},
        ],
        404: [{"moving": "nosuchimage"}, {"moving": "other", "result": "warped_label"}],
        422: [{"moving": "volume"}],  # 3D moving, 2D fixed
    }
    for status, requests in bad.items():
        for params in requests:
            r = app_env.infer("ddrnet", "fixed", params)
            assert r.status_code == status, (params, r.status_code, r.text)
            assert r.json()["detail"], params
    assert app_env.infer("ddrnet", "volume", {"moving": "fixed"}).status_code == 422
    assert app_env.infer("ddrnet", "nosuchimage", {"moving": "moving"}).status_code == 404
    assert app_env.infer("ddrnet", "fixed", {"moving": "moving"}).status_code == 200
    # the datastore holds a single 3D image: nothing to train on
    r = app_env.client.post("/train/ddrnet?run_sync=true", json={"spatial_dims": 3})
    assert r.status_code == 422 and "at least two 3D images" in r.json()["detail"], r.text
    assert app_env.client.get("/info/").status_code == 200


# ------------------------------------------------------------------------------------------------ server
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=30)


def test_real_server_over_http(app_env, tmp_path):
    """The server as a subprocess with a token (from the environment), stopped by PID: the MONAI Label client
    registers through it, then it takes 100 concurrent requests (a tiny model on a 32 x 32 phantom pair)."""
    import requests
    from monailabel.client import MONAILabelClient

    weights = app_env.train_ddrnet()
    tiny = next(m for m in MODELS if m != "ddrnet")
    port = _free_port()
    studies, log = tmp_path / "studies", tmp_path / "server.log"
    command = [
        sys.executable, "-m", "regnet_zoo.label.serve", "--studies", str(studies), "--port", str(port),
        "--models", f"ddrnet,{tiny}", "--weights", f"ddrnet={weights}",
        "--weights", f"{tiny}={app_env.root / 'weights' / f'{tiny}.pt'}", "--log-level", "warning",
    ]  # fmt: skip
    # without the in-process app's settings; the token from the environment (not visible in `ps`)
    environ = {**app_env.base_environ, "OMP_NUM_THREADS": "1", "REGNET_ZOO_LABEL_TOKEN": "tok"}
    auth = {"Authorization": "Bearer tok"}
    with open(log, "wb") as log_file:
        process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, env=environ)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 150
        while True:
            assert process.poll() is None, f"server exited: {log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"server did not answer: {log.read_text()[-3000:]}"
            try:
                if requests.get(f"{url}/info/", headers=auth, timeout=5).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            time.sleep(0.5)
        assert requests.get(f"{url}/info/", timeout=10).status_code == 401
        info = requests.get(f"{url}/info/", headers=auth, timeout=10).json()
        assert list(info["models"]) == ["ddrnet", tiny] and info["models"]["ddrnet"]["trained"] is True

        client = MONAILabelClient(url, tmpdir=str(tmp_path / "client"))
        client.update_auth({"token_type": "Bearer", "access_token": "tok"})
        (tmp_path / "client").mkdir()
        for image_id in ("fixed", "moving"):
            client.upload_image(str(app_env.inputs[image_id]), image_id)

        def register_once() -> Path:
            result, params = client.infer("ddrnet", "fixed", {"moving": "moving"})
            assert params["model"] == "ddrnet" and params["result"] == "warped"
            out = nib.load(str(result))
            fixed = nib.load(str(app_env.inputs["fixed"]))
            assert out.shape == fixed.shape
            np.testing.assert_allclose(out.affine, fixed.affine, atol=1e-5)
            return Path(result)

        first = register_once()
        r = requests.post(
            f"{url}/infer/ddrnet?image=fixed",
            data={"params": json.dumps({"moving": "nosuchimage"})},
            headers=auth,
            timeout=60,
        )
        assert r.status_code == 404 and "nosuchimage" in r.json()["detail"]
        second = register_once()
        np.testing.assert_allclose(
            np.asarray(nib.load(str(first)).dataobj), np.asarray(nib.load(str(second)).dataobj)
        )
        _hundred_concurrent_requests(url, auth, tiny, tmp_path)
        assert process.poll() is None
    finally:
        _stop(process)
    assert process.returncode is not None


# ------------------------------------------------------------------------------------------------ robustness
def test_one_registration_serves_every_result_and_is_invalidated(app_env, monkeypatch):
    import regnet_zoo.api

    app_env.train_ddrnet()
    calls = []
    real = regnet_zoo.api.register
    monkeypatch.setattr(regnet_zoo.api, "register", lambda *a, **k: calls.append(a) or real(*a, **k))
    params = {"moving": "moving", "instance_opt": 3}
    replies = {}
    for result in ("warped", "warped_label", "ddf", "warped"):
        r = app_env.infer("ddrnet", "fixed", {**params, "result": result})
        assert r.status_code == 200, r.text
        replies.setdefault(result, r.content)
    assert len(calls) == 1  # one registration for the three result types
    # new weights (same content, new file): registered again; then cached again
    weights = app_env.ddrnet_weights
    weights.write_bytes(weights.read_bytes())
    assert app_env.infer("ddrnet", "fixed", {**params, "result": "ddf"}).content == replies["ddf"]
    assert app_env.infer("ddrnet", "fixed", {**params, "result": "warped"}).status_code == 200
    assert len(calls) == 2
    # a re-uploaded moving image invalidates too (here with other content: another result)
    app_env.upload("moving", app_env.inputs["other"])
    try:
        r = app_env.infer("ddrnet", "fixed", {**params, "result": "warped"})
        assert r.status_code == 200 and r.content != replies["warped"] and len(calls) == 3
    finally:
        app_env.upload("moving", app_env.inputs["moving"])


def test_result_cache_is_bounded():
    from regnet_zoo.label.cache import ResultCache

    cache = ResultCache(max_bytes=3 * 400, max_entries=10)
    for i in range(6):  # 100 floats = 400 bytes each: only the 3 most recent fit
        cache.get_or_compute(i, "stamp", lambda: torch.zeros(100))
    assert len(cache) == 3 and cache.nbytes == 1200
    cache.get_or_compute(5, "stamp", lambda: torch.ones(100))
    assert cache.hits == 1
    assert cache.get_or_compute(5, "new", lambda: torch.ones(100)).sum() == 100  # stale stamp: recomputed
    cache.get_or_compute("big", "s", lambda: torch.zeros(1000))  # larger than the bound: not kept
    assert len(cache) == 3 and cache.nbytes <= 1200


def _server_roots(env: LabelEnv) -> list[str]:
    return [str(env.root), str(Path(__file__).resolve().parents[1]), sys.prefix, str(Path.home())]


def test_no_server_paths_in_any_reply(app_env):
    app_env.train_ddrnet()
    replies = [
        app_env.client.get("/info/"),
        app_env.client.get("/datastore/?output=all"),
        app_env.client.get("/train/"),
        app_env.infer("ddrnet", "fixed", {"moving": "moving"}, output="json"),
        app_env.infer("ddrnet", "fixed", {"moving": "volume"}),  # 422
        app_env.infer("ddrnet", "volume", {"moving": "fixed"}),  # 422
        app_env.client.post("/infer/ddrnet?image=fixed", data={"params": "{not json"}),  # 400
        app_env.client.get("/logs/"),  # not served
    ]
    assert [r.status_code for r in replies[4:]] == [422, 422, 400, 404]
    for r in replies:
        for root in _server_roots(app_env):
            assert root not in r.text, (r.request.url, root, r.text[:500])


def test_cors_off_unless_configured_and_token_on_every_route(app_env):
    from fastapi.testclient import TestClient

    from regnet_zoo.label.serve import build_app

    preflight = {"Origin": "http://evil.example", "Access-Control-Request-Method": "POST"}
    r = app_env.client.options("/infer/ddrnet", headers=preflight)
    assert "access-control-allow-origin" not in r.headers
    assert "access-control-allow-origin" not in app_env.client.get("/info/", headers=preflight).headers
    try:
        client = TestClient(
            build_app(app_env.config, token="s3cret", cors_origins=["http://viewer.example"]),
            raise_server_exceptions=False,
        )
        for path in ("/info/", "/datastore/?output=all", "/", "/docs", "/model/ddrnet", "/train/"):
            assert client.get(path).status_code == 401, path
            assert client.get(path, headers={"Authorization": "Bearer wrong"}).status_code == 401, path
        assert client.post("/infer/ddrnet?image=fixed", data={"params": "{}"}).status_code == 401
        assert client.put("/datastore/image?image=x", files={"file": ("x.nii", b"")}).status_code == 401
        auth = {"Authorization": "Bearer s3cret"}
        assert client.get("/info/", headers=auth).status_code == 200
        ok = client.get("/info/", headers={**auth, "Origin": "http://viewer.example"})
        assert ok.headers["access-control-allow-origin"] == "http://viewer.example"
        other = client.get("/info/", headers={**auth, "Origin": "http://evil.example"})
        assert "access-control-allow-origin" not in other.headers
    finally:
        app_env.client = TestClient(build_app(app_env.config), raise_server_exceptions=False)


def _hundred_concurrent_requests(url: str, auth: dict, model: str, tmp_path: Path) -> None:
    """100 concurrent requests, good and bad, on a running server (token set) serving ``model``: every good
    one answered correctly (the bytes of a sequential request), every bad one a 4xx, every upload kept."""
    import concurrent.futures

    import requests

    rng = np.random.default_rng(0)
    grid = np.stack(np.meshgrid(np.arange(32), np.arange(32), indexing="ij"))
    blob = lambda c: np.exp(-((grid - np.array(c)[:, None, None]) ** 2).sum(0) / 60)  # noqa: E731
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    arrays = {"tiny_fixed": blob((16, 15)), "tiny_moving": blob((14, 17)) + 0.3 * blob((20, 10))}
    for name, array in arrays.items():
        nib.save(nib.Nifti1Image(array.astype(np.float32), np.eye(4)), str(inputs / f"{name}.nii.gz"))
    label = (arrays["tiny_moving"] > 0.4).astype(np.int16)
    nib.save(nib.Nifti1Image(label, np.eye(4)), str(inputs / "tiny_moving_label.nii.gz"))
    uploads = {}
    for i in range(20):
        path = inputs / f"up{i}.nii.gz"
        nib.save(nib.Nifti1Image(rng.random((8, 8)).astype(np.float32), np.eye(4)), str(path))
        uploads[f"up{i}"] = path.read_bytes()
    for name in arrays:
        with open(inputs / f"{name}.nii.gz", "rb") as f:
            address = f"{url}/datastore/image?image={name}"
            r = requests.put(address, files={"file": f}, headers=auth, timeout=30)
        assert r.status_code == 200, r.text
    with open(inputs / "tiny_moving_label.nii.gz", "rb") as f:
        r = requests.put(
            f"{url}/datastore/label?image=tiny_moving&tag=final", files={"label": f}, headers=auth, timeout=30
        )
    assert r.status_code == 200, r.text

    def infer(result: str, moving: str = "tiny_moving", headers=auth, params: str | None = None):
        params = params or json.dumps({"moving": moving, "result": result})
        return requests.post(
            f"{url}/infer/{model}?image=tiny_fixed&output=image",
            data={"params": params},
            headers=headers,
            timeout=60,
        )

    results = ("warped", "warped_label", "ddf")
    reference = {}
    for result in results:  # sequentially first: the answers every concurrent request must match
        r = infer(result)
        assert r.status_code == 200, r.text
        reference[result] = r.content
    fixed = nib.load(str(inputs / "tiny_fixed.nii.gz"))
    (tmp_path / "warped.nii.gz").write_bytes(reference["warped"])
    assert nib.load(str(tmp_path / "warped.nii.gz")).shape == fixed.shape

    def upload(image_id: str):
        files = {"file": (f"{image_id}.nii.gz", uploads[image_id])}
        address = f"{url}/datastore/image?image={image_id}"
        return requests.put(address, files=files, headers=auth, timeout=60)

    jobs = []  # (expected status, expected body or None, call)
    jobs += [(200, reference[results[i % 3]], lambda i=i: infer(results[i % 3])) for i in range(40)]
    jobs += [(200, None, lambda k=k: upload(k)) for k in uploads]
    jobs += [(401, None, lambda: infer("warped", headers={})) for _ in range(8)]
    wrong = {"Authorization": "Bearer x"}
    jobs += [(401, None, lambda: infer("warped", headers=wrong)) for _ in range(8)]
    jobs += [(404, None, lambda: infer("warped", moving="nosuchimage")) for _ in range(8)]
    jobs += [(400, None, lambda: infer("jacobian")) for _ in range(8)]
    jobs += [(400, None, lambda: infer("", params="{not json")) for _ in range(8)]
    assert len(jobs) == 100
    order = rng.permutation(len(jobs))
    start = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(max_workers=20) as pool:
        futures = [(jobs[i], pool.submit(jobs[i][2])) for i in order]
        replies = [(job, future.result(timeout=60)) for job, future in futures]
    assert time.monotonic() - start < 60
    for (status, body, _), r in replies:
        assert r.status_code == status, (status, r.status_code, r.text[:300])
        if body is not None:
            assert r.content == body
        if status >= 400:
            assert r.json()["detail"]
            assert str(tmp_path) not in r.text
    listed = requests.get(f"{url}/datastore/?output=all", headers=auth, timeout=30).json()["objects"]
    assert set(uploads) <= set(listed)
    for image_id, data in uploads.items():  # nothing uploaded is lost or mixed up
        r = requests.get(f"{url}/datastore/image?image={image_id}", headers=auth, timeout=30)
        assert r.status_code == 200 and r.content == data, image_id
    assert requests.get(f"{url}/info/", headers=auth, timeout=10).status_code == 200
    assert infer("ddf").content == reference["ddf"]


def test_request_guard_scrubs_server_paths_and_checks_the_token(tmp_path):
    """The guard alone, around a bare app that leaks paths (JSON, text) and serves a binary file."""
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse, PlainTextResponse, Response
    from starlette.routing import Route
    from starlette.testclient import TestClient

    from regnet_zoo.label.security import RequestGuard

    leak = str(tmp_path / "studies" / "moving.nii.gz")
    routes = [
        Route("/json", lambda r: JSONResponse({"detail": f"{leak}: cannot read", "url": "http://x/a/b"})),
        Route("/text", lambda r: PlainTextResponse(f"see {tmp_path}/work/app.log, line 3")),
        Route("/bin", lambda r: Response(leak.encode(), media_type="application/octet-stream")),
    ]
    app = RequestGuard(Starlette(routes=routes), token="t", hidden_roots=[tmp_path])
    client = TestClient(app)
    auth = {"Authorization": "Bearer t"}
    assert client.get("/json").status_code == 401
    assert client.get("/json", headers={"Authorization": "t"}).status_code == 401
    assert client.get("/json", headers=auth).json() == {"detail": "moving.nii.gz: cannot read", "url": "http://x/a/b"}
    assert client.get("/text", headers=auth).text == "see app.log, line 3"
    assert client.get("/bin", headers=auth).content == leak.encode()  # files pass through untouched
