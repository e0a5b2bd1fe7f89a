"""Evidence for the shipped weights: every real pair of ``../shared/data``, the affine stage alone against
the affine stage followed by each method's shipped network (``regnet_zoo/pretrained``).

    python benchmarks/zoo_eval.py --out benchmarks/results/zoo_eval [--methods ...] [--instance-opt N]
        [--prostate-cases K] [--cards]

Pairs (read in place; a missing folder is skipped and listed in the JSON):

- ``tiny_mr_pair`` (3D, MR, 2 mm / 4 mm): anatomical -> reoriented_anat_moved, binary labels (Dice);
- ``oasis3d_pair`` (3D, T1, two subjects): OASIS_0001 (fixed) <- OASIS_0002 (moving), FreeSurfer labels
  (mean Dice over the labels present in both);
- ``prostate_mr_us`` (3D, multi-modal): per case, US fixed <- MR moving; label channel 0 (gland) for Dice,
  the centroids of the other label channels (0 to 2 landmark blobs per case) for TRE;
- ``head2d`` (2D, T1 fixed <- PD-like moving): head masks (Dice);
- ``hands2d`` (2D X-ray): 7 landmark pairs (TRE, in pixels of the 128x128 image, whose spacing is 1).

For each pair the affine stage (``register``'s default: affine, LNCC; MI for the multi-modal prostate and head
pairs, as in ``benchmarks/results/affine.md``) runs once;
each method then predicts the deformable field on the pre-aligned pair with its shipped weights and the
steps of ``regnet_zoo.api.pipeline`` (the same steps as ``register``). Writes ``<out>.json`` / ``<out>.md``;
``--cards`` also rewrites the model cards ``regnet_zoo/pretrained/<method>.md`` from the summaries of every
``benchmarks/results/zoo_eval*.json``. ``--demo`` (``make demo``): a few pairs, a few minutes.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor

from regnet_zoo import METHODS, project_root
from regnet_zoo.api.pipeline import (
    affine_stage,
    check_inputs,
    initial_metrics,
    pre_aligned,
    predict_ddf,
    prepare_network,
    total_ddf,
    warp_and_evaluate,
)
from regnet_zoo.core.geometry import affine_of, voxel_to_lps
from regnet_zoo.data.io import json_ready, load_image
from regnet_zoo.data.preprocess import Preprocessing
from regnet_zoo.pretrained import PRETRAINED_DIR, model_card, shipped_weights

DATA = project_root().parent / "shared" / "data"
#: what the JSON repeats of each shipped file's training record
WEIGHT_FIELDS = ("iterations", "wall_time_s", "grid", "device")


def _mean(values: list[float]) -> float | None:
    values = [float(v) for v in values if v is not None and np.isfinite(v)]
    return float(np.mean(values)) if values else None


def _label_from_channel(path: Path, channel: int) -> MetaTensor:
    image = load_image(path)
    return MetaTensor((image[channel : channel + 1] > 0.5).long(), affine=image.affine)


def _blob_landmarks(fixed_path: Path, moving_path: Path) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Physical LPS centroids ``(K, N)`` of the landmark blobs (label channels 1, 2, ... present and
    non-empty in both images; cases have 0 to 2), or (None, None)."""
    fixed, moving = load_image(fixed_path), load_image(moving_path)
    f_arr, m_arr = np.asarray(fixed), np.asarray(moving)
    channels = [
        c
        for c in range(1, min(len(f_arr), len(m_arr)))
        if (f_arr[c] > 0.5).any() and (m_arr[c] > 0.5).any()
    ]
    if not channels:
        return None, None
    f_vox = np.stack([np.argwhere(f_arr[c] > 0.5).mean(axis=0) for c in channels])
    m_vox = np.stack([np.argwhere(m_arr[c] > 0.5).mean(axis=0) for c in channels])
    return voxel_to_lps(f_vox, affine_of(fixed)), voxel_to_lps(m_vox, affine_of(moving))


