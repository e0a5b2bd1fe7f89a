"""Side-by-side benchmark: the zoo's deep methods, MONAI VoxelMorph and classic registration, same pairs.

    python benchmarks/compare.py [--dataset builtin|builtin3d|DIR] [--methods ...]
        [--budget-minutes M | --iterations N] [--quick] --out DIR

Every deep method (each bundle in ``bundles/`` that exists, and MONAI ``VoxelMorph`` with LNCC + diffusion) is
trained under the same budget on the dataset's training pairs with the shared engine (see ``_compare_train``;
weights cached in ``<out>/models/``, so a second run only evaluates), then all methods, the classic baselines
(identity, SimpleITK affine, B-spline FFD, diffeomorphic demons; ANTsPy SyN when ``antspyx`` is installed)
register the same preprocessed validation pairs. Writes ``results.json``, ``results.md`` (the table, also
printed), ``accuracy_vs_time.png``, ``dice_boxplot.png`` and ``panel_<method>.png``.

``--quick`` (``make demo``): a 15-second budget per deep method, at most 4 evaluation pairs and lighter
classic settings, a few minutes in all on 2 CPU cores with the built-in 2D phantoms.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shlex
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the _compare_* helpers beside this file

import torch  # noqa: E402
from _compare_eval import (  # noqa: E402
    METRIC_FIELDS,
    classic_registrar,
    combine_rows,
    deep_registrar,
    evaluate_registrar,
    instance_registrar,
    load_eval_pairs,
    num_parameters,
)
from _compare_report import (  # noqa: E402
    markdown_table,
    plot_accuracy_vs_time,
    plot_dice_boxes,
    plot_dice_vs_regularity,
    plot_learning_curves,
    plot_panel,
    plot_panel_grid,
    write_results,
)
from _compare_train import (  # noqa: E402
    Budget,
    bundle_train_spec,
    cache_key,
    train_or_load,
    voxelmorph_train_spec,
)
from tqdm.auto import tqdm  # noqa: E402

from regnet_zoo import METHODS, project_root  # noqa: E402
from regnet_zoo import baselines as bl  # noqa: E402
from regnet_zoo.errors import RegistrationInputError  # noqa: E402

CLASSIC = ("identity", "sitk_affine", "sitk_bspline", "sitk_demons", "ants_syn", "elastix")
TRAINED_BASELINES = ("voxelmorph",)
ALL_METHODS = CLASSIC + TRAINED_BASELINES + tuple(METHODS)

# classic settings (full, quick); SimpleITK's own defaults elsewhere
CLASSIC_SETTINGS: dict[str, tuple[dict, dict]] = {
    "identity": ({}, {}),
    "sitk_affine": ({"iterations": 200}, {"iterations": 100}),
    "sitk_bspline": (
        {"iterations": 100, "affine_iterations": 200},
        {"iterations": 20, "affine_iterations": 100},
    ),
    "sitk_demons": (
        {"iterations": (60, 40, 20), "affine_iterations": 200},
        {"iterations": (30, 20, 10), "affine_iterations": 100},
    ),
    "ants_syn": ({}, {}),
    # elastix's default affine + B-spline maps; quick: fewer iterations per resolution (default 256)
    "elastix": ({}, {"iterations": 32}),
}
CLASSIC_NOTES = {
    "identity": "no registration",
    "sitk_affine": "SimpleITK affine, Mattes MI, 3-level pyramid",
    "sitk_bspline": "SimpleITK B-spline FFD (3 levels, final grid ~8 vx) after affine",
    "sitk_demons": "SimpleITK diffeomorphic demons (3 levels) after affine",
    "ants_syn": "ANTsPy SyN (antspyx defaults: affine + SyN, MI then CC)",
    "elastix": "elastix (itk-elastix) default affine then B-spline parameter maps",
}
#: optional classic baselines: (is it importable, how to install it)
OPTIONAL = {
    "ants_syn": (bl.ants_available, "antspyx not installed (pip install 'regnet_zoo[benchmark]')"),
    "elastix": (bl.elastix_available, "itk-elastix not installed (pip install 'regnet_zoo[benchmark]')"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--dataset",
        default="builtin",
        help="builtin (2D phantoms), builtin3d (3D phantoms), prostate3d (MR-US, ../shared/data), oasis3d "
        "(the OASIS pair, ../shared/data), learn2reg (with --l2r-json) or a Learn2Reg-layout folder",
    )
    parser.add_argument("--l2r-json", type=Path, help="a Learn2Reg <TASK>_dataset.json (--dataset learn2reg)")
    parser.add_argument("--spacing", type=float, help="resample every image to this voxel size (mm) first")
    parser.add_argument(
        "--methods", nargs="+", default=list(ALL_METHODS), help=f"subset of: {' '.join(ALL_METHODS)}"
    )
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--budget-minutes", type=float, help="training wall time per deep method")
    budget.add_argument("--iterations", type=int, help="training iterations per deep method")
    parser.add_argument(
        "--quick", action="store_true", help="small budget, <= 4 pairs, light classic settings"
    )
    parser.add_argument(
        "--out", required=True, type=Path, help="output folder (weights cached in OUT/models)"
    )
    parser.add_argument("--image-size", type=int, nargs="+", help="resize every image to this grid")
    parser.add_argument("--batch-size", type=int, help="training batch size for every deep method")
    parser.add_argument("--workers", type=int, help="training loader processes (default: the bundle's)")
    parser.add_argument("--max-pairs", type=int, help="evaluate at most this many pairs")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, help="torch / SimpleITK threads (default: torch's)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="training seeds (deep methods)")
    parser.add_argument(
        "--instance-steps",
        type=int,
        default=0,
        help="also evaluate every deep method with this many instance-optimisation steps (0: off)",
    )
    parser.add_argument("--voxelmorph-similarity", choices=("lncc", "mse"), default="lncc")
    parser.add_argument(
        "--pre-align",
        choices=("affine", "rigid", "none"),
        nargs="+",
        default=["none"],
        help="affine stage (regnet_zoo.core.affine) before the deep methods, in training and evaluation; "
        "several: one row per stage (classic methods have their own affine and run without it)",
    )
    parser.add_argument("--elastix-iterations", type=int, help="elastix iterations / level (default 256)")
    parser.add_argument("--retrain", action="store_true", help="ignore cached weights")
    parser.add_argument(
        "--merge",
        nargs="+",
        type=Path,
        metavar="RESULTS_JSON",
        help="no registration: one report in OUT from earlier runs' results.json on the same dataset (a "
        "method's row from a later file replaces the earlier one, e.g. a method rerun alone)",
    )
    parser.add_argument(
        "--publish",
        metavar="NAME",
        help="also copy the report (JSON, Markdown, summary plots) to benchmarks/results/compare_NAME*",
    )
    return parser


def _resolve_dataset(args: argparse.Namespace) -> dict[str, Any]:
    """The dataset: ``dir``, ``spatial_dims`` and the working grid (``spacing`` / ``image_size``: the
    dataset's defaults unless given), ``train_keys``, ``label_names``, ``split``."""
    from _compare_data import label_names, prepare_dataset

    from regnet_zoo.data.learn2reg import Learn2RegDataset
    from regnet_zoo.data.phantom import default_dataset_dir

    name = args.dataset
    if name in ("prostate3d", "oasis3d", "learn2reg"):
        info = dict(prepare_dataset(name, args.out, args.l2r_json, seed=args.seeds[0]))
    elif name in ("builtin", "builtin2d", "builtin3d"):
        dims = 3 if name == "builtin3d" else 2
        folder = Path(default_dataset_dir(dims))
        info = {"dir": folder, "spatial_dims": dims, "spacing": None, "image_size": None, "train_keys": None}
        info.update(label_names=label_names(Learn2RegDataset(folder)), split="built-in phantom pairs")
    else:
        folder = Path(name)
        dataset = Learn2RegDataset(folder)
        info = {"dir": folder, "spatial_dims": dataset.spatial_dims, "spacing": None, "image_size": None}
        info.update(train_keys=None, label_names=label_names(dataset), split="the folder's pairs")
    if args.image_size:
        info["image_size"] = list(args.image_size)
    if args.spacing:
        info["spacing"] = args.spacing
    return info


def _machine(device: str) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    text = f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads)"
    if device.startswith("cuda") and torch.cuda.is_available():
        text += f", {torch.cuda.get_device_name()}"
    return f"{text}, device {device}"


