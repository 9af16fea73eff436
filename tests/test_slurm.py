"""Sweeps and searches through hydra/launcher=slurm against a real one-node SLURM cluster
(scripts/devtools/slurm.py: Debian's slurm-wlm and munge, in a loopback-only network
namespace, started once per session and stopped by process id)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlflow
import optuna
import pytest

from fashion_exp.sweeps.multirun import STATE_FILE

from .helpers import REPO, requires_real_data

needs_cluster = pytest.mark.skipif(
    (os.geteuid() != 0 or not Path("/usr/sbin/slurmctld").exists()) and not os.environ.get("CI"),
    reason="needs root and slurm-wlm (./dev.sh setup installs it)")


def on_cluster(test):
    """A test that runs sweeps on the session's cluster: slow, real data, root, SLURM."""
    return pytest.mark.slow(requires_real_data(needs_cluster(test)))


FAST = ["debug=fast", "data.limit=600", "tracking.log_model=false", "tracking.figures=false",
        "trainer.verbose=0", "tracking.experiment_name=slurm"]


@pytest.fixture(scope="session")
def cluster():
    """A one-node SLURM cluster for the session (2 CPUs), stopped by process id."""
    from devtools import slurm

    folder = Path(tempfile.mkdtemp(prefix="fashion-exp-slurm-"))
    started = slurm.start(folder, cpus=2)
    yield started
    slurm.stop_cluster(started)
    shutil.rmtree(folder, ignore_errors=True)


STARTED: list[subprocess.Popen] = []


