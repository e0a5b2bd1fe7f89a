"""The side-by-side benchmark (benchmarks/compare.py) and the classic baselines (regnet_zoo.baselines).

References are independent of the code under test: SimpleITK's own resampling, analytic transforms and
fields, label overlap computed from the label files with numpy, MONAI's own VoxelMorph forward pass.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch
from scipy.ndimage import gaussian_filter

from regnet_zoo import METHODS, project_root
from regnet_zoo.baselines import (
    VoxelMorphLoss,
    VoxelMorphRegistration,
    image_to_sitk,
    sitk_affine,
    sitk_bspline,
    sitk_demons,
    transform_to_ddf,
)
from regnet_zoo.core.spatial import identity_grid, warp_image
from regnet_zoo.errors import RegistrationInputError

COMPARE = project_root() / "benchmarks" / "compare.py"
sys.path.insert(0, str(COMPARE.parent))


def _smooth_image(shape, seed=0, sigma=3.0) -> np.ndarray:
    """Smooth random blobs in [0, 1] with a dark border (so that nothing leaves the field of view)."""
    rng = np.random.default_rng(seed)
    image = gaussian_filter(rng.random(shape), sigma)
    image = (image - image.min()) / (image.max() - image.min())
    margin = tuple(slice(6, -6) for _ in shape)
    window = np.zeros(shape)
    window[margin] = 1
    return (image * gaussian_filter(window, 2)).astype(np.float32)


# ----------------------------------------------------------------------------------------------------------
# conventions: SimpleITK transform -> DDF
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape, spacing", [((40, 50), (1.5, 0.8)), ((18, 22, 26), (2.0, 1.0, 1.5))])
def test_transform_to_ddf_warps_like_sitk_resample(shape, spacing):
    """warp_image(moving, ddf) must equal SimpleITK's resampling with the transform (anisotropic voxels)."""
    n = len(shape)
    rng = np.random.default_rng(1)
    image = _smooth_image(shape, sigma=2.0)
    transform = sitk.AffineTransform(n)
    transform.SetMatrix((np.eye(n) + 0.06 * rng.standard_normal((n, n))).ravel().tolist())
    transform.SetTranslation(rng.normal(0, 1.5, n).tolist())
    transform.SetCenter([8.0] * n)
    reference = image_to_sitk(image, spacing)
    ddf = transform_to_ddf(transform, reference)
    assert ddf.shape == (n, *shape)
    ours = warp_image(torch.from_numpy(image)[None, None], ddf[None])[0, 0].numpy()
    theirs = sitk.GetArrayFromImage(sitk.Resample(reference, reference, transform, sitk.sitkLinear, 0.0))
    # compare where the sample points fall inside the image (the two pad differently outside it)
    coords = identity_grid(shape)[0] + ddf
    upper = torch.tensor(shape, dtype=coords.dtype).view(n, *[1] * n) - 1
    inside = ((coords >= 0) & (coords <= upper)).all(0).numpy()
    assert inside.mean() > 0.6
    np.testing.assert_allclose(ours[inside], theirs[inside], atol=1e-5)
    assert np.abs(ddf.numpy()).max() > 0.5  # a real motion, not a trivially passing zero field


def test_sitk_affine_recovers_a_known_affine():
    """moving = fixed seen through a known affine T: the DDF must be T(x) - x (analytic) in the interior."""
    shape, spacing = (72, 80), (1.2, 1.0)
    fixed = _smooth_image(shape, seed=2, sigma=4.0)
    fixed_img = image_to_sitk(fixed, spacing)
    truth = sitk.AffineTransform(2)
    angle = np.deg2rad(6.0)
    truth.SetMatrix([np.cos(angle) * 1.04, -np.sin(angle), np.sin(angle), np.cos(angle) * 0.97])
    truth.SetTranslation((2.0, -1.5))
    truth.SetCenter([(s - 1) * sp / 2 for s, sp in zip(shape[::-1], spacing[::-1], strict=True)])
    # moving(T(x)) = fixed(x)  <=>  moving = fixed resampled with T^-1
    moving = sitk.GetArrayFromImage(
        sitk.Resample(fixed_img, fixed_img, truth.GetInverse(), sitk.sitkLinear, 0.0)
    )
    ddf = sitk_affine(fixed, moving, spacing=spacing, sampling=1.0)
    expected = transform_to_ddf(truth, fixed_img)
    inner = (slice(None), slice(12, -12), slice(12, -12))
    error = (ddf - expected)[inner].norm(dim=0)
    assert expected[inner].norm(dim=0).mean() > 2.0
    assert error.mean() < 0.25 and error.max() < 0.6