def _hands_landmarks(folder: Path, image_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """FAIR's hand landmarks (world units on [0, 20] x [0, 25], cell-centred 128x128 grid, image rows
    flipped: ``x2`` counts upwards) -> physical LPS points of the loaded images (fixed R, moving T).

    The convention was checked against the images: an affine fitted to the landmark pairs maps T onto R with
    intensity correlation 0.90 (0.23 to 0.63 for the other axis orders and flips)."""
    table = np.loadtxt(folder / "hands_landmarks.csv", delimiter=",", skiprows=2)
    h = np.array([20 / 128, 25 / 128])

    def voxels(world: np.ndarray) -> np.ndarray:
        return np.stack([world[:, 0] / h[0] - 0.5, 128 - world[:, 1] / h[1] - 0.5], axis=1)

    affine = affine_of(load_image(image_path))
    return voxel_to_lps(voxels(table[:, 2:4]), affine), voxel_to_lps(voxels(table[:, 0:2]), affine)


def real_pairs(data: Path, prostate_cases: int) -> tuple[list[dict[str, Any]], list[str]]:
    """The evaluation pairs (dicts of ``check_inputs`` arguments plus ``name``, ``dataset``), and the
    folders that were missing."""
    pairs, missing = [], []
    tiny = data / "tiny_mr_pair"
    if tiny.is_dir():
        pairs.append(
            dict(
                dataset="tiny_mr_pair",
                name="tiny_mr_pair",
                fixed=tiny / "anatomical.nii",
                moving=tiny / "reoriented_anat_moved.nii",
                fixed_label=tiny / "anatomical_label.nii.gz",
                moving_label=tiny / "reoriented_anat_moved_label.nii.gz",
            )
        )
    else:
        missing.append("tiny_mr_pair")
    oasis = data / "oasis3d_pair"
    if oasis.is_dir():
        pairs.append(
            dict(
                dataset="oasis3d_pair",
                name="oasis3d_0001<-0002",
                fixed=oasis / "imagesTr" / "OASIS_0001_0000.nii.gz",
                moving=oasis / "imagesTr" / "OASIS_0002_0000.nii.gz",
                fixed_label=oasis / "labelsTr" / "OASIS_0001_0000.nii.gz",
                moving_label=oasis / "labelsTr" / "OASIS_0002_0000.nii.gz",
            )
        )
    else:
        missing.append("oasis3d_pair")
    prostate = data / "prostate_mr_us"
    if prostate.is_dir():
        for case in sorted((prostate / "us_images").glob("case*.nii.gz"))[:prostate_cases]:
            us_lab, mr_lab = prostate / "us_labels" / case.name, prostate / "mr_labels" / case.name
            fixed_pts, moving_pts = _blob_landmarks(us_lab, mr_lab)
            pairs.append(
                dict(
                    dataset="prostate_mr_us",
                    similarity="mi",  # MR -> US
                    name=f"prostate_{case.name.split('.')[0]}",
                    fixed=case,
                    moving=prostate / "mr_images" / case.name,
                    fixed_label=_label_from_channel(us_lab, 0),
                    moving_label=_label_from_channel(mr_lab, 0),
                    fixed_landmarks=fixed_pts,
                    moving_landmarks=moving_pts,
                )
            )
    else:
        missing.append("prostate_mr_us")
    head = data / "head2d"
    if head.is_dir():
        pairs.append(
            dict(
                dataset="head2d",
                similarity="mi",  # T1 <- PD
                name="head2d_T1<-PD",
                fixed=head / "MR_2D_head_fixed.mha",
                moving=head / "MR_2D_head_moving.mha",
                fixed_label=head / "MR_2D_head_fixed_mask.mha",
                moving_label=head / "MR_2D_head_moving_mask.mha",
            )
        )
    else:
        missing.append("head2d")
    hands = data / "hands2d"
    if hands.is_dir():
        fixed_pts, moving_pts = _hands_landmarks(hands, hands / "hands-R.jpg")
        pairs.append(
            dict(
                dataset="hands2d",
                name="hands2d_R<-T",
                fixed=hands / "hands-R.jpg",
                moving=hands / "hands-T.jpg",
                fixed_landmarks=fixed_pts,
                moving_landmarks=moving_pts,
            )
        )
    else:
        missing.append("hands2d")
    return pairs, missing


def builtin_pairs() -> list[dict[str, Any]]:
    """Built-in phantom pairs (2D 96x96 and 3D 48^3, labels), for machines without ``../shared/data``."""
    from regnet_zoo.data.phantom import PhantomTemplate, make_phantom_subject

    def image(subject: dict, key: str) -> MetaTensor:
        return MetaTensor(torch.as_tensor(subject[key]), affine=np.diag([-1.0, -1.0, 1.0, 1.0]))

    pairs = []
    for shape in ((96, 96), (48, 48, 48)):
        template = PhantomTemplate(shape, 0)
        a, b = (make_phantom_subject(template, s) for s in (1, 2))

        pairs.append(
            dict(
                dataset=f"phantom{len(shape)}d",
                name=f"phantom{len(shape)}d_1<-2",
                fixed=image(a, "image"),
                moving=image(b, "image"),
                fixed_label=image(a, "label"),
                moving_label=image(b, "label"),
            )
        )
    return pairs


def bspline_row(pair, moving: MetaTensor, matrix: np.ndarray, row: dict[str, Any]) -> dict[str, Any]:
    """SimpleITK's B-spline FFD (``regnet_zoo.baselines.sitk_bspline``, its own affine first) on the
    pre-aligned pair: the classic reference the networks with instance optimisation are held against."""
    from regnet_zoo.api.pipeline import moving_on_fixed_grid
    from regnet_zoo.baselines import sitk_bspline
    from regnet_zoo.core.geometry import spacing_from_affine
    from regnet_zoo.data.preprocess import normalise_intensity

    fixed_affine = affine_of(pair.fixed)
    prep = Preprocessing()
    fixed_n = normalise_intensity(pair.fixed, prep.normalize, prep.percentiles, prep.ct_window)
    moving_n = normalise_intensity(moving, prep.normalize, prep.percentiles, prep.ct_window)
    moving_n = MetaTensor(moving_n, affine=moving.affine)
    spacing = spacing_from_affine(fixed_affine, pair.spatial_dims)
    t = time.perf_counter()
    ddf = sitk_bspline(fixed_n[0], moving_on_fixed_grid(pair.fixed, moving_n)[0], spacing)
    seconds = time.perf_counter() - t
    _, _, metrics = warp_and_evaluate(pair, total_ddf(ddf, matrix, fixed_affine))
    out = {**row, "method": "sitk_bspline", "status": "ok", "dice": metrics.get("dice_mean")}
    out.update(tre=metrics.get("tre_mm"), folding_percent=metrics.get("folding_percent"), network_s=seconds)
    out["beats_affine"] = _beats(out)
    return out


def evaluate_pair(
    spec: dict[str, Any], methods: list[str], instance_opt: int, bspline: bool = False
) -> list[dict[str, Any]]:
    device = torch.device("cpu")
    keys = ("fixed", "moving", "fixed_label", "moving_label", "fixed_landmarks", "moving_landmarks")
    pair = check_inputs(*[spec.get(k) for k in keys])
    start = time.perf_counter()
    options = {"similarity": spec["similarity"]} if "similarity" in spec else {}
    matrix = affine_stage(pair, Preprocessing(), "affine", device, **options)
    affine_s = time.perf_counter() - start
    base = initial_metrics(pair, matrix)
    moving = pre_aligned(pair.moving, matrix)
    rows = []
    for method in methods:
        weights = shipped_weights(method, pair.spatial_dims)
        row: dict[str, Any] = {
            "dataset": spec["dataset"],
            "pair": spec["name"],
            "dims": pair.spatial_dims,
            "method": method,
            "dice_initial": base.get("dice_mean_initial"),
            "dice_affine": base.get("dice_mean_affine"),
            "tre_initial": _initial_tre(pair),
            "tre_affine": base.get("tre_mm_affine"),
            "affine_s": round(affine_s, 2),
            "affine_similarity": spec.get("similarity", "lncc"),
        }
        if weights is None:
            rows.append({**row, "status": "no shipped weights"})
            continue
        network, prep = prepare_network(method, weights, device, pair)
        loss = None
        if instance_opt:
            from regnet_zoo.api.instance import bundle_instance_loss

            loss = bundle_instance_loss(method, pair.spatial_dims, device)
        t = time.perf_counter()
        ddf = predict_ddf(network, prep, pair.fixed, moving, device, instance_opt, loss)
        network_s = time.perf_counter() - t
        _, _, metrics = warp_and_evaluate(pair, total_ddf(ddf, matrix, affine_of(pair.fixed)))
        row.update(
            status="ok",
            weights=str(Path(weights).relative_to(project_root())),
            instance_opt=instance_opt,
            dice=metrics.get("dice_mean"),
            tre=metrics.get("tre_mm"),
            sdlogj=metrics.get("sdlogj"),
            folding_percent=metrics.get("folding_percent"),
            network_s=round(network_s, 2),
        )
        row["beats_affine"] = _beats(row)
        rows.append(row)
        _print(row)
    if bspline:
        rows.append(bspline_row(pair, moving, matrix, {k: v for k, v in rows[0].items() if k in BASE_KEYS}))
        _print(rows[-1])
    return rows


#: the per-pair fields every row of a pair shares
BASE_KEYS = ("dataset", "pair", "dims", "dice_initial", "dice_affine", "tre_initial", "tre_affine")


def _print(row: dict[str, Any]) -> None:
    print(
        f"{row['pair']:>22} {row['method']:>14}: Dice {_f(row['dice_affine'])} -> {_f(row.get('dice'))}, "
        f"TRE {_f(row['tre_affine'])} -> {_f(row.get('tre'))}, {_f(row.get('network_s'))} s",
        flush=True,
    )


def _initial_tre(pair) -> float | None:
    if pair.fixed_points is None:
        return None
    return float(np.mean(np.linalg.norm(pair.fixed_points - pair.moving_points, axis=1)))


def _beats(row: dict[str, Any]) -> bool | None:
    """True when the network improves on the affine stage in every measure the pair has (Dice up, TRE
    down); None when the pair has neither."""
    checks = []
    if row.get("dice") is not None and row.get("dice_affine") is not None:
        checks.append(row["dice"] > row["dice_affine"])
    if row.get("tre") is not None and row.get("tre_affine") is not None:
        checks.append(row["tre"] < row["tre_affine"])
    return all(checks) if checks else None


def _f(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, float) else "-"


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (dataset, method): means over the dataset's pairs (prostate: its cases)."""
    out = []
    for dataset in dict.fromkeys(r["dataset"] for r in rows):
        for method in dict.fromkeys(r["method"] for r in rows):
            group = [
                r for r in rows if r["dataset"] == dataset and r["method"] == method and r["status"] == "ok"
            ]
            if not group:
                continue
            summary = {"pair": dataset, "method": method, "dims": group[0]["dims"], "pairs": len(group)}
            summary["instance_opt"] = group[0].get("instance_opt", 0)
            keys = ("dice_initial", "dice_affine", "dice", "tre_initial", "tre_affine", "tre", "network_s")
            for key in keys:
                summary[key] = _mean([r.get(key) for r in group])
            summary["beats_affine"] = _beats(summary)
            summary["wins"] = f"{sum(bool(r.get('beats_affine')) for r in group)}/{len(group)}"
            out.append(summary)
    return out


def markdown(summary: list[dict[str, Any]], header: str) -> str:
    lines = [
        header,
        "",
        "| pair | method | pairs | Dice initial | Dice affine | Dice + network | TRE initial | TRE affine | "
        "TRE + network | beats affine (pairs) | network s | instance-opt steps |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in summary:
        lines.append(
            f"| {r['pair']} ({r['dims']}D) | {r['method']} | {r['pairs']} | {_f(r['dice_initial'])} | "
            f"{_f(r['dice_affine'])} | {_f(r['dice'])} | {_f(r['tre_initial'])} | {_f(r['tre_affine'])} | "
            f"{_f(r['tre'])} | {r['beats_affine']} ({r['wins']}) | {_f(r['network_s'])} | "
            f"{r.get('instance_opt')} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", default=["all"])
    parser.add_argument("--data", default=str(DATA), help="the shared data folder (read in place)")
    parser.add_argument("--prostate-cases", type=int, default=8)
    parser.add_argument("--pairs", nargs="+", help="only these datasets (e.g. tiny_mr_pair hands2d)")
    parser.add_argument("--instance-opt", type=int, default=0, help="instance-optimisation steps (0: off)")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--bspline", action="store_true", help="add SimpleITK's B-spline FFD per pair")
    parser.add_argument("--cards", action="store_true", help="rewrite the model cards with the results")
    parser.add_argument(
        "--cards-only", action="store_true", help="only rewrite the model cards from the committed results"
    )
    parser.add_argument(
        "--demo",
        action="store_true",
        help="`make demo`: tiny MR, one prostate case, head2d, hands2d (no OASIS); the built-in phantom "
        "pairs when the data folder is absent",
    )
    parser.add_argument("--out", default="benchmarks/results/zoo_eval", help="writes <out>.json and <out>.md")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    methods = list(METHODS) if args.methods == ["all"] else args.methods
    if args.cards_only:
        write_cards(methods)
        return 0
    pairs, missing = real_pairs(Path(args.data), 1 if args.demo else args.prostate_cases)
    if args.demo:
        pairs = [p for p in pairs if p["dataset"] != "oasis3d_pair"] or builtin_pairs()
    if args.pairs:
        pairs = [p for p in pairs if p["dataset"] in args.pairs]
    start = time.perf_counter()
    rows: list[dict[str, Any]] = []
    for spec in pairs:
        rows += evaluate_pair(spec, methods, args.instance_opt, args.bspline)
    summary = summarise(rows)
    command = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv or sys.argv[1:])])
    weights = {
        p.stem: json.loads(p.with_suffix(".json").read_text())["trained_on"]
        for p in sorted(PRETRAINED_DIR.glob("*.pt"))
        if p.with_suffix(".json").is_file()
    }
    result = {
        "command": command,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": f"CPU ({platform.machine()}), {torch.get_num_threads()} thread(s)",
        "wall_time_s": round(time.perf_counter() - start, 1),
        "missing_data": missing,
        "instance_opt": args.instance_opt,
        "weights": {k: {f: v.get(f) for f in WEIGHT_FIELDS} for k, v in weights.items()},
        "summary": summary,
        "rows": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(json_ready(result), indent=2) + "\n")
    header = (
        f"# Shipped weights on real pairs: affine stage vs affine stage + network\n\n`{command}`; "
        f"{result['device']}; {result['wall_time_s']} s. Dice: mean over the labels; TRE in mm "
        "(hands2d: pixels). Means over the pairs of a dataset (prostate: its cases)."
    )
    table = markdown(summary, header)
    out.with_suffix(".md").write_text(table)
    print(table)
    if args.cards:
        write_cards(methods)
    return 0


def write_cards(methods: list[str]) -> None:
    """The model cards from the summaries of every committed evaluation (zoo_eval_3d, zoo_eval_2d, ...)."""
    results = sorted((project_root() / "benchmarks" / "results").glob("zoo_eval*.json"))
    rows = [r for path in results for r in json.loads(path.read_text())["summary"]]
    for method in methods:
        (PRETRAINED_DIR / f"{method}.md").write_text(model_card(method, PRETRAINED_DIR, {"rows": rows}))


if __name__ == "__main__":
    sys.exit(main())