def _device_label(device: str) -> str:
    """What timed a row, short: the GPU's name or ``CPU (N threads)``."""
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    threads = torch.get_num_threads()
    return f"CPU ({threads} thread{'' if threads == 1 else 's'})"


def _empty_row(method: str, kind: str, status: str, note: str) -> dict[str, Any]:
    row: dict[str, Any] = {"method": method, "kind": kind, "status": status, "note": note}
    row.update({field: None for field in METRIC_FIELDS})
    row.update({"per_label_dice": {}, "per_pair": []})
    return row


def _stage(pre_align: str | None) -> str | None:
    return None if pre_align in (None, "none") else pre_align


def _deep_parts(
    method: str, data: dict, args: argparse.Namespace, pre_align: str | None, seed: int
) -> tuple[Callable, Callable]:
    """(make_spec, make_network) of a bundle or of VoxelMorph."""
    spatial_dims, image_size = data["spatial_dims"], data["image_size"]
    if method == "voxelmorph":

        def make_spec():
            return voxelmorph_train_spec(
                str(data["dir"]),
                spatial_dims,
                image_size,
                args.device,
                args.batch_size,
                similarity=args.voxelmorph_similarity,
                seed=seed,
                pre_align=pre_align,
                spacing=data["spacing"],
                num_workers=args.workers or 0,
            )

        def make_network():
            return bl.VoxelMorphRegistration(spatial_dims=spatial_dims)

        return make_spec, make_network

    from regnet_zoo.bundle import bundle_parser

    def make_spec():
        return bundle_train_spec(
            method,
            str(data["dir"]),
            spatial_dims,
            image_size,
            args.device,
            args.batch_size,
            pre_align=pre_align,
            spacing=data["spacing"],
            pair_keys=data["train_keys"],
            num_workers=args.workers,
        )

    def make_network():
        parser = bundle_parser(method, "train", spatial_dims=spatial_dims, image_size=image_size)
        return parser.get_parsed_content("network_def")

    return make_spec, make_network


