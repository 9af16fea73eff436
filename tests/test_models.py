"""Model and optimizer builders: shapes, parameter counts, raw uint8 input."""

from __future__ import annotations

import keras
import numpy as np
import pytest
from omegaconf import OmegaConf

from fashion_exp.core.models import build_model
from fashion_exp.core.optim import build_optimizer, learning_rate, plateau_callback
from fashion_exp.schemas import (
    OPTION_SCHEMAS,
    AugmentConfig,
    CNNConfig,
    ConstantSchedule,
    CosineSchedule,
    MLPConfig,
    OneCycleSchedule,
    PlateauSchedule,
    TrainerConfig,
)


def cfg_of(schema, **values):
    return OmegaConf.merge(OmegaConf.structured(schema), values)


def test_original_mlp_has_the_original_layers_and_parameter_count() -> None:
    model = build_model(cfg_of(MLPConfig))
    dense = [layer for layer in model.layers if isinstance(layer, keras.layers.Dense)]
    assert [d.units for d in dense] == [256, 128, 32, 10]
    expected = (784 * 256 + 256) + (256 * 128 + 128) + (128 * 32 + 32) + (32 * 10 + 10)
    assert model.count_params() == expected == 238_314


@pytest.mark.parametrize("values", [
    {}, {"filters": [16], "dense": []}, {"filters": [8, 16, 32], "convs_per_block": 2,
                                         "batch_norm": True, "global_pooling": True},
    {"pooling": "avg", "kernel_size": 5, "dropout": 0.0},
])
def test_cnn_variants_map_raw_images_to_probabilities(values) -> None:
    model = build_model(cfg_of(CNNConfig, **values))
    images = np.random.default_rng(0).integers(0, 256, (4, 28, 28)).astype(np.uint8)
    probs = keras.ops.convert_to_numpy(model(images))
    assert probs.shape == (4, 10)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)


def test_cnn_blocks_take_one_conv_count_each_or_one_for_all() -> None:
    def convs(model: keras.Model) -> list[str]:
        return [layer.name for layer in model.layers if isinstance(layer, keras.layers.Conv2D)]

    per_block = build_model(cfg_of(CNNConfig, filters=[8, 16], convs_per_block=[1, 3]))
    assert convs(per_block) == ["block0_conv0", "block1_conv0", "block1_conv1", "block1_conv2"]
    assert [per_block.get_layer(n).filters for n in convs(per_block)] == [8, 16, 16, 16]
    for_all = build_model(cfg_of(CNNConfig, filters=[8, 16], convs_per_block=2))
    assert convs(for_all) == ["block0_conv0", "block0_conv1", "block1_conv0", "block1_conv1"]


def test_cnn_parameter_count_follows_config() -> None:
    model = build_model(cfg_of(CNNConfig, filters=[8], dense=[], dropout=0.0))
    # conv 3x3x1x8 + 8 bias; 14*14*8 flattened -> 10 classes.
    assert model.count_params() == (9 * 8 + 8) + (14 * 14 * 8 * 10 + 10)


def test_scaling_is_part_of_the_model() -> None:
    model = build_model(cfg_of(MLPConfig, hidden=[4]))
    assert model.inputs[0].dtype == "uint8"
    scale = model.get_layer("scale")
    out = keras.ops.convert_to_numpy(scale(np.full((1, 28, 28), 255, np.uint8)))
    np.testing.assert_allclose(out, 1.0)


@pytest.mark.parametrize(("name", "decay", "cls"), [
    ("sgd", 0.0, keras.optimizers.SGD), ("adam", 0.0, keras.optimizers.Adam),
    ("adam", 1e-4, keras.optimizers.AdamW), ("rmsprop", 0.0, keras.optimizers.RMSprop),
])
def test_optimizer_builder(name, decay, cls) -> None:
    opt = build_optimizer(cfg_of(OPTION_SCHEMAS["optimizer"][name], lr=0.03, weight_decay=decay))
    assert type(opt) is cls
    assert float(keras.ops.convert_to_numpy(opt.learning_rate)) == pytest.approx(0.03)


def test_score_matches_keras_and_counts_confusions() -> None:
    from fashion_exp.core.training import most_confused, score

    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(10), 200).astype(np.float32)
    labels = rng.integers(0, 10, 200).astype(np.uint8)
    result = score(probs, labels)
    expected = keras.ops.convert_to_numpy(
        keras.losses.sparse_categorical_crossentropy(labels.astype(np.int64), probs)).mean()
    assert result.loss == pytest.approx(float(expected), rel=1e-5)
    assert result.accuracy == pytest.approx(np.mean(probs.argmax(1) == labels))
    assert result.confusion.sum() == 200
    assert result.confusion.diagonal().sum() == round(result.accuracy * 200)
    pairs = most_confused(result.confusion, n=3)
    counts = [c for _, _, c in pairs]
    assert counts == sorted(counts, reverse=True) and len(pairs) == 3
    off = result.confusion - np.diag(result.confusion.diagonal())
    assert counts[0] == off.max()


