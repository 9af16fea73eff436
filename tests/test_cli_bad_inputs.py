"""Bad input across the project, in one table: each case gets a one-line message naming the bad
value and what is allowed, a non-zero exit (or a 4xx answer), no run left RUNNING, and the
store exactly as it was.

The store holds one finished run before every case; its runs, params, metrics, tags and
artifact files are compared before and after. The config tables run each entry point's main()
in this process (a check refused before anything starts costs milliseconds, not a new
interpreter); a sample of them also runs as a real process.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import importlib
import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest

from .helpers import (
    BAD_REQUESTS,
    CLI_ENV,
    real_data_dir,
    requires_real_data,
    write_dataset,
    write_idx,
)

UNKNOWN_RUN = "0123456789abcdef0123456789abcdef"


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """A SQLite store with one finished run (param, metrics, tag, artifact)."""
    folder = tmp_path_factory.mktemp("bad_inputs") / "store"
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    exp = client.create_experiment("fashion_exp", (folder / "artifacts").as_uri())
    run = client.create_run(exp, run_name="kept", tags={"kept": "yes"})
    client.log_param(run.info.run_id, "optimizer.lr", "0.02")
    for step, value in enumerate([0.5, 0.7, 0.8]):
        client.log_metric(run.info.run_id, "val_accuracy", value, step=step)
    client.log_text(run.info.run_id, "hello", "note.txt")
    client.set_terminated(run.info.run_id, "FINISHED")
    return folder


def cli(module: str, *args: str, tmp_path: Path) -> subprocess.CompletedProcess:
    """Run one of the project's entry points (python -m <module>) in tmp_path."""
    return subprocess.run([sys.executable, "-m", module, *args], cwd=tmp_path,
                          capture_output=True, text=True, env=CLI_ENV, timeout=300)


def main_in_process(module: str, *args: str, tmp_path: Path) -> subprocess.CompletedProcess:
    """Run an entry point's main() in this process as `python -m <module> args` would, in
    tmp_path: its exit status and what it printed."""
    out, err = io.StringIO(), io.StringIO()
    argv = sys.argv
    sys.argv = [module, *args]
    code = 0
    try:
        with contextlib.chdir(tmp_path), contextlib.redirect_stdout(out), \
                contextlib.redirect_stderr(err):
            importlib.import_module(module).main()
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    finally:
        sys.argv = argv
    return subprocess.CompletedProcess([module, *args], code, out.getvalue(), err.getvalue())


def snapshot(folder: Path) -> tuple:
    """Every run of the store with its data, and every artifact file with its hash."""
    client = mlflow.MlflowClient(f"sqlite:///{folder / 'mlflow.db'}")
    exps = client.search_experiments()
    runs = client.search_runs([e.experiment_id for e in exps]) if exps else []
    rows = sorted(
        (r.info.run_id, r.info.status, r.info.end_time, tuple(sorted(r.data.params.items())),
         tuple(sorted(r.data.metrics.items())),
         tuple(sorted((k, v) for k, v in r.data.tags.items())))
        for r in runs)
    files = sorted((str(p.relative_to(folder)), hashlib.md5(p.read_bytes()).hexdigest())
                   for p in folder.rglob("*") if p.is_file() and p.suffix not in (".db", ".lock"))
    return tuple(e.name for e in exps), tuple(rows), tuple(files)


def broken_data(tmp: Path, how: str) -> Path:
    """A data folder with the four file names, broken in one way."""
    folder = write_dataset(tmp / how, n_train=100, n_test=20)
    images = folder / "train-images-idx3-ubyte.gz"
    if how == "missing":
        images.unlink()
    elif how == "truncated":
        images.write_bytes(images.read_bytes()[:200])
    elif how == "not_gzip":
        images.write_bytes(b"these are not images at all")
    elif how == "magic":
        write_idx(images, np.zeros((100, 28, 28)), magic=0x0000_0999)
    elif how == "counts":
        write_idx(folder / "train-labels-idx1-ubyte.gz", np.zeros(90))
    elif how == "shape":
        write_idx(images, np.zeros((100, 27, 28)))
    elif how == "labels":
        write_idx(folder / "train-labels-idx1-ubyte.gz", np.full(100, 12))
    elif how == "short_body":
        with gzip.open(images, "wb") as f:
            f.write(bytes.fromhex("00000803") + (100).to_bytes(4, "big") + bytes(8) + bytes(50))
    return folder


def md5_mismatch(tmp: Path) -> Path:
    """The real files, but one of them replaced by other data of the right form."""
    real = real_data_dir()
    folder = tmp / "md5"
    folder.mkdir()
    for name in os.listdir(real):
        shutil.copy(real / name, folder / name)
    write_idx(folder / "t10k-labels-idx1-ubyte.gz", np.zeros(10000))
    return folder


