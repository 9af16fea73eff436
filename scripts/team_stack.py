"""Start or stop a local team stack: PostgreSQL plus an `mlflow server` storing runs in it.

    python scripts/team_stack.py start [--dir .team] [--mlflow-port 5000]
    python scripts/team_stack.py status [--dir .team]
    python scripts/team_stack.py stop [--dir .team]

`start` prints the tracking URI (for `tracking=server tracking.uri=...`) and the Optuna
storage URL (for `hydra.sweeper.storage=...`). Both servers listen on 127.0.0.1 only; the
data stays in the folder after `stop`, and `start` picks it up again.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from devtools import team


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=["start", "status", "stop"])
    parser.add_argument("--dir", type=Path, default=Path(".team"),
                        help="folder of the stack's data, logs and state (default: .team)")
    parser.add_argument("--mlflow-port", type=int, default=None,
                        help="port of the tracking server (default: a free one)")
    parser.add_argument("--pg-port", type=int, default=None,
                        help="port of PostgreSQL (default: a free one)")
    args = parser.parse_args(argv)
    try:
        if args.action == "start":
            stack = team.start(args.dir, args.pg_port, args.mlflow_port)
        elif args.action == "status":
            stack = team.status(args.dir)
            if stack is None:
                print(f"no team stack running in {args.dir}", file=sys.stderr)
                return 1
        else:
            stopped = team.stop(args.dir)
            print(f"stopped the team stack in {args.dir}" if stopped
                  else f"no team stack was started in {args.dir}")
            return 0
    except team.StackError as err:
        print(f"team_stack: {err}", file=sys.stderr)
        return 1
    print(f"tracking server: {stack.tracking_uri}   (fashion-exp-train tracking=server "
          f"tracking.uri={stack.tracking_uri})")
    print(f"optuna storage:  {stack.optuna_storage}   (hydra.sweeper.storage=...)")
    print(f"data and logs:   {stack.dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
