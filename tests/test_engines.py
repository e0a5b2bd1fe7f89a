"""Engines: trainer/evaluator iterations, metrics, per-pair writers, resumable checkpoints (synthetic)."""

from __future__ import annotations

import json
import math

import nibabel as nib
import numpy as np
import pytest
import torch
from ignite.engine import Events
from monai.data import MetaTensor
from monai.engines.utils import IterationEvents
from torch import nn

from regnet_zoo.core.spatial import warp_image, warp_labels
from regnet_zoo.engines.handlers import MetricsSaver, PairOutputWriter, TrainingCheckpoint, latest_checkpoint
from regnet_zoo.engines.metrics import MeanPairMetric, aggregate_metrics, pair_metrics
from regnet_zoo.engines.workflows import (
    RegistrationEvaluator,
    RegistrationTrainer,
    prepare_registration_batch,
)


class TranslationNet(nn.Module):
    """A learnable constant displacement (the same for every pair): enough to test the engines."""

    def __init__(self, spatial_dims: int = 2) -> None:
        super().__init__()
        self.shift = nn.Parameter(torch.zeros(1, spatial_dims, *([1] * spatial_dims)))

    def forward(self, fixed, moving):
        ddf = self.shift.expand(fixed.shape[0], -1, *fixed.shape[2:])
        return {"ddf": ddf, "warped": warp_image(moving, ddf)}


class FixedFieldNet(nn.Module):
    """Returns a given DDF whatever the input."""

    def __init__(self, ddf: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("ddf", ddf)

    def forward(self, fixed, moving):
        ddf = self.ddf.expand(fixed.shape[0], *self.ddf.shape[1:])
        return {"ddf": ddf, "warped": warp_image(moving, ddf)}


def mse_loss_fn(outputs, batch):
    similarity = ((outputs["warped"] - batch["fixed"]) ** 2).mean()
    return {"loss": similarity, "similarity": similarity}


def _blob(size=32, centre=(16.0, 16.0), radius=6.0):
    yy, xx = torch.meshgrid(
        torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32), indexing="ij"
    )
    return torch.exp(-((yy - centre[0]) ** 2 + (xx - centre[1]) ** 2) / (2 * radius**2))[None]


def _pairs(n=4, shift=(2.0, -3.0)):
    """Pairs whose moving image is the fixed one shifted: moving(x + shift) = fixed(x)."""
    pairs = []
    for i in range(n):
        c = (14.0 + i, 15.0 - i)
        fixed = _blob(centre=c)
        moving = _blob(centre=(c[0] + shift[0], c[1] + shift[1]))
        pairs.append({"fixed": fixed, "moving": moving})
    return pairs


def _loader(pairs, batch_size=2):
    return torch.utils.data.DataLoader(pairs, batch_size=batch_size, shuffle=False)


def test_prepare_batch_keeps_known_keys_and_rejects_bad_batches():
    batch = {"fixed": MetaTensor(torch.zeros(1, 1, 4, 4)), "moving": torch.ones(1, 1, 4, 4), "name": ["a"]}
    prepared = prepare_registration_batch(batch, device="cpu")
    assert set(prepared) == {"fixed", "moving"}
    assert type(prepared["fixed"]) is torch.Tensor  # metadata dropped for the network
    with pytest.raises(ValueError, match="'fixed' and 'moving'"):
        prepare_registration_batch({"image": torch.zeros(1)})


def test_trainer_learns_translation_and_fires_events():
    torch.manual_seed(0)
    net = TranslationNet()
    trainer = RegistrationTrainer(
        device="cpu",
        max_epochs=30,
        train_data_loader=_loader(_pairs()),
        network=net,
        optimizer=torch.optim.Adam(net.parameters(), lr=0.2),
        loss_function=mse_loss_fn,
    )
    fired = []
    trainer.add_event_handler(IterationEvents.BACKWARD_COMPLETED, lambda e: fired.append("backward"))
    trainer.add_event_handler(IterationEvents.MODEL_COMPLETED, lambda e: fired.append("model"))
    losses = []
    trainer.add_event_handler(
        Events.ITERATION_COMPLETED, lambda e: losses.append(float(e.state.output["loss"]))
    )
    trainer.run()
    assert fired[:2] == ["backward", "model"] and len(fired) == 2 * 60
    assert set(trainer.state.output["losses"]) == {"loss", "similarity"}
    assert losses[-1] < 0.05 * losses[0]
    # the learned constant field is the true shift (moving(x + shift) = fixed(x))
    np.testing.assert_allclose(net.shift.detach().flatten().numpy(), [2.0, -3.0], atol=0.1)


