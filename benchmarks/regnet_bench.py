"""RegNet benchmark: DVF MAE (mm) on synthetic deformations of unseen subjects, multi- vs single-scale.

Protocol (Sokooti et al. 2017, Sect. 2.2 / 3, on brain MR instead of chest CT):

- **Data, subject-disjoint.** 2D (default): the 100 OASIS slices of ``oasis2d/slices`` (one subject each):
  slices 0-79 train, 80-89 validation (learning curve), 90-99 test. 3D: OASIS subject 1 of ``oasis3d_pair``
  trains, subject 2 tests (the validation curve then uses new fields of the training subject).
- **Training** (``RegNetSyntheticCropd``, the bundle's recipe): crops of the training images deformed by
  the paper's low / medium / high frequency fields (theta 8 mm; half of them after a low-frequency
  deformation of the moving image), flips, noise; MAE loss on the voxels inside the brain mask whose context
  lies in the crop; Adam 1e-3 divided by 1.25 every ``--epoch-steps`` steps (the paper's per-epoch decay).
  Training stops after ``--steps`` steps or ``--budget-minutes``, whichever comes first.
- **Test fields from the training distribution**: each test image is deformed by one field per preset
  generated on the *whole* image (as in training), and the MAE (sum of the per-axis mean absolute errors, mm,
  as the paper's Table 1) is measured inside the brain (fixed image > 0.05) against the identity (zero field).
- **Inference as the paper**: dense (fully convolutional) over the whole image with edge-replicated borders,
  after the affine pre-registration of ``regnet_zoo.core.affine`` (the composed transform is compared with
  the ground truth); the network alone (no affine stage) is reported too.
- **Ablation (paper's Table 1, validation)**: multi-scale late fusion vs single-scale (29^N patch only),
  same budget; the paper: 1.17 vs 1.70 mm.

    python benchmarks/regnet_bench.py --out benchmarks/results/regnet_bench.json          # 2D, ~25 min CPU
    python benchmarks/regnet_bench.py --crop 80 --steps 300 --epoch-steps 100 \
        --out benchmarks/results/regnet_bench_ablation_cpu.json                         # ablation, 9 min CPU
    python benchmarks/regnet_bench.py --device cuda --workers 12 --steps 3000 --epoch-steps 300 \
        --eval-every 250 --no-affine                                                     # GPU, both variants
    python benchmarks/regnet_bench.py --dims 3 --steps 20000 --batch 4 --threads 16       # the 3D setting
    python benchmarks/regnet_bench.py --steps 0 --variants multi --no-affine \
        --time-shape 160 192 224 --dense-mode exact --tile 80 192 224 --threads 2           # dense timing

Needs the development data (``--data``, default ``../shared/data`` beside the checkout).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from monai.data import MetaTensor

from regnet_zoo.core.affine import affine_register
from regnet_zoo.core.geometry import as_4x4, from_4x4, spacing_from_affine
from regnet_zoo.data.io import load_image
from regnet_zoo.data.preprocess import normalise_intensity
from regnet_zoo.data.regnet_crop import RegNetSyntheticCropd
from regnet_zoo.data.synthetic import deform_pair
from regnet_zoo.networks.regnet import RegNet, RegNetLoss, dvf_mae

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
PRESETS = ("low", "medium", "high")
MASK_THRESHOLD = 0.05  # brain vs background of the skull-stripped, 0..1 normalised images
PAPER = {"test_mae_mm": 1.19, "validation_mae_mm": {"multi": 1.17, "single": 1.70}}


def load_split(data: Path, dims: int) -> tuple[dict[str, list[MetaTensor]], dict[str, list[str]]]:
    """Subject-disjoint train / validation / test images (normalised to 0..1, their affines kept)."""

    def load(path: Path) -> MetaTensor:
        image = load_image(path)
        return MetaTensor(normalise_intensity(image), affine=image.affine)

    if dims == 2:
        folder = data / "oasis2d" / "slices"
        # NIfTI copies (same names, .nii.gz) serve where SimpleITK is missing (see --device)
        files = sorted(folder.glob("*.nrrd")) or sorted(folder.glob("*.nii.gz"))
        if len(files) < 100:
            raise SystemExit(f"expected 100 OASIS slices in {data / 'oasis2d' / 'slices'}")
        parts = {"train": files[:80], "validation": files[80:90], "test": files[90:100]}
    else:
        folder = data / "oasis3d_pair" / "imagesTr"
        one, two = folder / "OASIS_0001_0000.nii.gz", folder / "OASIS_0002_0000.nii.gz"
        parts = {"train": [one], "validation": [one], "test": [two]}
    images = {name: [load(f) for f in files] for name, files in parts.items()}
    return images, {name: [f.name for f in files] for name, files in parts.items()}


def synthetic_pairs(images: list[MetaTensor], seed: int, presets=PRESETS) -> list[dict]:
    """One pair per image and preset: the field generated on the whole image (the training distribution)."""
    pairs = []
    for i, image in enumerate(images):
        spacing = spacing_from_affine(image.affine, image.ndim - 1)
        for k, preset in enumerate(presets):
            pair = deform_pair(
                image, preset=preset, spacing=spacing, noise_std=0.005, generator=seed + 10 * i + k
            )
            pair.update(preset=preset, affine=as_4x4(image.affine), spacing=spacing)
            pair["mask"] = pair["fixed"] > MASK_THRESHOLD  # (1, *S): on the fixed grid, where the ddf lives
            pairs.append(pair)
    return pairs


def affine_stage(pair: dict) -> tuple[np.ndarray, torch.Tensor]:
    """The paper's affine pre-registration: ``T`` (4x4) and the moving image resampled onto the fixed grid."""
    from regnet_zoo.data.transforms import pre_align_pair  # imported here: pulls SimpleITK (not on GPU hosts)

    n = pair["fixed"].ndim - 1
    affine = as_4x4(pair["affine"])
    voxel_to_world = torch.as_tensor(from_4x4(affine, n))
    matrix = affine_register(pair["fixed"], pair["moving"], voxel_to_world, voxel_to_world)
    matrix = as_4x4(matrix)
    images = {key: MetaTensor(pair[key], affine=torch.as_tensor(affine)) for key in ("fixed", "moving")}
    aligned = pre_align_pair(images, matrix)["moving"]
    return matrix, aligned.as_tensor().float()


