"""Peak training memory and time per iteration: DDR-Net vs a single-scale U-Net SVF at the same resolution.

The paper (Joshi & Hong, Sect. 3) reports 21.16 MB for DDR-Net against 26.46 MB for a single-scale U-Net with
full-size velocity integration on one 128x128 pair (~0.80x). Here every variant trains for a few iterations
(batch 1, Adam, the DDR-Net loss: MSE + KL) in a fresh subprocess:

- ``unet_svf``: one U-Net (the same widths) on the full-resolution pair -> SVF -> scaling and squaring;
- ``ddrnet``: DDR-Net storing every activation (``checkpoint_chunks=False``: chunks batched);
- ``ddrnet_ckpt``: DDR-Net's memory plan (the default, ``checkpoint_chunks=True``): chunks one at a time,
  gradient checkpointing around each branch's U-Net, head, integration and warp, around the original
  scale's merge, integration and warp, and around every loss term.

Memory: the peak of the tensor allocator's live bytes during one training iteration (or one forward pass
without autograd), after a warm-up iteration, above what is allocated when it starts (model, Adam state,
data). One tool for every variant: on CPU the allocator events of ``torch.profiler.profile(
profile_memory=True)`` (each allocation and free with its size, in order: their running sum is the live
memory; exported with ``export_chrome_trace``, the ``[memory]`` events), on CUDA
``torch.cuda.max_memory_allocated``. Not the process's resident set, which counts freed pages the allocator
keeps and the interpreter itself. Each measurement runs in its own process. Usage::

    python benchmarks/ddrnet_memory.py [--size 128 128] [--iterations 5] [--device cpu] [--out FILE]

Prints a table and saves JSON (default ``benchmarks/results/ddrnet_memory.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

VARIANTS = ("unet_svf", "ddrnet", "ddrnet_ckpt")


def cpu_allocator_peak_mb(step) -> float:
    """Peak live tensor memory (MiB) of the CPU allocator while ``step()`` runs, above the live memory when
    it starts: the running sum of the ``[memory]`` allocation / free events of ``torch.profiler``."""
    import tempfile

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    with tempfile.TemporaryDirectory() as folder:
        trace = Path(folder) / "trace.json"
        prof.export_chrome_trace(str(trace))
        events = json.loads(trace.read_text())["traceEvents"]
    memory = sorted(
        (e for e in events if e.get("name") == "[memory]" and e["args"].get("Device Type", 0) == 0),
        key=lambda e: e["ts"],
    )
    if not memory:
        raise RuntimeError("torch.profiler recorded no CPU memory events")
    live = peak = 0
    for event in memory:
        live += int(event["args"]["Bytes"])
        peak = max(peak, live)
    return peak / 2**20


def build(variant: str, spatial_dims: int):
    """The network and loss of a variant (U-Net widths as in bundles/ddrnet/train.yaml)."""
    import torch
    from torch import nn

    from regnet_zoo.core.integration import scaling_and_squaring
    from regnet_zoo.core.spatial import warp_image
    from regnet_zoo.networks.ddrnet import DDRNet, DDRNetLoss, VelocityHead
    from regnet_zoo.networks.unet import RegistrationUNet

    widths = dict(
        encoder_channels=(16, 32, 32, 32), decoder_channels=(32, 32, 32, 32), extra_channels=(16, 16)
    )

    class SingleScaleSVF(nn.Module):
        """VoxelMorph-diff-like baseline: U-Net on the full pair -> SVF mean/log-variance -> integration."""

        def __init__(self) -> None:
            super().__init__()
            self.unet = RegistrationUNet(spatial_dims, 2, **widths)
            self.head = VelocityHead(spatial_dims, self.unet.out_channels)

        def forward(self, fixed, moving):
            mean, log_var = self.head(self.unet(torch.cat([fixed, moving], dim=1)))
            svf = mean + torch.exp(0.5 * log_var) * torch.randn_like(mean) if self.training else mean
            ddf = scaling_and_squaring(svf, 7)
            return {
                "ddf": ddf,
                "warped": warp_image(moving, ddf),
                "velocity_mean": mean,
                "velocity_log_var": log_var,
            }

    if variant == "unet_svf":
        net = SingleScaleSVF()
    else:
        net = DDRNet(spatial_dims, checkpoint_chunks=variant == "ddrnet_ckpt", **widths)
    return net, DDRNetLoss()


def measure(variant: str, size: list[int], iterations: int, device: str, phase: str = "train") -> dict:
    """Run in a fresh process: peak memory of one training iteration (``phase="train"``) or one forward pass
    without autograd (``"infer"``), and the mean time per iteration / forward pass."""
    import torch

    torch.manual_seed(0)
    net, loss_fn = build(variant, len(size))
    net = net.to(device).train()
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-4)
    fixed = torch.rand(1, 1, *size, device=device)
    moving = torch.rand(1, 1, *size, device=device)
    batch = {"fixed": fixed, "moving": moving}

    def train_step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss_fn(net(fixed, moving), batch)["loss"].backward()
        optimizer.step()

    def infer_step() -> None:
        with torch.inference_mode():
            net(fixed, moving)

    if phase == "infer":
        net.eval()
    step = train_step if phase == "train" else infer_step

    step()  # warm-up (Adam state, cuDNN workspaces)
    optimizer.zero_grad(set_to_none=True)  # the gradients are freed before the measurement, not during it
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        peak_mb = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        peak_mb = cpu_allocator_peak_mb(step)
    times = []
    for _ in range(iterations):
        start = time.perf_counter()
        step()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    params = sum(p.numel() for p in net.parameters())
    return {"peak_memory_mb": peak_mb, "time_s": sum(times) / len(times), "parameters": params}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, nargs="+", default=[128, 128], help="spatial size (2 or 3 ints)")
    parser.add_argument("--iterations", type=int, default=5, help="timed iterations per variant")
    parser.add_argument("--device", default="cuda" if _cuda_available() else "cpu")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument(
        "--out", default=str(Path(__file__).resolve().parent / "results" / "ddrnet_memory.json")
    )
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--phase", default="train", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:  # one measurement in this (fresh) process
        print(json.dumps(measure(args.child, args.size, args.iterations, args.device, args.phase)))
        return 0
    if len(args.size) not in (2, 3):
        parser.error("--size takes 2 or 3 integers")
    results = []
    for variant in args.variants:
        result = {"variant": variant, "size": args.size, "device": args.device}
        for phase in ("train", "infer"):
            cmd = [
                sys.executable,
                __file__,
                "--child",
                variant,
                "--phase",
                phase,
                "--size",
                *map(str, args.size),
            ]
            cmd += ["--iterations", str(args.iterations), "--device", args.device]
            out = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
            if out.returncode != 0:
                print(out.stderr, file=sys.stderr)
                return out.returncode
            measured = json.loads(out.stdout.strip().splitlines()[-1])
            result["parameters"] = measured["parameters"]
            result[f"{phase}_peak_memory_mb"] = measured["peak_memory_mb"]
            result[f"{phase}_time_s"] = measured["time_s"]
        results.append(result)
    reference = next((r for r in results if r["variant"] == "unet_svf"), results[0])
    for r in results:
        for key in ("train_peak_memory_mb", "train_time_s", "infer_peak_memory_mb", "infer_time_s"):
            r[f"{key}_ratio"] = r[key] / reference[key]
    size = "x".join(map(str, args.size))
    print(f"DDR-Net vs single-scale U-Net SVF, {size}, batch 1, device {args.device} (ratios: x unet_svf)")
    columns = ("train MB", "ratio", "train s", "ratio", "infer MB", "ratio", "infer s", "ratio", "params")
    widths = (9, 6, 8, 6, 9, 6, 8, 6, 8)
    print(f"{'variant':<12} " + " ".join(f"{c:>{w}}" for c, w in zip(columns, widths, strict=True)))
    for r in results:
        values = []
        for phase in ("train", "infer"):
            values += [f"{r[f'{phase}_peak_memory_mb']:>9.1f}", f"{r[f'{phase}_peak_memory_mb_ratio']:>6.2f}"]
            values += [f"{r[f'{phase}_time_s']:>8.3f}", f"{r[f'{phase}_time_s_ratio']:>6.2f}"]
        print(f"{r['variant']:<12} " + " ".join(values) + f" {r['parameters']:>8d}")
    print(
        "paper (Joshi & Hong, 128x128, forward pass + parameters): DDR-Net 21.16 MB vs U-Net 26.46 MB (0.80x)"
    )
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps({"size": args.size, "device": args.device, "results": results}, indent=2))
    print(f"saved {out_path}")
    return 0


def _cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


if __name__ == "__main__":
    raise SystemExit(main())
