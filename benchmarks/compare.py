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
    deep_registrar,
    evaluate_registrar,
    load_eval_pairs,
    num_parameters,
)
from _compare_report import (  # noqa: E402
    markdown_table,
    plot_accuracy_vs_time,
    plot_dice_boxes,
    plot_panel,
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
        help="builtin (2D phantoms), builtin3d (3D phantoms) or a Learn2Reg-layout folder (default: builtin)",
    )
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
    parser.add_argument("--max-pairs", type=int, help="evaluate at most this many pairs")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, help="torch / SimpleITK threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--voxelmorph-similarity", choices=("lncc", "mse"), default="lncc")
    parser.add_argument(
        "--pre-align",
        choices=("affine", "rigid", "none"),
        default="none",
        help="affine stage (regnet_zoo.core.affine) before every method, in training and evaluation",
    )
    parser.add_argument("--retrain", action="store_true", help="ignore cached weights")
    return parser


def _resolve_dataset(name: str) -> tuple[Path, int]:
    from regnet_zoo.data.learn2reg import Learn2RegDataset
    from regnet_zoo.data.phantom import default_dataset_dir

    if name in ("builtin", "builtin2d"):
        return Path(default_dataset_dir(2)), 2
    if name == "builtin3d":
        return Path(default_dataset_dir(3)), 3
    folder = Path(name)
    return folder, Learn2RegDataset(folder).spatial_dims


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


def _empty_row(method: str, kind: str, status: str, note: str) -> dict[str, Any]:
    row: dict[str, Any] = {"method": method, "kind": kind, "status": status, "note": note}
    row.update({field: None for field in METRIC_FIELDS})
    row.update({"per_label_dice": {}, "per_pair": []})
    return row


def _pre_align(args: argparse.Namespace) -> str | None:
    pre_align = getattr(args, "pre_align", "none")
    return None if pre_align in (None, "none") else pre_align


def _deep_parts(
    method: str, dataset_dir: Path, spatial_dims: int, args: argparse.Namespace
) -> tuple[Callable, Callable]:
    """(make_spec, make_network) of a bundle or of VoxelMorph."""
    image_size = list(args.image_size) if args.image_size else None
    if method == "voxelmorph":

        def make_spec():
            return voxelmorph_train_spec(
                str(dataset_dir),
                spatial_dims,
                image_size,
                args.device,
                args.batch_size,
                similarity=args.voxelmorph_similarity,
                seed=args.seed,
                pre_align=_pre_align(args),
            )

        def make_network():
            return bl.VoxelMorphRegistration(spatial_dims=spatial_dims)

        return make_spec, make_network

    from regnet_zoo.bundle import bundle_parser

    def make_spec():
        return bundle_train_spec(
            method,
            str(dataset_dir),
            spatial_dims,
            image_size,
            args.device,
            args.batch_size,
            pre_align=_pre_align(args),
        )

    def make_network():
        parser = bundle_parser(method, "train", spatial_dims=spatial_dims, image_size=image_size)
        return parser.get_parsed_content("network_def")

    return make_spec, make_network