def _instance_loss(method: str, spatial_dims: int, args: argparse.Namespace) -> tuple[Callable, float]:
    """The instance-optimisation objective and step size of a method (VoxelMorph: its own loss)."""
    from regnet_zoo.api.instance import DEFAULT_INSTANCE_OPT_LR, bundle_instance_loss

    if method == "voxelmorph":
        return bl.VoxelMorphLoss(similarity=args.voxelmorph_similarity), DEFAULT_INSTANCE_OPT_LR
    return bundle_instance_loss(method, spatial_dims, torch.device(args.device))


def _row_name(method: str, pre_align: str | None, instance: bool) -> str:
    return method + (f" +{pre_align}" if pre_align else "") + (" +IO" if instance else "")


def _classic_row(method: str, args: argparse.Namespace, data: dict, pairs: list, labels) -> dict[str, Any]:
    kind = "classic"
    if method in OPTIONAL and not OPTIONAL[method][0]():
        return _empty_row(method, kind, "skipped", OPTIONAL[method][1])
    settings = dict(CLASSIC_SETTINGS[method][1 if args.quick else 0])
    if method == "elastix":
        settings["threads"] = torch.get_num_threads()
        if args.elastix_iterations:
            settings["iterations"] = args.elastix_iterations
    if method == "ants_syn" and data.get("multimodal"):
        settings["syn_metric"] = "mattes"  # SyN's default cross-correlation assumes one modality
    note = CLASSIC_NOTES[method] + (f" ({settings['iterations']} it / resolution)" if method == "elastix"
                                    and "iterations" in settings else "")
    if "syn_metric" in settings:
        note += f"; SyN metric {settings['syn_metric']} (multi-modal)"
    row = _empty_row(method, kind, "ok", note)
    row.update(evaluate_registrar(method, classic_registrar(bl.CLASSIC_BASELINES[method], **settings), pairs,
                                  labels))
    row.update({"train_time_s": 0.0, "num_parameters": 0})
    return row