@pytest.mark.parametrize(("model", "forced", "expected"), [
    ({"name": "mlp", "dropout": 0.0}, None, True),
    ({"name": "mlp", "dropout": 0.2}, None, False),
    ({"name": "cnn", "dropout": 0.0}, None, False),
    ({"name": "cnn", "dropout": 0.2}, True, True),
    ({"name": "mlp", "dropout": 0.0}, False, False),
])
def test_xla_by_default_only_where_it_is_faster(model, forced, expected) -> None:
    from fashion_exp.core.training import use_xla

    trainer = OmegaConf.create({"jit_compile": forced})
    assert use_xla(trainer, OmegaConf.create(model)) is expected


def lr_at(schedule, step: int) -> float:
    return float(keras.ops.convert_to_numpy(schedule(step)))


def test_cosine_and_one_cycle_schedules_follow_their_shape() -> None:
    cosine = learning_rate(0.1, cfg_of(CosineSchedule, min_lr_ratio=0.1), 10, 5)
    assert lr_at(cosine, 0) == pytest.approx(0.1)
    assert lr_at(cosine, 25) == pytest.approx(0.1 * (0.1 + 0.9 * 0.5), rel=1e-4)  # half-way
    assert lr_at(cosine, 50) == pytest.approx(0.01, rel=1e-4)
    warm = learning_rate(0.1, cfg_of(CosineSchedule, warmup_epochs=1), 10, 5)
    assert lr_at(warm, 0) == pytest.approx(0.0) and lr_at(warm, 10) == pytest.approx(0.1)
    cycle = learning_rate(0.1, cfg_of(OneCycleSchedule), 10, 10)
    peak = 30  # 30% of 100 steps
    assert lr_at(cycle, 0) == pytest.approx(0.004)
    assert lr_at(cycle, peak) == pytest.approx(0.1)
    assert lr_at(cycle, peak // 2) < 0.1 and lr_at(cycle, 100) == pytest.approx(0.0, abs=1e-6)
    steps = [lr_at(cycle, s) for s in range(peak, 101, 10)]
    assert steps == sorted(steps, reverse=True)


def test_constant_and_plateau_keep_the_rate_and_plateau_adds_its_callback() -> None:
    assert learning_rate(0.1, cfg_of(ConstantSchedule), 10, 5) == 0.1
    plateau = cfg_of(PlateauSchedule, factor=0.2, patience=3, min_lr_ratio=0.01)
    assert learning_rate(0.1, plateau, 10, 5) == 0.1
    callback = plateau_callback(plateau, 0.1)
    assert isinstance(callback, keras.callbacks.ReduceLROnPlateau)
    assert (callback.factor, callback.patience, callback.min_lr) == (0.2, 3, pytest.approx(1e-3))
    assert plateau_callback(cfg_of(ConstantSchedule), 0.1) is None


def test_augmentation_runs_in_training_only() -> None:
    augment = cfg_of(AugmentConfig, shift=0.2, flip=True, erasing=1.0)
    model = build_model(cfg_of(CNNConfig, filters=[4], dense=[], dropout=0.0), augment)
    assert {"random_shift", "random_flip", "random_erasing"} <= {la.name for la in model.layers}
    images = np.random.default_rng(0).integers(0, 256, (8, 28, 28)).astype(np.uint8)
    keras.utils.set_random_seed(0)
    inference = [keras.ops.convert_to_numpy(model(images, training=False)) for _ in range(2)]
    training = [keras.ops.convert_to_numpy(model(images, training=True)) for _ in range(2)]
    np.testing.assert_array_equal(inference[0], inference[1])
    assert not np.allclose(training[0], inference[0]) and not np.allclose(training[0], training[1])


def tiny_fit(trainer: dict, model_cfg=None) -> dict:
    """Compile and fit a tiny model for one epoch the way the runner does; what the epoch
    logger hands on is collected."""
    from fashion_exp.core import training
    from fashion_exp.core.data import Splits

    cfg = cfg_of(TrainerConfig, epochs=1, batch_size=16, verbose=0, **trainer)
    training.configure_runtime(cfg, threads=0)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (64, 28, 28)).astype(np.uint8)
    y = (np.arange(64) % 10).astype(np.uint8)
    splits = Splits(x, y, x[:16], y[:16], x[:16], y[:16], source="synthetic")
    model_cfg = model_cfg or cfg_of(CNNConfig, filters=[4], dense=[8])
    epochs: list[tuple[dict[str, float], int]] = []
    try:
        with training.distribution(cfg).scope():
            model = build_model(model_cfg, fused_batch_norm=cfg.fused_batch_norm)
            training.compile_model(model, keras.optimizers.Adam(1e-3), cfg, model_cfg)
        history = training.fit(model, splits, cfg, lambda m, e: epochs.append((m, e)))
        probs = training.evaluate(model, splits).probs
    finally:
        keras.mixed_precision.set_global_policy("float32")
    (logged, epoch), = epochs  # one epoch, counted from 1, with the learning rate and time
    assert epoch == 1 and {"loss", "learning_rate", "epoch_seconds"} <= set(logged)
    return {"history": history, "probs": probs, "model": model}


