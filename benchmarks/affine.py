"""Affine pre-alignment benchmark: ``register``'s affine stage (``regnet_zoo.api.pipeline.affine_stage``, i.e.
``core.affine.affine_register`` with ``AFFINE_STAGE_DEFAULTS``) vs ``baselines.sitk_affine``.

Side by side in one run, on the real pairs of ``regnet_zoo.data.real_pairs`` (``../shared/data``, read in
place; missing folders are skipped): tiny MR, OASIS (both directions, its 30 evaluation labels), the 8
prostate MR (moving) -> US (fixed) cases (gland Dice, TRE of the landmark-blob centroids; MI) and head2d
(T1 <- PD, MI); each pair's own similarity. Dice / TRE come from the pipeline's own evaluation
(``warp_and_evaluate``: labels warped once from the moving grid by nearest neighbour, landmarks mapped by
the whole transform).

``sitk_affine`` needs one grid: the moving image is first resampled onto the fixed grid (identity in world
space, linear; not timed) and the baseline is called as it is, on the raw intensities, with the fixed voxel
size; its DDF is relative to that identity resampling, so it is the whole transform. Times are wall-clock
seconds of the registration call alone, both with the same number of torch / SimpleITK threads.

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

from regnet_zoo.api.pipeline import (
    AFFINE_STAGE_DEFAULTS,
    affine_stage,
    check_inputs,
    moving_on_fixed_grid,
    total_ddf,
    warp_and_evaluate,
)
from regnet_zoo.baselines import sitk_affine
from regnet_zoo.core.geometry import affine_of, spacing_from_affine
from regnet_zoo.data.preprocess import Preprocessing
from regnet_zoo.data.real_pairs import real_pairs, shared_data_dir

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
#: the datasets this benchmark registers (hands2d has no labels and no similarity suited to X-ray edges here)
DATASETS = ("tiny_mr_pair", "oasis3d_pair", "prostate_mr_us", "head2d")


def _evaluate(pair, ddf: torch.Tensor) -> dict:
    """Dice (and TRE, mm) of the whole-transform voxel DDF ``(N, *S)`` on the fixed grid."""
    metrics = warp_and_evaluate(pair, ddf)[2]
    out = {"dice": float(metrics["dice_mean"])}
    if metrics.get("tre_mm") is not None:
        out["tre_mm"] = float(metrics["tre_mm"])
    return out


def _run_pair(spec) -> dict:
    pair = check_inputs(**spec.inputs())
    fixed_affine = affine_of(pair.fixed)
    zero = torch.zeros(pair.spatial_dims, *pair.fixed.shape[1:])
    row = {"pair": spec.name, "similarity": spec.similarity}
    row["before"] = _evaluate(pair, zero)

    start = time.perf_counter()
    matrix = affine_stage(pair, Preprocessing(), "affine", torch.device("cpu"), similarity=spec.similarity)
    row["ours_s"] = time.perf_counter() - start
    row["ours"] = _evaluate(pair, total_ddf(zero, matrix, fixed_affine))

    # the baseline needs one grid: the moving image on the fixed grid (identity in world space), untimed
    moving_on_fixed = moving_on_fixed_grid(pair.fixed, pair.moving)
    spacing = list(spacing_from_affine(fixed_affine, pair.spatial_dims))
    start = time.perf_counter()
    ddf = sitk_affine(pair.fixed[0].as_tensor(), moving_on_fixed[0], spacing=spacing)
    row["sitk_s"] = time.perf_counter() - start
    row["sitk"] = _evaluate(pair, ddf)
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
    parser.add_argument("--data", type=Path, default=shared_data_dir())
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--only", nargs="*", choices=DATASETS)
    parser.add_argument("--out", type=Path, default=RESULTS / "affine")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(args.threads)
    pairs = real_pairs(args.data, args.only or DATASETS)[0]
    if not pairs:
        print(f"no data under {args.data}", file=sys.stderr)
        return 1
    rows = []
    for pair in pairs:
        row = _run_pair(pair)
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
        "ours_settings": "register's affine stage (affine_stage: affine_register(transform='affine', "
        f"similarity per pair, {AFFINE_STAGE_DEFAULTS}, defaults otherwise) on min-max normalised images)",
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