def _deep_rows(
    method: str, args: argparse.Namespace, data: dict, budget: Budget, pairs: list, labels,
    pre_align: str | None,
) -> list[dict[str, Any]]:
    """The rows of one deep method with one affine stage: its network (every seed), and with instance
    optimisation when ``--instance-steps``."""
    kind = "deep"
    if method in METHODS and not (project_root() / "bundles" / method / "train.yaml").is_file():
        return [_empty_row(method, kind, "missing", f"bundles/{method}/train.yaml not found")]
    variants = [False] + ([True] if args.instance_steps else [])
    per_variant: dict[bool, list[dict]] = {v: [] for v in variants}
    curves = []
    for seed in args.seeds:
        make_spec, make_network = _deep_parts(method, data, args, pre_align, seed)
        key = cache_key(
            method,
            data["dir"],
            budget,
            image_size=data["image_size"],
            batch_size=args.batch_size,
            seed=seed,
            similarity=args.voxelmorph_similarity if method == "voxelmorph" else None,
            **({"pre_align": pre_align} if pre_align else {}),
            **({"spacing": data["spacing"]} if data["spacing"] else {}),
            **({"train_keys": data["train_keys"]} if data["train_keys"] else {}),
        )
        network, record = train_or_load(
            method, make_spec, make_network, budget, args.out / "models", key, args.device, seed=seed,
            retrain=args.retrain,
        )
        curves.append({"seed": seed, "curve": record.get("loss_curve", [])})
        for instance in variants:
            if instance:
                loss_fn, lr = _instance_loss(method, data["spatial_dims"], args)
                register = instance_registrar(network, loss_fn, lr, args.instance_steps, args.device)
            else:
                register = deep_registrar(network, args.device)
            name = _row_name(method, pre_align, instance)
            row = evaluate_registrar(name, register, pairs, labels, args.device, warmup=not instance)
            row.update(
                {
                    "train_time_s": record["train_time_s"],
                    "train_iterations": record["train_iterations"],
                    "train_peak_rss_mb": record.get("train_peak_rss_mb"),
                    "final_loss": record.get("final_loss"),
                    "cached": bool(record.get("cached")),
                    "batch_size": record["batch_size"],
                    "num_parameters": num_parameters(network),
                }
            )
            per_variant[instance].append(row)
        del network
    rows = []
    for instance, seed_rows in per_variant.items():
        row = _empty_row(_row_name(method, pre_align, instance), kind, "ok", "")
        row.update(combine_rows(seed_rows, args.seeds))
        iterations = "/".join(str(r["train_iterations"]) for r in seed_rows)
        note = f"{iterations} it x batch {seed_rows[0]['batch_size']}, seeds {args.seeds}"
        if method == "voxelmorph":
            note = f"MONAI VoxelMorph, {args.voxelmorph_similarity.upper()} + diffusion; " + note
        if pre_align:
            note += f"; after the {pre_align} stage"
        if instance:
            note += f"; + {args.instance_steps} instance-optimisation steps (own loss, images only)"
        if any(r["cached"] for r in seed_rows):
            note += " (cached weights)"
        row.update(
            {
                "note": note,
                "base_method": method,
                "pre_align": pre_align,
                "instance_steps": args.instance_steps if instance else 0,
                "learning_curves": curves,
            }
        )
        rows.append(row)
    return rows