@pytest.fixture
def one_sitk_thread():
    """SimpleITK's multi-threaded metric sums in a varying order; one thread makes the optimisation path
    reproducible (a full-suite run once ended just past the tolerance)."""
    before = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    yield
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(before)


@pytest.mark.parametrize("register", [sitk_demons, sitk_bspline], ids=["demons", "bspline"])
def test_deformable_baselines_recover_an_analytic_field(register, one_sitk_thread):
    """fixed(x) = moving(x + u(x)) for a smooth analytic u: the recovered DDF must be close to u."""
    shape = (64, 64)
    moving = _smooth_image(shape, seed=3, sigma=2.5)
    grid = identity_grid(shape)[0].double()
    u = torch.stack(
        [2.0 * torch.sin(2 * math.pi * grid[1] / 64), 1.5 * torch.cos(2 * math.pi * grid[0] / 64)]
    ).float()
    fixed = warp_image(torch.from_numpy(moving)[None, None], u[None])[0, 0].numpy()
    ddf = register(fixed, moving, spacing=(1.0, 1.0))
    inner = (slice(None), slice(12, -12), slice(12, -12))
    error = (ddf - u)[inner].norm(dim=0).mean()
    initial = u[inner].norm(dim=0).mean()
    assert error < 0.2 * initial, f"mean error {error:.3f} vs |u| {initial:.3f}"
    warped = warp_image(torch.from_numpy(moving)[None, None], ddf[None])[0, 0].numpy()
    assert np.abs(warped - fixed)[12:-12, 12:-12].mean() < 0.5 * np.abs(moving - fixed)[12:-12, 12:-12].mean()


# ----------------------------------------------------------------------------------------------------------
# VoxelMorph adapter
# ----------------------------------------------------------------------------------------------------------
def test_voxelmorph_adapter_matches_monai_and_pads_any_size():
    torch.manual_seed(0)
    model = VoxelMorphRegistration(spatial_dims=2).eval()
    fixed, moving = torch.rand(1, 1, 32, 48), torch.rand(1, 1, 32, 48)
    with torch.no_grad():
        ours = model(fixed, moving)
        monai_warped, monai_ddf = model.net(moving, fixed)  # MONAI's own forward: (moving, fixed) order
    torch.testing.assert_close(ours["ddf"], monai_ddf)
    assert ours["ddf"].abs().max() > 0  # an untrained network still predicts a non-zero field
    # a size that is not a multiple of 16: padded inside, cropped back; warped is moving warped by ddf
    odd_fixed, odd_moving = torch.rand(2, 1, 36, 44), torch.rand(2, 1, 36, 44)
    out = model(odd_fixed, odd_moving)
    assert out["ddf"].shape == (2, 2, 36, 44)
    torch.testing.assert_close(out["warped"], warp_image(odd_moving, out["ddf"]))
    losses = VoxelMorphLoss("lncc")(out, {"fixed": odd_fixed, "moving": odd_moving})
    assert set(losses) == {"loss", "similarity", "diffusion"}
    torch.testing.assert_close(losses["loss"], losses["similarity"] + 1.0 * losses["diffusion"])
    losses["loss"].backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


# ----------------------------------------------------------------------------------------------------------
# benchmark helpers
# ----------------------------------------------------------------------------------------------------------
def test_budget_and_cache_key():
    from _compare_train import Budget, cache_key

    with pytest.raises(ValueError):
        Budget()
    with pytest.raises(ValueError):
        Budget(iterations=3, minutes=1.0)
    with pytest.raises(ValueError):
        Budget(iterations=0)
    a = cache_key("ddrnet", "/data/x", Budget(iterations=5), image_size=None)
    assert a == cache_key("ddrnet", "/data/x", Budget(iterations=5), image_size=None)
    others = {
        cache_key("pwc", "/data/x", Budget(iterations=5), image_size=None),
        cache_key("ddrnet", "/data/y", Budget(iterations=5), image_size=None),
        cache_key("ddrnet", "/data/x", Budget(minutes=5), image_size=None),
        cache_key("ddrnet", "/data/x", Budget(iterations=5), image_size=[32, 32]),
    }
    assert a not in others and len(others) == 4


