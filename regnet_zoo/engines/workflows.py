"""Registration trainer and evaluator on ``monai.engines`` (ignite), customised only by network and loss.

One training iteration (README "Conventions")::

    outputs = network(fixed, moving)          # dict with at least "ddf" and "warped"
    losses = loss_function(outputs, batch)    # dict with the total "loss" and one key per term
    losses["loss"].backward(); optimizer.step()

``engine.state.output`` is ``{"loss": total, "losses": {term: float}, "pred": outputs (detached)}`` for the
trainer and ``{"pred": outputs, "metrics": [per-pair metric dicts]}`` for the evaluator; the raw batch (with
its ``MetaTensor`` metadata: affines, file names) stays in ``engine.state.batch`` for handlers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from ignite.engine import Events
from monai.data import MetaTensor
from monai.engines import SupervisedEvaluator, SupervisedTrainer
from monai.engines.utils import IterationEvents
from monai.utils.enums import CommonKeys as Keys
from torch import nn

from regnet_zoo.engines.handlers import NonFiniteError, spacings_of
from regnet_zoo.engines.metrics import pair_metrics
from regnet_zoo.weights import check_finite

__all__ = ["BATCH_KEYS", "prepare_registration_batch", "RegistrationTrainer", "RegistrationEvaluator"]

#: batch keys the networks and losses read (README "Conventions")
BATCH_KEYS = ("fixed", "moving", "fixed_label", "moving_label", "fixed_keypoints", "moving_keypoints")


def prepare_registration_batch(
    batchdata: Mapping[str, Any],
    device: str | torch.device | None = None,
    non_blocking: bool = False,
    **kwargs,
) -> dict[str, torch.Tensor]:
    """The tensors of ``BATCH_KEYS`` present in ``batchdata``, as plain tensors on ``device``.

    ``MetaTensor`` metadata is dropped here (networks get plain tensors, which also keeps tracing simple); it
    remains available in ``engine.state.batch``.
    """
    if not isinstance(batchdata, Mapping) or "fixed" not in batchdata or "moving" not in batchdata:
        keys = list(batchdata) if isinstance(batchdata, Mapping) else type(batchdata).__name__
        raise ValueError(f"a registration batch is a dict with at least 'fixed' and 'moving', got {keys}")
    batch = {}
    for key in BATCH_KEYS:
        value = batchdata.get(key)
        if isinstance(value, torch.Tensor):
            if isinstance(value, MetaTensor):
                value = value.as_tensor()
            batch[key] = value.to(device=device, non_blocking=non_blocking, **kwargs)
    return batch


def prepare_regnet_batch(
    batchdata: Mapping[str, Any],
    device: str | torch.device | None = None,
    non_blocking: bool = False,
    **kwargs,
) -> dict[str, torch.Tensor]:
    """:func:`prepare_registration_batch` plus RegNet's supervision ``ddf_gt`` ``(B, N, *S)`` and
    ``ddf_mask`` ``(B, 1, *S)`` (from ``regnet_zoo.data.regnet_crop.RegNetSyntheticCropd``)."""
    batch = prepare_registration_batch(batchdata, device, non_blocking, **kwargs)
    for key in ("ddf_gt", "ddf_mask"):
        value = batchdata.get(key)
        if isinstance(value, torch.Tensor):
            if isinstance(value, MetaTensor):
                value = value.as_tensor()
            batch[key] = value.to(device=device, non_blocking=non_blocking, **kwargs)
    return batch


def _detach(outputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in outputs.items()}


class RegistrationTrainer(SupervisedTrainer):
    """``SupervisedTrainer`` whose iteration is ``loss_function(network(fixed, moving), batch)["loss"]``.

    Same arguments as :class:`monai.engines.SupervisedTrainer` (``inferer`` is not used: registration networks
    take two inputs); ``prepare_batch`` defaults to :func:`prepare_registration_batch` and ``decollate`` to
    False (outputs are dicts of batched tensors). Fires MONAI's ``IterationEvents`` like the parent.
    """

    def __init__(
        self,
        device: str | torch.device,
        max_epochs: int,
        train_data_loader: Iterable,
        network: nn.Module,
        optimizer: torch.optim.Optimizer,
        loss_function: Callable[[dict, dict], dict],
        prepare_batch: Callable = prepare_registration_batch,
        decollate: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            device=torch.device(device) if isinstance(device, str) else device,
            max_epochs=max_epochs,
            train_data_loader=train_data_loader,
            network=network,
            optimizer=optimizer,
            loss_function=loss_function,
            prepare_batch=prepare_batch,
            decollate=decollate,
            **kwargs,
        )
        # before every other COMPLETED handler (e.g. the final model saver): never finish with bad weights
        self.add_event_handler(Events.COMPLETED, _check_finite_weights)
        handlers = self._event_handlers[Events.COMPLETED]
        handlers.insert(0, handlers.pop())

    def _handle_exception(self, e: BaseException) -> None:
        # a non-finite loss skips the EXCEPTION_RAISED handlers: MONAI's CheckpointSaver(save_final) would
        # write the current weights there; the caller gets the one-line error
        if isinstance(e, NonFiniteError):
            raise e
        super()._handle_exception(e)

    def _iteration(self, engine: SupervisedTrainer, batchdata: Mapping[str, Any]) -> dict:
        batch = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking, **engine.to_kwargs)
        engine.network.train()
        engine.optimizer.zero_grad(set_to_none=engine.optim_set_to_none)
        engine.state.output = {}
        use_amp = engine.amp and engine.scaler is not None
        with torch.autocast(
            engine.state.device.type, enabled=use_amp, **(engine.amp_kwargs if use_amp else {})
        ):
            outputs = engine.network(batch["fixed"], batch["moving"])
            engine.state.output[Keys.PRED] = outputs
            engine.fire_event(IterationEvents.FORWARD_COMPLETED)
            losses = engine.loss_function(outputs, batch)
            loss = losses["loss"]
            engine.state.output[Keys.LOSS] = loss
            engine.fire_event(IterationEvents.LOSS_COMPLETED)
        if not torch.isfinite(loss):
            terms = {k: float(v) for k, v in losses.items()}
            raise NonFiniteError(
                f"non-finite training loss at iteration {engine.state.iteration} ({terms}); training "
                "stopped, the last checkpoint is kept"
            )
        if use_amp:
            engine.scaler.scale(loss).backward()
            engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
            engine.scaler.step(engine.optimizer)
            engine.scaler.update()
        else:
            loss.backward()
            engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
            _check_finite_grads(engine)  # one bad step would make every weight NaN
            engine.optimizer.step()
        engine.state.output = {
            Keys.LOSS: loss.detach(),
            "losses": {k: float(v) for k, v in losses.items()},
            Keys.PRED: _detach(outputs),
        }
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output


def _check_finite_grads(engine: SupervisedTrainer) -> None:
    for name, param in engine.network.named_parameters():
        if param.grad is not None and not torch.isfinite(param.grad).all():
            raise NonFiniteError(
                f"non-finite gradient of {name} at iteration {engine.state.iteration}; training stopped, "
                "the last checkpoint is kept"
            )


def _check_finite_weights(engine: SupervisedTrainer) -> None:
    check_finite(engine.network.state_dict(), "the trained weights")


class RegistrationEvaluator(SupervisedEvaluator):
    """``SupervisedEvaluator`` that registers each batch and computes per-pair metrics.

    Same arguments as :class:`monai.engines.SupervisedEvaluator` plus ``metric_kwargs`` for
    :func:`regnet_zoo.engines.metrics.pair_metrics` (e.g. ``labels``: the label values to evaluate).
    ``engine.state.output = {"pred": outputs, "metrics": [dict per pair]}``; use
    :class:`~regnet_zoo.engines.metrics.MeanPairMetric` as ``key_val_metric`` / ``additional_metrics``.
    """

    def __init__(
        self,
        device: str | torch.device,
        val_data_loader: Iterable,
        network: nn.Module,
        prepare_batch: Callable = prepare_registration_batch,
        decollate: bool = False,
        metric_kwargs: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            device=torch.device(device) if isinstance(device, str) else device,
            val_data_loader=val_data_loader,
            network=network,
            prepare_batch=prepare_batch,
            decollate=decollate,
            **kwargs,
        )
        self.metric_kwargs = dict(metric_kwargs or {})

    def _iteration(self, engine: SupervisedEvaluator, batchdata: Mapping[str, Any]) -> dict:
        batch = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking, **engine.to_kwargs)
        engine.state.output = {}
        with engine.mode(engine.network), torch.no_grad():
            if engine.amp:
                with torch.autocast(engine.state.device.type, **engine.amp_kwargs):
                    outputs = engine.network(batch["fixed"], batch["moving"])
            else:
                outputs = engine.network(batch["fixed"], batch["moving"])
        outputs = {
            k: v.float() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in outputs.items()
        }
        engine.state.output[Keys.PRED] = outputs
        engine.fire_event(IterationEvents.FORWARD_COMPLETED)
        kwargs = dict(getattr(engine, "metric_kwargs", {}))
        if "spacing" not in kwargs:  # mm from the fixed image's affine (HD95, TRE)
            kwargs["spacing"] = spacings_of(batchdata, outputs["ddf"].shape[0], outputs["ddf"].ndim - 2)
        engine.state.output["metrics"] = pair_metrics(outputs, batch, **kwargs)
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output
