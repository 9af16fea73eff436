"""The training loop: runtime settings, compile, fit, evaluate."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf
from omegaconf import DictConfig

from fashion_exp import interrupts
from fashion_exp.core import checkpoints
from fashion_exp.core.data import CLASSES, Splits

log = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


@dataclass(frozen=True)
class Evaluation:
    """Test-set results of a trained model."""

    loss: float
    accuracy: float
    probs: np.ndarray
    per_class_accuracy: dict[str, float]
    confusion: np.ndarray
    report: str


def configure_runtime(cfg: DictConfig, threads: int) -> None:
    """Threads (0: TensorFlow's choice), seeds and determinism, before any op runs."""
    keras.backend.clear_session()  # a fresh graph for every job of an in-process sweep
    if threads and tf.config.threading.get_intra_op_parallelism_threads() != threads:
        try:
            tf.config.threading.set_intra_op_parallelism_threads(threads)
            tf.config.threading.set_inter_op_parallelism_threads(threads)
        except RuntimeError:  # TensorFlow already started in this process (earlier job)
            log.warning("%d threads ignored: TensorFlow is already running in this process",
                        threads)
    keras.utils.set_random_seed(cfg.seed)
    if cfg.deterministic:
        tf.config.experimental.enable_op_determinism()
    # Set for every run: the policy is global and would leak into the next job of a sweep.
    keras.mixed_precision.set_global_policy(cfg.precision)


def distribution(cfg: DictConfig) -> tf.distribute.Strategy:
    """trainer.strategy: TensorFlow's default (one device) or MirroredStrategy (every GPU;
    on a machine without GPUs, the CPU)."""
    if cfg.strategy == "mirrored":
        return tf.distribute.MirroredStrategy()
    return tf.distribute.get_strategy()


def use_xla(cfg: DictConfig, model_cfg: DictConfig, augmented: bool = False) -> bool:
    """trainer.jit_compile, where null means: XLA only for MLPs without dropout or
    augmentation.

    Measured on CPU: XLA speeds up a plain MLP ~1.5-2x, but dropout under XLA makes epochs
    4-5x slower, and XLA convolutions are slower too; random ops are what XLA does badly.
    """
    if cfg.jit_compile is not None:
        return bool(cfg.jit_compile)
    return model_cfg.name == "mlp" and model_cfg.dropout == 0 and not augmented


def compile_model(model: keras.Model, optimizer: keras.optimizers.Optimizer,
                  cfg: DictConfig, model_cfg: DictConfig, augmented: bool = False) -> None:
    """Cross-entropy (on one-hot targets when label smoothing is on) and accuracy."""
    if cfg.label_smoothing > 0:  # Keras smooths only one-hot targets; fit() converts them
        loss = keras.losses.CategoricalCrossentropy(label_smoothing=cfg.label_smoothing)
        accuracy = keras.metrics.CategoricalAccuracy(name="accuracy")
    else:
        loss = keras.losses.SparseCategoricalCrossentropy()
        accuracy = keras.metrics.SparseCategoricalAccuracy(name="accuracy")
    model.compile(optimizer=optimizer, loss=loss, metrics=[accuracy],
                  steps_per_execution=cfg.steps_per_execution,
                  jit_compile=use_xla(cfg, model_cfg, augmented))


# Where each epoch's values go: (metrics, epoch counted from 1); the runner passes the run's
# recorder, so that the training loop knows nothing of MLflow.
EpochSink = Callable[[dict[str, float], int], None]


class EpochLogger(keras.callbacks.Callback):
    """Hands the Keras epoch metrics, the learning rate and the epoch's seconds to `sink`, with
    the epoch counted from 1 (Keras counts from 0)."""

    def __init__(self, sink: EpochSink) -> None:
        super().__init__()
        self.sink = sink

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        interrupts.check()  # a Ctrl-C that TensorFlow swallowed still stops training

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        interrupts.check()
        metrics = {key: float(value) for key, value in (logs or {}).items()}
        lr = self.model.optimizer.learning_rate
        metrics["learning_rate"] = float(keras.ops.convert_to_numpy(lr))
        metrics["epoch_seconds"] = round(time.perf_counter() - self._start, 3)
        self.sink(metrics, epoch + 1)


class CheckpointSaver(keras.callbacks.Callback):
    """Save the model, optimizer state and history after every epoch (checkpoints.save)."""

    def __init__(self, folder: Path, history: dict[str, list[float]]) -> None:
        super().__init__()
        self.folder = folder
        self.history = {key: list(values) for key, values in history.items()}

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        for key, value in (logs or {}).items():
            self.history.setdefault(key, []).append(float(value))
        checkpoints.save(self.folder, self.model, epoch + 1, self.history)


def callbacks(cfg: DictConfig, sink: EpochSink,
              extra: list[keras.callbacks.Callback] | None = None,
              ) -> list[keras.callbacks.Callback]:
    """Log every epoch, stop on NaN; early stopping (restoring the best weights) if asked."""
    found = [EpochLogger(sink), keras.callbacks.TerminateOnNaN(), *(extra or [])]
    if cfg.early_stopping:
        found.append(keras.callbacks.EarlyStopping(
            monitor=cfg.monitor, patience=cfg.patience, restore_best_weights=True))
    return found


def targets(labels: np.ndarray, cfg: DictConfig) -> np.ndarray:
    """Integer labels, or one-hot rows when the loss smooths labels."""
    if cfg.label_smoothing > 0:
        return keras.utils.to_categorical(labels, len(CLASSES)).astype(np.float32)
    return labels


def fit(model: keras.Model, splits: Splits, cfg: DictConfig, sink: EpochSink,
        extra: list[keras.callbacks.Callback] | None = None,
        history: dict[str, list[float]] | None = None) -> dict[str, list[float]]:
    """Train on in-memory arrays, after the epochs of `history` if resuming, handing each
    epoch's values to `sink`; returns the per-epoch history of all epochs."""
    done = len((history or {}).get("loss", []))
    # A stop (Ctrl-C, SIGTERM) during training waits for the next batch's or epoch's end,
    # where EpochLogger checks for it: never between an epoch's metrics and its checkpoint
    # (logged but not saved, the epoch would be trained and logged again on resume), nor
    # inside TensorFlow's ops, which may swallow it. A second one stops at once.
    with interrupts.deferred(raise_stop=False):
        new = model.fit(
            splits.x_train, targets(splits.y_train, cfg),
            validation_data=(splits.x_val, targets(splits.y_val, cfg)),
            epochs=cfg.epochs, initial_epoch=done, batch_size=cfg.batch_size, shuffle=True,
            callbacks=callbacks(cfg, sink, extra), verbose=cfg.verbose,
        ).history
    interrupts.check()  # one that came while the last epoch ended
    history = {key: list((history or {}).get(key, [])) + [float(v) for v in values]
               for key, values in new.items()} if new else dict(history or {})
    if any(not math.isfinite(v) for v in history.get("loss", [])):
        raise TrainingDiverged(
            f"the training loss became {history['loss'][-1]} at epoch {len(history['loss'])}; "
            "lower optimizer.lr or change the optimizer"
        )
    return history


def evaluate(model: keras.Model, splits: Splits, batch_size: int = 1024) -> Evaluation:
    """Predict the test set once and derive every test metric from those probabilities."""
    return score(model.predict(splits.x_test, batch_size=batch_size, verbose=0), splits.y_test)


def score(probs: np.ndarray, labels: np.ndarray) -> Evaluation:
    """Loss, accuracy, per-class accuracy, confusion matrix and report of predictions."""
    probs = np.asarray(probs, dtype=np.float64)
    labels = labels.astype(np.int64)
    # Cross-entropy as Keras computes it for probabilities: normalized, clipped to [eps, 1-eps].
    picked = probs[np.arange(len(labels)), labels] / probs.sum(axis=1)
    loss = -np.log(np.clip(picked, 1e-7, 1 - 1e-7))
    pred = probs.argmax(axis=1)
    k = len(CLASSES)
    matrix = np.bincount(labels * k + pred, minlength=k * k).reshape(k, k)
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = matrix.diagonal() / matrix.sum(axis=1)
    return Evaluation(
        loss=float(loss.mean()),
        accuracy=float(np.mean(pred == labels)),
        probs=probs,
        per_class_accuracy={name: float(r) for name, r in zip(CLASSES, recall, strict=True)
                            if np.isfinite(r)},
        confusion=matrix,
        report=classification_report(matrix),
    )


def most_confused(matrix: np.ndarray, n: int = 5) -> list[tuple[str, str, int]]:
    """The n largest off-diagonal cells: (true class, predicted class, count)."""
    off = matrix.copy()
    np.fill_diagonal(off, 0)
    order = np.argsort(off, axis=None)[::-1][:n]
    return [(CLASSES[i], CLASSES[j], int(off[i, j]))
            for i, j in zip(*np.unravel_index(order, off.shape), strict=True) if off[i, j] > 0]


def classification_report(matrix: np.ndarray) -> str:
    """Precision, recall, F1 and support per class from a confusion matrix (true on rows)."""
    tp = matrix.diagonal().astype(float)
    support = matrix.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.nan_to_num(tp / matrix.sum(axis=0))
        recall = np.nan_to_num(tp / support)
        f1 = np.nan_to_num(2 * precision * recall / (precision + recall))
    lines = [f"{'class':>12} {'precision':>9} {'recall':>9} {'f1':>9} {'support':>8}"]
    for name, p, r, f, n in zip(CLASSES, precision, recall, f1, support, strict=True):
        lines.append(f"{name:>12} {p:9.4f} {r:9.4f} {f:9.4f} {n:8d}")
    total = support.sum()
    lines.append(f"{'accuracy':>12} {'':>9} {'':>9} {tp.sum() / max(total, 1):9.4f} {total:8d}")
    lines.append(f"{'macro avg':>12} {precision.mean():9.4f} {recall.mean():9.4f} "
                 f"{f1.mean():9.4f} {total:8d}")
    return "\n".join(lines) + "\n"


def best_value(history: dict[str, list[float]], test: dict[str, float], metric: str) -> float:
    """The value a sweeper optimizes: the best epoch of a history metric, or a test metric."""
    if metric in test:
        return test[metric]
    if metric not in history:
        allowed = ", ".join(sorted({*history, *test}))
        raise KeyError(f"optimized_metric={metric!r} was not computed; use one of {allowed}")
    values = history[metric]
    return float(min(values) if "loss" in metric else max(values))
