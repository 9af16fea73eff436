"""Model and optimizer builders: shapes, parameter counts, raw uint8 input."""

from __future__ import annotations

import keras
import numpy as np
import pytest
from omegaconf import OmegaConf

from fashion_exp.config import CNNConfig, MLPConfig, OptimizerConfig
from fashion_exp.models import build_model
from fashion_exp.optim import build_optimizer


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
    opt = build_optimizer(cfg_of(OptimizerConfig, name=name, lr=0.03, weight_decay=decay))
    assert type(opt) is cls
    assert float(keras.ops.convert_to_numpy(opt.learning_rate)) == pytest.approx(0.03)


def test_score_matches_keras_and_counts_confusions() -> None:
    from fashion_exp.training import most_confused, score

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
    from fashion_exp.training import use_xla

    trainer = OmegaConf.create({"jit_compile": forced})
    assert use_xla(trainer, OmegaConf.create(model)) is expected