SEARCH = "hparams_search=mlp_optuna"  # after "-m": an Optuna search

# (case id, command-line arguments, text the last line of stderr must contain)
TRAIN_CASES = [
    ("key_typo", ["optimzer.lr=0.1"], "optimzer"),
    ("wrong_type", ["optimizer.lr=fast"], "optimizer.lr"),
    ("epochs_zero", ["trainer.epochs=0"], "trainer.epochs=0: must be >= 1"),
    ("batch_negative", ["trainer.batch_size=-5"], "trainer.batch_size=-5: must be >= 1"),
    ("val_split_range", ["data.val_split=1.5"], "data.val_split=1.5"),
    ("unknown_model", ["model=transformer"], "transformer"),
    ("unknown_optimizer", ["optimizer=adamx"], "adamx"),
    ("unknown_experiment", ["experiment=nope"], "nope"),
    ("added_key", ["+scheduler=cosine"], "scheduler='cosine': no such key"),
    ("added_nested_key", ["+optimizer.momentun=0.9"],
     "optimizer.momentun is not a key of optimizer=sgd (its keys: lr, momentum, nesterov, "),
    ("unknown_group_option", ["schedule=linear"], "linear"),
    ("bad_precision", ["trainer.precision=float8"], "trainer.precision='float8'"),
    ("dropout_range", ["model.dropout=1.0"], "model.dropout=1.0"),
    ("bad_metric", ["optimized_metric=f1"], "optimized_metric='f1'"),
    ("resume_not_an_id", ["trainer.resume=yesterday"], "trainer.resume='yesterday'"),
    ("tracking_scheme", ["tracking.uri=ftp://example.org/store"], "tracking.uri='ftp://"),
    ("server_not_http", ["tracking=server", "tracking.uri=sqlite:///x.db"],
     "tracking=server needs the server's http"),
    ("bad_sweep_value", ["-m", "trainer.epochs=2,0"], "trainer.epochs=0"),
    ("unknown_pruner", ["-m", "hparams_search=mlp_optuna", "hydra/sweeper/pruner=asha"],
     "Could not find 'hydra/sweeper/pruner/asha'"),
    ("pruner_setting", ["-m", "hparams_search=mlp_optuna",
                        "hydra.sweeper.pruner.reduction_factor=1"],
     "hydra.sweeper.pruner.reduction_factor=1: SuccessiveHalvingPruner takes an integer from 2"),
    ("pruner_setting_type", ["-m", "hparams_search=mlp_optuna", "hydra/sweeper/pruner=median",
                             "hydra.sweeper.pruner.n_warmup_steps=-1"],
     "n_warmup_steps=-1"),
    ("pruner_unknown_setting", ["-m", "hparams_search=mlp_optuna",
                                "hydra.sweeper.pruner.patience=2"], "patience"),
    ("pruned_test_metric", ["-m", "hparams_search=mlp_optuna", "optimized_metric=test_accuracy"],
     "optimized_metric='test_accuracy': a pruned search judges trials after every epoch"),
    ("search_timeout", ["-m", "hparams_search=mlp_optuna", "hydra.sweeper.timeout=0"],
     "hydra.sweeper.timeout=0.0: use seconds > 0"),
    ("search_trials", ["-m", "hparams_search=cnn_optuna", "hydra.sweeper.n_trials=0"],
     "hydra.sweeper.n_trials=0: use 1 or more"),
    # Sweeper settings Optuna lets through until a trial runs (every trial failed, exit 0), or
    # refuses with a traceback after the sweep folder and its MLflow parent exist.
    ("pruner_nan", ["-m", SEARCH, "hydra.sweeper.pruner.reduction_factor=nan"],
     "hydra.sweeper.pruner.reduction_factor=nan: SuccessiveHalvingPruner takes an integer"),
    ("pruner_rate_inf", ["-m", SEARCH, "hydra.sweeper.pruner.min_early_stopping_rate=1e309"],
     "hydra.sweeper.pruner.min_early_stopping_rate=inf: SuccessiveHalvingPruner takes"),
    ("hyperband_max_0", ["-m", SEARCH, "hydra/sweeper/pruner=hyperband",
                         "hydra.sweeper.pruner.max_resource=0"],
     "hydra.sweeper.pruner.max_resource=0: HyperbandPruner takes an integer from 1"),
    ("hyperband_min_over_max", ["-m", SEARCH, "hydra/sweeper/pruner=hyperband",
                                "hydra.sweeper.pruner.min_resource=5",
                                "hydra.sweeper.pruner.max_resource=3"],
     "hydra.sweeper.pruner.max_resource=3: use at least min_resource (5) or 'auto'"),
    ("median_startup_nan", ["-m", SEARCH, "hydra/sweeper/pruner=median",
                            "hydra.sweeper.pruner.n_startup_trials=nan"],
     "hydra.sweeper.pruner.n_startup_trials=nan: MedianPruner takes an integer from 0"),
    ("median_warmup_inf", ["-m", SEARCH, "hydra/sweeper/pruner=median",
                           "hydra.sweeper.pruner.n_warmup_steps=1e309"],
     "hydra.sweeper.pruner.n_warmup_steps=inf: MedianPruner takes an integer from 0"),
    ("search_direction", ["-m", SEARCH, "hydra.sweeper.direction=sideways"],
     "hydra.sweeper.direction='sideways': use maximize or minimize"),
    ("failure_rate_nan", ["-m", SEARCH, "hydra.sweeper.max_failure_rate=nan"],
     "hydra.sweeper.max_failure_rate=nan: use a fraction from 0 to 1"),
    ("failure_rate_negative", ["-m", SEARCH, "hydra.sweeper.max_failure_rate=-1"],
     "hydra.sweeper.max_failure_rate=-1.0: use a fraction from 0 to 1"),
    ("sampler_seed", ["-m", SEARCH, "hydra.sweeper.sampler.seed=-1"],
     "hydra.sweeper.sampler.seed=-1: use an integer from 0 to 4294967295"),
    *[(f"study_name_{case}", ["-m", SEARCH, f"hydra.sweeper.study_name={name}"],
       f"hydra.sweeper.study_name={shown}: use one folder name")
      for case, name, shown in [("up3", "../../..", "'../../..'"), ("up", "..", "'..'"),
                                ("empty", "''", "''"), ("slash", "a/b", "'a/b'"),
                                ("null", "null", "None"),
                                ("long", "x" * 300, "'" + "x" * 40 + "...'")]],
    ("search_storage", ["-m", "hparams_search=mlp_optuna",
                        "hydra.sweeper.storage=sqlite:////nonexistent/folder/optuna.db"],
     "hydra.sweeper.storage='sqlite:////nonexistent/folder/optuna.db': the study's storage "
     "cannot be opened (unable to open database file)"),
    # Deletes (~key), keys added to Hydra's settings and flags that swap the config: each
    # would otherwise run (~task_name trains) or fail with a traceback after making a folder.
    ("delete_key", ["~task_name"], "overrides='~task_name': task_name cannot be deleted"),
    ("delete_nested_key", ["~trainer.batch_size"],
     "trainer.batch_size cannot be deleted: every key is read; set a value instead, e.g. "
     "trainer.batch_size=64"),
    ("delete_group", ["~optimizer"], "optimizer needs one of its options; choose one instead"),
    ("delete_hydra_setting", ["~hydra.callbacks.mlflow_sweep"],
     "Hydra's own settings cannot be deleted"),
    ("added_hydra_key", ["+hydra.rundir=x"], "overrides='+hydra.rundir=x': no such key"),
    ("hydra_key_typo", ["hydra.job.chdr=true"], "Key 'chdr' not in 'JobConf'"),
    ("delete_in_sweep", ["-m", "trainer.seed=0,1", "~trainer.epochs"],
     "'~trainer.epochs': trainer.epochs cannot be deleted"),
    ("other_config", ["-cn", "evaluate"], "--config-name='evaluate': not supported"),
]


