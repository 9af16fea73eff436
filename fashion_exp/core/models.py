"""Keras models built from the model config. Every model takes raw uint8 images (N, 28, 28)
and returns class probabilities (N, 10): scaling to 0-1 is the model's first layer."""

from __future__ import annotations

import logging

import keras
import tensorflow as tf
from keras import layers
from omegaconf import DictConfig

from fashion_exp.schemas import IMAGE_SIDE

log = logging.getLogger(__name__)

IMAGE_SHAPE = (IMAGE_SIDE, IMAGE_SIDE)
NUM_CLASSES = 10
TEST_FLIP_SUFFIX = "_test_flip"  # the name of a with_test_flip model: its network's + this


def _inputs() -> tuple[keras.KerasTensor, keras.KerasTensor]:
    """Raw uint8 pixels in, floats in [0, 1] out."""
    raw = keras.Input(shape=IMAGE_SHAPE, dtype="uint8", name="image")
    return raw, layers.Rescaling(1.0 / 255, name="scale")(raw)


@keras.saving.register_keras_serializable(package="fashion_exp")
class FusedBatchNormalization(layers.BatchNormalization):
    """Keras' batch norm, trained with TensorFlow's fused kernel: one FusedBatchNormV3 op (and
    one for its gradient) instead of the ~10 separate ops of Keras 3's TensorFlow backend.

    Same weights and maths: normalizes with the batch's mean and (biased) variance, and keeps
    moving averages with Keras' momentum. The one difference is the kernel's Bessel-corrected
    variance in the moving average (n / (n - 1), n = batch x height x width pixels per
    channel). Inference uses Keras' own code path; plain_copy() makes the logged model plain
    Keras again, so that it loads without this package.
    """

    def call(self, inputs, training=None, mask=None):
        if not (training and self.trainable) or mask is not None or len(inputs.shape) != 4 \
                or self.axis not in (-1, 3) or self.renorm or self.synchronized \
                or not (self.center and self.scale):
            return super().call(inputs, training=training, mask=mask)
        y, mean, variance = tf.compat.v1.nn.fused_batch_norm(
            tf.cast(inputs, "float32"), tf.convert_to_tensor(self.gamma),
            tf.convert_to_tensor(self.beta), mean=tf.convert_to_tensor(self.moving_mean),
            variance=tf.convert_to_tensor(self.moving_variance), epsilon=self.epsilon,
            is_training=True, exponential_avg_factor=1.0 - self.momentum)
        self.moving_mean.assign(mean)
        self.moving_variance.assign(variance)
        return tf.cast(y, self.compute_dtype)


def plain_copy(model: keras.Model) -> keras.Model:
    """The model with every FusedBatchNormalization replaced by Keras' BatchNormalization
    (same config, weights, compile settings and optimizer state): what gets evaluated, saved
    and served."""
    if not any(isinstance(layer, FusedBatchNormalization) for layer in model.layers):
        return model

    def plain(layer: keras.layers.Layer) -> keras.layers.Layer:
        kind = layers.BatchNormalization if isinstance(layer, FusedBatchNormalization) \
            else type(layer)
        return kind.from_config(layer.get_config())

    copy = keras.models.clone_model(model, clone_function=plain)  # compiled like `model`
    copy.set_weights(model.get_weights())
    if copy.optimizer is not None and model.optimizer is not None and model.optimizer.built:
        copy.optimizer.build(copy.trainable_variables)  # a fresh optimizer: take the trained one's
        _copy_optimizer_state(model.optimizer, copy.optimizer)
    return copy


def _copy_optimizer_state(trained: keras.optimizers.Optimizer,
                          fresh: keras.optimizers.Optimizer) -> None:
    """Assign the trained optimizer's variables to the fresh one's, matched by the last two
    parts of their paths ('adam/dense_0_kernel_momentum'), not by position: a loss-scale
    optimizer (mixed_float16) rebuilt outside training lists its variables in another order,
    some twice, under other prefixes. If they do not match, the copy keeps a fresh optimizer
    (the model is what matters) and a warning says so."""
    def key(variable) -> str:
        return "/".join(variable.path.split("/")[-2:])

    mine: dict[str, list] = {}
    for variable in fresh.variables:
        mine.setdefault(key(variable), []).append(variable)
    pairs = [(variable, value) for value in trained.variables
             for variable in mine.get(key(value), [])]
    if {key(value) for value in trained.variables} != set(mine) or \
            any(tuple(v.shape) != tuple(value.shape) for v, value in pairs):
        log.warning("the logged model's optimizer starts afresh: its state could not be copied")
        return
    for variable, value in pairs:
        variable.assign(value)


def with_test_flip(model: keras.Model) -> keras.Model:
    """Test-time augmentation: a model that averages `model`'s probabilities on each image and
    on its mirror image (twice the inference cost). Built of Keras' own layers and ops, so the
    saved model loads without this package; compiled with `model`'s optimizer and loss."""
    raw = keras.Input(shape=IMAGE_SHAPE, dtype="uint8", name="image")
    mirrored = keras.ops.flip(raw, axis=2)  # left-right: the image's columns reversed
    probs = layers.Average(name="probs_test_flip", dtype="float32")(
        [model(raw), model(mirrored)])
    wrapped = keras.Model(raw, probs, name=f"{model.name}{TEST_FLIP_SUFFIX}")
    if model.compiled:
        wrapped.compile(optimizer=model.optimizer, loss=model.loss, metrics=["accuracy"])
    return wrapped


