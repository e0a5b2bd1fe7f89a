"""Registration engines on ``monai.engines``: trainer, evaluator, metrics and handlers for all bundles."""

from regnet_zoo.engines.handlers import MetricsSaver, PairOutputWriter, TrainingCheckpoint
from regnet_zoo.engines.inference import evaluate_network
from regnet_zoo.engines.metrics import MeanPairMetric, aggregate_metrics, pair_metrics
from regnet_zoo.engines.workflows import (
    RegistrationEvaluator,
    RegistrationTrainer,
    prepare_registration_batch,
    prepare_regnet_batch,
)

__all__ = [
    "RegistrationTrainer",
    "RegistrationEvaluator",
    "prepare_registration_batch",
    "prepare_regnet_batch",
    "MeanPairMetric",
    "pair_metrics",
    "aggregate_metrics",
    "PairOutputWriter",
    "MetricsSaver",
    "TrainingCheckpoint",
    "evaluate_network",
]