def check_training_config(run, args, message, store, tmp_path) -> None:
    """A bad training config: exit 2, one line naming it, no output folder, the store as it
    was."""
    before = snapshot(store)
    # The store and a short run first (were a case accepted), then the bad override.
    result = run("fashion_exp.cli.train", "debug=fast",
                 f"tracking.uri=sqlite:///{store / 'mlflow.db'}", *args,
                 f"hydra.run.dir={tmp_path / 'h'}", f"hydra.sweep.dir={tmp_path / 's'}",
                 tmp_path=tmp_path)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("fashion-exp-train: invalid config: ")
    assert message in lines[0]
    assert snapshot(store) == before
    assert not (tmp_path / "h").exists() and not (tmp_path / "s").exists()  # no output folder


@pytest.mark.parametrize("case,args,message", TRAIN_CASES, ids=[c[0] for c in TRAIN_CASES])
def test_bad_training_config(case, args, message, store, tmp_path) -> None:
    check_training_config(main_in_process, args, message, store, tmp_path)


IN_A_PROCESS = ["key_typo", "search_trials", "hydra_key_typo", "bad_sweep_value"]


@pytest.mark.parametrize("case", IN_A_PROCESS)
def test_bad_training_config_in_a_real_process(case, store, tmp_path) -> None:
    """A sample of the table through `python -m`: the same line and exit status."""
    (args, message), = [(c[1], c[2]) for c in TRAIN_CASES if c[0] == case]
    check_training_config(cli, args, message, store, tmp_path)


