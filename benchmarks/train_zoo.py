"""Train the whole zoo on synthetic data (``regnet_zoo.data.synthmorph``) and write shippable weights.

    python benchmarks/train_zoo.py --methods all --dims 3 --minutes-per-method 6 --threads 1 \
        --out regnet_zoo/pretrained

Each method is built from its bundle's own training config (``bundles/<m>/configs/train.yaml``: network,
loss, optimiser, learning rate, trainer), with the training data replaced by an endless stream of SynthMorph
pairs (random label maps, a random contrast per label and image, bias, noise, blur, gamma; random affine +
diffeomorphic pair transform) and validation on a held-out generator seed. Fixed and moving never share a
contrast, so image-similarity terms that assume one contrast are replaced by the synthetic labels (the
SynthMorph recipe), see ``SYNTH_OVERRIDES``; RegNet is supervised by the generator's ground-truth field.

Training stops after ``--minutes-per-method`` (wall time) or ``--max-iterations``. For every (method, dims)
the command writes ``<out>/<method>_<2d|3d>.pt`` (``{"model": state_dict, "regnet_zoo": metadata}``, the
self-describing format of :mod:`regnet_zoo.weights`; half precision with ``--half``), a JSON record
``<out>/<method>_<2d|3d>.json`` and the model card ``<out>/<method>.md``. Existing files are replaced only
with ``--overwrite``.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch

from regnet_zoo import METHODS
from regnet_zoo.pretrained import (
    WORKING_GRIDS,
    model_card,
    weights_file,
    zoo_metadata,
)

#: per method: bundle overrides for synthetic training (why: the comment), applied on top of the bundle's
#: train config. Fixed and moving have independent random contrasts, so same-contrast similarities (MSE,
#: global NCC) are switched off in favour of the label Dice the generator makes possible (SynthMorph).
SYNTH_OVERRIDES: dict[str, dict[str, Any]] = {
    "pwc": {"loss#gamma": 0.0, "loss#lambda_dice": 5.0},  # NCC across contrasts off; Dice term on
    # supervised by the generator's ground-truth field (no crops); the last layer starts near zero: at these
    # CPU budgets PyTorch's default start leaves a random, folding field (3D, 85 iterations: held-out Dice
    # 0.343 -> 0.303, 2.9 % folding, against 0.337 and 0 %: regnet_synthetic_default_init_3d.json)
    "regnet": {"loss#margin": 0, "network_def#output_init_std": 1e-5},
    # MSE across contrasts off; the Dice weighted against the KL terms (about 10 per level in 2D at start)
    "ddrnet": {"loss#similarity_weight": 0.0, "loss#dice_weight": 100.0},
    "bspline_unet": {},  # NGF (edge-based, contrast-agnostic) + curvature + label loss: the paper's loss
    "discrete_corr": {},  # label Dice + diffusion: the paper's (PDD-Net) supervision
}
#: 3D working grids that differ from WORKING_GRIDS[3]: RegNet trains on voxels with its whole 54-voxel context
#: inside the image, so a 48^3 image would leave nothing to learn from
GRID3D = {"regnet": (64, 64, 64)}
#: batch size per dims (one CPU thread)
BATCH = {2: 4, 3: 1}
VALIDATION_SEED = 1_000  # held out: training uses seed 0
VALIDATION_PAIRS = {2: 8, 3: 2}


class _Cycled(torch.utils.data.Dataset):
    """``length`` items drawn cyclically from a finite list of pre-generated pairs (``--cache-pairs``)."""

    def __init__(self, items: list[dict[str, torch.Tensor]], length: int) -> None:
        self.items, self.length = items, int(length)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        item = self.items[index % len(self.items)]
        # labels are cached as uint8 (16 labels) to keep the cache small
        return {k: v.long() if v.dtype == torch.uint8 else v for k, v in item.items()}


def generate_pairs(grid: list[int], pairs: int, workers: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """``pairs`` synthetic pairs of ``grid`` made by ``workers`` loader processes (the generator runs on the
    CPU; a GPU trains faster than one process can draw pairs)."""
    from regnet_zoo.data.synthmorph import SynthPairDataset

    loader = torch.utils.data.DataLoader(
        SynthPairDataset(grid, length=pairs, seed=seed), batch_size=None, num_workers=workers
    )
    start, items = time.perf_counter(), []
    for item in loader:
        # clone: a tensor received from a worker holds a shared-memory file descriptor while it lives
        items.append({k: (v.to(torch.uint8) if "label" in k else v).clone() for k, v in item.items()})
    size = "x".join(map(str, grid))
    print(f"[cache {size}] {pairs} pairs in {time.perf_counter() - start:.0f}s", flush=True)
    return items


class _RegNetTarget(torch.utils.data.Dataset):
    """The generator's ``ddf`` as RegNet's supervised target ``ddf_gt`` (its loss and batch preparation)."""

    def __init__(self, pairs: torch.utils.data.Dataset) -> None:
        self.pairs = pairs

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        from regnet_zoo.networks.regnet import CONTEXT_AFTER, CONTEXT_BEFORE

        item = dict(self.pairs[index])
        item["ddf_gt"] = item.pop("ddf")
        # in training RegNet predicts only the voxels whose whole context lies inside the image
        mask = torch.zeros_like(item["fixed"])
        mask[(slice(None),) + tuple(slice(CONTEXT_BEFORE, s - CONTEXT_AFTER) for s in mask.shape[1:])] = 1
        item["ddf_mask"] = mask
        return item


def _parser(
    method: str,
    dims: int,
    grid: list[int],
    batch_size: int,
    length: int,
    device: str,
    cache: list[dict[str, torch.Tensor]] | None = None,
    workers: int = 0,
    extra: dict[str, Any] | None = None,
):
    """The bundle's train config with the synthetic data in place of the dataset (``extra``: ``--set``)."""
    from regnet_zoo.bundle import bundle_parser
    from regnet_zoo.data.synthmorph import SynthPairDataset

    parser = bundle_parser(method, "train", spatial_dims=dims, image_size=grid, batch_size=batch_size)
    train = _Cycled(cache, length) if cache else SynthPairDataset(grid, length=length, seed=0)
    val = SynthPairDataset(grid, length=VALIDATION_PAIRS[dims], seed=VALIDATION_SEED)
    if method == "regnet":
        train = _RegNetTarget(train)
    parser.update(
        {
            "device": f"$torch.device({device!r})",
            "train#dataset": train,
            "validate#dataset": val,
            "evaluation_labels": None,  # every label of the synthetic maps
            "train#handlers": [],  # no resumable checkpoints, no per-epoch LR schedule (one long epoch)
            "train#main_handlers": [],
            "epochs": 1,
            "num_workers": 0 if cache else workers,
            **SYNTH_OVERRIDES[method],
            **(extra or {}),
        }
    )
    return parser


