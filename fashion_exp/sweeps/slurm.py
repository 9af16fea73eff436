"""Sweeps on a SLURM cluster: Hydra's submitit launcher, with jobs that survive preemption.

`hydra/launcher=slurm` (conf/hydra/launcher/slurm.yaml) runs every job of a sweep or a search
as a SLURM job through hydra-submitit-launcher; `hydra/launcher=slurm_local` runs them as
local processes through submitit's local executor. On top of the plugin's launcher:

- before anything is created, the cluster must answer, the partition must exist, paths a job
  reads must be absolute, and a cluster of several nodes must use stores every node reaches
  (check_launcher): one line and exit status 1 otherwise;
- a job that SLURM signals before preempting it or at its time limit (SIGUSR2, or SIGTERM)
  ends its MLflow run KILLED with its last epoch's checkpoint kept, is requeued (submitit's
  checkpoint()), and on restart continues the same run from the next epoch (trainer.resume);
- a job that SLURM ends without a result (killed for memory, cancelled) is a failed job of the
  sweep, named by its SLURM state, and its run ends FAILED; the other jobs go on;
- each job's run is tagged with its SLURM job id, node and restarts.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from omegaconf import DictConfig, OmegaConf, open_dict

from fashion_exp import interrupts

log = logging.getLogger(__name__)

SLURM_TARGET = "hydra_plugins.fashion_exp_slurm.SlurmLauncher"
# Paths a job reads or writes itself: relative, each node would resolve them in the job's own
# working directory.
JOB_PATHS = ("trainer.checkpoint_dir", "data.dir", "tracking.offline_dir")
REQUEUED = "SLURM requeued the job (preempted or at its time limit)"


class SlurmError(RuntimeError):
    """The sweep cannot run on this cluster; the message (one line) says why."""


# --- What a job records ------------------------------------------------------------------------

def job_tags() -> dict[str, str]:
    """The SLURM job id (array job_task), node and restart count of this process; {} outside
    SLURM."""
    env = os.environ
    if "SLURM_JOB_ID" not in env:
        return {}
    job = env["SLURM_JOB_ID"]
    if "SLURM_ARRAY_JOB_ID" in env and "SLURM_ARRAY_TASK_ID" in env:
        job = f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    return {"slurm_job_id": job, "slurm_node": env.get("SLURMD_NODENAME", "unknown"),
            "slurm_restarts": env.get("SLURM_RESTART_COUNT", "0")}


# --- Checks before a sweep starts --------------------------------------------------------------

def _slurm(argv: list[str], timeout: float = 20) -> str:
    """Run a SLURM client command; its output, or SlurmError with its first error line."""
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        raise SlurmError(f"no SLURM here: `{argv[0]}` not found; hydra/launcher=slurm needs "
                         "SLURM's client commands and a reachable slurmctld (try "
                         "hydra/launcher=slurm_local)") from None
    except subprocess.TimeoutExpired:
        raise SlurmError(f"no SLURM cluster answers: `{' '.join(argv)}` did not answer in "
                         f"{timeout:.0f} s") from None
    if done.returncode != 0:
        reason = (done.stderr or done.stdout).strip().splitlines() or ["no output"]
        raise SlurmError(f"no SLURM cluster answers: `{argv[0]}` failed: {reason[-1]}")
    return done.stdout


def partitions() -> dict[str, int]:
    """Partitions of the cluster with their node counts; the default one also under ''."""
    found: dict[str, int] = {}
    for line in _slurm(["sinfo", "-h", "-o", "%P|%D"]).splitlines():
        name, _, nodes = line.strip().partition("|")
        count = int(nodes) if nodes.isdigit() else 1
        if name.endswith("*"):
            name = name[:-1]
            found[""] = found.get("", 0) + count
        found[name] = found.get(name, 0) + count
    return found


def _is_local_file(uri: str) -> bool:
    """A store that lives in a file of one machine (SQLite, a file store)."""
    return uri.lower().startswith(("sqlite:", "file:")) or "://" not in uri


def check_shared_state(cfg: DictConfig, nodes: int) -> None:
    """Paths jobs use must be absolute; with several nodes, the tracking store and the study
    storage must be servers every node reaches (SlurmError otherwise)."""
    from fashion_exp.tracking.store_checks import resolve_uri

    for key in JOB_PATHS:
        value = OmegaConf.select(cfg, key, default=None)
        if value and not Path(str(value)).is_absolute():
            raise SlurmError(f"{key}={value} is a relative path: a SLURM job resolves it in "
                             "its own working directory on its node; give an absolute path on "
                             "a file system every node shares")
    if nodes <= 1:
        return  # one node: a local SQLite store and study work
    uri = resolve_uri(OmegaConf.select(cfg, "tracking.uri", default=None))
    if _is_local_file(uri):
        raise SlurmError(f"tracking.uri={uri} is a file on this machine, and the partition has "
                         f"{nodes} nodes: use a tracking server every node reaches "
                         "(tracking=server tracking.uri=http://..., see docs/team.md)")
    storage = OmegaConf.select(cfg, "hydra.sweeper.storage", default=None)
    if storage and _is_local_file(str(storage)):
        raise SlurmError(f"hydra.sweeper.storage={storage} is a file on this machine, and the "
                         f"partition has {nodes} nodes: use a database every node reaches "
                         "(postgresql+psycopg://..., see docs/team.md)")


def check_launcher(cfg: DictConfig) -> None:
    """For hydra/launcher=slurm: SLURM answers, the partition exists, the shared state works
    on it. Prints one line and exits 1 if not; does nothing for other launchers."""
    launcher = OmegaConf.select(cfg, "hydra.launcher", default=None)
    if launcher is None or launcher.get("_target_") != SLURM_TARGET:
        return
    try:
        found = partitions()
        wanted = launcher.get("partition") or ""
        if wanted not in found:
            have = ", ".join(sorted(p for p in found if p)) or "none"
            raise SlurmError(f"hydra.launcher.partition={wanted or '(default)'}: no such "
                             f"partition on this cluster (partitions: {have})")
        check_shared_state(cfg, found[wanted])
    except SlurmError as err:
        print(f"fashion-exp-train: error: {err}", file=sys.stderr, flush=True)
        sys.exit(1)


# --- Job states without accounting -------------------------------------------------------------

def _squeue_states(job_ids: set[str]) -> str:
    """`sacct`-shaped output (JobID|State|NodeList) from squeue, which knows finished jobs
    for MinJobAge seconds: for clusters without accounting, where sacct fails."""
    argv = ["squeue", "-h", "--states=all", "-o", "%i|%T|%N"]
    for job in job_ids:
        argv += ["-j", job]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    return "JobID|State|NodeList\n" + done.stdout


def use_squeue_fallback() -> None:
    """Make submitit read job states from squeue when sacct fails (no slurmdbd): otherwise a
    job killed without writing its result (out of memory) is waited for forever."""
    # Private API (submitit 1.5.4): its SlurmInfoWatcher's internals; no public setting of
    # how job states are read.
    from submitit.slurm import slurm

    watcher = slurm.SlurmJob.watcher
    if getattr(watcher, "fashion_exp_fallback", False):
        return

    class Watcher(type(watcher)):  # type: ignore[misc]
        fashion_exp_fallback = True

        def update(self) -> None:
            command = self._make_command()
            if command is None:
                return
            self._num_calls += 1
            try:
                output = subprocess.run(command, capture_output=True, timeout=60, check=True
                                        ).stdout.decode()
            except (subprocess.SubprocessError, OSError):
                ids = {c for c, prev in zip(command[1:], command[:-1], strict=True) if prev == "-j"}
                try:
                    output = _squeue_states(ids)
                except (subprocess.SubprocessError, OSError) as err:
                    log.warning("job states not read (sacct and squeue failed: %s)", err)
                    output = ""
            self._info_dict.update(self.read_info(output))
            import time

            self._last_status_check = time.time()
            for job_id in self._registered - self._finished:
                if self.is_done(job_id, mode="cache"):
                    self._finished.add(job_id)

    slurm.SlurmJob.watcher = Watcher(delay_s=watcher._delay_s)


# --- Requeued jobs continue their run ----------------------------------------------------------

def requeued_run(sweep_dir: Path, job_num: int, checkpoint_dir: str | None) -> str | None:
    """The run this sweep job started before it was requeued, when it is not finished and its
    checkpoint folder is there (the job resumes it); None for a job's first start."""
    from mlflow import MlflowClient

    from fashion_exp.core import checkpoints
    from fashion_exp.files import read_json
    from fashion_exp.sweeps.multirun import STATE_FILE

    if not (sweep_dir / STATE_FILE).is_file():
        return None
    info = read_json(sweep_dir / STATE_FILE)
    client = MlflowClient(info["tracking_uri"])
    runs = client.search_runs(
        [info["experiment_id"]], max_results=10, order_by=["attributes.start_time DESC"],
        filter_string=f"tags.sweep_id = '{info['run_id']}' and tags.sweep = 'child' "
                      f"and tags.sweep_job = '{job_num}' and attributes.status != 'FINISHED'")
    ckpt_root = checkpoints.root(checkpoint_dir, info["tracking_uri"])
    for run in runs:
        if (ckpt_root / run.info.run_id / checkpoints.STATE_FILE).is_file():
            for key, value in job_tags().items():
                client.set_tag(run.info.run_id, key, value)
            return run.info.run_id
    return None