DATA_CASES = [
    ("missing_file", "missing", "lacks train-images-idx3-ubyte.gz"),
    ("truncated_gzip", "truncated", "not a readable gzip file"),
    ("not_gzip", "not_gzip", "not a readable gzip file"),
    ("wrong_magic", "magic", "wrong IDX magic number 0x00000999"),
    ("image_label_counts", "counts", "100 train images but 90 labels"),
    ("image_shape", "shape", "images of shape (27, 28), expected (28, 28)"),
    ("label_range", "labels", "label 12 outside 0..9"),
    ("short_body", "short_body", "the file is truncated or corrupt"),
    ("md5_mismatch", "md5", "MD5 of the contents is"),
]


@pytest.mark.slow  # a subprocess per case
@requires_real_data
@pytest.mark.parametrize("case,how,message", DATA_CASES, ids=[c[0] for c in DATA_CASES])
def test_bad_data_files(case, how, message, store, tmp_path) -> None:
    folder = md5_mismatch(tmp_path) if how == "md5" else broken_data(tmp_path, how)
    checks = [] if how == "md5" else ["data.verify_checksums=false"]
    before = snapshot(store)
    result = cli("fashion_exp.cli.train", f"data.dir={folder}", *checks, "data.download=false",
                 f"tracking.uri=sqlite:///{store / 'mlflow.db'}", f"hydra.run.dir={tmp_path / 'h'}",
                 tmp_path=tmp_path)
    last = result.stderr.strip().splitlines()[-1]
    assert result.returncode == 1, result.stderr[-2000:]
    assert last.startswith("fashion-exp-train: error: ") and message in last
    assert snapshot(store) == before


MODEL_URI_CASES = [
    ("unknown_run", f"runs:/{UNKNOWN_RUN}/model", UNKNOWN_RUN),
    ("unknown_registered_model", "models:/no_such_model/1", "no_such_model"),
    ("unknown_alias", "models:/no_such_model@champion", "no_such_model"),
    ("model_uri_scheme", "s3://bucket/model", "use runs:/<run_id>/model"),
    ("model_uri_no_version", "models:/onlyname", "models:/<name>/<version>"),
    ("model_uri_escape", f"runs:/{UNKNOWN_RUN}/../../../etc", "is not a model of this tracking"),
]


@pytest.mark.slow  # a subprocess per case
@pytest.mark.parametrize("case,uri,message", MODEL_URI_CASES,
                         ids=[c[0] for c in MODEL_URI_CASES])
def test_bad_model_uri(case, uri, message, store, tmp_path) -> None:
    before = snapshot(store)
    result = cli("fashion_exp.cli.evaluate", f"model_uri={uri}",
                 f"tracking.uri=sqlite:///{store / 'mlflow.db'}", f"hydra.run.dir={tmp_path / 'h'}",
                 tmp_path=tmp_path)
    last = result.stderr.strip().splitlines()[-1]
    assert result.returncode == 2, result.stderr[-2000:]
    assert last.startswith("fashion-exp-evaluate: model_uri=") and message in last
    assert snapshot(store) == before
    assert not (tmp_path / "h").exists()  # refused before Hydra made an output folder


