"""Command line ``regnet-zoo`` (also ``python -m regnet_zoo``): register, warp, evaluate, train.

Every command goes through the shared code: :mod:`regnet_zoo.api` (physical-space registration, warping and
metrics on ``regnet_zoo.core``) and :func:`regnet_zoo.bundle.run_bundle` (the bundles' ``train.yaml``).
Bad input (a missing file, an unknown method, a 2D/3D mismatch, NaN/inf, a non-integer label map, landmarks
outside the image, an output folder that holds results) prints one line ``regnet-zoo: error: ...`` to stderr
and exits with status 2, without a traceback.
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path
from typing import Any

from regnet_zoo import METHODS, __version__
from regnet_zoo.errors import RegistrationInputError, user_error
from regnet_zoo.label.serve import add_serve_parser, serve_main

__all__ = ["main", "build_parser"]

LANDMARK_HELP = (
    "landmark CSV: one point per row, x,y[,z] in physical mm in ITK's LPS convention (what SimpleITK's "
    "TransformIndexToPhysicalPoint gives; a header row is allowed); row i of the fixed file corresponds "
    "to row i of the moving file"
)
DDF_HELP = (
    "displacement field: a Learn2Reg DDF (on the fixed grid, voxel units, vector last, e.g. "
    "ddf_voxel.nii.gz) or an ITK displacement field (mm, LPS, e.g. ddf_itk.nii.gz); told apart by their "
    "layout (--ddf-type)"
)


class _Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose usage errors are one line (exit status 2)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The ``regnet-zoo`` argument parser (``register``, ``warp``, ``evaluate``, ``train``, ``serve``)."""
    parser = _Parser(
        prog="regnet-zoo",
        description="Deep image registration with five published methods as MONAI bundles.",
        epilog=LANDMARK_HELP,
    )
    parser.add_argument("--version", action="version", version=f"regnet-zoo {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    reg = sub.add_parser(
        "register",
        help="register a moving image to a fixed image with a trained method",
        description=(
            "Register MOVING to FIXED. Inputs may differ in size, spacing and orientation: the moving image "
            "is brought onto the fixed grid through physical space. Writes warped.nii.gz, "
            "[warped_label.nii.gz], ddf_voxel.nii.gz (Learn2Reg: fixed grid, voxel units, vector last), "
            "ddf_itk.nii.gz (mm, LPS: SimpleITK DisplacementFieldTransform / 3D Slicer), jacobian.nii.gz, "
            "transform.h5 (ITK composite transform, fixed -> moving points: sitk.ReadTransform + "
            "sitk.Resample, antsApplyTransforms, Slicer) and metrics.json into --out; with --inverse also "
            "inverse_transform.h5 and fixed_warped.nii.gz (the fixed image on the moving grid), with "
            "--report report.png. An affine (or rigid) pre-alignment runs first unless --affine none; "
            "the fields hold the whole transform (affine then deformable) and the affine alone is written as "
            "affine.txt (4x4, physical RAS) and affine.tfm (ITK, LPS). Stages and times go to stderr."
        ),
        epilog=LANDMARK_HELP,
    )
    reg.add_argument("--method", default="ddrnet", help=f"one of {', '.join(METHODS)} (default: ddrnet)")
    reg.add_argument("--fixed", required=True, help="fixed image (NIfTI, MHA, NRRD, ...)")
    reg.add_argument("--moving", required=True, help="moving image")
    reg.add_argument("--fixed-label", help="fixed label map (integers) for Dice / HD95")
    reg.add_argument("--moving-label", help="moving label map (integers), warped by nearest neighbour")
    reg.add_argument("--fixed-landmarks", help="fixed landmark CSV (see below)")
    reg.add_argument("--moving-landmarks", help="moving landmark CSV, rows corresponding to the fixed ones")
    reg.add_argument(
        "--weights",
        help="trained weights (default: the bundle's models/model.pt, else the shipped ones)",
    )
    reg.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    reg.add_argument(
        "--instance-opt",
        type=int,
        default=0,
        metavar="STEPS",
        help="test-time optimisation: Adam steps on the network's transform parameters with its own loss",
    )
    reg.add_argument(
        "--instance-similarity",
        choices=("lncc", "mi", "ngf"),
        help="instance optimisation with this image similarity + 0.1 diffusion instead of the bundle's loss "
        "(lncc for a pair of two contrasts where the bundle's loss compares intensities, e.g. DDR-Net's MSE)",
    )
    reg.add_argument(
        "--instance-grid",
        choices=("input", "network"),
        default="input",
        help="where instance optimisation runs when the weights work on a resampled grid (the shipped 3D "
        "ones: 48^3): input (default) refines the field on the fixed image's own grid (with "
        "--instance-similarity, default lncc); network: the network's parameters on its grid (faster, "
        "coarser)",
    )
    reg.add_argument(
        "--affine",
        choices=("affine", "rigid", "none"),
        default="affine",
        help="pre-alignment stage before the network (default: affine; none: off)",
    )
    reg.add_argument(
        "--similarity",
        "--affine-metric",
        dest="similarity",
        choices=("lncc", "ncc", "mi", "mse"),
        help="similarity of the affine stage (default lncc, which assumes one contrast; use mi for "
        "multi-modal pairs such as MR-US or T1-PD)",
    )
    reg.add_argument(
        "--inverse",
        action="store_true",
        help="also the inverse transform, the fixed image warped onto the moving grid, and the "
        "inverse-consistency error (mm) in metrics.json",
    )
    reg.add_argument("--report", action="store_true", help="also report.png: a picture of the registration")
    reg.add_argument(
        "--format",
        default=".nii.gz",
        choices=(".nii.gz", ".nii", ".mha", ".nrrd"),
        help="file format of the image outputs (default: .nii.gz; ddf_voxel stays NIfTI)",
    )
    reg.add_argument("--out", required=True, help="output folder")
    reg.add_argument("--overwrite", action="store_true", help="replace results already in --out")
    reg.add_argument("--quiet", action="store_true", help="do not report the stages and times on stderr")

    warp = sub.add_parser(
        "warp",
        help="warp an image with a displacement field",
        description=(
            "Warp MOVING onto the grid of FIXED with a displacement field. Images are interpolated linearly; "
            "a MOVING that holds only integer values (a label map, or an intensity image stored as integers) "
            "needs --nearest (label maps: values kept, written as integers) or --linear (intensities)."
        ),
    )
    warp.add_argument("--moving", required=True, help="image (or label map, with --nearest) to warp")
    warp.add_argument("--ddf", required=True, help=DDF_HELP + "; or an ITK transform (transform.h5, .tfm)")
    warp.add_argument("--fixed", required=True, help="the fixed image (its grid and affine)")
    interpolation = warp.add_mutually_exclusive_group()
    interpolation.add_argument(
        "--nearest", action="store_true", help="nearest neighbour: for label maps (written as integers)"
    )
    interpolation.add_argument(
        "--linear", action="store_true", help="linear even for integer-valued images (e.g. CT or 8-bit MR)"
    )
    warp.add_argument("--ddf-type", choices=("auto", "voxel", "itk"), default="auto", help="DDF convention")
    warp.add_argument("--out", required=True, help="output image (.nii.gz, .nii, .mha, .nrrd)")
    warp.add_argument("--overwrite", action="store_true", help="replace --out if it exists")

    ev = sub.add_parser(
        "evaluate",
        help="metrics of a displacement field (or of a Learn2Reg submission folder) as JSON on stdout",
        description=(
            "Metrics of a DDF on FIXED's grid (labels warped by nearest neighbour at identity + DDF) as JSON "
            "on stdout. With --dataset (a Learn2Reg folder) and --ddf a folder of disp_FFFF_MMMM.nii.gz "
            "files, evaluates every registration pair of --split and adds a summary."
        ),
        epilog=LANDMARK_HELP,
    )
    ev.add_argument("--ddf", required=True, help=DDF_HELP + "; or a folder of disp_FFFF_MMMM.nii.gz files")
    ev.add_argument("--fixed", help="fixed image (not with --dataset)")
    ev.add_argument("--moving", help="moving image (optional: checks that moving landmarks lie inside it)")
    ev.add_argument("--fixed-label", help="fixed label map")
    ev.add_argument("--moving-label", help="moving label map (any grid: resampled through physical space)")
    ev.add_argument("--fixed-landmarks", help="fixed landmark CSV")
    ev.add_argument("--moving-landmarks", help="moving landmark CSV")
    ev.add_argument("--labels", help="comma-separated label values to evaluate (default: all non-zero)")
    ev.add_argument("--ddf-type", choices=("auto", "voxel", "itk"), default="auto", help="DDF convention")
    ev.add_argument("--dataset", help="Learn2Reg dataset folder (with dataset.json) for a whole submission")
    ev.add_argument("--split", default="val", choices=("val", "test", "train"), help="pairs (default: val)")
    ev.add_argument("--output", help="also write the JSON to this file")

    points = sub.add_parser(
        "transform-points",
        help="map a CSV of physical points through a saved transform",
        description=(
            "Map physical points (LPS mm, x,y[,z] per row) through a transform written by register "
            "(transform.h5, an affine .tfm, or a displacement field such as ddf_itk.nii.gz): fixed -> "
            "moving, or moving -> fixed with --inverse. Writes a CSV with an x,y[,z] header."
        ),
    )
    points.add_argument("--transform", required=True, help="transform.h5, .tfm or a displacement-field image")
    points.add_argument("--points", required=True, help="input CSV of physical points (LPS mm)")
    points.add_argument("--out", required=True, help="output CSV")
    points.add_argument("--inverse", action="store_true", help="map moving -> fixed (the inverse transform)")
    points.add_argument("--overwrite", action="store_true", help="replace --out if it exists")

    add_serve_parser(sub)

    train = sub.add_parser(
        "train",
        allow_abbrev=False,  # unknown --KEY options are bundle overrides, never abbreviations
        help="train a method: runs its bundle's train.yaml",
        description=(
            "Run bundles/METHOD/train.yaml (monai.bundle run). Further bundle overrides as KEY=VALUE or "
            "--KEY VALUE (MONAI config ids: network_def#overlap=4 or --image-size '[64, 64]'; hyphens in "
            "--KEY stand for underscores; values parsed as Python literals). A KEY the config does not have "
            "is an error that names the closest keys."
        ),
    )
    train.add_argument("method", help=f"one of {', '.join(METHODS)}")
    train.add_argument("--dataset-dir", help="Learn2Reg-layout dataset folder (default: the bundle's)")
    train.add_argument("--epochs", type=int, help="number of epochs")
    train.add_argument("--device", help="cpu or cuda")
    train.add_argument(
        "--spatial-dims", type=int, choices=(2, 3), help="2 or 3 (default: from the dataset's dataset.json)"
    )
    train.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the weights of an earlier run (models/model.pt); without it training refuses to start",
    )
    # the underscore spellings, documented before: hidden aliases, so that they keep their checks
    train.add_argument("--dataset_dir", dest="dataset_dir", help=argparse.SUPPRESS)
    train.add_argument(
        "--spatial_dims", dest="spatial_dims", type=int, choices=(2, 3), help=argparse.SUPPRESS
    )
    return parser


