"""Evaluate a trained registration network over pairs: per-pair NIfTI outputs and metrics JSON.

The Python counterpart of a bundle's ``inference.yaml`` / ``evaluate.yaml`` (same evaluator and handlers).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from regnet_zoo.engines.handlers import MetricsSaver, PairOutputWriter
from regnet_zoo.engines.workflows import RegistrationEvaluator

__all__ = ["evaluate_network"]


def evaluate_network(
    network: nn.Module,
    data_loader: Iterable,
    output_dir: str | Path,
    device: str | torch.device = "cpu",
    write_outputs: bool = True,
    write_metrics: bool = True,
    labels: Sequence[int] | None = None,
    print_table: bool = False,
) -> dict[str, Any]:
    """Register every pair of ``data_loader`` with ``network`` and write the results under ``output_dir``.

    ``data_loader`` yields batches with ``fixed``, ``moving`` (``MetaTensor``: the fixed image's affine and
    the file names) and optional labels / keypoints. Writes ``<name>_{warped,warped_label,ddf,jacdet}.nii.gz``
    (``write_outputs``) and ``metrics/<name>.json`` + ``metrics/metrics.json`` (``write_metrics``);
    ``labels``: label values for Dice/HD95 (default: all non-zero).
    Returns ``{"pairs": {name: metrics}, "aggregate": ...}``.
    """
    output_dir = Path(output_dir)
    saver = MetricsSaver(output_dir / "metrics" if write_metrics else None, print_table=print_table)
    handlers: list = [saver, PairOutputWriter(output_dir)] if write_outputs else [saver]
    evaluator = RegistrationEvaluator(
        device=device,
        val_data_loader=data_loader,
        network=network.to(device),
        metric_kwargs={"labels": labels},
        val_handlers=handlers,
    )
    evaluator.run()
    return {"pairs": saver.per_pair, "aggregate": saver.summary}
