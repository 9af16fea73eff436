"""Compare runs from the MLflow store: leaderboard, curves, metric against params, seed groups.

    fashion-exp-compare                              # the latest sweep
    fashion-exp-compare --sweep <parent run id>      # one sweep
    fashion-exp-compare --all                        # every run of the experiment
    fashion-exp-compare --filter "params.model = 'cnn'"
    fashion-exp-compare --experiment my_exp --tracking-uri sqlite:////abs/mlflow.db --out cmp/

Writes leaderboard.csv, leaderboard.md, val_accuracy.png, metric_vs_params.png (and
seeds.csv / seeds.md when runs differ only by seed) into --out (default
outputs/compare/<what> under the current directory), and prints the leaderboard. A sweep's
columns are the keys it swept (its parent's `swept` tag); other runs' are the params that
differ.

Flags (argparse), not Hydra overrides like the entry points that train, evaluate or serve: it
only reads a store and has no experiment config to compose.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fashion_exp.cli.options import add_store_options
from fashion_exp.core.metrics import epoch_metric, objective_metric
from fashion_exp.sweeps.leaderboard import (
    counts,
    csv_text,
    markdown,
    metric_columns,
    rows_of,
    seed_groups,
    short_number,
    swept_params,
    varied_params,
)
from fashion_exp.tracking import views
from fashion_exp.tracking.store_checks import StoreError, check_store

CURVE = "val_accuracy"  # the per-epoch metric drawn for every run (val_accuracy.png)


class CompareError(RuntimeError):
    """Nothing to compare: unknown sweep or experiment, or no run matches."""


@dataclass
class Selection:
    """The runs to compare, a short name for them, and how the MLflow UI shows them."""

    runs: list
    name: str
    metric: str
    ui_link: str = ""  # the UI address after the server's: a sweep's saved view, or a search
    swept: list[str] | None = None  # a sweep's swept keys; None: the params that differ

    @property
    def varied(self) -> list[str]:
        """The param columns: what the sweep varied, else whatever differs between runs."""
        return self.swept if self.swept is not None else varied_params(self.runs)


def select(client: Any, experiment: str, sweep: str | None, filter_string: str | None,
           all_runs: bool) -> Selection:
    """Find the runs the command line asks for (default: the children of the latest sweep)."""
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        names = ", ".join(e.name for e in client.search_experiments()) or "none"
        raise CompareError(f"experiment {experiment!r} does not exist (experiments: {names})")
    ids = [exp.experiment_id]
    if sweep is None and not filter_string and not all_runs:
        parents = client.search_runs(ids, "tags.sweep = 'parent'", max_results=1,
                                     order_by=["attributes.start_time DESC"])
        if not parents:
            raise CompareError(f"experiment {experiment!r} has no sweep yet; run one with "
                               "fashion-exp-train -m ..., or pass --all or --filter")
        sweep = parents[0].info.run_id
    if sweep is not None:
        try:
            parent = client.get_run(sweep)
        except Exception:  # noqa: BLE001 - MLflow raises several types for a bad id
            raise CompareError(f"--sweep {sweep!r}: no such run in the tracking store") from None
        if parent.data.tags.get("sweep") != "parent":
            raise CompareError(f"--sweep {sweep!r} is not a sweep's parent run")
        runs = client.search_runs(ids, f"tags.sweep_id = '{sweep}' and tags.sweep = 'child'",
                                  max_results=5000)
        metric = parent.data.tags.get("optimized_metric", "val_accuracy")
        name = f"sweep_{sweep[:8]}"
        search = f"tags.sweep_id = '{sweep}' and tags.sweep = 'child'"
        link = (views.view_link(exp.experiment_id, sweep) if views.has_view(exp, sweep)
                else views.search_link(exp.experiment_id, search, objective_metric(metric)))
        swept = swept_params(parent) or None
    else:
        try:
            runs = client.search_runs(ids, filter_string or "", max_results=5000)
        except Exception as err:  # noqa: BLE001 - MLflow's parse errors
            raise CompareError(f"--filter {filter_string!r}: {err}") from None
        runs = [r for r in runs if r.data.tags.get("sweep") != "parent"]
        metric = "val_accuracy"
        name = "filtered" if filter_string else "all"
        swept = None
        link = views.search_link(exp.experiment_id, filter_string or "",
                                 objective_metric(metric))
    if not runs:
        what = f"sweep {sweep}" if sweep else f"filter {filter_string!r}" if filter_string \
            else f"experiment {experiment!r}"
        raise CompareError(f"no runs in {what}")
    return Selection(runs=runs, name=name, metric=metric, ui_link=link, swept=swept)


def curves_figure(client: Any, runs: list, key: str = CURVE) -> Any:
    """Every run's per-epoch `key` in one plot, epochs counted from 1 as MLflow's steps."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(9, 5), layout="constrained")
    ax = fig.subplots()
    for r in runs:
        history = sorted(client.get_metric_history(r.info.run_id, epoch_metric(key)),
                         key=lambda m: m.step)
        if history:
            ax.plot([m.step for m in history], [m.value for m in history], marker=".",
                    label=r.info.run_name[:60])
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    ax.set(xlabel="epoch", ylabel=key, title=f"{key} per epoch")
    ax.grid(alpha=0.3)
    if ax.get_lines() and len(runs) <= 20:  # no legend without curves (matplotlib warns)
        ax.legend(fontsize=7)
    return fig