def test_label_smoothing_trains_on_one_hot_targets() -> None:
    from fashion_exp.core.training import targets

    cfg = cfg_of(TrainerConfig, label_smoothing=0.1)
    assert targets(np.array([3, 0], np.uint8), cfg).tolist()[0][3] == 1.0
    out = tiny_fit({"label_smoothing": 0.1})
    assert set(out["history"]) >= {"loss", "accuracy", "val_loss", "val_accuracy"}
    assert isinstance(out["model"].loss, keras.losses.CategoricalCrossentropy)


@pytest.mark.slow  # each trains and logs a model with a rebuilt optimizer: ~15 s
@pytest.mark.parametrize("trainer", [{"precision": "mixed_bfloat16"},
                                     {"precision": "mixed_float16"},
                                     {"strategy": "mirrored"}])
def test_gpu_options_do_not_break_cpu_runs(trainer) -> None:
    from fashion_exp.core.models import inference_model

    out = tiny_fit(trainer)
    assert np.isfinite(out["history"]["loss"]).all()
    # with batch norm, in both kernels: the fused one takes float16/bfloat16 inputs too
    for fused in (True, False):
        normed = tiny_fit(trainer | {"fused_batch_norm": fused},
                          cfg_of(CNNConfig, filters=[4], dense=[8], batch_norm=True))
        assert np.isfinite(normed["history"]["loss"]).all()
        np.testing.assert_allclose(normed["probs"].sum(axis=1), 1.0, rtol=1e-3)
        # logged as the runner logs it, with test-time flips
        logged = inference_model(normed["model"], cfg_of(AugmentConfig, test_flip=True))
        images = np.random.default_rng(2).integers(0, 256, (8, 28, 28)).astype(np.uint8)
        np.testing.assert_allclose(logged.predict(images, verbose=0).sum(axis=1), 1.0,
                                   rtol=1e-3)
    assert out["probs"].shape == (16, 10)
    np.testing.assert_allclose(out["probs"].sum(1), 1.0, rtol=1e-3)
    if "precision" in trainer:
        assert out["model"].get_layer("block0_conv0").compute_dtype == trainer["precision"][6:]
        assert out["model"].get_layer("probs").compute_dtype == "float32"


def test_fused_batch_norm_trains_like_keras_batch_norm() -> None:
    """Same outputs, gradients and moving statistics as Keras' layer, in one fused op."""
    import tensorflow as tf

    from fashion_exp.core.models import FusedBatchNormalization

    rng = np.random.default_rng(0)
    x = tf.constant(rng.normal(2.0, 3.0, (64, 14, 14, 5)), tf.float32)
    weights = tf.constant(rng.normal(0.0, 1.0, x.shape), tf.float32)  # a loss with real gradients
    layers = [keras.layers.BatchNormalization(momentum=0.9), FusedBatchNormalization(momentum=0.9)]
    results = []
    for layer in layers:
        layer.build(x.shape)
        layer.gamma.assign(np.linspace(0.5, 1.5, 5))
        layer.beta.assign(np.linspace(-1, 1, 5))
        with tf.GradientTape() as tape:
            tape.watch(x)
            out = layer(x, training=True)
            loss = tf.reduce_sum(out * weights)
        grads = tape.gradient(loss, [x, layer.gamma, layer.beta])
        graph = tf.function(lambda t, layer=layer: layer(t, training=True)) \
            .get_concrete_function(x).graph
        ops = {op.type for op in graph.get_operations()}
        assert ("FusedBatchNormV3" in ops) is isinstance(layer, FusedBatchNormalization), ops
        results.append([out, *grads, layer.moving_mean, layer.moving_variance,
                        layer(x, training=False)])
    keras_bn, fused = ([np.asarray(v) for v in values] for values in results)
    n = 64 * 14 * 14  # the fused kernel's moving variance is Bessel-corrected: n / (n - 1)
    keras_bn[5] = 0.9 + (keras_bn[5] - 0.9) * n / (n - 1)
    for name, a, b in zip(["output", "dx", "dgamma", "dbeta", "moving mean", "moving variance",
                           "inference output"], keras_bn, fused, strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4, err_msg=name)
    assert not np.allclose(fused[4], 0.0)  # the moving mean did move


