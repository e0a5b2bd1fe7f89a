"""PWC registration pyramid benchmark: parameter count, peak training memory and inference time per pair.

Paper (Gunnarsson, Sjölund & Schön, Learn2Reg 2020): 8.6 M trainable parameters, 11.4 GB training memory at
64^3 with batch size 1 (TensorFlow, GTX 1080 Ti), 4.83 s prediction time per pair on CPU (0.31 s on GPU).

    python benchmarks/pwc_bench.py [--size 64] [--spatial-dims 3] [--threads 2] [--repeats 3] [--out pwc.json]

Memory: on CUDA ``torch.cuda.max_memory_allocated`` of one training step (forward, loss, backward, Adam step);
on CPU the growth of the process's peak resident set size over one training step (run first, in a fresh
process, so no earlier allocation sets the peak). Time: mean wall time of ``network(fixed, moving)`` in
``eval`` mode under ``torch.no_grad`` after one warm-up call (prediction only, as in the paper's table).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import time
from pathlib import Path

import torch

from regnet_zoo.networks.pwc import PWCLoss, PWCRegistrationPyramid

PAPER = {
    "parameters_m": 8.6,
    "train_memory_gb": 11.4,
    "cpu_seconds_per_pair": 4.83,
    "gpu_seconds_per_pair": 0.31,
}


def _rss_bytes() -> int:
    """Current resident set size (Linux ``/proc/self/statm``)."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * resource.getpagesize()


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def training_memory(
    network: torch.nn.Module, shape: tuple[int, ...], device: torch.device
) -> dict[str, float]:
    """Peak memory of one training step (batch 1) in GB."""
    loss_fn = PWCLoss()
    optimizer = torch.optim.Adam(network.parameters(), lr=1e-4)
    fixed, moving = torch.rand(1, 1, *shape, device=device), torch.rand(1, 1, *shape, device=device)
    network.train()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = _rss_bytes()
    start = time.perf_counter()
    optimizer.zero_grad()
    loss_fn(network(fixed, moving), {"fixed": fixed, "moving": moving})["loss"].backward()
    optimizer.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        return {"train_memory_gb": peak / 1e9, "train_step_s": time.perf_counter() - start}
    return {
        "train_memory_gb": (_peak_rss_bytes() - before) / 1e9,
        "process_peak_rss_gb": _peak_rss_bytes() / 1e9,
        "train_step_s": time.perf_counter() - start,
    }


def inference_time(
    network: torch.nn.Module, shape: tuple[int, ...], device: torch.device, repeats: int
) -> float:
    """Mean seconds per pair of the forward pass (eval mode, no grad), after one warm-up call."""
    fixed, moving = torch.rand(1, 1, *shape, device=device), torch.rand(1, 1, *shape, device=device)
    network.eval()
    times = []
    with torch.no_grad():
        for i in range(repeats + 1):
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            network(fixed, moving)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i > 0:
                times.append(time.perf_counter() - start)
    return sum(times) / len(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=64, help="image side (paper: 64)")
    parser.add_argument("--spatial-dims", type=int, default=3, choices=(2, 3))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--repeats", type=int, default=3, help="timed inference calls")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/pwc_bench.json"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    shape = (args.size,) * args.spatial_dims
    network = PWCRegistrationPyramid(spatial_dims=args.spatial_dims).to(device)
    parameters = sum(p.numel() for p in network.parameters() if p.requires_grad)

    memory = training_memory(network, shape, device)  # first: nothing larger has run in this process yet
    seconds = inference_time(network, shape, device, args.repeats)
    result = {
        "method": "pwc",
        "shape": list(shape),
        "batch_size": 1,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "machine": f"{platform.node()} {platform.processor() or platform.machine()}",
        "torch": torch.__version__,
        "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
        "parameters_m": parameters / 1e6,
        **memory,
        "seconds_per_pair": seconds,
        "paper": PAPER,
    }
    paper_time = PAPER["gpu_seconds_per_pair"] if device.type == "cuda" else PAPER["cpu_seconds_per_pair"]
    rows = [
        ("trainable parameters (M)", f"{parameters / 1e6:.2f}", f"{PAPER['parameters_m']}"),
        (
            f"peak training memory (GB), {args.size}^{args.spatial_dims}, batch 1",
            f"{memory['train_memory_gb']:.2f}",
            f"{PAPER['train_memory_gb']} (GPU)",
        ),
        (
            f"inference time per pair (s), {device.type}, {torch.get_num_threads()} threads",
            f"{seconds:.2f}",
            f"{paper_time}",
        ),
    ]
    width = max(len(r[0]) for r in rows)
    print(f"{'quantity':<{width}}  {'ours':>8}  {'paper':>14}")
    for name, ours, paper in rows:
        print(f"{name:<{width}}  {ours:>8}  {paper:>14}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
