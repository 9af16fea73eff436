"""The model folder an image serves: an MLflow model folder, as SageMaker extracts
`model.tar.gz` into /opt/ml/model. Read, checked and loaded here; a folder that cannot be
served is a BadModel whose message is the one line the user sees."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

MODEL_DIR = Path("/opt/ml/model")  # where SageMaker extracts model.tar.gz
MODEL_DIR_ENV = "FASHION_EXP_MODEL_DIR"  # another folder, for running outside an image
INFO_FILE = "fashion_exp_model.json"  # the model's source URI, run name and metrics, if known


class BadModel(Exception):
    """The model folder cannot be served; the message is the one line the user sees."""


def model_dir() -> Path:
    """The folder to serve: $FASHION_EXP_MODEL_DIR, else /opt/ml/model."""
    return Path(os.environ.get(MODEL_DIR_ENV) or MODEL_DIR)


def read_flavors(folder: Path) -> dict[str, Any]:
    """The MLmodel file's contents; BadModel if the folder is not an MLflow Keras model."""
    import yaml

    if not folder.is_dir():
        raise BadModel(f"model folder {folder} does not exist: extract the model's "
                       f"model.tar.gz there (an MLflow model folder: MLmodel, data/...)")
    mlmodel = folder / "MLmodel"
    if not mlmodel.is_file():
        listed = sorted(p.name for p in folder.iterdir())[:5]
        raise BadModel(f"model folder {folder} holds no MLmodel file (it holds "
                       f"{listed or 'nothing'}): it must be an MLflow model folder "
                       "(MLmodel, data/...), e.g. model.tar.gz extracted by SageMaker")
    try:
        spec = yaml.safe_load(mlmodel.read_text())
    except (OSError, UnicodeError, yaml.YAMLError) as err:
        raise BadModel(f"{mlmodel} is not readable YAML: {type(err).__name__}: "
                       f"{str(err).splitlines()[0] if str(err) else ''}") from None
    flavors = spec.get("flavors") if isinstance(spec, dict) else None
    if not isinstance(flavors, dict) or "tensorflow" not in flavors:
        found = sorted(flavors) if isinstance(flavors, dict) else "none"
        raise BadModel(f"{mlmodel} is not a Keras model logged with MLflow (flavors: {found}; "
                       "the tensorflow flavor is needed): log it with fashion-exp-train")
    return spec


def load(folder: Path) -> Any:
    """The folder's model, loaded, compiled for (n, 28, 28) uint8 batches and checked on
    probe images, as a ServedModel; BadModel with the reason otherwise."""
    spec = read_flavors(folder)
    import mlflow.tensorflow

    from fashion_exp.schemas import IMAGE_SIDE
    from fashion_exp.serving.batching import output_problem
    from fashion_exp.serving.models import ServedModel, graph_predictor, probe_images
    from fashion_exp.tracking.logged_models import ModelRef

    try:
        model = mlflow.tensorflow.load_model(str(folder))
    except Exception as err:  # noqa: BLE001 - whatever broke, the folder cannot be served
        raise BadModel(f"cannot load the Keras model in {folder}: {type(err).__name__}: "
                       f"{first_line(err)}") from None

    predict = graph_predictor(model)

    probe = probe_images()
    try:
        answer = predict(probe)  # traced now, not on the first request
    except Exception as err:  # noqa: BLE001 - a model that fails on images cannot serve them
        raise BadModel(f"the model in {folder} does not take (n, {IMAGE_SIDE}, {IMAGE_SIDE}) "
                       "uint8 images: "
                       f"{type(err).__name__}: {first_line(err)}") from None
    if problem := output_problem(answer, len(probe), "probe images"):
        raise BadModel(f"the model in {folder} cannot serve: {problem}")
    info = model_info(folder)
    run_id = str(spec.get("run_id") or "")
    ref = ModelRef(info.get("uri") or f"file://{folder}", run_id,
                   str(spec.get("model_id") or ""), f"file://{folder}", info.get("name"),
                   info.get("version"))
    return ServedModel(ref, info.get("run_name") or run_id or folder.name,
                       info.get("metrics") or {}, predict)


def model_info(folder: Path) -> dict[str, Any]:
    """What fashion-exp-image wrote beside MLmodel (source URI, run name, metrics); {} if
    the folder came from elsewhere."""
    try:
        info = json.loads((folder / INFO_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def first_line(err: BaseException) -> str:
    """The first non-empty line of an error's message, at most 300 characters."""
    lines = [line for line in str(err).splitlines() if line.strip()]
    return (lines[0] if lines else "")[:300]