def _network_args(parser) -> dict[str, Any]:
    """``network_def`` with its references resolved (the arguments that rebuild the network)."""
    config = parser.get("network_def")

    def resolve(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: resolve(v) for k, v in value.items()}
        if isinstance(value, list):
            return [resolve(v) for v in value]
        if isinstance(value, str) and value.startswith("@"):
            return resolve(parser.get_parsed_content(value[1:]))
        if isinstance(value, tuple):
            return [resolve(v) for v in value]
        return value

    return resolve(config)


def _validate(parser, network: torch.nn.Module) -> dict[str, float]:
    """Dice (before / after), MSE, SDlogJ, folding on the held-out synthetic pairs."""
    evaluator = parser.get_parsed_content("validate#evaluator")
    evaluator.network = network
    network.eval()
    evaluator.run()
    metrics = {k: float(v) for k, v in evaluator.state.metrics.items()}
    return metrics


def method_grid(method: str, dims: int, args: argparse.Namespace) -> list[int]:
    grid = list(args.grid2d if dims == 2 else args.grid3d)
    if dims == 3 and method in GRID3D and args.grid3d == list(WORKING_GRIDS[3]):
        grid = list(GRID3D[method])
    return grid


def train_one(
    method: str, dims: int, args: argparse.Namespace, cache: list[dict[str, torch.Tensor]] | None = None
) -> dict[str, Any]:
    grid = method_grid(method, dims, args)
    out = Path(args.out)
    path = weights_file(method, dims, out)
    if path.exists() and not args.overwrite:
        raise SystemExit(f"{path} exists; pass --overwrite to replace it")
    batch = args.batch_size or BATCH[dims]
    parser = _parser(method, dims, grid, batch, 10**7, args.device, cache=cache, workers=args.workers,
                     extra=args.set)  # fmt: skip
    torch.manual_seed(args.seed)
    trainer = parser.get_parsed_content("train#trainer")
    network = parser.get_parsed_content("network")
    budget = 60.0 * args.minutes.get(method, args.minutes_per_method)
    start = time.perf_counter()
    losses: list[float] = []
    curve: list[list[float]] = []  # [iteration, seconds, mean loss of the last --log-every iterations]

    from ignite.engine import Events

    @trainer.on(Events.ITERATION_COMPLETED)
    def _stop(engine) -> None:
        losses.append(float(engine.state.output["loss"]))
        it = engine.state.iteration
        elapsed = time.perf_counter() - start
        if it % args.log_every == 0:
            recent = losses[-args.log_every :]
            curve.append([it, round(elapsed, 1), round(sum(recent) / len(recent), 5)])
            print(
                f"[{method} {dims}D] it {it} {elapsed:.0f}s loss {sum(recent) / len(recent):.4f}", flush=True
            )
        if elapsed >= budget or (args.max_iterations and it >= args.max_iterations):
            engine.terminate()

    trainer.run()
    wall = time.perf_counter() - start
    iterations = int(trainer.state.iteration)
    metrics = _validate(parser, network)
    print(f"[{method} {dims}D] {iterations} iterations, {wall:.0f}s; held-out {metrics}", flush=True)
    network_config = _network_args(parser)
    trained_on = {
        "dataset": "synthmorph",
        "generator": "regnet_zoo.data.synthmorph.SynthPairDataset",
        "seed": 0,
        "pairs": iterations * batch,
        "distinct_pairs": len(cache) if cache else iterations * batch,
        "iterations": iterations,
        "batch_size": batch,
        "grid": grid,
        "spacing": [1.0] * dims,
        "wall_time_s": round(wall, 1),
        "device": _device_name(args.device),
        "threads": torch.get_num_threads(),
        "loss_overrides": {**SYNTH_OVERRIDES[method], **args.set},
        "final_loss": sum(losses[-20:]) / max(1, len(losses[-20:])) if losses else None,
        "validation": {"seed": VALIDATION_SEED, "pairs": VALIDATION_PAIRS[dims], **metrics},
        "learning_curve": curve,
        "command": _command(),
    }
    meta = zoo_metadata(method, network_config, grid, trained_on)
    state = {k: v.detach().cpu() for k, v in network.state_dict().items()}
    if args.half:
        state = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    out.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({"model": state, "regnet_zoo": meta}, tmp)
    tmp.replace(path)
    path.with_suffix(".json").write_text(json.dumps(meta, indent=2, default=str) + "\n")
    (out / f"{method}.md").write_text(model_card(method, out))
    print(f"[{method} {dims}D] wrote {path} ({path.stat().st_size / 1e6:.2f} MB)", flush=True)
    return meta


