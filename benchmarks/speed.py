"""Speed benchmark (issue 15 items 1, 3-6): one command times, in one run, on the same real 3D pair
(``../shared/data/oasis3d_pair``, ``--data``; resampled to every ``--sizes`` entry):

- ``core``: the core operations against MONAI's (below);
- ``methods``: each network's registration (the inference path of ``register``: batch norm folded,
  ``inference_mode``), time, peak memory and Dice of the OASIS labels; RegNet also in its ``interpolate``
  dense mode (``regnet_interpolate``); the forward pass's GFLOP (``torch.utils.flop_counter`` on the meta
  device) and the rate the run sustained, beside one large 3D convolution's rate on the same device;
- ``training``: training iterations per second at ``--train-size`` (the bundle's network, loss and Adam);
- ``instance``: instance optimisation per pair (``--steps``), coarse to fine and the full-resolution loop at
  equal steps (time, peak memory, Dice);
- ``register``: ``regnet_zoo.register(..., instance_opt=--steps, affine=None)`` end to end on the pair's
  files (what ``regnet-zoo register --instance-opt`` runs; needs SimpleITK);
- ``classic``: SimpleITK B-spline and ANTs SyN (``regnet_zoo.baselines``) when importable.

``--section all`` runs every section. The networks carry the bundle's own trained weights, else the shipped
ones ("shipped weights" in the tables), else are freshly initialised (seed 0, "untrained (random init)": the
committed tables were measured before weights shipped); times do not depend on the weights' values, Dice does.
Without the OASIS pair a synthetic pair is used (said so in the output). ``--device cuda --amp`` runs the same
sections on a GPU (bfloat16 autocast of the networks' forward passes; losses, instance optimisation and the
core ops in float32; CUDA synchronised around every timer; memory = ``torch.cuda.max_memory_allocated``) and
writes ``speed_gpu.json`` / ``.md``. Sections not run keep their earlier results in the JSON (each with its
own environment and load average).

Core section: warp linear / nearest (border), ``compose_ddf``, scaling and squaring (7 steps), and the two
losses of an instance-optimisation step (``lncc_loss``, window 9, image vs the field's first channel, against
MONAI's ``LocalNormalizedCrossCorrelationLoss``; ``diffusion_loss`` against MONAI's ``DiffusionLoss``);
each as **ours-fast** (``core._fast`` numba kernels), **ours-reference** (the same functions with the fast
path off: ``grid_sample`` on a normalised grid) and **MONAI** (``monai.networks.blocks.Warp`` /
``DVF2DDF`` called as a user calls them; composition as ``b + Warp()(a, b)``), all with border padding;
forward, and forward + backward (gradients w.r.t. image and field). Inputs: the first image of the pair
(min-max normalised) at each size; a smooth synthetic field (random 5^3 control values upsampled
trilinearly, displacements of a few voxels), used as the DDF, as both arguments of the composition and as
the SVF.

Times are medians over ``--repeats`` runs, with the three implementations interleaved in each repeat (the
machine may be shared: interleaving exposes all three to the same load). Memory: on CPU the peak resident
set above the level before the call, sampled every millisecond by a thread (``/proc/self/status`` VmRSS;
large tensors are mmapped and returned on free, so this follows the allocator's large blocks; tracemalloc
does not see torch's allocations); on CUDA ``torch.cuda.max_memory_allocated``. Usage::

    python benchmarks/speed.py --section all [--sizes 160x192x224 64x64x64] [--device cuda --amp]

Writes ``benchmarks/results/speed.json`` and ``speed.md`` (``--out`` stem).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
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

    paths = sorted((DATA / "imagesTr").glob("*.nii*"))
    if not paths:  # no OASIS data (e.g. on a GPU machine): the synthetic pair's fixed image
        return _synthetic_pair(size)["fixed"]
    path = paths[0]
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
    from monai.losses import DiffusionLoss, LocalNormalizedCrossCorrelationLoss
    from monai.networks.blocks import DVF2DDF, Warp

    from regnet_zoo.core.losses import diffusion_loss, lncc_loss

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
    lncc = lambda im, d, d2: lncc_loss(im, d[:, :1])  # noqa: E731
    diffusion = lambda im, d, d2: diffusion_loss(d)  # noqa: E731
    m_lncc = LocalNormalizedCrossCorrelationLoss(spatial_dims=3, kernel_size=9)
    m_diff = lambda im, d, d2: DiffusionLoss()(d)  # noqa: E731
    return {
        "warp_linear": {"fast": warp_lin, "reference": ref(warp_lin), "monai": lambda im, d, _: m_lin(im, d)},
        "warp_nearest": {"fast": warp_near, "reference": ref(warp_near), "monai": lambda i, d, _: m_nn(i, d)},
        "compose": {"fast": compose, "reference": ref(compose), "monai": lambda _, d, d2: d2 + m_lin(d, d2)},
        "scaling_squaring_7": {"fast": ss, "reference": ref(ss), "monai": lambda _, d, d2: m_ss(d)},
        # the losses of an instance-optimisation step (image vs the field's first channel as a second image);
        # "reference" is what runs without the fast path: MONAI's LNCC, and MONAI's DiffusionLoss
        "lncc_9": {"fast": lncc, "reference": ref(lncc), "monai": lambda im, d, _: m_lncc(im, d[:, :1])},
        "diffusion": {"fast": diffusion, "reference": m_diff, "monai": m_diff},
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


# --------------------------------------------------------------------------------------------------------
# per-method sections (methods, training, instance, register, classic): one pair, the same at every size
# --------------------------------------------------------------------------------------------------------
METHODS = ("pwc", "regnet", "ddrnet", "bspline_unet", "discrete_corr")
#: the methods section's extra rows: RegNet's dense inference at even voxels only (``dense_mode``
#: "interpolate", the bundle's faster option), against its default exact mode
VARIANTS = {"regnet_interpolate": ("regnet", {"dense_mode": "interpolate"})}
#: methods whose transform parameters are a DDF / SVF on the image grid (identity = zeros)
DENSE_PARAMETERS = ("pwc", "regnet", "ddrnet")
PAIR_FILES = ("OASIS_0001_0000.nii.gz", "OASIS_0002_0000.nii.gz")


def _synthetic_pair(size: tuple[int, ...], seed: int = 0) -> dict:
    """Fallback when the OASIS pair is absent: smooth random images, the moving one warped by a smooth field
    of a few voxels; labels = intensity quartiles of each image (4 classes). Clearly not a brain."""
    from regnet_zoo.core.spatial import warp_image

    fixed = smooth_field(size, 1.0, seed)[:, :1]
    fixed = (fixed - fixed.min()) / (fixed.max() - fixed.min())
    moving = warp_image(fixed, smooth_field(size, 3.0, seed + 1))
    labels = [torch.bucketize(x, torch.quantile(x.flatten()[::97], torch.tensor([0.25, 0.5, 0.75])))
              for x in (fixed, moving)]
    return {"fixed": fixed, "moving": moving, "fixed_label": labels[0].float(),
            "moving_label": labels[1].float(),
            "evaluation": [1, 2, 3], "source": "synthetic (smooth random images, no OASIS data found)"}


def load_pair(size: tuple[int, ...], data: Path) -> dict:
    """The OASIS pair at ``size``: ``fixed``, ``moving`` ``(1, 1, *size)`` min-max normalised (trilinear
    resampling), ``fixed_label`` / ``moving_label`` (nearest), the dataset's ``evaluation`` labels; the
    synthetic pair when ``data`` lacks the files."""
    import nibabel as nib

    images = [data / "imagesTr" / name for name in PAIR_FILES]
    labels = [data / "labelsTr" / name for name in PAIR_FILES]
    if not all(p.is_file() for p in images + labels):
        print(f"no OASIS pair under {data}: using a SYNTHETIC pair", flush=True)
        return _synthetic_pair(size)
    out = {}
    for key, path, mode in [("fixed", images[0], "trilinear"), ("moving", images[1], "trilinear"),
                            ("fixed_label", labels[0], "nearest"), ("moving_label", labels[1], "nearest")]:
        arr = torch.from_numpy(np.asarray(nib.load(str(path)).dataobj, dtype=np.float32))[None, None]
        if mode == "trilinear":
            arr = (arr - arr.min()) / (arr.max() - arr.min())
        if tuple(arr.shape[2:]) != size:
            kwargs = {"align_corners": True} if mode == "trilinear" else {}
            arr = F.interpolate(arr, size=size, mode=mode, **kwargs)
        out[key] = arr.contiguous()
    dataset = data / "dataset.json"
    evaluation = json.loads(dataset.read_text()).get("evaluation_labels") if dataset.is_file() else None
    values = torch.unique(out["fixed_label"]).long().tolist()
    out["evaluation"] = [int(v) for v in evaluation] if evaluation else [v for v in values if v != 0]
    out["source"] = f"OASIS pair {PAIR_FILES[0]} (fixed) / {PAIR_FILES[1]} (moving) from {data}"
    return out


def mean_dice(pair: dict, ddf: torch.Tensor) -> float:
    """Mean Dice over the evaluation labels present in both maps; the moving labels warped by nearest."""
    from regnet_zoo.core.metrics import dice_per_label
    from regnet_zoo.core.spatial import warp_labels

    warped = warp_labels(pair["moving_label"], ddf.detach().float().cpu())
    dice = dice_per_label(pair["fixed_label"][0, 0].numpy(), warped[0, 0].numpy(), pair["evaluation"],
                          pair["moving_label"][0, 0].numpy())
    return float(np.nanmean(list(dice.values())))


def _instance_module():
    """``regnet_zoo.api.instance``; where SimpleITK is missing (``regnet_zoo.api`` imports it, the instance
    module does not) the module file is loaded on its own."""
    try:
        from regnet_zoo.api import instance
    except ImportError:
        import importlib.util

        spec = importlib.util.spec_from_file_location(
            "regnet_zoo_api_instance", ROOT / "regnet_zoo" / "api" / "instance.py"
        )
        instance = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(instance)
    return instance


def bundle_network(method: str, device: torch.device, train: bool = False) -> tuple[torch.nn.Module, str]:
    """The bundle's 3D ``network_def`` with its shipped weights if any, else random init (seed 0); eval
    mode with batch norm folded (the inference path of ``register``) unless ``train``. ``method`` may name
    a :data:`VARIANTS` entry."""
    method, attributes = VARIANTS.get(method, (method, {}))
    from regnet_zoo.bundle import bundle_parser, load_bundle_weights
    from regnet_zoo.networks.inference import fold_batch_norm

    torch.manual_seed(0)
    weights = "untrained (random init)"
    try:
        network = load_bundle_weights(method, None, "cpu", spatial_dims=3)[0]
        from regnet_zoo.pretrained import default_weights, pretrained_dir

        shipped = default_weights(method, 3).resolve().parent == pretrained_dir().resolve()
        weights = "shipped weights" if shipped else "trained (bundle weights)"
    except (FileNotFoundError, RuntimeError, ValueError, KeyError):  # no (usable) weights: random init
        torch.manual_seed(0)
        network = bundle_parser(method, "train", spatial_dims=3).get_parsed_content("network_def")
    for key, value in attributes.items():
        setattr(network, key, value)
    network = network.to(device)
    return (network.train(), weights) if train else (fold_batch_norm(network.eval()), weights)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _amp(args, device):
    """Autocast for the networks' forward passes under ``--amp`` (bfloat16: no loss scaling needed)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bool(args.amp))


