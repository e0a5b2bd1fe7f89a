"""Evidence for the shipped weights: every real pair of ``../shared/data`` (``regnet_zoo.data.real_pairs``,
read in place), the affine stage alone against the affine stage followed by each method's shipped network
(``regnet_zoo.pretrained``), optionally with instance optimisation, SimpleITK's affine and its B-spline.

    python benchmarks/zoo_eval.py --out benchmarks/results/zoo_eval_3d --pairs tiny_mr_pair oasis3d_pair \
        prostate_mr_us --instance-opt 0 20 --sitk-affine --bspline --threads 1
    python benchmarks/zoo_eval.py --cards-only    # model cards from the committed zoo_eval_{2d,3d}.json

Pairs, labels and landmarks: ``regnet_zoo.data.real_pairs`` (Dice over the anatomical labels only: OASIS's
30 evaluation labels, the prostate gland; TRE on the landmarks: prostate blob centroids, hands). The affine
stage is ``register``'s (:func:`regnet_zoo.api.pipeline.affine_stage`, its defaults) with each pair's
similarity (MI across modalities, LNCC otherwise; ``--affine-metric`` forces one for every pair). Each method
then predicts the deformable field on the pre-aligned pair with the steps of ``register``, once per
``--instance-opt`` value (0: the network alone; the objective is the pair's similarity, MI across
modalities, plus 0.1 diffusion; ``--instance-similarity bundle``: the bundle's own loss). ``--sitk-affine``:
SimpleITK's affine on the same pair, the independent reference for the affine stage. ``--bspline``:
SimpleITK's B-spline FFD (without its own affine) on our pre-aligned pair; the table then says whether a
network (+ instance optimisation) reaches its accuracy in <= 1/10 of its time (deformable stage only; the
affine stage is shared). Writes ``<out>.json`` /
``<out>.md``; ``--cards`` also rewrites the model cards ``<weights folder>/<method>.md`` from
``zoo_eval_2d.json`` and ``zoo_eval_3d.json`` (:data:`CARD_RESULTS`). ``--demo`` (``make demo``): tiny MR,
one prostate case, head2d and hands2d with every method's shipped weights; the built-in phantom pairs when
the data folder is absent. Weights: ``regnet_zoo/pretrained``, or ``$REGNET_ZOO_PRETRAINED``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import shlex
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor

from regnet_zoo import METHODS, project_root
from regnet_zoo.api.pipeline import (
    PairInputs,
    affine_stage,
    check_inputs,
    initial_metrics,
    moving_on_fixed_grid,
    pre_aligned,
    predict_ddf,
    prepare_network,
    total_ddf,
    warp_and_evaluate,
)
from regnet_zoo.core.geometry import affine_of, spacing_from_affine
from regnet_zoo.data.io import json_ready
from regnet_zoo.data.preprocess import Preprocessing, normalise_intensity
from regnet_zoo.data.real_pairs import DATASETS, RealPair, builtin_pairs, real_pairs, shared_data_dir
from regnet_zoo.pretrained import model_card, pretrained_dir, shipped_files, shipped_weights

#: what the JSON repeats of each shipped file's training record
WEIGHT_FIELDS = ("iterations", "wall_time_s", "grid", "device")
#: the committed evaluations the model cards are written from
CARD_RESULTS = ("zoo_eval_2d.json", "zoo_eval_3d.json")
#: the datasets of ``--demo`` (OASIS: its 160x192x224 labels make the evaluation too slow for a demo)
DEMO_DATASETS = ("tiny_mr_pair", "prostate_mr_us", "head2d", "hands2d")
#: classic references: rows with these "methods" are not networks
REFERENCES = ("sitk_affine", "sitk_bspline")
#: Dice / TRE margins within which a network "reaches" SimpleITK B-spline's accuracy
DICE_TOL, TRE_TOL_MM = 0.005, 0.1


def _mean(values: list[float]) -> float | None:
    values = [float(v) for v in values if v is not None and np.isfinite(v)]
    return float(np.mean(values)) if values else None


def _normalised(image: MetaTensor) -> MetaTensor:
    prep = Preprocessing()
    out = normalise_intensity(image, prep.normalize, prep.percentiles, prep.ct_window)
    return MetaTensor(out, affine=image.affine)


def _reference_row(pair: PairInputs, matrix: np.ndarray | None, row: dict[str, Any], method: str) -> dict:
    """A SimpleITK reference on the pair: ``sitk_affine`` on the raw pair (the affine stage's reference),
    ``sitk_bspline`` (the FFD alone, no affine of its own) on our pre-aligned pair. Min-max normalised
    images on the fixed grid, as the baselines take them."""
    from regnet_zoo import baselines

    fixed_affine = affine_of(pair.fixed)
    spacing = spacing_from_affine(fixed_affine, pair.spatial_dims)
    moving = _normalised(pre_aligned(pair.moving, matrix) if method == "sitk_bspline" else pair.moving)
    fixed = _normalised(pair.fixed)[0]
    # on our pre-aligned pair the B-spline runs without its own affine: its centre-of-mass start would undo
    # the alignment across modalities (prostate MR-US: Dice 0.68 -> 0.00 with it)
    options = {"affine_iterations": 0} if method == "sitk_bspline" else {}
    t = time.perf_counter()
    ddf = getattr(baselines, method)(fixed, moving_on_fixed_grid(pair.fixed, moving)[0], spacing, **options)
    seconds = time.perf_counter() - t
    whole = total_ddf(ddf, matrix, fixed_affine) if method == "sitk_bspline" else ddf
    _, _, metrics = warp_and_evaluate(pair, whole)
    out = {**row, "method": method, "status": "ok", "instance_opt": 0, "dice": metrics.get("dice_mean")}
    out.update(tre=metrics.get("tre_mm"), folding_percent=metrics.get("folding_percent"))
    out.update(sdlogj=metrics.get("sdlogj"), network_s=round(seconds, 2))
    out["beats_affine"] = _beats(out)
    return out


def evaluate_pair(
    spec: RealPair,
    methods: list[str],
    instance_opts: list[int],
    bspline: bool = False,
    sitk_affine: bool = False,
    affine_metric: str | None = None,
    instance_similarity: str = "pair",
    instance_grid: str = "input",
) -> list[dict[str, Any]]:
    device = torch.device("cpu")
    pair = check_inputs(**spec.inputs())
    similarity = affine_metric or spec.similarity
    # instance optimisation's objective: the bundle's training loss, or an image similarity ("pair": the
    # pair's own, MI across modalities, as for the affine stage)
    io_similarity = None if instance_similarity == "bundle" else instance_similarity
    if io_similarity == "pair":
        io_similarity = spec.similarity if spec.similarity in ("lncc", "mi") else "lncc"
    start = time.perf_counter()
    matrix = affine_stage(pair, Preprocessing(), "affine", device, similarity=similarity)
    affine_s = time.perf_counter() - start
    base = initial_metrics(pair, matrix)
    moving = pre_aligned(pair.moving, matrix)
    shared = {
        "dataset": spec.dataset,
        "pair": spec.name,
        "dims": pair.spatial_dims,
        "dice_initial": base.get("dice_mean_initial"),
        "dice_affine": base.get("dice_mean_affine"),
        "tre_initial": _initial_tre(pair),
        "tre_affine": base.get("tre_mm_affine"),
        "affine_s": round(affine_s, 2),
        "affine_similarity": similarity,
    }
    rows = []
    if sitk_affine:
        rows.append(_reference_row(pair, None, shared, "sitk_affine"))
        _print(rows[-1])
    for method in methods:
        weights = shipped_weights(method, pair.spatial_dims)
        if weights is None:
            rows.append({**shared, "method": method, "status": "no shipped weights"})
            continue
        network, prep = prepare_network(method, weights, device, pair)
        for steps in instance_opts:
            loss = None
            if steps:
                from regnet_zoo.api.instance import bundle_instance_loss

                loss = bundle_instance_loss(method, pair.spatial_dims, device, io_similarity)
            t = time.perf_counter()
            ddf = predict_ddf(network, prep, pair.fixed, moving, device, steps, loss,
                              instance_grid=instance_grid)
            network_s = time.perf_counter() - t
            _, _, metrics = warp_and_evaluate(pair, total_ddf(ddf, matrix, affine_of(pair.fixed)))
            row = {**shared, "method": method, "status": "ok", "weights": _shown(weights)}
            row.update(
                instance_opt=steps,
                instance_similarity=(io_similarity or "bundle") if steps else None,
                instance_grid=instance_grid if steps else None,
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
        rows.append(_reference_row(pair, matrix, shared, "sitk_bspline"))
        _print(rows[-1])
    return rows


def _shown(path: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(project_root()))
    except ValueError:
        return str(path)


def _print(row: dict[str, Any]) -> None:
    io = f"+io{row['instance_opt']}" if row.get("instance_opt") else ""
    print(
        f"{row['pair']:>22} {row['method'] + io:>18}: "
        f"Dice {_f(row['dice_affine'])} -> {_f(row.get('dice'))}, "
        f"TRE {_f(row['tre_affine'])} -> {_f(row.get('tre'))}, {_f(row.get('network_s'))} s",
        flush=True,
    )


def _initial_tre(pair: PairInputs) -> float | None:
    if pair.fixed_points is None:
        return None
    return float(np.mean(np.linalg.norm(pair.fixed_points - pair.moving_points, axis=1)))


def _beats(row: dict[str, Any]) -> bool | None:
    """True when the row improves on the affine stage in every measure the pair has (Dice up, TRE down);
    None when the pair has neither."""
    checks = []
    if row.get("dice") is not None and row.get("dice_affine") is not None:
        checks.append(row["dice"] > row["dice_affine"])
    if row.get("tre") is not None and row.get("tre_affine") is not None:
        checks.append(row["tre"] < row["tre_affine"])
    return all(checks) if checks else None


def _reaches(row: dict[str, Any], ref: dict[str, Any]) -> bool | None:
    """Whether ``row`` is at least as accurate as the reference ``ref`` (Dice within DICE_TOL, TRE within
    TRE_TOL_MM) in every measure both have."""
    checks = []
    if row.get("dice") is not None and ref.get("dice") is not None:
        checks.append(row["dice"] >= ref["dice"] - DICE_TOL)
    if row.get("tre") is not None and ref.get("tre") is not None:
        checks.append(row["tre"] <= ref["tre"] + TRE_TOL_MM)
    return all(checks) if checks else None


def _f(value: Any, digits: int = 3) -> str:
    return f"{value:.{digits}f}" if isinstance(value, float) else "-"


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (dataset, method, instance-optimisation steps): means over the dataset's pairs
    (prostate: its cases, OASIS: both directions), with the comparison against SimpleITK's B-spline when
    the run has it (``vs_bspline``: accuracy reached; ``time_ratio``: deformable-stage s / B-spline's)."""
    out = []
    ok = [r for r in rows if r["status"] == "ok"]
    keys = ("dice_initial", "dice_affine", "dice", "tre_initial", "tre_affine", "tre")
    keys += ("network_s", "affine_s")
    for dataset in dict.fromkeys(r["dataset"] for r in ok):
        for method, steps in dict.fromkeys((r["method"], r.get("instance_opt", 0)) for r in ok):
            group = [
                r
                for r in ok
                if r["dataset"] == dataset and r["method"] == method and r["instance_opt"] == steps
            ]
            if not group:
                continue
            summary = {"pair": dataset, "method": method, "dims": group[0]["dims"], "pairs": len(group)}
            summary["instance_opt"] = steps
            summary["affine_similarity"] = group[0].get("affine_similarity")
            for key in keys:
                summary[key] = _mean([r.get(key) for r in group])
            summary["beats_affine"] = _beats(summary)
            summary["wins"] = f"{sum(bool(r.get('beats_affine')) for r in group)}/{len(group)}"
            out.append(summary)
    for dataset in dict.fromkeys(s["pair"] for s in out):
        ref = next((s for s in out if s["pair"] == dataset and s["method"] == "sitk_bspline"), None)
        if ref is None:
            continue
        for s in out:
            if s["pair"] == dataset and s["method"] not in REFERENCES:
                # False: SimpleITK's B-spline is itself worse than the affine stage here (a weak reference)
                s["bspline_beats_affine"] = ref["beats_affine"]
                s["vs_bspline"] = _reaches(s, ref)
                s["time_ratio"] = s["network_s"] / ref["network_s"] if ref["network_s"] else None
                s["bspline_goal"] = (
                    bool(s["vs_bspline"]) and s["time_ratio"] is not None and (s["time_ratio"] <= 0.1)
                )
    return out


def markdown(summary: list[dict[str, Any]], header: str) -> str:
    lines = [
        header,
        "",
        "| pair | method | instance-opt steps | pairs | Dice initial | Dice affine | Dice after "
        "| TRE initial | TRE affine | TRE after | beats affine (pairs) | s (deformable) | reaches B-spline "
        "| time / B-spline |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in summary:
        ratio = r.get("time_ratio")
        lines.append(
            f"| {r['pair']} ({r['dims']}D, affine {r.get('affine_similarity')}) | {r['method']} | "
            f"{r.get('instance_opt', 0)} | {r['pairs']} | {_f(r['dice_initial'])} | {_f(r['dice_affine'])} | "
            f"{_f(r['dice'])} | {_f(r['tre_initial'], 2)} | {_f(r['tre_affine'], 2)} | {_f(r['tre'], 2)} | "
            f"{r['beats_affine']} ({r['wins']}) | {_f(r['network_s'], 2)} | {r.get('vs_bspline', '-')} | "
            f"{_f(ratio, 3)} |"
        )
    return "\n".join(lines) + "\n"


def _pairs(args: argparse.Namespace) -> tuple[list[RealPair], list[str]]:
    datasets = args.pairs or (DEMO_DATASETS if args.demo else DATASETS)
    pairs, missing = real_pairs(args.data, datasets, 1 if args.demo else args.prostate_cases)
    if args.demo and not pairs:
        pairs = builtin_pairs()
    return pairs, missing


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", default=["all"])
    parser.add_argument("--data", default=str(shared_data_dir()), help="the shared data (read in place)")
    parser.add_argument("--prostate-cases", type=int, default=8)
    parser.add_argument("--pairs", nargs="+", choices=DATASETS, help="only these datasets")
    parser.add_argument(
        "--instance-opt", nargs="+", type=int, default=[0], help="instance-optimisation steps, one run each"
    )
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument(
        "--affine-metric",
        choices=("lncc", "ncc", "mi", "mse"),
        help="the affine stage's similarity for every pair (default: each pair's own, MI across modalities)",
    )
    parser.add_argument(
        "--instance-similarity",
        choices=("pair", "bundle", "lncc", "mi", "ngf"),
        default="pair",
        help="instance optimisation's objective: 'pair' (default): the pair's own similarity (MI across "
        "modalities, else LNCC) + 0.1 diffusion; 'bundle': the bundle's training loss (image terms)",
    )
    parser.add_argument(
        "--instance-grid",
        choices=("input", "network"),
        default="input",
        help="where instance optimisation runs (register's instance_grid): 'input' (default, as register): "
        "the steps on the network's parameters on its working grid, then as many on the fixed image's own "
        "grid; 'network': only the former",
    )
    parser.add_argument("--sitk-affine", action="store_true", help="add SimpleITK's affine per pair")
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
    parser.add_argument(
        "--merge",
        metavar="JSON",
        help="keep the rows of this earlier run for the (dataset, method) pairs, SimpleITK references "
        "included, not run now; e.g. after retraining one method: `--methods regnet --merge <its JSON>`",
    )
    args = parser.parse_args(argv)
    # MONAI's DiffusionLoss indexes with lists (values are right); keep the demo's output readable
    warnings.filterwarnings("ignore", message="Using a non-tuple sequence for multidimensional indexing")
    if args.threads:
        torch.set_num_threads(args.threads)
        try:
            import SimpleITK as sitk

            sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(args.threads)
        except ImportError:
            pass
    methods = list(METHODS) if args.methods == ["all"] else args.methods
    if args.cards_only:
        write_cards(methods)
        return 0
    files = shipped_files()
    if not files:
        print(f"no weights in {pretrained_dir()} (benchmarks/train_zoo.py makes them)", file=sys.stderr)
        return 1
    pairs, missing = _pairs(args)
    start = time.perf_counter()
    rows: list[dict[str, Any]] = []
    for spec in pairs:
        rows += evaluate_pair(
            spec,
            methods,
            args.instance_opt,
            args.bspline,
            args.sitk_affine,
            args.affine_metric,
            args.instance_similarity,
            args.instance_grid,
        )
    merged = None
    if args.merge:
        rows, merged = merge_rows(json.loads(Path(args.merge).read_text()), rows)
    summary = summarise(rows)
    command = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv or sys.argv[1:])])
    records = {p.stem: json.loads(j.read_text()) for p in files if (j := p.with_suffix(".json")).is_file()}
    result = {
        "command": command,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": f"CPU ({platform.machine()}), {torch.get_num_threads()} thread(s)",
        "wall_time_s": round(time.perf_counter() - start, 1),
        "missing_data": missing,
        "instance_opt": args.instance_opt,
        "weights_folder": _shown(pretrained_dir()),
        "weights": {k: {f: v["trained_on"].get(f) for f in WEIGHT_FIELDS} for k, v in records.items()},
        "summary": summary,
        "rows": rows,
    }
    if merged:
        result["merged_from"] = merged
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(json_ready(result), indent=2) + "\n")
    header = (
        f"# Shipped weights on real pairs: affine stage vs affine stage + network\n\n`{command}`; "
        f"{result['device']}; {result['wall_time_s']} s. Dice: mean over the anatomical labels (OASIS: its "
        "30 evaluation labels; prostate: the gland); TRE in mm (prostate: landmark-blob centroids; hands2d: "
        "pixels). Means over the pairs of a dataset. The affine stage is `register`'s, with the similarity "
        "shown; sitk_affine: SimpleITK's affine on the raw pair (its 'Dice after' is its own affine); "
        "sitk_bspline: SimpleITK's B-spline on our pre-aligned pair. 's (deformable)': the network "
        "(+ instance optimisation) or the SimpleITK call alone. 'reaches B-spline': Dice within "
        f"{DICE_TOL} and TRE within {TRE_TOL_MM} mm of sitk_bspline's; goal: reached at time / B-spline "
        "<= 0.1. Where sitk_bspline does not beat the affine stage itself (its row), reaching it means "
        "little."
    )
    if merged:
        header += (f"\n\nRows of {', '.join(merged['methods'])} are kept from the earlier run "
                   f"`{merged['command']}` ({merged['date']}, {merged['device']}); the time above is this "
                   "run's alone.")  # fmt: skip
    table = markdown(summary, header)
    out.with_suffix(".md").write_text(table)
    print(table)
    if args.cards:
        write_cards(methods, out.parent)
    return 0


