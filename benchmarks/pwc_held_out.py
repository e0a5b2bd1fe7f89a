"""PWC pyramid: a short training on axial OASIS slices, evaluated on slice-disjoint held-out pairs.

The shared data has two labelled subjects (``oasis3d_pair``), so subject-disjoint evaluation is impossible
here; training uses axial positions ``62, 66, ..., 114`` and evaluation positions ``126, 134, 142`` (each
at least 12 slices = 12 mm from every training slice), both directions of the pair. Images are averaged
2x2 (80 x 112, 2 mm pixels), labels take the voxel at each block's centre.
Metrics: ``core.metrics.registration_metrics`` (Dice over the labels present, HD95 in mm, SDlogJ in both
forms, folding) per held-out pair, then their means.

    python benchmarks/pwc_held_out.py [--steps 60] [--full-width] [--out benchmarks/results/pwc_held_out.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F

from regnet_zoo.core.metrics import registration_metrics
from regnet_zoo.networks.pwc import PWCLoss, PWCRegistrationPyramid

TRAIN_SLICES = list(range(62, 115, 4))
HELD_OUT_SLICES = [126, 134, 142]
SUBJECTS = ("0001", "0002")


def axial_slices(root: Path, subject: str, indices: list[int], pool: int = 2):
    """Images ``(K, 1, H/pool, W/pool)`` (block means) and labels (block-centre voxels) of one subject."""
    image = nib.load(str(root / "imagesTr" / f"OASIS_{subject}_0000.nii.gz")).get_fdata(dtype=np.float32)
    label = np.asarray(nib.load(str(root / "labelsTr" / f"OASIS_{subject}_0000.nii.gz")).dataobj)
    x = F.avg_pool2d(torch.from_numpy(np.stack([image[:, i, :] for i in indices]))[:, None], pool)
    y = torch.from_numpy(np.stack([label[:, i, :] for i in indices]).astype(np.int64))[:, None]
    y = y[:, :, pool // 2 :: pool, pool // 2 :: pool][:, :, : x.shape[2], : x.shape[3]]
    return x, y


def pairs(root: Path, indices: list[int]) -> dict[str, torch.Tensor]:
    """Both directions of the subject pair at every slice position."""
    (fa, la), (fb, lb) = (axial_slices(root, s, indices) for s in SUBJECTS)
    return {
        "fixed": torch.cat([fa, fb]),
        "moving": torch.cat([fb, fa]),
        "fixed_label": torch.cat([la, lb]),
        "moving_label": torch.cat([lb, la]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/data/oasis3d_pair"))
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--full-width", action="store_true", help="the paper's DenseNet widths")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/pwc_held_out.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    train, test = pairs(args.data, TRAIN_SLICES), pairs(args.data, HELD_OUT_SLICES)
    deform = (64, 64, 32, 18, 8) if args.full_width else (16, 16, 8, 8, 4)
    net = PWCRegistrationPyramid(spatial_dims=2, deform_channels=deform)
    loss_fn = PWCLoss()
    optimizer = torch.optim.Adam(net.parameters(), lr=args.lr)
    generator = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    for _ in range(args.steps):
        index = torch.randperm(len(train["fixed"]), generator=generator)[:2]
        batch = {k: v[index] for k, v in train.items()}
        optimizer.zero_grad()
        loss_fn(net(batch["fixed"], batch["moving"]), batch)["loss"].backward()
        optimizer.step()
    train_seconds = time.perf_counter() - start
    net.eval()
    with torch.no_grad():
        ddf = net(test["fixed"], test["moving"])["ddf"].double()
    per_pair, identity = [], []
    for i in range(len(ddf)):
        labels = (test["fixed_label"][i, 0], test["moving_label"][i, 0])
        # 1 mm voxels averaged 2x2: 2 mm pixels
        per_pair.append(registration_metrics(ddf[i], *labels, spacing=2.0))
        identity.append(registration_metrics(torch.zeros_like(ddf[i]), *labels, spacing=2.0))
    keys = ("dice_mean", "hd95_mm", "sdlogj", "sdlogj_l2r", "folding_percent")
    mean = {k: float(np.mean([m[k] for m in per_pair])) for k in keys}
    mean_identity = {k: float(np.mean([m[k] for m in identity])) for k in keys}
    result = {
        "method": "pwc",
        "data": str(args.data),
        "train_slices": TRAIN_SLICES,
        "held_out_slices": HELD_OUT_SLICES,
        "held_out_pairs": len(per_pair),
        "deform_channels": list(deform),
        "steps": args.steps,
        "learning_rate": args.lr,
        "train_seconds": train_seconds,
        "threads": torch.get_num_threads(),
        "machine": f"{platform.node()} {platform.processor() or platform.machine()}",
        "torch": torch.__version__,
        "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
        "identity": mean_identity,
        "pwc": mean,
        "per_pair": [{k: m[k] for k in keys} for m in per_pair],
    }
    for name, row in (("identity", mean_identity), ("pwc", mean)):
        print(f"{name:>9}: " + ", ".join(f"{k} {v:.4f}" for k, v in row.items()))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
