"""scripts/bench_runner.py: the bare Keras script trains what the preset's config says."""

from __future__ import annotations

import importlib.util

import keras
import numpy as np
import pytest

from fashion_exp.core.data import load_arrays

from .helpers import REPO, write_dataset


def bench_runner():
    """The benchmark script as a module (scripts/ is not a package)."""
    spec = importlib.util.spec_from_file_location("bench_runner",
                                                  REPO / "scripts" / "bench_runner.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow  # trains the preset's network
def test_bare_script_trains_the_preset_with_the_overrides(tmp_path) -> None:
    bench = bench_runner()
    cfg = bench.preset_config("cnn_best", 1, ["augment.shift=0.1", "augment.flip=true",
                                                 "augment.erasing=0.5", "augment.test_flip=true",
                                                 "model.convs_per_block=[2,1]"])
    folder = write_dataset(tmp_path / "data", n_train=300, n_test=60)
    result = bench.run_bare(folder, cfg, seed=0, out=tmp_path)
    assert 0.0 <= result["test_accuracy"] <= 1.0 and result["fit_s"] > 0

    model = keras.models.load_model(tmp_path / "model.keras")
    # augment.test_flip: scored as the framework scores it, on each image and its mirror
    arrays = load_arrays(folder, verify_md5=False)
    images = arrays["x_test"][..., None] / 255.0
    probs = model.predict(images, verbose=0) + model.predict(images[:, :, ::-1], verbose=0)
    assert result["test_accuracy"] == pytest.approx(np.mean(probs.argmax(1) == arrays["y_test"]))
    kinds = [type(layer).__name__ for layer in model.layers]
    assert kinds[:3] == ["RandomTranslation", "RandomFlip", "RandomErasing"]
    convs = [layer.filters for layer in model.layers if isinstance(layer, keras.layers.Conv2D)]
    assert convs == [cfg["model"]["filters"][0]] * 2 + [cfg["model"]["filters"][1]]
    assert kinds.count("BatchNormalization") == 3
    assert type(model.optimizer).__name__ == "AdamW"
    assert model.optimizer.weight_decay == pytest.approx(cfg["optimizer"]["weight_decay"])
    assert model.loss.get_config()["label_smoothing"] == pytest.approx(0.1)


@pytest.mark.parametrize("preset", ["original", "cnn", "cnn_fast", "cnn_best"])
def test_shipped_presets_can_be_benchmarked(preset) -> None:
    cfg = bench_runner().preset_config(preset, 2)
    assert cfg["trainer"]["epochs"] == 2 and cfg["model"]["name"] in ("mlp", "cnn")


def test_presets_the_bare_script_cannot_reproduce_are_refused() -> None:
    bench = bench_runner()
    with pytest.raises(SystemExit, match="global pooling"):
        bench.preset_config("cnn", None, ["model.global_pooling=true"])
    with pytest.raises(SystemExit, match="schedule"):
        bench.preset_config("cnn_fast", None, ["schedule=plateau"])
