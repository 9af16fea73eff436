"""What a run's metrics are called in MLflow, and how their values are written.

MLflow's charts make a section of each "prefix/" and show the sections alphabetically, before
the unprefixed "Model metrics". So the learning curves (epoch/) come first, then the learning
rate and epoch time (training/), the per-class test accuracies, and last the final values that
the runs table compares (test_accuracy, test_loss, best_val_accuracy, epochs_trained).
"""

from __future__ import annotations

import numpy as np

EPOCH_PREFIX = "epoch/"
TRAINING_PREFIX = "training/"
PER_CLASS_PREFIX = "test_class_accuracy/"
TRAINING_KEYS = ("learning_rate", "epoch_seconds")


def epoch_metric(key: str) -> str:
    """The MLflow name of a per-epoch value: 'val_accuracy' -> 'epoch/val_accuracy'."""
    return (TRAINING_PREFIX if key in TRAINING_KEYS else EPOCH_PREFIX) + key


def objective_metric(metric: str) -> str:
    """The MLflow name of the value a sweep optimizes (config optimized_metric): the best epoch
    of a per-epoch metric ('val_accuracy' -> 'best_val_accuracy'), or the test metric itself."""
    return metric if metric.startswith("test_") else f"best_{metric}"


def tidy(value: float) -> float:
    """A float32 value as the shortest decimal that reads back as it (0.695, not
    0.6949999928474426); other values unchanged."""
    value = float(value)
    single = np.float32(value)
    return float(str(single)) if np.isfinite(single) and float(single) == value else value

TEST_METRICS = ("test_accuracy", "test_loss")


def key_metrics(metric: str) -> list[str]:
    """The metrics that sum a run up for a sweep optimizing `metric` (a config
    optimized_metric): its optimized value first (e.g. best_val_accuracy), then the test
    metrics. The leaderboard's columns and a sweep view's."""
    first = objective_metric(metric)
    return [first, *(m for m in TEST_METRICS if m != first)]
