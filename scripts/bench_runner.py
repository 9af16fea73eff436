"""Benchmark: the framework's whole run versus a bare Keras script of the same experiment.

    python scripts/bench_runner.py                      # original experiment, seed 0
    python scripts/bench_runner.py --seeds 0 1 2        # several seeds, mean +- std
    python scripts/bench_runner.py --preset cnn_fast --seeds 0 1 2
    python scripts/bench_runner.py --epochs 5 --tracking-uri sqlite:////tmp/bench/mlflow.db

Both sides train the preset's model with its optimizer (SGD, Adam or AdamW), schedule,
batch size, epochs, label smoothing, shift/flip/erasing augmentation and validation split (the
original: MLP 256-128-32 relu, SGD lr 0.02, batch 32, 20% validation) on the same real
Fashion-MNIST files, each in a fresh Python process; the bare script runs with TensorFlow's
default CPU kernels, as a plain script gets them (--bare-onednn: with oneDNN forced on).
Wall times include interpreter start-up and imports; the framework's also includes writing
its MLflow run (params, per-epoch metrics, figures, model). Training throughput is training
images per second of fit time. Prints both, their ratios and the test accuracies.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

from fashion_exp.core.data import locate
from fashion_exp.core.runtime import ONEDNN_VAR

# The experiment as a user would write it by hand in one Keras file: float inputs scaled in
# NumPy, validation_split, default fit settings. The model and optimizer follow the preset's
# composed config (passed in as JSON), so both sides train the same network the same way.
BARE_SCRIPT = textwrap.dedent("""
    import gzip, json, math, sys, time
    import numpy as np
    import keras

    folder, seed, out, cfg = sys.argv[1], int(sys.argv[2]), sys.argv[3], json.loads(sys.argv[4])
    m, opt, tr, val = cfg["model"], cfg["optimizer"], cfg["trainer"], cfg["data"]["val_split"]
    aug = cfg["augment"]

    def idx(name, header):
        with gzip.open(f"{folder}/{name}", "rb") as f:
            return np.frombuffer(f.read(), np.uint8, offset=header)

    x_train = idx("train-images-idx3-ubyte.gz", 16).reshape(-1, 28, 28) / 255.0
    y_train = idx("train-labels-idx1-ubyte.gz", 8)
    x_test = idx("t10k-images-idx3-ubyte.gz", 16).reshape(-1, 28, 28) / 255.0
    y_test = labels = idx("t10k-labels-idx1-ubyte.gz", 8)

    keras.utils.set_random_seed(seed)
    if m["name"] == "mlp":
        layers = [keras.Input((28, 28)), keras.layers.Flatten()]
        layers += [keras.layers.Dense(w, activation="relu") for w in m["hidden"]]
    else:
        layers = [keras.Input((28, 28, 1))]
        if aug["shift"]:
            layers += [keras.layers.RandomTranslation(aug["shift"], aug["shift"],
                                                      fill_mode="constant")]
        if aug["flip"]:
            layers += [keras.layers.RandomFlip("horizontal")]
        if aug["erasing"]:
            layers += [keras.layers.RandomErasing(
                factor=(aug["erasing"], aug["erasing"]), scale=(0.02, aug["erasing_max_area"]),
                value_range=(0, 1))]
        convs = m["convs_per_block"]
        convs = convs if isinstance(convs, list) else [convs] * len(m["filters"])
        for filters, count in zip(m["filters"], convs):
            for _ in range(count):
                layers += [keras.layers.Conv2D(filters, 3, padding="same",
                                               use_bias=not m["batch_norm"])]
                layers += [keras.layers.BatchNormalization()] if m["batch_norm"] else []
                layers += [keras.layers.ReLU()]
            layers += [keras.layers.MaxPooling2D()]
        layers += [keras.layers.Flatten()]
        for width in m["dense"]:
            layers += [keras.layers.Dropout(m["dropout"]), keras.layers.Dense(width, "relu")]
        layers += [keras.layers.Dropout(m["dropout"])]
        x_train, x_test = x_train[..., None], x_test[..., None]
    model = keras.Sequential(layers + [keras.layers.Dense(10, activation="softmax")])

    lr = opt["lr"]
    if cfg["schedule"]["name"] == "one_cycle":
        total = math.ceil(round(len(x_train) * (1 - val)) / tr["batch_size"]) * tr["epochs"]
        warmup = round(0.3 * total)
        lr = keras.optimizers.schedules.CosineDecay(
            lr * cfg["schedule"]["start_lr_ratio"], total - warmup, warmup_target=lr,
            warmup_steps=warmup)
    if opt["name"] == "sgd":
        optimizer = keras.optimizers.SGD(lr)
    elif opt["weight_decay"]:
        optimizer = keras.optimizers.AdamW(lr, weight_decay=opt["weight_decay"])
    else:
        optimizer = keras.optimizers.Adam(lr)
    loss = "sparse_categorical_crossentropy"
    if tr["label_smoothing"]:
        loss = keras.losses.CategoricalCrossentropy(label_smoothing=tr["label_smoothing"])
        y_train, y_test = np.eye(10)[y_train], np.eye(10)[y_test]
    model.compile(optimizer=optimizer, loss=loss, metrics=["accuracy"])
    start = time.perf_counter()
    model.fit(x_train, y_train, epochs=tr["epochs"], batch_size=tr["batch_size"],
              validation_split=val, verbose=2)
    fit_s = time.perf_counter() - start
    loss, acc = model.evaluate(x_test, y_test, verbose=0)
    if aug.get("test_flip"):  # as the framework's augment.test_flip: average with the mirror
        probs = (model.predict(x_test, verbose=0) + model.predict(x_test[:, :, ::-1], verbose=0))
        acc = float(np.mean(probs.argmax(1) == labels))
    model.save(f"{out}/model.keras")
    print(json.dumps({"test_accuracy": acc, "fit_s": fit_s}))
