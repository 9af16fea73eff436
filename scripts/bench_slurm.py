"""Benchmark: what SLURM costs a sweep, and what a preemption costs a job.

    python scripts/bench_slurm.py                  # as root: starts a one-node cluster itself
    python scripts/bench_slurm.py --epochs 10 --preempt-after 4

1. The same 4-job debug sweep (`debug=fast`, seeds 0-3) with Hydra's basic launcher and with
   `hydra/launcher=slurm` on a one-node cluster of this machine (each job takes every CPU, so
   both run one job at a time). The difference is SLURM's overhead: submission, scheduling,
   a new Python process per job and submitit's polling.
2. One SLURM job of `--epochs` epochs on the full data, run once uninterrupted and once
   requeued (`scontrol requeue`, as SLURM preempts) after its `--preempt-after`-th epoch; the
   requeued job is released at once instead of after SLURM's 2-minute hold. The difference is
   what a preemption costs: the epoch cut short, a new job's start-up and the resume.

Every sweep is one `fashion-exp-train -m` command into a fresh temporary MLflow store; wall
times include start-up and all logging. Needs root and slurm-wlm + munge (./dev.sh setup).
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from devtools import slurm

QUIET = ["trainer.verbose=0", "tracking.figures=false", "tracking.log_model=false"]


def sweep(cluster: slurm.Cluster, out: Path, *overrides: str) -> subprocess.Popen:
    """Start `fashion-exp-train -m ...` inside the cluster's namespace, logging to `out`."""
    argv = [sys.executable, "-m", "fashion_exp.cli.train", "-m", *QUIET, *overrides,
            f"tracking.uri=sqlite:///{out / 'mlflow.db'}", f"hydra.sweep.dir={out / 'sweep'}"]
    env = cluster.env({**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.Popen(cluster.command(argv), env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def finish(cluster: slurm.Cluster, proc: subprocess.Popen, start: float) -> float:
    """Wait for a sweep (releasing requeued jobs at once); its wall seconds since `start`."""
    while proc.poll() is None:
        pending = cluster.run(["squeue", "-h", "-t", "PD", "-o", "%i|%r"], check=False).stdout
        for job, _, reason in (line.partition("|") for line in pending.splitlines()):
            if reason == "BeginTime":
                cluster.run(["scontrol", "update", f"JobId={job}", "StartTime=now"],
                            check=False)
        time.sleep(0.2)
    seconds = time.perf_counter() - start
    _, err = proc.communicate()
    if proc.returncode != 0:
        sys.exit(f"sweep failed:\n{err[-3000:]}")
    return seconds


def last_epoch(db: Path) -> tuple[int, str | None]:
    """(last epoch logged, SLURM job id) of the store's one job run."""
    if not db.exists():
        return 0, None
    try:
        with sqlite3.connect(db, timeout=20) as conn:
            row = conn.execute(
                "SELECT max(m.step), (SELECT value FROM tags t WHERE t.run_uuid = m.run_uuid "
                "AND t.key = 'slurm_job_id') FROM metrics m WHERE m.key = 'epoch/loss'"
            ).fetchone()
    except sqlite3.OperationalError:  # the store is still being created
        return 0, None
    return (row[0] or 0, row[1]) if row else (0, None)


def one_job(cluster: slurm.Cluster, out: Path, epochs: int, preempt_after: int | None) -> float:
    """Wall seconds of one SLURM job of `epochs` epochs, requeued after `preempt_after`."""
    proc = sweep(cluster, out, "hydra/launcher=slurm", "hydra.launcher.cpus_per_task=2",
                 f"trainer.epochs={epochs}", "trainer.early_stopping=false",
                 "trainer.seed=0")
    start = time.perf_counter()
    if preempt_after is not None:
        while (logged := last_epoch(out / "mlflow.db"))[0] < preempt_after:
            if proc.poll() is not None:
                sys.exit(f"the job ended before epoch {preempt_after}:\n{proc.stderr.read()}")
            time.sleep(0.1)
        cluster.run(["scontrol", "requeue", logged[1]])
    return finish(cluster, proc, start)


def main() -> None:
    """Start a cluster, time both comparisons, print them, stop the cluster."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10,
                        help="epochs of the single job on the full data (default 10)")
    parser.add_argument("--preempt-after", type=int, default=5,
                        help="the epoch after which the job is requeued (default 5)")
    args = parser.parse_args()
    if not 1 <= args.preempt_after < args.epochs:
        sys.exit(f"--preempt-after={args.preempt_after}: must be from 1 to --epochs - 1")
    with tempfile.TemporaryDirectory(prefix="bench-slurm-") as tmp:
        root = Path(tmp)
        try:
            cluster = slurm.start(root / "cluster", cpus=os.cpu_count() or 1)
        except (slurm.ClusterError, PermissionError) as err:
            sys.exit(f"bench_slurm: no cluster could start: {err} (run as root)")
        try:
            four = ["debug=fast", "trainer.seed=0,1,2,3"]
            local = finish(cluster, sweep(cluster, root / "local", *four), time.perf_counter())
            print(f"4-job debug sweep, basic launcher: {local:.1f} s", flush=True)
            on_slurm = finish(cluster, sweep(cluster, root / "slurm", *four,
                                             "hydra/launcher=slurm",
                                             "hydra.launcher.cpus_per_task=2"),
                              time.perf_counter())
            print(f"4-job debug sweep, hydra/launcher=slurm: {on_slurm:.1f} s "
                  f"(+{on_slurm - local:.1f} s, {(on_slurm - local) / 4:.1f} s a job)", flush=True)
            whole = one_job(cluster, root / "whole", args.epochs, None)
            print(f"one SLURM job, {args.epochs} epochs, uninterrupted: {whole:.1f} s",
                  flush=True)
            cut = one_job(cluster, root / "cut", args.epochs, args.preempt_after)
            print(f"the same job requeued after epoch {args.preempt_after}: {cut:.1f} s "
                  f"(+{cut - whole:.1f} s)", flush=True)
        finally:
            slurm.stop_cluster(cluster)


if __name__ == "__main__":
    main()