def end_lost_run(sweep_dir: Path, job_num: int, reason: str,
                 statuses: tuple[str, ...] = ("RUNNING",)) -> None:
    """End FAILED, with `reason`, the run of a job that SLURM ended without a result and that
    was left RUNNING (its process was killed outright), or one stopped for a requeue that
    SLURM no longer granted (KILLED)."""
    from mlflow import MlflowClient

    from fashion_exp.files import read_json
    from fashion_exp.sweeps.multirun import STATE_FILE
    from fashion_exp.sweeps.search_loop import last_logged

    if not (sweep_dir / STATE_FILE).is_file():
        return
    info = read_json(sweep_dir / STATE_FILE)
    client = MlflowClient(info["tracking_uri"])
    for run in client.search_runs(
            [info["experiment_id"]], max_results=10,
            filter_string=f"tags.sweep_id = '{info['run_id']}' and tags.sweep = 'child' and "
                          f"tags.sweep_job = '{job_num}'"):
        if run.info.status not in statuses:
            continue
        client.set_tag(run.info.run_id, "error", reason)
        client.set_terminated(run.info.run_id, "FAILED", end_time=last_logged(client, run))


def _stop_on_requeue() -> None:
    """Route submitit's SIGUSR2 handler (checkpoint, requeue, exit) into a stop: the run ends
    KILLED with its checkpoint kept, as on Ctrl-C, instead of FAILED by a SystemExit."""
    handler = signal.getsignal(signal.SIGUSR2)
    if not callable(handler):
        return

    def requeue_then_stop(signum: int, frame: Any) -> None:
        # SLURM sends SIGTERM as it requeues, maybe while submitit is still requeueing: it
        # waits, so that the run records the requeue as what stopped it.
        try:
            with interrupts.deferred(raise_stop=False):
                handler(signum, frame)
        except SystemExit:
            stop = interrupts.stopping(REQUEUED)
            if not interrupts.deferring():  # in training: raised at the next batch's end
                raise stop from None

    signal.signal(signal.SIGUSR2, requeue_then_stop)