def _device_name(device: str) -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    return f"CPU ({platform.processor() or platform.machine()})"


def _command() -> str:
    return "python " + " ".join(shlex.quote(a) for a in sys.argv)


def _setting(item: str, parser: argparse.ArgumentParser) -> tuple[str, Any]:
    """``KEY=VALUE`` of ``--set``: the value parsed as JSON where it is JSON (numbers, null, lists)."""
    if "=" not in item:
        parser.error(f"--set takes KEY=VALUE items, got {item!r}")
    key, value = item.split("=", 1)
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", default=["all"], help=f"'all' or of {', '.join(METHODS)}")
    parser.add_argument("--dims", nargs="+", type=int, default=[3], choices=[2, 3])
    parser.add_argument("--minutes-per-method", type=float, default=6.0)
    parser.add_argument(
        "--minutes",
        nargs="+",
        default=[],
        metavar="METHOD=MIN",
        help="per-method wall-time budgets that replace --minutes-per-method (e.g. pwc=9 bspline_unet=6)",
    )
    parser.add_argument("--max-iterations", type=int, default=0, help="0: no limit (time only)")
    parser.add_argument("--grid2d", nargs=2, type=int, default=list(WORKING_GRIDS[2]))
    parser.add_argument("--grid3d", nargs=3, type=int, default=list(WORKING_GRIDS[3]))
    parser.add_argument("--batch-size", type=int, default=0, help="0: 4 in 2D, 1 in 3D")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--half", action="store_true", help="store half-precision weights")
    parser.add_argument("--log-every", type=int, default=20)
    parser.add_argument("--out", default="regnet_zoo/pretrained")
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--workers", type=int, default=0, help="loader processes drawing synthetic pairs")
    parser.add_argument(
        "--cache-pairs", type=int, default=0, help="pairs drawn once per grid, trained on cyclically"
    )
    parser.add_argument("--keep-going", action="store_true", help="go on after a method fails")
    parser.add_argument(
        "--set",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="bundle config overrides after the synthetic ones, VALUE as JSON (else a string), e.g. "
        "network_def#output_init_std=null",
    )
    args = parser.parse_args(argv)
    args.set = dict(_setting(item, parser) for item in args.set)
    try:
        args.minutes = {k: float(v) for k, v in (item.split("=", 1) for item in args.minutes)}
    except ValueError:
        parser.error("--minutes takes METHOD=MINUTES items, e.g. pwc=9")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device.startswith("cuda"):
        # no cudnn.benchmark: PWC and RegNet meet dozens of convolution shapes, and autotuning each one made
        # their first iteration take about 100 s on an H200 (a 48 s budget per method)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    methods = list(METHODS) if args.methods == ["all"] else args.methods
    unknown = [m for m in [*methods, *args.minutes] if m not in METHODS]
    if unknown:
        parser.error(f"unknown methods {unknown}; choose from {', '.join(METHODS)}")
    caches: dict[tuple[int, ...], list[dict[str, torch.Tensor]]] = {}
    failed = []
    jobs = [(m, dims, tuple(method_grid(m, dims, args))) for dims in args.dims for m in methods]
    for _, _, grid in jobs:
        # all caches before any training: loader processes are forked before CUDA is initialised
        if args.cache_pairs and grid not in caches:
            caches[grid] = generate_pairs(list(grid), args.cache_pairs, args.workers)
    for method, dims, grid in jobs:
        try:
            train_one(method, dims, args, caches.get(grid))
        except Exception as error:  # noqa: BLE001 - reported, and the exit status says so
            if not args.keep_going:
                raise
            failed.append(f"{method} {dims}D")
            print(f"[{method} {dims}D] FAILED: {type(error).__name__}: {error}", flush=True)
    if failed:
        print(f"failed: {', '.join(failed)}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
