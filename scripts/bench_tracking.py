"""Logging overhead of a tracking server (PostgreSQL + `mlflow server`) versus the local
SQLite store: per logging call, and for one whole training run.

    python scripts/bench_tracking.py                       # experiment=original, 30 epochs
    python scripts/bench_tracking.py --epochs 5 --calls 100

Both stores are fresh: a new SQLite file, and a team stack started by this script in a
temporary folder (stopped at the end). Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlflow

from devtools import team

REPO = Path(__file__).resolve().parents[1]


def per_call_ms(uri: str, calls: int) -> float:
    """Milliseconds per mlflow.log_metrics call of six metrics (one epoch's worth)."""
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment("bench_calls")
    with mlflow.start_run():
        mlflow.log_metrics({"warm": 0.0}, step=0)
        start = time.perf_counter()
        for step in range(calls):
            mlflow.log_metrics({f"m{i}": step * 0.1 + i for i in range(6)}, step=step)
        return (time.perf_counter() - start) / calls * 1000


def whole_run_seconds(tracking: list[str], epochs: int, folder: Path) -> float:
    """Wall time of one fashion-exp-train run of the original experiment."""
    cmd = [sys.executable, "-m", "fashion_exp.cli.train", "experiment=original",
           f"trainer.epochs={epochs}", "trainer.verbose=0", *tracking,
           f"trainer.checkpoint_dir={folder / 'ckpt'}", f"hydra.run.dir={folder / 'hydra'}"]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    env.pop("MLFLOW_TRACKING_URI", None)
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=folder, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"training failed:\n{done.stderr[-3000:]}")
    print(done.stdout.strip().splitlines()[-1], file=sys.stderr)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=30, help="epochs of the whole run")
    parser.add_argument("--calls", type=int, default=200, help="logging calls per store")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="fashion-exp-bench-tracking-"))
    work.chmod(0o755)  # PostgreSQL runs as its own user when this runs as root
    try:
        stack = team.start(work / "stack")
        local_uri = f"sqlite:///{work / 'local' / 'mlflow.db'}"
        (work / "local").mkdir()
        local_call = per_call_ms(local_uri, args.calls)
        server_call = per_call_ms(stack.tracking_uri, args.calls)
        local_run = whole_run_seconds([f"tracking.uri={local_uri}"], args.epochs, work)
        server_run = whole_run_seconds(["tracking=server", f"tracking.uri={stack.tracking_uri}"],
                                       args.epochs, work)
    finally:
        team.stop(work / "stack")
        shutil.rmtree(work, ignore_errors=True)

    print(f"| store | ms per log_metrics call (6 metrics) | whole run, {args.epochs} epochs (s) |")
    print("|---|---:|---:|")
    print(f"| local SQLite | {local_call:.1f} | {local_run:.1f} |")
    print(f"| mlflow server + PostgreSQL | {server_call:.1f} | {server_run:.1f} |")
    print(f"| ratio server / local | {server_call / local_call:.2f} | "
          f"{server_run / local_run:.3f} |")


if __name__ == "__main__":
    main()
