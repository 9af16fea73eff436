"""Keras optimizers and learning-rate schedules built from the optimizer and schedule configs."""

from __future__ import annotations

import keras
from omegaconf import DictConfig


def learning_rate(lr: float, cfg: DictConfig, steps_per_epoch: int,
                  epochs: int) -> float | keras.optimizers.schedules.LearningRateSchedule:
    """optimizer.lr as the schedule config says: constant (also for plateau, whose callback
    changes it), cosine decay with optional warm-up, or one cycle."""
    if cfg.name in ("constant", "plateau"):
        return lr
    total = max(1, steps_per_epoch * epochs)
    warmup = min(total - 1, round(cfg.warmup_epochs * steps_per_epoch))
    if cfg.name == "one_cycle":
        warmup = warmup or round(0.3 * total)
        start = lr * cfg.start_lr_ratio
    else:  # cosine: warm up from 0, if at all
        start = 0.0 if warmup else lr
    return keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=start, decay_steps=total - warmup, alpha=cfg.min_lr_ratio,
        warmup_target=lr if warmup else None, warmup_steps=warmup)


def plateau_callback(cfg: DictConfig, lr: float) -> keras.callbacks.Callback | None:
    """ReduceLROnPlateau for schedule=plateau, else None."""
    if cfg.name != "plateau":
        return None
    return keras.callbacks.ReduceLROnPlateau(monitor=cfg.monitor, factor=cfg.factor,
                                             patience=cfg.patience,
                                             min_lr=lr * cfg.min_lr_ratio)


def build_optimizer(cfg: DictConfig, schedule: DictConfig | None = None,
                    steps_per_epoch: int = 1, epochs: int = 1) -> keras.optimizers.Optimizer:
    """The optimizer that cfg.name names, with its learning rate (schedule) and settings."""
    lr = cfg.lr if schedule is None else learning_rate(cfg.lr, schedule, steps_per_epoch, epochs)
    decay = cfg.weight_decay or None
    if cfg.name == "sgd":
        return keras.optimizers.SGD(lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                                    weight_decay=decay)
    if cfg.name == "adam":
        if decay:
            return keras.optimizers.AdamW(lr, weight_decay=decay, beta_1=cfg.beta_1,
                                          beta_2=cfg.beta_2)
        return keras.optimizers.Adam(lr, beta_1=cfg.beta_1, beta_2=cfg.beta_2)
    if cfg.name == "rmsprop":
        return keras.optimizers.RMSprop(lr, rho=cfg.rho, momentum=cfg.momentum,
                                        weight_decay=decay)
    raise ValueError(f"optimizer.name={cfg.name!r}: use sgd, adam or rmsprop")