# ----------------------------------------------------------------------------------------------------------
# commands
# ----------------------------------------------------------------------------------------------------------
def _report(line: str) -> None:
    print(f"regnet-zoo register: {line}", file=sys.stderr, flush=True)


def _register(args: argparse.Namespace) -> int:
    from regnet_zoo.api import metrics_to_json, output_names, register

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise RegistrationInputError(f"{out}: --out must be a folder")
    names = output_names(True, args.inverse, args.report, args.format)
    existing = [n for n in names.values() if (out / n).exists()]
    if existing and not args.overwrite:  # refuse before the (slow) registration runs
        raise RegistrationInputError(
            f"{out}: output folder holds results ({', '.join(existing)}); pass --overwrite to replace them"
        )
    result = register(
        args.fixed,
        args.moving,
        args.method,
        fixed_label=args.fixed_label,
        moving_label=args.moving_label,
        fixed_landmarks=args.fixed_landmarks,
        moving_landmarks=args.moving_landmarks,
        weights=args.weights,
        device=args.device,
        instance_opt=args.instance_opt,
        instance_similarity=args.instance_similarity,
        instance_grid=args.instance_grid,
        inverse=args.inverse,
        affine=None if args.affine == "none" else args.affine,
        affine_options={"similarity": args.similarity} if args.similarity else None,
        progress=None if args.quiet else _report,
    )
    paths = result.save(out, overwrite=args.overwrite, report=args.report, image_format=args.format)
    print(metrics_to_json(result.metrics))
    if not args.quiet:
        print(f"wrote {', '.join(p.name for p in paths.values())} to {out}", file=sys.stderr)
    return 0