def run(args: argparse.Namespace, argv: Sequence[str]) -> list[dict]:
    started = time.perf_counter()
    unknown = [m for m in args.methods if m not in ALL_METHODS]
    if unknown:
        raise SystemExit(
            f"compare.py: error: unknown method(s) {unknown}; choose from {' '.join(ALL_METHODS)}"
        )
    if args.threads:
        torch.set_num_threads(args.threads)
    if any(m in CLASSIC and m != "identity" for m in args.methods):  # deep rows alone never call SimpleITK
        import SimpleITK as sitk

        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(torch.get_num_threads())  # same threads for all
    if args.iterations is not None:
        budget = Budget(iterations=args.iterations)
    else:
        budget = Budget(minutes=args.budget_minutes or (0.25 if args.quick else 5.0))
    max_pairs = args.max_pairs or (4 if args.quick else None)
    data = _resolve_dataset(args)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    stages = list(dict.fromkeys(_stage(p) for p in args.pre_align))
    order = [m for m in ALL_METHODS if m in args.methods]
    rows: list[dict] = []
    eval_pairs: dict[str | None, list] = {}
    labels = None
    for pre_align in stages:
        pairs, labels = load_eval_pairs(
            str(data["dir"]), data["spatial_dims"], data["image_size"], max_pairs, pre_align, data["spacing"]
        )
        if not pairs:
            raise SystemExit(f"compare.py: error: {data['dir']} has no registration pairs")
        eval_pairs[pre_align] = pairs
        grid = tuple(pairs[0]["fixed"].shape[2:])
        print(
            f"benchmark: {len(pairs)} pairs from {data['dir']} ({data['spatial_dims']}D, grid {grid}, affine "
            f"stage {pre_align}), budget {budget} per deep method and seed, device {args.device}",
            flush=True,
        )
        for method in tqdm(order, desc="methods", unit="method"):
            kind = "classic" if method in CLASSIC else "deep"
            # the classic methods bring their own affine: run once, without the stage (identity: both)
            if kind == "classic" and pre_align is not None and method != "identity":
                continue
            try:
                if kind == "classic":
                    row = _classic_row(method, args, data, pairs, labels)
                    if pre_align is not None:  # identity after the stage: the affine stage's own result
                        row["method"] = f"affine stage ({pre_align})"
                        row["note"] = "regnet_zoo.core.affine, the deep methods' pre-alignment"
                    new_rows = [row]
                else:
                    new_rows = _deep_rows(method, args, data, budget, pairs, labels, pre_align)
            except Exception as err:  # one broken method must not stop the comparison
                traceback.print_exc()
                message = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:300]
                new_rows = [_empty_row(_row_name(method, pre_align, False), kind, "failed", message)]
            for row in new_rows:
                row.setdefault("pre_align", pre_align)
                row.setdefault("base_method", method)
                row["device"] = _device_label(args.device)
            rows.extend(new_rows)

    names = data["label_names"]
    for row in rows:
        if row.get("example") is not None:
            plot_panel(row["method"], row["example"], out / f"panel_{_file_stem(row['method'])}.png")
    plot_accuracy_vs_time(rows, out / "accuracy_vs_time.png")
    plot_dice_boxes(rows, out / "dice_boxplot.png", label_names=names)
    plot_dice_vs_regularity(rows, out / "dice_vs_sdlogj.png")
    plot_learning_curves(rows, out / "learning_curves.png")
    plot_panel_grid([r for r in rows if r.get("example") is not None], out / "qualitative.png")

    from regnet_zoo.data.learn2reg import Learn2RegDataset

    dataset = Learn2RegDataset(data["dir"])
    first = next(iter(eval_pairs.values()))
    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": _machine(args.device),
        "command": "python benchmarks/compare.py " + " ".join(shlex.quote(a) for a in argv),
        "dataset": {
            "name": dataset.name,
            "key": args.dataset,
            "dir": str(data["dir"]),
            "spatial_dims": data["spatial_dims"],
            "grid": list(first[0]["fixed"].shape[2:]),
            "spacing_mm": data["spacing"],
            "image_size": data["image_size"],
            "num_eval_pairs": len(first),
            "eval_split": "registration_val" if dataset.pairs("val") else "training pairs",
            "split": data["split"],
            "training_pairs": len(dataset.pairs("train")),
            "training_keys": data["train_keys"] or "every pair entry (labels only where a loss uses them)",
            "evaluation_labels": labels,
            "label_names": names,
        },
        "budget": str(budget),
        "seeds": list(args.seeds),
        "pre_align": [s or "none" for s in stages],
        "instance_steps": args.instance_steps,
        "quick": bool(args.quick),
        "missing": [r["method"] for r in rows if r["status"] == "missing"],
        "skipped": [r["method"] for r in rows if r["status"] == "skipped"],
        "failed": [r["method"] for r in rows if r["status"] == "failed"],
        "metric_fields": list(METRIC_FIELDS),
        "total_time_s": time.perf_counter() - started,
    }
    json_path, md_path = write_results(out, meta, rows)
    print()
    print(markdown_table(rows))
    for status in ("missing", "skipped", "failed"):
        if meta[status]:
            print(f"{status}: {', '.join(meta[status])}")
    print(f"\nwrote {json_path}, {md_path} and the plots in {out} ({meta['total_time_s']:.0f} s)")
    if args.publish:
        print(f"published as {publish(out, args.publish)}")
    return rows


#: the plots copied by --publish (the per-method panels stay in OUT)
SUMMARY_PLOTS = ("accuracy_vs_time", "dice_vs_sdlogj", "dice_boxplot", "learning_curves", "qualitative")
#: datasets read in place from ../shared/data: their reports stay in --out, never in the repository
LOCAL_ONLY_DATASETS = ("prostate3d", "oasis3d")


def publish(out: Path, name: str, target: Path | None = None) -> Path:
    """Copy ``results.json``, ``results.md`` (plot links renamed) and the summary plots of ``out`` to
    ``<target>/compare_<name>.*`` (default ``benchmarks/results``); returns the Markdown path."""
    import shutil

    target = project_root() / "benchmarks" / "results" if target is None else target
    stem = f"compare_{_file_stem(name)}"
    shutil.copyfile(out / "results.json", target / f"{stem}.json")
    text = (out / "results.md").read_text()
    for plot in SUMMARY_PLOTS:
        if (out / f"{plot}.png").is_file():
            shutil.copyfile(out / f"{plot}.png", target / f"{stem}_{plot}.png")
            text = text.replace(f"({plot}.png)", f"({stem}_{plot}.png)")
    (target / f"{stem}.md").write_text(text)
    return target / f"{stem}.md"


