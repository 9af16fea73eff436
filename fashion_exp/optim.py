"""Keras optimizers built from the optimizer config."""

from __future__ import annotations

import keras
from omegaconf import DictConfig


def build_optimizer(cfg: DictConfig) -> keras.optimizers.Optimizer:
    """The optimizer that cfg.name names, with its learning rate and settings."""
    decay = cfg.weight_decay or None
    if cfg.name == "sgd":
        return keras.optimizers.SGD(cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                                    weight_decay=decay)
    if cfg.name == "adam":
        if decay:
            return keras.optimizers.AdamW(cfg.lr, weight_decay=decay, beta_1=cfg.beta_1,
                                          beta_2=cfg.beta_2)
        return keras.optimizers.Adam(cfg.lr, beta_1=cfg.beta_1, beta_2=cfg.beta_2)
    if cfg.name == "rmsprop":
        return keras.optimizers.RMSprop(cfg.lr, rho=cfg.rho, momentum=cfg.momentum,
                                        weight_decay=decay)
    raise ValueError(f"optimizer.name={cfg.name!r}: use sgd, adam or rmsprop")