@pytest.fixture(autouse=True)
def no_sweep_left():
    """A sweep a failed test left running is killed (by its process id)."""
    yield
    while STARTED:
        proc = STARTED.pop()
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def start_sweep(cluster, tmp_path: Path, *overrides: str) -> subprocess.Popen:
    """`fashion-exp-train -m hydra/launcher=slurm ...` inside the cluster's namespace."""
    argv = [sys.executable, "-m", "fashion_exp.cli.train", "-m", "hydra/launcher=slurm",
            *FAST, f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
            f"hydra.sweep.dir={tmp_path / 'sweep'}", *overrides]
    env = cluster.env({**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONUNBUFFERED": "1"})
    env.pop("MLFLOW_TRACKING_URI", None)
    STARTED.append(subprocess.Popen(cluster.command(argv), cwd=REPO, env=env, text=True,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    return STARTED[-1]


def requeued(cluster) -> list[str]:
    """The ids of jobs SLURM holds after a requeue (pending for BeginTime)."""
    pending = cluster.run(["squeue", "-h", "-t", "PD", "-o", "%i|%r"], check=False).stdout
    return [job for job, _, reason in (line.partition("|") for line in pending.splitlines())
            if reason == "BeginTime"]


def release_requeued(cluster) -> None:
    """SLURM holds a requeued job for 2 minutes (BeginTime): start it now."""
    for job in requeued(cluster):
        cluster.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], check=False)


def job_pids(cluster, job: str) -> list[int]:
    """The process ids of a running SLURM job (`scontrol listpids`)."""
    out = cluster.run(["scontrol", "listpids", job], check=False).stdout
    return [int(line.split()[0]) for line in out.splitlines()[1:]
            if line.split() and line.split()[0].isdigit()]


def held(pid: int, signum: int) -> bool:
    """Whether process `pid` is still stopped and `signum` has not reached it yet."""
    try:
        status = dict(line.split(":", 1) for line in
                      Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    except OSError:  # the process has ended
        return False
    pending = int(status["SigPnd"], 16) | int(status["ShdPnd"], 16)
    return status["State"].strip().startswith("T") and not pending & (1 << (signum - 1))


def finish(cluster, proc: subprocess.Popen, timeout: float = 400) -> tuple[str, str]:
    """Wait for the sweep, starting requeued jobs at once; its (stdout, stderr)."""
    deadline = time.monotonic() + timeout
    while proc.poll() is None:
        assert time.monotonic() < deadline, "the sweep did not end"
        release_requeued(cluster)
        time.sleep(1)
    return proc.communicate()


def epochs_logged(db: Path, job: str) -> tuple[int, str | None]:
    """(last epoch logged, SLURM job id) of sweep job number `job`, from the store itself."""
    if not db.exists():
        return 0, None
    try:
        with sqlite3.connect(db, timeout=20) as conn:
            row = conn.execute(
                "SELECT max(m.step), (SELECT value FROM tags t2 WHERE t2.run_uuid = t.run_uuid "
                "AND t2.key = 'slurm_job_id') FROM tags t JOIN metrics m "
                "ON m.run_uuid = t.run_uuid WHERE t.key = 'sweep_job' AND t.value = ? "
                "AND m.key = 'epoch/loss'", (job,)).fetchone()
    except sqlite3.OperationalError:  # the store is still being created
        return 0, None
    return (row[0] or 0, row[1]) if row else (0, None)


def runs(tmp_path: Path) -> tuple[mlflow.entities.Run, list[mlflow.entities.Run]]:
    """The sweep's parent run and its children."""
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    parent_id = json.loads((tmp_path / "sweep" / STATE_FILE).read_text())["run_id"]
    everything = client.search_runs([client.get_experiment_by_name("slurm").experiment_id])
    children = [r for r in everything if r.data.tags.get("sweep_id") == parent_id
                and r.data.tags.get("sweep") == "child"]
    return client.get_run(parent_id), children


def steps(tmp_path: Path, run_id: str, key: str = "epoch/loss") -> list[int]:
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    return sorted(m.step for m in client.get_metric_history(run_id, key))


@on_cluster
def test_sweep_with_a_preempted_and_a_failing_job(cluster, tmp_path) -> None:
    # Job 0 is requeued (as SLURM preempts) after its second epoch; lr=1e9 diverges.
    proc = start_sweep(cluster, tmp_path, "hydra.launcher.cpus_per_task=1",
                       "trainer.epochs=20", "optimizer.lr=0.05,0.1,1e9")
    deadline = time.monotonic() + 300
    while (logged := epochs_logged(tmp_path / "mlflow.db", "0"))[0] < 2:
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.3)
    assert logged[0] < 20, "job 0 ended before it could be preempted"
    cluster.run(["scontrol", "requeue", logged[1]])
    out, err = finish(cluster, proc)
    assert proc.returncode == 1, err[-3000:]  # one job failed; the others ran

    parent, children = runs(tmp_path)
    assert len(children) == 3  # no second run for the requeued job
    by_job = {c.data.tags["sweep_job"]: c for c in children}
    preempted = by_job["0"]
    assert preempted.info.status == "FINISHED"
    assert preempted.data.tags["slurm_restarts"] == "1"
    assert int(preempted.data.tags["resumed_from_epoch"]) >= 2
    assert "SIGTERM" in preempted.data.tags["stopped_by"]
    for key in ("epoch/loss", "epoch/val_accuracy"):  # one value per epoch, none lost
        assert steps(tmp_path, preempted.info.run_id, key) == list(range(1, 21)), key
    assert by_job["1"].info.status == "FINISHED"
    assert by_job["2"].info.status == "FAILED"
    assert "TrainingDiverged" in by_job["2"].data.tags["error"]
    for child in children:  # each job names its SLURM job and node
        assert child.data.tags["slurm_job_id"].endswith(f"_{child.data.tags['sweep_job']}")
        assert child.data.tags["slurm_node"] == "node1"
    assert parent.info.status == "FINISHED" and parent.data.tags["jobs_failed"] == "1"
    assert parent.data.tags["best_run_id"] in {by_job["0"].info.run_id, by_job["1"].info.run_id}
    assert "leaderboard.csv" in {a.path for a in mlflow.MlflowClient(
        f"sqlite:///{tmp_path / 'mlflow.db'}").list_artifacts(parent.info.run_id)}
    assert "viewStateShareKey=" in out


@on_cluster
def test_job_at_its_time_limit_is_requeued_and_finishes(cluster, tmp_path) -> None:
    # A 3-minute limit with SIGUSR2 120 s before it. SLURM checks time limits only every 30 s,
    # so the signal comes 60-90 s into the job: after the first epoch's checkpoint even on a
    # slow machine, but a fast machine could finish the 25 epochs by then. The test therefore
    # stops (SIGSTOP) the job's processes once epoch 2 is logged and waits for SLURM's SIGUSR2
    # (SLURM sends a SIGCONT with it; were it to come without, the test sends the SIGCONT): the
    # signal lands mid-training on any machine. The requeued job gets a 10-minute limit and
    # starts at once.
    proc = start_sweep(cluster, tmp_path, "hydra.launcher.cpus_per_task=2",
                       "hydra.launcher.timeout_min=3", "hydra.launcher.signal_delay_s=120",
                       "data.limit=2000", "trainer.epochs=25", "optimizer.lr=0.05")
    db, deadline = tmp_path / "mlflow.db", time.monotonic() + 400
    paused: list[int] = []
    while not paused and proc.poll() is None and not requeued(cluster):
        assert time.monotonic() < deadline, "the job never logged its second epoch"
        epoch, job = epochs_logged(db, "0")
        if epoch >= 2 and job:
            paused = job_pids(cluster, job)
            for pid in paused:
                os.kill(pid, signal.SIGSTOP)
        time.sleep(0.05)
    try:
        while paused and all(held(pid, signal.SIGUSR2) for pid in paused):
            assert time.monotonic() < deadline, "SLURM never sent SIGUSR2"
            time.sleep(0.2)
    finally:
        for pid in paused:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
    lifted = False
    while proc.poll() is None:
        assert time.monotonic() < deadline, "the sweep did not end"
        for job in requeued(cluster):
            cluster.run(["scontrol", "update", f"JobId={job}", "TimeLimit=10", "StartTime=now"])
            lifted = True
        time.sleep(1)
    out, err = proc.communicate()
    assert proc.returncode == 0, err[-3000:]
    assert lifted, "the job was never requeued"
    _, (child,) = runs(tmp_path)
    assert child.info.status == "FINISHED"
    assert child.data.tags["slurm_restarts"] == "1"
    assert "SLURM requeued the job" in child.data.tags["stopped_by"]
    # On a loaded machine the signal may come before the test sees epoch 2 (not held then).
    assert (2 if paused else 1) <= int(child.data.tags["resumed_from_epoch"]) < 25
    assert steps(tmp_path, child.info.run_id) == list(range(1, 26))


@on_cluster
def test_pruned_search_through_slurm(cluster, tmp_path) -> None:
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    proc = start_sweep(cluster, tmp_path, "hparams_search=mlp_optuna", "trainer.epochs=3",
                       "trainer.early_stopping=false", "hydra.sweeper.study_name=slurm",
                       f"hydra.sweeper.storage={storage}", "hydra.sweeper.n_trials=3",
                       "hydra.sweeper.pruner.reduction_factor=2",
                       "hydra.launcher.cpus_per_task=2")
    out, err = finish(cluster, proc)
    assert proc.returncode == 0, err[-3000:]
    study = optuna.load_study(study_name="slurm", storage=storage)
    assert len(study.trials) == 3  # the study's budget
    assert {t.state.name for t in study.trials} <= {"COMPLETE", "PRUNED"}
    parent, children = runs(tmp_path)
    assert len(children) == 3 and all(c.info.status == "FINISHED" for c in children)
    assert all(c.data.tags["slurm_node"] == "node1" for c in children)
    pruned = [t for t in study.trials if t.state.name == "PRUNED"]
    assert parent.data.tags["jobs_pruned"] == str(len(pruned))
    for child in children:
        trial = study.trials[int(child.data.tags["optuna_trial"])]
        assert (child.data.tags.get("pruned") == "true") == (trial.state.name == "PRUNED")


@on_cluster
def test_bad_input_stops_in_one_line_and_leaves_nothing_running(cluster, tmp_path) -> None:
    def sweep(folder: str, *overrides: str, slurm: bool = True) -> tuple[int, str]:
        where = tmp_path / folder
        where.mkdir()
        if slurm:
            proc = start_sweep(cluster, where, "optimizer.lr=0.05,0.1", *overrides)
        else:  # no cluster reachable: outside its namespace
            env = {**os.environ, "SLURM_CONF": cluster.conf}
            proc = subprocess.Popen(
                [sys.executable, "-m", "fashion_exp.cli.train", "-m", "hydra/launcher=slurm",
                 *FAST, f"tracking.uri=sqlite:///{where / 'mlflow.db'}",
                 f"hydra.sweep.dir={where / 'sweep'}", "optimizer.lr=0.05,0.1"],
                cwd=REPO, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        _, err = finish(cluster, proc)
        lines = [ln for ln in err.splitlines() if ln.startswith("fashion-exp-train: error:")]
        if (where / "mlflow.db").exists():
            client = mlflow.MlflowClient(f"sqlite:///{where / 'mlflow.db'}")
            left = client.search_runs([e.experiment_id for e in client.search_experiments()],
                                      "attributes.status = 'RUNNING'")
            assert not left, [r.info.run_name for r in left]
        return proc.returncode, lines[-1] if lines else err[-2000:]

    rc, line = sweep("away", slurm=False)
    assert rc == 1 and "no SLURM cluster answers" in line, line
    rc, line = sweep("partition", "hydra.launcher.partition=gpu")
    assert rc == 1 and "hydra.launcher.partition=gpu: no such partition" in line, line
    assert "(partitions: debug)" in line
    rc, line = sweep("relative", "trainer.checkpoint_dir=ckpt")
    assert rc == 1 and "trainer.checkpoint_dir=ckpt is a relative path" in line, line
    rc, line = sweep("option", "hydra.launcher.constraint=bigmem")
    assert rc == 1 and "SLURM refused the jobs" in line and "Invalid feature" in line, line
    assert not (tmp_path / "option" / "sweep" / ".submitit").exists() or not any(
        (tmp_path / "option" / "sweep" / ".submitit").glob("*/*.out"))
    # 150 MB is less than TensorFlow needs: both jobs are killed for memory.
    rc, line = sweep("memory", "hydra.launcher.mem_per_cpu=150M",
                     "hydra.launcher.cpus_per_task=1")
    assert rc == 1 and "killed for using more memory than it asked for" in line, line


@pytest.mark.parametrize(("overrides", "nodes", "refused"), [
    (["tracking.uri=sqlite:////shared/mlflow.db"], 1, None),  # one node: SQLite works
    (["tracking.uri=sqlite:////shared/mlflow.db"], 4, "tracking.uri=sqlite:////shared"),
    (["tracking.uri=http://10.0.0.5:5000", "hydra.sweeper.storage=sqlite:////s/optuna.db"], 4,
     "hydra.sweeper.storage=sqlite:////s/optuna.db is a file on this machine"),
    (["tracking.uri=http://10.0.0.5:5000",
      "hydra.sweeper.storage=postgresql+psycopg://db/optuna"], 4, None),
    (["data.dir=data"], 1, "data.dir=data is a relative path"),
    (["tracking.offline_dir=out"], 4, "tracking.offline_dir=out is a relative path"),
])
def test_shared_state_a_cluster_needs(overrides, nodes, refused) -> None:
    from omegaconf import OmegaConf

    from fashion_exp.sweeps.slurm import SlurmError, check_shared_state

    cfg = OmegaConf.from_dotlist([o for o in overrides])
    if refused is None:
        check_shared_state(cfg, nodes)
    else:
        with pytest.raises(SlurmError, match=refused.replace("+", r"\+")):
            check_shared_state(cfg, nodes)


@pytest.mark.slow
@requires_real_data
def test_slurm_local_runs_a_sweep_without_a_cluster(tmp_path) -> None:
    # hydra/launcher=slurm_local: the launcher's code through submitit's local executor.
    env = {k: v for k, v in os.environ.items()
           if k not in ("SLURM_CONF", "MLFLOW_TRACKING_URI")}
    proc = subprocess.run(
        [sys.executable, "-m", "fashion_exp.cli.train", "-m", "hydra/launcher=slurm_local",
         *FAST, "optimizer.lr=0.05,0.1", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
         f"hydra.sweep.dir={tmp_path / 'sweep'}"],
        cwd=REPO, env={**env, "TF_CPP_MIN_LOG_LEVEL": "2"}, capture_output=True, text=True,
        timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    parent, children = runs(tmp_path)
    assert parent.info.status == "FINISHED" and parent.data.tags["jobs_total"] == "2"
    assert sorted(c.data.params["optimizer.lr"] for c in children) == ["0.05", "0.1"]
    assert all(c.info.status == "FINISHED" for c in children)
    assert not any("slurm_job_id" in c.data.tags for c in children)  # not SLURM jobs
    assert len(list((tmp_path / "sweep" / ".submitit").glob("*/*_result.pkl"))) == 2
    assert "viewStateShareKey=" in proc.stdout