def test_trainer_rejects_non_finite_loss():
    net = TranslationNet()
    trainer = RegistrationTrainer(
        "cpu",
        1,
        _loader(_pairs(2)),
        net,
        torch.optim.SGD(net.parameters(), lr=0.1),
        lambda o, b: {"loss": torch.tensor(math.nan, requires_grad=True)},
    )
    with pytest.raises(FloatingPointError, match="non-finite"):
        trainer.run()


def _label_pairs():
    """Label pairs where the moving labels are the fixed ones shifted by (0, 2) voxels."""
    fixed_label = torch.zeros(1, 32, 32, dtype=torch.long)
    fixed_label[:, 8:20, 6:16] = 1
    fixed_label[:, 22:28, 18:26] = 2
    moving_label = torch.roll(fixed_label, shifts=2, dims=2)
    image = lambda lab: lab.float() / 2  # noqa: E731
    return [
        {
            "fixed": image(fixed_label),
            "moving": image(moving_label),
            "fixed_label": fixed_label,
            "moving_label": moving_label,
        }
    ]


def _brute_force_dice(a, b, label):
    a, b = a == label, b == label
    return 2 * (a & b).sum() / (a.sum() + b.sum())


def test_pair_metrics_against_brute_force():
    pair = _label_pairs()[0]
    batch = {k: v[None] for k, v in pair.items()}
    exact = torch.zeros(1, 2, 32, 32)
    exact[:, 1] = 2.0  # moving(x + (0, 2)) = fixed(x)
    for ddf, expect_perfect in ((exact, True), (torch.zeros(1, 2, 32, 32), False)):
        outputs = {"ddf": ddf, "warped": warp_image(batch["moving"], ddf)}
        (m,) = pair_metrics(outputs, batch)
        warped = warp_labels(batch["moving_label"], ddf, method="nearest")[0, 0].numpy()
        fixed = batch["fixed_label"][0, 0].numpy()
        expected = np.mean([_brute_force_dice(fixed, warped, lab) for lab in (1, 2)])
        assert m["dice_mean"] == pytest.approx(expected)
        initial = np.mean(
            [_brute_force_dice(fixed, batch["moving_label"][0, 0].numpy(), lab) for lab in (1, 2)]
        )
        assert m["dice_mean_initial"] == pytest.approx(initial)
        assert m["mse_initial"] == pytest.approx(float(((batch["moving"] - batch["fixed"]) ** 2).mean()))
        assert m["folding_percent"] == 0.0
        if expect_perfect:
            assert m["dice_mean"] > 0.99 and m["dice_mean_initial"] < 0.9 and m["mse"] < m["mse_initial"]


def test_aggregate_and_mean_metric():
    per_pair = [
        {"dice_mean": 0.5, "sdlogj": 0.1},
        {"dice_mean": float("nan"), "sdlogj": 0.3},
        {"dice_mean": 0.9, "sdlogj": 0.2},
    ]
    summary = aggregate_metrics(per_pair)
    assert summary["num_pairs"] == 3
    assert summary["dice_mean"] == {"mean": pytest.approx(0.7), "std": pytest.approx(0.2), "count": 2}
    assert summary["dice_mean_30"] == pytest.approx(np.quantile([0.5, 0.9], 0.3))
    assert summary["sdlogj_30"] == pytest.approx(np.quantile([0.1, 0.3, 0.2], 0.7))
    metric = MeanPairMetric("dice_mean")
    metric.reset()
    metric.update(per_pair)
    assert metric.compute() == pytest.approx(0.7)
    metric.reset()
    metric.update([{"mse": 1.0}])
    assert math.isnan(metric.compute())  # never a silent 0


