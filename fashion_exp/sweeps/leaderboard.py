"""A group of runs as a leaderboard: one row per run, best first, and seed groups.

Written by a sweep's parent run when the sweep ends (fashion_exp/sweeps/multirun.py) and by
fashion-exp-compare.
"""

from __future__ import annotations

import csv
import io
import math
import statistics
from typing import Any

from fashion_exp.core.metrics import key_metrics

SEED_KEYS = ("trainer.seed", "data.shuffle_seed")


def varied_params(runs: list) -> list[str]:
    """Param keys whose value is not the same in every run (runs that are not one sweep)."""
    keys = sorted({k for r in runs for k in r.data.params})
    return [k for k in keys if len({r.data.params.get(k) for r in runs}) > 1]


def swept_params(parent: Any) -> list[str]:
    """The keys a sweep varies, as its parent run records them (tag `swept`)."""
    return parent.data.tags.get("swept", "").split()


def param(run: Any, key: str) -> str | None:
    """A run's value of a param key; for a config group (`model`) its chosen option, which
    runs logged before options were params recorded as `<group>.name`."""
    params = run.data.params
    return params.get(key, params.get(f"{key}.name"))


def short_number(value: Any) -> str:
    """A value as a table or a name shows it: floats (and float strings) to 4 significant
    digits (0.0024234724 -> 0.002423, 1234.5 -> 1234), integers and words as they are."""
    if isinstance(value, bool) or value is None:
        return "" if value is None else str(value)
    if isinstance(value, str):
        if value.lstrip("+-").isdigit():
            return value
        try:
            value = float(value)
        except ValueError:
            return value
    if isinstance(value, int):
        return str(value)
    if not math.isfinite(value):
        return str(value)
    if 1e4 <= abs(value) < 1e9:  # e.g. seconds: whole, not 1.235e+04
        return str(round(value))
    return f"{value:.4g}"


def _best(metric: str) -> Any:
    return min if "loss" in metric else max


def _value(run: Any, metric: str) -> float | None:
    value = run.data.metrics.get(metric)
    return value if value is not None and math.isfinite(value) else None


# The leaderboard's metric columns: the optimized value first, then the test metrics.
metric_columns = key_metrics


def rows_of(runs: list, varied: list[str], metric: str) -> list[dict[str, Any]]:
    """One leaderboard row per run, sorted by the optimized value of `metric` (a config
    optimized_metric), best first; failed runs last."""
    columns = metric_columns(metric)
    rows = []
    for r in runs:
        end = r.info.end_time or r.info.start_time
        row = {"run": r.info.run_name, "status": status(r)}
        row |= {k: param(r, k) for k in varied}
        row |= {m: _value(r, m) for m in columns}
        row |= {"duration_s": round((end - r.info.start_time) / 1000, 1),
                "run_id": r.info.run_id}
        rows.append(row)
    sign = 1 if _best(metric) is min else -1
    # Finished runs first, best first; then pruned runs (never a best value); then the rest.
    order = {"FINISHED": 0, "PRUNED": 1}
    return sorted(rows, key=lambda row: (row[columns[0]] is None, order.get(row["status"], 2),
                                         sign * (row[columns[0]] or 0.0)))


def status(run: Any) -> str:
    """MLflow's status of a run, or PRUNED for a search trial its pruner stopped (such a run
    ends FINISHED in MLflow, with the tag pruned=true and the metrics of its epochs)."""
    return "PRUNED" if run.data.tags.get("pruned") == "true" else run.info.status


def counts(rows: list[dict[str, Any]]) -> str:
    """'5 finished, 6 pruned, 1 killed, 1 failed' of leaderboard rows (pruned and killed only
    when there are: a killed job, stopped or whose process died, is not a failed one)."""
    finished = sum(r["status"] == "FINISHED" for r in rows)
    pruned = sum(r["status"] == "PRUNED" for r in rows)
    killed = sum(r["status"] == "KILLED" for r in rows)
    failed = len(rows) - finished - pruned - killed
    return (f"{finished} finished, " + (f"{pruned} pruned, " if pruned else "")
            + (f"{killed} killed, " if killed else "") + f"{failed} failed")


def seed_groups(rows: list[dict[str, Any]], varied: list[str], metric: str,
                ) -> list[dict[str, Any]]:
    """Runs that differ only by seed, as groups with mean and std of each metric column."""
    if not any(k in varied for k in SEED_KEYS):
        return []
    keys = [k for k in varied if k not in SEED_KEYS]
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for row in rows:
        if row["status"] == "FINISHED":
            groups.setdefault(tuple(row[k] for k in keys), []).append(row)
    out = []
    for values, members in groups.items():
        entry: dict[str, Any] = dict(zip(keys, values, strict=True)) | {"runs": len(members)}
        for m in metric_columns(metric):
            xs = [row[m] for row in members if row[m] is not None]
            if xs:
                std = statistics.stdev(xs) if len(xs) > 1 else 0.0
                entry[m] = f"{short_number(statistics.mean(xs))} ± {short_number(std)}"
        out.append(entry)
    return out


def _cell(value: Any) -> str:
    """A table cell: numbers to at most 4 significant digits (4.9, 0.8871, 0.002423)."""
    return short_number(value)


def markdown(rows: list[dict[str, Any]]) -> str:
    """A Markdown table of dict rows (columns from the first row)."""
    if not rows:
        return "(no runs)\n"
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_cell(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def csv_text(rows: list[dict[str, Any]]) -> str:
    """Rows as CSV text with a header (empty for no rows)."""
    if not rows:
        return ""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()