def evaluate(net: RegNet, pairs: list[dict], aligned: list | None = None) -> list[dict]:
    """MAE (mm) inside the mask per pair: the network alone, and after the affine stage (``aligned``).

    The network runs on its own device; the errors are measured on the CPU (the affine stage's grid).
    """
    net.eval()
    device = next(net.parameters()).device
    rows = []
    with torch.no_grad():
        for i, pair in enumerate(pairs):
            truth, mask, spacing = pair["ddf"][None], pair["mask"][None], pair["spacing"]
            start = time.perf_counter()
            ddf = net(pair["fixed"][None].to(device), pair["moving"][None].to(device))["ddf"].cpu()
            seconds = time.perf_counter() - start
            mae, per_axis = dvf_mae(ddf, truth, mask, spacing)
            row = {
                "preset": pair["preset"],
                "mae_mm": mae.item(),
                "mae_axes_mm": per_axis.tolist(),
                "seconds": seconds,
            }
            if aligned is not None:
                from regnet_zoo.api.pipeline import total_ddf  # imported here: pulls SimpleITK
                matrix, moving_aligned = aligned[i]
                deformable = net(pair["fixed"][None].to(device), moving_aligned[None].to(device))["ddf"][0]
                deformable = deformable.cpu()
                total = total_ddf(deformable, matrix, pair["affine"])[None]
                row["affine_then_regnet_mae_mm"] = dvf_mae(total, truth, mask, spacing)[0].item()
                affine_only = total_ddf(torch.zeros_like(deformable), matrix, pair["affine"])[None]
                row["affine_only_mae_mm"] = dvf_mae(affine_only, truth, mask, spacing)[0].item()
            rows.append(row)
    return rows


class TrainingCrops(torch.utils.data.Dataset):
    """Crop ``i`` of the training stream: a training image and a ``RegNetSyntheticCropd`` draw, both seeded by
    ``(seed, i)`` -- the same crops whatever the number of loader workers."""

    def __init__(self, samples: list[dict], transform: RegNetSyntheticCropd, seed: int, length: int) -> None:
        self.samples, self.transform, self.seed, self.length = samples, transform, seed, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng([self.seed, i])
        self.transform.set_random_state(seed=int(rng.integers(2**31)))
        return dict(self.transform(self.samples[int(rng.integers(len(self.samples)))]))


def _stack(crops: list[dict]) -> dict[str, torch.Tensor]:
    return {k: torch.stack([torch.as_tensor(c[k]) for c in crops]) for k in crops[0]}


def _one_thread(_: int) -> None:
    torch.set_num_threads(1)


