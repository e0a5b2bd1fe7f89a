"""Per-method registration time and instance-optimisation time on one real 3D pair (CPU).

Sections (each a function, selectable with ``--sections``):

- ``registration``: every method's network forward on the pair, the plain path (``torch.no_grad``, batch
  norm as trained, contiguous tensors) against the inference path of ``register`` (``torch.inference_mode``,
  batch norm folded, PWC's preallocated DenseNet buffer), and with channels-last memory for the
  convolutions; maximum absolute difference of the DDFs;
- ``instance``: ``--steps`` instance-optimisation steps per method (the bundle's loss, its fallback for
  RegNet), coarse to fine (the default) against the full-resolution loop at equal steps: time and the
  final image mismatch (MSE of warped vs fixed, images in [0, 1]);
- ``cli``: ``regnet-zoo register --instance-opt STEPS --affine none`` end to end on the pair at its own
  size (160x192x224), with the CLI's stage times (run only with ``--sections cli``).

The pair is ``../shared/data/oasis3d_pair`` (two OASIS subjects, 160x192x224), min-max normalised and
resampled to ``--size``. Networks are the bundles' ``network_def`` with their trained weights when
``bundles/<method>/models/model.pt`` exists, else freshly initialised (seed 0): times do not depend on the
weights' values; the mismatch does (the instance section compares the two loops from the same start).
The machine is shared: the load average is recorded with every run. Usage::

    python benchmarks/speed_methods.py [--size 64 64 64] [--steps 20] [--methods ...] [--out FILE]

Prints a table and saves JSON (default ``benchmarks/results/speed_methods_<size>.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
PAIR = ROOT.parent / "shared" / "data" / "oasis3d_pair" / "imagesTr"
METHODS = ("pwc", "regnet", "ddrnet", "bspline_unet", "discrete_corr")


def load_pair(size: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The OASIS pair ``(1, 1, *size)`` each, min-max normalised to [0, 1]."""
    from regnet_zoo.data.io import load_image

    images = []
    for name in ("OASIS_0001_0000.nii.gz", "OASIS_0002_0000.nii.gz"):
        image = load_image(PAIR / name).as_tensor()[None].float()
        image = (image - image.min()) / (image.max() - image.min())
        if list(image.shape[2:]) != list(size):
            image = F.interpolate(image, size=tuple(size), mode="trilinear", align_corners=True)
        images.append(image)
    return images[0], images[1]


def load_labels(size: list[int]) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """The pair's label maps ``(1, 1, *size)`` (nearest neighbour) and the dataset's evaluation labels."""
    from regnet_zoo.data.io import load_image

    labels = []
    for name in ("OASIS_0001_0000.nii.gz", "OASIS_0002_0000.nii.gz"):
        label = load_image(PAIR.parent / "labelsTr" / name).as_tensor()[None].float()
        if list(label.shape[2:]) != list(size):
            label = F.interpolate(label, size=tuple(size), mode="nearest")
        labels.append(label.long())
    evaluation = json.loads((PAIR.parent / "dataset.json").read_text())["evaluation_labels"]
    return labels[0], labels[1], [int(v) for v in evaluation]


def mean_dice(fixed_label, moving_label, ddf, evaluation: list[int]) -> float:
    """Mean Dice over the evaluation labels (present in both maps); moving labels warped by nearest."""
    import numpy as np

    from regnet_zoo.core.metrics import dice_per_label
    from regnet_zoo.core.spatial import warp_labels

    warped = warp_labels(moving_label, ddf.float())
    fixed_map, moving_map = fixed_label[0, 0].numpy(), moving_label[0, 0].numpy()
    dice = dice_per_label(fixed_map, warped[0, 0].numpy(), evaluation, moving_map)
    return float(np.nanmean(list(dice.values())))


def network_of(method: str) -> torch.nn.Module:
    from regnet_zoo.bundle import load_bundle_network

    weights = ROOT / "bundles" / method / "models" / "model.pt"
    torch.manual_seed(0)
    return load_bundle_network(method, load_weights=weights.is_file(), spatial_dims=3).eval()