def measure(fn, device: torch.device):
    """``(wall s, process CPU s, peak bytes, result)`` of ``fn()``: peak = CUDA allocator peak above the
    level at entry on a GPU, else peak VmRSS above entry (the sampler of the core section)."""
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        wall, cpu = time.perf_counter(), time.process_time()
        out = fn()
        _sync(device)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        return wall, cpu, torch.cuda.max_memory_allocated(device) - before, out
    with PeakRSS() as meter:
        wall, cpu = time.perf_counter(), time.process_time()
        out = fn()
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return wall, cpu, meter.bytes, out


def _pairs(args, device) -> dict:
    if not hasattr(args, "_pairs"):
        args._pairs = {size: load_pair(size, Path(args.data)) for size in args.sizes}
    return args._pairs


def _attempt(context: dict, function, *args) -> dict:
    """``function(*args)``'s row, or ``context`` with the error (one method failing must not end the run)."""
    try:
        return {**function(*args), "measured": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    except (RuntimeError, ValueError, KeyError, TypeError, MemoryError) as err:
        print(f"FAILED {context}: {type(err).__name__}: {err}", flush=True)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return {**context, "error": f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"}


def _load() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def forward_gflop(network: torch.nn.Module, size: tuple[int, ...]) -> float | None:
    """Floating-point operations (GFLOP; a multiply-add counts 2) of one forward pass at ``size``, counted by
    ``torch.utils.flop_counter`` on a copy on the meta device (no data, no time): convolutions and matrix
    products, which is where these networks' work lies. ``None`` where a network does not run on meta."""
    from torch.utils.flop_counter import FlopCounterMode

    try:
        meta = copy.deepcopy(network).to("meta")
        image = torch.empty(1, 1, *size, device="meta")
        with torch.inference_mode(), FlopCounterMode(display=False) as counter:
            meta(image, image)
        return round(counter.get_total_flops() / 1e9, 3)
    except (RuntimeError, NotImplementedError, TypeError):
        return None


def _method_row(args, device, pair: dict, size: tuple[int, ...], method: str) -> dict:
    fixed, moving = pair["fixed"].to(device), pair["moving"].to(device)
    network, weights = bundle_network(method, device)
    gflop = forward_gflop(network, size)

    def forward():
        with torch.inference_mode(), _amp(args, device):
            return network(fixed, moving)["ddf"].float()

    warm = min(size) < 100 or device.type == "cuda"  # one slow CPU run at large sizes
    if warm:
        forward()  # warm-up (allocator, oneDNN primitives / cuDNN autotuning)
    runs = [measure(forward, device) for _ in range(args.method_repeats if warm else 1)]
    ddf = runs[-1][3]
    row = {
        "size": list(size), "method": method, "weights": weights,
        "seconds": statistics.median(r[0] for r in runs),
        "cpu_seconds": statistics.median(r[1] for r in runs),
        "peak_mib": round(max(r[2] for r in runs) / 2**20, 1),
        "runs": len(runs), "dice": mean_dice(pair, ddf),
        "dice_identity": pair.setdefault("dice_identity", mean_dice(pair, torch.zeros_like(ddf))),
        "load": _load(), "gflop": gflop,
    }
    if gflop is not None:  # the rate the run sustained: how far the time is from the arithmetic alone
        row["gflop_per_second"] = round(gflop / row["seconds"], 2)
    print(f"methods {'x'.join(map(str, size)):>12} {method:<18} {row['seconds']:8.2f} s "
          f"(cpu {row['cpu_seconds']:.1f} s) peak {row['peak_mib']:.0f} MiB  Dice {row['dice']:.3f}",
          flush=True)
    return row


def section_methods(args, device) -> dict:
    """Each network's registration (forward, the inference path of ``register``) on the pair at every size:
    time (median of ``--method-repeats`` after a warm-up; on CPU one run at sizes from 100^3),
    peak memory, Dice of the 30 OASIS labels."""
    rows = []
    for size in args.sizes:
        pair = _pairs(args, device)[size]
        for method in args.methods:
            context = {"size": list(size), "method": method}
            rows.append(_attempt(context, _method_row, args, device, pair, size, method))
    sources = {"x".join(map(str, s)): p["source"] for s, p in _pairs(args, device).items()}
    return {"rows": rows, "pair": sources, "reference_conv3d": reference_conv3d_rate(device)}


def reference_conv3d_rate(device: torch.device, repeats: int = 5) -> dict:
    """GFLOP/s of one large float32 3D convolution (RegNet's 60 -> 70 channel 3^3 layer on a 40x48x56
    input; oneDNN / cuDNN, after a warm-up, median): a yardstick for the networks' GFLOP/s."""
    layer = torch.nn.Conv3d(60, 70, 3).to(device).eval()
    x = torch.rand(1, 60, 40, 48, 56, device=device)
    gflop = 2 * 60 * 70 * 27 * 38 * 46 * 54 / 1e9
    with torch.inference_mode():
        layer(x)
        times = []
        for _ in range(repeats):
            _sync(device)
            start = time.perf_counter()
            layer(x)
            _sync(device)
            times.append(time.perf_counter() - start)
    return {"layer": "Conv3d(60, 70, 3) on 1x60x40x48x56", "gflop": round(gflop, 2),
            "gflop_per_second": round(gflop / statistics.median(times), 1)}


def _training_batch(pair: dict, device: torch.device) -> dict:
    """The bundle trainers' batch keys; RegNet's supervision (``ddf_gt``) is a smooth synthetic field."""
    size = tuple(pair["fixed"].shape[2:])
    batch = {k: pair[k].to(device) for k in ("fixed", "moving", "fixed_label", "moving_label")}
    batch["ddf_gt"] = smooth_field(size, 2.0, 3).to(device)
    return batch


def _training_row(args, device, batch: dict, method: str) -> dict:
    from regnet_zoo.bundle import bundle_parser

    size = tuple(batch["fixed"].shape[2:])
    network, _ = bundle_network(method, device, train=True)
    parser = bundle_parser(method, "train", spatial_dims=3)
    loss_fn = parser.get_parsed_content("loss")
    loss_fn = loss_fn.to(device) if isinstance(loss_fn, torch.nn.Module) else loss_fn
    optimizer = torch.optim.Adam(network.parameters(), lr=float(parser.get("learning_rate", 1e-3)))

    def iteration():
        optimizer.zero_grad(set_to_none=True)
        with _amp(args, device):
            outputs = network(batch["fixed"], batch["moving"])
        outputs = {k: v.float() if torch.is_tensor(v) and v.is_floating_point() else v
                   for k, v in outputs.items()}
        loss = loss_fn(outputs, batch)["loss"]  # in float32 (LNCC / NCC need the precision)
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    _, _, peak, first = measure(iteration, device)  # also the warm-up
    times = [measure(iteration, device)[:2] for _ in range(args.train_iters)]
    wall = statistics.median(t[0] for t in times)
    row = {"size": list(size), "method": method, "iterations": args.train_iters,
           "seconds_per_iteration": wall, "iterations_per_second": 1.0 / wall,
           "cpu_seconds_per_iteration": statistics.median(t[1] for t in times),
           "peak_mib": round(peak / 2**20, 1), "first_loss": first, "load": _load()}
    print(f"training {'x'.join(map(str, size))} {method:<14} {row['iterations_per_second']:.3f} it/s "
          f"({wall:.2f} s/it) peak {row['peak_mib']:.0f} MiB", flush=True)
    return row


def section_training(args, device) -> dict:
    """Training iterations per second of each method at ``--train-size`` (batch 1, the bundle's
    ``network_def`` / ``loss`` / Adam at its learning rate): ``--train-iters`` timed iterations after one
    warm-up, peak memory of one iteration (the warm-up). RegNet trains on crops of >= 54^3 voxels."""
    size = args.train_size
    pair = load_pair(size, Path(args.data))
    batch = _training_batch(pair, device)
    rows = []
    for method in [m for m in args.methods if m in METHODS]:
        context = {"size": list(size), "method": method}
        rows.append(_attempt(context, _training_row, args, device, batch, method))
    return {"rows": rows, "pair": pair["source"]}


def _instance_row(args, device, instance, pair: dict, size: tuple[int, ...], method: str) -> dict:
    fixed, moving = pair["fixed"].to(device), pair["moving"].to(device)
    network, weights = bundle_network(method, device)
    loss_fn, lr = instance.bundle_instance_loss(method, 3, device)
    start = "network output"
    with torch.inference_mode():
        if args.instance_start == "identity" and method in DENSE_PARAMETERS:  # skips a slow CPU forward
            outputs = network.outputs_from_parameters(fixed.new_zeros(1, 3, *size), fixed, moving)
            start = "identity"
        else:
            outputs = network(fixed, moving)
    row = {"size": list(size), "method": method, "weights": weights, "steps": args.steps, "lr": lr,
           "start": start,
           "schedule": instance.instance_schedule(tuple(size), args.steps),
           "dice_start": mean_dice(pair, outputs["ddf"])}
    loops = [("coarse_to_fine", True)]
    if list(size) in [list(s) for s in args.full_loop_sizes]:
        loops.append(("full_resolution", False))
    for name, c2f in loops:
        def run(c2f=c2f):
            with torch.enable_grad():
                return instance.instance_optimise(
                    network, loss_fn, outputs, fixed, moving, args.steps, lr, coarse_to_fine=c2f
                )

        wall, cpu, peak, tuned = measure(run, device)
        row.update({f"{name}_s": wall, f"{name}_cpu_s": cpu, f"{name}_peak_mib": round(peak / 2**20, 1),
                    f"{name}_dice": mean_dice(pair, tuned["ddf"])})
    row["load"] = _load()
    full = f"  full-res {row['full_resolution_s']:.1f} s Dice {row['full_resolution_dice']:.3f}" if (
        "full_resolution_s" in row) else ""
    print(f"instance {'x'.join(map(str, size)):>12} {method:<14} c2f {row['coarse_to_fine_s']:.1f} s "
          f"Dice {row['dice_start']:.3f} -> {row['coarse_to_fine_dice']:.3f}{full}", flush=True)
    return row


def section_instance(args, device) -> dict:
    """``--steps`` instance-optimisation steps per method and size from the network's output: coarse to
    fine (``register``'s default) and, at the sizes of ``--full-loop-sizes``, the full-resolution loop at
    equal steps; time, peak memory, Dice before and after. Float32 (the losses need it)."""
    instance = _instance_module()
    rows = []
    for size in args.sizes:
        pair = _pairs(args, device)[size]
        for method in args.instance_methods:
            context = {"size": list(size), "method": method}
            rows.append(_attempt(context, _instance_row, args, device, instance, pair, size, method))
    return {"rows": rows}


def _register_row(args, device, files: list[Path], labels: list[Path], method: str, grid: str) -> dict:
    import tempfile

    from regnet_zoo.api import register
    from regnet_zoo.api.pipeline import check_inputs, initial_metrics, warp_and_evaluate
    from regnet_zoo.pretrained import weights_file

    network, weights = bundle_network(method, torch.device("cpu"), train=True)
    with tempfile.TemporaryDirectory() as folder:
        path = None  # what `regnet-zoo register` uses by default: the shipped weights (with their settings)
        if not weights_file(method, 3).is_file():
            path = Path(folder) / "model.pt"
            torch.save(network.state_dict(), path)
        wall, cpu, peak, result = measure(
            lambda: register(files[0], files[1], method=method, weights=path, device=str(device),
                             instance_opt=args.steps, affine=None, instance_grid=grid),
            device,
        )
    # the labels' metrics after the timing (their HD95 at 160x192x224 costs more than the registration)
    pair = check_inputs(files[0], files[1], labels[0], labels[1])
    metrics = {**warp_and_evaluate(pair, result.ddf_voxel)[2], **initial_metrics(pair),
               "stage_s": result.metrics.get("stage_s")}
    row = {"method": method, "weights": weights, "steps": args.steps, "instance_grid": grid, "seconds": wall,
           "cpu_seconds": cpu, "peak_mib": round(peak / 2**20, 1), "stage_s": metrics.get("stage_s"),
           "dice": metrics.get("dice_mean"), "dice_identity": metrics.get("dice_mean_initial"),
           "folding_percent": metrics.get("folding_percent"), "sdlogj": metrics.get("sdlogj"),
           "size": list(result.ddf_deformable.shape[1:]), "load": _load()}
    print(f"register --instance-opt {args.steps} --instance-grid {grid} {method:<14} {wall:.1f} s "
          f"(cpu {cpu:.1f} s) Dice {row['dice']:.3f}", flush=True)
    return row


def section_register(args, device) -> dict:
    """``regnet_zoo.register(..., instance_opt=--steps, affine=None)`` (what ``regnet-zoo register
    --instance-opt`` runs) on the pair's files at their own size, per method of ``--instance-methods``:
    total time and the stage times. Needs SimpleITK and the real pair; skipped otherwise."""
    data = Path(args.data)
    files = [data / "imagesTr" / name for name in PAIR_FILES]
    try:
        from regnet_zoo.api import register  # noqa: F401
    except ImportError as err:
        return {"skipped": f"regnet_zoo.api not importable ({err})"}
    if not all(f.is_file() for f in files + [data / "labelsTr" / name for name in PAIR_FILES]):
        return {"skipped": f"no OASIS pair under {data}"}
    labels = [data / "labelsTr" / name for name in PAIR_FILES]
    rows = [_attempt({"method": method, "instance_grid": grid}, _register_row, args, device, files, labels,
                     method, grid)
            for method in args.instance_methods for grid in args.instance_grids]
    return {"rows": rows}


def _classic_row(function, pair: dict, name: str, size: tuple[int, ...]) -> dict:
    wall, cpu, peak, ddf = measure(lambda: function(pair["fixed"], pair["moving"]), torch.device("cpu"))
    row = {"size": list(size), "method": name, "seconds": wall, "cpu_seconds": cpu,
           "peak_mib": round(peak / 2**20, 1), "dice": mean_dice(pair, ddf[None]), "load": _load()}
    print(f"classic {'x'.join(map(str, size)):>12} {name:<14} {wall:8.1f} s  Dice {row['dice']:.3f}",
          flush=True)
    return row


def section_classic(args, device) -> dict:
    """SimpleITK B-spline (``regnet_zoo.baselines.sitk_bspline``, its defaults) and ANTs SyN
    (``ants_syn``) on the pair at every size (CPU; skipped when not importable): time, Dice."""
    try:
        from regnet_zoo import baselines
    except ImportError as err:
        return {"skipped": f"SimpleITK not importable ({err})"}
    rows, skipped = [], {}
    runners = {"sitk_bspline": baselines.sitk_bspline}
    if baselines.ants_available():
        runners["ants_syn"] = baselines.ants_syn
    else:
        skipped["ants_syn"] = "antspyx not importable"
    for size in args.sizes:
        pair = _pairs(args, device)[size]
        for name in args.classic:
            if name not in runners:
                continue
            context = {"size": list(size), "method": name}
            rows.append(_attempt(context, _classic_row, runners[name], pair, name, size))
    return {"rows": rows, "skipped": skipped}


SECTIONS = {  # the order of --section all: the per-method results first
    "methods": section_methods,
    "instance": section_instance,
    "training": section_training,
    "core": section_core,
    "register": section_register,
    "classic": section_classic,
}


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


def _sizes(values: list[str]) -> list[tuple[int, ...]]:
    return [tuple(int(s) for s in size.split("x")) for size in values]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--section", nargs="+", default=["core"], choices=sorted(SECTIONS) + ["all"],
                        help="all: every section (core methods training instance register classic)")
    parser.add_argument("--sizes", nargs="+", default=["160x192x224", "64x64x64"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--ss-repeats", type=int, default=1, help="scaling and squaring repeats at >= 100^3")
    parser.add_argument("--amplitude", type=float, default=3.0, help="field amplitude (voxels)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--amp", action="store_true", help="autocast (bfloat16) the networks' forward passes")
    parser.add_argument("--data", help="the OASIS pair folder (default ../shared/data/oasis3d_pair; "
                        "a synthetic pair if absent)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS) + list(VARIANTS),
                        choices=list(METHODS) + list(VARIANTS),
                        help="methods section (training: no variants)")
    parser.add_argument("--method-repeats", type=int, default=3, help="methods section repeats under 100^3")
    parser.add_argument("--train-size", default="64x64x64")
    parser.add_argument("--train-iters", type=int, default=3, help="timed training iterations per method")
    parser.add_argument("--instance-methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--steps", type=int, default=20, help="instance-optimisation steps")
    parser.add_argument("--instance-grids", nargs="+", default=["input", "network"],
                        choices=["input", "network"],
                        help="register section: register's instance_grid values to time")
    parser.add_argument("--instance-start", choices=["network", "identity"], default="network",
                        help="instance section's start: the network's output, or (dense methods) the "
                        "identity (no forward pass: for slow CPU runs with untrained networks)")
    parser.add_argument("--full-loop-sizes", nargs="*", default=None,
                        help="sizes at which the full-resolution instance loop runs too (default: all)")
    parser.add_argument("--classic", nargs="*", default=["sitk_bspline", "ants_syn"],
                        choices=["sitk_bspline", "ants_syn"])
    parser.add_argument("--out", default=None,
                        help="output stem (default benchmarks/results/speed, speed_gpu on CUDA)")
    parser.add_argument("--render", metavar="JSON", help="only rewrite the .md next to an existing JSON")
    parser.add_argument("--merge", nargs="+", metavar="JSON",
                        help="only merge the per-method sections of other runs' JSON into --out (rows by "
                        "size and method, each keeping its own load and time)")
    args = parser.parse_args(argv)
    if args.render:
        report = json.loads(Path(args.render).read_text())
        write_markdown(report, Path(args.render).with_suffix(".md"))
        return
    if args.merge:
        out = Path(args.out or ROOT / "benchmarks" / "results" / "speed").with_suffix(".json")
        report = json.loads(out.read_text()) if out.is_file() else {}
        for other in args.merge:
            for name, section in json.loads(Path(other).read_text()).items():
                if name in _MD_SECTIONS:
                    report[name] = _merge_rows(report.get(name), section)
        out.write_text(json.dumps(report, indent=1) + "\n")
        write_markdown(report, out.with_suffix(".md"))
        return
    global DATA
    DATA = Path(args.data) if args.data else DATA  # the core section reads its image from here too
    args.data = str(DATA)
    if "all" in args.section:
        args.section = list(SECTIONS)
    args.sizes = _sizes(args.sizes)
    args.train_size = _sizes([args.train_size])[0]
    args.full_loop_sizes = args.sizes if args.full_loop_sizes is None else _sizes(args.full_loop_sizes)
    device = torch.device(args.device)
    if device.type == "cpu":
        try:  # regnet_zoo.api needs SimpleITK
            from regnet_zoo.api.methods import use_all_cores

            use_all_cores()
        except ImportError:
            pass
    else:
        torch.backends.cudnn.benchmark = True
    env = {
        "torch": torch.__version__,
        "numba": getattr(_fast.numba, "__version__", None),
        "numba_threading_layer": None,
        "torch_num_threads": torch.get_num_threads(),
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "fast_available": _fast.available(),
        "amp": "bfloat16 autocast of the networks' forward passes" if args.amp else None,
        "note": "implementations interleaved per repeat on a shared machine; medians",
        "memory": "CUDA max_memory_allocated" if device.type == "cuda" else "peak VmRSS over entry (1 ms)",
    }
    settings = {
        k: [list(s) for s in v] if k in ("sizes", "full_loop_sizes") else list(v) if k == "train_size" else v
        for k, v in vars(args).items()
    }
    default = "speed_gpu" if device.type == "cuda" else "speed"
    stem = args.out or str(ROOT / "benchmarks" / "results" / default)
    out = Path(stem).with_suffix(".json")
    # sections not run this time keep their earlier results (each new section carries its own env / args;
    # the top-level env / args belong to the core section)
    for name in args.section:
        load_start = _load()
        result = SECTIONS[name](args, device)
        # read again just before writing: another run may have written other sections meanwhile
        report = json.loads(out.read_text()) if out.is_file() else {}
        if _fast.numba is not None:
            try:
                env["numba_threading_layer"] = _fast.numba.threading_layer()
            except ValueError:
                pass
        if name == "core":
            report.update(env=dict(env), args={**settings, "section": ["core"]}, core=result)
        else:
            result.update(env={**env, "load_average_start": load_start, "load_average_end": _load()},
                          args=settings)
            report[name] = _merge_rows(report.get(name), result)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=1) + "\n")  # after every section: a crash keeps the rest
        write_markdown(report, out.with_suffix(".md"))
    print("wrote", out, out.with_suffix(".md"))


def _merge_rows(earlier: dict | None, result: dict) -> dict:
    """``result`` plus the rows of an ``earlier`` run of the section at (size, method) pairs not measured
    now (each row keeps its own load average and ``measured`` time)."""
    if not earlier or "rows" not in result:
        return result
    key = lambda row: (tuple(row.get("size", ())), row["method"])  # noqa: E731
    now = {key(row) for row in result["rows"]}
    kept = [row for row in earlier.get("rows", []) if key(row) not in now]
    if kept:
        result["rows"] = kept + result["rows"]
        result["merged"] = True
        if isinstance(earlier.get("pair"), dict) and isinstance(result.get("pair"), dict):
            result["pair"] = {**earlier["pair"], **result["pair"]}
    return result


def _md_env(env: dict, args: dict, name: str) -> str:
    amp = " --amp" if args.get("amp") else ""
    return (
        f"`python benchmarks/speed.py --section {name} --device {args.get('device', 'cpu')}{amp}` on "
        f"{env['device']} ({env['cpu']}, {env.get('cpu_count')} cores), torch {env['torch']} with "
        f"{env['torch_num_threads']} threads; memory: {env['memory']}; load average "
        f"{env.get('load_average_start')} -> {env.get('load_average_end')}."
    )


def _size(row: dict) -> str:
    return "x".join(map(str, row["size"]))


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def _md_methods(sec: dict) -> list[str]:
    header = ["size", "method", "weights", "seconds", "CPU seconds", "peak MiB", "Dice (identity)", "GFLOP",
              "GFLOP/s"]  # fmt: skip
    lines = _table(header, [
        [_size(r), r["method"], r["weights"], f"{r['seconds']:.2f}", f"{r['cpu_seconds']:.1f}",
         f"{r['peak_mib']:.0f}", f"{r['dice']:.3f} ({r['dice_identity']:.3f})",
         f"{r['gflop']:.0f}" if r.get("gflop") is not None else "-",
         f"{r['gflop_per_second']:.0f}" if r.get("gflop_per_second") is not None else "-"]
        for r in sec["rows"]
    ])
    rate = sec.get("reference_conv3d")
    if rate:
        lines += ["", f"Reference rate of this device on one large 3D convolution ({rate['layer']}, "
                      f"float32, the run's threads): {rate['gflop_per_second']:.0f} GFLOP/s. A row's GFLOP "
                      "divided by it is about the least time its arithmetic alone can take here."]
    return lines


def _md_training(sec: dict) -> list[str]:
    header = ["size", "method", "iterations/s", "s / iteration", "CPU s / iteration", "peak MiB"]
    return _table(header, [
        [_size(r), r["method"], f"{r['iterations_per_second']:.3f}", f"{r['seconds_per_iteration']:.2f}",
         f"{r['cpu_seconds_per_iteration']:.2f}", f"{r['peak_mib']:.0f}"]
        for r in sec["rows"]
    ])


def _md_instance(sec: dict) -> list[str]:
    header = ["size", "method", "steps", "schedule (factor, steps)", "coarse-to-fine s (CPU s)",
              "full-resolution s (CPU s)", "Dice: start -> coarse-to-fine / full-resolution",
              "peak MiB c2f / full"]
    rows = []
    for r in sec["rows"]:
        full = "full_resolution_s" in r
        start = " (from identity)" if r.get("start") == "identity" else ""
        rows.append([
            _size(r), r["method"] + start, str(r["steps"]), str(r["schedule"]),
            f"{r['coarse_to_fine_s']:.1f} ({r['coarse_to_fine_cpu_s']:.1f})",
            f"{r['full_resolution_s']:.1f} ({r['full_resolution_cpu_s']:.1f})" if full else "-",
            f"{r['dice_start']:.3f} -> {r['coarse_to_fine_dice']:.3f} / "
            + (f"{r['full_resolution_dice']:.3f}" if full else "-"),
            f"{r['coarse_to_fine_peak_mib']:.0f} / "
            + (f"{r['full_resolution_peak_mib']:.0f}" if full else "-"),
        ])
    return _table(header, rows)


def _md_register(sec: dict) -> list[str]:
    def dice(r):
        if r.get("dice") is None:
            return "-"
        start = f" ({r['dice_identity']:.3f})" if r.get("dice_identity") is not None else ""
        return f"{r['dice']:.3f}{start}"

    def fmt(value, spec):
        return "-" if value is None else format(value, spec)

    rows = [
        [_size(r), r["method"], r.get("weights", "-"), str(r["steps"]), r.get("instance_grid", "network"),
         f"{r['seconds']:.1f} ({r['cpu_seconds']:.1f})", dice(r), fmt(r.get("folding_percent"), ".3f"),
         fmt(r.get("sdlogj"), ".2f"), ", ".join(f"{k}: {v:.1f}" for k, v in (r.get("stage_s") or {}).items())]
        for r in sec["rows"] if "error" not in r
    ]
    return _table(["size", "method", "weights", "steps", "instance grid", "total s (CPU s)",
                   "Dice (identity)", "folding %", "SDlogJ", "stages s"], rows)


def _md_classic(sec: dict) -> list[str]:
    rows = [
        [_size(r), r["method"], f"{r['seconds']:.1f}", f"{r['cpu_seconds']:.1f}", f"{r['peak_mib']:.0f}",
         f"{r['dice']:.3f}"]
        for r in sec["rows"]
    ]
    return _table(["size", "method", "seconds", "CPU seconds", "peak MiB", "Dice"], rows)


def _md_goals(report: dict) -> list[str]:
    """The issue's goals against the measured rows (wall seconds; the same run where possible)."""
    def measured(name):
        return {(_size(r), r["method"]): r for r in report.get(name, {}).get("rows", []) if "error" not in r}

    methods, classic = measured("methods"), measured("classic")
    lines = []
    for (size, name), ref in sorted(classic.items()):
        if name != "sitk_bspline":
            continue
        for (msize, method), r in sorted(methods.items()):
            if msize == size:  # CPU seconds: the load-independent measure where runs saw different loads
                ratio = ref["seconds"] / r["seconds"]
                cpu = ref["cpu_seconds"] / max(r["cpu_seconds"], 1e-9)
                lines.append(f"- {size}: {method} {ratio:.1f}x (wall) / {cpu:.1f}x (CPU seconds) faster than "
                             f"SimpleITK B-spline ({'met' if min(ratio, cpu) >= 50 else 'NOT met'}: "
                             "goal >= 50x)")
    if ("64x64x64", "pwc") in methods:
        r = methods[("64x64x64", "pwc")]
        s = r["seconds"]
        lines.append(f"- PWC at 64^3: {s:.2f} s wall, {r['cpu_seconds']:.1f} CPU seconds "
                     f"({'met' if s <= 4.83 else 'NOT met'}: paper 4.83 s on a CPU)")
    if ("160x192x224", "regnet") in methods:
        r = methods[("160x192x224", "regnet")]
        s = r["seconds"]
        lines.append(f"- RegNet dense 160x192x224: {s:.1f} s wall, {r['cpu_seconds']:.1f} CPU seconds "
                     f"({'met' if s < 60 else 'NOT met'}: goal < 60 s)")
    return lines


_MD_SECTIONS = {
    "methods": ("Registration per method (network forward, the inference path of `register`)", _md_methods),
    "training": ("Training iterations per second (batch 1)", _md_training),
    "instance": ("Instance optimisation per pair (from the network's output; float32)", _md_instance),
    "register": ("`regnet-zoo register --instance-opt` end to end (API, affine off)", _md_register),
    "classic": ("Classic baselines on the same pair", _md_classic),
}


def write_markdown(report: dict, path: Path) -> None:
    md = ["# Speed", ""]
    if "core" in report:
        env, sections = report["env"], report["args"]["section"]
        md += [
            f"## Core operations ({', '.join(sections)})",
            "",
            f"`python benchmarks/speed.py --section {' '.join(sections)}` on {env['device']} "
            f"({env['cpu']}), torch {env['torch']} with {env['torch_num_threads']} threads, "
            f"numba {env['numba']} ({env['numba_threading_layer']} layer). {env['note']}; "
            f"memory: {env['memory']}.",
            "",
        ]
        md += _md_core(report["core"]) + [""]
    for name, (title, render) in _MD_SECTIONS.items():
        sec = report.get(name)
        if sec is None:
            continue
        md += [f"## {title}", "", _md_env(sec["env"], sec["args"], name), ""]
        if sec.get("merged"):
            md += ["Rows from several runs (`--merge`); each row's time and load average are in the JSON.",
                   ""]
        if sec.get("pair"):
            md += [f"Pair: {sec['pair']}.", ""]
        if sec.get("skipped") and not sec.get("rows"):
            md += [f"Skipped: {sec['skipped']}.", ""]
            continue
        rows = sec.get("rows", [])
        md += render({**sec, "rows": [r for r in rows if "error" not in r]}) + [""]
        md += [f"- {r.get('size', '')} {r['method']}: failed: {r['error']}" for r in rows if "error" in r]
        if sec.get("skipped"):
            md += [f"Skipped: {sec['skipped']}.", ""]
    goals = _md_goals(report)
    if goals:
        md += ["## Goals (issue 15)", ""] + goals + [""]
    figure = write_time_figure(report, path.with_name(path.stem + "_time.png"))
    if figure is not None:
        md += ["## Registration time at a glance", "", f"![registration time]({figure.name})", ""]
    path.write_text("\n".join(md))


def write_time_figure(report: dict, path: Path) -> Path | None:
    """One panel per size: each network's registration time and the classic baselines' (log scale), with the
    50x-faster-than-SimpleITK-B-spline mark where SimpleITK ran. ``None`` (nothing written) without a methods
    section."""
    from _compare_report import _plt  # the benchmarks' one headless matplotlib setup

    rows = [r for r in report.get("methods", {}).get("rows", []) if "seconds" in r]
    classic = [r for r in report.get("classic", {}).get("rows", []) if "seconds" in r]
    if not rows:
        return None
    plt = _plt()

    sizes = sorted({tuple(r["size"]) for r in rows}, key=lambda s: -math.prod(s))
    device = report["methods"].get("env", {}).get("device", "")
    fig, axes = plt.subplots(1, len(sizes), figsize=(5.5 * len(sizes), 4.0), squeeze=False)
    for ax, size in zip(axes[0], sizes, strict=True):
        bars = [(r["method"], r["seconds"], "tab:blue") for r in rows if tuple(r["size"]) == size]
        bars += [(r["method"], r["seconds"], "tab:orange") for r in classic if tuple(r["size"]) == size]
        names, seconds, colours = zip(*bars, strict=True)
        ax.barh(range(len(bars)), seconds, color=colours)
        ax.set_yticks(range(len(bars)), names)
        ax.invert_yaxis()
        ax.set_xscale("log")
        ax.set_xlabel("wall seconds (log scale)")
        ax.set_title(f"{'x'.join(map(str, size))}, {device}", fontsize=10)
        for i, value in enumerate(seconds):
            ax.annotate(f"{value:.3g} s", (value, i), xytext=(3, 0), textcoords="offset points", va="center",
                        fontsize=8, bbox={"facecolor": "white", "edgecolor": "none", "pad": 0.5})  # fmt: skip
        sitk = [r["seconds"] for r in classic if r["method"] == "sitk_bspline" and tuple(r["size"]) == size]
        if sitk:
            ax.axvline(sitk[0] / 50, color="grey", linestyle="--", label="50x faster than SimpleITK B-spline")
            ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), fontsize=8, frameon=False)
        ax.set_xlim(right=max(seconds) * 8)  # room for the value labels
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


if __name__ == "__main__":
    main()