def train(variant: str, images: dict, val_pairs: list[dict], args) -> tuple[RegNet, dict]:
    """Train one network (``variant`` "multi" or "single" scale) and record its learning curve."""
    torch.manual_seed(args.seed)
    dims = args.dims
    net = RegNet(
        dims,
        multi_scale=variant == "multi",
        skip_crop_border=True,
        tile_size=args.tile,
        dense_mode=args.dense_mode,
        output_init_std=None if args.output_init_std <= 0 else args.output_init_std,
    ).to(args.device)
    transform = RegNetSyntheticCropd(image_key="image", mask_key="mask", crop_size=args.crop)
    loss_fn = RegNetLoss()
    optimizer = torch.optim.Adam(net.parameters(), lr=args.lr)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=args.epoch_steps, gamma=1 / 1.25)
    samples = [{"image": im, "mask": (im > MASK_THRESHOLD).float()} for im in images["train"]]
    crops = TrainingCrops(samples, transform, args.seed, args.steps * args.batch)
    loader = torch.utils.data.DataLoader(
        crops, batch_size=args.batch, num_workers=args.workers, collate_fn=_stack, worker_init_fn=_one_thread
    )
    batches = iter(loader)
    curve, window, losses = [], [], []
    start = time.perf_counter()
    step = 0

    def record() -> None:
        val = evaluate(net, val_pairs)
        curve.append(
            {
                "step": step,
                "seconds": time.perf_counter() - start,
                "lr": optimizer.param_groups[0]["lr"],
                "train_mae_vox": float(np.mean(window)) if window else None,
                "validation_mae_mm": float(np.mean([r["mae_mm"] for r in val])),
            }
        )
        window.clear()
        print(
            f"  [{variant}] step {step:5d}  {curve[-1]['seconds']:6.0f} s  train MAE "
            f"{curve[-1]['train_mae_vox'] or float('nan'):.3f} vox  validation MAE "
            f"{curve[-1]['validation_mae_mm']:.3f} mm",
            flush=True,
        )
        net.train()

    net.train()
    record()
    budget = args.budget_minutes * 60 if args.budget_minutes else float("inf")
    while step < args.steps and time.perf_counter() - start < budget:
        batch = {k: v.to(args.device) for k, v in next(batches).items()}
        loss = loss_fn(net(batch["fixed"], batch["moving"]), batch)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
        step += 1
        window.append(loss.item())
        losses.append(loss.item())
        if step % args.eval_every == 0:
            record()
    if curve[-1]["step"] != step:
        record()
    info = {
        "steps": step,
        "batch": args.batch,
        "crop": args.crop,
        "seconds": time.perf_counter() - start,
        "parameters": sum(p.numel() for p in net.parameters()),
        "stopped_by": "steps" if step >= args.steps else "budget",
        "learning_curve": curve,
    }
    return net.eval(), info


