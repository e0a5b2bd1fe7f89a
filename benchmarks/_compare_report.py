"""Outputs of ``compare.py``: ``results.json``, ``results.md`` (the table) and the PNG plots."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from regnet_zoo.data.io import json_ready

__all__ = ["markdown_table", "write_results", "plot_accuracy_vs_time", "plot_dice_boxes", "plot_panel"]

# (column title, row key, format)
_COLUMNS = (
    ("DSC", "dice_mean", "{:.3f}"),
    ("DSC30", "dice_mean_30", "{:.3f}"),
    ("HD95 mm", "hd95_mm", "{:.2f}"),
    ("TRE mm", "tre_mm", "{:.2f}"),
    ("SDlogJ (clipped)", "sdlogj", "{:.3f}"),
    ("SDlogJ L2R log(J+3)", "sdlogj_l2r", "{:.3f}"),
    ("% J<=0", "folding_percent", "{:.2f}"),
    ("s / pair", "time_per_pair_s", "{:.3g}"),
    ("train s", "train_time_s", "{:.1f}"),
    ("peak RSS MB (+ while registering)", "peak_rss_mb", "{:.0f}"),
    ("peak GPU MB", "peak_gpu_mb", "{:.0f}"),
    ("params", "num_parameters", "{:,}"),
)


_SPREAD = ("dice_mean", "hd95_mm", "tre_mm", "sdlogj", "folding_percent")
_RSS_COLUMN = next(c for c in _COLUMNS if c[1] == "peak_rss_mb")


def _cell(value: Any, fmt: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return fmt.format(value)


def markdown_table(rows: Sequence[dict], show_gpu: bool | None = None) -> str:
    """The results table (one line per method; ``-`` where a metric does not apply or the method did not
    run, with the reason in the last column)."""
    if show_gpu is None:
        show_gpu = any(r.get("peak_gpu_mb") is not None for r in rows)
    columns = [c for c in _COLUMNS if show_gpu or c[1] != "peak_gpu_mb"]
    if _mixed_devices(rows):  # rows merged from runs on several machines: say which timed each
        columns.insert(columns.index(next(c for c in columns if c[1] == "time_per_pair_s")) + 1,
                       ("timed on", "device", "{}"))
    lines = [
        "| method | " + " | ".join(c[0] for c in columns) + " | note |",
        "|---|" + "---:|" * len(columns) + "---|",
    ]
    for row in rows:
        cells = [_cell(row.get(key), fmt) for _, key, fmt in columns]
        for i, (_, key, fmt) in enumerate(columns):  # spread over pairs (and seeds) where there is one
            spread = row.get(f"{key}_std")
            if key in _SPREAD and spread is not None and cells[i] != "-":
                cells[i] += " ± " + fmt.format(spread)
        if row.get("peak_rss_increase_mb") is not None and cells[columns.index(_RSS_COLUMN)] != "-":
            cells[columns.index(_RSS_COLUMN)] += f" (+{row['peak_rss_increase_mb']:.0f})"
        note = row.get("note") or ""
        if row.get("status") != "ok":
            note = f"**{row.get('status')}**: {note}"
        lines.append(f"| {row['method']} | " + " | ".join(cells) + f" | {note} |")
    return "\n".join(lines)


def _mixed_devices(rows: Sequence[dict]) -> bool:
    return len({r.get("device") for r in rows if r.get("status") == "ok"}) > 1


def write_results(out: Path, meta: dict, rows: Sequence[dict]) -> tuple[Path, Path]:
    """``results.json`` (meta + rows without the image arrays) and ``results.md`` (header + table)."""
    clean_rows = [{k: v for k, v in r.items() if k != "example"} for r in rows]
    json_path = out / "results.json"
    json_path.write_text(
        json.dumps(json_ready({**meta, "rows": clean_rows}), indent=2, default=str, allow_nan=False)
    )
    md_path = out / "results.md"
    header = [
        f"# regnet_zoo benchmark: {meta['dataset']['name']}",
        "",
        f"- date: {meta['date']}",
        f"- machine: {meta['machine']}",
        f"- command: `{meta['command']}`",
        f"- pairs: {meta['dataset']['num_eval_pairs']} evaluation pairs "
        f"({meta['dataset']['eval_split']}), grid {meta['dataset']['grid']}, "
        f"training budget {meta['budget']} per deep method and seed (iterations: note column)",
        f"- split: {meta['dataset'].get('split', '')}; seeds {meta.get('seeds', [0])}",
        *[
            f"- merged from: `{m['command']}`" + (f" ({m['machine']}, {m['date']})" if "machine" in m else "")
            for m in meta.get("merged_from", [])
        ],
        "",
        markdown_table(rows),
        "",
        "DSC: mean Dice over labels, then mean ± standard deviation over pairs (and training seeds); "
        "DSC30: 0.3-quantile of per-pair Dice; HD95 / TRE in mm; "
        "SDlogJ (clipped): std of log clip(J, 1e-9, 1e9) (corrected form: folds count); SDlogJ L2R: the "
        "Learn2Reg challenge form std of log(J + 3); both and % J<=0 (folding) on the interior (2-voxel "
        "crop); s / pair: registration time per pair; train s: "
        "training wall time (cached runs report the original); peak RSS: resident memory of the benchmark "
        "process while registering (in brackets: the increase over the level before that method's "
        "registration, i.e. its own working memory).",
        "",
        "![accuracy vs time](accuracy_vs_time.png)",
        "",
        "![Dice vs SDlogJ and folding](dice_vs_sdlogj.png)",
        "",
        "![per-structure Dice](dice_boxplot.png)",
        "",
        "![learning curves](learning_curves.png)",
        "",
        "![qualitative panels](qualitative.png)",
    ]
    md_path.write_text("\n".join(header) + "\n")
    return json_path, md_path


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


_MARKERS = "osD^v<>PX*hp"


def _styles(rows: Sequence[dict]) -> dict[str, tuple]:
    """One (colour, marker) per row, the same in every plot: points are told apart by the legend (beside
    the axes), never by text placed on the plot, so no two labels overlap."""
    plt = _plt()
    colours = plt.cm.tab20(np.linspace(0, 1, 20))
    return {r["method"]: (colours[i % 20], _MARKERS[i % len(_MARKERS)]) for i, r in enumerate(rows)}


def _ok(rows: Sequence[dict], key: str) -> list[dict]:
    return [r for r in rows if r.get("status") == "ok" and r.get(key) is not None]


def _scatter(
    ax,
    rows: Sequence[dict],
    styles: dict,
    x_key: str,
    y_key: str,
    errors: bool = True,
    x_errors: bool = True,
    device_labels: bool = False,
) -> None:
    for r in rows:
        if r.get(x_key) is None or r.get(y_key) is None:
            continue
        colour, marker = styles[r["method"]]
        ax.errorbar(
            r[x_key],
            r[y_key],
            xerr=r.get(f"{x_key}_std") if errors and x_errors else None,
            yerr=r.get(f"{y_key}_std") if errors else None,
            fmt=marker,
            color=colour,
            ms=7,
            mec="k",
            mew=0.5,
            elinewidth=0.8,
            capsize=2,
            label=r["method"] + (f" ({r.get('device')})" if device_labels else ""),
        )


def _legend_outside(fig, ax) -> None:
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        ax.legend(handles, labels, fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False)
        width, height = fig.get_size_inches()  # a long legend (many rows) gets the height it needs
        fig.set_size_inches(width, max(height, 0.15 * len(handles) + 0.8))


def _accuracy_key(rows: Sequence[dict]) -> tuple[str, str]:
    if any(r.get("dice_mean") is not None for r in _ok(rows, "dice_mean")):
        return "dice_mean", "mean Dice (higher is better)"
    return "tre_mm", "TRE mm (lower is better)"


def plot_accuracy_vs_time(rows: Sequence[dict], path: Path) -> Path:
    """Accuracy (mean Dice ± spread, or TRE) vs registration time per pair (log x); one marker per method."""
    plt = _plt()
    key, label = _accuracy_key(rows)
    ok = [r for r in _ok(rows, key) if r.get("time_per_pair_s")]
    styles = _styles(rows)
    fig, ax = plt.subplots(figsize=(8.5, 4.8))
    # a log axis: no symmetric time bars; rows timed on different machines say which in the legend
    _scatter(ax, ok, styles, "time_per_pair_s", key, x_errors=False, device_labels=_mixed_devices(ok))
    ax.set_xscale("log")
    ax.set_xlabel("registration time per pair (s, log scale; training not included)")
    ax.set_ylabel(label)
    ax.set_title("accuracy vs time (bars: standard deviation over pairs and seeds)", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    _legend_outside(fig, ax)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_dice_vs_regularity(rows: Sequence[dict], path: Path) -> Path:
    """Accuracy vs the field's regularity, as Learn2Reg reads a result: Dice (or TRE) vs SDlogJ (clipped,
    corrected form) and vs folding (% J <= 0), one marker per method."""
    plt = _plt()
    key, label = _accuracy_key(rows)
    ok = _ok(rows, key)
    styles = _styles(rows)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
    for ax, x_key, x_label in (
        (axes[0], "sdlogj", "SDlogJ (std of log clip(J, 1e-9, 1e9), lower is smoother)"),
        (axes[1], "folding_percent", "% of voxels with J <= 0 (folding)"),
    ):
        _scatter(ax, ok, styles, x_key, key)
        ax.set_xlabel(x_label)
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
    axes[0].set_title("accuracy vs smoothness")
    axes[1].set_title("accuracy vs folding")
    _legend_outside(fig, axes[1])
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


#: above this many rows the per-structure plot keeps each method's best row (by mean Dice)
MAX_BOXES = 14


def _best_per_method(rows: Sequence[dict]) -> list[dict]:
    """Each base method's row with the highest mean Dice (its affine / instance-optimisation variants
    compete), in the order the methods first appear."""
    best: dict[str, dict] = {}
    for r in rows:
        key = r.get("base_method") or r["method"]
        if key not in best or (r.get("dice_mean") or 0) > (best[key].get("dice_mean") or 0):
            best[key] = r
    return list(best.values())


def plot_dice_boxes(rows: Sequence[dict], path: Path, label_names: dict[str, str] | None = None) -> Path:
    """Per-structure Dice box plots (over pairs and seeds): one panel per structure, named (the dataset's
    label names; the numeric value only where it has none), one box per method (with more than
    ``MAX_BOXES`` rows: each method's best variant, so the boxes stay readable)."""
    plt = _plt()
    ok = [r for r in rows if r.get("status") == "ok" and r.get("per_label_dice")]
    reduced = len(ok) > MAX_BOXES
    if reduced:
        ok = _best_per_method(ok)
    names = label_names or {}
    labels = sorted({lab for r in ok for lab in r["per_label_dice"]}, key=lambda s: (len(s), s))
    columns = min(5, max(1, len(labels)))
    n_rows = max(1, -(-len(labels) // columns))
    width = max(3.2, 0.28 * len(ok) + 1.0)
    fig, axes = plt.subplots(n_rows, columns, figsize=(width * columns, 3.0 * n_rows + 0.8), squeeze=False)
    styles = _styles(rows)
    for ax in axes.ravel():
        ax.set_visible(False)
    if not labels:
        axes[0, 0].set_visible(True)
        axes[0, 0].text(0.5, 0.5, "no label maps in this dataset: no Dice", ha="center", va="center")
        axes[0, 0].set_axis_off()
    for ax, lab in zip(axes.ravel(), labels, strict=False):
        ax.set_visible(True)
        # NaN is null in results.json
        values = [[v for v in r["per_label_dice"].get(lab, []) if v is not None] for r in ok]
        data = [[v for v in vs if not math.isnan(v)] or [np.nan] for vs in values]
        parts = ax.boxplot(data, positions=np.arange(len(ok)), widths=0.7, patch_artist=True, showfliers=True)
        for box, r in zip(parts["boxes"], ok, strict=True):
            box.set_facecolor(styles[r["method"]][0])
        ax.set_title(names.get(lab, f"label {lab}"), fontsize=9)
        ax.set_ylim(0, 1)
        ax.set_xticks(np.arange(len(ok)))
        ax.set_xticklabels([r["method"] for r in ok], rotation=70, ha="right", fontsize=6)
        ax.grid(True, axis="y", alpha=0.3)
    for row_axes in axes:
        row_axes[0].set_ylabel("Dice")
    best = "; each method's best variant (affine stage, instance optimisation)" if reduced else ""
    fig.suptitle(f"per-structure Dice over the evaluation pairs (and seeds){best}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_learning_curves(rows: Sequence[dict], path: Path) -> Path:
    """Training loss vs iteration of every deep method and seed (moving average over 10 iterations)."""
    plt = _plt()
    seen, curves = set(), []
    for r in rows:
        key = (r.get("base_method"), r.get("pre_align"))
        if r.get("learning_curves") and key not in seen:
            seen.add(key)
            curves.append((r["method"].replace(" +IO", ""), r["learning_curves"]))
    columns = min(4, max(1, len(curves)))
    n_rows = max(1, -(-len(curves) // columns))
    fig, axes = plt.subplots(n_rows, columns, figsize=(4.2 * columns, 3.0 * n_rows), squeeze=False)
    for ax in axes.ravel():
        ax.set_visible(False)
    for ax, (name, seed_curves) in zip(axes.ravel(), curves, strict=False):
        ax.set_visible(True)
        for entry in seed_curves:
            curve = np.asarray(entry["curve"], dtype=np.float64)
            if curve.size == 0:
                continue
            window = min(10, len(curve))
            smooth = np.convolve(curve[:, 2], np.ones(window) / window, mode="valid")
            ax.plot(curve[window - 1 :, 0], smooth, lw=1, label=f"seed {entry['seed']}")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("iteration")
        ax.set_ylabel("training loss")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _slice2d(volume: np.ndarray) -> np.ndarray:
    """A 2D view: the array itself, or the middle slice along the last axis of a 3D volume."""
    return volume if volume.ndim == 2 else volume[..., volume.shape[-1] // 2]


def plot_panel(method: str, example: dict, path: Path, grid_step: int | None = None) -> Path:
    """Fixed, moving, warped, |warped - fixed|, Jacobian determinant and deformed grid of one pair (3D: the
    middle slice along the last axis; the grid shows the in-plane displacement)."""
    from regnet_zoo.core.metrics import jacobian_determinant

    plt = _plt()
    ddf = np.asarray(example["ddf"], dtype=np.float64)  # (N, *S)
    jac = jacobian_determinant(ddf[None])[0].numpy()
    fixed, moving, warped = (_slice2d(np.asarray(example[k])) for k in ("fixed", "moving", "warped"))
    in_plane = np.stack([_slice2d(ddf[0]), _slice2d(ddf[1])])
    fig, axes = plt.subplots(1, 6, figsize=(18, 3.4))
    vmax = float(max(fixed.max(), moving.max(), 1e-6))
    for ax, image, title in zip(
        axes[:3], (fixed, moving, warped), ("fixed", "moving", "warped"), strict=True
    ):
        ax.imshow(image, cmap="gray", vmin=0, vmax=vmax)
        ax.set_title(title)
    diff = np.abs(warped - fixed)
    axes[3].imshow(diff, cmap="magma", vmin=0, vmax=float(max(diff.max(), 1e-6)))
    axes[3].set_title(f"|warped - fixed| (mean {diff.mean():.3f})")
    jac2 = _slice2d(jac)
    shown = axes[4].imshow(jac2, cmap="RdBu_r", vmin=0, vmax=2)
    folds = jac2 <= 0
    if folds.any():
        axes[4].contour(folds, levels=[0.5], colors="k", linewidths=0.6)
    axes[4].set_title(f"Jacobian det. ({100 * (jac <= 0).mean():.2f}% <= 0)")
    fig.colorbar(shown, ax=axes[4], fraction=0.046)
    _grid_lines(axes[5], in_plane, grid_step)
    axes[5].set_title("grid x + ddf(x)")
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(method)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _grid_lines(ax, in_plane: np.ndarray, step: int | None = None) -> None:
    """The deformed grid ``x + ddf(x)`` of an in-plane displacement ``(2, H, W)``."""
    h, w = in_plane.shape[1:]
    step = step or max(2, min(h, w) // 24)
    rows, cols = np.mgrid[0:h, 0:w].astype(np.float64)
    y, x = rows + in_plane[0], cols + in_plane[1]
    for i in range(0, h, step):
        ax.plot(x[i, :], y[i, :], "k-", lw=0.5)
    for j in range(0, w, step):
        ax.plot(x[:, j], y[:, j], "k-", lw=0.5)
    ax.set_xlim(-0.5, w - 0.5)
    ax.set_ylim(h - 0.5, -0.5)
    ax.set_aspect("equal")


def plot_panel_grid(rows: Sequence[dict], path: Path, max_methods: int = 6) -> Path:
    """Qualitative panels of one pair for a few methods (no registration and the best by Dice / MSE): fixed,
    moving, warped, |warped - fixed| and the deformed grid (3D: the middle slice along the last axis)."""
    plt = _plt()
    with_example = [r for r in rows if r.get("example") is not None]
    key = "dice_mean" if any(r.get("dice_mean") is not None for r in with_example) else "mse"
    ranked = sorted(
        (r for r in with_example if r.get(key) is not None and r["method"] != "identity"),
        key=lambda r: -r[key] if key == "dice_mean" else r[key],
    )
    chosen = [r for r in with_example if r["method"] == "identity"] + ranked[: max_methods - 1]
    fig, axes = plt.subplots(max(1, len(chosen)), 5, figsize=(13, 2.7 * max(1, len(chosen))), squeeze=False)
    for ax_row, r in zip(axes, chosen, strict=False):
        ex = r["example"]
        fixed, moving, warped = (_slice2d(np.asarray(ex[k])) for k in ("fixed", "moving", "warped"))
        ddf = np.asarray(ex["ddf"], dtype=np.float64)
        vmax = float(max(fixed.max(), moving.max(), 1e-6))
        titles = ("fixed", "moving", "warped")
        for ax, image, title in zip(ax_row[:3], (fixed, moving, warped), titles, strict=True):
            ax.imshow(image, cmap="gray", vmin=0, vmax=vmax)
            ax.set_title(title, fontsize=8)
        diff = np.abs(warped - fixed)
        ax_row[3].imshow(diff, cmap="magma", vmin=0, vmax=0.5 * vmax)
        ax_row[3].set_title(f"|warped - fixed| (mean {diff.mean():.3f})", fontsize=8)
        _grid_lines(ax_row[4], np.stack([_slice2d(ddf[0]), _slice2d(ddf[1])]))
        ax_row[4].set_title("grid x + ddf(x)", fontsize=8)
        ax_row[0].set_ylabel(r["method"], fontsize=9)
        for ax in ax_row:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
