"""Speed benchmark (issue 15 item 5). Sections are independent; ``--section core`` (the default and, for
now, the only one) times the core operations on the same real 3D pair at two sizes:

- warp linear / nearest (border), ``compose_ddf``, scaling and squaring (7 steps);
- each as **ours-fast** (``core._fast`` numba kernels), **ours-reference** (the same functions with the fast
  path off: ``grid_sample`` on a normalised grid) and **MONAI** (``monai.networks.blocks.Warp`` /
  ``DVF2DDF`` called as a user calls them; composition as ``b + Warp()(a, b)``), all with border padding;
- forward, and forward + backward (gradients w.r.t. image and field).

Inputs: the first image of ``../shared/data/oasis3d_pair`` (160x192x224, min-max normalised) and its
trilinear resampling to 64^3; a smooth synthetic field (random 5^3 control values upsampled trilinearly,
displacements of a few voxels), used as the DDF, as both arguments of the composition and as the SVF.

Times are medians over ``--repeats`` runs, with the three implementations interleaved in each repeat (the
machine may be shared: interleaving exposes all three to the same load). Memory: on CPU the peak resident
set above the level before the call, sampled every millisecond by a thread (``/proc/self/status`` VmRSS;
large tensors are mmapped and returned on free, so this follows the allocator's large blocks); on CUDA
``torch.cuda.max_memory_allocated``. Usage::

    python benchmarks/speed.py [--section core] [--sizes 160x192x224 64x64x64] [--repeats 3] [--device cpu]

Writes ``benchmarks/results/speed.json`` and ``speed.md`` (``--out`` stem).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from regnet_zoo.core import _fast  # noqa: E402
from regnet_zoo.core.integration import scaling_and_squaring  # noqa: E402
from regnet_zoo.core.spatial import compose_ddf, warp_image  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "oasis3d_pair"
IMPLS = ("fast", "reference", "monai")
STEPS = 7


def load_image(size: tuple[int, ...]) -> torch.Tensor:
    """First OASIS image ``(1, 1, *size)`` float32 in [0, 1] (trilinear resampling when sizes differ)."""
    import nibabel as nib

    path = sorted((DATA / "imagesTr").glob("*.nii*"))[0]
    arr = torch.from_numpy(np.asarray(nib.load(str(path)).dataobj, dtype=np.float32))[None, None]
    arr = (arr - arr.min()) / (arr.max() - arr.min())
    if tuple(arr.shape[2:]) != size:
        arr = F.interpolate(arr, size=size, mode="trilinear", align_corners=True)
    return arr.contiguous()


def smooth_field(size: tuple[int, ...], amplitude: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(1, len(size), *[5] * len(size), generator=g) * amplitude
    return F.interpolate(coarse, size=size, mode="trilinear", align_corners=True).contiguous()


class PeakRSS:
    """Peak VmRSS (bytes) above the level at entry, sampled every millisecond by a background thread."""

    def __enter__(self):
        self.base = self.peak = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        return 0

    def _poll(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            time.sleep(0.001)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())
        self.bytes = self.peak - self.base


def core_ops(device: torch.device):
    """``{op: {impl: fn(image, field, field2) -> Tensor}}`` for the core section."""
    from monai.networks.blocks import DVF2DDF, Warp

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m_lin, m_nn = Warp("bilinear", "border"), Warp("nearest", "border")
        m_ss = DVF2DDF(STEPS, "bilinear", "border")

    def ref(fn):
        def run(*args):
            with _fast.disabled():
                return fn(*args)

        return run

    warp_lin = lambda im, d, d2: warp_image(im, d)  # noqa: E731
    warp_near = lambda im, d, d2: warp_image(im, d, "nearest")  # noqa: E731
    compose = lambda im, d, d2: compose_ddf(d, d2)  # noqa: E731
    ss = lambda im, d, d2: scaling_and_squaring(d, STEPS)  # noqa: E731
    return {
        "warp_linear": {"fast": warp_lin, "reference": ref(warp_lin), "monai": lambda im, d, _: m_lin(im, d)},
        "warp_nearest": {"fast": warp_near, "reference": ref(warp_near), "monai": lambda i, d, _: m_nn(i, d)},
        "compose": {"fast": compose, "reference": ref(compose), "monai": lambda _, d, d2: d2 + m_lin(d, d2)},
        "scaling_squaring_7": {"fast": ss, "reference": ref(ss), "monai": lambda _, d, d2: m_ss(d)},
    }


def _call(fn, inputs, backward: bool):
    if not backward:
        with torch.no_grad():
            return fn(*inputs)
    inputs = [x.detach().requires_grad_(True) for x in inputs]
    out = fn(*inputs)
    out.backward(torch.ones_like(out))
    return out


def _timed(fn, inputs, backward, device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = _call(fn, inputs, backward)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, out


def _peak(fn, inputs, backward, device):
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        out = _call(fn, inputs, backward)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before, out
    with PeakRSS() as meter:
        out = _call(fn, inputs, backward)
    return meter.bytes, out


def section_core(args, device) -> dict:
    results = []
    for size in args.sizes:
        image = load_image(size).to(device)
        ddf = smooth_field(size, args.amplitude, 0).to(device)
        ddf2 = smooth_field(size, args.amplitude, 1).to(device)
        inputs = (image, ddf, ddf2)
        for op, impls in core_ops(device).items():
            for backward in (False, True):
                row = {"size": list(size), "op": op, "pass": "forward+backward" if backward else "forward"}
                outs, times = {}, {impl: [] for impl in IMPLS}
                for impl in IMPLS:  # warm-up (JIT / caches) that also measures peak memory
                    mem, out = _peak(impls[impl], inputs, backward, device)
                    row[f"{impl}_peak_mib"] = round(mem / 2**20, 1)
                    outs[impl] = out.detach().float().cpu()
                    del out
                repeats = args.repeats if op != "scaling_squaring_7" or min(size) < 100 else args.ss_repeats
                for _ in range(repeats):
                    for impl in IMPLS:  # interleaved
                        seconds, out = _timed(impls[impl], inputs, backward, device)
                        times[impl].append(seconds)
                        del out
                for impl in IMPLS:
                    row[f"{impl}_s"] = round(statistics.median(times[impl]), 4)
                scale = outs["reference"].abs().max().clamp_min(1e-12)
                for other in ("reference", "monai"):
                    diff = (outs["fast"] - outs[other]).abs().max() / scale
                    row[f"rel_diff_fast_vs_{other}"] = float(diff)
                    # nearest: a rounding tie flipped by float32 round-off swaps a whole voxel value
                    mismatch = (outs["fast"] != outs[other]).float().mean()
                    row[f"mismatch_fraction_fast_vs_{other}"] = float(mismatch)
                if not backward:  # exact answer: the reference in float64
                    exact = _call(impls["reference"], [x.double() for x in inputs], False).cpu()
                    for impl in ("fast", "reference"):
                        row[f"rel_err_{impl}_vs_float64"] = float((outs[impl] - exact).abs().max() / scale)
                row["speedup_vs_monai"] = round(row["monai_s"] / row["fast_s"], 2)
                row["speedup_vs_reference"] = round(row["reference_s"] / row["fast_s"], 2)
                row["repeats"] = repeats
                results.append(row)
                print(
                    f"{'x'.join(map(str, size)):>12} {op:<19} {row['pass']:<16} fast {row['fast_s']:8.3f} s  "
                    f"ref {row['reference_s']:8.3f} s  monai {row['monai_s']:8.3f} s  "
                    f"x{row['speedup_vs_monai']:.1f} vs monai  "
                    f"rel.diff {row['rel_diff_fast_vs_reference']:.1e} "
                    f"(vs float64: fast {row.get('rel_err_fast_vs_float64', float('nan')):.1e}, "
                    f"ref {row.get('rel_err_reference_vs_float64', float('nan')):.1e})",
                    flush=True,
                )
    return {"rows": results}


SECTIONS = {"core": section_core}


def _md_core(core: dict) -> list[str]:
    lines = [
        "| size | operation | pass | ours-fast s | ours-reference s | MONAI s | fast vs MONAI | fast vs ref "
        "| peak MiB fast / ref / MONAI | fast vs ref: max rel. diff (voxels differing) "
        "| max rel. error vs float64: fast / ref |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in core["rows"]:
        exact = (
            f"{r['rel_err_fast_vs_float64']:.1e} / {r['rel_err_reference_vs_float64']:.1e}"
            if "rel_err_fast_vs_float64" in r
            else "(forward)"
        )
        share = 100 * r["mismatch_fraction_fast_vs_reference"]
        mismatch = f" ({share:.2g} %)" if "nearest" in r["op"] else ""
        lines.append(
            f"| {'x'.join(map(str, r['size']))} | {r['op']} | {r['pass']} | {r['fast_s']:.3f} | "
            f"{r['reference_s']:.3f} | {r['monai_s']:.3f} | {r['speedup_vs_monai']:.1f}x | "
            f"{r['speedup_vs_reference']:.1f}x | {r['fast_peak_mib']:.0f} / {r['reference_peak_mib']:.0f} / "
            f"{r['monai_peak_mib']:.0f} | {r['rel_diff_fast_vs_reference']:.1e}{mismatch} | {exact} |"
        )
    return lines


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--section", nargs="+", default=["core"], choices=sorted(SECTIONS))
    parser.add_argument("--sizes", nargs="+", default=["160x192x224", "64x64x64"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--ss-repeats", type=int, default=1, help="scaling and squaring repeats at >= 100^3")
    parser.add_argument("--amplitude", type=float, default=3.0, help="field amplitude (voxels)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "speed"))
    parser.add_argument("--render", metavar="JSON", help="only rewrite the .md next to an existing JSON")
    args = parser.parse_args(argv)
    if args.render:
        report = json.loads(Path(args.render).read_text())
        write_markdown(report, Path(args.render).with_suffix(".md"))
        return
    args.sizes = [tuple(int(s) for s in size.split("x")) for size in args.sizes]
    device = torch.device(args.device)
    env = {
        "torch": torch.__version__,
        "numba": getattr(_fast.numba, "__version__", None),
        "numba_threading_layer": None,
        "torch_num_threads": torch.get_num_threads(),
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "cpu": platform.processor() or platform.machine(),
        "fast_available": _fast.available(),
        "note": "implementations interleaved per repeat on a shared machine; medians",
        "memory": "CUDA max_memory_allocated" if device.type == "cuda" else "peak VmRSS over entry (1 ms)",
    }
    settings = {k: (v if k != "sizes" else [list(s) for s in v]) for k, v in vars(args).items()}
    report = {"env": env, "args": settings}
    for name in args.section:
        report[name] = SECTIONS[name](args, device)
    if _fast.numba is not None:
        try:
            env["numba_threading_layer"] = _fast.numba.threading_layer()
        except ValueError:
            pass
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    write_markdown(report, out.with_suffix(".md"))
    print("wrote", out.with_suffix(".json"), out.with_suffix(".md"))


def write_markdown(report: dict, path: Path) -> None:
    env, sections = report["env"], report["args"]["section"]
    md = [
        f"# Speed ({', '.join(sections)})",
        "",
        f"`python benchmarks/speed.py --section {' '.join(sections)}` on {env['device']} "
        f"({env['cpu']}), torch {env['torch']} with {env['torch_num_threads']} threads, numba {env['numba']} "
        f"({env['numba_threading_layer']} layer). {env['note']}; memory: {env['memory']}.",
        "",
    ]
    if "core" in report:
        md += _md_core(report["core"])
    path.write_text("\n".join(md) + "\n")

if __name__ == "__main__":
    main()
