"""The real runner, in subprocesses, against a temporary MLflow store and the real data."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time

import mlflow
import numpy as np
import pytest

from .helpers import REPO, requires_real_data, run_cli

pytestmark = [
    pytest.mark.slow,
    requires_real_data,
]
FAST = ["debug=fast", "data.limit=1000", "tracking.experiment_name=e2e"]


def runs_of(uri: str, experiment: str = "e2e") -> list:
    mlflow.set_tracking_uri(uri)
    return mlflow.search_runs(experiment_names=[experiment], output_format="list",
                              order_by=["attributes.start_time ASC"])


@pytest.fixture(scope="module")
def logged(tmp_path_factory):
    """One full debug run (2 epochs, model registered) shared by the assertions below."""
    tmp = tmp_path_factory.mktemp("e2e")
    uri = f"sqlite:///{tmp / 'store' / 'mlflow.db'}"
    result = run_cli(*FAST, "trainer.epochs=2", f"tracking.uri={uri}",
                     "tracking.registered_model_name=fashion_e2e", tmp_path=tmp)
    assert result.returncode == 0, result.stderr[-3000:]
    (run,) = runs_of(uri)
    return uri, run, result


def test_run_ends_with_one_summary_line(logged) -> None:
    uri, run, result = logged
    last = result.stdout.strip().splitlines()[-1]
    assert last.startswith("test_accuracy=0.")
    assert f"run_id={run.info.run_id}" in last and "mlflow ui --backend-store-uri" in last
    assert run.info.status == "FINISHED"


def test_params_tags_and_metrics(logged) -> None:
    uri, run, _ = logged
    params, tags = run.data.params, run.data.tags
    assert params["optimizer.lr"] == "0.02" and params["model.hidden"] == "[256, 128, 32]"
    assert params["trainer.epochs"] == "2" and tags["model.param_count"] == "238314"
    assert "model.param_count" not in params and "model.num_layers" not in params
    # Exactly what determines the result: the options and their keys, no setting (tracking.*,
    # trainer.verbose, checkpoints...) and no key of an option not chosen.
    assert params == {
        "data.val_split": "0.2", "data.limit": "1000", "data.shuffle_seed": "null",
        "model": "mlp", "model.hidden": "[256, 128, 32]", "model.activation": "relu",
        "model.dropout": "0.0", "optimizer": "sgd", "optimizer.lr": "0.02",
        "optimizer.momentum": "0.0", "optimizer.weight_decay": "0.0", "schedule": "constant",
        "augment": "none", "augment.shift": "0.0", "augment.flip": "False",
        "augment.erasing": "0.0", "augment.test_flip": "False", "trainer.epochs": "2",
        "trainer.batch_size": "64", "trainer.seed": "0", "trainer.deterministic": "False",
        "trainer.early_stopping": "False", "trainer.label_smoothing": "0.0",
        "trainer.precision": "float32", "trainer.strategy": "default"}
    # Named by what shapes the model; where it is logged (tracking.*) only in the tag.
    assert run.info.run_name == " ".join(o for o in tags["overrides"].split()
                                         if not o.startswith("tracking."))
    assert "tracking.uri=" in tags["overrides"] and "tracking." not in run.info.run_name
    assert "debug=fast" in tags["overrides"] and tags["git_commit"]
    client = mlflow.MlflowClient(uri)
    for key in ("epoch/loss", "epoch/accuracy", "epoch/val_loss", "epoch/val_accuracy",
                "training/learning_rate", "training/epoch_seconds"):
        history = client.get_metric_history(run.info.run_id, key)
        assert sorted({m.step for m in history}) == [1, 2], key  # epochs counted from 1
    metrics = run.data.metrics
    assert 0.1 < metrics["test_accuracy"] <= 1 and metrics["test_loss"] > 0
    per_class = [k for k in metrics if k.startswith("test_class_accuracy/")]
    assert len(per_class) == 10 and "test_class_accuracy/ankle_boot" in per_class
    best = max(m.value for m in client.get_metric_history(run.info.run_id, "epoch/val_accuracy"))
    assert metrics["best_val_accuracy"] == pytest.approx(best)
    assert "optimized_metric" not in metrics


def test_artifacts(logged) -> None:
    uri, run, _ = logged
    client = mlflow.MlflowClient(uri)
    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "hydra", "curves.png", "confusion_matrix.png", "predictions.png",
            "dataset_sample.png", "model_summary.txt", "classification_report.txt"} <= names
    hydra_files = {a.path for a in client.list_artifacts(run.info.run_id, "hydra")}
    assert {"hydra/config.yaml", "hydra/overrides.yaml"} <= hydra_files
    png = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="curves.png",
                                              tracking_uri=uri)
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_logged_and_registered_model_predict_from_raw_images(logged) -> None:
    uri, run, _ = logged
    mlflow.set_tracking_uri(uri)
    images = np.random.default_rng(0).integers(0, 256, (5, 28, 28)).astype(np.uint8)
    for model_uri in (f"runs:/{run.info.run_id}/model", "models:/fashion_e2e/1"):
        model = mlflow.pyfunc.load_model(model_uri)
        probs = np.asarray(model.predict(images))
        assert probs.shape == (5, 10)
        np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
    signature = model.metadata.signature.to_dict()
    assert "uint8" in signature["inputs"] and "[-1, 28, 28]" in signature["inputs"]


def test_cnn_with_schedule_augmentation_and_label_smoothing(tmp_path, tracking_uri) -> None:
    """The building blocks wired through the runner: the learning rate follows the cosine
    schedule per epoch, the augmentation layers are in the model but idle at inference."""
    result = run_cli(*FAST, "model=cnn", "model.filters=[8]", "model.dense=[]",
                     "model.batch_norm=true", "optimizer=adam", "schedule=cosine", "augment=strong",
                     "augment.test_flip=true", "trainer.label_smoothing=0.1", "trainer.epochs=3",
                     "tracking.figures=false",
                     f"tracking.uri={tracking_uri}", tmp_path=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    (run,) = runs_of(tracking_uri)
    params = run.data.params
    assert (params["schedule"], params["augment"], params["augment.erasing"],
            params["trainer.label_smoothing"]) == ("cosine", "strong", "0.5", "0.1")
    assert {k for k in params if k.split(".")[0] in ("model", "optimizer", "schedule")} == {
        "model", "model.filters", "model.convs_per_block", "model.kernel_size", "model.pooling",
        "model.global_pooling", "model.dense", "model.activation", "model.batch_norm",
        "model.dropout", "optimizer", "optimizer.lr", "optimizer.beta_1", "optimizer.beta_2",
        "optimizer.weight_decay", "schedule", "schedule.warmup_epochs", "schedule.min_lr_ratio"}
    history = mlflow.MlflowClient(tracking_uri).get_metric_history(run.info.run_id,
                                                                   "training/learning_rate")
    rates = [m.value for m in sorted(history, key=lambda m: m.step)]
    # Cosine from the peak to 0 at the last step, read at the end of each epoch.
    assert len(rates) == 3 and rates[0] > rates[1] > rates[2] and rates[2] == pytest.approx(0)
    summary = mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/model_summary.txt")
    assert "random_shift" in summary and "random_erasing" in summary
    # trained with the fused batch norm kernel (trainer.fused_batch_norm), logged as plain Keras
    assert "BatchNormalization" in summary and "Fused" not in summary
    keras_model = mlflow.tensorflow.load_model(f"runs:/{run.info.run_id}/model")
    network = keras_model.get_layer("cnn")  # inside the test-time flip wrapper
    assert [type(layer).__name__ for layer in network.layers if "_bn" in layer.name] \
        == ["BatchNormalization"]
    # augment.test_flip: the logged model averages each image's and its mirror's predictions
    assert keras_model.name == "cnn_test_flip" and "cnn_test_flip" in summary
    assert run.data.tags["model.num_layers"] == str(len(network.layers))  # the network's
    model = mlflow.pyfunc.load_model(f"runs:/{run.info.run_id}/model")
    images = np.random.default_rng(0).integers(0, 256, (4, 28, 28)).astype(np.uint8)
    np.testing.assert_array_equal(model.predict(images), model.predict(images))
    np.testing.assert_allclose(model.predict(images[:, :, ::-1].copy()), model.predict(images),
                               rtol=1e-5, atol=1e-6)


def test_same_seed_same_metrics_via_both_entry_points(tmp_path, tracking_uri) -> None:
    script = shutil.which("fashion-exp-train") or str(REPO / ".venv/bin/fashion-exp-train")
    common = [*FAST, f"tracking.uri={tracking_uri}", "tracking.log_model=false",
              "tracking.figures=false", "trainer.deterministic=true"]
    first = run_cli(*common, tmp_path=tmp_path / "a")
    second = run_cli(*common, tmp_path=tmp_path / "b", script=script)
    assert first.returncode == 0 and second.returncode == 0, second.stderr[-2000:]
    a, b = runs_of(tracking_uri)
    for key in ("epoch/loss", "epoch/val_accuracy", "test_accuracy", "test_loss"):
        assert a.data.metrics[key] == b.data.metrics[key], key


def test_diverged_training_fails_the_run_with_the_reason(tmp_path, tracking_uri) -> None:
    result = run_cli(*FAST, f"tracking.uri={tracking_uri}", "optimizer.lr=1e6",
                     "model.activation=elu", tmp_path=tmp_path)
    assert result.returncode != 0
    (run,) = runs_of(tracking_uri)
    assert run.info.status == "FAILED"
    assert "TrainingDiverged" in run.data.tags["error"] and "optimizer.lr" in run.data.tags["error"]


def test_missing_data_fails_before_any_run(tmp_path, tracking_uri) -> None:
    result = run_cli(*FAST, f"tracking.uri={tracking_uri}", f"data.dir={tmp_path / 'nope'}",
                     tmp_path=tmp_path)
    assert result.returncode != 0
    assert "lacks train-images-idx3-ubyte.gz" in result.stderr
    assert not (tmp_path / "mlruns").exists() or not runs_of(tracking_uri)


def test_ctrl_c_ends_the_run_killed(tmp_path, tracking_uri) -> None:
    cmd = [sys.executable, "-m", "fashion_exp.cli.train", *FAST, "trainer.epochs=500",
           "trainer.steps_per_execution=1", f"tracking.uri={tracking_uri}",
           f"hydra.run.dir={tmp_path / 'hydra'}"]
    log = open(tmp_path / "log.txt", "w")
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=log, stderr=log)
    try:
        deadline = time.time() + 180
        while time.time() < deadline:
            time.sleep(2)
            # Read the store only once the runner has created it (it logs "Training" after).
            if "Training <" not in (tmp_path / "log.txt").read_text():
                continue
            runs = runs_of(tracking_uri)
            if runs and "epoch/loss" in runs[0].data.metrics:
                break
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=120) != 0
    finally:
        proc.kill()
    runs = runs_of(tracking_uri)
    assert len(runs) == 1, (tmp_path / "log.txt").read_text()[-3000:]
    assert runs[0].info.status == "KILLED"
    assert "epoch/loss" in runs[0].data.metrics


def run_evaluate(*overrides: str, tmp_path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fashion_exp.cli.evaluate", *overrides,
                           f"hydra.run.dir={tmp_path / 'eval'}"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)


def test_evaluate_logged_and_registered_model(logged, tmp_path) -> None:
    uri, run, _ = logged
    source = run.info.run_id
    for model_uri in (f"runs:/{source}/model", "models:/fashion_e2e/1"):
        result = run_evaluate(f"model_uri={model_uri}", f"tracking.uri={uri}",
                              "tracking.experiment_name=e2e", "data.limit=1000",
                              tmp_path=tmp_path)
        assert result.returncode == 0, result.stderr[-2000:]
        assert f"source_run_id={source}" in result.stdout and "most confused:" in result.stdout
        assert "on 1,000 test images" in result.stdout  # data.limit=1000
    evaluations = [r for r in runs_of(uri) if r.data.tags.get("evaluation") == "true"]
    assert len(evaluations) == 2
    client = mlflow.MlflowClient(uri)
    for ev in evaluations:
        assert ev.info.status == "FINISHED" and ev.data.tags["source_run_id"] == source
        assert ev.data.params["test_images"] == "1000"
        # Same model, same test images: the same accuracy as the training run measured.
        assert ev.data.metrics["test_accuracy"] == pytest.approx(run.data.metrics["test_accuracy"])
        assert ev.data.metrics["test_loss"] == pytest.approx(run.data.metrics["test_loss"],
                                                             rel=1e-4)
        assert len([k for k in ev.data.metrics if k.startswith("test_class_accuracy/")]) == 10
        names = {a.path for a in client.list_artifacts(ev.info.run_id)}
        assert {"confusion_matrix.png", "misclassified.png", "confused_pairs.txt"} <= names
        pairs = mlflow.artifacts.load_text(f"{ev.info.artifact_uri}/confused_pairs.txt")
        assert " predicted as " in pairs.splitlines()[0]


@pytest.mark.parametrize(("model_uri", "message"), [
    ("runs:/0123456789abcdef/model", "is not a model of this tracking store"),
    ("models:/no_such_model/3", "no_such_model"),
    ("s3://bucket/model", "use runs:/<run_id>/model"),
])
def test_evaluate_unknown_model_is_one_clear_line(logged, tmp_path, model_uri, message) -> None:
    uri, _, _ = logged
    before = len(runs_of(uri))
    result = run_evaluate(f"model_uri={model_uri}", f"tracking.uri={uri}",
                          "tracking.experiment_name=e2e", tmp_path=tmp_path)
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("fashion-exp-evaluate: model_uri=") and message in last
    assert len(runs_of(uri)) == before