@pytest.mark.parametrize(("added", "message"), [
    ("+foo=1", "foo=1: no such key"),
    ("+tracking.foo=1", "tracking.foo is not a key of tracking (its keys: mode, uri, "),
])
def test_evaluate_refuses_added_keys(added, message, store, tmp_path) -> None:
    before = snapshot(store)
    result = cli("fashion_exp.cli.evaluate", f"model_uri=runs:/{UNKNOWN_RUN}/model", added,
                 f"tracking.uri=sqlite:///{store / 'mlflow.db'}", f"hydra.run.dir={tmp_path / 'h'}",
                 tmp_path=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith(f"fashion-exp-evaluate: {message}")
    assert snapshot(store) == before and not (tmp_path / "h").exists()


# (entry point, arguments, the one line it prints)
ENTRY_POINT_CASES = [
    ("evaluate", ["~batch_size"], "fashion-exp-evaluate: overrides='~batch_size': batch_size "
     "cannot be deleted: every key is read; set a value instead, e.g. batch_size=1024"),
    ("evaluate", ["~hydra.run.dir"], "Hydra's own settings cannot be deleted"),
    ("evaluate", ["+hydra.job.foo=1"], "overrides='+hydra.job.foo=1': no such key"),
    ("evaluate", ["-m", "batch_size=8,0"], "fashion-exp-evaluate: batch_size=0: must be >= 1"),
    ("evaluate", ["-m", "batch_size=interval(1,8)"], "an evaluation sweep lists its values"),
    ("evaluate", ["-cn", "config"], "--config-name='config': not supported"),
    ("serve", ["~drain_seconds"], "fashion-exp-serve: overrides='~drain_seconds': drain_seconds "
     "cannot be deleted"),
    ("serve", ["~follow_seconds"], "follow_seconds cannot be deleted"),
    ("serve", ["~decode_workers"], "decode_workers cannot be deleted"),
    ("serve", ["~host"], "host cannot be deleted"),
    ("serve", ["hydra.run.dir=x"], "this command runs no Hydra job"),
]


@pytest.mark.parametrize("name,args,message", ENTRY_POINT_CASES,
                         ids=[f"{c[0]}_{'_'.join(c[1])}" for c in ENTRY_POINT_CASES])
def test_bad_overrides_of_the_other_entry_points(name, args, message, store, tmp_path) -> None:
    before = snapshot(store)
    model = [f"model_uri=runs:/{UNKNOWN_RUN}/model"] if name == "evaluate" else []
    result = main_in_process(f"fashion_exp.cli.{name}", *args, *model,
                             f"tracking.uri=sqlite:///{store / 'mlflow.db'}", tmp_path=tmp_path)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr[-2000:]
    assert len(lines) == 1 and message in lines[0], lines
    assert snapshot(store) == before
    assert not (tmp_path / "outputs").exists()  # no output folder


def test_evaluate_has_its_own_help(tmp_path) -> None:
    result = cli("fashion_exp.cli.evaluate", "--help", tmp_path=tmp_path)
    assert result.returncode == 0
    assert result.stdout.startswith("fashion-exp-evaluate: score a logged or registered model")
    assert "fashion-exp-evaluate -m model_uri=" in result.stdout
    assert "fashion-exp-train" not in result.stdout and "optimizer" not in result.stdout


@pytest.mark.parametrize("scheme", ["http", "HTTP"])
def test_unreachable_tracking_server(scheme, store, tmp_path) -> None:
    from devtools.servers import free_port

    port = free_port()
    before = snapshot(store)
    result = cli("fashion_exp.cli.train", "tracking=server",
                 f"tracking.uri={scheme}://127.0.0.1:{port}",
                 f"hydra.run.dir={tmp_path / 'h'}", tmp_path=tmp_path)
    assert result.returncode == 1
    assert f"the tracking server http://127.0.0.1:{port} does not answer" in (
        result.stderr.strip().splitlines()[-1])
    assert snapshot(store) == before


# A missing, corrupt, read-only or unreachable store: tests/test_store_checks.py, every CLI.


def test_resume_of_an_unknown_run(store, tmp_path) -> None:
    before = snapshot(store)
    result = cli("fashion_exp.cli.train", f"trainer.resume={UNKNOWN_RUN}",
                 f"tracking.uri=sqlite:///{store / 'mlflow.db'}", f"hydra.run.dir={tmp_path / 'h'}",
                 tmp_path=tmp_path)
    last = result.stderr.strip().splitlines()[-1]
    assert result.returncode == 1
    assert f"trainer.resume={UNKNOWN_RUN}: no checkpoint of that run" in last
    assert snapshot(store) == before


# The service's table of bad requests (tests/helpers.py), each with the store checked unchanged.
@requires_real_data
@pytest.mark.parametrize("case,request_args,status,detail", BAD_REQUESTS,
                         ids=[c[0] for c in BAD_REQUESTS])
def test_bad_service_request(case, request_args, status, detail, served_app) -> None:
    client, folder, _ = served_app
    before = snapshot(folder)
    answer = client.post("/predict", **request_args)
    assert answer.status_code == status, answer.text
    message = answer.json()["detail"]
    assert isinstance(message, str) and "\n" not in message and detail in message
    assert client.get("/health").status_code == 200
    assert snapshot(folder) == before


def test_the_table_covers_at_least_thirty_inputs() -> None:
    cases = (len(TRAIN_CASES) + len(DATA_CASES) + len(MODEL_URI_CASES) + 2 + 2 + 1
             + len(ENTRY_POINT_CASES) + len(BAD_REQUESTS))
    assert cases >= 30, cases
