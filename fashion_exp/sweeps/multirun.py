"""Multirun sweeps as one group in MLflow: a parent run per sweep, a nested child run per job.

The parent is created once per sweep folder, under a file lock, by the Hydra callback below
before any job starts; a job that finds no parent (a launcher in another process, a callback
that failed) creates it the same way, so children are always grouped. When the sweep ends the
parent gets the best child, its metric and a leaderboard, and a final status.
"""

from __future__ import annotations

import getpass
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from fashion_exp import procs
from fashion_exp.files import file_lock, read_json, write_json
from fashion_exp.paths import git_commit
from fashion_exp.schemas import run_params
from fashion_exp.tracking import views
from fashion_exp.tracking.store_checks import first_line
from fashion_exp.uris import without_password

log = logging.getLogger(__name__)

STATE_FILE = "mlflow_sweep.json"
# Sweeps this process opened and has not finished yet (see finish_open_sweeps).
# Module-level: cli/train.main ends them after Hydra, which never hands it the SweepCallback.
_open_sweeps: set[Path] = set()


def job_sweep_dir() -> Path | None:
    """The sweep folder when the current Hydra job is part of a multirun, else None."""
    if not HydraConfig.initialized():
        return None
    hydra_cfg = HydraConfig.get()
    return Path(hydra_cfg.sweep.dir).resolve() if hydra_cfg.mode == RunMode.MULTIRUN else None


def parallel_jobs() -> int:
    """How many jobs the current Hydra launcher runs at once (1 unless it is joblib's)."""
    if not HydraConfig.initialized():
        return 1
    launcher = HydraConfig.get().launcher
    if "joblib" not in str(launcher.get("_target_", "")):
        return 1
    n_jobs = int(launcher.get("n_jobs") or 1)
    return (os.cpu_count() or 1) if n_jobs < 1 else n_jobs


