"""Links into the MLflow UI, and saved views: a sweep opens with its swept params and key metrics.

MLflow's runs page loads a view from the URL parameter `viewStateShareKey=<key>`: its state
is the JSON in the experiment tag `mlflow.sharedViewState.<key>` (the tag its "Share" button
writes). The state holds the runs table's columns, sort order and search filter, so a link
opens the sweep ready to compare, without clicking. The parameter must be on the runs tab's
address: the experiment's own address redirects there and drops it.

The UI's sidebar shows GenAI pages or model-training pages by the URL parameter
`workflowType` (remembered by the browser), GenAI unless told: every link says
`machine_learning`.
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import urlencode

from fashion_exp.core.metrics import key_metrics

SHARED_VIEW_TAG = "mlflow.sharedViewState."
SHARE_KEY_PARAM = "viewStateShareKey"
MODEL_TRAINING = "workflowType=machine_learning"


def column(kind: str, key: str) -> str:
    """A column of MLflow's runs table: column('params', 'optimizer.lr') is
    "params.`optimizer.lr`" (kind: attributes, params, metrics or tags)."""
    return f"{kind}.`{key}`"


def sweep_state(parent_id: str, swept: list[str], metric: str,
                tags: tuple[str, ...] = ()) -> dict[str, Any]:
    """The view of one sweep: its jobs' runs, best first (the parent, which repeats the best
    one's values, left out); columns: the swept params, the optimized value (e.g.
    best_val_accuracy), the test metrics, the given tags (a pruned search's
    pruned_at_epoch), the logged model."""
    metrics = key_metrics(metric)
    objective = metrics[0]
    return {
        "searchFilter": f"tags.sweep_id = '{parent_id}' and tags.sweep = 'child'",
        "orderByKey": column("metrics", objective),
        "orderByAsc": "loss" in metric,
        "selectedColumns": [column("params", k) for k in swept]
        + [column("metrics", m) for m in metrics] + [column("tags", t) for t in tags]
        + [column("attributes", "Models")],
        # MLflow applies widths only to the columns named in columnOrder (ids of its table).
        "columnOrder": ["0", column("attributes", "Run Name"), "runDateAndNestInfo",
                        "duration", column("attributes", "Models")]
        + [column("metrics", m) for m in metrics] + [column("tags", t) for t in tags]
        + [column("params", k) for k in swept],
        # Wide enough for the metric and tag names (MLflow's 100 px cut best_val_accuracy off), the
        # model link narrower: the swept params stay on a laptop's screen.
        "columnWidths": {column(kind, k): max(100, 7 * len(k) + 30)
                         for kind, keys in (("metrics", metrics), ("tags", tags)) for k in keys}
        | {column("attributes", "Models"): 100, "runDateAndNestInfo": 150},
    }


def save_sweep_view(client: Any, experiment_id: str, parent_id: str, swept: list[str],
                    metric: str, tags: tuple[str, ...] = ()) -> str:
    """Store the sweep's view on its experiment; returns its share key (the parent run id)."""
    state = sweep_state(parent_id, swept, metric, tags)
    client.set_experiment_tag(experiment_id, SHARED_VIEW_TAG + parent_id, json.dumps(state))
    return parent_id


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
    if uri.startswith(("http://", "https://")):
        return f"open {uri.rstrip('/')}/{link}"
    store = f" --backend-store-uri {uri}" if "://" in uri else ""
    return f"mlflow ui{store}  then open http://127.0.0.1:5000/{link}"
