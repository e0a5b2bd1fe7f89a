"""The contrast-agnostic synthetic pair generator (SynthMorph recipe)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from regnet_zoo.core.metrics import dice_per_label
from regnet_zoo.core.spatial import warp_labels
from regnet_zoo.data.synthmorph import SynthPairDataset, synth_pair


@pytest.mark.parametrize("shape", [(48, 40), (24, 28, 20)])
def test_pair_shapes_ranges_and_ground_truth(shape):
    pair = synth_pair(shape, generator=3)
    n = len(shape)
    for key in ("fixed", "moving"):
        assert pair[key].shape == (1, *shape) and pair[key].dtype == torch.float32
        assert 0.0 <= float(pair[key].min()) and float(pair[key].max()) <= 1.0
        assert float(pair[key].std()) > 0.05  # not a flat image
    assert pair["ddf"].shape == (n, *shape)
    labels = torch.unique(pair["moving_label"])
    assert len(labels) >= 4  # several structures, not one blob
    # the ground truth: moving_label(x + ddf(x)) == fixed_label(x) (by construction; zeros outside)
    warped = warp_labels(pair["moving_label"][None], pair["ddf"][None], padding_mode="zeros")[0]
    assert torch.equal(warped, pair["fixed_label"])
    # and the transform is a real one: identity overlap is clearly worse than the ground truth's
    identity = np.nanmean(list(dice_per_label(pair["fixed_label"], pair["moving_label"]).values()))
    assert identity < 0.9
    assert float(pair["ddf"].abs().amax()) > 1.0


def test_seeded_and_contrasts_independent():
    a, b = synth_pair((32, 32), generator=7), synth_pair((32, 32), generator=7)
    assert all(torch.equal(a[k], b[k]) for k in a)
    c = synth_pair((32, 32), generator=8)
    assert not torch.equal(a["moving"], c["moving"])
    # fixed and moving get independent contrasts: the mean intensity order of the labels differs between them
    # in most pairs (a shared contrast would keep it in every pair)
    differs = 0
    for seed in range(6):
        p = synth_pair((32, 32), generator=seed)
        common = [v for v in torch.unique(p["moving_label"]) if (p["fixed_label"] == v).sum() > 20]
        fm = torch.stack([p["fixed"][p["fixed_label"] == v].mean() for v in common])
        mm = torch.stack([p["moving"][p["moving_label"] == v].mean() for v in common])
        differs += int(not torch.equal(fm.argsort(), mm.argsort()))
    assert differs >= 4


def test_dataset_is_reproducible_and_bounded():
    data = SynthPairDataset((24, 24), length=3, seed=1)
    assert len(data) == 3
    assert torch.equal(data[2]["fixed"], SynthPairDataset((24, 24), length=3, seed=1)[2]["fixed"])
    assert not torch.equal(data[0]["fixed"], data[1]["fixed"])
    with pytest.raises(IndexError):
        data[3]