""")
TRAIN_SET = 60_000  # both sides train on this minus the preset's data.val_split

SUMMARY = re.compile(r"test_accuracy=(?P<acc>[0-9.]+) .*run_id=(?P<run>[0-9a-f]+)")


def preset_config(preset: str, epochs: int | None, overrides: list[str] = ()) -> dict:
    """The composed config of an experiment preset and overrides, as plain data for the bare
    script."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from fashion_exp.config import CONF_DIR, register_configs

    register_configs()
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        given = [f"experiment={preset}", *overrides]
        cfg = compose("config", overrides=given + ([f"trainer.epochs={epochs}"] if epochs else []))
    if cfg.schedule.name not in ("constant", "one_cycle") or \
            cfg.optimizer.name not in ("sgd", "adam") or cfg.model.get("global_pooling"):
        sys.exit(f"bench_runner: the bare script does not reproduce preset {preset!r} "
                 "(global pooling, or its schedule or optimizer)")
    return OmegaConf.to_container(cfg, resolve=False)


def run_bare(folder: Path, cfg: dict, seed: int, out: Path, onednn: bool = False) -> dict:
    """Run the bare script in a fresh process with TensorFlow's default CPU kernels (or
    oneDNN forced on); returns wall time, fit time, test accuracy."""
    script = out / "bare.py"
    script.write_text(BARE_SCRIPT)
    settings = {k: cfg[k] for k in ("model", "optimizer", "schedule", "trainer", "data",
                                    "augment")}
    env = {k: v for k, v in os.environ.items() if k != ONEDNN_VAR}
    if onednn:
        env[ONEDNN_VAR] = "1"
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, str(script), str(folder), str(seed), str(out),
                           json.dumps(settings)], capture_output=True, text=True, check=True,
                          env=env)
    wall = time.perf_counter() - start
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"wall_s": wall, "fit_s": result["fit_s"], "test_accuracy": result["test_accuracy"]}


def run_framework(preset: str, epochs: int, seed: int, uri: str, out: Path,
                  extra: list[str]) -> dict:
    """Run `fashion-exp-train experiment=<preset>` in a fresh process, logging to `uri`."""
    cmd = [sys.executable, "-m", "fashion_exp.cli.train", f"experiment={preset}",
           f"trainer.epochs={epochs}", f"trainer.seed={seed}", "trainer.verbose=2",
           f"tracking.uri={uri}", f"hydra.run.dir={out / f'hydra_{seed}'}", *extra]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"framework run failed:\n{proc.stderr[-3000:]}")
    match = SUMMARY.search(proc.stdout)
    import mlflow

    mlflow.set_tracking_uri(uri)
    history = mlflow.MlflowClient().get_metric_history(match["run"], "training/epoch_seconds")
    return {"wall_s": wall, "fit_s": sum(m.value for m in history),
            "test_accuracy": float(match["acc"]), "run_id": match["run"]}