def network(model: keras.Model) -> keras.Model:
    """The trained network: the one inside a with_test_flip model, else the model itself."""
    if model.name.endswith(TEST_FLIP_SUFFIX):
        return next(layer for layer in model.layers if isinstance(layer, keras.Model))
    return model


def inference_model(model: keras.Model, augment: DictConfig | None) -> keras.Model:
    """The trained model as it is evaluated, saved and served: plain Keras batch norm
    (plain_copy) and, with augment.test_flip, test-time flips (with_test_flip)."""
    model = plain_copy(model)
    return with_test_flip(model) if augment is not None and augment.test_flip else model


def _augment(x: keras.KerasTensor, cfg: DictConfig | None) -> keras.KerasTensor:
    """Random shift, flip and erasing layers; Keras runs them in training only."""
    x = layers.Reshape((*IMAGE_SHAPE, 1), name="channel")(x)
    if cfg is None:
        return x
    if cfg.shift > 0:
        x = layers.RandomTranslation(cfg.shift, cfg.shift, fill_mode="constant",
                                     name="random_shift")(x)
    if cfg.flip:
        x = layers.RandomFlip("horizontal", name="random_flip")(x)
    if cfg.erasing > 0:
        x = layers.RandomErasing(factor=(cfg.erasing, cfg.erasing),
                                 scale=(0.02, cfg.erasing_max_area), value_range=(0, 1),
                                 name="random_erasing")(x)
    return x


def augments(cfg: DictConfig | None) -> bool:
    """Whether the augment config turns anything on."""
    return cfg is not None and (cfg.shift > 0 or cfg.flip or cfg.erasing > 0)


def _output(x: keras.KerasTensor) -> keras.KerasTensor:
    # float32 even under a mixed-precision policy: a float16 softmax loses small probabilities.
    return layers.Dense(NUM_CLASSES, activation="softmax", dtype="float32", name="probs")(x)


def build_mlp(cfg: DictConfig, augment: DictConfig | None = None,
              fused_batch_norm: bool = False) -> keras.Model:
    """Flatten, one Dense layer per width in cfg.hidden (with optional dropout), softmax."""
    raw, x = _inputs()
    if augments(augment):
        x = _augment(x, augment)
    x = layers.Flatten(name="flatten")(x)
    for i, width in enumerate(cfg.hidden):
        x = layers.Dense(width, activation=cfg.activation, name=f"dense_{i}")(x)
        if cfg.dropout > 0:
            x = layers.Dropout(cfg.dropout, name=f"dropout_{i}")(x)
    return keras.Model(raw, _output(x), name="mlp")


def block_convs(cfg: DictConfig) -> list[int]:
    """Conv layers in each block: cfg.convs_per_block is one count for all or one per block."""
    counts = cfg.convs_per_block
    return [int(c) for c in counts] if not isinstance(counts, int) else [counts] * len(cfg.filters)


def build_cnn(cfg: DictConfig, augment: DictConfig | None = None,
              fused_batch_norm: bool = False) -> keras.Model:
    """Conv blocks (conv [+BN] x convs_per_block, pooling), then Dense layers and softmax;
    batch norm trained with the fused kernel if asked (FusedBatchNormalization)."""
    norm = FusedBatchNormalization if fused_batch_norm else layers.BatchNormalization
    raw, x = _inputs()
    x = _augment(x, augment)
    pool = layers.MaxPooling2D if cfg.pooling == "max" else layers.AveragePooling2D
    for b, (filters, convs) in enumerate(zip(cfg.filters, block_convs(cfg), strict=True)):
        for c in range(convs):
            name = f"block{b}_conv{c}"
            x = layers.Conv2D(filters, cfg.kernel_size, padding="same",
                              use_bias=not cfg.batch_norm, name=name)(x)
            if cfg.batch_norm:
                x = norm(name=f"{name}_bn")(x)
            x = layers.Activation(cfg.activation, name=f"{name}_act")(x)
        x = pool(2, name=f"block{b}_pool")(x)
    if cfg.global_pooling:
        x = layers.GlobalAveragePooling2D(name="global_pool")(x)
    else:
        x = layers.Flatten(name="flatten")(x)
    for i, width in enumerate(cfg.dense):
        if cfg.dropout > 0:
            x = layers.Dropout(cfg.dropout, name=f"dropout_{i}")(x)
        x = layers.Dense(width, activation=cfg.activation, name=f"dense_{i}")(x)
    if cfg.dropout > 0:
        x = layers.Dropout(cfg.dropout, name="dropout_out")(x)
    return keras.Model(raw, _output(x), name="cnn")


BUILDERS = {"mlp": build_mlp, "cnn": build_cnn}


def build_model(cfg: DictConfig, augment: DictConfig | None = None,
                fused_batch_norm: bool = False) -> keras.Model:
    """The model that cfg.name names, with the augment config's layers after the input (and
    its batch norm layers, if any, trained with the fused kernel if asked)."""
    return BUILDERS[cfg.name](cfg, augment, fused_batch_norm)