def test_peak_memory_sees_an_allocation():
    from _compare_eval import PeakMemory

    with PeakMemory() as before:
        pass
    with PeakMemory() as during:
        # 64 MB of fresh anonymous pages, all touched: malloc could serve a block from memory freed earlier in
        # this process, still resident, and the RSS would not move (seen once after the suite had run a while)
        block = mmap.mmap(-1, 64 * 2**20)
        block.write(b"\x01" * len(block))
        time.sleep(0.1)  # the sampler polls every 10 ms: on a loaded machine a shorter life can go unseen
        block.close()
    assert during.peak_rss_mb > before.peak_rss_mb + 40
    assert during.peak_gpu_mb is None


# ----------------------------------------------------------------------------------------------------------
# the whole benchmark, --quick on tiny built-in data
# ----------------------------------------------------------------------------------------------------------
def _run_compare(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, str(COMPARE), *args], capture_output=True, text=True, env=env, timeout=400
    )


def _dice_from_files(fixed_label: Path, moving_label: Path, labels) -> float:
    fixed = np.asarray(nib.load(str(fixed_label)).dataobj)
    moving = np.asarray(nib.load(str(moving_label)).dataobj)
    values = [
        2 * np.sum((fixed == k) & (moving == k)) / (np.sum(fixed == k) + np.sum(moving == k)) for k in labels
    ]
    return float(np.mean(values))


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory) -> Path:
    from regnet_zoo.data.phantom import make_phantom_dataset

    return make_phantom_dataset(tmp_path_factory.mktemp("tiny") / "phantom", 2, n_subjects=4, n_val=2)