def test_evaluator_writes_outputs_and_metrics(tmp_path):
    pair = _label_pairs()[0]
    affine = torch.tensor([[2.0, 0, 0, 10], [0, 3.0, 0, -5], [0, 0, 1, 0], [0, 0, 0, 1]], dtype=torch.float64)
    fixed = MetaTensor(pair["fixed"], affine=affine, meta={"filename_or_obj": "/data/case_0001.nii.gz"})
    moving = MetaTensor(pair["moving"], affine=affine, meta={"filename_or_obj": "/data/case_0002.nii.gz"})
    data = [{**pair, "fixed": fixed, "moving": moving}]
    from monai.data import DataLoader

    # a linear field ddf(x) = A x: Jacobian determinant det(I + A) everywhere (analytic reference)
    A = torch.tensor([[0.1, 0.05], [-0.02, 0.2]])
    grid = torch.stack(torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij"))
    ddf = torch.einsum("ij,jhw->ihw", A, grid)[None]
    writer = PairOutputWriter(tmp_path / "out")
    saver = MetricsSaver(tmp_path / "out" / "metrics", print_table=False)
    evaluator = RegistrationEvaluator(
        device="cpu",
        val_data_loader=DataLoader(data, batch_size=1),
        network=FixedFieldNet(ddf),
        key_val_metric={"val_dice": MeanPairMetric("dice_mean")},
        val_handlers=[writer, saver],
    )
    evaluator.run()
    name = "case_0001_case_0002"
    files = {p.name for p in (tmp_path / "out").glob("*.nii.gz")}
    assert files == {f"{name}_{s}.nii.gz" for s in ("warped", "warped_label", "ddf", "jacdet")}
    ddf_img = nib.load(tmp_path / "out" / f"{name}_ddf.nii.gz")
    assert ddf_img.shape == (32, 32, 1, 2)  # Learn2Reg: vector last (2D with a singleton third axis)
    np.testing.assert_allclose(ddf_img.affine, affine.numpy())
    np.testing.assert_allclose(ddf_img.get_fdata()[:, :, 0, :], ddf[0].permute(1, 2, 0).numpy(), atol=1e-6)
    jac = nib.load(tmp_path / "out" / f"{name}_jacdet.nii.gz").get_fdata()
    np.testing.assert_allclose(jac, np.linalg.det(np.eye(2) + A.numpy()), rtol=1e-5)
    warped_label = nib.load(tmp_path / "out" / f"{name}_warped_label.nii.gz").get_fdata()
    expected = warp_labels(pair["moving_label"][None], ddf, method="nearest")[0, 0].numpy()
    np.testing.assert_array_equal(warped_label, expected)
    # metrics: per pair JSON and aggregate; spacing from the affine reaches HD95 (mm)
    report = json.loads((tmp_path / "out" / "metrics" / "metrics.json").read_text())
    per_pair = json.loads((tmp_path / "out" / "metrics" / f"{name}.json").read_text())
    assert report["pairs"][name]["dice_mean"] == pytest.approx(per_pair["dice_mean"])
    assert report["aggregate"]["dice_mean"]["mean"] == pytest.approx(per_pair["dice_mean"])
    assert evaluator.state.metrics["val_dice"] == pytest.approx(per_pair["dice_mean"])
    assert per_pair["hd95_mm"] > 0


def test_training_checkpoint_resumes(tmp_path):
    torch.manual_seed(0)

    def make(max_epochs, resume_from):
        net = TranslationNet()
        opt = torch.optim.Adam(net.parameters(), lr=0.1)
        trainer = RegistrationTrainer("cpu", max_epochs, _loader(_pairs()), net, opt, mse_loss_fn)
        TrainingCheckpoint(tmp_path, net, opt, interval=1, resume_from=resume_from).attach(trainer)
        return trainer, net, opt

    trainer, net, opt = make(2, None)
    trainer.run()
    assert latest_checkpoint(tmp_path).name == "checkpoint_epoch=2.pt"
    iterations = []
    trainer2, net2, opt2 = make(3, "latest")
    trainer2.add_event_handler(Events.ITERATION_COMPLETED, lambda e: iterations.append(e.state.iteration))
    trainer2.add_event_handler(
        Events.STARTED,
        lambda e: (np.testing.assert_allclose(net2.shift.detach(), net.shift.detach()), e.state.epoch),
    )
    trainer2.run()
    assert iterations == [5, 6]  # continued with epoch 3 only (2 iterations per epoch)
    assert opt2.state_dict()["state"][0]["step"] == 6  # optimiser state restored, then stepped twice more
    assert latest_checkpoint(tmp_path).name == "checkpoint_epoch=3.pt"
    with pytest.raises(FileNotFoundError):
        TrainingCheckpoint(tmp_path, net, opt, resume_from=tmp_path / "missing.pt").resume_path()


def test_evaluate_network_returns_and_writes(tmp_path):
    from regnet_zoo.engines.inference import evaluate_network

    pair = _label_pairs()[0]
    exact = torch.zeros(1, 2, 32, 32)
    exact[:, 1] = 2.0
    loader = torch.utils.data.DataLoader([pair, pair], batch_size=2)
    result = evaluate_network(FixedFieldNet(exact), loader, tmp_path, write_outputs=False)
    assert set(result["pairs"]) == {"pair_0000", "pair_0001"}
    assert result["aggregate"]["dice_mean"]["mean"] == pytest.approx(1.0)
    assert result["aggregate"]["dice_mean_initial"]["mean"] < 0.9
    assert (tmp_path / "metrics" / "metrics.json").is_file()
    assert not list(tmp_path.glob("*.nii.gz"))  # write_outputs=False