def _timed(function):
    """``(wall seconds, process CPU seconds (all threads), result)`` of ``function()``: on a shared machine
    the CPU time is the load-independent measure of the work, the wall time what a user waits."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = function()
    return time.perf_counter() - wall, time.process_time() - cpu, result


def registration(fixed, moving, methods) -> list[dict]:
    """Network forward per method: plain, inference path, inference path + channels-last."""
    from regnet_zoo.networks.inference import fold_batch_norm

    rows = []
    for method in methods:
        network = network_of(method)
        fast = fold_batch_norm(network)

        def plain(network=network):
            with torch.no_grad():
                return network(fixed, moving)["ddf"]

        def inference(fast=fast, memory_format=torch.contiguous_format):
            with torch.inference_mode():
                return fast(fixed.contiguous(memory_format=memory_format),
                            moving.contiguous(memory_format=memory_format))["ddf"]

        t_plain, c_plain, ddf_plain = _timed(plain)
        t_fast, c_fast, ddf_fast = _timed(inference)
        fast_cl = fold_batch_norm(network).to(memory_format=torch.channels_last_3d)
        t_cl, c_cl, ddf_cl = _timed(lambda fast_cl=fast_cl: inference(fast_cl, torch.channels_last_3d))
        rows.append({
            "method": method,
            "plain_s": t_plain,
            "plain_cpu_s": c_plain,
            "inference_s": t_fast,
            "inference_cpu_s": c_fast,
            "inference_channels_last_s": t_cl,
            "inference_channels_last_cpu_s": c_cl,
            "max_abs_ddf_difference": float((ddf_fast - ddf_plain).abs().max()),
            "max_abs_ddf_difference_channels_last": float((ddf_cl - ddf_plain).abs().max()),
        })
        print(json.dumps(rows[-1]), flush=True)
    return rows


def instance(fixed, moving, methods, steps: int, labels) -> list[dict]:
    """``steps`` instance-optimisation steps per method, coarse to fine vs the full-resolution loop: time,
    image MSE and mean Dice of the 30 evaluation labels (``labels``: fixed, moving, evaluation values)."""
    from regnet_zoo.api.instance import bundle_instance_loss, instance_optimise, instance_schedule

    rows = []
    for method in methods:
        network = network_of(method)
        loss_fn, lr = bundle_instance_loss(method, 3, fixed.device)
        with torch.no_grad():
            outputs = network(fixed, moving)
        row = {"method": method, "steps": steps, "lr": lr,
               "schedule": instance_schedule(tuple(fixed.shape[2:]), steps)}
        row["mse_start"] = float(((outputs["warped"] - fixed) ** 2).mean())
        row["dice_start"] = mean_dice(labels[0], labels[1], outputs["ddf"], labels[2])
        args = (network, loss_fn, outputs, fixed, moving, steps, lr)
        for name, c2f in (("coarse_to_fine", True), ("full_resolution", False)):
            t, c, tuned = _timed(lambda c2f=c2f, args=args: instance_optimise(*args, coarse_to_fine=c2f))
            row[f"{name}_s"] = t
            row[f"{name}_cpu_s"] = c
            row[f"{name}_mse"] = float(((tuned["warped"] - fixed) ** 2).mean())
            row[f"{name}_dice"] = mean_dice(labels[0], labels[1], tuned["ddf"], labels[2])
        row["speedup_cpu"] = row["full_resolution_cpu_s"] / row["coarse_to_fine_cpu_s"]
        rows.append(row)
        print(json.dumps(rows[-1]), flush=True)
    return rows


def cli(methods, steps: int) -> list[dict]:
    """``regnet-zoo register --instance-opt steps --affine none`` on the full-size pair; stage times."""
    import tempfile

    rows = []
    for method in methods:
        weights = ROOT / "bundles" / method / "models" / "model.pt"
        with tempfile.TemporaryDirectory() as folder:
            if not weights.is_file():
                weights = Path(folder) / "model.pt"
                torch.save(network_of(method).state_dict(), weights)
            cmd = [sys.executable, "-m", "regnet_zoo", "register", "--method", method]
            cmd += ["--weights", str(weights), "--fixed", str(PAIR / "OASIS_0001_0000.nii.gz")]
            cmd += ["--moving", str(PAIR / "OASIS_0002_0000.nii.gz"), "--instance-opt", str(steps)]
            cmd += ["--affine", "none", "--out", str(Path(folder) / "out")]
            env = dict(os.environ, PYTHONPATH=str(ROOT))
            start, usage = time.perf_counter(), os.times()
            done = subprocess.run(cmd, capture_output=True, text=True, env=env)
            total = time.perf_counter() - start
            cpu = (lambda u: u.children_user + u.children_system)(os.times()) - (
                usage.children_user + usage.children_system
            )
        if done.returncode:
            raise RuntimeError(done.stderr)
        stages = {m[1]: float(m[2]) for m in re.finditer(r"register: (.+): ([0-9.]+) s", done.stderr)}
        row = {"method": method, "steps": steps, "total_s": total, "total_cpu_s": cpu, "stages_s": stages}
        rows.append(row)
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, nargs=3, default=[64, 64, 64])
    parser.add_argument("--steps", type=int, default=20, help="instance-optimisation steps")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--sections", nargs="+", default=["registration", "instance"],
                        choices=["registration", "instance", "cli"])
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    from regnet_zoo.api.methods import use_all_cores

    result = {
        "size": args.size,
        "threads": use_all_cores(),
        "torch": torch.__version__,
        "load_average_start": os.getloadavg(),
        "cpu_count": os.cpu_count(),
    }
    if {"registration", "instance"} & set(args.sections):
        fixed, moving = load_pair(args.size)
        if "registration" in args.sections:
            result["registration"] = registration(fixed, moving, args.methods)
        if "instance" in args.sections:
            result["instance"] = instance(fixed, moving, args.methods, args.steps, load_labels(args.size))
    if "cli" in args.sections:
        result["size"] = [160, 192, 224]
        result["cli"] = cli(args.methods, args.steps)
    result["load_average_end"] = os.getloadavg()
    name = "cli" if args.sections == ["cli"] else "x".join(map(str, result["size"]))
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"speed_methods_{name}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.is_file():  # sections not run this time keep their earlier results (with their own load)
        earlier = json.loads(out.read_text())
        for section in ("registration", "instance", "cli"):
            if section in earlier and section not in result:
                result[f"{section}_earlier_run"] = {
                    k: earlier[k] for k in ("load_average_start", "load_average_end") if k in earlier
                }
                result[section] = earlier[section]
    out.write_text(json.dumps(result, indent=2))
    print(f"load average {result['load_average_start']} -> {result['load_average_end']} on "
          f"{result['cpu_count']} cores; saved {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