MAX_LEGEND = 8  # more colours than this are hard to tell apart: one colour, no legend
PANEL_COLUMNS = 3  # panels per row of metric_vs_params.png: 1200 px wide at most
LOG_SPAN = 30  # numbers whose largest is this many times their smallest get a log axis


def _positions(raw: list[str]) -> tuple[list[float], list[str] | None]:
    """x positions of param values: numbers as they are, anything else as sorted categories
    (returned as tick labels)."""
    try:
        return [float(v) for v in raw], None
    except ValueError:
        labels = sorted(set(raw))
        return [float(labels.index(v)) for v in raw], labels


def _colour_key(varied: list[str], key: str, rows: list[dict[str, Any]]) -> str | None:
    """The param whose values colour `key`'s panel: the other swept key when there are two,
    and only if it has few values (with more keys, colours would stand for combinations no
    one can read)."""
    others = [k for k in varied if k != key]
    if len(others) != 1 or len({str(r.get(others[0])) for r in rows}) > MAX_LEGEND:
        return None
    return others[0]


def params_figure(rows: list[dict[str, Any]], varied: list[str], metric: str) -> Any:
    """`metric` (a leaderboard column) against each swept param, one panel per param in a
    grid of up to three columns; numbers on a log axis when they span decades (LOG_SPAN),
    anything else as categories; with two params, points coloured by the other one. Pruned
    runs (their best value so far) are hollow."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullFormatter

    keys = varied or ["run"]
    ncols = min(PANEL_COLUMNS, len(keys))
    nrows = -(-len(keys) // ncols)
    fig = Figure(figsize=(4.0 * ncols, 3.2 * nrows + 0.4), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    done = [r for r in rows if r.get(metric) is not None]
    for ax in axes[len(keys):]:
        ax.set_visible(False)
    for ax, key in zip(axes, keys, strict=False):
        xs, labels = _positions([str(r.get(key)) for r in done])
        colour = _colour_key(varied, key, done)
        groups: dict[str, list[int]] = {}
        for i, r in enumerate(done):
            groups.setdefault(short_number(r.get(colour)) if colour else "", []).append(i)
        for n, (name, members) in enumerate(sorted(groups.items())):
            for hollow in (False, True):
                picked = [i for i in members if (done[i].get("status") == "PRUNED") == hollow]
                if picked:
                    ax.scatter([xs[i] for i in picked], [done[i][metric] for i in picked],
                               color=f"C{n}", facecolors="none" if hollow else None,
                               label=None if hollow else name or None)
        if labels is not None:
            shown = [short_number(v) for v in labels]
            ax.set_xticks(range(len(labels)), shown,
                          rotation=30 if sum(map(len, shown)) > 24 else 0,
                          ha="right" if sum(map(len, shown)) > 24 else "center", fontsize=8)
            ax.set_xlim(-0.5, len(labels) - 0.5)
        elif xs and min(xs) > 0 and max(xs) / min(xs) >= LOG_SPAN:
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(NullFormatter())  # 10^k only: no crowded labels
        ax.set_xlabel(key)
        ax.set_ylabel(metric if ax.get_subplotspec().is_first_col() else "")
        ax.grid(alpha=0.3)
        if colour and len(groups) > 1:
            ax.legend(fontsize=7, title=colour, title_fontsize=7, loc="upper left",
                      bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    if any(r.get("status") == "PRUNED" for r in done):
        fig.suptitle(f"{metric} against the swept params (hollow: pruned, best so far)")
    else:
        fig.suptitle(f"{metric} against the swept params")
    return fig


def compare(selection: Selection, client: Any, out: Path) -> str:
    """Write the tables and figures into `out`; returns the printed report."""
    out.mkdir(parents=True, exist_ok=True)
    varied = selection.varied
    rows = rows_of(selection.runs, varied, selection.metric)
    (out / "leaderboard.csv").write_text(csv_text(rows))
    (out / "leaderboard.md").write_text(markdown(rows))
    curves_figure(client, selection.runs).savefig(out / "val_accuracy.png", dpi=100)
    params_figure(rows, varied, metric_columns(selection.metric)[0]).savefig(
        out / "metric_vs_params.png", dpi=100)
    shown = [{k: v for k, v in r.items() if k != "run_id"} for r in rows]
    report = [f"{len(rows)} runs ({selection.name}: {counts(rows)}), sorted by "
              f"{selection.metric}; varied params: {', '.join(varied) or 'none'}",
              markdown(shown)]
    groups = seed_groups(rows, varied, selection.metric)
    if groups:
        (out / "seeds.csv").write_text(csv_text(groups))
        (out / "seeds.md").write_text(markdown(groups))
        report += ["Runs that differ only by seed (mean ± std):", markdown(groups)]
    report.append(f"written to {out}")
    return "\n".join(report)



def main(argv: list[str] | None = None) -> int:
    """Console entry point: fashion-exp-compare."""
    parser = argparse.ArgumentParser(prog="fashion-exp-compare",
                                     description="Compare fashion_exp runs in MLflow.")
    what = parser.add_mutually_exclusive_group()
    what.add_argument("--sweep", help="parent run id of a sweep (default: the latest sweep)")
    what.add_argument("--filter", help="an MLflow filter string, e.g. \"params.model = 'cnn'\"")
    what.add_argument("--all", action="store_true", help="every run of the experiment")
    add_store_options(parser)
    parser.add_argument("--out", type=Path, default=None,
                        help="output folder (default: outputs/compare/<sweep_id|all|filtered> "
                             "under the current directory)")
    args = parser.parse_args(argv)

    try:  # before MLflow is imported; comparing only reads: a read-only store is fine
        uri = check_store(args.tracking_uri, write=False, connect_timeout=args.connect_timeout,
                          option="--tracking-uri")
    except StoreError as err:
        print(f"fashion-exp-compare: error: {err}", file=sys.stderr)
        return 2
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    try:
        selection = select(client, args.experiment, args.sweep, args.filter, args.all)
    except CompareError as err:
        print(f"fashion-exp-compare: {err}", file=sys.stderr)
        return 2
    out = args.out or Path.cwd() / "outputs" / "compare" / selection.name
    print(compare(selection, client, out))
    print(f"in the MLflow UI: {views.ui_hint(uri, selection.ui_link)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