def mean_std(values: list[float]) -> str:
    """'mean +- std' of a list (std 0 for one value)."""
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.4f} +- {std:.4f}"


def images_per_s(images: int, epochs: int, fit_s: float) -> float:
    """Training images per second of fit time (validation passes included, as on both sides)."""
    return images * epochs / fit_s


def main() -> None:
    """Run both sides for every seed and print the comparison."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="original",
                        help="experiment preset: original (default) or cnn_fast")
    parser.add_argument("--epochs", type=int, default=None, help="default: the preset's")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds (default 0)")
    parser.add_argument("--tracking-uri", default=None,
                        help="MLflow store for the framework runs (default: a temporary one)")
    parser.add_argument("--skip-bare", action="store_true", help="time the framework only")
    parser.add_argument("--bare-onednn", action="store_true",
                        help="run the bare script with TF_ENABLE_ONEDNN_OPTS=1 (default: "
                             "TensorFlow's own choice, as a plain script gets)")
    parser.add_argument("overrides", nargs="*",
                        help="extra overrides of the preset, for both sides")
    args = parser.parse_args()

    folder = locate(None, download=False)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    cfg = preset_config(args.preset, args.epochs, args.overrides)
    epochs = cfg["trainer"]["epochs"]
    images = round(TRAIN_SET * (1 - cfg["data"]["val_split"]))  # training images per epoch
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        uri = args.tracking_uri or f"sqlite:///{out / 'mlruns' / 'mlflow.db'}"
        rows = []
        for seed in args.seeds:
            fw = run_framework(args.preset, epochs, seed, uri, out, args.overrides)
            bare = None if args.skip_bare else run_bare(folder, cfg, seed, out, args.bare_onednn)
            rows.append((seed, fw, bare))
            line = (f"seed {seed}: framework wall {fw['wall_s']:.1f} s (fit {fw['fit_s']:.1f} s,"
                    f" {images_per_s(images, epochs, fw['fit_s']):.0f} images/s) test_accuracy "
                    f"{fw['test_accuracy']:.4f} run {fw['run_id']}")
            if bare:
                line += (f" | bare wall {bare['wall_s']:.1f} s (fit {bare['fit_s']:.1f} s, "
                         f"{images_per_s(images, epochs, bare['fit_s']):.0f} images/s) "
                         f"test_accuracy {bare['test_accuracy']:.4f}")
            print(line, flush=True)

    fw_acc = [r[1]["test_accuracy"] for r in rows]
    fw_wall = [r[1]["wall_s"] for r in rows]
    fw_fit = [r[1]["fit_s"] for r in rows]
    print(f"\n{args.preset}, {epochs} epochs, seeds {args.seeds}")
    print(f"framework:          wall {statistics.mean(fw_wall):.1f} s, training "
          f"{images_per_s(images, epochs, statistics.mean(fw_fit)):.0f} images/s, test_accuracy "
          f"{mean_std(fw_acc)}")
    if not args.skip_bare:
        bare_acc = [r[2]["test_accuracy"] for r in rows]
        bare_wall = [r[2]["wall_s"] for r in rows]
        bare_fit = [r[2]["fit_s"] for r in rows]
        print(f"bare Keras script:  wall {statistics.mean(bare_wall):.1f} s, training "
              f"{images_per_s(images, epochs, statistics.mean(bare_fit)):.0f} images/s, "
              "test_accuracy "
              f"{mean_std(bare_acc)}")
        print(f"training throughput framework/bare: {sum(bare_fit) / sum(fw_fit):.2f}x; "
              f"wall time framework/bare: {sum(fw_wall) / sum(bare_wall):.2f} "
              "(below 1: the framework is faster)")


if __name__ == "__main__":
    main()
