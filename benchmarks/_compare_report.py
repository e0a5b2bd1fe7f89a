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
    lines = [
        "| method | " + " | ".join(c[0] for c in columns) + " | note |",
        "|---|" + "---:|" * len(columns) + "---|",
    ]
    for row in rows:
        cells = [_cell(row.get(key), fmt) for _, key, fmt in columns]
        if row.get("peak_rss_increase_mb") is not None and cells[columns.index(_RSS_COLUMN)] != "-":
            cells[columns.index(_RSS_COLUMN)] += f" (+{row['peak_rss_increase_mb']:.0f})"
        note = row.get("note") or ""
        if row.get("status") != "ok":
            note = f"**{row.get('status')}**: {note}"
        lines.append(f"| {row['method']} | " + " | ".join(cells) + f" | {note} |")
    return "\n".join(lines)


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
        f"training budget {meta['budget']} per deep method",
        "",
        markdown_table(rows),
        "",
        "DSC: mean Dice over labels and pairs; DSC30: 0.3-quantile of per-pair Dice; HD95 / TRE in mm; "
        "SDlogJ (clipped): std of log clip(J, 1e-9, 1e9) (corrected form: folds count); SDlogJ L2R: the "
        "Learn2Reg challenge form std of log(J + 3); both and % J<=0 (folding) on the interior (2-voxel "
        "crop); s / pair: registration time per pair; train s: "
        "training wall time (cached runs report the original); peak RSS: resident memory of the benchmark "
        "process while registering (in brackets: the increase over the level before that method's "
        "registration, i.e. its own working memory).",
    ]
    md_path.write_text("\n".join(header) + "\n")
    return json_path, md_path


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_accuracy_vs_time(rows: Sequence[dict], path: Path) -> Path:
    """Accuracy (mean Dice, or TRE when there are no labels) vs registration time per pair (log x)."""
    plt = _plt()
    ok = [r for r in rows if r.get("status") == "ok" and r.get("time_per_pair_s")]
    use_dice = any(r.get("dice_mean") is not None for r in ok)
    key, label = (
        ("dice_mean", "mean Dice (higher is better)") if use_dice else ("tre_mm", "TRE mm (lower is better)")
    )
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for i, r in enumerate(r for r in ok if r.get(key) is not None):
        marker = "o" if r.get("kind") == "deep" else "s"
        ax.scatter(r["time_per_pair_s"], r[key], marker=marker, s=50)
        # alternate the label above / below its point so that neighbours stay readable
        offset = (6, 4) if i % 2 == 0 else (6, -11)
        ax.annotate(r["method"], (r["time_per_pair_s"], r[key]), textcoords="offset points", xytext=offset)
    ax.set_xscale("log")
    ax.set_xlabel("registration time per pair (s, log scale)")
    ax.set_ylabel(label)
    ax.set_title("accuracy vs time (circles: deep, squares: classic)")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_dice_boxes(rows: Sequence[dict], path: Path) -> Path:
    """Per-label Dice box plots: one group per label, one box (over pairs) per method."""
    plt = _plt()
    ok = [r for r in rows if r.get("status") == "ok" and r.get("per_label_dice")]
    labels = sorted({lab for r in ok for lab in r["per_label_dice"]}, key=lambda s: (len(s), s))
    fig, ax = plt.subplots(figsize=(min(24.0, max(6.0, 0.22 * len(labels) * max(1, len(ok)))), 4.5))
    if not labels:
        ax.text(0.5, 0.5, "no label maps in this dataset: no Dice", ha="center", va="center")
        ax.set_axis_off()
    width = 0.8 / max(len(ok), 1)
    colours = plt.cm.tab10(np.linspace(0, 1, 10))
    for j, r in enumerate(ok):
        data = [
            [v for v in r["per_label_dice"].get(lab, []) if not math.isnan(v)] or [np.nan] for lab in labels
        ]
        positions = np.arange(len(labels)) + (j - (len(ok) - 1) / 2) * width
        parts = ax.boxplot(data, positions=positions, widths=width * 0.9, patch_artist=True, showfliers=False)
        for box in parts["boxes"]:
            box.set_facecolor(colours[j % 10])
        parts["boxes"][0].set_label(r["method"])
    if labels:
        ax.set_xticks(np.arange(len(labels)))
        ax.set_xticklabels(labels)
        ax.set_xlabel("label")
        ax.set_ylabel("Dice")
        ax.set_ylim(0, 1)
        ax.legend(fontsize=7, ncol=2, loc="lower right")
    ax.set_title("per-label Dice over the evaluation pairs")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
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
    h, w = in_plane.shape[1:]
    step = grid_step or max(2, min(h, w) // 24)
    rows, cols = np.mgrid[0:h, 0:w].astype(np.float64)
    y, x = rows + in_plane[0], cols + in_plane[1]  # deformed positions of the grid points (array axes)
    ax = axes[5]
    for i in range(0, h, step):
        ax.plot(x[i, :], y[i, :], "k-", lw=0.5)
    for j in range(0, w, step):
        ax.plot(x[:, j], y[:, j], "k-", lw=0.5)
    ax.set_xlim(-0.5, w - 0.5)
    ax.set_ylim(h - 0.5, -0.5)
    ax.set_aspect("equal")
    ax.set_title("grid x + ddf(x)")
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(method)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