def _warp(args: argparse.Namespace) -> int:
    import torch

    from regnet_zoo.api import affine_of, as_image, load_ddf, warp_physical
    from regnet_zoo.data.io import WRITE_SUFFIXES, check_pair, file_suffix, save_image

    out = Path(args.out)
    if file_suffix(out) not in WRITE_SUFFIXES:
        raise RegistrationInputError(f"{out}: --out must be an image file ({', '.join(WRITE_SUFFIXES)})")
    if out.exists() and not args.overwrite:
        raise RegistrationInputError(f"{out}: output file exists; pass --overwrite to replace it")
    fixed = as_image(args.fixed, "fixed image")
    moving = as_image(args.moving, "moving image")
    check_pair(fixed, moving, single_channel=False)  # any image can be warped
    if not (args.nearest or args.linear) and torch.equal(moving.as_tensor(), moving.as_tensor().round()):
        # whatever its storage type (label maps come as float64 too): never interpolate labels into floats
        raise RegistrationInputError(
            f"{args.moving}: the image holds only integer values, as a label map does; pass --nearest to "
            "warp a label map, or --linear to interpolate an intensity image"
        )
    ddf = load_ddf(args.ddf, fixed, args.ddf_type)
    warped = warp_physical(moving, affine_of(fixed), fixed.shape[1:], ddf, nearest=args.nearest)
    if args.nearest and torch.equal(warped, warped.round()):
        warped = warped.round().to(torch.int32)  # a label map stays integer
    save_image(
        warped,
        out,
        affine=affine_of(fixed),
        overwrite=args.overwrite,
        protect=[args.moving, args.fixed, args.ddf],
    )
    print(f"wrote {out}", file=sys.stderr)
    return 0


