"""B-spline U-Net: Hering et al. 2019, Table 1 -- held-out Dice and folding as each loss weight varies.

Data, **subject-disjoint**: the two labelled OASIS subjects of ``<data-dir>/oasis3d_pair`` (FreeSurfer
labels). Training pairs are axial slices (array axis 1) of subject 1 only, test pairs the same construction on
subject 2 only (never seen in training): fixed slice ``k``, moving slice ``k + --gap`` and the reverse, for
``k`` in ``--slices`` every ``--slice-step``, area-downsampled by ``--factor`` (labels: every ``factor``-th
voxel). Neighbouring slices of one brain differ by smooth in-plane anatomy changes; two labelled subjects do
not allow inter-subject pairs that stay disjoint from training.

For each of delta (NGF), alpha (curvature) and beta (label) and each multiplier (Table 1: x0, x0.1, x1, x10,
x100) the weight is scaled from the paper's value (delta = 1, alpha = 1e3, beta = 5e4, in the calibrated
term units ``PAPER_TERM_SCALES``) with the others fixed, a fresh network is trained with Adam, and the test
pairs are registered with the finest field: mean Dice over labels (nearest-neighbour warped labels,
``core.metrics.dice_per_label``) and folding % (``det(grad y) <= 0``, ``core.metrics.folding_fraction``).
The x1 setting is shared by the three sweeps (trained once).

    python benchmarks/bspline_unet_bench.py --out benchmarks/results/bspline_unet_table1.json
    python benchmarks/bspline_unet_bench.py --vary beta --multipliers 0 1
    python benchmarks/bspline_unet_bench.py --merge d.json a.json b.json --out table1.json  # parts run apart
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from datetime import datetime, timezone
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F

from regnet_zoo.core.metrics import dice_per_label, folding_fraction, jacobian_determinant
from regnet_zoo.core.spatial import warp_labels
from regnet_zoo.data.preprocess import normalise_intensity
from regnet_zoo.networks.bspline_unet import PAPER_TERM_SCALES, BSplineUNet, BSplineUNetLoss

PAPER_WEIGHTS = {"delta": 1.0, "alpha": 1e3, "beta": 5e4}
LOSS_ARG = {"delta": "ngf_weight", "alpha": "curvature_weight", "beta": "label_weight"}
KEYS = ("fixed", "moving", "fixed_label", "moving_label")


def oasis_slice_pairs(data_dir: Path, subject: int, slices, gap: int, factor: int) -> dict[str, torch.Tensor]:
    """Pairs of axial slices ``(k, k + gap)`` and ``(k + gap, k)`` of one OASIS subject (1 or 2): images
    ``(P, 1, H, W)`` (each slice min-max normalised to [0, 1], then area-downsampled by ``factor``) and
    integer label maps (every ``factor``-th voxel)."""
    folder = data_dir / "oasis3d_pair"
    image = nib.load(folder / f"imagesTr/OASIS_000{subject}_0000.nii.gz").get_fdata(dtype=np.float32)
    label = np.asarray(nib.load(folder / f"labelsTr/OASIS_000{subject}_0000.nii.gz").dataobj)

    def cut(volume: np.ndarray, k: int) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(volume[:, k]))[None, None]

    def cut_image(k: int) -> torch.Tensor:  # each slice min-max normalised to [0, 1], as the paper's images
        return F.avg_pool2d(normalise_intensity(cut(image, k)[0])[None], factor)

    out: dict[str, list[torch.Tensor]] = {key: [] for key in KEYS}
    for k in slices:
        for a, b in ((k, k + gap), (k + gap, k)):
            out["fixed"].append(cut_image(a))
            out["moving"].append(cut_image(b))
            out["fixed_label"].append(cut(label, a)[..., ::factor, ::factor].long())
            out["moving_label"].append(cut(label, b)[..., ::factor, ::factor].long())
    return {key: torch.cat(value) for key, value in out.items()}


def mean_dice_per_pair(fixed_label: torch.Tensor, warped_label: torch.Tensor, moving_label: torch.Tensor):
    return [
        float(np.nanmean(list(dice_per_label(f[0], w[0], moving_label=m[0]).values())))
        for f, w, m in zip(fixed_label.cpu(), warped_label.cpu(), moving_label.cpu(), strict=True)
    ]


def train_and_evaluate(train, test, weights: dict[str, float], args, device: torch.device) -> dict:
    """A fresh network trained with ``weights`` (delta / alpha / beta) -> test Dice, folding, train loss."""
    torch.manual_seed(args.seed)
    net = BSplineUNet(2, control_spacing=args.control_spacing).to(device)
    loss_weights = {LOSS_ARG[name]: value for name, value in weights.items()}
    loss_fn = BSplineUNetLoss(
        voxel_size=args.voxel_size, ngf_eps=args.ngf_eps, term_scales=args.term_scales, **loss_weights
    )
    optimiser = torch.optim.Adam(net.parameters(), lr=args.lr)
    generator = torch.Generator().manual_seed(args.seed)
    start = time.perf_counter()
    losses = []
    for _ in range(args.steps):
        idx = torch.randperm(len(train["fixed"]), generator=generator)[: args.batch_size]
        batch = {key: train[key][idx].to(device) for key in KEYS}
        terms = loss_fn(net(batch["fixed"], batch["moving"]), batch)
        optimiser.zero_grad()
        terms["loss"].backward()
        optimiser.step()
        losses.append({k: float(v.detach()) for k, v in terms.items() if "level" not in k})
    train_seconds = time.perf_counter() - start
    net.eval()
    dice, folding, max_disp = [], [], 0.0
    with torch.no_grad():
        for i in range(0, len(test["fixed"]), 16):
            part = {key: test[key][i : i + 16].to(device) for key in KEYS}
            ddf = net(part["fixed"], part["moving"])["ddf"]
            warped = warp_labels(part["moving_label"], ddf)
            dice += mean_dice_per_pair(part["fixed_label"], warped, part["moving_label"])
            jac = jacobian_determinant(ddf).cpu()
            folding += [folding_fraction(j[None]) for j in jac]
            max_disp = max(max_disp, float(ddf.abs().max()))
    tail = losses[-20:]
    return {
        "dice_mean": float(np.mean(dice)),
        "dice_std": float(np.std(dice)),
        "folding_percent": float(np.mean(folding)),
        "max_abs_displacement_vox": max_disp,
        "train_terms_last20": {k: float(np.mean([t[k] for t in tail])) for k in tail[0]} if tail else {},
        "train_seconds": train_seconds,
    }


def merge(parts: list[Path], out: Path) -> dict:
    """One report from parts run side by side (each a subset of the sweeps, same protocol): rows in sweep
    order; a sweep's x1 row is the shared x1 setting wherever it was trained."""
    reports = [json.loads(Path(part).read_text()) for part in parts]
    base = reports[0]
    keys = ("delta", "alpha", "beta")
    trained = {}
    for report in reports:
        if report["image_shape"] != base["image_shape"] or report["term_scales"] != base["term_scales"]:
            raise SystemExit(f"{parts}: the parts ran different protocols")
        for row in report["rows"][1:]:
            trained[tuple(row[k] for k in keys)] = row
    rows = [base["rows"][0]]
    for name in keys:
        for multiplier in sorted({m for r in reports for m in r["args"]["multipliers"]} | {1.0}):
            weights = dict(PAPER_WEIGHTS)
            weights[name] = PAPER_WEIGHTS[name] * multiplier
            row = trained.get(tuple(weights[k] for k in keys))
            if row is not None:
                setting = {"setting": f"{name} x{multiplier:g}", "vary": name, "multiplier": multiplier}
                rows.append({**row, **setting})
    report = {**base, "rows": rows, "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    report["args"] = {**base["args"], "vary": list(keys), "out": str(out)}
    pairs = zip(parts, reports, strict=True)
    report["merged_from"] = [{"file": Path(p).name, "args": r["args"]} for p, r in pairs]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    for row in rows:
        print(f"{row['setting']:>14}: Dice {row['dice_mean']:.3f}, folding {row['folding_percent']:.2f} %")
    return report


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--data-dir", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data"
    )
    parser.add_argument(
        "--vary", nargs="+", choices=sorted(PAPER_WEIGHTS), default=["delta", "alpha", "beta"]
    )
    parser.add_argument("--multipliers", type=float, nargs="+", default=[0.0, 0.1, 1.0, 10.0, 100.0])
    parser.add_argument("--train-subject", type=int, choices=(1, 2), default=1, help="the other one tests")
    parser.add_argument("--factor", type=int, default=4, help="downsampling of the 160x224 slices")
    parser.add_argument("--slices", type=int, nargs=2, default=[60, 130], help="axial slice range")
    parser.add_argument("--slice-step", type=int, default=2)
    parser.add_argument("--gap", type=int, default=5, help="slices between fixed and moving")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--control-spacing", type=int, default=4)
    parser.add_argument("--voxel-size", type=float, default=1.0, help="BSplineUNetLoss voxel_size (README)")
    parser.add_argument("--ngf-eps", type=float, default=0.1, help="NGF edge parameter (paper 0.1)")
    parser.add_argument(
        "--term-scales", type=float, nargs=3, default=list(PAPER_TERM_SCALES), help="units of NGF, R, B"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/bspline_unet_table1.json"))
    parser.add_argument("--merge", type=Path, nargs="+", help="combine these reports into --out; no training")
    args = parser.parse_args(argv)
    if args.merge:
        return merge(args.merge, args.out)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    first, last = args.slices
    slices = range(first, last, args.slice_step)
    test_subject = 3 - args.train_subject
    train = oasis_slice_pairs(args.data_dir, args.train_subject, slices, args.gap, args.factor)
    test = oasis_slice_pairs(args.data_dir, test_subject, slices, args.gap, args.factor)
    identity = mean_dice_per_pair(test["fixed_label"], test["moving_label"], test["moving_label"])
    rows = [
        {
            "setting": "identity",
            "dice_mean": float(np.mean(identity)),
            "dice_std": float(np.std(identity)),
            "folding_percent": 0.0,
            "train_seconds": 0.0,
        }
    ]
    shape = tuple(train["fixed"].shape[2:])
    print(
        f"B-spline U-Net, OASIS axial slices {shape}: {len(train['fixed'])} training pairs (subject "
        f"{args.train_subject}), {len(test['fixed'])} test pairs (subject {test_subject}); varying "
        f"{', '.join(args.vary)}; {args.steps} Adam steps of {args.batch_size} pairs, lr {args.lr:g}, "
        f"term units {PAPER_TERM_SCALES}",
        flush=True,
    )
    done: dict[tuple, dict] = {}
    for name in args.vary:
        for multiplier in args.multipliers:
            weights = dict(PAPER_WEIGHTS)
            weights[name] = PAPER_WEIGHTS[name] * multiplier
            key = tuple(sorted(weights.items()))
            if key not in done:  # x1 is the same setting in every sweep
                done[key] = train_and_evaluate(train, test, weights, args, device)
            result = done[key]
            setting = {"setting": f"{name} x{multiplier:g}", "vary": name, "multiplier": multiplier}
            rows.append({**setting, **weights, **result})
            print(
                f"  {rows[-1]['setting']:>14}: Dice {result['dice_mean']:.3f}, "
                f"folding {result['folding_percent']:.2f} %, "
                f"max |u| {result['max_abs_displacement_vox']:.1f} ({result['train_seconds']:.0f} s)",
                flush=True,
            )
            _save(args, shape, train, test, rows)

    header = f"{'setting':>14} | {'Dice (held-out)':>15} | {'folding %':>9} | {'train s':>7}"
    print("\n" + header + "\n" + "-" * len(header))
    for row in rows:
        dice = f"{row['dice_mean']:.3f} +- {row['dice_std']:.3f}"
        print(
            f"{row['setting']:>14} | {dice:>15} | {row['folding_percent']:>9.2f} | "
            f"{row['train_seconds']:>7.0f}"
        )
    report = _save(args, shape, train, test, rows)
    print(f"saved {args.out}")
    return report


def _save(args, shape, train, test, rows) -> dict:
    """Write the report so far (after every row: nothing is lost when a long sweep is stopped)."""
    report = {
        "benchmark": "bspline_unet loss-weight variation (Hering et al. 2019, Table 1)",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.node()} {platform.processor() or platform.machine()}, "
        f"torch {torch.__version__}, {args.threads} threads, device {args.device}"
        + (f" ({torch.cuda.get_device_name(args.device)})" if args.device.startswith("cuda") else ""),
        "protocol": f"train: OASIS subject {args.train_subject} slice pairs; test: subject "
        f"{3 - args.train_subject} slice pairs (subject-disjoint); pairs (k, k+{args.gap}) both ways",
        "paper_weights": PAPER_WEIGHTS,
        "term_scales": list(PAPER_TERM_SCALES),
        "image_shape": list(shape),
        "num_train_pairs": len(train["fixed"]),
        "num_test_pairs": len(test["fixed"]),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
