"""Capture-range benchmark: mean displacement error for synthetic translations of 2, 4, 8 and 12 voxels.

The same 2D pairs for every method: a held-out image ``fixed`` and ``moving(y) = fixed(y - t)`` (a translation
by ``t`` voxels in a seeded random direction), so the exact DDF is the constant ``t``
(``moving(x + t) = fixed(x)``). The error is the mean end-point error ``|ddf(x) - t|`` (voxels) over the
interior foreground of the fixed image (a ``--margin`` band at the border, where the translation pulls in
padding, is left out).

Rows: no registration (error = |t|); the discrete correlation network with identity features (no training
at all); and the packaged configurations (``bundles/<m>/train.yaml``: ``network_def``, ``loss``,
``learning_rate``) of discrete_corr, DDR-Net and PWC, each trained for ``--iterations`` Adam steps on the same
random translations (|t| uniform in [0, max translation]) of the training images, without labels (each
method's own image loss).

Data: the 100 OASIS 2D slices in ``../shared/data/oasis2d/slices`` when present (80 train / 20 test), else
the built-in 2D phantoms.

    OMP_NUM_THREADS=1 python benchmarks/discrete_corr_bench.py --out benchmarks/results/discrete_corr.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

from regnet_zoo.bundle import bundle_parser
from regnet_zoo.core.spatial import warp_image
from regnet_zoo.networks.discrete_corr import DiscreteCorrNet

SHARED_DATA = Path(
    os.environ.get("REGNET_ZOO_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data")
)


def load_images(source: str) -> tuple[torch.Tensor, torch.Tensor, str]:
    """Training and test images ``(n, 1, H, W)`` in [0, 1] and a description of the data."""
    from regnet_zoo.data.io import load_image

    slices = SHARED_DATA / "oasis2d" / "slices"
    if source in ("auto", "oasis2d") and slices.is_dir():
        files = sorted(slices.glob("*.nrrd"))
        images = torch.stack([load_image(f, 2).as_tensor()[:1] for f in files])  # (n, 1, H, W)
        images = images / images.amax(dim=(1, 2, 3), keepdim=True).clamp_min(1e-6)
        return images[:80], images[80:], f"OASIS 2D slices ({slices}), {tuple(images.shape[2:])}"
    if source == "oasis2d":
        raise FileNotFoundError(f"{slices} not found")
    from regnet_zoo.data.learn2reg import Learn2RegDataset
    from regnet_zoo.data.phantom import default_dataset_dir

    dataset = Learn2RegDataset(default_dataset_dir(2))
    files = sorted({p["fixed"] for p in dataset.pairs("train")} | {p["fixed"] for p in dataset.pairs("val")})
    images = torch.stack([load_image(f, 2).as_tensor()[:1] for f in files])  # (n, 1, H, W)
    return images[:-4], images[-4:], "built-in 2D phantoms"


def translate(images: torch.Tensor, shifts: torch.Tensor) -> torch.Tensor:
    """``moving(y) = image(y - t)`` for ``shifts`` ``(B, 2)`` (linear interpolation, border padding)."""
    ddf = -shifts.view(-1, 2, 1, 1).expand(-1, -1, *images.shape[2:]).contiguous()
    return warp_image(images, ddf)


def random_shifts(magnitudes: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    angle = torch.rand(len(magnitudes), generator=generator) * 2 * math.pi
    return torch.stack([magnitudes * torch.cos(angle), magnitudes * torch.sin(angle)], dim=1)


def build(method: str) -> tuple[torch.nn.Module, torch.nn.Module, float]:
    parser = bundle_parser(method, "train", spatial_dims=2, device="cpu")
    return (
        parser.get_parsed_content("network_def"),
        parser.get_parsed_content("loss"),
        float(parser.get_parsed_content("learning_rate")),
    )


def train(method, network, loss_fn, lr, images, iterations, batch_size, max_shift, seed) -> float:
    generator = torch.Generator().manual_seed(seed)
    optimiser = torch.optim.Adam(network.parameters(), lr=lr)
    network.train()
    start = time.time()
    for _ in range(iterations):
        index = torch.randint(len(images), (batch_size,), generator=generator)
        fixed = images[index]
        shifts = random_shifts(torch.rand(batch_size, generator=generator) * max_shift, generator)
        batch = {"fixed": fixed, "moving": translate(fixed, shifts)}
        losses = loss_fn(network(batch["fixed"], batch["moving"]), batch)
        optimiser.zero_grad()
        losses["loss"].backward()
        optimiser.step()
    return time.time() - start


@torch.no_grad()
def mean_error(network, test_images, shifts, margin) -> float:
    """Mean end-point error (voxels) over the interior foreground of every test pair."""
    network.eval()
    moving = translate(test_images, shifts)
    errors = []
    for i in range(len(test_images)):
        ddf = network(test_images[i : i + 1], moving[i : i + 1])["ddf"][0]
        epe = (ddf - shifts[i].view(2, 1, 1)).norm(dim=0)
        mask = test_images[i, 0] > 0.05
        mask[:margin], mask[-margin:], mask[:, :margin], mask[:, -margin:] = False, False, False, False
        errors.append(float(epe[mask].mean()))
    return float(np.mean(errors))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/discrete_corr_bench.json"))
    parser.add_argument("--translations", type=float, nargs="+", default=[2, 4, 8, 12])
    parser.add_argument("--methods", nargs="+", default=["discrete_corr", "ddrnet", "pwc"])
    parser.add_argument("--iterations", type=int, default=150)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument(
        "--test-pairs", type=int, default=20, help="test images (one pair per magnitude each)"
    )
    parser.add_argument("--margin", type=int, default=16)
    parser.add_argument("--data", choices=["auto", "oasis2d", "phantom"], default="auto")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    train_images, test_images, data_desc = load_images(args.data)
    test_images = test_images[: args.test_pairs]
    generator = torch.Generator().manual_seed(args.seed + 1)
    test_shifts = {
        t: random_shifts(torch.full((len(test_images),), float(t)), generator) for t in args.translations
    }
    max_shift = max(args.translations)

    rows: dict[str, dict] = {"no registration": {str(t): float(t) for t in args.translations}}
    # no trained part at all: min-convolution kernels (average, min) of the tutorial, the default, none
    regularisations = (
        ("tutorial min-conv 5/3", (5, 3)),
        ("default min-conv 3/3", (3, 3)),
        ("mean-field only", (1, 1)),
    )
    for name, kernels in regularisations:
        identity_net = DiscreteCorrNet(
            2, radius=5, stride=4, features="identity", softmax_scale=100.0,
            minconv_avg_kernel=kernels[0], minconv_min_kernel=kernels[1],
        )  # fmt: skip
        rows[f"discrete_corr identity features, {name}"] = {
            str(t): mean_error(identity_net, test_images, s, args.margin) for t, s in test_shifts.items()
        }
    timings = {}
    for method in args.methods:
        try:
            network, loss_fn, lr = build(method)
        except Exception as error:  # a bundle that is not packaged (yet) is reported, not fatal
            print(f"skipping {method}: {type(error).__name__}: {error}")
            continue
        timings[method] = train(
            method, network, loss_fn, lr, train_images, args.iterations, args.batch_size, max_shift, args.seed
        )
        rows[f"{method} (trained {args.iterations} it)"] = {
            str(t): mean_error(network, test_images, s, args.margin) for t, s in test_shifts.items()
        }
        name = f"{method} (trained {args.iterations} it)"
        print(f"{method}: trained in {timings[method]:.0f} s, errors {rows[name]}", flush=True)

    header = f"{'method':58s}" + "".join(f"{'t=' + str(t):>9s}" for t in args.translations)
    print(
        f"\nmean end-point error (voxels), {len(test_images)} test pairs per translation; data: {data_desc}"
    )
    print(header)
    for name, errors in rows.items():
        print(f"{name:58s}" + "".join(f"{errors[str(t)]:9.2f}" for t in args.translations))
    result = {
        "benchmark": "capture range: mean end-point error for synthetic translations",
        "data": data_desc,
        "config": vars(args) | {"out": str(args.out)},
        "errors_voxels": rows,
        "training_seconds": timings,
        "machine": {
            "platform": platform.platform(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        },
        "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