def job_threads(configured: int) -> int:
    """TensorFlow threads for this job: trainer.threads if set, else the cores shared out
    among parallel jobs (0, TensorFlow's choice, when jobs run one at a time)."""
    jobs = parallel_jobs()
    if configured or jobs == 1:
        return configured
    return max(1, (os.cpu_count() or 1) // jobs)


def swept_keys(config: DictConfig) -> list[str]:
    """Config keys a multirun varies: sweep overrides (a=1,2) and sweeper search spaces."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    overrides = OverridesParser.create().parse_overrides(list(config.hydra.overrides.task))
    keys = [o.get_key_element() for o in overrides if o.is_sweep_override()]
    params = config.hydra.sweeper.get("params") or {}
    return keys + [str(k) for k in params if str(k) not in keys]


def short_keys(keys: list[str]) -> dict[str, str]:
    """Each key by its shortest dotted suffix that no other key ends with:
    ['optimizer.lr', 'model.hidden'] -> lr, hidden; ['a.size', 'b.size'] -> a.size, b.size."""
    short = {}
    for key in keys:
        parts = key.split(".")
        for n in range(1, len(parts) + 1):
            suffix = ".".join(parts[-n:])
            if not any(other != key and (other == suffix or other.endswith("." + suffix))
                       for other in keys):
                break
        short[key] = suffix
    return short


def short_value(value: str) -> str:
    """A swept value as a run name shows it: floats to 4 significant digits (a sampler's
    0.012345678 -> 0.01235), anything else as given."""
    try:
        number = float(value)
    except ValueError:
        return value
    return value if value.lstrip("+-").isdigit() else f"{number:.4g}"


def child_run_name(overrides: list[str], keys: list[str]) -> str:
    """A job's run name: the values its sweep varies, keys shortened (`lr=0.05 hidden=[64]`);
    the full overrides stay in the run's `overrides` tag."""
    pairs = [o.lstrip("+~").split("=", 1) for o in overrides]
    varied = [(k, v) for k, v in (p if len(p) == 2 else (p[0], "") for p in pairs) if k in keys]
    short = short_keys([k for k, _ in varied])
    return " ".join(f"{short[k]}={short_value(v)}" for k, v in varied)


def _state(sweep_dir: Path) -> dict[str, Any]:
    return read_json(sweep_dir / STATE_FILE)


def group_key(sweeper: Any) -> str | None:
    """What identifies one sweep across machines: the Optuna study (name and storage, without
    its password) when the sweeper stores one in a database; None otherwise."""
    storage, study = sweeper.get("storage"), sweeper.get("study_name")
    if not storage or not study or str(storage).startswith("sqlite"):
        return None  # a SQLite study lives on one machine: the sweep folder identifies it
    return f"{study} @ {without_password(str(storage), mask='')}"


def _shared_parent(client: Any, exp_id: str, key: str) -> Any | None:
    """The parent run of a sweep shared by several workers: the earliest with this key."""
    runs = client.search_runs([exp_id], f"tags.sweep_key = '{key}' and tags.sweep = 'parent'",
                              max_results=100)
    return min(runs, key=lambda r: (r.info.start_time, r.info.run_id), default=None)


def view_tags(cfg: DictConfig) -> tuple[str, ...]:
    """Tag columns of a sweep's saved view: where a pruned search stopped each trial."""
    pruner = OmegaConf.select(cfg, "hydra.sweeper.pruner._target_", default=None)
    return ("pruned_at_epoch",) if pruner and not pruner.endswith("NopPruner") else ()


def ensure_parent(sweep_dir: Path, cfg: DictConfig, keys: list[str] | None = None,
                  reopen: bool = False, sweeper: Any = None) -> str:
    """The parent run id of this sweep, creating the run (left RUNNING) if it does not exist.

    With `reopen` (a resumed search reusing its sweep folder) an ended parent runs again, so
    that its leaderboard is rebuilt over old and new jobs when the sweep ends. Workers of one
    Optuna study on several machines (group_key) share one parent: the earliest created wins,
    and a worker that created another one in the meantime deletes it."""
    from mlflow import MlflowClient

    from fashion_exp.tracking import store

    state = sweep_dir / STATE_FILE
    with file_lock(sweep_dir / ".mlflow_sweep.lock"):
        if state.is_file():
            info = _state(sweep_dir)
            if reopen:
                client = MlflowClient(info["tracking_uri"])
                if client.get_run(info["run_id"]).info.status != "RUNNING":
                    client.update_run(info["run_id"], status="RUNNING")
                    log.info("Reopened sweep parent run %s", info["run_id"])
            return info["run_id"]
        uri = store.connect(cfg.tracking)  # during an outage, waits as the sweep's jobs do
        exp_id = store.setup(uri, cfg.tracking.experiment_name, cfg.tracking.connect_timeout,
                             checked=True)
        client = MlflowClient(uri)
        key = group_key(sweeper if sweeper is not None else HydraConfig.get().sweeper)
        shared = _shared_parent(client, exp_id, key) if key else None
        if shared is None:
            run = client.create_run(
                exp_id, run_name=store.fit_run_name(parent_name(cfg, keys, sweep_dir)),
                tags=parent_tags(cfg, keys, sweep_dir)
                | ({"sweep_key": key} if key else {})
                | {f"process.{k}": v for k, v in procs.this_process().items()},
            )
            shared = _shared_parent(client, exp_id, key) if key else run
            if shared.info.run_id != run.info.run_id:  # another worker was first
                client.delete_run(run.info.run_id)
            else:
                describe_parent(client, run.info.run_id, cfg, keys)
                client.set_tag(run.info.run_id, "sweep_id", run.info.run_id)
        if keys:
            views.save_sweep_view(client, exp_id, shared.info.run_id, keys,
                                  cfg.optimized_metric, view_tags(cfg))
        elif reopen and shared.info.status != "RUNNING":
            client.update_run(shared.info.run_id, status="RUNNING")
        run_id = shared.info.run_id
        write_json(state, {"run_id": run_id, "tracking_uri": uri, "experiment_id": exp_id,
                           "swept_keys": keys or [], "shared": bool(key),
                           "reconnect_seconds": cfg.tracking.reconnect_seconds,
                           "offline_root": str(store.offline_root(cfg.tracking))})
        log.info("Sweep parent run %s for <%s>", run_id, sweep_dir)
        return run_id


def parent_name(cfg: DictConfig, keys: list[str] | None, sweep_dir: Path) -> str:
    """`sweep lr,hidden` (the swept keys, shortened); called from a job, where the keys are
    unknown, `sweep <folder>`."""
    return "sweep " + (",".join(short_keys(keys).values()) if keys else sweep_dir.name)


def _is_sweep(override: str) -> bool:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        return OverridesParser.create().parse_override(override).is_sweep_override()
    except Exception:  # noqa: BLE001 - Hydra checked it already; a name only
        return False


def parent_tags(cfg: DictConfig, keys: list[str] | None, sweep_dir: Path) -> dict[str, str]:
    """What the parent run says of its sweep: the command's overrides, what was swept and what
    was fixed, where it ran from (MLflow's source tags) and the metric it optimizes."""

    task = list(cfg.hydra.overrides.task) if "hydra" in cfg else []
    commit = git_commit()
    return {"sweep_dir": str(sweep_dir), "sweep": "parent",
            "optimized_metric": cfg.optimized_metric, "git_commit": commit,
            "overrides": " ".join(task),
            "swept": " ".join(keys or []),
            "fixed": " ".join(o for o in task if not _is_sweep(o)),
            "mlflow.source.name": "fashion-exp-train", "mlflow.source.type": "LOCAL",
            "mlflow.user": getpass.getuser()} \
        | ({"mlflow.source.git.commit": commit.removesuffix("-dirty")}
           if commit != "unknown" else {})


def describe_parent(client: Any, run_id: str, cfg: DictConfig, keys: list[str] | None) -> None:
    """The parent's params, named like its jobs' (schemas.run_params): the params every job
    shares, and each swept key with what it sweeps (`model`=`mlp,cnn`, `optimizer.lr`=
    `0.01,0.05`, or a search space such as `interval(0.001, 0.1)`). The keys of a group whose
    option is swept differ from job to job: only those swept themselves are the parent's. Only
    from the Hydra callback, which knows the swept keys."""
    from mlflow.entities import Param

    from fashion_exp.tracking.offline import log_batch_once

    if not keys or "hydra" not in cfg:
        return
    from omegaconf import OmegaConf

    job = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
    try:
        params = run_params(job)
    except Exception as err:  # noqa: BLE001 - an unresolvable value: name the swept keys only
        log.warning("sweep parent: config not logged as params: %s", err)
        params = {}
    params = {k: v for k, v in params.items() if k in keys or k.partition(".")[0] not in keys}
    spaces = dict(cfg.hydra.sweeper.get("params") or {})
    for override in cfg.hydra.overrides.task:
        name, _, value = override.lstrip("+~").partition("=")
        if name in keys:
            spaces[name] = value
    params |= {k: str(spaces.get(k, params.get(k, ""))) for k in keys}
    log_batch_once(client, run_id, params=[Param(k, v) for k, v in params.items()])


def describe_result(client: Any, parent: Any, rows: list[dict[str, Any]],
                    best: dict[str, Any] | None, metric: str) -> None:
    """The parent's description (MLflow's run page shows it first): what was swept, what was
    fixed, and the best job."""
    from fashion_exp.sweeps import leaderboard

    tags = parent.data.tags
    lines = [f"Sweep of `{tags.get('swept') or 'the config'}`"
             + (f" with `{tags['fixed']}` fixed" if tags.get("fixed") else "") + ": "
             + f"{len(rows)} runs, " + leaderboard.counts(rows) + "."]
    if best is not None:
        column = leaderboard.metric_columns(metric)[0]
        lines.append(f"Best: **{best['run']}**, {column} {leaderboard.short_number(best[column])}"
                     + (f", test_accuracy {leaderboard.short_number(best['test_accuracy'])}"
                        if best.get("test_accuracy") is not None else "") + ".")
    client.set_tag(parent.info.run_id, "mlflow.note.content", "\n\n".join(lines))


def child_name_and_tags(cfg: DictConfig) -> tuple[str | None, dict[str, str]]:
    """A job's run name (the values its sweep varies) and the tags that nest it under the
    sweep's parent run; (None, {}) outside a multirun."""
    sweep_dir = job_sweep_dir()
    if sweep_dir is None:
        return None, {}
    parent = ensure_parent(sweep_dir, cfg)
    keys = set(_state(sweep_dir)["swept_keys"])
    overrides = list(HydraConfig.get().overrides.task)
    tags = {"mlflow.parentRunId": parent, "sweep_id": parent, "sweep": "child",
            "sweep_job": str(HydraConfig.get().job.num)}
    from fashion_exp.sweeps import pruning  # a search's trial is named by its number

    number = pruning.trial_number()
    if number is not None:
        return pruning.trial_name(number), tags
    return child_run_name(overrides, list(keys)) or " ".join(overrides) or "defaults", tags


PENDING_FILE = "sweep.json"  # in <offline_root>/sweep-<parent id>/: a sweep left to finish


def finish_parent(sweep_dir: Path, interrupted: bool = False) -> str | None:
    """Record the best child and the leaderboard on the parent and end it; returns status.

    A tracking server that cannot take it is waited for (tracking.reconnect_seconds); if it
    stays away, the sweep is kept in the outbox folder for `fashion-exp-runs upload`, which
    finishes it once the server is back (None then)."""
    from fashion_exp.tracking import store

    state = sweep_dir / STATE_FILE
    if not state.is_file():
        return None
    info = _state(sweep_dir)
    uri = info["tracking_uri"]
    deadline = time.monotonic() + info.get("reconnect_seconds", 60.0)
    while True:
        try:
            if store.is_server(uri):
                store.wait_for_server(uri, max(0.0, deadline - time.monotonic()))
            return _finish(info, interrupted)
        except Exception as err:
            if not store.server_gone(uri, err):
                raise
            if time.monotonic() < deadline:
                continue  # the server went away while the parent was written: wait again
            _keep(info, sweep_dir, interrupted, store.server_problem(uri) or first_line(err))
            return None


def _keep(info: dict[str, Any], sweep_dir: Path, interrupted: bool, problem: str) -> None:
    """Leave an unfinished sweep in the outbox folder for `fashion-exp-runs upload`."""
    from fashion_exp.tracking import store

    root = Path(info.get("offline_root") or store.offline_root(None))
    kept = root / f"sweep-{info['run_id']}"
    kept.mkdir(parents=True, exist_ok=True)
    write_json(kept / PENDING_FILE, {"sweep_dir": str(sweep_dir), "interrupted": interrupted})
    print(f"fashion-exp-train: the tracking server {info['tracking_uri']} did not come back "
          f"({problem}); sweep {info['run_id']} is left RUNNING; finish it "
          f"with: fashion-exp-runs upload {kept}", flush=True)


def finish_kept(folder: Path) -> str | None:
    """Finish a sweep that finish_parent kept in an outbox folder; the folder is removed once
    the parent has ended. Returns its status."""
    pending = read_json(folder / PENDING_FILE)
    info = _state(Path(pending["sweep_dir"]))
    status = _finish(info, pending["interrupted"])
    shutil.rmtree(folder)
    return status


def _finish(info: dict[str, Any], interrupted: bool) -> str:
    """finish_parent's work, on a server that answers."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    from fashion_exp.sweeps import leaderboard

    client = MlflowClient(info["tracking_uri"])
    parent = client.get_run(info["run_id"])
    # A sweep shared by several workers is summed up by each worker that ends (the last one
    # leaves the complete leaderboard); a sweep of one process only once.
    if parent.info.status != "RUNNING" and not info.get("shared"):
        return parent.info.status
    metric = parent.data.tags.get("optimized_metric", "val_accuracy")
    children = client.search_runs([info["experiment_id"]],
                                  filter_string=f"tags.sweep_id = '{info['run_id']}'"
                                  " and tags.sweep = 'child'", max_results=5000)
    swept = info.get("swept_keys") or leaderboard.swept_params(parent)
    rows = leaderboard.rows_of(children, swept or leaderboard.varied_params(children), metric)
    objective = leaderboard.metric_columns(metric)[0]
    finished = [r for r in rows if r["status"] == "FINISHED" and r[objective] is not None]
    if finished:
        # The best job's values under the children's names: the parent's row in the runs
        # table reads as the sweep's result.
        best = finished[0]
        now = int(time.time() * 1000)
        client.log_batch(info["run_id"], metrics=[
            Metric(m, best[m], now, 0) for m in leaderboard.metric_columns(metric)
            if best[m] is not None and parent.data.metrics.get(m) != best[m]])  # once, if retried
        client.set_tag(info["run_id"], "best_run_id", best["run_id"])
        client.set_tag(info["run_id"], "best_run_name", best["run"])
    describe_result(client, parent, rows, finished[0] if finished else None, metric)
    # Counts are tags: as metrics they would be drawn as single-point charts.
    client.set_tag(info["run_id"], "jobs_total", str(len(rows)))
    # As leaderboard.counts tells them: a killed job (stopped, or its process died) has not
    # failed.
    client.set_tag(info["run_id"], "jobs_failed",
                   str(sum(r["status"] not in ("FINISHED", "PRUNED", "KILLED") for r in rows)))
    for status in ("PRUNED", "KILLED"):
        client.set_tag(info["run_id"], f"jobs_{status.lower()}",
                       str(sum(r["status"] == status for r in rows)))
    client.log_text(info["run_id"], leaderboard.csv_text(rows), "leaderboard.csv")
    client.log_text(info["run_id"], leaderboard.markdown(rows), "leaderboard.md")
    status = "KILLED" if interrupted else ("FINISHED" if finished else "FAILED")
    client.set_terminated(info["run_id"], status)
    log.info("Sweep %s ended %s: %d jobs, best %s", info["run_id"], status, len(rows),
             finished[0]["run"] if finished else "none")
    if info.get("swept_keys"):
        views.fit_run_names(client, info["experiment_id"], info["run_id"],
                            [r["run"] for r in rows])
        print(f"sweep {info['run_id']} {status}: {len(rows)} runs; compare them: "
              + views.ui_hint(info["tracking_uri"],
                              views.view_link(info["experiment_id"], info["run_id"])),
              flush=True)
    return status


def log_search_figures(sweep_dir: Path, figures: dict[str, Any], summary: str) -> None:
    """A search's pictures (search/<name>.png) and trial counts on the sweep's parent run;
    they replace the previous ones, so the parent shows the study as it is now."""
    import matplotlib.pyplot as plt
    from mlflow import MlflowClient

    from fashion_exp.tracking import store

    try:
        if not (sweep_dir / STATE_FILE).is_file():
            return
        info = _state(sweep_dir)
        uri = info["tracking_uri"]
        client = MlflowClient(uri)
        try:
            if store.is_server(uri):
                store.wait_for_server(uri, info.get("reconnect_seconds", 60.0))
            for name, figure in figures.items():
                client.log_figure(info["run_id"], figure, f"search/{name}")
            client.set_tag(info["run_id"], "search_trials", summary)
        except Exception as err:
            if not store.server_gone(uri, err):
                raise
            # The study keeps every trial: the next run of the search draws them again.
            log.warning("search pictures not logged: the tracking server %s is away (%s)",
                        uri, first_line(err))
    finally:
        for figure in figures.values():
            plt.close(figure)


def finish_open_sweeps(interrupted: bool = False) -> None:
    """End every sweep this process started whose end Hydra did not report (a job raised)."""
    for sweep_dir in sorted(_open_sweeps):
        try:
            finish_parent(sweep_dir, interrupted)
        finally:
            _open_sweeps.discard(sweep_dir)


class SweepCallback(Callback):
    """Hydra callback: parent run before the first job, leaderboard after the last."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir).resolve()
        _open_sweeps.add(sweep_dir)
        ensure_parent(sweep_dir, config, swept_keys(config), reopen=True,
                      sweeper=config.hydra.sweeper)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir).resolve()
        try:
            finish_parent(sweep_dir)
        finally:
            _open_sweeps.discard(sweep_dir)
