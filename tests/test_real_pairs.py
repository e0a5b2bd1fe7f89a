"""The real development pairs (regnet_zoo.data.real_pairs) and register's affine stage on them: Dice on the
anatomical labels only, TRE on the landmarks, a similarity that fits the modalities, and an affine stage
that does not make an already aligned pair worse."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from regnet_zoo.api.pipeline import affine_stage, check_inputs, initial_metrics, total_ddf, warp_physical
from regnet_zoo.core.geometry import affine_of
from regnet_zoo.core.metrics import dice_per_label
from regnet_zoo.data.preprocess import Preprocessing
from regnet_zoo.data.real_pairs import DATASETS, builtin_pairs, real_pairs


def test_pairs_define_labels_landmarks_and_similarity(shared_data):
    pairs, missing = real_pairs(shared_data, prostate_cases=2)
    assert missing == [d for d in DATASETS if not (shared_data / d).is_dir()]
    by_set = {}
    for pair in pairs:
        by_set.setdefault(pair.dataset, []).append(pair)
    if "oasis3d_pair" in by_set:
        spec = json.loads((shared_data / "oasis3d_pair" / "dataset.json").read_text())
        oasis = by_set["oasis3d_pair"]
        assert len(oasis) == len(spec["registration_val"]) == 2  # both directions
        present = set(np.unique(np.asarray(oasis[0].inputs()["fixed_label"])).tolist()) - {0}
        assert present and present <= set(spec["evaluation_labels"])  # the 30 evaluation labels only
        assert oasis[0].similarity == "lncc"
    if "prostate_mr_us" in by_set:
        case = by_set["prostate_mr_us"][0]
        assert case.similarity == "mi"  # MR -> US
        assert case.fixed_label.shape[0] == 1 and set(np.unique(np.asarray(case.fixed_label))) <= {0, 1}
        # the landmark blobs are landmarks (3D physical points), not labels
        assert case.fixed_landmarks.ndim == 2 and case.fixed_landmarks.shape[1] == 3
        assert case.fixed_landmarks.shape == case.moving_landmarks.shape
    if "head2d" in by_set:
        assert by_set["head2d"][0].similarity == "mi"  # T1 <- PD
    with pytest.raises(ValueError, match="unknown dataset"):
        real_pairs(shared_data, ["nope"])


def test_builtin_pairs_without_data(tmp_path):
    assert real_pairs(tmp_path) == ([], list(DATASETS))
    pairs = builtin_pairs()
    assert [p.fixed.ndim - 1 for p in pairs] == [2, 3]
    check_inputs(**pairs[0].inputs())


def _dice(pair, spec, matrix, step: int = 2):
    """Mean Dice over ``spec.labels`` of the moving label mapped by ``matrix`` (None: identity), on every
    ``step``-th voxel of the fixed grid (fast; the labels are far larger than the sampling step)."""
    n = pair.spatial_dims
    sub = affine_of(pair.fixed) @ np.diag([float(step)] * n + [1.0])
    fixed_label = np.asarray(pair.fixed_label[0])[(slice(None, None, step),) * n]
    ddf = total_ddf(torch.zeros(n, *fixed_label.shape), matrix, sub)
    warped = warp_physical(pair.moving_label, sub, fixed_label.shape, ddf, nearest=True)
    moving_label = np.asarray(pair.moving_label[0])
    scores = dice_per_label(fixed_label, warped[0].numpy(), spec.labels, moving_label=moving_label)
    return float(np.nanmean(list(scores.values())))


def test_affine_stage_does_not_lower_dice_on_the_prealigned_oasis_pair(shared_data):
    """OASIS is affinely pre-aligned (Dice 0.52 over the 30 evaluation labels): register's affine stage must
    not make it worse. With affine_register's own 8192-voxel finest level it did (0.522 -> 0.513), where
    SimpleITK's affine does not (benchmarks/results/affine.md)."""
    if not (shared_data / "oasis3d_pair").is_dir():
        pytest.skip("no oasis3d_pair")
    spec = real_pairs(shared_data, ["oasis3d_pair"])[0][0]
    pair = check_inputs(**spec.inputs())
    before = _dice(pair, spec, None)
    matrix = affine_stage(pair, Preprocessing(), "affine", torch.device("cpu"), similarity=spec.similarity)
    assert _dice(pair, spec, matrix) >= before + 0.005, before


def test_affine_stage_with_mi_aligns_the_multimodal_prostate_pair(shared_data):
    """MR -> US: the pair's MI stage raises the gland Dice and lowers the landmark TRE."""
    if not (shared_data / "prostate_mr_us").is_dir():
        pytest.skip("no prostate_mr_us")
    spec = real_pairs(shared_data, ["prostate_mr_us"], prostate_cases=4)[0][3]  # case 3: far off at the start
    pair = check_inputs(**spec.inputs())
    matrix = affine_stage(pair, Preprocessing(), "affine", torch.device("cpu"), similarity=spec.similarity)
    metrics = initial_metrics(pair, matrix)
    initial_tre = float(np.mean(np.linalg.norm(pair.fixed_points - pair.moving_points, axis=1)))
    assert metrics["dice_mean_affine"] > metrics["dice_mean_initial"] + 0.2, metrics
    assert metrics["tre_mm_affine"] < initial_tre - 2.0, (metrics, initial_tre)


def test_cli_affine_metric_reaches_the_affine_stage(monkeypatch, tmp_path):
    """`--affine-metric mi` (alias of --similarity) is what register's affine stage gets; the stage's own
    defaults (AFFINE_STAGE_DEFAULTS) apply under it."""
    from regnet_zoo import cli
    from regnet_zoo.api import pipeline

    args = cli.build_parser().parse_args(
        ["register", "--fixed", "f.nii", "--moving", "m.nii", "--out", str(tmp_path), "--affine-metric", "mi"]
    )
    assert args.similarity == "mi"
    seen = {}

    def fake_register(*a, affine_options=None, **k):
        seen.update(affine_options or {})
        raise SystemExit(0)

    monkeypatch.setattr("regnet_zoo.api.register", fake_register)
    with pytest.raises(SystemExit):
        cli._register(args)
    assert seen == {"similarity": "mi"}
    assert pipeline.AFFINE_STAGE_DEFAULTS["max_voxels"] > 8192
