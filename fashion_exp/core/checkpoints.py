"""Per-epoch checkpoints of a run, and resuming a stopped run from its last completed epoch.

A run's checkpoint folder `<checkpoint_dir>/<run_id>/` holds `config.yaml` (the run's resolved
config, written when it starts), `weights.npz` (model weights and optimizer state, including
the step count that drives the learning-rate schedule) and `state.json` (completed epochs, the
history so far, the tracking URI). Both files are replaced atomically after each epoch, so a
kill at any moment leaves the previous epoch's checkpoint intact.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from omegaconf import DictConfig, OmegaConf

from fashion_exp.config import project_root
from fashion_exp.files import atomic_write, read_json, write_json
from fashion_exp.schemas import GROUPS, schema_of

if TYPE_CHECKING:  # keras is not imported here: listing runs must not start TensorFlow
    import keras

CONFIG_FILE = "config.yaml"
WEIGHTS_FILE = "weights.npz"
STATE_FILE = "state.json"


class ResumeError(RuntimeError):
    """The run cannot be resumed; the message says why and what can be."""


def root(checkpoint_dir: str | None, tracking_uri: str) -> Path:
    """Folder of all runs' checkpoints: trainer.checkpoint_dir if set, else beside a local
    SQLite store (<store folder>/checkpoints), else <repo>/mlruns/checkpoints."""
    if checkpoint_dir:
        return Path(checkpoint_dir)
    if tracking_uri.startswith("sqlite:///"):
        return Path(tracking_uri.removeprefix("sqlite:///")).parent / "checkpoints"
    return project_root() / "mlruns" / "checkpoints"


def start(folder: Path, cfg: DictConfig, tracking_uri: str, run_id: str) -> None:
    """Create a run's checkpoint folder with its config (nothing trained yet)."""
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write(folder / CONFIG_FILE,
                  lambda tmp: tmp.write_text(OmegaConf.to_yaml(cfg, resolve=True)))
    save_state(folder, {"run_id": run_id, "tracking_uri": tracking_uri, "epochs_done": 0,
                        "history": {}})


def save_state(folder: Path, state: dict[str, Any]) -> None:
    write_json(folder / STATE_FILE, state)


def load_state(folder: Path) -> dict[str, Any]:
    """The state of a checkpoint folder."""
    return read_json(folder / STATE_FILE)


def save(folder: Path, model: keras.Model, epochs_done: int,
         history: dict[str, list[float]]) -> None:
    """Weights and optimizer state after `epochs_done` epochs, then the state that names them."""
    arrays = {f"w{i}": w for i, w in enumerate(model.get_weights())}
    arrays |= {f"o{i}": np.asarray(v) for i, v in enumerate(model.optimizer.variables)}

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as out:  # a file object: np.savez would add ".npz" to the name
            np.savez(out, **arrays)

    atomic_write(folder / WEIGHTS_FILE, write)
    save_state(folder, load_state(folder) | {"epochs_done": epochs_done, "history": history})


def restore(folder: Path, model: keras.Model) -> None:
    """Put a checkpoint's weights and optimizer state into a freshly built, compiled model."""
    with np.load(folder / WEIGHTS_FILE) as saved:
        weights = [saved[f"w{i}"] for i in range(sum(k.startswith("w") for k in saved))]
        opt_values = [saved[f"o{i}"] for i in range(sum(k.startswith("o") for k in saved))]
    model.set_weights(weights)
    model.optimizer.build(model.trainable_variables)
    variables = model.optimizer.variables
    if len(variables) != len(opt_values):
        raise ResumeError(f"the checkpoint in {folder} does not match the rebuilt optimizer "
                          f"({len(opt_values)} vs {len(variables)} variables)")
    for variable, value in zip(variables, opt_values, strict=True):
        variable.assign(value)


def candidates(folder: Path) -> list[Path]:
    """Checkpoint folders of runs under a root, newest first."""
    folders = [p for p in folder.glob("*") if (p / STATE_FILE).is_file()]
    return sorted(folders, key=lambda p: (p / STATE_FILE).stat().st_mtime, reverse=True)


def find(ckpt_root: Path, wanted: str, resumable: Any) -> Path:
    """The checkpoint folder to resume under ckpt_root: run id `wanted`, or the newest that
    resumable(run_id, tracking_uri) accepts for `latest`. ResumeError otherwise."""
    found = candidates(ckpt_root)
    if wanted == "latest":
        for folder in found:
            state = load_state(folder)
            if resumable(state["run_id"], state["tracking_uri"]):
                return folder
        raise ResumeError(f"no stopped run with a checkpoint in {ckpt_root}; "
                          "list runs with: fashion-exp-runs interrupted")
    folder = ckpt_root / wanted
    if not (folder / STATE_FILE).is_file():
        have = ", ".join(p.name for p in found[:5]) or "none"
        raise ResumeError(f"trainer.resume={wanted}: no checkpoint of that run in {ckpt_root} "
                          f"(runs with checkpoints: {have})")
    return folder


def saved_config(folder: Path) -> DictConfig:
    """The config a run started with; keys added to its options' schemas since it was written
    take their defaults, and keys its option no longer has (read by no option of it: written
    when one schema held the keys of every option) are dropped."""
    saved = OmegaConf.load(folder / CONFIG_FILE)
    for group in GROUPS:
        if group in saved:
            schema = schema_of(group, saved[group])
            known = {f.name for f in dataclasses.fields(schema)}
            kept = {k: v for k, v in saved[group].items() if k in known}
            saved[group] = OmegaConf.merge(OmegaConf.structured(schema), kept)
    return saved


def remove(folder: Path) -> None:
    """Delete a finished run's checkpoints (its model is logged)."""
    shutil.rmtree(folder, ignore_errors=True)
