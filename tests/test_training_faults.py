"""Training under faults: a run killed with SIGKILL mid-epoch and resumed ends with the uninterrupted run's
weights (bit for bit, CPU, fixed seed); a non-finite loss stops training and keeps the last good checkpoint;
checkpoint writes are atomic and refuse non-finite weights.

The killed run is a real (forked) process that sends itself SIGKILL at the start of
one iteration; the data pipeline draws from torch (shuffling, dropout), numpy and Python's ``random``, so
all three RNG states and the loader order must be restored for equality.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import random
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from ignite.engine import Events
from torch import nn
from torch.utils.data import DataLoader, Dataset

from regnet_zoo.core.spatial import warp_image
from regnet_zoo.engines.handlers import (
    NonFiniteError,
    TrainingCheckpoint,
    latest_checkpoint,
    save_weights_file,
)
from regnet_zoo.engines.workflows import RegistrationTrainer

EPOCHS, PAIRS, BATCH = 3, 8, 2  # 4 iterations per epoch, 12 in all
KILL_AT = 7  # killed at the start of iteration 7: mid-epoch 2, latest checkpoint after iteration 6


class NoisyPairs(Dataset):
    """Fixed random pairs plus noise drawn from numpy and Python's ``random`` at every fetch."""

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(1)
        self.images = torch.rand(PAIRS, 2, 1, 12, 12, generator=g)

    def __len__(self) -> int:
        return PAIRS

    def __getitem__(self, i: int) -> dict:
        noise = torch.from_numpy(np.random.normal(0, 0.05, (1, 12, 12)).astype(np.float32))
        scale = 0.9 + 0.2 * random.random()
        return {"fixed": self.images[i, 0] + noise, "moving": self.images[i, 1] * scale}


class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 3, padding=1)
        self.drop = nn.Dropout(0.2)  # torch RNG during training

    def forward(self, fixed, moving):
        ddf = self.drop(self.conv(torch.cat([fixed, moving], 1)))
        return {"ddf": ddf, "warped": warp_image(moving, ddf)}


def _mse(outputs: dict, batch: dict) -> dict:
    loss = ((outputs["warped"] - batch["fixed"]) ** 2).mean()
    return {"loss": loss}


def train(folder: Path, resume: bool = False, kill_at: int = 0, loss_function=_mse) -> dict:
    """Train TinyNet with per-iteration checkpoints in ``folder``; returns the final state dict."""
    torch.manual_seed(0), np.random.seed(0), random.seed(0)
    net = TinyNet()
    optimizer = torch.optim.Adam(net.parameters(), lr=0.05)
    loader = DataLoader(NoisyPairs(), batch_size=BATCH, shuffle=True, num_workers=0)
    trainer = RegistrationTrainer("cpu", EPOCHS, loader, net, optimizer, loss_function)
    TrainingCheckpoint(
        folder, net, optimizer, interval=0, iteration_interval=1, n_saved=2,
        resume_from="latest" if resume else None,
    ).attach(trainer)
    if kill_at:
        trainer.add_event_handler(
            Events.ITERATION_STARTED(once=kill_at), lambda e: os.kill(os.getpid(), signal.SIGKILL)
        )
    trainer.run()
    return net.state_dict()


def test_sigkill_mid_epoch_then_resume_equals_uninterrupted(tmp_path):
    torch.set_num_threads(1)
    reference = train(tmp_path / "uninterrupted")
    # the killed run: a forked process (no second interpreter start-up) that SIGKILLs itself mid-epoch
    child = multiprocessing.get_context("fork").Process(target=_killed_run, args=(tmp_path / "run", KILL_AT))
    child.start()
    child.join(timeout=120)
    if child.is_alive():
        child.kill()
        child.join()
        pytest.fail("the forked training run hung")
    assert child.exitcode == -signal.SIGKILL
    assert latest_checkpoint(tmp_path / "run").name == f"checkpoint_iteration={KILL_AT - 1}.pt"
    assert not list((tmp_path / "run").glob("*.tmp"))
    # control (shows the check can fail): the same checkpoint without its RNG states resumes differently
    state = torch.load(latest_checkpoint(tmp_path / "run"), weights_only=True)
    del state["rng"]
    (tmp_path / "norng").mkdir()
    torch.save(state, tmp_path / "norng" / f"checkpoint_iteration={KILL_AT - 1}.pt")
    naive = train(tmp_path / "norng", resume=True)
    assert not all(torch.equal(naive[k], v) for k, v in reference.items())

    resumed = train(tmp_path / "run", resume=True)
    assert latest_checkpoint(tmp_path / "run").name == f"checkpoint_iteration={EPOCHS * PAIRS // BATCH}.pt"
    for key, value in reference.items():
        assert torch.equal(resumed[key], value), key


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    from monai.handlers import CheckpointSaver

    def nan_at_5(outputs, batch):
        loss = _mse(outputs, batch)["loss"]
        nan_at_5.calls += 1
        return {"loss": loss * math.nan if nan_at_5.calls == 5 else loss}

    nan_at_5.calls = 0
    torch.manual_seed(0)
    net = TinyNet()
    optimizer = torch.optim.Adam(net.parameters(), lr=0.05)
    loader = DataLoader(NoisyPairs(), batch_size=BATCH, shuffle=True)
    trainer = RegistrationTrainer("cpu", EPOCHS, loader, net, optimizer, nan_at_5)
    TrainingCheckpoint(tmp_path, net, optimizer, interval=0, iteration_interval=1, n_saved=10).attach(trainer)
    # the bundles' final-model saver: it also saves on an exception, which must not happen here
    CheckpointSaver(str(tmp_path), {"model": net}, save_final=True, final_filename="model.pt").attach(trainer)
    with pytest.raises(NonFiniteError, match="non-finite training loss at iteration 5.*checkpoint is kept"):
        trainer.run()
    assert not (tmp_path / "model.pt").exists()
    assert latest_checkpoint(tmp_path).name == "checkpoint_iteration=4.pt"
    for path in tmp_path.glob("*.pt"):
        state = torch.load(path, weights_only=True)
        assert all(torch.isfinite(v).all() for v in state["model"].values()), path


def test_weights_writes_are_atomic_and_refuse_nan(tmp_path):
    path = save_weights_file({"w": torch.ones(3)}, tmp_path / "model.pt")
    with pytest.raises(NonFiniteError, match=r"model.pt: non-finite values in model\.w"):
        save_weights_file({"model": {"w": torch.tensor([1.0, math.nan])}}, path)
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.ones(3))  # the good file is kept

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):  # a write failing halfway leaves the old file
        save_weights_file({"w": torch.zeros(3), "x": Unpicklable()}, path)
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]


def _killed_run(folder: Path, kill_at: int) -> None:
    torch.set_num_threads(1)  # a forked child must not reuse the parent's OpenMP thread pool
    train(folder, kill_at=kill_at)