def _publish_refusal(args: argparse.Namespace) -> str | None:
    """Why ``--publish`` must not run (a report on ``../shared/data``, also when merged), else ``None``."""
    import json

    if not args.publish:
        return None
    keys = {args.dataset} if not args.merge else {
        json.loads(Path(p).read_text())["dataset"].get("key") for p in args.merge
    }
    local = sorted(k for k in keys if k in LOCAL_ONLY_DATASETS)
    if local:
        return f"--publish: reports on {', '.join(local)} (../shared/data) stay in --out, not in the repo"
    return None


def _file_stem(name: str) -> str:
    return "".join(c if c.isalnum() or c in "_-" else "_" for c in name).strip("_")


def merge_reports(paths: Sequence[Path], out: Path, argv: Sequence[str]) -> list[dict]:
    """One report from several ``results.json`` of the same dataset (see ``--merge``): rows in the first
    file's order, replaced by or added from later files; plots redrawn (the qualitative panels need the
    images: those of the first run are kept when OUT is its folder)."""
    import json

    from _compare_report import (
        plot_accuracy_vs_time,
        plot_dice_boxes,
        plot_dice_vs_regularity,
        plot_learning_curves,
        write_results,
    )

    results = [json.loads(Path(p).read_text()) for p in paths]
    # one dataset: same name, grid and pairs (a run on another machine, e.g. the GPU's, has another path)
    names = {
        (r["dataset"]["name"], str(r["dataset"]["grid"]), r["dataset"]["num_eval_pairs"]) for r in results
    }
    if len(names) > 1:
        raise RegistrationInputError(f"--merge: results of different datasets {sorted(names)}")
    rows: dict[str, dict] = {}
    for result in results:
        for row in result["rows"]:
            row.setdefault("device", "GPU" if "device cuda" in result["machine"] else "CPU")
            rows[row["method"]] = row
    meta = dict(results[0])
    meta.pop("rows")
    if len(paths) > 1:  # one file: its own command stays the report's command (only re-rendered)
        meta["merged_from"] = [
            {"file": str(p), "command": r["command"], "machine": r["machine"], "date": r["date"]}
            for p, r in zip(paths, results, strict=True)
        ]
        meta["command"] = "python benchmarks/compare.py " + " ".join(shlex.quote(a) for a in argv)
    # the training budget and seeds are those of the runs with deep rows (a classic-only run has none)
    deep = [r for r in results if any(row.get("kind") == "deep" for row in r["rows"])] or results
    meta["budget"] = " / ".join(dict.fromkeys(str(r["budget"]) for r in deep))
    meta["seeds"] = sorted({seed for r in deep for seed in r.get("seeds", [0])})
    for status in ("missing", "skipped", "failed"):
        meta[status] = [r["method"] for r in rows.values() if r["status"] == status]
    out.mkdir(parents=True, exist_ok=True)
    ordered = list(rows.values())
    labels = meta["dataset"].get("label_names") or {}
    if not labels and Path(meta["dataset"]["dir"]).exists():  # reports written before names were recorded
        from _compare_data import label_names

        from regnet_zoo.data.learn2reg import Learn2RegDataset

        labels = label_names(Learn2RegDataset(meta["dataset"]["dir"]))
        meta["dataset"]["label_names"] = labels
    plot_accuracy_vs_time(ordered, out / "accuracy_vs_time.png")
    plot_dice_boxes(ordered, out / "dice_boxplot.png", label_names=labels)
    plot_dice_vs_regularity(ordered, out / "dice_vs_sdlogj.png")
    plot_learning_curves(ordered, out / "learning_curves.png")
    write_results(out, meta, ordered)
    print(markdown_table(ordered))
    return ordered


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    refusal = _publish_refusal(args)
    if refusal:
        parser.error(refusal)
    if args.merge:
        rows = merge_reports(args.merge, args.out, argv)
        if args.publish:
            print(f"published as {publish(args.out, args.publish)}")
        return 0
    try:
        rows = run(args, argv)
    except RegistrationInputError as err:  # a bad dataset folder: one line, no traceback
        print(f"compare.py: error: {err}", file=sys.stderr)
        return 2
    return 1 if any(r["status"] == "failed" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
