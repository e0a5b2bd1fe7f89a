"""RegNet benchmark: DVF MAE (mm) on synthetic deformations of an unseen volume; dense CPU inference time.

Trains RegNet (Sokooti et al. 2017; paper network by default) on synthetic deformations of one OASIS volume
(crops sampled inside its brain mask), then registers synthetic low / medium / high frequency deformations of
the *other* OASIS volume (never seen in training) by dense inference and reports the paper's MAE (mm, sum of
the per-axis mean absolute errors, inside the brain mask; paper: 1.19 mm on chest CT after 15 epochs of ~1M
patches) next to the MAE of the identity (zero field). Finally it times dense inference of a whole
160x192x224 volume on the CPU.

    python benchmarks/regnet_bench.py --out /tmp/regnet_bench.json [--steps 40] [--threads 2]

Needs the development data (``--data``, default ``../shared/data`` beside the checkout).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from monai.data import MetaTensor

from regnet_zoo.core.geometry import spacing_from_affine
from regnet_zoo.data.io import load_image
from regnet_zoo.data.preprocess import normalise_intensity
from regnet_zoo.data.regnet_crop import RegNetSyntheticCropd
from regnet_zoo.data.synthetic import deform_pair
from regnet_zoo.networks.regnet import RegNet, RegNetLoss, dvf_mae

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--out", type=Path, default=Path("regnet_bench.json"))
    parser.add_argument("--steps", type=int, default=30, help="training iterations (batch of --batch crops)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--crop", type=int, default=64, help="training crop edge (voxels)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--eval-size", type=int, default=64, help="edge of the central evaluation region")
    parser.add_argument("--time-shape", type=int, nargs=3, default=[160, 192, 224])
    parser.add_argument("--dense-mode", default="interpolate", choices=["exact", "interpolate"])
    parser.add_argument("--tile", type=int, nargs="+", default=[80, 192, 224], help="dense-inference tile")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    folder = args.data / "oasis3d_pair" / "imagesTr"
    train_image = load_image(folder / "OASIS_0001_0000.nii.gz")
    test_image = load_image(folder / "OASIS_0002_0000.nii.gz")
    spacing = spacing_from_affine(test_image.affine, 3)
    train_image = MetaTensor(normalise_intensity(train_image), affine=train_image.affine)
    test_image = MetaTensor(normalise_intensity(test_image), affine=test_image.affine)

    net = RegNet(3, dense_mode=args.dense_mode, tile_size=args.tile, skip_crop_border=True)
    n_params = sum(p.numel() for p in net.parameters())
    transform = RegNetSyntheticCropd(image_key="image", mask_key="mask", crop_size=args.crop)
    transform.set_random_state(args.seed)
    loss_fn = RegNetLoss()
    optimizer = torch.optim.Adam(net.parameters(), lr=args.lr)
    sample = {"image": train_image, "mask": (train_image > 0.05).float()}
    start = time.perf_counter()
    losses = []
    for _ in range(args.steps):
        crops = [transform(sample) for _ in range(args.batch)]
        batch = {k: torch.stack([c[k] for c in crops]) for k in crops[0]}
        loss = loss_fn(net(batch["fixed"], batch["moving"]), batch)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    train_seconds = time.perf_counter() - start

    # held-back volume: a central region (dense inference pads its borders, as on a whole image)
    shape = test_image.shape[1:]
    region = tuple(slice(max(0, (s - args.eval_size) // 2), (s + args.eval_size) // 2) for s in shape)
    test_region = test_image[(slice(None),) + region].as_tensor()
    rows = []
    net.eval()
    for k, preset in enumerate(("low", "medium", "high")):
        pair = deform_pair(test_region, preset=preset, spacing=spacing, generator=100 + k)
        mask = (pair["fixed"] > 0.05)[None]
        with torch.no_grad():
            ddf = net(pair["fixed"][None], pair["moving"][None])["ddf"]
        mae, per_axis = dvf_mae(ddf, pair["ddf"][None], mask, spacing)
        identity, _ = dvf_mae(torch.zeros_like(ddf), pair["ddf"][None], mask, spacing)
        rows.append(
            {
                "preset": preset,
                "mae_mm": mae.item(),
                "mae_axes_mm": per_axis.tolist(),
                "identity_mae_mm": identity.item(),
            }
        )

    fixed = torch.rand(1, 1, *args.time_shape)
    with torch.no_grad():
        start, start_cpu = time.perf_counter(), time.process_time()
        net(fixed, fixed.flip(2))
        dense_seconds = time.perf_counter() - start
        dense_cpu_seconds = time.process_time() - start_cpu  # all threads; robust to a shared machine

    result = {
        "method": "regnet",
        "parameters": n_params,
        "train": {"steps": args.steps, "batch": args.batch, "crop": args.crop, "seconds": train_seconds},
        "train_loss_first_last10": [float(np.mean(losses[:10])), float(np.mean(losses[-10:]))]
        if losses
        else None,
        "held_back": rows,
        "mean_mae_mm": float(np.mean([r["mae_mm"] for r in rows])),
        "mean_identity_mae_mm": float(np.mean([r["identity_mae_mm"] for r in rows])),
        "dense_inference": {
            "shape": args.time_shape,
            "mode": args.dense_mode,
            "tile": args.tile,
            "threads": args.threads,
            "seconds": dense_seconds,
            "cpu_seconds": dense_cpu_seconds,
        },
        "paper_mae_mm": 1.19,
    }
    print(f"RegNet ({n_params} parameters), {args.steps} steps x {args.batch} crops of {args.crop}^3")
    print(f"{'preset':8s} {'MAE mm':>8s} {'identity':>9s}   per axis (mm)")
    for r in rows:
        axes = " ".join(f"{v:.2f}" for v in r["mae_axes_mm"])
        print(f"{r['preset']:8s} {r['mae_mm']:8.2f} {r['identity_mae_mm']:9.2f}   {axes}")
    print(
        f"{'mean':8s} {result['mean_mae_mm']:8.2f} {result['mean_identity_mae_mm']:9.2f}   (paper: 1.19 mm)"
    )
    print(
        f"dense inference {'x'.join(map(str, args.time_shape))} ({args.dense_mode}, tile {args.tile}, "
        f"{args.threads} CPU threads): {dense_seconds:.1f} s wall, {dense_cpu_seconds:.1f} s CPU"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