def swap_axes(image: MetaTensor) -> MetaTensor:
    """A 2D image with its two axes swapped (affine columns too): a probe of axis-specific behaviour."""
    affine = torch.as_tensor(image.affine).clone()
    affine[:, [0, 1]] = affine[:, [1, 0]]
    return MetaTensor(image.as_tensor().transpose(-1, -2).contiguous(), affine=affine)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--out", type=Path, default=Path("regnet_bench.json"))
    parser.add_argument("--dims", type=int, choices=(2, 3), default=2)
    parser.add_argument("--variants", nargs="+", choices=("multi", "single"), default=["multi", "single"])
    parser.add_argument("--steps", type=int, default=1500, help="Adam steps per variant (--batch crops each)")
    parser.add_argument("--budget-minutes", type=float, default=None, help="stop each training after this")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--crop", type=int, default=None, help="training crop edge (2D: 112, 3D: 64)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--epoch-steps", type=int, default=250, help="steps between the 1/1.25 lr decays")
    parser.add_argument("--eval-every", type=int, default=100, help="learning-curve interval (steps)")
    parser.add_argument("--tile", type=int, nargs="+", default=None, help="dense-inference tile (3D memory)")
    parser.add_argument("--dense-mode", default="exact", choices=["exact", "interpolate"])
    parser.add_argument("--time-shape", type=int, nargs="+", default=None, help="also time dense inference")
    parser.add_argument("--no-affine", action="store_true", help="skip the affine pre-registration rows")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--workers", type=int, default=0, help="processes making training crops")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="torch device for training and inference, e.g. cuda")
    parser.add_argument(
        "--swap-axes", action="store_true", help="2D: swap the two image axes of every image (a probe)"
    )
    parser.add_argument(
        "--output-init-std", type=float, default=0.0, help="last layer's initial weight std (0: PyTorch's)"
    )
    args = parser.parse_args(argv)
    if args.swap_axes and args.dims != 2:
        raise SystemExit("--swap-axes: 2D only")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: CUDA is not available")
    args.crop = args.crop or (112 if args.dims == 2 else 64)
    torch.set_num_threads(args.threads)

    images, names = load_split(args.data, args.dims)
    if args.swap_axes:
        images = {part: [swap_axes(image) for image in found] for part, found in images.items()}
    val_presets = PRESETS if args.dims == 3 else ("medium",)
    val_pairs = synthetic_pairs(images["validation"], seed=5000, presets=val_presets)
    test_pairs = synthetic_pairs(images["test"], seed=9000)
    aligned = None
    if not args.no_affine:
        start = time.perf_counter()
        aligned = [affine_stage(p) for p in test_pairs]
        print(f"affine pre-registration of {len(test_pairs)} test pairs: {time.perf_counter() - start:.0f} s")
    identity = [
        dvf_mae(torch.zeros_like(p["ddf"][None]), p["ddf"][None], p["mask"][None], p["spacing"])[0].item()
        for p in test_pairs
    ]
    result: dict = {
        "benchmark": "RegNet (Sokooti et al. 2017): DVF MAE on synthetic deformations of held-out subjects",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.node()} {platform.machine()}, torch {torch.__version__}, "
        f"{args.threads} threads, device {args.device}"
        + (f" ({torch.cuda.get_device_name(args.device)})" if args.device.startswith("cuda") else ""),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "split": names,
        "mae_definition": "sum over axes of the mean |ddf - ddf_true| (mm) inside the fixed brain mask",
        "paper": PAPER,
        "variants": {},
    }
    for variant in args.variants:
        net, info = train(variant, images, val_pairs, args)
        rows = evaluate(net, test_pairs, aligned)
        for row, ident in zip(rows, identity, strict=True):
            row["identity_mae_mm"] = ident
        summary = {}
        for preset in PRESETS:
            sel = [r for r in rows if r["preset"] == preset]
            summary[preset] = {
                key: float(np.mean([r[key] for r in sel]))
                for key in ("identity_mae_mm", "mae_mm", "affine_then_regnet_mae_mm", "affine_only_mae_mm")
                if key in sel[0]
            }
        means = {key: float(np.mean([r[key] for r in rows])) for key in summary["low"]}
        best = means.get("affine_then_regnet_mae_mm", means["mae_mm"])
        means["ratio_to_identity"] = best / means["identity_mae_mm"]
        means["validation_mae_mm"] = info["learning_curve"][-1]["validation_mae_mm"]
        result["variants"][variant] = {
            "train": info,
            "test_per_preset": summary,
            "test_mean": means,
            "test_pairs": rows,
        }
        steps, seconds = info["steps"], info["seconds"]
        print(f"{variant}-scale ({info['parameters']} parameters, {steps} steps, {seconds:.0f} s):")
        print(f"  {'preset':8s} {'identity':>9s} {'RegNet':>8s} {'affine+RegNet':>14s} {'affine':>8s}  (mm)")
        for preset, s in list(summary.items()) + [("mean", means)]:
            print(
                f"  {preset:8s} {s['identity_mae_mm']:9.2f} {s['mae_mm']:8.2f} "
                f"{s.get('affine_then_regnet_mae_mm', float('nan')):14.2f} "
                f"{s.get('affine_only_mae_mm', float('nan')):8.2f}"
            )
        if args.time_shape:
            fixed = torch.rand(1, 1, *args.time_shape, device=args.device)
            with torch.no_grad():
                start, start_cpu = time.perf_counter(), time.process_time()
                net(fixed, fixed.flip(2))
                if fixed.is_cuda:
                    torch.cuda.synchronize()
                wall, cpu = time.perf_counter() - start, time.process_time() - start_cpu
            result["variants"][variant]["dense_inference"] = {
                "shape": args.time_shape, "mode": args.dense_mode, "tile": args.tile, "seconds": wall,
                "cpu_seconds": cpu,
            }
            print(f"  dense inference {args.time_shape} ({args.dense_mode}): {wall:.1f} s, {cpu:.1f} s CPU")
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))  # after every variant: nothing lost on a stop
    print(f"saved {args.out}")
    return result


if __name__ == "__main__":
    main()
