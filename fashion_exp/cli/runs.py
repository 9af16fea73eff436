"""fashion-exp-runs: find runs that did not end properly, and repair them.

    fashion-exp-runs interrupted              runs left RUNNING by a killed process, and stopped
                                              runs that can be resumed from a checkpoint
    fashion-exp-runs mark-failed              end the orphaned RUNNING runs as FAILED
    fashion-exp-runs resume <run_id|latest>   continue a stopped run (= fashion-exp-train
                                              trainer.resume=...)
    fashion-exp-runs upload [folder ...]      send runs kept on disk during a server outage

A process killed with SIGKILL (or a machine that lost power) cannot end its run: the run stays
RUNNING. Each run records its process (host, pid, start time), so a run whose process is gone
is recognised on the host that ran it; runs of other hosts are listed as unknown.

Flags (argparse), not Hydra overrides like the entry points that train, evaluate or serve: it
acts on runs of a store and has no experiment config to compose.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from fashion_exp.cli.options import add_store_options

STATUSES = ("RUNNING", "KILLED", "FAILED")


def interrupted(client: Any, experiment: str, checkpoint_root: Path) -> list[dict[str, Any]]:
    """Runs not ended properly or stopped with a checkpoint, newest first, each with its state:
    orphaned (process gone), running, unknown (other host), or stopped (KILLED/FAILED)."""
    from fashion_exp.core.checkpoints import WEIGHTS_FILE, load_state
    from fashion_exp.tracking.store import orphaned, owner

    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    found = []
    runs = client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"],
                              max_results=5000)  # MLflow filters have no OR: filtered here
    for run in (r for r in runs if r.info.status in STATUSES):
        state = "stopped"
        if run.info.status == "RUNNING":
            state = {False: "running", True: "orphaned", None: "unknown"}[orphaned(run)]
        checkpoint = checkpoint_root / run.info.run_id
        has_checkpoint = (checkpoint / WEIGHTS_FILE).is_file()
        if state == "stopped" and not has_checkpoint:
            continue  # ended on purpose (KILLED/FAILED with nothing to resume): not listed
        found.append({"run_id": run.info.run_id, "name": run.info.run_name or "",
                      "status": run.info.status, "state": state,
                      "host": owner(run)["host"] or "?",
                      "epochs_done": (load_state(checkpoint)["epochs_done"] if has_checkpoint
                                      else None)})
    return found


def mark_failed(client: Any, rows: list[dict[str, Any]]) -> list[str]:
    """End the orphaned runs FAILED with a tag saying why; returns their ids."""
    marked = []
    for row in rows:
        if row["state"] != "orphaned":
            continue
        client.set_tag(row["run_id"], "error", "the process running it ended without ending "
                       "the run (killed with SIGKILL, or the machine stopped)")
        client.set_terminated(row["run_id"], "FAILED")
        marked.append(row["run_id"])
    return marked


def table(rows: list[dict[str, Any]]) -> str:
    """The listing as aligned text, with what can be done with each run."""
    if not rows:
        return "no interrupted runs"
    lines = [f"{'run_id':32}  {'status':8}  {'state':8}  {'host':12}  {'epochs':>6}  name"]
    for r in rows:
        epochs = "-" if r["epochs_done"] is None else str(r["epochs_done"])
        lines.append(f"{r['run_id']:32}  {r['status']:8}  {r['state']:8}  {r['host'][:12]:12}"
                     f"  {epochs:>6}  {r['name'][:60]}")
    if any(r["state"] == "orphaned" for r in rows):
        lines.append("orphaned: its process is gone (fashion-exp-runs mark-failed ends them "
                     "FAILED)")
    if any(r["epochs_done"] is not None for r in rows):
        lines.append("with epochs: resume with  fashion-exp-runs resume <run_id>")
    return "\n".join(lines)


def upload(folders: list[Path]) -> list[tuple[Path, str]]:
    """Replay offline folders into their tracking servers, runs first, then finish the sweeps
    kept there (their leaderboards need the runs); (folder, outcome) for each."""
    from fashion_exp.sweeps.multirun import PENDING_FILE, finish_kept
    from fashion_exp.tracking.offline import replay

    outcomes = []
    for folder in sorted(folders, key=lambda f: (f / PENDING_FILE).is_file()):
        try:
            if (folder / PENDING_FILE).is_file():
                outcomes.append((folder, f"sweep ended {finish_kept(folder)}"))
            else:
                outcomes.append((folder, f"sent {replay(folder)} entries"))
        except Exception as err:  # noqa: BLE001 - report each folder, go on with the next
            outcomes.append((folder, f"failed: {type(err).__name__}: {str(err)[:300]}"))
    return outcomes


def main(argv: list[str] | None = None) -> int:
    """Console entry point: fashion-exp-runs."""
    parser = argparse.ArgumentParser(prog="fashion-exp-runs",
                                     description="Find and repair runs that did not end.")
    add_store_options(parser)
    parser.add_argument("--checkpoint-dir", type=Path, default=None,
                        help="checkpoints folder (default: beside a SQLite store, else "
                             "<repo>/mlruns/checkpoints)")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("interrupted", help="list runs that did not end or can be resumed")
    commands.add_parser("mark-failed", help="end orphaned RUNNING runs as FAILED")
    resume = commands.add_parser("resume", help="continue a stopped run from its checkpoint")
    resume.add_argument("run", help="run id, or latest")
    send = commands.add_parser("upload", help="send runs kept on disk during a server outage")
    send.add_argument("folders", nargs="*", type=Path,
                      help="offline run folders (default: all in <repo>/mlruns/offline)")
    args = parser.parse_args(argv)

    from fashion_exp.config import project_root
    from fashion_exp.core import checkpoints
    from fashion_exp.tracking.store_checks import StoreError, check_store, resolve_uri

    uri = resolve_uri(args.tracking_uri)
    if args.command in ("interrupted", "mark-failed"):
        try:  # before MLflow is imported; `interrupted` only reads: a read-only store is fine
            uri = check_store(args.tracking_uri, write=args.command == "mark-failed",
                              connect_timeout=args.connect_timeout, option="--tracking-uri")
        except StoreError as err:
            print(f"fashion-exp-runs: error: {err}", file=sys.stderr)
            return 2
    ckpt_root = checkpoints.root(args.checkpoint_dir, uri)
    if args.command == "resume":
        os.execvp(sys.executable, [sys.executable, "-m", "fashion_exp.cli.train",
                                   f"trainer.resume={args.run}", f"tracking.uri={uri}",
                                   f"trainer.checkpoint_dir={ckpt_root}"])
    if args.command == "upload":
        folders = args.folders or sorted(p for p in (project_root() / "mlruns" / "offline")
                                         .glob("*") if p.is_dir())
        from fashion_exp.sweeps.multirun import PENDING_FILE
        from fashion_exp.tracking.offline import RUN_FILE

        missing = [f for f in folders
                   if not (f / RUN_FILE).is_file() and not (f / PENDING_FILE).is_file()]
        if missing:
            print(f"fashion-exp-runs: {missing[0]} is not an offline run or sweep folder (no "
                  "run.json or sweep.json)", file=sys.stderr)
            return 2
        outcomes = upload(folders)
        for folder, outcome in outcomes:
            print(f"{folder}: {outcome}")
        if not outcomes:
            print("nothing to upload")
        return 1 if any(o.startswith("failed") for _, o in outcomes) else 0

    from mlflow import MlflowClient

    client = MlflowClient(uri)
    rows = interrupted(client, args.experiment, ckpt_root)
    if args.command == "mark-failed":
        marked = mark_failed(client, rows)
        print(f"marked {len(marked)} orphaned run(s) FAILED" +
              "".join(f"\n  {run_id}" for run_id in marked))
        return 0
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