def _parse_labels(text: str | None) -> list[int] | None:
    if not text:
        return None
    try:
        return [int(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise RegistrationInputError(f"--labels must be comma-separated integers, got {text!r}") from None


def _evaluate_submission(args: argparse.Namespace) -> dict[str, Any]:
    """Every pair of a Learn2Reg dataset split against ``disp_FFFF_MMMM.nii.gz`` files in ``args.ddf``."""
    from regnet_zoo.api import as_image, case_id, evaluate_ddf, load_ddf
    from regnet_zoo.data.learn2reg import Learn2RegDataset
    from regnet_zoo.engines.metrics import aggregate_metrics

    dataset = Learn2RegDataset(args.dataset)
    pairs = dataset.pairs(args.split)
    if not pairs:
        raise RegistrationInputError(f"{dataset.json_path}: no registration pairs in split {args.split!r}")
    folder = Path(args.ddf)
    names = [f"disp_{case_id(p['fixed'])}_{case_id(p['moving'])}" for p in pairs]
    files = []
    for name in names:
        found = [folder / f"{name}{s}" for s in (".nii.gz", ".nii") if (folder / f"{name}{s}").is_file()]
        files.append(found[0] if found else None)
    missing = [n for n, f in zip(names, files, strict=True) if f is None]
    if missing:
        raise RegistrationInputError(
            f"{folder}: missing displacement files for {len(missing)} of {len(names)} pairs "
            f"(e.g. {missing[0]}.nii.gz)"
        )
    labels = _parse_labels(args.labels) or dataset.evaluation_labels or None
    per_pair: dict[str, dict] = {}
    for name, path, pair in zip(names, files, pairs, strict=True):
        fixed = as_image(pair["fixed"], "fixed image", dataset.spatial_dims)
        units = pair.get("keypoint_units", "mm")
        has_points = "fixed_keypoints" in pair and "moving_keypoints" in pair
        has_labels = "fixed_label" in pair and "moving_label" in pair
        per_pair[name] = evaluate_ddf(
            load_ddf(path, fixed, args.ddf_type),
            fixed,
            fixed_label=pair["fixed_label"] if has_labels else None,
            moving_label=pair["moving_label"] if has_labels else None,
            fixed_landmarks=pair["fixed_keypoints"] if has_points else None,
            moving_landmarks=pair["moving_keypoints"] if has_points else None,
            moving=pair["moving"] if has_points else None,
            labels=labels,
            landmark_units=units,
        )
    return {
        "dataset": str(dataset.root),
        "split": args.split,
        "pairs": per_pair,
        "summary": aggregate_metrics(list(per_pair.values())),
    }


def _evaluate(args: argparse.Namespace) -> int:
    from regnet_zoo.api import as_image, evaluate_ddf, load_ddf, metrics_to_json

    if args.dataset is not None or Path(args.ddf).is_dir():
        if args.dataset is None or not Path(args.ddf).is_dir():
            raise RegistrationInputError(
                "a whole submission needs --dataset (a Learn2Reg folder) and --ddf (a folder of disp_* files)"
            )
        result = _evaluate_submission(args)
    else:
        if args.fixed is None:
            raise RegistrationInputError("--fixed is required (the grid of the displacement field)")
        fixed = as_image(args.fixed, "fixed image")
        result = evaluate_ddf(
            load_ddf(args.ddf, fixed, args.ddf_type),
            fixed,
            fixed_label=args.fixed_label,
            moving_label=args.moving_label,
            fixed_landmarks=args.fixed_landmarks,
            moving_landmarks=args.moving_landmarks,
            moving=args.moving,
            labels=_parse_labels(args.labels),
        )
    text = metrics_to_json(result)
    if args.output:
        out = Path(args.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
    print(text)
    return 0


def _literal(text: str) -> Any:
    """A command-line override value: a Python literal when it parses as one, else the string."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        lowered = text.lower()
        return {"true": True, "false": False, "none": None, "null": None}.get(lowered, text)


def parse_overrides(tokens: list[str]) -> dict[str, Any]:
    """``KEY=VALUE``, ``--KEY=VALUE`` and ``--KEY VALUE`` tokens -> ``{KEY: value}``.

    In the flag forms hyphens stand for underscores (``--image-size`` is the config id ``image_size``), as
    in every other ``regnet-zoo`` flag; ``KEY=VALUE`` keeps KEY as written.
    """
    overrides: dict[str, Any] = {}
    i = 0
    while i < len(tokens):
        token = tokens[i]
        if token.startswith("--"):
            key = token[2:]
            if "=" in key:
                key, value = key.split("=", 1)
            elif i + 1 < len(tokens):
                value, i = tokens[i + 1], i + 1
            else:
                raise RegistrationInputError(f"bundle override {token} has no value")
            key = key.replace("-", "_")
        elif "=" in token:
            key, value = token.split("=", 1)
        else:
            raise RegistrationInputError(f"bundle overrides are KEY=VALUE or --KEY VALUE, got {token!r}")
        if not key:
            raise RegistrationInputError(f"bundle override {token!r} has no key")
        overrides[key] = _literal(value)
        i += 1
    return overrides


def _refuse_to_replace_weights(method: str, overrides: dict[str, Any]) -> None:
    """Before any data is loaded: the run's model.pt must not exist unless overwrite / resume (the bundle's
    ModelSaver checks the same when the trainer starts)."""
    from regnet_zoo.bundle import bundle_parser

    if overrides.get("overwrite") or overrides.get("resume_from") not in (None, "", False):
        return
    parser = bundle_parser(method, "train", **overrides)
    if parser.get("overwrite") or parser.get("resume_from") not in (None, "", False):
        return
    path = Path(parser.get_parsed_content("ckpt_dir")) / "model.pt"
    if path.exists():
        raise RegistrationInputError(
            f"{path}: weights of an earlier training run exist; pass --overwrite to replace them "
            "(or --ckpt-dir DIR to train into another folder)"
        )


def _train(args: argparse.Namespace) -> int:
    from regnet_zoo.api import check_method
    from regnet_zoo.bundle import check_overrides, run_bundle

    check_method(args.method)
    overrides = parse_overrides(list(args.overrides))
    check_overrides(args.method, "train", overrides)  # a misspelt key first, before anything is read
    if args.dataset_dir is not None:
        if not Path(args.dataset_dir).is_dir():
            raise RegistrationInputError(f"{args.dataset_dir}: dataset folder not found")
        overrides["dataset_dir"] = str(Path(args.dataset_dir).resolve())
        if args.spatial_dims is None and "spatial_dims" not in overrides:
            from regnet_zoo.data.learn2reg import Learn2RegDataset

            # 2D or 3D from the dataset's description (tensorImageSize), so 3D data needs no extra flag
            overrides["spatial_dims"] = Learn2RegDataset(args.dataset_dir).spatial_dims
    for key in ("epochs", "device", "spatial_dims"):
        value = getattr(args, key)
        if value is not None:
            overrides[key] = value
    if overrides.get("device") == "cuda":
        from regnet_zoo.api import resolve_device

        resolve_device("cuda")
    if args.overwrite:
        overrides["overwrite"] = True
    _refuse_to_replace_weights(args.method, overrides)
    run_bundle(args.method, "train", **overrides)
    return 0


def _transform_points(args: argparse.Namespace) -> int:
    from regnet_zoo.api import transform_points_file

    if Path(args.out).suffix.lower() != ".csv":
        raise RegistrationInputError(f"{args.out}: --out must be a .csv file")
    mapped = transform_points_file(args.transform, args.points, args.out, args.inverse, args.overwrite)
    print(f"wrote {len(mapped)} points to {args.out}", file=sys.stderr)
    return 0


_COMMANDS = {
    "register": _register,
    "warp": _warp,
    "transform-points": _transform_points,
    "evaluate": _evaluate,
    "train": _train,
    "serve": serve_main,
}


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status (0 success, 2 bad input or usage)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    from regnet_zoo.api.methods import use_all_cores

    use_all_cores()
    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
        if extra and args.command != "train":
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = extra  # train: further bundle overrides
        return _COMMANDS[args.command](args)
    except SystemExit as stop:  # argparse: --help (0) and usage errors (2, message already printed)
        return int(stop.code or 0)
    except (RegistrationInputError, FileNotFoundError, NotADirectoryError, IsADirectoryError) as err:
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        print(f"regnet-zoo: error: {message}", file=sys.stderr)
        return 2
    except FloatingPointError as err:  # training stopped on a non-finite loss (the last checkpoint is kept)
        print(f"regnet-zoo: error: {str(err).splitlines()[0]}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("regnet-zoo: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # bad input found deep inside (e.g. a bundle's config): still one line
        inner = user_error(err)
        if inner is None:
            raise
        print(f"regnet-zoo: error: {str(inner).splitlines()[0]}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
