"""Benchmark: the framework's whole run versus a bare Keras script of the same experiment.

    python scripts/bench_runner.py                      # original experiment, seed 0
    python scripts/bench_runner.py --seeds 0 1 2        # several seeds, mean +- std
    python scripts/bench_runner.py --epochs 5 --tracking-uri sqlite:////tmp/bench/mlflow.db

Both sides train the original MLP (256-128-32 relu, SGD lr 0.02, batch 32, 20% validation)
on the same real Fashion-MNIST files, each in a fresh Python process, and both wall times
include interpreter start-up and imports. The framework side also includes writing its MLflow
run (params, per-epoch metrics, figures, model). Prints a table and the ratio.
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

from fashion_exp.data import locate

# The original one-file project's training, as a user would write it by hand.
BARE_SCRIPT = textwrap.dedent("""
    import gzip, json, sys, time
    import numpy as np
    import keras

    folder, epochs, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])

    def idx(name, header):
        with gzip.open(f"{folder}/{name}", "rb") as f:
            return np.frombuffer(f.read(), np.uint8, offset=header)

    x_train = idx("train-images-idx3-ubyte.gz", 16).reshape(-1, 28, 28) / 255.0
    y_train = idx("train-labels-idx1-ubyte.gz", 8)
    x_test = idx("t10k-images-idx3-ubyte.gz", 16).reshape(-1, 28, 28) / 255.0
    y_test = idx("t10k-labels-idx1-ubyte.gz", 8)

    keras.utils.set_random_seed(seed)
    model = keras.Sequential([
        keras.Input((28, 28)),
        keras.layers.Flatten(),
        keras.layers.Dense(256, activation="relu"),
        keras.layers.Dense(128, activation="relu"),
        keras.layers.Dense(32, activation="relu"),
        keras.layers.Dense(10, activation="softmax"),
    ])
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=0.02),
                  loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    start = time.perf_counter()
    model.fit(x_train, y_train, epochs=epochs, batch_size=32, validation_split=0.2, verbose=2)
    fit_s = time.perf_counter() - start
    loss, acc = model.evaluate(x_test, y_test, verbose=0)
    model.save(f"{sys.argv[4]}/model.keras")
    print(json.dumps({"test_accuracy": acc, "fit_s": fit_s}))
""")

SUMMARY = re.compile(r"test_accuracy=(?P<acc>[0-9.]+) .*run_id=(?P<run>[0-9a-f]+)")


def run_bare(folder: Path, epochs: int, seed: int, out: Path) -> dict:
    """Run the bare script in a fresh process; returns wall time, fit time, test accuracy."""
    script = out / "bare.py"
    script.write_text(BARE_SCRIPT)
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, str(script), str(folder), str(epochs), str(seed),
                           str(out)], capture_output=True, text=True, check=True)
    wall = time.perf_counter() - start
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"wall_s": wall, "fit_s": result["fit_s"], "test_accuracy": result["test_accuracy"]}


def run_framework(epochs: int, seed: int, uri: str, out: Path, extra: list[str]) -> dict:
    """Run `fashion-exp-train experiment=original` in a fresh process, logging to `uri`."""
    cmd = [sys.executable, "-m", "fashion_exp.train", "experiment=original",
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
    history = mlflow.MlflowClient().get_metric_history(match["run"], "epoch_seconds")
    return {"wall_s": wall, "fit_s": sum(m.value for m in history),
            "test_accuracy": float(match["acc"]), "run_id": match["run"]}


def mean_std(values: list[float]) -> str:
    """'mean +- std' of a list (std 0 for one value)."""
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.4f} +- {std:.4f}"


def main() -> None:
    """Run both sides for every seed and print the comparison."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=30, help="epochs (default 30)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds (default 0)")
    parser.add_argument("--tracking-uri", default=None,
                        help="MLflow store for the framework runs (default: a temporary one)")
    parser.add_argument("--skip-bare", action="store_true", help="time the framework only")
    parser.add_argument("overrides", nargs="*", help="extra overrides for the framework side")
    args = parser.parse_args()

    folder = locate(None, download=False)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        uri = args.tracking_uri or f"sqlite:///{out / 'mlruns' / 'mlflow.db'}"
        rows = []
        for seed in args.seeds:
            fw = run_framework(args.epochs, seed, uri, out, args.overrides)
            bare = None if args.skip_bare else run_bare(folder, args.epochs, seed, out)
            rows.append((seed, fw, bare))
            line = (f"seed {seed}: framework wall {fw['wall_s']:.1f} s (fit {fw['fit_s']:.1f} s)"
                    f" test_accuracy {fw['test_accuracy']:.4f} run {fw['run_id']}")
            if bare:
                line += (f" | bare wall {bare['wall_s']:.1f} s (fit {bare['fit_s']:.1f} s) "
                         f"test_accuracy {bare['test_accuracy']:.4f} | wall ratio "
                         f"framework/bare {fw['wall_s'] / bare['wall_s']:.2f}")
            print(line, flush=True)

    fw_acc = [r[1]["test_accuracy"] for r in rows]
    fw_wall = [r[1]["wall_s"] for r in rows]
    print(f"\nframework ({args.epochs} epochs, seeds {args.seeds}): wall "
          f"{statistics.mean(fw_wall):.1f} s, test_accuracy {mean_std(fw_acc)}")
    if not args.skip_bare:
        bare_acc = [r[2]["test_accuracy"] for r in rows]
        bare_wall = [r[2]["wall_s"] for r in rows]
        print(f"bare Keras script:  wall {statistics.mean(bare_wall):.1f} s, "
              f"test_accuracy {mean_std(bare_acc)}")
        print(f"wall-time ratio framework/bare: {sum(fw_wall) / sum(bare_wall):.2f} "
              "(below 1: the framework is faster)")


if __name__ == "__main__":
    main()