def run(args: argparse.Namespace, argv: Sequence[str]) -> list[dict]:
    started = time.perf_counter()
    unknown = [m for m in args.methods if m not in ALL_METHODS]
    if unknown:
        raise SystemExit(
            f"compare.py: error: unknown method(s) {unknown}; choose from {' '.join(ALL_METHODS)}"
        )
    if args.threads:
        torch.set_num_threads(args.threads)
    import SimpleITK as sitk

    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(torch.get_num_threads())  # same threads for all
    if args.iterations is not None:
        budget = Budget(iterations=args.iterations)
    else:
        budget = Budget(minutes=args.budget_minutes or (0.25 if args.quick else 5.0))
    max_pairs = args.max_pairs or (4 if args.quick else None)
    dataset_dir, spatial_dims = _resolve_dataset(args.dataset)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    image_size = list(args.image_size) if args.image_size else None
    pairs, labels = load_eval_pairs(str(dataset_dir), spatial_dims, image_size, max_pairs, _pre_align(args))
    if not pairs:
        raise SystemExit(f"compare.py: error: {dataset_dir} has no registration pairs")
    grid = tuple(pairs[0]["fixed"].shape[2:])
    print(
        f"benchmark: {len(pairs)} pairs from {dataset_dir} ({spatial_dims}D, grid {grid})"
        f", budget {budget} per deep method, device {args.device}",
        flush=True,
    )

    rows: list[dict] = []
    order = [m for m in ALL_METHODS if m in args.methods]
    for method in tqdm(order, desc="methods", unit="method"):
        kind = "classic" if method in CLASSIC else "deep"
        try:
            if method in CLASSIC:
                if method in OPTIONAL and not OPTIONAL[method][0]():
                    rows.append(_empty_row(method, kind, "skipped", OPTIONAL[method][1]))
                    continue
                settings = dict(CLASSIC_SETTINGS[method][1 if args.quick else 0])
                if method == "elastix":
                    settings["threads"] = torch.get_num_threads()
                function = bl.CLASSIC_BASELINES[method]
                row = _empty_row(method, kind, "ok", CLASSIC_NOTES[method])
                row.update(evaluate_registrar(method, classic_registrar(function, **settings), pairs, labels))
                row.update({"train_time_s": 0.0, "num_parameters": 0})
            else:
                if method in METHODS and not (project_root() / "bundles" / method / "train.yaml").is_file():
                    rows.append(_empty_row(method, kind, "missing", f"bundles/{method}/train.yaml not found"))
                    continue
                make_spec, make_network = _deep_parts(method, dataset_dir, spatial_dims, args)
                key = cache_key(
                    method,
                    dataset_dir,
                    budget,
                    image_size=image_size,
                    batch_size=args.batch_size,
                    seed=args.seed,
                    similarity=args.voxelmorph_similarity if method == "voxelmorph" else None,
                    **({"pre_align": _pre_align(args)} if _pre_align(args) else {}),
                )
                network, record = train_or_load(
                    method,
                    make_spec,
                    make_network,
                    budget,
                    out / "models",
                    key,
                    args.device,
                    seed=args.seed,
                    retrain=args.retrain,
                )
                note = f"{record['train_iterations']} it x batch {record['batch_size']}"
                if method == "voxelmorph":
                    note = f"MONAI VoxelMorph, {args.voxelmorph_similarity.upper()} + diffusion; " + note
                if record.get("cached"):
                    note += " (cached weights)"
                row = _empty_row(method, kind, "ok", note)
                row.update(
                    evaluate_registrar(
                        method, deep_registrar(network, args.device), pairs, labels, args.device, warmup=True
                    )
                )
                row.update(
                    {
                        "train_time_s": record["train_time_s"],
                        "num_parameters": num_parameters(network),
                        "train_iterations": record["train_iterations"],
                        "train_peak_rss_mb": record.get("train_peak_rss_mb"),
                        "train_peak_gpu_mb": record.get("train_peak_gpu_mb"),
                        "final_loss": record.get("final_loss"),
                        "cached": bool(record.get("cached")),
                    }
                )
                del network
            rows.append(row)
        except Exception as err:  # one broken method must not stop the comparison
            traceback.print_exc()
            message = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:300]
            rows.append(_empty_row(method, kind, "failed", message))

    for row in rows:
        if row.get("example") is not None:
            plot_panel(row["method"], row["example"], out / f"panel_{row['method']}.png")
    plot_accuracy_vs_time(rows, out / "accuracy_vs_time.png")
    plot_dice_boxes(rows, out / "dice_boxplot.png")

    from regnet_zoo.data.learn2reg import Learn2RegDataset

    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": _machine(args.device),
        "command": "python benchmarks/compare.py " + " ".join(shlex.quote(a) for a in argv),
        "dataset": {
            "name": Learn2RegDataset(dataset_dir).name,
            "dir": str(dataset_dir),
            "spatial_dims": spatial_dims,
            "grid": list(pairs[0]["fixed"].shape[2:]),
            "num_eval_pairs": len(pairs),
            "eval_split": "registration_val"
            if Learn2RegDataset(dataset_dir).pairs("val")
            else "training pairs",
            "evaluation_labels": labels,
        },
        "budget": str(budget),
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
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    try:
        rows = run(args, argv)
    except RegistrationInputError as err:  # a bad dataset folder: one line, no traceback
        print(f"compare.py: error: {err}", file=sys.stderr)
        return 2
    return 1 if any(r["status"] == "failed" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
