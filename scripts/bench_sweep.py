"""Benchmark: the same 4-job sweep run sequentially and with the parallel launcher.

    python scripts/bench_sweep.py                    # 4 seeds of the original MLP, 3 epochs
    python scripts/bench_sweep.py --epochs 5 --jobs 2

Each sweep is one `fashion-exp-train -m` command into its own fresh temporary MLflow store;
wall times include start-up and all logging. Prints both times and the ratio.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run_sweep(out: Path, epochs: int, launcher: list[str]) -> float:
    """Wall seconds of one 4-seed sweep; exits with the error if a job failed."""
    cmd = [sys.executable, "-m", "fashion_exp.cli.train", "-m", *launcher, "experiment=original",
           "trainer.seed=0,1,2,3", f"trainer.epochs={epochs}", "trainer.verbose=0",
           f"tracking.uri=sqlite:///{out / 'mlruns' / 'mlflow.db'}",
           f"hydra.sweep.dir={out / 'sweep'}"]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True,
                          env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    if proc.returncode != 0:
        sys.exit(f"sweep failed:\n{proc.stderr[-3000:]}")
    return time.perf_counter() - start


def main() -> None:
    """Time the sweep both ways and print the comparison."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3, help="epochs per job (default 3)")
    parser.add_argument("--jobs", type=int, default=2, help="parallel jobs (default 2)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        sequential = run_sweep(Path(tmp) / "seq", args.epochs, [])
        print(f"sequential: {sequential:.1f} s", flush=True)
        parallel = run_sweep(Path(tmp) / "par", args.epochs,
                             ["hydra/launcher=parallel", f"hydra.launcher.n_jobs={args.jobs}"])
        print(f"parallel ({args.jobs} jobs): {parallel:.1f} s", flush=True)
    print(f"4-job sweep on {os.cpu_count()} cores, {args.epochs} epochs each: sequential "
          f"{sequential:.1f} s, parallel {parallel:.1f} s, ratio sequential/parallel "
          f"{sequential / parallel:.2f}")


if __name__ == "__main__":
    main()