def _over_memory(job: Any) -> bool:
    """Whether SLURM killed the job for exceeding its memory (its stderr says so)."""
    try:
        tail = Path(job.paths.stderr).read_text(errors="replace")[-4000:].lower()
    except OSError:
        return False
    return "memory limit" in tail or "oom-kill" in tail or "out of memory" in tail


def _failed(overrides: list[str], job_num: int, reason: str) -> JobReturn:
    """A job's return when SLURM ended it without a result."""
    ret = JobReturn(overrides=overrides, status=JobStatus.FAILED)
    ret.return_value = SlurmError(reason)
    ret.hydra_cfg = None
    return ret


class Requeueable:
    """What the launchers of hydra_plugins/fashion_exp_slurm add to the plugin's: the job
    side (resume after a requeue, threads from the job's CPUs) and the submitting side
    (absolute paths, lost jobs reported)."""

    def __call__(self, sweep_overrides: list[str], job_dir_key: str, job_num: int,
                 job_id: str, singleton_state: Any) -> JobReturn:
        _stop_on_requeue()
        extra = []
        cfg = self.config
        sweep_dir = Path(str(cfg.hydra.sweep.dir))
        run_id = requeued_run(sweep_dir, job_num,
                              OmegaConf.select(cfg, "trainer.checkpoint_dir", default=None))
        if run_id is not None:
            log.info("Requeued job %d continues run %s <trainer.resume>", job_num, run_id)
            extra.append(f"trainer.resume={run_id}")
        cpus = os.environ.get("SLURM_CPUS_PER_TASK")
        if cpus and not OmegaConf.select(cfg, "trainer.threads", default=0) and not any(
                o.lstrip("+").startswith("trainer.threads=") for o in sweep_overrides):
            extra.append(f"trainer.threads={cpus}")  # not every core of the node
        return super().__call__(list(sweep_overrides) + extra, job_dir_key,  # type: ignore
                                job_num, job_id, singleton_state)

    def _absolute_paths(self) -> None:
        """The sweep folder and submitit's folder as absolute paths: jobs start elsewhere."""
        sweep_dir = Path(str(self.config.hydra.sweep.dir)).resolve()
        with open_dict(self.config):
            self.config.hydra.sweep.dir = str(sweep_dir)
        folder = str(self.params["submitit_folder"])
        if not Path(folder).is_absolute():
            self.params["submitit_folder"] = str(Path.cwd() / folder)

    def launch(self, job_overrides: Any, initial_job_idx: int) -> list[JobReturn]:
        """Submit the jobs as one array, wait for them; a job SLURM ended without a result is
        a failed job (its run FAILED), a refused submission stops the sweep in one line."""
        import submitit
        from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf

        self._absolute_paths()
        use_squeue_fallback()
        params = dict(self.params)
        init = {"folder": params.pop("submitit_folder")}
        # Private API (hydra-submitit-launcher 1.2.0): _EXECUTOR and params, as its own
        # launch() reads them; launch() is replaced whole (one job array, failures named).
        if "max_num_timeout" in params:
            init[f"{self._EXECUTOR}_max_num_timeout"] = params.pop("max_num_timeout")
        executor = submitit.AutoExecutor(cluster=self._EXECUTOR, **init)
        base = set(OmegaConf.structured(BaseQueueConf).keys())
        executor.update_parameters(**{k if k in base else f"{self._EXECUTOR}_{k}": v
                                      for k, v in params.items()})
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        from hydra.core.singleton import Singleton

        args = [(list(o), "hydra.sweep.dir", initial_job_idx + i, f"job_id_for_{i}",
                 Singleton.get_state()) for i, o in enumerate(job_overrides)]
        try:
            jobs = executor.map_array(self, *zip(*args, strict=True))
        except Exception as err:  # noqa: BLE001 - sbatch's refusal, in one line
            lines = [ln for ln in str(err).splitlines() if "error" in ln.lower()]
            reason = (lines or str(err).splitlines() or [type(err).__name__])[0].strip()
            print(f"fashion-exp-train: error: SLURM refused the jobs: {reason}",
                  file=sys.stderr, flush=True)
            sys.exit(1)
        log.info("Submitted %d job(s) to %s: %s", len(jobs), self._EXECUTOR,
                 ", ".join(j.job_id for j in jobs))
        return [self._result(job, a[0], a[2], sweep_dir) for job, a in zip(jobs, args, strict=True)]

    def _result(self, job: Any, overrides: list[str], job_num: int,
                sweep_dir: Path) -> JobReturn:
        """The job's JobReturn, or a failed one naming the SLURM state it ended in."""
        from submitit.core.utils import UncompletedJobError

        try:
            ret = job.results()[0]
        except UncompletedJobError:
            reason = f"SLURM job {job.job_id} ended {job.state} without a result"
            if _over_memory(job):
                reason += (": killed for using more memory than it asked for (raise "
                           "hydra.launcher.mem_gb or mem_per_cpu)")
            log.error("job %d failed: %s", job_num, reason)
            end_lost_run(sweep_dir, job_num, reason)
            return _failed(overrides, job_num, reason)
        # Private API (hydra-core 1.3.8): JobReturn.return_value raises a failed job's error;
        # _return_value is the error without raising it.
        if ret.status == JobStatus.FAILED and isinstance(ret._return_value, UncompletedJobError):
            # at its time limit more often than max_num_timeout allows: not requeued again
            reason = f"SLURM job {job.job_id}: {ret._return_value}"
            end_lost_run(sweep_dir, job_num, reason, statuses=("RUNNING", "KILLED"))
        return ret
