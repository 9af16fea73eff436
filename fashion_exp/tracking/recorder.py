"""What one run records in MLflow: params, tags, metrics, texts, figures, the model, its end.

Every call is one journal entry (offline.apply makes it live). On a local store it is made at
once; on a tracking server it goes through the run's outbox, which keeps it on disk while the
server does not answer and sends it when the server is back. A recorder belongs to one run
(store.tracked_run makes it) and is handed to whoever logs: no module-level state.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
import traceback
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from omegaconf import DictConfig, OmegaConf

from fashion_exp import interrupts
from fashion_exp.core.metrics import PER_CLASS_PREFIX, epoch_metric, tidy
from fashion_exp.schemas import run_params
from fashion_exp.tracking.offline import Outbox, apply

log = logging.getLogger(__name__)


class Recorder:
    """The logging calls of one run (run_id), live or through its outbox (on a server)."""

    def __init__(self, client: MlflowClient, run_id: str, outbox: Outbox | None = None) -> None:
        self.client = client
        self.run_id = run_id
        self.outbox = outbox

    def _send(self, entry: dict[str, Any], write: Callable[[Path], None] | None = None,
              live: Callable[[], Any] | None = None) -> None:
        """Make one call: `entry` (its files written by write(folder)), or `live` when an
        in-memory object can be logged without its file (the model)."""
        def now() -> None:
            if live is not None:
                live()
            elif write is None:  # params, tags, metrics, the end: nothing on disk
                apply(self.client, self.run_id, Path(), entry)
            else:
                with tempfile.TemporaryDirectory() as tmp:
                    write(Path(tmp))
                    apply(self.client, self.run_id, Path(tmp), entry)

        def kept(folder: Path) -> dict[str, Any]:
            if write is not None:
                write(folder)
            return entry

        if self.outbox is None:
            with interrupts.deferred():  # Ctrl-C waits for the write: no half-written store
                now()
        else:
            self.outbox.send(now, kept)

    def _artifact(self, name: str, write: Callable[[Path], None]) -> None:
        """Artifact `name` (a file, or a folder's files), written by write(path)."""
        file = f"files/{uuid.uuid4().hex[:12]}/{Path(name).name}"
        parent = str(Path(name).parent)

        def put(folder: Path) -> None:
            (folder / file).parent.mkdir(parents=True, exist_ok=True)
            write(folder / file)

        self._send({"kind": "artifact", "file": file,
                    "artifact_path": None if parent == "." else parent}, put)

    # --- What a run records -------------------------------------------------------------------

    def log_params(self, params: dict[str, Any]) -> None:
        """Params of the run."""
        self._send({"kind": "params", "params": {k: str(v) for k, v in params.items()}})

    def set_tags(self, tags: dict[str, str]) -> None:
        """Tags of the run."""
        self._send({"kind": "tags", "tags": tags})

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Metrics at `step`, float32 values tidied."""
        self._send({"kind": "metrics", "metrics": {k: tidy(v) for k, v in metrics.items()},
                    "step": step, "timestamp": int(time.time() * 1000)})

    def log_text(self, text: str, name: str) -> None:
        """A text artifact."""
        self._artifact(name, lambda path: path.write_text(text))

    def log_config(self, cfg: DictConfig, hydra_dir: Path | None) -> None:
        """Params (what determines the result: schemas.run_params), the resolved YAML (every
        key, operational settings included), and Hydra's .hydra/ files."""
        self.log_params(run_params(cfg))
        self.log_text(OmegaConf.to_yaml(cfg, resolve=True), "config.yaml")
        if hydra_dir is not None and (hydra_dir / ".hydra").is_dir():
            source = hydra_dir / ".hydra"
            self._artifact("hydra/files", lambda path: shutil.copytree(source, path))

    def log_epoch(self, metrics: dict[str, float], epoch: int) -> None:
        """One epoch's Keras metrics under their epoch_metric names, step = epoch counted from
        1 (the figures count epochs the same way)."""
        self.log_metrics({epoch_metric(key): value for key, value in metrics.items()}, epoch)

    def log_model_info(self, model: Any, network: Any = None) -> None:
        """Parameter and layer counts of the network (the model itself, or the one a
        test-time wrapper holds) as tags (they follow from params, so they are not params: a
        sweep's comparison would count them as varied), and the network's Keras summary as
        text."""
        network = model if network is None else network
        lines: list[str] = [] if network is model else \
            [f'The logged model "{model.name}" wraps the network "{network.name}" below.', ""]
        network.summary(print_fn=lambda line, **_: lines.append(line))
        self.set_tags({"model.param_count": str(network.count_params()),
                       "model.num_layers": str(len(network.layers))})
        self.log_text("\n".join(lines), "model_summary.txt")

    def log_evaluation(self, result: Any, epochs_trained: int) -> None:
        """Test loss and accuracy, accuracy per class, and the classification report, at the
        step of the last epoch (the step the logged model links its metrics from)."""
        per_class = {PER_CLASS_PREFIX + metric_key(name): acc
                     for name, acc in result.per_class_accuracy.items()}
        # Six decimals: finer than one image of a 10,000-image test set, and readable.
        metrics = {key: round(float(value), 6) for key, value in
                   ({"test_loss": result.loss, "test_accuracy": result.accuracy}
                    | per_class).items()}
        metrics["epochs_trained"] = epochs_trained
        self.log_metrics(metrics, epochs_trained)
        self.log_text(result.report, "classification_report.txt")

    def log_figures(self, figures: dict[str, Any]) -> None:
        """Each matplotlib figure as a PNG artifact under its file name."""
        for name, fig in figures.items():
            self._artifact(name, fig.savefig)

    def log_model(self, model: Any, registered_name: str | None, step: int) -> None:
        """The model under 'model' (and registered); MLflow links to it the run's metrics at
        `step` (the last epoch's, and the test metrics logged there)."""
        from fashion_exp.tracking import logged_models

        self._send({"kind": "model", "file": "model.keras", "registered_name": registered_name,
                    "step": step},
                   write=lambda folder: model.save(folder / "model.keras"),
                   live=lambda: logged_models.log_keras(model, self.client.tracking_uri,
                                                        self.run_id, registered_name, step))

    # --- How a run ends -----------------------------------------------------------------------

    def record_error(self, err: BaseException) -> None:
        """Put the error on the run (tag and traceback artifact); never raises."""
        try:
            self.set_tags({"error": f"{type(err).__name__}: {err}"[:5000]})
            self.log_text("".join(traceback.format_exception(type(err), err, err.__traceback__)),
                          "error.txt")
        except Exception as inner:  # noqa: BLE001 - the original error matters more
            log.warning("could not record the error on the run: %s", inner)

    def end(self, status: str) -> None:
        """End the run with a status (FINISHED, FAILED, KILLED)."""
        self._send({"kind": "end", "status": status})


def metric_key(class_name: str) -> str:
    """A class name as a metric-name suffix: 'T-shirt/top' -> 't_shirt_top'."""
    return "".join(c if c.isalnum() else "_" for c in class_name.lower())
