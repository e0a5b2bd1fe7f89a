"""Affine pre-alignment benchmark: ``regnet_zoo.core.affine.affine_register`` vs ``baselines.sitk_affine``.

Side by side in one run, on the same real pairs from ``../shared/data`` (skipped when absent):

- ``tiny_mr_pair``: a rigidly moved MR copy on another grid (2 mm vs 4 mm), Dice of the binary labels;
- ``oasis3d_pair``: two subjects, both directions, mean Dice of the 30 evaluation labels (1 mm, 160x192x224);
- ``prostate_mr_us``: MR (moving) -> US (fixed) for each of the 8 patients, Dice of the gland channel and TRE
  (mm) between the centroids of the two landmark blobs (fixed blob vs warped moving blob; multi-modal: MI);
- ``head2d``: 2D T1 (fixed) vs PD (moving), Dice of the head masks (multi-contrast: MI).

Both methods see the raw intensities. ``affine_register`` works on the two native grids in physical space;
``sitk_affine`` needs one grid, so the moving image is first resampled onto the fixed grid (identity in world
space, linear; not timed) and the baseline is called as it is, with the fixed voxel size. Its DDF is then
composed with that resampling so that labels are warped once from the moving grid, like ours. Labels are
warped by nearest neighbour (landmark blobs linearly, for sub-voxel centroids). Times are wall-clock seconds
of the registration call alone, both with the same number of torch / SimpleITK threads (``--threads``).

    PYTHONPATH=$PWD python benchmarks/affine.py            # writes benchmarks/results/affine.{json,md}
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from regnet_zoo.baselines import sitk_affine
from regnet_zoo.core.affine import affine_register, resample_affine
from regnet_zoo.core.metrics import dice_per_label
from regnet_zoo.core.spatial import identity_grid, sample_image
from regnet_zoo.data.io import load_image, load_label

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data"
RESULTS = ROOT / "benchmarks" / "results"


def _affine(image: torch.Tensor) -> np.ndarray:
    """The ``(N+1, N+1)`` voxel->RAS matrix of a loaded image (2D images carry a 4x4 embedding)."""
    a = np.asarray(image.affine, dtype=np.float64)
    n = image.ndim - 1
    keep = list(range(n)) + [3]
    return a[np.ix_(keep, keep)]


def _spacing(affine: np.ndarray) -> np.ndarray:
    n = affine.shape[0] - 1
    return np.linalg.norm(affine[:n, :n], axis=0)


def _voxel_coords(shape, vox: np.ndarray, ddf: torch.Tensor | None = None) -> torch.Tensor:
    """Moving voxel coordinates ``(1, N, *S)`` of the fixed grid under ``vox`` (fixed voxel -> moving voxel),
    after the fixed-grid DDF ``ddf`` ``(N, *S)`` when given: ``vox (x + ddf(x))``."""
    n = len(shape)
    grid = identity_grid(shape, dtype=torch.float64)
    if ddf is not None:
        grid = grid + ddf[None].double()
    m = torch.from_numpy(vox)
    return torch.einsum("ij,bj...->bi...", m[:n, :n], grid) + m[:n, n].reshape(1, n, *([1] * n))


def _warp(moving: torch.Tensor, coords: torch.Tensor, mode: str) -> torch.Tensor:
    return sample_image(moving.as_subclass(torch.Tensor)[None].float(), coords.float(), mode=mode,
                        padding_mode="zeros")[0]


def _centroid_mm(weights: torch.Tensor, affine: np.ndarray) -> np.ndarray:
    """Physical centroid of a non-negative map ``(*S)``."""
    w = weights.double().numpy()
    idx = np.stack(np.meshgrid(*[np.arange(s) for s in w.shape], indexing="ij"), -1).reshape(-1, w.ndim)
    centre = (idx * w.reshape(-1, 1)).sum(0) / max(w.sum(), 1e-12)
    n = w.ndim
    return affine[:n, :n] @ centre + affine[:n, n]


def _evaluate(pair: dict, coords: torch.Tensor) -> dict:
    """Dice (and TRE) of the moving labels sampled at moving voxel ``coords`` of the fixed grid."""
    out = {}
    fixed_lab, moving_lab = pair["fixed_label"], pair["moving_label"]
    if pair["kind"] == "prostate":
        warped = _warp((moving_lab[:1] > 0.5).float(), coords, "nearest")
        # every moving label map has the structure: a warped map that lost it scores 0, not NaN
        gland = fixed_lab[0] > 0.5
        out["dice"] = dice_per_label(gland, warped[0] > 0.5, [1], moving_label=gland)[1]
        errors = []
        for c in range(1, min(fixed_lab.shape[0], moving_lab.shape[0])):  # landmark blobs present in both
            blob = _warp(moving_lab[c : c + 1].float(), coords, "linear")[0]
            fixed_c = _centroid_mm(fixed_lab[c].float(), pair["fixed_affine"])
            errors.append(float(np.linalg.norm(_centroid_mm(blob, pair["fixed_affine"]) - fixed_c)))
        if errors:
            out["tre_mm"] = float(np.mean(errors))
        return out
    warped = _warp(moving_lab.float(), coords, "nearest")[0].round().long()
    scores = dice_per_label(fixed_lab[0].long(), warped, pair["labels"], moving_label=fixed_lab[0].long())
    out["dice"] = float(np.nanmean(list(scores.values())))
    return out


def _pairs(data: Path, only: set[str] | None) -> list[dict]:
    pairs = []

    def add(name, kind, fixed, moving, fixed_label, moving_label, similarity, labels=None):
        if only and kind not in only:
            return
        f_img, m_img = load_image(fixed), load_image(moving)
        f_lab = (load_image if kind == "prostate" else load_label)(fixed_label)
        m_lab = (load_image if kind == "prostate" else load_label)(moving_label)
        pairs.append({
            "name": name, "kind": kind, "similarity": similarity, "labels": labels,
            "fixed": f_img, "moving": m_img, "fixed_label": f_lab, "moving_label": m_lab,
            "fixed_affine": _affine(f_img), "moving_affine": _affine(m_img),
        })

    tiny = data / "tiny_mr_pair"
    if tiny.is_dir():
        add("tiny_mr_pair", "tiny", tiny / "anatomical.nii", tiny / "reoriented_anat_moved.nii",
            tiny / "anatomical_label.nii.gz", tiny / "reoriented_anat_moved_label.nii.gz", "lncc", [1])
    oasis = data / "oasis3d_pair"
    if oasis.is_dir():
        spec = json.loads((oasis / "dataset.json").read_text())
        for entry in spec["registration_val"]:
            f, m = (oasis / entry["fixed"]).resolve(), (oasis / entry["moving"]).resolve()
            add(f"oasis {m.name.split('_0000')[0]}->{f.name.split('_0000')[0]}", "oasis", f, m,
                oasis / "labelsTr" / f.name, oasis / "labelsTr" / m.name, "lncc", spec["evaluation_labels"])
    prostate = data / "prostate_mr_us"
    if prostate.is_dir():
        for case in sorted((prostate / "us_images").glob("case*.nii.gz")):
            name = f"prostate {case.name.split('.')[0]} MR->US"
            add(name, "prostate", case, prostate / "mr_images" / case.name,
                prostate / "us_labels" / case.name, prostate / "mr_labels" / case.name, "mi")
    head = data / "head2d"
    if head.is_dir():
        add("head2d T1<-PD", "head2d", head / "MR_2D_head_fixed.mha", head / "MR_2D_head_moving.mha",
            head / "MR_2D_head_fixed_mask.mha", head / "MR_2D_head_moving_mask.mha", "mi", [1])
    return pairs


def _run_pair(pair: dict, settings: dict) -> dict:
    fixed, moving = pair["fixed"], pair["moving"]
    fa, ma = pair["fixed_affine"], pair["moving_affine"]
    shape = tuple(fixed.shape[1:])
    identity_vox = np.linalg.inv(ma) @ fa
    row = {"pair": pair["name"], "similarity": pair["similarity"]}
    row["before"] = _evaluate(pair, _voxel_coords(shape, identity_vox))

    start = time.perf_counter()
    t = affine_register(fixed, moving, fa, ma, similarity=pair["similarity"], **settings)
    row["ours_s"] = time.perf_counter() - start
    row["ours"] = _evaluate(pair, _voxel_coords(shape, np.linalg.inv(ma) @ t.cpu().numpy() @ fa))

    # the baseline needs one grid: the moving image on the fixed grid (identity in world space), untimed
    moving_on_fixed = resample_affine(moving, torch.eye(len(shape) + 1, dtype=torch.float64), fa, ma, shape)
    start = time.perf_counter()
    ddf = sitk_affine(fixed[0], moving_on_fixed[0], spacing=_spacing(fa).tolist())
    row["sitk_s"] = time.perf_counter() - start
    row["sitk"] = _evaluate(pair, _voxel_coords(shape, identity_vox, ddf))
    return row


def _fmt(metrics: dict) -> str:
    text = f"{metrics['dice']:.3f}"
    if "tre_mm" in metrics:
        text += f" / {metrics['tre_mm']:.2f}"
    return text


def _markdown(result: dict) -> str:
    lines = [
        "# Affine pre-alignment: regnet_zoo `affine_register` vs `baselines.sitk_affine`",
        "",
        f"Command: `{result['command']}`  ",
        f"Threads: {result['threads']} torch and {result['threads']} SimpleITK thread(s) for both; "
        f"machine: {result['machine']} (shared, times are noisy).  ",
        f"Ours: {result['ours_settings']}; sitk_affine: its defaults (Mattes MI, 3 levels, 200 iterations). "
        "Its default `seed=0` is SimpleITK's wall-clock seed, so its numbers change from run to run; "
        "ours are deterministic.",
        "",
        "| pair | similarity | Dice (/ TRE mm) before | ours | sitk_affine | ours s | sitk s | speed-up |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['pair']} | {r['similarity']} | {_fmt(r['before'])} | {_fmt(r['ours'])} "
            f"| {_fmt(r['sitk'])} "
            f"| {r['ours_s']:.2f} | {r['sitk_s']:.2f} | {r['sitk_s'] / r['ours_s']:.1f}x |"
        )
    s, rows = result["summary"], result["rows"]
    tre = [r for r in rows if "tre_mm" in r["ours"]]
    lines += [
        "",
        f"Totals: ours {s['ours_s']:.1f} s, sitk_affine {s['sitk_s']:.1f} s "
        f"(speed-up {s['speed_up']:.1f}x overall, median per pair {s['median_speed_up']:.1f}x). "
        f"Mean Dice ours {s['ours_dice']:.3f} vs sitk {s['sitk_dice']:.3f}"
        + (f"; mean prostate TRE ours {s['ours_tre_mm']:.2f} mm vs sitk {s['sitk_tre_mm']:.2f} mm"
           if s.get("ours_tre_mm") is not None else "")
        + ".",
        "",
        "Goal (issue 13): >= 10x faster with equal or better Dice / TRE, on the totals and means: "
        f"**{s['goal']}**",
        "",
        f"Per pair: >= 10x faster on {sum(r['sitk_s'] >= 10 * r['ours_s'] for r in rows)} of {len(rows)}; "
        f"Dice >= sitk_affine's on {sum(r['ours']['dice'] >= r['sitk']['dice'] for r in rows)} of {len(rows)}"
        + (f"; TRE <= sitk_affine's on {sum(r['ours']['tre_mm'] <= r['sitk']['tre_mm'] for r in tre)} of "
           f"{len(tre)}" if tre else "")
        + ". The small images (few thousand voxels per level) are dominated by per-step overhead.",
        "",
    ]
    return "\n".join(lines)


def render(json_path: Path) -> None:
    """Rewrite the markdown table next to a results JSON (no registration is run)."""
    json_path.with_suffix(".md").write_text(_markdown(json.loads(json_path.read_text())))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--only", nargs="*", choices=["tiny", "oasis", "prostate", "head2d"])
    parser.add_argument("--out", type=Path, default=RESULTS / "affine")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(args.threads)
    settings = {"transform": "affine"}
    pairs = _pairs(args.data, set(args.only) if args.only else None)
    if not pairs:
        print(f"no data under {args.data}", file=sys.stderr)
        return 1
    rows = []
    for pair in pairs:
        row = _run_pair(pair, settings)
        rows.append(row)
        print(f"{row['pair']}: before {_fmt(row['before'])}  ours {_fmt(row['ours'])} ({row['ours_s']:.2f} s)"
              f"  sitk {_fmt(row['sitk'])} ({row['sitk_s']:.2f} s)", file=sys.stderr, flush=True)
    ours_s, sitk_s = sum(r["ours_s"] for r in rows), sum(r["sitk_s"] for r in rows)
    tre_rows = [r for r in rows if "tre_mm" in r["ours"]]
    speed_ups = [r["sitk_s"] / r["ours_s"] for r in rows]
    summary = {
        "ours_s": ours_s, "sitk_s": sitk_s, "speed_up": sitk_s / ours_s,
        "median_speed_up": float(np.median(speed_ups)),
        "ours_dice": float(np.mean([r["ours"]["dice"] for r in rows])),
        "sitk_dice": float(np.mean([r["sitk"]["dice"] for r in rows])),
        "ours_tre_mm": float(np.mean([r["ours"]["tre_mm"] for r in tre_rows])) if tre_rows else None,
        "sitk_tre_mm": float(np.mean([r["sitk"]["tre_mm"] for r in tre_rows])) if tre_rows else None,
    }
    faster = summary["speed_up"] >= 10
    accurate = summary["ours_dice"] >= summary["sitk_dice"] - 1e-3 and (
        not tre_rows or summary["ours_tre_mm"] <= summary["sitk_tre_mm"] + 1e-3
    )
    summary["goal"] = (
        "met" if faster and accurate else
        "NOT met: " + ", ".join(
            ([] if faster else [f"speed-up {summary['speed_up']:.1f}x < 10x"])
            + ([] if accurate else ["accuracy below sitk_affine on average"])
        )
    )
    result = {
        "command": "PYTHONPATH=$PWD python benchmarks/affine.py" + (" " + " ".join(argv) if argv else ""),
        "threads": args.threads,
        "machine": f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"SimpleITK {sitk.Version_VersionString()}",
        "ours_settings": "affine_register(transform='affine', similarity per pair, defaults otherwise)",
        "rows": rows,
        "summary": summary,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(_markdown(result))
    print(_markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