def test_fused_batch_norm_model_is_logged_as_plain_keras(tmp_path) -> None:
    from fashion_exp.core.models import FusedBatchNormalization, plain_copy

    cfg = cfg_of(CNNConfig, filters=[4, 8], batch_norm=True, dense=[8])
    model = build_model(cfg, fused_batch_norm=True)
    assert sum(isinstance(la, FusedBatchNormalization) for la in model.layers) == 2
    images = np.random.default_rng(0).integers(0, 256, (64, 28, 28)).astype(np.uint8)
    model.compile("adam", "sparse_categorical_crossentropy")
    model.fit(images, np.arange(64) % 10, epochs=1, batch_size=16, verbose=0)
    plain = plain_copy(model)
    assert not any(isinstance(la, FusedBatchNormalization) for la in plain.layers)
    assert [type(la) for la in plain.layers if "_bn" in la.name] == \
        [keras.layers.BatchNormalization] * 2
    np.testing.assert_allclose(plain.predict(images, verbose=0), model.predict(images, verbose=0),
                               rtol=1e-6)
    assert plain.optimizer.iterations.numpy() == model.optimizer.iterations.numpy() == 4
    for mine, trained in zip(plain.optimizer.variables, model.optimizer.variables, strict=True):
        np.testing.assert_array_equal(mine.numpy(), trained.numpy())
    assert "fashion_exp" not in plain.to_json()  # loads where this package is not installed
    plain.save(tmp_path / "model.keras")
    loaded = keras.models.load_model(tmp_path / "model.keras")
    np.testing.assert_allclose(loaded.predict(images, verbose=0), plain.predict(images, verbose=0),
                               rtol=1e-6)
    assert plain_copy(plain) is plain  # nothing to replace: the same model


def test_test_flip_averages_each_image_and_its_mirror(tmp_path) -> None:
    from fashion_exp.core.models import inference_model, network, with_test_flip

    model = build_model(cfg_of(CNNConfig, filters=[4], batch_norm=True, dense=[]),
                        fused_batch_norm=True)
    model.compile("adam", "sparse_categorical_crossentropy")
    images = np.random.default_rng(1).integers(0, 256, (32, 28, 28)).astype(np.uint8)
    model.fit(images, np.arange(32) % 10, epochs=1, batch_size=16, verbose=0)
    plain = inference_model(model, cfg_of(AugmentConfig))
    assert plain.name == "cnn" and not plain.name.endswith("test_flip")
    flipped = inference_model(model, cfg_of(AugmentConfig, test_flip=True))
    assert flipped.name == "cnn_test_flip"
    probs, mirror_probs = (plain.predict(x, verbose=0) for x in (images, images[:, :, ::-1]))
    assert not np.allclose(probs, mirror_probs, atol=1e-3)  # the network is not symmetric
    tta = flipped.predict(images, verbose=0)
    np.testing.assert_allclose(tta, (probs + mirror_probs) / 2, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(tta.sum(axis=1), 1.0, rtol=1e-5)
    # an image and its mirror get the same answer; the batch's order is kept
    np.testing.assert_allclose(flipped.predict(images[:, :, ::-1], verbose=0), tta, rtol=1e-5,
                               atol=1e-6)
    assert "fashion_exp" not in flipped.to_json()  # plain Keras layers and ops only
    flipped.save(tmp_path / "model.keras")
    loaded = keras.models.load_model(tmp_path / "model.keras")  # safe mode
    np.testing.assert_allclose(loaded.predict(images, verbose=0), tta, rtol=1e-6)
    assert loaded.output.dtype == "float32" and loaded.input.dtype == "uint8"
    assert with_test_flip(plain).optimizer is plain.optimizer
    loss, accuracy = loaded.evaluate(images, np.arange(32) % 10, verbose=0)  # compiled, metric
    assert accuracy == pytest.approx(np.mean(tta.argmax(1) == np.arange(32) % 10))
    assert network(flipped).name == "cnn" and network(plain) is plain
