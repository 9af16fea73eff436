"""Links into the MLflow UI, and saved views: a sweep opens with its swept params and key metrics.

MLflow's runs page loads a view from the URL parameter `viewStateShareKey=<key>`: its state
is the JSON in the experiment tag `mlflow.sharedViewState.<key>` (the tag its "Share" button
writes). The state holds the runs table's columns, sort order and search filter, so a link
opens the sweep ready to compare, without clicking. The parameter must be on the runs tab's
address: the experiment's own address redirects there and drops it.

The UI's sidebar shows GenAI pages or model-training pages by the URL parameter
`workflowType` (remembered by the browser), GenAI unless told: every link says
`machine_learning`.

Private API (mlflow 3.17.2): the view-state tag, its JSON keys, the column ids and the URL
parameters are the UI's own, undocumented; MLflow has no public API for saved views.
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import urlencode

from fashion_exp.core.metrics import key_metrics
from fashion_exp.uris import is_server

# Private API (mlflow 3.17.2): see the module's docstring.
SHARED_VIEW_TAG = "mlflow.sharedViewState."
SHARE_KEY_PARAM = "viewStateShareKey"
MODEL_TRAINING = "workflowType=machine_learning"


def column(kind: str, key: str) -> str:
    """A column of MLflow's runs table: column('params', 'optimizer.lr') is
    "params.`optimizer.lr`" (kind: attributes, params, metrics or tags)."""
    return f"{kind}.`{key}`"


RUN_NAME = column("attributes", "Run Name")
MODELS = column("attributes", "Models")
CREATED = "runDateAndNestInfo"  # MLflow's id of its Created column (with the status icon)
DURATION = "duration"  # MLflow's id of its Duration column


def header_width(name: str) -> int:
    """Pixels a column needs to show its header `name` whole (MLflow cuts headers at its
    default 100 px: best_val_accuracy, trainer.batch_size). Its headers' text is about 6 px a
    character, its cells' padding 30 px (measured in Chromium at 1440 px)."""
    return max(70, 6 * len(name) + 30)


def name_width(names: list[str]) -> int:
    """Pixels the Run Name column needs to show the longest of `names` whole (its links are
    about 5.1 px a character, after a colour dot); 190, MLflow's own width, before any run
    is named."""
    return min(420, max(150, round(5.3 * max(map(len, names))) + 45)) if names else 190


def sweep_state(parent_id: str, swept: list[str], metric: str,
                tags: tuple[str, ...] = (), names: list[str] | None = None) -> dict[str, Any]:
    """The view of one sweep: its jobs' runs, best first (the parent, which repeats the best
    one's values, left out); columns, left to right: the swept params (a config group's
    chosen option, `model` = `cnn`, is a param named after its group), the optimized value
    (e.g. best_val_accuracy), the given tags (a pruned search's pruned_at_epoch), the test
    metrics, the logged model and the duration (MLflow always shows Duration; it goes last).
    Widths fit the headers and the run names (`names`, when the jobs have them), so that at
    1440 px every swept key of a 7-key search is on screen."""
    metrics = key_metrics(metric)
    objective, others = metrics[0], metrics[1:]
    params = [column("params", k) for k in swept]
    shown_tags = [column("tags", t) for t in tags]
    return {
        "searchFilter": f"tags.sweep_id = '{parent_id}' and tags.sweep = 'child'",
        "orderByKey": column("metrics", objective),
        "orderByAsc": "loss" in metric,
        "selectedColumns": params + [column("metrics", m) for m in metrics] + shown_tags
        + [MODELS],
        # MLflow applies widths only to the columns named in columnOrder (ids of its table).
        "columnOrder": ["0", RUN_NAME, CREATED] + params + [column("metrics", objective)]
        + shown_tags + [column("metrics", m) for m in others] + [MODELS, DURATION],
        "columnWidths": {column("params", k): header_width(k) for k in swept}
        | {column("metrics", m): header_width(m) for m in metrics}
        | {column("tags", t): header_width(t) for t in tags}
        | {RUN_NAME: name_width(names or []), CREATED: 135, MODELS: 100, DURATION: 80},
    }


def save_sweep_view(client: Any, experiment_id: str, parent_id: str, swept: list[str],
                    metric: str, tags: tuple[str, ...] = (),
                    names: list[str] | None = None) -> str:
    """Store the sweep's view on its experiment; returns its share key (the parent run id)."""
    state = sweep_state(parent_id, swept, metric, tags, names)
    client.set_experiment_tag(experiment_id, SHARED_VIEW_TAG + parent_id, json.dumps(state))
    return parent_id


def fit_run_names(client: Any, experiment_id: str, key: str, names: list[str]) -> None:
    """Widen (or narrow) a saved view's Run Name column to its runs' names, once they are
    known (a search's pruned trials are renamed when they stop)."""
    experiment = client.get_experiment(experiment_id)
    if not has_view(experiment, key):
        return
    state = json.loads(experiment.tags[SHARED_VIEW_TAG + key])
    state["columnWidths"][RUN_NAME] = name_width(names)
    client.set_experiment_tag(experiment_id, SHARED_VIEW_TAG + key, json.dumps(state))


def view_link(experiment_id: str, key: str) -> str:
    """The UI address of a saved view, after the server's."""
    return f"#/experiments/{experiment_id}/runs?{SHARE_KEY_PARAM}={key}&{MODEL_TRAINING}"


def run_link(experiment_id: str, run_id: str) -> str:
    """The UI address of a run, after the server's."""
    return f"#/experiments/{experiment_id}/runs/{run_id}?{MODEL_TRAINING}"



def search_link(experiment_id: str, search_filter: str, order_by: str) -> str:
    """The UI address of an experiment's runs matching an MLflow filter, sorted by a metric,
    best first (a runs table's filter and sort travel in the URL; its columns do not)."""
    query = urlencode({"searchFilter": search_filter, "orderByKey": column("metrics", order_by),
                       "orderByAsc": str("loss" in order_by).lower()})
    return f"#/experiments/{experiment_id}/runs?{query}&{MODEL_TRAINING}"


def has_view(experiment: Any, key: str) -> bool:
    """Whether the experiment holds the saved view `key`."""
    return SHARED_VIEW_TAG + key in experiment.tags


def ui_hint(uri: str, link: str) -> str:
    """How to open a UI address (`link`, after the server's) for a tracking URI: the server's
    own address, or `mlflow ui` on a local store."""
    if is_server(uri):
        return f"open {uri.rstrip('/')}/{link}"
    store = f" --backend-store-uri {uri}" if "://" in uri else ""
    return f"mlflow ui{store}  then open http://127.0.0.1:5000/{link}"