def merge_rows(earlier: dict[str, Any], rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], dict]:
    """``rows`` plus the rows of an ``earlier`` run (its JSON) for the (dataset, method) pairs this run did
    not evaluate; and a record of what was kept (command, date, methods)."""
    now = {(r["dataset"], r["method"]) for r in rows}
    kept = [r for r in earlier.get("rows", []) if (r["dataset"], r["method"]) not in now]
    record = {"command": earlier.get("command"), "date": earlier.get("date"), "device": earlier.get("device"),
              "methods": sorted({r["method"] for r in kept})}  # fmt: skip
    return kept + rows, record


def write_cards(methods: list[str], results: Path | None = None) -> None:
    """The model cards ``<weights folder>/<method>.md`` from the summaries of :data:`CARD_RESULTS`."""
    folder = Path(results) if results is not None else project_root() / "benchmarks" / "results"
    found = [folder / name for name in CARD_RESULTS if (folder / name).is_file()]
    rows = [r for path in found for r in json.loads(path.read_text())["summary"]]
    for method in methods:
        if any(p.stem.rsplit("_", 1)[0] == method for p in shipped_files()):
            (pretrained_dir() / f"{method}.md").write_text(model_card(method, None, {"rows": rows}))


if __name__ == "__main__":
    sys.exit(main())