@pytest.mark.slow
def test_compare_quick_writes_every_row_metric_and_plot(tiny_dataset, tmp_path):
    from _compare_eval import METRIC_FIELDS
    from compare import ALL_METHODS, SUMMARY_PLOTS

    out = tmp_path / "bench"
    done = _run_compare(
        "--dataset", str(tiny_dataset), "--quick", "--iterations", "1", "--batch-size", "1", "--out", str(out)
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| method |" in done.stdout  # the table is printed
    results = json.loads((out / "results.json").read_text())
    rows = {r["method"]: r for r in results["rows"]}
    assert set(rows) == set(ALL_METHODS)
    for name, row in rows.items():
        assert set(METRIC_FIELDS) <= set(row), name
        bundle_present = (project_root() / "bundles" / name / "train.yaml").is_file()
        if name in ("ants_syn", "elastix"):  # optional packages
            assert row["status"] in ("ok", "skipped")
        elif name in METHODS and not bundle_present:
            assert row["status"] == "missing" and name in results["missing"]
        else:
            assert row["status"] == "ok", f"{name}: {row['note']}"
        if row["status"] != "ok":
            assert row["note"]  # says why
            continue
        for field in METRIC_FIELDS:
            if field == "peak_gpu_mb":
                assert row[field] is None  # CPU run
                continue
            assert row[field] is not None and math.isfinite(row[field]), (name, field)
        assert 0 <= row["dice_mean_30"] <= row["dice_mean"] + 1e-9 <= 1 + 1e-9
        assert row["time_per_pair_s"] > 0 and row["peak_rss_mb"] > 50
        assert len(row["per_pair"]) == 2 and set(row["per_label_dice"]) == {str(k) for k in range(1, 10)}
        if row["kind"] == "deep":
            assert row["num_parameters"] > 1000 and row["train_iterations"] == 1 and row["train_time_s"] > 0
    # identity: Dice straight from the label files (numpy), TRE before registration
    dataset = json.loads((tiny_dataset / "dataset.json").read_text())
    expected = []
    for pair in dataset["registration_val"]:
        fixed_label, moving_label = (
            tiny_dataset / pair[k].replace("imagesTr", "labelsTr") for k in ("fixed", "moving")
        )
        expected.append(_dice_from_files(fixed_label, moving_label, range(1, 10)))
    identity = rows["identity"]
    assert identity["dice_mean"] == pytest.approx(np.mean(expected), abs=1e-6)
    assert identity["tre_mm"] == pytest.approx(identity["tre_mm_initial"]) and identity["tre_mm"] > 1.0
    assert identity["sdlogj"] == 0 and identity["folding_percent"] == 0
    # demons really registers: clearly better overlap than no registration
    assert rows["sitk_demons"]["dice_mean"] > identity["dice_mean"] + 0.1
    # the parameter count is the bundle network's
    from regnet_zoo.bundle import load_bundle_network

    ddrnet = load_bundle_network("ddrnet", load_weights=False)
    assert rows["ddrnet"]["num_parameters"] == sum(p.numel() for p in ddrnet.parameters())
    # outputs
    table = (out / "results.md").read_text()
    assert "| identity |" in table and "command:" in table and "machine:" in table
    pngs = [f"{p}.png" for p in SUMMARY_PLOTS] + [
        f"panel_{m}.png" for m, r in rows.items() if r["status"] == "ok"
    ]
    for name in pngs:
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, name

    # a second run reuses the trained weights (cache keyed by method + dataset + budget)
    again = _run_compare(
        "--dataset",
        str(tiny_dataset),
        "--quick",
        "--iterations",
        "1",
        "--batch-size",
        "1",
        "--methods",
        "identity",
        "ddrnet",
        "--out",
        str(out),
    )
    assert again.returncode == 0, again.stderr[-3000:]
    second = {r["method"]: r for r in json.loads((out / "results.json").read_text())["rows"]}
    assert set(second) == {"identity", "ddrnet"}
    assert second["ddrnet"]["cached"] is True and rows["ddrnet"]["cached"] is False
    assert second["ddrnet"]["train_time_s"] == pytest.approx(rows["ddrnet"]["train_time_s"])
    assert second["ddrnet"]["dice_mean"] == pytest.approx(rows["ddrnet"]["dice_mean"], abs=1e-6)


def test_compare_reports_a_bad_dataset_in_one_line(tmp_path, capsys):
    from compare import main

    assert main(["--dataset", str(tmp_path / "absent"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "absent" in err and "not found" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------------------
# every classic baseline improves a tiny shifted pair (optional packages: skipped when not installed)
# ----------------------------------------------------------------------------------------------------------
def _shifted_pair(shape=(40, 44), shift=(2.5, -2.0), seed=5):
    """(fixed, moving) with fixed(x) = moving(x + shift): the known answer is the constant DDF ``shift``."""
    from scipy.ndimage import shift as nd_shift

    moving = _smooth_image(shape, seed=seed, sigma=2.5)
    fixed = nd_shift(moving, [-s for s in shift], order=3, mode="constant").astype(np.float32)
    return fixed, moving


def _optional_baseline(name):
    from regnet_zoo import baselines as bl

    available = {"ants_syn": bl.ants_available, "elastix": bl.elastix_available}.get(name)
    if available is not None and not available():
        pytest.skip(f"{name}: optional package not installed (pip install 'regnet_zoo[benchmark]')")
    return bl.CLASSIC_BASELINES[name]


@pytest.mark.parametrize(
    "name, kwargs",
    [
        ("sitk_affine", {}),
        ("sitk_bspline", {"iterations": 30}),
        ("sitk_demons", {}),
        ("ants_syn", {}),
        pytest.param("elastix", {"iterations": 100}, marks=pytest.mark.slow),  # importing ITK takes ~30 s
        # elastix's own number_of_threads > 1 segfaults in its B-spline map (itk-elastix 0.25): 2 must run
        pytest.param(
            "elastix", {"iterations": 100, "threads": 2}, marks=pytest.mark.slow, id="elastix-2-threads"
        ),
    ],
)
def test_classic_baseline_recovers_a_shift(name, kwargs, one_sitk_thread):
    """Each baseline's DDF recovers a known shift in the interior (anisotropic voxels: the DDF is in voxels),
    and its warp, applied to a label with nearest neighbour, raises the overlap with the fixed label."""
    register = _optional_baseline(name)
    shift = (2.5, -2.0)
    fixed, moving = _shifted_pair(shift=shift)
    ddf = register(fixed, moving, spacing=(1.5, 0.8), **kwargs)
    assert ddf.shape == (2, *fixed.shape)
    inner = (slice(None), slice(12, -12), slice(12, -12))
    error = (ddf - torch.tensor(shift).view(2, 1, 1))[inner].norm(dim=0).mean()
    assert error < 0.25 * math.hypot(*shift), f"{name}: mean error {error:.3f} voxels"
    from scipy.ndimage import shift as nd_shift

    moving_label = (moving > np.quantile(moving, 0.7)).astype(np.int64)
    fixed_label = nd_shift(moving_label, [-s for s in shift], order=0)
    warped_label = warp_image(
        torch.from_numpy(moving_label).float()[None, None], ddf[None], mode="nearest"
    )[0, 0].numpy()

    def dice(a, b):
        return 2 * np.sum((a == 1) & (b == 1)) / (np.sum(a == 1) + np.sum(b == 1))

    assert set(np.unique(warped_label)) <= {0, 1}  # nearest neighbour: still a label map
    assert dice(warped_label, fixed_label) > dice(moving_label, fixed_label) + 0.1


def test_voxelmorph_trained_on_a_shifted_pair_improves_it():
    """MONAI VoxelMorph with its LNCC + diffusion loss, a few Adam steps on the pair itself: lower MSE."""
    torch.manual_seed(0)
    fixed, moving = (torch.from_numpy(a)[None, None] for a in _shifted_pair(shape=(32, 32)))
    model = VoxelMorphRegistration(spatial_dims=2)
    loss_fn = VoxelMorphLoss("mse", weight=0.01)
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(30):
        optimiser.zero_grad()
        loss = loss_fn(model(fixed, moving), {"fixed": fixed, "moving": moving})["loss"]
        loss.backward()
        optimiser.step()
    with torch.no_grad():
        warped = model(fixed, moving)["warped"]
    inner = (..., slice(6, -6), slice(6, -6))
    assert ((warped - fixed)[inner] ** 2).mean() < 0.5 * ((moving - fixed)[inner] ** 2).mean()

def test_sitk_affine_with_random_sampling_is_reproducible(one_sitk_thread):
    """Seed 0 must mean seed 0, not SimpleITK's 'seed from the wall clock' (its value 0): two runs with random
    metric sampling give the same field."""
    shape = (64, 64)
    fixed = _smooth_image(shape, seed=3, sigma=4.0)
    moving = np.roll(fixed, (2, -1), axis=(0, 1))
    first = sitk_affine(fixed, moving, sampling=0.2, iterations=30, seed=0)
    second = sitk_affine(fixed, moving, sampling=0.2, iterations=30, seed=0)
    other = sitk_affine(fixed, moving, sampling=0.2, iterations=30, seed=5)
    assert torch.equal(first, second)
    assert not torch.equal(first, other)  # the seed reaches the sampler


def _report(folder: Path, key: str, machine: str, grid: list[int], rows: list[dict]) -> Path:
    """A minimal ``results.json`` as compare.py writes it."""
    folder.mkdir(parents=True)
    meta = {
        "date": "2026-11-26 12:00 UTC",
        "machine": machine,
        "command": f"python benchmarks/compare.py --dataset {key}",
        "dataset": {"name": "tiny", "key": key, "dir": str(folder / "data"), "grid": grid,
                    "num_eval_pairs": 2, "eval_split": "registration_val", "label_names": {"1": "gland"}},
        "budget": "1 min",
        "seeds": [0],
        "rows": rows,
    }
    (folder / "results.json").write_text(json.dumps(meta))
    return folder / "results.json"


def _row(method: str, dice: float, seconds: float) -> dict:
    return {"method": method, "kind": "deep", "status": "ok", "note": "", "dice_mean": dice,
            "time_per_pair_s": seconds, "sdlogj": 0.1, "folding_percent": 0.0,
            "per_label_dice": {"1": [dice, dice]}, "per_pair": []}


def test_merge_joins_runs_of_other_machines_and_says_which_timed_each_row(tmp_path):
    """A GPU run's deep rows and a CPU run's classic rows of the same dataset (other paths, same name, grid
    and pairs) make one report whose table says where each row was timed; another grid is refused."""
    from compare import merge_reports

    on_cpu, on_gpu = "Xeon, device cpu", "EPYC, NVIDIA H200, device cuda"
    cpu = _report(tmp_path / "cpu", "prostate3d", on_cpu, [8, 8, 8], [_row("sitk_affine", 0.5, 2.0)])
    gpu = _report(tmp_path / "gpu", "prostate3d", on_gpu, [8, 8, 8], [_row("ddrnet", 0.6, 0.05)])
    rows = merge_reports([cpu, gpu], tmp_path / "merged", ["--merge", "cpu", "gpu"])
    assert [(r["method"], r["device"]) for r in rows] == [("sitk_affine", "CPU"), ("ddrnet", "GPU")]
    merged = json.loads((tmp_path / "merged" / "results.json").read_text())
    assert [m["machine"] for m in merged["merged_from"]] == [on_cpu, on_gpu]
    table = (tmp_path / "merged" / "results.md").read_text()
    assert "timed on" in table and "| ddrnet |" in table and "| GPU |" in table
    other = _report(tmp_path / "other", "prostate3d", on_cpu, [8, 8, 9], [_row("pwc", 0.4, 1.0)])
    with pytest.raises(RegistrationInputError, match="different datasets"):
        merge_reports([cpu, other], tmp_path / "bad", ["--merge"])


@pytest.mark.parametrize("dataset", ["prostate3d", "oasis3d"])
def test_reports_on_shared_data_are_not_published_into_the_repository(dataset, tmp_path, capsys):
    """Reports derived from ../shared/data stay in --out: --publish refuses them before any work, also when
    they come from --merge."""
    from compare import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--dataset", dataset, "--publish", "x", "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2 and "stay in --out" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    run = _report(tmp_path / "run", dataset, "Xeon, device cpu", [8, 8, 8], [_row("ddrnet", 0.6, 0.05)])
    with pytest.raises(SystemExit) as exit_info:
        main(["--merge", str(run), "--publish", "x", "--out", str(tmp_path / "merged")])
    assert exit_info.value.code == 2 and "stay in --out" in capsys.readouterr().err
    assert not (tmp_path / "merged").exists()


def test_publish_copies_the_report_and_its_plots(tmp_path):
    """--publish copies the JSON, the table with its plot links renamed, and the summary plots."""
    from compare import publish

    out = tmp_path / "out"
    _report(out, "builtin", "Xeon, device cpu", [8, 8], [_row("ddrnet", 0.6, 0.05)])
    (out / "results.md").write_text("table\n\n![accuracy vs time](accuracy_vs_time.png)\n\n"
                                    "![qualitative panels](qualitative.png)\n")
    for plot in ("accuracy_vs_time", "qualitative"):
        (out / f"{plot}.png").write_bytes(b"png")
    target = tmp_path / "results"
    target.mkdir()
    md = publish(out, "x", target=target)
    assert (target / "compare_x.json").is_file()
    for plot in ("accuracy_vs_time", "qualitative"):
        assert (target / f"compare_x_{plot}.png").is_file() and f"(compare_x_{plot}.png)" in md.read_text()


def test_boxplot_keeps_each_methods_best_variant_when_rows_are_many(tmp_path):
    """With more rows than ``MAX_BOXES`` the per-structure plot shows one box per method: its best variant."""
    from _compare_report import MAX_BOXES, _best_per_method, plot_dice_boxes

    rows = []
    for i in range(MAX_BOXES):
        for suffix, dice in (("", 0.5), (" +IO", 0.6 + i / 100), (" +affine", 0.55)):
            row = _row(f"m{i}{suffix}", dice, 0.1)
            row["base_method"] = f"m{i}"
            rows.append(row)
    best = _best_per_method(rows)
    assert [r["method"] for r in best] == [f"m{i} +IO" for i in range(MAX_BOXES)]
    path = plot_dice_boxes(rows, tmp_path / "boxes.png", label_names={"1": "gland"})
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
